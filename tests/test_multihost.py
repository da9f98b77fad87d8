"""Several hosts: 2 processes x 2 CPU devices (jax.distributed over gloo) train what 1 process does."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mura_jax import checkpoints
from mura_jax import parallel
from mura_jax import train

from test_train import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(data_dir, workdir):
  return ['--config', os.path.join(REPO, 'configs', 'demo.py'), '--workdir', str(workdir),
          f'--config.data.data_dir={data_dir}', '--config.data.synthetic=False',
          '--config.data.image_size=32', '--config.model.growth_rate=4',
          '--config.model.block_config=(1, 1)', '--config.model.num_init_features=8',
          '--config.model.bn_size=2', '--config.optimizer.learning_rate=1e-4',
          '--config.train.global_batch_size=16', '--config.train.num_epochs=1',
          '--config.evaluation.global_batch_size=16', '--config.evaluation.bootstrap_resamples=0']


def _params(workdir, data_dir):
  config = tiny_config(data_dir)  # same model as the flags above
  config.model.growth_rate, config.model.block_config = 4, (1, 1)
  config.model.num_init_features, config.model.bn_size = 8, 2
  model = train.create_model(config)
  latest, _ = checkpoints.managers(workdir, config)
  template = jax.eval_shape(lambda: train.initial_state(config, model))
  state, progress = checkpoints.restore_state(latest, template, checkpoints.model_signature(config),
                                              parallel.replicated(parallel.make_mesh()))
  return jax.device_get((state.params, state.batch_stats)), progress


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(mura_data_dir, tmp_path):
  env = {**os.environ, 'PYTHON': sys.executable, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  single = subprocess.run([sys.executable, '-m', 'mura_jax.main',
                           *_flags(mura_data_dir, tmp_path / 'one')],
                          capture_output=True, text=True, env=env, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  multi = subprocess.run([os.path.join(REPO, 'launch', 'local_multiprocess.sh'), '--processes', '2',
                          '--devices', '2', '--',
                          *_flags(mura_data_dir, tmp_path / 'two')],
                         capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
  assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
  assert 'process 0 of 2; 2 local / 4 global devices' in multi.stdout
  (one, one_progress), (two, two_progress) = (_params(tmp_path / d, mura_data_dir)
                                              for d in ('one', 'two'))
  assert one_progress['step'] == two_progress['step'] > 0
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
