"""What every entry point sets up in its process before the work: XLA:CPU's convolutions, the
malloc in use (host.py restarted the process with it), JAX's persistent compilation cache; the
distributed start is `parallel.initialize_distributed` (workdir.held calls it around the lock)."""

import os

import jax
from absl import logging

from mura_jax.runtime import host
from mura_jax.runtime import parallel


def before_jax() -> None:
  """First of all: XLA reads XLA_FLAGS once, when JAX starts its backends, and the checks before
  any work, the distributed start and the lock may start them (they once did, and main.py's runs
  lost XLA:CPU's own convolutions: tests/test_main.py checks the log line now)."""
  parallel.use_xla_cpu_convolutions()


def start(config) -> None:
  """The process-wide set-up every mode shares: logs, malloc, the compilation cache."""
  if parallel.CPU_CONVOLUTION_FLAG in os.environ.get('XLA_FLAGS', ''):
    logging.info('XLA:CPU runs convolutions on its own kernels (%s).',
                 parallel.CPU_CONVOLUTION_FLAG)
  allocator = host.allocator_in_use()
  if allocator:
    logging.info('malloc: %s, for XLA:CPU\'s step buffers (host.py; MURA_JAX_MALLOC=system '
                 'turns it off).', allocator)
  cache = parallel.enable_compilation_cache(config.get('compilation_cache_dir', ''))
  logging.info('Compilation cache: %s', cache or 'off')
  if jax.process_count() > 1 and not config.get('compilation_cache_dir', ''):
    logging.warning('The compilation cache is in each host\'s home: pass '
                    '--config.compilation_cache_dir a gs:// or shared folder (the launchers do) '
                    'so that every host, and a re-created one, finds what process 0 compiled.')
  if cache and jax.process_count() > 1:
    # step_cache.default_directory: each host would have to find the same traced file.
    logging.info('Traced-step cache: off on %d processes (the steps are traced at every start); '
                 'the compilation cache is shared: JAX\'s process 0 writes it, all read it, so it '
                 'must be on storage every host reads (gs:// or a shared file system; the '
                 'launchers pass one).', jax.process_count())
  logging.info('Config:\n%s', config)
