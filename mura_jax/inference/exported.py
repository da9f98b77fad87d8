"""An export folder read back (`mura-predict --model EXPORT_DIR`): the jax.export artifact, checked
against export.json's sha256, answering the calls a `predictor.Predictor` answers
(`predict_views`, `predict_views_and_maps`); and the export's JSON files, a damaged one named with
what to do. What an export holds: serving/export.py."""

from __future__ import annotations

import hashlib
import json
import os

from etils import epath
from jax import export as jax_export
import numpy as np

from mura_jax.data import preprocessing as preprocessing_lib
from mura_jax.errors import UserError
from mura_jax.inference import display_scale as display_scale_lib

FORMAT_VERSION = 1


class ExportError(UserError, ValueError):
  """An export folder that cannot be read or written as asked; the message says what to do."""


def sha256(path) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


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


class ExportedPredictor:
  """An export folder's jax.export artifact, used like `predictor_lib.Predictor` by mura-predict."""

  def __init__(self, folder):
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
      spec = dict(manifest['spec'])
      # Its scope (the body parts it was trained and validated on): absent from an export of
      # mura-jax before issue 28, which mura-predict takes as all seven (checkpoints.body_parts_of).
      parts = spec.get('body_parts')
      if parts is not None and not (isinstance(parts, list) and
                                    all(isinstance(p, str) for p in parts)):
        raise TypeError(f'body_parts {parts!r} is not a list of body part names')
      # Applied inside the artifact already (export.serving_function): kept to be said.
      temperature = float((manifest['spec'].get('temperature') or {}).get('temperature', 1.0))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise ExportError(f'{manifest_path} is damaged ({type(e).__name__}: {e} in files, spec, '
                        f'checkpoint or classifier_bias); {AGAIN}.') from e
    if not artifact.exists() or sha256(artifact) != expected:
      raise ExportError(f'{artifact} is missing or does not match export.json\'s sha256: the '
                        'export is damaged; export again.')
    self.folder = folder
    self.manifest = manifest
    self.exported = jax_export.deserialize(artifact.read_bytes())
    self.preprocessing = preprocessing
    self.checkpoint = checkpoint
    self.classifier_bias = bias
    self.spec = spec  # model, preprocessing, body_parts, data (what the checkpoint's spec had)
    self.temperature = temperature
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

  def display_scale(self) -> dict | None:
    """The CAM display scale the export carries (display_scale.py), or None."""
    return display_scale_lib.read(self.folder / display_scale_lib.EXPORT_FILE,
                                  self.checkpoint.get('step'))


def load(folder) -> ExportedPredictor:
  return ExportedPredictor(folder)
