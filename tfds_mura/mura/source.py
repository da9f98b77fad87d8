"""Where MURA's files are: an extracted `MURA-v1.1/` folder or the official zip, read in place, by
their CSV paths; a manual_dir without either gets a sentence saying what to get and where."""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from collections.abc import Sequence

from etils import epath

from tfds_mura.paths import HOMEPAGE, CSV_NAMES, ROOT, ZIP_NAME
from concurrent.futures import ThreadPoolExecutor


# What to get and where (TFDS shows it as the builder's MANUAL_DOWNLOAD_INSTRUCTIONS).
INSTRUCTIONS = f"""\
  MURA needs registration and may not be redistributed:
    1. Register and accept the Stanford AIMI research use agreement at
       {HOMEPAGE}
       (or the Stanford AIMI shared datasets page, https://aimi.stanford.edu/shared-datasets).
    2. Download MURA-v1.1.zip (about 3.3 GB).
    3. Put it into the manual_dir (default ~/tensorflow_datasets/downloads/manual/), either as the
       zip itself, `<manual_dir>/MURA-v1.1.zip` (read in place, no need to extract), or extracted,
       `<manual_dir>/MURA-v1.1/` holding train/, valid/ and the four CSVs
       (train_image_paths.csv, train_labeled_studies.csv, valid_image_paths.csv,
       valid_labeled_studies.csv).
    4. python -m tfds_mura.build --manual_dir <manual_dir> --data_dir <data_dir>
  """


class MuraDataError(ValueError):
  """The manual download is missing, incomplete or contradicts itself; the message says where."""


