"""Radiologists vs the model (paper section 4.2), on the studies the readers read.

With K readers, reader r is scored against the majority vote of the other K-1, and the model against
each of those K majorities; the means over r are reported with CIs, as is the difference model -
readers (mean and per reader), all on the same resamples of the read studies (drawn like the main
ones, seed and all, over the read studies only); a difference is significant when its CI excludes
0. With K-1 even a vote can tie; `tie_break='abnormal'` (default) makes a tied reference abnormal,
the conservative clinical choice (a study half the readers call abnormal is followed up);
'normal' is the alternative.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mura_jax.evaluation import bootstrap
from mura_jax.evaluation import metrics
from mura_jax.evaluation import scoring
from mura_jax.evaluation.metrics import GROUPS
from mura_jax.evaluation.studies import LabelsError, StudyTable, study_key

READER_METRICS = ('f1', 'kappa')


class Readers(NamedTuple):
  """K readers' labels of R studies: paths (R,), reader names (K,), labels int (R, K) of 0/1."""
  studies: tuple[str, ...]
  names: tuple[str, ...]
  labels: np.ndarray


def reference_majorities(reader_labels, tie_break: str = 'abnormal') -> np.ndarray:
  """(R, K): for each reader r, the majority vote of the other K-1 readers on each study.

  A tie (possible when K-1 is even) is `tie_break`: 'abnormal' (1) or 'normal' (0).
  """
  if tie_break not in ('abnormal', 'normal'):
    raise ValueError(f"tie_break must be 'abnormal' or 'normal', got {tie_break!r}")
  reader_labels = np.asarray(reader_labels, np.int64)
  twice_votes = 2 * (reader_labels.sum(1, keepdims=True) - reader_labels)  # 2 x others' votes
  num_others = reader_labels.shape[1] - 1
  return np.where(twice_votes == num_others, int(tie_break == 'abnormal'),
                  (twice_votes > num_others).astype(np.int64))


