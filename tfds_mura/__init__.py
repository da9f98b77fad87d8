"""The TFDS builder `mura` (MURA-v1.1). `import tfds_mura` registers it with TFDS.

    import tfds_mura, tensorflow_datasets as tfds
    builder = tfds.builder('mura', data_dir=DATA_DIR)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MANUAL_DIR))
    train = tfds.data_source('mura', data_dir=DATA_DIR, split='train')   # grain / random access

A built dataset is read without this package: `tfds.data_source('mura', data_dir=DATA_DIR)`.
"""

from tfds_mura.grayscale import grayscale_notes
from tfds_mura.grayscale import to_grayscale
from tfds_mura.mura.mura_dataset_builder import Builder as Mura
from tfds_mura.mura.mura_dataset_builder import image_counts
from tfds_mura.mura.source import MuraDataError
from tfds_mura.paths import ANNOTATIONS_FILE
from tfds_mura.paths import CONFOUNDERS_FILE
from tfds_mura.paths import BODY_PARTS
from tfds_mura.paths import LABELS

__all__ = ['BODY_PARTS', 'LABELS', 'Mura', 'MuraDataError', 'grayscale_notes', 'image_counts',
           'to_grayscale']
