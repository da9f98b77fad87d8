"""The CAM report's sanity checks: do the maps explain this model, and where do their peaks fall?

  cascading model randomisation (Adebayo et al., "Sanity checks for saliency maps", 2018): the
      network re-initialised from the classifier down, one stage more each time (the classifier;
      + the last dense block with the final norm; + the transition and dense block before it; ...
      ; + the stem: a wholly random network). Re-initialised modules get fresh parameters and
      batch statistics, as a newly initialised network has; each stage is drawn several times
      (config.cam.randomisation_draws) and scored as the mean over its draws. Maps that survive
      this are not explanations of what the model learnt;
  a model trained on shuffled labels (training's control, WORKDIR/controls/shuffled_labels:
      the same network and recipe on study labels permuted within body part);
      each against the trained model on the same views: pointing, paired bootstrap CI of the
      difference (the same resampled views), and the maps' rank correlation;
  peaks on confounders: the share of peaks inside a confounder box (burned-in markers, text,
      rulers: the synthetic MURA's `synthetic_confounders.csv`) against the boxes' share of the
      image (chance), for the trained model, each control and the image intensity baseline;
  peaks on the image border (its outer BORDER_SHARE on each side) or on the black margin
      (`black_margin`: near-black pixels connected to the image's edge, as real MURA views are
      rotated inside their frame) against their share of the image: data without boxes (real MURA)
      has this one; for the trained model split by p > threshold and p <= threshold;
  the map of a blank image, and where the peaks fall over the split (a fixed hotspot shows).
"""

from __future__ import annotations

import csv
import functools

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from scipy import ndimage

from mura_jax.errors import DataError
from mura_jax.interpretation.localisation import bootstrap_rate, cell, distance_to_box
from mura_jax.interpretation.maps import display_map, peak
from mura_jax.runtime import parallel

BORDER_SHARE = 1 / 8   # of each side: the border region (0.4375 of the image's area)
MARGIN_LEVEL = 5       # gray level (of 255, after a 5 x 5 mean) at or below which is black
CONFOUNDERS = ('marker', 'text', 'ruler')


# ------------------------------------------------------------------------------------------------
# The controls' networks.


def cascading_stages(variables, model, in_channels: int, seed: int = 1,
                     init=None) -> list[tuple[str, dict]]:
  """[(what is re-initialised, variables)], from the classifier down to the whole network.
  `init`: the model's jitted init, where several draws share one compilation."""
  init = init or jax.jit(functools.partial(model.init, train=False))
  fresh = init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, in_channels)))
  features = variables['params']['features']
  blocks = sorted((k for k in features if k.startswith('denseblock')),
                  key=lambda k: int(k[len('denseblock'):]))
  groups = [('classifier', [])]
  for n, block in enumerate(reversed(blocks)):
    number = len(blocks) - n
    modules = [block] + (['norm5'] if n == 0 else [f'transition{number}'])
    groups.append((f'+ {block}', [m for m in modules if m in features]))
  groups.append(('+ stem (conv0, norm0)', [m for m in ('conv0', 'norm0') if m in features]))
  params = dict(variables['params'])
  stats = {'features': dict(variables['batch_stats']['features'])}
  stages = []
  for name, modules in groups:
    if name == 'classifier':
      params['classifier'] = fresh['params']['classifier']
    params['features'] = {**params['features'],
                          **{m: fresh['params']['features'][m] for m in modules}}
    stats['features'].update({m: fresh['batch_stats']['features'][m] for m in modules
                              if m in fresh['batch_stats']['features']})
    stages.append((name, {'params': dict(params), 'batch_stats': {
        'features': dict(stats['features'])}}))
  return stages


