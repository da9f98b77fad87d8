"""The inference layer: checkpoints kept and restored for inference, the Predictor, and evaluate
mode reproducing the training run's own validation exactly."""

import csv
import functools
import json
import os
import re
import shutil

import numpy as np
import pytest

from mura_jax import checkpoints
from mura_jax.data import images
from mura_jax.data import input_pipeline
from mura_jax.data import preprocessing
from mura_jax.evaluation import evaluate
from mura_jax.evaluation import studies
from mura_jax.inference import predictor as predictor_lib
from mura_jax.inference import steps as inference_steps
from mura_jax.training import train

from test_train import tiny_config


@pytest.fixture(scope='module')
def recorded_run(mura_data_dir, tmp_path_factory):
  """A 3-epoch run whose end-of-epoch validation probabilities are recorded, step by step."""
  workdir = tmp_path_factory.mktemp('recorded')
  config = tiny_config(mura_data_dir, **{'train.num_epochs': 3, 'train.keep_best': 2})
  recorded = []
  real = inference_steps.predict_split

  def recording(step, variables, source, **kwargs):
    out = real(step, variables, source, **kwargs)
    recorded.append({'outputs': out})
    return out

  inference_steps.predict_split = recording
  try:
    summary = train.train_and_evaluate(config, str(workdir))
  finally:
    inference_steps.predict_split = real
  assert summary['status'] == 'done' and len(recorded) == 3
  steps_per_epoch = summary['step'] // 3
  for epoch, entry in enumerate(recorded):
    entry['step'] = steps_per_epoch * (epoch + 1)
  return workdir, config, summary, recorded


def test_evaluate_mode_reproduces_the_training_runs_validation(recorded_run):
  workdir, config, summary, recorded = recorded_run
  by_step = {r['step']: r['outputs'] for r in recorded}
  for which, step in (('latest', summary['step']), ('best', summary['best_step'])):
    config.evaluation.checkpoint = which
    report = evaluate.evaluate_checkpoint(config, str(workdir))
    assert report['checkpoint']['step'] == step
    # The per-view probabilities of evaluate mode are those of the training run's validation
    # of the same checkpoint, exactly; so are the study probabilities it writes.
    predictor = predictor_lib.Predictor.from_workdir(workdir, which, config=config,
                                                 global_batch=config.evaluation.global_batch_size)
    source = input_pipeline.data_source(config.data.data_dir, 'validation')
    np.testing.assert_array_equal(predictor.predict_split(source)['probability'],
                                  by_step[step]['probability'])
    index = input_pipeline.read_split_index(config.data.data_dir, 'validation')
    expected = studies.from_split(index, by_step[step]['probability'])
    with open(workdir / 'eval' / 'validation' / 'study_probabilities.csv') as f:
      written = {row['study']: float(row['probability']) for row in csv.DictReader(f)}
    assert written == dict(zip(expected.paths, expected.probability.tolist()))
    assert report['checkpoint']['weighted_loss'] == pytest.approx(
        float(by_step[step]['loss'].mean()), rel=1e-12)


def test_best_checkpoints_keep_k_and_only_what_inference_needs(recorded_run):
  workdir, config, summary, recorded = recorded_run
  best_steps = sorted(int(p.name) for p in (workdir / 'best').iterdir() if p.name.isdigit())
  losses = {r['step']: float(r['outputs']['loss'].mean()) for r in recorded}
  assert best_steps == sorted(sorted(losses, key=losses.get)[:config.train.keep_best])
  assert summary['best_step'] == min(losses, key=losses.get)
  for step in best_steps:
    items = {p.name for p in (workdir / 'best' / str(step)).iterdir()}
    assert {'variables', 'spec'} <= items and 'state' not in items, items
    spec = json.loads((workdir / 'best' / str(step) / 'spec' / 'metadata').read_text())
    assert spec['model'] == checkpoints.model_signature(config)
    assert spec['preprocessing'] == {'image_size': 32, 'resize': 'squash', 'in_channels': 3}
    assert spec['validation_loss'] == pytest.approx(losses[step])
  # A third of a resumable checkpoint: no Adam moments.
  def size(path):
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file())
  latest = workdir / 'checkpoints' / str(summary['step'])
  assert size(workdir / 'best' / str(best_steps[-1])) < 0.6 * size(latest)
  written = json.loads((workdir / 'config.json').read_text())
  assert written['model']['growth_rate'] == 4 and written['train']['num_epochs'] == 3


