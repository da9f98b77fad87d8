"""How well class activation maps point: localisation on annotated boxes (the synthetic MURA's
`synthetic_annotations.csv`), per view with an abnormality:
  pointing game   the map's peak (`maps.peak`: in its largest cell, where a parabola through
                  the cell's neighbours peaks) lies inside the box (tolerance 0), within one
                  map cell of it (row- and column-wise: is a miss a cell beside the box, where a
                  map cannot be sharper, or elsewhere?), or within 15 px of it at original
                  resolution (Zhang et al.'s tolerance);
  Otsu IoU        the raw map thresholded by Otsu's method, its largest connected region's
                  bounding box against the box: IoU, and a hit when IoU >= 0.5.
Beside the same figures for three baselines that use no model: a random map, a centred Gaussian,
the image intensity. Each rate comes with a bootstrap CI over views, and the model's advantage
over each baseline with a paired CI (the same resampled views).
The sanity checks: sanity.py.
"""

from __future__ import annotations

import csv

import numpy as np

from mura_jax.data import preprocessing
from mura_jax.errors import DataError
from mura_jax.evaluation import bootstrap
from mura_jax.interpretation.maps import peak, upsample
from etils import epath
from scipy import ndimage


POINTING_TOLERANCE_PX = 15
IOU_HIT = 0.5


def read_boxes(path) -> dict[str, tuple[str, int, int, int, int]]:
  """{image path: (abnormality, x0, y0, x1, y1)} of `synthetic_annotations.csv` (x1, y1
  exclusive)."""
  boxes = {}
  with epath.Path(path).open() as f:
    for number, row in enumerate(csv.DictReader(f), start=2):
      try:
        boxes[row['image_path']] = (row['abnormality'], int(row['x0']), int(row['y0']),
                                    int(row['x1']), int(row['y1']))
      except (KeyError, TypeError, ValueError) as e:
        raise DataError(f'{path} row {number}: expected image_path,abnormality,x0,y0,x1,y1 '
                         f'({type(e).__name__}: {e})') from None
  return boxes


def offsets_from_box(row: int, column: int, box) -> tuple[int, int]:
  """(rows, columns) of pixels between (row, column) and the box along each axis (0 inside)."""
  _, x0, y0, x1, y1 = box
  return max(y0 - row, 0, row - (y1 - 1)), max(x0 - column, 0, column - (x1 - 1))


def distance_to_box(row: int, column: int, box) -> float:
  """Pixels from (row, column) to the box (0 inside)."""
  return float(np.hypot(*offsets_from_box(row, column, box)))


def cell_size(rows: int, columns: int, map_shape, spec: preprocessing.Preprocessing
              ) -> tuple[float, float]:
  """(rows, columns) of the radiograph's own pixels that one cell of a map covers."""
  h, w = map_shape
  _, _, height, width = preprocessing.fit_box(rows, columns, spec.image_size, spec.resize)
  return spec.image_size / h * rows / height, spec.image_size / w * columns / width


def within_cell(row: int, column: int, box, cell: tuple[float, float]) -> bool:
  """(row, column) at most one cell (rows, columns) from the box along each axis."""
  dy, dx = offsets_from_box(row, column, box)
  return dy <= cell[0] and dx <= cell[1]


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
  """Otsu's threshold: the split of the values' histogram with the largest between-class
  variance."""
  values = np.asarray(values, np.float64).ravel()
  low, high = values.min(), values.max()
  if high <= low:
    return float(high)
  counts, edges = np.histogram(values, bins=bins, range=(low, high))
  centres = (edges[:-1] + edges[1:]) / 2
  weight = np.cumsum(counts)
  mean = np.cumsum(counts * centres)
  total_weight, total_mean = weight[-1], mean[-1]
  with np.errstate(divide='ignore', invalid='ignore'):
    between = (total_mean * weight - mean * total_weight) ** 2 / (
        weight * (total_weight - weight))
  between[~np.isfinite(between)] = -1
  return float(edges[int(np.argmax(between)) + 1])


