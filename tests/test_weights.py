"""ImageNet weight ports: torchvision and Keras parity, round trip, bad input, MURA adaptations.

Reference networks are built randomly initialised by torchvision / Keras themselves, with batch-norm
statistics and affine parameters randomised so that parity is not trivial. Nothing is downloaded.
Torch and Keras tests skip, with the reason, when those packages are missing.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mura_jax.data import preprocessing
from mura_jax.models import convert
from mura_jax.models import weights
from mura_jax.models.densenet import DenseNet, DenseNet121, DenseNet169, variable_shapes
from mura_jax.models.imagenet import adapt_input_channels, initial_variables, replace_head
from mura_jax.models.keras_weights import load_keras
from mura_jax.models.weights import (WeightsMismatchError, WeightsNotFoundError, load_torchvision,
                                     model_input, save_safetensors, to_torchvision)

SIZE = 64  # small images: the networks are full size, only the input is small
TOLERANCE = 1e-4  # the bound on the max |logit difference|

# One compiled densenet169 forward pass for every test in this file.
_forward = jax.jit(functools.partial(DenseNet169().apply, train=False))


def _images(channels=3, seed=0, size=SIZE):
  return np.random.RandomState(seed).randn(2, size, size, channels).astype(np.float32)


def _import_torch():
  torch = pytest.importorskip('torch', reason='no torch (pip install mura-jax[torch])')
  return torch, pytest.importorskip('torchvision')


def _import_keras():
  if 'keras' not in sys.modules:
    os.environ['KERAS_BACKEND'] = 'jax'
  keras = pytest.importorskip('keras', reason='no keras (pip install mura-jax[keras])')
  if keras.backend.backend() != 'jax':
    pytest.skip(f'keras was imported with the {keras.backend.backend()} backend, not jax')
  return keras


def _randomise_torch(model, seed=0):
  """Random batch-norm statistics and affine parameters, and a non-zero classifier bias."""
  torch, _ = _import_torch()
  torch.manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        for t, (lo, hi) in [(m.weight, (0.5, 1.5)), (m.bias, (-0.3, 0.3)),
                            (m.running_mean, (-0.3, 0.3)), (m.running_var, (0.5, 1.5))]:
          t.uniform_(lo, hi)
      if isinstance(m, torch.nn.Linear):
        m.bias.uniform_(-0.5, 0.5)
  return model.eval()


def _torch_logits(model, x):
  torch, _ = _import_torch()
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


@pytest.fixture(scope='module')
def torch_densenet169():
  """torchvision's densenet169 with random statistics, its numpy state dict, its logits."""
  torch, torchvision = _import_torch()
  model = _randomise_torch(torchvision.models.densenet169(weights=None))
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, state_dict, _torch_logits(model, _images())


def _legacy(key: str) -> str:
  """The official files' key names: denselayer1.norm1.weight -> denselayer1.norm.1.weight."""
  for module in ('norm', 'conv'):
    for i in ('1', '2'):
      key = key.replace(f'.{module}{i}.', f'.{module}.{i}.')
  return key


def _assert_parity(variables, expected):
  logits = np.asarray(_forward(variables, _images()))
  assert np.std(expected) > 0.5  # a non-trivial reference
  assert np.abs(logits - expected).max() <= TOLERANCE


def _random_variables(model, in_channels=3, seed=0):
  """torchvision-like random variables (kaiming convs, random batch norms), without torch."""
  rs = np.random.RandomState(seed)

  def leaf(path, shape):
    name = path[-1].key
    if name == 'kernel':
      std = math.sqrt(2 / math.prod(shape.shape[:-1]))
      return rs.normal(0, std, shape.shape).astype(np.float32)
    lo, hi = (0.5, 1.5) if name in ('scale', 'var') else (-0.3, 0.3)
    return rs.uniform(lo, hi, shape.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, variable_shapes(model, in_channels))


# --- torchvision ----------------------------------------------------------------------------------

