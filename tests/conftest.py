"""Shared fixtures: one small synthetic MURA-v1.1 and its built TFDS dataset per test session."""

import os
import shutil


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process: `devices` CPU devices, and XLA's backend optimisations off:
  the tests compile many tiny networks and run each a few steps, so compiling is most of their
  time, and optimisation level 0 roughly halves it (test_densenet's heaviest tests: 162 s -> 71 s
  on a 2-core machine). Results stay within every test's tolerance."""
  return f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'


# Tests see 4 CPU devices, as a 4-accelerator host would (sharded == unsharded tests need them).
os.environ.setdefault('XLA_FLAGS', xla_flags(4))
os.environ.setdefault('KERAS_BACKEND', 'jax')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

try:
  # torch first: with TensorFlow's libraries loaded before it (tfrecord and TensorBoard tests),
  # torch's CPU kernels crash the process (seen with tensorflow-cpu 2.21 and torch 2.14.1).
  import torch  # noqa: F401,E402  pylint: disable=unused-import
  import torchvision  # noqa: F401,E402  pylint: disable=unused-import  (its triton import too)
except ImportError:
  pass

import pytest  # noqa: E402

from mura_jax.data import synthetic  # noqa: E402
from mura_jax.runtime import parallel  # noqa: E402

parallel.use_xla_cpu_convolutions()  # XLA:CPU's own convolutions, as main.py and mura-predict set

@pytest.fixture(autouse=True, scope='session')
def no_compilation_cache_in_the_test_process():
  """`mura-predict` and main.py turn JAX's persistent compilation cache on for their process
  (~/.cache); tests that call them in-process, session and module fixtures included, keep the
  test process without one (test_step_cache.py relies on it, whatever ran before it in this
  process). test_predict.py runs the command itself to test the cache."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(parallel, 'enable_compilation_cache', lambda directory, **kwargs: None)
    yield


STUDIES_PER_PART = 6
VALID_STUDIES_PER_PART = 4


@pytest.fixture(scope='session')
def synthetic_dir(tmp_path_factory):
  """OUT_DIR of `python -m mura_jax.data.synthetic` (holds MURA-v1.1/ and synthetic_annotations.csv)."""
  out = tmp_path_factory.mktemp('synthetic')
  synthetic.make_synthetic_mura(out, STUDIES_PER_PART, VALID_STUDIES_PER_PART, seed=0,
                                num_workers=2, progress=False)
  return out


@pytest.fixture(scope='session')
def mura_data_dir(synthetic_dir, tmp_path_factory):
  """A TFDS data_dir with `mura` built (array_record) from the synthetic tree."""
  from tfds_mura import build  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp('tfds')
  build.build(str(synthetic_dir), str(data_dir), num_workers=2)
  return data_dir


@pytest.fixture(scope='session')
def trained_workdir(mura_data_dir, tmp_path_factory):
  """(workdir, config) of a tiny model trained 2 epochs on the synthetic MURA and evaluated:
  what CAM and prediction tests restore."""
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  from mura_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from mura_jax.training import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('trained')
  config = tiny_config(mura_data_dir)
  assert train.train_and_evaluate(config, str(workdir))['status'] == 'done'
  evaluate.evaluate_checkpoint(config, str(workdir))
  return workdir, config


@pytest.fixture(scope='module')
def tiny_tree(tmp_path_factory):
  """A tiny synthetic manual_dir (one study per part and split), for builder tests that edit it."""
  out = tmp_path_factory.mktemp('tiny')
  synthetic.make_synthetic_mura(out, 1, 1, seed=5, num_workers=1, progress=False)
  return out


@pytest.fixture
def tree(tiny_tree, tmp_path):
  """A fresh, editable copy of `tiny_tree`'s manual_dir."""
  shutil.copytree(tiny_tree / 'MURA-v1.1', tmp_path / 'manual' / 'MURA-v1.1')
  return tmp_path / 'manual'
