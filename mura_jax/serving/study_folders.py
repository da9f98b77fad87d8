"""Study folders for `mura-predict`: the paths given -> studies (a MURA tree's study folders, any folder
of image files, DICOM studies by StudyInstanceUID), their views read, each study's body part settled;
links followed once, the project's own outputs skipped, names that are not UTF-8 shown escaped."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

from etils import epath

from mura_jax.data import images
from mura_jax.errors import UserError
from tfds_mura.paths import body_part_of_path


OUTPUT_MARKER = '.mura-predict-output'  # in --out and the cam folder: skipped as input


OUTPUT_FILES = ('predictions.csv', 'studies.csv', 'views.csv')


STUDIES_HEADER = 'study,body_part,views,probability,verdict,status'


class OutputError(UserError, ValueError):
  """An --out that would lose or mix up files: refused before any work."""


@dataclasses.dataclass
class Study:
  """One study found on disk, and what became of it."""
  id: str
  files: list[str]
  body_part: str | None = None
  views: list[images.View] = dataclasses.field(default_factory=list)
  errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, why)
  left_out: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, why)
  warnings: list[str] = dataclasses.field(default_factory=list)
  status: str = 'pending'   # predicted | predicted_out_of_scope | error | out_of_scope
  probability: float | None = None
  view_probabilities: list[float] = dataclasses.field(default_factory=list)
  cam: str = ''
  rank: int | None = None
  tier: str = ''


def _is_image_file(path: epath.Path) -> bool:
  """By suffix (a broken link so named too: reading it reports it), or DICOM's marker."""
  if path.name.startswith('.'):
    return False
  suffix = path.suffix.lower()
  if suffix in images.IMAGE_SUFFIXES:
    return True
  try:
    return suffix == '' and path.is_file() and images.is_dicom(path)
  except OSError:
    return False  # not readable and not named as an image: not taken for one


def shown(text: str) -> str:
  """`text` safe to print and write as UTF-8: a file name's bytes that are not UTF-8 (which
  Python holds as surrogates) become backslash escapes, b'caf\\xe9' -> 'caf\\xe9'."""
  try:
    return text.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')
  except UnicodeEncodeError:
    return text.encode('utf-8', 'backslashreplace').decode('utf-8')


def _real(path) -> str:
  """The folder or file a local path leads to (links resolved); a gs:// path as it is."""
  text = os.fspath(path)
  return text if '://' in text else os.path.realpath(text)


def _is_link(path: epath.Path) -> bool:
  try:
    return path.is_symlink()
  except (AttributeError, NotImplementedError, OSError):  # gs:// has no links
    return False


def is_output_folder(folder: epath.Path) -> bool:
  """A folder that mura-predict wrote: its marker, or (before markers) its studies.csv header
  beside a views.csv."""
  if (folder / OUTPUT_MARKER).exists():
    return True
  studies = folder / 'studies.csv'
  if not (studies.is_file() and (folder / 'views.csv').is_file()):
    return False
  with studies.open('rb') as f:
    return f.readline().decode('utf-8', 'replace').startswith(STUDIES_HEADER)


def _walk(folder: epath.Path, seen: set[str], notes: list[str], problems: list[str]
          ) -> list[epath.Path]:
  """Every file under a folder (epath: local or gs://), in name order; a folder is read once
  however many links lead to it (`seen`: real paths), mura-predict's outputs are skipped."""
  real = _real(folder)
  if real in seen:
    link = f'a link to {real}, ' if os.fspath(folder) != real else ''
    notes.append(f'{folder}: {link}already read: skipped (each folder is read once)')
    return []
  seen.add(real)
  if is_output_folder(folder):
    notes.append(f'{folder}: skipped: mura-predict wrote it (its outputs are no radiographs)')
    return []
  try:  # links last: a study is named by its own folder, not by a link to it
    children = sorted(folder.iterdir(), key=lambda p: (_is_link(p), p))
  except OSError as e:
    problems.append(f'{folder}: cannot list the folder ({type(e).__name__}: {e.strerror or e})')
    return []
  found = []
  for path in children:
    found += _walk(path, seen, notes, problems) if path.is_dir() else [path]
  return found


def _study_id(folder: epath.Path) -> str:
  """MURA's study path ('MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/') where the
  folder lies in a MURA tree, else the folder as given, with a trailing '/'."""
  parts = folder.parts
  if 'MURA-v1.1' in parts:
    parts = parts[parts.index('MURA-v1.1'):]
    return '/'.join(parts) + '/'
  return os.fspath(folder).rstrip('/') + '/'


def find_studies(paths: Sequence[str]) -> tuple[list[Study], list[str], int, list[str]]:
  """(studies, problems with the given paths, skipped sidecar files, notes on what was skipped)."""
  by_folder: dict[str, list[str]] = {}
  problems, notes, sidecars, twice = [], [], 0, 0
  seen_folders, seen_files = set(), set()
  for given in paths:
    path = epath.Path(given)
    if not path.exists():
      problems.append(f'{given}: no such file or folder')
      continue
    if path.is_dir() and _real(path) in seen_folders:  # inside an earlier PATH: not a problem
      notes.append(f'{given}: already read as part of an earlier PATH')
      continue
    files = [path] if path.is_file() else _walk(path, seen_folders, notes, problems)
    found = 0
    for f in files:
      if f.name.startswith('._'):
        sidecars += 1
      elif _is_image_file(f):
        found += 1
        if _real(f) in seen_files:
          twice += 1
          continue
        seen_files.add(_real(f))
        by_folder.setdefault(os.fspath(f.parent), []).append(os.fspath(f))
    if not found:
      problems.append(f'{given}: no PNG, JPEG or DICOM file in it')
  if twice:
    notes.append(f'{twice} file(s) reached twice (links, or PATHs inside each other): read once')
  studies = [Study(_study_id(epath.Path(folder)), sorted(files, key=_view_order))
             for folder, files in sorted(by_folder.items())]
  return studies, problems, sidecars, notes


