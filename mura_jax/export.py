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
import hashlib
import json
import os
import re
import socket
import uuid

from absl import logging
import jax
import numpy as np
from etils import epath

from mura_jax import preprocessing as preprocessing_lib
from mura_jax.errors import UserError, write_problem

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


def _validation_report(workdir) -> dict | None:
  """What the model card copies of the workdir's validation report (and the step it scored),
  read before any work: a damaged one is named (ExportError), not found after the artifacts."""
  path = epath.Path(workdir) / 'eval' / 'validation' / 'report.json'
  if not path.exists():
    return None
  what_to_do = ('evaluate again (--config.mode=evaluate) to rewrite it, or delete it (the model '
                'card then has no validation metrics)')
  try:
    report = json.loads(path.read_bytes())
    step = (report.get('checkpoint') or {}).get('step')
    copied = {'report': os.fspath(path), 'step': step, 'num_studies': report['num_studies'],
              'bootstrap': report['bootstrap'], 'operating_points': report['operating_points'],
              'groups': {group: {m: entry['metrics'][m] for m in ('f1', 'kappa', 'auroc')}
                         for group, entry in report['groups'].items()}}
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ExportError(f'{path} is damaged ({type(e).__name__}: {e}); {what_to_do}.') from e
  return copied


def _validation_metrics(report: dict | None, step: int) -> dict | None:
  """Per body part F1 / kappa / AUROC with CIs of the validation report, if it scored `step`."""
  if report is None or report['step'] != step:
    return None
  return {k: v for k, v in report.items() if k != 'step'}


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

AGAIN = ('export the checkpoint again (python -m mura_jax.main --workdir WORKDIR '
         '--config.mode=export), or copy the whole export folder again')


def read_json(path, required: tuple[str, ...] = (), what_to_do: str = AGAIN + '.') -> dict:
  """A JSON object file of an export (export.json, model_card.json) with `required` keys; a file
  that is not one raises ExportError naming it and saying what to do."""
  path = epath.Path(path)
  try:
    data = json.loads(path.read_bytes())
  except ValueError as e:  # not JSON, not UTF-8
    raise ExportError(f'{path} is damaged (not JSON: {e}); {what_to_do}') from e
  if not isinstance(data, dict):
    raise ExportError(f'{path} is damaged (not a JSON object); {what_to_do}')
  missing = [k for k in required if k not in data]
  if missing:
    raise ExportError(f'{path} is damaged (no {", ".join(missing)}); {what_to_do}')
  return data


def read_model_card(folder) -> dict:
  """model_card.json of an export folder; its 'validation' is None or holds 'operating_points'
  (what mura-predict --model reads). Damaged: ExportError naming the file."""
  path = epath.Path(folder) / 'model_card.json'
  if not path.exists():
    raise ExportError(f'{folder} has no model_card.json; {AGAIN}.')
  card = read_json(path, ('validation',))
  validation = card['validation']
  if validation is not None and not (isinstance(validation, dict)
                                     and isinstance(validation.get('operating_points'), list)):
    raise ExportError(f'{path} is damaged (its validation has no operating_points); {AGAIN}.')
  return card


def _same_path(a: epath.Path, b: epath.Path) -> bool:
  return _resolved(a) == _resolved(b)


def _resolved(path: epath.Path) -> str:
  text = os.fspath(path)
  return text.rstrip('/') if '://' in text else os.path.realpath(text)


def _inside(path: epath.Path, folder: epath.Path) -> bool:
  """Whether `path` is `folder` or under it (links resolved)."""
  path, folder = _resolved(path), _resolved(folder)
  return path == folder or path.startswith(folder.rstrip('/') + '/')


