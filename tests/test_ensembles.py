"""Body-part subsets, ensembles (K best of a run, several runs, body-part models) and flip TTA,
trained and evaluated end to end on the synthetic MURA."""

import csv
import json
import shutil
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mura_jax import checkpoints
from mura_jax.data import input_pipeline
from mura_jax.evaluation import ensembles
from mura_jax.evaluation import evaluate
from mura_jax.inference import predictor as predictor_lib
from mura_jax.inference import steps as inference_steps
from mura_jax.training import loss
from mura_jax.training import state as train_state
from mura_jax.training import train

from test_train import tiny_config

TWO_PARTS = ('humerus', 'wrist')


@pytest.fixture(scope='module')
def two_part_data_dir(synthetic_dir, tmp_path_factory):
  """A TFDS `mura` built from the synthetic tree with only humerus and wrist studies in its CSVs
  (as a user's own data might lack body parts)."""
  from tfds_mura import build  # pylint: disable=g-import-not-at-top
  manual = tmp_path_factory.mktemp('two_parts')
  shutil.copytree(synthetic_dir / 'MURA-v1.1', manual / 'MURA-v1.1')
  for name in ('train_image_paths', 'train_labeled_studies', 'valid_image_paths',
               'valid_labeled_studies'):
    path = manual / 'MURA-v1.1' / f'{name}.csv'
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(''.join(l for l in lines if '/XR_HUMERUS/' in l or '/XR_WRIST/' in l))
  data_dir = tmp_path_factory.mktemp('two_parts_tfds')
  build.build(str(manual), str(data_dir), num_workers=2)
  return manual, data_dir


@pytest.fixture(scope='module')
def two_part_run(two_part_data_dir, tmp_path_factory):
  _, data_dir = two_part_data_dir
  workdir = tmp_path_factory.mktemp('two_part_run')
  config = tiny_config(data_dir, **{'train.num_epochs': 1})
  assert train.train_and_evaluate(config, str(workdir))['status'] == 'done'
  return workdir, config