def test_predictor_from_the_checkpoint_alone_and_from_files(recorded_run, synthetic_dir):
  workdir, config, summary, recorded = recorded_run
  # Without a config: model and preprocessing from the checkpoint's spec.
  predictor = predictor_lib.Predictor.from_workdir(workdir, 'best', global_batch=8)
  assert predictor.preprocessing == preprocessing.Preprocessing(32, 'squash', 3)
  # The inference network, whoever jits it (CAM's checks do): dense blocks unrolled.
  assert predictor.model.scan_segment == 0
  assert predictor_lib.Predictor.from_workdir(workdir, 'best', config=config,
                                          global_batch=8).model.scan_segment == 0
  index = input_pipeline.read_split_index(config.data.data_dir, 'validation')
  views = [images.read_image(synthetic_dir / p) for p in index.image_path[:13]]
  from_files = predictor.predict_views(views)
  best = {r['step']: r['outputs'] for r in recorded}[summary['best_step']]
  np.testing.assert_allclose(from_files, best['probability'][:13], rtol=0, atol=1e-6)
  study = predictor.study_probabilities(from_files, index.study_index[:13],
                                        int(index.study_index[:13].max()) + 1)
  first = index.study_index[0]
  assert study[first] == pytest.approx(from_files[index.study_index[:13] == first].mean())


def test_a_few_views_run_as_the_smallest_batch_that_holds_them(recorded_run, synthetic_dir,
                                                               monkeypatch):
  """mura-predict's one study: 3 views run as a batch of 4 (the tests' 4 devices), not of 32
  mostly padding; the probabilities are the full batch's."""
  assert [inference_steps.fitted_batch(n, 32, 4) for n in (1, 3, 4, 5, 9, 17, 40)] == [
      4, 4, 4, 8, 16, 32, 32]
  assert [inference_steps.fitted_batch(n, 6, 2) for n in (1, 3, 5, 7)] == [2, 4, 6, 6]
  workdir, config, _, _ = recorded_run
  predictor = predictor_lib.Predictor.from_workdir(workdir, 'best', global_batch=32)
  index = input_pipeline.read_split_index(config.data.data_dir, 'validation')
  views = [images.read_image(synthetic_dir / p) for p in index.image_path[:3]]
  real, batches = inference_steps.predict_split, []

  def spying(step, variables, source, **kwargs):
    batches.append(kwargs['global_batch'])
    return real(step, variables, source, **kwargs)
  monkeypatch.setattr(inference_steps, 'predict_split', spying)
  fitted = predictor.predict_views(views)
  with_maps, _ = predictor.predict_views_and_maps(views)
  assert batches == [4, 4]
  full = real(inference_steps.compile_predict_step(predictor.model, 3, predictor.mesh),
              predictor.variables, inference_steps.ViewSource(views), mesh=predictor.mesh,
              global_batch=32, preprocessing=predictor.preprocessing)['probability']
  np.testing.assert_allclose(fitted, full, rtol=0, atol=1e-6)
  np.testing.assert_allclose(with_maps, full, rtol=0, atol=1e-6)


def test_checkpoint_errors(recorded_run, tmp_path):
  workdir, config, summary, _ = recorded_run
  other = tiny_config(config.data.data_dir, **{'model.growth_rate': 6})
  with pytest.raises(checkpoints.CheckpointMismatchError, match='growth_rate'):
    predictor_lib.Predictor.from_workdir(workdir, 'best', config=other)
  with pytest.raises(checkpoints.CheckpointNotFoundError, match='train first'):
    predictor_lib.Predictor.from_workdir(tmp_path, 'best')
  with pytest.raises(checkpoints.CheckpointNotFoundError, match='No checkpoint at step 99999'):
    checkpoints.choose(workdir, 99999)
  with pytest.raises(ValueError, match="'best', 'latest' or a step"):
    checkpoints.choose(workdir, 'newest')
  assert checkpoints.choose(workdir, 'latest') == ('checkpoints', summary['step'])
  # A checkpoint written by a newer mura-jax is refused, not misread.
  copy = tmp_path / 'copy'
  shutil.copytree(workdir / 'best', copy / 'best')
  metadata = copy / 'best' / str(summary['best_step']) / 'spec' / 'metadata'
  metadata.write_text(json.dumps({**json.loads(metadata.read_text()), 'spec_version': 99}))
  with pytest.raises(checkpoints.CheckpointMismatchError, match='newer than this mura-jax'):
    predictor_lib.Predictor.from_workdir(copy, summary['best_step'])


# ------------------------------------------------------------------------------------------------
# How the inference steps are compiled: the unrolled network, XLA:CPU's own convolutions.

SCANNED = dict(growth_rate=4, block_config=(3, 2), num_init_features=8, bn_size=2, num_classes=1,
               scan_segment=2)


