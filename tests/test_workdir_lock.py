"""One workdir, one run: main.run() holds WORKDIR/.mura-lock (tfds_mura/folder_lock.py) for every
mode; a second run is refused naming the holder, a dead holder's lock is taken over with a note,
and the lock is gone when the run ends, whichever way it ends."""

import json
import os
import socket
import subprocess
import sys

import pytest

from mura_jax import main
from mura_jax.errors import ConfigError, WorkdirError
from test_train import tiny_config
from mura_jax import workdir as workdir_lib
from tfds_mura import folder_lock

HOLD = """
import sys, time
from tfds_mura import folder_lock
with folder_lock.held(sys.argv[1], 'mura-jax run'):
  print('held', flush=True)
  time.sleep(120)
"""


@pytest.fixture
def live_holder(tmp_path):
  """(workdir, pid) of another process holding the workdir's lock for as long as the test runs."""
  workdir = tmp_path / 'run'
  holder = subprocess.Popen([sys.executable, '-c', HOLD, str(workdir)], stdout=subprocess.PIPE,
                            text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  try:
    assert holder.stdout.readline().strip() == 'held'
    yield workdir, holder.pid
  finally:
    holder.kill()
    holder.wait()


def _lock(workdir):
  path = workdir / folder_lock.LOCK_NAME
  return json.loads(path.read_text()) if path.exists() else None


def test_a_second_run_is_refused_naming_the_holder(live_holder):
  workdir, pid = live_holder
  before = _lock(workdir)
  with pytest.raises(WorkdirError) as error:
    main.run(tiny_config(workdir.parent), str(workdir))
  message = str(error.value)
  assert message.startswith(f'{workdir} is in use by another mura-jax run: pid {pid} on host '
                            f'{socket.gethostname()}, started ')
  assert 'One folder holds one job at a time' in message
  assert not (workdir / 'metrics.jsonl').exists() and not (workdir / 'checkpoints').exists()
  assert _lock(workdir) == before  # the holder's lock is left alone


@pytest.mark.parametrize('mode', ['train', 'evaluate', 'cam', 'export', 'data'])
def test_every_mode_holds_the_lock_while_it_runs_and_leaves_none(mode, tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '5').mkdir(parents=True)  # evaluate, cam, export need a checkpoint
  seen = []
  monkeypatch.setitem(main.MODES, mode, lambda config, w: seen.append(_lock(workdir)))
  config = tiny_config(tmp_path)
  config.mode = mode
  main.run(config, str(workdir))
  assert seen[0]['pid'] == os.getpid() and seen[0]['host'] == socket.gethostname()
  assert _lock(workdir) is None


def test_the_lock_is_gone_after_a_user_error(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'

  def fails(config, w):
    assert _lock(workdir)['pid'] == os.getpid()
    raise ConfigError('a problem found during the run')
  monkeypatch.setitem(main.MODES, 'train', fails)
  with pytest.raises(ConfigError, match='a problem found during the run'):
    main.run(tiny_config(tmp_path), str(workdir))
  assert _lock(workdir) is None
  # A real one: training without a built dataset.
  monkeypatch.undo()
  with pytest.raises(FileNotFoundError, match='python -m tfds_mura.build'):
    main.run(tiny_config(tmp_path / 'no-dataset'), str(workdir))
  assert _lock(workdir) is None


def test_a_dead_holders_lock_is_taken_over_with_a_note(tmp_path, monkeypatch, capsys):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  gone = subprocess.Popen([sys.executable, '-c', 'pass'])
  gone.wait()  # its pid runs nothing now (killed, out of memory: no chance to unlock)
  (workdir / folder_lock.LOCK_NAME).write_text(json.dumps({
      'pid': gone.pid, 'host': socket.gethostname(), 'started': 1.0,
      'started_text': '2026-01-01 00:00:00 UTC', 'command': 'python -m mura_jax.main'}))
  seen = []
  monkeypatch.setitem(main.MODES, 'train', lambda config, w: seen.append(_lock(workdir)))
  main.run(tiny_config(tmp_path), str(workdir))
  assert (f'note: {workdir} was locked by a mura-jax run that is gone (pid {gone.pid} on host '
          f'{socket.gethostname()}, started 2026-01-01 00:00:00 UTC (python -m mura_jax.main)); '
          'taking it over.') in capsys.readouterr().err
  assert seen[0]['pid'] == os.getpid() and _lock(workdir) is None


def test_bad_values_are_refused_before_the_lock_is_taken(live_holder):
  """The config's own errors come first: they do not depend on who holds the workdir."""
  workdir, _ = live_holder
  config = tiny_config(workdir.parent, **{'train.num_epochs': 0})
  with pytest.raises(ConfigError, match='config.train.num_epochs=0'):
    main.run(config, str(workdir))


@pytest.mark.parametrize('refused_on_0', [False, True])
def test_several_processes_lock_once_on_process_0(tmp_path, monkeypatch, refused_on_0):
  """Process 1 of 2 writes no lock; it stops too when process 0 was refused."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'broadcast_one_to_all', lambda x: int(refused_on_0))
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with contextlib.ExitStack() as stack:
    if refused_on_0:
      with pytest.raises(WorkdirError, match=r'is in use by another run \(process 0 found its '):
        workdir_lib.lock_on_process_0(stack, str(workdir))  # pylint: disable=protected-access
    else:
      workdir_lib.lock_on_process_0(stack, str(workdir))  # pylint: disable=protected-access
    assert _lock(workdir) is None
