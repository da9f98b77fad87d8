"""Checkpoint export: a trained model leaves its workdir, for machines without this project.

    python -m mura_jax.main --workdir W --config.mode=export [--config.export.checkpoint=best]

writes WORKDIR/export/ (`config.export.dir` to choose another folder):
  model.jax_export       the serving function, serialized with `jax.export`: uint8 views
                         (batch, S, S, 1), gray, already fitted to S x S (`preprocessing.fit`) ->
                         (probability (batch,), class activation map (batch, h, w) in logit units);
                         normalisation and the network run inside; the batch size is symbolic; the
                         weights are constants inside; lowered for cpu, cuda and tpu. It needs jax
                         alone to run (not mura_jax, not flax):
                             from jax import export
                             model = export.deserialize(open('model.jax_export', 'rb').read())
                             probability, cam = model.call(views)
  model.jax_export.json  its input and outputs (shapes, dtypes), the preprocessing, the classifier
                         bias (display map = sigmoid(cam + bias)), the temperature T applied to
                         the probability (1: none; see checkpoints.py), jax's version and calling
                         convention, the platforms, the file's sha256.
  model.safetensors      the torchvision state dict (num_batches_tracked included), loadable with
                         strict=True into torchvision.models.DenseNet(growth_rate, block_config,
                         num_init_features, bn_size, num_classes=1) with the arguments in
                         export.json (`torchvision`).
  saved_model/           (where TensorFlow is installed) a TF SavedModel through jax2tf's native
                         serialization: weights as tf.Variables, polymorphic batch, no gradient;
                         signature `serving_default(images) -> {probability, cam}`. It is run
                         in TensorFlow before it is kept; export.json says why when it is not.
  cam_display_scale.json where the CAM job stored one for the checkpoint: the range its maps
                         are drawn on (inference/display_scale.py), for mura-predict --cam.
  model_card.md/.json    intended use, preprocessing, architecture, training config and data,
                         validation metrics with CIs, reference figures, limitations, licence terms.
  export.json            format version, files with sha256, checkpoint, spec (the model, its
                         preprocessing and its scope: the body parts and the data it was
                         trained and validated on; `mura-predict --model` reads them).

An export is written into a staging folder beside the target (`.export.partial-HOST-PID-XXXXXXXX`)
and renamed into place when complete, so a partial export never looks like one; a staging folder
left by an export that was killed is removed by the next export to the same folder (a note says
so). What may be replaced is checked before any work (`check_out_dir`): only an empty folder or a
previous export of mura-jax. `load(EXPORT_DIR)` reads one back for `mura-predict --model
EXPORT_DIR`; a damaged export.json or model_card.json is named, with what to do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os

import jax
from jax import export as jax_export
import numpy as np
from etils import epath

from mura_jax import checkpoints
from mura_jax import workdir as workdir_lib
from mura_jax.data import preprocessing as preprocessing_lib
from mura_jax.inference import display_scale
from mura_jax.inference import predictor as predictor_lib
from mura_jax.inference import steps as inference_steps
from mura_jax.inference.exported import FORMAT_VERSION, ExportError, sha256
from mura_jax.models import weights
from mura_jax.serving import export_folder
from mura_jax.serving import model_card

PLATFORMS = ('cpu', 'cuda', 'tpu')


# ------------------------------------------------------------------------------------------------
# The artifacts.


def serving_function(model, spec: preprocessing_lib.Preprocessing, temperature: float = 1.0,
                     flip_average: bool = False):
  """(variables, images uint8 (b, S, S, 1)) -> (probability (b,), cam (b, h, w)): what both
  serialized forms run (jax.export with the weights closed over, the SavedModel with them as
  tf.Variables). The probability is sigmoid(logit / temperature): a stored temperature
  (checkpoints.read_temperature) travels inside the artifact; the map stays unscaled, and is
  mirror-averaged where the run's cam.flip_average says (steps.view_maps)."""
  model = inference_steps.inference_network(model)  # unrolled, as every inference step compiles it

  def serve(variables, images):
    logits, maps = inference_steps.view_maps(variables, images, model=model,
                                             in_channels=spec.in_channels,
                                             flip_average=flip_average)
    return jax.nn.sigmoid(logits / temperature if temperature != 1.0 else logits), maps
  return serve


