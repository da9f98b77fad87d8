"""Training-view preprocessing: mura-jax's against a naive per-image PIL pipeline, same PNGs, one run.

    python -m mura_jax.data.synthetic /tmp/s500 --studies-per-part 25 --valid-studies-per-part 1
    python benchmarks/pipeline_vs_naive.py /tmp/s500/MURA-v1.1 --views 400 --rounds 3

Every variant runs in this one process on one core (torch.set_num_threads(1), no workers), on the
same PNG files, alternating, `--rounds` times; views/s per core is what is compared.
  ours, epoch     what each training epoch does per view: decode the view's gray PNG as the TFDS
                  `mura` dataset stores it (re-encoded gray at build time, decoded by TFDS with
                  PIL), then `preprocess_view` with an rng (resize to 224 x 224, then random
                  lateral flip and random rotation of up to 30 degrees, bilinear; before 8332ce6
                  the rotation came first, at full resolution); uint8 out, normalised on the
                  device inside the jitted step.
  ours, from file the same from the original file: `images.read_image` (decode, the
                  dataset's gray rule) + `preprocess_view`; what a pipeline without a build does.
  naive           as MURA reimplementations write it with torchvision: PIL open, convert('RGB'),
                  RandomHorizontalFlip, RandomRotation(30), Resize((224, 224)), ToTensor,
                  Normalize(ImageNet) -> float32 (3, 224, 224).
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import statistics
import time

import numpy as np
from PIL import Image


def import_preprocess_view():
  try:
    from mura_jax.data.preprocessing import preprocess_view  # pylint: disable=g-import-not-at-top
  except ImportError:
    from mura_jax.data.input_pipeline import preprocess_view  # pylint: disable=g-import-not-at-top
  return preprocess_view


def naive_transform():
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torchvision import transforms  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(1)
    return transforms.Compose([
        transforms.RandomHorizontalFlip(), transforms.RandomRotation(30),
        transforms.Resize((224, 224)), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]), 'torchvision'
  except ImportError:  # the same steps with PIL and NumPy
    rng = np.random.default_rng(0)
    mean = np.asarray([0.485, 0.456, 0.406], np.float32)
    std = np.asarray([0.229, 0.224, 0.225], np.float32)

    def transform(pil):
      if rng.random() < 0.5:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      pil = pil.rotate(float(rng.uniform(-30, 30)))
      pil = pil.resize((224, 224), Image.Resampling.BILINEAR)
      x = np.asarray(pil, np.float32) / 255.0
      return ((x - mean) / std).transpose(2, 0, 1)
    return transform, 'PIL + NumPy'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('mura_dir', help='a MURA-v1.1 folder (real or mura_jax.data.synthetic)')
  parser.add_argument('--views', type=int, default=400)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--image-size', type=int, default=224)
  args = parser.parse_args()


  from mura_jax.data import images  # pylint: disable=g-import-not-at-top
  preprocess_view = import_preprocess_view()
  paths = sorted(glob.glob(os.path.join(args.mura_dir, 'train', '*', '*', '*', '*.png')))
  paths = [p for p in paths if not os.path.basename(p).startswith('._')][:args.views]
  if not paths:
    raise SystemExit(f'No PNG views under {args.mura_dir}/train')
  modes = {}
  for p in paths:
    with Image.open(p) as im:
      modes[im.mode] = modes.get(im.mode, 0) + 1
  # As the `mura` dataset stores them: the gray view re-encoded as PNG (tfds Image feature).
  stored = []
  for p in paths:
    buf = io.BytesIO()
    Image.fromarray(images.read_image(p)[..., 0]).save(buf, format='PNG')
    stored.append(buf.getvalue())
  naive, naive_kind = naive_transform()

  def ours_epoch():
    rng = np.random.default_rng(0)
    for data in stored:
      with Image.open(io.BytesIO(data)) as im:  # tfds' decode_example_np_with_pil
        image = np.asarray(im)[..., None]
      preprocess_view(image, args.image_size, 'squash', rng)

  def ours_from_file():
    rng = np.random.default_rng(0)
    for p in paths:
      preprocess_view(images.read_image(p), args.image_size, 'squash', rng)

  def naive_from_file():
    for p in paths:
      with Image.open(p) as im:
        naive(im.convert('RGB'))

  variants = {'ours, epoch (stored gray PNG)': ours_epoch,
              'ours, from the original file': ours_from_file,
              f'naive ({naive_kind}), from the original file': naive_from_file}
  times = {k: [] for k in variants}
  naive_from_file()  # warm-up: imports, file cache
  ours_from_file()
  for _ in range(args.rounds):
    for name, fn in variants.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  load = os.getloadavg()[0]
  naive_rate = len(paths) / statistics.median(times[f'naive ({naive_kind}), from the original file'])
  print(f'{len(paths)} views ({", ".join(f"{k} {v}" for k, v in sorted(modes.items()))}), '
        f'{args.rounds} rounds, one core, 1-minute load average {load:.2f} at the end')
  print('| pipeline | views/s per core (median) | rounds | vs naive |')
  print('|---|---:|---|---:|')
  for name, ts in times.items():
    rate = len(paths) / statistics.median(ts)
    print(f'| {name} | {rate:.0f} | {", ".join(f"{len(paths) / t:.0f}" for t in ts)} | '
          f'{rate / naive_rate:.2f}x |')


if __name__ == '__main__':
  main()
