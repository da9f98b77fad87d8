"""DenseNet architecture: sizes, options and training-mode behaviour (weights: test_weights.py)."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mura_jax.models import densenet
from mura_jax.models.densenet import ARCHS, DenseNet, create_model, init_variables, variable_shapes

# A DenseNet small enough to run in milliseconds, with every kind of module of the real ones.
TINY = dict(growth_rate=8, block_config=(2, 2), num_init_features=16)


# bfloat16 keeps 8 bits of significand: eps 2**-8 (0.0039) relative per rounding. The tiny
# net's logits (|logit| < 1 on _images()) pass about 22 roundings to bf16 (input, 11 batch
# norms, 10 convs, classifier); independent signs add like sqrt(22) ~ 4.7 eps, so 5 eps.
# Measured on CPU: max |bf16 - f32| 0.0038 eval, 0.0019 train (~1 eps); the old 0.1 was 25 eps.
BF16_ATOL = 5 * 2.0**-8


def _tiny(**kwargs) -> DenseNet:
  return DenseNet(**{**TINY, **kwargs})


def _images(n=2, size=32, channels=3, seed=0):
  return np.random.RandomState(seed).randn(n, size, size, channels).astype(np.float32)


@pytest.fixture(scope='module')
def tiny_variables():
  return init_variables(_tiny(num_classes=3), jax.random.key(0), image_size=32)


# torchvision's sum(p.numel() for p in densenet*().parameters()), as the issue states them.
@pytest.mark.parametrize('arch, count', [('densenet121', 7_978_856), ('densenet161', 28_681_000),
                                         ('densenet169', 14_149_480), ('densenet201', 20_013_928)])
def test_parameter_count_equals_torchvisions(arch, count):
  params = variable_shapes(arch)['params']
  assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == count


def test_named_constructors_build_the_named_architectures():
  for name, build in [('densenet121', densenet.DenseNet121), ('densenet161', densenet.DenseNet161),
                      ('densenet169', densenet.DenseNet169), ('densenet201', densenet.DenseNet201)]:
    model = build(num_classes=1)
    assert (model.growth_rate, tuple(model.block_config), model.num_init_features) == tuple(
        ARCHS[name].values())
    assert model.num_classes == 1
  with pytest.raises(ValueError, match='densenet169'):
    create_model('densenet170')


def test_names_mirror_torchvision(tiny_variables):
  params, stats = tiny_variables['params'], tiny_variables['batch_stats']
  assert set(params) == {'features', 'classifier'}
  assert set(params['features']) == {'conv0', 'norm0', 'denseblock1', 'transition1', 'denseblock2',
                                     'norm5'}
  layer = params['features']['denseblock1']['denselayer2']
  assert set(layer) == {'norm1', 'conv1', 'norm2', 'conv2'}
  assert set(params['features']['transition1']) == {'norm', 'conv'}
  assert set(stats['features']['norm5']) == {'mean', 'var'}
  # Only the classifier has a bias besides the batch norms, as in torchvision.
  assert set(params['features']['conv0']) == {'kernel'}
  assert set(params['classifier']) == {'kernel', 'bias'}


def test_channel_arithmetic(tiny_variables):
  features = tiny_variables['params']['features']
  # 16 + 2 * 8 = 32 channels after block 1, halved by the transition, + 2 * 8 = 32 at norm5.
  assert features['denseblock1']['denselayer2']['conv1']['kernel'].shape == (1, 1, 24, 32)
  assert features['transition1']['conv']['kernel'].shape == (1, 1, 32, 16)
  assert features['norm5']['scale'].shape == (32,)
  assert features['conv0']['kernel'].shape == (7, 7, 3, 16)


def test_initialisation_is_torchvisions():
  params = init_variables(DenseNet(growth_rate=32, block_config=(6,), num_init_features=64),
                          jax.random.key(1), image_size=32)['params']
  conv1 = params['features']['denseblock1']['denselayer6']['conv1']['kernel']  # fan_in 224
  assert np.std(conv1) == pytest.approx(math.sqrt(2 / 224), rel=0.05)  # kaiming_normal_
  assert np.abs(conv1).max() > 2.5 * math.sqrt(2 / 224)  # untruncated
  kernel = params['classifier']['kernel']  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  bound = 1 / math.sqrt(kernel.shape[0])
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
  assert not np.any(params['classifier']['bias'])
  norm5 = params['features']['norm5']
  assert np.all(norm5['scale'] == 1) and not np.any(norm5['bias'])


@pytest.mark.parametrize('size', [32, 45, 64])
def test_any_input_size_and_cam_features(tiny_variables, size):
  model = _tiny(num_classes=3)
  logits, features = model.apply(tiny_variables, _images(size=size), return_features=True)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  # torch's output sizes: conv0 (7x7/2, pad 3), pool0 (3x3/2, pad 1), one transition (2x2/2).
  side = ((size - 1) // 2 // 2 + 1) // 2
  assert features.shape == (2, side, side, 32)
  assert np.all(features >= 0)  # after the final ReLU
  # The paper's CAM relation: logits are the classifier applied to the spatial mean of features.
  head = tiny_variables['params']['classifier']
  np.testing.assert_allclose(features.mean(axis=(1, 2)) @ head['kernel'] + head['bias'], logits,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(model.apply(tiny_variables, _images(size=size)), logits)


def test_in_channels_follow_the_variables():
  model = _tiny()
  variables = init_variables(model, jax.random.key(0), image_size=32, in_channels=1)
  assert variables['params']['features']['conv0']['kernel'].shape == (7, 7, 1, 16)
  assert model.apply(variables, _images(channels=1)).shape == (2, 1000)


def test_dropout_only_in_training(tiny_variables):
  model, plain = _tiny(num_classes=3, drop_rate=0.5), _tiny(num_classes=3)
  x = _images()
  np.testing.assert_array_equal(model.apply(tiny_variables, x), plain.apply(tiny_variables, x))
  train = functools.partial(model.apply, tiny_variables, x, train=True, mutable=['batch_stats'])
  with pytest.raises(Exception, match='dropout'):
    train()
  a, _ = train(rngs={'dropout': jax.random.key(1)})
  b, _ = train(rngs={'dropout': jax.random.key(2)})
  no_dropout, _ = plain.apply(tiny_variables, x, train=True, mutable=['batch_stats'])
  assert not np.allclose(a, b) and not np.allclose(a, no_dropout)


def test_remat_changes_nothing_but_memory(tiny_variables):
  x = _images()

  def loss(params, model):
    logits, _ = model.apply({**tiny_variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'], rngs={'dropout': jax.random.key(3)})
    return jnp.sum(logits ** 2)

  grads = {}
  for remat in (False, True):
    model = _tiny(num_classes=3, remat=remat, drop_rate=0.2)
    grads[remat] = jax.jit(jax.value_and_grad(functools.partial(loss, model=model)))(
        tiny_variables['params'])
    assert jax.tree.structure(grads[remat][1]) == jax.tree.structure(tiny_variables['params'])
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               grads[False], grads[True])
  # remat really recomputes: the backward pass contains a checkpointed call.
  grad = jax.grad(functools.partial(loss, model=_tiny(num_classes=3, remat=True)))
  jaxpr = str(jax.make_jaxpr(grad)(tiny_variables['params']))
  assert 'remat' in jaxpr or 'checkpoint' in jaxpr


def test_bfloat16_compute_keeps_float32_variables(tiny_variables):
  model = _tiny(num_classes=3, dtype=jnp.bfloat16)
  variables = init_variables(model, jax.random.key(0), image_size=32)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  x = _images()
  (logits, features), updates = model.apply(tiny_variables, x, train=True, return_features=True,
                                            mutable=['batch_stats'])
  assert logits.dtype == features.dtype == jnp.float32
  assert {s.dtype for s in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
  reference = _tiny(num_classes=3).apply(tiny_variables, x)
  np.testing.assert_allclose(model.apply(tiny_variables, x), reference, rtol=0, atol=BF16_ATOL)
  # The convolutions really run in bfloat16.
  jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=False))(tiny_variables, x)
  convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'conv_general_dilated']
  assert convs and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in convs)


def _spatial(path: tuple[str, ...], size: int) -> int:
  """Side length at a batch norm of the TINY model for `size` x `size` input."""
  if 'norm0' in path:
    return size // 2
  if 'denseblock1' in path or 'transition1' in path:
    return size // 4
  return size // 8


def test_training_batch_norm_equals_torch_train_mode():
  torch = pytest.importorskip('torch', reason='no torch (pip install mura-jax[torch])')
  torchvision = pytest.importorskip('torchvision')
  from mura_jax.models.weights import load_torchvision  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  reference = torchvision.models.DenseNet(**TINY, num_classes=3)
  with torch.no_grad():
    for m in reference.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        for t, (lo, hi) in [(m.weight, (0.5, 1.5)), (m.bias, (-0.3, 0.3)),
                            (m.running_mean, (-0.3, 0.3)), (m.running_var, (0.5, 1.5))]:
          t.uniform_(lo, hi)
  model, size = _tiny(num_classes=3), 32
  variables = load_torchvision(reference.state_dict(), arch=model)
  x = _images(size=size)
  reference.train()
  with torch.no_grad():
    expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

  torch_stats = reference.state_dict()
  flat_old = jax.tree_util.tree_flatten_with_path(variables['batch_stats'])[0]
  new = updates['batch_stats']
  largest_gap = 0.0
  for path, old in flat_old:
    keys = tuple(k.key for k in path)
    new_value = functools.reduce(lambda d, k: d[k], keys, new)
    assert not np.allclose(new_value, old)  # the momentum update happened
    torch_name = {'mean': 'running_mean', 'var': 'running_var'}[keys[-1]]
    torch_new = torch_stats['.'.join((*keys[:-1], torch_name))].numpy()
    if keys[-1] == 'mean':
      np.testing.assert_allclose(new_value, torch_new, rtol=1e-5, atol=1e-5)
    else:
      # torch updates with the unbiased batch variance, Flax with the biased one.
      n = 2 * _spatial(keys, size) ** 2
      biased = 0.9 * old + (torch_new - 0.9 * old) * (n - 1) / n
      np.testing.assert_allclose(new_value, biased, rtol=1e-5, atol=1e-5)
      largest_gap = max(largest_gap, float(np.abs(new_value - torch_new).max()))
  assert largest_gap > 1e-4  # so the n/(n-1) correction above was really needed


SCAN_TEST = dict(growth_rate=4, block_config=(3, 5), num_init_features=8, num_classes=2)


@pytest.fixture(scope='module')
def unrolled_reference():
  """The unrolled network's variables (batch statistics away from their initial 0 and 1, so
  that padding them would show), an input, its eval logits, and its training results."""
  model = DenseNet(**SCAN_TEST)
  variables = init_variables(model, jax.random.key(0), image_size=32)
  rs = np.random.RandomState(1)
  variables = {'params': variables['params'], 'batch_stats': jax.tree.map(
      lambda v: v + rs.uniform(0.1, 0.5, v.shape).astype(np.float32), variables['batch_stats'])}
  x = _images()
  return variables, x, model.apply(variables, x), _loss_and_grads(model, variables, x)


def _loss_and_grads(model, variables, x):
  """(loss, batch statistics updated in training, gradients) of a training step."""
  def loss(params):
    logits, updates = model.apply({**variables, 'params': params}, x, train=True,
                                  mutable=['batch_stats'])
    return jnp.sum(jnp.sin(logits)), updates
  (value, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return value, updates, grads


# Blocks of 3 and 5 layers: segments of 2 leave a last segment of 1; 3 scans block 1 whole;
# unrolled_blocks 1 scans block 2 only.
@pytest.mark.parametrize('segment, remat, unrolled_blocks', [(2, False, 0), (3, True, 0),
                                                             (2, False, 1)])
def test_scanned_dense_blocks_equal_the_unrolled_ones(unrolled_reference, segment, remat,
                                                      unrolled_blocks):
  variables, x, logits, trained = unrolled_reference
  scanned = DenseNet(**SCAN_TEST, scan_segment=segment, remat=remat,
                     unrolled_blocks=unrolled_blocks)
  # Same names, shapes and initial values: checkpoints and weight files serve both.
  jax.tree.map(np.testing.assert_array_equal,
               init_variables(DenseNet(**SCAN_TEST), jax.random.key(0), image_size=32),
               init_variables(scanned, jax.random.key(0), image_size=32))
  np.testing.assert_allclose(scanned.apply(variables, x), logits, rtol=1e-5, atol=1e-5)
  scanned_trained = _loss_and_grads(scanned, variables, x)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
               scanned_trained, trained)
  # Every layer's running statistics were updated (not only the last one's of a segment).
  jax.tree.map(lambda new, old: np.testing.assert_equal(np.allclose(new, old), False),
               scanned_trained[1]['batch_stats'], variables['batch_stats'])
  # The dense layers really run in scans: one per segment.
  jaxpr = str(jax.make_jaxpr(functools.partial(scanned.apply, train=False))(variables, x))
  assert jaxpr.count('scan[') == sum(-(-n // segment)
                                     for n in SCAN_TEST['block_config'][unrolled_blocks:])


def test_scanned_dense_blocks_refuse_dropout():
  with pytest.raises(ValueError, match='scan_segment needs drop_rate 0'):
    init_variables(DenseNet(**TINY, drop_rate=0.1, scan_segment=2), jax.random.key(0), 32)
  # A negative segment would skip every dense layer; it is refused instead.
  with pytest.raises(ValueError, match='scan_segment is -1'):
    init_variables(DenseNet(**TINY, scan_segment=-1), jax.random.key(0), 32)
  # A negative count of unrolled blocks would quietly scan them all; it is refused too.
  with pytest.raises(ValueError, match='unrolled_blocks is -1'):
    init_variables(DenseNet(**TINY, scan_segment=2, unrolled_blocks=-1), jax.random.key(0), 32)


def test_scanned_dense_blocks_in_bfloat16(tiny_variables):
  x = _images()
  scanned = _tiny(num_classes=3, dtype=jnp.bfloat16, scan_segment=2)
  logits, updates = scanned.apply(tiny_variables, x, train=True, mutable=['batch_stats'])
  assert logits.dtype == jnp.float32
  assert {s.dtype for s in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(logits, _tiny(num_classes=3).apply(
      tiny_variables, x, train=True, mutable=['batch_stats'])[0], rtol=0, atol=BF16_ATOL)
  grads = jax.grad(lambda p: jnp.sum(scanned.apply({**tiny_variables, 'params': p}, x)))(
      tiny_variables['params'])
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  jaxpr = jax.make_jaxpr(functools.partial(scanned.apply, train=False))(tiny_variables, x)
  assert 'bf16[' in str(jaxpr) and 'scan[' in str(jaxpr)


def test_training_gradients_equal_torchvisions():
  """Every parameter's gradient of a training step equals torch autograd's through torchvision's
  DenseNet with the same weights: train-mode batch norm, unrolled and scanned dense blocks (the
  scanned segments' own backward pass)."""
  torch = pytest.importorskip('torch', reason='no torch (pip install mura-jax[torch])')
  torchvision = pytest.importorskip('torchvision')
  from mura_jax.models.weights import load_torchvision  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  reference = torchvision.models.DenseNet(**TINY, num_classes=3).train()
  x = _images(size=40)
  loss = torch.sin(reference(torch.from_numpy(x.transpose(0, 3, 1, 2)))).sum()
  loss.backward()
  # The gradients in torchvision's names and layouts, read as variables are.
  torch_grads = {k: (p.grad if p.grad is not None else p).detach().numpy()
                 for k, p in [*reference.named_parameters(), *reference.named_buffers()]}
  expected = load_torchvision(torch_grads, arch=_tiny(num_classes=3))['params']
  variables = load_torchvision(reference.state_dict(), arch=_tiny(num_classes=3))
  for scan_segment in (0, 2):
    model = _tiny(num_classes=3, scan_segment=scan_segment, unrolled_blocks=1)

    def jax_loss(params, model=model):
      logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                              mutable=['batch_stats'])
      return jnp.sum(jnp.sin(logits))
    np.testing.assert_allclose(jax_loss(variables['params']), loss.item(), rtol=1e-5)
    grads = jax.jit(jax.grad(jax_loss))(variables['params'])
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-3, atol=1e-5),
                 grads, expected)
