"""The dataset's one rule for 8-bit grayscale views, shared with prediction.

The builder stores every view through `grayscale_png`; `mura_jax.data.preprocessing` and
`mura_jax.data.images` apply `to_grayscale` and `grayscale_notes` to files given for prediction, so a
view stored in the dataset and the same file read at prediction time give identical pixels and
the same warnings.
"""

from __future__ import annotations

import io

import numpy as np


def to_grayscale(image):
  """The dataset's one rule for 8-bit grayscale, from a decoded PIL image of any MURA-like mode.

  `mura_jax.data.preprocessing` applies the same function to files given for prediction, so a view
  stored here and the same file read at prediction time give the network identical pixels.
    L                    kept as it is.
    RGB, RGBA, LA, P, 1  ITU-R 601 luma (exact for MURA's RGB files, whose channels are equal).
                         Transparent pixels are composited onto black, a radiograph's
                         background (dropping alpha would show what they hide); an opaque alpha
                         channel changes nothing. `grayscale_notes` says when either happened.
    I;16, I              16-bit (or 32-bit integer) gray, scaled by its significant bits: a file
                         whose largest value has b > 8 bits is shifted right by b - 8, so 12-bit
                         data (0..4095, as exported from DICOM) keeps its contrast instead of
                         turning black, and true 16-bit data keeps its top 8 bits.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.mode == 'L':
    return image
  if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    pixels = np.asarray(image, np.int64)
    if pixels.size and pixels.min() < 0:
      raise ValueError(f'negative pixel values in a {image.mode} image')
    bits = max(8, int(pixels.max(initial=0)).bit_length())
    return Image.fromarray((pixels >> (bits - 8)).astype(np.uint8))
  if _has_transparency(image):
    black = Image.new('RGBA', image.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, image.convert('RGBA')).convert('L')
  if image.mode in ('RGB', 'RGBA', 'LA', 'P', '1'):
    return image.convert('L')
  raise ValueError(f'unsupported image mode {image.mode!r}')


def _has_transparency(image) -> bool:
  if image.mode not in ('RGBA', 'LA', 'PA') and not (image.mode == 'P' and
                                                     'transparency' in image.info):
    return False
  return int(np.asarray(image.convert('RGBA'))[..., 3].min()) < 255


def grayscale_notes(image) -> list[str]:
  """What `to_grayscale` did to this image beyond MURA's own conversions, in words: transparent
  pixels composited onto black, or colour channels (a photograph, not a radiograph) made luma."""
  notes = []
  if _has_transparency(image):
    alpha = np.asarray(image.convert('RGBA'))[..., 3]
    notes.append(f'{np.mean(alpha < 255):.1%} of the pixels are transparent: composited onto '
                 'black')
  if image.mode in ('RGB', 'RGBA', 'P', 'PA'):
    rgb = np.asarray(image.convert('RGB'), np.int16)
    spread = int(np.abs(rgb - rgb.mean(-1, keepdims=True)).max())
    if spread > 2:  # MURA's RGB files have equal channels
      notes.append(f'colour image (channels differ by up to {spread}): a photograph, not a '
                   'radiograph? converted to gray luma')
  return notes


def grayscale_png(data: bytes) -> tuple[bytes, list[str]]:
  """(PNG bytes of the image as 8-bit grayscale (`to_grayscale`), `grayscale_notes`); raises on
  anything that does not decode fully. Grayscale PNGs are kept byte for byte."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as image:
    if image.format != 'PNG':
      raise ValueError(f'not a PNG but {image.format}')
    image.load()  # decodes every row: a truncated file raises here
    if image.mode == 'L':
      return data, []
    buffer = io.BytesIO()
    to_grayscale(image).save(buffer, format='PNG', compress_level=3)
    return buffer.getvalue(), grayscale_notes(image)
