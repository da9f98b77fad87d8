"""A torchvision DenseNet `.pth` -> `.safetensors`, once, where PyTorch is installed:

    python -m mura_jax.models.convert densenet169-b2777c0a.pth densenet169-b2777c0a.safetensors \
        [--arch densenet169]

Training reads a `.safetensors` file without torch (`torchvision:PATH.safetensors`), so hosts
that install only the `tpu` or `cuda` extra train from ImageNet weights converted here. The file
is read with weights_only=True and checked against the architecture (every key and shape) before
anything is written; the output is torchvision's state dict, current key names, float32, and
loads into torchvision with strict=True. launch/tpu_vm.sh setup and launch/gpu_multinode.sbatch
run it for a `.pth` given to --weights.
"""

from __future__ import annotations

import argparse
import os
import sys

import safetensors.numpy
from etils import epath

from mura_jax import cli
from mura_jax.errors import UserError
from mura_jax.models import weights
from mura_jax.models.densenet import ARCHS


def converted_name(path: str) -> str:
  """Where a `.pth` converts to by default: beside it, `.safetensors` for its suffix."""
  return os.path.splitext(path)[0] + '.safetensors'


def convert(source: str | os.PathLike, target: str | os.PathLike,
            arch: str = 'densenet169') -> int:
  """Writes `source`'s state dict (a .pth, checked against `arch`) to `target` as safetensors;
  returns how many tensors it wrote. A `target` that exists is not replaced."""
  if epath.Path(target).exists():
    raise UserError(f'{target} exists; mura-jax does not replace it. Remove it first, or pass '
                    'another output path.')
  if epath.Path(target).suffix != '.safetensors':
    raise UserError(f'{target}: the output must end in .safetensors (training reads a weights '
                    'file by its suffix).')
  state_dict = weights.to_torchvision(weights.load_torchvision(source, arch), arch)
  epath.Path(target).write_bytes(safetensors.numpy.save(state_dict))
  return len(state_dict)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog=weights.CONVERT_COMMAND, description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('source', help='a torchvision DenseNet state dict (.pth; needs torch)')
  parser.add_argument('target', nargs='?',
                      help='the .safetensors file to write (default: beside SOURCE)')
  parser.add_argument('--arch', default='densenet169', choices=sorted(ARCHS),
                      help='the DenseNet the file holds (default: densenet169)')
  parser.add_argument('--verbose', action='store_true', help='tracebacks of errors too')
  args = parser.parse_args(argv)
  target = args.target or converted_name(args.source)
  try:
    count = convert(args.source, target, args.arch)
  except cli.USER_ERRORS as e:
    return cli.say_user_error(e, args.verbose)
  print(f'{target}: {count} tensors of {args.arch} from {args.source}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