@pytest.mark.parametrize('form', ['pth', 'safetensors', 'legacy_pth', 'dict'])
def test_torchvision_parity(torch_densenet169, tmp_path, form):
  torch, _ = _import_torch()
  model, state_dict, expected = torch_densenet169
  tensors = model.state_dict()
  if form == 'dict':
    source = tensors
  elif form == 'safetensors':
    import safetensors.torch  # pylint: disable=g-import-not-at-top
    source = tmp_path / 'densenet169.safetensors'
    safetensors.torch.save_file(tensors, source)
  else:
    source = tmp_path / 'densenet169.pth'
    if form == 'legacy_pth':
      tensors = {_legacy(k): v for k, v in tensors.items()}
      assert 'features.denseblock1.denselayer1.norm.1.weight' in tensors
    torch.save(tensors, source)
  _assert_parity(load_torchvision(source), expected)


def test_torchvision_parity_of_the_scanned_model(torch_densenet169):
  # The scanned dense blocks (models.densenet.ScannedDenseBlock) load the same file and give
  # torchvision's logits: the padded channels change nothing.
  _, state_dict, expected = torch_densenet169
  scanned = jax.jit(functools.partial(DenseNet169(scan_segment=8).apply, train=False))
  logits = np.asarray(scanned(load_torchvision(state_dict), _images()))
  assert np.abs(logits - expected).max() <= TOLERANCE


def test_round_trip_is_bit_exact(torch_densenet169):
  torch, torchvision = _import_torch()
  _, state_dict, _ = torch_densenet169
  back = to_torchvision(load_torchvision(state_dict))
  assert set(back) == set(state_dict)
  for key, value in state_dict.items():
    assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
  reference = torchvision.models.densenet169()
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_mura_model_exports_to_torchvision(torch_densenet169, tmp_path):
  """A one-output, one-channel model saved as safetensors loads strictly into torchvision."""
  torch, torchvision = _import_torch()
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  _, state_dict, _ = torch_densenet169
  variables = replace_head(load_torchvision(state_dict), 1, jax.random.key(0))
  variables = adapt_input_channels(variables, 1)
  path = tmp_path / 'mura.safetensors'
  save_safetensors(variables, path)
  exported = safetensors.numpy.load_file(path)
  reference = torchvision.models.densenet169(num_classes=1)
  reference.features.conv0 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  np.testing.assert_array_equal(exported['classifier.weight'].T,
                                variables['params']['classifier']['kernel'])
  # And back: conv0 with one channel and one output are read from the file.
  again = load_torchvision(path, num_classes=1)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


@pytest.fixture(scope='module')
def state_dict_169():
  """A torchvision-format densenet169 state dict made without torch."""
  return to_torchvision(_random_variables(DenseNet169()))


def test_other_architecture_is_rejected_with_the_keys(state_dict_169):
  state_dict = state_dict_169
  densenet121 = to_torchvision(_random_variables(DenseNet121()), arch='densenet121')
  with pytest.raises(WeightsMismatchError) as error:
    load_torchvision(densenet121, arch='densenet169')
  e = error.value
  assert len(e.missing) == (32 - 24) * 10 + (32 - 16) * 10  # 10 tensors per dense layer
  assert e.missing[0] == 'features.denseblock3.denselayer25.conv1.weight'
  assert not e.unexpected
  assert 'features.norm5.weight: (1024,) given, (1664,) in the model' in e.misshaped
  assert "arch='densenet121'" in str(e) and f'{len(e.missing)} missing' in str(e)
  with pytest.raises(WeightsMismatchError) as error:
    load_torchvision(state_dict, arch='densenet121')
  assert error.value.unexpected and not error.value.missing
  assert "arch='densenet169'" in str(error.value)


