"""Export: the jax.export artifact in a process with jax alone, the torchvision state dict, the
SavedModel, the model card, mura-predict --model, and the export's errors."""

import csv
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from mura_jax import checkpoints
from mura_jax.data import preprocessing
from mura_jax.inference import display_scale
from mura_jax.inference import exported as exported_lib
from mura_jax.inference import predictor as predictor_lib
from mura_jax.inference import steps as inference_steps
from mura_jax.interpretation import maps as maps_lib
from mura_jax.interpretation import pictures
from mura_jax.serving import export
from mura_jax.serving import predict

from test_train import tiny_config

_JAX_ALONE = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('mura_jax', 'flax', 'tfds_mura', 'tensorflow', 'torch'):
      raise ImportError(f'{name} must not be needed')
sys.meta_path.insert(0, Blocked())
import numpy as np
from jax import export
model = export.deserialize(open(sys.argv[1], 'rb').read())
probability, cam = model.call(np.load(sys.argv[2]))
np.save(sys.argv[3], np.asarray(probability))
np.save(sys.argv[4], np.asarray(cam))
print(sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'mura_jax')))
"""


@pytest.fixture(scope='module')
def exported(trained_workdir, tmp_path_factory):
  workdir, config = trained_workdir
  folder = tmp_path_factory.mktemp('export') / 'export'
  manifest = export.export(workdir, 'best', folder, config=config)
  predictor = predictor_lib.Predictor.from_workdir(workdir, 'best', config=config)
  rng = np.random.default_rng(0)
  views = [rng.integers(0, 256, (int(rng.integers(40, 90)), int(rng.integers(40, 90)), 1),
                        dtype=np.uint8) for _ in range(5)]  # 5: a batch size never exported
  fitted = np.stack([preprocessing.view_input(v, predictor.preprocessing) for v in views])
  return folder, manifest, predictor, views, fitted


def test_jax_export_runs_with_jax_alone(exported, tmp_path):
  folder, manifest, predictor, views, fitted = exported
  np.save(tmp_path / 'in.npy', fitted)
  out = subprocess.run([sys.executable, '-c', _JAX_ALONE, str(folder / 'model.jax_export'),
                        str(tmp_path / 'in.npy'), str(tmp_path / 'p.npy'), str(tmp_path / 'm.npy')],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith('[]')  # neither flax nor mura_jax was loaded
  live, maps = predictor.predict_views_and_maps(views)
  np.testing.assert_allclose(np.load(tmp_path / 'p.npy'), live, atol=1e-5)
  np.testing.assert_allclose(np.load(tmp_path / 'm.npy'), maps, atol=1e-4)
  sidecar = json.loads((folder / 'model.jax_export.json').read_text())
  assert sidecar['platforms'] == ['cpu', 'cuda', 'tpu']
  assert sidecar['input']['shape'] == ['batch', 32, 32, 1]
  assert sidecar['sha256'] == manifest['files']['model.jax_export']


def test_safetensors_load_strictly_into_torchvision(exported):
  folder, manifest, predictor, views, fitted = exported
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  state = safetensors.torch.load_file(str(folder / 'model.safetensors'))
  assert any(k.endswith('num_batches_tracked') for k in state)
  args = manifest['torchvision']
  net = torchvision.models.DenseNet(growth_rate=args['growth_rate'],
                                    block_config=tuple(args['block_config']),
                                    num_init_features=args['num_init_features'],
                                    bn_size=args['bn_size'], num_classes=args['num_classes'])
  net.load_state_dict(state, strict=True)
  net.eval()
  x = np.asarray(preprocessing.normalize(fitted, 3)).transpose(0, 3, 1, 2)
  with torch.no_grad():
    logits = net(torch.from_numpy(np.ascontiguousarray(x))).numpy()[:, 0]
  live = predictor.predict_views(views)
  np.testing.assert_allclose(logits, np.log(live / (1 - live)), atol=1e-4)


def test_safetensors_load_back_into_flax(exported):
  folder, _, predictor, _, fitted = exported
  from mura_jax.models import weights  # pylint: disable=g-import-not-at-top
  variables = weights.load_torchvision(folder / 'model.safetensors', arch=predictor.model)
  logits = inference_steps.view_logits(variables, fitted, model=predictor.model, in_channels=3)
  live = inference_steps.view_logits(predictor.variables, fitted, model=predictor.model, in_channels=3)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(live), atol=1e-5)


def test_saved_model_matches(exported):
  folder, manifest, predictor, views, fitted = exported
  tf = pytest.importorskip('tensorflow')
  assert manifest['saved_model']['written'], manifest['saved_model']
  assert manifest['saved_model']['tensorflow_version'] == tf.__version__
  serve = tf.saved_model.load(str(folder / 'saved_model')).signatures['serving_default']
  out = serve(images=tf.constant(fitted))
  np.testing.assert_allclose(out['probability'].numpy(), predictor.predict_views(views), atol=1e-5)


def test_saved_model_is_written_in_stablehlo_tensorflow_reads():
  """jax 0.12 writes StableHLO 1.18 by default, which TensorFlow 2.21 (1.13.7) cannot read: the
  SavedModel is serialized for the older of the two versions, and jax's choice comes back after."""
  pytest.importorskip('tensorflow')
  from jax._src.lib.mlir.dialects import hlo  # pylint: disable=g-import-not-at-top
  from tensorflow.compiler.mlir.stablehlo import stablehlo  # pylint: disable=g-import-not-at-top
  week_4 = hlo.StablehloCompatibilityRequirement.WEEK_4
  jax_choice = hlo.get_version_from_compatibility_requirement(week_4)
  with export._stablehlo_for_tensorflow() as version:  # pylint: disable=protected-access
    assert version == stablehlo.get_current_version()
    chosen = hlo.get_version_from_compatibility_requirement(week_4)
    assert chosen == hlo.get_smaller_version(jax_choice, version)
    assert hlo.get_smaller_version(chosen, version) == chosen  # never newer than TF reads
  assert hlo.get_version_from_compatibility_requirement(week_4) == jax_choice