@pytest.fixture(scope='module')
def five_epoch_run(mura_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('five_epochs')
  config = tiny_config(mura_data_dir, **{'train.num_epochs': 5, 'train.checkpoint_every_steps': 0})
  assert train.train_and_evaluate(config, str(workdir))['status'] == 'done'
  return workdir, config


def test_a_dataset_of_two_body_parts_trains_and_evaluates(two_part_data_dir, two_part_run):
  manual, data_dir = two_part_data_dir
  workdir, config = two_part_run
  recorded = json.loads((workdir / 'config.json').read_text())
  assert recorded['data']['body_parts'] == 'humerus,wrist'
  name, step = checkpoints.choose(workdir, 'best')
  assert checkpoints.read_spec(workdir, name, step)['body_parts'] == list(TWO_PARTS)
  # The paper's weights for the two parts, from the CSV's image counts; the others weigh 0.
  weights = loss.dataset_loss_weights(str(data_dir), TWO_PARTS)
  rows = (manual / 'MURA-v1.1' / 'train_image_paths.csv').read_text().split()
  for t, part in enumerate(train.BODY_PARTS):
    views = [r for r in rows if f'/XR_{part.upper()}/' in r]
    abnormal, normal = sum('_positive/' in r for r in views), sum('_negative/' in r for r in views)
    expected = [abnormal / (abnormal + normal), normal / (abnormal + normal)] if views else [0, 0]
    np.testing.assert_allclose(weights[t], expected, rtol=1e-6, err_msg=part)
  report = evaluate.evaluate_checkpoint(config, str(workdir))
  assert list(report['groups']) == ['humerus', 'wrist', 'all']  # only the evaluated groups
  assert report['num_studies'] == report['groups']['humerus']['n_studies'] + \
      report['groups']['wrist']['n_studies']


def test_a_requested_body_part_without_training_images_is_an_error(two_part_data_dir, tmp_path):
  _, data_dir = two_part_data_dir
  config = tiny_config(data_dir, **{'data.body_parts': 'humerus,elbow'})
  with pytest.raises(ValueError, match=r'asks for elbow, .* no elbow images') as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert '\n' not in str(error.value)
  with pytest.raises(ValueError, match='unknown one'):
    train.train_and_evaluate(tiny_config(data_dir, **{'data.body_parts': 'knee'}), str(tmp_path))


def _csv_rows(path):
  with open(path, encoding='utf-8') as f:
    return list(csv.DictReader(f))


def test_body_parts_of_the_full_dataset_train_only_those_parts(mura_data_dir, synthetic_dir,
                                                               tmp_path, monkeypatch):
  """data.body_parts=humerus,wrist on the full synthetic MURA (all seven parts): the other parts
  weigh 0 in the loss, every training batch holds only those parts' views, an epoch has the
  steps their views fill, and the reports score only their groups."""
  config = tiny_config(mura_data_dir, **{'data.body_parts': 'humerus,wrist',
                                         'train.num_epochs': 1,
                                         'evaluation.bootstrap_resamples': 0})
  real_compile, seen = train_state.compile_steps, {'weights': [], 'parts': []}

  def recording(config_, model, loss_weights, mesh, *args, **kwargs):
    seen['weights'].append(np.asarray(loss_weights))
    steps = real_compile(config_, model, loss_weights, mesh, *args, **kwargs)
    real_train = steps.train

    def train_step(state, batch):
      seen['parts'].append(np.asarray(jax.device_get(batch['body_part'])))
      return real_train(state, batch)
    train_step.lower = real_train.lower  # compiled ahead of the first batch, as the real one
    steps.train = train_step
    return steps

  monkeypatch.setattr(train_state, 'compile_steps', recording)
  summary = train.train_and_evaluate(config, str(tmp_path))
  # The expectations from the tree's CSVs, which hold all seven parts.
  mura = synthetic_dir / 'MURA-v1.1'
  rows = (mura / 'train_image_paths.csv').read_text().split()
  assert {r.split('/')[2] for r in rows} == {f'XR_{p.upper()}' for p in train.BODY_PARTS}
  (weights,) = seen['weights']
  for t, part in enumerate(train.BODY_PARTS):
    views = [r for r in rows if f'/XR_{part.upper()}/' in r] if part in TWO_PARTS else []
    abnormal, normal = sum('_positive/' in r for r in views), sum('_negative/' in r for r in views)
    expected = [abnormal / (abnormal + normal), normal / (abnormal + normal)] if views else [0, 0]
    np.testing.assert_allclose(weights[t], expected, rtol=1e-6, atol=0, err_msg=part)
  # Batches of 8 views of the two parts only; the last partial batch is left out.
  num_views = sum(f'/XR_{p.upper()}/' in r for r in rows for p in TWO_PARTS)
  assert summary['step'] == len(seen['parts']) == num_views // 8
  parts = np.concatenate(seen['parts'])
  assert {train.BODY_PARTS[p] for p in parts} == set(TWO_PARTS) and parts.size == 8 * summary['step']
  # The epoch's metrics and evaluate mode: only those groups, only their validation studies.
  epoch, = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()
            if 'validation_loss' in l]
  assert {k.split('/')[1] for k in epoch if k.startswith('auroc/')} == {*TWO_PARTS, 'all'}
  report = evaluate.evaluate_checkpoint(config, str(tmp_path))
  assert list(report['groups']) == [*TWO_PARTS, 'all']
  valid = (mura / 'valid_labeled_studies.csv').read_text().split()
  assert report['num_studies'] == sum(f'/XR_{p.upper()}/' in r for r in valid for p in TWO_PARTS)