def test_partial_or_extra_keys_are_rejected(state_dict_169):
  state_dict = state_dict_169
  partial = dict(state_dict)
  del partial['features.denseblock2.denselayer3.norm2.running_var']
  with pytest.raises(WeightsMismatchError, match=r'(?s)1 missing.*denselayer3\.norm2\.running_var'):
    load_torchvision(partial)
  with pytest.raises(WeightsMismatchError, match=r'(?s)1 unexpected.*module\.fc\.weight'):
    load_torchvision({**state_dict, 'module.fc.weight': np.zeros((2, 2), np.float32)})
  shapes = r'classifier\.weight: \(1000, 1664\) given, \(1, 1664\) in the model'
  with pytest.raises(WeightsMismatchError, match=shapes):
    load_torchvision(state_dict, num_classes=1)


@pytest.mark.parametrize('arch, name, top1', [
    ('densenet121', 'densenet121-a639ec97.pth', '74.434'),
    ('densenet161', 'densenet161-8d451a50.pth', '77.138'),
    ('densenet169', 'densenet169-b2777c0a.pth', '75.600'),
    ('densenet201', 'densenet201-c1103571.pth', '76.896')])
def test_missing_file_or_url_names_the_official_file(tmp_path, arch, name, top1):
  for where in (tmp_path / name, f'https://download.pytorch.org/models/{name}'):
    with pytest.raises(WeightsNotFoundError) as error:
      load_torchvision(where, arch=arch)
    message = str(error.value)
    assert str(where) in message and f'https://download.pytorch.org/models/{name}' in message
    assert f'top-1 {top1}%' in message
    assert f"config.model.init='torchvision:/path/to/{name}'" in message
  assert isinstance(error.value, FileNotFoundError)


def test_pth_must_be_a_plain_state_dict(tmp_path):
  torch, _ = _import_torch()
  torch.save(torch.zeros(2), tmp_path / 'tensor.pth')
  with pytest.raises(ValueError, match='holds a Tensor, not a state dict'):
    load_torchvision(tmp_path / 'tensor.pth')
  # weights_only=True: a file that would run pickled code is refused, not executed.
  torch.save({'features.conv0.weight': argparse.Namespace()}, tmp_path / 'pickle.pth')
  with pytest.raises(weights.WeightsFileError, match=r'is not a readable PyTorch state dict '
                                                     r'\(.pth\) \(UnpicklingError; it holds pickled '
                                                     r'Python objects') as error:
    load_torchvision(tmp_path / 'pickle.pth')
  assert isinstance(error.value.__cause__, pickle.UnpicklingError)
  assert 'weights_only' not in str(error.value)  # torch's advice to lift it is not passed on


def test_pth_without_torch_says_how_to_install(tmp_path, monkeypatch):
  path = tmp_path / 'densenet169-b2777c0a.pth'
  path.write_bytes(b'PK\x03\x04' + bytes(60))  # starts as torch.save's zip does; not read
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch now raises ImportError
  with pytest.raises(ImportError, match=r'pip install "mura-jax\[torch\]"'):
    load_torchvision(path)


def test_pth_converts_once_to_safetensors_read_without_torch(torch_densenet169, tmp_path,
                                                              capsys):
  """`python -m mura_jax.models.convert IN.pth` (launch/ runs it for --weights): the official
  file's legacy names become torchvision's current ones, every tensor is the .pth's bit for bit,
  and training reads the result without torch."""
  torch, _ = _import_torch()
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  model, state_dict, _ = torch_densenet169
  source = tmp_path / 'densenet169-b2777c0a.pth'
  torch.save({_legacy(k): v for k, v in model.state_dict().items()}, source)
  assert convert.main([str(source)]) == 0  # the output's name: beside it
  target = tmp_path / 'densenet169-b2777c0a.safetensors'
  assert capsys.readouterr().out.startswith(f'{target}: 1015 tensors of densenet169')
  converted = safetensors.numpy.load_file(target)
  assert set(converted) == set(state_dict)  # current names, num_batches_tracked included
  for key, value in state_dict.items():
    if not key.endswith('num_batches_tracked'):  # torchvision's BatchNorm never reads it
      assert converted[key].dtype == value.dtype and np.array_equal(converted[key], value), key
  jax.tree.map(np.testing.assert_array_equal, load_torchvision(target),
               load_torchvision(state_dict))
  # Once: an existing output is never replaced; another architecture's file is refused.
  assert convert.main([str(source)]) == 2
  assert convert.main([str(source), str(tmp_path / 'other.safetensors'),
                       '--arch', 'densenet121']) == 2
  assert not (tmp_path / 'other.safetensors').exists()


