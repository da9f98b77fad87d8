"""Class activation maps (Zhou et al., 2016), as the MURA paper draws them: the map arithmetic.

    M(X) = sum_k w_k f_k(X)

f_k(X) are the final feature maps (after the last BN + ReLU: what global pooling averages) and w_k
the classifier's weights, so the spatial mean of M plus the classifier's bias is the view's logit
exactly (`inference.steps.view_maps`). With config.cam.flip_average, M is the mean of the view's
map and its mirror's map mirrored back, and that mean plus the bias the mean of their logits.

How they are shown: M itself, in logit units, on one range for every view of a model: from 0
(evidence for normal or none: transparent) to `top`, a high percentile of M's cells over the
validation split (`display_top`, stored with the model: inference/display_scale.py). Never
stretched per image (min-max normalising every map turns any view, normal ones included, into a
full-range hotspot), and not sigmoid(M + b) either: with a confident model's large M that
saturates over the whole limb and much of the background.
Maps are upsampled bilinearly (half-pixel centres) to the radiograph's own rows x columns through
the inverse of the preprocessing's `fit` (squash: the whole map stretches over the image; pad: the
padded square is undone), never transposed: `upsample` takes (rows, columns) and returns them.


How well they point: localisation.py; the pictures: pictures.py; the job: cam.py.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from mura_jax.data import preprocessing


# Of M's cells over the validation split: full colour from there up. The 99th saturated a
# quarter of the demo's views at their peak (top 11.9, view peaks' median 5.6, 90th percentile
# 16.6); the 99.9th (19.9) about one in twenty, the most confident.
DISPLAY_PERCENTILE = 99.9
OUTLINE_SHARE = 0.5        # the outlined region: M above this share of the scale's top
# Without a stored scale (no CAM run on the workdir): a fixed range, said in the caption.
DEFAULT_TOP = 5.0


@dataclasses.dataclass(frozen=True)
class DisplayScale:
  """M from 0 to `top` (logit units) in colour; `source` says where the range comes from."""
  top: float
  source: str

  @property
  def outline(self) -> float:
    return OUTLINE_SHARE * self.top

  @classmethod
  def of(cls, stored: dict | None) -> DisplayScale:
    """The scale of a stored display_scale.json's content, else the default (said so)."""
    if stored is None:
      return cls(DEFAULT_TOP, f'fixed default {DEFAULT_TOP:g} (no validation range stored for '
                              'this checkpoint: run --config.mode=cam)')
    return cls(float(stored['top']), f'{stored["percentile"]:g}th percentile of M over the '
               f'{stored["split"]} split\'s maps (step {stored["step"]})')


def display_top(maps: np.ndarray, percentile: float = DISPLAY_PERCENTILE) -> float:
  """The scale's top: the `percentile` of M over every cell of the split's maps (V, h, w); if
  that is not positive (no cell with evidence for abnormal in most views), the largest M, else 1."""
  maps = np.asarray(maps, np.float64)
  for top in (np.percentile(maps, percentile), maps.max()):
    if top > 0:
      return float(top)
  return 1.0


def scaled(raw_map: np.ndarray, scale: DisplayScale) -> np.ndarray:
  """M / top clipped to [0, 1]: 0 where M <= 0 (drawn transparent), 1 from the top up."""
  return np.clip(np.asarray(raw_map, np.float64) / scale.top, 0.0, 1.0)


def display_map(raw_map, bias: float):
  """sigmoid(M + b): a map's cells on the probability scale (the blank-image sanity check)."""
  return 1.0 / (1.0 + np.exp(-(np.asarray(raw_map, np.float64) + bias)))


def upsample(raw_map: np.ndarray, rows: int, columns: int,
             spec: preprocessing.Preprocessing) -> np.ndarray:
  """A map of the network's S x S input -> float32 (rows, columns) over the original radiograph.

  The inverse of `preprocessing.fit`: 'squash' stretched the image to the square, so the map is
  stretched back; 'pad' centred it in a black square of side max(rows, columns), so the map is
  brought to that square and the image's part cut out.
  """
  pil = Image.fromarray(np.asarray(raw_map, np.float32), mode='F')
  if spec.resize == 'squash':
    return np.asarray(pil.resize((columns, rows), Image.Resampling.BILINEAR), np.float32)
  side = max(rows, columns)
  square = np.asarray(pil.resize((side, side), Image.Resampling.BILINEAR), np.float32)
  top, left = (side - rows) // 2, (side - columns) // 2
  return square[top:top + rows, left:left + columns]


def subcell_offset(before: float, centre: float, after: float) -> float:
  """Where a parabola through three neighbouring cells' values peaks, in cells from the middle
  one (the largest): in [-0.5, 0.5], 0 when the neighbours are equal, +-0.5 when one of them ties
  with the middle cell (the peak on the edge between them)."""
  curvature = before - 2 * centre + after
  if curvature >= 0:  # flat: no peak to place between the cells
    return 0.0
  return float(np.clip(0.5 * (before - after) / curvature, -0.5, 0.5))


def peak(raw_map: np.ndarray, rows: int, columns: int,
         spec: preprocessing.Preprocessing) -> tuple[int, int]:
  """(row, column) in the original radiograph where the map peaks.

  The largest cell, and within it the peak of a parabola through that cell and its two
  neighbours along each axis (the usual sub-sample peak of a sampled surface). A cell of the
  demo's 20 x 20 maps is 26 px of a 512 px radiograph and a small abnormality one to three cells
  across, so the cell's centre alone is a coarse answer: on eleven trained networks, placing
  the peak within the cell raised the pointing game in every one, by 0.01-0.07 (BENCHMARKS.md,
  "Where in the cell"). A cell on the map's border has no neighbour on one side: along that axis
  the point stays the cell's centre (an upsampled map is flat out to the edge, so its plain
  argmax would be a corner).
  """
  h, w = raw_map.shape
  raw_map = np.asarray(raw_map, np.float64)
  i, j = np.unravel_index(int(np.argmax(raw_map)), raw_map.shape)
  di = subcell_offset(*raw_map[i - 1:i + 2, j]) if 0 < i < h - 1 else 0.0
  dj = subcell_offset(*raw_map[i, j - 1:j + 2]) if 0 < j < w - 1 else 0.0
  # That point in the network input's pixels, then through the inverse of `fit`.
  y, x = (i + 0.5 + di) * spec.image_size / h, (j + 0.5 + dj) * spec.image_size / w
  top, left, height, width = preprocessing.fit_box(rows, columns, spec.image_size, spec.resize)
  row = int(np.floor((y - top) / height * rows))
  column = int(np.floor((x - left) / width * columns))
  return int(np.clip(row, 0, rows - 1)), int(np.clip(column, 0, columns - 1))
