"""The vectorised bootstrap against a plain per-resample loop on the same resample indices."""
import jax
from jax.extend.random import threefry2x32_p
import numpy as np
import pytest
from sklearn import metrics as skm

from mura_jax.evaluation import bootstrap
from mura_jax.evaluation import metrics
from mura_jax.evaluation import reports
from mura_jax.evaluation.scoring import Options
from mura_jax.evaluation.studies import StudyTable

NUM_RESAMPLES = 300
SEED = 7


def _problem(seed=0, num_studies=250):
  """Two (prediction, reference) pairs over 8 groups; one tiny group so some resamples lack a
  class (undefined metrics), and scores rounded to make ties."""
  rng = np.random.default_rng(seed)
  part = rng.integers(0, 6, num_studies)
  part[:3] = 6  # wrist: 3 studies
  truth = rng.integers(0, 2, num_studies)
  scores = np.round(np.clip(rng.normal(0.35 + 0.3 * truth, 0.2), 0, 1), 2)
  reader = np.where(rng.random(num_studies) < 0.8, truth, 1 - truth)
  majority = np.where(rng.random(num_studies) < 0.9, truth, 1 - truth)
  predicted = np.stack([(scores > 0.5).astype(int), reader])
  reference = np.stack([truth, majority])
  return predicted, reference, metrics.body_part_membership(part), scores


def _plain_loop(indices, predicted, reference, membership, scores):
  """Resample the arrays with each row of indices and count, study by study; no shared code with
  the vectorised path except what turns counts into metrics."""
  num_pairs, num_groups = len(predicted), len(membership)
  counts = np.zeros((len(indices), num_pairs, num_groups, 4), np.int64)
  u2 = np.zeros((len(indices), num_groups), np.int64)
  for b, drawn in enumerate(indices):
    for g in range(num_groups):
      rows = drawn[membership[g, drawn]]  # the group's studies in this resample, repeats kept
      for p in range(num_pairs):
        pred, ref = predicted[p, rows], reference[p, rows]
        counts[b, p, g] = [np.sum((pred == 1) & (ref == 1)), np.sum((pred == 1) & (ref == 0)),
                           np.sum((pred == 0) & (ref == 1)), np.sum((pred == 0) & (ref == 0))]
      label = reference[0, rows]
      positive, negative = scores[rows][label == 1], scores[rows][label == 0]
      u2[b, g] = (2 * np.sum(positive[:, None] > negative[None, :])
                  + np.sum(positive[:, None] == negative[None, :]))
  return counts, u2


def _assert_same_metrics(counts, u2, loop_counts, loop_u2):
  # Exactly equal: integer counts, and the one float64 formula per metric on both sides.
  assert np.array_equal(counts, loop_counts)
  assert np.array_equal(u2, loop_u2)
  for p in range(counts.shape[1]):
    vectorised = metrics.metrics_from_counts(counts[:, p], u2 if p == 0 else None)
    looped = metrics.metrics_from_counts(loop_counts[:, p], loop_u2 if p == 0 else None)
    for m in metrics.METRICS:
      assert np.array_equal(vectorised[m], looped[m], equal_nan=True), m


@pytest.fixture(scope='module')
def problem_and_loop():
  predicted, reference, membership, scores = _problem()
  indices = bootstrap.resample_indices(SEED, predicted.shape[1], 0, NUM_RESAMPLES)
  return (predicted, reference, membership, scores), _plain_loop(indices, predicted, reference,
                                                                  membership, scores)


@pytest.mark.parametrize('chunk_size', [64, None])  # 64: the last chunk is padded and cut
def test_vectorised_equals_plain_loop_exactly(problem_and_loop, chunk_size):
  (predicted, reference, membership, scores), (loop_counts, loop_u2) = problem_and_loop
  counts, u2 = bootstrap.bootstrap_counts(predicted, reference, membership, scores,
                                          num_resamples=NUM_RESAMPLES, seed=SEED,
                                          chunk_size=chunk_size)
  _assert_same_metrics(counts, u2, loop_counts, loop_u2)
  # Some resamples must leave the 3-study group without a class, or NaN handling went untested.
  auroc = metrics.metrics_from_counts(counts[:, 0], u2)['auroc']
  assert np.isnan(auroc[:, metrics.GROUPS.index('wrist')]).any()


def test_float64_path_equals_plain_loop_exactly(problem_and_loop, monkeypatch):
  # Large splits run in float64 (float32 would not hold U2 exactly); force that path here.
  monkeypatch.setattr(bootstrap, 'fits_float32', lambda membership: False)
  (predicted, reference, membership, scores), (loop_counts, loop_u2) = problem_and_loop
  counts, u2 = bootstrap.bootstrap_counts(predicted, reference, membership, scores,
                                          num_resamples=NUM_RESAMPLES, seed=SEED, chunk_size=64)
  _assert_same_metrics(counts, u2, loop_counts, loop_u2)


def test_plain_loop_agrees_with_sklearn(problem_and_loop):
  # Anchors the reference loop itself: its first resamples scored by scikit-learn.
  (predicted, reference, membership, scores), (loop_counts, loop_u2) = problem_and_loop
  indices = bootstrap.resample_indices(SEED, predicted.shape[1], 0, 3)
  for b, drawn in enumerate(indices):
    values = metrics.metrics_from_counts(loop_counts[b, 0], loop_u2[b])
    for g in range(len(metrics.BODY_PARTS)):  # the six sizeable body parts have both classes
      rows = drawn[membership[g, drawn]]
      if len(set(reference[0, rows])) < 2:
        continue
      assert values['auroc'][g] == pytest.approx(skm.roc_auc_score(reference[0, rows],
                                                                   scores[rows]), rel=1e-12)
      assert values['kappa'][g] == pytest.approx(
          skm.cohen_kappa_score(reference[0, rows], predicted[0, rows]), rel=1e-12)
      assert values['f1'][g] == pytest.approx(
          skm.f1_score(reference[0, rows], predicted[0, rows]), rel=1e-12)


