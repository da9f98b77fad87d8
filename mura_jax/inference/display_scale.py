"""The display scale of a model's class activation maps: one range in logit units, fixed from the
validation split's maps, stored beside the model so that every picture of it (the CAM job's,
`mura-predict --cam`'s, from the workdir or an export) draws M on the same scale.

    WORKDIR/cam/display_scale.json   written by the CAM job on the validation split
    EXPORT_DIR/cam_display_scale.json  the copy an export carries (serving/export.py)

{"top": M drawn at full colour (logit units), "percentile": of M's cells over the split,
 "split", "n_views", "step": the checkpoint whose maps gave it}. The pictures: interpretation/.
"""

from __future__ import annotations

import json

from etils import epath

from mura_jax.errors import UserError

WORKDIR_FILE = ('cam', 'display_scale.json')
EXPORT_FILE = 'cam_display_scale.json'


def workdir_path(workdir) -> epath.Path:
  return epath.Path(workdir).joinpath(*WORKDIR_FILE)


def write(path, *, top: float, percentile: float, split: str, n_views: int, step: int) -> dict:
  scale = {'top': float(top), 'percentile': float(percentile), 'split': split,
           'n_views': int(n_views), 'step': int(step)}
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(scale, indent=2) + '\n')
  return scale


def read(path, step: int | None) -> dict | None:
  """The stored scale of checkpoint `step` (any step where None); None where there is none, or
  it belongs to another checkpoint. A damaged file is a UserError naming it."""
  path = epath.Path(path)
  if not path.exists():
    return None
  try:
    scale = json.loads(path.read_text())
    top, stored_step = float(scale['top']), int(scale['step'])
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f'{path} is damaged ({type(e).__name__}: {e}): delete it and run '
                    '--config.mode=cam on the workdir (and export again) to rewrite it.') from e
  if not top > 0:
    raise UserError(f'{path} is damaged (top {top} is not positive): delete it and run '
                    '--config.mode=cam on the workdir to rewrite it.')
  if step is not None and stored_step != step:
    return None
  return scale


def copy_into_export(workdir, folder, step: int) -> bool:
  """Copies the workdir's scale of checkpoint `step` into an export folder; False if none."""
  scale = read(workdir_path(workdir), step)
  if scale is None:
    return False
  (epath.Path(folder) / EXPORT_FILE).write_text(json.dumps(scale, indent=2) + '\n')
  return True
