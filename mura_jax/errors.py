"""The one rule for errors the user can fix: `UserError`.

A `UserError` is a problem with the user's input, config or files (a missing checkpoint, a damaged
weights file, a config key that does not exist, a workdir trained with another config). Its message
is one or a few sentences that name the file, row or key and say what to do next; the entry points
(`python -m mura_jax.main`, `mura-predict`, the scorer) print it alone and exit 2, and print the
traceback only with --verbose. Anything else is a bug and keeps its traceback.

Every error class of the project derives from it (and from the built-in class it refines, so
`except ValueError` keeps working): images.ImageError, checkpoints.CheckpointNotFoundError, ...
The dataset builder (`tfds_mura`, which imports nothing from mura_jax) has its own MuraDataError,
which the entry points treat the same way.
"""

import errno
import os
import re

from etils import epath


class UserError(Exception):
  """A problem the user can fix; the message says how."""


class ConfigError(UserError, ValueError):
  """A config value or key that cannot be used, or a config that differs from the workdir's."""


class WorkdirError(UserError, OSError):
  """A workdir that cannot be written, or holds a run that does not fit the command."""


class DataError(UserError, ValueError):
  """A dataset or input file that is missing or cannot be used as it is."""


class DatasetNotFoundError(UserError, FileNotFoundError):
  """No built `mura` dataset where the config points; the message says how to build it."""


def write_problem(folder) -> OSError | ImportError | None:
  """Why `folder` (local or gs://) cannot be written, or None: it is created if missing and a
  file is written and removed there. The entry points check their output folders with it before
  any work (`workdir.check_writable`, the scorer's --out). An ImportError: gs:// without gcsfs
  (and without TensorFlow, whose own GCS file system epath would use instead)."""
  path = epath.Path(folder)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write-test-{os.getpid()}'
    probe.write_text('')
    probe.unlink()
  except (OSError, ImportError) as e:
    return e
  return None


GCS_INSTALL = ('gs:// paths need gcsfs: pip install "mura-jax[gcs]" (the tpu and cuda extras '
               'include it)')


def is_disk_full(error: BaseException | None) -> bool:
  """Whether `error` (or what caused it) is a full disk or quota: OSError ENOSPC/EDQUOT, or
  tensorstore's ValueError 'RESOURCE_EXHAUSTED: ... No space left on device' (not XLA's
  RESOURCE_EXHAUSTED for device memory)."""
  seen = 0
  while error is not None and seen < 10:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if re.search(r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'",
                 str(error)):
      return True
    error, seen = error.__cause__ or error.__context__, seen + 1
  return False
