"""Vectorised bootstrap of study-level metrics: B resamples of studies, every group, every metric.

Resampling, as in the paper: a resample draws `num_studies` studies with replacement from ALL
studies of the split (not per body part), and each group's metrics are computed on the group's
studies inside that resample, so a group's size varies from resample to resample. Stratifying by
body part would hold group sizes fixed; the paper does not, so neither do we.

Resample b's draws come from threefry bits at counter (b, draw) of PRNGKey(seed) (`_draw`; the
same on every backend), so a resample depends on neither the chunk size nor how many resamples
are drawn, and `resample_indices` hands the very same indices to anyone (tests feed them to a
plain loop).

How all resamples are scored at once, per chunk of resamples inside one jit:
  * w_b = multiplicity of each study in resample b (a scatter-add of the drawn indices).
  * Confusion counts of every (prediction, reference) pair and group: w @ cells, with
    cells[i, (pair, group, cell)] = [study i in group] * [study i falls in that cell for that pair].
  * AUROC: the (group, study) memberships are laid out once, sorted by (group, score); a cumulative
    sum of the weighted normal studies along that layout, read at the two ends of each tie block,
    gives for each abnormal study 2 x (normals below it) + (normals tied with it), so
    U2 = sum_abnormal w (2 below + tied) per group is another matmul. Ties count 1/2. The normals
    of the groups laid out earlier are taken off on the host, from the confusion counts.
Everything is integer-valued. In float32 that is exact while every partial sum stays below 2^24:
with N studies each in at most m groups, the largest is U2's, below 2 m N^2 (`fits_float32`; for
MURA's 8 groups, m = 2, N <= 2048: valid has 1,199 studies, test 556); otherwise the same code runs
in float64 under `jax.enable_x64`. Counts leave the device as int64 and metrics are finished by
`metrics.metrics_from_counts`: a plain loop that reaches the same counts gets bit-identical
metrics.
"""
from __future__ import annotations

import functools

import jax
from jax.extend.random import threefry2x32_p
import jax.numpy as jnp
import numpy as np

# Elements of one (chunk, memberships) array: bounds memory at a few such arrays (4 MiB each in
# float32); chunks this small also measured fastest (BENCHMARKS.md, "Bootstrap speed").
_CHUNK_ELEMENTS = 2**20


# Resamples index studies with 16-bit arithmetic on uint32 (see `_draw`).
MAX_STUDIES = 2**16 - 1


def _mul_high(a, n: int):
  """floor(a * n / 2^32) for uint32 a and n < 2^16, exactly, without 64-bit integers."""
  n = jnp.uint32(n)
  return ((a >> 16) * n + (((a & 0xFFFF) * n) >> 16)) >> 16


def _draw(key, start, chunk_size: int, num_studies: int):
  """Studies drawn (chunk_size, num_studies) int32 by resamples start .. start + chunk_size - 1.

  Resample b, draw j: floor(u N / 2^32) with u = jax.random.bits(key, (B, N), uint32)[b, j] of
  partitionable threefry, i.e. threefry2x32 of the key on the 64-bit counter b N + j (high and low
  words), output words xor-ed. Each draw is a pure function of (seed, b, j): no fold_in per
  resample (half the compile time of vmapped randint) and no dependence on chunking. The
  multiply-shift maps 2^32 values onto N studies with a relative bias below N / 2^32 (3e-7 for
  MURA valid's 1,199 studies).
  """
  resample = (jnp.uint32(start) + jnp.arange(chunk_size, dtype=jnp.uint32))[:, None]
  draw = jnp.arange(num_studies, dtype=jnp.uint32)[None, :]
  low_of_product = resample * jnp.uint32(num_studies)  # (b N) mod 2^32
  low = low_of_product + draw
  high = _mul_high(resample, num_studies) + (low < low_of_product).astype(jnp.uint32)  # carry
  high = jnp.broadcast_to(high, low.shape)
  key_words = jax.random.key_data(key)
  out0, out1 = threefry2x32_p.bind(key_words[0], key_words[1], high, low)
  return _mul_high(out0 ^ out1, num_studies).astype(jnp.int32)


_draw_jit = jax.jit(_draw, static_argnames=('chunk_size', 'num_studies'))


def resample_indices(seed: int, num_studies: int, start: int, stop: int) -> np.ndarray:
  """int32 (stop - start, num_studies): the studies drawn by resamples start .. stop - 1."""
  _check_size(num_studies)
  return np.asarray(_draw_jit(jax.random.PRNGKey(seed), start, stop - start, num_studies))


def _check_size(num_studies: int) -> None:
  if not 1 <= num_studies <= MAX_STUDIES:
    raise ValueError(f'the bootstrap handles 1 to {MAX_STUDIES} studies, got {num_studies} '
                     '(MURA train has 13,457)')


def fits_float32(membership) -> bool:
  """Whether float32 holds every count and U2 exactly: 2 m N^2 < 2^24 (see the docstring)."""
  membership = np.asarray(membership, bool)
  num_studies = membership.shape[1]
  per_study = int(membership.sum(0).max()) if membership.size else 0
  return 2 * max(per_study, 1) * num_studies**2 < 2**24


