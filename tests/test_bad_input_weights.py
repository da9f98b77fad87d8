"""Every bad weights file `config.model.init` may name, and the message it must print: the path,
what it is not, and where to get the right one. A reader's own advice (torch's
`weights_only=False`, which would run pickled code) is never repeated.

    input                                      message (start)
    torchvision:MISSING.pth                    No weights file at MISSING.pth. torchvision's ...
    torchvision:A_FOLDER                       A_FOLDER is a folder, not a weights file.
    torchvision:random bytes / empty / .zip    F (N bytes) is not a readable PyTorch state dict
    torchvision:random bytes .safetensors      F (N bytes) is not a readable safetensors file
    keras:random bytes .h5                     F (N bytes) is not a readable Keras HDF5 weights file
    torchvision:a pickled whole model          F holds a ..., not a state dict: save model.state_dict()
    torchvision:another architecture's dict    The weights in F do not fit densenet169 ... (keys)
"""

import os

import numpy as np
import pytest

from mura_jax.errors import UserError
from mura_jax.models import weights


def _random_file(path, size=4096):
  path.write_bytes(np.random.default_rng(0).bytes(size))
  return path


def test_missing_file_and_folder(tmp_path):
  with pytest.raises(weights.WeightsNotFoundError, match='No weights file at .*densenet169-b2777c0a'):
    weights.load_torchvision(tmp_path / 'x.pth', 'densenet169')
  with pytest.raises(weights.WeightsNotFoundError, match='is a folder, not a weights file'):
    weights.load_torchvision(tmp_path, 'densenet169')


@pytest.mark.parametrize('name,size', [('random.pth', 4096), ('empty.pth', 0),
                                       ('mistaken.zip', 4096)])
def test_unreadable_torch_files(tmp_path, name, size):
  pytest.importorskip('torch')
  path = _random_file(tmp_path / name, size)
  with pytest.raises(weights.WeightsFileError) as error:
    weights.load_torchvision(path, 'densenet169')
  message = str(error.value)
  assert f'{path} ({size:,} bytes) is not a readable PyTorch state dict (.pth)' in message
  assert 'densenet169-b2777c0a.pth' in message  # where to get the right one
  assert 'weights_only' not in message and isinstance(error.value, UserError)


def test_unreadable_safetensors(tmp_path):
  path = _random_file(tmp_path / 'random.safetensors')
  with pytest.raises(weights.WeightsFileError, match=r'random.safetensors \(4,096 bytes\) is not '
                                                     r'a readable safetensors file'):
    weights.load_torchvision(path, 'densenet169')


def test_unreadable_keras_h5(tmp_path):
  pytest.importorskip('h5py')
  path = _random_file(tmp_path / 'random.h5')
  with pytest.raises(weights.WeightsFileError) as error:
    weights.load_keras(path, 'densenet169')
  assert 'is not a readable Keras HDF5 weights file (.h5)' in str(error.value)
  assert 'densenet169_weights_tf_dim_ordering_tf_kernels.h5' in str(error.value)


def test_a_pickled_whole_model_is_not_a_state_dict(tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'tensor.pth'
  torch.save(torch.zeros(3), path)  # loads with weights_only=True, but is no mapping
  with pytest.raises(weights.WeightsFileError, match='holds a Tensor, not a state dict: save '
                                                     r'model.state_dict\(\)'):
    weights.load_torchvision(path, 'densenet169')


def test_another_architecture_is_named(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = weights.to_torchvision(weights.initial_variables('random', weights.create_model(
      'densenet121'), __import__('jax').random.key(0), 32), 'densenet121')
  path = tmp_path / 'densenet121.safetensors'
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.fspath(path))
  with pytest.raises(weights.WeightsMismatchError) as error:
    weights.load_torchvision(path, 'densenet169')
  assert "pass arch='densenet121'" in str(error.value)
