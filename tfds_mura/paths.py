"""MURA's names, stated once: the body parts, the labels, the splits, the files of the download and
the `XR_<PART>` folders of its study paths. Every other module (the builder, mura_jax) reads them
from here."""

from __future__ import annotations

import os
import re

# The 7 study types, in the order of the ClassLabel (alphabetical, as the folders `XR_<PART>`).
BODY_PARTS = ('elbow', 'finger', 'forearm', 'hand', 'humerus', 'shoulder', 'wrist')
LABELS = ('normal', 'abnormal')
# MURA's folder names -> TFDS split names.
SPLITS = {'train': 'train', 'valid': 'validation'}
ROOT = 'MURA-v1.1'
ZIP_NAME = 'MURA-v1.1.zip'
CSV_NAMES = ('train_labeled_studies.csv', 'train_image_paths.csv', 'valid_labeled_studies.csv',
             'valid_image_paths.csv')
# The boxes of a synthetic MURA's abnormalities, beside its MURA-v1.1/ (its marker too).
ANNOTATIONS_FILE = 'synthetic_annotations.csv'
# The boxes of its confounders (laterality markers, text blocks, rulers), in both classes' views.
CONFOUNDERS_FILE = 'synthetic_confounders.csv'

IMAGE_PATH = re.compile(
    r'^MURA-v1\.1/(?P<split>train|valid)/XR_(?P<part>[A-Z]+)/patient(?P<patient>\d+)/'
    r'study(?P<study>\d+)_(?P<folder_label>positive|negative)/image(?P<view>\d+)\.png$')


def part_folder(body_part: str) -> str:
  """'XR_WRIST' of 'wrist': MURA's folder of a body part."""
  return f'XR_{body_part.upper()}'


def part_named(name: str) -> str:
  """'wrist' of 'XR_WRIST', 'xr_wrist', 'WRIST' or 'wrist' (any name, in scope or not)."""
  name = name.strip().lower()
  return name[3:] if name.startswith('xr_') else name


def body_part_of_path(path: str | os.PathLike) -> str | None:
  """The body part of the last `XR_<PART>` folder in a path ('wrist' for
  `.../XR_WRIST/patient11185/study1_positive/image1.png`; the lower-cased name for an XR_ folder
  of another part, out of MURA's scope); None without one."""
  for part in reversed(os.fspath(path).replace('\\', '/').split('/')):
    if part.upper().startswith('XR_'):
      return part_named(part)
  return None


HOMEPAGE = 'https://stanfordmlgroup.github.io/competitions/mura/'