def _multiplicities(key, start, chunk_size: int, num_studies: int, dtype):
  """(chunk_size, num_studies): how often resample b drew study i (a scatter-add of `_draw`)."""
  drawn = _draw(key, start, chunk_size, num_studies)
  rows = jnp.arange(chunk_size)[:, None]
  return jnp.zeros((chunk_size, num_studies), dtype).at[rows, drawn].add(1)


@functools.partial(jax.jit, static_argnames=('chunk_size',))
def _chunk_counts(key, start, cells, auroc_plan, chunk_size: int):
  """Counts (chunk, pairs*groups*4) and U2 (chunk, groups) of one chunk of resamples."""
  weight = _multiplicities(key, start, chunk_size, cells.shape[0], cells.dtype)
  exact = jax.lax.Precision.HIGHEST  # no reduced-precision (TF32/bf16) passes on accelerators
  counts = jnp.dot(weight, cells, precision=exact)
  if auroc_plan is None:
    return counts, None
  plan = auroc_plan
  member_weight = weight[:, plan['study']]  # (chunk, memberships), sorted by (group, score)
  normal_below = jnp.cumsum(member_weight * plan['normal'], axis=1)
  normal_below = jnp.pad(normal_below, ((0, 0), (1, 0)))  # [k] = normal weight of first k entries
  # Normals below the tie block + normals up to its end = 2 below + tied, but counted from the
  # start of the layout: the normals of earlier groups are taken off on the host (bootstrap_counts).
  twice_below_plus_tied = normal_below[:, plan['block_start']] + normal_below[:, plan['block_end']]
  u2 = jnp.dot(member_weight * plan['abnormal'] * twice_below_plus_tied, plan['group_onehot'],
               precision=exact)
  return counts, u2


def _cells(predicted, reference, membership, dtype) -> np.ndarray:
  """(num_studies, pairs*groups*4) indicators, column order (pair, group, CELLS)."""
  pred, ref = predicted.astype(bool), reference.astype(bool)
  cell = np.stack([pred & ref, pred & ~ref, ~pred & ref, ~pred & ~ref], axis=1)  # (P, 4, N)
  cells = cell[:, None, :, :] & membership[None, :, None, :]  # (P, G, 4, N)
  return cells.reshape(-1, cells.shape[-1]).T.astype(dtype)


def _auroc_plan(scores, abnormal, membership, dtype) -> dict[str, np.ndarray]:
  """Static arrays over the (group, study) memberships sorted by (group, score)."""
  group, study = np.nonzero(membership)
  order = np.lexsort((scores[study], group))
  group, study = group[order], study[order]
  score = scores[study]
  size = study.size
  new_group = np.r_[True, group[1:] != group[:-1]]
  new_block = new_group | np.r_[True, score[1:] != score[:-1]]  # a block: one group, one score
  block_of = np.cumsum(new_block) - 1
  starts = np.flatnonzero(new_block)
  ends = np.r_[starts[1:], size]
  is_abnormal = abnormal[study].astype(bool)
  return {
      'study': study.astype(np.int32),
      'normal': (~is_abnormal).astype(dtype),
      'abnormal': is_abnormal.astype(dtype),
      'block_start': starts[block_of].astype(np.int32),
      'block_end': ends[block_of].astype(np.int32),
      'group_onehot': (group[:, None] == np.arange(len(membership))).astype(dtype),
  }


