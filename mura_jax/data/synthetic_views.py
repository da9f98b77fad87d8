"""One synthetic radiograph: anatomy, an abnormality, and the confounders of real MURA views.

A real MURA view is not a clean limb on black. The film or detector plate is rotated inside its
frame with black margins; the collimator leaves straight edges with a bright unexposed band
outside them; a lead laterality letter ("L", "R") is exposed with the limb; the digitiser burns in
text ("PORT/SUPINE TRAUMA"); some views carry a ruler; exposure and contrast vary by study. All of
these appear in normal and abnormal studies alike, so a model (or a map) that looks at them is
looking at the wrong thing, and CAM's sanity checks can count it: their boxes are returned beside
the abnormality's.

Abnormalities are subtler than hardware alone: a thin fracture line, a small lytic lesion, and
metal hardware in a minority of abnormal studies.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tfds_mura import paths

# MURA's folder names of the dataset's body parts: XR_ELBOW, ..., XR_WRIST.
PART_FOLDERS = tuple(paths.part_folder(part) for part in paths.BODY_PARTS)

# Abnormal studies: fracture lines and lesions in most, hardware in a minority (its plate is as
# bright as the markers and text every view carries, so brightness alone does not find it).
ABNORMALITIES = ('hardware', 'fracture', 'lesion')
ABNORMALITY_PROBS = (0.2, 0.45, 0.35)
CONFOUNDERS = ('marker', 'text', 'ruler')

MARKER_FRACTION = 0.9    # views with a lead laterality letter
TEXT_FRACTION = 0.6      # views with burned-in text
RULER_FRACTION = 0.25    # views with a ruler
ROTATED_FRACTION = 0.6   # views whose plate is rotated inside the frame (black corners)
MIN_FIT = 0.7            # ... by at most the angle that keeps it at 70% of its size
TEXT_LINES = ('PORT/SUPINE', 'TRAUMA', 'AP', 'LAT', 'OBL', 'ERECT', 'PA', 'SITTING', 'WB',
              'POST REDUCTION', 'IN PLASTER', 'CR 12', 'DR3')


@dataclasses.dataclass(frozen=True)
class Look:
  """What varies by study rather than by view: the exposure, the contrast, the collimator's
  unexposed band, the side."""
  gain: float          # overall exposure
  gamma: float         # contrast: < 1 flattens the bones, > 1 steepens them
  unexposed: float     # gray level outside the collimator (0: shuttered black)
  side: str            # 'L' | 'R': the laterality letter


def study_look(rng) -> Look:
  return Look(gain=float(rng.uniform(0.75, 1.2)), gamma=float(rng.uniform(0.75, 1.35)),
              unexposed=float(rng.choice([0.0, rng.uniform(150, 215)], p=[0.4, 0.6])),
              side=str(rng.choice(['L', 'R'])))


@dataclasses.dataclass
class View:
  pixels: np.ndarray            # uint8, H x W
  box: tuple | None             # the abnormality's (x0, y0, x1, y1), x1 and y1 exclusive
  confounders: list             # [(kind, (x0, y0, x1, y1))], kind in CONFOUNDERS


def _capsule_distance(yy, xx, p, q):
  """Distance of every pixel to the segment p-q (points as (y, x))."""
  p, q = np.asarray(p, np.float32), np.asarray(q, np.float32)
  d = q - p
  t = ((yy - p[0]) * d[0] + (xx - p[1]) * d[1]) / max(float(d @ d), 1e-6)
  t = np.clip(t, 0.0, 1.0)
  return np.hypot(yy - (p[0] + t * d[0]), xx - (p[1] + t * d[1]))


def _bone_layout(body_part: str, rng) -> list[tuple[tuple[float, float], tuple[float, float], float]]:
  """Bones as (start, end, radius) in unit coordinates (y, x in [0, 1]); differs per body part."""
  j = lambda s=0.03: rng.normal(0.0, s)  # noqa: E731 (pose jitter)
  if body_part == 'XR_FINGER':  # three phalanges in a row
    x = 0.5 + j()
    return [((0.08 + 0.3 * i + j(0.01), x + j(0.02)), (0.33 + 0.3 * i, x + j(0.02)), 0.05)
            for i in range(3)]
  if body_part == 'XR_HAND':  # five metacarpals fanning out of a carpal cluster
    bones = [((0.75, 0.5 + j()), (0.85, 0.5 + j()), 0.12)]
    for k in range(5):
      angle = -0.5 + 0.25 * k + j(0.03)
      bones.append(((0.68, 0.5 + 0.08 * angle), (0.2, 0.5 + 0.6 * np.sin(angle)), 0.035))
    return bones
  if body_part == 'XR_WRIST':  # radius and ulna ends below a cluster of carpal bones
    bones = [((0.95, 0.38 + j()), (0.55, 0.4), 0.09), ((0.95, 0.64 + j()), (0.58, 0.62), 0.06)]
    for k in range(4):
      c = (0.42 + 0.06 * (k % 2) + j(0.01), 0.35 + 0.1 * k + j(0.01))
      bones.append((c, (c[0] + 0.03, c[1]), 0.05))
    return bones
  if body_part == 'XR_FOREARM':  # two long parallel bones
    return [((0.03, 0.4 + j()), (0.97, 0.38 + j()), 0.06), ((0.03, 0.6 + j()), (0.97, 0.64 + j()), 0.05)]
  if body_part == 'XR_ELBOW':  # humerus meeting radius/ulna at an angle
    bend = 0.25 + j(0.05)
    return [((0.02, 0.5 + j()), (0.5, 0.5), 0.09),
            ((0.5, 0.5), (0.98, 0.5 + bend), 0.06), ((0.52, 0.45), (0.98, 0.38 + bend), 0.05)]
  if body_part == 'XR_HUMERUS':  # one thick long bone with a rounded head
    return [((0.12, 0.5 + j()), (0.95, 0.5 + j()), 0.08), ((0.1, 0.5), (0.12, 0.5), 0.15)]
  if body_part == 'XR_SHOULDER':  # humeral head, glenoid, clavicle
    return [((0.45 + j(), 0.55), (0.47, 0.55), 0.16), ((0.55, 0.6), (0.98, 0.62 + j()), 0.08),
            ((0.25, 0.3), (0.6, 0.35 + j()), 0.06), ((0.15, 0.05), (0.25, 0.95 + j()), 0.035)]
  raise ValueError(f'unknown body part {body_part!r}; expected one of {PART_FOLDERS}')


def _image_shape(rng) -> tuple[int, int]:
  """(height, width): long side 512 px in most images, the short side 89..512 px."""
  long_side = 512 if rng.random() < 0.85 else int(rng.integers(256, 512))
  short_side = int(np.clip(long_side * rng.uniform(0.45, 1.0), 89, long_side))
  if rng.random() < 0.05:  # a few very narrow views, as in real MURA
    short_side = int(rng.integers(89, 160))
  return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def _font(size: float):
  return ImageFont.load_default(size=max(int(size), 14))  # smaller letters blur away


def _text_mask(shape, text: str, size: float, corner, rng, margin: int) -> np.ndarray:
  """A mask of `text` (lines) set in Pillow's built-in font, in one corner of an area."""
  h, w = shape
  layer = Image.new('L', (w, h), 0)
  draw = ImageDraw.Draw(layer)
  font = _font(size)
  x0, y0, x1, y1 = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
  tw, th = x1 - x0, y1 - y0
  top, left = corner
  x = margin if left else max(w - margin - tw, 0)
  y = margin if top else max(h - margin - th, 0)
  x += int(rng.integers(0, max(margin, 1)))
  y += int(rng.integers(0, max(margin, 1)))
  draw.multiline_text((x - x0, y - y0), text, fill=255, font=font, spacing=2)
  return np.asarray(layer) > 127


