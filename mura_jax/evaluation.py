r"""MURA evaluation as in the paper: study aggregation, metrics, bootstrap CIs, readers, reports.

Per-view probabilities -> study probability (arithmetic mean of the study's views, as in the paper;
'max' optional) -> abnormal if probability > threshold (0.5) -> per body part and aggregate ('all'):
F1, Cohen's kappa, AUROC, accuracy, sensitivity, specificity, precision, NPV (`metrics.py`), each
with a 95% percentile CI from B bootstrap resamples of studies (`bootstrap.py`: all studies are
resampled together and each group is scored on its studies within the resample, as the paper does).

Entry points:
  `evaluate_views(...)`   per-view probabilities of a split -> report (what main.py calls).
  `evaluate_studies(...)` study probabilities (or hard labels) -> report.
  `python -m mura_jax.evaluation --predictions P.csv --labels valid_labeled_studies.csv
      [--readers R.csv] [--bootstrap 10000] [--seed 0] --out DIR`   scores any model's outputs.

A study is identified by its (split, XR_<PART>, patient, study) path components, never by patient
and study alone; paths are compared on those four components, so a different root directory or a
missing trailing '/' still matches, and outputs use the labels file's path with a trailing '/'.

Input files (CSV, no header in MURA's own files; a header row or CRLF line ends get a warning):
  labels       `MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/,1` per study (label 0/1).
  predictions  one of, decided by the first data row:
                 study path, 0/1       hard labels, the official submission format (AUROC is then
                                       computed from the labels: one operating point, so it equals
                                       (sensitivity + specificity) / 2; report.json says
                                       "score_kind": "labels", and no operating points are chosen);
                 study path, float     study probabilities in [0, 1];
                 image path, float     view probabilities (`.../study1_positive/image1.png,0.83`),
                                       aggregated to studies like the model's.
  readers      header row `study,<reader name>,<reader name>,...` then one row per study read:
               the study path and each reader's label 0/1 (every reader labels every listed study;
               the listed studies may be a subset of the labels file, e.g. a reader-study sample).
Bad predictions (missing or unknown studies, values outside [0, 1] or NaN, a repeated study or
image, a malformed row) raise ONE `PredictionsError` naming the file and the first rows with their
row numbers, with a count per kind; bad labels or readers files raise `LabelsError`.

Reader comparison (paper section 4.2): with K readers, reader r is scored against the majority vote
of the other K-1, and the model against each of those K majorities; the means over r are reported
with CIs, as is the difference model - readers (mean and per reader), all on the same resamples of
the read studies (drawn like the main ones, seed and all, over the read studies only); a
difference is significant when its CI excludes 0. With K-1 even a vote can tie;
`tie_break='abnormal'` (default) makes a tied reference abnormal, the conservative clinical choice
(a study half the readers call abnormal is followed up); 'normal' is the alternative.

Operating points: for each (metric, target), e.g. ('sensitivity', 0.95), the threshold reaching the
target on the evaluated studies (`metrics.threshold_for_target`), and every thresholded metric at it
with its bootstrap CI. The threshold is held fixed across resamples, so the CI does not include the
uncertainty of choosing it on the same studies. Worklist (paper's discussion): studies ranked by
probability; the studies at or below the highest threshold keeping sensitivity >= 0.95 could be
deprioritised; reported as counts and fractions (of normal studies and of all studies).

report.json (plain JSON; NaN is written as null):
{
  "schema_version": 1,
  "split": str | null,
  "num_studies": int, "num_abnormal": int, "num_normal": int,
  "score_kind": "probabilities" | "labels",
  "aggregation": "mean" | "max" | null (null: study-level input),
  "threshold": float,                          # abnormal if study probability > threshold
  "bootstrap": {"num_resamples": int, "seed": int, "ci_level": 0.95, "ci_method": "percentile",
                "resampling": str},
  "groups": {                                  # the 7 body parts then "all", always all 8
    "<group>": {
      "n_studies": int, "n_abnormal": int, "n_normal": int,
      "confusion": {"tp": int, "fp": int, "fn": int, "tn": int},
      "metrics": {"<metric>": ENTRY, ...}      # f1 kappa auroc accuracy sensitivity specificity
    }, ...                                     # precision npv
  },
  "operating_points": [{"target_metric": str, "target": float, "threshold": float | null,
                        "reason": str | null, "metrics": {"<metric>": ENTRY, ...}  # group "all"
                       }, ...],
  "worklist": {"min_sensitivity": float, "threshold": float | null, "reason": str | null,
               "n_studies": int, "n_deprioritised": int, "n_normal_deprioritised": int,
               "n_abnormal_deprioritised": int, "fraction_of_studies": float,
               "fraction_of_normals": ENTRY (= specificity at that threshold),
               "sensitivity": ENTRY},
               # all but the first four are null when threshold is null (reason says why)
  "readers": null | {
    "names": [str], "n_studies": int (studies read), "tie_break": "abnormal" | "normal",
    "reference": str,                          # "majority vote of the other K-1 readers"
    "groups": {"<group>": {"n_studies": int,
      "<f1|kappa>": {"readers_mean": ENTRY, "model_mean": ENTRY, "difference": DIFF,
                     "per_reader": {"<name>": {"reader": ENTRY, "model": ENTRY,
                                              "difference": DIFF}}}}},
    "versus_labels": {"<name>": {"<group>": {"sensitivity": ENTRY, "specificity": ENTRY}}}}
}
ENTRY = {"value": float | null, "ci_low": float | null, "ci_high": float | null,
         "n_studies": int, "reason": str | null (why value is null),
         "n_resamples_undefined": int | null (resamples where the metric is undefined, left out of
                                              the CI; null without bootstrap)}
        (the CI is null when the value is, or without bootstrap)
DIFF  = ENTRY + {"significant": bool | null}   (model - reader; CI excludes 0)

Files written to the out dir (the caller passes WORKDIR/eval/<split>/): report.json, report.md
(Table-2-like), predictions.csv (official submission format: study path, 0/1, no header),
study_probabilities.csv (header: study,body_part,num_views,probability,predicted_abnormal,label,
worklist_rank; rank 1 is read first), roc.png (8 panels; reader operating points when given).
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import sys
from typing import NamedTuple, Sequence

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from mura_jax import bootstrap
from mura_jax import metrics
from mura_jax.metrics import BODY_PARTS, GROUPS, METRICS

DEFAULT_TARGETS = (('sensitivity', 0.95), ('specificity', 0.95))
# Metrics that depend on the threshold (all but AUROC): reported at operating points and readers.
THRESHOLDED = tuple(m for m in METRICS if m != 'auroc')
READER_METRICS = ('f1', 'kappa')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.dcm', '.dicom')
_MAX_LISTED = 10  # offending rows listed in an error message


class PredictionsError(ValueError):
  """Predictions that cannot be scored; `problems` holds (kind, file, row, message) tuples."""

  def __init__(self, source: str, problems: Sequence[tuple[str, str, int | None, str]]):
    self.source = source
    self.problems = list(problems)
    self.counts = {}
    for kind, *_ in self.problems:
      self.counts[kind] = self.counts.get(kind, 0) + 1
    summary = ', '.join(f'{kind}: {n}' for kind, n in self.counts.items())
    lines = [f'{source}: {len(self.problems)} problem(s) ({summary}); '
             f'first {min(len(self.problems), _MAX_LISTED)}:']
    for _, file, row, message in self.problems[:_MAX_LISTED]:
      where = f'{file} row {row}' if row is not None else file
      lines.append(f'  {where}: {message}')
    super().__init__('\n'.join(lines))


class LabelsError(PredictionsError):
  """A labels or readers file (or label array) that cannot be used as the reference."""


class Readers(NamedTuple):
  """K readers' labels of R studies: paths (R,), reader names (K,), labels int (R, K) of 0/1."""
  studies: tuple[str, ...]
  names: tuple[str, ...]
  labels: np.ndarray


