"""`python -m mura_jax.main`: the demo chain end to end, and its errors for a newcomer."""

import json
import os
import subprocess
import sys

import conftest
import jaxlib
import ml_collections
import pytest

from mura_jax.runtime import host
from mura_jax.runtime import parallel
from tfds_mura.mura.source import MuraDataError


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# `python -m mura_jax.main` in a process where TensorFlow cannot be imported, as after the README's
# plain `pip install -e .` (TensorFlow is the optional `tf` extra).
WITHOUT_TENSORFLOW = """
import importlib.abc, importlib.machinery, runpy, sys
class NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path=None, target=None):
    if name == 'tensorflow' or name.startswith('tensorflow.'):
      return importlib.machinery.ModuleSpec(name, self)
  def create_module(self, spec):
    raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
  def exec_module(self, module):
    pass
sys.meta_path.insert(0, NoTensorFlow())
runpy.run_module('mura_jax.main', run_name='__main__')
"""


def run_main(*flags, cwd=None, without_tensorflow=False):
  env = {**os.environ, 'XLA_FLAGS': conftest.xla_flags(2)}
  command = ['-c', WITHOUT_TENSORFLOW] if without_tensorflow else ['-m', 'mura_jax.main']
  return subprocess.run([sys.executable, *command, *flags], capture_output=True, text=True,
                        cwd=cwd or REPO, env=env, timeout=900)


def test_demo_chain_end_to_end_without_tensorflow(tmp_path):
  """The embedded default config, made small: synthetic MURA -> TFDS -> train -> evaluate."""
  out = run_main('--workdir', str(tmp_path), '--config.data.synthetic_studies_per_part=4',
                 '--config.data.synthetic_valid_studies_per_part=4', '--config.train.num_epochs=2',
                 '--config.data.image_size=32', '--config.evaluation.bootstrap_resamples=100',
                 cwd=tmp_path,  # any directory: the default config is found beside the package
                 without_tensorflow=True)
  assert out.returncode == 0, out.stderr[-4000:]
  assert 'no TensorBoard files' in out.stderr and not list(tmp_path.glob('events.out.tfevents*'))
  assert 'AUROC' in out.stdout and 'all ' in out.stdout  # the final table
  # XLA_FLAGS without it (run_main): main.py adds XLA:CPU's own convolutions before JAX starts.
  if jaxlib.version.__version__.startswith(parallel.CPU_CONVOLUTION_JAXLIBS):
    assert 'XLA:CPU runs convolutions on its own kernels' in out.stderr
  restart = host.allocator_environment()
  if restart is not None:  # main.py started itself again with it
    assert ('malloc: mimalloc 3.' if 'libmimalloc' in restart.get('LD_PRELOAD', '') else
            'malloc: glibc with transparent huge pages') in out.stderr
  report = json.loads((tmp_path / 'eval' / 'validation' / 'report.json').read_text())
  assert report['num_studies'] == 7 * 4 and report['checkpoint']['which'] == 'best'
  epochs = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert sum('validation_loss' in e for e in epochs) == 2
  assert (tmp_path / 'synthetic' / 'MURA-v1.1' / 'train_labeled_studies.csv').exists()
  # The demo's control (train.shuffled_labels_control): trained as long, on the run's data, and
  # compared in the CAM report with the cascading randomisation.
  control = tmp_path / 'controls' / 'shuffled_labels'
  assert sum('validation_loss' in json.loads(line)
             for line in (control / 'metrics.jsonl').read_text().splitlines()) == 2
  sanity = json.loads((tmp_path / 'cam' / 'validation' / 'localisation.json').read_text())['sanity']
  assert 'shuffled labels' in sanity['controls'] and 'randomised: classifier' in sanity['controls']
  # Evaluating again, the latest checkpoint this time, reuses everything.
  again = run_main('--workdir', str(tmp_path), '--config.mode=evaluate',
                   '--config.evaluation.checkpoint=latest', '--config.data.image_size=32',
                   '--config.evaluation.bootstrap_resamples=0', cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-4000:]


def test_paper_config_without_weights_says_what_to_download(mura_data_dir, tmp_path):
  out = run_main('--config', os.path.join(REPO, 'configs', 'densenet169.py'), '--workdir',
                 str(tmp_path), f'--config.data.data_dir={mura_data_dir}',
                 f'--config.model.init=torchvision:{tmp_path}/densenet169-b2777c0a.pth')
  assert out.returncode != 0
  assert 'densenet169-b2777c0a.pth' in out.stderr and 'download.pytorch.org' in out.stderr


def test_paper_config_without_dataset_says_how_to_build_it(tmp_path):
  out = run_main('--config', os.path.join(REPO, 'configs', 'densenet169.py'), '--workdir',
                 str(tmp_path), f'--config.data.data_dir={tmp_path}/tfds', '--config.model.init=random')
  assert out.returncode != 0 and 'python -m tfds_mura.build' in out.stderr



def test_data_mode_uses_a_built_data_dir_as_train_does(mura_data_dir, tmp_path):
  """launch/local_multiprocess.sh runs --config.mode=data once before its processes start: with
  a built data_dir, no manual_dir and no synthetic data it reads the dataset, as train would (it
  compared it with WORKDIR/synthetic, found nothing there and refused); without one it says
  what to download."""
  from mura_jax.data import dataset  # pylint: disable=g-import-not-at-top  (TFDS: this test only)
  config = ml_collections.ConfigDict({'data': {'synthetic': False, 'manual_dir': '',
                                               'data_dir': str(mura_data_dir)}})
  builder = dataset.prepare_dataset(config, str(tmp_path / 'run'))
  assert str(builder.data_dir).startswith(str(mura_data_dir))
  assert not (tmp_path / 'run').exists()
  config.data.data_dir = str(tmp_path / 'none')
  with pytest.raises(MuraDataError, match='and no manual_dir was given to build one'):
    dataset.prepare_dataset(config, str(tmp_path / 'run'))
