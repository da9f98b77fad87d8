"""The scorer (`python -m mura_jax.evaluation`): every bad input and the message it must print,
and the rule that nothing about the input's order changes a result.

    input                                      message (start)
    --predictions MISSING (also --labels,      error: --predictions MISSING: no such file; check
      --readers, --compare, --threshold-from)    the path.  (exit 2)
    a predictions file that is a folder        error: --predictions DIR: no such file
    an empty predictions file                  error: ... N problem(s): ... missing
    a header row                               warning: row 1 ... treating it as a header row
    a value outside [0, 1], NaN, a repeated,   error: one message listing every bad row with its
      unknown or missing study, a short row      file and row number (test_evaluation.py)
    an --out that is a file                    error: ... (the OS's reason), exit 2

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
  assert out.returncode == 2 and f'--predictions {folder}: no such file' in out.stderr
  (folder / 'empty.csv').write_text('')
  out = _scorer('--predictions', folder / 'empty.csv', '--labels', folder / 'labels.csv',
                '--out', tmp_path / 'o', '--bootstrap', 0)
  assert out.returncode == 2 and 'empty.csv' in out.stderr and 'missing' in out.stderr
  assert 'Traceback' not in out.stderr
  blocker = tmp_path / 'a-file'
  blocker.write_text('')
  out = _scorer('--predictions', folder / 'predictions.csv', '--labels', folder / 'labels.csv',
                '--out', blocker / 'out', '--bootstrap', 0)
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith('error: ')