def test_five_best_ensemble_end_to_end_with_its_paired_comparison(five_epoch_run):
  workdir, config = five_epoch_run
  single = evaluate.evaluate_checkpoint(evaluate.single_checkpoint(config), str(workdir))
  config = tiny_config(config.data.data_dir, **{'evaluation.ensemble': 5,
                                                'evaluation.bootstrap_resamples': 100})
  report = evaluate.evaluate_checkpoint(config, str(workdir))
  members = report['ensemble']['members']
  assert report['ensemble']['num_members'] == 5 and report['ensemble']['order'] == 'views'
  losses = [m['validation_loss'] for m in members]
  assert losses == sorted(losses) and members[0]['checkpoint']['step'] == single['checkpoint']['step']
  for member in members:  # each member scored alone, with CIs
    assert member['groups']['all']['metrics']['auroc']['ci_low'] is not None
  # Member 0 alone is the single-checkpoint evaluation; the comparison's B is that model.
  compared = report['comparison']
  assert compared['a'] == 'ensemble of 5' and compared['b'].startswith('single best')
  assert compared['groups']['all']['kappa']['b']['value'] == pytest.approx(
      single['groups']['all']['metrics']['kappa']['value'], abs=1e-12)
  assert compared['groups']['all']['kappa']['a']['value'] == pytest.approx(
      report['groups']['all']['metrics']['kappa']['value'], abs=1e-12)
  assert compared['groups']['all']['auroc']['difference']['ci_low'] is not None
  out = workdir / 'eval' / 'validation-ensemble'
  md = (out / 'report.md').read_text()
  assert '## Ensemble of 5' in md and '## Paired comparison: ensemble of 5 - single best' in md
  assert json.loads((workdir / 'eval' / 'validation' / 'report.json').read_text())['checkpoint']
  # An ensemble of more checkpoints than were kept: one sentence saying so.
  with pytest.raises(checkpoints.CheckpointNotFoundError, match='fewer than the 6 asked for'):
    evaluate.evaluate_checkpoint(tiny_config(config.data.data_dir,
                                               **{'evaluation.ensemble': 6}), str(workdir))


def _member_views(data_dir, workdir, step):
  """A member's probabilities of every validation view, through the inference API alone."""
  predictor = predictor_lib.Predictor.from_workdir(workdir, step, global_batch=16)
  source = input_pipeline.data_source(str(data_dir), 'validation')
  return np.asarray(predictor.predict_split(source, progress=False)['probability'], np.float64)


def _views_by_study(data_dir):
  index = input_pipeline.read_split_index(str(data_dir), 'validation')
  views = {}
  for v, s in enumerate(index.study_index):
    views.setdefault(f'MURA-v1.1/{index.studies[s]}/', []).append(v)
  return views


# A member's view probabilities through the Predictor are evaluate mode's bit for bit (as
# test_inference shows for one checkpoint); only the float64 combination's summation order
# differs here (statistics.fmean against numpy's sums): 1e-12. Members differ by 1e-4 and more
# (asserted), so the combination is told from any one member.
MEMBER_ATOL = 1e-12
APART = 1e-4


def test_ensemble_probabilities_combine_its_members(five_epoch_run):
  """study_probabilities.csv of a 3-best ensemble against the members recomputed one by one
  through predictor_lib.Predictor and combined by a plain loop, in both orders."""
  workdir, config = five_epoch_run
  data_dir = config.data.data_dir
  epochs = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()
            if 'validation_loss' in l]
  best3 = [r['step'] for r in sorted(epochs, key=lambda r: r['validation_loss'])[:3]]
  members = [_member_views(data_dir, workdir, step) for step in best3]
  views_of = _views_by_study(data_dir)
  combined = {}
  for order, aggregation in (('views', 'mean'), ('views', 'max'), ('studies', 'max')):
    run = tiny_config(data_dir, **{'evaluation.ensemble': 3, 'evaluation.ensemble_order': order,
                                   'evaluation.aggregation': aggregation,
                                   'evaluation.bootstrap_resamples': 0})
    report = evaluate.evaluate_checkpoint(run, str(workdir))
    assert [m['checkpoint']['step'] for m in report['ensemble']['members']] == best3
    aggregate = statistics.fmean if aggregation == 'mean' else max
    written = {r['study']: float(r['probability']) for r in _csv_rows(
        workdir / 'eval' / 'validation-ensemble' / 'study_probabilities.csv')}
    assert written.keys() == views_of.keys()
    for study, views in views_of.items():
      if order == 'views':  # each view: the mean over the members; then the study's views
        expected = aggregate([statistics.fmean(m[v] for m in members) for v in views])
      else:  # each member's study probability; then the mean over the members
        expected = statistics.fmean(aggregate(m[v] for v in views) for m in members)
      assert written[study] == pytest.approx(expected, abs=MEMBER_ATOL), (order, study)
    combined[order, aggregation] = written
  first = {s: statistics.fmean(members[0][v] for v in views) for s, views in views_of.items()}
  assert max(abs(combined['views', 'mean'][s] - first[s]) for s in first) > APART
  # With max the orders differ (max of means vs mean of maxima): both were told apart.
  assert max(abs(combined['views', 'max'][s] - combined['studies', 'max'][s])
             for s in first) > APART


