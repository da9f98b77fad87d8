"""Devices, mesh and shardings, stated once: the batch is split over every device on axis `data`.

One code path from one CPU to a pod: `jax.jit` with `NamedSharding`s over a `Mesh` of all devices
(of all hosts). Parameters are replicated; batch statistics and the loss are reduced over the
global batch by XLA, so N devices compute what one device would.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def initialize_distributed() -> None:
  """Starts jax.distributed when this process is one of several (launch/ sets the variables).

  `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`: explicit (local multi-process
  and GPU clusters); Slurm with several tasks and multi-host TPU VMs are detected by JAX itself.
  """
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    if os.environ.get('JAX_CPU_COLLECTIVES', '') == 'gloo':
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1 or ',' in os.environ.get('TPU_WORKER_HOSTNAMES', ''):
    jax.distributed.initialize()


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
    raise ValueError(
        f'The global batch size {global_batch} must be divisible by the {devices} devices and '
        f'{jax.process_count()} processes; set --config.train.global_batch_size to a multiple of '
        f'{devices}.')


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's part of a batch -> one global array per key, sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def log_topology(mesh: Mesh) -> None:
  import flax, optax  # noqa: E401  pylint: disable=g-import-not-at-top,multiple-import
  logging.info('JAX %s, Flax %s, Optax %s; process %d of %d; %d local / %d global devices (%s); '
               'mesh %s', jax.__version__, flax.__version__, optax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform, dict(mesh.shape))
