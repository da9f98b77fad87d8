"""The CAM report's trained control (train.shuffled_labels_control): after the run, the same
network trained with the same recipe on the same views, their study labels permuted within body
part, into WORKDIR/controls/shuffled_labels (a workdir of its own). Its maps, against the trained
model's, show what of the maps comes from the labels (interpretation/sanity.py reads it).

Labels are permuted by study, so a study's views keep one label and each body part keeps its
number of abnormal studies; the loss weights stay the real data's (the recipe is unchanged).
"""

from __future__ import annotations

import json

from etils import epath
import jax
import numpy as np

from mura_jax import workdir as workdir_lib
from mura_jax.data import dataset as data_lib
from mura_jax.data import input_pipeline


class RelabelledSource:
  """A random-access source whose examples carry other labels (one per example)."""

  def __init__(self, source, labels):
    self._source = source
    self.labels = np.asarray(labels, np.int32)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    return {**self._source[int(i)], 'label': self.labels[int(i)]}


def shuffled_study_labels(index: input_pipeline.SplitIndex, seed: int) -> np.ndarray:
  """(views,) labels: the studies' labels permuted among the studies of each body part."""
  rng = np.random.default_rng([seed, 28])
  num_studies = int(index.study_index.max()) + 1
  study_label = np.zeros(num_studies, np.int32)
  study_part = np.full(num_studies, -1, np.int64)
  study_label[index.study_index], study_part[index.study_index] = index.label, index.body_part
  shuffled = study_label.copy()
  for part in np.unique(study_part[study_part >= 0]):
    members = np.flatnonzero(study_part == part)
    shuffled[members] = study_label[rng.permutation(members)]
  return shuffled[index.study_index]


def shuffled_labels(seed: int):
  """train_and_evaluate's `relabel`: (training source, data_dir, body parts) -> the source with
  its study labels permuted within body part."""
  def relabel(source, data_dir, body_parts):
    _, index = data_lib.split_of_body_parts(
        data_dir, 'train', body_parts, input_pipeline.read_split_index(data_dir, 'train'))
    assert len(index) == len(source), (len(index), len(source))
    return RelabelledSource(source, shuffled_study_labels(index, seed))
  return relabel


def control_config(config, workdir):
  """The control's config: the run's, on the run's data (its folders named, as the control's
  workdir is another), without the control itself and nothing after training."""
  control = config.copy_and_resolve_references()
  control.data.manual_dir, control.data.data_dir = data_lib.dataset_dirs(config, workdir)
  control.data.synthetic = False  # made, if at all, by the run
  control.train.shuffled_labels_control = False
  control.after_training = ''
  return control


def write_note(control_dir, seed: int) -> None:
  if jax.process_index() == 0:
    epath.Path(control_dir).mkdir(parents=True, exist_ok=True)
    (epath.Path(control_dir) / 'control.json').write_text(json.dumps({
        'control': 'shuffled_labels', 'labels': 'training study labels permuted within body '
        'part (validation labels real)', 'seed': seed}, indent=2) + '\n')


def control_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / workdir_lib.SHUFFLED_LABELS_CONTROL
