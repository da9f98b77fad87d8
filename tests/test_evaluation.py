"""Study aggregation, reader comparison, bad input, report files and the standalone scorer."""
import csv
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from mura_jax.evaluation import bootstrap
from mura_jax.evaluation import evaluate
from mura_jax.evaluation import metrics
from mura_jax.evaluation import prediction_files
from mura_jax.evaluation import readers as readers_lib
from mura_jax.evaluation import reports
from mura_jax.evaluation import scorer
from mura_jax.evaluation import scoring
from mura_jax.evaluation import studies
from mura_jax.evaluation.scoring import Options
from mura_jax.evaluation.studies import LabelsError, PredictionsError, StudyTable


def _evaluate(paths, scores, truth, readers=None, **options):
  return reports.evaluate(StudyTable.checked(paths, scores, truth), Options(**options),
                             readers=readers)


def _study_path(part, patient, study, abnormal, split='valid'):
  label = 'positive' if abnormal else 'negative'
  return f'MURA-v1.1/{split}/XR_{part.upper()}/patient{patient:05d}/study{study}_{label}/'


def _synthetic_views(seed=0, num_studies=120):
  """Views of MURA-like studies: 1..5 views each, shuffled; a patient has studies under two body
  parts with the same study number (they are different studies)."""
  rng = np.random.default_rng(seed)
  paths, labels = [], []
  for i in range(num_studies):
    abnormal = int(rng.random() < 0.45)
    part = metrics.BODY_PARTS[i % 7]
    paths.append(_study_path(part, 11185 + i // 2, 1, abnormal))
    labels.append(abnormal)
  rows = []
  for path, abnormal in zip(paths, labels):
    for v in range(rng.integers(1, 6)):
      rows.append((path, f'{path}image{v + 1}.png', abnormal,
                   float(np.clip(rng.normal(0.3 + 0.4 * abnormal, 0.2), 0, 1))))
  rows = [rows[i] for i in rng.permutation(len(rows))]
  return paths, np.array(labels), pd.DataFrame(rows, columns=['study', 'image', 'label', 'prob'])


# ---------------------------------------------------------------------------------------------
# Aggregation.


def test_aggregation_equals_pandas_groupby_with_padding():
  _, _, views = _synthetic_views()
  codes, uniques = pd.factorize(views['study'])
  num_pad = 37
  # Padding views: NaN probabilities, bogus study indices, masked out; they must count nowhere.
  probs = np.r_[views['prob'].to_numpy(), np.full(num_pad, np.nan)]
  index = np.r_[codes, np.zeros(num_pad, int)]
  mask = np.r_[np.ones(len(views), bool), np.zeros(num_pad, bool)]
  for method, reduce in (('mean', 'mean'), ('max', 'max')):
    expected = views.groupby('study', sort=False)['prob'].agg(reduce).reindex(uniques).to_numpy()
    got = studies.aggregate_views(jnp.asarray(probs, jnp.float32), jnp.asarray(index),
                                     len(uniques), jnp.asarray(mask), method=method)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)  # float32 inside jit
    got64, num_views = studies.aggregate_float64(probs, index, len(uniques), mask, method)
    if method == 'max':
      assert np.array_equal(got64, expected)  # no arithmetic: exact
    else:
      np.testing.assert_allclose(got64, expected, rtol=1e-14)
  assert np.array_equal(num_views, views.groupby('study', sort=False).size().reindex(uniques))


def test_study_without_views_is_nan():
  got = studies.aggregate_views(jnp.array([0.2, 0.4, 0.9]), jnp.array([0, 0, 2]), 3,
                                   jnp.array([True, True, False]))
  np.testing.assert_allclose(np.asarray(got), [0.3, np.nan, np.nan])


def test_evaluate_views_aggregates_like_pandas(tmp_path):
  paths, labels, views = _synthetic_views(1)
  view_parts = [p.split('/')[2] for p in views['study']]  # 'XR_WRIST' etc.
  table = studies.from_views(
      views['prob'].to_numpy(np.float32), [p.encode() for p in views['study']],
      views['label'].to_numpy(), view_parts)
  report = reports.evaluate(table, Options(num_resamples=50), out_dir=tmp_path, split='valid')
  table = pd.read_csv(tmp_path / 'study_probabilities.csv')
  expected = views.groupby('study')['prob'].apply(
      lambda p: p.astype(np.float32).astype(np.float64).mean())
  assert set(table['study']) == set(paths)
  np.testing.assert_allclose(table.set_index('study')['probability'], expected[table['study']],
                             rtol=1e-14)
  assert (table.set_index('study')['num_views'] == views.groupby('study').size()[table['study']]
          ).all()
  assert report['num_studies'] == len(paths) and report['aggregation'] == 'mean'


def test_evaluate_views_rejects_conflicting_labels_and_nan():
  study = _study_path('hand', 1, 1, True)
  with pytest.raises(LabelsError, match='different labels'):
    studies.from_views([0.2, 0.9], [study, study], [1, 0])
  with pytest.raises(PredictionsError, match='not finite'):
    studies.from_views([0.2, np.nan], [study, study], [1, 1])
  # ... unless the NaN view is padding.
  table = studies.from_views([0.2, np.nan], [study, b''], [1, 0], view_mask=[True, False])
  assert len(table) == 1


# ---------------------------------------------------------------------------------------------
# Reader comparison, worked by hand.

# Six studies of one body part (hand), three readers A, B, C, and the model at threshold 0.5.
#   study  A B C  model  truth
#   1      1 1 1  1      1
#   2      1 1 0  1      1
#   3      1 0 0  0      1
#   4      0 0 0  0      0
#   5      0 1 0  1      0
#   6      0 0 1  0      0
READERS = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1]])
MODEL = np.array([1, 1, 0, 0, 1, 0])
TRUTH = np.array([1, 1, 1, 0, 0, 0])
# With K = 3 the reference of a reader is the majority of TWO others; they tie when they differ.
# tie_break='abnormal' (a tie counts as abnormal):
#   maj_A = maj(B, C) = [1, 1(tie), 0, 0, 1(tie), 1(tie)]
#     A vs maj_A: tp 2 (s1 s2), fp 1 (s3), fn 2 (s5 s6), tn 1 -> F1 = 4 / (4 + 1 + 2) = 4/7;
#       p_o = 3/6, p_e = (3*4 + 3*2) / 36 = 1/2 -> kappa = 0
#     model vs maj_A: tp 3, fp 0, fn 1 (s6), tn 2 -> F1 = 6/7; p_o = 5/6, p_e = 1/2 -> kappa 2/3
#   maj_B = maj(A, C) = [1, 1(tie), 1(tie), 0, 0, 1(tie)]
#     B vs maj_B: tp 2, fp 1 (s5), fn 2 (s3 s6), tn 1 -> F1 4/7, kappa 0
#     model vs maj_B: the same cells -> F1 4/7, kappa 0
#   maj_C = maj(A, B) = [1, 1, 1(tie), 0, 1(tie), 0]
#     C vs maj_C: tp 1, fp 1 (s6), fn 3 (s2 s3 s5), tn 1 -> F1 2/6 = 1/3;
#       p_o = 2/6, p_e = (2*4 + 4*2) / 36 = 4/9 -> kappa = (1/3 - 4/9) / (5/9) = -1/5
#     model vs maj_C: tp 3, fp 0, fn 1 (s3), tn 2 -> F1 6/7, kappa 2/3
#   means: readers F1 (4/7 + 4/7 + 1/3) / 3 = 31/63, model F1 (6/7 + 4/7 + 6/7) / 3 = 16/21,
#          difference 16/21 - 31/63 = 17/63;
#          readers kappa (0 + 0 - 1/5) / 3 = -1/15, model kappa (2/3 + 0 + 2/3) / 3 = 4/9,
#          difference 4/9 + 1/15 = 23/45.
# tie_break='normal': maj_A = [1, 0, 0, 0, 0, 0]; A vs maj_A: tp 1, fp 2, fn 0, tn 3 -> F1 2/4.
# Readers against the truth: A is perfect (sensitivity 1, specificity 1); C: sensitivity 1/3
# (s1 of s1..s3), specificity 2/3 (s4 s5 of s4..s6).


