"""Pictures of class activation maps, shared by the CAM job and `mura-predict --cam`: one overlay
per view (the radiograph with M in 'jet' on the model's fixed display scale, maps.DisplayScale:
transparent where M <= 0, the peak ringed, the region above the scale's outline level outlined),
one figure per study (captions, a colour bar in logit units), the peaks' histogram."""

from __future__ import annotations

import io
import textwrap

from etils import epath
import numpy as np
from PIL import Image
from scipy import ndimage

from mura_jax.interpretation.maps import DisplayScale, peak, scaled, upsample

OPACITY = 0.6  # of the colour at the scale's top; it fades to 0 (the radiograph alone) at M = 0


def verdict_caption(probability: float, threshold: float) -> str:
  """'p = 0.49 < 0.5: normal', 'p = 0.73 > 0.5: abnormal': the sign is the comparison the
  verdict made, with as many digits as it takes for the number shown to agree with it."""
  p = float(probability)
  sign = '>' if p > threshold else '<' if p < threshold else '='
  for digits in range(2, 8):
    shown = f'{p:.{digits}f}'
    if np.sign(float(shown) - threshold) == np.sign(p - threshold):
      break
  return f'p = {shown} {sign} {threshold:g}: {"abnormal" if p > threshold else "normal"}'


def _ring(rows: int, columns: int, centre, radius: float, width: float) -> np.ndarray:
  yy, xx = np.ogrid[:rows, :columns]
  distance = np.hypot(yy - centre[0], xx - centre[1])
  return np.abs(distance - radius) <= width / 2