def default_chunk_size(num_resamples: int, num_studies: int, num_memberships: int) -> int:
  """Resamples per chunk: about _CHUNK_ELEMENTS per array, balanced so padding is small."""
  largest = max(_CHUNK_ELEMENTS // max(num_studies, num_memberships, 1), 1)
  num_chunks = -(-num_resamples // largest)
  return -(-num_resamples // num_chunks)


def bootstrap_counts(predicted, reference, membership, scores=None, *, num_resamples: int,
                     seed: int, chunk_size: int | None = None):
  """Confusion counts (and AUROC's U2) of every resample, pair and group.

  Args:
    predicted: (num_pairs, num_studies) 0/1 predictions, e.g. the model at a threshold, a reader.
    reference: (num_pairs, num_studies) 0/1 reference of each pair (truth, a reader majority).
    membership: (num_groups, num_studies) bool, e.g. `metrics.body_part_membership`.
    scores: optional (num_studies,) scores for AUROC against reference[0].
    num_resamples: B.
    seed: the resamples are a pure function of (seed, b); see `_draw`, `resample_indices`.
    chunk_size: resamples per jitted call (bounds memory); default `default_chunk_size`.
  Returns:
    counts: int64 (B, num_pairs, num_groups, 4), CELLS order (tp, fp, fn, tn).
    u2: int64 (B, num_groups), twice the Mann-Whitney U, or None without scores.
  """
  predicted = np.atleast_2d(np.asarray(predicted))
  reference = np.atleast_2d(np.asarray(reference))
  membership = np.asarray(membership, bool)
  num_pairs, num_studies = predicted.shape
  num_groups = membership.shape[0]
  if reference.shape != predicted.shape or membership.shape[1] != num_studies:
    raise ValueError(f'shapes disagree: predicted {predicted.shape}, reference {reference.shape}, '
                     f'membership {membership.shape}')
  if num_resamples < 1:
    raise ValueError(f'need at least one resample, got {num_resamples}')
  _check_size(num_studies)
  chunk_size = chunk_size or default_chunk_size(num_resamples, num_studies,
                                                int(membership.sum()))
  use_float64 = not fits_float32(membership)
  dtype = np.float64 if use_float64 else np.float32
  with jax.enable_x64(use_float64):
    cells = jnp.asarray(_cells(predicted, reference, membership, dtype))
    plan = None
    if scores is not None:
      plan = jax.tree.map(jnp.asarray, _auroc_plan(np.asarray(scores, np.float64), reference[0],
                                                   membership, dtype))
    key = jax.random.PRNGKey(seed)
    chunks = [_chunk_counts(key, start, cells, plan, chunk_size)
              for start in range(0, num_resamples, chunk_size)]  # dispatched asynchronously
    counts = np.concatenate([np.asarray(c) for c, _ in chunks])[:num_resamples]
    u2 = (np.concatenate([np.asarray(u) for _, u in chunks])[:num_resamples]
          if plan is not None else None)
  # Exact integers in floating point: the cast loses nothing.
  counts = counts.astype(np.int64).reshape(num_resamples, num_pairs, num_groups, 4)
  if u2 is not None:
    # Take off the normals of the groups laid out before each group: 2 x abnormal x those normals.
    tp, fp, fn, tn = (counts[:, 0, :, i] for i in range(4))
    earlier_normals = np.cumsum(fp + tn, axis=1) - (fp + tn)
    u2 = u2.astype(np.int64) - 2 * (tp + fn) * earlier_normals
  return counts, u2


@functools.partial(jax.jit, static_argnames=('chunk_size',))
def _chunk_sums(key, start, columns, chunk_size: int):
  weight = _multiplicities(key, start, chunk_size, columns.shape[0], columns.dtype)
  return jnp.dot(weight, columns, precision=jax.lax.Precision.HIGHEST)


def bootstrap_sums(columns, *, num_resamples: int, seed: int,
                   chunk_size: int | None = None) -> np.ndarray:
  """float64 (B, K): sum over the studies of resample b of columns[i, k] (each study counted as
  often as drawn), for real-valued per-study quantities (calibration's signed errors).

  The resamples are `bootstrap_counts`'s of the same seed (`_draw`), so these sums belong to the
  same resamples as the confusion counts. Computed in float64: the sums are not integers.
  """
  columns = np.asarray(columns, np.float64)
  num_studies = columns.shape[0]
  _check_size(num_studies)
  if num_resamples < 1:
    raise ValueError(f'need at least one resample, got {num_resamples}')
  chunk_size = chunk_size or default_chunk_size(num_resamples, num_studies, num_studies)
  with jax.enable_x64(True):
    key = jax.random.PRNGKey(seed)
    values = jnp.asarray(columns)
    chunks = [_chunk_sums(key, start, values, chunk_size)
              for start in range(0, num_resamples, chunk_size)]
    return np.concatenate([np.asarray(c) for c in chunks])[:num_resamples]


def percentile_ci(samples, level: float = 0.95):
  """Percentile CI over axis 0 (2.5 / 97.5 for 95%), leaving out undefined (NaN) resamples.

  Returns (low, high, num_undefined); low/high are NaN where every resample is undefined.
  """
  samples = np.asarray(samples, np.float64)
  tail = 100 * (1 - level) / 2
  defined = ~np.isnan(samples)
  num_undefined = (~defined).sum(0)
  if defined.all():
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
  else:
    # nanpercentile is slow with NaNs; sort them to the end and interpolate over the defined ones
    # (numpy's default 'linear' rule).
    ordered = np.sort(samples, axis=0)
    count = defined.sum(0)
    low, high = (_linear_quantile(ordered, count, q) for q in (tail / 100, 1 - tail / 100))
  return low, high, num_undefined


def _linear_quantile(ordered, count, q):
  position = q * np.maximum(count - 1, 0)
  below = np.floor(position).astype(np.int64)
  above = np.minimum(below + 1, np.maximum(count - 1, 0))
  fraction = position - below
  lower = np.take_along_axis(ordered, below[None], 0)[0]
  upper = np.take_along_axis(ordered, above[None], 0)[0]
  return np.where(count > 0, lower + (upper - lower) * fraction, np.nan)


def ci_text(entry: dict, digits: int = 3) -> str:
  """'0.812 (0.771, 0.850)' of a {value, ci_low, ci_high} entry; 'n/a' without a value."""
  if entry['value'] is None:
    return 'n/a'
  text = f'{entry["value"]:.{digits}f}'
  if entry['ci_low'] is not None:
    text += f' ({entry["ci_low"]:.{digits}f}, {entry["ci_high"]:.{digits}f})'
  return text
