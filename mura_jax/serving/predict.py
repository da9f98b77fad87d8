"""`mura-predict`: study folders of PNG, JPEG or DICOM files -> study probabilities, a worklist.

    mura-predict --workdir W [--checkpoint best] PATH [PATH ...] [--out DIR] [--cam] [--worklist]
                 [--body-part PART] [--threshold 0.5]
    mura-predict --model EXPORT_DIR PATH ...       (an export's jax.export artifact: no checkpoint)

PATH is a study folder (its image files are the study's views), a folder of study folders (every
folder that holds image files is one study), or image files (grouped by their folder). DICOM files
are grouped by StudyInstanceUID instead of folder. macOS `._*` sidecars are skipped and counted.
Folder links are followed once (a link back up, `loop -> .`, is a note, not a second copy); a file
reached twice is read once. Folders that mura-predict wrote (its --out, its cam overlays: they hold
a `.mura-predict-output` marker, or its studies.csv and views.csv) are skipped with a note.
The body part of a study: --body-part if given, else an `XR_<PART>` folder in its path (MURA's
layout), else DICOM's Body Part Examined, the part most of its views name (a tie: the first
view's). A model's scope is the body parts it was trained and validated on (its spec: the 7
MURA study types, or those of config.data.body_parts); a study of any other part, or with none
found, is out_of_scope: not scored (no probability, no verdict). --allow-out-of-scope scores a
study of a known part outside the scope anyway: its status is predicted_out_of_scope, with a
warning. A study whose part is unknown is never scored: pass --body-part. Where the views of
one study name different body parts, those not of the study's part are left out (views.csv:
status left_out) and the study gets a warning; views that all name one part other than
--body-part or the folder's are kept (the user's word wins), with a warning.

Every view goes through the checkpoint's own preprocessing (`images.read_view`, then
`preprocessing`), so a study gets the probability evaluate mode gives it. The study probability is
the mean of its views' (the paper); abnormal if > --threshold.

Outputs: a table on the terminal; with --out DIR, predictions.csv (MURA's submission format: study,
0/1, no header; scored studies only), studies.csv (every study found: study, body_part, views,
probability, verdict, status, warnings, cam, worklist_rank, tier) and views.csv (study, file,
probability, status, warnings); with --cam, class activation map overlays (DIR/cam/<study>/), on
the display scale the CAM job stored for the checkpoint (carried by an export; else a fixed
default, which the figure says). With --worklist, studies are ranked by probability (rank 1
read first) and tiered at the operating points of the checkpoint's validation report (WORKDIR/eval/validation/report.json, or the copy in
an export's model card): 'read first' above the threshold of specificity 0.95, 'deprioritise' at
or below that of sensitivity 0.95 ('read first' wins where the two overlap). --out is checked
before any work: an existing file, a folder that holds an input PATH or input image, or one with
CSVs that mura-predict did not write is refused.

A file that cannot be read (not an image, truncated, DICOM without pixels or without its decoder,
any failure inside one file) gets a line on stderr naming it and why; the other files and studies
are still predicted, and no study disappears from the outputs (status 'error' when none of its
files could be read). What a view or study needs the user to know (transparency, colour,
multi-frame DICOM, no body part, mixed body parts) is a `note:` on stderr as well as in the CSVs.
File names that are not UTF-8 are shown and written with their bytes escaped (`\xe9`,
Python's backslashreplace).

Exit status: 0 every study found was predicted (predicted_out_of_scope included: it was asked
for) and every file read; 1 some files could not be read or were left out, or some studies were
not predicted (error, out_of_scope); 2 nothing to predict
(no image file found) or a usage error (no checkpoint in --workdir, a refused --out or flag value).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from typing import Sequence

import numpy as np
from etils import epath

from mura_jax import checkpoints
from mura_jax import cli as cli_lib
from mura_jax import workdir as workdir_lib
from mura_jax.errors import UserError
from mura_jax.evaluation import studies as studies_lib
from mura_jax.inference import exported
from mura_jax.inference import predictor as predictor_lib
from mura_jax.interpretation import maps as maps_lib
from mura_jax.interpretation import pictures
from mura_jax.runtime import parallel
from mura_jax.serving import study_folders
from tfds_mura import BODY_PARTS

EXIT_OK, EXIT_SOME_FAILED, EXIT_NOTHING = 0, 1, 2
TIERS = ('read first', 'read', 'deprioritise')
# A study's status when scored: in the model's scope, or outside it with --allow-out-of-scope.
PREDICTED = ('predicted', 'predicted_out_of_scope')


# ------------------------------------------------------------------------------------------------
# Predicting (the studies come from study_folders.py).


def scope_problem(body_part: str | None, scope: tuple[str, ...]) -> str | None:
  """Why a study of `body_part` is outside a model's scope (the body parts it was trained and
  validated on), or None when it is inside."""
  if body_part is None:
    return 'no body part found: pass --body-part'
  if body_part not in BODY_PARTS:
    return (f'body part {body_part!r} is not one of the 7 MURA study types '
            f'({", ".join(BODY_PARTS)})')
  if body_part not in scope:
    return (f'body part {body_part!r} is outside this model\'s scope: it was trained and '
            f'validated on {", ".join(scope)} studies only')
  return None


def predict(predictor, studies: list[study_folders.Study], threshold: float, cam_dir=None,
            allow_out_of_scope: bool = False) -> None:
  """Fills in each study's status, view probabilities and probability (and CAM overlays). A study
  outside the model's scope (`scope_problem`) is out_of_scope, not scored; with
  `allow_out_of_scope` one of a known body part is scored, status predicted_out_of_scope."""
  todo, forced = [], set()
  scope = checkpoints.body_parts_of(predictor.spec)
  for study in studies:
    problem = scope_problem(study.body_part, scope)
    if problem and (study.body_part is None or not allow_out_of_scope):
      study.status = 'out_of_scope'
      study.warnings.append(problem + ('' if study.body_part is None else
                                       ': not scored (--allow-out-of-scope scores it anyway)'))
    elif not study.views:
      study.status = 'error'
      if study.left_out and not study.errors:
        study.warnings.append('no view of its body part left to predict')
    else:
      todo.append(study)
      if problem:
        forced.add(study.id)
        study.warnings.append(problem + ': scored anyway (--allow-out-of-scope)')
  views = [v.pixels for s in todo for v in s.views]
  if not views:
    return
  if cam_dir is not None:
    write_marker(cam_dir)
  maps = None
  if cam_dir is not None:
    probabilities, maps = predictor.predict_views_and_maps(views)
    scale = maps_lib.DisplayScale.of(predictor.display_scale())  # the model's, stored by cam
  else:
    probabilities = predictor.predict_views(views)
  # Each study's probability: the mean of its views (the paper), as evaluation computes it.
  sizes = [len(study.views) for study in todo]
  study_probabilities, _ = studies_lib.aggregate_float64(
      probabilities, np.repeat(np.arange(len(todo)), sizes), len(todo), None, 'mean')
  start = 0
  for study, probability in zip(todo, study_probabilities):
    n = len(study.views)
    study.view_probabilities = [float(p) for p in probabilities[start:start + n]]
    study.probability = float(probability)
    study.status = 'predicted_out_of_scope' if study.id in forced else 'predicted'
    if study.errors:
      study.warnings.append(f'{len(study.errors)} of {len(study.errors) + n} files unreadable')
    for view in study.views:
      study.warnings += [f'{os.path.basename(view.path)}: {w}' for w in view.warnings]
    if maps is not None:
      study.cam = _draw_study(predictor, study, maps[start:start + n], threshold, cam_dir, scale)
    start += n


def _draw_study(predictor, study: study_folders.Study, maps, threshold: float, cam_dir,
                scale: maps_lib.DisplayScale) -> str:
  folder = epath.Path(cam_dir) / study.id.strip('/').replace('/', '_').replace(':', '_')
  views, used = [], {'study'}
  for view, raw, probability in zip(study.views, maps, study.view_probabilities):
    name = os.path.basename(view.path)
    stem = os.path.splitext(name)[0]  # views of one DICOM study from two folders may share it
    stem = next(f'{stem}_{k}' if k else stem for k in range(len(used) + 1)
                if (f'{stem}_{k}' if k else stem) not in used)
    used.add(stem)
    views.append((stem + '.png', study_folders.shown(name), view.pixels[..., 0], raw, probability))
  pictures.draw_study(folder, f'{study_folders.shown(study.id)} ({study.body_part})\n'
                      f'study {pictures.verdict_caption(study.probability, threshold)} '
                      f'(mean of {len(views)} view{"s" * (len(views) != 1)})', views,
                      predictor.preprocessing, scale, threshold)
  return os.fspath(folder / 'study.png')


def operating_points(workdir=None, model=None) -> tuple[str, list | None, int | None]:
  """(where from, the validation report's operating points, the step it evaluated): from
  WORKDIR/eval/validation/report.json, or what an export copied of it."""
  if model is not None:  # a damaged card is an error naming it (exported.read_model_card)
    validation = exported.read_model_card(model)['validation']
    where = os.fspath(epath.Path(model) / 'model_card.json')
    if validation is None:
      return where, None, None
    return where, validation['operating_points'], None
  path = epath.Path(workdir) / 'eval' / 'validation' / 'report.json'
  if not path.exists():
    return os.fspath(path), None, None
  report = exported.read_json(path, ('operating_points',), what_to_do=(
      f'evaluate the workdir again (--config.mode=evaluate --workdir {workdir}) to rewrite it.'))
  return os.fspath(path), report['operating_points'], (report.get('checkpoint') or {}).get('step')


def worklist(studies: list[study_folders.Study], source: tuple[str, list | None, int | None],
             predictor) -> list[str]:
  """Ranks the predicted studies (1 = highest probability) and tiers them at the validation
  report's operating points (`operating_points`); returns notes for the user."""
  ranked = sorted((s for s in studies if s.probability is not None),
                  key=lambda s: -s.probability)
  for rank, study in enumerate(ranked, start=1):
    study.rank = rank
  where, points_list, step = source
  if points_list is None:
    return [f'no validation report ({where}): run --config.mode=evaluate on the workdir (and '
            'export again) for worklist tiers']
  points = {(p['target_metric'], p['target']): p['threshold'] for p in points_list}
  high, low = points.get(('specificity', 0.95)), points.get(('sensitivity', 0.95))
  if high is None or low is None:
    return [f'{where} has no thresholds for sensitivity and specificity 0.95: no tiers']
  notes = [f'tiers from {where}: read first > {high:.4f} (specificity 0.95 on validation), '
           f'deprioritise <= {low:.4f} (sensitivity 0.95)']
  if step is not None and step != predictor.checkpoint['step']:
    notes.append(f'the report evaluated step {step}, these predictions use step '
                 f'{predictor.checkpoint["step"]}: evaluate this checkpoint for its own tiers')
  for study in ranked:
    study.tier = TIERS[0] if study.probability > high else TIERS[2] if study.probability <= low \
        else TIERS[1]
  return notes


def temperature_note(predictor) -> str | None:
  """What the user must know when the model's probabilities are temperature-scaled."""
  if predictor.temperature == 1.0:
    return None
  return (f'probabilities are temperature-scaled, sigmoid(logit / T) with T = '
          f'{predictor.temperature:.4f} fitted on the validation split '
          '(config.evaluation.temperature=fit); the worklist tiers come from the report of '
          'the same scaled probabilities')


# ------------------------------------------------------------------------------------------------
# Outputs.


def format_table(studies: list[study_folders.Study], threshold: float, ranked: bool) -> str:
  rows = [['rank'] * ranked + ['study', 'part', 'views', 'probability', 'verdict'] +
          ['tier'] * ranked + ['status']]
  order = sorted(studies, key=lambda s: (s.rank is None, s.rank or 0)) if ranked else studies
  for s in order:
    study = study_folders.shown(s.id)
    study = study if len(study) <= 64 else '...' + study[-61:]
    verdict = '' if s.probability is None else ('abnormal' if s.probability > threshold
                                                else 'normal')
    rows.append([str(s.rank or '')] * ranked + [
        study, s.body_part or '?', str(len(s.views)),
        '' if s.probability is None else f'{s.probability:.4f}', verdict] + [s.tier] * ranked +
        [s.status])
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, '-' * len(lines[0]))
  return '\n'.join(lines)


