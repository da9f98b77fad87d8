"""The host process, set up before JAX starts: transparent huge pages for XLA:CPU's buffers.

XLA:CPU allocates the temporary buffer of every call of a compiled step with malloc: 1.3 GB for
densenet169's train step at batch 8, and buffers of 58 MB during it (strace). glibc maps
allocations that large from the kernel each time and unmaps them when they are freed, so every
step faults in and zeroes at least 325,000 fresh 4 KiB pages. On the project's 2-core VM that
was 16% of the train step's CPU time, in the kernel (perf; BENCHMARKS.md "Page faults"); with
the tunable below, 7%, and the step takes 0.95 of the time.

glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) asks for transparent huge pages on
those mappings: 2 MiB pages, 512 times fewer faults. It matters where the kernel lends huge pages
only on request (`/sys/kernel/mm/transparent_hugepage/enabled` = madvise, the Debian and Ubuntu
default); `always` gives them anyway and `never` not at all. glibc reads tunables once, when a
process starts, so `python -m mura_jax.main` and `mura-predict` start themselves again with it
(os.execve: same process id, same arguments), before anything heavy is imported.
MURA_JAX_HUGE_PAGES=0 turns that off; a GLIBC_TUNABLES that already names the tunable is the
user's choice and is kept as it is.
"""

from __future__ import annotations

import os
import platform
import re
import sys

HUGE_PAGE_TUNABLE = 'glibc.malloc.hugetlb=1'
_DETECT = object()


def transparent_huge_page_mode() -> str | None:
  """This kernel's transparent huge page mode ('always', 'madvise', 'never'); None if unknown."""
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled', encoding='ascii') as f:
      return bracketed_word(f.read())
  except OSError:
    return None


def bracketed_word(text: str) -> str | None:
  """'madvise' from 'always [madvise] never', the kernel's way of marking the mode in use."""
  found = re.search(r'\[(\w+)\]', text)
  return found[1] if found else None


def glibc_version() -> tuple[int, ...] | None:
  """(2, 36) on glibc 2.36; None on another C library or system."""
  if sys.platform != 'linux':
    return None
  name, version = platform.libc_ver()
  if name != 'glibc' or not re.fullmatch(r'\d+(\.\d+)*', version or ''):
    return None
  return tuple(int(v) for v in version.split('.'))


def environment_with_huge_pages(env=None, thp_mode=_DETECT,
                                 glibc=_DETECT) -> dict[str, str] | None:
  """The environment to start this process again in, HUGE_PAGE_TUNABLE added to GLIBC_TUNABLES;
  None where that would change nothing or the user said otherwise (see the module's doc).
  thp_mode and glibc are this machine's unless given (tests)."""
  env = dict(os.environ if env is None else env)
  thp_mode = transparent_huge_page_mode() if thp_mode is _DETECT else thp_mode
  glibc = glibc_version() if glibc is _DETECT else glibc
  tunables = env.get('GLIBC_TUNABLES', '')
  if (env.get('MURA_JAX_HUGE_PAGES', '1') == '0' or 'glibc.malloc.hugetlb' in tunables
      or thp_mode != 'madvise' or glibc is None or glibc < (2, 35)):
    return None
  env['GLIBC_TUNABLES'] = f'{tunables}:{HUGE_PAGE_TUNABLE}' if tunables else HUGE_PAGE_TUNABLE
  return env


def restart_with_huge_pages() -> None:
  """Replaces this process by itself with HUGE_PAGE_TUNABLE set, once; returns where it does not.

  Call it first in a command's entry point: nothing that ran before is kept.
  """
  env = environment_with_huge_pages()
  if env is None or not sys.executable:  # (an embedded Python has no executable to start)
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    # sys.executable, not the original argv[0]: a bare `python` could resolve to another Python.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError as e:  # nothing was replaced: this process goes on, on 4 KiB pages
    print(f'note: could not start again with GLIBC_TUNABLES={env["GLIBC_TUNABLES"]} ({e}); '
          'running without huge pages', file=sys.stderr)


def huge_pages_on() -> bool:
  """Whether this process runs with the tunable (for the run's log)."""
  return HUGE_PAGE_TUNABLE in os.environ.get('GLIBC_TUNABLES', '').split(':')
