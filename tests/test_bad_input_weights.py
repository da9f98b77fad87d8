"""Every bad weights file `config.model.init` may name, and the message it must print: the path,
what it is not, and where to get the right one (the official file and its URL). A reader's own
advice (torch's `weights_only=False`, which would run pickled code) is never repeated.

    input                                      message (start)
    torchvision:MISSING.pth                    No weights file at MISSING.pth. torchvision's ...
    torchvision:A_FOLDER (keras: too)          A_FOLDER is a folder, not a weights file. ...
    torchvision:random bytes / empty /         F (N bytes) is not a readable PyTorch state dict
      truncated .pth                             (.pth) (UnpicklingError). torchvision's ImageNet
                                                 densenet169 is densenet169-b2777c0a.pth ...
    torchvision:a .zip / .npz                  ... (.pth) (RuntimeError; a .npz file is not one; ...)
    torchvision:a pickled whole model          ... (UnpicklingError; it holds pickled Python
                                                 objects, e.g. a whole model ...: save
                                                 model.state_dict() instead)
    torchvision:a pickled tensor               F holds a Tensor, not a state dict: save
                                                 model.state_dict() instead of the model.
    torchvision:random / empty / truncated     F (N bytes) is not a readable safetensors file
      .safetensors                               (SafetensorError: ...). torchvision's ...
    keras:random bytes / empty .h5             F (N bytes) is not a readable Keras HDF5 weights
                                                 file (.h5) (OSError: ...). Keras' ImageNet ...
    keras:a .keras (Keras 3 zip)               ... (.h5) (...; a Keras 3 .keras file is a zip
                                                 archive, not HDF5: load it with
                                                 keras.saving.load_model and pass that model ...)
    torchvision:another DenseNet's dict        F does not fit densenet169 with 1000 classes: N
                                                 missing, ... nothing was loaded. Its dense blocks
                                                 (6, 12, 24, 16) are densenet121's: pass
                                                 arch='densenet121'. (then at most 5 keys a kind)
    torchvision:another model's dict           ... nothing was loaded. Its keys (conv1.weight,
                                                 fc.weight, ...) are not a DenseNet's: it is
                                                 another model's weights. torchvision's ...
"""

import os
import zipfile

import numpy as np
import pytest

from mura_jax.errors import UserError
from mura_jax.models import weights
from mura_jax.models.weights import KERAS_URL


def _random_file(path, size=4096):
  path.write_bytes(np.random.default_rng(0).bytes(size))
  return path


def test_missing_file_and_folder(tmp_path):
  with pytest.raises(weights.WeightsNotFoundError, match='No weights file at .*densenet169-b2777c0a'):
    weights.load_torchvision(tmp_path / 'x.pth', 'densenet169')
  with pytest.raises(weights.WeightsNotFoundError, match='is a folder, not a weights file'):
    weights.load_torchvision(tmp_path, 'densenet169')


