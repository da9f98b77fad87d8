"""Scoring a study table and rendering its report: `evaluate` (score, readers, write, print);
report.md (Table-2-like), the terminal table, roc.png, and the files; the threshold of another
report. report.json's schema: docs/evaluation.md.

Rendering a report: report.md (Table-2-like), the terminal table, roc.png, and the files.

Files written to the out dir (the caller passes WORKDIR/eval/<split>/): report.json, report.md,
predictions.csv (official submission format: study path, 0/1, no header), study_probabilities.csv
(header: study,body_part,num_views,probability,predicted_abnormal,label,worklist_rank; rank 1 is
read first), roc.png (8 panels; reader operating points when given), reliability.png (the
calibration of the study probabilities, `calibration.reliability_figure`; probabilities only).
"""
from __future__ import annotations

import csv
import io
import json

from etils import epath
import numpy as np

from mura_jax.errors import ConfigError, DataError
from mura_jax.evaluation import bootstrap
from mura_jax.evaluation import calibration
from mura_jax.evaluation import metrics
from mura_jax.evaluation import readers as readers_lib
from mura_jax.evaluation import scoring
from mura_jax.evaluation.metrics import BODY_PARTS, GROUPS, METRICS
from mura_jax.evaluation.readers import READER_METRICS
from mura_jax.evaluation.scoring import THRESHOLDED
from mura_jax.evaluation.studies import StudyTable


_METRIC_TITLES = {'f1': 'F1', 'kappa': 'Kappa', 'auroc': 'AUROC', 'accuracy': 'Accuracy',
                  'sensitivity': 'Sensitivity', 'specificity': 'Specificity',
                  'precision': 'Precision', 'npv': 'NPV'}


def _group_title(group: str) -> str:
  return 'Aggregate' if group == 'all' else group.capitalize()


