"""The one door into a trained model: a `Predictor` maps views to probabilities, weighted losses and
class activation maps.

Every consumer goes through it: the validation at the end of each training epoch (built from the
train state's variables), evaluate mode and its ensembles, CAM, `mura-predict` and export. The
network's input is always `preprocessing`'s, with the settings stored in the checkpoint's spec; the
forward pass is one jitted step (steps.py) over a batch sharded across all devices, compiled once
per predictor and kind of step, so evaluate mode reproduces the training run's own validation
probabilities exactly. An export folder is read by `exported.ExportedPredictor`, which answers the
same calls (`predict_views`, `predict_views_and_maps`) for `mura-predict --model`.

    predictor = Predictor.from_workdir(workdir, 'best')
    probabilities = predictor.predict_views([gray_view, ...])     # uint8 (H, W, 1) each
    study = predictor.study_probabilities(probabilities, study_index, num_studies)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from scipy import special
from etils import epath

from mura_jax import checkpoints
from mura_jax import workdir as workdir_lib
from mura_jax.data import preprocessing as preprocessing_lib
from mura_jax.evaluation import studies
from mura_jax.inference import display_scale as display_scale_lib
from mura_jax.inference import steps
from mura_jax.models import densenet
from mura_jax.runtime import parallel


def flip_average_of(config) -> bool:
  """config.cam.flip_average; False (the paper's plain maps) where a config, or a workdir's
  config.json that predates the key, does not say."""
  cam = None if config is None else config.get('cam')
  return bool(cam is not None and cam.get('flip_average', False))


@dataclasses.dataclass
class Predictor:
  """A network with its variables and preprocessing, ready to map views to probabilities."""
  model: densenet.DenseNet
  variables: Any                  # {'params', 'batch_stats'}, replicated over `mesh`
  preprocessing: preprocessing_lib.Preprocessing
  mesh: Any
  spec: dict                      # the checkpoint's spec (model, preprocessing, step, ...)
  checkpoint: dict                # {'which', 'step', 'directory'}
  global_batch: int = 64
  tta: str = 'none'               # 'flip': test-time augmentation in predict_split / predict_views
  flip_average: bool = False      # maps: the mean of the view's and its mirror's (config.cam)
  # Every probability it gives is sigmoid(logit / temperature) (checkpoints.read_temperature).
  temperature: float = 1.0
  # Compiled steps by kind, shared by the predictors `with_variables` makes (one compile for
  # every epoch's validation, or every member of an ensemble with the same network).
  compiled: dict = dataclasses.field(default_factory=dict, repr=False)
  workdir: Any = None             # where from_workdir restored it (its CAM display scale)

  @classmethod
  def from_workdir(cls, workdir, which: str | int = 'best', *, config=None,
                   global_batch: int = 64, mesh=None, tta: str = 'none',
                   temperature: float | None = None,
                   flip_average: bool | None = None) -> Predictor:
    """Restores a checkpoint of a workdir: 'best', 'latest' or a step number.

    The model and preprocessing come from the checkpoint's spec. With a `config`, its model must
    be the checkpoint's (CheckpointMismatchError otherwise) and its compute dtype is used.
    `temperature`: None, the one stored for this checkpoint (WORKDIR/temperature.json, also put
    in the spec as 'temperature'), else 1; or a number (1.0: the network's own probabilities).
    `flip_average` (maps, steps.view_maps): None, the config's cam.flip_average (the workdir's
    config.json without a `config`; False where neither says).
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(global_batch, mesh)
    name, step = checkpoints.choose(workdir, which)
    found = checkpoints.read_spec(workdir, name, step)
    signature = found['model']
    options = {}
    if config is not None:
      signature = checkpoints.model_signature(config)
      options = dict(dtype=config.model.dtype)
    # Every use of a predictor's model is inference: the dense blocks unrolled.
    model = steps.inference_network(densenet.create_model(signature, **options))
    variables, found = checkpoints.restore_variables(
        workdir, name, step, model, parallel.replicated(mesh), signature)
    preprocessing = preprocessing_lib.Preprocessing(**found['preprocessing'])
    logging.info('Restored the %s checkpoint (step %d) of %s: %s, %s.', which, step, workdir,
                 signature['arch'], preprocessing)
    if temperature is None:
      stored = checkpoints.read_temperature(workdir, name, step)
      found = {**found, 'temperature': stored}
      temperature = 1.0 if stored is None else float(stored['temperature'])
    if flip_average is None:
      flip_average = flip_average_of(config if config is not None else
                                     workdir_lib.read_config(workdir))
    return cls(model=model, variables=variables, preprocessing=preprocessing, mesh=mesh,
               spec=found, global_batch=global_batch, tta=tta, temperature=float(temperature),
               flip_average=bool(flip_average),
               workdir=epath.Path(workdir),
               checkpoint={'which': str(which), 'step': int(step),
                           'directory': str(epath.Path(workdir) / name)})

  @classmethod
  def for_training(cls, model, preprocessing: preprocessing_lib.Preprocessing, mesh,
                   global_batch: int) -> Predictor:
    """The predictor of a training run's validation: the run's network (unrolled for inference),
    the variables given each epoch by `with_variables`."""
    return cls(model=steps.inference_network(model), variables=None, preprocessing=preprocessing,
               mesh=mesh, spec={}, checkpoint={}, global_batch=global_batch)

  def network_key(self) -> str:
    """What the compiled steps depend on besides the variables' values: predictors with the same
    key can share them (`sharing_steps_of`), e.g. the K best checkpoints of one run."""
    return repr((self.model, str(self.model.dtype), self.preprocessing, self.tta,
                 self.flip_average, self.mesh))

  def sharing_steps_of(self, others: dict) -> Predictor:
    """This predictor with the compiled steps of an earlier one of the same network, kept in
    `others` ({network_key: steps})."""
    return dataclasses.replace(self, compiled=others.setdefault(self.network_key(), self.compiled))

  def with_variables(self, variables) -> Predictor:
    """The same network and compiled steps with other variables (a training state's, a
    randomised copy for CAM's sanity check)."""
    return dataclasses.replace(self, variables=variables)

  def step(self, kind: str = 'predict', loss_weights=None):
    """The jitted step of a kind ('predict', with the weighted loss given loss weights; 'map'; 'maps'
    on fitted in-memory images), compiled once per predictor (and those sharing its steps)."""
    key = (kind, None if loss_weights is None else tuple(np.asarray(loss_weights).ravel()))
    if key not in self.compiled:
      in_channels = self.preprocessing.in_channels
      if kind == 'predict':
        self.compiled[key] = steps.compile_predict_step(self.model, in_channels, self.mesh,
                                                        loss_weights, tta=self.tta)
      elif kind == 'map':
        self.compiled[key] = steps.compile_map_step(self.model, in_channels, self.mesh,
                                                    self.flip_average)
      else:  # 'maps': in-memory images already fitted to the input size, any batch
        self.compiled[key] = jax.jit(lambda variables, images: steps.view_maps(
            variables, images, model=self.model, in_channels=in_channels,
            flip_average=self.flip_average))
    return self.compiled[key]

  def predict_split(self, source, *, loss_weights=None, num_workers: int = 0,
                    progress: bool = True) -> dict[str, np.ndarray]:
    """Per-view probabilities (and, given loss weights, weighted losses) of a TFDS split (or any
    random-access source of views), in its order."""
    return self._scaled(steps.predict_split(
        self.step('predict', loss_weights), self.variables, source, mesh=self.mesh,
        global_batch=self.global_batch, preprocessing=self.preprocessing,
        num_workers=num_workers, progress=progress))

  def map_split(self, source, *, num_workers: int = 0,
                progress: bool = True) -> dict[str, np.ndarray]:
    """Per-view probabilities, logits and class activation maps (V, h, w) of a split (CAM)."""
    return self._scaled(steps.predict_split(
        self.step('map'), self.variables, source, mesh=self.mesh, global_batch=self.global_batch,
        preprocessing=self.preprocessing, num_workers=num_workers, progress=progress))

  def view_maps(self, images) -> tuple[np.ndarray, np.ndarray]:
    """(logits (B,), maps (B, h, w)) of uint8 views already fitted to the input size (B, S, S, 1),
    on one device: CAM's blank-image and randomisation checks."""
    return jax.device_get(self.step('maps')(self.variables, images))

  @property
  def classifier_bias(self) -> float:
    return steps.classifier_bias(self.variables)

  def display_scale(self) -> dict | None:
    """The CAM display scale the CAM job stored for this checkpoint (display_scale.py), or None."""
    if self.workdir is None:
      return None
    return display_scale_lib.read(display_scale_lib.workdir_path(self.workdir),
                                  self.checkpoint.get('step'))

  def predict_views_and_maps(self, views: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (V,), class activation maps (V, h, w)) of gray uint8 views of any size."""
    out = self._scaled(steps.predict_split(
        self.step('map'), self.variables, steps.ViewSource(views), mesh=self.mesh,
        global_batch=self._batch_for(len(views)), preprocessing=self.preprocessing))
    return out['probability'], out['map']

  def predict_views(self, views: Sequence[np.ndarray]) -> np.ndarray:
    """Probabilities (V,) of gray uint8 views (H, W, 1) of any size, e.g. from
    `images.read_image`; batched and padded to the mesh like a split."""
    return self._scaled(steps.predict_split(
        self.step('predict'), self.variables, steps.ViewSource(views), mesh=self.mesh,
        global_batch=self._batch_for(len(views)), preprocessing=self.preprocessing,
        progress=False))['probability']

  def _scaled(self, out: dict) -> dict:
    """The step's outputs with the probabilities of this predictor's temperature."""
    if self.temperature != 1.0:
      out['probability'] = temperature_scaled(out['logit'], self.temperature)
    return out

  def _batch_for(self, num_views: int) -> int:
    return steps.fitted_batch(num_views, self.global_batch, self.mesh.size)

  @staticmethod
  def study_probabilities(view_probabilities, view_study_index, num_studies: int,
                          aggregation: str = 'mean') -> np.ndarray:
    """Study probabilities: the mean (the paper) or max of each study's views."""
    return studies.aggregate_float64(view_probabilities, view_study_index, num_studies,
                                     None, aggregation)[0]


def temperature_scaled(logits, temperature: float) -> np.ndarray:
  """float64 sigmoid(logit / T): temperature-scaled probabilities (evaluation/calibration.py)."""
  return special.expit(np.asarray(logits, np.float64) / temperature)
