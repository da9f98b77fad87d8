"""The host process, set up before JAX starts: a malloc that keeps XLA:CPU's buffers.

XLA:CPU allocates the temporary buffer of every call of a compiled step with malloc: 1.3 GB for
densenet169's train step at batch 8, and buffers of 58 MB during it (strace). glibc's malloc maps
allocations that large from the kernel each time and unmaps them when they are freed (its
threads' heaps, 64 MB at most, come and go with them), so every step faults in and zeroes fresh
pages, a large share of the train step's CPU time spent in the kernel (BENCHMARKS.md, "Page
faults").

mimalloc keeps freed memory for the next allocation. So `python -m mura_jax.main` starts itself
again, once (os.execve: same process id, same arguments), with mimalloc preloaded (LD_PRELOAD; the
library comes with the `cmeel-mimalloc` wheel, a dependency on Linux), told not to hand memory back
to the kernel (MIMALLOC_PURGE_DELAY=-1: each step needs the same peak again) and to put large blocks
on 2 MiB pages (MIMALLOC_ALLOW_LARGE_OS_PAGES=1). The kernel's share of the train step then nearly
vanishes, the step is faster and the peak memory does not grow (BENCHMARKS.md, "A malloc that keeps
the buffers"). `mura-predict` does not: its few forward passes ran faster with the system's malloc
(BENCHMARKS.md, "`mura-predict` on one study").

Where mimalloc is missing, glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) asks for
transparent huge pages on those mappings instead: 512 times fewer faults, 0.95 of the step time.
It matters where the kernel lends huge pages only on request
(`/sys/kernel/mm/transparent_hugepage/enabled` = madvise, the Debian and Ubuntu default).

mimalloc is preloaded where JAX computes on the CPU, where it was measured: not where a TPU or
GPU plugin of JAX is installed (unless JAX_PLATFORMS=cpu), whose steps keep their buffers on the
device. MURA_JAX_MALLOC chooses otherwise: `glibc` (the tunable only) or `system` (no restart).
What the user set is kept as set: an LD_PRELOAD naming a malloc (mimalloc, jemalloc, tcmalloc),
MIMALLOC_* options, a GLIBC_TUNABLES naming the tunable.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import re
import sys

HUGE_PAGE_TUNABLE = 'glibc.malloc.hugetlb=1'
MIMALLOC_OPTIONS = {'MIMALLOC_PURGE_DELAY': '-1', 'MIMALLOC_ALLOW_LARGE_OS_PAGES': '1'}
CHOICES = ('mimalloc', 'glibc', 'system')
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


def mimalloc_library() -> str | None:
  """The path of the cmeel-mimalloc wheel's libmimalloc.so; None where it is not installed (or
  not on Linux, where LD_PRELOAD is how a library replaces malloc)."""
  if sys.platform != 'linux':
    return None
  try:
    files = importlib.metadata.distribution('cmeel-mimalloc').files or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for file in files:
    if file.name == 'libmimalloc.so':  # cmeel.prefix/lib/libmimalloc.so
      path = file.locate()  # in the installed package: a file of this machine
      return os.fspath(path) if path.exists() else None
  return None


def accelerator_plugin_installed(env) -> bool:
  """Whether JAX will find a TPU or GPU here: libtpu, or a plugin (jax_cuda12_plugin, ...),
  unless JAX_PLATFORMS names the CPU alone. Looked up without importing anything."""
  platforms = [p for p in env.get('JAX_PLATFORMS', '').split(',') if p]
  if platforms:
    return platforms != ['cpu']
  return bool(importlib.util.find_spec('libtpu') or importlib.util.find_spec('jax_plugins')
              or importlib.metadata.entry_points(group='jax_plugins'))


def environment_with_huge_pages(env=None, thp_mode=_DETECT,
                                 glibc=_DETECT) -> dict[str, str] | None:
  """The environment to start this process again in, HUGE_PAGE_TUNABLE added to GLIBC_TUNABLES;
  None where that would change nothing or the user set the tunable. thp_mode and glibc are this
  machine's unless given (tests)."""
  env = dict(os.environ if env is None else env)
  thp_mode = transparent_huge_page_mode() if thp_mode is _DETECT else thp_mode
  glibc = glibc_version() if glibc is _DETECT else glibc
  tunables = env.get('GLIBC_TUNABLES', '')
  if ('glibc.malloc.hugetlb' in tunables or thp_mode != 'madvise' or glibc is None
      or glibc < (2, 35)):
    return None
  env['GLIBC_TUNABLES'] = f'{tunables}:{HUGE_PAGE_TUNABLE}' if tunables else HUGE_PAGE_TUNABLE
  return env


def environment_with_mimalloc(env: dict[str, str], library: str) -> dict[str, str]:
  """`env` with `library` first in LD_PRELOAD and MIMALLOC_OPTIONS where the user set none."""
  preload = env.get('LD_PRELOAD', '')
  return {**MIMALLOC_OPTIONS, **env, 'LD_PRELOAD': f'{library}:{preload}' if preload else library}


def allocator_environment(env=None, mimalloc=_DETECT, accelerator=_DETECT, thp_mode=_DETECT,
                          glibc=_DETECT) -> dict[str, str] | None:
  """The environment to start this process again in (see the module's doc); None where that
  would change nothing, is done already, or MURA_JAX_MALLOC says `system`. mimalloc (the
  library's path), accelerator, thp_mode and glibc are this machine's unless given (tests)."""
  env = dict(os.environ if env is None else env)
  choice = env.get('MURA_JAX_MALLOC', 'mimalloc')
  if choice not in CHOICES:
    print(f'note: MURA_JAX_MALLOC={choice!r} is not one of {", ".join(CHOICES)}; running with '
          "the system's malloc", file=sys.stderr)
    return None
  if choice == 'system' or re.search(r'(mi|je|tc)malloc', env.get('LD_PRELOAD', '')):
    return None  # turned off, restarted already, or the user's own malloc
  if choice == 'mimalloc':
    if accelerator is _DETECT:
      accelerator = accelerator_plugin_installed(env)
    library = mimalloc_library() if mimalloc is _DETECT else mimalloc
    if library and not accelerator:
      return environment_with_mimalloc(env, library)
  return environment_with_huge_pages(env, thp_mode, glibc)


def restart_with_allocator() -> None:
  """Replaces this process by itself in `allocator_environment()`, once; returns where it does
  not. Call it first in a command's entry point: nothing that ran before is kept."""
  env = allocator_environment()
  if env is None or not sys.executable:  # (an embedded Python has no executable to start)
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    # sys.executable, not the original argv[0]: a bare `python` could resolve to another Python.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError as e:  # nothing was replaced: this process goes on with the system's malloc
    print(f'note: could not start again with a faster malloc ({e}); running with the '
          "system's", file=sys.stderr)


def allocator_in_use() -> str | None:
  """What this process allocates with, for the run's log: 'mimalloc 3.4.3' where mimalloc is
  loaded, 'glibc with transparent huge pages' under the tunable, None otherwise."""
  try:
    mi_version = ctypes.CDLL(None).mi_version  # mimalloc's symbols, where it was preloaded
    mi_version.restype = ctypes.c_int
    number = mi_version()  # 30403: 3.4.3
    return f'mimalloc {number // 10000}.{number // 100 % 100}.{number % 100}'
  except (AttributeError, OSError, TypeError):  # TypeError: Windows has no CDLL(None)
    pass
  if HUGE_PAGE_TUNABLE in os.environ.get('GLIBC_TUNABLES', '').split(':'):
    return 'glibc with transparent huge pages'
  return None