# --- Keras ----------------------------------------------------------------------------------------

def _randomise_keras(model, seed=0):
  keras = _import_keras()
  rs = np.random.RandomState(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.set_weights([rs.uniform(lo, hi, w.shape).astype(np.float32) for w, (lo, hi) in zip(
          layer.get_weights(), [(0.5, 1.5), (-0.3, 0.3), (-0.3, 0.3), (0.5, 1.5)])])
    if isinstance(layer, keras.layers.Dense):
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel * 30, rs.uniform(-0.5, 0.5, bias.shape).astype(np.float32)])
  return model


def _write_keras2_h5(model, path, include_top=True):
  """The layout of Keras' official files: legacy h5, Keras 2 names ('conv1/conv', 'kernel:0')."""
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(path, 'w') as f:
    names = []
    for layer in model.layers:
      if not layer.weights or (layer.name == 'predictions' and not include_top):
        continue
      name = {'conv1_conv': 'conv1/conv', 'conv1_bn': 'conv1/bn'}.get(layer.name, layer.name)
      names.append(name.encode())
      group = f.create_group(name)
      weight_names = [f'{name}/{w.name}:0'.encode() for w in layer.weights]
      group.attrs['weight_names'] = weight_names
      for weight_name, w in zip(weight_names, layer.weights):
        group.create_dataset(weight_name.decode(), data=np.asarray(w.numpy()))
    f.attrs['layer_names'] = names


def _small_keras_densenet():
  """Keras' DenseNet builder with one layer per block (seconds to build, not half a minute)."""
  _import_keras()
  from keras.src.applications import densenet  # pylint: disable=g-import-not-at-top
  return densenet.DenseNet([1, 1, 1, 1], weights=None, input_shape=(32, 32, 3))


@pytest.fixture(scope='module')
def keras_densenet169():
  """(Keras DenseNet169, random statistics, no softmax; its logits on _images())."""
  keras = _import_keras()
  model = keras.applications.DenseNet169(weights=None, input_shape=(SIZE, SIZE, 3),
                                         classifier_activation=None)
  model = _randomise_keras(model)
  return model, np.asarray(model.predict(_images(), verbose=0))


def test_keras_parity(keras_densenet169, tmp_path):
  model, expected = keras_densenet169
  variables = load_keras(model)
  _assert_parity(variables, expected)
  # The official files' h5 layout gives the very same variables.
  _write_keras2_h5(model, tmp_path / 'densenet169_weights_tf_dim_ordering_tf_kernels.h5')
  from_file = load_keras(tmp_path / 'densenet169_weights_tf_dim_ordering_tf_kernels.h5')
  jax.tree.map(np.testing.assert_array_equal, from_file, variables)
  # Keras' epsilon (1.001e-5, read from its layer) is folded into the running variances, so
  # the model's own (torch's 1e-5) gives Keras' denominators. The random variances (0.5..1.5)
  # have a float32 ulp of ~1e-7, which hides a 1e-8 shift: small ones (2^-14, ulp 2^-37 ~ 7e-12)
  # show it to 1e-3 relative.
  bn = model.get_layer('bn')
  assert bn.epsilon == 1.001e-5 and DenseNet(num_classes=1).bn_epsilon == 1e-5
  saved = bn.get_weights()
  small = np.full_like(saved[3], 2.0**-14)
  try:
    bn.set_weights(saved[:3] + [small])
    ported = load_keras(model)['batch_stats']['features']['norm5']['var']
  finally:
    bn.set_weights(saved)
  np.testing.assert_allclose(ported - small, 1.001e-5 - 1e-5, rtol=1e-3, atol=0)