# ---------------------------------------------------------------------------------------------
# Study paths.


def _text(path) -> str:
  return path.decode('utf-8') if isinstance(path, bytes) else str(path)


def study_path(path) -> str:
  """Normalised study path: stripped, '\\' -> '/', one trailing '/'."""
  return _text(path).strip().replace('\\', '/').rstrip('/') + '/'


def study_key(path) -> tuple[str, ...]:
  """(split, XR_<PART>, patient, study): the last four components of a study path."""
  return tuple(study_path(path).rstrip('/').split('/')[-4:])


def body_part_of(path) -> str:
  """'wrist' for `.../XR_WRIST/patient11185/study1_positive/`; ValueError if there is none."""
  key = study_key(path)
  if len(key) == 4 and key[1].upper().startswith('XR_'):
    part = key[1][3:].lower()
    if part in BODY_PARTS:
      return part
  raise ValueError(f'not a MURA study path (.../<split>/XR_<PART>/<patient>/<study>/): {path!r}')


def body_part_index(body_part) -> int:
  """Index into BODY_PARTS of 'XR_WRIST', 'wrist', 'WRIST' or an int index."""
  if isinstance(body_part, (int, np.integer)):
    if 0 <= body_part < len(BODY_PARTS):
      return int(body_part)
  else:
    name = _text(body_part).strip().lower()
    name = name[3:] if name.startswith('xr_') else name
    if name in BODY_PARTS:
      return BODY_PARTS.index(name)
  raise ValueError(f'unknown body part {body_part!r}; expected one of {BODY_PARTS} or XR_<PART>')


# ---------------------------------------------------------------------------------------------
# Study aggregation.


@functools.partial(jax.jit, static_argnames=('num_studies', 'method'))
def aggregate_views(view_probabilities, view_study_index, num_studies: int, view_mask=None,
                    method: str = 'mean'):
  """Study probabilities (num_studies,) from per-view probabilities, inside jit.

  Args:
    view_probabilities: (V,) per-view abnormality probabilities.
    view_study_index: (V,) int study of each view in [0, num_studies); other values are dropped.
    num_studies: number of studies (static).
    view_mask: optional (V,) bool; False marks padding, which counts nowhere (its value may be
      anything, NaN included).
    method: 'mean' (the paper) or 'max'.
  Returns:
    (num_studies,) probabilities; NaN for a study without views.
  """
  if view_mask is None:
    view_mask = jnp.ones(view_probabilities.shape, bool)
  segment = functools.partial(jax.ops.segment_sum, segment_ids=view_study_index,
                              num_segments=num_studies)
  num_views = segment(view_mask.astype(view_probabilities.dtype))
  if method == 'mean':
    total = segment(jnp.where(view_mask, view_probabilities, 0))  # where, not *: NaN * 0 is NaN
    study = total / jnp.maximum(num_views, 1)
  elif method == 'max':
    study = jax.ops.segment_max(jnp.where(view_mask, view_probabilities, -jnp.inf),
                                view_study_index, num_segments=num_studies)
  else:
    raise ValueError(f"method must be 'mean' or 'max', got {method!r}")
  return jnp.where(num_views > 0, study, jnp.nan)


def _aggregate_float64(view_probabilities, view_study_index, num_studies, view_mask, method):
  """`aggregate_views` in float64 on the host, and views per study."""
  # float64 so that e.g. mean(0.4, 0.6) is exactly 0.5, as a pandas groupby gives.
  with jax.enable_x64(True):
    probabilities = aggregate_views(
        jnp.asarray(view_probabilities, jnp.float64), jnp.asarray(view_study_index, jnp.int64),
        num_studies, None if view_mask is None else jnp.asarray(view_mask, bool), method)
    probabilities = np.asarray(probabilities)
  valid = np.ones(len(view_study_index), bool) if view_mask is None else np.asarray(view_mask)
  num_views = np.bincount(np.asarray(view_study_index)[valid], minlength=num_studies)
  return probabilities, num_views[:num_studies]