def _torch_file(torch, path, what):
  if what == 'random':
    return _random_file(path)
  if what == 'empty':
    return _random_file(path, 0)
  if what == 'truncated':
    torch.save({'features.conv0.weight': torch.zeros(64, 3, 7, 7)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    return path
  if what == 'zip':
    with zipfile.ZipFile(path, 'w') as z:
      z.writestr('notes.txt', 'not weights')
    return path
  if what == 'npz':
    np.savez(path, conv0=np.zeros(3))
    return path
  torch.save(torch.nn.Linear(2, 2), path)  # 'model': a whole pickled model
  return path


@pytest.mark.parametrize('name,what,why', [
    ('random.pth', 'random', ''), ('empty.pth', 'empty', ''), ('truncated.pth', 'truncated', ''),
    ('mistaken.zip', 'zip', 'a .zip file is not one'), ('arrays.npz', 'npz', 'a .npz file is not one'),
    ('whole_model.pth', 'model', 'it holds pickled Python objects, e.g. a whole model saved with '
                                 'torch.save(model), and mura-jax never runs pickled code: save '
                                 'model.state_dict() instead')])
def test_unreadable_torch_files(tmp_path, name, what, why):
  torch = pytest.importorskip('torch')
  path = _torch_file(torch, tmp_path / name, what)
  with pytest.raises(weights.WeightsFileError) as error:
    weights.load_torchvision(path, 'densenet169')
  message = str(error.value)
  size = os.path.getsize(path)
  assert message.startswith(f'{path} ({size:,} bytes) is not a readable PyTorch state dict (.pth) (')
  assert why in message
  # Where to get the right one: the official file and its URL.
  assert 'https://download.pytorch.org/models/densenet169-b2777c0a.pth' in message
  assert 'weights_only' not in message and isinstance(error.value, UserError)
  assert '\n' not in message


@pytest.mark.parametrize('what', ['random', 'empty', 'truncated'])
def test_unreadable_safetensors(tmp_path, what):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = tmp_path / f'{what}.safetensors'
  if what == 'truncated':
    save_file({'features.conv0.weight': np.zeros((64, 3, 7, 7), np.float32)}, os.fspath(path))
    path.write_bytes(path.read_bytes()[:-100])
  else:
    _random_file(path, 4096 if what == 'random' else 0)
  with pytest.raises(weights.WeightsFileError) as error:
    weights.load_torchvision(path, 'densenet169')
  message = str(error.value)
  assert message.startswith(f'{path} ({os.path.getsize(path):,} bytes) is not a readable '
                            'safetensors file (SafetensorError: ')
  assert 'densenet169-b2777c0a.pth' in message and isinstance(error.value, UserError)


@pytest.mark.parametrize('name', ['random.h5', 'empty.h5'])
def test_unreadable_keras_h5(tmp_path, name):
  pytest.importorskip('h5py')
  path = _random_file(tmp_path / name, 0 if name == 'empty.h5' else 4096)
  with pytest.raises(weights.WeightsFileError) as error:
    weights.load_keras(path, 'densenet169')
  message = str(error.value)
  assert message.startswith(f'{path} ({os.path.getsize(path):,} bytes) is not a readable Keras '
                            'HDF5 weights file (.h5) (OSError: ')
  assert (KERAS_URL + 'densenet169_weights_tf_dim_ordering_tf_kernels.h5') in message


def test_a_keras3_archive_is_not_hdf5(tmp_path):
  pytest.importorskip('h5py')
  path = tmp_path / 'model.keras'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('config.json', '{}')
  with pytest.raises(weights.WeightsFileError) as error:
    weights.load_keras(path, 'densenet169')
  message = str(error.value)
  assert f'{path} ({os.path.getsize(path):,} bytes) is not a readable Keras HDF5' in message
  assert ('a Keras 3 .keras file is a zip archive, not HDF5: load it with '
          'keras.saving.load_model and pass that model') in message


def test_a_folder_for_keras(tmp_path):
  with pytest.raises(weights.WeightsNotFoundError, match='is a folder, not a weights file. '
                                                         "Keras' ImageNet densenet169"):
    weights.load_keras(tmp_path, 'densenet169')


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
  first_line, *keys = str(error.value).splitlines()
  assert first_line.startswith(f'{path} does not fit densenet169 with 1000 classes: ')
  assert first_line.endswith("nothing was loaded. Its dense blocks (6, 12, 24, 16) are "
                             "densenet121's: pass arch='densenet121'.")
  assert len(keys) <= 3 * 7  # at most 5 keys of each kind, not a dump


def test_another_model_is_named(tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'resnet18.pth'
  torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7), 'fc.weight': torch.zeros(1000, 512)},
             path)
  with pytest.raises(weights.WeightsMismatchError) as error:
    weights.load_torchvision(path, 'densenet169')
  first_line = str(error.value).splitlines()[0]
  assert first_line.startswith(f'{path} does not fit densenet169')
  assert ("Its keys (conv1.weight, fc.weight, ...) are not a DenseNet's: it is another model's "
          "weights. torchvision's ImageNet densenet169 is densenet169-b2777c0a.pth") in first_line
