"""Paired comparison of two models (the same bootstrap resamples for both) and thresholds carried
from one report to another: exact against a per-resample loop, and through the scorer CLI."""

import json

import numpy as np
import pytest

from mura_jax.evaluation import bootstrap
from mura_jax.evaluation import comparison
from mura_jax.evaluation import metrics
from mura_jax.evaluation import scorer
from mura_jax.evaluation.scoring import Options
from mura_jax.evaluation.studies import StudyTable


def _tables(num_studies=150, seed=0):
  rng = np.random.default_rng(seed)
  part = rng.integers(0, 7, num_studies)
  truth = rng.integers(0, 2, num_studies)
  a = np.clip(rng.normal(0.3 + 0.4 * truth, 0.2), 0, 1).round(2)  # ties on purpose
  b = np.clip(a + rng.normal(0, 0.15, num_studies), 0, 1).round(2)
  paths = [f'MURA-v1.1/valid/XR_{metrics.BODY_PARTS[p].upper()}/patient{i:05d}/study1/'
           for i, p in enumerate(part)]
  return StudyTable.checked(paths, a, truth), StudyTable.checked(paths, b, truth)


def test_paired_bootstrap_equals_a_loop_over_the_same_resamples():
  table_a, table_b = comparison.common_studies(*_tables())  # in study order, as compare() has them
  options = Options(num_resamples=120, seed=7, chunk_size=50)
  values, samples = comparison.paired_differences(table_a, table_b, options)
  membership = metrics.body_part_membership(table_a.body_part)
  drawn = bootstrap.resample_indices(7, len(table_a), 0, 120)
  for b, index in enumerate(drawn):
    member = membership[:, index]
    per_model = []
    for table in (table_a, table_b):
      s, y = table.probability[index], table.label[index]
      counts = metrics.confusion_counts((s > 0.5).astype(int), y, member)
      per_model.append(metrics.metrics_from_counts(counts, metrics.auroc_u2(s, y, member)))
    for m in metrics.METRICS:
      np.testing.assert_array_equal(samples[m][b], per_model[0][m] - per_model[1][m],
                                    err_msg=f'resample {b} {m}')  # exact, NaN where undefined
  # The report's CIs are the percentiles of those differences.
  section = comparison.compare(table_a, table_b, options, ('a', 'b'))
  low, high, _ = bootstrap.percentile_ci(samples['kappa'])
  all_studies = metrics.GROUPS.index('all')
  kappa = section['groups']['all']['kappa']['difference']
  assert kappa['value'] == pytest.approx(values['kappa'][all_studies], abs=0)
  assert (kappa['ci_low'], kappa['ci_high']) == (low[all_studies], high[all_studies])
  assert kappa['significant'] == bool(low[all_studies] > 0 or high[all_studies] < 0)
  assert set(section['groups']) <= set(metrics.GROUPS) and list(section['groups'])[-1] == 'all'


def test_a_model_against_itself_differs_by_exactly_zero():
  table_a, _ = _tables(seed=1)
  section = comparison.compare(table_a, table_a, Options(num_resamples=50))
  for group in section['groups'].values():
    diff = group['auroc']['difference']
    assert diff['value'] == 0 and diff['ci_low'] == diff['ci_high'] == 0
    assert diff['significant'] is False
  assert section['significant'] == []


def test_a_clearly_better_model_is_significant_on_aggregate():
  rng = np.random.default_rng(2)
  truth = rng.integers(0, 2, 400)
  good = np.clip(truth + rng.normal(0, 0.25, 400), 0, 1)
  poor = rng.random(400)
  paths = [f'MURA-v1.1/valid/XR_WRIST/patient{i:05d}/study1/' for i in range(400)]
  section = comparison.compare(StudyTable.checked(paths, good, truth),
                               StudyTable.checked(paths, poor, truth), Options(num_resamples=300))
  assert list(section['groups']) == ['wrist', 'all']  # only the evaluated groups, plus all
  assert 'all/auroc' in section['significant'] and 'all/kappa' in section['significant']
  assert section['groups']['all']['auroc']['difference']['ci_low'] > 0


def _write_files(tmp_path):
  table_a, table_b = _tables(seed=3)
  labels = tmp_path / 'labels.csv'
  labels.write_text(''.join(f'{p},{y}\n' for p, y in zip(table_a.paths, table_a.label)))
  files = []
  for name, table in (('a.csv', table_a), ('b.csv', table_b)):
    files.append(tmp_path / name)
    files[-1].write_text(''.join(f'{p},{float(s)!r}\n' for p, s in zip(table.paths, table.probability)))
  return labels, files


def test_cli_compare_and_threshold_from_another_report(tmp_path, capsys):
  labels, (a, b) = _write_files(tmp_path)
  code = scorer.main(['--predictions', str(a), '--compare', str(b), '--labels', str(labels),
                          '--bootstrap', '100', '--out', str(tmp_path / 'first')])
  assert code == 0
  assert 'Paired comparison A = ' in capsys.readouterr().out
  first = json.loads((tmp_path / 'first' / 'report.json').read_text())
  assert first['schema_version'] == 2
  compared = first['comparison']
  assert compared['a'] == str(a) and compared['b'] == str(b) and compared['n_studies'] == 150
  assert compared['bootstrap']['num_resamples'] == 100
  assert '## Paired comparison' in (tmp_path / 'first' / 'report.md').read_text()
  # The threshold reaching sensitivity 0.95 on the first report, applied to the second scoring.
  code = scorer.main(['--predictions', str(b), '--labels', str(labels), '--bootstrap', '0',
                          '--threshold-from', str(tmp_path / 'first' / 'report.json'),
                          '--operating-point', 'sensitivity@0.95',
                          '--out', str(tmp_path / 'second')])
  assert code == 0
  second = json.loads((tmp_path / 'second' / 'report.json').read_text())
  wanted = [p for p in first['operating_points'] if p['target_metric'] == 'sensitivity'][0]
  assert second['threshold'] == wanted['threshold']
  assert second['threshold_from']['operating_point'] == 'sensitivity@0.95'
  code = scorer.main(['--predictions', str(b), '--labels', str(labels), '--bootstrap', '0',
                          '--threshold-from', str(tmp_path / 'first' / 'report.json'),
                          '--operating-point', 'recall@0.9', '--out', str(tmp_path / 'third')])
  err = capsys.readouterr().err
  assert code == 2 and "no operating point 'recall@0.9'" in err and 'specificity@0.95' in err