def export_jax(serve, spec: preprocessing_lib.Preprocessing, folder: epath.Path,
               bias: float, temperature: float = 1.0, flip_average: bool = False) -> dict:
  batch, = jax_export.symbolic_shape('batch')
  size = spec.image_size
  exported = jax_export.export(jax.jit(serve), platforms=PLATFORMS)(
      jax.ShapeDtypeStruct((batch, size, size, 1), np.uint8))
  path = folder / 'model.jax_export'
  path.write_bytes(exported.serialize())
  probability, cam = exported.out_avals
  sidecar = {
      'input': {'name': 'images', 'shape': ['batch', size, size, 1], 'dtype': 'uint8',
                'meaning': 'gray views fitted to the square (preprocessing below), 0..255'},
      'outputs': [
          {'name': 'probability', 'shape': ['batch'], 'dtype': str(probability.dtype),
           'meaning': 'the view\'s abnormality probability; a study\'s is the mean of its views'
                      + _temperature_meaning(temperature)},
          {'name': 'cam', 'shape': ['batch', *cam.shape[1:]], 'dtype': str(cam.dtype),
           'meaning': _cam_meaning(flip_average)}],
      'classifier_bias': bias,
      'temperature': temperature,
      'preprocessing': model_card.preprocessing_card(spec),
      'jax_version': jax.__version__,
      'calling_convention_version': exported.calling_convention_version,
      'platforms': list(exported.platforms),
      'compatibility': model_card.COMPATIBILITY,
      'sha256': sha256(path),
      'usage': "from jax import export; model = export.deserialize(open('model.jax_export', "
               "'rb').read()); probability, cam = model.call(views)",
  }
  (folder / 'model.jax_export.json').write_text(json.dumps(sidecar, indent=2) + '\n')
  return sidecar


def _cam_meaning(flip_average: bool) -> str:
  if flip_average:
    return ('class activation map M in logit units, the mean of the view\'s and its lateral '
            'mirror\'s (mirrored back; cam.flip_average); mean(M) + classifier_bias is the mean '
            'of the two logits, sigmoid(M + classifier_bias) the display map')
  return ('class activation map M in logit units; mean(M) + classifier_bias is the logit, '
          'sigmoid(M + classifier_bias) the display map')


def _temperature_meaning(temperature: float) -> str:
  if temperature == 1.0:
    return ''
  return (f'; temperature-scaled: sigmoid(logit / {temperature!r}), T fitted on the validation '
          'split (model_card.json, calibration)')


def export_torchvision(variables, model, folder: epath.Path) -> None:
  weights.save_safetensors(jax.device_get(variables), folder / 'model.safetensors', arch=model)


@contextlib.contextmanager
def _stablehlo_for_tensorflow():
  """jax.export writes the StableHLO version of about four weeks before its own; TensorFlow's
  XlaCallModule reads up to its own version only (TF 2.21: 1.13.7; jax 0.12 writes 1.18, whose
  custom_call_v2 TF 2.21 cannot read). Within this block jax writes the older of the two. jax has
  no public option for it, so this replaces jax's choice for the block only; where either side
  lacks the functions, jax's own choice stands and the check after saving decides."""
  try:
    from jax._src.lib.mlir.dialects import hlo  # pylint: disable=g-import-not-at-top
    from tensorflow.compiler.mlir.stablehlo import stablehlo  # pylint: disable=g-import-not-at-top
    readable = stablehlo.get_current_version()
    jax_choice = hlo.get_version_from_compatibility_requirement
    smaller = hlo.get_smaller_version
  except (ImportError, AttributeError):
    yield None
    return
  hlo.get_version_from_compatibility_requirement = (
      lambda requirement: smaller(jax_choice(requirement), readable))
  try:
    yield readable
  finally:
    hlo.get_version_from_compatibility_requirement = jax_choice


