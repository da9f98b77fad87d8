"""TFDS's own builder test over `dummy_data/` (made by `python -m tfds_mura.mura.make_dummy_data`)."""

import pathlib

import pytest

pytest.importorskip('tensorflow', reason='tfds.testing.DatasetBuilderTestCase needs TensorFlow')

import tensorflow_datasets as tfds  # noqa: E402  pylint: disable=g-import-not-at-top

from tfds_mura.mura import mura_dataset_builder  # noqa: E402

_DUMMY = pathlib.Path(__file__).parent / 'dummy_data' / 'MURA-v1.1'


def _rows(split):
  return len((_DUMMY / f'{split}_image_paths.csv').read_text().splitlines())


class MuraTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = mura_dataset_builder.Builder
  # One example per row of the dummy CSVs (the sidecars beside them are not examples).
  SPLITS = {'train': _rows('train'), 'validation': _rows('valid')}
  SKIP_CHECKSUMS = True

  def _make_builder(self, config=None):
    # TFDS's test reads through `as_dataset`, which needs tfrecord (array_record is the default).
    return self.dataset_class(data_dir=self.tmp_dir, config=config, version=self.VERSION,
                              file_format='tfrecord')


if __name__ == '__main__':
  tfds.testing.test_main()