def reader_comparison(model_predicted, truth, body_part_idx, reader_labels, names, *,
                      num_resamples: int, seed: int, tie_break: str = 'abnormal',
                      chunk_size: int | None = None, level: float = 0.95) -> dict:
  """The "readers" section of report.json (schema in the module docstring).

  Args:
    model_predicted: (R,) the model's 0/1 predictions of the studies the readers read.
    truth: (R,) labels of those studies (for the readers' operating points).
    body_part_idx: (R,) index into BODY_PARTS.
    reader_labels: (R, K) 0/1 labels of K >= 2 readers.
    names: K reader names.
    num_resamples, seed: the bootstrap over the R studies (0: no CIs).
  """
  reader_labels = np.asarray(reader_labels, np.int64)
  k = reader_labels.shape[1]
  if k < 2:
    raise ValueError(f'need at least 2 readers, got {k}')
  majority = reference_majorities(reader_labels, tie_break)
  model = np.broadcast_to(np.asarray(model_predicted, np.int64)[None, :], (k, len(majority)))
  truth_k = np.broadcast_to(np.asarray(truth, np.int64)[None, :], model.shape)
  # Pairs 0..K-1: reader r vs its majority; K..2K-1: the model vs the same majority;
  # 2K..3K-1: reader r vs the truth (its operating point on the ROC plot).
  predicted = np.concatenate([reader_labels.T, model, reader_labels.T])
  reference = np.concatenate([majority.T, majority.T, truth_k])
  membership = metrics.body_part_membership(body_part_idx)
  counts = metrics.confusion_counts(predicted, reference, membership)  # (3K, G, 4)
  values = metrics.metrics_from_counts(counts)  # metric -> (3K, G)
  samples = None
  if num_resamples:
    sample_counts, _ = bootstrap.bootstrap_counts(predicted, reference, membership,
                                                  num_resamples=num_resamples, seed=seed,
                                                  chunk_size=chunk_size)
    samples = metrics.metrics_from_counts(sample_counts)  # metric -> (B, 3K, G)
  n = counts[0].sum(-1)
  num_groups = len(GROUPS)

  def reason(m, pair):
    return [metrics.undefined_reason(m, c) for c in counts[pair]]

  def same(text):
    return [text] * num_groups

  def series(m, pairs):
    """Value (G,) and samples (B, G) of metric m averaged over the given pairs (NaN if any is)."""
    value = values[m][pairs].mean(0)
    return value, None if samples is None else samples[m][:, pairs].mean(1)

  def difference(m, model_pairs, reader_pairs):
    (model_v, model_s), (reader_v, reader_s) = series(m, model_pairs), series(m, reader_pairs)
    return model_v - reader_v, None if samples is None else model_s - reader_s

  sections = {m: {} for m in READER_METRICS}
  for m in READER_METRICS:
    readers, model_pairs = list(range(k)), list(range(k, 2 * k))
    sections[m]['readers_mean'] = scoring.entries(*series(m, readers), n,
                                           same('undefined for at least one reader'), level)
    sections[m]['model_mean'] = scoring.entries(*series(m, model_pairs), n,
                                         same('undefined against at least one majority'), level)
    sections[m]['difference'] = scoring.entries(*difference(m, model_pairs, readers), n,
                                         same('undefined for the model or a reader'), level,
                                         difference=True)
    for r, name in enumerate(names):
      sections[m][name] = {
          'reader': scoring.entries(*series(m, [r]), n, reason(m, r), level),
          'model': scoring.entries(*series(m, [k + r]), n, reason(m, k + r), level),
          'difference': scoring.entries(*difference(m, [k + r], [r]), n,
                                 same('undefined for the model or the reader'), level,
                                 difference=True)}
  groups = {}
  for g, group in enumerate(GROUPS):
    groups[group] = {'n_studies': int(n[g])}
    for m, section in sections.items():
      groups[group][m] = {
          key: section[key][g] for key in ('readers_mean', 'model_mean', 'difference')}
      groups[group][m]['per_reader'] = {
          name: {key: entries[g] for key, entries in section[name].items()} for name in names}
  versus_labels = {}
  for r, name in enumerate(names):
    per_metric = {m: scoring.entries(*series(m, [2 * k + r]), n, reason(m, 2 * k + r), level)
                  for m in ('sensitivity', 'specificity')}
    versus_labels[name] = {group: {m: per_metric[m][g] for m in per_metric}
                           for g, group in enumerate(GROUPS)}
  return {'names': list(names), 'n_studies': int(len(majority)), 'tie_break': tie_break,
          'reference': f'majority vote of the other {k - 1} readers',
          'groups': groups, 'versus_labels': versus_labels}


def match_readers(readers: Readers, study_paths) -> np.ndarray:
  """Index into study_paths of each read study; LabelsError for unknown studies."""
  index = {study_key(p): i for i, p in enumerate(study_paths)}
  unknown = [('unknown', 'readers', r, f'study {p} is not among the evaluated studies')
             for r, p in enumerate(readers.studies) if study_key(p) not in index]
  if unknown:
    raise LabelsError('readers (rows are 0-based entries)', unknown)
  return np.asarray([index[study_key(p)] for p in readers.studies], np.int64)


def compare(table: StudyTable, readers: Readers, options: scoring.Options) -> dict:
  """The "readers" section of report.json for the model's predictions in `table`."""
  # In study order: neither the predictions' nor the readers file's row order moves the CIs.
  table = table.in_study_order()
  read = match_readers(readers, table.paths)
  by_study = np.argsort(read, kind='stable')
  read, reader_labels = read[by_study], np.asarray(readers.labels)[by_study]
  predicted = (table.probability > options.threshold).astype(np.int64)
  return reader_comparison(
      predicted[read], table.label[read], table.body_part[read], reader_labels, readers.names,
      num_resamples=options.num_resamples, seed=options.seed, tie_break=options.tie_break,
      chunk_size=options.chunk_size, level=options.level)
