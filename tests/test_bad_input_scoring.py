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
    --out holding an input under a name the  --out D holds the --predictions file D/predictions.csv,
      scorer writes (predictions.csv,          which the scorer would replace with its own
      report.json, ...; a link to it too)      predictions.csv; give another --out folder.
    --out holding a folder under such a name --out D holds a folder roc.png, where the scorer
                                               writes its roc.png; give another --out folder.
    --bootstrap -1                           --bootstrap -1: expected a whole number 0 or more ...
    --threshold nan (or 1.5)                 --threshold nan: expected a number from 0 to 1 ...
    --seed -3, --chunk-size 0                --seed -3: expected a whole number from 0 to ...
    --operating-point without --threshold-   --operating-point worklist: used only with
      from; --threshold with it                --threshold-from ... / --threshold 0.3 and
                                               --threshold-from R: give one; ...
    a --threshold-from that is not a report  R is not a report.json of mura-jax (not JSON (...)
                                               / no 'worklist' in it); give the report.json ...
  All of these before any work: nothing is read or written, --out is not created.
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

from mura_jax.evaluation import scorer
from mura_jax.evaluation.scoring import Options

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
    reports.append(scorer.score_files(folder / 'predictions.csv', folder / 'labels.csv',
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
  scored = scorer.score_files(
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
  code = scorer.main([*map(str, args), '--bootstrap', '0'])
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


def _bytes(folder):
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize('flag,name', [('--predictions', 'predictions.csv'),
                                       ('--labels', 'study_probabilities.csv'),
                                       ('--readers', 'report.md'),
                                       ('--compare', 'predictions.csv'),
                                       ('--threshold-from', 'report.json')])
def test_an_out_holding_an_input_under_an_output_name_is_refused(tmp_path, capsys, flag, name):
  """The scorer would write its own file over the input: refused before any work, and every file
  in the folder keeps its bytes."""
  folder = _files(tmp_path, 0, readers=True)
  (folder / 'predictions.csv').rename(folder / 'scores.csv')
  given = {'--predictions': folder / 'scores.csv', '--labels': folder / 'labels.csv',
           '--readers': folder / 'readers.csv'}
  (folder / name).write_bytes((given.get(flag) or folder / 'scores.csv').read_bytes())
  given[flag] = folder / name
  before = _bytes(folder)
  code, err = _main(capsys, *[a for pair in given.items() for a in pair], '--out', folder)
  assert code == 2
  assert err == (f'error: --out {folder} holds the {flag} file {folder / name}, which the scorer '
                 f'would replace with its own {name}; give another --out folder.')
  assert _bytes(folder) == before


def test_an_input_linked_into_out_and_a_folder_under_an_output_name(tmp_path, capsys):
  folder = _files(tmp_path, 0)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'predictions.csv').symlink_to(folder / 'predictions.csv')
  before = _bytes(folder)
  code, err = _main(capsys, '--predictions', folder / 'predictions.csv', '--labels',
                    folder / 'labels.csv', '--out', out)
  assert code == 2 and err.startswith(f'error: --out {out} holds the --predictions file ')
  assert _bytes(folder) == before
  (out / 'predictions.csv').unlink()
  (out / 'roc.png').mkdir()
  code, err = _main(capsys, '--predictions', folder / 'predictions.csv', '--labels',
                    folder / 'labels.csv', '--out', out)
  assert code == 2
  assert err == (f'error: --out {out} holds a folder roc.png, where the scorer writes its roc.png; '
                 'give another --out folder.')


def test_scoring_again_into_the_same_out_keeps_other_files(tmp_path, capsys):
  """The normal re-run: the scorer's own earlier outputs are replaced, anything else stays."""
  folder = _files(tmp_path, 0)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  args = ['--predictions', folder / 'predictions.csv', '--labels', folder / 'labels.csv',
          '--out', out]
  assert _main(capsys, *args)[0] == 0
  first = (out / 'predictions.csv').read_bytes()
  assert _main(capsys, *args, '--threshold', '0.9')[0] == 0
  assert (out / 'predictions.csv').read_bytes() != first  # rewritten at the other threshold
  assert (out / 'notes.txt').read_text() == 'mine'


@pytest.mark.parametrize('args,message', [
    (['--bootstrap', '-1'], '--bootstrap -1: expected a whole number 0 or more (bootstrap '
                            'resamples; 0: no CIs).'),
    (['--threshold', 'nan'], '--threshold nan: expected a number from 0 to 1 (a study is abnormal '
                             'if its probability > it).'),
    (['--threshold', '1.5'], '--threshold 1.5: expected a number from 0 to 1 (a study is abnormal '
                             'if its probability > it).'),
    (['--seed', '-3'], "--seed -3: expected a whole number from 0 to 4294967295 (the bootstrap's "
                       'random seed).'),
    (['--chunk-size', '0'], '--chunk-size 0: expected a whole number 1 or more (bootstrap '
                            'resamples per jitted call).'),
    (['--operating-point', 'worklist'], '--operating-point worklist: used only with '
     '--threshold-from (the report.json it is read from); add it, or drop --operating-point.'),
])
def test_a_bad_number_is_named_before_any_work(tmp_path, capsys, args, message):
  """One sentence naming the flag, exit 2, and --out not even created."""
  folder = _files(tmp_path, 0)
  code = scorer.main(['--predictions', str(folder / 'predictions.csv'), '--labels',
                          str(folder / 'labels.csv'), '--out', str(tmp_path / 'out'), *args])
  assert code == 2
  assert capsys.readouterr().err.strip() == f'error: {message}'
  assert not (tmp_path / 'out').exists()


def test_threshold_and_threshold_from_together_and_a_damaged_report(tmp_path, capsys):
  folder = _files(tmp_path, 0)
  report = tmp_path / 'report.json'
  report.write_text('{"threshold": 0.5')
  args = ['--predictions', folder / 'predictions.csv', '--labels', folder / 'labels.csv',
          '--out', tmp_path / 'out', '--threshold-from', report]
  code, err = _main(capsys, *args, '--threshold', '0.3')
  assert code == 2
  assert err == (f'error: --threshold 0.3 and --threshold-from {report}: give one; '
                 '--threshold-from sets the threshold from the report.')
  code, err = _main(capsys, *args)
  assert code == 2
  assert err.startswith(f'error: {report} is not a report.json of mura-jax (not JSON (')
  report.write_text('{"threshold": 0.5}')
  code, err = _main(capsys, *args)
  assert code == 2
  assert err.startswith(f"error: {report} is not a report.json of mura-jax (no 'worklist' in it)")
