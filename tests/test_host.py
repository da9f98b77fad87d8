"""mura_jax.host: the entry points start themselves again with transparent huge pages for
malloc's large mappings (XLA:CPU's per-step buffers), once, where that changes something."""

import json
import os
import subprocess
import sys

import pytest
from mura_jax import host

MADVISE = 'madvise'
GLIBC = (2, 36)


def test_tunable_added_where_the_kernel_lends_huge_pages_on_request():
  env = host.environment_with_huge_pages({'PATH': '/bin'}, MADVISE, GLIBC)
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  # The user's other tunables are kept, in their order.
  env = host.environment_with_huge_pages({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'},
                                         MADVISE, GLIBC)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'


@pytest.mark.parametrize('env, thp_mode, glibc', [
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, MADVISE, GLIBC),  # the user's choice
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, MADVISE, GLIBC),  # already restarted
    ({'MURA_JAX_HUGE_PAGES': '0'}, MADVISE, GLIBC),  # turned off
    ({}, 'always', GLIBC),  # huge pages anyway
    ({}, 'never', GLIBC),  # none to have
    ({}, None, GLIBC),  # no such kernel setting (not Linux, or no THP)
    ({}, MADVISE, (2, 34)),  # a glibc without the tunable
    ({}, MADVISE, None),  # another C library
])
def test_no_restart_where_it_would_change_nothing(env, thp_mode, glibc):
  assert host.environment_with_huge_pages(env, thp_mode, glibc) is None


def test_kernel_mode_is_the_bracketed_word():
  assert host.bracketed_word('always [madvise] never\n') == 'madvise'
  assert host.bracketed_word('[always] madvise never') == 'always'
  assert host.bracketed_word('') is None
  assert host.transparent_huge_page_mode() in ('always', 'madvise', 'never', None)


# Prints its process id and arguments before the restart and after; then allocates 64 MiB as
# XLA:CPU does (malloc, mapped by glibc; not numpy, which asks for huge pages itself), touches it,
# and reports the huge pages the kernel gave.
CHILD = """
import json, os, sys
print('start', os.getpid(), sys.argv[1:], flush=True)
from mura_jax import host
host.restart_with_huge_pages()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
buffer = libc.malloc(64 << 20)
ctypes.memset(buffer, 1, 64 << 20)
with open('/proc/self/smaps_rollup') as f:
  huge = [int(l.split()[1]) for l in f if l.startswith('AnonHugePages:')][0]
print('running', json.dumps([os.getpid(), sys.argv[1:], os.environ.get('GLIBC_TUNABLES'), huge]))
"""


@pytest.mark.skipif(host.environment_with_huge_pages() is None,
                    reason='this machine or environment gets nothing from the restart')
def test_restart_once_same_process_same_arguments_huge_pages_given():
  out = subprocess.run([sys.executable, '-c', CHILD, 'an', 'argument'], capture_output=True,
                       text=True, timeout=120, check=True).stdout.split('\n')
  starts = [line for line in out if line.startswith('start')]
  running = [json.loads(line[len('running '):]) for line in out if line.startswith('running')]
  assert len(starts) == 2 and starts[0] == starts[1]  # restarted once, as the same process
  assert len(running) == 1
  pid, arguments, tunables, huge_kib = running[0]
  assert starts[0] == f"start {pid} ['an', 'argument']"
  assert arguments == ['an', 'argument'] and tunables == 'glibc.malloc.hugetlb=1'
  assert huge_kib >= 2048  # at least one 2 MiB page under the 64 MiB array

  # Turned off: started once, no tunable, no huge page under the same array.
  off = subprocess.run([sys.executable, '-c', CHILD], capture_output=True, text=True,
                       timeout=120, check=True, env={**os.environ, 'MURA_JAX_HUGE_PAGES': '0'})
  lines = off.stdout.split('\n')
  assert sum(line.startswith('start') for line in lines) == 1
  running = [json.loads(line[len('running '):]) for line in lines if line.startswith('running')]
  assert [r[2:] for r in running] == [[None, 0]]


def test_a_failed_restart_goes_on_without_and_says_so(monkeypatch, capsys):
  monkeypatch.setattr(host, 'environment_with_huge_pages',
                      lambda: {'GLIBC_TUNABLES': host.HUGE_PAGE_TUNABLE})
  def execve(*args):
    raise PermissionError(13, 'Permission denied', args[0])
  monkeypatch.setattr(host.os, 'execve', execve)
  host.restart_with_huge_pages()  # returns: the process is the same one
  err = capsys.readouterr().err
  assert 'could not start again with GLIBC_TUNABLES=glibc.malloc.hugetlb=1' in err
  assert 'Permission denied' in err and 'running without huge pages' in err
