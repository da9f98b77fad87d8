"""Export (`--config.mode=export`, `export.export`, `exported_lib.load`): nothing lost, nothing hangs,
nothing misleads.

    input                                    outcome
    export dir an existing file              refused before any work: "The export folder F
                                               (--config.export.dir) is a file, not a folder; ..."
    export dir a folder that is no export    refused: "... holds a.txt, b.txt and is not an export
                                               of mura-jax (no export.json); ..."
    export dir the workdir or above it       refused: "... holds the workdir W, its checkpoints
                                               included; ..."
    export dir inside WORKDIR/checkpoints    refused: "... is inside the checkpoint folder ..."
    a previous export plus a user's file     refused: "... holds notes.txt, which no export wrote"
    a previous export, export.json damaged   refused: "F/export.json is damaged (not JSON: ...);
                                               F is not replaced, ..."
    a previous export of mura-jax            replaced (the normal re-export)
    a staging folder of a killed export      removed by the next export, with a note (a live
                                               export's is left)
    a full disk half-way                     "Could not write the export to F (No space left on
                                               device: ...); nothing was left in ..."
    export.json / model_card.json damaged    load / read_model_card: "F is damaged (not JSON: ... /
                                               no spec, ...); export the checkpoint again ..."
    WORKDIR/eval/validation/report.json      refused before any work: "R is damaged (KeyError:
      damaged                                  ...); evaluate again ..."
"""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from mura_jax.inference import exported as exported_lib
from mura_jax.inference import predictor as predictor_lib
from mura_jax.serving import export
from mura_jax.serving import export_folder
from mura_jax.serving import predict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bytes(folder):
  return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), 'rb').read()
          for d, _, files in os.walk(folder) for f in files}


@pytest.fixture
def no_work(monkeypatch):
  """Restoring the checkpoint is the first work: a refusal must come before it."""
  def work_started(*args, **kwargs):
    raise AssertionError('the export started its work')
  monkeypatch.setattr(predictor_lib.Predictor, 'from_workdir', work_started)


def _refused(workdir, out_dir):
  with pytest.raises(exported_lib.ExportError) as raised:
    export.export(workdir, 'best', out_dir)
  return str(raised.value)


def test_an_export_dir_that_is_a_file_or_someone_elses_folder(tmp_path, no_work):
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  mine = tmp_path / 'model.bin'
  mine.write_bytes(b'my model')
  assert _refused(workdir, mine) == (
      f'The export folder {mine} (--config.export.dir) is a file, not a folder; give a folder '
      '(created if missing) that holds nothing else.')
  assert mine.read_bytes() == b'my model'
  folder = tmp_path / 'papers'
  folder.mkdir()
  for name in ('a.txt', 'b.txt', 'c.txt', 'd.txt'):
    (folder / name).write_text(name)
  before = _bytes(folder)
  assert _refused(workdir, folder) == (
      f'The export folder {folder} (--config.export.dir) holds a.txt, b.txt, c.txt and 1 more '
      'and is not an export of mura-jax (no export.json); the export replaces its folder as a '
      'whole: give an empty or new folder, or move those files.')
  assert _bytes(folder) == before


def test_an_export_dir_holding_the_workdir_or_in_its_checkpoints(tmp_path, no_work):
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  (workdir / 'checkpoints' / 'step').write_text('weights')
  before = _bytes(tmp_path)
  for out_dir in (workdir, tmp_path):
    assert _refused(workdir, out_dir) == (
        f'The export folder {out_dir} (--config.export.dir) holds the workdir {workdir}, its '
        'checkpoints included; the export replaces its folder as a whole: give a folder of its '
        f'own (the default is {workdir / "export"}).')
  inside = workdir / 'checkpoints' / 'export'
  assert _refused(workdir, inside) == (
      f'The export folder {inside} (--config.export.dir) is inside the checkpoint folder '
      f'{workdir / "checkpoints"}; give a folder of its own (the default is '
      f'{workdir / "export"}).')
  assert _bytes(tmp_path) == before and not inside.exists()


