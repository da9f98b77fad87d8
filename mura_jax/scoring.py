"""Scoring: a StudyTable -> the report dict of study-level metrics with bootstrap CIs.

Study probability > threshold (0.5) -> abnormal -> per body part and aggregate ('all'): F1, Cohen's
kappa, AUROC, accuracy, sensitivity, specificity, precision, NPV (`metrics.py`), each with a 95%
percentile CI from B bootstrap resamples of studies (`bootstrap.py`). Operating points and the
worklist: see `evaluation`'s docstring, which also holds report.json's schema. Pure: no files, no
printing (`reports` renders, `evaluation` writes).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from mura_jax import bootstrap
from mura_jax import metrics
from mura_jax.metrics import GROUPS, METRICS
from mura_jax.studies import StudyTable

# report.json's schema (`evaluation`'s docstring); 2: groups without studies are left out.
SCHEMA_VERSION = 2
DEFAULT_TARGETS = (('sensitivity', 0.95), ('specificity', 0.95))
# Metrics that depend on the threshold (all but AUROC): reported at operating points and readers.
THRESHOLDED = tuple(m for m in METRICS if m != 'auroc')


@dataclasses.dataclass(frozen=True)
class Options:
  """How a table is scored.

  threshold: abnormal if probability > threshold.
  num_resamples: bootstrap resamples B (0: no CIs); seed: their seed; chunk_size: resamples per
    jitted call (default: bounded memory, see bootstrap.py); level: the CI level.
  operating_targets: (metric, target) pairs, metric 'sensitivity' or 'specificity'.
  worklist_sensitivity: the sensitivity the worklist must keep.
  tie_break: reference label of a tied reader vote, 'abnormal' or 'normal' (`readers`).
  """
  threshold: float = 0.5
  num_resamples: int = 10_000
  seed: int = 0
  chunk_size: int | None = None
  level: float = 0.95
  operating_targets: Sequence[tuple[str, float]] = DEFAULT_TARGETS
  worklist_sensitivity: float = 0.95
  tie_break: str = 'abnormal'


# ------------------------------------------------------------------------------------------------
# Report entries: a value and its CI.


def _number(x) -> float | None:
  x = float(x)
  return None if math.isnan(x) else x


def entries(values, samples, n_studies, reasons, level, difference=False) -> list[dict]:
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


def metric_entries(counts, u2, sample_counts, sample_u2, names, level) -> list[dict]:
  """Per group, {metric: ENTRY} of one (prediction, reference) pair: counts (G, 4), samples
  (B, G, 4)."""
  values = metrics.metrics_from_counts(counts, u2)
  samples = (metrics.metrics_from_counts(sample_counts, sample_u2)
             if sample_counts is not None else None)
  n = counts.sum(-1)
  per_metric = {m: entries(values[m], None if samples is None else samples[m], n,
                            [metrics.undefined_reason(m, c) for c in counts], level)
                for m in names}
  return [{m: per_metric[m][g] for m in names} for g in range(len(counts))]


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



def score(table: StudyTable, options: Options = Options(), split: str | None = None) -> dict:
  """The report dict (report.json's content, `readers` None) of a study table."""
  table = table.in_study_order()  # the CIs must not depend on the input's row order
  study_paths, scores, truth, part = table.paths, table.probability, table.label, table.body_part
  threshold, num_resamples, seed = options.threshold, options.num_resamples, options.seed
  chunk_size, level = options.chunk_size, options.level
  operating_targets, worklist_sensitivity = options.operating_targets, options.worklist_sensitivity
  membership = metrics.body_part_membership(part)
  wanted = list(operating_targets) + [('sensitivity', worklist_sensitivity)]
  chosen = _choose_thresholds(scores, truth, wanted, table.score_kind == 'probabilities')
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

  entries = metric_entries(counts[0], u2, pair_samples(0), sample_u2, METRICS, level)
  groups = {}
  for g, group in enumerate(GROUPS):
    tp, fp, fn, tn = (int(c) for c in counts[0, g])
    if tp + fp + fn + tn == 0 and group != 'all':
      continue  # only the evaluated body parts (config.data.body_parts, the studies given)
    groups[group] = {'n_studies': tp + fp + fn + tn, 'n_abnormal': tp + fn, 'n_normal': fp + tn,
                     'confusion': {'tp': tp, 'fp': fp, 'fn': fn, 'tn': tn}, 'metrics': entries[g]}

  all_studies = GROUPS.index('all')
  at_threshold, pair = [], 1  # per wanted target: ({metric: ENTRY} of 'all', counts) or None
  for t, _ in chosen:
    if t is None:
      at_threshold.append(None)
      continue
    entries = metric_entries(counts[pair], None, pair_samples(pair), None, THRESHOLDED, level)
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

  report = {
      'schema_version': SCHEMA_VERSION, 'split': split, 'num_studies': len(study_paths),
      'num_abnormal': int(truth.sum()), 'num_normal': int((1 - truth).sum()),
      'score_kind': table.score_kind, 'aggregation': table.aggregation,
      'threshold': float(threshold),
      'bootstrap': {'num_resamples': int(num_resamples), 'seed': int(seed), 'ci_level': level,
                    'ci_method': 'percentile',
                    'resampling': 'studies with replacement from all studies; each group scored '
                                  'on its studies within the resample'},
      'groups': groups, 'operating_points': operating_points, 'worklist': worklist,
      'readers': None,  # filled by `readers.compare` where readers are given
  }
  return report