def check_out_dir(out_dir, workdir) -> None:
  """Raises ExportError, before any work, when writing the export to `out_dir` could destroy
  anything. The rules:
  - `out_dir` must not be an existing file;
  - it must not be the workdir or a folder above it, nor be inside the workdir's checkpoint
    folders: the export replaces its folder as a whole;
  - an existing `out_dir` is replaced only when it is empty or a previous export of mura-jax:
    an export.json (a JSON object with format_version and files) no newer than this mura-jax
    writes, and nothing in the folder but the files it lists and saved_model/;
  - the folder it goes in can be written.
  A staging folder of a killed export beside it is not a problem: `export` removes it."""
  from mura_jax import checkpoints  # pylint: disable=g-import-not-at-top
  out_dir, workdir = epath.Path(out_dir), epath.Path(workdir)
  named = f'The export folder {out_dir} (--config.export.dir)'
  if out_dir.exists() and not out_dir.is_dir():
    raise ExportError(f'{named} is a file, not a folder; give a folder (created if missing) that '
                      'holds nothing else.')
  if _inside(workdir, out_dir):
    raise ExportError(f'{named} holds the workdir {workdir}, its checkpoints included; the export '
                      'replaces its folder as a whole: give a folder of its own (the default is '
                      f'{workdir / "export"}).')
  for kept in (checkpoints.LATEST, checkpoints.BEST):
    if _inside(out_dir, workdir / kept):
      raise ExportError(f'{named} is inside the checkpoint folder {workdir / kept}; give a folder '
                        f'of its own (the default is {workdir / "export"}).')
  if out_dir.is_dir():
    entries = sorted(p.name for p in out_dir.iterdir())
    if entries:
      if 'export.json' not in entries:
        raise ExportError(f'{named} holds {_listed(entries)} and is not an export of mura-jax (no '
                          'export.json); the export replaces its folder as a whole: give an '
                          'empty or new folder, or move those files.')
      manifest = _previous_manifest(out_dir)
      others = [e for e in entries
                if e not in manifest['files'] and e not in ('export.json', 'saved_model')]
      if others:
        raise ExportError(f'{named} holds {_listed(others)}, which no export wrote; the export '
                          'replaces its folder as a whole: move them, or give another folder.')
  problem = write_problem(out_dir.parent)
  if problem is not None:
    raise ExportError(f'{named}: cannot write in {out_dir.parent} '
                      f'({getattr(problem, "strerror", None) or problem}); give a folder you can '
                      'write to.')


def _listed(names: list[str]) -> str:
  return ', '.join(names[:3]) + (f' and {len(names) - 3} more' if len(names) > 3 else '')


def _previous_manifest(out_dir: epath.Path) -> dict:
  """export.json of the export in `out_dir`, which is to be replaced: readable, and not newer."""
  path = out_dir / 'export.json'
  not_replaced = (f'{out_dir} is not replaced, as it cannot be told from other files: delete it '
                  'yourself if it is an old export, or give another folder (--config.export.dir).')
  manifest = read_json(path, what_to_do=not_replaced)
  found = manifest.get('format_version')
  if isinstance(found, int) and found > FORMAT_VERSION:
    raise ExportError(f'{out_dir} holds an export of format {found}, newer than this mura-jax '
                      f'writes ({FORMAT_VERSION}): upgrade mura-jax, or export to another '
                      'folder (--config.export.dir).')
  if not isinstance(found, int) or not isinstance(manifest.get('files'), dict):
    raise ExportError(f'{path} is damaged (no format_version and files of an export); '
                      f'{not_replaced}')
  return manifest


def _temporary(out_dir: epath.Path, kind: str) -> epath.Path:
  """A folder beside out_dir named for this process: `.NAME.KIND-HOST-PID-XXXXXXXX`."""
  host = re.sub(r'[^A-Za-z0-9_.]', '_', socket.gethostname()) or 'host'
  return out_dir.parent / f'.{out_dir.name}.{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}'


def _alive(host: str | None, pid: int | None) -> bool:
  """Whether the process that named a temporary folder may still be writing it: a live process
  on this host; another host's only while this run has several processes (one of them may be
  it); an old-style name (no host) never."""
  if host is None:
    return False
  if host != re.sub(r'[^A-Za-z0-9_.]', '_', socket.gethostname()):
    return jax.process_count() > 1
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # another user's live process
    return True
  return True


def clear_leftovers(out_dir) -> list[str]:
  """Removes what a killed export left beside `out_dir`: staging folders (`.NAME.partial-...`),
  and the previous export it was replacing (`.NAME.old-...`), put back when `out_dir` is gone.
  Folders of an export still running are left. Returns the notes (also logged)."""
  out_dir = epath.Path(out_dir)
  if not out_dir.parent.exists():
    return []
  pattern = re.compile(rf'^\.{re.escape(out_dir.name)}\.(partial|old)-'
                       r'(?:(.+)-(\d+)-)?[0-9a-f]{8}$')
  notes = []
  for path in sorted(out_dir.parent.iterdir()):
    match = pattern.match(path.name)
    if not match or not path.is_dir():
      continue
    kind, host, pid = match.group(1), match.group(2), match.group(3)
    if _alive(host, None if pid is None else int(pid)):
      notes.append(f'{path} belongs to an export still running (process {pid} on {host}); left.')
    elif kind == 'old' and not out_dir.exists():
      path.rename(out_dir)
      notes.append(f'{path} held the previous export of {out_dir}, moved away by an export that '
                   'was stopped; put back.')
    else:
      path.rmtree()
      notes.append(f'Removed {path}, left by an export that was stopped before it finished.')
  for note in notes:
    logging.warning('%s', note)
  return notes


