"""Reading labels, readers and predictions files, with errors that name the file and row.

CSV, no header in MURA's own files; a header row or CRLF line ends get a warning.
  labels       `MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/,1` per study (label 0/1).
  predictions  one of, decided by the first data row:
                 study path, 0/1       hard labels, the official submission format;
                 study path, float     study probabilities in [0, 1];
                 image path, float     view probabilities (`.../study1_positive/image1.png,0.83`),
                                       aggregated to studies like the model's.
  readers      header row `study,<reader name>,<reader name>,...` then one row per study read.
Bad predictions (missing or unknown studies, values outside [0, 1] or NaN, a repeated study or
image, a malformed row) raise ONE `PredictionsError` naming the file and the first rows with their
row numbers, with a count per kind; bad labels or readers files raise `LabelsError`.
"""
from __future__ import annotations

import csv
import math
from typing import Sequence

from absl import logging
from etils import epath
import numpy as np

from mura_jax.data.images import IMAGE_SUFFIXES
from mura_jax.errors import DataError
from mura_jax.evaluation.readers import Readers
from mura_jax.evaluation.studies import (LabelsError, PredictionsError, aggregate_float64,
                                         body_part_of, study_key, study_path)


def _read_rows(path, what: str) -> list[tuple[int, list[str]]]:
  """(row number, fields) of the non-empty rows of a CSV file; warns about CRLF line ends."""
  if not epath.Path(path).is_file():
    raise DataError(f'The {what} {path} does not exist' + (
        ' (it is a folder)' if epath.Path(path).exists() else '') + '; check the path.')
  data = epath.Path(path).read_bytes()
  try:
    text = data.decode('utf-8-sig')  # a BOM is dropped
  except UnicodeDecodeError as e:
    raise DataError(f'The {what} {path} is not a text CSV file (byte {data[e.start]:#04x} at '
                    f'offset {e.start} is not UTF-8); give the CSV file itself, not a spreadsheet, '
                    'archive or binary file.') from e
  if '\r' in text:
    logging.warning('%s %s has CRLF (Windows) line ends; reading it anyway.', what, path)
  rows = []
  for number, line in enumerate(text.splitlines(), start=1):
    if line.strip():
      rows.append((number, [field.strip() for field in next(csv.reader([line]))]))
  return rows


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def _looks_like_path(field: str) -> bool:
  return '/' in field or '\\' in field or field.lower().endswith(IMAGE_SUFFIXES)


def _drop_header(rows, path, what: str, looks_like_data) -> list:
  """Rows without row 1 if it is a header: not data, and not a path (a path with a bad value is a
  bad data row, reported as such, not a header)."""
  if rows and not looks_like_data(rows[0][1]) and not _looks_like_path(rows[0][1][0]):
    logging.warning('%s %s: row 1 %r is not data; treating it as a header row.', what, path,
                    rows[0][1])
    return rows[1:]
  return rows


def read_labels(path) -> tuple[list[str], np.ndarray]:
  """Study paths (trailing '/') and labels (int64 0/1) of a MURA *_labeled_studies.csv file."""
  path = str(path)
  rows = _read_rows(path, 'labels file')
  rows = _drop_header(rows, path, 'labels file', lambda f: len(f) >= 2 and _is_number(f[1]))
  problems, paths, labels, seen = [], [], [], {}
  for number, fields in rows:
    if len(fields) != 2 or fields[1] not in ('0', '1'):
      problems.append(('malformed', path, number, f'expected "study path,0|1", got {fields}'))
      continue
    study, label = study_path(fields[0]), int(fields[1])
    try:
      body_part_of(study)
    except ValueError as e:
      problems.append(('malformed', path, number, str(e)))
      continue
    key = study_key(study)
    if key in seen:
      problems.append(('duplicate', path, number, f'study {study} repeats row {seen[key]}'))
      continue
    folder = key[-1].rsplit('_', 1)[-1]
    if folder in ('positive', 'negative') and (folder == 'positive') != bool(label):
      problems.append(('contradiction', path, number,
                       f'label {label} contradicts the folder name of {study}'))
    seen[key] = number
    paths.append(study)
    labels.append(label)
  if not paths and not problems:
    problems.append(('empty', path, None, 'no studies; it needs one "study path,0|1" row per '
                     "study, as MURA's valid_labeled_studies.csv"))
  if problems:
    raise LabelsError(f'labels file {path}', problems)
  if any(not fields[0].rstrip().endswith(('/', '\\')) for _, fields in rows):
    logging.warning('labels file %s: study paths without a trailing "/"; added.', path)
  return paths, np.asarray(labels, np.int64)