def _saved_model_problem(tf, path: str, serve, variables, size: int) -> str | None:
  """Loads the SavedModel back and runs it on two views: None when it gives JAX's outputs, else
  what went wrong (TensorFlow unable to read jax's StableHLO, or different results)."""
  images = np.random.default_rng(0).integers(0, 256, (2, size, size, 1), dtype=np.uint8)
  expected = jax.device_get(jax.jit(serve)(variables, images))
  try:
    out = tf.saved_model.load(path).signatures['serving_default'](images=tf.constant(images))
    got = (out['probability'].numpy(), out['cam'].numpy())
  except tf.errors.OpError as e:
    lines = str(e).strip().splitlines()
    return (f'TensorFlow {tf.__version__} cannot run what jax {jax.__version__} wrote '
            f'({lines[-1] if lines else type(e).__name__})')
  for name, a, b in zip(('probability', 'cam'), expected, got):
    if not np.allclose(a, b, atol=1e-4, rtol=1e-4):
      return (f'TensorFlow {tf.__version__} computes another {name} than jax {jax.__version__} '
              f'(largest difference {np.max(np.abs(np.asarray(a) - b)):.3g})')
  return None


def export_saved_model(serve, variables, spec: preprocessing_lib.Preprocessing,
                       folder: epath.Path) -> dict:
  """A TF SavedModel (jax2tf native serialization) of `serve` (serving_function's), checked by
  running it in TensorFlow. Returns its description, or {'written': False, 'reason': ...} where
  TensorFlow is not installed or cannot run it (then no saved_model/ is left)."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {'written': False, 'reason': 'TensorFlow is not installed (pip install "mura-jax[tf]")'}
  size = spec.image_size
  path = os.fspath(folder / 'saved_model')
  with _stablehlo_for_tensorflow() as stablehlo_version:
    converted = jax2tf.convert(serve, polymorphic_shapes=[None, f'(b, {size}, {size}, 1)'],
                               with_gradient=False, native_serialization_platforms=PLATFORMS)
    module = tf.Module()
    module.params = tf.nest.map_structure(tf.Variable, jax.device_get(variables))

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 1], tf.uint8, name='images')],
                 autograph=False)
    def serving_default(images):
      probability, cam = converted(module.params, images)
      return {'probability': probability, 'cam': cam}

    module.serving_default = serving_default
    tf.saved_model.save(module, path, signatures={'serving_default': serving_default})
  problem = _saved_model_problem(tf, path, serve, variables, size)
  if problem:
    (folder / 'saved_model').rmtree()
    return {'written': False, 'reason': problem + '; the other files are complete. For a '
            'SavedModel, export with a jax and TensorFlow that work together (tested: jax 0.10 '
            'to 0.12 with TensorFlow 2.21).'}
  return {'written': True, 'tensorflow_version': tf.__version__,
          'jax2tf': 'native serialization', 'stablehlo_version': stablehlo_version,
          'requires': f'TensorFlow whose XlaCallModule reads StableHLO {stablehlo_version or ""} '
                      f'(written by jax {jax.__version__}, checked with TensorFlow '
                      f'{tf.__version__})',
          'usage': "tf.saved_model.load('saved_model').signatures['serving_default']("
                   "images=tf.constant(views))"}


# ------------------------------------------------------------------------------------------------
# Writing an export folder (export_folder.py: where it may go; model_card.py: its card).


def export(workdir, which: str | int = 'best', out_dir=None, config=None) -> dict:
  """Writes every artifact of a checkpoint to `out_dir` (default WORKDIR/export); returns
  export.json's content. Errors (ExportError unless said): an out_dir
  `export_folder.check_out_dir` refuses, no checkpoint or another model's checkpoint
  (checkpoints' errors), a newer export there, a disk that fills up (nothing left behind; the
  previous export stays)."""
  out_dir = epath.Path(out_dir or epath.Path(workdir) / 'export')
  # First: a previous export moved away comes back to be checked.
  export_folder.clear_leftovers(out_dir)
  export_folder.check_out_dir(out_dir, workdir)
  validation_report = model_card.validation_report(workdir)
  predictor = predictor_lib.Predictor.from_workdir(workdir, which, config=config)
  written = workdir_lib.read_config(workdir)
  if written is not None:
    written.workdir = os.fspath(workdir)
  spec_ = {'model': predictor.spec['model'], 'preprocessing': predictor.spec['preprocessing'],
           'temperature': predictor.spec.get('temperature'),  # applied inside model.jax_export
           'cam': {'flip_average': predictor.flip_average},  # how the artifacts' maps are made
           **checkpoints.scope(predictor.spec)}  # body parts, data (model_card.scope_card)
  staging = export_folder.temporary(out_dir, 'partial')
  try:
    staging.mkdir(parents=True)
    variables = jax.device_get(predictor.variables)
    bias = predictor.classifier_bias
    serve = serving_function(predictor.model, predictor.preprocessing, predictor.temperature,
                             predictor.flip_average)
    sidecar = export_jax(functools.partial(serve, variables), predictor.preprocessing, staging,
                         bias, predictor.temperature, predictor.flip_average)
    export_torchvision(variables, predictor.model, staging)
    saved_model = export_saved_model(serve, variables, predictor.preprocessing, staging)
    parameters = int(sum(np.size(x) for x in jax.tree.leaves(variables['params'])))
    card = model_card.model_card(
        predictor.checkpoint, spec_, parameters, written,
        model_card.validation_metrics(validation_report, predictor.checkpoint['step']),
        model_card.training_data(predictor.spec, written))
    card['calibration'] = model_card.calibration_card(spec_['temperature'])
    (staging / 'model_card.json').write_text(json.dumps(card, indent=2) + '\n')
    (staging / 'model_card.md').write_text(model_card.format_card(card))
    display_scale.copy_into_export(workdir, staging, predictor.checkpoint['step'])
    files = sorted(p.name for p in staging.iterdir() if p.is_file())
    manifest = {
        'format_version': FORMAT_VERSION, 'checkpoint': predictor.checkpoint, 'spec': spec_,
        'torchvision': model_card.torchvision_arguments(spec_['model']), 'classifier_bias': bias,
        'jax_export': {k: sidecar[k] for k in ('jax_version', 'calling_convention_version',
                                               'platforms')},
        'saved_model': saved_model,
        'files': {name: sha256(staging / name) for name in files},
    }
    (staging / 'export.json').write_text(json.dumps(manifest, indent=2) + '\n')
    # Only a complete export takes the folder's name; the previous one goes only then.
    if out_dir.exists():
      old = export_folder.temporary(out_dir, 'old')
      out_dir.rename(old)
      staging.rename(out_dir)
      old.rmtree()
    else:
      staging.rename(out_dir)
  except BaseException as e:
    export_folder.remove_quietly(staging)
    if isinstance(e, OSError):  # a full disk, a quota, a folder removed under it
      raise ExportError(f'Could not write the export to {out_dir} '
                        f'({getattr(e, "strerror", None) or e}'
                        + (f': {e.filename}' if getattr(e, 'filename', None) else '')
                        + f'); nothing was left in {out_dir.parent} and a previous export there '
                        'is unchanged: free some space, or export to another folder '
                        '(--config.export.dir).') from e
    raise
  return manifest


def run(config, workdir: str) -> dict:
  """Export mode: the configured checkpoint's artifacts into config.export.dir or WORKDIR/export."""
  manifest = export(workdir, config.export.checkpoint, config.export.dir or None, config=config)
  if jax.process_index() == 0:
    folder = config.export.dir or os.fspath(epath.Path(workdir) / 'export')
    print(f'Exported the {manifest["checkpoint"]["which"]} checkpoint (step '
          f'{manifest["checkpoint"]["step"]}) to {folder}: ' + ', '.join(manifest['files']) +
          (', saved_model/' if manifest['saved_model']['written'] else
           f' (no saved_model/: {manifest["saved_model"]["reason"]})'))
  return manifest