def _ruler_mask(shape, field, rng) -> np.ndarray:
  """A radio-opaque ruler: a bar with centimetre ticks along one edge of the collimated field."""
  h, w = shape
  top, left, bottom, right = field
  mask = np.zeros(shape, bool)
  scale = min(h, w)
  width = max(int(0.025 * scale), 3)
  tick = max(int(0.012 * scale), 2)
  if rng.random() < 0.5:  # vertical, by the left or right edge
    x = left + 2 if rng.random() < 0.5 else right - 2 - 2 * width
    y_start = top + int((bottom - top) * rng.uniform(0.05, 0.3))
    y_end = bottom - int((bottom - top) * rng.uniform(0.05, 0.3))
    mask[y_start:y_end, x:x + max(width // 3, 1)] = True
    for y in range(y_start, y_end, tick * 3):
      mask[y:y + max(tick // 3, 1), x:x + (width if (y - y_start) // (tick * 3) % 5 else 2 * width)] = True
  else:  # horizontal, by the top or bottom edge
    y = top + 2 if rng.random() < 0.5 else bottom - 2 - 2 * width
    x_start = left + int((right - left) * rng.uniform(0.05, 0.3))
    x_end = right - int((right - left) * rng.uniform(0.05, 0.3))
    mask[y:y + max(width // 3, 1), x_start:x_end] = True
    for x in range(x_start, x_end, tick * 3):
      mask[y:y + (width if (x - x_start) // (tick * 3) % 5 else 2 * width), x:x + max(tick // 3, 1)] = True
  return mask


def _abnormality(img, kind, bones, yy, xx, rng):
  """Draws one localised abnormality on a random bone; returns the image and its mask."""
  h, w = img.shape
  scale = min(h, w)
  a, b, r = bones[rng.integers(len(bones))]
  t = rng.uniform(0.3, 0.7)
  cy, cx = a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])
  d = np.array([b[0] - a[0], b[1] - a[1]], np.float32)
  d /= max(float(np.linalg.norm(d)), 1e-6)
  if kind == 'hardware':  # a bright metal plate along the bone, with darker screw holes
    half_len, half_wid = 0.2 * scale, max(0.04 * scale, 4)
    p, q = (cy - d[0] * half_len, cx - d[1] * half_len), (cy + d[0] * half_len, cx + d[1] * half_len)
    mask = _capsule_distance(yy, xx, p, q) < half_wid
    img = np.where(mask, 245.0, img)
    for s in np.linspace(-0.8, 0.8, 4):
      sy, sx = cy + s * d[0] * half_len, cx + s * d[1] * half_len
      img = np.where(np.hypot(yy - sy, xx - sx) < half_wid * 0.45, 150.0, img)
  elif kind == 'fracture':  # a thin dark line across the bone, a sclerotic edge on one side
    n = np.array([-d[1], d[0]])
    across = n + rng.uniform(-0.5, 0.5) * d
    across /= np.linalg.norm(across)
    half_len, gap = 1.3 * r, max(0.025 * scale, 3)
    p = (cy - across[0] * half_len, cx - across[1] * half_len)
    q = (cy + across[0] * half_len, cx + across[1] * half_len)
    dist = _capsule_distance(yy, xx, p, q)
    side = ((yy - cy) * d[0] + (xx - cx) * d[1]) > 0
    line = dist < gap
    img = np.where(line, img * 0.3, img)
    img = np.where(~line & (dist < 2.2 * gap) & side, img + 45.0, img)
    mask = dist < 2.2 * gap
  else:  # 'lesion': a small lytic lesion with a thin sclerotic rim
    rad = max(0.08 * scale, 0.8 * r, 4)
    dist = np.hypot(yy - cy, xx - cx)
    img = np.where(dist < rad, img * 0.35, np.where(dist < 1.3 * rad, img + 50.0, img))
    mask = dist < 1.3 * rad
  if not mask.any():  # the abnormality fell outside the view: a lesion at the centre instead
    return _abnormality(img, 'lesion', [((h / 2, w / 2), (h / 2, w / 2), 0.1 * scale)], yy, xx, rng)
  return img, mask


def _rotate(layers: list[np.ndarray], angle: float, out_shape) -> list[np.ndarray]:
  """Rotates the plate (float image first, then masks) inside a frame of `out_shape`, scaled to
  fit: the frame the plate no longer covers is black, as in scanned films."""
  h, w = out_shape
  out = []
  for i, layer in enumerate(layers):
    image = Image.fromarray(layer.astype(np.float32) if i == 0 else layer.astype(np.uint8) * 255)
    resample = Image.BILINEAR  # a mask's box covers every pixel its object touches
    rotated = image.rotate(angle, resample=resample, expand=True, fillcolor=0)
    fit = min(w / rotated.width, h / rotated.height)
    size = (max(int(rotated.width * fit), 1), max(int(rotated.height * fit), 1))
    frame = Image.new(image.mode, (w, h), 0)
    frame.paste(rotated.resize(size, resample), ((w - size[0]) // 2, (h - size[1]) // 2))
    array = np.asarray(frame)
    out.append(array.astype(np.float32) if i == 0 else array > 63)
  return out


def _fit(angle: float, h: int, w: int) -> float:
  """The scale at which a plate rotated by `angle` degrees fits back into its h x w frame."""
  c, s = abs(np.cos(np.radians(angle))), abs(np.sin(np.radians(angle)))
  return min(w / (w * c + h * s), h / (w * s + h * c))


def _box(mask: np.ndarray) -> tuple | None:
  ys, xs = np.nonzero(mask)
  if len(ys) == 0:
    return None
  return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def draw_view(body_part: str, abnormality: str | None, rng, look: Look | None = None) -> View:
  """One radiograph with its abnormality's box (None for a normal view) and its confounders'."""
  look = look or study_look(rng)
  h, w = _image_shape(rng)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  scale = min(h, w)
  # Dark field, a dim soft-tissue envelope, bright cortex and a slightly darker medulla.
  img = np.full((h, w), 12.0, np.float32)
  bones = [((a[0] * h, a[1] * w), (b[0] * h, b[1] * w), r * scale * rng.uniform(0.9, 1.1))
           for a, b, r in _bone_layout(body_part, rng)]
  distances = [_capsule_distance(yy, xx, a, b) for a, b, _ in bones]
  outside = np.min([d - r for d, (_, _, r) in zip(distances, bones)], axis=0)
  img += 45.0 * np.exp(-np.maximum(outside, 0.0) / (0.12 * scale))
  for d, (_, _, r) in zip(distances, bones):
    inside = d < r
    img[inside] += 110.0 + 40.0 * (d[inside] / r) ** 2
  layers = {}
  if abnormality is not None:
    img, layers['abnormality'] = _abnormality(img, abnormality, bones, yy, xx, rng)
  # The study's exposure and contrast, a low-frequency gradient.
  img = 255.0 * (np.clip(img * look.gain, 0, 255) / 255.0) ** look.gamma
  img += 15.0 * (yy / h - 0.5) * rng.uniform(-1, 1)
  # The collimator: straight edges, the band outside them unexposed (bright) or shuttered.
  m = lambda: int(rng.uniform(0.0, 0.1) * scale)  # noqa: E731
  field = (m(), m(), h - m(), w - m())
  collimated = np.ones((h, w), bool)
  collimated[field[0]:field[2], field[1]:field[3]] = False
  img = np.where(collimated, look.unexposed, img)
  # Lead markers and rulers are exposed with the limb: they rotate with the plate.
  if rng.random() < MARKER_FRACTION:
    corner = (rng.random() < 0.5, rng.random() < 0.5)
    area = np.zeros((h, w), bool)
    sub = _text_mask((field[2] - field[0], field[3] - field[1]), look.side,
                     rng.uniform(0.1, 0.15) * scale, corner, rng, margin=int(0.03 * scale) + 2)
    area[field[0]:field[2], field[1]:field[3]] = sub
    layers['marker'] = area
    img = np.where(area, rng.uniform(230, 250), img)
  if rng.random() < RULER_FRACTION:
    layers['ruler'] = _ruler_mask((h, w), field, rng)
    img = np.where(layers['ruler'], rng.uniform(200, 240), img)
  img += rng.normal(0.0, 2.0, size=img.shape)
  names = list(layers)
  if rng.random() < ROTATED_FRACTION:
    angle = float(rng.uniform(5, 30) * rng.choice([-1, 1]))
    while _fit(angle, h, w) < MIN_FIT and abs(angle) > 1:  # narrow views tilt less
      angle /= 2
    img, *masks = _rotate([np.clip(img, 1, 255)] + [layers[k] for k in names], angle, (h, w))
    layers = dict(zip(names, masks))
  # Text the digitiser burns in: axis-aligned, in a corner of the frame, black margin or not.
  if rng.random() < TEXT_FRACTION:
    lines = '\n'.join(rng.choice(TEXT_LINES, size=int(rng.integers(1, 4)), replace=False))
    corner = (rng.random() < 0.5, rng.random() < 0.5)
    layers['text'] = _text_mask((h, w), lines, rng.uniform(0.03, 0.05) * scale, corner, rng,
                                margin=int(0.02 * scale) + 2)
    img = np.where(layers['text'], rng.uniform(225, 255), img)
  pixels = np.clip(np.round(img), 0, 255).astype(np.uint8)
  box = _box(layers['abnormality']) if 'abnormality' in layers else None
  if abnormality is not None and box is None:  # rotated out of the frame: draw the view again
    return draw_view(body_part, abnormality, rng, look)
  confounders = [(k, _box(layers[k])) for k in CONFOUNDERS if k in layers and _box(layers[k])]
  return View(pixels, box, confounders)
