"""Traced steps kept beside JAX's persistent compilation cache, so that a restart skips tracing.

The compilation cache (`parallel.enable_compilation_cache`) spares a restart XLA's compilation, but
its key is the lowered program: every start still traces the Flax model and its gradient in Python
first, which for DenseNet-169's train step takes longer than looking up and loading the compiled
step together (BENCHMARKS.md, "Start-up: cold vs warm"). `jit` below keeps the traced, lowered
program (a `jax.export` artifact: StableHLO) under a key of everything that defines it: the caller's
description of its static inputs (model, optimiser, loss weights), the arguments' tree structures,
shapes, dtypes and shardings, the devices, the versions of jax, jaxlib, flax and optax, and this
package's source. A start that finds it deserialises it (milliseconds) instead of tracing; the
program is the same as a miss would lower, so the compilation cache then finds its executable.

One process only: on several hosts every host would have to find the same file, which nothing
here checks; there the steps are traced as usual.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import pathlib
import pickle
from typing import Any, Callable, Sequence

import jax
from absl import logging
from etils import epath

from mura_jax.models import densenet

FOLDER = 'mura_jax_traced'  # inside the compilation cache's folder
_FORMAT = 1  # bump when the file's layout changes


def default_directory() -> epath.Path | None:
  """Where traced steps are kept: beside JAX's compilation cache when it is on (main.py and
  mura-predict turn it on; `compilation_cache_dir='none'` or `--compilation-cache none` turn
  both off), and only in a single-process run."""
  cache = jax.config.jax_compilation_cache_dir
  if not cache or jax.process_count() > 1:
    return None
  return epath.Path(cache) / FOLDER


@functools.cache
def source_digest() -> str:
  """A digest of this package's Python source: any edit to the code makes new keys."""
  package = pathlib.Path(__file__).parent
  digest = hashlib.sha256()
  for path in sorted(package.rglob('*.py')):
    digest.update(str(path.relative_to(package)).encode() + b'\0' + path.read_bytes())
  return digest.hexdigest()


def _versions() -> str:
  return ' '.join(f'{name}={_version(name)}' for name in ('jax', 'jaxlib', 'flax', 'optax'))


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return 'none'


def jit(fn: Callable, description: str, *, in_shardings: Sequence[Any],
        out_shardings: Sequence[Any], donate_argnums: tuple[int, ...] = (),
        directory: epath.PathLike | None = None):
  """`jax.jit(fn, in_shardings=..., out_shardings=..., donate_argnums=...)`, its traced program
  kept in `directory` (default: `default_directory()`; None there: plain jax.jit).

  `fn` takes positional pytrees and returns a tuple; `in_shardings` and `out_shardings` give one
  sharding per argument and per output. `description` must name every static input of `fn` (the
  values it closes over): two functions with the same description and arguments share a file.
  """
  directory = default_directory() if directory is None else epath.Path(directory)
  if directory is None:
    return jax.jit(fn, in_shardings=tuple(in_shardings), out_shardings=tuple(out_shardings),
                   donate_argnums=donate_argnums)
  return CachedJit(fn, description, tuple(in_shardings), tuple(out_shardings),
                   tuple(donate_argnums), directory)


