"""One job at a time in a folder: a lock file naming its holder (pid, host, start, command).

Two training runs on one workdir, or two builds into one data_dir, would interleave their
checkpoints, metrics or shards. `held(folder, what)` writes `folder/.mura-lock` for as long as the
job runs and removes it at the end. A second job finds the lock and is refused with a sentence
naming the holder. A lock left by a process that is gone (killed, out of memory: it had no chance
to remove it) is taken over with a note, when that can be known: the holder ran on this host and
its pid no longer runs, or runs a process started after the lock was written. A holder on another
host cannot be asked, so the message says which file to delete once that job is known to be over.

Local folders are locked atomically (O_EXCL); on gs:// the check and the write are two requests,
so two jobs started within the same second can both pass: the lock guards against the common
mistake (a second command on a live run), not a deliberate race. `folder_lock` lives in the
dataset package because the builder needs it and this package imports nothing from mura_jax;
mura_jax locks its workdirs with the same function.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import time
from typing import Callable, Iterator

from etils import epath

LOCK_NAME = '.mura-lock'


class FolderLockedError(RuntimeError):
  """Another live job holds the folder."""


def _holder_record() -> dict:
  return {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.time(),
          'started_text': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
          'command': ' '.join(sys.argv)[:500]}


def _read(lock: epath.Path) -> dict | None:
  """The holder recorded in `lock`; None if it vanished meanwhile; {} if it cannot be parsed
  (a lock written half-way by a process killed while writing it)."""
  try:
    text = lock.read_text()
  except FileNotFoundError:
    return None
  try:
    record = json.loads(text)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def _process_start_time(pid: int) -> float | None:
  """When process `pid` started (seconds since the epoch), from /proc; None where unknown."""
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
      ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/stat', encoding='ascii') as f:
      boot = next(int(line.split()[1]) for line in f if line.startswith('btime'))
  except (OSError, ValueError, IndexError, StopIteration):
    return None
  return boot + ticks / os.sysconf('SC_CLK_TCK')


def holder_is_gone(record: dict) -> bool:
  """Whether the process that wrote `record` is known to have ended: on this host, its pid runs
  no process, or a process started after the lock was written (the pid was reused)."""
  if not record or record.get('host') != socket.gethostname():
    return not record  # an unreadable lock holds nothing; another host's cannot be asked
  pid = record.get('pid')
  if not isinstance(pid, int) or pid <= 0:
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    pass  # it runs, as another user
  started = _process_start_time(pid)
  return started is not None and started > float(record.get('started', 0)) + 1


def describe(record: dict) -> str:
  """'pid 123 on host h, started 2026-12-03 08:50:00 UTC (python -m mura_jax.main ...)'."""
  if not record:
    return 'an unreadable lock'
  command = f' ({record["command"]})' if record.get('command') else ''
  return (f'pid {record.get("pid")} on host {record.get("host")}, started '
          f'{record.get("started_text", "at an unknown time")}{command}')


def _create(lock: epath.Path, record: dict) -> bool:
  """Writes the lock only if it does not exist; False if it does. Locally the whole record is
  written to a file of this process's own first and hard-linked into place (the link fails if
  the lock exists), so another job never sees a lock without its holder in it."""
  text = json.dumps(record)
  local = os.fspath(lock) if '://' not in str(lock) else None
  if local is not None:
    staged = f'{local}.{record["pid"]}-{secrets.token_hex(4)}'
    try:
      with open(staged, 'w', encoding='utf-8') as f:
        f.write(text)
      try:
        os.link(staged, local)
      except FileExistsError:
        raise
      except OSError:  # a file system without hard links: create it exclusively, then fill it
        with open(local, 'x', encoding='utf-8') as f:
          f.write(text)
    except FileExistsError:
      return False
    finally:  # also on a full disk: nothing left behind to puzzle the next job
      if os.path.exists(staged):
        os.unlink(staged)
    return True
  if lock.exists():
    return False
  lock.write_text(text)
  return True


def acquire(folder, what: str, *, error: type[Exception] = FolderLockedError,
            note: Callable[[str], None] | None = None) -> epath.Path:
  """Takes `folder`'s lock for this process (the folder is made if missing); returns the lock
  file. `what` names the job in messages ('training run', 'dataset build'); `error` is the
  class raised when a live job holds it; `note` receives the sentence when a dead holder's lock
  is taken over (default: stderr)."""
  folder = epath.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  lock = folder / LOCK_NAME
  record = _holder_record()
  for _ in range(3):  # a holder that ends between our two looks is looked at again
    if _create(lock, record):
      return lock
    found = _read(lock)
    if found is None:
      continue
    if found.get('pid') == record['pid'] and found.get('host') == record['host']:
      return lock  # this process holds it already (a mode that runs another one, in-process)
    if not holder_is_gone(found):
      same_host = found.get('host') == record['host']
      raise error(
          f'{folder} is in use by another {what}: {describe(found)}. One folder holds one job at '
          f'a time: wait for it to end, or give another folder.'
          + ('' if same_host else f' If that job is known to be over (it ran on another host, '
             f'which cannot be asked), delete {lock} and start again.'))
    (note or _stderr_note)(f'{folder} was locked by a {what} that is gone ({describe(found)}); '
                           'taking it over.')
    try:
      lock.unlink()
    except FileNotFoundError:
      pass
  raise error(f'Could not take the lock {lock}: other jobs keep taking it. Start one job at a time.')


def release(lock: epath.Path) -> None:
  """Removes the lock if this process still holds it."""
  found = _read(lock)
  if found is not None and found.get('pid') == os.getpid() and (
      found.get('host') == socket.gethostname()):
    try:
      lock.unlink()
    except FileNotFoundError:
      pass


@contextlib.contextmanager
def held(folder, what: str, *, error: type[Exception] = FolderLockedError,
         note: Callable[[str], None] | None = None) -> Iterator[epath.Path]:
  """`with held(workdir, 'training run'):` the job's lock for the block's duration. Nested use
  in the same process (train, then evaluate in it) holds the one lock and leaves it to the outer
  block."""
  folder = epath.Path(folder)
  already = _read(folder / LOCK_NAME)
  ours = already is not None and already.get('pid') == os.getpid() and (
      already.get('host') == socket.gethostname())
  lock = acquire(folder, what, error=error, note=note)
  try:
    yield lock
  finally:
    if not ours:
      release(lock)


def _stderr_note(sentence: str) -> None:
  print(f'note: {sentence}', file=sys.stderr)
