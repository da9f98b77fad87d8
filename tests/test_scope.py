"""A model's scope travels with it (issue 28): the body parts and data it was trained and validated
on are in its checkpoints' spec, its export's spec and its model card; `mura-predict` reports a
study of another part as out_of_scope (from the workdir and from the export) unless
--allow-out-of-scope, which is recorded; evaluate, cam and export run with the workdir's config."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

import conftest
from mura_jax import checkpoints
from mura_jax import main
from mura_jax.configs import demo
from mura_jax.errors import ConfigError
from mura_jax.serving import export
from mura_jax.serving import model_card
from mura_jax.serving import predict
from mura_jax.training import train
from tfds_mura import BODY_PARTS

from test_train import tiny_config

OTHER_PARTS = [p for p in BODY_PARTS if p != 'humerus']


@pytest.fixture(scope='module')
def humerus_workdir(mura_data_dir, tmp_path_factory):
  """(workdir, config) of a tiny model trained one epoch on the synthetic humerus studies only."""
  workdir = tmp_path_factory.mktemp('humerus')
  config = tiny_config(mura_data_dir, **{'data.body_parts': 'humerus', 'train.num_epochs': 1})
  assert train.train_and_evaluate(config, str(workdir))['status'] == 'done'
  return workdir, config


def _no_saved_model(*args):
  del args
  return {'written': False, 'reason': 'not needed here (tests/test_export.py tests it)'}


@pytest.fixture(scope='module')
def humerus_export(humerus_workdir, tmp_path_factory):
  workdir, config = humerus_workdir
  folder = tmp_path_factory.mktemp('humerus_export') / 'export'
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(export, 'export_saved_model', _no_saved_model)
    export.export(workdir, 'best', folder, config=config)
  return folder


def _metadata(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder('mura', data_dir=data_dir).info.metadata


def test_every_checkpoint_spec_records_the_scope(humerus_workdir, mura_data_dir):
  workdir, _ = humerus_workdir
  metadata = _metadata(mura_data_dir)
  for name in (checkpoints.BEST, checkpoints.LATEST):
    spec = checkpoints.read_spec(workdir, name, max(checkpoints.steps_of(workdir / name)))
    assert spec['body_parts'] == ['humerus'], name
    assert spec['preprocessing']['image_size'] == 32 and spec['preprocessing']['resize'] == 'squash'
    data = spec['data']
    assert data['synthetic'] is True and data['dataset'].startswith('synthetic MURA'), data
    for kind, key in (('studies', 'study_counts'), ('images', 'image_counts')):
      assert data[kind] == {split: {'humerus': metadata[key][split]['humerus']}
                            for split in ('train', 'validation')}, kind
    assert sum(data['studies']['train']['humerus'].values()) == conftest.STUDIES_PER_PART
    assert sum(data['studies']['validation']['humerus'].values()) == (
        conftest.VALID_STUDIES_PER_PART)


def test_a_humerus_models_card_and_export_name_humerus_only(humerus_export):
  manifest = json.loads((humerus_export / 'export.json').read_text())
  assert manifest['spec']['body_parts'] == ['humerus'] and manifest['spec']['data']['synthetic']
  assert 'assumed' not in manifest['spec']
  card = json.loads((humerus_export / 'model_card.json').read_text())
  assert card['scope']['body_parts'] == ['humerus']
  assert 'a humerus radiograph study' in card['intended_use']
  assert 'synthetic' in card['intended_use']
  assert card['scope']['trained_and_validated_on'].startswith(
      'humerus radiograph studies of a synthetic MURA')
  for split in ('train', 'validation'):
    assert list(card['training_data']['studies'][split]) == ['humerus']
  text = (humerus_export / 'model_card.md').read_text()
  assert 'humerus radiograph stud' in text
  for words in [*OTHER_PARTS, 'upper-extremity', 'seven', 'Seven']:
    assert words not in text, words
    assert words not in json.dumps({k: card[k] for k in ('intended_use', 'scope', 'limitations',
                                                         'training_data')}), words
  # What it was validated on: the split and its studies, normal/abnormal.
  validation = card['training_data']['studies']['validation']['humerus']
  assert (f'- validated on: synthetic MURA (mura-jax) validation split, {validation["normal"]} '
          f'normal and {validation["abnormal"]} abnormal studies (humerus') in text


def _rows(path):
  with open(path) as f:
    return {r['study'].split('/')[-4] if 'XR_' in r['study'] else 'unknown': r
            for r in csv.DictReader(f)}


@pytest.fixture(scope='module')
def studies(synthetic_dir, tmp_path_factory):
  """A wrist study, a humerus study and one whose body part is unknown, from the synthetic MURA."""
  root = tmp_path_factory.mktemp('studies')
  for part, folder in (('wrist', 'XR_WRIST/patient1/study1'),
                       ('humerus', 'XR_HUMERUS/patient2/study1'), ('wrist', 'misc/study1')):
    image = next(p for p in sorted((synthetic_dir / 'MURA-v1.1' / 'valid' /
                                    f'XR_{part.upper()}').rglob('image1.png')))
    (root / folder).mkdir(parents=True)
    shutil.copy(image, root / folder / 'image1.png')
  return root


@pytest.mark.parametrize('source', ['workdir', 'export'])
def test_a_wrist_study_is_out_of_scope_for_a_humerus_model(source, humerus_workdir, humerus_export,
                                                           studies, tmp_path, capsys):
  model = (['--workdir', str(humerus_workdir[0])] if source == 'workdir' else
           ['--model', str(humerus_export)])
  code = predict.main([str(studies), *model, '--out', str(tmp_path / 'out')])
  out, err = capsys.readouterr()
  assert code == predict.EXIT_SOME_FAILED, err
  rows = _rows(tmp_path / 'out' / 'studies.csv')
  wrist = rows['XR_WRIST']
  assert wrist['status'] == 'out_of_scope' and wrist['probability'] == wrist['verdict'] == ''
  assert ("body part 'wrist' is outside this model's scope: it was trained and validated on "
          'humerus studies only: not scored (--allow-out-of-scope') in wrist['warnings']
  assert "outside this model's scope" in err and 'out_of_scope' in out
  assert rows['XR_HUMERUS']['status'] == 'predicted' and rows['XR_HUMERUS']['probability']
  assert rows['unknown']['status'] == 'out_of_scope'  # the existing rule: pass --body-part
  submission = (tmp_path / 'out' / 'predictions.csv').read_text().splitlines()
  assert len(submission) == 1 and 'XR_HUMERUS' in submission[0]

  # Forced: scored, and said so in the table, the CSVs and on stderr; an unknown part still not.
  code = predict.main([str(studies), *model, '--out', str(tmp_path / 'forced'),
                       '--allow-out-of-scope'])
  out, err = capsys.readouterr()
  assert code == predict.EXIT_SOME_FAILED  # the study without a body part is still not scored
  rows = _rows(tmp_path / 'forced' / 'studies.csv')
  wrist = rows['XR_WRIST']
  assert wrist['status'] == 'predicted_out_of_scope' and wrist['verdict'] in ('normal', 'abnormal')
  assert 'scored anyway (--allow-out-of-scope)' in wrist['warnings']
  assert 'predicted_out_of_scope' in out
  assert rows['unknown']['status'] == 'out_of_scope' and 'pass --body-part' in rows['unknown'][
      'warnings']
  # The forced probability is the model's own on those views (as if the study were humerus).
  code = predict.main([str(studies / 'XR_WRIST'), *model, '--body-part', 'humerus', '--out',
                       str(tmp_path / 'as_humerus')])
  capsys.readouterr()
  assert code == predict.EXIT_OK
  assert float(wrist['probability']) == pytest.approx(float(
      _rows(tmp_path / 'as_humerus' / 'studies.csv')['XR_WRIST']['probability']), abs=1e-6)


def test_an_older_export_without_a_scope_is_taken_as_all_seven_and_says_so(
    humerus_export, studies, tmp_path, capsys):
  older = tmp_path / 'older'
  shutil.copytree(humerus_export, older)
  manifest = json.loads((older / 'export.json').read_text())
  for key in ('body_parts', 'data'):
    del manifest['spec'][key]
  (older / 'export.json').write_text(json.dumps(manifest))
  code = predict.main([str(studies / 'XR_WRIST'), '--model', str(older)])
  _, err = capsys.readouterr()
  assert code == predict.EXIT_OK, err
  assert ("note: the model's scope: the spec names no body parts (written by an older mura-jax): "
          'taken as all seven MURA study types') in err


def test_an_older_checkpoints_card_says_what_is_assumed(humerus_workdir):
  """A spec without body parts or data (an older mura-jax): all seven parts, the data read from
  the dataset the workdir's config names, both said."""
  workdir, config = humerus_workdir
  config = config.copy_and_resolve_references()
  config.workdir = str(workdir)
  spec = {'model': checkpoints.model_signature(config), 'preprocessing': {
      'image_size': 32, 'resize': 'squash', 'in_channels': 3}}
  data = model_card.training_data(spec, config)
  assert data['recorded'].startswith("not in the checkpoint's spec (an older mura-jax): read from")
  assert list(data['studies']['train']) == list(BODY_PARTS)
  card = model_card.model_card({'which': 'best', 'step': 1}, spec, 10, config, None, data)
  assert card['scope']['assumed'].startswith('the spec names no body parts')
  assert 'upper-extremity (elbow, finger' in card['intended_use']
  assert 'Assumed: the spec names no body parts' in model_card.format_card(card)