def _reader_report(tie_break='abnormal', num_resamples=0):
  paths = [_study_path('hand', i, 1, t) for i, t in enumerate(TRUTH)]
  readers = readers_lib.Readers(tuple(paths), ('A', 'B', 'C'), READERS)
  scores = np.where(MODEL == 1, 0.8, 0.2)
  return _evaluate(paths, scores, TRUTH, readers=readers, num_resamples=num_resamples,
                   tie_break=tie_break)['readers']


def test_reader_comparison_hand_worked():
  readers = _reader_report()
  for group in ('hand', 'all'):
    f1, kappa = readers['groups'][group]['f1'], readers['groups'][group]['kappa']
    expect = {'A': (4 / 7, 6 / 7, 0, 2 / 3), 'B': (4 / 7, 4 / 7, 0, 0),
              'C': (1 / 3, 6 / 7, -1 / 5, 2 / 3)}
    for name, (reader_f1, model_f1, reader_kappa, model_kappa) in expect.items():
      assert f1['per_reader'][name]['reader']['value'] == pytest.approx(reader_f1)
      assert f1['per_reader'][name]['model']['value'] == pytest.approx(model_f1)
      assert f1['per_reader'][name]['difference']['value'] == pytest.approx(model_f1 - reader_f1)
      assert kappa['per_reader'][name]['reader']['value'] == pytest.approx(reader_kappa, abs=1e-15)
      assert kappa['per_reader'][name]['model']['value'] == pytest.approx(model_kappa, abs=1e-15)
    assert f1['readers_mean']['value'] == pytest.approx(31 / 63)
    assert f1['model_mean']['value'] == pytest.approx(16 / 21)
    assert f1['difference']['value'] == pytest.approx(17 / 63)
    assert kappa['readers_mean']['value'] == pytest.approx(-1 / 15)
    assert kappa['model_mean']['value'] == pytest.approx(4 / 9)
    assert kappa['difference']['value'] == pytest.approx(23 / 45)
  assert readers['groups']['wrist']['n_studies'] == 0
  assert readers['groups']['wrist']['f1']['readers_mean']['value'] is None
  versus = readers['versus_labels']
  assert versus['A']['all']['sensitivity']['value'] == 1
  assert versus['A']['all']['specificity']['value'] == 1
  assert versus['C']['hand']['sensitivity']['value'] == pytest.approx(1 / 3)
  assert versus['C']['hand']['specificity']['value'] == pytest.approx(2 / 3)
  normal = _reader_report('normal')
  assert normal['groups']['all']['f1']['per_reader']['A']['reader']['value'] == pytest.approx(0.5)


