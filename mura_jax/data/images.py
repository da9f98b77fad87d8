"""Reading radiographs from files: PNG, JPEG and DICOM -> uint8 gray (rows, columns, 1).

The result is what the dataset stores for a view, so `preprocessing.view_input` then gives the
network what it saw in training.

PNG / JPEG (Pillow): the EXIF orientation is applied; 8-bit and 16-bit gray go through the
dataset's own rule (`tfds_mura.to_grayscale`: 16-bit scaled by its significant bits); RGB whose
channels are equal (MURA's own RGB files) becomes gray exactly, RGB whose channels differ (a colour
photograph, not a radiograph) is converted to luma with a warning; transparent pixels are
composited onto black, with a warning (`tfds_mura.grayscale_notes`, the builder's notes too).

DICOM (pydicom), in the standard's order (PS3.3 C.11: modality LUT, VOI LUT, presentation LUT):
  1. the modality LUT (Rescale Slope/Intercept, or a Modality LUT Sequence);
  2. the VOI: a VOI LUT Sequence if present (its first item), else the first Window Center/Width
     with its VOI LUT Function (LINEAR, LINEAR_EXACT, SIGMOID), else the full range the pixel
     format can hold (Bits Stored, signed or not, through the modality LUT);
  3. MONOCHROME1 (minimum = white) inverted within the VOI's output range, so that bone is
     bright as in MURA; a Presentation LUT Shape of INVERSE is the same inversion (DX images carry
     both), so the image is inverted once when either says so, never twice;
  4. 8 bits from the VOI's output range: 0 is its minimum, 255 its maximum.
A LUT (Modality or VOI, PS3.3 C.11.1.1.1 and C.11.2.1.1) is applied here, not by pydicom (whose
8-bit tables index with 8-bit integers, so a table of more than 256 entries wraps, and which cannot
read 8-bit entries packed two to a word): LUT Descriptor = (entries, 0 meaning 65536; first mapped
input value, signed where the LUT's input can be negative; bits per entry, 8 or 16 (older files:
up to 16)); inputs below the first mapped value take the first entry, above the last the last.
8-bit entries come one to a 16-bit word, or two to a word (the word's low byte first, as PS3.5
orders OW), told apart by how many words the LUT Data holds.
Compressed transfer syntaxes decode through pydicom's plugins (RLE and deflate: pydicom itself;
JPEG baseline: Pillow; JPEG Lossless, JPEG-LS and JPEG 2000: python-gdcm, `mura-jax[dicom]`); a
missing decoder is an `ImageError` naming the transfer syntax and the package to install.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from etils import epath
from PIL import Image
from PIL import ImageOps

from mura_jax.data import preprocessing
from mura_jax.errors import UserError
from tfds_mura import grayscale_notes

PICTURE_SUFFIXES = ('.png', '.jpg', '.jpeg')
DICOM_SUFFIXES = ('.dcm', '.dicom')
IMAGE_SUFFIXES = PICTURE_SUFFIXES + DICOM_SUFFIXES
# The body parts DICOM's Body Part Examined names (CID 4031) for MURA's seven study types.
DICOM_BODY_PARTS = {'ELBOW': 'elbow', 'FINGER': 'finger', 'FOREARM': 'forearm', 'HAND': 'hand',
                    'HUMERUS': 'humerus', 'UPPERARM': 'humerus', 'SHOULDER': 'shoulder',
                    'WRIST': 'wrist'}
# Photometric Interpretations whose pixel_array pydicom returns as RGB (pixel_array's as_rgb).
_RGB_AFTER_DECODING = ('RGB', 'YBR_FULL', 'YBR_FULL_422', 'YBR_RCT', 'YBR_ICT')
# Which package decodes which compressed transfer syntax (all with licences that fit Apache-2.0).
_DECODERS = {'JPEG Baseline': 'Pillow (installed with mura-jax)',
             'JPEG Extended': 'Pillow (installed with mura-jax)',
             'JPEG 2000': 'python-gdcm (pip install "mura-jax[dicom]")',
             'JPEG-LS': 'python-gdcm (pip install "mura-jax[dicom]")',
             'JPEG Lossless': 'python-gdcm (pip install "mura-jax[dicom]")'}


class ImageError(UserError, ValueError):
  """A file that is not a readable radiograph; the message names it and says why."""


@dataclasses.dataclass
class View:
  """One radiograph read from a file."""
  path: str
  pixels: np.ndarray                    # uint8 (rows, columns, 1)
  warnings: list[str]
  study_uid: str | None = None          # DICOM StudyInstanceUID
  body_part: str | None = None          # DICOM BodyPartExamined, as written


def is_dicom(path) -> bool:
  """DICOM by suffix, or by the 'DICM' marker of Part 10 files (which often have no suffix)."""
  path = epath.Path(path)
  if path.suffix.lower() in DICOM_SUFFIXES:
    return True
  if path.suffix.lower() in PICTURE_SUFFIXES:
    return False
  with path.open('rb') as f:
    return f.read(132)[128:132] == b'DICM'


def read_view(path) -> View:
  """A PNG, JPEG or DICOM file -> View; ImageError (naming the file) if it is no radiograph.
  Any failure inside one file (a decoder's or a malformed tag's exception too) is an ImageError,
  so that one bad file is that file's error, never the end of a run over many."""
  try:
    if is_dicom(path):
      return _read_dicom(path)
    return _read_picture(path)
  except ImageError as e:
    if str(e).startswith(os.fspath(path)):
      raise
    raise ImageError(f'{path}: {e}') from e  # a LUT's or window's problem: name the file
  except OSError as e:
    raise ImageError(f'{path}: cannot be read ({type(e).__name__}: {e})') from e
  except Exception as e:  # pylint: disable=broad-except
    raise ImageError(f'{path}: cannot be read as a radiograph ({type(e).__name__}: '
                     f'{str(e).splitlines()[0] if str(e) else "no message"})') from e


