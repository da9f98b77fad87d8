"""Writes `dummy_data/`: a tiny synthetic MURA-v1.1 for the TFDS builder test (TFDS convention).

    python -m tfds_mura.mura.make_dummy_data

One study per body part and split from `mura_jax.synthetic`, every PNG shrunk to a long side of
32 px in its own mode (grayscale, RGB or RGBA), so the files stay a few KB in the repository.
"""

import pathlib
import shutil
import tempfile

from PIL import Image

from mura_jax import synthetic

DUMMY_DIR = pathlib.Path(__file__).parent / 'dummy_data'


def main():
  with tempfile.TemporaryDirectory() as tmp:
    synthetic.make_synthetic_mura(tmp, studies_per_part=1, valid_studies_per_part=1, seed=3,
                                  num_workers=1, progress=False)
    for png in pathlib.Path(tmp, 'MURA-v1.1').rglob('image*.png'):
      with Image.open(png) as image:
        image.thumbnail((32, 32))
        image.save(png, optimize=True)
    shutil.rmtree(DUMMY_DIR, ignore_errors=True)
    shutil.copytree(pathlib.Path(tmp, 'MURA-v1.1'), DUMMY_DIR / 'MURA-v1.1')
  for split in ('train', 'valid'):
    rows = (DUMMY_DIR / 'MURA-v1.1' / f'{split}_image_paths.csv').read_text().splitlines()
    print(f'{split}: {len(rows)} images')


if __name__ == '__main__':
  main()
