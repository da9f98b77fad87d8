"""An export's model card (model_card.json and .md): intended use, preprocessing, architecture,
training config and data, validation metrics with CIs, reference figures, limitations, licence."""

from __future__ import annotations

import json
import os

from etils import epath

from mura_jax import checkpoints
from mura_jax.data import preprocessing as preprocessing_lib
from mura_jax.inference.exported import ExportError
from mura_jax.models import densenet
from tfds_mura import BODY_PARTS


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


def preprocessing_card(spec: preprocessing_lib.Preprocessing) -> dict:
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


def validation_report(workdir) -> dict | None:
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
                         for group, entry in report['groups'].items()},
              'calibration': _validation_calibration(report.get('calibration'))}
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ExportError(f'{path} is damaged ({type(e).__name__}: {e}); {what_to_do}.') from e
  return copied


def _validation_calibration(section: dict | None) -> dict | None:
  """The card's copy of a report's calibration: ECE per group (and before the temperature)."""
  if not section:
    return None
  temperature = section.get('temperature') or {}
  return {'binning': section['binning'],
          'ece': {group: entry['ece'] for group, entry in section['groups'].items()},
          'temperature': temperature.get('temperature'),
          'ece_before_temperature': temperature.get('ece_before'),
          'caveat': temperature.get('caveat')}


def calibration_card(temperature: dict | None) -> dict:
  """The card's calibration: the temperature T inside the artifacts (1.0: none) and how it was
  fitted (checkpoints.read_temperature's record)."""
  if temperature is None:
    return {'temperature': 1.0, 'fitted': None,
            'probability': "sigmoid(logit): the network's own probabilities"}
  return {'temperature': float(temperature['temperature']), 'fitted': temperature,
          'probability': 'sigmoid(logit / T), applied inside model.jax_export and the '
                         'SavedModel'}


def _calibration_lines(card: dict) -> list[str]:
  calibration = card.get('calibration')
  if not calibration:
    return []
  lines = ['', '## Calibration', '']
  fitted = calibration['fitted']
  if fitted is None:
    lines.append('No temperature: the probabilities are the network\'s own, sigmoid(logit).')
  else:
    lines.append(f'Temperature scaling: probability = sigmoid(logit / T), T = '
                 f'{fitted["temperature"]:.4f} (inside the artifacts), fitted on '
                 f'{fitted["num_views"]} {fitted["fitted_on"]} views by minimising the '
                 f'{fitted["objective"]}.')
  validation = (card.get('validation') or {}).get('calibration')
  if validation:
    before = validation['ece_before_temperature']
    lines += ['', f'Expected calibration error on validation ({validation["binning"]})'
              + (f'; {validation["caveat"]}' if validation['caveat'] else '') + ':', '',
              '| study type | ECE' + (' before T | ECE after T |' if before else ' |'),
              '|---|---|' + ('---|' if before else '')]
    for group, entry in validation['ece'].items():
      cells = ([_entry_text(before[group])] if before else []) + [_entry_text(entry)]
      lines.append(f'| {group} | ' + ' | '.join(cells) + ' |')
  return lines


def _entry_text(e: dict) -> str:
  return 'n/a' if e['value'] is None else f'{e["value"]:.3f}' + (
      '' if e['ci_low'] is None else f' ({e["ci_low"]:.3f}-{e["ci_high"]:.3f})')


def validation_metrics(report: dict | None, step: int) -> dict | None:
  """Per body part F1 / kappa / AUROC with CIs of the validation report, if it scored `step`."""
  if report is None or report['step'] != step:
    return None
  return {k: v for k, v in report.items() if k != 'step'}


def training_data(spec: dict, config) -> dict | None:
  """What the model was trained and validated on, restricted to its body parts: the spec's record
  (`data_lib.data_origin`), or for a checkpoint from before it, the dataset the workdir's config
  names, read again (its `recorded` says which)."""
  body_parts = checkpoints.body_parts_of(spec)
  if spec.get('data'):
    return {**spec['data'], 'recorded': 'in the checkpoint\'s spec'}
  if config is None:
    return None
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = config.data.data_dir or os.fspath(epath.Path(config.workdir) / 'tfds')
    info = tfds.builder('mura', data_dir=data_dir).info
    synthetic = bool(info.metadata.get('synthetic', config.data.synthetic))
    return {'dataset': 'synthetic MURA (mura-jax)' if synthetic else 'MURA-v1.1',
            'synthetic': synthetic, 'tfds': f'mura {info.version}',
            'splits': {'trained on': 'train', 'validated on': 'validation'},
            **{kind: {split: {p: counts[split].get(p, {}) for p in body_parts}
                      for split in ('train', 'validation')}
               for kind, counts in (('studies', info.metadata['study_counts']),
                                    ('images', info.metadata['image_counts']))},
            'recorded': f'not in the checkpoint\'s spec (an older mura-jax): read from {data_dir}'}
  except Exception:  # pylint: disable=broad-except  (the dataset may be elsewhere now)
    return {'dataset': 'mura (not found where the run built it)',
            'synthetic': bool(config.data.synthetic),
            'recorded': 'not in the checkpoint\'s spec (an older mura-jax), and the dataset is '
                        'not where the run built it'}


def study_types(body_parts) -> str:
  """The studies a model is for, in words: 'humerus', 'elbow or wrist', or all seven's
  'upper-extremity (elbow, finger, ..., wrist)'."""
  parts = list(body_parts)
  if tuple(parts) == tuple(BODY_PARTS):
    return f'upper-extremity ({", ".join(parts)})'
  return parts[0] if len(parts) == 1 else f'{", ".join(parts[:-1])} or {parts[-1]}'


