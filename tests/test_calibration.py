"""Calibration: ECE and its bootstrap CI against plain numpy, the reliability diagram in the
report, and temperature scaling's fit."""
import json

import numpy as np
import pytest
from scipy import special

from mura_jax.evaluation import bootstrap
from mura_jax.evaluation import calibration
from mura_jax.evaluation import metrics
from mura_jax.evaluation import reports
from mura_jax.evaluation import scorer
from mura_jax.evaluation.scoring import Options
from mura_jax.evaluation.studies import StudyTable


def _plain_ece(p, y, num_bins=10):
  """ECE by its textbook definition, bin by bin: sum_k n_k / n |mean p - mean y|."""
  total = 0.0
  for k in range(num_bins):
    low, high = k / num_bins, (k + 1) / num_bins
    inside = (p >= low) & ((p < high) | (k == num_bins - 1))
    if inside.any():
      total += inside.sum() / p.size * abs(p[inside].mean() - y[inside].mean())
  return total


def _studies(probability, abnormal, part):
  paths = [f'MURA-v1.1/valid/XR_{metrics.BODY_PARTS[b].upper()}/patient{i:05d}/study1_'
           f'{"positive" if a else "negative"}/' for i, (a, b) in enumerate(zip(abnormal, part))]
  return StudyTable.checked(paths, np.asarray(probability, np.float64), np.asarray(abnormal),
                            np.asarray(part))


def test_ece_of_a_known_miscalibration():
  # Every study says 0.8 and half are abnormal: |0.8 - 0.5| = 0.3. Add a bin at 0.15 where a
  # quarter are abnormal (|0.15 - 0.25| = 0.1), half as many studies: (2 * 0.3 + 0.1) / 3.
  p = np.r_[np.full(40, 0.8), np.full(20, 0.15)]
  y = np.r_[np.tile([0, 1], 20), np.tile([1, 0, 0, 0], 5)]
  membership = np.ones((1, p.size), bool)
  assert calibration.expected_calibration_error(p, y, membership)[0] == pytest.approx(0.7 / 3)
  # Probabilities equal to each bin's abnormal fraction, and p = 1 in the last bin: ECE 0.
  p = np.r_[np.full(4, 0.25), np.full(3, 1.0)]
  y = np.r_[1, 0, 0, 0, 1, 1, 1]
  assert calibration.expected_calibration_error(p, y, np.ones((1, 7), bool))[0] == 0


def test_ece_per_group_equals_the_textbook_loop_and_calibrated_draws_give_near_zero():
  rng = np.random.default_rng(0)
  p = rng.random(20_000)
  part = rng.integers(0, 7, p.size)
  calibrated = (rng.random(p.size) < p).astype(int)
  overconfident = (rng.random(p.size) < 0.5 + 0.5 * (p - 0.5)).astype(int)  # truth half as sure
  membership = metrics.body_part_membership(part)
  for y in (calibrated, overconfident):
    got = calibration.expected_calibration_error(p, y, membership)
    expected = [_plain_ece(p[m], y[m]) for m in membership]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
  assert calibration.expected_calibration_error(p, calibrated, membership)[-1] < 0.01
  # Truth at 0.5 + (p - 0.5) / 2: |p - that| = |p - 0.5| / 2, whose mean over U(0, 1) is 1/8.
  assert calibration.expected_calibration_error(p, overconfident, membership)[-1] == \
      pytest.approx(0.125, abs=0.01)


def test_ece_ci_uses_the_bootstraps_resamples_and_equals_a_plain_loop():
  rng = np.random.default_rng(1)
  n, resamples, seed = 300, 200, 3
  part = rng.integers(0, 6, n)
  part[:2] = 6  # wrist: 2 studies, absent from some resamples (NaN, left out of the CI)
  p = np.round(rng.random(n), 2)
  y = (rng.random(n) < p ** 1.5).astype(int)
  table = _studies(p, y, part)
  report = reports.evaluate(table, Options(num_resamples=resamples, seed=seed, chunk_size=64))
  # Resamples index the studies in study order, as scoring sorts them.
  ordered = table.in_study_order()
  p, y, part = ordered.probability, ordered.label, ordered.body_part
  membership = metrics.body_part_membership(part)
  # The very resamples of the confusion counts (bootstrap.resample_indices), scored study by study.
  indices = bootstrap.resample_indices(seed, n, 0, resamples)
  looped = np.full((resamples, len(metrics.GROUPS)), np.nan)
  for b, drawn in enumerate(indices):
    for g, member in enumerate(membership):
      rows = drawn[member[drawn]]
      if rows.size:
        looped[b, g] = _plain_ece(p[rows], y[rows])
  low, high, undefined = bootstrap.percentile_ci(looped)
  assert undefined[metrics.GROUPS.index('wrist')] > 0
  section = report['calibration']['groups']
  for g, group in enumerate(metrics.GROUPS):
    ece = section[group]['ece']
    assert ece['value'] == pytest.approx(_plain_ece(p[membership[g]], y[membership[g]]),
                                         rel=1e-12)
    assert (ece['ci_low'], ece['ci_high']) == pytest.approx((low[g], high[g]), rel=1e-9)
    assert ece['n_resamples_undefined'] == undefined[g]
    assert ece['ci_low'] <= ece['value'] <= ece['ci_high'] or group == 'wrist'
  bins = section['all']['bins']
  assert sum(b['n_studies'] for b in bins) == n
  top = [b for b in bins if b['low'] == 0.9][0]
  inside = p >= 0.9
  assert top['mean_probability'] == pytest.approx(p[inside].mean())
  assert top['abnormal_rate'] == pytest.approx(y[inside].mean())


