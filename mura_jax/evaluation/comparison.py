"""Paired comparison of two models on the same studies: is A better than B, per metric and group?

Both models' study probabilities are scored on the SAME bootstrap resamples of studies (the
resamples are a pure function of (seed, resample, number of studies): `bootstrap.resample_indices`),
so each resample yields a difference A - B of every metric in every group, and the 95% percentile
CI of those differences says whether the difference excludes 0 (`significant`). Pairing removes
the variation that both models share (which studies happen to be drawn), so it detects differences
that two separate CIs would hide. Thresholds: both at the report's threshold; AUROC needs none.

The "comparison" section of report.json (schema in `evaluation`'s docstring):
{"a": str, "b": str, "n_studies": int, "threshold": float,
 "bootstrap": {"num_resamples", "seed", "ci_level", "ci_method", "resampling"},
 "groups": {"<group>": {"n_studies": int, "<metric>": {"a": ENTRY, "b": ENTRY, "difference": DIFF}}},
 "significant": ["<group>/<metric>", ...]}     # differences whose CI excludes 0
Groups: the body parts with studies, then "all".
"""
from __future__ import annotations


import numpy as np

from mura_jax.evaluation import bootstrap
from mura_jax.evaluation import metrics
from mura_jax.evaluation import scoring
from mura_jax.evaluation.metrics import GROUPS, METRICS
from mura_jax.evaluation.studies import LabelsError, StudyTable, study_key


def common_studies(table_a: StudyTable, table_b: StudyTable) -> tuple[StudyTable, StudyTable]:
  """Both tables restricted to the studies they share, in study order (labels must agree)."""
  in_b = {study_key(p): i for i, p in enumerate(table_b.paths)}
  rows_a = [i for i, p in enumerate(table_a.paths) if study_key(p) in in_b]
  rows_b = [in_b[study_key(table_a.paths[i])] for i in rows_a]
  if not rows_a:
    raise LabelsError('comparison', [('empty', 'comparison', None,
                                      'the two models share no study')])
  # In study order (`StudyTable.in_study_order`): the paired bootstrap draws row indices.
  order = sorted(range(len(rows_a)), key=lambda r: study_key(table_a.paths[rows_a[r]]))
  a = table_a.rows([rows_a[r] for r in order])
  b = table_b.rows([rows_b[r] for r in order])
  bad = np.flatnonzero(a.label != b.label)
  if bad.size:
    raise LabelsError('comparison', [('contradiction', 'comparison', int(i),
                                      f'study {a.paths[i]} has different labels') for i in bad])
  return a, b


def _counts(table: StudyTable, membership, options: scoring.Options):
  """Point counts (G, 4), U2 (G,), and their bootstrap samples (B, G, 4), (B, G) or None."""
  predicted = (table.probability > options.threshold).astype(np.int64)
  counts = metrics.confusion_counts(predicted, table.label, membership)
  u2 = metrics.auroc_u2(table.probability, table.label, membership)
  if not options.num_resamples:
    return counts, u2, None, None
  sample_counts, sample_u2 = bootstrap.bootstrap_counts(
      predicted[None], table.label[None], membership, table.probability,
      num_resamples=options.num_resamples, seed=options.seed, chunk_size=options.chunk_size)
  return counts, u2, sample_counts[:, 0], sample_u2


def paired_differences(table_a: StudyTable, table_b: StudyTable, options: scoring.Options):
  """{metric: (G,)} differences A - B and {metric: (B, G)} their bootstrap samples (None without
  bootstrap): resample b scores both models on the same drawn studies. Tables as `common_studies`
  returns them."""
  membership = metrics.body_part_membership(table_a.body_part)
  ca, ua, sa, sua = _counts(table_a, membership, options)
  cb, ub, sb, sub = _counts(table_b, membership, options)
  value_a, value_b = metrics.metrics_from_counts(ca, ua), metrics.metrics_from_counts(cb, ub)
  values = {m: value_a[m] - value_b[m] for m in METRICS}
  if sa is None:
    return values, None
  sample_a, sample_b = metrics.metrics_from_counts(sa, sua), metrics.metrics_from_counts(sb, sub)
  return values, {m: sample_a[m] - sample_b[m] for m in METRICS}


def compare(table_a: StudyTable, table_b: StudyTable, options: scoring.Options = scoring.Options(),
            names: tuple[str, str] = ('A', 'B')) -> dict:
  """The "comparison" section (module docstring) of A against B on the studies they share."""
  table_a, table_b = common_studies(table_a, table_b)
  membership = metrics.body_part_membership(table_a.body_part)
  level = options.level
  per_model = []
  for table in (table_a, table_b):
    counts, u2, sample_counts, sample_u2 = _counts(table, membership, options)
    per_model.append(scoring.metric_entries(counts, u2, sample_counts, sample_u2, METRICS, level))
  values, samples = paired_differences(table_a, table_b, options)
  n = membership.sum(1)
  groups, significant = {}, []
  for m in METRICS:
    reasons = [per_model[0][g][m]['reason'] or per_model[1][g][m]['reason'] for g in range(len(n))]
    diffs = scoring.entries(values[m], None if samples is None else samples[m], n, reasons, level,
                            difference=True)
    for g, group in enumerate(GROUPS):
      if n[g] == 0:
        continue  # body parts not evaluated are left out
      groups.setdefault(group, {'n_studies': int(n[g])})[m] = {
          'a': per_model[0][g][m], 'b': per_model[1][g][m], 'difference': diffs[g]}
      if diffs[g]['significant']:
        significant.append(f'{group}/{m}')
  groups = {g: groups[g] for g in GROUPS if g in groups}  # body parts, then 'all'
  significant.sort(key=lambda s: (GROUPS.index(s.split('/')[0]), METRICS.index(s.split('/')[1])))
  return {
      'a': names[0], 'b': names[1], 'n_studies': len(table_a), 'threshold': float(options.threshold),
      'bootstrap': {'num_resamples': int(options.num_resamples), 'seed': int(options.seed),
                    'ci_level': level, 'ci_method': 'percentile',
                    'resampling': 'paired: each resample of studies scores both models'},
      'groups': groups, 'significant': significant}
