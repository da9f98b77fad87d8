"""MURA-v1.1 as the manual download holds it: the official CSVs, checked row by row against the
files and folder names, and every image decoded, before the builder writes anything.

Reads an extracted `MURA-v1.1/` folder or the official zip in place (`Source`); every problem is
collected and raised once, as a `MuraDataError` naming the file and row.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import zipfile
import zlib
from collections.abc import Iterator, Sequence

from absl import logging

from tfds_mura.grayscale import grayscale_png
from tfds_mura.mura.source import MuraDataError, Source
from tfds_mura.paths import BODY_PARTS, HOMEPAGE, IMAGE_PATH, LABELS, ROOT, ZIP_NAME


_MAX_LISTED = 20  # offending rows shown in an error; the count says how many more


@dataclasses.dataclass(frozen=True)
class View:
  """One row of `<split>_image_paths.csv`, checked against its study's label row."""
  image_path: str   # as in the CSV: MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/image1.png
  study_id: str     # valid/XR_WRIST/patient11185/study1_positive
  body_part: str    # wrist
  patient_id: int
  view: int
  label: int        # 1 = abnormal


# ------------------------------------------------------------------------------------------------
# The CSVs: no header, study paths end in '/'. Redistributed copies add a header or CRLF endings.


class _Unreadable(Exception):
  """A CSV that cannot be read at all: its split is not checked further."""


def read_csv_rows(source: Source, name: str, num_fields: int, warnings: list[str] | None = None
                  ) -> tuple[list[tuple[int, list[str]]], list[str]]:
  """((line number, fields) of each row, problems) of a MURA CSV. A first line that is no path
  (a header) is skipped, and CRLF line ends are read as LF, each with a warning (logged, and
  added to `warnings`). Raises `_Unreadable` when the file is missing or cannot be read."""
  path = f'{ROOT}/{name}'
  where = source.where(path)
  if not source.exists(path):
    top = source.top_level()
    inside = ('' if ROOT in top else
              f' ({source.description} holds {top[:10] or "nothing"}, not {ROOT}/: is it the MURA '
              'download?)')
    raise _Unreadable(f'{where} is missing{inside}: every MURA-v1.1 release has it; download '
                      f'{ZIP_NAME} again from {HOMEPAGE}.')
  try:
    data = source.read_bytes(path)
  except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
    raise _Unreadable(f'{where} cannot be read ({type(e).__name__}: {e}): a damaged copy? '
                      f'Download {ZIP_NAME} again from {HOMEPAGE}.') from None
  if data.startswith((b'\xff\xfe', b'\xfe\xff')):
    raise _Unreadable(f'{where} is UTF-16 text, not the official plain ASCII (saved again by a '
                      'spreadsheet program?): use the CSV of the download.')
  try:
    text = data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    raise _Unreadable(f'{where} is not text (byte {e.start} is {data[e.start:e.start + 1]!r}): '
                      'the official CSVs are plain ASCII; use the CSV of the download.') from None
  if b'\r\n' in data:
    warn(warnings, f'{where} has CRLF (Windows) line ends, not the official LF: read correctly, '
                    'each CRLF as one line end (a copy saved on Windows?).')
  rows, problems, first = [], [], True
  for number, line in enumerate(text.splitlines(), start=1):  # splitlines: LF and CRLF alike
    if not line.strip():
      continue
    fields = [f.strip() for f in line.split(',')]
    if first and '/' not in fields[0]:
      warn(warnings, f'{where}: line {number} looks like a header row ({line!r}), not a path; '
                      'skipped it. The official CSVs have no header.')
      first = False
      continue
    first = False
    if len(fields) != num_fields:
      problems.append(f'{name} line {number}: expected {num_fields} comma-separated field(s), got '
                      f'{line!r}')
    rows.append((number, fields))  # a malformed row too: the caller skips it, problem listed
  if first:
    problems.append(f'{name} has no rows ({len(data)} bytes): an empty or cut-short copy? Use the '
                    'CSV of the download.')
  return rows, problems


def warn(warnings: list[str] | None, message: str) -> None:
  logging.warning('%s', message)
  if warnings is not None:
    warnings.append(message)


def _raise_if(problems: Sequence[str], what: str):
  if problems:
    listed = '\n  '.join(problems[:_MAX_LISTED])
    more = f'\n  ... and {len(problems) - _MAX_LISTED} more' if len(problems) > _MAX_LISTED else ''
    raise MuraDataError(f'{what} ({len(problems)}):\n  {listed}{more}')


