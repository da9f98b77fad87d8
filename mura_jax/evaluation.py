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
      [--readers R.csv] [--bootstrap 10000] [--seed 0] [--compare B.csv]
      [--threshold-from REPORT.json --operating-point specificity@0.95] --out DIR`
                                                 scores any model's outputs.
Paired comparison (`comparison`): --compare B.csv, or evaluation.compare / an ensemble's own
members in evaluate mode; the same bootstrap resamples score both models, and the CI of each
metric's difference says whether it excludes 0.

Operating points: for each (metric, target), e.g. ('sensitivity', 0.95), the threshold reaching the
target on the evaluated studies (`metrics.threshold_for_target`), and every thresholded metric at it
with its bootstrap CI. The threshold is held fixed across resamples, so the CI does not include the
uncertainty of choosing it on the same studies. Worklist (paper's discussion): studies ranked by
probability; the studies at or below the highest threshold keeping sensitivity >= 0.95 could be
deprioritised; reported as counts and fractions (of normal studies and of all studies).

report.json (plain JSON; NaN is written as null). Schema version 2 (version 1 listed all 8
groups always, and had none of "tta", "threshold_from", "checkpoint", "ensemble", "comparison"):
{
  "schema_version": 2,
  "split": str | null,
  "num_studies": int, "num_abnormal": int, "num_normal": int,
  "score_kind": "probabilities" | "labels",
  "aggregation": "mean" | "max" | null (null: study-level input),
  "threshold": float,                          # abnormal if study probability > threshold
  "bootstrap": {"num_resamples": int, "seed": int, "ci_level": 0.95, "ci_method": "percentile",
                "resampling": str},
  "groups": {                                  # the body parts with studies, then "all"
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
    "versus_labels": {"<name>": {"<group>": {"sensitivity": ENTRY, "specificity": ENTRY}}}},
  # evaluate mode and the scorer, where they apply:
  "threshold_from": null | {"report": str, "operating_point": str, "split": str | null,
                            "threshold": float},
  "comparison": null | absent | {see `comparison`: "a", "b", "n_studies", "threshold",
                "bootstrap", "groups": {"<group>": {"n_studies", "<metric>": {"a": ENTRY,
                "b": ENTRY, "difference": DIFF}}}, "significant": ["<group>/<metric>"]},
  # evaluate mode only:
  "tta": "none" | "flip",
  "config_changes": [{"time": str, "changes": {"<key>": {"before", "after"}}}]  # intended
                    # changes of the run's config (allow_config_change), oldest first; [] if none
  "checkpoint": {"which", "step", "directory", "weighted_loss"}       (one checkpoint)
  "ensemble": {"num_members": int, "order": "views" | "studies", "tta": str, "rule": str,
               "members": [{"name", "workdir", "checkpoint", "epoch", "validation_loss",
                            "body_parts", "model", "preprocessing", "weighted_loss",
                            "groups": {"<group>": {"n_studies", "metrics": {"<metric>": ENTRY}}}
                           }]}                                         (several checkpoints)
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
import dataclasses
import json
import math
import os
import sys
from typing import Sequence

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
from tfds_mura import BODY_PARTS

from mura_jax import comparison
from mura_jax import prediction_files
from mura_jax import readers as readers_lib
from mura_jax import reports
from mura_jax import scoring
from mura_jax import studies
from mura_jax.errors import ConfigError, DataError, UserError, write_problem
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
  """Evaluate mode: writes WORKDIR/eval/<name>/ (report.json, report.md, predictions.csv, ...).

  `config.evaluation.checkpoint`: 'best' (lowest validation loss), 'latest', or a step number;
  `config.evaluation.split`: a split of the built dataset; `config.data.body_parts`: the study
  types scored (default: all that the checkpoints were trained on).
  Ensembles (`ensembles`): `evaluation.ensemble=K` (the K best), `evaluation.workdirs` (other
  runs), `evaluation.ensemble_order`; `evaluation.tta='flip'`. `evaluation.compare`: another
  workdir (its best checkpoint) or a predictions CSV, compared pairwise with what is evaluated;
  an ensemble is compared with its first member (the run's own checkpoint) by default.
  `evaluation.threshold_from` + `evaluation.operating_point`: a threshold from another report.
  <name> is the split, '-ensemble' with several members, '-flip' with flip TTA: eval/<split>/ is
  always one checkpoint's (what predict, CAM and export read).
  """
  from mura_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from mura_jax import ensembles  # pylint: disable=g-import-not-at-top
  from mura_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from mura_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  check_config(config)  # not after the predictions
  e = config.evaluation
  _, data_dir = data_lib.dataset_dirs(config, workdir)
  ensemble = ensembles.members(config, workdir)
  body_parts = ensembles.evaluated_body_parts(
      data_lib.requested_body_parts(config.data.get('body_parts', 'all')), ensemble)
  left_out = [m for m in ensemble if not set(m.body_parts) & set(body_parts)]
  for m in left_out:
    logging.warning('%s step %d covers none of the evaluated body parts (%s); left out.',
                    m.workdir, m.step, ', '.join(body_parts))
  ensemble = [m for m in ensemble if m not in left_out]
  source, split_index = data_lib.split_of_body_parts(
      data_dir, e.split, body_parts, input_pipeline.read_split_index(data_dir, e.split))
  tta = e.get('tta', 'none')
  predictions = predict_members(config, workdir, ensemble, source, split_index, data_dir,
                                body_parts, tta)
  probabilities, infos = predictions['probability'], predictions['members']
  table = ensembles.combine(probabilities, split_index, e.get('ensemble_order', 'views'),
                            e.aggregation)
  options, threshold_source = options_with_threshold(config)
  readers = prediction_files.read_readers(e.readers) if e.get('readers') else None
  is_main = jax.process_index() == 0
  report = evaluate(table, options, readers=readers, split=e.split, print_table=is_main)
  report['tta'] = tta
  report['config_changes'] = checkpoints.config_changes(workdir)  # intended, recorded
  report['threshold_from'] = threshold_source
  if len(ensemble) == 1:  # which weights were scored, in the report file too
    report['checkpoint'] = {**infos[0]['checkpoint'], 'weighted_loss': infos[0]['weighted_loss']}
    name_a = f'step {infos[0]["checkpoint"]["step"]}'
  else:
    for info, member_probability in zip(infos, probabilities):
      scored = scoring.score(ensembles.member_table(member_probability, split_index,
                                                    e.aggregation), options, e.split)
      info['groups'] = {group: {'n_studies': section['n_studies'], 'metrics': section['metrics']}
                        for group, section in scored['groups'].items()}
    report['ensemble'] = {
        'num_members': len(infos), 'order': e.get('ensemble_order', 'views'), 'tta': tta,
        'rule': ('each view: the mean probability of the members covering its body part; '
                 'each study: the mean of its views' if e.get('ensemble_order', 'views') == 'views'
                 else "each member's study probabilities (mean of its views), then their mean"),
        'members': infos}
    name_a = f'ensemble of {len(infos)}'
  other = comparison_table(config, e.get('compare', ''), table, source, split_index, data_dir, tta)
  if other is None and len(ensemble) > 1:
    other = (ensembles.member_table(probabilities[0], split_index, e.aggregation),
             f'single best ({infos[0]["name"]})')
  if other is not None:
    report['comparison'] = comparison.compare(table, other[0], options, (name_a, other[1]))
  if is_main:
    if report.get('comparison'):
      print(reports.format_comparison_table(report['comparison']))
    name = e.split + ('-ensemble' if len(ensemble) > 1 else '') + ('-flip' if tta == 'flip' else '')
    out_dir = epath.Path(workdir) / 'eval' / name
    reports.write_report(out_dir, report, table)
    logging.info('Evaluation report: %s/report.json', out_dir)
  return report


def evaluates_an_ensemble(config) -> bool:
  """Whether the config's evaluation scores several checkpoints."""
  e = config.evaluation
  return int(e.get('ensemble', 1)) > 1 or bool(e.get('workdirs', ''))


def single_checkpoint(config) -> ml_collections.ConfigDict:
  """The config evaluating the run's best checkpoint alone: no ensemble, TTA or comparison."""
  single = ml_collections.ConfigDict(config.to_dict())
  single.evaluation.update(ensemble=1, workdirs='', tta='none', compare='', checkpoint='best')
  return single


def ensemble_of_kept(config, workdir) -> ml_collections.ConfigDict | None:
  """The config's ensemble of K best checkpoints, K cut to the number kept (a run of fewer epochs
  than K, with a warning); None when that leaves one checkpoint and no other workdir."""
  from mura_jax import checkpoints  # pylint: disable=g-import-not-at-top
  k, kept = int(config.evaluation.ensemble), len(checkpoints.best_steps(workdir))
  if kept >= k:
    return config
  logging.warning('The run kept %d best checkpoints, fewer than config.evaluation.ensemble=%d: '
                  'the ensemble has %d.', kept, k, kept)
  if kept <= 1 and not config.evaluation.get('workdirs', ''):
    return None
  fewer = ml_collections.ConfigDict(config.to_dict())
  fewer.evaluation.ensemble = max(kept, 1)
  return fewer


def predict_members(config, workdir, ensemble, source, split_index, data_dir, body_parts,
                    tta: str) -> dict:
  """{'probability': (members, views) with NaN where a member does not cover a view's body part,
  'members': what each member is (for the report)}."""
  from mura_jax import ensembles  # pylint: disable=g-import-not-at-top
  from mura_jax import inference  # pylint: disable=g-import-not-at-top
  from mura_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from mura_jax import loss  # pylint: disable=g-import-not-at-top
  from mura_jax import parallel  # pylint: disable=g-import-not-at-top
  e = config.evaluation
  counts = loss.dataset_image_counts(data_dir, 'train')
  # The weighted loss (reported) needs the part's training images; parts without weigh 0.
  loss_weights = loss.loss_weights_from_counts(
      counts, [p for p in body_parts if sum(counts.get(p, {}).values())])
  mesh = parallel.make_mesh()
  several_workdirs = len({m.workdir for m in ensemble}) > 1
  probability = np.full((len(ensemble), len(split_index)), np.nan)
  infos = []
  compiled = {}  # one jitted step per network shape: the K best of a run compile once
  for i, member in enumerate(ensemble):
    predictor = inference.Predictor.from_workdir(
        member.workdir, member.which, config=config if member.workdir == str(workdir) else None,
        global_batch=e.global_batch_size, mesh=mesh, tta=tta)
    views = ensembles.covered_views(split_index, member)
    logging.info('Evaluating %s (member %d of %d) on %s: %d views, %d studies%s.',
                 member.name(True), i + 1, len(ensemble), e.split, views.size,
                 len(split_index.studies), ', flip TTA' if tta == 'flip' else '')
    member_source = (source if views.size == len(split_index)
                     else input_pipeline.SubsetSource(source, views))
    shape = json.dumps([member.spec['model'], str(predictor.model.dtype)], sort_keys=True)
    if shape not in compiled:
      compiled[shape] = inference.compile_predict_step(
          predictor.model, predictor.preprocessing.in_channels, mesh, loss_weights, tta=tta)
    out = inference.predict_split(
        compiled[shape], predictor.variables, member_source, mesh=mesh,
        global_batch=predictor.global_batch, preprocessing=predictor.preprocessing,
        num_workers=config.data.num_workers, progress=True)
    probability[i, views] = out['probability']
    infos.append({
        'name': member.name(several_workdirs), 'workdir': member.workdir,
        'checkpoint': dict(predictor.checkpoint), 'epoch': member.spec.get('epoch'),
        'validation_loss': member.spec.get('validation_loss'),
        'body_parts': list(member.body_parts), 'model': member.spec['model'],
        'preprocessing': predictor.preprocessing.to_dict(),
        'weighted_loss': float(out['loss'].mean())})
  return {'probability': probability, 'members': infos}


def comparison_table(config, compare, table, source, split_index, data_dir, tta):
  """(StudyTable, name) of `evaluation.compare`: a predictions CSV or another workdir's best
  checkpoint on the same views; None when not set."""
  if not compare:
    return None
  if str(compare).lower().endswith('.csv'):
    scores, kind, num_views, aggregation = prediction_files.read_predictions(
        compare, table.paths, config.evaluation.aggregation)
    return (studies.StudyTable.checked(table.paths, scores, table.label, table.body_part,
                                       score_kind=kind, num_views=num_views,
                                       aggregation=aggregation), str(compare))
  from mura_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from mura_jax import ensembles  # pylint: disable=g-import-not-at-top
  name, step = checkpoints.choose(compare, 'best')
  member = ensembles.Member(str(compare), 'best', step, checkpoints.read_spec(compare, name, step))
  parts = sorted({BODY_PARTS[b] for b in split_index.body_part} & set(member.body_parts),
                 key=BODY_PARTS.index)
  if not parts:
    raise ConfigError(f'config.evaluation.compare={compare} was trained on '
                     f'{", ".join(member.body_parts)}, none of the evaluated body parts.')
  probability = predict_members(config, '', [member], source, split_index, data_dir, parts,
                                tta)['probability'][0]
  return (ensembles.member_table(probability, split_index, config.evaluation.aggregation),
          f'{epath.Path(compare).name} step {step}')


def threshold_from_report(path, operating_point: str) -> tuple[float, dict]:
  """(threshold, record) of an operating point of another report.json, by name: 'threshold' (its
  threshold), 'worklist', or '<sensitivity|specificity>@<target>' (e.g. 'specificity@0.95').
  A file that is not a report.json of this project raises DataError naming it."""
  try:
    report = json.loads(epath.Path(path).read_bytes())
    named = {'threshold': (report['threshold'], None),
             'worklist': (report['worklist']['threshold'], report['worklist']['reason'])}
    for point in report.get('operating_points', []):
      named[f'{point["target_metric"]}@{point["target"]:g}'] = (point['threshold'],
                                                                point['reason'])
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    what = (f'not JSON ({e})' if isinstance(e, ValueError) else
            f'no {e} in it' if isinstance(e, KeyError) else 'not a report of this project')
    raise DataError(f'{path} is not a report.json of mura-jax ({what}); give the report.json that '
                    'evaluate mode or the scorer wrote (--threshold-from / '
                    'config.evaluation.threshold_from).') from e
  if operating_point not in named:
    raise ConfigError(f'{path} has no operating point {operating_point!r}; it has '
                      f'{", ".join(named)} (config.evaluation.operating_point / '
                      '--operating-point).')
  threshold, reason = named[operating_point]
  if threshold is None:
    raise ConfigError(f'{path} has no threshold for {operating_point} ({reason}); choose '
                      'another.')
  return float(threshold), {'report': str(path), 'operating_point': operating_point,
                            'split': report.get('split'), 'threshold': float(threshold)}


def options_with_threshold(config) -> tuple[scoring.Options, dict | None]:
  """Options of the config, the threshold taken from `evaluation.threshold_from` if set."""
  options = options_from_config(config)
  source = config.evaluation.get('threshold_from', '')
  if not source:
    return options, None
  threshold, record = threshold_from_report(
      source, config.evaluation.get('operating_point', '') or 'specificity@0.95')
  return dataclasses.replace(options, threshold=threshold), record


# ---------------------------------------------------------------------------------------------
# Values checked before any work: one sentence naming the flag or key and what it accepts.

SEED_MAX = 2**32 - 1  # jax.random.PRNGKey's distinct seeds (larger ones wrap or overflow)
OPERATING_POINT_FORM = ('threshold, worklist, sensitivity@T or specificity@T with T in (0, 1] '
                        '(e.g. specificity@0.95)')


def number_problem(named: str, value, low: float, high: float | None = None, *,
                   whole: bool = False, meaning: str = '') -> str | None:
  """A sentence when `value` is not a finite number in [low, high] (`whole`: an integer), else
  None. `named` is how the user wrote it: '--bootstrap -1', '--config.evaluation.seed=-1'."""
  number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  if (number and math.isfinite(value) and value >= low and (high is None or value <= high)
      and (not whole or float(value).is_integer())):
    return None
  def text(x):
    return str(int(x)) if float(x).is_integer() else f'{x:g}'
  allowed = f'from {text(low)} to {text(high)}' if high is not None else f'{text(low)} or more'
  return (f'{named}: expected {"a whole number" if whole else "a number"} {allowed}'
          + (f' ({meaning})' if meaning else '') + '.')


def operating_point_problem(named: str, value: str) -> str | None:
  """A sentence when `value` cannot name an operating point of a report, else None."""
  metric, at, target = str(value).partition('@')
  if value in ('threshold', 'worklist'):
    return None
  if at and metric in ('sensitivity', 'specificity'):
    try:
      if 0 < float(target) <= 1:
        return None
    except ValueError:
      pass
  return (f'{named}: no operating point {value!r} can exist; a report has '
          f'{OPERATING_POINT_FORM}.')


def options_problem(options: scoring.Options, names: dict[str, str]) -> str | None:
  """The first bad value of `options`, named as `names` says ({'num_resamples': '--bootstrap
  {}', ...}: each a format with the value), or None."""
  checks = (
      ('num_resamples', dict(low=0, whole=True, meaning='bootstrap resamples; 0: no CIs')),
      ('seed', dict(low=0, high=SEED_MAX, whole=True, meaning="the bootstrap's random seed")),
      ('threshold', dict(low=0, high=1, meaning='a study is abnormal if its probability > it')),
      ('chunk_size', dict(low=1, whole=True, meaning='bootstrap resamples per jitted call')),
  )
  for field, rule in checks:
    value = getattr(options, field)
    if field in names and not (field == 'chunk_size' and value is None):
      problem = number_problem(names[field].format(value), value, **rule)
      if problem:
        return problem
  return None


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError, one sentence naming the key, for a value of `config.evaluation` that
  evaluate mode (and the evaluation after training) cannot use: bootstrap_resamples (>= 0),
  seed (0 .. 2**32 - 1), threshold (in [0, 1], not NaN), aggregation (mean | max), tta (none |
  flip), ensemble (>= 1), ensemble_order (views | studies), split (not empty), operating_point
  (with threshold_from only, of a form a report has). Batch sizes: configs.base.check_values.
  Cheap and without files: call it before any work (evaluate_checkpoint does, main.py may)."""
  e = config.evaluation
  key = '--config.evaluation.{}={}'.format
  problem = options_problem(options_from_config(config), {
      'num_resamples': key('bootstrap_resamples', '{}'), 'seed': key('seed', '{}'),
      'threshold': key('threshold', '{}')})
  if problem is None and 'ensemble' in e:
    problem = number_problem(key('ensemble', e.ensemble), e.ensemble, 1, whole=True,
                             meaning='the number of best checkpoints averaged')
  choices = (('aggregation', ('mean', 'max')), ('tta', ('none', 'flip')),
             ('ensemble_order', ('views', 'studies')))
  for name, allowed in choices:
    if problem is None and name in e and e[name] not in allowed:
      problem = f'{key(name, e[name])}: expected one of {", ".join(allowed)}.'
  if problem is None and not str(e.get('split', '')).strip():
    problem = (f'{key("split", e.get("split", ""))}: empty; give a split of the built dataset '
               '(validation, train).')
  point = e.get('operating_point', '')
  if problem is None and point:
    if not e.get('threshold_from', ''):
      problem = (f'{key("operating_point", point)}: used only with '
                 '--config.evaluation.threshold_from (the report.json it is read from); set that '
                 'too, or leave operating_point empty.')
    else:
      problem = operating_point_problem(key('operating_point', point), point)
  if problem:
    raise ConfigError(problem)


# ---------------------------------------------------------------------------------------------
# Standalone scorer.


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
    threshold, source = threshold_from_report(threshold_from, operating_point)
    options = dataclasses.replace(options, threshold=threshold)
  label_paths, truth = prediction_files.read_labels(labels)

  def table_of(path):
    scores, kind, num_views, how = prediction_files.read_predictions(path, label_paths,
                                                                     aggregation)
    return studies.StudyTable.checked(label_paths, scores, truth, score_kind=kind,
                                      num_views=num_views, aggregation=how)

  table = table_of(predictions)
  report = evaluate(table, options, split=split, print_table=print_table,
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
                'roc.png')
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
    if args.verbose:
      raise
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'Wrote report.json, report.md, predictions.csv, study_probabilities.csv, roc.png to '
        f'{args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
