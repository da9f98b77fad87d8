"""Every bad weights file `config.model.init` may name, and the message it must print: the path,
what it is not, and where to get the right one (the official file and its URL). A reader's own
advice (torch's `weights_only=False`, which would run pickled code) is never repeated.

    input                                      message (start)
    torchvision:MISSING.pth                    No weights file at MISSING.pth. torchvision's ...
    torchvision:A_FOLDER (keras: too)          A_FOLDER is a folder, not a weights file. ...
    torchvision: / keras: an empty file        F is empty (0 bytes), not a PyTorch state dict
                                                 (.pth): an interrupted download or copy? ...
    torchvision:random bytes .pth              F (N bytes) is not a PyTorch state dict (.pth):
                                                 torch.save writes a zip archive ... (its first
                                                 bytes: ..). torchvision's ImageNet densenet169 ...
    torchvision:a text file (.txt, a web page) F (N bytes) is a text file, not a PyTorch state
                                                 dict (.pth): it starts with '...' (a web page: ...)
    torchvision:a .pth without PyTorch         Reading F needs PyTorch, which is not installed:
                                                 pip install "mura-jax[torch]" ... python -m
                                                 mura_jax.models.convert F STEM.safetensors
                                                 (checked after the file: a bad file says so first)
    convert IN OUT, OUT exists / not .safetensors  OUT exists; mura-jax does not replace it. ... /
                                                 OUT: the output must end in .safetensors ...
    torchvision:truncated .pth                 F (N bytes) is not a readable PyTorch state dict
                                                 (.pth) (UnpicklingError). torchvision's ImageNet
                                                 densenet169 is densenet169-b2777c0a.pth ...
    torchvision:a .zip / .npz                  ... (.pth) (RuntimeError; a .npz file is not one; ...)
    torchvision:a pickled whole model          ... (UnpicklingError; it holds pickled Python
                                                 objects, e.g. a whole model ...: save
                                                 model.state_dict() instead)
    torchvision:a pickled tensor               F holds a Tensor, not a state dict: save
                                                 model.state_dict() instead of the model.
    torchvision:random .safetensors            F (N bytes) is not a safetensors file: a
                                                 safetensors file starts with the length of ...
    torchvision:truncated .safetensors         F (N bytes) is not a readable safetensors file
                                                 (SafetensorError: ...). torchvision's ...
    keras:random bytes .h5                     F (N bytes) is not a Keras HDF5 weights file
                                                 (.h5): an HDF5 file starts with the signature ...
    keras:a .keras (Keras 3 zip)               F (N bytes) is not a Keras HDF5 weights file (.h5):
                                                 it is a zip archive (a Keras 3 .keras file?): load
                                                 it with keras.saving.load_model and pass that model
    torchvision:another DenseNet's dict        F does not fit densenet169 with 1000 classes: N
                                                 missing, ... nothing was loaded. Its dense blocks
                                                 (6, 12, 24, 16) are densenet121's: pass
                                                 arch='densenet121'. (then at most 5 keys a kind)
    torchvision:another model's dict           ... nothing was loaded. Its keys (conv1.weight,
                                                 fc.weight, ...) are not a DenseNet's: it is
                                                 another model's weights. torchvision's ...
"""

import os
import sys
import zipfile

import numpy as np
import pytest

from mura_jax.errors import UserError
from mura_jax.models import convert
from mura_jax.models import keras_weights
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


WHERE_TORCHVISION = 'https://download.pytorch.org/models/densenet169-b2777c0a.pth'


@pytest.mark.parametrize('load,name,content,start', [
    ('torchvision', 'empty.pth', b'', '{path} is empty (0 bytes), not a PyTorch state dict (.pth): '
     'an interrupted download or copy? '),
    ('keras', 'empty.h5', b'', '{path} is empty (0 bytes), not a Keras HDF5 weights file (.h5): '),
    ('torchvision', 'random.pth', None, '{path} (4,096 bytes) is not a PyTorch state dict (.pth): '
     'torch.save writes a zip archive (its first bytes: PK) or, before torch 1.6, a pickle (its '
     'first bytes: '),
    ('torchvision', 'weights.txt', b'conv0 weights\n', "{path} (14 bytes) is a text file, not a "
     "PyTorch state dict (.pth): it starts with 'conv0 weights'. "),
    ('torchvision', 'page.pth', b'<!DOCTYPE html><title>Sign in</title>', '{path} (37 bytes) is a '
     "text file, not a PyTorch state dict (.pth): it starts with '<!DOCTYPE html><title>Sign "
     "in</title>' (a web page: a download that saved an error or login page?). "),
    ('torchvision', 'random.safetensors', None, '{path} (4,096 bytes) is not a safetensors file: '
     'a safetensors file starts with the length of its JSON header (8 bytes), then the header '
     '("{{..."); these 8 bytes say '),
    ('keras', 'random.h5', None, '{path} (4,096 bytes) is not a Keras HDF5 weights file (.h5): an '
     'HDF5 file starts with the signature \\x89HDF (its first bytes: '),
])
def test_a_file_that_is_not_its_format_is_named_before_any_reader(tmp_path, monkeypatch, load,
                                                                   name, content, start):
  """Checked by its first bytes, before torch or h5py is imported: even where neither is
  installed, an empty, random or text file gets its own sentence."""
  path = _random_file(tmp_path / name) if content is None else tmp_path / name
  if content is not None:
    path.write_bytes(content)
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if not installed: not reached
  monkeypatch.setitem(sys.modules, 'h5py', None)
  loader = weights.load_torchvision if load == 'torchvision' else keras_weights.load_keras
  with pytest.raises(weights.WeightsFileError) as error:
    loader(path, 'densenet169')
  message = str(error.value)
  assert message.startswith(start.format(path=path)), message
  assert (WHERE_TORCHVISION if load == 'torchvision' else KERAS_URL) in message
  assert '\n' not in message and isinstance(error.value, UserError)


