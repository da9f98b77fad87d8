"""ImageNet weights in (torchvision .pth / .safetensors, Keras h5), torchvision state dicts out.

Nothing is downloaded: the user passes a file (DESIGN decision 5), and a missing file or a URL gets
an error naming the official file and where to get it. A file that does not fit the architecture
raises WeightsMismatchError listing missing, unexpected and mis-shaped keys; nothing is loaded
partially.

Conversion is a renaming, because densenet.py names its modules as torchvision does:

    torchvision state dict                      Flax variables
    features.conv0.weight       (O, I, kh, kw)  params/features/conv0/kernel      (kh, kw, I, O)
    features.norm0.weight / .bias               params/features/norm0/scale / bias
    features.norm0.running_mean / running_var   batch_stats/features/norm0/mean / var
    features.denseblock1.denselayer1.norm1.*    .../features/denseblock1/denselayer1/norm1/*
    features.transition1.conv.weight            params/features/transition1/conv/kernel
    classifier.weight (O, I) / .bias            params/classifier/kernel (I, O) / bias

Keras layer names map onto the same tree (keras_weights.py: conv1_conv -> conv0, conv2_block1_0_bn ->
denseblock1/denselayer1/norm1, pool2_conv -> transition1/conv, bn -> norm5, predictions ->
classifier); imagenet.py adapts either to MURA (one logit, gray conv0). This module holds the
torchvision side and what both share (file checks, shapes, errors).

Loaders return {'params', 'batch_stats'} as float32 numpy arrays.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath
from flax import traverse_util

from mura_jax.data.preprocessing import model_input  # noqa: F401  (re-exported)
from mura_jax.errors import UserError
from mura_jax.models.densenet import ARCHS, DenseNet, create_model, variable_shapes

Variables = dict[str, Any]

# torchvision's ImageNet files: name and ImageNet top-1 (%), from torchvision.models.densenet.
TORCHVISION_FILES = {
    'densenet121': ('densenet121-a639ec97.pth', 74.434),
    'densenet161': ('densenet161-8d451a50.pth', 77.138),
    'densenet169': ('densenet169-b2777c0a.pth', 75.600),
    'densenet201': ('densenet201-c1103571.pth', 76.896),
}
TORCHVISION_URL = 'https://download.pytorch.org/models/'
# Keras' ImageNet files (no densenet161); `_notop` files lack the classifier.
KERAS_FILES = {arch: f'{arch}_weights_tf_dim_ordering_tf_kernels.h5'
               for arch in ('densenet121', 'densenet169', 'densenet201')}
KERAS_URL = 'https://storage.googleapis.com/tensorflow/keras-applications/densenet/'
KERAS_BN_EPSILON = 1.001e-5
CONVERT_COMMAND = 'python -m mura_jax.models.convert'  # .pth -> .safetensors (convert.py)

# ImageNet statistics and the gray input: what the network sees is defined in preprocessing.

# torchvision renames the official files' old keys (`denselayer1.norm.1.weight`) with this pattern.
_LEGACY_KEY = re.compile(r'^(.*denselayer\d+\.(?:norm|relu|conv))\.'
                         r'((?:[12])\.(?:weight|bias|running_mean|running_var))$')


class WeightsMismatchError(UserError, ValueError):
  """Weights that do not fit the model; `missing`, `unexpected`, `misshaped` list the keys."""

  def __init__(self, source: str, model_name: str, missing: list[str], unexpected: list[str],
               misshaped: list[str], hint: str = ''):
    self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
    lines = [f'{source} does not fit {model_name}: {len(missing)} missing, {len(unexpected)} '
             f'unexpected and {len(misshaped)} mis-shaped keys; nothing was loaded.'
             + (f' {hint}' if hint else '')]
    for what, keys in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)):
      if keys:
        lines.append(f'  {what} ({len(keys)}):')
        lines.extend(f'    {key}' for key in keys[:5])
        if len(keys) > 5:
          lines.append(f'    ... and {len(keys) - 5} more')
    super().__init__('\n'.join(lines))


class WeightsNotFoundError(UserError, FileNotFoundError):
  """No weights file at the given path (or a URL): the message says where the official one is."""


class WeightsFileError(UserError, ValueError):
  """A weights file that exists but cannot be read as the format its name says."""


def _unreadable(path, what: str, error: Exception, arch: str, kind: str,
                quote: bool = True, why: str = '') -> WeightsFileError:
  # torch's own message advises torch.load(weights_only=False), which would run the file's
  # pickled code: for torch only the error's kind is given (quote=False), and `why` says more.
  first_line = str(error).splitlines()[0][:120] if str(error) else ''
  reason = type(error).__name__ + (f': {first_line}' if quote and first_line else '')
  reason += f'; {why}' if why else ''
  size = epath.Path(path).stat().length if epath.Path(path).exists() else 0
  return WeightsFileError(f'{path} ({size:,} bytes) is not a readable {what} ({reason}). '
                          f'{_where_to_get(arch, kind) or "Pass a file saved from this model."}')


# --- Shared helpers -------------------------------------------------------------------------------

def _model(arch: str | DenseNet, num_classes: int | None = None) -> DenseNet:
  model = create_model(arch) if isinstance(arch, str) else arch
  return model if num_classes is None else model.clone(num_classes=num_classes)


def _arch_name(model: DenseNet) -> str:
  """'densenet169', or the DenseNet arguments of a configuration torchvision does not name."""
  config = dict(growth_rate=model.growth_rate, block_config=tuple(model.block_config),
                num_init_features=model.num_init_features)
  for name, kwargs in ARCHS.items():
    if kwargs == config and model.bn_size == 4:
      return name
  return f'DenseNet({", ".join(f"{k}={v}" for k, v in config.items())}, bn_size={model.bn_size})'


def _natural(key: str):
  """Sort key putting denselayer9 before denselayer10."""
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', key)]


def _guess_arch(keys, model_name: str) -> str:
  """Which other architecture the keys have the dense blocks of, if any."""
  layers = {}
  for key in keys:
    m = re.search(r'denseblock(\d+)[./]denselayer(\d+)[./]', key)
    if m:
      layers[int(m[1])] = max(layers.get(int(m[1]), 0), int(m[2]))
  blocks = tuple(layers[b] for b in sorted(layers))
  for name, kwargs in ARCHS.items():
    if kwargs['block_config'] == blocks and name != model_name:
      return f"Its dense blocks {blocks} are {name}'s: pass arch='{name}'."
  return ''


def _check(found: Mapping[str, tuple], expected: Mapping[str, tuple], source: str,
           model: DenseNet, kind: str | None = 'torchvision') -> None:
  """Raises WeightsMismatchError unless `found` has exactly the keys and shapes of `expected`."""
  missing = sorted((k for k in expected if k not in found), key=_natural)
  unexpected = sorted((k for k in found if k not in expected), key=_natural)
  misshaped = [f'{k}: {tuple(found[k])} given, {tuple(expected[k])} in the model'
               for k in sorted(expected, key=_natural)
               if k in found and tuple(found[k]) != tuple(expected[k])]
  if missing or unexpected or misshaped:
    name = _arch_name(model)
    hint = _guess_arch(found, name)
    if not hint and not any('denseblock' in k for k in found):
      first = ', '.join(sorted(found, key=_natural)[:3])
      hint = (f'Its keys ({first}, ...) are not a DenseNet\'s: it is another model\'s weights.'
              + (f' {_where_to_get(name, kind)}' if kind and _where_to_get(name, kind) else ''))
    raise WeightsMismatchError(source, f'{name} with {model.num_classes} classes', missing,
                               unexpected, misshaped, hint)


def _where_to_get(arch: str, kind: str) -> str:
  if kind == 'keras' and arch in KERAS_FILES:
    name = KERAS_FILES[arch]
    return (f"Keras' ImageNet {arch} is {name} (or {name[:-3]}_notop.h5 without the classifier), "
            f'from {KERAS_URL}{name}. Download it where there is network access and pass the '
            f"local path: config.model.init='keras:/path/to/{name}'.")
  if arch in TORCHVISION_FILES:
    name, top1 = TORCHVISION_FILES[arch]
    return (f'Keras has no ImageNet {arch}. ' if kind == 'keras' else '') + (
            f"torchvision's ImageNet {arch} is {name} (ImageNet top-1 {top1:.3f}%), from "
            f'{TORCHVISION_URL}{name}. Download it where there is network access (e.g. '
            f"`curl -LO {TORCHVISION_URL}{name}`) and pass the local path: "
            f"config.model.init='torchvision:/path/to/{name}'.")
  return ''


def _weights_file(path: str | os.PathLike, model: DenseNet, kind: str) -> epath.Path:
  """The path as an epath.Path (gs:// works); a URL or a missing file says what to pass instead."""
  text = os.fspath(path)
  arch = _arch_name(model)
  if re.match(r'^https?://', text, re.IGNORECASE):
    raise WeightsNotFoundError(
        f'{text} is a URL, and mura-jax downloads nothing at run time. {_where_to_get(arch, kind)}')
  where = _where_to_get(arch, kind) or 'Pass the path of a weights file of this model.'
  if not epath.Path(text).exists():
    raise WeightsNotFoundError(f'No weights file at {text}. {where}')
  if epath.Path(text).is_dir():
    raise WeightsNotFoundError(f'{text} is a folder, not a weights file. {where}')
  return epath.Path(text)


# What a weights file starts with. torch.save writes a zip archive (since torch 1.6) or a pickle
# (protocol 2+: 0x80, then the protocol); old torch a tar. HDF5's signature is at 0 or, after a
# user block, at 512, 1024, 2048, ...
_ZIP, _HDF5 = b'PK\x03\x04', b'\x89HDF\r\n\x1a\n'


def _format_problem(path: epath.Path, size: int, kind: str) -> str:
  """Why the file's first bytes are not those of the format `kind`, or ''."""
  with path.open('rb') as f:
    head = f.read(64)
    if kind == 'safetensors':
      length = int.from_bytes(head[:8], 'little')
      if size < 10 or length > size - 8 or head[8:9] != b'{':
        return ('a safetensors file starts with the length of its JSON header (8 bytes), then '
                'the header ("{..."); ' + (f'these 8 bytes say {length:,} bytes, more than the '
                                           'file holds' if length > size - 8 else 'no header '
                                           'follows here'))
      return ''
    if kind == 'keras':
      offset = 0
      while offset + 8 <= size:
        f.seek(offset)
        if f.read(8) == _HDF5:
          return ''
        offset = 512 if offset == 0 else offset * 2
      return 'an HDF5 file starts with the signature \\x89HDF'
  if head.startswith(_ZIP) or (head[:1] == b'\x80' and 2 <= head[1:2][0] <= 5 if len(head) > 1
                                else False):
    return ''
  if size >= 262 and path.open('rb').read(262)[257:262] == b'ustar':
    return ''
  return 'torch.save writes a zip archive (its first bytes: PK) or, before torch 1.6, a pickle'


def _looks_like_text(head: bytes) -> bool:
  try:
    text = head.decode('utf-8')
  except UnicodeDecodeError:
    return False
  return all(c.isprintable() or c in '\r\n\t' for c in text)


def check_weights_file(path: str | os.PathLike, model: DenseNet, kind: str,
                       reader: bool = True) -> epath.Path:
  """The weights file `config.model.init` names, checked before it is read: it exists, is a
  file, is not empty, starts as its format does (.safetensors, a torch .pth, a Keras .h5), and
  (`reader`) the library reading it is installed. Each problem is its own sentence."""
  path = _weights_file(path, model, kind)
  arch = _arch_name(model)
  where = _where_to_get(arch, kind) or 'Pass a weights file of this model.'
  size = path.stat().length
  fmt = 'safetensors' if path.suffix.lower() == '.safetensors' else kind
  what = {'safetensors': 'safetensors file', 'keras': 'Keras HDF5 weights file (.h5)'}.get(
      fmt, 'PyTorch state dict (.pth)')
  if size == 0:
    raise WeightsFileError(f'{path} is empty (0 bytes), not a {what}: an interrupted download or '
                           f'copy? {where}')
  problem = _format_problem(path, size, fmt)
  if problem:
    with path.open('rb') as f:
      head = f.read(48)
    if _looks_like_text(head):
      page = b'<html' in head.lower() or b'<!doctype' in head.lower()
      raise WeightsFileError(
          f'{path} ({size:,} bytes) is a text file, not a {what}: it starts with '
          f'{head.decode("utf-8").strip()[:40]!r}'
          + (' (a web page: a download that saved an error or login page?)' if page else '')
          + f'. {where}')
    if fmt == 'keras' and head.startswith(_ZIP):
      raise WeightsFileError(
          f'{path} ({size:,} bytes) is not a {what}: it is a zip archive (a Keras 3 .keras file?): '
          'load it with keras.saving.load_model and pass that model, or pass the .h5 file.')
    raise WeightsFileError(f'{path} ({size:,} bytes) is not a {what}: {problem} (its first '
                           f'bytes: {head[:8].hex(" ")}). {where}')
  if reader and fmt == 'torchvision':
    _import_torch(path)
  if reader and fmt == 'keras':
    _import_h5py()
  return path


@functools.lru_cache(maxsize=16)  # tracing a full-size DenseNet takes about a second
def _flat_shapes(model: DenseNet, in_channels: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  shapes = traverse_util.flatten_dict(variable_shapes(model, in_channels))
  return {path: tuple(s.shape) for path, s in shapes.items()}


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> Variables:
  return traverse_util.unflatten_dict(dict(flat))


# --- torchvision ----------------------------------------------------------------------------------

_TORCH_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
                ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
                ('batch_stats', 'var'): 'running_var'}
# Axes taking a torch weight to the Flax layout: OIHW -> HWIO (convs), (O, I) -> (I, O) (Linear).
_TORCH_TO_FLAX_AXES = {4: (2, 3, 1, 0), 2: (1, 0)}


def _torch_key(path: tuple[str, ...], ndim: int) -> tuple[str, tuple[int, ...]]:
  """('params', 'features', 'conv0', 'kernel') -> ('features.conv0.weight', (2, 3, 1, 0))."""
  collection, *modules, leaf = path
  identity = tuple(range(ndim))
  axes = _TORCH_TO_FLAX_AXES.get(ndim, identity) if leaf == 'kernel' else identity
  return '.'.join([*modules, _TORCH_NAMES[collection, leaf]]), axes


def _torch_layout(model: DenseNet, in_channels: int) -> dict[str, tuple[tuple, tuple, tuple]]:
  """torchvision key -> (Flax path, axes torch -> Flax, torch shape), for every variable."""
  layout = {}
  for path, shape in _flat_shapes(model, in_channels).items():
    key, axes = _torch_key(path, len(shape))
    layout[key] = (path, axes, tuple(shape[a] for a in np.argsort(axes)))
  return layout


def _to_numpy(value) -> np.ndarray:
  value = value.detach().cpu().numpy() if hasattr(value, 'detach') else np.asarray(value)
  return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


class ReaderNotInstalledError(UserError, ImportError):
  """The library reading a weights file's format (torch, h5py) is not installed."""


def _import_torch(path=None):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    pth = str(path or 'FILE.pth')
    raise ReaderNotInstalledError(
        f'Reading {path or "a .pth file"} needs PyTorch, which is not installed: pip install '
        '"mura-jax[torch]". Without it, pass a .safetensors file, converted once where torch is '
        f'installed: {CONVERT_COMMAND} {pth} {os.path.splitext(pth)[0]}.safetensors') from e
  return torch


def _import_h5py():
  try:
    import h5py  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ReaderNotInstalledError('Reading Keras h5 files needs h5py, which is not installed: '
                                  'pip install "mura-jax[keras]".') from e
  return h5py


def _why_not_torch(path: epath.Path, error: Exception) -> str:
  """What a .pth that torch.load(weights_only=True) refused probably is (never torch's advice)."""
  if 'Unsupported global' in str(error):  # the unpickler met a class: an object, not tensors
    return ('it holds pickled Python objects, e.g. a whole model saved with torch.save(model), '
            'and mura-jax never runs pickled code: save model.state_dict() instead')
  if path.suffix.lower() not in ('.pth', '.pt', '.bin', '.ckpt', '.tar', ''):
    return (f'a {path.suffix} file is not one; torchvision: takes .pth/.pt state dicts and '
            '.safetensors files')
  return ''


def _read_state_dict(path_or_state_dict, model: DenseNet) -> tuple[dict[str, np.ndarray], str]:
  """Current-named float32 arrays and a description of the source, from a file or a dict."""
  if isinstance(path_or_state_dict, Mapping):
    raw, source = path_or_state_dict, 'The state dict'
  else:
    path = check_weights_file(path_or_state_dict, model, 'torchvision', reader=False)
    source = str(path)
    if path.suffix == '.safetensors':
      import safetensors.numpy  # pylint: disable=g-import-not-at-top
      try:
        raw = safetensors.numpy.load(path.read_bytes())
      except Exception as e:  # pylint: disable=broad-except  (safetensors raises several kinds)
        raise _unreadable(path, 'safetensors file', e, _arch_name(model), 'torchvision') from e
    else:
      torch = _import_torch(path)
      # weights_only: a weights file never runs pickled code.
      try:
        with path.open('rb') as f:
          raw = torch.load(f, map_location='cpu', weights_only=True)
      except Exception as e:  # pylint: disable=broad-except  (pickle, zip and torch errors)
        raise _unreadable(path, 'PyTorch state dict (.pth)', e, _arch_name(model),
                          'torchvision', quote=False, why=_why_not_torch(path, e)) from e
      if not isinstance(raw, Mapping):
        raise WeightsFileError(f'{path} holds a {type(raw).__name__}, not a state dict: save '
                               'model.state_dict() instead of the model.')
  state_dict = {}
  for key, value in raw.items():
    if key.endswith('num_batches_tracked'):  # only used by BN with momentum=None
      continue
    legacy = _LEGACY_KEY.match(key)
    state_dict[legacy[1] + legacy[2] if legacy else key] = _to_numpy(value)
  return state_dict, source


def load_torchvision(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                     arch: str | DenseNet = 'densenet169',
                     num_classes: int | None = None) -> Variables:
  """Variables of `arch` from a torchvision DenseNet state dict (.pth, .safetensors or a dict).

  Args:
    path_or_state_dict: a `.pth` file (needs torch; read with weights_only=True), a
      `.safetensors` file (no torch needed), or a mapping of names to tensors / arrays. The
      official files' legacy names (`denselayer1.norm.1.weight`) are renamed as torchvision does.
    arch: a name in densenet.ARCHS or a DenseNet module giving the architecture.
    num_classes: classifier outputs expected in the file; None takes the file's.

  Returns:
    {'params', 'batch_stats'} of float32 numpy arrays. conv0 takes as many input channels as the
    file's conv0 does.

  Raises:
    WeightsNotFoundError: no such file, or a URL.
    WeightsMismatchError: keys or shapes differ from the architecture's.
  """
  model = _model(arch)
  state_dict, source = _read_state_dict(path_or_state_dict, model)
  if num_classes is None and 'classifier.weight' in state_dict:
    num_classes = state_dict['classifier.weight'].shape[0]
  model = _model(model, num_classes)
  conv0 = state_dict.get('features.conv0.weight')
  in_channels = conv0.shape[1] if conv0 is not None and conv0.ndim == 4 else 3
  layout = _torch_layout(model, in_channels)
  _check({k: v.shape for k, v in state_dict.items()}, {k: v[2] for k, v in layout.items()},
         source, model)
  return _unflatten({path: np.transpose(state_dict[key], axes)
                     for key, (path, axes, _) in layout.items()})


def to_torchvision(variables: Variables,
                   arch: str | DenseNet = 'densenet169') -> dict[str, np.ndarray]:
  """The torchvision state dict of `variables`: loads with strict=True into
  torchvision.models.<arch>(num_classes=...) (a 1-channel conv0 needs that conv replaced too).

  num_batches_tracked is written as 0: torchvision's BatchNorm (momentum 0.1) never reads it.
  """
  params = variables['params']
  model = _model(arch, params['classifier']['kernel'].shape[1])
  in_channels = params['features']['conv0']['kernel'].shape[2]
  flat = traverse_util.flatten_dict({'params': params, 'batch_stats': variables['batch_stats']})
  expected = _flat_shapes(model, in_channels)
  _check({'/'.join(p): v.shape for p, v in flat.items()},
         {'/'.join(p): s for p, s in expected.items()}, 'The variables', model)
  state_dict = {}
  for path, value in flat.items():
    key, axes = _torch_key(path, np.ndim(value))
    value = np.transpose(np.asarray(value, np.float32), np.argsort(axes))
    state_dict[key] = np.ascontiguousarray(value)
    if path[-1] == 'var':
      state_dict[key.replace('running_var', 'num_batches_tracked')] = np.array(0, np.int64)
  return state_dict


def save_safetensors(variables: Variables, path: str | os.PathLike,
                     arch: str | DenseNet = 'densenet169') -> None:
  """Writes `to_torchvision(variables, arch)` as safetensors (loadable without pickle or JAX)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  epath.Path(path).write_bytes(safetensors.numpy.save(to_torchvision(variables, arch)))