# ------------------------------------------------------------------------------------------------
# PNG and JPEG.


def _read_picture(path) -> View:
  warnings = []
  with epath.Path(path).open('rb') as f:
    try:
      image = Image.open(f)
      image.load()  # decodes every row: a truncated file fails here
    except Exception as e:  # pylint: disable=broad-except  (Pillow raises several kinds)
      raise ImageError(f'{path}: not a readable PNG or JPEG image ({type(e).__name__}: {e})'
                       ) from None
    orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation; 1 = as stored
    if orientation != 1:
      image = ImageOps.exif_transpose(image)
      warnings.append(f'EXIF orientation {orientation} applied')
    warnings += grayscale_notes(image)  # the dataset's rule: transparency, colour
    try:
      gray = preprocessing.to_gray(image)
    except ValueError as e:
      raise ImageError(f'{path}: {e}') from None
    return View(os.fspath(path), np.asarray(gray, np.uint8)[..., None], warnings)


# ------------------------------------------------------------------------------------------------
# DICOM.


def _read_dicom(path) -> View:
  import pydicom  # pylint: disable=g-import-not-at-top
  from pydicom import pixels  # pylint: disable=g-import-not-at-top
  try:
    with epath.Path(path).open('rb') as f:
      ds = pydicom.dcmread(f)
  except Exception as e:  # pylint: disable=broad-except
    raise ImageError(f'{path}: not a readable DICOM file ({type(e).__name__}: {e})') from None
  if 'PixelData' not in ds:
    kind = getattr(ds.get('SOPClassUID'), 'name', None) or 'no SOP class'
    raise ImageError(f'{path}: a DICOM file without pixel data ({kind}): not an image')
  meta = getattr(ds, 'file_meta', None)
  syntax = meta.get('TransferSyntaxUID') if meta is not None else None
  try:
    arr = ds.pixel_array
  except Exception as e:  # pylint: disable=broad-except
    name = getattr(syntax, 'name', str(syntax))
    package = next((p for key, p in _DECODERS.items() if key in name), None)
    hint = f'; install {package}' if package else ''
    raise ImageError(f'{path}: cannot decode its {name} ({syntax}) pixel data{hint} '
                     f'({type(e).__name__}: {str(e).splitlines()[0]})') from None
  warnings = []
  photometric = str(ds.get('PhotometricInterpretation', 'MONOCHROME2')).strip()
  frames = int(ds.get('NumberOfFrames', 1) or 1)
  if frames > 1:
    arr = arr[0]
    warnings.append(f'{frames} frames: the first is used')
  if photometric not in ('MONOCHROME1', 'MONOCHROME2'):
    if arr.ndim == 3:
      # pydicom (>= 3) hands over RGB already: it converts YBR_FULL and YBR_FULL_422 itself, and
      # JPEG 2000's decoders undo YBR_RCT and YBR_ICT; converting again would corrupt it.
      rgb = arr if photometric in _RGB_AFTER_DECODING else pixels.convert_color_space(
          arr, photometric, 'RGB')
      warnings += _colour_warning(rgb)
      gray = preprocessing.to_gray(Image.fromarray(np.asarray(rgb, np.uint8), 'RGB'))
      return View(os.fspath(path), np.asarray(gray, np.uint8)[..., None], warnings,
                  _text(ds, 'StudyInstanceUID'), _text(ds, 'BodyPartExamined'))
    raise ImageError(f'{path}: unsupported Photometric Interpretation {photometric!r}')
  low, high = _stored_range(ds)
  if ds.get('ModalityLUTSequence'):
    values, (low, high) = _apply_lut(arr, ds.ModalityLUTSequence[0], ds, low < 0, 'Modality')
  else:
    values = pixels.apply_modality_lut(arr, ds).astype(np.float64)
  values, (low, high) = _voi(values, ds, low, high)
  if photometric == 'MONOCHROME1' or str(ds.get('PresentationLUTShape', '')).strip() == 'INVERSE':
    values = high + low - values
  gray = np.round((values - low) / max(high - low, 1e-12) * 255)
  return View(os.fspath(path), np.clip(gray, 0, 255).astype(np.uint8)[..., None], warnings,
              _text(ds, 'StudyInstanceUID'), _text(ds, 'BodyPartExamined'))