def test_three_seed_ensemble_and_a_body_part_model(mura_data_dir, five_epoch_run, two_part_run,
                                                  tmp_path):
  workdir, _ = five_epoch_run
  seeds = []
  for seed in (1, 2):
    seeds.append(tmp_path / f'seed{seed}')
    config = tiny_config(mura_data_dir, **{'seed': seed, 'train.num_epochs': 1})
    assert train.train_and_evaluate(config, str(seeds[-1]))['status'] == 'done'
  config = tiny_config(mura_data_dir, **{'evaluation.workdirs': ','.join(map(str, seeds)),
                                         'evaluation.bootstrap_resamples': 50})
  report = evaluate.evaluate_checkpoint(config, str(workdir))
  names = [m['name'] for m in report['ensemble']['members']]
  assert len(names) == 3 and names[1].startswith('seed1 ') and names[2].startswith('seed2 ')
  assert report['comparison']['b'] == f'single best ({names[0]})'
  assert list(report['groups']) == list(train.BODY_PARTS) + ['all']
  # One run against another, in evaluate mode: the other's best checkpoint on the same views.
  config = tiny_config(mura_data_dir, **{'evaluation.compare': str(seeds[0]),
                                         'evaluation.bootstrap_resamples': 20})
  report = evaluate.evaluate_checkpoint(config, str(workdir))
  assert report['comparison']['b'].startswith('seed1 step') and 'ensemble' not in report
  assert report['comparison']['groups']['all']['auroc']['difference']['ci_low'] is not None

  # The humerus + wrist model scores only those studies; the others come from the full model.
  body_part_model, _ = two_part_run
  config = tiny_config(mura_data_dir, **{'evaluation.workdirs': str(body_part_model),
                                         'evaluation.bootstrap_resamples': 0})
  report = evaluate.evaluate_checkpoint(config, str(workdir))
  full, partial = report['ensemble']['members']
  assert partial['body_parts'] == list(TWO_PARTS)
  assert list(partial['groups']) == ['humerus', 'wrist', 'all']
  assert partial['groups']['all']['n_studies'] == (report['groups']['humerus']['n_studies'] +
                                                   report['groups']['wrist']['n_studies'])
  assert full['groups']['all']['n_studies'] == report['num_studies']
  assert report['comparison']['n_studies'] == report['num_studies']
  # Its probabilities: humerus and wrist studies the mean of the two models' (views order, mean
  # aggregation: the mean of the two study means), every other study the full model's alone.
  views_of = _views_by_study(mura_data_dir)
  full_views = _member_views(mura_data_dir, workdir, full['checkpoint']['step'])
  partial_views = _member_views(mura_data_dir, body_part_model, partial['checkpoint']['step'])
  written = {r['study']: float(r['probability']) for r in _csv_rows(
      workdir / 'eval' / 'validation-ensemble' / 'study_probabilities.csv')}
  assert written.keys() == views_of.keys()
  differ = 0
  for study, views in views_of.items():
    alone = statistics.fmean(full_views[v] for v in views)
    if study.split('/')[2] in ('XR_HUMERUS', 'XR_WRIST'):
      other = statistics.fmean(partial_views[v] for v in views)
      expected = (alone + other) / 2
      differ += abs(expected - alone) > APART
    else:
      expected = alone
    assert written[study] == pytest.approx(expected, abs=MEMBER_ATOL), study
  assert differ, 'the body-part model moved its studies'


