"""`mura-predict` with input that must not lose, hang or mislead (issue 27): --out checked before
any work, its own outputs skipped as input, folder links followed once, non-UTF-8 names, any
failure in one file as that file's row, mixed body parts, flag ranges, notes on stderr."""

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image

from mura_jax.data import images
from mura_jax.errors import UserError
from mura_jax.serving import predict
from mura_jax.serving import study_folders

from test_images import lut_item, write_dicom


def _rows(path):
  with open(path, encoding='utf-8') as f:
    return list(csv.DictReader(f))


def _run(capsys, *args):
  code = predict.main([str(a) for a in args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _png(path, value=0):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((40, 40), value, np.uint8)).save(path)
  return path


def _synthetic_view(synthetic_dir, k=0):
  paths = sorted((synthetic_dir / 'MURA-v1.1' / 'valid' / 'XR_WRIST').rglob('image*.png'))
  return np.asarray(Image.open([p for p in paths if not p.name.startswith('._')][k]).convert('L'))


@pytest.mark.parametrize('flag, value, words', [
    ('--threshold', 'nan', '[0, 1]'), ('--threshold', '1.5', '[0, 1]'),
    ('--threshold', '-0.1', '[0, 1]'), ('--threshold', 'half', '[0, 1]'),
    ('--batch-size', '0', '>= 1'), ('--batch-size', '-3', '>= 1')])
def test_flag_values_are_checked_before_any_work(tmp_path, capsys, flag, value, words):
  study = _png(tmp_path / 'study' / 'image1.png').parent
  with pytest.raises(SystemExit) as exit_:
    predict.main([str(study), '--workdir', str(tmp_path / 'no_run'), flag, value])
  err = capsys.readouterr().err
  assert exit_.value.code == predict.EXIT_NOTHING
  assert f'argument {flag}: must be' in err and words in err and repr(value) in err, err
  assert 'Traceback' not in err and 'train first' not in err  # refused before the model


def test_an_out_that_would_lose_or_mix_files_is_refused(tmp_path, capsys, monkeypatch):
  """A file, the folder of an input image, a folder holding the input, a folder with a user's own
  studies.csv: one sentence, exit 2, before the model is looked for, and nothing touched."""
  study = _png(tmp_path / 'data' / 'XR_WRIST' / 'p1' / 's1' / 'image1.png').parent
  notes = tmp_path / 'notes.txt'
  notes.write_text('my notes')
  foreign = tmp_path / 'mine'
  foreign.mkdir()
  (foreign / 'studies.csv').write_text('my,own,table\n')
  cases = [(notes, 'is an existing file, and it must be a folder'),
           (study, f'is the folder of the input image {study / "image1.png"}'),
           (tmp_path / 'data', f'holds the input {tmp_path / "data"}'),
           (foreign, 'already holds studies.csv, which mura-predict did not write')]
  for out, words in cases:
    code, stdout, err = _run(capsys, tmp_path / 'data', '--workdir', tmp_path / 'no_run',
                             '--out', out)
    assert code == predict.EXIT_NOTHING and f'error: --out {out} {words}' in err, err
    assert 'Traceback' not in err and 'train first' not in err and stdout == ''
  assert notes.read_text() == 'my notes'
  assert (foreign / 'studies.csv').read_text() == 'my,own,table\n'
  assert sorted(os.listdir(study)) == ['image1.png']  # no marker, no CSV written among inputs
  assert not (tmp_path / 'data' / study_folders.OUTPUT_MARKER).exists()
  with pytest.raises(study_folders.OutputError):
    predict.main([str(study), '--workdir', str(tmp_path / 'no_run'), '--out', str(notes),
                  '--verbose'])
  assert issubclass(study_folders.OutputError, UserError)
  # --cam without --out writes ./cam: a user's own cam folder there is refused the same way.
  _png(tmp_path / 'cam' / 'holiday.png')
  monkeypatch.chdir(tmp_path)
  code, _, err = _run(capsys, study, '--workdir', tmp_path / 'no_run', '--cam')
  assert code == predict.EXIT_NOTHING, err
  assert f'error: the cam folder {os.path.join(".", "cam")} (--cam without --out) already holds ' \
         'holiday.png, which mura-predict did not write' in err


_FIND = """
import sys
from mura_jax.serving import study_folders
studies, problems, _, notes = study_folders.find_studies(sys.argv[1:])
print(len(studies), sum(len(s.files) for s in studies), len(problems))
print('\\n'.join(notes))
"""


def test_folder_links_back_up_are_followed_once(tmp_path):
  """`loop -> .` at the top, `up -> ..` in a study, `alias -> s1`, and the same tree given twice:
  one study of two views, a note per link, no hang (a subprocess with a time limit)."""
  root = tmp_path / 'tree'
  study = root / 'XR_WRIST' / 'p1' / 's1'
  _png(study / 'image1.png')
  _png(study / 'image2.png', 255)
  os.symlink('.', root / 'loop')
  os.symlink('..', study / 'up')
  os.symlink('s1', study.parent / 'alias')
  out = subprocess.run([sys.executable, '-c', _FIND, str(root), str(root / 'loop'), str(study)],
                       capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr
  counts, *notes = out.stdout.splitlines()
  assert counts == '1 2 0', out.stdout  # studies, files, problems
  assert sum('already read' in n for n in notes) == 5, notes  # loop, up, alias, 2 PATHs
  assert any(f'{root / "loop"}: a link to {root}' in n for n in notes), notes


def test_any_failure_reading_one_file_is_that_files_row(tmp_path, monkeypatch):
  """Not only ImageError: whatever one file raises, the others are read."""
  study = _png(tmp_path / 'XR_HAND' / 's1' / 'image1.png').parent
  _png(study / 'image2.png')
  real_read = images.read_view
  def read_view(path):
    if path.endswith('image2.png'):
      raise KeyError('a reader bug')
    return real_read(path)
  monkeypatch.setattr(images, 'read_view', read_view)
  studies = study_folders.read_studies(study_folders.find_studies([str(tmp_path)])[0], None, progress=False)
  assert len(studies) == 1 and len(studies[0].views) == 1
  assert studies[0].errors == [(str(study / 'image2.png'),
                                f"{study / 'image2.png'}: KeyError: 'a reader bug'")]


def _dicom_study(folder, parts, uid='1.2.826.0.1.9'):
  folder.mkdir(parents=True, exist_ok=True)
  for k, part in enumerate(parts):
    write_dicom(folder / f'view{k}.dcm', np.full((8, 8), 10 * k, np.uint8), body_part=part,
                study_uid=uid)


@pytest.mark.parametrize('parts, override, kept, part', [
    (['HAND', 'WRIST', 'HAND'], None, ['view0.dcm', 'view2.dcm'], 'hand'),   # the majority
    (['WRIST', 'HAND'], None, ['view0.dcm'], 'wrist'),                       # a tie: the first
    (['HAND', 'WRIST', 'HAND'], 'wrist', ['view1.dcm'], 'wrist')])           # --body-part
def test_a_study_of_mixed_body_parts_leaves_the_others_out(tmp_path, parts, override, kept, part):
  _dicom_study(tmp_path / 'dicom', parts)
  [study] = study_folders.read_studies(study_folders.find_studies([str(tmp_path)])[0], override, False)
  assert study.body_part == part
  assert [os.path.basename(v.path) for v in study.views] == kept
  assert len(study.left_out) == len(parts) - len(kept)
  assert all(f"not the study's {part}" in why for _, why in study.left_out)
  assert 'views name different body parts' in study.warnings[0]


def test_views_of_one_other_part_keep_the_users_word(tmp_path):
  _dicom_study(tmp_path / 'XR_ELBOW' / 'dicom', ['HAND', 'HAND'])
  [study] = study_folders.read_studies(study_folders.find_studies([str(tmp_path)])[0], None, False)
  assert study.body_part == 'elbow' and len(study.views) == 2 and not study.left_out
  assert study.warnings == ['its views name hand, its XR_ folder says elbow: predicted as elbow']


def _multi_frame(path, pixels):
  write_dicom(path, pixels, body_part='WRIST')
  ds = pydicom.dcmread(path)
  ds.NumberOfFrames = 2
  ds.PixelData = pixels.tobytes() * 2
  ds.save_as(path, enforce_file_format=True)


def test_what_a_user_must_see_is_on_stderr_and_nothing_is_counted_twice(
    trained_workdir, synthetic_dir, capsys, tmp_path):
  """One tree with every kind of trouble, --out and --cam inside it; run twice: the second run
  skips the first's outputs and gives the same studies."""
  workdir, _ = trained_workdir
  gray = _synthetic_view(synthetic_dir)
  root = tmp_path / 'tree'
  study = root / 'XR_WRIST' / 'p1' / 's1'
  study.mkdir(parents=True)
  Image.fromarray(gray).save(study / 'image1.png')
  colour = np.stack([gray, gray // 2, gray // 3], -1)
  Image.fromarray(colour).save(study / 'image2.png')
  alpha = np.full(gray.shape, 255, np.uint8)
  alpha[:10] = 0
  Image.fromarray(np.stack([gray] * 3 + [alpha], -1)).save(study / 'image3.png')
  (root / 'dicom' / 'mixed').mkdir(parents=True)
  for name, part in (('a.dcm', 'WRIST'), ('b.dcm', 'WRIST'), ('c.dcm', 'HAND')):
    write_dicom(root / 'dicom' / 'mixed' / name, gray, body_part=part, study_uid='1.2.9')
  (root / 'dicom' / 'multi').mkdir()
  _multi_frame(root / 'dicom' / 'multi' / 'm.dcm', gray)
  Image.fromarray(gray).save(_png(root / 'nopart' / 's1' / 'image1.png'))
  broken = root / 'bad' / 'XR_HAND' / 's1' / 'short.dcm'
  broken.parent.mkdir(parents=True)
  write_dicom(broken, gray, voi_lut_item=lut_item((256, 0, 16), list(range(10))))
  os.symlink('.', root / 'loop')
  args = (root, '--workdir', workdir, '--out', root / 'out', '--cam')
  code, out, err = _run(capsys, *args)
  assert code == predict.EXIT_SOME_FAILED, err
  rows = {r['study']: r for r in _rows(root / 'out' / 'studies.csv')}
  assert len(rows) == 5 and not any('loop' in s for s in rows), list(rows)
  assert rows['1.2.9']['views'] == '2' and rows['1.2.9']['body_part'] == 'wrist'
  assert rows['1.2.9']['status'] == 'predicted' and 'c.dcm' in rows['1.2.9']['warnings']
  [left] = [r for r in _rows(root / 'out' / 'views.csv') if r['status'] == 'left_out']
  assert left['file'].endswith('c.dcm') and "'HAND'" in left['warnings']
  assert rows[f'{root}/bad/XR_HAND/s1/']['status'] == 'error'
  assert f'error: {broken}: its VOI LUT Data holds 10 16-bit words' in err
  notes = [line for line in err.splitlines() if line.startswith('note: ')]
  for words in ('image2.png: colour image', f'image3.png: {10 / gray.shape[0]:.1%} of the pixels',
                'm.dcm: 2 frames: the first is used', 'no body part found: pass --body-part',
                '1.2.9: its views name different body parts', f'{root / "loop"}: a link to'):
    assert any(words in n for n in notes), (words, notes)
  assert (root / 'out' / study_folders.OUTPUT_MARKER).exists()
  assert len(list((root / 'out' / 'cam').rglob('*.png'))) > 5

  code, out, err = _run(capsys, *args)
  assert code == predict.EXIT_SOME_FAILED, err
  assert f'note: {root / "out"}: skipped: mura-predict wrote it' in err
  assert {r['study']: r['views'] for r in _rows(root / 'out' / 'studies.csv')} == {
      s: r['views'] for s, r in rows.items()}


def test_file_names_that_are_not_utf8(trained_workdir, synthetic_dir, capsys, tmp_path):
  """Bytes that are not UTF-8 are written as backslash escapes, in the table and the CSVs."""
  workdir, _ = trained_workdir
  study = tmp_path / 'XR_WRIST' / os.fsdecode(b'patient\xff') / 's1'
  study.mkdir(parents=True)
  Image.fromarray(_synthetic_view(synthetic_dir)).save(study / os.fsdecode(b'caf\xe9.png'))
  shutil.copy(study / os.fsdecode(b'caf\xe9.png'), study / 'image2.png')
  code, out, err = _run(capsys, tmp_path, '--workdir', workdir, '--out', tmp_path / 'out',
                        '--cam')
  assert code == predict.EXIT_OK, err
  assert 'patient\\xff/s1/' in out
  views = _rows(tmp_path / 'out' / 'views.csv')
  assert {os.path.basename(r['file']) for r in views} == {'caf\\xe9.png', 'image2.png'}
  assert all(r['status'] == 'predicted' for r in views)
  [row] = _rows(tmp_path / 'out' / 'studies.csv')
  assert 'patient\\xff' in row['study'] and row['status'] == 'predicted'
  assert row['cam'].endswith('study.png') and 'patient\\xff' in row['cam']
  assert (tmp_path / 'out' / 'predictions.csv').read_text().count('patient\\xff') == 1


def test_outputs_of_earlier_runs_are_recognised_without_the_marker(tmp_path):
  """Before the marker: a folder with mura-predict's studies.csv header and views.csv (its cam
  overlays inside) is skipped; a user's own studies.csv and views.csv are not taken for one."""
  _png(tmp_path / 'XR_HAND' / 's1' / 'image1.png')
  old = tmp_path / 'old_out'
  _png(old / 'cam' / 'study_1' / 'image1.png')
  (old / 'studies.csv').write_text(study_folders.STUDIES_HEADER + ',warnings,cam,worklist_rank,tier\n')
  (old / 'views.csv').write_text('study,file,probability,status,warnings\n')
  theirs = tmp_path / 'theirs'
  _png(theirs / 'image1.png')
  (theirs / 'studies.csv').write_text('patient,notes\n')
  (theirs / 'views.csv').write_text('')
  studies, problems, _, notes = study_folders.find_studies([str(tmp_path)])
  assert sorted(s.id for s in studies) == [f'{tmp_path}/XR_HAND/s1/', f'{theirs}/'] and not problems
  assert notes == [f'{old}: skipped: mura-predict wrote it (its outputs are no radiographs)']
  assert study_folders.is_output_folder(old) and not study_folders.is_output_folder(theirs)


def test_a_damaged_report_for_the_worklist_stops_before_any_prediction(
    trained_workdir, synthetic_dir, tmp_path, capsys, monkeypatch):
  """--worklist reads the tiers' report first: a damaged one is named before the work, not after
  it (when the table and the CSVs would be lost)."""
  workdir = tmp_path / 'run'
  shutil.copytree(trained_workdir[0], workdir)
  report = workdir / 'eval' / 'validation' / 'report.json'
  report.write_text('{"operating_points": ')
  monkeypatch.setattr(predict, 'predict', lambda *a, **k: pytest.fail('predicted first'))
  study = next((synthetic_dir / 'MURA-v1.1' / 'valid' / 'XR_WRIST').glob('patient*/study*'))
  code, _, err = _run(capsys, study, '--workdir', workdir, '--worklist', '--out', tmp_path / 'out')
  assert code == predict.EXIT_NOTHING
  assert f'error: {report} is damaged (not JSON: ' in err and '--config.mode=evaluate' in err, err
  assert not (tmp_path / 'out' / 'studies.csv').exists()
