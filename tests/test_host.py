"""mura_jax.runtime.host: the entry points start themselves again, once, with a malloc that keeps XLA:CPU's
per-step buffers (mimalloc preloaded; else glibc's huge-page tunable), where that changes
something."""

import json
import os
import subprocess
import sys

import pytest
from mura_jax.runtime import host

MADVISE = 'madvise'
GLIBC = (2, 36)
LIBRARY = '/site-packages/cmeel.prefix/lib/libmimalloc.so'


def test_mimalloc_preloaded_with_its_options_where_installed():
  env = host.allocator_environment({'PATH': '/bin'}, LIBRARY, False, MADVISE, GLIBC)
  assert env == {'PATH': '/bin', 'LD_PRELOAD': LIBRARY, 'MIMALLOC_PURGE_DELAY': '-1',
                 'MIMALLOC_ALLOW_LARGE_OS_PAGES': '1'}
  # The user's preloads and mimalloc options are kept.
  env = host.allocator_environment({'LD_PRELOAD': '/x/libfoo.so', 'MIMALLOC_PURGE_DELAY': '100'},
                                   LIBRARY, False, MADVISE, GLIBC)
  assert env['LD_PRELOAD'] == f'{LIBRARY}:/x/libfoo.so' and env['MIMALLOC_PURGE_DELAY'] == '100'


def test_glibc_tunable_where_mimalloc_is_missing_not_chosen_or_not_measured():
  for env, library, accelerator in (({'PATH': '/bin'}, None, False),
                                    ({'MURA_JAX_MALLOC': 'glibc'}, LIBRARY, False),
                                    ({'PATH': '/bin'}, LIBRARY, True)):  # a TPU or GPU host
    assert host.allocator_environment(env, library, accelerator, MADVISE, GLIBC) == {
        **env, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  # The user's other tunables are kept, in their order.
  env = host.allocator_environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, None, False,
                                   MADVISE, GLIBC)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'


@pytest.mark.parametrize('env, library, thp_mode, glibc', [
    ({'LD_PRELOAD': LIBRARY}, LIBRARY, MADVISE, GLIBC),  # already restarted (or the user's)
    ({'LD_PRELOAD': '/usr/lib/libtcmalloc.so.4'}, LIBRARY, MADVISE, GLIBC),  # the user's malloc
    ({'MURA_JAX_MALLOC': 'system'}, LIBRARY, MADVISE, GLIBC),  # turned off
    ({'MURA_JAX_MALLOC': 'tcmalloc'}, LIBRARY, MADVISE, GLIBC),  # unknown: a note, no restart
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, None, MADVISE, GLIBC),  # the user's choice
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, None, MADVISE, GLIBC),  # already restarted
    ({}, None, 'always', GLIBC),  # huge pages anyway
    ({}, None, 'never', GLIBC),  # none to have
    ({}, None, None, GLIBC),  # no such kernel setting (not Linux, or no THP)
    ({}, None, MADVISE, (2, 34)),  # a glibc without the tunable
    ({}, None, MADVISE, None),  # another C library
])
def test_no_restart_where_it_would_change_nothing(env, library, thp_mode, glibc):
  assert host.allocator_environment(env, library, False, thp_mode, glibc) is None


def test_accelerators_known_from_jax_platforms_or_the_installed_plugins(monkeypatch):
  assert not host.accelerator_plugin_installed({'JAX_PLATFORMS': 'cpu'})
  assert host.accelerator_plugin_installed({'JAX_PLATFORMS': 'cuda,cpu'})
  assert host.accelerator_plugin_installed({'JAX_PLATFORMS': 'tpu'})
  monkeypatch.setattr(host.importlib.metadata, 'entry_points', lambda group: [])
  for installed in ('libtpu', 'jax_plugins', None):  # jax_plugins: jax_cuda12_plugin's package
    monkeypatch.setattr(host.importlib.util, 'find_spec',
                        lambda name, found=installed: object() if name == found else None)
    assert host.accelerator_plugin_installed({}) == (installed is not None)
  assert not host.accelerator_plugin_installed({'JAX_PLATFORMS': 'cpu'})