def test_reader_comparison_cis_equal_a_loop_over_the_same_resamples():
  """Every reader CI against scikit-learn's F1 and kappa on each resample that
  `bootstrap.resample_indices` hands out, majorities by a plain vote, percentiles by numpy."""
  from sklearn.metrics import cohen_kappa_score, f1_score  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  n, names, seed, num_resamples = 90, ('A', 'B', 'C'), 5, 100
  truth = rng.integers(0, 2, n)
  labels = np.where(rng.random((n, 3)) < 0.8, truth[:, None], 1 - truth[:, None])
  model = np.where(rng.random(n) < 0.85, truth, 1 - truth)
  part = rng.choice([metrics.BODY_PARTS.index('hand'), metrics.BODY_PARTS.index('wrist')], n)
  section = readers_lib.reader_comparison(model, truth, part, labels, names,
                                          num_resamples=num_resamples, seed=seed)
  # Reader r's reference: the vote of the other two; a tie (1 against 1) counts abnormal.
  majority = [[int(2 * (labels[i].sum() - labels[i, r]) >= 2) for i in range(n)] for r in range(3)]
  majority = np.asarray(majority)
  scorers = {'f1': f1_score, 'kappa': cohen_kappa_score}
  for group, in_group in (('all', np.ones(n, bool)), ('hand', part == part[0])):
    samples = {(m, who, r): [] for m in scorers for who in ('reader', 'model') for r in range(3)}
    for drawn in bootstrap.resample_indices(seed, n, 0, num_resamples):
      drawn = drawn[in_group[drawn]]  # the group's studies in this resample, repeats and all
      for (m, who, r), values in samples.items():
        predicted = labels[drawn, r] if who == 'reader' else model[drawn]
        values.append(scorers[m](majority[r, drawn], predicted))
    for m in scorers:
      entry = section['groups'][group][m]
      per = {key: np.asarray(v) for key, v in samples.items() if key[0] == m}
      assert all(np.isfinite(v).all() for v in per.values())  # no undefined resample here
      readers_mean = np.mean([per[m, 'reader', r] for r in range(3)], 0)
      model_mean = np.mean([per[m, 'model', r] for r in range(3)], 0)
      expected = {'readers_mean': readers_mean, 'model_mean': model_mean,
                  'difference': model_mean - readers_mean}
      for r, name in enumerate(names):
        expected[name] = per[m, 'model', r] - per[m, 'reader', r]
      for key, values in expected.items():
        got = entry[key] if key in entry else entry['per_reader'][key]['difference']
        low, high = np.percentile(values, [2.5, 97.5])
        # scikit-learn reaches F1 through precision and recall: equal up to rounding.
        assert (got['ci_low'], got['ci_high']) == pytest.approx((low, high), rel=1e-12,
                                                               abs=1e-12), (group, m, key)
        if 'significant' in got:
          assert got['significant'] == bool(low > 0 or high < 0), (group, m, key)