class CachedJit:
  """A jitted function whose traced program comes from, or goes to, a file (see `jit`).

  It is a jax.jit of a small function that, while JAX traces it (once per argument shapes), finds
  the traced program in the file, or exports `fn` and writes it, and calls it: every call after
  that is jax.jit's own, with no Python of this class on the way. In the file, arguments and
  outputs are lists of leaves (jax.export serialises lists, not the state's own classes); the
  outputs' tree structures are stored beside the program.
  """

  def __init__(self, fn, description, in_shardings, out_shardings, donate_argnums, directory):
    self._fn, self._description = fn, description
    self._in_shardings, self._out_shardings = in_shardings, out_shardings
    self._donate_argnums, self._directory = donate_argnums, directory
    self._stored = {}  # file -> (exported, out trees), for jax.jit's retraces in this process
    self._jitted = jax.jit(self._call_stored, in_shardings=in_shardings,
                           out_shardings=out_shardings, donate_argnums=donate_argnums)

  def __call__(self, *args):
    return self._jitted(*args)

  def lower(self, *args):
    return self._jitted.lower(*args)

  def _call_stored(self, *args):
    """Runs while JAX traces: the stored (or just exported) program, called on the leaves."""
    trees = tuple(jax.tree.structure(a) for a in args)
    stored = self._load_or_export(args, trees)
    if stored is None:  # not exportable: trace the function itself, as jax.jit would
      return self._fn(*args)
    exported, out_trees = stored
    outputs = exported.call(*(jax.tree.leaves(a) for a in args))
    return tuple(jax.tree.unflatten(t, leaves) for t, leaves in zip(out_trees, outputs))

  def key(self, args, trees) -> str:
    """A digest of everything that defines the traced program."""
    devices = jax.devices()
    parts = [f'format={_FORMAT}', _versions(), f'source={source_digest()}', self._description,
             f'devices={len(devices)} x {devices[0].platform}:{devices[0].device_kind}',
             f'in_shardings={self._in_shardings!r}', f'out_shardings={self._out_shardings!r}',
             f'donate={self._donate_argnums}']
    for tree, arg in zip(trees, args):
      parts.append(str(tree))
      parts.extend(f'{x.shape}:{x.dtype}' for x in jax.tree.leaves(arg))
    return hashlib.sha256('\n'.join(parts).encode()).hexdigest()

  def _load_or_export(self, args, trees):
    name = getattr(self._fn, '__name__', None) or getattr(
        getattr(self._fn, 'func', None), '__name__', 'step')
    path = self._directory / f'{name}-{self.key(args, trees)}.exported'
    if path not in self._stored:
      stored = _read(path)
      if stored is not None:
        logging.info('%s: traced program from %s (tracing skipped).', name, path)
      else:
        stored = self._export(args, trees)
        if stored is not None:
          _write(path, stored)
      self._stored[path] = stored
    return self._stored[path]

  def _export(self, args, trees):
    out_trees = []

    def flat(*leaf_lists):
      outputs = self._fn(*(jax.tree.unflatten(t, leaves) for t, leaves in zip(trees, leaf_lists)))
      flat_outputs = [jax.tree.flatten(o) for o in outputs]
      out_trees[:] = [tree for _, tree in flat_outputs]
      return tuple(leaves for leaves, _ in flat_outputs)

    jitted = jax.jit(flat, in_shardings=self._in_shardings, out_shardings=self._out_shardings,
                     donate_argnums=self._donate_argnums)
    specs = [[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in jax.tree.leaves(a)] for a in args]
    try:
      exported = jax.export.export(jitted)(*specs)
    except Exception as e:  # pylint: disable=broad-except  (any: the plain trace still works)
      logging.warning('The traced-step cache cannot keep this step (%s: %s); it is traced at '
                      'every start.', type(e).__name__, e)
      return None
    return exported, out_trees


def _read(path: epath.Path):
  """(exported, out_trees) from `path`, or None if absent or unreadable (then traced again)."""
  try:
    if not path.exists():
      return None
    stored = pickle.loads(path.read_bytes())
    return jax.export.deserialize(bytearray(stored['exported'])), stored['out_trees']
  except Exception as e:  # pylint: disable=broad-except  (a damaged file costs a trace, no more)
    logging.warning('Ignoring the traced-step file %s (%s: %s); tracing again.', path,
                    type(e).__name__, e)
    return None


def _write(path: epath.Path, stored) -> None:
  exported, out_trees = stored
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f'.{path.name}.{os.getpid()}.partial'  # one per writing process
    partial.write_bytes(pickle.dumps({'exported': bytes(exported.serialize()),
                                      'out_trees': out_trees}))
    partial.replace(path)  # whole or not at all, for a reader in another process
  except Exception as e:  # pylint: disable=broad-except  (a read-only cache costs a trace, no more)
    logging.warning('Could not keep the traced step in %s (%s: %s).', path, type(e).__name__, e)


# ------------------------------------------------------------------------------------------------
# A network's initialisation, kept: a restart traces the model neither to initialise it
# (train.random_variables) nor to learn its variables' shapes (checkpoints.restore_variables).


def kept_init(model: densenet.DenseNet, in_channels: int):
  """`model.init` (32 x 32 input) jitted as a function of the rng returning a 1-tuple, its traced
  program kept like the train step's (step_cache.py): a restart traces the model neither to
  initialise it (train.random_variables) nor to learn its variables' shapes (variable_shapes)."""
  init = densenet.init_function(model, 32, in_channels)

  def init_variables(rng):
    return (init(rng),)
  return jit(init_variables, f'init of {model!r}, in_channels {in_channels}',
                        in_shardings=(None,), out_shardings=(None,))


def variable_shapes(model: densenet.DenseNet, in_channels: int = 3) -> dict:
  """`densenet.variable_shapes`, from the kept init program. The rng as training's
  (jax.random.PRNGKey), so that both find the same program."""
  return dict(jax.eval_shape(kept_init(model, in_channels), jax.random.PRNGKey(0))[0])
