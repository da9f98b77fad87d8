"""Where an export goes: what may be replaced is checked before any work (only an empty folder or a
previous export of mura-jax), the export is written into a staging folder beside the target and
renamed into place when complete, and what a killed export left is removed by the next one."""

from __future__ import annotations

import os
import re
import socket
import uuid

from absl import logging
import jax
from etils import epath

from mura_jax import checkpoints
from mura_jax.errors import write_problem
from mura_jax.inference.exported import FORMAT_VERSION, ExportError, read_json


def _same_path(a: epath.Path, b: epath.Path) -> bool:
  return _resolved(a) == _resolved(b)


def _resolved(path: epath.Path) -> str:
  text = os.fspath(path)
  return text.rstrip('/') if '://' in text else os.path.realpath(text)


def _inside(path: epath.Path, folder: epath.Path) -> bool:
  """Whether `path` is `folder` or under it (links resolved)."""
  path, folder = _resolved(path), _resolved(folder)
  return path == folder or path.startswith(folder.rstrip('/') + '/')


def check_out_dir(out_dir, workdir) -> None:
  """Raises ExportError, before any work, when writing the export to `out_dir` could destroy
  anything. The rules:
  - `out_dir` must not be an existing file;
  - it must not be the workdir or a folder above it, nor be inside the workdir's checkpoint
    folders: the export replaces its folder as a whole;
  - an existing `out_dir` is replaced only when it is empty or a previous export of mura-jax:
    an export.json (a JSON object with format_version and files) no newer than this mura-jax
    writes, and nothing in the folder but the files it lists and saved_model/;
  - the folder it goes in can be written.
  A staging folder of a killed export beside it is not a problem: `export` removes it."""
  out_dir, workdir = epath.Path(out_dir), epath.Path(workdir)
  named = f'The export folder {out_dir} (--config.export.dir)'
  if out_dir.exists() and not out_dir.is_dir():
    raise ExportError(f'{named} is a file, not a folder; give a folder (created if missing) that '
                      'holds nothing else.')
  if _inside(workdir, out_dir):
    raise ExportError(f'{named} holds the workdir {workdir}, its checkpoints included; the export '
                      'replaces its folder as a whole: give a folder of its own (the default is '
                      f'{workdir / "export"}).')
  for kept in (checkpoints.LATEST, checkpoints.BEST):
    if _inside(out_dir, workdir / kept):
      raise ExportError(f'{named} is inside the checkpoint folder {workdir / kept}; give a folder '
                        f'of its own (the default is {workdir / "export"}).')
  if out_dir.is_dir():
    entries = sorted(p.name for p in out_dir.iterdir())
    if entries:
      if 'export.json' not in entries:
        raise ExportError(f'{named} holds {_listed(entries)} and is not an export of mura-jax (no '
                          'export.json); the export replaces its folder as a whole: give an '
                          'empty or new folder, or move those files.')
      manifest = _previous_manifest(out_dir)
      others = [e for e in entries
                if e not in manifest['files'] and e not in ('export.json', 'saved_model')]
      if others:
        raise ExportError(f'{named} holds {_listed(others)}, which no export wrote; the export '
                          'replaces its folder as a whole: move them, or give another folder.')
  problem = write_problem(out_dir.parent)
  if problem is not None:
    raise ExportError(f'{named}: cannot write in {out_dir.parent} '
                      f'({getattr(problem, "strerror", None) or problem}); give a folder you can '
                      'write to.')


def _listed(names: list[str]) -> str:
  return ', '.join(names[:3]) + (f' and {len(names) - 3} more' if len(names) > 3 else '')


def _previous_manifest(out_dir: epath.Path) -> dict:
  """export.json of the export in `out_dir`, which is to be replaced: readable, and not newer."""
  path = out_dir / 'export.json'
  not_replaced = (f'{out_dir} is not replaced, as it cannot be told from other files: delete it '
                  'yourself if it is an old export, or give another folder (--config.export.dir).')
  manifest = read_json(path, what_to_do=not_replaced)
  found = manifest.get('format_version')
  if isinstance(found, int) and found > FORMAT_VERSION:
    raise ExportError(f'{out_dir} holds an export of format {found}, newer than this mura-jax '
                      f'writes ({FORMAT_VERSION}): upgrade mura-jax, or export to another '
                      'folder (--config.export.dir).')
  if not isinstance(found, int) or not isinstance(manifest.get('files'), dict):
    raise ExportError(f'{path} is damaged (no format_version and files of an export); '
                      f'{not_replaced}')
  return manifest


def temporary(out_dir: epath.Path, kind: str) -> epath.Path:
  """A folder beside out_dir named for this process: `.NAME.KIND-HOST-PID-XXXXXXXX`."""
  host = re.sub(r'[^A-Za-z0-9_.]', '_', socket.gethostname()) or 'host'
  return out_dir.parent / f'.{out_dir.name}.{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}'


def _alive(host: str | None, pid: int | None) -> bool:
  """Whether the process that named a temporary folder may still be writing it: a live process
  on this host; another host's only while this run has several processes (one of them may be
  it); an old-style name (no host) never."""
  if host is None:
    return False
  if host != re.sub(r'[^A-Za-z0-9_.]', '_', socket.gethostname()):
    return jax.process_count() > 1
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # another user's live process
    return True
  return True


def clear_leftovers(out_dir) -> list[str]:
  """Removes what a killed export left beside `out_dir`: staging folders (`.NAME.partial-...`),
  and the previous export it was replacing (`.NAME.old-...`), put back when `out_dir` is gone.
  Folders of an export still running are left. Returns the notes (also logged)."""
  out_dir = epath.Path(out_dir)
  if not out_dir.parent.exists():
    return []
  pattern = re.compile(rf'^\.{re.escape(out_dir.name)}\.(partial|old)-'
                       r'(?:(.+)-(\d+)-)?[0-9a-f]{8}$')
  notes = []
  for path in sorted(out_dir.parent.iterdir()):
    match = pattern.match(path.name)
    if not match or not path.is_dir():
      continue
    kind, host, pid = match.group(1), match.group(2), match.group(3)
    if _alive(host, None if pid is None else int(pid)):
      notes.append(f'{path} belongs to an export still running (process {pid} on {host}); left.')
    elif kind == 'old' and not out_dir.exists():
      path.rename(out_dir)
      notes.append(f'{path} held the previous export of {out_dir}, moved away by an export that '
                   'was stopped; put back.')
    else:
      path.rmtree()
      notes.append(f'Removed {path}, left by an export that was stopped before it finished.')
  for note in notes:
    logging.warning('%s', note)
  return notes


def remove_quietly(folder: epath.Path) -> None:
  """Removes a staging folder after a failure, whose own error is the one to report."""
  try:
    if folder.exists():
      folder.rmtree()
  except OSError as e:
    logging.warning('Could not remove %s (%s); delete it, or the next export will.', folder, e)