def _csv(rows) -> str:
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator='\n').writerows(
      [study_folders.shown(c) if isinstance(c, str) else c for c in row] for row in rows)
  return buffer.getvalue()


def write_marker(folder) -> None:
  """Marks a folder as mura-predict's output, so that reading an input tree skips it."""
  folder = epath.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / study_folders.OUTPUT_MARKER).write_text(
      'mura-predict wrote this folder; mura-predict skips it when it reads an input tree.\n')


def write_outputs(out_dir, studies: list[study_folders.Study], threshold: float) -> None:
  out = epath.Path(out_dir)
  write_marker(out)
  predicted = [s for s in studies if s.probability is not None]
  (out / 'predictions.csv').write_text(
      _csv([s.id, int(s.probability > threshold)] for s in predicted))
  (out / 'studies.csv').write_text(_csv(
      [['study', 'body_part', 'views', 'probability', 'verdict', 'status', 'warnings', 'cam',
        'worklist_rank', 'tier']] +
      [[s.id, s.body_part or '', len(s.views),
        '' if s.probability is None else repr(s.probability),
        '' if s.probability is None else ('abnormal' if s.probability > threshold else 'normal'),
        s.status, '; '.join(s.warnings), s.cam, s.rank or '', s.tier] for s in studies]))
  view_rows = [['study', 'file', 'probability', 'status', 'warnings']]
  for s in studies:
    probabilities = s.view_probabilities or [None] * len(s.views)
    view_rows += [[s.id, v.path, '' if p is None else repr(p), 'predicted' if p is not None
                   else s.status, '; '.join(v.warnings)] for v, p in zip(s.views, probabilities)]
    view_rows += [[s.id, f, '', 'error', why] for f, why in s.errors]
    view_rows += [[s.id, f, '', 'left_out', why] for f, why in s.left_out]
  (out / 'views.csv').write_text(_csv(view_rows))


