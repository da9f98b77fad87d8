"""Keras' ImageNet DenseNets (an .h5 file, or a keras.Model) -> this project's variables: layer names
mapped to torchvision's, Keras' batch-norm epsilon folded into the running variances."""

from __future__ import annotations

import re

import numpy as np

from mura_jax.models.densenet import DenseNet
from mura_jax.models.weights import (KERAS_BN_EPSILON, Variables, WeightsFileError, _arch_name,
                                     _check, _flat_shapes, _import_h5py, _model, _unflatten,
                                     _unreadable, check_weights_file)


_KERAS_MODULES = {'conv1_conv': ('features', 'conv0'), 'conv1_bn': ('features', 'norm0'),
                  'bn': ('features', 'norm5'), 'predictions': ('classifier',),
                  'fc1000': ('classifier',)}  # fc1000: keras_applications' name for the classifier


_KERAS_LAYER_PARTS = {'0_bn': 'norm1', '1_conv': 'conv1', '1_bn': 'norm2', '2_conv': 'conv2'}


_KERAS_WEIGHTS = {'kernel': ('params', 'kernel'), 'bias': ('params', 'bias'),
                  'gamma': ('params', 'scale'), 'beta': ('params', 'bias'),
                  'moving_mean': ('batch_stats', 'mean'), 'moving_variance': ('batch_stats', 'var')}


def _keras_module(layer: str) -> tuple[str, ...] | None:
  """Keras layer name -> Flax module path: conv3_block2_1_conv -> denseblock2/denselayer2/conv1.

  Keras 2's files spell the stem 'conv1/conv', 'conv1/bn'; Keras 3 'conv1_conv', 'conv1_bn'.
  Keras numbers blocks after the stem (conv2..conv5, pool2..pool4), torchvision from 1.
  """
  layer = layer.replace('/', '_')
  if layer in _KERAS_MODULES:
    return _KERAS_MODULES[layer]
  if m := re.fullmatch(r'conv(\d+)_block(\d+)_(0_bn|1_conv|1_bn|2_conv)', layer):
    return ('features', f'denseblock{int(m[1]) - 1}', f'denselayer{m[2]}', _KERAS_LAYER_PARTS[m[3]])
  if m := re.fullmatch(r'pool(\d+)_(bn|conv)', layer):
    return ('features', f'transition{int(m[1]) - 1}', {'bn': 'norm', 'conv': 'conv'}[m[2]])
  return None


def _weight_name(name: str) -> str:
  """'conv1/bn/gamma:0' (Keras 2) or 'gamma' (Keras 3) -> 'gamma'."""
  return name.split('/')[-1].split(':')[0]


def _keras_layers(path_or_model, model: DenseNet) -> tuple[dict[str, dict[str, np.ndarray]], str]:
  """{layer name: {weight name: array}} from a Keras model or a Keras h5 weights file."""
  if hasattr(path_or_model, 'layers'):
    return ({layer.name: {_weight_name(w.name): np.asarray(w.numpy()) for w in layer.weights}
             for layer in path_or_model.layers}, f'Keras model {path_or_model.name!r}')
  path = check_weights_file(path_or_model, model, 'keras', reader=False)
  h5py = _import_h5py()
  layers = {}
  fp = path.open('rb')
  try:
    f = h5py.File(fp, 'r')
  except Exception as e:  # pylint: disable=broad-except  (h5py's OSError for a bad signature)
    fp.close()
    why = ''
    if path.suffix.lower() == '.keras' or path.read_bytes()[:4] == b'PK\x03\x04':
      why = ('a Keras 3 .keras file is a zip archive, not HDF5: load it with '
             'keras.saving.load_model and pass that model, or pass the .h5 file')
    raise _unreadable(path, 'Keras HDF5 weights file (.h5)', e, _arch_name(model), 'keras',
                      why=why) from e
  with fp, f:
    root = f['model_weights'] if 'model_weights' in f else f  # model.save() vs save_weights()
    if 'layer_names' not in root.attrs:
      raise WeightsFileError(
          f'{path} is not a Keras h5 weights file with layer names (a Keras 3 .weights.h5 names '
          'layers by class: load it into keras.applications.DenseNet169(weights=None) with '
          'load_weights and pass that model instead).')
    for layer in root.attrs['layer_names']:
      layer = layer.decode() if isinstance(layer, bytes) else str(layer)
      group = root[layer]
      layers[layer] = {_weight_name(n.decode() if isinstance(n, bytes) else str(n)):
                       np.asarray(group[n]) for n in group.attrs['weight_names']}
  return layers, str(path)


def load_keras(path_or_model, arch: str | DenseNet = 'densenet169',
               num_classes: int | None = None) -> Variables:
  """Variables of `arch` from keras.applications' DenseNet: an h5 weights file or a model.

  Keras' batch norms use epsilon 1.001e-5, torchvision's 1e-5. The difference is added to the
  running variances (var + 1.001e-5 = (var + 1e-8) + 1e-5), so a Keras-initialised model is
  the same DenseNet with torch's epsilon and evaluates as Keras does (exactly up to float32
  rounding of var + 1e-8). In training, where batch variances replace running ones, the
  denominators differ by 1e-8 in sqrt(var + eps): negligible.

  A `_notop` file has no classifier: the result then has none either (see `replace_head`).
  """
  model = _model(arch)
  layers, source = _keras_layers(path_or_model, model)
  flat, unexpected = {}, {}
  for layer, weights in layers.items():
    module = _keras_module(layer)
    for name, value in weights.items():
      if module is None or name not in _KERAS_WEIGHTS:
        unexpected[f'{layer}/{name} (Keras)'] = value.shape
        continue
      collection, leaf = _KERAS_WEIGHTS[name]
      value = value.astype(np.float32)
      if name == 'moving_variance':
        value = value + np.float32(KERAS_BN_EPSILON - model.bn_epsilon)
      flat[(collection, *module, leaf)] = value
  has_top = ('params', 'classifier', 'kernel') in flat
  if num_classes is None and has_top:
    num_classes = flat['params', 'classifier', 'kernel'].shape[1]
  model = _model(model, num_classes)
  conv0 = flat.get(('params', 'features', 'conv0', 'kernel'))
  expected = _flat_shapes(model, conv0.shape[2] if conv0 is not None and conv0.ndim == 4 else 3)
  if not has_top and num_classes is None:  # a _notop file: the backbone only
    expected = {p: s for p, s in expected.items() if 'classifier' not in p}
  _check({**{'/'.join(p): v.shape for p, v in flat.items()}, **unexpected},
         {'/'.join(p): s for p, s in expected.items()}, source, model, 'keras')
  return _unflatten(flat)