def test_ensemble_orders_and_coverage():
  index = input_pipeline.SplitIndex(
      studies=('valid/XR_WRIST/patient1/study1_positive', 'valid/XR_HAND/patient2/study1_negative'),
      study_index=np.array([0, 0, 1]), label=np.array([1, 1, 0]), body_part=np.array([6, 6, 3]),
      image_path=('a', 'b', 'c'))
  # Two members on the wrist views, one on the hand view.
  probability = np.array([[0.2, 0.6, 0.1], [0.4, 1.0, np.nan]])
  views = ensembles.combine(probability, index, 'views')
  by_study = ensembles.combine(probability, index, 'studies')
  np.testing.assert_allclose(views.probability, [0.55, 0.1], rtol=1e-15)
  np.testing.assert_allclose(by_study.probability, views.probability, rtol=1e-15)  # mean: equal
  # With max aggregation the order matters: max of means vs mean of maxima.
  np.testing.assert_allclose(ensembles.combine(probability, index, 'views', 'max').probability,
                             [0.8, 0.1])
  np.testing.assert_allclose(ensembles.combine(probability, index, 'studies', 'max').probability,
                             [0.8, 0.1])
  probability[1, :2] = [0.9, 0.3]
  assert ensembles.combine(probability, index, 'views', 'max').probability[0] == pytest.approx(
      max(0.55, 0.45))
  assert ensembles.combine(probability, index, 'studies', 'max').probability[0] == pytest.approx(
      (0.6 + 0.9) / 2)
  with pytest.raises(ValueError, match='covered by no ensemble member'):
    ensembles.combine(np.array([[0.2, 0.6, np.nan]]), index)
  with pytest.raises(ValueError, match='ensemble_order'):
    ensembles.combine(probability, index, 'members')


def test_flip_tta_averages_a_view_and_its_mirror_on_device(two_part_run):
  workdir, config = two_part_run
  predictor = predictor_lib.Predictor.from_workdir(workdir, 'best', config=config, global_batch=8)
  model, variables = predictor.model, predictor.variables
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 1)), jnp.uint8)
  batch = {'image': images, 'index': jnp.arange(8), 'mask': jnp.ones(8), 'label': jnp.ones(8),
           'body_part': jnp.full(8, 6)}
  plain = jax.nn.sigmoid(inference_steps.view_logits(variables, images, model=model, in_channels=3))
  mirror = jax.nn.sigmoid(inference_steps.view_logits(variables, images[:, :, ::-1], model=model,
                                                in_channels=3))
  weights = loss.dataset_loss_weights(config.data.data_dir, TWO_PARTS)
  out = inference_steps.predict_step(variables, batch, model=model, in_channels=3, tta='flip',
                               loss_weights=weights)
  np.testing.assert_allclose(out['probability'], (plain + mirror) / 2, rtol=1e-5, atol=1e-7)
  expected_loss = -weights[6, 1] * np.log((plain + mirror) / 2)
  np.testing.assert_allclose(out['loss'], expected_loss, rtol=1e-4)
  assert not np.allclose(plain, mirror)  # the mirror is another input
  # Through evaluate mode: its own folder, and the report says so.
  config = tiny_config(config.data.data_dir, **{'evaluation.tta': 'flip',
                                                'evaluation.bootstrap_resamples': 0})
  report = evaluate.evaluate_checkpoint(config, str(workdir))
  assert report['tta'] == 'flip' and (workdir / 'eval' / 'validation-flip' / 'report.json').exists()
  with pytest.raises(ValueError, match='tta'):
    inference_steps.predict_step(variables, batch, model=model, in_channels=3, tta='rotate')