def read_readers(path) -> Readers:
  """The readers CSV (see the module docstring): header `study,<name>,...`, labels 0/1."""
  path = str(path)
  rows = _read_rows(path, 'readers file')
  if not rows:
    raise LabelsError(f'readers file {path}', [('empty', path, None, 'no rows')])
  (_, header), rows = rows[0], rows[1:]
  names = tuple(header[1:])
  problems = []
  if len(names) < 2 or len(set(names)) != len(names) or any(_is_number(n) for n in header):
    problems.append(('malformed', path, 1, 'the header must be "study,<reader>,<reader>,..." '
                     f'with at least 2 distinct reader names, got {header}'))
  studies, labels, seen = [], [], {}
  for number, fields in rows:
    if len(fields) != len(header) or any(f not in ('0', '1') for f in fields[1:]):
      problems.append(('malformed', path, number,
                       f'expected a study path and {len(names)} labels 0/1, got {fields}'))
      continue
    key = study_key(fields[0])
    if key in seen:
      problems.append(('duplicate', path, number, f'study {fields[0]} repeats row {seen[key]}'))
      continue
    seen[key] = number
    studies.append(study_path(fields[0]))
    labels.append([int(f) for f in fields[1:]])
  if not studies and not problems:
    problems.append(('empty', path, None, 'no studies'))
  if problems:
    raise LabelsError(f'readers file {path}', problems)
  return Readers(tuple(studies), names, np.asarray(labels, np.int64))


def read_predictions(path, label_paths: Sequence[str], aggregation: str = 'mean'):
  """Study scores of a predictions file, in the order of `label_paths`.

  Returns (scores float64 (S,), score_kind 'labels' | 'probabilities', num_views int (S,) or None,
  aggregation or None). Raises one PredictionsError listing every problem.
  """
  path = str(path)
  rows = _read_rows(path, 'predictions file')
  rows = _drop_header(rows, path, 'predictions file', lambda f: len(f) >= 2 and _is_number(f[1]))
  if not rows:
    raise PredictionsError(f'predictions file {path}', [(
        'empty', path, None, 'no rows; it needs one "study path,probability" (or "image '
        'path,probability") row per study of the labels file')])
  index = {study_key(p): i for i, p in enumerate(label_paths)}
  is_view_level = bool(rows) and rows[0][1][0].lower().endswith(IMAGE_SUFFIXES)
  problems, seen, kept = [], {}, []  # kept: (row, study index, value)
  named = set()  # studies some row names, even with a bad value: those are not 'missing'
  for number, fields in rows:
    if len(fields) != 2 or not _is_number(fields[1]):
      problems.append(('malformed', path, number, f'expected "path,number", got {fields}'))
      if fields and fields[0]:  # its study is named, not 'missing'
        study = fields[0].replace('\\', '/')
        study = study.rsplit('/', 1)[0] if study.lower().endswith(IMAGE_SUFFIXES) else study
        named.add(index.get(study_key(study)))
      continue
    name, value = fields[0], float(fields[1])
    if name.lower().endswith(IMAGE_SUFFIXES) != is_view_level:
      level = 'an image' if is_view_level else 'a study'
      problems.append(('malformed', path, number,
                       f'{name} is not {level} path like the first row (one level per file)'))
      continue
    study = study_path(name.replace('\\', '/').rsplit('/', 1)[0] if is_view_level else name)
    seen_key = name.replace('\\', '/') if is_view_level else study_key(study)
    if seen_key in seen:
      what = 'image' if is_view_level else 'study'
      problems.append(('duplicate', path, number, f'{what} {name} repeats row {seen[seen_key]}'))
      continue
    seen[seen_key] = number
    if study_key(study) not in index:
      problems.append(('unknown', path, number, f'study {study} is not in the labels file'))
      continue
    named.add(index[study_key(study)])
    if math.isnan(value):
      problems.append(('nan', path, number, f'value is NaN for {name}'))
    elif not 0 <= value <= 1:
      problems.append(('out_of_range', path, number, f'value {value} outside [0, 1] for {name}'))
    else:
      kept.append((number, index[study_key(study)], value))
  problems += [('missing', path, None, f'no prediction for study {p}')
               for i, p in enumerate(label_paths) if i not in named]
  if problems:
    raise PredictionsError(f'predictions file {path}', problems)
  study_index = np.asarray([i for _, i, _ in kept], np.int64)
  values = np.asarray([v for _, _, v in kept], np.float64)
  if is_view_level:
    scores, num_views = aggregate_float64(values, study_index, len(label_paths), None,
                                           aggregation)
    return scores, 'probabilities', num_views, aggregation
  scores = np.empty(len(label_paths))
  scores[study_index] = values
  kind = 'labels' if np.isin(scores, (0.0, 1.0)).all() else 'probabilities'
  return scores, kind, None, None