# ------------------------------------------------------------------------------------------------
# Evaluate, cam and export run with the workdir's config.


def test_evaluate_cam_and_export_need_no_overrides(humerus_workdir, tmp_path, monkeypatch):
  """The demo's config (another model, image size, data, evaluation options) with only the mode
  given, as `python -m mura_jax.main --workdir W --config.mode=MODE` passes it."""
  workdir = tmp_path / 'run'
  shutil.copytree(humerus_workdir[0], workdir)
  monkeypatch.setattr(export, 'export_saved_model', _no_saved_model)
  for mode in ('evaluate', 'cam', 'export'):
    config = demo.get_config()
    config.mode = mode
    main.run(config, str(workdir), given={'mode'})
  report = json.loads((workdir / 'eval' / 'validation' / 'report.json').read_text())
  # The workdir's own evaluation options (tiny_config's 50 resamples, not the demo's 2,000),
  # and the model's body part only.
  assert report['bootstrap']['num_resamples'] == 50
  assert report['num_studies'] == conftest.VALID_STUDIES_PER_PART
  # Its data has no boxes (no synthetic MURA in the workdir, none given): the report says so.
  summary = json.loads((workdir / 'cam' / 'validation' / 'localisation.json').read_text())
  assert summary['no_boxes'] == (
      f'The validation split has no boxes (config.cam.annotations is empty, and {workdir}/'
      'synthetic holds no synthetic_annotations.csv, the boxes a synthetic MURA has): '
      'localisation is not measured. To measure it, pass --config.cam.annotations=CSV, a boxes '
      'CSV image_path,abnormality,x0,y0,x1,y1 of its abnormal views.')
  assert summary['no_boxes'] in (workdir / 'cam' / 'validation' / 'localisation.md').read_text()
  # CAM maps the model's scope only: the humerus views of the validation split.
  humerus = _metadata(humerus_workdir[1].data.data_dir)['image_counts']['validation']['humerus']
  assert summary['n_views'] == sum(humerus.values())
  card = json.loads((workdir / 'export' / 'model_card.json').read_text())
  assert card['scope']['body_parts'] == ['humerus']
  assert card['validation']['num_studies'] == conftest.VALID_STUDIES_PER_PART
  # A key the mode owns, given, is used.
  config = demo.get_config()
  config.mode, config.evaluation.bootstrap_resamples = 'evaluate', 0
  main.run(config, str(workdir), given={'mode', 'evaluation.bootstrap_resamples'})
  report = json.loads((workdir / 'eval' / 'validation' / 'report.json').read_text())
  assert report['bootstrap']['num_resamples'] == 0


