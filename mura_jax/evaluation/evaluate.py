"""Evaluate mode: a checkpoint (or an ensemble of them) on a split of the built dataset, scored as
in the paper (per-view probabilities -> studies -> metrics with bootstrap CIs), written to
WORKDIR/eval/<name>/.

The pieces of evaluation, one file each:
  studies.py           study identity (split, body part, patient, study) and views -> studies
  prediction_files.py  reading labels, predictions and readers files (errors name file and row)
  scoring.py           a StudyTable -> the report dict: metrics, bootstrap CIs, operating points,
                       worklist (pure); the checks of its options
  readers.py           radiologists vs the model (paper section 4.2)
  comparison.py        the paired bootstrap of two models on the same studies
  ensembles.py         several checkpoints -> one table
  reports.py           `evaluate` (score, readers, write, print); report.md, the terminal table,
                       roc.png, the files
  scorer.py            `python -m mura_jax.evaluation`: any model's predictions file
Paired comparison (`comparison`): --compare B.csv, or evaluation.compare / an ensemble's own
members in evaluate mode; the same bootstrap resamples score both models, and the CI of each
metric's difference says whether it excludes 0.

Operating points: for each (metric, target), e.g. ('sensitivity', 0.95), the threshold reaching the
target on the evaluated studies (`metrics.threshold_for_target`), and every thresholded metric at it
with its bootstrap CI. The threshold is held fixed across resamples, so the CI does not include the
uncertainty of choosing it on the same studies. Worklist (paper's discussion): studies ranked by
probability; the studies at or below the highest threshold keeping sensitivity >= 0.95 could be
deprioritised; reported as counts and fractions (of normal studies and of all studies).

report.json's schema: docs/evaluation.md.
"""
from __future__ import annotations

import dataclasses

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
from tfds_mura import BODY_PARTS

from mura_jax import checkpoints
from mura_jax import workdir as workdir_lib
from mura_jax.data import dataset as data_lib
from mura_jax.data import input_pipeline
from mura_jax.errors import ConfigError
from mura_jax.evaluation import calibration
from mura_jax.evaluation import comparison
from mura_jax.evaluation import ensembles
from mura_jax.evaluation import prediction_files
from mura_jax.evaluation import reports
from mura_jax.evaluation import scoring
from mura_jax.evaluation import studies
from mura_jax.evaluation.scoring import check_evaluation_config, options_from_config
from mura_jax.inference import predictor as predictor_lib
from mura_jax.runtime import parallel

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
  check_evaluation_config(config)  # not after the predictions
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
  predictions = predict_members(config, workdir, ensemble, source, split_index, tta)
  probabilities, infos = predictions['probability'], predictions['members']
  is_main = jax.process_index() == 0
  temperature = raw_table = None
  if len(ensemble) == 1 and ensemble[0].workdir == str(workdir):  # the run's own checkpoint
    temperature = stored_temperature(config, workdir, ensemble[0], predictions, split_index,
                                     data_dir, body_parts, is_main)
  if temperature is not None:  # the Predictor's scaling, applied to the logits at hand
    raw_table = ensembles.combine(probabilities, split_index, 'views', e.aggregation)
    probabilities = predictor_lib.temperature_scaled(predictions['logit'],
                                                     temperature['temperature'])
  table = ensembles.combine(probabilities, split_index, e.get('ensemble_order', 'views'),
                            e.aggregation)
  options, threshold_source = options_with_threshold(config)
  readers = prediction_files.read_readers(e.readers) if e.get('readers') else None
  report = reports.evaluate(table, options, readers=readers, split=e.split, print_table=is_main)
  if temperature is not None:
    report['calibration']['temperature'] = calibration.temperature_section(
        temperature, scoring.calibration_section(raw_table, options), e.split)
  report['tta'] = tta
  report['config_changes'] = workdir_lib.config_changes(workdir)  # intended, recorded
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
  other = comparison_table(config, e.get('compare', ''), table, source, split_index, tta)
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


def stored_temperature(config, workdir, member, predictions, split_index, data_dir, body_parts,
                       is_main: bool) -> dict | None:
  """config.evaluation.temperature: 'fit' fits T on the validation split's view logits of this
  checkpoint (without TTA; `calibration.fit_temperature`) and stores it with the model
  (`checkpoints.write_temperature`: what every Predictor of this checkpoint then applies);
  'keep' (the default) scores with the one stored for this checkpoint, if any, as predict, CAM
  and export do, so that a later plain evaluate neither drops nor ignores it; 'none' removes a
  stored one, so that nothing scales what this report scores unscaled. Returns the stored
  record, or None."""
  e = config.evaluation
  name = epath.Path(predictions['members'][0]['checkpoint']['directory']).name
  if e.get('temperature', 'keep') == 'keep':
    return checkpoints.read_temperature(workdir, name, int(member.step))
  if e.temperature != 'fit':
    removed = checkpoints.remove_temperature(workdir) if is_main else None
    if removed is not None:
      logging.warning('config.evaluation.temperature=none: removed the temperature T = %.4f '
                      'fitted earlier (%s/%s); predict, CAM and export give unscaled '
                      'probabilities again.', removed['temperature'], workdir,
                      checkpoints.TEMPERATURE_FILE)
    return None
  if e.split == 'validation' and e.get('tta', 'none') == 'none':
    logits, labels = predictions['logit'][0], split_index.label
  else:
    source, index = data_lib.split_of_body_parts(
        data_dir, 'validation', body_parts, input_pipeline.read_split_index(data_dir, 'validation'))
    logits, labels = predict_members(config, workdir, [member], source, index,
                                     'none')['logit'][0], index.label
  record = {**calibration.fit_temperature(logits, labels), 'objective': calibration.OBJECTIVE,
            'fitted_on': 'validation', 'checkpoint': {'name': name, 'step': int(member.step)}}
  if is_main:
    checkpoints.write_temperature(workdir, record)
  logging.info('Temperature T = %.4f fitted on %d validation views (mean NLL %.4f -> %.4f); '
               'stored in %s/%s.', record['temperature'], record['num_views'],
               record['nll_before'], record['nll_after'], workdir, checkpoints.TEMPERATURE_FILE)
  return record


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