def test_report_files_hold_ece_and_the_reliability_diagram(tmp_path):
  rng = np.random.default_rng(2)
  p = rng.random(140)
  y = (rng.random(140) < p).astype(int)
  labels = tmp_path / 'labels.csv'
  predictions = tmp_path / 'predictions.csv'
  table = _studies(p, y, np.arange(140) % 7)
  labels.write_text(''.join(f'{s},{a}\n' for s, a in zip(table.paths, table.label)))
  predictions.write_text(''.join(f'{s},{float(q)!r}\n' for s, q in zip(table.paths, p)))
  out = tmp_path / 'out'
  assert scorer.main(['--predictions', str(predictions), '--labels', str(labels),
                      '--bootstrap', '50', '--out', str(out)]) == 0
  report = json.loads((out / 'report.json').read_text())
  assert report['calibration']['num_bins'] == 10 and report['calibration']['level'] == 'study'
  assert set(report['calibration']['groups']) == set(metrics.GROUPS)
  assert report['calibration']['groups']['all']['ece']['value'] == pytest.approx(
      _plain_ece(p, y))
  markdown = (out / 'report.md').read_text()
  assert '## Calibration' in markdown and '(reliability.png)' in markdown
  assert (out / 'reliability.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # Hard labels have no calibration to measure: no section, no diagram.
  predictions.write_text(''.join(f'{s},{int(q > 0.5)}\n' for s, q in zip(table.paths, p)))
  assert scorer.main(['--predictions', str(predictions), '--labels', str(labels),
                      '--bootstrap', '0', '--out', str(tmp_path / 'hard')]) == 0
  assert json.loads((tmp_path / 'hard' / 'report.json').read_text())['calibration'] is None
  assert not (tmp_path / 'hard' / 'reliability.png').exists()


@pytest.mark.parametrize('true_temperature', [0.5, 2.5])
def test_fit_temperature_recovers_the_temperature_the_logits_were_made_with(true_temperature):
  rng = np.random.default_rng(3)
  calibrated_logits = rng.normal(0.3, 2.0, 40_000)
  abnormal = (rng.random(calibrated_logits.size) < special.expit(calibrated_logits)).astype(int)
  # A model whose logits are T times the calibrated ones: sigmoid(logit / T) is calibrated.
  fit = calibration.fit_temperature(calibrated_logits * true_temperature, abnormal)
  assert fit['temperature'] == pytest.approx(true_temperature, rel=0.03)
  assert not fit['at_bound'] and fit['num_views'] == abnormal.size
  assert fit['nll_after'] < fit['nll_before']
  assert fit['nll_after'] == pytest.approx(calibration.mean_nll(
      calibrated_logits * true_temperature, abnormal, fit['temperature']))
  # The minimum: nudging T either way raises the NLL.
  for factor in (0.99, 1.01):
    assert calibration.mean_nll(calibrated_logits * true_temperature, abnormal,
                                fit['temperature'] * factor) > fit['nll_after']


def test_fit_temperature_stops_at_its_bound_on_separable_views():
  logits = np.r_[-np.arange(1, 6), np.arange(1, 6)].astype(float)
  fit = calibration.fit_temperature(logits, (logits > 0).astype(int))
  assert fit['at_bound'] and fit['temperature'] == pytest.approx(calibration.TEMPERATURE_BOUNDS[0])
  with pytest.raises(ValueError, match='finite logits'):
    calibration.fit_temperature(np.array([np.nan, 1.0]), np.array([0, 1]))
