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
                         bias (display map = sigmoid(cam + bias)), jax's version and calling
                         convention, the platforms, the file's sha256.
  model.safetensors      the torchvision state dict (num_batches_tracked included), loadable with
                         strict=True into torchvision.models.DenseNet(growth_rate, block_config,
                         num_init_features, bn_size, num_classes=1) with the arguments in
                         export.json (`torchvision`).
  saved_model/           (where TensorFlow is installed) a TF SavedModel through jax2tf's native
                         serialization: weights as tf.Variables, polymorphic batch, no gradient;
                         signature `serving_default(images) -> {probability, cam}`. It is run
                         in TensorFlow before it is kept; export.json says why when it is not.
  model_card.md/.json    intended use, preprocessing, architecture, training config and data,
                         validation metrics with CIs, reference figures, limitations, licence terms.
  export.json            format version, files with sha256, checkpoint, spec.

An export is written into a temporary folder beside the target and renamed into place when
complete, so a partial export never looks like one. `load(EXPORT_DIR)` reads one back for
`mura-predict --model EXPORT_DIR`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import uuid

import jax
import numpy as np
from etils import epath

from mura_jax import preprocessing as preprocessing_lib
from mura_jax.errors import UserError

FORMAT_VERSION = 1
PLATFORMS = ('cpu', 'cuda', 'tpu')
# jax.export's serialized form is only guaranteed readable for a window of jax versions.
COMPATIBILITY = ('jax.export guarantees a serialized artifact stays loadable for about 6 months '
                 'of jax releases after the jax version that wrote it (backward compatibility), '
                 'and by the writer for a short window (forward compatibility); re-export with a '
                 'newer mura-jax after that.')
REFERENCES = {
    'mura_first_version': 'Rajpurkar et al. 2017 (arXiv:1712.06957, first version): DenseNet-169 '
                          'at 224 px, one model, test set F1 0.857 (radiologists 0.884).',
    'mura_later_version': 'Rajpurkar et al., later version of arXiv:1712.06957 (2018): 320 px, '
                          'ensemble of the 5 checkpoints '
                          'with the lowest validation loss, test set Cohen\'s kappa 0.705 (95% CI '
                          '0.700-0.710), AUROC 0.929.',
    'leaderboard': 'MURA public leaderboard (Stanford ML Group): best single model kappa 0.775, '
                   'best ensemble 0.843.',
}


class ExportError(UserError, ValueError):
  """An export folder that cannot be read or written as asked; the message says what to do."""


def _sha256(path) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# The artifacts.


def serving_function(model, spec: preprocessing_lib.Preprocessing):
  """(variables, images uint8 (b, S, S, 1)) -> (probability (b,), cam (b, h, w)): what both
  serialized forms run (jax.export with the weights closed over, the SavedModel with them as
  tf.Variables)."""
  from mura_jax import inference  # pylint: disable=g-import-not-at-top
  model = inference.inference_network(model)  # unrolled, as every inference step compiles it

  def serve(variables, images):
    logits, maps = inference.view_maps(variables, images, model=model,
                                       in_channels=spec.in_channels)
    return jax.nn.sigmoid(logits), maps
  return serve