def _computations_calling_convolutions(hlo: str) -> dict[str, list[str]]:
  """Compiled HLO text -> {computation holding a convolution: the instructions that call it}."""
  holders, calls, current = set(), {}, None
  for line in hlo.splitlines():
    header = re.match(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if header:
      current = header.group(1)
    elif ' convolution(' in line:
      holders.add(current)
    for callee in re.findall(r'calls=%?([\w.\-]+)', line):
      calls.setdefault(callee, []).append(line.strip().split(' = ')[0])
  return {h: calls.get(h, []) for h in holders}


def test_inference_compiles_the_unrolled_network_with_the_same_results():
  import jax  # pylint: disable=g-import-not-at-top
  from mura_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  from mura_jax.models import densenet  # pylint: disable=g-import-not-at-top
  model = densenet.DenseNet(**SCANNED)
  assert inference_steps.inference_network(model).scan_segment == 0
  assert inference_steps.inference_network(model).clone(scan_segment=2) == model
  variables = densenet.init_variables(model, jax.random.key(0), 32, in_channels=1)
  mesh = parallel.make_mesh()
  rs = np.random.RandomState(0)
  n = mesh.devices.size * 2
  batch = parallel.global_batch(
      {'image': rs.randint(0, 256, (n, 32, 32, 1)).astype(np.uint8),
       'index': np.arange(n, dtype=np.int32), 'mask': np.ones(n, np.float32)}, mesh)
  step = inference_steps.compile_predict_step(model, 1, mesh)
  assert 'while' not in step.lower(variables, batch).compile().as_text()  # no scan's loop
  scanned = jax.jit(functools.partial(inference_steps.predict_step, model=model, in_channels=1))
  np.testing.assert_allclose(np.asarray(step(variables, batch)['probability']),
                             np.asarray(scanned(variables, batch)['probability']), atol=1e-6)
  maps = inference_steps.compile_map_step(model, 1, mesh)(variables, batch)
  np.testing.assert_allclose(np.asarray(maps['probability']),
                             np.asarray(scanned(variables, batch)['probability']), atol=1e-6)


def _ynn_convolutions(hlo: str) -> list[str]:
  """The instructions of compiled HLO that run a convolution inside a YNNPACK fusion."""
  return [c for callers in _computations_calling_convolutions(hlo).values() for c in callers
          if 'ynn' in c]


def test_cpu_runs_convolutions_on_xlas_own_kernels(monkeypatch):
  """parallel.use_xla_cpu_convolutions (main.py, mura-predict and this suite call it): no
  convolution of the compiled steps goes to YNNPACK, where this jaxlib sends them by default."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  from mura_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  from mura_jax.models import densenet  # pylint: disable=g-import-not-at-top
  if not jaxlib.version.__version__.startswith(parallel.CPU_CONVOLUTION_JAXLIBS):
    pytest.skip(f'the flag is set for jaxlib {parallel.CPU_CONVOLUTION_JAXLIBS} only')
  assert parallel.CPU_CONVOLUTION_FLAG in os.environ['XLA_FLAGS']
  mesh = parallel.make_mesh()
  model = densenet.DenseNet(**SCANNED)
  variables = densenet.init_variables(model, jax.random.key(0), 32, in_channels=1)
  n = mesh.devices.size
  batch = parallel.global_batch(
      {'image': np.full((n, 32, 32, 1), 7, np.uint8), 'index': np.arange(n, dtype=np.int32),
       'mask': np.ones(n, np.float32)}, mesh)
  hlo = inference_steps.compile_predict_step(model, 1, mesh).lower(variables, batch).compile().as_text()
  assert _computations_calling_convolutions(hlo), 'the compiled step has no convolution'
  assert not _ynn_convolutions(hlo)
  # The check sees YNNPACK's convolutions where they are asked for.
  ynn = jax.jit(functools.partial(inference_steps.predict_step, model=model, in_channels=1),
                compiler_options={'xla_cpu_experimental_ynn_fusion_type':
                                  'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'})
  assert _ynn_convolutions(ynn.lower(variables, batch).compile().as_text())

  # When it adds the flag: not over the user's XLA_FLAGS naming it, not once JAX has started.
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: False)
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  assert parallel.use_xla_cpu_convolutions(env)
  assert env['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=2 ' +
                              parallel.CPU_CONVOLUTION_FLAG)
  assert not parallel.use_xla_cpu_convolutions(env)  # already there
  mine = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type='}
  assert not parallel.use_xla_cpu_convolutions(mine) and mine['XLA_FLAGS'].endswith('=')
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: True)
  assert not parallel.use_xla_cpu_convolutions({})