class Source:
  """Reads files under MURA's root by their CSV paths (`MURA-v1.1/...`), from a folder or a zip."""

  def __init__(self, manual_dir: epath.PathLike):
    manual_dir = epath.Path(manual_dir)
    self.description = os.fspath(manual_dir)
    self._zip_path = None
    self._zip = None
    if not manual_dir.exists():
      raise MuraDataError(
          f'The manual_dir {manual_dir} does not exist: create it and put {ZIP_NAME} or the '
          f'extracted {ROOT}/ in it.\n{INSTRUCTIONS}')
    if not manual_dir.is_dir():
      raise MuraDataError(
          f'The manual_dir {manual_dir} is a file, not a folder: give the folder that holds '
          f'{ZIP_NAME} or {ROOT}/ (--manual_dir {manual_dir.parent}'
          f'{"" if manual_dir.name == ZIP_NAME else f", with the file renamed to {ZIP_NAME}"}).')
    if (manual_dir / ROOT / 'train_labeled_studies.csv').exists():
      self._base = manual_dir
    elif (manual_dir / 'train_labeled_studies.csv').exists() and manual_dir.name == ROOT:
      self._base = manual_dir.parent  # the user pointed at MURA-v1.1/ itself
    elif (manual_dir / ZIP_NAME).exists():
      self._base = None
      self._zip_path = manual_dir / ZIP_NAME
      self.description = os.fspath(self._zip_path)
      if (manual_dir / ZIP_NAME).is_dir():
        raise MuraDataError(f'{self._zip_path} is a folder, not the zip: rename it to {ROOT} if '
                            f'it holds the extracted files, or put the downloaded zip there.')
    else:
      found = sorted(p.name for p in manual_dir.iterdir())
      raise MuraDataError(
          f'Neither {ROOT}/ (with its CSVs) nor {ZIP_NAME} is in the manual_dir {manual_dir} '
          f'(it holds: {found[:10] or "nothing"}){_hint(manual_dir, found)}.\n'
          f'{INSTRUCTIONS}')

  @property
  def is_zip(self) -> bool:
    return self._base is None

  def __getstate__(self):  # worker processes reopen the zip themselves
    return {**self.__dict__, '_zip': None}

  def _zipfile(self) -> zipfile.ZipFile:
    if self._zip is None:
      try:
        self._zip = zipfile.ZipFile(self._zip_path.open('rb'))
      except (zipfile.BadZipFile, EOFError, OSError) as e:
        size = self._zip_path.stat().length
        raise MuraDataError(
            f'{self._zip_path} ({size:,} bytes) is not a readable zip ({type(e).__name__}: {e}): '
            f'a truncated or damaged download? MURA-v1.1.zip is about 3.3 GB. Download it again '
            f'from {HOMEPAGE}, or extract it and put the MURA-v1.1/ folder in the manual_dir.'
        ) from None
      self._names = set(self._zip.namelist())
    return self._zip

  def fingerprint(self) -> str:
    """sha256 of the four CSVs: what a built dataset was made from (`Builder`, reuse check)."""
    digest = hashlib.sha256()
    for name in CSV_NAMES:
      path = f'{ROOT}/{name}'
      try:
        digest.update(self.read_bytes(path) if self.exists(path) else b'')
      except (OSError, zipfile.BadZipFile, EOFError, zlib.error):
        digest.update(b'unreadable')  # differs from any readable CSV; the build says why
    return digest.hexdigest()

  def top_level(self) -> list[str]:
    """The names at the top of the zip or folder (for errors about a misplaced MURA-v1.1/)."""
    if self._base is not None:
      return sorted(p.name for p in self._base.iterdir())
    self._zipfile()
    return sorted({name.split('/', 1)[0] for name in self._names})

  def exists(self, path: str) -> bool:
    if self._base is not None:
      return (self._base / path).exists()
    self._zipfile()
    return path in self._names

  def read_bytes(self, path: str) -> bytes:
    if self._base is not None:
      return (self._base / path).read_bytes()
    return self._zipfile().read(path)

  def where(self, path: str) -> str:
    """A path a person can open (for error messages)."""
    return os.fspath(self._base / path) if self._base is not None else f'{self._zip_path}:{path}'

  def image_stats(self, paths: Sequence[str], num_workers: int
                  ) -> list[tuple[int, int | None, int | None] | None]:
    """(bytes, modification time in ns or None, CRC-32 or None) of each path, None where it is
    missing: a folder's from stat (threads: stat is I/O bound), a zip's from its central
    directory (size and the members' CRC-32, which changes with any byte, at no cost)."""
    if self._base is None:
      self._zipfile()
      infos = [self._zip.getinfo(p) if p in self._names else None for p in paths]
      return [(i.file_size, None, i.CRC) if i is not None else None for i in infos]
    base = os.fspath(self._base)
    local = '://' not in base

    def stat(path):
      try:
        if local:  # os.path, not epath: 40,000 epath.Path objects take longer than the stats
          st = os.stat(os.path.join(base, path))
          return st.st_size, st.st_mtime_ns, None
        st = (self._base / path).stat()
        return st.length, int(st.mtime) * 10**9, None
      except (FileNotFoundError, NotADirectoryError):
        return None
    # Threads for a cold cache or a network disk, each a chunk of paths: a future per file
    # costs more than its stat (docs/benchmarks-history.md,
    # "Measurements behind choices in the code").
    chunks = [paths[i:i + 1024] for i in range(0, len(paths), 1024)]
    with ThreadPoolExecutor(max(4, num_workers * 4)) as pool:
      return [s for chunk in pool.map(lambda c: [stat(p) for p in c], chunks) for s in chunk]

  def crc32s(self, paths: Sequence[str], num_workers: int) -> list[int | None]:
    """CRC-32 of each file's bytes (read again), None where it cannot be read."""
    def crc(path):
      try:
        return zlib.crc32(self.read_bytes(path))
      except (OSError, zipfile.BadZipFile, EOFError, zlib.error):
        return None
    with ThreadPoolExecutor(max(4, num_workers * 2)) as pool:
      return list(pool.map(crc, paths))

  def missing(self, paths: Sequence[str], num_workers: int) -> list[str]:
    """The paths that are not there (checked in parallel threads: stat is I/O bound)."""
    if self._base is None:
      self._zipfile()
      return [p for p in paths if p not in self._names]
    with ThreadPoolExecutor(max(4, num_workers * 4)) as pool:
      present = list(pool.map(lambda p: (self._base / p).exists(), paths, chunksize=256))
    return [p for p, ok in zip(paths, present) if not ok]


def _hint(manual_dir: epath.Path, found: Sequence[str]) -> str:
  """What a manual_dir without MURA most likely holds instead, and the fix, as a clause."""
  root = manual_dir / ROOT
  if root.exists() and not root.is_dir():
    return f': {root} is a file, not the extracted folder; remove it and extract {ZIP_NAME} again'
  if (root / ROOT / 'train_labeled_studies.csv').exists():
    return (f': it was extracted one level too deep, use --manual_dir {root} (or move '
            f'{root / ROOT} up one level)')
  if root.is_dir():
    inside = sorted(p.name for p in root.iterdir())
    return (f': {root}/ lacks train_labeled_studies.csv (it holds: {inside[:10] or "nothing"}), '
            f'an incomplete extraction? Extract {ZIP_NAME} again')
  if (manual_dir / 'train_labeled_studies.csv').exists():
    return (f': it holds the CSVs itself, in a folder not named {ROOT} (their paths start with '
            f'{ROOT}/): rename it to {ROOT} and give its parent, --manual_dir '
            f'{manual_dir.parent}')
  if (manual_dir.parent / 'train_labeled_studies.csv').exists():
    return f': it is inside {ROOT}/, use --manual_dir {manual_dir.parent.parent}'
  zips = [name for name in found if name.lower().endswith('.zip')]
  if zips:
    return (f': if {zips[0]} is the MURA download (a browser may have renamed it), rename it to '
            f'{ZIP_NAME}')
  return ''