def export_jax(serve, spec: preprocessing_lib.Preprocessing, folder: epath.Path,
               bias: float) -> dict:
  from jax import export  # pylint: disable=g-import-not-at-top
  batch, = export.symbolic_shape('batch')
  size = spec.image_size
  exported = export.export(jax.jit(serve), platforms=PLATFORMS)(
      jax.ShapeDtypeStruct((batch, size, size, 1), np.uint8))
  path = folder / 'model.jax_export'
  path.write_bytes(exported.serialize())
  probability, cam = exported.out_avals
  sidecar = {
      'input': {'name': 'images', 'shape': ['batch', size, size, 1], 'dtype': 'uint8',
                'meaning': 'gray views fitted to the square (preprocessing below), 0..255'},
      'outputs': [
          {'name': 'probability', 'shape': ['batch'], 'dtype': str(probability.dtype),
           'meaning': 'the view\'s abnormality probability; a study\'s is the mean of its views'},
          {'name': 'cam', 'shape': ['batch', *cam.shape[1:]], 'dtype': str(cam.dtype),
           'meaning': 'class activation map M in logit units; mean(M) + classifier_bias is the '
                      'logit, sigmoid(M + classifier_bias) the display map'}],
      'classifier_bias': bias,
      'preprocessing': _preprocessing_card(spec),
      'jax_version': jax.__version__,
      'calling_convention_version': exported.calling_convention_version,
      'platforms': list(exported.platforms),
      'compatibility': COMPATIBILITY,
      'sha256': _sha256(path),
      'usage': "from jax import export; model = export.deserialize(open('model.jax_export', "
               "'rb').read()); probability, cam = model.call(views)",
  }
  (folder / 'model.jax_export.json').write_text(json.dumps(sidecar, indent=2) + '\n')
  return sidecar


def _preprocessing_card(spec: preprocessing_lib.Preprocessing) -> dict:
  return {**spec.to_dict(),
          'gray': 'tfds_mura.to_grayscale: 8-bit gray kept; RGB/RGBA to ITU-R 601 luma (exact '
                  'for equal channels), alpha dropped; 16-bit scaled by its significant bits',
          'fit': ('bilinear resize of the whole image to S x S (aspect ratio lost, as the paper)'
                  if spec.resize == 'squash' else 'centred in a black square, then a bilinear '
                  'resize to S x S (aspect ratio kept)'),
          'normalisation': {'inside_the_artifacts': True, 'scale': '1/255',
                            'mean': list(preprocessing_lib.IMAGENET_MEAN),
                            'std': list(preprocessing_lib.IMAGENET_STD),
                            'channels': 'the gray image in each of 3 channels'
                                        if spec.in_channels == 3 else 'one gray channel'}}


def torchvision_arguments(signature: dict) -> dict:
  """torchvision.models.DenseNet(...) arguments of the exported network."""
  from mura_jax.models import densenet  # pylint: disable=g-import-not-at-top
  if signature['arch'] == 'custom':
    fields = {k: signature[k] for k in ('growth_rate', 'num_init_features', 'bn_size')}
    fields['block_config'] = list(signature['block_config'])
  else:
    arch = densenet.ARCHS[signature['arch']]
    fields = {'growth_rate': arch['growth_rate'], 'block_config': list(arch['block_config']),
              'num_init_features': arch['num_init_features'], 'bn_size': 4}
  return {**fields, 'num_classes': signature['num_classes']}


def export_torchvision(variables, model, folder: epath.Path) -> None:
  from mura_jax.models import weights  # pylint: disable=g-import-not-at-top
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
# The model card.


def _validation_metrics(workdir, step: int) -> dict | None:
  """Per body part F1 / kappa / AUROC with CIs from the workdir's validation report of `step`."""
  path = epath.Path(workdir) / 'eval' / 'validation' / 'report.json'
  if not path.exists():
    return None
  report = json.loads(path.read_text())
  if (report.get('checkpoint') or {}).get('step') != step:
    return None
  return {'report': os.fspath(path), 'num_studies': report['num_studies'],
          'bootstrap': report['bootstrap'], 'operating_points': report['operating_points'],
          'groups': {group: {m: entry['metrics'][m] for m in ('f1', 'kappa', 'auroc')}
                     for group, entry in report['groups'].items()}}


def _training_data(config) -> dict | None:
  if config is None:
    return None
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = config.data.data_dir or os.fspath(epath.Path(config.workdir) / 'tfds')
    info = tfds.builder('mura', data_dir=data_dir).info
    synthetic = bool(info.metadata.get('synthetic', config.data.synthetic))
    return {'dataset': f'mura {info.version}', 'synthetic': synthetic,
            'images': info.metadata['image_counts'], 'studies': info.metadata['study_counts']}
  except Exception:  # pylint: disable=broad-except  (the dataset may be elsewhere now)
    return {'dataset': 'mura (not found where the run built it)',
            'synthetic': bool(config.data.synthetic)}