def region_box(score_map: np.ndarray) -> tuple[int, int, int, int] | None:
  """(x0, y0, x1, y1) of the largest connected region above the map's Otsu threshold."""
  labels, count = ndimage.label(score_map > otsu_threshold(score_map))
  if count == 0:
    return None
  largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
  rows, columns = ndimage.find_objects((labels == largest).astype(np.int32))[0]
  return columns.start, rows.start, columns.stop, rows.stop


def iou(a, b) -> float:
  if a is None:
    return 0.0
  x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
  inter = max(x1 - x0, 0) * max(y1 - y0, 0)
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union else 0.0


def baseline_maps(image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Maps that use no model, at the radiograph's resolution: what a CAM must beat."""
  rows, columns = image.shape
  yy, xx = np.mgrid[0:rows, 0:columns]
  sigma = 0.25 * min(rows, columns)
  return {
      'random': rng.random((rows, columns)),
      'centre_gaussian': np.exp(-((yy - (rows - 1) / 2) ** 2 + (xx - (columns - 1) / 2) ** 2)
                                / (2 * sigma ** 2)),
      'image_intensity': image.astype(np.float64),
  }


def score_view(score_map: np.ndarray, box, point=None,
               cell: tuple[float, float] = (0.0, 0.0)) -> dict[str, float]:
  """Pointing (tolerance 0, one CAM cell of `cell` pixels, 15 px) and Otsu IoU of one
  full-resolution map against a box."""
  if point is None:
    point = np.unravel_index(int(np.argmax(score_map)), score_map.shape)
  row, column = int(point[0]), int(point[1])
  distance = distance_to_box(row, column, box)
  overlap = iou(region_box(score_map), box[1:])
  return {'pointing': float(distance == 0),
          'pointing_cell': float(within_cell(row, column, box, cell)),
          'pointing_15px': float(distance <= POINTING_TOLERANCE_PX),
          'otsu_iou': overlap, 'otsu_hit': float(overlap >= IOU_HIT)}


def bootstrap_rate(values: np.ndarray, num_resamples: int = 2000, seed: int = 0,
                   baseline: np.ndarray | None = None, level: float = 0.95) -> dict:
  """Mean of per-view values with a percentile CI over resampled views; with `baseline`, the
  paired difference (values - baseline on the same resampled views)."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return {'value': None, 'ci_low': None, 'ci_high': None, 'n_views': 0}
  # The evaluation's resampling (bootstrap.py): the same draws for the same seed and size.
  draws = bootstrap.resample_indices(seed, values.size, 0, num_resamples)
  target = values if baseline is None else values - np.asarray(baseline, np.float64)
  low, high, _ = bootstrap.percentile_ci(target[draws].mean(1), level)
  return {'value': float(target.mean()), 'ci_low': float(low), 'ci_high': float(high),
          'n_views': int(values.size)}


METHODS = ('cam', 'random', 'centre_gaussian', 'image_intensity')
MEASURES = ('pointing', 'pointing_cell', 'pointing_15px', 'otsu_hit', 'otsu_iou')


def localisation(maps: np.ndarray, images, image_paths, body_parts, boxes: dict, bias: float,
                 spec: preprocessing.Preprocessing, *, num_resamples: int = 2000,
                 seed: int = 0) -> dict:
  """Pointing game and Otsu IoU of the CAMs and the three baselines on every annotated view.

  Args:
    maps: (V, h, w) raw maps of the split's views.
    images: callable i -> uint8 (rows, columns) radiograph of view i.
    image_paths, body_parts: (V,) per view (MURA image paths as in the annotations, part names).
    boxes: `read_boxes(...)`; views without a box (normal views) are not scored.
  Returns the "localisation" dict of localisation.json (see `format_localisation`).
  """
  rng = np.random.default_rng(seed)
  scores = {m: {k: [] for k in MEASURES} for m in METHODS}
  groups = {'all': []}
  for i, path in enumerate(image_paths):
    box = boxes.get(path)
    if box is None:
      continue
    image = images(i)
    rows, columns = image.shape
    # Otsu on the raw map: the display map's sigmoid saturates, which merges regions.
    cam_map = upsample(maps[i], rows, columns, spec)
    # One CAM cell in this radiograph's pixels: the baselines get the same tolerance.
    cell = cell_size(rows, columns, maps[i].shape, spec)
    per_method = {'cam': score_view(cam_map, box, peak(maps[i], rows, columns, spec), cell)}
    for name, baseline in baseline_maps(image, rng).items():
      per_method[name] = score_view(baseline, box, cell=cell)
    for name, result in per_method.items():
      for measure, value in result.items():
        scores[name][measure].append(value)
    n = len(groups['all'])
    for group in ('all', f'body_part/{body_parts[i]}', f'abnormality/{box[0]}'):
      groups.setdefault(group, []).append(n)
  result = {'n_views': len(groups['all']), 'groups': {}}
  for group, members in groups.items():
    members = np.asarray(members, np.int64)
    result['groups'][group] = {
        name: {measure: bootstrap_rate(np.asarray(values)[members], num_resamples, seed)
               for measure, values in per_measure.items()}
        for name, per_measure in scores.items()}
  cam_pointing = np.asarray(scores['cam']['pointing'])
  result['advantage'] = {  # CAM minus baseline, paired over the same resampled views
      name: bootstrap_rate(cam_pointing, num_resamples, seed,
                           baseline=np.asarray(scores[name]['pointing']))
      for name in METHODS[1:]}
  return result


def cell(entry: dict) -> str:
  """A rate with its CI, as the reports write it: 0.958 (0.939-0.978)."""
  if entry['value'] is None:
    return 'n/a'
  return f'{entry["value"]:.3f} ({entry["ci_low"]:.3f}-{entry["ci_high"]:.3f})'


def format_localisation(summary: dict) -> str:
  """localisation.md's first part: the table of pointing and Otsu figures, the maps' speed."""
  lines = [f'# CAM localisation: {summary["split"]}, {summary["checkpoint"]["which"]} checkpoint '
           f'(step {summary["checkpoint"]["step"]})', '']
  local = summary.get('localisation')
  if summary.get('no_boxes'):  # cam.no_boxes: which file would give them
    lines += [summary['no_boxes'], '']
  if local:
    lines += [f'{local["n_views"]} abnormal views with a box; 95% CIs from bootstrap resamples of '
              'views. Pointing: the map\'s peak (placed within its cell) inside the box (or '
              'within one CAM cell of it along each axis, the map\'s own resolution, the same '
              'tolerance for the baselines; '
              f'or within {POINTING_TOLERANCE_PX} px); Otsu: the largest region above Otsu\'s '
              f'threshold, its box against the box (hit: IoU >= {IOU_HIT}).', '',
              '| method | pointing | pointing, 1 cell | pointing 15 px | Otsu hit | '
              'mean Otsu IoU |', '|---|---|---|---|---|---|']
    for method in METHODS:
      row = local['groups']['all'][method]
      lines.append(f'| {method} | ' + ' | '.join(cell(row[m]) for m in MEASURES) + ' |')
    lines += ['', '| group | views | CAM pointing | best baseline pointing |', '|---|---:|---|---|']
    for group, entry in local['groups'].items():
      if group == 'all':
        continue
      best = max(METHODS[1:], key=lambda m: entry[m]['pointing']['value'])
      lines.append(f'| {group} | {entry["cam"]["pointing"]["n_views"]} | '
                   f'{cell(entry["cam"]["pointing"])} | {best} {cell(entry[best]["pointing"])} |')
    lines += ['', 'CAM pointing minus each baseline\'s, paired over the same resampled views:', '']
    lines += [f'- {name}: {cell(entry)}' for name, entry in local['advantage'].items()]
  scale = summary.get('display_scale')
  if scale:
    lines += ['', f'Pictures: M from 0 to {scale["top"]:.3g} logit units ({scale["source"]}), '
              f'outlined from {scale["outline"]:.3g}.']
  lines += ['', f'Maps of {summary["n_views"]} views ({summary["map_shape"]} per view'
            + (', each the mean of the view\'s and its mirror\'s map (cam.flip_average)'
               if summary.get('flip_average') else ', the paper\'s plain CAM') +
            f') in {summary["seconds"]:.1f} s: {summary["views_per_second"]:.0f} views/s.']
  return '\n'.join(lines) + '\n'