def _colour_warning(rgb: np.ndarray) -> list[str]:
  """MURA's RGB files have equal channels; differing ones mean a colour photograph."""
  return grayscale_notes(Image.fromarray(np.asarray(rgb, np.uint8), 'RGB'))


def _text(ds, keyword: str) -> str | None:
  value = ds.get(keyword)
  return None if value in (None, '') else str(value).strip()


def _stored_range(ds) -> tuple[float, float]:
  """The values the pixel format can hold, through the rescale (the stored range itself where
  a Modality LUT Sequence replaces the rescale: `_apply_lut` gives that LUT's range)."""
  bits = int(ds.get('BitsStored', ds.get('BitsAllocated', 8)))
  if int(ds.get('PixelRepresentation', 0)) == 1:
    low, high = -2 ** (bits - 1), 2 ** (bits - 1) - 1
  else:
    low, high = 0, 2 ** bits - 1
  if ds.get('ModalityLUTSequence'):
    return float(low), float(high)
  slope = float(ds.get('RescaleSlope', 1) or 1)
  intercept = float(ds.get('RescaleIntercept', 0) or 0)
  ends = sorted((low * slope + intercept, high * slope + intercept))
  return float(ends[0]), float(ends[1])


def _first(value) -> float:
  """The first of a multi-valued Window Center/Width (alternative windows), or the value."""
  try:
    return float(value)
  except TypeError:
    return float(value[0])


def _voi(values, ds, low, high):
  """(VOI output, its range (low, high)); see the module docstring."""
  if ds.get('VOILUTSequence'):
    return _apply_lut(values, ds.VOILUTSequence[0], ds, low < 0, 'VOI')
  if 'WindowCenter' in ds and 'WindowWidth' in ds:
    c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get('VOILUTFunction', 'LINEAR')).strip().upper() or 'LINEAR'
    if function == 'SIGMOID':
      return 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w)), (0.0, 1.0)
    if function == 'LINEAR_EXACT':
      return np.clip((values - c) / w + 0.5, 0.0, 1.0), (0.0, 1.0)
    # LINEAR (PS3.3 C.11.2.1.2.1): the (w - 1) and (c - 0.5) of the standard's formula.
    if w < 1:
      raise ImageError(f'Window Width {w} < 1 is invalid for the LINEAR VOI LUT function')
    return np.clip((values - (c - 0.5)) / max(w - 1, 1e-12) + 0.5, 0.0, 1.0), (0.0, 1.0)
  return values, (low, high)


def _apply_lut(values, item, ds, signed_input: bool, kind: str):
  """(values through the LUT of a Modality or VOI LUT Sequence item, the LUT's output range);
  see the module docstring."""
  descriptor = item.get('LUTDescriptor')
  if descriptor is None or 'LUTData' not in item or len(descriptor) != 3:
    raise ImageError(f'its {kind} LUT Sequence has no LUT Descriptor of 3 values or no LUT Data')
  entries, first, bits = (int(v) for v in descriptor)
  entries = entries % 2 ** 16 or 2 ** 16  # 0 means 65536; an SS-read count is still unsigned
  if first >= 2 ** 15 and signed_input:  # a negative first input written as US
    first -= 2 ** 16
  if not 8 <= bits <= 16:
    raise ImageError(f'its {kind} LUT Descriptor gives {bits} bits per entry: the standard '
                     'allows 8 or 16')
  words = _lut_words(item['LUTData'].value, ds)
  if bits == 8 and len(words) < entries <= 2 * len(words):  # two 8-bit entries to a word
    table = np.frombuffer(words.astype('<u2').tobytes(), np.uint8)[:entries]
  elif len(words) >= entries:
    table = words[:entries]
  else:
    raise ImageError(f'its {kind} LUT Data holds {len(words)} 16-bit words, too few for the '
                     f'{entries} entries of its LUT Descriptor')
  if table.max(initial=0) >= 2 ** bits:
    raise ImageError(f'its {kind} LUT Data has entries up to {int(table.max())}, more than the '
                     f'{bits} bits per entry of its LUT Descriptor')
  index = np.clip(np.round(np.asarray(values, np.float64)).astype(np.int64) - first, 0,
                  entries - 1)
  return table.astype(np.float64)[index], (0.0, float(2 ** bits - 1))


def _lut_words(value, ds) -> np.ndarray:
  """LUT Data as uint16 words: OW bytes in the dataset's byte order, or US values."""
  if isinstance(value, (bytes, bytearray)):
    little = getattr(ds, 'original_encoding', (None, True))[1]
    data = bytes(value) + b'\0' * (len(value) % 2)
    return np.frombuffer(data, '<u2' if little in (None, True) else '>u2').astype(np.uint16)
  values = [value] if isinstance(value, int) else list(value)
  return np.asarray(values, np.int64).astype(np.uint16)


def read_image(path: str | os.PathLike) -> np.ndarray:
  """A PNG, JPEG or DICOM file -> uint8 (H, W, 1) gray, as the dataset stores a view
  (`read_view`, which also returns the file's warnings)."""
  return read_view(path).pixels