def format_markdown(report: dict) -> str:
  """report.md: a Table-2-like table, operating points, worklist, reader comparison."""
  boot = report['bootstrap']
  lines = [f'# MURA evaluation{": " + report["split"] if report["split"] else ""}', '']
  how = f'{report["aggregation"]} of views' if report['aggregation'] else 'as given'
  lines.append(f'{report["num_studies"]} studies ({report["num_abnormal"]} abnormal), study '
               f'probability {how}, abnormal if > {report["threshold"]:g}. ' +
               (f'Values with {boot["ci_level"]:.0%} CIs from {boot["num_resamples"]} bootstrap '
                f'resamples of studies (seed {boot["seed"]}; {boot["resampling"]}).'
                if boot['num_resamples'] else 'No bootstrap (no CIs).'))
  if report['score_kind'] == 'labels':
    lines.append('')
    lines.append('Predictions are hard labels: AUROC is computed from them (a single operating '
                 'point, so AUROC = (sensitivity + specificity) / 2).')
  lines += ['', '| Study type | Studies | Abnormal | ' +
            ' | '.join(_METRIC_TITLES[m] for m in METRICS) + ' |',
            '|---|---:|---:|' + '---|' * len(METRICS)]
  notes = {}  # reason -> footnote number; one note per distinct reason
  for group, section in report['groups'].items():
    cells = []
    for m in METRICS:
      entry = section['metrics'][m]
      cell = bootstrap.ci_text(entry)
      if entry['reason']:
        cell += f' [{notes.setdefault(entry["reason"], len(notes) + 1)}]'
      cells.append(cell)
    title = f'**{_group_title(group)}**' if group == 'all' else _group_title(group)
    lines.append(f'| {title} | {section["n_studies"]} | {section["n_abnormal"]} | '
                 + ' | '.join(cells) + ' |')
  if notes:
    lines += [''] + [f'[{i}] {reason}.' for reason, i in notes.items()]
  lines += _scored_what_lines(report)
  lines += calibration.markdown_lines(report)
  if report['operating_points']:
    lines += ['', '## Operating points (all studies)', '',
              '| Target | Threshold | ' + ' | '.join(_METRIC_TITLES[m] for m in THRESHOLDED) +
              ' |', '|---|---:|' + '---|' * len(THRESHOLDED)]
    for op in report['operating_points']:
      target = f'{op["target_metric"]} >= {op["target"]:g}'
      if op['threshold'] is None:
        lines.append(f'| {target} | n/a ({op["reason"]}) |' + ' |' * len(THRESHOLDED))
        continue
      lines.append(f'| {target} | {op["threshold"]:.4f} | ' +
                   ' | '.join(bootstrap.ci_text(op['metrics'][m]) for m in THRESHOLDED) + ' |')
    lines.append('')
    lines.append('Thresholds are chosen on these studies and held fixed across resamples.')
  work = report['worklist']
  lines += ['', '## Worklist', '']
  if work['threshold'] is None:
    lines.append(f'Not available: {work["reason"]}.')
  else:
    lines.append(
        f'Ranking studies by probability, the {work["n_deprioritised"]} lowest '
        f'({work["fraction_of_studies"]:.1%} of {work["n_studies"]} studies, threshold '
        f'{work["threshold"]:.4f}) could be deprioritised at sensitivity '
        f'{bootstrap.ci_text(work["sensitivity"])} (>= {work["min_sensitivity"]:g}): '
        f'{work["n_normal_deprioritised"]} normal studies, a fraction '
        f'{bootstrap.ci_text(work["fraction_of_normals"])} of all normal studies, and '
        f'{work["n_abnormal_deprioritised"]} abnormal.')
  readers = report['readers']
  header = lambda first, who: f'| {first} | ' + ' | '.join(  # pylint: disable=g-long-lambda
      f'{who} {_METRIC_TITLES[m]} | Model {_METRIC_TITLES[m]} | Difference'
      for m in READER_METRICS) + ' |'
  if readers:
    lines += ['', '## Readers', '',
              f'{len(readers["names"])} readers ({", ".join(readers["names"])}) on '
              f'{readers["n_studies"]} studies; each scored against the {readers["reference"]}, '
              f'the model against each of those majorities; ties broken as '
              f'{readers["tie_break"]}. Difference = model - readers; * = CI excludes 0.', '',
              header('Study type', 'Readers'), '|---|' + '---|---|---|' * len(READER_METRICS)]
    def row(title, summaries):
      cells = []
      for m, (reader, model, diff) in zip(READER_METRICS, summaries):
        cells += [bootstrap.ci_text(reader), bootstrap.ci_text(model),
                  bootstrap.ci_text(diff) + (' *' if diff['significant'] else '')]
      return f'| {title} | ' + ' | '.join(cells) + ' |'

    for group, section in readers['groups'].items():
      if section['n_studies']:  # body parts the readers did not read are left out
        lines.append(row(f'{_group_title(group)} ({section["n_studies"]})', [
            (section[m]['readers_mean'], section[m]['model_mean'], section[m]['difference'])
            for m in READER_METRICS]))
    lines += ['', 'Per reader, all read studies (the model against that reader\'s majority):', '',
              header('Reader', 'Reader'), '|---|' + '---|---|---|' * len(READER_METRICS)]
    aggregate = readers['groups']['all']
    for name in readers['names']:
      lines.append(row(name, [tuple(aggregate[m]['per_reader'][name][key]
                                    for key in ('reader', 'model', 'difference'))
                              for m in READER_METRICS]))
  return '\n'.join(lines) + '\n'


_COMPARED = ('auroc', 'kappa', 'f1', 'sensitivity', 'specificity')  # columns of the tables