def test_a_pth_without_torch_is_checked_first_then_says_how_to_install(tmp_path, monkeypatch):
  from mura_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from mura_jax.configs import base  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'densenet169-b2777c0a.pth'
  path.write_bytes(b'PK\x03\x04' + bytes(100))  # starts as torch.save's zip archive does
  monkeypatch.setitem(sys.modules, 'torch', None)
  config = base.base_config()
  config.model.init = f'torchvision:{path}'
  # main.py's check before any work, and the loader itself, say the same.
  for call in (lambda: workdir_lib.check_named_files(config),
               lambda: weights.load_torchvision(path, 'densenet169')):
    with pytest.raises(weights.ReaderNotInstalledError) as error:
      call()
    assert str(error.value).startswith(f'Reading {path} needs PyTorch, which is not installed: '
                                       'pip install "mura-jax[torch]". Without it, pass a '
                                       '.safetensors file')
    # ... and exactly the command that converts it where torch is installed (convert.py).
    assert str(error.value).endswith(f'python -m mura_jax.models.convert {path} '
                                     f'{tmp_path}/densenet169-b2777c0a.safetensors')
    assert isinstance(error.value, UserError) and isinstance(error.value, ImportError)


@pytest.mark.parametrize('name,what,why', [
    ('truncated.pth', 'truncated', ''),
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


def test_unreadable_safetensors(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'truncated.safetensors'
  save_file({'features.conv0.weight': np.zeros((64, 3, 7, 7), np.float32)}, os.fspath(path))
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(weights.WeightsFileError) as error:
    weights.load_torchvision(path, 'densenet169')
  message = str(error.value)
  assert message.startswith(f'{path} ({os.path.getsize(path):,} bytes) is not a readable '
                            'safetensors file (SafetensorError: ')
  assert 'densenet169-b2777c0a.pth' in message and isinstance(error.value, UserError)


def test_unreadable_keras_h5(tmp_path):
  """An HDF5 signature, then garbage: h5py's own error, named."""
  pytest.importorskip('h5py')
  path = tmp_path / 'damaged.h5'
  path.write_bytes(b'\x89HDF\r\n\x1a\n' + np.random.default_rng(0).bytes(4088))
  with pytest.raises(weights.WeightsFileError) as error:
    keras_weights.load_keras(path, 'densenet169')
  message = str(error.value)
  assert message.startswith(f'{path} (4,096 bytes) is not a readable Keras HDF5 weights file '
                            '(.h5) (OSError: ')
  assert (KERAS_URL + 'densenet169_weights_tf_dim_ordering_tf_kernels.h5') in message


def test_a_keras3_archive_is_not_hdf5(tmp_path):
  pytest.importorskip('h5py')
  path = tmp_path / 'model.keras'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('config.json', '{}')
  with pytest.raises(weights.WeightsFileError) as error:
    keras_weights.load_keras(path, 'densenet169')
  message = str(error.value)
  assert message.startswith(f'{path} ({os.path.getsize(path):,} bytes) is not a Keras HDF5 weights '
                            'file (.h5): it is a zip archive (a Keras 3 .keras file?): load it '
                            'with keras.saving.load_model and pass that model')


def test_a_folder_for_keras(tmp_path):
  with pytest.raises(weights.WeightsNotFoundError, match='is a folder, not a weights file. '
                                                         "Keras' ImageNet densenet169"):
    keras_weights.load_keras(tmp_path, 'densenet169')


def test_a_pickled_whole_model_is_not_a_state_dict(tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'tensor.pth'
  torch.save(torch.zeros(3), path)  # loads with weights_only=True, but is no mapping
  with pytest.raises(weights.WeightsFileError, match='holds a Tensor, not a state dict: save '
                                                     r'model.state_dict\(\)'):
    weights.load_torchvision(path, 'densenet169')


def test_another_architecture_is_named(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  # Zeros of densenet121's shapes: the loader reads names and shapes, not values (no init to run).
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), weights.variable_shapes('densenet121'))
  state = weights.to_torchvision(zeros, 'densenet121')
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


def test_the_converter_replaces_nothing_and_writes_only_safetensors(tmp_path, capsys):
  """`python -m mura_jax.models.convert IN OUT`: an existing OUT or another suffix is refused
  before IN is read (IN here is not even a weights file)."""
  source, target = tmp_path / 'in.pth', tmp_path / 'out.safetensors'
  source.write_bytes(b'not read')
  target.write_bytes(b'mine')
  assert convert.main([str(source), str(target)]) == 2
  assert capsys.readouterr().err.startswith(f'error: {target} exists; mura-jax does not replace '
                                            'it. Remove it first, or pass another output path.')
  assert target.read_bytes() == b'mine'
  assert convert.main([str(source), str(tmp_path / 'out.pth')]) == 2
  assert capsys.readouterr().err.startswith(f'error: {tmp_path}/out.pth: the output must end in '
                                            '.safetensors')
  assert not (tmp_path / 'out.pth').exists()
