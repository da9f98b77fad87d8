"""Training's metrics: metrics.jsonl always, TensorBoard event files where clu and TensorFlow are
installed (imported in the background after the first step)."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import time

import jax
from absl import logging
from etils import epath


def _import_clu_writers():
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  except ImportError:
    return None
  return metric_writers


class MetricWriter:
  """TensorBoard files through clu (needs TensorFlow: the `tf` extra) + the log + metrics.jsonl."""

  def __init__(self, workdir):
    self._workdir, self._just_logging = workdir, jax.process_index() > 0
    self._clu = None  # clu's import, started by `import_in_background` or at the first write
    self._tensorboard_checked = False
    self._writer = None
    self._jsonl = None if self._just_logging else epath.Path(workdir) / 'metrics.jsonl'
    # Lines are buffered and written at each flush (every epoch, at preemption, every 30 s): a
    # gs:// workdir gets one write per flush, not one round trip per line. Object stores cannot
    # append, so there the whole file is rewritten from what this process has seen.
    self._remote = self._jsonl is not None and '://' in os.fspath(self._jsonl)
    self._written = (self._jsonl.read_text() if self._remote and self._jsonl.exists() else '')
    self._pending: list[str] = []
    self._last_flush = time.time()

  def import_in_background(self):
    """clu imports TensorFlow (seconds of Python holding the interpreter lock): the loop starts
    it after the first step, when the steps run in XLA and leave the lock free; started at
    start-up it would slow the weights' loading and the model's set-up beside it."""
    if self._clu is None:
      self._clu = concurrent.futures.ThreadPoolExecutor(1).submit(_import_clu_writers)

  def _tensorboard(self):
    """The TensorBoard writer, made at the first write (None without TensorFlow)."""
    if not self._tensorboard_checked:
      self.import_in_background()
      metric_writers, self._tensorboard_checked = self._clu.result(), True
      if metric_writers is None:
        logging.warning('TensorFlow is not installed: no TensorBoard files; metrics go to the log '
                        'and metrics.jsonl (pip install "mura-jax[tf]" for TensorBoard).')
      else:
        self._writer = metric_writers.create_default_writer(self._workdir,
                                                            just_logging=self._just_logging)
    return self._writer

  def write(self, step: int, scalars: dict):
    scalars = {k: float(v) for k, v in scalars.items() if v is not None}
    self._tensorboard()
    if self._writer is not None:
      self._writer.write_scalars(step, scalars)
    else:
      logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in scalars.items()))
    if self._jsonl is not None:
      self._pending.append(json.dumps({'step': step, **{k: (v if math.isfinite(v) else None)
                                                        for k, v in scalars.items()}}) + '\n')
      if time.time() - self._last_flush > 30:
        self.flush()

  def flush(self):
    if self._tensorboard() is not None:
      self._writer.flush()
    if self._jsonl is not None and self._pending:
      if self._remote:
        self._written += ''.join(self._pending)
        self._jsonl.write_text(self._written)
      else:
        with self._jsonl.open('a') as f:
          f.write(''.join(self._pending))
      self._pending = []
    self._last_flush = time.time()
