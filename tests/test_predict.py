"""`mura-predict`: the same study probabilities as evaluate mode, DICOM as PNG, every bad input
reported without losing a study, worklist tiers, exit statuses."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mura_jax.runtime import parallel
from mura_jax.serving import predict
from mura_jax.serving import study_folders
from mura_jax.runtime.parallel import enable_compilation_cache  # the real one (conftest stubs the name)
from mura_jax.errors import UserError

from test_images import write_dicom


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _run(capsys, *args):
  code = predict.main([str(a) for a in args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_predict_gives_evaluate_modes_study_probabilities(trained_workdir, synthetic_dir, capsys,
                                                          tmp_path):
  workdir, _ = trained_workdir
  code, out, err = _run(capsys, synthetic_dir / 'MURA-v1.1' / 'valid', '--workdir', workdir,
                        '--out', tmp_path)
  assert code == predict.EXIT_OK, err
  evaluated = {r['study']: float(r['probability'])
               for r in _rows(workdir / 'eval' / 'validation' / 'study_probabilities.csv')}
  predicted = {r['study']: float(r['probability']) for r in _rows(tmp_path / 'studies.csv')}
  assert predicted.keys() == evaluated.keys() and len(predicted) == 7 * 4
  for study, p in predicted.items():
    assert p == pytest.approx(evaluated[study], abs=1e-6), study
  assert 'sidecar' in err  # the synthetic tree's ._ files are skipped and counted
  submission = (tmp_path / 'predictions.csv').read_text().splitlines()
  assert len(submission) == 28 and all(line.endswith((',0', ',1')) for line in submission)
  assert 'MURA-v1.1/valid/XR_' in out


def _image(synthetic_dir, k=0):
  paths = sorted((synthetic_dir / 'MURA-v1.1' / 'valid' / 'XR_WRIST').rglob('image*.png'))
  return [p for p in paths if not p.name.startswith('._')][k]


def test_monochrome1_dicom_predicts_the_pngs_probability(trained_workdir, synthetic_dir, capsys,
                                                         tmp_path):
  workdir, _ = trained_workdir
  png = _image(synthetic_dir)
  pixels = np.asarray(Image.open(png).convert('L'))
  (tmp_path / 'png' / 'XR_WRIST' / 'study').mkdir(parents=True)
  shutil.copy(png, tmp_path / 'png' / 'XR_WRIST' / 'study' / 'image1.png')
  # Two files of one DICOM study in two folders: grouped by StudyInstanceUID.
  for folder in ('a', 'b'):
    (tmp_path / 'dicom' / folder).mkdir(parents=True)
    write_dicom(tmp_path / 'dicom' / folder / 'view', 255 - pixels, photometric='MONOCHROME1',
                body_part='WRIST', study_uid='1.2.3.4')
  code, out, err = _run(capsys, tmp_path / 'png', tmp_path / 'dicom', '--workdir', workdir,
                        '--out', tmp_path / 'out')
  assert code == predict.EXIT_OK, err
  rows = {r['study']: r for r in _rows(tmp_path / 'out' / 'studies.csv')}
  assert rows['1.2.3.4']['views'] == '2' and rows['1.2.3.4']['body_part'] == 'wrist'
  png_row = next(r for s, r in rows.items() if s.endswith('XR_WRIST/study/'))
  assert float(rows['1.2.3.4']['probability']) == pytest.approx(float(png_row['probability']),
                                                                abs=1e-6)


def test_bad_inputs_are_reported_and_no_study_is_lost(trained_workdir, synthetic_dir, capsys,
                                                      tmp_path):
  workdir, _ = trained_workdir
  good = _image(synthetic_dir)
  mixed = tmp_path / 'XR_WRIST' / 'patient1' / 'study1'
  broken = tmp_path / 'XR_HAND' / 'patient2' / 'study1'
  chest = tmp_path / 'XR_CHEST' / 'patient3' / 'study1'
  unknown = tmp_path / 'misc' / 'study1'
  for folder in (mixed, broken, chest, unknown):
    folder.mkdir(parents=True)
  shutil.copy(good, mixed / 'image1.png')
  (mixed / 'image2.png').write_text('not an image')
  (mixed / 'image3.png').write_bytes(good.read_bytes()[:500])  # truncated
  write_dicom(mixed / 'image4.dcm', np.zeros((4, 4), np.uint8), with_pixels=False)
  (broken / 'image1.png').write_text('not an image either')
  shutil.copy(good, chest / 'image1.png')
  shutil.copy(good, unknown / 'image1.png')
  code, out, err = _run(capsys, tmp_path, '--workdir', workdir, '--out', tmp_path / 'out')
  assert code == predict.EXIT_SOME_FAILED
  for name in ('image2.png', 'image3.png', 'image4.dcm'):
    assert f'{mixed / name}' in err, name
  assert 'without pixel data' in err and f'{broken / "image1.png"}' in err
  status = {r['study']: r for r in _rows(tmp_path / 'out' / 'studies.csv')}
  by_folder = {s.split('/')[-4] if 'XR_' in s else 'misc': r for s, r in status.items()}
  assert by_folder['XR_WRIST']['status'] == 'predicted'
  assert '3 of 4 files unreadable' in by_folder['XR_WRIST']['warnings']
  assert by_folder['XR_HAND']['status'] == 'error' and by_folder['XR_HAND']['probability'] == ''
  assert by_folder['XR_CHEST']['status'] == 'out_of_scope'
  assert "'chest' is not one of the 7" in by_folder['XR_CHEST']['warnings']
  assert by_folder['misc']['status'] == 'out_of_scope'
  assert 'pass --body-part' in by_folder['misc']['warnings']
  views = _rows(tmp_path / 'out' / 'views.csv')
  assert sum(r['status'] == 'error' for r in views) == 4
  # The user says what the unknown study is: it is predicted.
  code, out, err = _run(capsys, unknown, '--workdir', workdir, '--body-part', 'wrist')
  assert code == predict.EXIT_OK and 'predicted' in out


def test_nothing_to_predict_and_usage_errors(trained_workdir, capsys, tmp_path):
  workdir, _ = trained_workdir
  (tmp_path / 'empty').mkdir()
  code, _, err = _run(capsys, tmp_path / 'empty', '--workdir', workdir)
  assert code == predict.EXIT_NOTHING and 'no PNG, JPEG or DICOM file' in err
  code, _, err = _run(capsys, tmp_path / 'missing', '--workdir', workdir)
  assert code == predict.EXIT_NOTHING and 'no such file or folder' in err
  Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / 'empty' / 'x.png')
  code, _, err = _run(capsys, tmp_path / 'empty', '--workdir', tmp_path / 'no_run')
  assert code == predict.EXIT_NOTHING and 'train first' in err


def test_unwritable_out_fails_before_predicting(trained_workdir, capsys, tmp_path):
  """An --out that cannot be written is a sentence before any work; --verbose adds the traceback."""
  workdir, _ = trained_workdir
  (tmp_path / 'study').mkdir()
  Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / 'study' / 'x.png')
  blocked = tmp_path / 'a-file'
  blocked.write_text('')
  out = blocked / 'out'  # a folder inside a file: no user can create it
  code, stdout, err = _run(capsys, tmp_path / 'study', '--workdir', workdir, '--out', out)
  assert code == predict.EXIT_NOTHING and f'error: Cannot write to {out}' in err
  assert 'Pass a --out you can write to' in err and 'Traceback' not in err
  assert stdout == ''  # nothing was predicted
  with pytest.raises(UserError):
    predict.main([str(tmp_path / 'study'), '--workdir', str(workdir), '--out', str(out),
                  '--verbose'])


def test_worklist_ranks_and_tiers(trained_workdir, synthetic_dir, capsys, tmp_path):
  workdir, _ = trained_workdir
  # All of valid (28 studies): probabilities on both sides of both thresholds, every tier used.
  code, out, err = _run(capsys, synthetic_dir / 'MURA-v1.1' / 'valid', '--workdir',
                        workdir, '--worklist', '--out', tmp_path)
  assert code == predict.EXIT_OK, err
  rows = _rows(tmp_path / 'studies.csv')
  ranked = sorted(rows, key=lambda r: int(r['worklist_rank']))
  assert [int(r['worklist_rank']) for r in ranked] == list(range(1, len(rows) + 1))
  probabilities = [float(r['probability']) for r in ranked]  # repr: the exact float
  assert probabilities == sorted(probabilities, reverse=True)  # rank 1 = highest probability
  # The tiers from the report the code reads, by the rule written out here (not worklist's code):
  # > threshold at specificity 0.95 'read first' (it wins an overlap), <= that at sensitivity
  # 0.95 'deprioritise', else 'read'.
  with open(os.path.join(workdir, 'eval', 'validation', 'report.json')) as f:
    points = json.load(f)['operating_points']
  thresholds = {(p['target_metric'], p['target']): p['threshold'] for p in points}
  high, low = thresholds['specificity', 0.95], thresholds['sensitivity', 0.95]
  expected = []
  for p in probabilities:
    if p > high:
      expected.append('read first')
    elif p <= low:
      expected.append('deprioritise')
    else:
      expected.append('read')
  assert [r['tier'] for r in ranked] == expected, (high, low, probabilities)
  # At least two tiers, so that a swap would show (which two depends on the tiny fixture model;
  # test_worklist_tiers_by_hand covers all three and their boundaries).
  assert len(set(expected)) >= 2, expected
  assert 'tiers from' in err
  assert out.splitlines()[0].startswith('rank')


@pytest.mark.parametrize('high,low,expected', [
    # Apart: > 0.7 read first, <= 0.2 deprioritise, between read (both boundaries included).
    (0.7, 0.2, ['read first', 'read', 'read', 'deprioritise', 'deprioritise']),
    # Overlapping (specificity 0.95's threshold below sensitivity 0.95's, as on a weak model):
    # 0.7 and 0.5 are both > 0.3 and <= 0.6: 'read first' wins; 0.2 is not > 0.3.
    (0.3, 0.6, ['read first', 'read first', 'read first', 'deprioritise', 'deprioritise'])])
def test_worklist_tiers_by_hand(high, low, expected):
  probabilities = [0.9, 0.7, 0.5, 0.2, 0.1]
  found = [study_folders.Study(f's{k}', [], probability=p) for k, p in enumerate(probabilities)]
  failed = study_folders.Study('broken', [], status='error')
  points = [{'target_metric': 'specificity', 'target': 0.95, 'threshold': high},
            {'target_metric': 'sensitivity', 'target': 0.95, 'threshold': low}]
  predictor = type('Predictor', (), {'checkpoint': {'step': 7}})()
  notes = predict.worklist([failed] + found[::-1], ('report.json', points, 7), predictor)
  assert [s.tier for s in found] == expected and [s.rank for s in found] == [1, 2, 3, 4, 5]
  assert (failed.tier, failed.rank) == ('', None) and len(notes) == 1


def test_a_second_run_loads_the_compiled_and_traced_network(trained_workdir, synthetic_dir,
                                                             tmp_path):
  """--compilation-cache: the first run keeps the traced programs (the predict step, the init
  that gives the variables' shapes) beside the compiled network (this tiny one compiles faster
  than the cache's 0.5 s threshold, so XLA keeps no executable of it); the second run loads them,
  writes nothing again and prints the same table."""
  workdir, _ = trained_workdir
  cache = tmp_path / 'cache'
  command = [sys.executable, '-m', 'mura_jax.serving.predict', '--workdir', str(workdir),
             '--compilation-cache', str(cache), str(_image(synthetic_dir).parent)]
  first = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
  assert first.returncode == predict.EXIT_OK, first.stderr
  traced = {p.name: p.stat().st_mtime_ns for p in (cache / 'mura_jax_traced').iterdir()}
  assert sorted(name.split('-')[0] for name in traced) == ['init_variables', 'predict_step']
  second = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
  assert second.returncode == predict.EXIT_OK, second.stderr
  assert second.stdout == first.stdout and 'wrist' in first.stdout
  assert {p.name: p.stat().st_mtime_ns for p in (cache / 'mura_jax_traced').iterdir()} == traced


def test_a_cache_folder_that_cannot_be_written_is_one_note(tmp_path):
  """A read-only home or a file in the way: one note saying why, the cache left off (JAX would
  otherwise warn at every compile); a folder that can be written is made, and the write test
  leaves nothing in it."""
  import jax  # pylint: disable=g-import-not-at-top
  (tmp_path / 'a_file').write_text('')
  notes = []
  assert enable_compilation_cache(str(tmp_path / 'a_file' / 'cache'), warn=notes.append) is None
  assert len(notes) == 1 and str(tmp_path / 'a_file' / 'cache') in notes[0], notes
  assert 'none' in notes[0] and jax.config.jax_compilation_cache_dir is None
  assert parallel.cache_problem(str(tmp_path / 'new' / 'cache')) is None
  assert list((tmp_path / 'new' / 'cache').iterdir()) == []


def test_console_script_is_installed():
  script = os.path.join(os.path.dirname(sys.executable), 'mura-predict')
  out = subprocess.run([script, '--help'], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and 'Exit status' in out.stdout