@pytest.mark.parametrize('mode', ['evaluate', 'cam', 'export'])
def test_a_changed_key_the_mode_does_not_own_is_refused(humerus_workdir, mode):
  workdir, _ = humerus_workdir
  config = demo.get_config()
  config.mode, config.data.image_size = mode, 64
  with pytest.raises(ConfigError) as error:
    main.run(config, str(workdir), given={'mode', 'data.image_size', 'evaluation.threshold'})
  assert str(error.value).startswith(
      f'{mode} runs with the config the run in {workdir} was trained with (its config.json), and '
      f'may change only its own keys'), str(error.value)
  assert str(error.value).endswith(
      'this command line changes --config.data.image_size:\n  data.image_size: 32 in the '
      'workdir, 64 now\nDrop it (the checkpoints keep their model and preprocessing), or train a '
      'run with it into a new --workdir.')


def test_the_command_line_refuses_only_the_keys_it_changes(humerus_workdir):
  """main.py passes the --config.KEY overrides: the demo file's own values are not refused."""
  workdir, _ = humerus_workdir
  out = subprocess.run(
      [sys.executable, '-m', 'mura_jax.main', '--workdir', str(workdir), '--config.mode=export',
       '--config.model.block_config=(2,4,4)', '--config.export.dir=' + str(workdir / 'x')],
      capture_output=True, text=True, timeout=300,
      env={**os.environ, 'XLA_FLAGS': conftest.xla_flags(1)})
  assert out.returncode == 2, out.stderr[-3000:]
  assert ('this command line changes --config.model.block_config:\n  model.block_config: [1, 1] '
          'in the workdir, [2, 4, 4] now\nDrop it') in out.stderr, out.stderr[-3000:]
  assert not (workdir / 'x').exists()
