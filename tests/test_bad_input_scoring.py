"""The scorer (`python -m mura_jax.evaluation`): every bad input and the message it must print
(after "error: ", exit 2, no traceback without --verbose), and the rule that nothing about the
input's order changes a result.

    input                                    message
    --predictions MISSING (also --labels,    --predictions MISSING: no such file; check the path.
      --readers, --compare, --threshold-from)
    --predictions A_FOLDER                   --predictions A_FOLDER is a folder, not a file; give
                                               the file in it.
    --out A_FILE                             --out A_FILE is a file, not a folder; give a folder (it
                                               is created if missing) for report.json and the
                                               other outputs.
    --out that cannot be written             --out P: cannot write there (Not a directory); give a
                                               folder you can write to.
    an empty predictions file                predictions file F: 1 problem(s) (empty: 1); first 1:
                                               F: no rows; it needs one "study path,probability"
                                               (or "image path,probability") row per study of the
                                               labels file
    an empty labels file                     labels file F: ... F: no studies; it needs one "study
                                               path,0|1" row per study, as MURA's
                                               valid_labeled_studies.csv
    a binary file (.xlsx, .zip, ...)         The predictions file F is not a text CSV file (byte
                                               0x.. at offset N is not UTF-8); give the CSV file
                                               itself, not a spreadsheet, archive or binary file.
    a header row                             (a warning, scored) predictions file F: row 1 [...]
                                               is not data; treating it as a header row.
    a non-numeric value                      F row N: expected "path,number", got [...]
    a value outside [0, 1] / NaN             F row N: value 1.5 outside [0, 1] for P / value is
                                               NaN for P
    a study not in the labels file           F row N: study P is not in the labels file
    a repeated study                         F row N: study P repeats row M
    a study without a prediction             F: no prediction for study P
  Problems of one file come in one message: "predictions file F: N problem(s) (kind: n, ...);
  first 10:" then one line per problem with its file and row.

Order: the bootstrap resamples rows of a table sorted by study, so shuffling the labels, the
predictions or the readers file gives the same CIs, and the scorer on a run's own
study_probabilities.csv gives the CIs of that run's report.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mura_jax import evaluation
from mura_jax.scoring import Options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study(part, patient, abnormal):
  return (f'MURA-v1.1/valid/XR_{part.upper()}/patient{patient:05d}/'
          f'study1_{"positive" if abnormal else "negative"}/')


def _files(tmp_path, seed, order=None, readers=False):
  """labels.csv, predictions.csv (and readers.csv) of 70 studies, rows in `order`."""
  rng = np.random.default_rng(0)
  parts = ('elbow', 'finger', 'forearm', 'hand', 'humerus', 'shoulder', 'wrist')
  studies = [_study(parts[i % 7], 100 + i, int(rng.random() < 0.45)) for i in range(70)]
  abnormal = [int('positive' in s) for s in studies]
  probability = np.clip(rng.normal(0.3 + 0.4 * np.asarray(abnormal), 0.25), 0, 1)
  reader_labels = (rng.random((70, 3)) < 0.15) ^ np.asarray(abnormal)[:, None].astype(bool)
  order = np.arange(70) if order is None else order
  folder = tmp_path / f'files{seed}'
  folder.mkdir()
  (folder / 'labels.csv').write_text(''.join(f'{studies[i]},{abnormal[i]}\n' for i in order))
  (folder / 'predictions.csv').write_text(
      ''.join(f'{studies[i]},{float(probability[i])!r}\n' for i in np.roll(order, 11)))
  if readers:
    (folder / 'readers.csv').write_text('study,r1,r2,r3\n' + ''.join(
        f'{studies[i]},{",".join(str(int(x)) for x in reader_labels[i])}\n'
        for i in np.roll(order, 23)))
  return folder


def _ci(report):
  return {g: {m: (e['value'], e['ci_low'], e['ci_high']) for m, e in section['metrics'].items()}
          for g, section in report['groups'].items()}


def test_shuffled_files_give_the_same_confidence_intervals(tmp_path):
  options = Options(num_resamples=300, seed=4)
  reports = []
  for seed, order in enumerate([None, *(np.random.default_rng(s).permutation(70) for s in (1, 2))]):
    folder = _files(tmp_path, seed, order, readers=True)
    reports.append(evaluation.score_files(folder / 'predictions.csv', folder / 'labels.csv',
                                          folder / 'out', folder / 'readers.csv',
                                          options=options))
  for report in reports[1:]:
    assert _ci(report) == _ci(reports[0])
    assert report['readers']['groups'] == reports[0]['readers']['groups']
  # The CIs are real bootstrap intervals, not a degenerate constant.
  kappa = reports[0]['groups']['all']['metrics']['kappa']
  assert kappa['ci_low'] < kappa['value'] < kappa['ci_high']


def test_the_scorer_repeats_an_evaluation_report(trained_workdir, synthetic_dir, tmp_path):
  """The run's study probabilities, scored with the same seed and resamples, give the run's CIs."""
  workdir, config = trained_workdir
  evaluated = json.loads((workdir / 'eval' / 'validation' / 'report.json').read_text())
  with open(workdir / 'eval' / 'validation' / 'study_probabilities.csv') as f:
    rows = list(csv.DictReader(f))
  predictions = tmp_path / 'predictions.csv'
  predictions.write_text(''.join(f'{r["study"]},{r["probability"]}\n' for r in rows[::-1]))
  scored = evaluation.score_files(
      predictions, synthetic_dir / 'MURA-v1.1' / 'valid_labeled_studies.csv', tmp_path / 'out',
      options=Options(num_resamples=config.evaluation.bootstrap_resamples,
                      seed=config.evaluation.seed, threshold=config.evaluation.threshold))
  assert _ci(scored) == _ci(evaluated)


def _scorer(*args):
  return subprocess.run([sys.executable, '-m', 'mura_jax.evaluation', *map(str, args)],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize('flag', ['--predictions', '--labels', '--readers', '--compare',
                                  '--threshold-from'])
def test_a_missing_file_is_named_with_its_flag(tmp_path, flag):
  folder = _files(tmp_path, 0)
  given = {'--predictions': folder / 'predictions.csv', '--labels': folder / 'labels.csv'}
  given[flag] = tmp_path / 'missing.csv'
  args = [a for pair in given.items() for a in pair]
  out = _scorer(*args, '--out', tmp_path / 'out', '--bootstrap', 0)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip() == f'error: {flag} {tmp_path / "missing.csv"}: no such file; check the path.'
  assert not (tmp_path / 'out').exists()


def test_a_folder_an_empty_file_and_an_unwritable_out(tmp_path):
  folder = _files(tmp_path, 0)
  out = _scorer('--predictions', folder, '--labels', folder / 'labels.csv', '--out', tmp_path / 'o')
  assert out.returncode == 2
  assert out.stderr.strip() == (f'error: --predictions {folder} is a folder, not a file; give the '
                                'file in it.')
  (folder / 'empty.csv').write_text('')
  out = _scorer('--predictions', folder / 'empty.csv', '--labels', folder / 'labels.csv',
                '--out', tmp_path / 'o', '--bootstrap', 0)
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert (f'{folder / "empty.csv"}: no rows; it needs one "study path,probability" (or "image '
          'path,probability") row per study of the labels file') in out.stderr
  assert 'no prediction for study' not in out.stderr  # one line, not one per study
  blocker = tmp_path / 'a-file'
  blocker.write_text('')
  out = _scorer('--predictions', folder / 'predictions.csv', '--labels', folder / 'labels.csv',
                '--out', blocker / 'out', '--bootstrap', 0)
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert out.stderr.strip() == (f'error: --out {blocker / "out"}: cannot write there (Not a '
                                'directory); give a folder you can write to.')


def _main(capsys, *args):
  code = evaluation.main([*map(str, args), '--bootstrap', '0'])
  return code, capsys.readouterr().err.strip()


def test_an_out_that_is_a_file(tmp_path, capsys):
  folder = _files(tmp_path, 0)
  blocker = tmp_path / 'a-file'
  blocker.write_text('')
  code, err = _main(capsys, '--predictions', folder / 'predictions.csv', '--labels',
                    folder / 'labels.csv', '--out', blocker)
  assert code == 2
  assert err == (f'error: --out {blocker} is a file, not a folder; give a folder (it is created if '
                 'missing) for report.json and the other outputs.')


def _edit(folder, name, edit):
  rows = (folder / 'predictions.csv').read_text().splitlines(keepends=True)
  (folder / name).write_text(''.join(edit(rows)))
  return folder / name, rows


def _field(row, i):
  return row.strip().split(',')[i]


@pytest.mark.parametrize('case', ['non_numeric', 'out_of_range', 'nan', 'unknown', 'duplicate',
                                  'missing'])
def test_bad_prediction_rows_are_named_with_file_and_row(tmp_path, capsys, case):
  folder = _files(tmp_path, 0)
  unknown = 'MURA-v1.1/valid/XR_WRIST/patient99999/study1_negative/'
  edits = {
      'non_numeric': lambda r: [f'{_field(r[0], 0)},abc\n', *r[1:]],
      'out_of_range': lambda r: [f'{_field(r[0], 0)},1.5\n', *r[1:]],
      'nan': lambda r: [f'{_field(r[0], 0)},nan\n', *r[1:]],
      'unknown': lambda r: [*r, f'{unknown},0.2\n'],
      'duplicate': lambda r: [*r, r[3]],
      'missing': lambda r: r[:-1],
  }
  path, rows = _edit(folder, f'{case}.csv', edits[case])
  first, fourth, last = _field(rows[0], 0), _field(rows[3], 0), _field(rows[-1], 0)
  expected = {
      'non_numeric': f"{path} row 1: expected \"path,number\", got ['{first}', 'abc']",
      'out_of_range': f'{path} row 1: value 1.5 outside [0, 1] for {first}',
      'nan': f'{path} row 1: value is NaN for {first}',
      'unknown': f'{path} row 71: study {unknown} is not in the labels file',
      'duplicate': f'{path} row 71: study {fourth} repeats row 4',
      'missing': f'{path}: no prediction for study {last}',
  }[case]
  code, err = _main(capsys, '--predictions', path, '--labels', folder / 'labels.csv',
                    '--out', tmp_path / 'out')
  assert code == 2
  lines = err.splitlines()
  assert lines[0].startswith(f'error: predictions file {path}: 1 problem(s) (')
  assert lines[1:] == ['  ' + expected]  # nothing else, e.g. no 'missing' for a malformed row


def test_a_binary_file_and_an_empty_labels_file(tmp_path, capsys):
  folder = _files(tmp_path, 0)
  binary = folder / 'predictions.xlsx'
  binary.write_bytes(b'PK\x03\x04' + np.random.default_rng(0).bytes(500))
  code, err = _main(capsys, '--predictions', binary, '--labels', folder / 'labels.csv',
                    '--out', tmp_path / 'out')
  assert code == 2
  assert err.startswith(f'error: The predictions file {binary} is not a text CSV file (byte ')
  assert err.endswith('is not UTF-8); give the CSV file itself, not a spreadsheet, archive or '
                      'binary file.')
  (folder / 'empty.csv').write_text('\n')
  code, err = _main(capsys, '--predictions', folder / 'predictions.csv', '--labels',
                    folder / 'empty.csv', '--out', tmp_path / 'out')
  assert code == 2
  assert err.splitlines()[-1] == (f'  {folder / "empty.csv"}: no studies; it needs one "study '
                                  'path,0|1" row per study, as MURA\'s valid_labeled_studies.csv')


def test_a_header_row_is_read_with_a_warning(tmp_path, capsys, caplog):
  folder = _files(tmp_path, 0)
  path, _ = _edit(folder, 'header.csv', lambda r: ['study,probability\n', *r])
  code, _ = _main(capsys, '--predictions', path, '--labels', folder / 'labels.csv',
                  '--out', tmp_path / 'out')
  assert code == 0
  assert (f"predictions file {path}: row 1 ['study', 'probability'] is not data; treating it as "
          'a header row.') in caplog.text
