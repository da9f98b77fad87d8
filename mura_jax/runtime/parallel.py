"""Devices, mesh and shardings, stated once: the batch is split over every device on axis `data`.

One code path from one CPU to a pod: `jax.jit` with `NamedSharding`s over a `Mesh` of all devices
(of all hosts). Parameters are replicated; batch statistics and the loss are reduced over the
global batch by XLA, so N devices compute what one device would (up to the order of float32
sums: collectives and the CPU thread count; tests/test_multihost.py).
"""

from __future__ import annotations

import os
import re
import socket
import uuid

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from mura_jax.errors import ConfigError
import jaxlib
from jax._src import xla_bridge
import flax, optax

DATA_AXIS = 'data'


DISTRIBUTED_MODES = ('auto', 'on', 'off')


def expected_processes(env=None) -> int | None:
  """How many processes the launcher started, where it says: MURA_JAX_NUM_PROCESSES (set by
  launch/), JAX_NUM_PROCESSES, Slurm's SLURM_NTASKS, GKE's TPU_WORKER_HOSTNAMES."""
  env = os.environ if env is None else env
  for key in ('MURA_JAX_NUM_PROCESSES', 'JAX_NUM_PROCESSES', 'SLURM_NTASKS'):
    if env.get(key, '').strip().isdigit():
      return int(env[key])
  if env.get('TPU_WORKER_HOSTNAMES'):
    return len(env['TPU_WORKER_HOSTNAMES'].split(','))
  return None


def _slurm_tasks_per_node(env) -> int | None:
  """Tasks per node of this Slurm job, where every node runs as many: SLURM_NTASKS_PER_NODE
  (sbatch/srun --ntasks-per-node), else SLURM_STEP_TASKS_PER_NODE or SLURM_TASKS_PER_NODE
  ('8(x4)': 8 on each of 4 nodes; '2,1' differs by node: None)."""
  for key in ('SLURM_NTASKS_PER_NODE', 'SLURM_STEP_TASKS_PER_NODE', 'SLURM_TASKS_PER_NODE'):
    value = env.get(key, '').strip()
    uniform = re.fullmatch(r'(\d+)(\(x\d+\))?', value)
    if uniform and int(uniform[1]) > 0:
      return int(uniform[1])
  return None


def expected_local_devices(env=None) -> tuple[int, str] | None:
  """How many devices each process should drive, and who says so: MURA_JAX_LOCAL_DEVICES (set by
  launch/), else Slurm's GPUs per node over its tasks per node (SLURM_GPUS_ON_NODE, from
  --gpus-per-node; not for a process told to run on the CPU, JAX_PLATFORMS=cpu: a debugging
  run inside a GPU allocation); None where nothing says."""
  env = os.environ if env is None else env
  count = env.get('MURA_JAX_LOCAL_DEVICES', '').strip()
  if count.isdigit():
    return int(count), 'MURA_JAX_LOCAL_DEVICES'
  if env.get('JAX_PLATFORMS', '').split(',')[0].strip().lower() == 'cpu':
    return None
  gpus, tasks = env.get('SLURM_GPUS_ON_NODE', '').strip(), _slurm_tasks_per_node(env)
  if not gpus.isdigit() or tasks is None:
    return None
  source = f'SLURM_GPUS_ON_NODE={gpus} over {tasks} Slurm task(s) per node'
  if int(gpus) % tasks:
    raise ConfigError(f'{source}: the GPUs of a node cannot be shared evenly by its processes. '
                      'Start one process per GPU (srun --ntasks-per-node = GPUs per node) or '
                      'one per node.')
  return int(gpus) // tasks, source