# ---------------------------------------------------------------------------------------------
# Reading files.


def _read_rows(path, what: str) -> list[tuple[int, list[str]]]:
  """(row number, fields) of the non-empty rows of a CSV file; warns about CRLF line ends."""
  data = epath.Path(path).read_bytes()
  if b'\r' in data:
    logging.warning('%s %s has CRLF (Windows) line ends; reading it anyway.', what, path)
  text = data.decode('utf-8-sig')  # a BOM is dropped
  rows = []
  for number, line in enumerate(text.splitlines(), start=1):
    if line.strip():
      rows.append((number, [field.strip() for field in next(csv.reader([line]))]))
  return rows


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def _drop_header(rows, path, what: str, looks_like_data) -> list:
  if rows and not looks_like_data(rows[0][1]):
    logging.warning('%s %s: row 1 %r is not data; treating it as a header row.', what, path,
                    rows[0][1])
    return rows[1:]
  return rows


def read_labels(path) -> tuple[list[str], np.ndarray]:
  """Study paths (trailing '/') and labels (int64 0/1) of a MURA *_labeled_studies.csv file."""
  path = str(path)
  rows = _read_rows(path, 'labels file')
  rows = _drop_header(rows, path, 'labels file', lambda f: len(f) >= 2 and _is_number(f[1]))
  problems, paths, labels, seen = [], [], [], {}
  for number, fields in rows:
    if len(fields) != 2 or fields[1] not in ('0', '1'):
      problems.append(('malformed', path, number, f'expected "study path,0|1", got {fields}'))
      continue
    study, label = study_path(fields[0]), int(fields[1])
    try:
      body_part_of(study)
    except ValueError as e:
      problems.append(('malformed', path, number, str(e)))
      continue
    key = study_key(study)
    if key in seen:
      problems.append(('duplicate', path, number, f'study {study} repeats row {seen[key]}'))
      continue
    folder = key[-1].rsplit('_', 1)[-1]
    if folder in ('positive', 'negative') and (folder == 'positive') != bool(label):
      problems.append(('contradiction', path, number,
                       f'label {label} contradicts the folder name of {study}'))
    seen[key] = number
    paths.append(study)
    labels.append(label)
  if not paths and not problems:
    problems.append(('empty', path, None, 'no studies'))
  if problems:
    raise LabelsError(f'labels file {path}', problems)
  if any(not fields[0].rstrip().endswith(('/', '\\')) for _, fields in rows):
    logging.warning('labels file %s: study paths without a trailing "/"; added.', path)
  return paths, np.asarray(labels, np.int64)


def read_readers(path) -> Readers:
  """The readers CSV (see the module docstring): header `study,<name>,...`, labels 0/1."""
  path = str(path)
  rows = _read_rows(path, 'readers file')
  if not rows:
    raise LabelsError(f'readers file {path}', [('empty', path, None, 'no rows')])
  (_, header), rows = rows[0], rows[1:]
  names = tuple(header[1:])
  problems = []
  if len(names) < 2 or len(set(names)) != len(names) or any(_is_number(n) for n in header):
    problems.append(('malformed', path, 1, 'the header must be "study,<reader>,<reader>,..." '
                     f'with at least 2 distinct reader names, got {header}'))
  studies, labels, seen = [], [], {}
  for number, fields in rows:
    if len(fields) != len(header) or any(f not in ('0', '1') for f in fields[1:]):
      problems.append(('malformed', path, number,
                       f'expected a study path and {len(names)} labels 0/1, got {fields}'))
      continue
    key = study_key(fields[0])
    if key in seen:
      problems.append(('duplicate', path, number, f'study {fields[0]} repeats row {seen[key]}'))
      continue
    seen[key] = number
    studies.append(study_path(fields[0]))
    labels.append([int(f) for f in fields[1:]])
  if not studies and not problems:
    problems.append(('empty', path, None, 'no studies'))
  if problems:
    raise LabelsError(f'readers file {path}', problems)
  return Readers(tuple(studies), names, np.asarray(labels, np.int64))


def read_predictions(path, label_paths: Sequence[str], aggregation: str = 'mean'):
  """Study scores of a predictions file, in the order of `label_paths`.

  Returns (scores float64 (S,), score_kind 'labels' | 'probabilities', num_views int (S,) or None,
  aggregation or None). Raises one PredictionsError listing every problem.
  """
  path = str(path)
  rows = _read_rows(path, 'predictions file')
  rows = _drop_header(rows, path, 'predictions file', lambda f: len(f) >= 2 and _is_number(f[1]))
  index = {study_key(p): i for i, p in enumerate(label_paths)}
  is_view_level = bool(rows) and rows[0][1][0].lower().endswith(IMAGE_SUFFIXES)
  problems, seen, kept = [], {}, []  # kept: (row, study index, value)
  named = set()  # studies some row names, even with a bad value: those are not 'missing'
  for number, fields in rows:
    if len(fields) != 2 or not _is_number(fields[1]):
      problems.append(('malformed', path, number, f'expected "path,number", got {fields}'))
      continue
    name, value = fields[0], float(fields[1])
    if name.lower().endswith(IMAGE_SUFFIXES) != is_view_level:
      level = 'an image' if is_view_level else 'a study'
      problems.append(('malformed', path, number,
                       f'{name} is not {level} path like the first row (one level per file)'))
      continue
    study = study_path(name.replace('\\', '/').rsplit('/', 1)[0] if is_view_level else name)
    seen_key = name.replace('\\', '/') if is_view_level else study_key(study)
    if seen_key in seen:
      what = 'image' if is_view_level else 'study'
      problems.append(('duplicate', path, number, f'{what} {name} repeats row {seen[seen_key]}'))
      continue
    seen[seen_key] = number
    if study_key(study) not in index:
      problems.append(('unknown', path, number, f'study {study} is not in the labels file'))
      continue
    named.add(index[study_key(study)])
    if math.isnan(value):
      problems.append(('nan', path, number, f'value is NaN for {name}'))
    elif not 0 <= value <= 1:
      problems.append(('out_of_range', path, number, f'value {value} outside [0, 1] for {name}'))
    else:
      kept.append((number, index[study_key(study)], value))
  problems += [('missing', path, None, f'no prediction for study {p}')
               for i, p in enumerate(label_paths) if i not in named]
  if problems:
    raise PredictionsError(f'predictions file {path}', problems)
  study_index = np.asarray([i for _, i, _ in kept], np.int64)
  values = np.asarray([v for _, _, v in kept], np.float64)
  if is_view_level:
    scores, num_views = _aggregate_float64(values, study_index, len(label_paths), None,
                                           aggregation)
    return scores, 'probabilities', num_views, aggregation
  scores = np.empty(len(label_paths))
  scores[study_index] = values
  kind = 'labels' if np.isin(scores, (0.0, 1.0)).all() else 'probabilities'
  return scores, kind, None, None