def test_keras_notop_file_has_no_classifier(keras_densenet169, tmp_path):
  model, _ = keras_densenet169
  path = tmp_path / 'densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5'
  _write_keras2_h5(model, path, include_top=False)
  variables = load_keras(path)
  assert 'classifier' not in variables['params']
  with_head = replace_head(variables, 1, jax.random.key(0))
  assert with_head['params']['classifier']['kernel'].shape == (1664, 1)
  with pytest.raises(WeightsMismatchError, match='(?s)missing.*classifier'):
    load_keras(path, num_classes=1000)


def test_keras_bad_input(tmp_path):
  small = _small_keras_densenet()
  with pytest.raises(WeightsMismatchError, match=r'(?s)missing.*unexpected') as error:
    load_keras(small, arch='densenet121')
  assert any('denselayer2' in k for k in error.value.missing)
  for where in (tmp_path / 'densenet169_weights_tf_dim_ordering_tf_kernels.h5',
                'https://storage.googleapis.com/x.h5'):
    with pytest.raises(WeightsNotFoundError, match='densenet169_weights_tf_dim_ordering_tf_kernels'):
      load_keras(where)
  small.save_weights(tmp_path / 'small.weights.h5')  # Keras 3's format names layers by class
  with pytest.raises(ValueError, match='pass that model'):
    load_keras(tmp_path / 'small.weights.h5')


# --- MURA adaptations -----------------------------------------------------------------------------

def test_replace_head_keeps_the_backbone():
  variables = _random_variables(DenseNet169())
  new = replace_head(variables, 1, jax.random.key(0))
  kernel, bias = new['params']['classifier']['kernel'], new['params']['classifier']['bias']
  assert kernel.shape == (1664, 1) and bias.shape == (1,) and not np.any(bias)
  assert 0 < np.abs(kernel).max() <= 1 / math.sqrt(1664)  # DenseNet's (torch's Linear) init
  assert new['params']['features'] is variables['params']['features']
  assert new['batch_stats'] is variables['batch_stats']
  assert variables['params']['classifier']['kernel'].shape == (1664, 1000)  # input untouched


def _norm0_output(model, variables, x):
  _, state = model.apply(variables, x, capture_intermediates=lambda m, _: m.name == 'norm0',
                         mutable=['intermediates'])
  return np.asarray(state['intermediates']['features']['norm0']['__call__'][0])