def test_unknown_choice_is_named():
  text = subprocess.run(
      [sys.executable, '-c', 'from mura_jax.runtime import host; host.allocator_environment()'],
      capture_output=True, text=True, env={**os.environ, 'MURA_JAX_MALLOC': 'tcmalloc'},
      check=True).stderr
  assert "MURA_JAX_MALLOC='tcmalloc' is not one of mimalloc, glibc, system" in text


def test_kernel_mode_is_the_bracketed_word():
  assert host.bracketed_word('always [madvise] never\n') == 'madvise'
  assert host.bracketed_word('[always] madvise never') == 'always'
  assert host.bracketed_word('') is None
  assert host.transparent_huge_page_mode() in ('always', 'madvise', 'never', None)


# Prints its process id and arguments before the restart and after; then allocates 64 MiB as
# XLA:CPU does (malloc; not numpy, which asks for huge pages itself), touches it, frees it, and
# allocates and touches it again, as the next step does: the page faults of that second time
# say whether the memory was kept.
CHILD = """
import ctypes, json, os, resource, sys
print('start', os.getpid(), sys.argv[1:], flush=True)
from mura_jax.runtime import host
host.restart_with_allocator()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
  before = faults()
  buffer = libc.malloc(64 << 20)
  ctypes.memset(buffer, 1, 64 << 20)
  return buffer, faults() - before
buffer, _ = step()
libc.free(buffer)
_, again = step()
print('running', json.dumps([os.getpid(), sys.argv[1:], host.allocator_in_use(), again]))
"""


def _child(*args, **env):
  out = subprocess.run([sys.executable, '-c', CHILD, *args], capture_output=True, text=True,
                       timeout=120, check=True, env={**os.environ, **env}).stdout.split('\n')
  starts = [line for line in out if line.startswith('start')]
  (running,) = [json.loads(line[len('running '):]) for line in out if line.startswith('running')]
  return starts, running


@pytest.mark.skipif(host.mimalloc_library() is None, reason='cmeel-mimalloc is not installed')
def test_restart_once_as_the_same_process_and_the_buffer_is_kept():
  starts, (pid, arguments, allocator, faults_again) = _child('an', 'argument')
  assert len(starts) == 2 and starts[0] == starts[1]  # restarted once, as the same process
  assert starts[0] == f"start {pid} ['an', 'argument']" and arguments == ['an', 'argument']
  assert allocator.startswith('mimalloc 3.')
  assert faults_again < 64  # the freed 64 MiB served the second allocation (16,384 4 KiB pages)
  starts, (_, _, allocator, faults_again) = _child(MURA_JAX_MALLOC='system')
  assert len(starts) == 1 and allocator is None
  assert faults_again >= 32


# Runs on hosts with THP in madvise mode and glibc >= 2.35 (Ubuntu 22.04+ defaults); skipped,
# with the reason, elsewhere (THP always/never, older glibc, a user's own hugetlb tunable).
@pytest.mark.skipif(host.environment_with_huge_pages() is None, reason=(
    f'no glibc huge-page restart here: THP mode {host.transparent_huge_page_mode()!r}, glibc '
    f'{host.glibc_version()} (needs madvise and >= 2.35, no glibc.malloc.hugetlb set)'))
def test_glibc_restarts_with_huge_pages():
  # glibc: mapped afresh, faulted in again, on 2 MiB pages.
  starts, (_, _, allocator, faults_again) = _child(MURA_JAX_MALLOC='glibc')
  assert len(starts) == 2 and allocator == 'glibc with transparent huge pages'
  # 64 MiB is 32 faults on 2 MiB pages, 16,384 on 4 KiB ones (what the tunable left out gives).
  # Measured 544 on a THP-madvise host (the unaligned ends on 4 KiB pages); under half of the
  # 4 KiB count means most of it came on huge pages, leaving room for a fragmented host.
  assert 32 <= faults_again < 16384 // 2, faults_again


def test_a_failed_restart_goes_on_without_and_says_so(monkeypatch, capsys):
  monkeypatch.setattr(host, 'allocator_environment', lambda: {'LD_PRELOAD': LIBRARY})
  def execve(*args):
    raise PermissionError(13, 'Permission denied', args[0])
  monkeypatch.setattr(host.os, 'execve', execve)
  host.restart_with_allocator()  # returns: the process is the same one
  err = capsys.readouterr().err
  assert 'could not start again with a faster malloc' in err
  assert 'Permission denied' in err and "running with the system's" in err