def test_saved_model_tensorflow_cannot_run_is_left_out_and_said(trained_workdir, tmp_path,
                                                                monkeypatch, capsys):
  """A SavedModel that this TensorFlow cannot run (as jax 0.12's was for TF 2.21 before the
  StableHLO version was chosen) is not kept; export.json and the printed line say why, and the
  other files are complete."""
  tf = pytest.importorskip('tensorflow')
  workdir, config = trained_workdir
  message = ("Graph execution error:\nCannot deserialize computation: unregistered operation "
             "'vhlo.custom_call_v2' found in dialect ('vhlo')")

  def load(path):
    raise tf.errors.InvalidArgumentError(None, None, message)
  monkeypatch.setattr(tf.saved_model, 'load', load)
  config = config.copy_and_resolve_references()  # the session's config stays as it is
  config.export.dir = str(tmp_path / 'out')
  manifest = export.run(config, workdir)
  saved = manifest['saved_model']
  assert not saved['written'] and 'custom_call_v2' in saved['reason']
  assert f'TensorFlow {tf.__version__} cannot run' in saved['reason']
  assert not (tmp_path / 'out' / 'saved_model').exists()
  assert 'model.jax_export' in manifest['files'] and 'model.safetensors' in manifest['files']
  printed = capsys.readouterr().out
  assert 'no saved_model/' in printed and 'custom_call_v2' in printed


def test_saved_model_check_compares_with_jax(exported):
  """The check after saving: None for the SavedModel as written; a sentence naming the output
  when TensorFlow's results differ from jax's (here jax's probability moved by 0.01)."""
  tf = pytest.importorskip('tensorflow')
  folder, _, predictor, _, _ = exported
  serve = export.serving_function(predictor.model, predictor.preprocessing)
  size = predictor.preprocessing.image_size
  path = str(folder / 'saved_model')
  variables = predictor.variables
  check = export._saved_model_problem  # pylint: disable=protected-access
  assert check(tf, path, serve, variables, size) is None

  def moved(params, images):
    probability, cam = serve(params, images)
    return probability + 0.01, cam
  problem = check(tf, path, moved, variables, size)
  assert problem.startswith(f'TensorFlow {tf.__version__} computes another probability')


def test_model_card_says_what_a_user_needs(exported):
  folder, _, _, _, _ = exported
  card = (folder / 'model_card.md').read_text()
  for words in ('Intended use', 'not a diagnosis', 'ImageNet mean', 'parameters',
                '| all |', 'kappa 0.705', 'Limitations', 'Licence', 'synthetic'):
    assert words.lower() in card.lower(), words
  data = json.loads((folder / 'model_card.json').read_text())
  assert data['validation']['groups']['all']['auroc']['ci_low'] is not None
  assert set(json.loads((folder / 'export.json').read_text())['files']) >= {
      'model.jax_export', 'model.jax_export.json', 'model.safetensors', 'model_card.md'}


def test_mura_predict_from_the_export(exported, trained_workdir, synthetic_dir, capsys,
                                      tmp_path):
  folder, _, _, _, _ = exported
  workdir, _ = trained_workdir
  studies = synthetic_dir / 'MURA-v1.1' / 'valid' / 'XR_FINGER'
  results = {}
  for name, flag in (('model', ['--model', folder]), ('workdir', ['--workdir', workdir])):
    code = predict.main([str(studies), *map(str, flag), '--out', str(tmp_path / name)])
    assert code == predict.EXIT_OK, capsys.readouterr().err
    with open(tmp_path / name / 'studies.csv') as f:
      results[name] = {r['study']: float(r['probability']) for r in csv.DictReader(f)}
  assert results['model'].keys() == results['workdir'].keys() and results['model']
  for study, p in results['model'].items():
    assert p == pytest.approx(results['workdir'][study], abs=1e-5)


