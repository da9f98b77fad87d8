"""What the network sees, defined once: image -> 8-bit gray -> square of the configured size ->
ImageNet-normalised input on the device.

Training (with augmentation around `fit`, in `input_pipeline`), evaluation, CAM, prediction from
files and export all call these functions, so a model never sees other pixels in deployment than
in training (the classic silent failure of deployed radiology models).

  1. `to_gray`: any decoded image (8/16-bit gray, RGB, RGBA, ...) -> uint8 gray, by the dataset's
     own rule (`tfds_mura.to_grayscale`), which the TFDS build applied to every stored view.
  2. `fit`: uint8 gray -> uint8 (S, S, 1): 'squash' scales to S x S as the paper does (aspect
     ratio lost); 'pad' pads to a square with black (the radiograph's background) first. Bilinear.
     `fit_box` says where the original image lands in the square (for mapping CAMs back).
  3. `model_input` (on the device, inside jit): uint8 -> float32 in [0, 1] -> ImageNet
     normalisation; 3 channels (the gray image in each, exactly what an ImageNet network sees for
     a gray photograph) or 1 channel for models whose conv0 was folded over the input channels
     (`models.weights.adapt_input_channels`).

Images travel as uint8 until the device: four times less to copy than float RGB.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from PIL import Image
from mura_jax.errors import ConfigError
from tfds_mura import to_grayscale

RESIZE_MODES = ('squash', 'pad')

# Both ImageNet ports (torchvision, Keras' DenseNet with mode='torch') expect RGB in [0, 1]
# normalised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A one-channel (folded) model takes gray normalised with the channel averages: padding then
# stands for a gray close to every channel's mean, which keeps the border error of folding small.
GRAY_MEAN = sum(IMAGENET_MEAN) / 3
GRAY_STD = sum(IMAGENET_STD) / 3


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """The settings that decide the network's input; stored with every checkpoint."""
  image_size: int = 224
  resize: str = 'squash'
  in_channels: int = 3

  def __post_init__(self):
    if self.resize not in RESIZE_MODES:
      raise ConfigError(f'resize={self.resize!r}; expected one of {RESIZE_MODES}')
    if self.in_channels not in (1, 3):
      raise ConfigError(f'in_channels must be 1 or 3, not {self.in_channels}.')

  @classmethod
  def from_config(cls, config) -> Preprocessing:
    return cls(int(config.data.image_size), str(config.data.resize),
               int(config.model.in_channels))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# 1. Decoded image -> 8-bit gray.


def to_gray(image: Image.Image) -> Image.Image:
  """A PIL image of any supported mode -> mode 'L', by the rule the dataset was built with."""
  return to_grayscale(image)


# ------------------------------------------------------------------------------------------------
# 2. Gray -> the network's square.


def fit(gray: Image.Image | np.ndarray, image_size: int, resize: str = 'squash') -> np.ndarray:
  """uint8 gray (PIL 'L', (H, W) or (H, W, 1)) -> uint8 (S, S, 1); see the module docstring."""
  if resize not in RESIZE_MODES:
    raise ConfigError(f'resize={resize!r}; expected one of {RESIZE_MODES}')
  pil = gray if isinstance(gray, Image.Image) else Image.fromarray(np.asarray(gray)[..., 0]
                                                                   if np.ndim(gray) == 3 else gray)
  if resize == 'pad':
    side = max(pil.size)
    square = Image.new('L', (side, side), 0)
    square.paste(pil, ((side - pil.size[0]) // 2, (side - pil.size[1]) // 2))
    pil = square
  pil = pil.resize((image_size, image_size), resample=Image.Resampling.BILINEAR)
  return np.asarray(pil, np.uint8)[..., None]


def fit_box(height: int, width: int, image_size: int, resize: str = 'squash'):
  """(top, left, rows, columns) of the original image inside the S x S network input, in input
  pixels (floats): the inverse map of `fit`, for upsampling maps back to the radiograph."""
  if resize == 'squash':
    return 0.0, 0.0, float(image_size), float(image_size)
  side = max(height, width)
  scale = image_size / side
  return (side - height) // 2 * scale, (side - width) // 2 * scale, height * scale, width * scale


def view_input(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
  """uint8 (H, W, 1) gray view -> uint8 (S, S, 1): what evaluation and prediction feed the model."""
  return fit(image, preprocessing.image_size, preprocessing.resize)


# ------------------------------------------------------------------------------------------------
# 3. On the device: normalisation and channels.


def model_input(gray, in_channels: int, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                gray_mean: float = GRAY_MEAN, gray_std: float = GRAY_STD):
  """Gray images in [0, 1], shaped (..., H, W, 1) -> the network's float input: the
  ImageNet-normalised RGB replica (in_channels 3) or normalised gray (1)."""
  if in_channels == 3:
    return (gray - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  if in_channels == 1:
    return (gray - np.float32(gray_mean)) / np.float32(gray_std)
  raise ConfigError(f'in_channels must be 1 or 3, not {in_channels}.')


def normalize(images, in_channels: int = 3):
  """uint8 (..., S, S, 1) -> float32 model input; runs inside the jitted steps."""
  return model_input(images.astype(jnp.float32) / 255.0, in_channels)
