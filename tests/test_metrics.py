"""Study-level metrics against scikit-learn, edge cases, ROC and operating-point thresholds."""
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from mura_jax.evaluation import metrics
from mura_jax.evaluation import reports
from mura_jax.evaluation.scoring import Options
from mura_jax.evaluation.studies import StudyTable


def _random_studies(seed, num_studies=600, decimals=2):
  """Random labels, body parts and scores; rounded scores make ties, which AUROC must halve."""
  rng = np.random.default_rng(seed)
  part = rng.integers(0, len(metrics.BODY_PARTS), num_studies)
  abnormal = rng.integers(0, 2, num_studies)
  scores = np.round(np.clip(rng.normal(0.35 + 0.3 * abnormal, 0.2), 0, 1), decimals)
  return part, abnormal, scores


def _sklearn_metrics(y, s, threshold=0.5):
  pred = (s > threshold).astype(int)
  tn = int(((pred == 0) & (y == 0)).sum())
  fn = int(((pred == 0) & (y == 1)).sum())
  return {
      'f1': skm.f1_score(y, pred),
      'kappa': skm.cohen_kappa_score(y, pred),
      'auroc': skm.roc_auc_score(y, s),
      'accuracy': skm.accuracy_score(y, pred),
      'sensitivity': skm.recall_score(y, pred),
      'specificity': skm.recall_score(y, pred, pos_label=0),
      'precision': skm.precision_score(y, pred),
      'npv': tn / (tn + fn),  # scikit-learn has no NPV
  }


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_every_metric_equals_sklearn_per_group(seed):
  part, y, s = _random_studies(seed)
  membership = metrics.body_part_membership(part)
  counts = metrics.confusion_counts((s > 0.5).astype(int), y, membership)
  values = metrics.metrics_from_counts(counts, metrics.auroc_u2(s, y, membership))
  for g, group in enumerate(metrics.GROUPS):
    member = membership[g]
    expected = _sklearn_metrics(y[member], s[member])
    for m in metrics.METRICS:
      np.testing.assert_allclose(values[m][g], expected[m], rtol=1e-12, atol=1e-15,
                                 err_msg=f'{group} {m}')


def test_report_values_equal_sklearn_per_group():
  # The same through the public entry point: the wiring into report.json is right too.
  part, y, s = _random_studies(3, num_studies=400)
  paths = [f'MURA-v1.1/valid/XR_{metrics.BODY_PARTS[p].upper()}/patient{i:05d}/study1/'
           for i, p in enumerate(part)]
  report = reports.evaluate(StudyTable.checked(paths, s, y), Options(num_resamples=0))
  for group in metrics.GROUPS:
    member = np.ones(len(y), bool) if group == 'all' else part == metrics.BODY_PARTS.index(group)
    expected = _sklearn_metrics(y[member], s[member])
    section = report['groups'][group]
    assert section['n_studies'] == member.sum()
    assert section['n_abnormal'] == y[member].sum()
    assert section['n_normal'] == (1 - y[member]).sum()
    for m in metrics.METRICS:
      assert section['metrics'][m]['value'] == pytest.approx(expected[m], rel=1e-12), (group, m)
      assert section['metrics'][m]['n_studies'] == member.sum()


def test_undefined_metrics_are_nan_with_reasons():
  # One class only, everything predicted normal: which metrics are undefined and why.
  counts = np.array([0, 0, 0, 5])  # tp fp fn tn
  values = metrics.metrics_from_counts(counts, np.int64(0))
  for m in ('auroc', 'sensitivity', 'precision', 'f1', 'kappa'):
    assert np.isnan(values[m]), m
    assert metrics.undefined_reason(m, counts), m
  assert values['specificity'] == 1 and values['npv'] == 1 and values['accuracy'] == 1
  assert metrics.undefined_reason('specificity', counts) is None
  assert 'no abnormal' in metrics.undefined_reason('auroc', counts)
  assert 'no normal' in metrics.undefined_reason('auroc', [3, 0, 2, 0])
  assert np.isnan(metrics.metrics_from_counts(np.array([0, 0, 0, 0]))['accuracy'])
  assert metrics.undefined_reason('accuracy', [0, 0, 0, 0]) == 'no studies in this group'
  # scikit-learn agrees where it is defined (kappa of constant arrays is NaN there too).
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    assert np.isnan(skm.cohen_kappa_score([0] * 5, [0] * 5))


def test_roc_curve_matches_sklearn():
  _, y, s = _random_studies(4, num_studies=300)
  fpr, tpr, thresholds = metrics.roc_curve(s, y)
  sk_fpr, sk_tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr)
  np.testing.assert_allclose(tpr, sk_tpr)
  # Each threshold reproduces its point with the rule 'abnormal if score > t'.
  for f, t, th in zip(fpr, tpr, thresholds):
    pred = s > th
    assert (pred & (y == 1)).sum() / y.sum() == pytest.approx(t)
    assert (pred & (y == 0)).sum() / (1 - y).sum() == pytest.approx(f)


@pytest.mark.parametrize('target', [0.5, 0.8, 0.95, 1.0])
def test_threshold_for_target(target):
  _, y, s = _random_studies(5, num_studies=500)
  fpr, tpr, thresholds = metrics.roc_curve(s, y)
  # Sensitivity: reached, and the best specificity among the ROC points that reach it.
  t = metrics.threshold_for_target(s, y, 'sensitivity', target)
  pred = s > t
  sens, spec = pred[y == 1].mean(), 1 - pred[y == 0].mean()
  assert sens >= target
  assert spec == pytest.approx(1 - fpr[tpr >= target].min())
  # Specificity: reached, and the best sensitivity among the points that reach it.
  t = metrics.threshold_for_target(s, y, 'specificity', target)
  pred = s > t
  sens, spec = pred[y == 1].mean(), 1 - pred[y == 0].mean()
  assert spec >= target
  assert sens == pytest.approx(tpr[1 - fpr >= target].max())


def test_threshold_for_target_edge_cases():
  y = np.array([1, 1, 0, 0])
  s = np.array([0.0, 0.0, 0.0, 0.0])  # all tied at 0: only 'everything abnormal' reaches sens 1
  t = metrics.threshold_for_target(s, y, 'sensitivity', 1.0)
  assert (s > t).all()
  with pytest.raises(ValueError, match='no abnormal'):
    metrics.threshold_for_target(s, np.zeros(4), 'sensitivity', 0.9)
  with pytest.raises(ValueError, match='target'):
    metrics.threshold_for_target(s, y, 'sensitivity', 0)