def predict_members(config, workdir, ensemble, source, split_index, tta: str) -> dict:
  """{'probability': (members, views) with NaN where a member does not cover a view's body part,
  'logit': the same for the logits, 'members': what each member is (for the report)}. Every
  member's own probabilities, never temperature-scaled (`stored_temperature` decides)."""
  e = config.evaluation
  mesh = parallel.make_mesh()
  several_workdirs = len({m.workdir for m in ensemble}) > 1
  probability = np.full((len(ensemble), len(split_index)), np.nan)
  logit = np.full_like(probability, np.nan)
  infos = []
  compiled = {}  # one set of compiled steps per network: the K best of a run compile once
  for i, member in enumerate(ensemble):
    predictor = predictor_lib.Predictor.from_workdir(
        member.workdir, member.which, config=config if member.workdir == str(workdir) else None,
        global_batch=e.global_batch_size, mesh=mesh, tta=tta,
        temperature=1.0).sharing_steps_of(compiled)
    views = ensembles.covered_views(split_index, member)
    logging.info('Evaluating %s (member %d of %d) on %s: %d views, %d studies%s.',
                 member.name(True), i + 1, len(ensemble), e.split, views.size,
                 len(split_index.studies), ', flip TTA' if tta == 'flip' else '')
    member_source = (source if views.size == len(split_index)
                     else input_pipeline.SubsetSource(source, views))
    # The weighted loss (reported) with the member's own training weights (its spec).
    loss_weights = member.spec.get('loss_weights')
    out = predictor.predict_split(
        member_source, num_workers=config.data.num_workers,
        loss_weights=None if loss_weights is None else np.asarray(loss_weights, np.float32))
    probability[i, views] = out['probability']
    logit[i, views] = out['logit']
    infos.append({
        'name': member.name(several_workdirs), 'workdir': member.workdir,
        'checkpoint': dict(predictor.checkpoint), 'epoch': member.spec.get('epoch'),
        'validation_loss': member.spec.get('validation_loss'),
        'body_parts': list(member.body_parts), 'model': member.spec['model'],
        'preprocessing': predictor.preprocessing.to_dict(),
        'weighted_loss': float(out['loss'].mean()) if 'loss' in out else None})
  return {'probability': probability, 'logit': logit, 'members': infos}


def comparison_table(config, compare, table, source, split_index, tta):
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
  name, step = checkpoints.choose(compare, 'best')
  member = ensembles.Member(str(compare), 'best', step, checkpoints.read_spec(compare, name, step))
  parts = sorted({BODY_PARTS[b] for b in split_index.body_part} & set(member.body_parts),
                 key=BODY_PARTS.index)
  if not parts:
    raise ConfigError(f'config.evaluation.compare={compare} was trained on '
                     f'{", ".join(member.body_parts)}, none of the evaluated body parts.')
  probability = predict_members(config, '', [member], source, split_index, tta)['probability'][0]
  return (ensembles.member_table(probability, split_index, config.evaluation.aggregation),
          f'{epath.Path(compare).name} step {step}')


def options_with_threshold(config) -> tuple[scoring.Options, dict | None]:
  """Options of the config, the threshold taken from `evaluation.threshold_from` if set."""
  options = options_from_config(config)
  source = config.evaluation.get('threshold_from', '')
  if not source:
    return options, None
  threshold, record = reports.threshold_from_report(
      source, config.evaluation.get('operating_point', '') or 'specificity@0.95')
  return dataclasses.replace(options, threshold=threshold), record


check = check_evaluation_config


def run(config, workdir: str) -> dict:
  """Evaluate mode: `evaluate_checkpoint` as configured. After a training whose evaluation is an
  ensemble (evaluation.ensemble > 1 or other workdirs): the best checkpoint alone first
  (eval/<split>/: what predict, CAM and export read), then the ensemble of the best checkpoints
  kept (eval/<split>-ensemble/, compared with it)."""
  if config.mode != 'train' or not evaluates_an_ensemble(config):
    return evaluate_checkpoint(config, workdir)
  report = evaluate_checkpoint(single_checkpoint(config), workdir)
  ensemble = ensemble_of_kept(config, workdir)
  return report if ensemble is None else evaluate_checkpoint(ensemble, workdir)