def control_maps(predictor, source, *, shuffled=None, num_workers: int = 0, seed: int = 1,
                 draws: int = 1) -> dict[str, list[dict]]:
  """{control: [{'map', 'probability'} per draw]} over the split: each cascading randomisation
  stage, drawn `draws` times (fresh initialisations from seeds seed, seed + 1, ...), and the
  shuffled-labels model (`shuffled`, a Predictor; one draw) where given.

  One random network is one sample: its classifier's random signs alone decide whether its map
  peaks where the trained features are strongest or where they are weakest (on the demo, one
  draw of the classifier stage pointed at 0.68, another at 0.02), so a stage's pointing is the
  mean over several draws, and their spread is reported beside it."""
  controls = {}
  init = jax.jit(functools.partial(predictor.model.init, train=False))
  for draw in range(draws):
    for name, variables in cascading_stages(predictor.variables, predictor.model,
                                            predictor.preprocessing.in_channels, seed + draw,
                                            init):
      out = predictor.with_variables(jax.device_put(variables, parallel.replicated(
          predictor.mesh))).map_split(source, num_workers=num_workers, progress=False)
      controls.setdefault(f'randomised: {name}', []).append(out)
  if shuffled is not None:
    controls['shuffled labels'] = [shuffled.map_split(source, num_workers=num_workers,
                                                      progress=False)]
  return controls


# ------------------------------------------------------------------------------------------------
# Regions of an image where a peak says nothing about the limb.


def border(rows: int, columns: int, share: float = BORDER_SHARE) -> np.ndarray:
  """bool (rows, columns): the outer `share` of the image on each side."""
  mask = np.ones((rows, columns), bool)
  r, c = int(round(rows * share)), int(round(columns * share))
  mask[r:rows - r, c:columns - c] = False
  return mask


def black_margin(image: np.ndarray, level: float = MARGIN_LEVEL) -> np.ndarray:
  """bool (rows, columns): near-black pixels (5 x 5 mean <= `level`) connected to the image's
  edge: the margin of a view rotated or collimated inside its frame (dark soft tissue or a dark
  field inside the view is not connected to the edge through black, so it is not margin)."""
  dark = ndimage.uniform_filter(np.asarray(image, np.float32), 5, mode='nearest') <= level
  labels, _ = ndimage.label(dark)
  edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
  return np.isin(labels, edge[edge > 0])


def read_confounders(path) -> dict[str, list[tuple[str, int, int, int, int]]]:
  """{image path: [(confounder, x0, y0, x1, y1), ...]} of `synthetic_confounders.csv`
  (original pixels, x1 and y1 exclusive; an image may have several rows)."""
  boxes = {}
  with epath.Path(path).open() as f:
    for number, row in enumerate(csv.DictReader(f), start=2):
      try:
        box = (row['confounder'], int(row['x0']), int(row['y0']), int(row['x1']), int(row['y1']))
      except (KeyError, TypeError, ValueError) as e:
        raise DataError(f'{path} row {number}: expected image_path,confounder,x0,y0,x1,y1 '
                        f'({type(e).__name__}: {e})') from None
      if box[0] not in CONFOUNDERS or not (box[1] < box[3] and box[2] < box[4]):
        raise DataError(f'{path} row {number}: {row["confounder"]!r} box {box[1:]}: expected a '
                        f'confounder in {CONFOUNDERS} and x0 < x1, y0 < y1.')
      boxes.setdefault(row['image_path'], []).append(box)
  return boxes


def _in_boxes(row: int, column: int, boxes) -> bool:
  return any(x0 <= column < x1 and y0 <= row < y1 for _, x0, y0, x1, y1 in boxes)


def _boxes_share(rows: int, columns: int, boxes) -> float:
  mask = np.zeros((rows, columns), bool)
  for _, x0, y0, x1, y1 in boxes:
    mask[max(y0, 0):y1, max(x0, 0):x1] = True
  return float(mask.mean())


# ------------------------------------------------------------------------------------------------
# The checks.


def _rate_against_chance(hits, chance, num_resamples: int, seed: int) -> dict:
  hits, chance = np.asarray(hits, np.float64), np.asarray(chance, np.float64)
  return {'peaks': bootstrap_rate(hits, num_resamples, seed),
          'chance': bootstrap_rate(chance, num_resamples, seed),
          'excess': bootstrap_rate(hits, num_resamples, seed, baseline=chance)}


