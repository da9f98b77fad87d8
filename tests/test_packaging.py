"""A non-editable install (what `pip install .` or a wheel gives) runs the demo from any directory:
the embedded default config and the dataset's files travel inside the packages."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
_NOT_SOURCES = shutil.ignore_patterns('.venv', '.git', 'build', 'dist', '__pycache__',
                                      '*.egg-info', '.pytest_cache', 'benchmarks', 'tests')


@pytest.mark.slow
def test_installed_package_trains_and_evaluates_from_another_directory(tmp_path):
  checkout, target, elsewhere = tmp_path / 'checkout', tmp_path / 'site', tmp_path / 'elsewhere'
  shutil.copytree(REPO, checkout, ignore=_NOT_SOURCES)
  install = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation',
       '--target', str(target), str(checkout)], capture_output=True, text=True, timeout=600)
  assert install.returncode == 0, install.stderr[-3000:]
  shutil.rmtree(checkout)  # nothing may be read from a source tree
  elsewhere.mkdir()
  env = {**os.environ, 'PYTHONPATH': str(target),
         'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}

  def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=elsewhere,
                          env=env, timeout=900)

  where = run('-c', 'import mura_jax, tfds_mura; print(mura_jax.__file__, tfds_mura.__file__)')
  assert where.returncode == 0 and where.stdout.count(str(target)) == 2, where.stdout + where.stderr
  workdir = tmp_path / 'work'
  out = run('-m', 'mura_jax.main', '--workdir', str(workdir), '--config.train.num_epochs=1',
            '--config.data.synthetic_studies_per_part=3',
            '--config.data.synthetic_valid_studies_per_part=2', '--config.data.image_size=32',
            '--config.evaluation.bootstrap_resamples=50')
  assert out.returncode == 0, out.stderr[-4000:]
  report = json.loads((workdir / 'eval' / 'validation' / 'report.json').read_text())
  assert report['num_studies'] == 7 * 2 and report['checkpoint']['which'] == 'best'
  assert json.loads((workdir / 'config.json').read_text())['model']['arch'] == 'custom'
