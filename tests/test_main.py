"""`python -m mura_jax.main`: the demo chain end to end, and its errors for a newcomer."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*flags, cwd=None):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  return subprocess.run([sys.executable, '-m', 'mura_jax.main', *flags], capture_output=True,
                        text=True, cwd=cwd or REPO, env=env, timeout=900)


def test_demo_chain_end_to_end(tmp_path):
  """The embedded default config, made small: synthetic MURA -> TFDS -> train -> evaluate."""
  out = run_main('--workdir', str(tmp_path), '--config.data.synthetic_studies_per_part=4',
                 '--config.data.synthetic_valid_studies_per_part=4', '--config.train.num_epochs=2',
                 '--config.data.image_size=32', '--config.evaluation.bootstrap_resamples=100',
                 cwd=tmp_path)  # any directory: the default config is found beside the package
  assert out.returncode == 0, out.stderr[-4000:]
  assert 'AUROC' in out.stdout and 'all ' in out.stdout  # the final table
  report = json.loads((tmp_path / 'eval' / 'validation' / 'report.json').read_text())
  assert report['num_studies'] == 7 * 4 and report['checkpoint']['which'] == 'best'
  epochs = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert sum('validation_loss' in e for e in epochs) == 2
  assert (tmp_path / 'synthetic' / 'MURA-v1.1' / 'train_labeled_studies.csv').exists()
  # Evaluating again, the latest checkpoint this time, reuses everything.
  again = run_main('--workdir', str(tmp_path), '--config.mode=evaluate',
                   '--config.evaluation.checkpoint=latest', '--config.data.image_size=32',
                   '--config.evaluation.bootstrap_resamples=0', cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-4000:]


def test_unknown_mode_lists_the_modes(tmp_path):
  out = run_main('--workdir', str(tmp_path), '--config.mode=fly')
  assert out.returncode != 0 and "expected one of ['data', 'evaluate', 'train']" in out.stderr


def test_paper_config_without_weights_says_what_to_download(mura_data_dir, tmp_path):
  out = run_main('--config', os.path.join(REPO, 'configs', 'densenet169.py'), '--workdir',
                 str(tmp_path), f'--config.data.data_dir={mura_data_dir}',
                 f'--config.model.init=torchvision:{tmp_path}/densenet169-b2777c0a.pth')
  assert out.returncode != 0
  assert 'densenet169-b2777c0a.pth' in out.stderr and 'download.pytorch.org' in out.stderr


def test_paper_config_without_dataset_says_how_to_build_it(tmp_path):
  out = run_main('--config', os.path.join(REPO, 'configs', 'densenet169.py'), '--workdir',
                 str(tmp_path), f'--config.data.data_dir={tmp_path}/tfds')
  assert out.returncode != 0 and 'python -m tfds_mura.build' in out.stderr