def slurm_local_device_ids(env=None) -> list[int] | None:
  """The GPUs of this Slurm task: the `expected_local_devices` block at its SLURM_LOCALID. Left
  alone, JAX's Slurm start gives every task [SLURM_LOCALID], one GPU however many it should
  drive (jax/_src/clusters/cluster.py). None outside Slurm, with the explicit variables (they
  bypass the cluster detection), or where nothing says how many (JAX's default stays)."""
  env = os.environ if env is None else env
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
  expected = expected_local_devices(env)
  if (not all(key in env for key in slurm) or env.get('JAX_COORDINATOR_ADDRESS')
      or expected is None):
    return None
  count, local = expected[0], int(env['SLURM_LOCALID'])
  visible = [d for d in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  if len(visible) == count:  # Slurm bound this task's GPUs already (--gpus-per-task, --gpu-bind)
    return list(range(count))
  return list(range(local * count, (local + 1) * count))


def check_devices(env=None) -> None:
  """Stops with a sentence when this process's devices are not what the launcher gave it: the
  platform (MURA_JAX_PLATFORM: gpu, tpu or cpu; JAX falls back to the CPU without a word when
  CUDA or libtpu cannot open its devices) and the number of local devices
  (`expected_local_devices`: MURA_JAX_LOCAL_DEVICES, or Slurm's GPUs per task). Set by launch/;
  nothing to check without them."""
  env = os.environ if env is None else env
  platform, expected = env.get('MURA_JAX_PLATFORM', ''), expected_local_devices(env)
  host = socket.gethostname()
  try:
    devices = jax.local_devices()
  except RuntimeError as e:  # JAX_PLATFORMS names a platform that cannot start
    raise ConfigError(f'{host}: JAX could not start its devices ({e}); check the CUDA or libtpu '
                      'install on this host (JAX_PLATFORMS, MURA_JAX_PLATFORM).') from e
  if platform and devices[0].platform != platform:
    raise ConfigError(
        f'{host}: JAX runs on {devices[0].platform}, but the launcher expects {platform} '
        '(MURA_JAX_PLATFORM): its CUDA or libtpu could not open the devices and JAX fell back. '
        'Check the accelerator install on this host (jax[cuda12] or jax[tpu]) and that no other '
        'process holds the devices.')
  if expected is not None and len(devices) != expected[0]:
    raise ConfigError(
        f'{host}: this process drives {len(devices)} local device(s), but the launcher gave it '
        f'{expected[0]} ({expected[1]}): the global batch and the learning rate would not be '
        'the documented ones. Start one process per GPU (srun --ntasks-per-node = GPUs per '
        'node) or set MURA_JAX_LOCAL_DEVICES to what each process should drive.')


def starts_distributed(mode: str, env=None) -> bool:
  """Whether `initialize_distributed(mode)` starts jax.distributed (the workdir's lock is taken
  before JAX starts on one process, by process 0 after the start on several)."""
  env = os.environ if env is None else env
  expected = expected_processes(env)
  return mode == 'on' or (mode == 'auto' and (bool(env.get('JAX_COORDINATOR_ADDRESS'))
                                               or (expected or 1) > 1))


def initialize_distributed(mode: str = 'auto', env=None) -> dict:
  """Starts jax.distributed as `mode` (config.distributed) says; returns what was decided.

  'on': always (launch/tpu_vm.sh and launch/gpu_multinode.sbatch set it): with
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID explicitly (local multi-process),
  else JAX's own cluster detection (TPU VMs, Slurm, GKE, Open MPI). 'off': never. 'auto': when the
  explicit variables are set or the launcher says there are several processes (Slurm, GKE).
  Where the launcher says how many processes there are, a different count after the start is an
  error: each host alone would silently train its own model.
  """
  env = os.environ if env is None else env
  if mode not in DISTRIBUTED_MODES:
    raise ConfigError(f'config.distributed={mode!r}; expected one of {DISTRIBUTED_MODES}')
  expected = expected_processes(env)
  explicit = bool(env.get('JAX_COORDINATOR_ADDRESS'))
  start = starts_distributed(mode, env)
  local_device_ids = None
  if start:
    if env.get('JAX_CPU_COLLECTIVES', '') == 'gloo':
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    if explicit:
      jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                                 num_processes=int(env['JAX_NUM_PROCESSES']),
                                 process_id=int(env['JAX_PROCESS_ID']))
    else:  # JAX's cluster detection, with this task's block of GPUs on Slurm
      local_device_ids = slurm_local_device_ids(env)
      jax.distributed.initialize(local_device_ids=local_device_ids)
  check_devices(env)
  decided = {'mode': mode, 'started': start, 'expected_processes': expected,
             'process_count': jax.process_count(), 'global_devices': jax.device_count(),
             'local_devices': jax.local_device_count(),
             'local_device_ids': local_device_ids}
  logging.info('Distributed: mode %s, jax.distributed %s; process %d of %d (launcher says %s); '
               '%d local / %d global devices%s.', mode, 'started' if start else 'not started',
               jax.process_index(), jax.process_count(), expected or 'nothing',
               jax.local_device_count(), jax.device_count(),
               f' (Slurm task\'s GPUs {local_device_ids})' if local_device_ids else '')
  if expected is not None and expected != jax.process_count():
    raise RuntimeError(
        f'The launcher started {expected} processes but this one sees {jax.process_count()} '
        f'process(es) and only {jax.device_count()} device(s): each host would train alone. '
        + ('Set --config.distributed=on (or auto with the launcher\'s variables).'
           if not start else 'Check that every host runs the same command and can reach the '
           'coordinator.'))
  return decided


