"""Study identity and aggregation: which views make a study, and the study's probability.

A study is identified by its (split, XR_<PART>, patient, study) path components, never by patient
and study alone (one patient can have `study1` under several body parts); paths are compared on
those four components, so a different root directory or a missing trailing '/' still matches.
A study's probability is the arithmetic mean of its views' probabilities (the paper; 'max'
optional). `StudyTable` is what scoring takes: one row per study, checked.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from mura_jax.errors import UserError
from tfds_mura import BODY_PARTS
from tfds_mura import paths

_MAX_LISTED = 10  # offending rows listed in an error message


class PredictionsError(UserError, ValueError):
  """Predictions that cannot be scored; `problems` holds (kind, file, row, message) tuples."""

  def __init__(self, source: str, problems: Sequence[tuple[str, str, int | None, str]]):
    self.source = source
    self.problems = list(problems)
    self.counts = {}
    for kind, *_ in self.problems:
      self.counts[kind] = self.counts.get(kind, 0) + 1
    summary = ', '.join(f'{kind}: {n}' for kind, n in self.counts.items())
    lines = [f'{source}: {len(self.problems)} problem(s) ({summary}); '
             f'first {min(len(self.problems), _MAX_LISTED)}:']
    for _, file, row, message in self.problems[:_MAX_LISTED]:
      where = f'{file} row {row}' if row is not None else file
      lines.append(f'  {where}: {message}')
    super().__init__('\n'.join(lines))


class LabelsError(PredictionsError):
  """A labels or readers file (or label array) that cannot be used as the reference."""


# ------------------------------------------------------------------------------------------------
# Study paths.


def _text(path) -> str:
  return path.decode('utf-8') if isinstance(path, bytes) else str(path)


def study_path(path) -> str:
  """Normalised study path: stripped, '\\' -> '/', one trailing '/'."""
  return _text(path).strip().replace('\\', '/').rstrip('/') + '/'


def study_key(path) -> tuple[str, ...]:
  """(split, XR_<PART>, patient, study): the last four components of a study path."""
  return tuple(study_path(path).rstrip('/').split('/')[-4:])


def body_part_of(path) -> str:
  """'wrist' for `.../XR_WRIST/patient11185/study1_positive/`; ValueError if there is none."""
  key = study_key(path)
  if len(key) == 4 and key[1].upper().startswith('XR_'):
    part = paths.part_named(key[1])
    if part in BODY_PARTS:
      return part
  raise ValueError(f'not a MURA study path (.../<split>/XR_<PART>/<patient>/<study>/): {path!r}')


def body_part_index(body_part) -> int:
  """Index into BODY_PARTS of 'XR_WRIST', 'wrist', 'WRIST' or an int index."""
  if isinstance(body_part, (int, np.integer)):
    if 0 <= body_part < len(BODY_PARTS):
      return int(body_part)
  else:
    name = paths.part_named(_text(body_part))
    if name in BODY_PARTS:
      return BODY_PARTS.index(name)
  raise ValueError(f'unknown body part {body_part!r}; expected one of {BODY_PARTS} or XR_<PART>')


# ------------------------------------------------------------------------------------------------
# Aggregation: views -> studies.


@functools.partial(jax.jit, static_argnames=('num_studies', 'method'))
def aggregate_views(view_probabilities, view_study_index, num_studies: int, view_mask=None,
                    method: str = 'mean'):
  """Study probabilities (num_studies,) from per-view probabilities, inside jit.

  Args:
    view_probabilities: (V,) per-view abnormality probabilities.
    view_study_index: (V,) int study of each view in [0, num_studies); other values are dropped.
    num_studies: number of studies (static).
    view_mask: optional (V,) bool; False marks padding, which counts nowhere (its value may be
      anything, NaN included).
    method: 'mean' (the paper) or 'max'.
  Returns:
    (num_studies,) probabilities; NaN for a study without views.
  """
  if view_mask is None:
    view_mask = jnp.ones(view_probabilities.shape, bool)
  segment = functools.partial(jax.ops.segment_sum, segment_ids=view_study_index,
                              num_segments=num_studies)
  num_views = segment(view_mask.astype(view_probabilities.dtype))
  if method == 'mean':
    total = segment(jnp.where(view_mask, view_probabilities, 0))  # where, not *: NaN * 0 is NaN
    study = total / jnp.maximum(num_views, 1)
  elif method == 'max':
    study = jax.ops.segment_max(jnp.where(view_mask, view_probabilities, -jnp.inf),
                                view_study_index, num_segments=num_studies)
  else:
    raise ValueError(f"method must be 'mean' or 'max', got {method!r}")
  return jnp.where(num_views > 0, study, jnp.nan)


def aggregate_float64(view_probabilities, view_study_index, num_studies, view_mask, method):
  """`aggregate_views` in float64 on the host, and views per study."""
  # float64 so that e.g. mean(0.4, 0.6) is exactly 0.5, as a pandas groupby gives.
  with jax.enable_x64(True):
    probabilities = aggregate_views(
        jnp.asarray(view_probabilities, jnp.float64), jnp.asarray(view_study_index, jnp.int64),
        num_studies, None if view_mask is None else jnp.asarray(view_mask, bool), method)
    probabilities = np.asarray(probabilities)
  valid = np.ones(len(view_study_index), bool) if view_mask is None else np.asarray(view_mask)
  num_views = np.bincount(np.asarray(view_study_index)[valid], minlength=num_studies)
  return probabilities, num_views[:num_studies]


# ------------------------------------------------------------------------------------------------
# The study table.


@dataclasses.dataclass(frozen=True)
class StudyTable:
  """One row per study: what scoring takes (build it with `checked`, `from_views`, `from_split`)."""
  paths: tuple[str, ...]        # 'MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/'
  probability: np.ndarray       # (S,) float64 in [0, 1] (or 0/1 with score_kind 'labels')
  label: np.ndarray             # (S,) int64, 1 = abnormal
  body_part: np.ndarray         # (S,) int64 index into BODY_PARTS
  num_views: np.ndarray | None = None  # (S,) views per study, where known
  score_kind: str = 'probabilities'    # or 'labels': hard-label predictions
  aggregation: str | None = None       # how views became studies; None: study-level input

  def in_study_order(self) -> StudyTable:
    """The same rows sorted by study (split, part, patient, study): the bootstrap draws row
    indices, so every resampling starts from this order. Otherwise the same predictions would
    get other CIs from a shuffled labels file, or from the scorer and the training run."""
    return self.rows(sorted(range(len(self.paths)), key=lambda i: study_key(self.paths[i])))

  def rows(self, rows) -> StudyTable:
    """These rows of the table, in this order."""
    rows = np.asarray(rows, np.int64)
    return dataclasses.replace(
        self, paths=tuple(self.paths[i] for i in rows), probability=self.probability[rows],
        label=self.label[rows], body_part=self.body_part[rows],
        num_views=None if self.num_views is None else self.num_views[rows])

  def __len__(self):
    return len(self.paths)

  @classmethod
  def checked(cls, study_paths: Sequence[str], probabilities, abnormal, body_parts=None,
              **fields) -> StudyTable:
    """A validated table; PredictionsError / LabelsError list every bad row.

    body_parts: optional (S,) 'XR_WRIST' / 'wrist' / BODY_PARTS index; default: from the paths.
    """
    paths, probability, label, part = _check_studies(study_paths, probabilities, abnormal,
                                                      body_parts)
    return cls(tuple(paths), probability, label, part, **fields)


def _check_studies(study_paths, probabilities, abnormal, body_parts):
  """Validated arrays: paths (normalised), probabilities f64, abnormal int64, body part index."""
  study_paths = [study_path(p) for p in study_paths]
  probabilities = np.asarray(probabilities, np.float64).reshape(-1)
  abnormal = np.asarray(abnormal).reshape(-1)
  if not len(study_paths) == probabilities.size == abnormal.size:
    raise ValueError(f'lengths disagree: {len(study_paths)} study paths, {probabilities.size} '
                     f'probabilities, {abnormal.size} labels')
  problems, seen = [], {}
  for i, (p, value) in enumerate(zip(study_paths, probabilities)):
    if study_key(p) in seen:
      problems.append(('duplicate', 'studies', i, f'study {p} repeats entry {seen[study_key(p)]}'))
    seen.setdefault(study_key(p), i)
    if math.isnan(value):
      problems.append(('nan', 'studies', i, f'probability is NaN (no views?) for {p}'))
    elif not 0 <= value <= 1:
      problems.append(('out_of_range', 'studies', i, f'probability {value} outside [0, 1] for {p}'))
  if not study_paths:
    problems.append(('empty', 'studies', None, 'no studies'))
  if problems:
    raise PredictionsError('study predictions (rows are 0-based entries)', problems)
  bad = [('malformed', 'labels', i, f'label {a!r} of {p} is not 0/1')
         for i, (p, a) in enumerate(zip(study_paths, abnormal)) if a not in (0, 1)]
  if bad:
    raise LabelsError('study labels (rows are 0-based entries)', bad)
  if body_parts is None:
    parts = [body_part_index(body_part_of(p)) for p in study_paths]
  else:
    parts = [body_part_index(b) for b in body_parts]
  return study_paths, probabilities, abnormal.astype(np.int64), np.asarray(parts, np.int64)


def from_views(view_probabilities, view_study_paths, view_abnormal, view_body_parts=None, *,
               view_mask=None, aggregation: str = 'mean') -> StudyTable:
  """Aggregates per-view probabilities to a StudyTable, grouping views by their study path.

  Args:
    view_probabilities: (V,) per-view probabilities (e.g. sigmoid outputs over a split).
    view_study_paths: (V,) str or bytes study path of each view (its study folder).
    view_abnormal: (V,) 0/1 label of each view's study (must agree within a study).
    view_body_parts: optional (V,) body part per view (name or BODY_PARTS index).
    view_mask: optional (V,) bool, False for padding views (ignored entirely).
    aggregation: 'mean' (paper) or 'max'.
  """
  view_probabilities = np.asarray(view_probabilities, np.float64).reshape(-1)
  valid = (np.ones(view_probabilities.size, bool) if view_mask is None
           else np.asarray(view_mask, bool).reshape(-1))
  paths = [study_path(p) for p, v in zip(view_study_paths, valid) if v]
  keys = [study_key(p) for p in paths]
  first = {}
  for i, key in enumerate(keys):
    first.setdefault(key, i)
  study_of_key = {key: s for s, key in enumerate(first)}
  study_index = np.full(view_probabilities.size, -1, np.int64)  # -1: padding, dropped
  study_index[valid] = [study_of_key[k] for k in keys]
  num_studies = len(first)
  if num_studies == 0:
    raise PredictionsError('views', [('empty', 'views', None, 'no (unmasked) views')])
  bad = np.flatnonzero(valid & ~np.isfinite(view_probabilities))
  bad = [('nan', 'views', int(v), f'view probability {view_probabilities[v]} is not finite')
         for v in bad]
  if bad:
    raise PredictionsError('view predictions', bad)
  abnormal = np.asarray(view_abnormal).reshape(-1)[valid]
  study_abnormal = np.zeros(num_studies, np.int64)
  study_abnormal[study_index[valid]] = abnormal
  conflicts = np.flatnonzero(study_abnormal[study_index[valid]] != abnormal)
  if conflicts.size:
    raise LabelsError('view labels', [
        ('contradiction', 'views', int(np.flatnonzero(valid)[v]),
         f'views of study {paths[v]} carry different labels') for v in conflicts])
  body_parts = None
  if view_body_parts is not None:
    view_parts = [body_part_index(b) for b, v in zip(view_body_parts, valid) if v]
    body_parts = [view_parts[first[k]] for k in first]
  probabilities, num_views = aggregate_float64(view_probabilities, study_index, num_studies,
                                                valid, aggregation)
  study_paths = [paths[i] for i in first.values()]
  return StudyTable.checked(study_paths, probabilities, study_abnormal, body_parts,
                            num_views=num_views, aggregation=aggregation)


def from_split(split_index, view_probabilities, aggregation: str = 'mean') -> StudyTable:
  """The StudyTable of a TFDS split's per-view probabilities (`input_pipeline.SplitIndex`):
  grouped by the split's integer study ids, no path parsing."""
  num_studies = len(split_index.studies)
  index = np.asarray(split_index.study_index, np.int64)
  probabilities, num_views = aggregate_float64(np.asarray(view_probabilities, np.float64), index,
                                               num_studies, None, aggregation)
  first = np.full(num_studies, -1, np.int64)
  first[index[::-1]] = np.arange(len(index))[::-1]  # each study's first view
  label = np.asarray(split_index.label, np.int64)
  conflicts = np.flatnonzero(label != label[first[index]])
  if conflicts.size:
    raise LabelsError('view labels', [
        ('contradiction', 'views', int(v), f'views of study {split_index.studies[index[v]]} carry '
         'different labels') for v in conflicts])
  return StudyTable.checked([f'MURA-v1.1/{s}/' for s in split_index.studies], probabilities,
                            label[first], np.asarray(split_index.body_part, np.int64)[first],
                            num_views=num_views, aggregation=aggregation)