def overlay(image: np.ndarray, upsampled: np.ndarray, scale: DisplayScale,
            peak_at=None) -> np.ndarray:
  """uint8 (rows, columns, 3): the radiograph with M (upsampled to it) in 'jet' from 0 to the
  scale's top, more opaque where M is higher (M <= 0: the radiograph alone); the region where
  M >= the outline level outlined in white, and `peak_at` (row, column) ringed, each with a black
  edge so that they show on bone and background alike."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  rows, columns = image.shape
  gray = np.repeat(np.asarray(image, np.float64)[..., None] / 255.0, 3, axis=-1)
  level = scaled(upsampled, scale)
  colour = colormaps['jet'](level)[..., :3]
  alpha = OPACITY * level[..., None]
  picture = (1 - alpha) * gray + alpha * colour
  width = max(2, round(min(rows, columns) / 200))
  inside = upsampled >= scale.outline
  if inside.any() and not inside.all():
    line = inside & ~ndimage.binary_erosion(inside, iterations=width)
    edge = ndimage.binary_dilation(line, iterations=max(1, width // 2)) & ~line
    picture[edge] = 0.0
    picture[line] = 1.0
  if peak_at is not None:
    radius = max(6.0, 0.04 * min(rows, columns))
    picture[_ring(rows, columns, peak_at, radius, 2 * width)] = 0.0
    picture[_ring(rows, columns, peak_at, radius, width)] = 1.0
  return np.round(255 * picture).astype(np.uint8)


def study_figure(title: str, views: list[tuple[str, np.ndarray, str]], driver: int,
                 scale: DisplayScale):
  """A matplotlib Figure (constrained layout: title, captions and colour bar never overlap): each
  view's overlay with its caption; `driver` (the view with the highest probability, which moves
  the study's mean most) is marked; a colour bar in logit units, and what the marks mean."""
  from matplotlib import cm, colormaps, colors  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  columns = min(len(views), 4)
  rows = -(-len(views) // columns)
  width = 3.2 * columns + 1.4
  # Each row as tall as its views at 3.2 in wide (capped), plus room for four-line captions, the
  # title and the legend: a fixed height ran the constrained layout out of room for square views
  # (the driver's caption ran into the title) or for tall ones.
  aspect = max(v[1].shape[0] / v[1].shape[1] for v in views)
  figure = Figure(figsize=(width, rows * (min(3.2 * aspect, 5.0) + 0.9) + 1.4),
                  layout='constrained')
  FigureCanvasAgg(figure)
  axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
  for k, ax in enumerate(axes):
    ax.axis('off')
    if k < len(views):
      name, picture, caption = views[k]
      ax.imshow(picture)
      ax.set_title(f'{name}\n{caption}' + ('\ndrives the study' if k == driver else ''),
                   fontsize=9, fontweight='bold' if k == driver else 'normal')
  # Wrapped to the figure's width: one narrow view's figure cut a long study id off at both sides.
  figure.suptitle('\n'.join(textwrap.fill(line, int(width * 11), break_on_hyphens=False)
                            for line in title.split('\n')), fontsize=10)
  # The bar as the overlay shows it over mid-gray: the colour fades in with M.
  level = np.linspace(0, 1, 256)[:, None]
  shown = (1 - OPACITY * level) * 0.5 + OPACITY * level * colormaps['jet'](level[:, 0])[:, :3]
  bar = figure.colorbar(cm.ScalarMappable(colors.Normalize(0, scale.top),
                                          colors.ListedColormap(shown)),
                        ax=list(axes), fraction=0.04, pad=0.02, aspect=30, panchor=False)
  bar.set_label('M: evidence for abnormal (logit units per map cell)', fontsize=8)
  bar.ax.axhline(scale.outline, color='white', linewidth=2)
  bar.ax.tick_params(labelsize=7)
  legend = (f'Colour: M from 0 (transparent; below 0 is evidence for normal) to {scale.top:.3g} '
            f'and above (as shown over mid-gray), the scale of every view of this model: '
            f'{scale.source}. White outline: '
            f'M >= {scale.outline:.3g} (the line on the bar). Ring: the map\'s peak.')
  figure.supxlabel(textwrap.fill(legend, int(width * 13)), fontsize=7.5)
  return figure


def peak_figure(histogram: np.ndarray):
  """Where the maps peak over a split, relative to the image: spread, not one hot bin."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(4.2, 3.6))
  FigureCanvasAgg(figure)
  ax = figure.subplots()
  image = ax.imshow(histogram / max(histogram.sum(), 1), cmap='viridis', extent=(0, 1, 1, 0))
  ax.set(title='CAM peak positions (share of views)', xlabel='column / width',
         ylabel='row / height')
  figure.colorbar(image, ax=ax)
  figure.tight_layout()
  return figure


def save_png(path, figure_or_array) -> None:
  buffer = io.BytesIO()
  if isinstance(figure_or_array, np.ndarray):
    Image.fromarray(figure_or_array).save(buffer, format='PNG')
  else:
    figure_or_array.savefig(buffer, format='png', dpi=90)
  epath.Path(path).write_bytes(buffer.getvalue())


def draw_study(folder, title: str, views, spec, scale: DisplayScale, threshold: float,
               write: bool = True) -> list:
  """One study's pictures into `folder`: each view's overlay (FILE_NAME) and study.png, the views
  side by side with the one that drives the study's mean marked. `views`: (file name, name shown,
  gray radiograph (rows, columns), raw map, probability) each; `spec` the preprocessing the maps
  were computed with (upsampled through its inverse); captions compare each view's probability
  with `threshold`. `write`=False draws without writing (the other processes of a multi-host
  job). Returns the overlays (name shown, picture, caption)."""
  folder = epath.Path(folder)
  drawn = []
  for file_name, shown, radiograph, raw_map, probability in views:
    rows, columns = radiograph.shape
    top = float(np.max(raw_map))  # a ring where no cell has evidence for abnormal would mislead
    picture = overlay(radiograph, upsample(raw_map, rows, columns, spec), scale,
                      peak(raw_map, rows, columns, spec) if top > 0 else None)
    drawn.append((shown, picture, verdict_caption(probability, threshold) + (
        f'\npeak M = {top:.2f}' if top > 0 else '\nM <= 0 everywhere (no ring)')))
    if write:
      folder.mkdir(parents=True, exist_ok=True)
      save_png(folder / file_name, picture)
  if write:
    driver = int(np.argmax([v[4] for v in views]))
    save_png(folder / 'study.png', study_figure(title, drawn, driver, scale))
  return drawn