def test_export_errors(trained_workdir, exported, tmp_path, monkeypatch):
  workdir, config = trained_workdir
  folder = exported[0]
  with pytest.raises(checkpoints.CheckpointNotFoundError, match='train first'):
    export.export(tmp_path / 'empty', 'best', tmp_path / 'out')
  other = tiny_config(config.data.data_dir, **{'model.growth_rate': 6})
  with pytest.raises(checkpoints.CheckpointMismatchError, match='growth_rate'):
    export.export(workdir, 'best', tmp_path / 'out', config=other)
  # A folder written by a newer mura-jax is neither overwritten nor read.
  newer = tmp_path / 'newer'
  newer.mkdir()
  (newer / 'export.json').write_text(json.dumps({'format_version': 99}))
  with pytest.raises(exported_lib.ExportError, match='newer'):
    export.export(workdir, 'best', newer, config=config)
  with pytest.raises(exported_lib.ExportError, match='newer'):
    exported_lib.load(newer)
  with pytest.raises(exported_lib.ExportError, match='no export.json'):
    exported_lib.load(tmp_path)
  # A failure half-way leaves the previous export intact and nothing that looks complete.
  target = tmp_path / 'again'
  export.export(workdir, 'best', target, config=config)
  before = (target / 'export.json').read_text()

  def fail(*args, **kwargs):
    raise RuntimeError('disk full')
  monkeypatch.setattr(export, 'export_torchvision', fail)
  with pytest.raises(RuntimeError, match='disk full'):
    export.export(workdir, 'best', target, config=config)
  assert (target / 'export.json').read_text() == before
  assert sorted(p.name for p in tmp_path.iterdir() if 'partial' in p.name) == []
  # A damaged artifact is refused by its checksum.
  damaged = tmp_path / 'damaged'
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(folder, damaged)
  (damaged / 'model.jax_export').write_bytes(b'garbage')
  with pytest.raises(exported_lib.ExportError, match='sha256'):
    exported_lib.load(damaged)


def test_the_cam_display_scale_travels_with_the_export(trained_workdir, synthetic_dir, tmp_path,
                                                       monkeypatch):
  """The CAM job's display range for the checkpoint goes into the export, and mura-predict --cam
  draws on it from the export as from the workdir."""
  workdir, config = trained_workdir
  step = checkpoints.choose(workdir, 'best')[1]
  path = display_scale.workdir_path(workdir)
  before = path.read_bytes() if path.exists() else None  # the CAM tests' own, put back after
  try:
    stored = display_scale.write(path, top=2.5, percentile=99.0, split='validation', n_views=3,
                                 step=step)
    folder = tmp_path / 'export'
    manifest = export.export(workdir, 'best', folder, config=config)
    assert display_scale.EXPORT_FILE in manifest['files']
    assert exported_lib.load(folder).display_scale() == stored
    scales = []
    real = pictures.draw_study
    monkeypatch.setattr(pictures, 'draw_study', lambda *args, **kwargs: scales.append(args[4]) or
                        real(*args, **kwargs))
    study = synthetic_dir / 'MURA-v1.1' / 'valid' / 'XR_HAND'
    for name, flag in (('model', '--model'), ('workdir', '--workdir')):
      source = folder if name == 'model' else workdir
      assert predict.main([str(study), flag, str(source), '--out', str(tmp_path / name),
                           '--cam']) == predict.EXIT_OK
    assert scales and set(scales) == {maps_lib.DisplayScale.of(stored)}
  finally:
    if before is None:
      path.unlink()
    else:
      path.write_bytes(before)


def test_export_of_mirror_averaged_maps(trained_workdir, tmp_path, monkeypatch):
  """--config.cam.flip_average=True (an export's own choice): the artifact's maps are the mean
  of each view's and its mirror's, as CAM mode makes them, and the export says so."""
  workdir, config = trained_workdir
  flip = config.copy_and_resolve_references()
  flip.cam.flip_average = True
  monkeypatch.setattr(export, 'export_saved_model',
                      lambda *a: {'written': False, 'reason': 'not needed by this test'})
  manifest = export.export(workdir, 'best', tmp_path / 'export', config=flip)
  assert manifest['spec']['cam'] == {'flip_average': True}
  sidecar = json.loads((tmp_path / 'export' / 'model.jax_export.json').read_text())
  assert 'mirror' in sidecar['outputs'][1]['meaning']
  predictor = predictor_lib.Predictor.from_workdir(workdir, 'best', config=config)
  assert not predictor.flip_average  # the run's own config: plain maps
  views = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
  probability, maps = exported_lib.load(tmp_path / 'export').predict_views_and_maps(views)
  variables = jax.device_get(predictor.variables)
  logits, averaged = inference_steps.view_maps(variables, views, model=predictor.model,
                                               in_channels=predictor.preprocessing.in_channels,
                                               flip_average=True)
  np.testing.assert_allclose(maps, averaged, atol=1e-4)
  np.testing.assert_allclose(probability, predictor.predict_views(list(views)), atol=1e-5)
  plain = predictor.predict_views_and_maps(list(views))[1]
  assert np.abs(maps - plain).max() > 1e-3
