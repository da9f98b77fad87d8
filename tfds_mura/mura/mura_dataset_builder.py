"""MURA-v1.1: musculoskeletal radiographs, one normal/abnormal label per study.

The builder reads only what the official CSVs list (never a glob), checks every row against the
files and folder names before writing anything (`manual_download.py`), and keeps each view as
one example with its study, body part, patient and view number, so that study-level prediction
can be rebuilt from it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tfds_mura import folder_lock
from tfds_mura.mura.manual_download import (ImageReport, View, changed_images,
                                            check_split, count_images, count_studies,
                                            encode_views, raise_for_images, warn, warn_for_notes)
from tfds_mura.mura.source import INSTRUCTIONS, MuraDataError, Source
from tfds_mura.paths import ANNOTATIONS_FILE, BODY_PARTS, HOMEPAGE, LABELS, SPLITS

_DESCRIPTION = """\
MURA (musculoskeletal radiographs) is a large dataset of bone X-rays: 40,561 multi-view radiographs
of 14,863 upper-extremity studies from 12,173 patients (elbow, finger, forearm, hand, humerus,
shoulder, wrist). Each study was labelled normal or abnormal by board-certified radiologists of
Stanford Hospital at diagnostic time. The public release (v1.1) has a train split (13,457 studies,
36,808 images) and a validation split (1,199 studies, 3,197 images); the test split is hidden.

Each example is one view (one PNG) of a study. Images are stored as 8-bit grayscale PNGs (RGB and
RGBA files of the release are converted to grayscale at build time). `study_id` groups the views of
a study (`valid/XR_WRIST/patient11185/study1_positive`): a study is identified by split, body part,
patient and study number together, since one patient can have `study1` under several body parts.