def model_card(checkpoint: dict, spec: dict, parameters: int, config, metrics, data) -> dict:
  synthetic = bool(data and data.get('synthetic'))
  return {
      'model': f'MURA abnormality classifier ({spec["model"]["arch"]}), mura-jax',
      'intended_use': 'A triage and research aid: an abnormality probability for an '
                      'upper-extremity radiograph study (elbow, finger, forearm, hand, humerus, '
                      'shoulder, wrist), to order a worklist or to study the method. Not a '
                      'diagnosis and not a medical device; a radiologist reads every study.',
      'checkpoint': checkpoint,
      'architecture': {**spec['model'], 'parameters': parameters,
                       'torchvision': torchvision_arguments(spec['model'])},
      'preprocessing': _preprocessing_card(preprocessing_lib.Preprocessing(**spec['preprocessing'])),
      'decision': 'study probability = mean of its views\' probabilities; abnormal if > 0.5 '
                  '(the paper); see the validation operating points for other thresholds',
      'training': None if config is None else {
          'optimizer': config.optimizer.to_dict(), 'train': config.train.to_dict(),
          'data': {k: config.data[k] for k in ('image_size', 'resize', 'flip', 'rotation_degrees')},
          'init': config.model.init, 'seed': config.seed},
      'training_data': data,
      'validation': metrics,
      'references': REFERENCES,
      'limitations': [
          'Trained on a synthetic MURA (the demo): it says nothing about real radiographs.'
          if synthetic else 'MURA comes from one institution (Stanford Hospital, 2001-2012): '
          'other scanners, populations and protocols may differ.',
          'Study-level labels only: no localisation labels; class activation maps are not '
          'clinically validated and can point at confounders.',
          'Validation metrics are on the validation split, which also chose the checkpoint.',
          'Seven upper-extremity study types only; other body parts are out of scope.'],
      'licence': ('The synthetic MURA is generated by mura-jax (Apache-2.0).' if synthetic else
                  'MURA is released by Stanford AIMI under a research use agreement: '
                  'non-commercial research use, no redistribution of the data. Check its terms '
                  'before sharing weights trained on it.'),
  }