# ------------------------------------------------------------------------------------------------


def _threshold(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = float('nan')
  if not 0 <= value <= 1:  # nan fails too
    raise argparse.ArgumentTypeError(
        f'must be a number in [0, 1] (a study is abnormal if its probability > it), got {text!r}')
  return value


def _batch_size(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be a whole number >= 1 (views per batch), got {text!r}')
  return value


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='mura-predict', description=__doc__.split('\n\n')[0],
      epilog='Exit status: 0 every study predicted; 1 some files unreadable or studies not '
             'predicted; 2 nothing to predict or a usage error.')
  parser.add_argument('paths', nargs='+', metavar='PATH',
                      help='study folders, folders of study folders, or image files')
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument('--workdir', help='the training run\'s workdir (its checkpoints)')
  model.add_argument('--model', help='an export folder (--config.mode=export): predicts from '
                                     'its jax.export artifact, no checkpoint needed')
  parser.add_argument('--checkpoint', default='best', help="with --workdir: 'best', 'latest' or "
                                                           'a step')
  parser.add_argument('--out', help='write predictions.csv, studies.csv, views.csv here')
  parser.add_argument('--cam', action='store_true', help='class activation map overlays')
  parser.add_argument('--worklist', action='store_true', help='rank and tier the studies')
  parser.add_argument('--body-part', choices=BODY_PARTS,
                      help='the body part of every study (else from XR_<PART> or DICOM)')
  parser.add_argument('--allow-out-of-scope', action='store_true',
                      help='score studies of body parts outside the model\'s scope too (status '
                           'predicted_out_of_scope, with a warning); without it they are '
                           'out_of_scope, not scored')
  parser.add_argument('--threshold', type=_threshold, default=0.5,
                      help='abnormal if > this, in [0, 1]')
  parser.add_argument('--batch-size', type=_batch_size, default=32,
                      help='views per batch at most (fewer views: the smallest batch that holds '
                           'them)')
  parser.add_argument('--compilation-cache', default='', metavar='DIR',
                      help="JAX's persistent compilation cache, shared with training (default "
                           "~/.cache/mura_jax/jax; 'none': off): later runs load the compiled "
                           'network and its traced program instead of making them again')
  parser.add_argument('--verbose', action='store_true',
                      help='print the traceback of errors in the input or model too')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    return predict_paths(args)
  except UserError as e:  # e.g. an --out that cannot be written, a damaged export
    return cli_lib.say_user_error(e, args.verbose)  # exit 2: EXIT_NOTHING


def predict_paths(args) -> int:
  """mura-predict's work: find the studies, load the model, predict, print and write."""
  studies, problems, sidecars, notes = study_folders.find_studies(args.paths)
  if args.out:  # before the work, not after it
    study_folders.check_out(args.out, args.paths, studies)
    workdir_lib.check_writable(args.out, '--out')
    write_marker(args.out)  # partial outputs of a run that stops are recognised too
  elif args.cam:
    study_folders.check_out(os.path.join('.', 'cam'), args.paths, studies, cam_only=True)
  for problem in problems:
    _say('error', problem)
  for note in notes:
    _say('note', note)
  if sidecars:
    _say('note', f'skipped {sidecars} macOS ._ sidecar file(s) (not images)')
  if not studies:
    print('error: nothing to predict: no PNG, JPEG or DICOM file found', file=sys.stderr)
    return EXIT_NOTHING
  parallel.use_xla_cpu_convolutions()  # before the model's first device
  parallel.enable_compilation_cache(
      args.compilation_cache, warn=lambda why: print(f'note: {why}', file=sys.stderr),
      flag='--compilation-cache')
  try:
    if args.model:
      predictor = exported.load(args.model)
      predictor.batch_size = args.batch_size
    else:
      predictor = predictor_lib.Predictor.from_workdir(args.workdir, args.checkpoint,
                                                   global_batch=args.batch_size)
  except (checkpoints.CheckpointNotFoundError, checkpoints.CheckpointMismatchError,
          exported.ExportError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_NOTHING
  if temperature_note(predictor):
    _say('note', temperature_note(predictor))
  # Read before any prediction: a damaged report or model card stops here, not after the work.
  points = operating_points(args.workdir, args.model) if args.worklist else None
  studies = study_folders.read_studies(studies, args.body_part, progress=len(studies) >= 8)
  for study in studies:
    for f, why in study.errors:
      _say('error', why)
  cam_dir = epath.Path(args.out or '.') / 'cam' if args.cam else None
  assumed = checkpoints.scope_assumed(predictor.spec)
  if assumed:
    _say('note', f'the model\'s scope: {assumed}')
  predict(predictor, studies, args.threshold, cam_dir, args.allow_out_of_scope)
  for study in studies:  # what the user must see, not only in the CSVs
    for warning in study.warnings:
      _say('note', f'{study.id}: {warning}')
  notes = worklist(studies, points, predictor) if args.worklist else []
  print(format_table(studies, args.threshold, args.worklist))
  for note in notes:
    _say('note', note)
  if args.out:
    write_outputs(args.out, studies, args.threshold)
    _say('Wrote predictions.csv, studies.csv, views.csv to', args.out, sep=' ')
  failed = problems or any(s.errors or s.left_out or s.status not in PREDICTED for s in studies)
  return EXIT_SOME_FAILED if failed else EXIT_OK


def _say(kind: str, text, sep: str = ': ') -> None:
  print(f'{kind}{sep}{study_folders.shown(os.fspath(text))}', file=sys.stderr)


def cli():
  """The `mura-predict` command. Unlike training (host.py), it keeps the system's malloc: a few
  forward passes ran faster with it than with mimalloc or glibc's huge-page tunable
  (BENCHMARKS.md, "`mura-predict` on one study")."""
  sys.exit(main())


if __name__ == '__main__':
  cli()