def enable_compilation_cache(directory: str, warn=logging.warning,
                             flag: str = '--config.compilation_cache_dir') -> str | None:
  """JAX's persistent compilation cache in `directory` ('' = ~/.cache/mura_jax/jax, 'none' =
  off): a restart after preemption, an evaluation or a resume loads the compiled steps instead of
  compiling them again. A folder that cannot be made or written (a read-only home, a file in the
  way) leaves the cache off, with one `warn` saying why, instead of a warning at every compile."""
  if directory.lower() == 'none':
    return None
  directory = directory or os.path.join(os.path.expanduser('~'), '.cache', 'mura_jax', 'jax')
  problem = cache_problem(directory)
  if problem:
    warn(f'no compilation cache: {problem}; running without it (every start compiles again). '
         f'Pass {flag} a folder you can write to, or none.')
    return None
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory


def cache_problem(directory: str) -> str | None:
  """Why `directory` cannot hold a cache (made if missing, a file written and removed), or None."""
  folder = epath.Path(directory)
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f'.write-test-{uuid.uuid4().hex}'  # unique across processes and hosts
    probe.write_text('')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  (OSError locally, others from gs://)
    return f'{directory} cannot be written ({type(e).__name__}: {e})'
  return None


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  devices = mesh.devices.size
  if global_batch % devices or global_batch % jax.process_count():
    raise ConfigError(
        f'The global batch size {global_batch} must be divisible by the {devices} devices and '
        f'{jax.process_count()} processes; set --config.train.global_batch_size to a multiple of '
        f'{devices}.')


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's part of a batch -> one global array per key, sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


# XLA:CPU's convolutions. jaxlib 0.10 to 0.12 send convolutions, matmuls and reductions to
# YNNPACK; its own (Eigen) convolutions run densenet169's train step and forward pass faster on
# the project's CPU (BENCHMARKS.md, "XLA:CPU's convolutions" and "Newer jaxlibs"; Python >= 3.12
# installs the newer jaxlibs).
# The flag is experimental and XLA stops at one it does not know, so it is set only for the
# jaxlibs it was measured on; XLA_FLAGS that name it are the user's choice.
CPU_CONVOLUTION_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
CPU_CONVOLUTION_JAXLIBS = ('0.10.', '0.11.', '0.12.')


def use_xla_cpu_convolutions(env=None) -> bool:
  """Adds CPU_CONVOLUTION_FLAG to XLA_FLAGS, which XLA reads when JAX starts its backends: call
  it before anything asks for a device. True when it did (accelerators ignore the flag)."""
  env = os.environ if env is None else env
  flags = env.get('XLA_FLAGS', '')
  if ('xla_cpu_experimental_ynn_fusion_type' in flags
      or not jaxlib.version.__version__.startswith(CPU_CONVOLUTION_JAXLIBS)
      or xla_bridge.backends_are_initialized()):
    return False
  env['XLA_FLAGS'] = f'{flags} {CPU_CONVOLUTION_FLAG}'.strip()
  return True


def log_topology(mesh: Mesh) -> None:
  logging.info('JAX %s, Flax %s, Optax %s; process %d of %d; %d local / %d global devices (%s); '
               'mesh %s', jax.__version__, flax.__version__, optax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform, dict(mesh.shape))