def _article(words: str) -> str:
  return f'{"an" if words[0] in "aeiou" else "a"} {words}'


def scope_card(spec: dict, data: dict | None) -> dict:
  """The card's scope: the body parts (what mura-predict scores; others are out_of_scope), the
  data trained and validated on, and what was assumed for an older checkpoint or export."""
  found = checkpoints.scope(spec)
  synthetic = bool(data and data.get('synthetic'))
  types = study_types(found['body_parts'])
  origin = (f'synthetic {types} studies (a synthetic MURA generated by mura-jax: images made to '
            'test the method, not radiographs)' if synthetic else
            f'{types} radiograph studies of ' + (data['dataset'] if data and 'images' in data
                                                 else 'data not recorded'))
  return {'body_parts': found['body_parts'], 'study_types': types,
          'trained_and_validated_on': origin,
          **({'assumed': found['assumed']} if 'assumed' in found else {})}


def model_card(checkpoint: dict, spec: dict, parameters: int, config, metrics, data) -> dict:
  synthetic = bool(data and data.get('synthetic'))
  scope = scope_card(spec, data)
  return {
      'model': f'MURA abnormality classifier ({spec["model"]["arch"]}), mura-jax',
      'intended_use': f'A triage and research aid: an abnormality probability for '
                      f'{_article(scope["study_types"])} radiograph study, to order a worklist or '
                      'to study the method. Not a diagnosis and not a medical device; a '
                      'radiologist reads every study.' + (
                          ' Trained and validated on synthetic images: for testing the method '
                          'only.' if synthetic else ''),
      'scope': scope,
      'checkpoint': checkpoint,
      'architecture': {**spec['model'], 'parameters': parameters,
                       'torchvision': torchvision_arguments(spec['model'])},
      'preprocessing': preprocessing_card(preprocessing_lib.Preprocessing(**spec['preprocessing'])),
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
          f'Trained and validated on {scope["study_types"]} studies only; mura-predict reports '
          'other body parts as out_of_scope (unless --allow-out-of-scope, recorded).'],
      'licence': ('The synthetic MURA is generated by mura-jax (Apache-2.0).' if synthetic else
                  'MURA is released by Stanford AIMI under a research use agreement: '
                  'non-commercial research use, no redistribution of the data. Check its terms '
                  'before sharing weights trained on it.'),
  }


def format_card(card: dict) -> str:
  lines = [f'# Model card: {card["model"]}', '', '## Intended use', '', card['intended_use'], '',
           '## Scope', ''] + _scope_lines(card.get('scope')) + ['', '## Model', '']
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
  lines += _calibration_lines(card)
  data = card['training_data']
  lines += ['', '## Training', '']
  if card['training']:
    t = card['training']
    lines.append(f'Adam lr {t["optimizer"]["learning_rate"]:g} (b1 {t["optimizer"]["b1"]}, b2 '
                 f'{t["optimizer"]["b2"]}), batch {t["train"]["global_batch_size"]}, '
                 f'{t["train"]["num_epochs"]} epochs, lr / 10 on a validation-loss plateau; '
                 f'init {t["init"]}; seed {t["seed"]}.')
  lines += _data_lines(data)
  lines += ['', '## Reference figures', ''] + [f'- {v}' for v in card['references'].values()]
  lines += ['', '## Limitations', ''] + [f'- {v}' for v in card['limitations']]
  lines += ['', '## Licence', '', card['licence'], '']
  return '\n'.join(lines)


def _scope_lines(scope: dict | None) -> list[str]:
  if scope is None:  # a card written before issue 28
    return ['Not recorded (an older mura-jax).']
  return [f'Trained and validated on {scope["trained_and_validated_on"]}. Body parts: '
          f'{", ".join(scope["body_parts"])}; mura-predict reports a study of another part as '
          'out_of_scope.'] + ([f'Assumed: {scope["assumed"]}.'] if scope.get('assumed') else [])


def _data_lines(data: dict | None) -> list[str]:
  """Studies and images (normal/abnormal) per split and body part, as trained and validated."""
  if not data or 'images' not in data:
    return [f'- data: {data["dataset"]} ({data["recorded"]})'] if data else []
  lines = []
  for role, split in data['splits'].items():
    studies, images = data['studies'][split], data['images'][split]
    total = {k: sum(c.get(k, 0) for c in studies.values()) for k in ('normal', 'abnormal')}
    lines.append(
        f'- {role}: {data["dataset"]} {split} split, {total["normal"]:,} normal and '
        f'{total["abnormal"]:,} abnormal studies ('
        + ', '.join(f'{part} {c.get("normal", 0)}/{c.get("abnormal", 0)} studies, '
                    f'{images[part].get("normal", 0)}/{images[part].get("abnormal", 0)} images'
                    for part, c in studies.items()) + ')')
  return lines + [f'- recorded {data["recorded"]}']


def torchvision_arguments(signature: dict) -> dict:
  """torchvision.models.DenseNet(...) arguments of the exported network."""
  if signature['arch'] == 'custom':
    fields = {k: signature[k] for k in ('growth_rate', 'num_init_features', 'bn_size')}
    fields['block_config'] = list(signature['block_config'])
  else:
    arch = densenet.ARCHS[signature['arch']]
    fields = {'growth_rate': arch['growth_rate'], 'block_config': list(arch['block_config']),
              'num_init_features': arch['num_init_features'], 'bn_size': 4}
  return {**fields, 'num_classes': signature['num_classes']}
