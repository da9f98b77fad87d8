"""Where the data comes from: the manual download (or a synthetic one) built into TFDS `mura`."""

from __future__ import annotations

import os

import ml_collections
from absl import logging
from etils import epath
from tfds_mura import BODY_PARTS
from tfds_mura import build
from tfds_mura import paths

from mura_jax.data import input_pipeline
from mura_jax.data import synthetic
from mura_jax.errors import ConfigError, DataError
from tfds_mura import folder_lock
import tfds_mura


def dataset_dirs(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
  """(manual_dir, data_dir) with the config's empty values resolved under the workdir."""
  manual_dir = config.data.manual_dir or os.fspath(epath.Path(workdir) / 'synthetic')
  data_dir = config.data.data_dir or os.fspath(epath.Path(workdir) / 'tfds')
  return manual_dir, data_dir


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Data mode: prepares the dataset (synthetic if configured) and prints what is in it."""
  builder = prepare_dataset(config, workdir)
  print(f'\nmura {builder.info.version} ({builder.info.file_format.value}) in {builder.data_dir}')
  print(build.summary_table(builder.info))


def prepare_dataset(config: ml_collections.ConfigDict, workdir: str):
  """Returns the built `mura` builder, making the synthetic MURA and building TFDS first if needed.

  Real MURA is never downloaded: without `config.data.synthetic` an unbuilt dataset and an empty
  manual_dir give an error that says what to download and where to put it.
  """
  manual_dir, data_dir = dataset_dirs(config, workdir)
  num_workers = config.data.get('build_workers', 0) or None
  if config.data.synthetic:
    write_synthetic_mura(config, manual_dir, num_workers)
  elif not config.data.manual_dir:  # none given: a built data_dir is used as train uses it
    manual_dir = None
  return build.build(manual_dir, data_dir, num_workers=num_workers)  # locks the data_dir


def write_synthetic_mura(config: ml_collections.ConfigDict, manual_dir: str,
                         num_workers: int | None) -> None:
  """Writes the configured synthetic MURA-v1.1 into manual_dir unless its CSVs are there (they
  are written after the images). Two runs sharing the manual_dir would write the same files:
  the writer holds manual_dir's lock, and a second is refused naming it."""
  root = epath.Path(manual_dir) / 'MURA-v1.1'
  if (root / 'train_labeled_studies.csv').exists():
    return
  with folder_lock.held(manual_dir, 'synthetic MURA write', error=DataError):
    if (root / 'train_labeled_studies.csv').exists():
      return  # written by a run that ended while we looked
    if root.exists() and any(root.iterdir()):
      raise DataError(f'{root} holds an incomplete MURA-v1.1 without its CSVs: a synthetic MURA '
                      f'whose writing was stopped? Delete {root} and run again to write it anew.')
    logging.info('Writing a synthetic MURA-v1.1 to %s', manual_dir)
    summary = synthetic.make_synthetic_mura(
        manual_dir, config.data.synthetic_studies_per_part,
        config.data.synthetic_valid_studies_per_part, config.data.synthetic_seed, num_workers)
    logging.info('Synthetic MURA: %s', summary)


# ------------------------------------------------------------------------------------------------
# Body-part subsets (config.data.body_parts): which study types a run trains and is evaluated on.


def requested_body_parts(value) -> tuple[str, ...] | None:
  """config.data.body_parts as part names in BODY_PARTS order; None for 'all' (the default).

  Accepts 'all', 'humerus,wrist', 'XR_HUMERUS', or a sequence of such names.
  """
  if isinstance(value, str):
    if value.strip().lower() in ('', 'all'):
      return None
    value = value.split(',')
  names = [str(v).strip().lower() for v in value if str(v).strip()]
  names = [paths.part_named(n) for n in names]
  unknown = [n for n in names if n not in BODY_PARTS]
  if unknown or not names:
    raise ConfigError(f'config.data.body_parts={value!r} names no MURA body part or an unknown one '
                     f'({unknown}); use "all" or a comma-separated list of {", ".join(BODY_PARTS)}.')
  return tuple(p for p in BODY_PARTS if p in names)


def training_body_parts(config: ml_collections.ConfigDict, data_dir: str) -> tuple[str, ...]:
  """The body parts a run trains and validates on: those asked for (default: all) that the built
  dataset has training images of; a part asked for by name without any is an error."""
  input_pipeline.data_source(data_dir, 'train')  # the clear error when it is not built
  counts = image_counts(data_dir, 'train')
  present = tuple(p for p in BODY_PARTS if sum(counts.get(p, {}).values()) > 0)
  requested = requested_body_parts(config.data.get('body_parts', 'all'))
  if requested is None:
    parts = present
    absent = [p for p in BODY_PARTS if p not in present]
    if absent:
      logging.warning('The dataset in %s has no training images of %s: training on the %d body '
                      'parts it has.', data_dir, ', '.join(absent), len(present))
  else:
    missing = [p for p in requested if p not in present]
    if missing:
      raise ConfigError(f'config.data.body_parts asks for {", ".join(missing)}, but the training '
                       f'split in {data_dir} has no {" or ".join(missing)} images (it has '
                       f'{", ".join(present) or "none"}); leave {"it" if len(missing) == 1 else "them"} '
                       'out.')
    parts = requested
  if not parts:
    raise DataError(f'The training split in {data_dir} has no images; build the dataset first.')
  logging.info('Body parts trained and validated on (training images normal/abnormal):\n%s',
               '\n'.join(f'  {p:<9} {counts[p]["normal"]:>6} {counts[p]["abnormal"]:>6}'
                         for p in parts))
  return parts


def split_of_body_parts(data_dir: str, split: str, body_parts, split_index=None):
  """(source, SplitIndex or None): the split's views of `body_parts`, as a random-access source.

  The whole split when its metadata shows no views of other parts (nothing is read); otherwise
  the views of those parts (`input_pipeline.SubsetSource`) and their index (read if not given).
  """
  source = input_pipeline.data_source(data_dir, split)
  counts = image_counts(data_dir, split)
  if all(p in body_parts for p in BODY_PARTS if sum(counts.get(p, {}).values()) > 0):
    return source, split_index
  if split_index is None:
    split_index = input_pipeline.read_split_index(data_dir, split)
  views = input_pipeline.views_of_body_parts(
      split_index, [BODY_PARTS.index(p) for p in body_parts])
  return input_pipeline.SubsetSource(source, views), input_pipeline.subset(split_index, views)


def data_origin(config: ml_collections.ConfigDict, data_dir: str, body_parts) -> dict:
  """What a run trains and validates on, for its checkpoints' spec and its model card: the data
  (a synthetic MURA, as the builder recorded it, or MURA-v1.1) and, of `body_parts` only, the
  studies and images per split (normal/abnormal)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  info = tfds.builder('mura', data_dir=data_dir).info
  metadata = info.metadata or {}
  synthetic = bool(metadata.get('synthetic', config.data.synthetic))
  # 'study_counts' / 'image_counts': the builder's names.
  counts = {kind: {split: {p: dict(metadata[f'{key}_counts'][split].get(p, {}))
                           for p in body_parts} for split in ('train', 'validation')}
            for kind, key in (('studies', 'study'), ('images', 'image'))
            if f'{key}_counts' in metadata}
  return {'dataset': 'synthetic MURA (mura-jax)' if synthetic else 'MURA-v1.1',
          'synthetic': synthetic, 'tfds': f'mura {info.version}',
          'splits': {'trained on': 'train', 'validated on': 'validation'}, **counts}


def image_counts(data_dir: str, split: str = 'train') -> dict[str, dict[str, int]]:
  """{body_part: {'normal': N, 'abnormal': A}} of a built split, from its metadata."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  info = tfds.builder('mura', data_dir=data_dir).info
  return tfds_mura.image_counts(info, split)
