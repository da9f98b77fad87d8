"""tfds_mura.folder_lock: one job at a time in a workdir or data_dir, a dead holder taken over."""

import json
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tfds_mura import folder_lock

# A process that takes the lock as a real job does, says so, and runs until it is killed. It
# loads folder_lock by its file: importing the tfds_mura package would load TFDS (seconds).
_HOLDER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location('folder_lock', sys.argv[1])
    folder_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(folder_lock)
    folder_lock.acquire(sys.argv[2], 'training run')
    print('held', flush=True)
    time.sleep(120)
""")


def _sleeper():
  return subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])


def _write_lock(folder, **record):
  lock = folder / folder_lock.LOCK_NAME
  lock.write_text(json.dumps(record))
  return lock


def test_a_live_holder_is_refused_by_name_and_taken_over_once_killed(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', _HOLDER, folder_lock.__file__, str(tmp_path)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    record = json.loads((tmp_path / folder_lock.LOCK_NAME).read_text())
    with pytest.raises(folder_lock.FolderLockedError) as e:
      folder_lock.acquire(tmp_path, 'training run')
    message = str(e.value)
    assert message.startswith(
        f'{tmp_path} is in use by another training run: pid {holder.pid} on host '
        f'{socket.gethostname()}, started {record["started_text"]} (')
    assert 'delete' not in message  # same host: whether it runs is known
  finally:
    holder.kill()
    holder.wait()
  notes = []
  lock = folder_lock.acquire(tmp_path, 'training run', note=notes.append)
  assert notes == [f'{tmp_path} was locked by a training run that is gone '
                   f'({folder_lock.describe(record)}); taking it over.']
  assert json.loads(lock.read_text())['pid'] != holder.pid
  folder_lock.release(lock)
  assert not lock.exists()


def test_a_pid_reused_by_a_later_process_holds_nothing(tmp_path):
  later = _sleeper()
  try:
    time.sleep(0.2)
    # The lock was written an hour before the process with its pid started.
    _write_lock(tmp_path, pid=later.pid, host=socket.gethostname(), started=time.time() - 3600,
                started_text='an hour ago')
    notes = []
    with folder_lock.held(tmp_path, 'dataset build', note=notes.append) as lock:
      assert json.loads(lock.read_text())['pid'] != later.pid
    assert len(notes) == 1 and f'pid {later.pid} on host' in notes[0]
    assert not lock.exists()
  finally:
    later.kill()
    later.wait()


def test_another_hosts_lock_is_refused_naming_the_file_to_delete(tmp_path):
  lock = _write_lock(tmp_path, pid=1, host='another-host', started=time.time(),
                     started_text='2026-01-01 08:00:00 UTC', command='python -m tfds_mura.build')
  with pytest.raises(ValueError) as e:  # the caller's class
    folder_lock.acquire(tmp_path, 'dataset build', error=ValueError)
  message = str(e.value)
  assert ('pid 1 on host another-host, started 2026-01-01 08:00:00 UTC (python -m tfds_mura.build)'
          in message)
  assert f'delete {lock} and start again' in message
  assert json.loads(lock.read_text())['host'] == 'another-host'  # left as it was


def test_an_unreadable_lock_is_taken_over_with_a_note(tmp_path):
  (tmp_path / folder_lock.LOCK_NAME).write_text('{"pid": 12')  # cut short while written
  notes = []
  lock = folder_lock.acquire(tmp_path, 'dataset build', note=notes.append)
  assert notes == [f'{tmp_path} was locked by a dataset build that is gone (an unreadable lock); '
                   'taking it over.']
  assert json.loads(lock.read_text())['host'] == socket.gethostname()
  folder_lock.release(lock)


def test_nested_held_keeps_the_lock_until_the_outer_block_ends(tmp_path):
  lock = tmp_path / folder_lock.LOCK_NAME
  with folder_lock.held(tmp_path, 'training run'):
    with folder_lock.held(tmp_path, 'training run'):  # evaluate, run inside train
      assert lock.exists()
    assert lock.exists()
  assert not lock.exists()


def test_the_lock_is_gone_after_a_block_that_raised(tmp_path):
  with pytest.raises(KeyError):
    with folder_lock.held(tmp_path / 'new', 'dataset build'):
      assert (tmp_path / 'new' / folder_lock.LOCK_NAME).exists()  # the folder was made
      raise KeyError('the job failed')
  assert not (tmp_path / 'new' / folder_lock.LOCK_NAME).exists()


def test_the_lock_appears_whole_and_leaves_no_staged_file(tmp_path, monkeypatch):
  """The record is staged in a file of its own and linked into place: the lock never exists
  without its holder in it, and the staged file is gone whether the link succeeds or not."""
  seen = []
  real_link = folder_lock.os.link

  def link(source, target):
    if not seen:  # the first job: nothing half-written there before the link
      assert not (tmp_path / folder_lock.LOCK_NAME).exists()
    seen.append(json.loads(open(source, encoding='utf-8').read()))
    real_link(source, target)

  monkeypatch.setattr(folder_lock.os, 'link', link)
  with folder_lock.held(tmp_path, 'test job') as lock:
    assert seen[0]['pid'] == folder_lock.os.getpid()
    assert json.loads(lock.read_text()) == seen[0]
    assert [p.name for p in tmp_path.iterdir()] == [folder_lock.LOCK_NAME]
    record = dict(seen[0], pid=seen[0]['pid'] + 1)  # another job's attempt fails on the link
    assert not folder_lock._create(lock, record)
    assert [p.name for p in tmp_path.iterdir()] == [folder_lock.LOCK_NAME]
  assert list(tmp_path.iterdir()) == []