def peak_regions(peak_of: dict, images, image_paths, probabilities, threshold: float,
                 confounders: dict, abnormal: set, *, num_resamples: int = 2000,
                 seed: int = 0) -> tuple[dict, dict[str, list]]:
  """Shares of peaks on the border, the black margin and (where known) confounder boxes, each
  against chance (the region's share of the image; its excess paired over the same views).
  Returns (those figures, {model: [[(row, column) per draw] per view]}): each image is read once.

  Args:
    peak_of: {model: [(view i, its image) -> (row, column) of its peak in the radiograph, one
      per draw of the model]}: a view's region counts are the mean over its draws.
    images: callable i -> uint8 (rows, columns); image_paths: (V,) as in the boxes' files.
    probabilities: (V,) the trained model's view probabilities (the border split).
    confounders: `read_confounders(...)` ({} where unknown); abnormal: image paths with an
      abnormality box (their confounder views are counted apart too).
  """
  n = len(image_paths)
  peaks = {m: [] for m in peak_of}
  in_border, in_margin = {m: np.zeros(n) for m in peaks}, {m: np.zeros(n) for m in peaks}
  border_share, margin_share = np.zeros(n), np.zeros(n)
  with_confounders = [i for i, path in enumerate(image_paths) if path in confounders]
  in_box = {m: np.zeros(len(with_confounders)) for m in peaks}
  box_share = np.zeros(len(with_confounders))
  position = {i: k for k, i in enumerate(with_confounders)}
  for i in range(n):
    image = images(i)
    rows, columns = image.shape
    edge, margin = border(rows, columns), black_margin(image)
    border_share[i], margin_share[i] = edge.mean(), margin.mean()
    boxes = confounders.get(image_paths[i])
    if boxes:
      box_share[position[i]] = _boxes_share(rows, columns, boxes)
    for model, at in peaks.items():
      at.append([peak_at(i, image) for peak_at in peak_of[model]])
      in_border[model][i] = np.mean([edge[row, column] for row, column in at[i]])
      in_margin[model][i] = np.mean([margin[row, column] for row, column in at[i]])
      if boxes:
        in_box[model][position[i]] = np.mean([_in_boxes(row, column, boxes)
                                              for row, column in at[i]])
  positive = np.asarray(probabilities) > threshold
  result = {'border_share_of_each_side': BORDER_SHARE, 'margin_level': MARGIN_LEVEL,
            'threshold': threshold, 'models': {}}
  for model in peaks:
    entry = {'border': _rate_against_chance(in_border[model], border_share, num_resamples, seed),
             'margin': _rate_against_chance(in_margin[model], margin_share, num_resamples, seed)}
    if model == 'trained':
      for name, members in ((f'p > {threshold:g}', positive), (f'p <= {threshold:g}', ~positive)):
        entry[f'border, {name}'] = _rate_against_chance(
            in_border[model][members], border_share[members], num_resamples, seed)
        entry[f'margin, {name}'] = _rate_against_chance(
            in_margin[model][members], margin_share[members], num_resamples, seed)
    if with_confounders:
      also_abnormal = np.asarray([image_paths[i] in abnormal for i in with_confounders], bool)
      entry['confounders'] = _rate_against_chance(in_box[model], box_share, num_resamples, seed)
      entry['confounders, abnormal-box views'] = _rate_against_chance(
          in_box[model][also_abnormal], box_share[also_abnormal], num_resamples, seed)
    result['models'][model] = entry
  result['n_views'], result['n_views_with_confounders'] = n, len(with_confounders)
  return result, peaks


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's correlation of two maps' values."""
  ranks = [np.argsort(np.argsort(x.ravel())).astype(np.float64) for x in (a, b)]
  if ranks[0].std() == 0 or ranks[1].std() == 0:
    return 0.0
  return float(np.corrcoef(*ranks)[0, 1])


def against_trained(maps: np.ndarray, controls: dict[str, list[np.ndarray]],
                    hits: dict[str, np.ndarray], annotated: list[int], *,
                    num_resamples: int = 2000, seed: int = 0) -> dict:
  """Each control against the trained model: pointing on the annotated views (`hits`: per model,
  (draws, annotated views), 1 where the peak is in the box; a view's hit is its mean over the
  draws), the trained model's minus the control's paired over the same resampled views, each
  draw's own pointing, and the maps' rank correlation over every view (mean over draws).
  `controls`: {name: [maps (V, h, w) per draw]}."""
  hits = {name: np.atleast_2d(np.asarray(h, np.float64)) for name, h in hits.items()}
  result = {'trained': {'pointing': bootstrap_rate(hits['trained'].mean(0), num_resamples,
                                                   seed)}}
  for name, draws in controls.items():
    correlations = np.mean([[rank_correlation(a, b) for a, b in zip(maps, control)]
                            for control in draws], axis=0)
    result[name] = {'rank_correlation': bootstrap_rate(correlations, num_resamples, seed),
                    'draws': len(draws)}
    if len(annotated):
      per_view = hits[name].mean(0)
      result[name]['pointing'] = bootstrap_rate(per_view, num_resamples, seed)
      result[name]['pointing_per_draw'] = [float(h.mean()) for h in hits[name]]
      result[name]['trained_minus_control'] = bootstrap_rate(
          hits['trained'].mean(0), num_resamples, seed, baseline=per_view)
  return result


def peak_histogram(maps: np.ndarray, bins: int = 8) -> np.ndarray:
  """(bins, bins) counts of where each view's map peaks, in relative map coordinates: a fixed
  hotspot (the corner bug of some CAM tools) shows up as one full bin."""
  h, w = maps.shape[1:]
  flat = maps.reshape(len(maps), -1).argmax(1)
  i, j = np.divmod(flat, w)
  counts = np.zeros((bins, bins), np.int64)
  np.add.at(counts, ((i * bins) // h, (j * bins) // w), 1)
  return counts


def blank_and_histogram(predictor, maps: np.ndarray, annotated: list[int]) -> dict:
  """The blank image's map and the map's peak histogram (all views, annotated apart)."""
  spec = predictor.preprocessing
  blank = np.full((1, spec.image_size, spec.image_size, 1), 128, np.uint8)
  blank_logit, blank_map = predictor.view_maps(blank)
  bias = predictor.classifier_bias
  histogram = peak_histogram(maps)
  result = {
      'blank_image': {'probability': float(1 / (1 + np.exp(-blank_logit[0]))),
                      'raw_min': float(blank_map.min()), 'raw_max': float(blank_map.max()),
                      'display_min': float(display_map(blank_map.min(), bias)),
                      'display_max': float(display_map(blank_map.max(), bias))},
      'peak_histogram': histogram.tolist(),
      'peak_histogram_largest_share': float(histogram.max() / max(histogram.sum(), 1)),
  }
  # Views with an abnormality apart from the others: a map without evidence anywhere peaks at
  # its weak maximum, wherever that is, which says nothing about localisation.
  others = np.setdiff1d(np.arange(len(maps)), annotated)
  for name, members in (('annotated', annotated), ('other', others)):
    if len(members):
      counts = peak_histogram(maps[np.asarray(members)])
      result[f'peak_largest_share_{name}'] = float(counts.max() / counts.sum())
      result[f'peak_mean_max_{name}'] = float(maps[np.asarray(members)].max((1, 2)).mean())
  return result


def sanity_checks(predictor, maps, probabilities, images, image_paths, boxes: dict,
                  confounders: dict, controls: dict[str, dict], threshold: float, *,
                  num_resamples: int = 2000, seed: int = 0) -> dict:
  """Every check above, for localisation.json's "sanity". `maps`, `probabilities`: the trained
  model's over the split; `controls`: `control_maps(...)` (draws per control); `boxes`: the
  abnormality boxes
  (localisation.read_boxes; {} where unknown)."""
  spec = predictor.preprocessing
  annotated = [i for i, path in enumerate(image_paths) if path in boxes]
  result = blank_and_histogram(predictor, maps, annotated)
  def cam_peak(raw_maps):
    return lambda i, image: peak(raw_maps[i], *image.shape, spec)
  peak_of = {'trained': [cam_peak(maps)],
             'image intensity': [lambda i, image: np.unravel_index(int(np.argmax(image)),
                                                                   image.shape)]}
  peak_of.update({name: [cam_peak(out['map']) for out in draws]
                  for name, draws in controls.items()})
  result['peak_regions'], peaks = peak_regions(
      peak_of, images, image_paths, probabilities, threshold, confounders,
      {image_paths[i] for i in annotated}, num_resamples=num_resamples, seed=seed)
  hits = {name: np.asarray([[distance_to_box(*at[i][draw], boxes[image_paths[i]]) == 0
                             for i in annotated] for draw in range(len(peak_of[name]))],
                           np.float64).reshape(len(peak_of[name]), len(annotated))
          for name, at in peaks.items()}
  result['controls'] = against_trained(
      maps, {name: [out['map'] for out in draws] for name, draws in controls.items()}, hits,
      annotated, num_resamples=num_resamples, seed=seed)
  result['controls']['n_views'], result['controls']['n_annotated'] = len(maps), len(annotated)
  return result


def format_sanity(summary: dict) -> str:
  """localisation.md's sanity section (the checks above; localisation.json has every figure)."""
  sanity = summary['sanity']
  blank = sanity['blank_image']
  lines = ['', '## Sanity checks', '',
           f'- Blank (uniform gray) image: probability {blank["probability"]:.3f}, map '
           f'{blank["raw_min"]:.3f}..{blank["raw_max"]:.3f} (logit units).',
           f'- Peak positions over {summary["n_views"]} views (peaks.png): the fullest of 8 x 8 '
           f'bins holds {sanity["peak_histogram_largest_share"]:.1%} (a fixed hotspot would hold '
           '~100%).']
  if 'peak_largest_share_annotated' in sanity and 'peak_largest_share_other' in sanity:
    lines.append(f'  Views with a box: {sanity["peak_largest_share_annotated"]:.1%} in the '
                 f'fullest bin, mean map maximum {sanity["peak_mean_max_annotated"]:.1f}; the '
                 f'other views: {sanity["peak_largest_share_other"]:.1%}, mean maximum '
                 f'{sanity["peak_mean_max_other"]:.1f} (no evidence anywhere: their weak peak '
                 'falls where it may).')
  controls = sanity['controls']
  lines += ['', '### Controls against the trained model', '',
            'Cascading randomisation re-initialises the network from the classifier down, one '
            'stage more each row (fresh parameters and batch statistics), each stage drawn '
            'several times (a view\'s hit is its mean over the draws; each draw\'s own pointing '
            'beside it: one random network is one sample); "shuffled labels" is '
            'the same network trained on study labels permuted within body part '
            '(train.shuffled_labels_control). Pointing on the '
            f'{controls["n_annotated"]} views with an abnormality box; the difference paired '
            'over the same resampled views; rank correlation of the maps over all '
            f'{controls["n_views"]} views. A control that points as well as the trained model '
            'says the pointing game measures the data, not the model.', '',
            '| model | pointing | trained minus it | draws: their pointing | rank correlation '
            'with trained |', '|---|---|---|---|---|']
  for name, entry in controls.items():
    if not isinstance(entry, dict):
      continue
    pointing, difference, correlation = (
        cell(entry[k]) if k in entry else '' for k in
        ('pointing', 'trained_minus_control', 'rank_correlation'))
    per_draw = entry.get('pointing_per_draw', [])
    draws = (f'{len(per_draw)}: {min(per_draw):.3f}-{max(per_draw):.3f}' if len(per_draw) > 1
             else f'{entry["draws"]}' if 'draws' in entry else '')
    lines.append(f'| {name} | {pointing or "n/a"} | {difference} | {draws} | {correlation} |')
  if 'shuffled labels' not in controls:
    lines += ['', f'No shuffled-labels model ({sanity.get("shuffled_labels_workdir", "")}): '
              'train with --config.train.shuffled_labels_control=True for it.']
  regions = sanity['peak_regions']
  lines += ['', '### Where the peaks fall', '',
            f'Share of peaks in each region against chance (the region\'s share of the image: '
            f'border = the outer {regions["border_share_of_each_side"]:.3g} of each side; black '
            f'margin = pixels <= {regions["margin_level"]} (5 x 5 mean) connected to the edge; '
            f'confounders = the boxes of burned-in markers, text and rulers, over the '
            f'{regions["n_views_with_confounders"]} views that have any). Excess: peaks minus '
            'chance, paired over the same resampled views.', '',
            '| model | region | views | peaks | chance | excess |', '|---|---|---:|---|---|---|']
  for model, entry in regions['models'].items():
    for region, rates in entry.items():
      lines.append(f'| {model} | {region} | {rates["peaks"]["n_views"]} | '
                   f'{cell(rates["peaks"])} | {cell(rates["chance"])} | {cell(rates["excess"])} |')
  return '\n'.join(lines) + '\n'