# ---------------------------------------------------------------------------------------------
# Files, bad input and the standalone scorer.


def _write(path, text, newline='\n'):
  path.write_bytes(text.replace('\n', newline).encode())
  return path


@pytest.fixture
def mura_files(tmp_path):
  paths, labels, views = _synthetic_views(2, num_studies=80)
  labels_csv = _write(tmp_path / 'valid_labeled_studies.csv',
                      ''.join(f'{p},{a}\n' for p, a in zip(paths, labels)))
  return tmp_path, paths, labels, views, labels_csv


def test_bad_predictions_one_error_listing_every_kind(mura_files):
  tmp_path, paths, _, _, labels_csv = mura_files
  rows = [f'{p},0.5' for p in paths[3:]]  # studies 0..2 missing
  rows[0] = f'{paths[3]},1.5'  # out of range
  rows[1] = f'{paths[4]},nan'  # NaN
  rows.append(f'{paths[5]},0.2')  # repeats a study
  rows.append('MURA-v1.1/valid/XR_HAND/patient99999/study1_negative/,0.3')  # unknown
  rows.append(f'{paths[6]}')  # malformed
  predictions = _write(tmp_path / 'p.csv', '\n'.join(rows) + '\n')
  with pytest.raises(PredictionsError) as error:
    scorer.score_files(predictions, labels_csv, tmp_path / 'out',
                           options=Options(num_resamples=0))
  assert error.value.counts == {'out_of_range': 1, 'nan': 1, 'duplicate': 1, 'unknown': 1,
                                'malformed': 1, 'missing': 3}
  message = str(error.value)
  assert 'p.csv row 1' in message and '8 problem(s)' in message
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('kind', ['missing', 'unknown', 'out_of_range', 'nan', 'duplicate'])
def test_each_bad_prediction_kind_errors(mura_files, kind):
  tmp_path, paths, _, _, labels_csv = mura_files
  rows = [f'{p},0.5' for p in paths]
  if kind == 'missing':
    rows = rows[1:]
  elif kind == 'unknown':
    rows.append('MURA-v1.1/valid/XR_HAND/patient99999/study1_negative/,0.3')
  elif kind == 'out_of_range':
    rows[2] = f'{paths[2]},-0.1'
  elif kind == 'nan':
    rows[2] = f'{paths[2]},NaN'
  elif kind == 'duplicate':
    rows.append(f'{paths[2].rstrip("/")},0.5')  # the same study, written without the '/'
  predictions = _write(tmp_path / 'p.csv', '\n'.join(rows) + '\n')
  with pytest.raises(PredictionsError) as error:
    prediction_files.read_predictions(predictions, paths)
  assert list(error.value.counts) == [kind]


