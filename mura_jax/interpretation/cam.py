"""The CAM job (`--config.mode=cam`, and after training where config.after_training lists cam):
class activation maps of a checkpoint on a split, over the views of the body parts the model
was trained on (its scope); overlays of the chosen studies on the model's display scale
(stored in WORKDIR/cam/display_scale.json from the validation split), how well the maps
localise (localisation.py) and whether they explain the model (sanity.py: randomised and
shuffled-labels controls, peaks on confounders, borders and black margins) ->
WORKDIR/cam/<split>/. The maps: maps.py; pictures: pictures.py.
"""

from __future__ import annotations

import json
import time

from absl import logging
from etils import epath
import jax
import numpy as np
from tfds_mura import ANNOTATIONS_FILE, BODY_PARTS, CONFOUNDERS_FILE

from mura_jax import checkpoints
from mura_jax import workdir as workdir_lib
from mura_jax.data import dataset as data_lib
from mura_jax.data import input_pipeline
from mura_jax.errors import ConfigError
from mura_jax.evaluation import scoring
from mura_jax.evaluation import studies
from mura_jax.inference import display_scale as display_scale_lib
from mura_jax.inference import predictor as predictor_lib
from mura_jax.interpretation import localisation as localisation_lib
from mura_jax.interpretation import maps as maps_lib
from mura_jax.interpretation import pictures
from mura_jax.interpretation import sanity

check = scoring.check_evaluation_config  # the studies drawn and their verdicts use its threshold


def _study_folder(study_id: str) -> str:
  return study_id.replace('/', '_')


def choose_studies(probabilities: np.ndarray, study_ids, threshold: float, chosen: str,
                   num_abnormal: int, num_uncertain: int) -> list[int]:
  """Study indices to draw: the listed ones (comma-separated ids), else the most confidently
  abnormal and the most uncertain (closest to the threshold)."""
  if chosen:
    wanted = [s.strip().strip('/').removeprefix('MURA-v1.1/') for s in chosen.split(',')]
    position = {s: i for i, s in enumerate(study_ids)}
    unknown = [s for s in wanted if s not in position]
    if unknown:
      raise ConfigError(f'config.cam.studies names studies not in the split: {unknown[:5]} '
                       f'(ids look like {study_ids[0]!r})')
    return [position[s] for s in wanted]
  order = list(np.argsort(-probabilities, kind='stable')[:num_abnormal])
  for s in np.argsort(np.abs(probabilities - threshold), kind='stable'):
    if len(order) >= num_abnormal + num_uncertain:
      break
    if s not in order:
      order.append(s)
  return [int(s) for s in order]


def no_boxes(split: str, given: str, manual_dir) -> str:
  """Why localisation is not measured: the split has no boxes, and which file would give them."""
  where = (f'config.cam.annotations={given} holds no boxes' if given else
           f'config.cam.annotations is empty, and {manual_dir} holds no {ANNOTATIONS_FILE}, the '
           'boxes a synthetic MURA has')
  return (f'The {split} split has no boxes ({where}): localisation is not measured. To measure '
          'it, pass --config.cam.annotations=CSV, a boxes CSV image_path,abnormality,x0,y0,x1,y1 '
          'of its abnormal views.')


def display_scale(predictor, maps: np.ndarray, split: str, workdir,
                  write: bool) -> maps_lib.DisplayScale:
  """The display scale of the pictures: on the validation split, fixed from its maps and stored
  for the checkpoint (display_scale.py: mura-predict --cam and exports read it); on another
  split, the stored one, else one fixed from that split's maps (the caption says which)."""
  step = predictor.checkpoint['step']
  if split != 'validation':
    stored = predictor.display_scale()
    if stored is not None:
      return maps_lib.DisplayScale.of(stored)
  found = {'top': maps_lib.display_top(maps), 'percentile': maps_lib.DISPLAY_PERCENTILE,
           'split': split, 'n_views': len(maps), 'step': step}
  if split == 'validation' and write:
    display_scale_lib.write(display_scale_lib.workdir_path(workdir), **found)
  return maps_lib.DisplayScale.of(found)


