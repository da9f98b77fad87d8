"""Where the data comes from: the manual download (or a synthetic one) built into TFDS `mura`."""

from __future__ import annotations

import os

import ml_collections
from absl import logging
from etils import epath

from mura_jax import synthetic


def dataset_dirs(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
  """(manual_dir, data_dir) with the config's empty values resolved under the workdir."""
  manual_dir = config.data.manual_dir or os.fspath(epath.Path(workdir) / 'synthetic')
  data_dir = config.data.data_dir or os.fspath(epath.Path(workdir) / 'tfds')
  return manual_dir, data_dir


def prepare_dataset(config: ml_collections.ConfigDict, workdir: str):
  """Returns the built `mura` builder, making the synthetic MURA and building TFDS first if needed.

  Real MURA is never downloaded: without `config.data.synthetic` an unbuilt dataset and an empty
  manual_dir give an error that says what to download and where to put it.
  """
  from tfds_mura import build  # pylint: disable=g-import-not-at-top
  manual_dir, data_dir = dataset_dirs(config, workdir)
  num_workers = config.data.get('build_workers', 0) or None
  if config.data.synthetic and not (epath.Path(manual_dir) / 'MURA-v1.1').exists():
    logging.info('Writing a synthetic MURA-v1.1 to %s', manual_dir)
    summary = synthetic.make_synthetic_mura(
        manual_dir, config.data.synthetic_studies_per_part,
        config.data.synthetic_valid_studies_per_part, config.data.synthetic_seed, num_workers)
    logging.info('Synthetic MURA: %s', summary)
  builder = build.build(manual_dir, data_dir, num_workers=num_workers)
  return builder