def test_bad_view_level_predictions(mura_files):
  tmp_path, paths, _, views, labels_csv = mura_files
  rows = [f'{image},{p}' for image, p in zip(views['image'], views['prob'])]
  rows.append(rows[0])  # a view twice
  predictions = _write(tmp_path / 'p.csv', '\n'.join(rows) + '\n')
  with pytest.raises(PredictionsError) as error:
    prediction_files.read_predictions(predictions, paths)
  assert error.value.counts == {'duplicate': 1}
  rows = rows[:-1] + [f'{paths[0]},0.5']  # a study row in a view-level file
  predictions = _write(tmp_path / 'p.csv', '\n'.join(rows) + '\n')
  with pytest.raises(PredictionsError, match='one level per file'):
    prediction_files.read_predictions(predictions, paths)


def test_bad_labels_and_readers(tmp_path):
  good = _study_path('wrist', 1, 1, True)
  cases = {
      'malformed': f'{good},2\n',
      'duplicate': f'{good},1\n{good},1\n',
      'contradiction': f'{good},0\n',  # folder says positive
  }
  for kind, text in cases.items():
    with pytest.raises(LabelsError) as error:
      prediction_files.read_labels(_write(tmp_path / 'l.csv', text))
    assert kind in error.value.counts, kind
  readers = _write(tmp_path / 'r.csv', f'study,A,B\n{good},1,1\n'
                   f'{_study_path("hand", 5, 1, False)},0,0\n')
  with pytest.raises(LabelsError, match='not among the evaluated studies'):
    _evaluate([good], [0.9], [1], readers=prediction_files.read_readers(readers), num_resamples=0)
  with pytest.raises(LabelsError, match='labels 0/1'):
    prediction_files.read_readers(_write(tmp_path / 'r.csv', f'study,A,B\n{good},1,x\n'))


def test_group_without_a_class_has_null_auroc_with_reason():
  rng = np.random.default_rng(0)
  parts = np.repeat(metrics.BODY_PARTS, 20)
  truth = rng.integers(0, 2, parts.size)
  truth[parts == 'humerus'] = 0  # humerus: normal studies only
  paths = [_study_path(p, i, 1, t) for i, (p, t) in enumerate(zip(parts, truth))]
  report = _evaluate(paths, rng.random(parts.size), truth, num_resamples=100)
  auroc = report['groups']['humerus']['metrics']['auroc']
  assert auroc['value'] is None and auroc['ci_low'] is None
  assert 'no abnormal studies' in auroc['reason']
  assert report['groups']['humerus']['metrics']['sensitivity']['value'] is None
  assert report['groups']['humerus']['metrics']['specificity']['value'] is not None
  assert report['groups']['all']['metrics']['auroc']['value'] is not None
  json.dumps(report, allow_nan=False)  # plain JSON, no NaN


def test_studies_are_identified_by_body_part_too():
  # patient 1 study1 exists under two body parts: two studies, not a duplicate.
  paths = [_study_path('hand', 1, 1, True), _study_path('wrist', 1, 1, False)]
  report = _evaluate(paths, [0.9, 0.1], [1, 0], num_resamples=0)
  assert report['num_studies'] == 2
  assert report['groups']['hand']['n_studies'] == 1


