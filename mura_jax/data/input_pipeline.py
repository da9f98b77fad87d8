"""Grain input pipelines over the TFDS `mura` data source: decode, augment, batch, shard per host.

Each host reads only its part of every global batch: global batch k holds the epoch's positions
[k*B, (k+1)*B), and host p the positions [k*B + p*b, k*B + (p+1)*b) with b = B / processes. The
global batch, put together by `parallel.global_batch`, is thus the same on 1 or N hosts, and so is
the training. Augmentation draws from a generator seeded by (seed, epoch, position), so it is the
same whatever the number of hosts or grain workers.

What the network sees is `preprocessing`'s (gray -> `fit` to S x S -> `normalize` on the
device); training adds the random lateral flip and rotation (`augment`) to the fitted S x S view.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any
from collections.abc import Iterator

import grain
import numpy as np
from absl import logging
from PIL import Image

from mura_jax.data import preprocessing
from mura_jax.errors import ConfigError, DatasetNotFoundError
from tfds_mura import build
from absl import flags


@dataclasses.dataclass(frozen=True)
class SplitIndex:
  """What every view of a split is, read from the records without decoding one image."""
  studies: tuple[str, ...]      # study ids, e.g. 'valid/XR_WRIST/patient11185/study1_positive'
  study_index: np.ndarray       # (views,) int32: index into `studies`
  label: np.ndarray             # (views,) int32: 1 = abnormal
  body_part: np.ndarray         # (views,) int32: index into tfds_mura.BODY_PARTS
  image_path: tuple[str, ...]   # (views,) as in MURA's CSV

  def __len__(self):
    return len(self.label)


def data_source(data_dir: str, split: str):
  """The `mura` split as a random-access source; a clear error when the dataset is not built."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    # download=False: reading never builds (TFDS would start a build inside data_dir, leaving
    # folders behind, and fail on the missing manual download with another message).
    return tfds.data_source('mura', data_dir=data_dir, split=split, download=False)
  except Exception as e:  # pylint: disable=broad-except  (TFDS raises several kinds)
    misplaced = build.data_dir_of_built(data_dir)
    if misplaced is not None:
      folder, meant = misplaced
      raise DatasetNotFoundError(
          f'The data_dir {data_dir} is the {folder} folder of a built `mura` dataset, not the '
          f'data_dir that holds it: use --config.data.data_dir={meant}') from None
    raise DatasetNotFoundError(
        f'No built `mura` dataset with split {split!r} in {data_dir} ({type(e).__name__}: {e}).\n'
        'Build it first: python -m tfds_mura.build --manual_dir DIR --data_dir '
        f'{data_dir}   (DIR holds MURA-v1.1.zip or MURA-v1.1/; or run configs/demo.py for a '
        'synthetic one).') from e


def read_split_index(data_dir: str, split: str) -> SplitIndex:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_source(data_dir, split)  # the clear error, if any
  source = tfds.data_source('mura', data_dir=data_dir, split=split,
                            decoders={'image': tfds.decode.SkipDecoding()})
  examples = source.__getitems__(list(range(len(source))))
  study_ids = [ex['study_id'].decode() for ex in examples]
  studies = tuple(dict.fromkeys(study_ids))  # first-seen order
  position = {s: i for i, s in enumerate(studies)}
  return SplitIndex(
      studies=studies,
      study_index=np.array([position[s] for s in study_ids], np.int32),
      label=np.array([ex['label'] for ex in examples], np.int32),
      body_part=np.array([ex['body_part'] for ex in examples], np.int32),
      image_path=tuple(ex['image_path'].decode() for ex in examples))


def subset(split_index: SplitIndex, views: np.ndarray) -> SplitIndex:
  """The index of some views of a split (whole studies: e.g. a body part's), in their order."""
  views = np.asarray(views, np.int64)
  kept_studies = np.unique(split_index.study_index[views])
  position = np.full(len(split_index.studies), -1, np.int32)
  position[kept_studies] = np.arange(kept_studies.size)
  return SplitIndex(
      studies=tuple(split_index.studies[s] for s in kept_studies),
      study_index=position[split_index.study_index[views]],
      label=split_index.label[views], body_part=split_index.body_part[views],
      image_path=tuple(split_index.image_path[v] for v in views))


def views_of_body_parts(split_index: SplitIndex, body_part_indices) -> np.ndarray:
  """Positions of the split's views whose body part (BODY_PARTS index) is one of these."""
  return np.flatnonzero(np.isin(split_index.body_part, np.asarray(body_part_indices)))


class SubsetSource:
  """Some examples of a random-access source, read like a whole split (`subset`'s views)."""

  def __init__(self, source, indices):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[int(self._indices[i])]


# ------------------------------------------------------------------------------------------------
# One view: augment (train only), then the one preprocessing.