def _scored_what_lines(report: dict) -> list[str]:
  """Ensemble members, TTA, the threshold's origin and the paired comparison, where present."""
  lines = []
  source = report.get('threshold_from')
  if source:
    lines += ['', f'Threshold {source["threshold"]:.4f}: the {source["operating_point"]} '
              f'operating point of {source["report"]} (split {source["split"]}).']
  if report.get('tta') == 'flip':
    lines += ['', 'Flip test-time augmentation: each view\'s probability is the mean over the view '
              'and its lateral mirror.']
  ensemble = report.get('ensemble')
  if ensemble:
    lines += ['', f'## Ensemble of {ensemble["num_members"]}', '',
              f'Rule: {ensemble["rule"]}. Each member alone, on the studies it covers:', '',
              '| Member | Epoch | Validation loss | Parts | ' +
              ' | '.join(f'{_METRIC_TITLES[m]} (all)' for m in _COMPARED) + ' |',
              '|---|---:|---:|---|' + '---|' * len(_COMPARED)]
    for member in ensemble['members']:
      loss = member['validation_loss']
      parts = ('all' if len(member['body_parts']) == len(BODY_PARTS)
               else ', '.join(member['body_parts']))
      lines.append(f'| {member["name"]} | {member["epoch"]} | '
                   f'{"n/a" if loss is None else f"{loss:.4f}"} | {parts} | ' +
                   ' | '.join(bootstrap.ci_text(member['groups']['all']['metrics'][m]) for m in _COMPARED)
                   + ' |')
    lines.append('| **ensemble** | | | | ' + ' | '.join(
        bootstrap.ci_text(report['groups']['all']['metrics'][m]) for m in _COMPARED) + ' |')
  compared = report.get('comparison')
  if compared:
    lines += ['', f'## Paired comparison: {compared["a"]} - {compared["b"]}', '',
              f'On {compared["n_studies"]} studies, both at threshold {compared["threshold"]:g}; '
              f'differences with {compared["bootstrap"]["ci_level"]:.0%} CIs from '
              f'{compared["bootstrap"]["num_resamples"]} paired bootstrap resamples (each '
              'resample scores both); * = CI excludes 0.', '',
              '| Study type | ' + ' | '.join(_METRIC_TITLES[m] for m in _COMPARED) + ' |',
              '|---|' + '---|' * len(_COMPARED)]
    for group, section in compared['groups'].items():
      lines.append(f'| {_group_title(group)} ({section["n_studies"]}) | ' + ' | '.join(
          _difference_text(section[m]) for m in _COMPARED) + ' |')
    lines += ['', 'Differences excluding 0: ' + (', '.join(compared['significant']) or 'none') + '.']
  return lines


def _difference_text(section: dict) -> str:
  """'0.950 vs 0.930: +0.020 (-0.010, 0.050) *' for one metric of a paired comparison."""
  a, b, diff = section['a']['value'], section['b']['value'], section['difference']
  if diff['value'] is None:
    return 'n/a'
  text = f'{a:.3f} vs {b:.3f}: {diff["value"]:+.3f}'
  if diff['ci_low'] is not None:
    text += f' ({diff["ci_low"]:+.3f}, {diff["ci_high"]:+.3f})' + (' *' if diff['significant'] else '')
  return text


def format_comparison_table(compared: dict) -> str:
  """The paired comparison as plain text, for the end of a run."""
  rows = [['group', 'n'] + [f'{_METRIC_TITLES[m]} A-B [CI]' for m in _COMPARED]]
  for group, section in compared['groups'].items():
    cells = []
    for m in _COMPARED:
      diff = section[m]['difference']
      cell = 'n/a' if diff['value'] is None else f'{diff["value"]:+.3f}'
      if diff['ci_low'] is not None:
        cell += f' [{diff["ci_low"]:+.3f},{diff["ci_high"]:+.3f}]' + ('*' if diff['significant']
                                                                      else '')
      cells.append(cell)
    rows.append([group, str(section['n_studies'])] + cells)
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  text = ['  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
          for r in rows]
  text.insert(1, '-' * len(text[0]))
  text.insert(0, f'Paired comparison A = {compared["a"]}, B = {compared["b"]} '
                 f'({compared["bootstrap"]["num_resamples"]} paired resamples; * = CI excludes 0):')
  return '\n'.join(text)


def format_terminal_table(report: dict) -> str:
  """A plain-text table of every group's metrics (value and CI), for the end of a run."""
  header = ['group', 'n', 'abn'] + [_METRIC_TITLES[m] for m in METRICS]
  rows = [header]
  for group, section in report['groups'].items():
    rows.append([group, str(section['n_studies']), str(section['n_abnormal'])] +
                [bootstrap.ci_text(section['metrics'][m], 3).replace(' (', ' [').replace(', ', '-')
                 .replace(')', ']') for m in METRICS])
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  text = ['  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
          for r in rows]
  text.insert(1, '-' * len(text[0]))
  if report.get('calibration'):
    text.append('ECE (10 equal-width bins of the study probability): ' + ', '.join(
        f'{group} {section["ece"]["value"]:.3f}' for group, section
        in report['calibration']['groups'].items() if section['ece']['value'] is not None))
  boot = report['bootstrap']
  if boot['num_resamples']:
    text.append(f'{boot["ci_level"]:.0%} CIs from {boot["num_resamples"]} bootstrap resamples '
                f'(seed {boot["seed"]}).')
  return '\n'.join(text)


