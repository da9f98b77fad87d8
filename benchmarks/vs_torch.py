"""torchvision DenseNet-169 against mura-jax's real train step, side by side, in one run.

    python benchmarks/vs_torch.py                                   # CPU: batch 8, fp32, 2 rounds
    python benchmarks/vs_torch.py --batches 8,64,256 --torch-modes eager,amp,compile \\
        --jax-dtypes float32,bfloat16 --rounds 1 --min-seconds 3    # one GPU (gpu_run.sh)
    taskset -c 1 python benchmarks/vs_torch.py --threads 1          # per core, on a shared CPU
    python benchmarks/vs_torch.py --arch tiny --image-size 64 --rounds 1   # seconds: a smoke run

Each measurement runs in its own process (this script with --worker), the two sides alternating,
so that neither inherits the other's threads, allocator or compilation caches:
  torch   torchvision.models.DenseNet (densenet169: growth 32, blocks 6/12/32/32), one output;
          train step = forward, BCE-with-logits weighted per view, backward, Adam (lr 1e-4);
          modes: eager (fp32), amp (autocast bf16 + channels_last), compile (torch.compile of
          the amp model); cudnn.benchmark on GPU; torch.set_num_threads(--threads) on CPU.
  jax     mura-jax as `train.py` trains it: `training/state.py: network_of`, `training/state.py: initial_state`,
          `training/state.py: compile_steps(...).train` (weighted BCE, Adam, plateau scale, batch-norm
          statistics, uint8 gray batch normalised inside the step), and `.eval` (inference's
          predict_step) for the forward pass; config.model.dtype float32 or bfloat16.
The forward pass is eval mode (torch: inference_mode). Throughput is images/s over timed chunks
after warm-up (the median chunk; --warmup calls and at least --warmup-seconds); "first" is
torch's first call (cudnn autotuning or torch.compile included) and jax's lower + compile. With
--precompile N, the compilations run first, N processes at a time, into --cache-dir (JAX's
persistent compilation cache, Inductor's caches), and the timed processes load them. Measured
on an H200 host with 16 cores: 7 such compilations at once each took over 260 s where one alone
takes 87 s (XLA's GPU compiler uses many threads), so benchmarks/gpu_run.sh runs everything one
process at a time instead.

Results: a table on stdout and, with --json, every measurement with the machine, versions and
the 1-minute load average before and after it.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (growth_rate, block_config, num_init_features, bn_size)
ARCHS = {
    'densenet121': (32, (6, 12, 24, 16), 64, 4),
    'densenet169': (32, (6, 12, 32, 32), 64, 4),
    'tiny': (12, (2, 2), 16, 4),  # smoke tests of this script
}
# MURA-v1.1 training images per body part, (normal, abnormal) (DESIGN.md): the real loss weights.
MURA_TRAIN_COUNTS = ((2925, 2006), (3138, 1968), (1164, 661), (4059, 1484), (673, 599),
                     (4211, 4168), (5765, 3987))


def loadavg() -> float:
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return float('nan')


# ------------------------------------------------------------------------------------------------
# Timing.


def timed_chunks(step, sync, spec: dict) -> dict:
  """Calls `step` spec['warmup'] times and for at least spec['warmup_seconds'], then in chunks
  until spec['min_seconds'] have passed (at least 3 chunks, at most spec['max_steps'] calls);
  seconds per call of each chunk, synchronised at its end."""
  min_seconds, max_steps = spec['min_seconds'], spec['max_steps']
  start, calls = time.perf_counter(), 0
  while calls < spec['warmup'] or time.perf_counter() - start < spec.get('warmup_seconds', 0):
    step()
    sync()
    calls += 1
  per_call, calls, start, cpu = [], 0, time.perf_counter(), os.times()
  chunk = 1
  while calls < max_steps:
    t = time.perf_counter()
    for _ in range(chunk):
      step()
    sync()
    dt = time.perf_counter() - t
    per_call.append(dt / chunk)
    calls += chunk
    if dt < 0.2 and chunk < 64:  # fast steps: longer chunks, less host overhead per sync
      chunk *= 2
    if time.perf_counter() - start >= min_seconds and len(per_call) >= 3:
      break
  end = os.times()  # this process's CPU: every thread's, and the kernel's part of it
  return {'seconds_per_call': statistics.median(per_call), 'calls': calls,
          'chunks': [round(x, 6) for x in per_call],
          'cpu_s_per_call': round((end.user + end.system - cpu.user - cpu.system) / calls, 4),
          'kernel_s_per_call': round((end.system - cpu.system) / calls, 4)}


def is_oom(e: BaseException) -> bool:
  text = f'{type(e).__name__}: {e}'
  return 'out of memory' in text.lower() or 'RESOURCE_EXHAUSTED' in text or 'OutOfMemory' in text


# ------------------------------------------------------------------------------------------------
# torch side.


def torch_worker(spec: dict) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  cuda = torch.cuda.is_available() and spec['device'] != 'cpu'
  device = torch.device('cuda' if cuda else 'cpu')
  if not cuda:
    torch.set_num_threads(spec['threads'])
    # XLA:CPU flushes denormals to zero; torch only when asked (--torch-flush-denormal).
    torch.set_flush_denormal(bool(spec.get('flush_denormal')))
  torch.backends.cudnn.benchmark = True
  if spec.get('cache_dir'):
    os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR', os.path.join(spec['cache_dir'], 'inductor'))
  mode, batch, size = spec['mode'], spec['batch'], spec['image_size']
  amp = mode in ('amp', 'compile')
  memory_format = torch.channels_last if amp else torch.contiguous_format
  growth, blocks, init_features, bn_size = ARCHS[spec['arch']]
  torch.manual_seed(0)
  net = torchvision.models.DenseNet(growth_rate=growth, block_config=blocks,
                                    num_init_features=init_features, bn_size=bn_size,
                                    num_classes=1).to(device, memory_format=memory_format)
  model = torch.compile(net) if mode == 'compile' else net
  g = torch.Generator().manual_seed(1)
  x = torch.randn(batch, 3, size, size, generator=g).to(device, memory_format=memory_format)
  y = torch.randint(0, 2, (batch,), generator=g).float().to(device)
  loss_w = torch.rand(batch, generator=g).to(device)
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
  result = {'side': 'torch', 'mode': mode, 'batch': batch, 'torch': torch.__version__,
            'torchvision': torchvision.__version__,
            'device_name': torch.cuda.get_device_name(0) if cuda else platform.processor() or 'cpu',
            'threads': torch.get_num_threads(),
            'flush_denormal': bool(not cuda and spec.get('flush_denormal'))}

  def measure(what, call):  # first call (autotuning, compilation), then timed chunks
    try:
      t = time.perf_counter()
      call()
      sync()
      result[f'{what}_first_s'] = time.perf_counter() - t
      result[what] = timed_chunks(call, sync, spec)
    except Exception as e:  # pylint: disable=broad-except
      if not is_oom(e):
        raise
      result[what] = 'OOM'
    if cuda:
      result[f'{what}_peak_gib'] = torch.cuda.max_memory_allocated() / 2**30
      torch.cuda.reset_peak_memory_stats()

  if 'forward' in spec['what']:
    net.eval()

    def forward():
      with torch.inference_mode(), autocast():
        return model(x)
    measure('forward', forward)

  if 'train' in spec['what']:
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

    def train_step():
      optimizer.zero_grad(set_to_none=True)
      with autocast():
        logits = model(x)[:, 0]
      loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y,
                                                                  weight=loss_w)
      loss.backward()
      optimizer.step()
      return loss
    measure('train', train_step)
  return result


# ------------------------------------------------------------------------------------------------
# jax side: the real train step of mura_jax.training.train.

# Imported by mura_jax.training.train's module chain but not used by its steps; where a machine lacks
# them (an accelerator image without grain or TFDS), they are replaced by inert stand-ins.
OPTIONAL_MODULES = ('grain', 'tensorflow_datasets', 'tensorflow', 'clu', 'array_record')


class _StubMeta(type):
  def __getattr__(cls, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return _StubMeta(name, (), {})

  def __call__(cls, *args, **kwargs):
    return cls


def _stub_module(name: str) -> types.ModuleType:
  module = types.ModuleType(name)
  module.__getattr__ = lambda attr: _StubMeta(attr, (), {})  # type: ignore[attr-defined]
  module.__path__ = []  # a package: `import name.sub` works too
  module.__vs_torch_stub__ = True
  return module


class _StubFinder:
  """Answers imports of the stubbed top-level names (and their submodules) with stand-ins."""

  def __init__(self, names):
    self.names = set(names)

  def find_spec(self, fullname, path=None, target=None):  # pylint: disable=unused-argument
    if fullname.split('.')[0] in self.names:
      return importlib.util.spec_from_loader(fullname, self)
    return None

  def create_module(self, spec):
    return _stub_module(spec.name)

  def exec_module(self, module):
    pass


def import_train():
  """`mura_jax.training.train`, and the names of any optional modules that had to be stubbed."""
  stubbed = [n for n in os.environ.get('VS_TORCH_STUB', '').split(',') if n]  # tests of the stubs
  if stubbed:
    sys.meta_path.insert(0, _StubFinder(stubbed))
  for _ in range(len(OPTIONAL_MODULES) + 1):
    try:
      return importlib.import_module('mura_jax.training.train'), stubbed
    except ImportError as e:
      missing = (e.name or '').split('.')[0]
      if missing not in OPTIONAL_MODULES or missing in stubbed:
        raise
      stubbed.append(missing)
      for name in [m for m in sys.modules if m.startswith('mura_jax') or m == 'tfds_mura'
                   or m.startswith('tfds_mura.')]:
        del sys.modules[name]
      sys.meta_path.insert(0, _StubFinder([missing]))
  raise ImportError('mura_jax.training.train could not be imported')


def base_config():
  """The shared config defaults: configs/common.py (by path) where it exists, else the package's."""
  path = os.path.join(ROOT, 'configs', 'common.py')
  if os.path.exists(path):
    spec = importlib.util.spec_from_file_location('_vs_torch_configs_common', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.base_config()
  for name in ('configs.common', 'mura_jax.configs.base'):
    try:
      return importlib.import_module(name).base_config()
    except ImportError:
      continue
  raise ImportError('No base_config(): neither configs/common.py nor mura_jax.configs.base')


def jax_config_for(spec: dict):
  config = base_config()
  config.model.init = 'random'
  config.model.in_channels = 3
  config.model.dtype = spec['dtype']
  if spec['arch'] in ('densenet121', 'densenet169'):
    config.model.arch = spec['arch']
  else:
    growth, blocks, init_features, bn_size = ARCHS[spec['arch']]
    config.model.arch = 'custom'
    config.model.growth_rate = growth
    config.model.block_config = blocks
    config.model.num_init_features = init_features
    config.model.bn_size = bn_size
  config.data.image_size = spec['image_size']
  config.train.global_batch_size = spec['batch']
  for key, value in spec.get('model_options', {}).items():  # e.g. remat, or a speed variant
    config.model[key] = value
  return config


def random_views(batch_size: int, size: int) -> dict:
  """A training batch as the input pipeline gives it: uint8 gray views, labels, body parts."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(1)
  return {'image': rs.randint(0, 256, (batch_size, size, size, 1)).astype(np.uint8),
          'label': rs.randint(0, 2, batch_size).astype(np.int32),
          'body_part': rs.randint(0, 7, batch_size).astype(np.int32)}


def start_jax_process():
  """As main.py starts: this process again with the malloc that keeps XLA:CPU's buffers (host.py),
  then XLA:CPU's convolutions chosen (parallel.py), before JAX starts its backends."""
  from mura_jax.runtime import host, start  # pylint: disable=g-import-not-at-top
  host.restart_with_allocator()
  start.before_jax()


def jax_setup(spec: dict, **compile_options) -> types.SimpleNamespace:
  """mura-jax's real steps for `spec` as train.py builds them (`create_model`, `initial_state`,
  `compile_steps` with MURA-v1.1's loss weights; `compile_options` go to compile_steps), and a
  random batch placed on the mesh as the epoch loop places it (`batch`; `eval_batch` for the
  predict step). After start_jax_process."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mura_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  train, stubbed = import_train()
  config = jax_config_for(spec)
  model = train.train_state.network_of(config)
  mesh = parallel.make_mesh()
  state = train.train_state.initial_state(config, model)
  counts = np.asarray(MURA_TRAIN_COUNTS, np.float32)
  loss_weights = np.stack([counts[:, 1], counts[:, 0]], 1) / counts.sum(1, keepdims=True)
  # The 4th argument positionally: its keyword name is being renamed.
  steps = train.train_state.compile_steps(config, model, loss_weights, mesh, **compile_options)
  local = random_views(spec['batch'], spec['image_size'])
  eval_local = {**local, 'index': np.arange(spec['batch'], dtype=np.int32),
                'mask': np.ones(spec['batch'], np.float32)}
  return types.SimpleNamespace(
      train=train, stubbed=stubbed, config=config, model=model, mesh=mesh, state=state,
      steps=steps, loss_weights=loss_weights, batch=parallel.global_batch(local, mesh),
      eval_batch=parallel.global_batch(eval_local, mesh))


def jax_worker(spec: dict) -> dict:
  start_jax_process()  # restarts this worker once, before JAX is imported
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  from mura_jax.runtime import host  # pylint: disable=g-import-not-at-top

  if spec.get('cache_dir'):
    jax.config.update('jax_compilation_cache_dir', os.path.join(spec['cache_dir'], 'jax'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  setup = jax_setup(spec)
  train, state, steps = setup.train, setup.state, setup.steps
  batch, eval_batch = setup.batch, setup.eval_batch
  device = jax.devices()[0]
  result = {'side': 'jax', 'mode': spec['dtype'], 'batch': spec['batch'], 'jax': jax.__version__,
            'jaxlib': jax.lib.__version__ if hasattr(jax.lib, '__version__') else '',
            'flax': flax.__version__, 'device_name': device.device_kind,
            'platform': device.platform, 'devices': jax.device_count(),
            'stubbed': setup.stubbed, 'model_options': spec.get('model_options', {}),
            'xla_flags': os.environ.get('XLA_FLAGS', ''), 'allocator': host.allocator_in_use()}

  def compile_(jitted, *args):
    t = time.perf_counter()
    lowered = jitted.lower(*args)
    t_lower = time.perf_counter() - t
    compiled = lowered.compile()
    return compiled, t_lower, time.perf_counter() - t - t_lower

  try:
    if 'forward' in spec['what']:
      variables = train.train_state.variables_of(state)
      forward, result['forward_lower_s'], result['forward_compile_s'] = compile_(
          steps.validation.step('predict', setup.loss_weights), variables, eval_batch)
      result['forward_first_s'] = result['forward_lower_s'] + result['forward_compile_s']
      if not spec.get('compile_only'):
        out = {}
        result['forward'] = timed_chunks(lambda: out.update(x=forward(variables, eval_batch)),
                                         lambda: jax.block_until_ready(out), spec)
      del variables
    if 'train' in spec['what']:
      train_step, result['train_lower_s'], result['train_compile_s'] = compile_(
          steps.train, state, batch)
      result['train_first_s'] = result['train_lower_s'] + result['train_compile_s']
      if not spec.get('compile_only'):
        box = {'state': state}

        def step():
          box['state'], box['metrics'] = train_step(box['state'], batch)
        result['train'] = timed_chunks(step, lambda: jax.block_until_ready(box), spec)
        result['final_loss'] = float(box['metrics']['loss'])
  except Exception as e:  # pylint: disable=broad-except
    if not is_oom(e):
      raise
    result.setdefault('forward', 'OOM') if 'forward' in spec['what'] else None
    result['train'] = 'OOM'
  if device.platform == 'gpu' or device.platform == 'cuda':
    try:
      result['peak_gib'] = device.memory_stats()['peak_bytes_in_use'] / 2**30
    except Exception:  # pylint: disable=broad-except
      pass
  return result


def worker_main(spec_json: str):
  spec = json.loads(spec_json)
  spec['load_before'] = loadavg()
  start = time.perf_counter()
  result = (torch_worker if spec['side'] == 'torch' else jax_worker)(spec)
  result.update(load_before=spec['load_before'], load_after=loadavg(),
                process_s=round(time.perf_counter() - start, 1), arch=spec['arch'],
                image_size=spec['image_size'], compile_only=bool(spec.get('compile_only')),
                python=platform.python_version())
  print('VS_TORCH_RESULT ' + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# The run: jobs in processes, alternating sides, then the table.


def run_job(spec: dict, timeout: float, log) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(spec)]
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)
  except subprocess.TimeoutExpired:
    return {**_key(spec), 'error': f'timeout after {timeout:.0f} s'}
  for line in proc.stdout.splitlines():
    if line.startswith('VS_TORCH_RESULT '):
      return json.loads(line[len('VS_TORCH_RESULT '):])
  tail = (proc.stderr or proc.stdout)[-3000:]
  log(f'  !! {spec["side"]} {spec.get("mode") or spec.get("dtype")} b{spec["batch"]} failed '
      f'(rc {proc.returncode}, {time.perf_counter() - start:.0f} s):\n{tail}')
  return {**_key(spec), 'error': tail.strip().splitlines()[-1] if tail.strip() else
          f'rc {proc.returncode}'}


def _key(spec):
  return {'side': spec['side'], 'mode': spec.get('mode') or spec.get('dtype'),
          'batch': spec['batch'], 'compile_only': bool(spec.get('compile_only'))}


def rate(result: dict, what: str):
  value = result.get(what)
  if isinstance(value, dict):
    return result['batch'] / value['seconds_per_call']
  return value  # 'OOM', None


def fmt_rate(values) -> str:
  numbers = [v for v in values if isinstance(v, float)]
  if numbers:
    return ' / '.join(f'{v:,.1f}' if v < 100 else f'{v:,.0f}' for v in numbers)
  text = [v for v in values if isinstance(v, str)]
  return text[0] if text else '-'


def table(results: list[dict], compile_times: dict) -> str:
  timed = [r for r in results if not r.get('compile_only')]
  rows = {}
  for r in timed:
    rows.setdefault((r['batch'], r['side'], r['mode']), []).append(r)
  lines = ['| batch | side | mode | train img/s | forward img/s | first train step s | '
           'first forward s | peak GiB | load (1 min) |', '|---:|---|---|---:|---:|---:|---:|---:|---|']
  side_order = {'torch': 0, 'jax': 1}
  mode_order = {'eager': 0, 'amp': 1, 'compile': 2, 'float32': 3, 'bfloat16': 4}
  for key in sorted(rows, key=lambda k: (k[0], side_order[k[1]], mode_order.get(k[2], 9))):
    rs = rows[key]
    errors = [r['error'] for r in rs if 'error' in r]
    ok = [r for r in rs if 'error' not in r]
    first_train = compile_times.get(key, {}).get('train_first_s') or \
        next((r.get('train_first_s') for r in ok if r.get('train_first_s')), None)
    first_fwd = compile_times.get(key, {}).get('forward_first_s') or \
        next((r.get('forward_first_s') for r in ok if r.get('forward_first_s')), None)
    peak = max([r.get('train_peak_gib') or r.get('peak_gib') or 0 for r in ok] or [0])
    loads = [x for r in ok for x in (r.get('load_before'), r.get('load_after'))
             if isinstance(x, float)]
    label = {'eager': 'torchvision eager fp32', 'amp': 'torchvision AMP bf16 + channels_last',
             'compile': 'torchvision torch.compile AMP bf16 + channels_last',
             'float32': 'mura-jax fp32', 'bfloat16': 'mura-jax bf16'}.get(key[2], key[2])
    train_cell = fmt_rate([rate(r, 'train') for r in ok]) if ok else 'error'
    forward_cell = fmt_rate([rate(r, 'forward') for r in ok]) if ok else 'error'
    lines.append(f'| {key[0]} | {key[1]} | {label} | {train_cell} | {forward_cell}')
    lines[-1] += f' | {first_train:.1f}' if first_train else ' | -'
    lines[-1] += (f' | {first_fwd:.1f}' if first_fwd else ' | -')
    lines[-1] += f' | {peak:.1f}' if peak else ' | -'
    lines[-1] += f' | {min(loads):.2f}-{max(loads):.2f}' if loads else ' | -'
    if errors:
      lines[-1] += f' error: {errors[0][:80]}'
    lines[-1] += ' |'
  return '\n'.join(lines)


def best_rate(results, batch, side, modes, what):
  values = [rate(r, what) for r in results if r['batch'] == batch and r['side'] == side
            and r['mode'] in modes and not r.get('compile_only') and 'error' not in r]
  values = [v for v in values if isinstance(v, float)]
  return (max(values), ) if values else None


def ratios(results) -> str:
  lines = ['| batch | comparison | train | forward |', '|---:|---|---:|---:|']
  batches = sorted({r['batch'] for r in results})
  torch_modes = ('eager', 'amp', 'compile')
  for b in batches:
    for label, jax_modes, torch_sel in (
        ('mura-jax fp32 / torch eager fp32', ('float32',), ('eager',)),
        ('mura-jax best / torch eager fp32', ('float32', 'bfloat16'), ('eager',)),
        ('mura-jax bf16 / torch best', ('bfloat16',), torch_modes),
        ('mura-jax best / torch best', ('float32', 'bfloat16'), torch_modes)):
      cells = []
      for what in ('train', 'forward'):
        j, t = best_rate(results, b, 'jax', jax_modes, what), best_rate(results, b, 'torch',
                                                                        torch_sel, what)
        cells.append(f'{j[0] / t[0]:.2f}x' if j and t else '-')
      if cells != ['-', '-']:
        lines.append(f'| {b} | {label} | {cells[0]} | {cells[1]} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n', 2)[2])
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  parser.add_argument('--arch', default='densenet169', choices=sorted(ARCHS))
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--batches', default='8')
  parser.add_argument('--torch-modes', default='eager', help='eager,amp,compile')
  parser.add_argument('--jax-dtypes', default='float32', help='float32,bfloat16')
  parser.add_argument('--what', default='train,forward')
  parser.add_argument('--compile-batches', default='',
                      help='torch.compile only at these batches (default: all)')
  parser.add_argument('--rounds', type=int, default=2, help='alternating repetitions')
  parser.add_argument('--min-seconds', type=float, default=15.0, help='timed per measurement')
  parser.add_argument('--warmup', type=int, default=1, help='untimed calls before timing')
  parser.add_argument('--warmup-seconds', type=float, default=30.0,
                      help='and untimed calls for at least this long: on a 2-core VM, 1 '
                      'process in 4 takes up to 16 train steps (~30 s) to settle its memory '
                      '(BENCHMARKS.md)')
  parser.add_argument('--max-steps', type=int, default=200)
  parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch CPU threads')
  parser.add_argument('--torch-flush-denormal', action='store_true',
                      help='CPU: torch.set_flush_denormal(True) (XLA:CPU flushes them)')
  parser.add_argument('--device', default='auto', help="'cpu' forces torch onto the CPU")
  parser.add_argument('--jax-model-options', default='{}',
                      help='JSON of config.model overrides for the jax side, e.g. {"remat": true}')
  parser.add_argument('--precompile', type=int, default=0,
                      help='compile everything first, N processes at a time, into --cache-dir')
  parser.add_argument('--cache-dir', default='')
  parser.add_argument('--job-timeout', type=float, default=900)
  parser.add_argument('--budget', type=float, default=0,
                      help='seconds for the whole run: no job runs past it (0: no limit)')
  parser.add_argument('--json', default='', help='write all results here')
  parser.add_argument('--append', action='store_true',
                      help='keep the results already in --json: the table covers them too '
                      '(several runs, one file: gpu_run.sh)')
  parser.add_argument('--order', default='batch', choices=('batch', 'priority'),
                      help="'priority': batch 256 and 8 before 64")
  args = parser.parse_args()
  if args.worker:
    worker_main(args.worker)
    return

  started = time.perf_counter()
  log = lambda *a: print(*a, flush=True)  # noqa: E731
  batches = [int(b) for b in args.batches.split(',') if b]
  if args.order == 'priority':
    batches.sort(key=lambda b: {256: 0, 8: 1}.get(b, 2))
  compile_batches = {int(b) for b in args.compile_batches.split(',') if b} or set(batches)
  common = dict(arch=args.arch, image_size=args.image_size, what=args.what.split(','),
                min_seconds=args.min_seconds, warmup=args.warmup,
                warmup_seconds=args.warmup_seconds, max_steps=args.max_steps,
                threads=args.threads, device=args.device, cache_dir=args.cache_dir,
                flush_denormal=args.torch_flush_denormal)
  torch_specs, jax_specs = [], []
  for b in batches:
    torch_specs.append([dict(common, side='torch', mode=m, batch=b)
                        for m in args.torch_modes.split(',') if m
                        and (m != 'compile' or b in compile_batches)])
    jax_specs.append([dict(common, side='jax', dtype=d, batch=b,
                           model_options=json.loads(args.jax_model_options))
                      for d in args.jax_dtypes.split(',') if d])
  log(f'vs_torch: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python '
      f'{platform.python_version()}, load {loadavg()}; arch {args.arch} {args.image_size} px, '
      f'batches {batches}')
  earlier = _earlier(args.json) if args.append else {'runs': [], 'results': []}
  results, runs = earlier['results'], [*earlier['runs'], vars(args)]
  compile_times = {}

  if args.precompile:
    jobs = [dict(s, compile_only=True) for group in jax_specs for s in group]
    jobs += [dict(s, compile_only=True, min_seconds=0, max_steps=1, warmup=0, warmup_seconds=0)
             for group in torch_specs for s in group if s['mode'] == 'compile']
    log(f'precompile: {len(jobs)} jobs, {args.precompile} at a time, cache {args.cache_dir}')
    with ThreadPoolExecutor(args.precompile) as pool:
      for r in pool.map(lambda s: run_job(s, args.job_timeout, log), jobs):
        results.append(r)
        key = (r['batch'], r['side'], r['mode'])
        compile_times[key] = {k: r[k] for k in ('train_first_s', 'forward_first_s') if k in r}
        log(f'  compiled {key}: ' + ', '.join(f'{k} {v:.1f}' for k, v in compile_times[key].items())
            + (f' ERROR {r["error"]}' if 'error' in r else ''))
    log(f'precompile done at {time.perf_counter() - started:.0f} s')

  for round_ in range(args.rounds):
    for i, b in enumerate(batches):
      # Alternate which side goes first from round to round.
      groups = (torch_specs[i], jax_specs[i]) if round_ % 2 == 0 else (jax_specs[i], torch_specs[i])
      for spec in [s for pair in zip(*groups) for s in pair] + \
          [s for g in groups for s in g[min(len(groups[0]), len(groups[1])):]]:
        timeout = args.job_timeout
        if args.budget:  # a job started inside the budget ends inside it too
          timeout = min(timeout, args.budget - (time.perf_counter() - started))
          if timeout <= 0:
            log(f'  budget of {args.budget:.0f} s spent: skipping {_key(spec)}')
            continue
        r = run_job(spec, timeout, log)
        r['round'] = round_ + 1
        results.append(r)
        log(f'  round {round_ + 1} {r["side"]:5s} {r["mode"]:8s} b{b}: train '
            f'{fmt_rate([rate(r, "train")])} img/s, forward {fmt_rate([rate(r, "forward")])} img/s'
            f', first train {r.get("train_first_s", float("nan")):.1f} s, load '
            f'{r.get("load_before")}->{r.get("load_after")}' + (f' ERROR {r["error"]}'
                                                                  if 'error' in r else ''))
        if args.json:
          _write_json(args.json, results, runs)
  text = (table(results, compile_times) + '\n\nRatios (mura-jax img/s over torchvision img/s, '
          'best of the rounds):\n\n' + ratios(results))
  log('\n' + text)
  if args.json:
    _write_json(args.json, results, runs, text)
  log(f'total {time.perf_counter() - started:.0f} s')


def _earlier(path: str) -> dict:
  """What an earlier run wrote to `path` (--append), or nothing yet."""
  if not path:
    raise SystemExit('--append keeps the results of a --json file: name one with --json.')
  if not os.path.exists(path):
    return {'runs': [], 'results': []}
  with open(path) as f:
    return json.load(f)


def _write_json(path, results, runs, text=''):
  with open(path, 'w') as f:
    json.dump({'runs': runs, 'host': platform.node(), 'cpus': os.cpu_count(),
               'results': results, 'table': text}, f, indent=1)


if __name__ == '__main__':
  main()