def augment(pil: Image.Image, rng: np.random.Generator, flip: bool = True,
            rotation_degrees: float = 30.0) -> Image.Image:
  """The paper's augmentation: a random lateral flip, then a random rotation (black fill)."""
  if flip and rng.random() < 0.5:
    pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if rotation_degrees:
    angle = float(rng.uniform(-rotation_degrees, rotation_degrees))
    pil = pil.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
  return pil


def preprocess_view(image: np.ndarray, image_size: int, resize: str = 'squash',
                    rng: np.random.Generator | None = None, flip: bool = True,
                    rotation_degrees: float = 30.0) -> np.ndarray:
  """uint8 (H, W, 1) -> uint8 (S, S, 1) (`preprocessing.fit`). With `rng`: then `augment`.

  The augmentation comes after the resize: rotating S x S pixels instead of the full-resolution
  radiograph (about 512 x 400) costs a third (BENCHMARKS.md, input pipeline)."""
  if resize not in preprocessing.RESIZE_MODES:
    raise ConfigError(f'resize={resize!r}; expected one of {preprocessing.RESIZE_MODES}')
  fitted = preprocessing.fit(Image.fromarray(image[..., 0]), image_size, resize)
  if rng is None:
    return fitted
  return np.asarray(augment(Image.fromarray(fitted[..., 0]), rng, flip, rotation_degrees),
                    np.uint8)[..., None]


# ------------------------------------------------------------------------------------------------
# Which example sits at which position, per host.


