"""Writes `dummy_data/`: a tiny MURA-v1.1 for the TFDS builder test (TFDS convention).

    python -m tfds_mura.mura.make_dummy_data

One study per body part and split, 1 to 3 views of at most 32 px in MURA's modes (grayscale, RGB
with equal channels, RGBA), the CSVs without header in MURA's format, and one macOS `._imageN.png`
sidecar that the builder must ignore. Self-contained: the dataset package needs nothing from
mura_jax (whose `synthetic` module makes the large, learnable synthetic MURA).
"""

import pathlib
import shutil

import numpy as np
from PIL import Image

from tfds_mura.mura.mura_dataset_builder import BODY_PARTS

DUMMY_DIR = pathlib.Path(__file__).parent / 'dummy_data'
MODES = ('L', 'RGB', 'L', 'RGBA')


def _view(rng: np.random.Generator, mode: str) -> Image.Image:
  height, width = rng.integers(16, 33, size=2)
  gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
  image = Image.fromarray(gray)
  return image if mode == 'L' else image.convert(mode)  # equal channels, opaque alpha


def write_dummy_mura(root: pathlib.Path, seed: int = 3) -> dict[str, int]:
  """Writes root/MURA-v1.1; returns the number of images per split."""
  rng = np.random.default_rng(seed)
  base = root / 'MURA-v1.1'
  counts = {}
  for split, first_patient in (('train', 1), ('valid', 6)):
    studies, images = [], []
    for i, part in enumerate(BODY_PARTS):
      label = int(rng.integers(2))
      study = (f'MURA-v1.1/{split}/XR_{part.upper()}/patient{first_patient + i // 2:05d}/'
               f'study1_{"positive" if label else "negative"}/')
      studies.append(f'{study},{label}')
      for view in range(1, int(rng.integers(1, 4)) + 1):
        path = root / study / f'image{view}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        _view(rng, MODES[(i + view) % len(MODES)]).save(path, optimize=True)
        images.append(f'{study}image{view}.png')
    (base / f'{split}_labeled_studies.csv').write_text('\n'.join(studies) + '\n')
    (base / f'{split}_image_paths.csv').write_text('\n'.join(images) + '\n')
    counts[split] = len(images)
  sidecar = root / images[0].replace('image1.png', '._image1.png')
  sidecar.write_bytes(b'\x00\x05\x16\x07 macOS AppleDouble sidecar, not a PNG')
  return counts


def main():
  shutil.rmtree(DUMMY_DIR, ignore_errors=True)
  for split, n in write_dummy_mura(DUMMY_DIR).items():
    print(f'{split}: {n} images')


if __name__ == '__main__':
  main()
