"""Scoring: a StudyTable -> the report dict of study-level metrics with bootstrap CIs.

Study probability > threshold (0.5) -> abnormal -> per body part and aggregate ('all'): F1, Cohen's
kappa, AUROC, accuracy, sensitivity, specificity, precision, NPV (`metrics.py`), each with a 95%
percentile CI from B bootstrap resamples of studies (`bootstrap.py`). Operating points and the
worklist: docs/evaluation.md, which also holds report.json's schema. Pure: no files, no
printing (`reports` renders and writes).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from mura_jax.errors import ConfigError
from mura_jax.evaluation import bootstrap
from mura_jax.evaluation import calibration
from mura_jax.evaluation import metrics
from mura_jax.evaluation.metrics import GROUPS, METRICS
from mura_jax.evaluation.studies import StudyTable

# report.json's schema (docs/evaluation.md); 2: groups without studies are left out.
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
      'calibration': (calibration_section(table, options)
                      if table.score_kind == 'probabilities' else None),
  }
  return report


def calibration_section(table: StudyTable, options: Options = Options()) -> dict:
  """report['calibration']: the study probabilities' ECE per group with CIs from the bootstrap
  resamples of `score` (same seed, same study order), and the reliability diagram's bins.
  'temperature' is None unless evaluate mode scaled the probabilities."""
  table = table.in_study_order()
  membership = metrics.body_part_membership(table.body_part)
  values = calibration.expected_calibration_error(table.probability, table.label, membership)
  samples = None
  if options.num_resamples:
    samples = calibration.bootstrap_ece(
        table.probability, table.label, membership, num_resamples=options.num_resamples,
        seed=options.seed, chunk_size=options.chunk_size)
  n = membership.sum(1)
  ece = entries(values, samples, n, ['no studies in this group'] * len(n), options.level)
  bins = calibration.reliability_bins(table.probability, table.label, membership)
  return {'level': 'study', 'num_bins': calibration.NUM_BINS, 'binning': calibration.BINNING,
          'groups': {group: {'ece': ece[g], 'bins': bins[g]} for g, group in enumerate(GROUPS)
                     if n[g] or group == 'all'},
          'temperature': None}


# ---------------------------------------------------------------------------------------------
# Values checked before any work (evaluate mode and the scorer): one sentence naming the flag or
# key and what it accepts.

SEED_MAX = 2**32 - 1  # jax.random.PRNGKey's distinct seeds (larger ones wrap or overflow)
OPERATING_POINT_FORM = ('threshold, worklist, sensitivity@T or specificity@T with T in (0, 1] '
                        '(e.g. specificity@0.95)')


def options_from_config(config, num_resamples=None) -> Options:
  """Options of config.evaluation (threshold, bootstrap seed and resamples)."""
  e = config.evaluation
  return Options(
      threshold=e.threshold, seed=e.seed,
      num_resamples=e.bootstrap_resamples if num_resamples is None else num_resamples)


def number_problem(named: str, value, low: float, high: float | None = None, *,
                   whole: bool = False, meaning: str = '') -> str | None:
  """A sentence when `value` is not a finite number in [low, high] (`whole`: an integer), else
  None. `named` is how the user wrote it: '--bootstrap -1', '--config.evaluation.seed=-1'."""
  number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  if (number and math.isfinite(value) and value >= low and (high is None or value <= high)
      and (not whole or float(value).is_integer())):
    return None
  def text(x):
    return str(int(x)) if float(x).is_integer() else f'{x:g}'
  allowed = f'from {text(low)} to {text(high)}' if high is not None else f'{text(low)} or more'
  return (f'{named}: expected {"a whole number" if whole else "a number"} {allowed}'
          + (f' ({meaning})' if meaning else '') + '.')


def operating_point_problem(named: str, value: str) -> str | None:
  """A sentence when `value` cannot name an operating point of a report, else None."""
  metric, at, target = str(value).partition('@')
  if value in ('threshold', 'worklist'):
    return None
  if at and metric in ('sensitivity', 'specificity'):
    try:
      if 0 < float(target) <= 1:
        return None
    except ValueError:
      pass
  return (f'{named}: no operating point {value!r} can exist; a report has '
          f'{OPERATING_POINT_FORM}.')


def options_problem(options: Options, names: dict[str, str]) -> str | None:
  """The first bad value of `options`, named as `names` says ({'num_resamples': '--bootstrap
  {}', ...}: each a format with the value), or None."""
  checks = (
      ('num_resamples', dict(low=0, whole=True, meaning='bootstrap resamples; 0: no CIs')),
      ('seed', dict(low=0, high=SEED_MAX, whole=True, meaning="the bootstrap's random seed")),
      ('threshold', dict(low=0, high=1, meaning='a study is abnormal if its probability > it')),
      ('chunk_size', dict(low=1, whole=True, meaning='bootstrap resamples per jitted call')),
  )
  for field, rule in checks:
    value = getattr(options, field)
    if field in names and not (field == 'chunk_size' and value is None):
      problem = number_problem(names[field].format(value), value, **rule)
      if problem:
        return problem
  return None


def check_evaluation_config(config) -> None:
  """Raises ConfigError, one sentence naming the key, for a value of `config.evaluation` that
  evaluate mode (and the evaluation after training) cannot use: bootstrap_resamples (>= 0),
  seed (0 .. 2**32 - 1), threshold (in [0, 1], not NaN), aggregation (mean | max), tta (none |
  flip), ensemble (>= 1), ensemble_order (views | studies), temperature (keep | none | fit), split
  (not empty), operating_point (with threshold_from only, of a form a report has). Batch
  sizes: configs.base.check_values. Cheap and without files: call it before any work (evaluate,
  cam and training declare it as their `check`)."""
  e = config.evaluation
  key = '--config.evaluation.{}={}'.format
  problem = options_problem(options_from_config(config), {
      'num_resamples': key('bootstrap_resamples', '{}'), 'seed': key('seed', '{}'),
      'threshold': key('threshold', '{}')})
  if problem is None and 'ensemble' in e:
    problem = number_problem(key('ensemble', e.ensemble), e.ensemble, 1, whole=True,
                             meaning='the number of best checkpoints averaged')
  choices = (('aggregation', ('mean', 'max')), ('tta', ('none', 'flip')),
             ('ensemble_order', ('views', 'studies')), ('temperature', ('keep', 'none', 'fit')))
  for name, allowed in choices:
    if problem is None and name in e and e[name] not in allowed:
      problem = f'{key(name, e[name])}: expected one of {", ".join(allowed)}.'
  if problem is None and not str(e.get('split', '')).strip():
    problem = (f'{key("split", e.get("split", ""))}: empty; give a split of the built dataset '
               '(validation, train).')
  point = e.get('operating_point', '')
  if problem is None and point:
    if not e.get('threshold_from', ''):
      problem = (f'{key("operating_point", point)}: used only with '
                 '--config.evaluation.threshold_from (the report.json it is read from); set that '
                 'too, or leave operating_point empty.')
    else:
      problem = operating_point_problem(key('operating_point', point), point)
  if problem:
    raise ConfigError(problem)
