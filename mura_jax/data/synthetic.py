"""A synthetic MURA-v1.1: same layout, CSV format and quirks as the real one, with learnable abnormalities.

The real MURA needs registration and may not be redistributed, so tests, CI, the demo and the
benchmarks run on this tree instead. It mirrors what code reading MURA trips over:

- `MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/studyK_{positive,negative}/imageN.png`, patients
  unique across splits, 1..11 views per study distributed as in the real train split;
- the four CSVs without a header, study paths ending in '/', grouped by body part in MURA's own
  (unsorted) order;
- 8-bit grayscale PNGs mixed with 8-bit RGB PNGs whose channels are equal (about 40%), a few RGBA;
- one patient with studies under several body parts that share the same `studyK` number;
- macOS `._imageN.png` sidecars (not images, not in the CSVs), as in some redistributed copies.

Abnormal studies carry a localised abnormality (a thin fracture line, a small lytic lesion, metal
hardware in a minority) in their views; its box is written to `OUT_DIR/synthetic_annotations.csv`,
outside `MURA-v1.1/`, so that learning and CAM localisation can be checked for real. Views of both
classes carry the confounders of real ones (synthetic_views.py: the plate rotated in its frame with
black margins, collimator edges, laterality letters, burned-in text, rulers, exposure by study);
their boxes go to `OUT_DIR/synthetic_confounders.csv`, so that a map that points at them is caught.

    python -m mura_jax.data.synthetic OUT_DIR [--studies-per-part N] [--seed S]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import multiprocessing
import os
import time
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image
from tfds_mura import paths
from tqdm import tqdm
from mura_jax.data import synthetic_views as views_lib
from mura_jax.errors import ConfigError

PART_FOLDERS = views_lib.PART_FOLDERS  # XR_ELBOW, ..., XR_WRIST

# Row order of the body parts in the official CSVs (grouped, not sorted).
CSV_PART_ORDER = {
    'train': ('XR_SHOULDER', 'XR_HUMERUS', 'XR_FINGER', 'XR_ELBOW', 'XR_WRIST', 'XR_FOREARM', 'XR_HAND'),
    'valid': ('XR_WRIST', 'XR_FOREARM', 'XR_ELBOW', 'XR_FINGER', 'XR_HAND', 'XR_HUMERUS', 'XR_SHOULDER'),
}

# MURA's Table 1 image counts (normal, abnormal): the abnormal fraction per split and body part.
TABLE1_IMAGES = {
    'train': {'XR_ELBOW': (2925, 2006), 'XR_FINGER': (3138, 1968), 'XR_FOREARM': (1164, 661),
              'XR_HAND': (4059, 1484), 'XR_HUMERUS': (673, 599), 'XR_SHOULDER': (4211, 4168),
              'XR_WRIST': (5765, 3987)},
    'valid': {'XR_ELBOW': (235, 230), 'XR_FINGER': (214, 247), 'XR_FOREARM': (150, 151),
              'XR_HAND': (271, 189), 'XR_HUMERUS': (148, 140), 'XR_SHOULDER': (285, 278),
              'XR_WRIST': (364, 295)},
}

# Views per study in the real train split: 1: 8%, 2: 28%, 3: 48%, 4: 14%, 5..11: 2%.
VIEW_COUNTS = np.arange(1, 12)
VIEW_PROBS = np.array([0.08, 0.28, 0.48, 0.14] + [0.02 / 7] * 7)

RGB_FRACTION = 0.4     # real MURA: about 40% of the PNGs are RGB with three equal channels
RGBA_FRACTION = 0.02   # a few RGBA
SIDECAR_FRACTION = 0.05  # studies that carry `._imageN.png` files
SHARED_STUDY_FRACTION = 0.3  # studies whose patient also has `studyK` under another body part
ABNORMALITIES = views_lib.ABNORMALITIES

# The AppleDouble header macOS writes into `._name` files: bytes, not a PNG.
_APPLEDOUBLE = b'\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ' + bytes(64)


@dataclasses.dataclass(frozen=True)
class Study:
  split: str          # 'train' | 'valid' (MURA's folder names)
  body_part: str      # 'XR_WRIST', ...
  patient: int
  number: int         # the K of studyK
  abnormal: bool
  num_views: int
  abnormality: str | None
  seed: int           # per-study seed: images depend on it alone, so workers need no shared state

  @property
  def path(self) -> str:
    """The study path as in `*_labeled_studies.csv` (trailing '/')."""
    label = 'positive' if self.abnormal else 'negative'
    return (f'MURA-v1.1/{self.split}/{self.body_part}/patient{self.patient:05d}/'
            f'study{self.number}_{label}/')


def plan_studies(studies_per_part: int, valid_studies_per_part: int, seed: int) -> list[Study]:
  """Decides every study (patient, number, label, views, abnormality) before any pixel is drawn."""
  rng = np.random.default_rng([seed, 0])
  studies = []
  next_patient = 1
  for split, n in (('train', studies_per_part), ('valid', valid_studies_per_part)):
    # patient -> {body_part: [study numbers]}; patients never cross splits.
    patients: dict[int, dict[str, list[int]]] = {}
    for part in PART_FOLDERS:
      normal, abnormal = TABLE1_IMAGES[split][part]
      num_abnormal = int(round(n * abnormal / (normal + abnormal)))
      if n >= 2:
        num_abnormal = min(max(num_abnormal, 1), n - 1)
      labels = np.array([True] * num_abnormal + [False] * (n - num_abnormal))
      rng.shuffle(labels)
      for abnormal_study in labels:
        others = [p for p, parts in patients.items() if part not in parts]
        if others and rng.random() < SHARED_STUDY_FRACTION:
          # Same patient, another body part, and the same studyK number as there.
          patient = others[rng.integers(len(others))]
          number = next(iter(patients[patient].values()))[0]
        elif patients and rng.random() < 0.1:
          # A follow-up study of a patient already imaged for this part, or a first one.
          patient = list(patients)[rng.integers(len(patients))]
          number = len(patients[patient].get(part, [])) + 1
        else:
          patient, number = next_patient, 1
          next_patient += 1
        patients.setdefault(patient, {}).setdefault(part, []).append(number)
        studies.append(Study(
            split=split, body_part=part, patient=patient, number=number,
            abnormal=bool(abnormal_study),
            num_views=int(rng.choice(VIEW_COUNTS, p=VIEW_PROBS)),
            abnormality=(str(rng.choice(ABNORMALITIES, p=views_lib.ABNORMALITY_PROBS))
                         if abnormal_study else None),
            seed=int(rng.integers(2**31))))
  return studies


def _encode_png(pixels: np.ndarray, mode: str) -> bytes:
  """Gray pixels as an 8-bit 'L', 'RGB' (equal channels) or 'RGBA' PNG."""
  if mode == 'RGB':
    pixels = np.repeat(pixels[..., None], 3, axis=-1)
  elif mode == 'RGBA':
    pixels = np.concatenate([np.repeat(pixels[..., None], 3, axis=-1),
                             np.full(pixels.shape + (1,), 255, np.uint8)], axis=-1)
  buffer = io.BytesIO()
  Image.fromarray(pixels, mode=None).save(buffer, format='PNG', compress_level=3)
  return buffer.getvalue()


def write_study(root: str, study: Study) -> list[tuple[str, views_lib.View]]:
  """Writes one study's views (and maybe sidecars); returns (image path, view) per view, the
  view without its pixels (its boxes)."""
  rng = np.random.default_rng([study.seed, 1])
  folder = epath.Path(root) / study.path
  folder.mkdir(parents=True, exist_ok=True)
  # Abnormal studies show their abnormality in most views, and always in at least one.
  visible = rng.random(study.num_views) < 0.9
  visible[rng.integers(study.num_views)] = True
  sidecars = rng.random() < SIDECAR_FRACTION
  look = views_lib.study_look(rng)  # exposure, contrast, collimator, side: the study's own
  views = []
  for number in range(1, study.num_views + 1):
    kind = study.abnormality if (study.abnormal and visible[number - 1]) else None
    view = views_lib.draw_view(study.body_part, kind, rng, look)
    u = rng.random()
    mode = 'RGBA' if u < RGBA_FRACTION else 'RGB' if u < RGBA_FRACTION + RGB_FRACTION else 'L'
    (folder / f'image{number}.png').write_bytes(_encode_png(view.pixels, mode))
    if sidecars:
      (folder / f'._image{number}.png').write_bytes(_APPLEDOUBLE)
    views.append((f'{study.path}image{number}.png', dataclasses.replace(view, pixels=None)))
  return views


def _write_study_star(args):
  return write_study(*args)


def _write_csvs(mura_dir: epath.Path, studies: Sequence[Study], views_per_study: Sequence[list]):
  """The four official CSVs: no header, study paths with a trailing '/', grouped by body part."""
  for split in ('train', 'valid'):
    order = {part: i for i, part in enumerate(CSV_PART_ORDER[split])}
    rows = sorted(
        [(s, v) for s, v in zip(studies, views_per_study) if s.split == split],
        key=lambda sv: (order[sv[0].body_part], sv[0].patient, sv[0].number))
    (mura_dir / f'{split}_image_paths.csv').write_text(
        ''.join(f'{path}\n' for _, views in rows for path, _ in views))
    (mura_dir / f'{split}_labeled_studies.csv').write_text(
        ''.join(f'{s.path},{int(s.abnormal)}\n' for s, _ in rows))


def make_synthetic_mura(out_dir: str | os.PathLike, studies_per_part: int = 20,
                        valid_studies_per_part: int | None = None, seed: int = 0,
                        num_workers: int | None = None, progress: bool = True) -> dict:
  """Writes `out_dir/MURA-v1.1/` and `out_dir/synthetic_annotations.csv`; returns a summary.

  `studies_per_part` studies per body part in train, `valid_studies_per_part` (default a third of
  that, at least 4) in valid. The same arguments give the same bytes on every machine.
  """
  if valid_studies_per_part is None:
    valid_studies_per_part = max(4, studies_per_part // 3)
  if studies_per_part < 1 or valid_studies_per_part < 1:
    raise ConfigError('studies_per_part and valid_studies_per_part must be >= 1, got '
                     f'{studies_per_part} and {valid_studies_per_part}')
  out_dir = epath.Path(out_dir)
  mura_dir = out_dir / 'MURA-v1.1'
  if mura_dir.exists() and any(mura_dir.iterdir()):
    raise FileExistsError(f'{mura_dir} exists and is not empty; choose another OUT_DIR or remove it')
  mura_dir.mkdir(parents=True, exist_ok=True)
  studies = plan_studies(studies_per_part, valid_studies_per_part, seed)
  start = time.time()
  jobs = [(os.fspath(out_dir), s) for s in studies]
  num_workers = num_workers or os.cpu_count() or 1
  bar = tqdm(total=sum(s.num_views for s in studies), unit='img', desc='synthetic MURA',
             disable=not progress)
  views_per_study = []
  if num_workers > 1:
    with multiprocessing.get_context('spawn').Pool(num_workers) as pool:
      for views in pool.imap(_write_study_star, jobs, chunksize=4):
        views_per_study.append(views)
        bar.update(len(views))
  else:
    for job in jobs:
      views_per_study.append(write_study(*job))
      bar.update(len(views_per_study[-1]))
  bar.close()
  _write_csvs(mura_dir, studies, views_per_study)
  with (out_dir / paths.ANNOTATIONS_FILE).open('w') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(['image_path', 'abnormality', 'x0', 'y0', 'x1', 'y1'])
    for study, views in zip(studies, views_per_study):
      for path, view in views:
        if view.box is not None:
          writer.writerow([path, study.abnormality, *view.box])
  with (out_dir / paths.CONFOUNDERS_FILE).open('w') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(['image_path', 'confounder', 'x0', 'y0', 'x1', 'y1'])
    for views in views_per_study:
      for path, view in views:
        for kind, box in view.confounders:
          writer.writerow([path, kind, *box])
  num_images = sum(len(v) for v in views_per_study)
  return {
      'root': os.fspath(mura_dir), 'annotations': os.fspath(out_dir / paths.ANNOTATIONS_FILE),
      'confounders': os.fspath(out_dir / paths.CONFOUNDERS_FILE),
      'studies': {split: sum(s.split == split for s in studies) for split in ('train', 'valid')},
      'images': {split: sum(len(v) for s, v in zip(studies, views_per_study) if s.split == split)
                 for split in ('train', 'valid')},
      'seconds': time.time() - start, 'images_per_second': num_images / (time.time() - start),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m mura_jax.data.synthetic', description=__doc__.split('\n')[0])
  parser.add_argument('out_dir', help='writes OUT_DIR/MURA-v1.1/ and OUT_DIR/synthetic_annotations.csv')
  parser.add_argument('--studies-per-part', type=int, default=20, help='train studies per body part')
  parser.add_argument('--valid-studies-per-part', type=int, default=None,
                      help='valid studies per body part (default: a third of train, at least 4)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workers', type=int, default=None, help='processes (default: all cores)')
  args = parser.parse_args(argv)
  summary = make_synthetic_mura(args.out_dir, args.studies_per_part, args.valid_studies_per_part,
                                args.seed, args.workers)
  print(f"Wrote {summary['root']}: train {summary['studies']['train']} studies / "
        f"{summary['images']['train']} images, valid {summary['studies']['valid']} studies / "
        f"{summary['images']['valid']} images in {summary['seconds']:.1f} s "
        f"({summary['images_per_second']:.0f} images/s); boxes in {summary['annotations']}")


if __name__ == '__main__':
  main()