def check_out(out, paths: Sequence[str], studies: list[Study], cam_only: bool = False) -> None:
  """Refuses (OutputError, one sentence) an --out that would replace or mix with files: an
  existing file, a folder that holds an input PATH or image, CSVs that mura-predict did not
  write. A new folder inside an input tree is fine: it gets the marker and is skipped later.
  `cam_only`: `out` is ./cam of --cam without --out, where anything not ours is refused."""
  what = f'the cam folder {out} (--cam without --out)' if cam_only else f'--out {out}'
  folder = epath.Path(out)
  if folder.exists() and not folder.is_dir():
    raise OutputError(f'{what} is an existing file, and it must be a folder (mura-predict writes '
                      'predictions.csv, studies.csv, views.csv and cam/ in it): pass a folder.')
  if '://' not in os.fspath(out):
    real = _real(out)
    for given in paths:
      if epath.Path(given).is_dir() and (_real(given) + os.sep).startswith(real.rstrip(os.sep)
                                                                           + os.sep):
        raise OutputError(
            f'{what} holds the input {given}: its outputs would mix with the radiographs '
            'and be read as views next time. Pass a folder outside it (or a new one inside it).')
    for study in studies:
      for f in study.files:
        if os.path.dirname(_real(f)) == real:
          raise OutputError(f'{what} is the folder of the input image {f}: pass a folder '
                            'of its own (a new one beside it or inside it).')
  if folder.is_dir() and not is_output_folder(folder):
    names = sorted(p.name for p in folder.iterdir()) if cam_only else [
        name for name in OUTPUT_FILES + ('cam',) if (folder / name).exists()]
    if names:
      raise OutputError(
          f'{what} already holds {names[0]}, which mura-predict did not write (no '
          f'{OUTPUT_MARKER}): pass another {"--out" if cam_only else "folder"}, or move '
          f'{names[0]} away.')


def _view_order(path: str):
  """image2.png before image10.png."""
  name = os.path.basename(path)
  digits = ''.join(c for c in name if c.isdigit())
  return (name.rstrip('0123456789.').lower(), int(digits) if digits else -1, name)


def read_studies(studies: list[Study], body_part: str | None, progress: bool) -> list[Study]:
  """Reads every file; DICOM files are regrouped by StudyInstanceUID; body parts are settled."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  regrouped: dict[str, Study] = {}
  for study in tqdm(studies, desc='read', unit='study', disable=not progress, file=sys.stderr):
    for f in study.files:
      try:
        view = images.read_view(f)
      except Exception as e:  # pylint: disable=broad-except  (one file never ends the run)
        why = str(e) if isinstance(e, images.ImageError) else f'{f}: {type(e).__name__}: {e}'
        study.errors.append((f, why))
        continue
      target = study
      if view.study_uid:  # DICOM: the study is its StudyInstanceUID, wherever the file lies
        target = regrouped.setdefault(view.study_uid, Study(view.study_uid, []))
        target.files.append(f)
      target.views.append(view)
  # A folder of DICOM files becomes its DICOM studies; it stays only for what it still holds.
  kept = [s for s in studies if s.views or s.errors]
  for study in kept:
    study.files = [f for f in study.files if any(v.path == f for v in study.views)
                   or any(e[0] == f for e in study.errors)]
  all_studies = kept + list(regrouped.values())
  for study in all_studies:
    _settle_body_part(study, body_part)
  return all_studies


def _dicom_part(name: str) -> str:
  """Body Part Examined -> a MURA body part ('UPPER ARM' -> 'humerus'), else lower-cased."""
  return images.DICOM_BODY_PARTS.get(name.upper().replace(' ', '').replace('_', ''),
                                     name.strip().lower())


def _settle_body_part(study: Study, override: str | None) -> None:
  """The study's body part (module docstring); views of other parts in a mixed study are moved to
  `left_out`, never averaged in."""
  named = [(view, _dicom_part(view.body_part)) for view in study.views if view.body_part]
  from_path = body_part_of_path(study.files[0] if study.files else study.id)
  if override or from_path:
    part, source = (override, '--body-part') if override else (from_path, 'its XR_ folder')
  elif named:
    counts = [p for _, p in named]
    part = max(counts, key=lambda p: (counts.count(p), -counts.index(p)))
    source = 'the part most of its views name'
  else:
    part, source = None, ''
  study.body_part = part
  parts = sorted({p for _, p in named})
  if len(parts) > 1:
    left = [(view, p) for view, p in named if p != part]
    study.views = [v for v in study.views if all(v is not view for view, _ in left)]
    study.left_out = [(view.path, f'Body Part Examined {view.body_part!r}: not the study\'s '
                                  f'{part} ({source})') for view, _ in left]
    study.warnings.append(
        f'its views name different body parts ({", ".join(parts)}): {len(left)} not of {part} '
        f'({source}) left out: {", ".join(os.path.basename(v.path) for v, _ in left)}')
  elif parts and parts[0] != part:
    study.warnings.append(f'its views name {parts[0]}, {source} says {part}: predicted as {part}')