def test_worklist_is_the_largest_deprioritisation_keeping_sensitivity():
  rng = np.random.default_rng(3)
  truth = rng.integers(0, 2, 400)
  scores = np.clip(rng.normal(0.3 + 0.4 * truth, 0.2), 0, 1)
  paths = [_study_path(metrics.BODY_PARTS[i % 7], i, 1, t) for i, t in enumerate(truth)]
  work = _evaluate(paths, scores, truth, num_resamples=0)['worklist']
  low = scores <= work['threshold']
  assert work['n_normal_deprioritised'] == (low & (truth == 0)).sum()
  assert work['n_abnormal_deprioritised'] == (low & (truth == 1)).sum()
  assert work['sensitivity']['value'] == (~low & (truth == 1)).sum() / truth.sum() >= 0.95
  # Deprioritising one more study (the next distinct score up) would drop below 0.95.
  next_score = scores[scores > work['threshold']].min()
  assert (scores[truth == 1] > next_score).mean() < 0.95
  assert work['fraction_of_normals']['value'] == pytest.approx(
      work['n_normal_deprioritised'] / (truth == 0).sum())


def test_cli_end_to_end_view_level_with_header_crlf_and_readers(mura_files, caplog):
  tmp_path, paths, labels, views, labels_csv = mura_files
  predictions = _write(
      tmp_path / 'views.csv',
      'image,prob\n' + ''.join(f'{i},{p!r}\n' for i, p in zip(views['image'], views['prob'])),
      newline='\r\n')
  rng = np.random.default_rng(0)
  read = paths[:40]
  reader_labels = np.where(rng.random((40, 5)) < 0.85, labels[:40, None], 1 - labels[:40, None])
  readers = _write(tmp_path / 'readers.csv', 'study,r1,r2,r3,r4,r5\n' + ''.join(
      f'{p},' + ','.join(map(str, row)) + '\n' for p, row in zip(read, reader_labels)))
  out = tmp_path / 'eval' / 'valid'
  code = scorer.main(['--predictions', str(predictions), '--labels', str(labels_csv),
                          '--readers', str(readers), '--bootstrap', '200', '--seed', '1',
                          '--out', str(out), '--split', 'valid'])
  assert code == 0
  assert 'CRLF' in caplog.text and 'header' in caplog.text
  # predictions.csv: the official submission format, header-less, labels file order and paths.
  with open(out / 'predictions.csv', newline='') as f:
    text = f.read()
  assert '\r' not in text
  rows = list(csv.reader(text.splitlines()))
  assert [r[0] for r in rows] == paths and all(r[0].endswith('/') for r in rows)
  assert {r[1] for r in rows} <= {'0', '1'}
  table = pd.read_csv(out / 'study_probabilities.csv')
  assert list(table.columns) == ['study', 'body_part', 'num_views', 'probability',
                                 'predicted_abnormal', 'label', 'worklist_rank']
  expected = views.groupby('study')['prob'].mean()[paths].to_numpy()
  np.testing.assert_allclose(table['probability'], expected, rtol=1e-15)
  assert [int(r[1]) for r in rows] == list((expected > 0.5).astype(int))
  assert sorted(table['worklist_rank']) == list(range(1, len(paths) + 1))
  report = json.loads((out / 'report.json').read_text())
  assert report['score_kind'] == 'probabilities' and report['aggregation'] == 'mean'
  assert list(report['groups']) == list(metrics.GROUPS)
  for section in report['groups'].values():
    for entry in section['metrics'].values():
      assert {'value', 'ci_low', 'ci_high', 'n_studies', 'reason'} <= set(entry)
  assert report['readers']['names'] == ['r1', 'r2', 'r3', 'r4', 'r5']
  assert report['readers']['n_studies'] == 40
  md = (out / 'report.md').read_text()
  assert '| **Aggregate** |' in md and '## Readers' in md
  assert (out / 'roc.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_cli_module_with_hard_labels_and_bad_input(mura_files):
  tmp_path, paths, labels, _, labels_csv = mura_files
  hard = np.where(np.random.default_rng(0).random(len(paths)) < 0.8, labels, 1 - labels)
  # Another root and no trailing '/': still the same studies.
  predictions = _write(tmp_path / 'hard.csv', ''.join(
      f'/data/{p.rstrip("/")},{h}\n' for p, h in zip(paths, hard)))
  out = tmp_path / 'out'
  root = str(pathlib.Path(__file__).resolve().parents[1])  # importable without an install too
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      p for p in (root, os.environ.get('PYTHONPATH')) if p)}
  run = lambda *args: subprocess.run(  # pylint: disable=g-long-lambda
      [sys.executable, '-m', 'mura_jax.evaluation', '--labels', str(labels_csv), '--out',
       str(out), '--bootstrap', '100', *args], capture_output=True, text=True, check=False,
      cwd=root, env=env)
  done = run('--predictions', str(predictions))
  assert done.returncode == 0, done.stderr
  assert 'all' in done.stdout and 'F1' in done.stdout  # the terminal table
  report = json.loads((out / 'report.json').read_text())
  assert report['score_kind'] == 'labels'
  summary = report['groups']['all']['metrics']
  assert summary['auroc']['value'] == pytest.approx(
      (summary['sensitivity']['value'] + summary['specificity']['value']) / 2)
  assert report['operating_points'][0]['threshold'] is None
  assert (out / 'predictions.csv').read_text() == ''.join(
      f'{p},{h}\n' for p, h in zip(paths, hard))
  bad = _write(tmp_path / 'bad.csv', f'{paths[0]},0.5\n')
  done = run('--predictions', str(bad))
  assert done.returncode == 2
  assert 'missing' in done.stderr and 'Traceback' not in done.stderr