def test_a_previous_export_with_a_users_file_or_a_damaged_export_json(tmp_path, no_work):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  out_dir = tmp_path / 'export'
  out_dir.mkdir()
  (out_dir / 'model.safetensors').write_bytes(b'weights')
  (out_dir / 'export.json').write_text(json.dumps(
      {'format_version': exported_lib.FORMAT_VERSION, 'files': {'model.safetensors': 'x'}}))
  (out_dir / 'notes.txt').write_text('mine')
  before = _bytes(out_dir)
  assert _refused(workdir, out_dir) == (
      f'The export folder {out_dir} (--config.export.dir) holds notes.txt, which no export '
      'wrote; the export replaces its folder as a whole: move them, or give another folder.')
  (out_dir / 'notes.txt').unlink()
  (out_dir / 'export.json').write_text('{"format_version": 1, "files": {')
  before = _bytes(out_dir)
  message = _refused(workdir, out_dir)
  assert message.startswith(f'{out_dir / "export.json"} is damaged (not JSON: ')
  assert message.endswith(f'; {out_dir} is not replaced, as it cannot be told from other files: '
                          'delete it yourself if it is an old export, or give another folder '
                          '(--config.export.dir).')
  assert _bytes(out_dir) == before


def test_a_previous_export_put_back_when_an_export_was_stopped_while_swapping(tmp_path):
  """Killed between moving the previous export away and renaming the new one into place: the
  next export puts the previous one back (then replaces it as usual)."""
  out_dir = tmp_path / 'export'
  old = tmp_path / '.export.old-otherhost-12345-0123abcd'
  old.mkdir()
  (old / 'export.json').write_text('{}')
  notes = export_folder.clear_leftovers(out_dir)
  assert notes == [f'{old} held the previous export of {out_dir}, moved away by an export that '
                   'was stopped; put back.']
  assert (out_dir / 'export.json').read_text() == '{}' and not old.exists()


def _quick(monkeypatch):
  """Exports without the SavedModel (TensorFlow's part is tested in test_export.py)."""
  monkeypatch.setattr(export, 'export_saved_model',
                      lambda *args: {'written': False, 'reason': 'left out by the test'})


_KILLED = """
import os, signal, sys
from mura_jax.serving import export
def killed(*args):
  os.kill(os.getpid(), signal.SIGKILL)
export.export_torchvision = killed
export.export_saved_model = lambda *args: {'written': False, 'reason': 'test'}
export.export(sys.argv[1], 'best', sys.argv[2])
"""