# ---------------------------------------------------------------------------------------------
# Scoring.


def _number(x) -> float | None:
  x = float(x)
  return None if math.isnan(x) else x


def _entries(values, samples, n_studies, reasons, level, difference=False) -> list[dict]:
  """ENTRY (or DIFF) dicts, one per group, from values (G,) and bootstrap samples (B, G) or None."""
  low = high = undefined = [None] * len(values)
  if samples is not None:
    low, high, undefined = bootstrap.percentile_ci(samples, level)
  entries = []
  for g, value in enumerate(values):
    defined = not math.isnan(float(value))
    entry = {
        'value': _number(value),
        'ci_low': _number(low[g]) if defined and low[g] is not None else None,
        'ci_high': _number(high[g]) if defined and high[g] is not None else None,
        'n_studies': int(n_studies[g]),
        'reason': None if defined else (reasons[g] or 'undefined'),
        'n_resamples_undefined': None if undefined[g] is None else int(undefined[g]),
    }
    if difference:
      lo, hi = entry['ci_low'], entry['ci_high']
      entry['significant'] = None if lo is None or hi is None else bool(lo > 0 or hi < 0)
    entries.append(entry)
  return entries


def _metric_entries(counts, u2, sample_counts, sample_u2, names, level) -> list[dict]:
  """Per group, {metric: ENTRY} of one (prediction, reference) pair: counts (G, 4), samples
  (B, G, 4)."""
  values = metrics.metrics_from_counts(counts, u2)
  samples = (metrics.metrics_from_counts(sample_counts, sample_u2)
             if sample_counts is not None else None)
  n = counts.sum(-1)
  per_metric = {m: _entries(values[m], None if samples is None else samples[m], n,
                            [metrics.undefined_reason(m, c) for c in counts], level)
                for m in names}
  return [{m: per_metric[m][g] for m in names} for g in range(len(counts))]


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
    sections[m]['readers_mean'] = _entries(*series(m, readers), n,
                                           same('undefined for at least one reader'), level)
    sections[m]['model_mean'] = _entries(*series(m, model_pairs), n,
                                         same('undefined against at least one majority'), level)
    sections[m]['difference'] = _entries(*difference(m, model_pairs, readers), n,
                                         same('undefined for the model or a reader'), level,
                                         difference=True)
    for r, name in enumerate(names):
      sections[m][name] = {
          'reader': _entries(*series(m, [r]), n, reason(m, r), level),
          'model': _entries(*series(m, [k + r]), n, reason(m, k + r), level),
          'difference': _entries(*difference(m, [k + r], [r]), n,
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
    per_metric = {m: _entries(*series(m, [2 * k + r]), n, reason(m, 2 * k + r), level)
                  for m in ('sensitivity', 'specificity')}
    versus_labels[name] = {group: {m: per_metric[m][g] for m in per_metric}
                           for g, group in enumerate(GROUPS)}
  return {'names': list(names), 'n_studies': int(len(majority)), 'tie_break': tie_break,
          'reference': f'majority vote of the other {k - 1} readers',
          'groups': groups, 'versus_labels': versus_labels}


def _check_studies(study_paths, probabilities, abnormal, body_parts):
  """Validated arrays: paths (normalised), probabilities f64, abnormal int64, body part index."""
  study_paths = [study_path(p) for p in study_paths]
  probabilities = np.asarray(probabilities, np.float64).reshape(-1)
  abnormal = np.asarray(abnormal).reshape(-1)
  if not len(study_paths) == probabilities.size == abnormal.size:
    raise ValueError(f'lengths disagree: {len(study_paths)} study paths, {probabilities.size} '
                     f'probabilities, {abnormal.size} labels')
  problems, seen = [], {}
  for i, (p, value) in enumerate(zip(study_paths, probabilities)):
    if study_key(p) in seen:
      problems.append(('duplicate', 'studies', i, f'study {p} repeats entry {seen[study_key(p)]}'))
    seen.setdefault(study_key(p), i)
    if math.isnan(value):
      problems.append(('nan', 'studies', i, f'probability is NaN (no views?) for {p}'))
    elif not 0 <= value <= 1:
      problems.append(('out_of_range', 'studies', i, f'probability {value} outside [0, 1] for {p}'))
  if not study_paths:
    problems.append(('empty', 'studies', None, 'no studies'))
  if problems:
    raise PredictionsError('study predictions (rows are 0-based entries)', problems)
  bad = [('malformed', 'labels', i, f'label {a!r} of {p} is not 0/1')
         for i, (p, a) in enumerate(zip(study_paths, abnormal)) if a not in (0, 1)]
  if bad:
    raise LabelsError('study labels (rows are 0-based entries)', bad)
  if body_parts is None:
    parts = [body_part_index(body_part_of(p)) for p in study_paths]
  else:
    parts = [body_part_index(b) for b in body_parts]
  return study_paths, probabilities, abnormal.astype(np.int64), np.asarray(parts, np.int64)


def _match_readers(readers: Readers, study_paths) -> np.ndarray:
  """Index into study_paths of each read study; LabelsError for unknown studies."""
  index = {study_key(p): i for i, p in enumerate(study_paths)}
  unknown = [('unknown', 'readers', r, f'study {p} is not among the evaluated studies')
             for r, p in enumerate(readers.studies) if study_key(p) not in index]
  if unknown:
    raise LabelsError('readers (rows are 0-based entries)', unknown)
  return np.asarray([index[study_key(p)] for p in readers.studies], np.int64)


def _choose_thresholds(scores, truth, wanted, with_scores):
  """[(threshold or None, reason or None)] for each (metric, target) in `wanted`."""
  chosen = []
  for metric, target in wanted:
    if not with_scores:
      chosen.append((None, 'hard-label predictions have no threshold to move'))
      continue
    try:
      chosen.append((metrics.threshold_for_target(scores, truth, metric, target), None))
    except ValueError as e:
      chosen.append((None, str(e)))
  return chosen


def evaluate_studies(study_paths: Sequence[str], probabilities, abnormal, body_parts=None, *,
                     out_dir=None, readers: Readers | None = None, threshold: float = 0.5,
                     num_resamples: int = 10_000, seed: int = 0, chunk_size: int | None = None,
                     score_kind: str = 'probabilities',
                     operating_targets: Sequence[tuple[str, float]] = DEFAULT_TARGETS,
                     worklist_sensitivity: float = 0.95, tie_break: str = 'abnormal',
                     num_views=None, aggregation: str | None = None, split: str | None = None,
                     print_table: bool = True, level: float = 0.95) -> dict:
  """Scores study probabilities, writes the report files to `out_dir` if given, returns the report.

  Args:
    study_paths: (S,) study paths like `MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/`.
    probabilities: (S,) study probabilities in [0, 1] (or 0/1 with score_kind='labels').
    abnormal: (S,) 0/1 labels.
    body_parts: optional (S,) 'XR_WRIST' / 'wrist' / BODY_PARTS index; default: from the paths.
    out_dir: where report.json, report.md, predictions.csv, study_probabilities.csv, roc.png go
      (an epath: local or gs://); nothing is written when None.
    readers: optional `Readers` (e.g. `read_readers(path)`) of some or all of the studies.
    threshold: abnormal if probability > threshold.
    num_resamples: bootstrap resamples B (0: no CIs); seed: their seed.
    chunk_size: resamples per jitted call (default: bounded memory, see bootstrap.py).
    score_kind: 'probabilities' or 'labels' (hard labels: no operating points or worklist).
    operating_targets: (metric, target) pairs, metric 'sensitivity' or 'specificity'.
    worklist_sensitivity: the sensitivity the worklist must keep.
    tie_break: reference label of a tied reader vote, 'abnormal' or 'normal'.
    num_views: optional (S,) views per study, for study_probabilities.csv.
    aggregation: how views became studies ('mean' / 'max'), recorded in the report.
    split: name recorded in the report.
    print_table: print the terminal table at the end.
    level: CI level.
  Returns:
    The report dict (report.json's content).
  """
  study_paths, scores, truth, part = _check_studies(study_paths, probabilities, abnormal,
                                                    body_parts)
  membership = metrics.body_part_membership(part)
  wanted = list(operating_targets) + [('sensitivity', worklist_sensitivity)]
  chosen = _choose_thresholds(scores, truth, wanted, score_kind == 'probabilities')
  # Pair 0: the model at `threshold`; then one pair per chosen operating threshold.
  thresholds = [threshold] + [t for t, _ in chosen if t is not None]
  predicted = (scores[None, :] > np.asarray(thresholds)[:, None]).astype(np.int64)
  reference = np.broadcast_to(truth, predicted.shape)
  counts = metrics.confusion_counts(predicted, reference, membership)  # (pairs, G, 4)
  u2 = metrics.auroc_u2(scores, truth, membership)
  sample_counts = sample_u2 = None
  if num_resamples:
    sample_counts, sample_u2 = bootstrap.bootstrap_counts(
        predicted, reference, membership, scores, num_resamples=num_resamples, seed=seed,
        chunk_size=chunk_size)

  def pair_samples(pair):
    return None if sample_counts is None else sample_counts[:, pair]

  entries = _metric_entries(counts[0], u2, pair_samples(0), sample_u2, METRICS, level)
  groups = {}
  for g, group in enumerate(GROUPS):
    tp, fp, fn, tn = (int(c) for c in counts[0, g])
    groups[group] = {'n_studies': tp + fp + fn + tn, 'n_abnormal': tp + fn, 'n_normal': fp + tn,
                     'confusion': {'tp': tp, 'fp': fp, 'fn': fn, 'tn': tn}, 'metrics': entries[g]}

  all_studies = GROUPS.index('all')
  at_threshold, pair = [], 1  # per wanted target: ({metric: ENTRY} of 'all', counts) or None
  for t, _ in chosen:
    if t is None:
      at_threshold.append(None)
      continue
    entries = _metric_entries(counts[pair], None, pair_samples(pair), None, THRESHOLDED, level)
    at_threshold.append((entries[all_studies], counts[pair, all_studies]))
    pair += 1
  operating_points = [
      {'target_metric': metric, 'target': float(target), 'threshold': t, 'reason': reason,
       'metrics': result[0] if result else {}}
      for (metric, target), (t, reason), result in zip(wanted[:-1], chosen, at_threshold)]
  worklist = {'min_sensitivity': float(worklist_sensitivity), 'threshold': chosen[-1][0],
              'reason': chosen[-1][1], 'n_studies': len(study_paths), 'n_deprioritised': None,
              'n_normal_deprioritised': None, 'n_abnormal_deprioritised': None,
              'fraction_of_studies': None, 'fraction_of_normals': None, 'sensitivity': None}
  if at_threshold[-1] is not None:
    entries, (tp, fp, fn, tn) = at_threshold[-1]
    worklist.update({
        'n_deprioritised': int(fn + tn), 'n_normal_deprioritised': int(tn),
        'n_abnormal_deprioritised': int(fn),
        'fraction_of_studies': float((fn + tn) / len(study_paths)),
        'fraction_of_normals': entries['specificity'], 'sensitivity': entries['sensitivity']})

  reader_section = None
  if readers is not None:
    read = _match_readers(readers, study_paths)
    reader_section = reader_comparison(
        predicted[0, read], truth[read], part[read], readers.labels, readers.names,
        num_resamples=num_resamples, seed=seed, tie_break=tie_break, chunk_size=chunk_size,
        level=level)
  report = {
      'schema_version': 1, 'split': split, 'num_studies': len(study_paths),
      'num_abnormal': int(truth.sum()), 'num_normal': int((1 - truth).sum()),
      'score_kind': score_kind, 'aggregation': aggregation, 'threshold': float(threshold),
      'bootstrap': {'num_resamples': int(num_resamples), 'seed': int(seed), 'ci_level': level,
                    'ci_method': 'percentile',
                    'resampling': 'studies with replacement from all studies; each group scored '
                                  'on its studies within the resample'},
      'groups': groups, 'operating_points': operating_points, 'worklist': worklist,
      'readers': reader_section,
  }
  if out_dir is not None:
    write_report(out_dir, report, study_paths, scores, truth, part, predicted[0], num_views)
  if print_table:
    print(format_terminal_table(report))
  return report


def evaluate_views(view_probabilities, view_study_paths, view_abnormal, view_body_parts=None, *,
                   view_mask=None, aggregation: str = 'mean', **kwargs) -> dict:
  """Aggregates per-view probabilities to studies, then `evaluate_studies(..., **kwargs)`.

  Args:
    view_probabilities: (V,) per-view probabilities (e.g. sigmoid outputs over a split).
    view_study_paths: (V,) str or bytes study path of each view (its study folder).
    view_abnormal: (V,) 0/1 label of each view's study (must agree within a study).
    view_body_parts: optional (V,) body part per view (name or BODY_PARTS index).
    view_mask: optional (V,) bool, False for padding views (ignored entirely).
    aggregation: 'mean' (paper) or 'max'.
    **kwargs: `evaluate_studies` arguments (out_dir, readers, num_resamples, seed, split, ...).
  Returns:
    The report dict.
  """
  view_probabilities = np.asarray(view_probabilities, np.float64).reshape(-1)
  valid = (np.ones(view_probabilities.size, bool) if view_mask is None
           else np.asarray(view_mask, bool).reshape(-1))
  paths = [study_path(p) for p, v in zip(view_study_paths, valid) if v]
  keys = [study_key(p) for p in paths]
  first = {}
  for i, key in enumerate(keys):
    first.setdefault(key, i)
  study_of_key = {key: s for s, key in enumerate(first)}
  study_index = np.full(view_probabilities.size, -1, np.int64)  # -1: padding, dropped
  study_index[valid] = [study_of_key[k] for k in keys]
  num_studies = len(first)
  if num_studies == 0:
    raise PredictionsError('views', [('empty', 'views', None, 'no (unmasked) views')])
  bad = np.flatnonzero(valid & ~np.isfinite(view_probabilities))
  bad = [('nan', 'views', int(v), f'view probability {view_probabilities[v]} is not finite')
         for v in bad]
  if bad:
    raise PredictionsError('view predictions', bad)
  abnormal = np.asarray(view_abnormal).reshape(-1)[valid]
  study_abnormal = np.zeros(num_studies, np.int64)
  study_abnormal[study_index[valid]] = abnormal
  conflicts = np.flatnonzero(study_abnormal[study_index[valid]] != abnormal)
  if conflicts.size:
    raise LabelsError('view labels', [
        ('contradiction', 'views', int(np.flatnonzero(valid)[v]),
         f'views of study {paths[v]} carry different labels') for v in conflicts])
  body_parts = None
  if view_body_parts is not None:
    view_parts = [body_part_index(b) for b, v in zip(view_body_parts, valid) if v]
    body_parts = [view_parts[first[k]] for k in first]
  probabilities, num_views = _aggregate_float64(view_probabilities, study_index, num_studies,
                                                valid, aggregation)
  study_paths = [paths[i] for i in first.values()]
  return evaluate_studies(study_paths, probabilities, study_abnormal, body_parts,
                          num_views=num_views, aggregation=aggregation, **kwargs)


# ---------------------------------------------------------------------------------------------
# Writing reports.


def _ci_text(entry: dict, digits: int = 3) -> str:
  if entry['value'] is None:
    return 'n/a'
  text = f'{entry["value"]:.{digits}f}'
  if entry['ci_low'] is not None:
    text += f' ({entry["ci_low"]:.{digits}f}, {entry["ci_high"]:.{digits}f})'
  return text


_METRIC_TITLES = {'f1': 'F1', 'kappa': 'Kappa', 'auroc': 'AUROC', 'accuracy': 'Accuracy',
                  'sensitivity': 'Sensitivity', 'specificity': 'Specificity',
                  'precision': 'Precision', 'npv': 'NPV'}


def _group_title(group: str) -> str:
  return 'Aggregate' if group == 'all' else group.capitalize()


def format_markdown(report: dict) -> str:
  """report.md: a Table-2-like table, operating points, worklist, reader comparison."""
  boot = report['bootstrap']
  lines = [f'# MURA evaluation{": " + report["split"] if report["split"] else ""}', '']
  how = f'{report["aggregation"]} of views' if report['aggregation'] else 'as given'
  lines.append(f'{report["num_studies"]} studies ({report["num_abnormal"]} abnormal), study '
               f'probability {how}, abnormal if > {report["threshold"]:g}. ' +
               (f'Values with {boot["ci_level"]:.0%} CIs from {boot["num_resamples"]} bootstrap '
                f'resamples of studies (seed {boot["seed"]}; {boot["resampling"]}).'
                if boot['num_resamples'] else 'No bootstrap (no CIs).'))
  if report['score_kind'] == 'labels':
    lines.append('')
    lines.append('Predictions are hard labels: AUROC is computed from them (a single operating '
                 'point, so AUROC = (sensitivity + specificity) / 2).')
  lines += ['', '| Study type | Studies | Abnormal | ' +
            ' | '.join(_METRIC_TITLES[m] for m in METRICS) + ' |',
            '|---|---:|---:|' + '---|' * len(METRICS)]
  notes = {}  # reason -> footnote number; one note per distinct reason
  for group, section in report['groups'].items():
    cells = []
    for m in METRICS:
      entry = section['metrics'][m]
      cell = _ci_text(entry)
      if entry['reason']:
        cell += f' [{notes.setdefault(entry["reason"], len(notes) + 1)}]'
      cells.append(cell)
    title = f'**{_group_title(group)}**' if group == 'all' else _group_title(group)
    lines.append(f'| {title} | {section["n_studies"]} | {section["n_abnormal"]} | '
                 + ' | '.join(cells) + ' |')
  if notes:
    lines += [''] + [f'[{i}] {reason}.' for reason, i in notes.items()]
  if report['operating_points']:
    lines += ['', '## Operating points (all studies)', '',
              '| Target | Threshold | ' + ' | '.join(_METRIC_TITLES[m] for m in THRESHOLDED) +
              ' |', '|---|---:|' + '---|' * len(THRESHOLDED)]
    for op in report['operating_points']:
      target = f'{op["target_metric"]} >= {op["target"]:g}'
      if op['threshold'] is None:
        lines.append(f'| {target} | n/a ({op["reason"]}) |' + ' |' * len(THRESHOLDED))
        continue
      lines.append(f'| {target} | {op["threshold"]:.4f} | ' +
                   ' | '.join(_ci_text(op['metrics'][m]) for m in THRESHOLDED) + ' |')
    lines.append('')
    lines.append('Thresholds are chosen on these studies and held fixed across resamples.')
  work = report['worklist']
  lines += ['', '## Worklist', '']
  if work['threshold'] is None:
    lines.append(f'Not available: {work["reason"]}.')
  else:
    lines.append(
        f'Ranking studies by probability, the {work["n_deprioritised"]} lowest '
        f'({work["fraction_of_studies"]:.1%} of {work["n_studies"]} studies, threshold '
        f'{work["threshold"]:.4f}) could be deprioritised at sensitivity '
        f'{_ci_text(work["sensitivity"])} (>= {work["min_sensitivity"]:g}): '
        f'{work["n_normal_deprioritised"]} normal studies, a fraction '
        f'{_ci_text(work["fraction_of_normals"])} of all normal studies, and '
        f'{work["n_abnormal_deprioritised"]} abnormal.')
  readers = report['readers']
  header = lambda first, who: f'| {first} | ' + ' | '.join(  # pylint: disable=g-long-lambda
      f'{who} {_METRIC_TITLES[m]} | Model {_METRIC_TITLES[m]} | Difference'
      for m in READER_METRICS) + ' |'
  if readers:
    lines += ['', '## Readers', '',
              f'{len(readers["names"])} readers ({", ".join(readers["names"])}) on '
              f'{readers["n_studies"]} studies; each scored against the {readers["reference"]}, '
              f'the model against each of those majorities; ties broken as '
              f'{readers["tie_break"]}. Difference = model - readers; * = CI excludes 0.', '',
              header('Study type', 'Readers'), '|---|' + '---|---|---|' * len(READER_METRICS)]
    def row(title, summaries):
      cells = []
      for m, (reader, model, diff) in zip(READER_METRICS, summaries):
        cells += [_ci_text(reader), _ci_text(model),
                  _ci_text(diff) + (' *' if diff['significant'] else '')]
      return f'| {title} | ' + ' | '.join(cells) + ' |'

    for group, section in readers['groups'].items():
      if section['n_studies']:  # body parts the readers did not read are left out
        lines.append(row(f'{_group_title(group)} ({section["n_studies"]})', [
            (section[m]['readers_mean'], section[m]['model_mean'], section[m]['difference'])
            for m in READER_METRICS]))
    lines += ['', 'Per reader, all read studies (the model against that reader\'s majority):', '',
              header('Reader', 'Reader'), '|---|' + '---|---|---|' * len(READER_METRICS)]
    aggregate = readers['groups']['all']
    for name in readers['names']:
      lines.append(row(name, [tuple(aggregate[m]['per_reader'][name][key]
                                    for key in ('reader', 'model', 'difference'))
                              for m in READER_METRICS]))
  return '\n'.join(lines) + '\n'


def format_terminal_table(report: dict) -> str:
  """A plain-text table of every group's metrics (value and CI), for the end of a run."""
  header = ['group', 'n', 'abn'] + [_METRIC_TITLES[m] for m in METRICS]
  rows = [header]
  for group, section in report['groups'].items():
    rows.append([group, str(section['n_studies']), str(section['n_abnormal'])] +
                [_ci_text(section['metrics'][m], 3).replace(' (', ' [').replace(', ', '-')
                 .replace(')', ']') for m in METRICS])
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  text = ['  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
          for r in rows]
  text.insert(1, '-' * len(text[0]))
  boot = report['bootstrap']
  if boot['num_resamples']:
    text.append(f'{boot["ci_level"]:.0%} CIs from {boot["num_resamples"]} bootstrap resamples '
                f'(seed {boot["seed"]}).')
  return '\n'.join(text)


def roc_figure(scores, truth, part, threshold, readers_versus_labels=None):
  """A matplotlib Figure with one ROC panel per group (2 x 4), no pyplot state touched."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(16, 8.5))
  FigureCanvasAgg(figure)
  axes = figure.subplots(2, 4)
  membership = metrics.body_part_membership(part)
  for g, (group, ax) in enumerate(zip(GROUPS, axes.ravel())):
    s, y = scores[membership[g]], truth[membership[g]].astype(bool)
    ax.plot([0, 1], [0, 1], color='0.8', lw=1)
    title = f'{_group_title(group)} (n={y.size})'
    if y.any() and (~y).any():
      fpr, tpr, _ = metrics.roc_curve(s, y)
      auroc = metrics.auroc_u2(s, y, np.ones((1, y.size), bool))[0] / (2 * y.sum() * (~y).sum())
      ax.plot(fpr, tpr, color='C0', lw=1.5, label='model')
      predicted = s > threshold
      ax.plot([(predicted & ~y).sum() / (~y).sum()], [(predicted & y).sum() / y.sum()], 'o',
              color='C0', label=f'model at {threshold:g}')
      title += f'  AUROC {auroc:.3f}'
    else:
      ax.text(0.5, 0.5, 'AUROC undefined\n(one class only)', ha='center', va='center')
    for r, (name, per_group) in enumerate((readers_versus_labels or {}).items()):
      sens = per_group[group]['sensitivity']['value']
      spec = per_group[group]['specificity']['value']
      if sens is not None and spec is not None:
        ax.plot([1 - spec], [sens], 'x^sdvP*'[r % 7], color=f'C{1 + r % 9}', label=name)
    ax.set(title=title, xlim=(0, 1), ylim=(0, 1.01), xlabel='1 - specificity',
           ylabel='sensitivity', aspect='equal')
    if ax.get_legend_handles_labels()[0]:
      ax.legend(loc='lower right', fontsize='x-small')
  figure.tight_layout()
  return figure


def write_report(out_dir, report, study_paths, scores, truth, part, predicted,
                 num_views=None) -> None:
  """Writes report.json, report.md, predictions.csv, study_probabilities.csv and roc.png."""
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'report.json').write_text(json.dumps(report, indent=2, allow_nan=False) + '\n')
  (out / 'report.md').write_text(format_markdown(report))
  # Official submission format: study path with '/', label, no header, '\n' line ends.
  (out / 'predictions.csv').write_text(
      ''.join(f'{p},{int(a)}\n' for p, a in zip(study_paths, predicted)))
  # Worklist rank 1 = highest probability, read first; ties keep the input order.
  rank = np.empty(len(scores), np.int64)
  rank[np.argsort(-scores, kind='stable')] = np.arange(1, len(scores) + 1)
  table = io.StringIO()
  writer = csv.writer(table, lineterminator='\n')
  writer.writerow(['study', 'body_part', 'num_views', 'probability', 'predicted_abnormal', 'label',
                   'worklist_rank'])
  for i, p in enumerate(study_paths):
    writer.writerow([p, BODY_PARTS[part[i]], '' if num_views is None else int(num_views[i]),
                     repr(float(scores[i])), int(predicted[i]), int(truth[i]), int(rank[i])])
  (out / 'study_probabilities.csv').write_text(table.getvalue())
  readers = report['readers']['versus_labels'] if report['readers'] else None
  figure = roc_figure(scores, truth, part, report['threshold'], readers)
  png = io.BytesIO()
  figure.savefig(png, format='png', dpi=100)
  (out / 'roc.png').write_bytes(png.getvalue())


# ---------------------------------------------------------------------------------------------
# Standalone scorer.


def score_files(predictions, labels, out_dir, readers=None, *, aggregation: str = 'mean',
                **kwargs) -> dict:
  """Scores a predictions file against a labels file (and readers); see the module docstring."""
  label_paths, truth = read_labels(labels)
  scores, kind, num_views, aggregation = read_predictions(predictions, label_paths, aggregation)
  return evaluate_studies(label_paths, scores, truth, out_dir=out_dir,
                          readers=read_readers(readers) if readers else None, score_kind=kind,
                          num_views=num_views, aggregation=aggregation, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m mura_jax.evaluation',
      description='Score MURA predictions (study labels, study probabilities or view '
                  'probabilities) against labeled studies, with bootstrap CIs.')
  parser.add_argument('--predictions', required=True, help='CSV: path,value; no header')
  parser.add_argument('--labels', required=True, help='e.g. valid_labeled_studies.csv')
  parser.add_argument('--readers', help='CSV with header study,<reader>,...; labels 0/1')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--bootstrap', type=int, default=10_000, help='resamples (0: no CIs)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--threshold', type=float, default=0.5, help='abnormal if prob > this')
  parser.add_argument('--aggregation', choices=('mean', 'max'), default='mean',
                      help='views -> study, for view-level predictions')
  parser.add_argument('--tie-break', choices=('abnormal', 'normal'), default='abnormal',
                      help='reference label when the other readers split evenly')
  parser.add_argument('--chunk-size', type=int, default=None, help='resamples per jitted call')
  parser.add_argument('--split', default=None, help='name recorded in the report')
  args = parser.parse_args(argv)
  try:
    score_files(args.predictions, args.labels, args.out, args.readers,
                aggregation=args.aggregation, num_resamples=args.bootstrap, seed=args.seed,
                threshold=args.threshold, tie_break=args.tie_break, chunk_size=args.chunk_size,
                split=args.split, print_table=True)
  except PredictionsError as e:  # LabelsError too
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'Wrote report.json, report.md, predictions.csv, study_probabilities.csv, roc.png to '
        f'{args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
