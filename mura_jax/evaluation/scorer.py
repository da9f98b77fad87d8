"""The scorer: any model's predictions file against labels, with bootstrap CIs (paper section 4).

    python -m mura_jax.evaluation --predictions P.csv --labels valid_labeled_studies.csv
        [--readers R.csv] [--bootstrap 10000] [--seed 0] [--compare B.csv]
        [--threshold-from REPORT.json --operating-point specificity@0.95] --out DIR

Every flag is checked before any work (`_check_args`); --out never replaces an input.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence

from etils import epath

from mura_jax import cli
from mura_jax.errors import UserError, write_problem
from mura_jax.evaluation import comparison
from mura_jax.evaluation import prediction_files
from mura_jax.evaluation import reports
from mura_jax.evaluation import scoring
from mura_jax.evaluation import studies
from mura_jax.evaluation.scoring import SEED_MAX, operating_point_problem, options_problem

def score_files(predictions, labels, out_dir, readers=None, *, aggregation: str = 'mean',
                options: scoring.Options = scoring.Options(), split: str | None = None,
                print_table: bool = False, compare=None, threshold_from=None,
                operating_point: str = 'specificity@0.95') -> dict:
  """Scores a predictions file against a labels file (and readers); see prediction_files.

  compare: a second predictions file, compared pairwise with the first (report['comparison']).
  threshold_from: a report.json whose `operating_point` gives the threshold.
  """
  source = None
  if threshold_from:  # first: a bad report is found before the files are read
    threshold, source = reports.threshold_from_report(threshold_from, operating_point)
    options = dataclasses.replace(options, threshold=threshold)
  label_paths, truth = prediction_files.read_labels(labels)

  def table_of(path):
    scores, kind, num_views, how = prediction_files.read_predictions(path, label_paths,
                                                                     aggregation)
    return studies.StudyTable.checked(label_paths, scores, truth, score_kind=kind,
                                      num_views=num_views, aggregation=how)

  table = table_of(predictions)
  report = reports.evaluate(table, options, split=split, print_table=print_table,
                    readers=prediction_files.read_readers(readers) if readers else None)
  report['threshold_from'] = source
  if compare:
    report['comparison'] = comparison.compare(table, table_of(compare), options,
                                              (str(predictions), str(compare)))
    if print_table:
      print(reports.format_comparison_table(report['comparison']))
  if out_dir is not None:
    reports.write_report(out_dir, report, table)
  return report


# What the scorer writes into --out (reports.write_report): an input under one of these names
# there would be replaced.
OUTPUT_FILES = ('report.json', 'report.md', 'predictions.csv', 'study_probabilities.csv',
                'roc.png', 'reliability.png')
INPUT_FLAGS = ('predictions', 'labels', 'readers', 'compare', 'threshold_from')


def _same_file(a: epath.Path, b: epath.Path) -> bool:
  try:
    return os.path.samefile(a, b)  # links and other spellings of one local file too
  except (OSError, TypeError, ValueError):
    return os.fspath(a).rstrip('/') == os.fspath(b).rstrip('/')  # gs://: the names


def _check_args(args) -> str | None:
  """The first problem with the scorer's flags, as one sentence; checked before any work (and
  before --out is created), so that nothing is scored for flags that cannot be used and nothing
  is lost to an output. The rules:
  - numbers: --bootstrap a whole number >= 0 (0: no CIs), --seed 0 .. 2**32 - 1, --threshold in
    [0, 1] (NaN refused), --chunk-size >= 1; --operating-point a name (`threshold`, `worklist`,
    `sensitivity@T`, `specificity@T`, 0 < T <= 1) and only with --threshold-from, which sets the
    threshold (so not with --threshold);
  - every input flag names an existing file, not a folder;
  - --out is a folder or a path that does not exist yet (created), never an existing file;
  - --out must not hold an input under a name the scorer writes (OUTPUT_FILES: --predictions
    predictions.csv in --out would be replaced by the scorer's own predictions.csv), nor a folder
    under such a name; other files in --out are left alone, and the scorer's own earlier outputs
    there are replaced (scoring again);
  - --out can be written."""
  given = {'threshold': args.threshold is not None,
           'operating_point': args.operating_point is not None}
  if given['threshold'] and args.threshold_from:
    return (f'--threshold {args.threshold} and --threshold-from {args.threshold_from}: give one; '
            '--threshold-from sets the threshold from the report.')
  if given['operating_point'] and not args.threshold_from:
    return (f'--operating-point {args.operating_point}: used only with --threshold-from (the '
            'report.json it is read from); add it, or drop --operating-point.')
  if given['operating_point']:
    problem = operating_point_problem(f'--operating-point {args.operating_point}',
                                      args.operating_point)
    if problem:
      return problem
  problem = options_problem(_options(args), {
      'num_resamples': '--bootstrap {}', 'seed': '--seed {}', 'threshold': '--threshold {}',
      'chunk_size': '--chunk-size {}'})
  if problem:
    return problem
  inputs = {}
  for flag in INPUT_FLAGS:
    value = getattr(args, flag)
    if not value:
      continue
    name = f'--{flag.replace("_", "-")}'
    path = epath.Path(value)
    if path.is_dir():
      return f'{name} {value} is a folder, not a file; give the file in it.'
    if not path.is_file():
      return f'{name} {value}: no such file; check the path.'
    inputs[name] = path
  out = epath.Path(args.out)
  if out.exists() and not out.is_dir():
    return (f'--out {args.out} is a file, not a folder; give a folder (it is created if missing) '
            'for report.json and the other outputs.')
  for written in OUTPUT_FILES:
    target = out / written
    if not target.exists():
      continue
    if target.is_dir():
      return (f'--out {args.out} holds a folder {written}, where the scorer writes its '
              f'{written}; give another --out folder.')
    for name, path in inputs.items():
      if _same_file(path, target):
        return (f'--out {args.out} holds the {name} file {target}, which the scorer would '
                f'replace with its own {written}; give another --out folder.')
  e = write_problem(out)
  if e is not None:
    return (f'--out {args.out}: cannot write there ({getattr(e, "strerror", None) or e}); give a '
            'folder you can write to.')
  return None


def _options(args) -> scoring.Options:
  return scoring.Options(threshold=0.5 if args.threshold is None else args.threshold,
                         num_resamples=args.bootstrap, seed=args.seed,
                         chunk_size=args.chunk_size, tie_break=args.tie_break)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m mura_jax.evaluation',
      description='Score MURA predictions (study labels, study probabilities or view '
                  'probabilities) against labeled studies, with bootstrap CIs.')
  parser.add_argument('--predictions', required=True, help='CSV: path,value; no header')
  parser.add_argument('--labels', required=True, help='e.g. valid_labeled_studies.csv')
  parser.add_argument('--readers', help='CSV with header study,<reader>,...; labels 0/1')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--bootstrap', type=int, default=10_000, help='resamples (0: no CIs)')
  parser.add_argument('--seed', type=int, default=0, help=f'0 .. {SEED_MAX}')
  parser.add_argument('--threshold', type=float, default=None,
                      help='abnormal if prob > this, in [0, 1] (default 0.5)')
  parser.add_argument('--aggregation', choices=('mean', 'max'), default='mean',
                      help='views -> study, for view-level predictions')
  parser.add_argument('--tie-break', choices=('abnormal', 'normal'), default='abnormal',
                      help='reference label when the other readers split evenly')
  parser.add_argument('--chunk-size', type=int, default=None, help='resamples per jitted call')
  parser.add_argument('--split', default=None, help='name recorded in the report')
  parser.add_argument('--compare', help='a second predictions file (B): the paired bootstrap of '
                      'every metric difference A - B on the same resampled studies')
  parser.add_argument('--threshold-from', help='a report.json (e.g. of the validation split) '
                      'whose operating point sets the threshold')
  parser.add_argument('--operating-point', default=None,
                      help="its name: threshold, worklist, sensitivity@0.95, specificity@0.95 "
                           "(default), ...")
  parser.add_argument('--verbose', action='store_true', help='tracebacks of input errors too')
  args = parser.parse_args(argv)
  problem = _check_args(args)
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    return 2
  try:
    score_files(args.predictions, args.labels, args.out, args.readers,
                aggregation=args.aggregation, split=args.split, print_table=True,
                options=_options(args), compare=args.compare,
                threshold_from=args.threshold_from,
                operating_point=args.operating_point or 'specificity@0.95')
  except (UserError, ValueError, OSError) as e:  # PredictionsError, LabelsError, an unwritable --out
    return cli.say_user_error(e, args.verbose, hint='')
  print(f'Wrote report.json, report.md, predictions.csv, study_probabilities.csv, roc.png to '
        f'{args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