def test_an_export_killed_half_way_is_cleaned_up_by_the_next(trained_workdir, tmp_path,
                                                             monkeypatch, caplog):
  """A real export killed (SIGKILL) after the jax artifact: its staging folder stays, and the next
  export removes it with a note, replaces the previous export and leaves no temporary folder; a
  live export's staging folder is left alone."""
  workdir, config = trained_workdir
  _quick(monkeypatch)
  out_dir = tmp_path / 'export'
  export.export(workdir, 'best', out_dir, config=config)  # the previous export
  killed = subprocess.run([sys.executable, '-c', _KILLED, str(workdir), str(out_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert killed.returncode == -9, killed.stderr[-2000:]
  staging = [p for p in tmp_path.iterdir() if p.name.startswith('.export.partial-')]
  assert len(staging) == 1 and (staging[0] / 'model.jax_export').exists()
  host = socket.gethostname()
  live = tmp_path / f'.export.partial-{host}-{os.getppid()}-89abcdef'  # pytest's parent: alive
  live.mkdir()
  manifest = export.export(workdir, 'best', out_dir, config=config)
  assert f'Removed {staging[0]}, left by an export that was stopped before it finished.' in (
      caplog.text)
  assert f'{live} belongs to an export still running (process {os.getppid()} on {host}); left.' in (
      caplog.text)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(['export', live.name])
  assert json.loads((out_dir / 'export.json').read_text()) == manifest
  assert exported_lib.load(out_dir).checkpoint['step'] == manifest['checkpoint']['step']


def test_a_full_disk_names_the_folder_and_leaves_nothing(trained_workdir, tmp_path, monkeypatch):
  workdir, config = trained_workdir
  _quick(monkeypatch)
  out_dir = tmp_path / 'export'
  export.export(workdir, 'best', out_dir, config=config)
  before = _bytes(out_dir)

  def full(variables, model, folder):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / 'model.safetensors'))
  monkeypatch.setattr(export, 'export_torchvision', full)
  with pytest.raises(exported_lib.ExportError) as raised:
    export.export(workdir, 'best', out_dir, config=config)
  message = str(raised.value)
  assert message.startswith(f'Could not write the export to {out_dir} (No space left on device: ')
  assert message.endswith(f'); nothing was left in {tmp_path} and a previous export there is '
                          'unchanged: free some space, or export to another folder '
                          '(--config.export.dir).')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['export']  # no staging folder
  assert _bytes(out_dir) == before


def _fake_export(tmp_path, manifest_text, card_text='{"validation": null}'):
  folder = tmp_path / 'export'
  folder.mkdir()
  (folder / 'export.json').write_text(manifest_text)
  (folder / 'model_card.json').write_text(card_text)
  return folder


@pytest.mark.parametrize('manifest,why', [
    ('{"format_version": 1, ', 'not JSON: '),
    ('[1]', 'not a JSON object)'),
    ('{"format_version": 1}', 'no files, spec, checkpoint, classifier_bias)'),
    ('{"format_version": 1, "files": {}, "spec": {"preprocessing": {"size": 3}}, '
     '"checkpoint": {}, "classifier_bias": 0}', 'TypeError: '),
])
def test_a_damaged_export_json_is_named(tmp_path, capsys, manifest, why):
  folder = _fake_export(tmp_path, manifest)
  with pytest.raises(exported_lib.ExportError) as raised:
    exported_lib.load(folder)
  message = str(raised.value)
  assert message.startswith(f'{folder / "export.json"} is damaged (') and why in message
  assert message.endswith('; export the checkpoint again (python -m mura_jax.main --workdir '
                          'WORKDIR --config.mode=export), or copy the whole export folder again.')
  # mura-predict --model says the same, without a traceback.
  study = tmp_path / 'study'
  study.mkdir()
  Image.fromarray(np.full((40, 30), 128, np.uint8)).save(study / 'image1.png')
  code = predict.main([str(study), '--model', str(folder), '--out', str(tmp_path / 'out')])
  assert code == predict.EXIT_NOTHING
  assert f'{folder / "export.json"} is damaged (' in capsys.readouterr().err


@pytest.mark.parametrize('card,why', [
    ('not json', 'not JSON: '),
    ('{"model": "x"}', 'no validation)'),
    ('{"validation": {"groups": {}}}', 'its validation has no operating_points)'),
])
def test_a_damaged_model_card_json_is_named(tmp_path, card, why):
  folder = _fake_export(tmp_path, '{}', card)
  with pytest.raises(exported_lib.ExportError) as raised:
    exported_lib.read_model_card(folder)
  message = str(raised.value)
  assert message.startswith(f'{folder / "model_card.json"} is damaged (') and why in message
  assert message.endswith('or copy the whole export folder again.')


def test_the_previous_export_is_replaced_when_it_is_one(tmp_path, no_work):
  """check_out_dir accepts an empty folder and an export of mura-jax (its files, saved_model/)."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  out_dir = tmp_path / 'export'
  out_dir.mkdir()
  export_folder.check_out_dir(out_dir, workdir)
  (out_dir / 'saved_model').mkdir()
  (out_dir / 'model.jax_export').write_bytes(b'x')
  (out_dir / 'export.json').write_text(json.dumps(
      {'format_version': exported_lib.FORMAT_VERSION, 'files': {'model.jax_export': 'x'}}))
  export_folder.check_out_dir(out_dir, workdir)
  shutil.rmtree(out_dir / 'saved_model')
  (out_dir / 'model.jax_export.json').write_text('{}')  # not in its files: a user's
  with pytest.raises(exported_lib.ExportError, match='holds model.jax_export.json, which no export'):
    export_folder.check_out_dir(out_dir, workdir)


def test_a_damaged_validation_report_is_named_before_any_work(tmp_path, no_work):
  """The model card copies WORKDIR/eval/validation/report.json: a damaged one is named first."""
  workdir = tmp_path / 'run'
  report = workdir / 'eval' / 'validation' / 'report.json'
  report.parent.mkdir(parents=True)
  report.write_text('{"checkpoint": {"step": 3}}')
  assert _refused(workdir, tmp_path / 'export') == (
      f"{report} is damaged (KeyError: 'num_studies'); evaluate again (--config.mode=evaluate) to "
      'rewrite it, or delete it (the model card then has no validation metrics).')
  assert not (tmp_path / 'export').exists()