def run(config, workdir: str) -> dict:
  """Writes WORKDIR/cam/<split>/: overlays of the chosen studies (studies/<study>/), peaks.png,
  and localisation.json / localisation.md (with the pointing and Otsu figures where the split's
  boxes are known); prints the table."""
  c = config.cam
  manual_dir, data_dir = data_lib.dataset_dirs(config, workdir)
  predictor = predictor_lib.Predictor.from_workdir(workdir, c.checkpoint, config=config,
                                               global_batch=config.evaluation.global_batch_size)
  # The views of the model's scope only: a humerus model's maps of wrist views say nothing of it.
  source, index = data_lib.split_of_body_parts(
      data_dir, c.split, checkpoints.body_parts_of(predictor.spec),
      input_pipeline.read_split_index(data_dir, c.split))
  spec, bias = predictor.preprocessing, predictor.classifier_bias
  start = time.perf_counter()
  out = predictor.map_split(source, num_workers=config.data.num_workers)
  seconds = time.perf_counter() - start
  maps = out['map']

  def image(i):
    return np.asarray(source[int(i)]['image'])[..., 0]

  summary = {'split': c.split, 'checkpoint': predictor.checkpoint, 'n_views': len(index),
             'map_shape': list(maps.shape[1:]), 'flip_average': predictor.flip_average,
             'seconds': seconds,
             'views_per_second': len(index) / seconds, 'studies': []}
  out_dir = epath.Path(workdir) / 'cam' / c.split
  table = studies.from_split(index, out['probability'], config.evaluation.aggregation)
  threshold = config.evaluation.threshold
  is_main = jax.process_index() == 0
  scale = display_scale(predictor, maps, c.split, workdir, write=is_main)
  summary['display_scale'] = {'top': scale.top, 'outline': scale.outline, 'source': scale.source}
  for s in choose_studies(table.probability, index.studies, threshold, c.studies,
                          c.num_abnormal, c.num_uncertain):
    views = sorted(np.flatnonzero(index.study_index == s),  # image1, image2, ... as on disk
                   key=lambda v: (len(index.image_path[v]), index.image_path[v]))
    folder = out_dir / 'studies' / _study_folder(index.studies[s])
    title = (f'{index.studies[s]} (label: {"abnormal" if table.label[s] else "normal"})\n'
             f'study {pictures.verdict_caption(table.probability[s], threshold)} '
             f'({config.evaluation.aggregation} of {len(views)} view{"s" * (len(views) != 1)})')
    names = [index.image_path[v].rsplit('/', 1)[-1] for v in views]
    pictures.draw_study(folder, title, [
        (name, name, image(v), maps[v], out['probability'][v]) for name, v in zip(names, views)],
                        spec, scale, threshold, write=is_main)
    summary['studies'].append(str(folder))
  annotations = epath.Path(c.annotations or epath.Path(manual_dir) / ANNOTATIONS_FILE)
  boxes = localisation_lib.read_boxes(annotations) if annotations.exists() else {}
  if boxes:
    summary['annotations'] = str(annotations)
    summary['localisation'] = localisation_lib.localisation(
        maps, image, index.image_path, [BODY_PARTS[b] for b in index.body_part], boxes, bias, spec,
        num_resamples=c.bootstrap_resamples, seed=config.evaluation.seed)
  else:
    summary['no_boxes'] = no_boxes(c.split, c.annotations, manual_dir)
    logging.info('%s', summary['no_boxes'])
  confounders_file = epath.Path(c.confounders or epath.Path(manual_dir) / CONFOUNDERS_FILE)
  confounders = (sanity.read_confounders(confounders_file) if confounders_file.exists() else {})
  if confounders:
    summary['confounders'] = str(confounders_file)
  shuffled_dir = epath.Path(workdir) / workdir_lib.SHUFFLED_LABELS_CONTROL
  shuffled = None
  if checkpoints.steps_of(shuffled_dir / checkpoints.BEST):  # a finished control
    shuffled = predictor_lib.Predictor.from_workdir(
        shuffled_dir, 'best', config=config, global_batch=config.evaluation.global_batch_size,
        flip_average=predictor.flip_average)  # the controls' maps are made as the model's
  start = time.perf_counter()
  controls = sanity.control_maps(predictor, source, shuffled=shuffled,
                                 num_workers=config.data.num_workers, seed=c.randomisation_seed,
                                 draws=c.randomisation_draws)
  controls_seconds = time.perf_counter() - start
  summary['sanity'] = sanity.sanity_checks(
      predictor, maps, out['probability'], image, index.image_path, boxes, confounders, controls,
      threshold, num_resamples=c.bootstrap_resamples, seed=config.evaluation.seed)
  summary['sanity']['shuffled_labels_workdir'] = str(shuffled_dir)
  if shuffled is not None:
    summary['sanity']['shuffled_labels_checkpoint'] = shuffled.checkpoint
  summary['sanity']['seconds'] = {'control_maps': controls_seconds,
                                   'all': time.perf_counter() - start}
  text = localisation_lib.format_localisation(summary) + sanity.format_sanity(summary)
  if is_main:
    out_dir.mkdir(parents=True, exist_ok=True)
    histogram = np.asarray(summary['sanity']['peak_histogram'])
    pictures.save_png(out_dir / 'peaks.png', pictures.peak_figure(histogram))
    (out_dir / 'localisation.json').write_text(json.dumps(summary, indent=2) + '\n')
    (out_dir / 'localisation.md').write_text(text)
    print(text)
  return summary