def export(workdir, which: str | int = 'best', out_dir=None, config=None) -> dict:
  """Writes every artifact of a checkpoint to `out_dir` (default WORKDIR/export); returns
  export.json's content. Errors (ExportError unless said): an out_dir `check_out_dir` refuses, no
  checkpoint or another model's checkpoint (checkpoints' errors), a newer export there, a disk
  that fills up (nothing left behind; the previous export stays)."""
  from mura_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from mura_jax import inference  # pylint: disable=g-import-not-at-top
  out_dir = epath.Path(out_dir or epath.Path(workdir) / 'export')
  clear_leftovers(out_dir)  # first: a previous export moved away comes back to be checked
  check_out_dir(out_dir, workdir)
  validation_report = _validation_report(workdir)
  predictor = inference.Predictor.from_workdir(workdir, which, config=config)
  written = checkpoints.read_config(workdir)
  if written is not None:
    written.workdir = os.fspath(workdir)
  spec_ = {'model': predictor.spec['model'], 'preprocessing': predictor.spec['preprocessing']}
  staging = _temporary(out_dir, 'partial')
  try:
    staging.mkdir(parents=True)
    variables = jax.device_get(predictor.variables)
    bias = predictor.classifier_bias
    serve = serving_function(predictor.model, predictor.preprocessing)
    sidecar = export_jax(functools.partial(serve, variables), predictor.preprocessing, staging,
                         bias)
    export_torchvision(variables, predictor.model, staging)
    saved_model = export_saved_model(serve, variables, predictor.preprocessing, staging)
    parameters = int(sum(np.size(x) for x in jax.tree.leaves(variables['params'])))
    card = model_card(predictor.checkpoint, spec_, parameters, written,
                      _validation_metrics(validation_report, predictor.checkpoint['step']),
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
      old = _temporary(out_dir, 'old')
      out_dir.rename(old)
      staging.rename(out_dir)
      old.rmtree()
    else:
      staging.rename(out_dir)
  except BaseException as e:
    _remove_quietly(staging)
    if isinstance(e, OSError):  # a full disk, a quota, a folder removed under it
      raise ExportError(f'Could not write the export to {out_dir} '
                        f'({getattr(e, "strerror", None) or e}'
                        + (f': {e.filename}' if getattr(e, 'filename', None) else '')
                        + f'); nothing was left in {out_dir.parent} and a previous export there '
                        'is unchanged: free some space, or export to another folder '
                        '(--config.export.dir).') from e
    raise
  return manifest


def _remove_quietly(folder: epath.Path) -> None:
  """Removes a staging folder after a failure, whose own error is the one to report."""
  try:
    if folder.exists():
      folder.rmtree()
  except OSError as e:
    logging.warning('Could not remove %s (%s); delete it, or the next export will.', folder, e)


class ExportedModel:
  """An export folder's jax.export artifact, used like `inference.Predictor` by mura-predict."""

  def __init__(self, folder):
    from jax import export as jax_export  # pylint: disable=g-import-not-at-top
    folder = epath.Path(folder)
    manifest_path = folder / 'export.json'
    if not manifest_path.exists():
      raise ExportError(f'{folder} is not an export folder (no export.json): write one with '
                        '--config.mode=export.')
    manifest = read_json(manifest_path, ('format_version',))
    if not isinstance(manifest['format_version'], int):
      raise ExportError(f'{manifest_path} is damaged (format_version is not a number); {AGAIN}.')
    if manifest['format_version'] > FORMAT_VERSION:
      raise ExportError(f'{folder} was written in export format {manifest["format_version"]}, '
                        f'newer than this mura-jax reads ({FORMAT_VERSION}): upgrade mura-jax.')
    read_json(manifest_path, ('files', 'spec', 'checkpoint', 'classifier_bias'))
    artifact = folder / 'model.jax_export'
    try:
      expected = manifest['files'].get('model.jax_export')
      preprocessing = preprocessing_lib.Preprocessing(**manifest['spec']['preprocessing'])
      checkpoint = {**manifest['checkpoint'], 'export': os.fspath(folder)}
      bias = float(manifest['classifier_bias'])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise ExportError(f'{manifest_path} is damaged ({type(e).__name__}: {e} in files, spec, '
                        f'checkpoint or classifier_bias); {AGAIN}.') from e
    if not artifact.exists() or _sha256(artifact) != expected:
      raise ExportError(f'{artifact} is missing or does not match export.json\'s sha256: the '
                        'export is damaged; export again.')
    self.folder = folder
    self.manifest = manifest
    self.exported = jax_export.deserialize(artifact.read_bytes())
    self.preprocessing = preprocessing
    self.checkpoint = checkpoint
    self.classifier_bias = bias
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