def test_resamples_are_deterministic_per_seed():
  predicted, reference, membership, scores = _problem(1, num_studies=120)
  run = lambda seed, chunk: bootstrap.bootstrap_counts(  # pylint: disable=g-long-lambda
      predicted, reference, membership, scores, num_resamples=100, seed=seed, chunk_size=chunk)
  first, again, other_chunks, other_seed = run(3, 64), run(3, 64), run(3, 100), run(4, 64)
  assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert all(np.array_equal(a, b) for a, b in zip(first, other_chunks))
  assert not np.array_equal(first[0], other_seed[0])
  # Resample b does not depend on how many are drawn or from where.
  indices = bootstrap.resample_indices(3, 120, 0, 10)
  assert np.array_equal(indices[4:], bootstrap.resample_indices(3, 120, 4, 10))
  assert indices.min() >= 0 and indices.max() < 120


def test_resample_indices_are_documented_threefry_draws():
  # Resample b, draw j = floor(u N / 2^32), u = jax.random.bits(PRNGKey(seed), (B, N))[b, j].
  num_studies = 1199
  with jax.threefry_partitionable(True):
    bits = np.asarray(jax.random.bits(jax.random.PRNGKey(5), (40, num_studies), np.uint32))
  expected = (bits.astype(np.uint64) * num_studies >> 32).astype(np.int32)
  assert np.array_equal(bootstrap.resample_indices(5, num_studies, 0, 40), expected)
  assert np.array_equal(bootstrap.resample_indices(5, num_studies, 17, 40), expected[17:])
  with jax.enable_x64(True):  # the float64 path draws the same studies
    assert np.array_equal(bootstrap.resample_indices(5, num_studies, 0, 40), expected)
  # Far resamples: the counter b N + j passes 2^32, so its high word must carry.
  start, num_studies = 2**32 // 777 - 1, 777
  b = np.arange(start, start + 3, dtype=np.uint64)[:, None]
  counter = b * np.uint64(num_studies) + np.arange(num_studies, dtype=np.uint64)
  key = jax.random.key_data(jax.random.PRNGKey(5))
  out0, out1 = threefry2x32_p.bind(key[0], key[1], (counter >> 32).astype(np.uint32),
                                   (counter & 0xFFFFFFFF).astype(np.uint32))
  u = (np.asarray(out0) ^ np.asarray(out1)).astype(np.uint64)
  assert np.array_equal(bootstrap.resample_indices(5, num_studies, start, start + 3),
                        (u * num_studies >> 32).astype(np.int32))
  with pytest.raises(ValueError, match='studies'):
    bootstrap.resample_indices(0, 2**16, 0, 1)


def test_percentile_ci_matches_numpy_with_undefined_resamples():
  rng = np.random.default_rng(0)
  samples = rng.random((1001, 5, 3))
  samples[rng.random(samples.shape) < 0.1] = np.nan
  samples[:, 0, 0] = np.nan  # every resample undefined
  low, high, undefined = bootstrap.percentile_ci(samples)
  with np.errstate(all='ignore'), pytest.warns(RuntimeWarning):
    expected = np.nanpercentile(samples, [2.5, 97.5], axis=0)
  np.testing.assert_allclose(low, expected[0], rtol=1e-12)
  np.testing.assert_allclose(high, expected[1], rtol=1e-12)
  assert np.array_equal(undefined, np.isnan(samples).sum(0))
  full = rng.random((200, 4))
  np.testing.assert_allclose(bootstrap.percentile_ci(full, 0.9)[:2],
                             np.percentile(full, [5, 95], axis=0))


def test_cis_bracket_point_values_on_well_behaved_data():
  # MURA-valid-like group sizes: every group has both classes in every resample.
  rng = np.random.default_rng(2)
  sizes = [158, 175, 133, 167, 135, 194, 237]
  part = np.repeat(np.arange(7), sizes)
  truth = (rng.random(part.size) < 0.45).astype(int)
  scores = np.clip(rng.beta(2 + 3 * truth, 5 - 3 * truth), 0, 1)
  paths = [f'MURA-v1.1/valid/XR_{metrics.BODY_PARTS[p].upper()}/patient{i:05d}/study1/'
           for i, p in enumerate(part)]
  report = reports.evaluate(StudyTable.checked(paths, scores, truth),
                               Options(num_resamples=1000, seed=0))
  for group, section in report['groups'].items():
    for m, entry in section['metrics'].items():
      assert entry['ci_low'] <= entry['value'] <= entry['ci_high'], (group, m, entry)
      assert entry['ci_low'] < entry['ci_high'], (group, m)
      assert entry['n_resamples_undefined'] == 0
  # The aggregate's CI is narrower than any single body part's.
  width = lambda e: e['ci_high'] - e['ci_low']
  all_f1 = width(report['groups']['all']['metrics']['f1'])
  assert all(all_f1 < width(report['groups'][p]['metrics']['f1']) for p in metrics.BODY_PARTS)
  for op in report['operating_points']:
    entry = op['metrics'][op['target_metric']]
    assert entry['value'] >= op['target'] and entry['ci_low'] <= entry['value'] <= entry['ci_high']
