r"""MURA evaluation as in the paper: per-view probabilities -> studies -> metrics with CIs.

The pieces, one file each, composed here:
  studies.py           study identity (split, body part, patient, study) and views -> studies
  prediction_files.py  reading labels, predictions and readers files (errors name file and row)
  scoring.py           a StudyTable -> the report dict: metrics, bootstrap CIs, operating points,
                       worklist (pure)
  readers.py           radiologists vs the model (paper section 4.2)
  reports.py           report.md, the terminal table, roc.png, the files

Entry points:
  `evaluate(table, options, readers=...)`        score, compare readers, write, print.
  `evaluate_checkpoint(config, workdir)`         evaluate mode: a checkpoint on a TFDS split
                                                 (through `inference`) -> WORKDIR/eval/<split>/.
  `python -m mura_jax.evaluation --predictions P.csv --labels valid_labeled_studies.csv
      [--readers R.csv] [--bootstrap 10000] [--seed 0] --out DIR`   scores any model's outputs.

Operating points: for each (metric, target), e.g. ('sensitivity', 0.95), the threshold reaching the
target on the evaluated studies (`metrics.threshold_for_target`), and every thresholded metric at it
with its bootstrap CI. The threshold is held fixed across resamples, so the CI does not include the
uncertainty of choosing it on the same studies. Worklist (paper's discussion): studies ranked by
probability; the studies at or below the highest threshold keeping sensitivity >= 0.95 could be
deprioritised; reported as counts and fractions (of normal studies and of all studies).

report.json (plain JSON; NaN is written as null):
{
  "schema_version": 1,
  "split": str | null,
  "num_studies": int, "num_abnormal": int, "num_normal": int,
  "score_kind": "probabilities" | "labels",
  "aggregation": "mean" | "max" | null (null: study-level input),
  "threshold": float,                          # abnormal if study probability > threshold
  "bootstrap": {"num_resamples": int, "seed": int, "ci_level": 0.95, "ci_method": "percentile",
                "resampling": str},
  "groups": {                                  # the 7 body parts then "all", always all 8
    "<group>": {
      "n_studies": int, "n_abnormal": int, "n_normal": int,
      "confusion": {"tp": int, "fp": int, "fn": int, "tn": int},
      "metrics": {"<metric>": ENTRY, ...}      # f1 kappa auroc accuracy sensitivity specificity
    }, ...                                     # precision npv
  },
  "operating_points": [{"target_metric": str, "target": float, "threshold": float | null,
                        "reason": str | null, "metrics": {"<metric>": ENTRY, ...}  # group "all"
                       }, ...],
  "worklist": {"min_sensitivity": float, "threshold": float | null, "reason": str | null,
               "n_studies": int, "n_deprioritised": int, "n_normal_deprioritised": int,
               "n_abnormal_deprioritised": int, "fraction_of_studies": float,
               "fraction_of_normals": ENTRY (= specificity at that threshold),
               "sensitivity": ENTRY},
               # all but the first four are null when threshold is null (reason says why)
  "readers": null | {
    "names": [str], "n_studies": int (studies read), "tie_break": "abnormal" | "normal",
    "reference": str,                          # "majority vote of the other K-1 readers"
    "groups": {"<group>": {"n_studies": int,
      "<f1|kappa>": {"readers_mean": ENTRY, "model_mean": ENTRY, "difference": DIFF,
                     "per_reader": {"<name>": {"reader": ENTRY, "model": ENTRY,
                                              "difference": DIFF}}}}},
    "versus_labels": {"<name>": {"<group>": {"sensitivity": ENTRY, "specificity": ENTRY}}}}
}
ENTRY = {"value": float | null, "ci_low": float | null, "ci_high": float | null,
         "n_studies": int, "reason": str | null (why value is null),
         "n_resamples_undefined": int | null (resamples where the metric is undefined, left out of
                                              the CI; null without bootstrap)}
        (the CI is null when the value is, or without bootstrap)
DIFF  = ENTRY + {"significant": bool | null}   (model - reader; CI excludes 0)
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from absl import logging
from etils import epath
import jax
import ml_collections

from mura_jax import prediction_files
from mura_jax import readers as readers_lib
from mura_jax import reports
from mura_jax import scoring
from mura_jax import studies
from mura_jax.studies import LabelsError, PredictionsError  # noqa: F401  (raised by evaluate)


def evaluate(table: studies.StudyTable, options: scoring.Options = scoring.Options(), *,
             readers: readers_lib.Readers | None = None, split: str | None = None,
             out_dir=None, print_table: bool = False) -> dict:
  """Scores a study table (and the readers), writes the report files to `out_dir` (an epath:
  local or gs://) if given, prints the terminal table if asked; returns the report dict."""
  report = scoring.score(table, options, split)
  if readers is not None:
    report['readers'] = readers_lib.compare(table, readers, options)
  if out_dir is not None:
    reports.write_report(out_dir, report, table)
  if print_table:
    print(reports.format_terminal_table(report))
  return report


def options_from_config(config: ml_collections.ConfigDict, num_resamples=None) -> scoring.Options:
  e = config.evaluation
  return scoring.Options(
      threshold=e.threshold, seed=e.seed,
      num_resamples=e.bootstrap_resamples if num_resamples is None else num_resamples)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluate mode: writes WORKDIR/eval/<split>/ (report.json, report.md, predictions.csv, ...).

  `config.evaluation.checkpoint`: 'best' (lowest validation loss), 'latest', or a step number;
  `config.evaluation.split`: a split of the built dataset.
  """
  from mura_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from mura_jax import inference  # pylint: disable=g-import-not-at-top
  from mura_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from mura_jax import loss  # pylint: disable=g-import-not-at-top
  e = config.evaluation
  _, data_dir = data_lib.dataset_dirs(config, workdir)
  source = input_pipeline.data_source(data_dir, e.split)
  split_index = input_pipeline.read_split_index(data_dir, e.split)
  predictor = inference.Predictor.from_workdir(workdir, e.checkpoint, config=config,
                                               global_batch=e.global_batch_size)
  logging.info('Evaluating the %s checkpoint (step %d) on %s: %d views, %d studies.',
               e.checkpoint, predictor.checkpoint['step'], e.split, len(split_index),
               len(split_index.studies))
  predictions = predictor.predict_split(source, loss_weights=loss.dataset_loss_weights(data_dir),
                                        num_workers=config.data.num_workers)
  table = studies.from_split(split_index, predictions['probability'], e.aggregation)
  readers = prediction_files.read_readers(e.readers) if e.get('readers') else None
  is_main = jax.process_index() == 0
  report = evaluate(table, options_from_config(config), readers=readers, split=e.split,
                    print_table=is_main)
  # Which weights were scored, in the report file too.
  report['checkpoint'] = {**predictor.checkpoint,
                          'weighted_loss': float(predictions['loss'].mean())}
  if is_main:
    out_dir = epath.Path(workdir) / 'eval' / e.split
    reports.write_report(out_dir, report, table)
    logging.info('Evaluation report: %s/report.json', out_dir)
  return report


# ---------------------------------------------------------------------------------------------
# Standalone scorer.


def score_files(predictions, labels, out_dir, readers=None, *, aggregation: str = 'mean',
                options: scoring.Options = scoring.Options(), split: str | None = None,
                print_table: bool = False) -> dict:
  """Scores a predictions file against a labels file (and readers); see prediction_files."""
  label_paths, truth = prediction_files.read_labels(labels)
  scores, kind, num_views, aggregation = prediction_files.read_predictions(
      predictions, label_paths, aggregation)
  table = studies.StudyTable.checked(label_paths, scores, truth, score_kind=kind,
                                     num_views=num_views, aggregation=aggregation)
  return evaluate(table, options, split=split, out_dir=out_dir, print_table=print_table,
                  readers=prediction_files.read_readers(readers) if readers else None)


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
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--threshold', type=float, default=0.5, help='abnormal if prob > this')
  parser.add_argument('--aggregation', choices=('mean', 'max'), default='mean',
                      help='views -> study, for view-level predictions')
  parser.add_argument('--tie-break', choices=('abnormal', 'normal'), default='abnormal',
                      help='reference label when the other readers split evenly')
  parser.add_argument('--chunk-size', type=int, default=None, help='resamples per jitted call')
  parser.add_argument('--split', default=None, help='name recorded in the report')
  args = parser.parse_args(argv)
  try:
    score_files(args.predictions, args.labels, args.out, args.readers,
                aggregation=args.aggregation, split=args.split, print_table=True,
                options=scoring.Options(threshold=args.threshold, num_resamples=args.bootstrap,
                                        seed=args.seed, chunk_size=args.chunk_size,
                                        tie_break=args.tie_break))
  except PredictionsError as e:  # LabelsError too
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'Wrote report.json, report.md, predictions.csv, study_probabilities.csv, roc.png to '
        f'{args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