The image counts per split and body part (normal, abnormal), which the paper's weighted loss needs,
are in `info.metadata['image_counts']`, readable without decoding any image.
"""

_CITATION = """\
@article{rajpurkar2017mura,
  title   = {MURA: Large Dataset for Abnormality Detection in Musculoskeletal Radiographs},
  author  = {Rajpurkar, Pranav and Irvin, Jeremy and Bagul, Aarti and Ding, Daisy and Duan, Tony
             and Mehta, Hershel and Yang, Brandon and Zhu, Kaylie and Laird, Dillon and Ball,
             Robyn L. and Langlotz, Curtis and Shpanskaya, Katie and Lungren, Matthew P. and
             Ng, Andrew Y.},
  journal = {arXiv preprint arXiv:1712.06957},
  year    = {2017}
}
"""


# Beside dataset_info.json: each listed image's size, modification time and CRC-32 at build time,
# so that a reuse notices image files changed under the same CSVs (too long for the metadata,
# which every reader loads).
IMAGE_RECORD = 'image_files.json'
_MAX_CHANGED = 5  # changed files named in the error; the count says how many more


# ------------------------------------------------------------------------------------------------


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for MURA-v1.1."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.1.0': 'MURA-v1.1, the public release (train and valid splits).'}

  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  def __init__(self, *, file_format=None, num_workers: int | None = None, **kwargs):
    super().__init__(file_format=file_format, **kwargs)  # a built dataset keeps its own format
    if file_format is None and not self.is_prepared():
      # ArrayRecord by default: random access for grain, and no TensorFlow to write or read it.
      self.info.set_file_format('array_record', override=True)
    self._num_workers = num_workers or os.cpu_count() or 1
    # The warnings of the last download_and_prepare (CRLF, header rows, converted images, a
    # reused build), also logged: `python -m tfds_mura.build` prints them after its summary.
    self.build_warnings: list[str] = []

  def is_prepared(self) -> bool:
    # TFDS 4.9.10 warns "Variant folder ... has no dataset_info.json" when asked about a version
    # folder that does not exist yet: at the start of every first build, where nothing is wrong.
    return (epath.Path(self.data_path) / 'dataset_info.json').exists() and super().is_prepared()

  def download_and_prepare(self, *, download_config=None, **kwargs):
    """TFDS's, except that a dataset already built in the data_dir is reused only when the
    manual_dir given holds the MURA it was built from (`check_reuse`), and says so."""
    self.build_warnings = []
    manual_dir = download_config.manual_dir if download_config is not None else None
    overwrite = download_config is not None and download_config.download_mode.overwrite_dataset
    if self.is_prepared():
      if manual_dir and not overwrite:
        self.check_reuse(manual_dir)
      super().download_and_prepare(download_config=download_config, **kwargs)
      return
    # One build at a time into a data_dir: two would write the same shards.
    with folder_lock.held(self.data_dir_root, 'dataset build', error=MuraDataError):
      super().download_and_prepare(download_config=download_config, **kwargs)

  def check_reuse(self, manual_dir: epath.PathLike | None) -> None:
    """Returns, with a warning that says what was compared, when the built dataset may be
    reused: no manual_dir given, or one that holds the MURA it was built from (the same four
    CSVs, and each listed image file unchanged, `changed_images`). Anything else is an error,
    never a silent reuse of other data or old pixels."""
    built = self.info.metadata.get('source') if self.info.metadata else None
    where = epath.Path(self.data_dir)
    data_dir = os.fspath(where.parent.parent)
    origin = (f"from {built['read']} on {built['built']}" if built else 'by an earlier version '
              'that recorded no source')
    if not manual_dir:
      warn(self.build_warnings, f'Using the mura dataset already built in {where} ({origin}; no '
                                 'manual_dir given, nothing compared).')
      return
    try:
      source = Source(manual_dir)
    except MuraDataError:
      raise MuraDataError(
          f'{where} already holds a built mura dataset ({origin}), and the manual_dir '
          f'{manual_dir} has no MURA-v1.1 to compare it with. To use the built dataset, give no '
          f'manual_dir (python -m tfds_mura.build --data_dir {data_dir}); to build again, put '
          f'MURA-v1.1.zip or MURA-v1.1/ in the manual_dir and delete {where}.') from None
    if built is None:
      raise MuraDataError(
          f'{where} holds a mura dataset built by an earlier version, which did not record its '
          f'source: whether it is the MURA in {manual_dir} cannot be checked. Delete {where} to '
          'build again, or give no manual_dir to use it as it is.')
    if built['csv_sha256'] != source.fingerprint():
      raise MuraDataError(
          f'{where} already holds a mura dataset built {origin}, but the manual_dir {manual_dir} '
          f'holds another MURA (its CSVs differ). Delete {where} to build from {manual_dir}, or '
          'pass another --data_dir.')
    rebuild = (f'delete {where.parent} (the mura/ folder of the data_dir) to build again, or '
               'pass another --data_dir')
    try:
      recorded = json.loads((where / IMAGE_RECORD).read_text())['images']
    except FileNotFoundError:
      warn(self.build_warnings, f'Using the mura dataset already built in {where} ({origin}). '
                                 f'Only its four CSVs could be compared with those in {manual_dir} '
                                 '(the same): it was built before image sizes and times were '
                                 'recorded, so image files changed since are not noticed; if '
                                 f'they may have changed, {rebuild}.')
      return
    changed, same_bytes = changed_images(source, recorded, self._num_workers)
    if changed:
      listed = '\n  '.join(changed[:_MAX_CHANGED])
      more = (f'\n  ... and {len(changed) - _MAX_CHANGED} more' if len(changed) > _MAX_CHANGED
              else '')
      raise MuraDataError(
          f'{where} was built {origin} from the same CSVs as in {manual_dir}, but '
          f'{len(changed)} of the {len(recorded):,} image files they list changed since:\n  '
          f'{listed}{more}\nThe built dataset holds their old pixels. To build from the files '
          f'as they are now, {rebuild}.')
    if source.is_zip:
      compared = (f"the size and CRC-32 of each of the {len(recorded):,} images they list, from "
                  "the zip's directory")
    else:
      compared = (f'the size and modification time of each of the {len(recorded):,} images they '
                  'list' + (f' ({same_bytes:,} with a new time read again: the same bytes, by '
                            'CRC-32)' if same_bytes else ''))
    warn(self.build_warnings, f'Using the mura dataset already built in {where} ({origin}): '
                               f'compared with {source.description}, the same four CSVs and '
                               f'{compared}.')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format='png'),
            'label': tfds.features.ClassLabel(names=LABELS),
            'body_part': tfds.features.ClassLabel(names=BODY_PARTS),
            'study_id': tfds.features.Text(),
            'patient_id': tfds.features.Scalar(dtype=np.int32),
            'view': tfds.features.Scalar(dtype=np.int32),
            'image_path': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage=HOMEPAGE,
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as e:  # TFDS's own error for a missing or empty manual_dir
      given = getattr(dl_manager, '_manual_dir', None)
      if given:
        Source(given)  # raises the error that says what is missing where
      raise MuraDataError(f'{e}') from None
    except NotADirectoryError as e:  # a file given as manual_dir (often the zip itself)
      Source(e.filename)  # raises the error that says which folder to give
      raise
    source = Source(manual_dir)
    # Check both splits before writing anything: a bad validation CSV should not cost a train
    # build. With CSV problems, every image is decoded too, so that one error lists everything.
    checked = {split: check_split(source, split, self._num_workers, self.build_warnings)
               for split in SPLITS}
    views = {split: v for split, (v, _) in checked.items()}
    csv_problems = [f'{split}: {p}' for split, (_, problems) in checked.items() for p in problems]
    report = ImageReport()
    if csv_problems:
      for v in views.values():
        for _ in encode_views(source, v, self._num_workers, report):
          pass
      raise_for_images(report, csv_problems)
    self.info.metadata['image_counts'] = {SPLITS[s]: count_images(v) for s, v in views.items()}
    self.info.metadata['study_counts'] = {SPLITS[s]: count_studies(v) for s, v in views.items()}
    # mura_jax's synthetic MURA writes its boxes beside MURA-v1.1/: say so, so that nobody takes
    # a model of it for one of the real data (model cards, licence terms).
    self.info.metadata['synthetic'] = source.exists(ANNOTATIONS_FILE)
    # What it was built from: a later build into this data_dir reuses it only from the same CSVs
    # and image files (IMAGE_RECORD). Stat before reading: a file changed during the build then
    # has a new time, and a reuse compares its bytes with those built (CRC-32).
    self.info.metadata['source'] = {'manual_dir': os.fspath(manual_dir),
                                    'read': source.description,
                                    'csv_sha256': source.fingerprint(),
                                    'built': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
    paths = [v.image_path for split_views in views.values() for v in split_views]
    self._image_stats = dict(zip(paths, source.image_stats(paths, self._num_workers)))
    last = list(views)[-1]
    return {SPLITS[s]: self._generate_examples(source, v, report, s == last)
            for s, v in views.items()}

  def _generate_examples(self, source: Source, views: Sequence[View], report: ImageReport,
                         last: bool):
    """A split's examples; after the last split, one error for every bad image of all splits
    (TFDS then keeps nothing of the build)."""
    yield from self._examples(source, views, report)
    if last:
      raise_for_images(report)
      warn_for_notes(report, self.build_warnings)
      self.info.metadata['converted_images'] = len(report.notes)
      # self.data_dir is TFDS's temporary folder here, renamed with the shards when all is done.
      unseen = (-1, None)  # gone before it was read: differs from any file, as it should
      images = {path: [*(stat or unseen)[:2], report.crc32[path]]
                for path, stat in self._image_stats.items()}
      (epath.Path(self.data_dir) / IMAGE_RECORD).write_text(json.dumps({'images': images}))

  def _examples(self, source: Source, views: Sequence[View], report: ImageReport):
    for v, png in encode_views(source, views, self._num_workers, report):
      yield v.image_path, {
          'image': png,
          'label': v.label,
          'body_part': v.body_part,
          'study_id': v.study_id,
          'patient_id': v.patient_id,
          'view': v.view,
          'image_path': v.image_path,
      }


def image_counts(info: tfds.core.DatasetInfo, split: str = 'train') -> dict[str, dict[str, int]]:
  """{body_part: {'normal': N, 'abnormal': A}} of a built MURA split, from metadata (no decoding)."""
  metadata = info.metadata
  if metadata is None or 'image_counts' not in metadata:
    raise MuraDataError(f'{info.data_dir} has no image_counts metadata: rebuild it with tfds_mura '
                        '>= 1.1.0 (python -m tfds_mura.build).')
  if split not in metadata['image_counts']:
    raise MuraDataError(f'split {split!r} not in {sorted(metadata["image_counts"])}')
  return metadata['image_counts'][split]