@pytest.mark.parametrize('key,value,message', [
    ('bootstrap_resamples', -1, '--config.evaluation.bootstrap_resamples=-1: expected a whole '
                                'number 0 or more (bootstrap resamples; 0: no CIs).'),
    ('threshold', float('nan'), '--config.evaluation.threshold=nan: expected a number from 0 to 1 '
                                '(a study is abnormal if its probability > it).'),
    ('seed', -1, "--config.evaluation.seed=-1: expected a whole number from 0 to 4294967295 (the "
                 "bootstrap's random seed)."),
    ('ensemble', 0, '--config.evaluation.ensemble=0: expected a whole number 1 or more (the number '
                    'of best checkpoints averaged).'),
    ('aggregation', 'median', '--config.evaluation.aggregation=median: expected one of mean, max.'),
    ('tta', 'flips', '--config.evaluation.tta=flips: expected one of none, flip.'),
    ('split', '', '--config.evaluation.split=: empty; give a split of the built dataset '
                  '(validation, train).'),
    ('operating_point', 'worklist', '--config.evaluation.operating_point=worklist: used only with '
     '--config.evaluation.threshold_from (the report.json it is read from); set that too, or '
     'leave operating_point empty.'),
])
def test_check_config_names_the_key_before_any_work(tmp_path, key, value, message):
  """evaluate mode refuses the value with one sentence naming the key, before it reads the
  workdir or the dataset (neither exists here)."""
  from mura_jax.configs import base  # pylint: disable=g-import-not-at-top
  from mura_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  config = base.base_config()
  scoring.check_evaluation_config(config)  # the defaults pass
  config.evaluation[key] = value
  with pytest.raises(ConfigError) as raised:
    evaluate.evaluate_checkpoint(config, str(tmp_path / 'no-workdir'))
  assert str(raised.value) == message


def test_check_config_operating_point_form():
  from mura_jax.configs import base  # pylint: disable=g-import-not-at-top
  from mura_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  config = base.base_config()
  config.evaluation.threshold_from = 'report.json'
  config.evaluation.operating_point = 'specificity@0.9'
  scoring.check_evaluation_config(config)  # a form a report can have: its report says if it has it
  config.evaluation.operating_point = 'specificity@95'
  with pytest.raises(ConfigError, match=r"^--config.evaluation.operating_point=specificity@95: no "
                                        r"operating point 'specificity@95' can exist"):
    scoring.check_evaluation_config(config)