def format_card(card: dict) -> str:
  lines = [f'# Model card: {card["model"]}', '', '## Intended use', '', card['intended_use'], '',
           '## Model', '']
  arch = card['architecture']
  lines.append(f'{arch["arch"]} DenseNet, {arch["parameters"]:,} parameters, one abnormality '
               f'logit; checkpoint {card["checkpoint"]["which"]} (step '
               f'{card["checkpoint"]["step"]}). torchvision: `DenseNet(**{arch["torchvision"]})`.')
  pre = card['preprocessing']
  lines += ['', '## Preprocessing', '', f'- size {pre["image_size"]} x {pre["image_size"]}, '
            f'{pre["resize"]}: {pre["fit"]}', f'- gray: {pre["gray"]}',
            f'- normalisation (inside the artifacts): x / 255, ImageNet mean '
            f'{pre["normalisation"]["mean"]}, std {pre["normalisation"]["std"]}; '
            f'{pre["normalisation"]["channels"]}', f'- {card["decision"]}']
  lines += ['', '## Validation', '']
  validation = card['validation']
  if validation is None:
    lines.append('Not evaluated for this checkpoint: run `--config.mode=evaluate` on the workdir '
                 '(with the same checkpoint) and export again.')
  else:
    lines += [f'{validation["num_studies"]} studies, 95% CIs from '
              f'{validation["bootstrap"]["num_resamples"]} bootstrap resamples.', '',
              '| study type | F1 | kappa | AUROC |', '|---|---|---|---|']
    for group, row in validation['groups'].items():
      cells = []
      for m in ('f1', 'kappa', 'auroc'):
        e = row[m]
        cells.append('n/a' if e['value'] is None else f'{e["value"]:.3f}' + (
            '' if e['ci_low'] is None else f' ({e["ci_low"]:.3f}-{e["ci_high"]:.3f})'))
      lines.append(f'| {group} | ' + ' | '.join(cells) + ' |')
  data = card['training_data']
  lines += ['', '## Training', '']
  if card['training']:
    t = card['training']
    lines.append(f'Adam lr {t["optimizer"]["learning_rate"]:g} (b1 {t["optimizer"]["b1"]}, b2 '
                 f'{t["optimizer"]["b2"]}), batch {t["train"]["global_batch_size"]}, '
                 f'{t["train"]["num_epochs"]} epochs, lr / 10 on a validation-loss plateau; '
                 f'init {t["init"]}; seed {t["seed"]}.')
  if data and 'images' in data:
    for split, parts in data['images'].items():
      total = {k: sum(p[k] for p in parts.values()) for k in ('normal', 'abnormal')}
      lines.append(f'- {data["dataset"]} {split}: {total["normal"]:,} normal and '
                   f'{total["abnormal"]:,} abnormal images ('
                   + ', '.join(f'{part} {c["normal"]}/{c["abnormal"]}' for part, c in parts.items())
                   + ')' + (' (synthetic)' if data['synthetic'] else ''))
  lines += ['', '## Reference figures', ''] + [f'- {v}' for v in card['references'].values()]
  lines += ['', '## Limitations', ''] + [f'- {v}' for v in card['limitations']]
  lines += ['', '## Licence', '', card['licence'], '']
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------
# Writing an export folder, and reading one back.


def export(workdir, which: str | int = 'best', out_dir=None, config=None) -> dict:
  """Writes every artifact of a checkpoint to `out_dir` (default WORKDIR/export); returns
  export.json's content. Errors: no checkpoint, another model's checkpoint, a newer export."""
  from mura_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from mura_jax import inference  # pylint: disable=g-import-not-at-top
  out_dir = epath.Path(out_dir or epath.Path(workdir) / 'export')
  if (out_dir / 'export.json').exists():
    found = json.loads((out_dir / 'export.json').read_text()).get('format_version', 0)
    if found > FORMAT_VERSION:
      raise ExportError(f'{out_dir} holds an export of format {found}, newer than this mura-jax '
                        f'writes ({FORMAT_VERSION}): upgrade mura-jax, or export to another '
                        'folder (--config.export.dir).')
  predictor = inference.Predictor.from_workdir(workdir, which, config=config)
  written = checkpoints.read_config(workdir)
  if written is not None:
    written.workdir = os.fspath(workdir)
  spec_ = {'model': predictor.spec['model'], 'preprocessing': predictor.spec['preprocessing']}
  staging = out_dir.parent / f'.{out_dir.name}.partial-{uuid.uuid4().hex[:8]}'
  staging.mkdir(parents=True)
  try:
    variables = jax.device_get(predictor.variables)
    bias = predictor.classifier_bias
    serve = serving_function(predictor.model, predictor.preprocessing)
    sidecar = export_jax(functools.partial(serve, variables), predictor.preprocessing, staging,
                         bias)
    export_torchvision(variables, predictor.model, staging)
    saved_model = export_saved_model(serve, variables, predictor.preprocessing, staging)
    parameters = int(sum(np.size(x) for x in jax.tree.leaves(variables['params'])))
    card = model_card(predictor.checkpoint, spec_, parameters, written,
                      _validation_metrics(workdir, predictor.checkpoint['step']),
                      _training_data(written))
    (staging / 'model_card.json').write_text(json.dumps(card, indent=2) + '\n')
    (staging / 'model_card.md').write_text(format_card(card))
    files = sorted(p.name for p in staging.iterdir() if p.is_file())
    manifest = {
        'format_version': FORMAT_VERSION, 'checkpoint': predictor.checkpoint, 'spec': spec_,
        'torchvision': torchvision_arguments(spec_['model']), 'classifier_bias': bias,
        'jax_export': {k: sidecar[k] for k in ('jax_version', 'calling_convention_version',
                                               'platforms')},
        'saved_model': saved_model,
        'files': {name: _sha256(staging / name) for name in files},
    }
    (staging / 'export.json').write_text(json.dumps(manifest, indent=2) + '\n')
    # Only a complete export takes the folder's name; the previous one goes only then.
    if out_dir.exists():
      old = out_dir.parent / f'.{out_dir.name}.old-{uuid.uuid4().hex[:8]}'
      out_dir.rename(old)
      staging.rename(out_dir)
      old.rmtree()
    else:
      staging.rename(out_dir)
  except BaseException:
    if staging.exists():
      staging.rmtree()
    raise
  return manifest


