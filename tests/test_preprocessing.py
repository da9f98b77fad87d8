"""One preprocessing: the training pipeline and the file path of prediction give the network the
same input, bit for bit; 16-bit images keep their contrast; the inverse map of `fit`. The
pipeline's grain workers outlive a preemption's SIGTERM."""

import functools
import io
import multiprocessing
import os
import signal

import numpy as np
import pytest
from PIL import Image

from mura_jax.data import images
from mura_jax.data import input_pipeline
from mura_jax.data import preprocessing
from tfds_mura.grayscale import grayscale_png


def _modes(synthetic_dir, image_paths):
  modes = {}
  for path in image_paths:
    with Image.open(synthetic_dir / path) as image:
      modes.setdefault(image.mode, path)
  return modes


@pytest.mark.parametrize('resize', ['squash', 'pad'])
def test_training_pipeline_and_predict_file_path_give_identical_input(mura_data_dir, synthetic_dir,
                                                                      resize):
  source = input_pipeline.data_source(str(mura_data_dir), 'validation')
  index = input_pipeline.read_split_index(str(mura_data_dir), 'validation')
  modes = _modes(synthetic_dir, index.image_path)
  assert {'L', 'RGB', 'RGBA'} <= set(modes), modes  # every mode MURA has, in the synthetic set
  size = 48
  for mode, path in modes.items():
    view = source[index.image_path.index(path)]
    # Training without augmentation (the stored view, through the training function) ...
    trained = input_pipeline.preprocess_view(view['image'], size, resize,
                                             rng=np.random.default_rng(0), flip=False,
                                             rotation_degrees=0.0)
    # ... and evaluation's, and predict's: the original file, read and fitted.
    evaluated = input_pipeline.preprocess_view(view['image'], size, resize)
    spec = preprocessing.Preprocessing(size, resize, 3)
    predicted = preprocessing.view_input(images.read_image(synthetic_dir / path), spec)
    np.testing.assert_array_equal(trained, predicted, err_msg=f'{mode} {path}')
    np.testing.assert_array_equal(evaluated, predicted, err_msg=f'{mode} {path}')
    for channels in (1, 3):
      a = np.asarray(preprocessing.normalize(trained[None], channels))
      b = np.asarray(preprocessing.normalize(predicted[None], channels))
      assert a.dtype == np.float32 and a.shape == (1, size, size, channels)
      np.testing.assert_array_equal(a, b)


def test_normalisation_is_imagenets():
  gray = np.full((1, 2, 2, 1), 255, np.uint8)
  x = np.asarray(preprocessing.normalize(gray, 3))
  np.testing.assert_allclose(x[0, 0, 0], (1 - np.array(preprocessing.IMAGENET_MEAN)) /
                             np.array(preprocessing.IMAGENET_STD), rtol=1e-6)
  with pytest.raises(ValueError, match='in_channels'):
    preprocessing.normalize(gray, 2)


def test_sixteen_bit_images_keep_their_contrast(tmp_path):
  # 12-bit data in a 16-bit PNG, as DICOM exports look: 64..4080 must not become 0..15.
  ramp = np.linspace(64, 4080, 40 * 30).reshape(40, 30).astype(np.uint16)
  path = tmp_path / 'twelve_bit.png'
  Image.fromarray(ramp).save(path)
  gray = images.read_image(path)
  assert gray.dtype == np.uint8 and gray.shape == (40, 30, 1)
  np.testing.assert_array_equal(gray[..., 0], (ramp >> 4).astype(np.uint8))
  assert gray.min() == 4 and gray.max() == 255
  # The builder stores the very same pixels (one rule for both).
  stored = Image.open(io.BytesIO(grayscale_png(path.read_bytes())[0]))
  np.testing.assert_array_equal(np.asarray(stored), gray[..., 0])
  # True 16-bit data keeps its top 8 bits; 8-bit-range data in 16 bits is kept as it is.
  full = np.array([[0, 65535]], np.uint16)
  low = np.array([[0, 200]], np.uint16)
  for pixels, expected in ((full, [[0, 255]]), (low, [[0, 200]])):
    Image.fromarray(pixels).save(tmp_path / 'x.png')
    np.testing.assert_array_equal(images.read_image(tmp_path / 'x.png')[..., 0], expected)