def roc_figure(scores, truth, part, threshold, readers_versus_labels=None):
  """A matplotlib Figure with one ROC panel per group (2 x 4), no pyplot state touched."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(16, 8.5))
  FigureCanvasAgg(figure)
  axes = figure.subplots(2, 4)
  membership = metrics.body_part_membership(part)
  for g, (group, ax) in enumerate(zip(GROUPS, axes.ravel())):
    s, y = scores[membership[g]], truth[membership[g]].astype(bool)
    ax.plot([0, 1], [0, 1], color='0.8', lw=1)
    title = f'{_group_title(group)} (n={y.size})'
    if y.any() and (~y).any():
      fpr, tpr, _ = metrics.roc_curve(s, y)
      auroc = metrics.auroc_u2(s, y, np.ones((1, y.size), bool))[0] / (2 * y.sum() * (~y).sum())
      ax.plot(fpr, tpr, color='C0', lw=1.5, label='model')
      predicted = s > threshold
      ax.plot([(predicted & ~y).sum() / (~y).sum()], [(predicted & y).sum() / y.sum()], 'o',
              color='C0', label=f'model at {threshold:g}')
      title += f'  AUROC {auroc:.3f}'
    else:
      ax.text(0.5, 0.5, 'AUROC undefined\n(one class only)', ha='center', va='center')
    for r, (name, per_group) in enumerate((readers_versus_labels or {}).items()):
      sens = per_group[group]['sensitivity']['value']
      spec = per_group[group]['specificity']['value']
      if sens is not None and spec is not None:
        ax.plot([1 - spec], [sens], 'x^sdvP*'[r % 7], color=f'C{1 + r % 9}', label=name)
    ax.set(title=title, xlim=(0, 1), ylim=(0, 1.01), xlabel='1 - specificity',
           ylabel='sensitivity', aspect='equal')
    if ax.get_legend_handles_labels()[0]:
      ax.legend(loc='lower right', fontsize='x-small')
  figure.tight_layout()
  return figure


def write_report(out_dir, report: dict, table: StudyTable) -> None:
  """Writes report.json, report.md, predictions.csv, study_probabilities.csv and roc.png."""
  study_paths, scores, truth, part = table.paths, table.probability, table.label, table.body_part
  num_views = table.num_views
  predicted = (scores > report['threshold']).astype(np.int64)
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'report.json').write_text(json.dumps(report, indent=2, allow_nan=False) + '\n')
  (out / 'report.md').write_text(format_markdown(report))
  # Official submission format: study path with '/', label, no header, '\n' line ends.
  (out / 'predictions.csv').write_text(
      ''.join(f'{p},{int(a)}\n' for p, a in zip(study_paths, predicted)))
  # Worklist rank 1 = highest probability, read first; ties keep the input order.
  rank = np.empty(len(scores), np.int64)
  rank[np.argsort(-scores, kind='stable')] = np.arange(1, len(scores) + 1)
  table = io.StringIO()
  writer = csv.writer(table, lineterminator='\n')
  writer.writerow(['study', 'body_part', 'num_views', 'probability', 'predicted_abnormal', 'label',
                   'worklist_rank'])
  for i, p in enumerate(study_paths):
    writer.writerow([p, BODY_PARTS[part[i]], '' if num_views is None else int(num_views[i]),
                     repr(float(scores[i])), int(predicted[i]), int(truth[i]), int(rank[i])])
  (out / 'study_probabilities.csv').write_text(table.getvalue())
  readers = report['readers']['versus_labels'] if report['readers'] else None
  figure = roc_figure(scores, truth, part, report['threshold'], readers)
  _write_png(figure, out / 'roc.png')
  if report.get('calibration'):
    _write_png(calibration.reliability_figure(report['calibration']), out / 'reliability.png')


def _write_png(figure, path) -> None:
  png = io.BytesIO()
  figure.savefig(png, format='png', dpi=100)
  path.write_bytes(png.getvalue())


def evaluate(table: StudyTable, options: scoring.Options = scoring.Options(), *,
             readers: readers_lib.Readers | None = None, split: str | None = None,
             out_dir=None, print_table: bool = False) -> dict:
  """Scores a study table (and the readers), writes the report files to `out_dir` (an epath:
  local or gs://) if given, prints the terminal table if asked; returns the report dict."""
  report = scoring.score(table, options, split)
  if readers is not None:
    report['readers'] = readers_lib.compare(table, readers, options)
  if out_dir is not None:
    write_report(out_dir, report, table)
  if print_table:
    print(format_terminal_table(report))
  return report


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