def read_split(source: Source, split: str, num_workers: int = 1) -> list[View]:
  """Every view of a MURA split (`train` or `valid`), cross-checked; raises listing all problems."""
  views, problems = check_split(source, split, num_workers)
  _raise_if(problems, f'The {split} split of {source.description} is inconsistent')
  return views


def check_split(source: Source, split: str, num_workers: int = 1,
                warnings: list[str] | None = None) -> tuple[list[View], list[str]]:
  """(views, problems) of a MURA split: every problem of its two CSVs and their files. A study
  whose row is wrong is reported once, not again for each of its images."""
  labels_csv = f'{split}_labeled_studies.csv'
  images_csv = f'{split}_image_paths.csv'
  study_labels: dict[str, int] = {}
  rejected: set[str] = set()  # studies with a reported problem: their images are not reported
  try:
    label_rows, problems = read_csv_rows(source, labels_csv, 2, warnings)
  except _Unreadable as e:
    return [], [str(e)]  # without labels nothing of the split can be checked
  for line, fields in label_rows:
    where = f'{labels_csv} line {line}'
    study_path = fields[0] if fields[0].endswith('/') else fields[0] + '/'
    if len(fields) != 2:  # listed by read_csv_rows
      rejected.add(study_path)
      continue
    label = fields[1]
    match = IMAGE_PATH.match(study_path + 'image1.png')
    if study_path in study_labels:
      problems.append(f'{where}: study {study_path} is listed twice')
      continue
    rejected.add(study_path)  # until it passes every check
    if label not in ('0', '1'):
      problems.append(f'{where}: label {label!r} is not 0 or 1')
    elif match is None or match['split'] != split:
      problems.append(f'{where}: {study_path!r} is not a {ROOT}/{split}/XR_<PART>/patientN/studyK_'
                      '{positive,negative}/ study path')
    elif match['part'].lower() not in BODY_PARTS:
      problems.append(f'{where}: unknown body part XR_{match["part"]} (expected one of '
                      f'{", ".join("XR_" + p.upper() for p in BODY_PARTS)})')
    elif (match['folder_label'] == 'positive') != (label == '1'):
      problems.append(f'{where}: label {label} contradicts the folder name {study_path!r}')
    else:
      rejected.discard(study_path)
      study_labels[study_path] = int(label)

  try:
    image_rows, image_problems = read_csv_rows(source, images_csv, 1, warnings)
  except _Unreadable as e:
    return [], problems + [str(e)]
  problems += image_problems
  views, seen, studies_with_views = [], set(), set()
  for line, fields in image_rows:
    if len(fields) != 1:  # listed by read_csv_rows
      continue
    image_path = fields[0]
    where = f'{images_csv} line {line}'
    match = IMAGE_PATH.match(image_path)
    study_path = image_path.rsplit('/', 1)[0] + '/'
    if study_path in rejected:
      continue  # its study's row is reported
    if match is None or match['split'] != split:
      problems.append(f'{where}: {image_path!r} is not a {ROOT}/{split}/XR_<PART>/patientN/'
                      'studyK_{positive,negative}/imageN.png path')
    elif image_path in seen:
      problems.append(f'{where}: image {image_path} is listed twice')
    elif study_path not in study_labels:
      problems.append(f'{where}: image {image_path} belongs to a study with no row in {labels_csv}')
    else:
      seen.add(image_path)
      studies_with_views.add(study_path)
      views.append(View(
          image_path=image_path, study_id=study_path[len(ROOT) + 1:-1],
          body_part=match['part'].lower(), patient_id=int(match['patient']),
          view=int(match['view']), label=study_labels[study_path]))
  problems += [f'{labels_csv}: study {s} has no image in {images_csv}'
               for s in study_labels if s not in studies_with_views]
  missing = set(source.missing([v.image_path for v in views], num_workers))
  problems += [f'{images_csv}: {v} is listed but the file is not in {source.description}'
               for v in sorted(missing)]
  return [v for v in views if v.image_path not in missing], problems


def changed_images(source: Source, recorded: dict[str, list], num_workers: int
                   ) -> tuple[list[str], int]:
  """(each listed image that differs from its record at build time, with how; the count of
  those with a new modification time only whose bytes were read again and found the same).

  `recorded`: image path -> [bytes, modification time in ns or None, CRC-32 of the bytes]. A
  zip's members are compared by size and CRC-32 from its central directory; a folder's files by
  size and modification time, and those with a new time (a copy that did not keep the times) by
  the CRC-32 of their bytes, read again."""
  paths = sorted(recorded)
  changed, reread = [], []
  for path, now in zip(paths, source.image_stats(paths, num_workers)):
    size, mtime, crc = recorded[path]
    if now is None:
      changed.append(f'{source.where(path)} (missing)')
    elif now[0] != size:
      changed.append(f'{source.where(path)} ({size:,} -> {now[0]:,} bytes)')
    elif now[2] is not None:  # a zip member: its CRC-32, from the zip's directory
      if now[2] != crc:
        changed.append(f'{source.where(path)} (other bytes, the same size)')
    elif now[1] != mtime:
      reread.append(path)
  same_bytes = 0
  for path, now in zip(reread, source.crc32s(reread, num_workers)):
    if now == recorded[path][2]:
      same_bytes += 1
    else:
      changed.append(f'{source.where(path)} (other bytes, the same size, modified since)')
  return sorted(changed), same_bytes