@pytest.mark.parametrize('height,width', [(517, 389), (389, 517), (300, 300)])
def test_fit_box_is_where_the_image_lands(height, width):
  image = np.zeros((height, width, 1), np.uint8)
  image[:] = 255
  size = 64
  top, left, rows, cols = preprocessing.fit_box(height, width, size, 'pad')
  fitted = preprocessing.fit(image, size, 'pad')[..., 0] > 127
  inside = np.zeros((size, size), bool)
  inside[int(round(top)):int(round(top + rows)), int(round(left)):int(round(left + cols))] = True
  assert (fitted != inside).sum() <= 2 * size  # at most the border row/column differs
  assert preprocessing.fit_box(height, width, size, 'squash') == (0.0, 0.0, size, size)


# By hand, S = 64: pad puts the view in a side x side square (side = the long side) at offsets
# floor((side - short) / 2), then scales by 64 / side. 517 x 389: offset (517 - 389) // 2 = 64
# -> 64 * 64 / 517; the short side 389 -> 389 * 64 / 517; 517 x 388: offset 129 // 2 = 64, not
# 64.5 (PIL pastes at whole pixels). Squash stretches the whole view over the input.
@pytest.mark.parametrize('height,width,pad', [
    (517, 389, (0, 4096 / 517, 64, 24896 / 517)),
    (389, 517, (4096 / 517, 0, 24896 / 517, 64)),
    (517, 388, (0, 4096 / 517, 64, 24832 / 517)),
    (300, 300, (0, 0, 64, 64))])
def test_fit_box_exact_numbers(height, width, pad):
  # Equal up to the one rounding of a float product (scale = 64 / side, times an integer).
  assert preprocessing.fit_box(height, width, 64, 'pad') == pytest.approx(pad, rel=1e-15, abs=0)
  assert preprocessing.fit_box(height, width, 64, 'squash') == (0.0, 0.0, 64.0, 64.0)


def test_unknown_resize_mode_and_preprocessing_settings():
  with pytest.raises(ValueError, match='resize'):
    preprocessing.fit(np.zeros((4, 4), np.uint8), 8, 'crop')
  with pytest.raises(ValueError, match='resize'):
    preprocessing.Preprocessing(224, 'crop', 3)
  with pytest.raises(ValueError, match='in_channels'):
    preprocessing.Preprocessing(224, 'squash', 2)


def test_grain_workers_outlive_a_preemption_sigterm(mura_data_dir):
  """A preemption's SIGTERM reaches every process of the host, grain's workers too, while the
  training process reads on to the step where it saves: the workers keep serving the epoch's
  batches (the same as without workers), and stop when the iterator closes."""
  source = input_pipeline.data_source(str(mura_data_dir), 'train')
  batches = functools.partial(input_pipeline.train_batches, source, seed=0, epoch=0,
                              global_batch=4, image_size=32)
  expected = [b['label'] for b in input_pipeline.batches_of(batches(num_workers=0))]
  assert len(expected) > 8  # more than grain buffers: the later ones are read after the signal
  iterator = input_pipeline.batches_of(batches(num_workers=1))
  got = [next(iterator)['label']]
  workers = [p for p in multiprocessing.active_children()
             if p.name.startswith('grain-process-prefetch')]
  assert len(workers) == 1
  for worker in workers:
    os.kill(worker.pid, signal.SIGTERM)
  got += [b['label'] for b in iterator]
  assert len(got) == len(expected)
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a, b)
  assert not any(worker.is_alive() for worker in workers)