def test_folding_is_exact_but_at_conv0_borders():
  """Interior of norm0's output equal; the border differs by exactly the padded taps' share."""
  model = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16)
  variables = _random_variables(model)
  folded = adapt_input_channels(variables, 1)
  assert folded['params']['features']['conv0']['kernel'].shape == (7, 7, 1, 16)
  gray = np.random.RandomState(1).uniform(0, 1, (2, SIZE, SIZE, 1)).astype(np.float32)
  replicated = _norm0_output(model, variables, model_input(gray, 3))
  diff = _norm0_output(model, folded, model_input(gray, 1)) - replicated
  # Predicted: sum over conv0 taps in the padding of sum_c w_c (gray_mean - mean_c) / std_c,
  # times norm0's scale / sqrt(var + eps).
  kernel = variables['params']['features']['conv0']['kernel'].astype(np.float64)
  offset = np.einsum('hwco,c->hwo', kernel, (preprocessing.GRAY_MEAN - np.array(preprocessing.IMAGENET_MEAN))
                     / np.array(preprocessing.IMAGENET_STD))[:, :, None, :]
  inside = lax.conv_general_dilated(jnp.ones((1, SIZE, SIZE, 1)), jnp.asarray(offset, jnp.float32),
                                    (2, 2), ((3, 3), (3, 3)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  norm0 = variables['params']['features']['norm0']
  gain = norm0['scale'] / np.sqrt(variables['batch_stats']['features']['norm0']['var'] + 1e-5)
  predicted = (offset.sum(axis=(0, 1, 2)) - np.asarray(inside[0])) * gain
  np.testing.assert_allclose(diff, np.broadcast_to(predicted, diff.shape), atol=1e-5)
  # Output rows/columns 0, 1 and the last one reach the padding (64 + 6 - 7 = 57, 57 // 2 = 28).
  border = np.zeros((SIZE // 2, SIZE // 2), bool)
  border[:2], border[:, :2], border[-1:], border[:, -1:] = True, True, True, True
  assert np.abs(diff[:, ~border]).max() <= 1e-5 and np.abs(diff[:, border]).max() > 1e-3


def test_folding_error_in_densenet169_logits():
  """On random ImageNet-like weights: folded logits within 1% of the logit spread of the
  replicated ones; centring the gray input is what keeps the border error small."""
  variables = _random_variables(DenseNet169(), seed=2)
  gray = np.random.RandomState(1).uniform(0, 1, (2, SIZE, SIZE, 1)).astype(np.float32)
  replicated = np.asarray(_forward(variables, model_input(gray, 3)))
  errors = {}
  for gray_mean, gray_std in ((preprocessing.GRAY_MEAN, preprocessing.GRAY_STD), (0.0, 1.0)):
    folded = adapt_input_channels(variables, 1, gray_mean=gray_mean, gray_std=gray_std)
    x = model_input(gray, 1, gray_mean=gray_mean, gray_std=gray_std)
    logits = np.asarray(_forward(folded, x))
    errors[gray_mean] = np.abs(logits - replicated).max() / np.std(replicated)
  assert 0 < errors[preprocessing.GRAY_MEAN] < 0.01
  assert errors[preprocessing.GRAY_MEAN] < errors[0.0] / 5


def test_initial_variables_hook(tmp_path):
  model = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=1)
  rng = jax.random.key(0)
  random = initial_variables('random', model, rng, image_size=32, in_channels=1)
  assert random['params']['features']['conv0']['kernel'].shape == (7, 7, 1, 16)
  imagenet = _random_variables(model.clone(num_classes=1000))
  save_safetensors(imagenet, tmp_path / 'tiny.safetensors', arch=model)
  pretrained = initial_variables(f'torchvision:{tmp_path / "tiny.safetensors"}', model, rng,
                                 image_size=32, in_channels=1)
  assert pretrained['params']['classifier']['kernel'].shape == (32, 1)
  folded = adapt_input_channels(imagenet, 1)
  jax.tree.map(np.testing.assert_array_equal, pretrained['params']['features'],
               folded['params']['features'])
  jax.tree.map(np.testing.assert_array_equal, pretrained['batch_stats'], folded['batch_stats'])
  assert model.apply(pretrained, np.zeros((1, 32, 32, 1), np.float32)).shape == (1, 1)
  with pytest.raises(WeightsNotFoundError):
    initial_variables(f'torchvision:{tmp_path / "nothing.pth"}', model, rng)
  for bad in ('imagenet', 'torchvision:', 'tf:/x.h5'):
    with pytest.raises(ValueError, match="'random', 'torchvision:PATH' or 'keras:PATH'"):
      initial_variables(bad, model, rng)


def test_initial_variables_from_keras(tmp_path):
  small = _small_keras_densenet()
  _write_keras2_h5(_randomise_keras(small), tmp_path / 'small.h5')
  model = DenseNet(growth_rate=32, block_config=(1, 1, 1, 1), num_init_features=64, num_classes=1)
  variables = initial_variables(f'keras:{tmp_path / "small.h5"}', model, jax.random.key(0))
  np.testing.assert_array_equal(variables['params']['features']['conv0']['kernel'],
                                small.get_layer('conv1_conv').kernel.numpy())
  num_features = small.get_layer('bn').gamma.shape[0]
  assert variables['params']['classifier']['kernel'].shape == (num_features, 1)