def local_positions(num_positions: int, global_batch: int, process_index: int,
                    process_count: int, start_batch: int = 0) -> np.ndarray:
  """This host's positions of an epoch, batch by batch (see the module docstring)."""
  if global_batch % process_count:
    raise ConfigError(f'global batch {global_batch} is not divisible by {process_count} processes')
  b = global_batch // process_count
  batches = np.arange(start_batch, num_positions // global_batch)
  return (batches[:, None] * global_batch + process_index * b + np.arange(b)[None, :]).reshape(-1)


def _train_view(position_and_index, source, seed, epoch, image_size, resize, flip, rotation):
  position, index = position_and_index
  example = source[int(index)]
  rng = np.random.default_rng([seed, epoch, int(position)])
  return {
      'image': preprocess_view(example['image'], image_size, resize, rng, flip, rotation),
      'label': np.int32(example['label']),
      'body_part': np.int32(example['body_part']),
  }


def _eval_view(position, source, num_examples, image_size, resize):
  valid = position < num_examples
  index = int(position) if valid else 0  # padding repeats view 0 and carries mask 0
  example = source[index]
  return {
      'image': preprocess_view(example['image'], image_size, resize),
      'label': np.int32(example['label']),
      'body_part': np.int32(example['body_part']),
      'index': np.int32(index),   # the view's row in the split (and in SplitIndex)
      'mask': np.float32(valid),
  }


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example at each position of a training epoch: a permutation from (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(source, *, seed: int, epoch: int, global_batch: int, image_size: int,
                  resize: str = 'squash', flip: bool = True, rotation_degrees: float = 30.0,
                  process_index: int = 0, process_count: int = 1, start_batch: int = 0,
                  num_workers: int = 0, prefetch: int = 2) -> grain.IterDataset:
  """This host's training batches of one epoch, from `start_batch` on (exact resume).

  The last incomplete global batch is dropped, as `drop_last` training does; every example is
  seen in the next epochs' other orders.
  """
  order = epoch_order(len(source), seed, epoch)
  positions = local_positions(len(source), global_batch, process_index, process_count, start_batch)
  pairs = np.stack([positions, order[positions]], axis=1)
  view = functools.partial(_train_view, source=source, seed=seed, epoch=epoch,
                           image_size=image_size, resize=resize, flip=flip,
                           rotation=rotation_degrees)
  dataset = (grain.MapDataset.source(pairs).map(view)
             .batch(global_batch // process_count, drop_remainder=True))
  return _to_iter(dataset, num_workers, prefetch)


def train_batch_shapes(global_batch: int, image_size: int) -> dict[str, tuple[tuple, Any]]:
  """{key: (shape, dtype)} of one global batch of `train_batches` (all hosts' parts together):
  the train step compiles from these while the first batch is still being read."""
  return {'image': ((global_batch, image_size, image_size, 1), np.uint8),
          'label': ((global_batch,), np.int32), 'body_part': ((global_batch,), np.int32)}


def num_train_batches(num_examples: int, global_batch: int) -> int:
  return num_examples // global_batch


def eval_batches(source, *, global_batch: int, image_size: int, resize: str = 'squash',
                 process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                 prefetch: int = 2) -> grain.IterDataset:
  """Every view of the split exactly once, in order; the last batch padded with `mask` 0."""
  num_padded = -(-len(source) // global_batch) * global_batch
  positions = local_positions(num_padded, global_batch, process_index, process_count)
  view = functools.partial(_eval_view, source=source, num_examples=len(source),
                           image_size=image_size, resize=resize)
  dataset = grain.MapDataset.source(positions).map(view).batch(global_batch // process_count)
  return _to_iter(dataset, num_workers, prefetch)


def _to_iter(dataset: grain.MapDataset, num_workers: int, prefetch: int) -> grain.IterDataset:
  iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=max(prefetch, 1),
                                                       prefetch_buffer_size=max(prefetch, 1)))
  if num_workers != 0:  # -1: auto
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; outside an absl app nobody parsed them.
      flags.FLAGS.mark_as_parsed()
    iterable = iterable.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count(num_workers)),
        worker_init_fn=functools.partial(_outlive_sigterm, os.getpid()))
  return iterable


def _outlive_sigterm(parent: int, unused_index: int, unused_count: int) -> None:
  """grain's worker processes start with this: a preemption's SIGTERM goes to every process of
  the host, and a worker it killed would stop the training process at its next batch ('Worker
  process was terminated unexpectedly') before the checkpoint the notice asks for. The training
  process stops its workers itself when it is done (grain's close: a stop event, then SIGKILL);
  a worker whose training process is gone still ends on SIGTERM."""
  def handle(signum, frame):  # pylint: disable=unused-argument
    if os.getppid() != parent:
      os._exit(128 + signum)  # pylint: disable=protected-access
  signal.signal(signal.SIGTERM, handle)


# The most grain workers `num_workers=-1` starts: a host with 200 cores should not start 200
# Python processes (each a process start and its own memory). At about 240 training views/s per
# core (224 px; docs/benchmarks-history.md, "Input pipeline"), 32 decode several thousand views/s
# per host; the logged input rate and wait (InputMeter) say when a host needs more (a number).
AUTO_WORKERS_CAP = 32


@functools.cache
def worker_count(requested: int) -> int:
  """Worker processes for `config.data.num_workers`. -1 (auto): one per CPU core this process
  may use, less one for the training process, at most AUTO_WORKERS_CAP; on a Slurm node whose
  tasks are not bound to cores of their own, the node's cores are shared by its tasks
  (SLURM_NTASKS_PER_NODE). A number: at most one per core (more only compete for the cores with
  each other and the steps, and each costs a process start: docs/benchmarks-history.md,
  "Measurements behind choices in the code"). Logged when chosen or lowered."""
  cores = _usable_cores()
  if requested < 0:
    tasks = _slurm_tasks_per_node()
    share = cores // tasks if tasks > 1 and cores >= (os.cpu_count() or cores) else cores
    count = max(1, min(AUTO_WORKERS_CAP, share - 1))
    logging.info('config.data.num_workers=-1 (auto): %d grain worker processes (%d CPU cores for '
                 'this process, one kept for it; at most %d).', count, share, AUTO_WORKERS_CAP)
    return count
  count = max(1, min(requested, cores))
  if count < requested:
    logging.info('config.data.num_workers=%d but this host lets this process use %d CPU cores: '
                 '%d grain worker processes.', requested, cores, count)
  return count


def _usable_cores() -> int:
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return cores or 1


def _slurm_tasks_per_node() -> int:
  """Slurm's tasks on this node (SLURM_NTASKS_PER_NODE, e.g. '8'); 1 outside Slurm."""
  text = os.environ.get('SLURM_NTASKS_PER_NODE', '').split('(')[0].split(',')[0]
  return int(text) if text.isdigit() and int(text) > 0 else 1


def batches_of(dataset: grain.IterDataset) -> Iterator[dict[str, np.ndarray]]:
  """Iterates and closes the multiprocessing workers when done or abandoned."""
  iterator = iter(dataset)
  try:
    yield from iterator
  finally:
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()


class InputMeter:
  """This host's input, measured where the training loop meets it: the images it read and the
  seconds it waited for its next batch. With grain's workers and prefetch the input runs beside
  the steps, so its own rate shows only when the loop waits for it: a wait fraction well above 0
  says the input is what limits training, and the images/s read is then the pipeline's own rate;
  near 0, the pipeline is faster (the rate read is a lower bound of it)."""

  def __init__(self, batches: Iterator[dict[str, np.ndarray]]):
    self._batches = batches
    self.waited, self.images, self._since = 0.0, 0, time.perf_counter()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    started = time.perf_counter()
    batch = next(self._batches)
    self.waited += time.perf_counter() - started
    self.images += len(batch['label'])
    return batch

  def take(self) -> dict[str, float]:
    """{'input_images_per_second', 'input_wait_fraction'} since the last take (or the start)."""
    now = time.perf_counter()
    seconds = max(now - self._since, 1e-9)
    measured = {'input_images_per_second': self.images / seconds,
                'input_wait_fraction': min(1.0, self.waited / seconds)}
    self.waited, self.images, self._since = 0.0, 0, now
    return measured