def count_images(views: Sequence[View]) -> dict[str, dict[str, int]]:
  """{body_part: {'normal': N_T, 'abnormal': A_T}}: the counts of the paper's weighted loss."""
  counts = {part: {label: 0 for label in LABELS} for part in BODY_PARTS}
  for v in views:
    counts[v.body_part][LABELS[v.label]] += 1
  return counts


def count_studies(views: Sequence[View]) -> dict[str, dict[str, int]]:
  counts = {part: {label: 0 for label in LABELS} for part in BODY_PARTS}
  for study_id, body_part, label in {(v.study_id, v.body_part, v.label) for v in views}:
    counts[body_part][LABELS[label]] += 1
  return counts


# ------------------------------------------------------------------------------------------------
# Images: decode every file (a corrupt or truncated PNG fails here), store 8-bit grayscale PNG
# (the rule: `tfds_mura.grayscale`).


_WORKER_SOURCE: Source | None = None


def _init_worker(source: Source):
  global _WORKER_SOURCE
  _WORKER_SOURCE = source


def _encode_view(image_path: str) -> tuple[bytes | None, list[str], str | None, int | None]:
  """(png, notes, error, CRC-32 of the file's bytes: what a later reuse check compares)."""
  crc = None
  try:
    data = _WORKER_SOURCE.read_bytes(image_path)
    crc = zlib.crc32(data)
    png, notes = grayscale_png(data)
    return png, notes, None, crc
  except Exception as e:  # pylint: disable=broad-except  (reported, with the file, by the caller)
    return None, [], f'{_WORKER_SOURCE.where(image_path)}: {type(e).__name__}: {e}', crc


@dataclasses.dataclass
class ImageReport:
  """What decoding found, over every split of a build: unreadable files and conversion notes."""
  bad: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  crc32: dict[str, int] = dataclasses.field(default_factory=dict)  # image path -> of its bytes


def encode_views(source: Source, views: Sequence[View], num_workers: int,
                 report: ImageReport) -> Iterator[tuple[View, bytes]]:
  """(view, grayscale PNG) in order, decoded on all cores. Unreadable files go to `report.bad`
  (the caller raises once every split is decoded), notes (`grayscale_notes`) to `report.notes`."""
  paths = [v.image_path for v in views]
  if num_workers > 1:
    pool = multiprocessing.get_context('spawn').Pool(num_workers, _init_worker, (source,))
    results = pool.imap(_encode_view, paths, chunksize=16)
  else:
    pool = None
    _init_worker(source)
    results = map(_encode_view, paths)
  try:
    for v, (png, notes, error, crc) in zip(views, results):
      if crc is not None:
        report.crc32[v.image_path] = crc
      report.notes += [f'{source.where(v.image_path)}: {note}' for note in notes]
      if error is not None:
        report.bad.append(error)  # keep going: the error lists every bad file, not the first
      else:
        yield v, png  # TFDS keeps nothing of a build that raises in the end
  finally:
    if pool is not None:
      pool.terminate()


def raise_for_images(report: ImageReport, csv_problems: Sequence[str] = ()) -> None:
  """One error for everything a build found: the CSVs' problems and every unreadable image."""
  problems = [*csv_problems, *report.bad]
  kinds = [f'{len(csv_problems)} in the CSVs and their files'] * bool(csv_problems) + [
      f'{len(report.bad)} corrupt, truncated or unsupported image(s)'] * bool(report.bad)
  _raise_if(problems, f'The build stopped and wrote nothing: {" and ".join(kinds)}; fix or '
                      're-download them. Every problem')


def warn_for_notes(report: ImageReport, warnings: list[str] | None = None) -> None:
  if report.notes:
    listed = '\n  '.join(report.notes[:_MAX_LISTED])
    more = (f'\n  ... and {len(report.notes) - _MAX_LISTED} more' if len(report.notes) >
            _MAX_LISTED else '')
    warn(warnings, f'{len(report.notes)} image(s) were not plain radiographs; stored converted '
                    f'as said:\n  {listed}{more}')
