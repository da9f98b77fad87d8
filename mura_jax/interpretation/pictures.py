"""Pictures of class activation maps, shared by the CAM job and `mura-predict --cam`: one overlay per
view (the radiograph with sigmoid(M + b) in 'jet'), one figure per study, the peaks' histogram."""

from __future__ import annotations

import io

from etils import epath
import numpy as np
from PIL import Image

from mura_jax.interpretation.maps import display_map, upsample


def overlay(image: np.ndarray, display: np.ndarray) -> np.ndarray:
  """uint8 (rows, columns, 3): the radiograph with the display map in 'jet', more opaque where
  the map is higher (a normal view stays mostly the radiograph)."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  gray = np.repeat(np.asarray(image, np.float64)[..., None] / 255.0, 3, axis=-1)
  colour = colormaps['jet'](np.clip(display, 0, 1))[..., :3]
  alpha = 0.6 * np.clip(display, 0, 1)[..., None]
  return np.round(255 * ((1 - alpha) * gray + alpha * colour)).astype(np.uint8)


def study_figure(title: str, views: list[tuple[str, np.ndarray, float]], driver: int):
  """A matplotlib Figure: each view's overlay with its probability; `driver` (the view with the
  highest probability, which moves the study's mean most) is marked."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  columns = min(len(views), 4)
  rows = -(-len(views) // columns)
  figure = Figure(figsize=(3.2 * columns + 0.8, 3.6 * rows + 0.6))
  FigureCanvasAgg(figure)
  axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
  for k, ax in enumerate(axes):
    ax.axis('off')
    if k < len(views):
      name, picture, probability = views[k]
      ax.imshow(picture)
      ax.set_title(f'{name}  p={probability:.3f}' + ('  (drives)' if k == driver else ''),
                   fontsize=9, fontweight='bold' if k == driver else 'normal')
  figure.suptitle(title, fontsize=10)
  from matplotlib import cm, colors  # pylint: disable=g-import-not-at-top
  bar = figure.colorbar(cm.ScalarMappable(colors.Normalize(0, 1), 'jet'), ax=list(axes),
                        fraction=0.02, pad=0.01)
  bar.set_label('sigmoid(M + b): the map on the probability scale')
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


def draw_study(folder, title: str, views, spec, bias: float, write: bool = True) -> list:
  """One study's pictures into `folder`: each view's overlay (FILE_NAME) and study.png, the views
  side by side with the one that drives the study's mean marked. `views`: (file name, name shown,
  gray radiograph (rows, columns), raw map, probability) each; `spec` the preprocessing the maps
  were computed with (upsampled through its inverse). `write`=False draws without writing (the
  other processes of a multi-host job). Returns the overlays."""
  folder = epath.Path(folder)
  drawn = []
  for file_name, shown, radiograph, raw_map, probability in views:
    picture = overlay(radiograph, display_map(upsample(raw_map, *radiograph.shape, spec), bias))
    drawn.append((shown, picture, float(probability)))
    if write:
      folder.mkdir(parents=True, exist_ok=True)
      save_png(folder / file_name, picture)
  if write:
    save_png(folder / 'study.png', study_figure(title, drawn, int(np.argmax(
        [p for _, _, p in drawn]))))
  return drawn
