"""Temperature scaling's round trip on a tiny trained workdir: fitted in evaluate mode, stored with
the model, applied by the Predictor, exported inside the artifact, and given by mura-predict from
the workdir and from the export: sigmoid(logit / T) of the network's own logits."""
import csv
import json
import shutil

import ml_collections
import numpy as np
import pytest
from scipy import special

from mura_jax import checkpoints
from mura_jax.data import images
from mura_jax.data import input_pipeline
from mura_jax.errors import UserError
from mura_jax.evaluation import calibration
from mura_jax.evaluation import evaluate
from mura_jax.inference import exported as exported_lib
from mura_jax.inference import predictor as predictor_lib
from mura_jax.inference import steps
from mura_jax.serving import export
from mura_jax.serving import predict


@pytest.fixture(scope='module')
def calibrated(trained_workdir, tmp_path_factory):
  """(workdir, config, report): a copy of the trained workdir (the shared one stays unscaled),
  evaluated with config.evaluation.temperature='fit'."""
  trained, config = trained_workdir
  workdir = tmp_path_factory.mktemp('calibrated') / 'workdir'
  shutil.copytree(trained, workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.evaluation.temperature = 'fit'
  config.evaluation.bootstrap_resamples = 20
  return workdir, config, evaluate.evaluate_checkpoint(config, str(workdir))


def _raw_predictor(workdir):
  return predictor_lib.Predictor.from_workdir(workdir, 'best', temperature=1.0)


def test_evaluate_fits_on_validation_logits_stores_and_reports(calibrated):
  workdir, config, report = calibrated
  record = json.loads((workdir / checkpoints.TEMPERATURE_FILE).read_text())
  # The network's own validation logits, fitted here independently of evaluate mode.
  source = input_pipeline.data_source(config.data.data_dir, 'validation')
  index = input_pipeline.read_split_index(config.data.data_dir, 'validation')
  logits = _raw_predictor(workdir).predict_split(source)['logit']
  expected = calibration.fit_temperature(logits, index.label)
  # 1e-5: evaluate's logits and these come from differently batched runs (float32 sums); a wrong
  # fit (1/T, another objective) is off by far more.
  assert record['temperature'] == pytest.approx(expected['temperature'], rel=1e-5)
  assert abs(np.log(record['temperature'])) > 0.05  # a temperature that changes something
  step = report['checkpoint']['step']
  assert record['checkpoint'] == {'name': 'best', 'step': step}
  section = report['calibration']['temperature']
  assert section['temperature'] == record['temperature'] and 'optimistic' in section['caveat']
  # Every study probability of the report is the mean of its views' sigmoid(logit / T).
  scaled = special.expit(logits / record['temperature'])
  with open(workdir / 'eval' / 'validation' / 'study_probabilities.csv') as f:
    rows = list(csv.DictReader(f))
  means = np.bincount(index.study_index, scaled) / np.bincount(index.study_index)
  reported = {r['study'].rstrip('/').split('/', 1)[1]: float(r['probability']) for r in rows}
  assert len(reported) == len(index.studies)
  # (the same network on other batch sizes: float32 logits that differ in the last bits)
  np.testing.assert_allclose([reported[s] for s in index.studies], means, atol=1e-6)
  # ECE before (the network's own) and after, both with CIs, in report.md.
  markdown = (workdir / 'eval' / 'validation' / 'report.md').read_text()
  assert 'ECE before T' in markdown and f'{record["temperature"]:.4f}' in markdown
  before, after = section['ece_before']['all'], report['calibration']['groups']['all']['ece']
  assert before['value'] != after['value'] and before['ci_low'] is not None


def test_predictor_export_and_mura_predict_give_the_scaled_probabilities(calibrated, tmp_path,
                                                                         synthetic_dir, capsys):
  workdir, config, _ = calibrated
  temperature = json.loads((workdir / checkpoints.TEMPERATURE_FILE).read_text())['temperature']
  stored = predictor_lib.Predictor.from_workdir(workdir, 'best')
  assert stored.temperature == temperature
  assert stored.spec['temperature']['temperature'] == temperature
  folder = tmp_path / 'export'
  manifest = export.export(workdir, 'best', folder, config=config)
  assert manifest['spec']['temperature']['temperature'] == temperature
  card = json.loads((folder / 'model_card.json').read_text())
  assert card['calibration']['temperature'] == temperature
  assert card['validation']['calibration']['ece_before_temperature'] is not None
  assert 'sigmoid(logit / T)' in (folder / 'model_card.md').read_text()
  assert exported_lib.load(folder).temperature == temperature
  studies = synthetic_dir / 'MURA-v1.1' / 'valid' / 'XR_FINGER'
  results = {}
  for name, flag in (('model', ['--model', folder]), ('workdir', ['--workdir', workdir])):
    code = predict.main([str(studies), *map(str, flag), '--out', str(tmp_path / name)])
    assert code == predict.EXIT_OK
    assert f'T = {temperature:.4f}' in capsys.readouterr().err
    with open(tmp_path / name / 'views.csv') as f:
      results[name] = {r['file']: float(r['probability']) for r in csv.DictReader(f)}
  files = list(results['workdir'])  # in the order mura-predict predicted them
  assert sorted(files) == sorted(results['model']) and files
  # The network's own logits of those views, batched as mura-predict batches them.
  raw = predictor_lib.Predictor.from_workdir(workdir, 'best', temperature=1.0, global_batch=32)
  logits = steps.predict_split(
      raw.step('predict'), raw.variables,
      steps.ViewSource([images.read_view(f).pixels for f in files]), mesh=raw.mesh,
      global_batch=steps.fitted_batch(len(files), 32, raw.mesh.size),
      preprocessing=raw.preprocessing)['logit']
  expected = special.expit(logits / temperature)
  np.testing.assert_allclose([results['workdir'][f] for f in files], expected, rtol=1e-12)
  np.testing.assert_allclose([results['model'][f] for f in files], expected, atol=2e-6)
  assert np.abs(expected - special.expit(logits)).max() > 1e-3  # scaling changed them


def test_temperature_kept_by_default_removed_by_none_and_a_damaged_file_named(calibrated, tmp_path):
  workdir, config, _ = calibrated
  path = workdir / checkpoints.TEMPERATURE_FILE
  kept = path.read_text()
  try:
    path.write_text('{"temperature": -1, "checkpoint": {}}')
    with pytest.raises(UserError, match='temperature.json is damaged .*not a positive number'):
      predictor_lib.Predictor.from_workdir(workdir, 'best')
    path.write_text(kept)
    # A later plain evaluate (the default 'keep') scores with the stored T and keeps it.
    plain = ml_collections.ConfigDict(config.to_dict())
    plain.evaluation.temperature = 'keep'
    plain.evaluation.bootstrap_resamples = 0
    report = evaluate.evaluate_checkpoint(plain, str(workdir))
    assert path.read_text() == kept
    assert report['calibration']['temperature']['temperature'] == json.loads(kept)['temperature']
    off = ml_collections.ConfigDict(config.to_dict())
    off.evaluation.temperature = 'none'
    off.evaluation.bootstrap_resamples = 0
    report = evaluate.evaluate_checkpoint(off, str(workdir))
    assert not path.exists() and report['calibration']['temperature'] is None
    assert predictor_lib.Predictor.from_workdir(workdir, 'best').temperature == 1.0
  finally:
    path.write_text(kept)