class ExportedModel:
  """An export folder's jax.export artifact, used like `inference.Predictor` by mura-predict."""

  def __init__(self, folder):
    from jax import export as jax_export  # pylint: disable=g-import-not-at-top
    folder = epath.Path(folder)
    manifest_path = folder / 'export.json'
    if not manifest_path.exists():
      raise ExportError(f'{folder} is not an export folder (no export.json): write one with '
                        '--config.mode=export.')
    manifest = json.loads(manifest_path.read_text())
    if manifest.get('format_version', 0) > FORMAT_VERSION:
      raise ExportError(f'{folder} was written in export format {manifest["format_version"]}, '
                        f'newer than this mura-jax reads ({FORMAT_VERSION}): upgrade mura-jax.')
    artifact = folder / 'model.jax_export'
    expected = manifest['files'].get('model.jax_export')
    if not artifact.exists() or _sha256(artifact) != expected:
      raise ExportError(f'{artifact} is missing or does not match export.json\'s sha256: the '
                        'export is damaged; export again.')
    self.folder = folder
    self.manifest = manifest
    self.exported = jax_export.deserialize(artifact.read_bytes())
    self.preprocessing = preprocessing_lib.Preprocessing(**manifest['spec']['preprocessing'])
    self.checkpoint = {**manifest['checkpoint'], 'export': os.fspath(folder)}
    self.classifier_bias = float(manifest['classifier_bias'])
    self.batch_size = 32

  def predict_views_and_maps(self, views) -> tuple[np.ndarray, np.ndarray]:
    fitted = [preprocessing_lib.view_input(np.asarray(v, np.uint8), self.preprocessing)
              for v in views]
    probabilities, maps = [], []
    for start in range(0, len(fitted), self.batch_size):
      p, m = self.exported.call(np.stack(fitted[start:start + self.batch_size]))
      probabilities.append(np.asarray(p, np.float64))
      maps.append(np.asarray(m, np.float64))
    return np.concatenate(probabilities), np.concatenate(maps)

  def predict_views(self, views) -> np.ndarray:
    return self.predict_views_and_maps(views)[0]


def load(folder) -> ExportedModel:
  return ExportedModel(folder)


def run(config, workdir: str) -> dict:
  """Export mode: the configured checkpoint's artifacts into config.export.dir or WORKDIR/export."""
  import jax as _jax  # pylint: disable=g-import-not-at-top,reimported
  manifest = export(workdir, config.export.checkpoint, config.export.dir or None, config=config)
  if _jax.process_index() == 0:
    folder = config.export.dir or os.fspath(epath.Path(workdir) / 'export')
    print(f'Exported the {manifest["checkpoint"]["which"]} checkpoint (step '
          f'{manifest["checkpoint"]["step"]}) to {folder}: ' + ', '.join(manifest['files']) +
          (', saved_model/' if manifest['saved_model']['written'] else
           f' (no saved_model/: {manifest["saved_model"]["reason"]})'))
  return manifest
