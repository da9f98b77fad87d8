"""Every bad input of `python -m mura_jax.main` (the command line, the config, the workdir) and the
message it must print: one or a few lines naming the key, file or folder and what to do, exit 2,
the traceback only with --verbose. docs/troubleshooting.md quotes these.

    input                                         message (start)
    --help                                        the modes, the flags, every config key (exit 0)
    --config.train.foo=1                          error: --config.train.foo: train has no key 'foo'
    --config.trian.num_epochs=1                   ... has no key 'trian' (did you mean train?)
    --config.train.num_epochs=abc                 error: flag --config.train.num_epochs=abc: ...
    --config.mode=fly                             error: config.mode='fly'; expected one of data, ...
    --config nope.py                              error: --config nope.py: no such config file ...
    a config file that raises (line N)            error: --config F failed at line N: ...
    --config.train.global_batch_size=0 (any       error: config.train.global_batch_size=0;
      numeric key out of its range)                 expected an integer >= 1 (default: ...)
    --config.optimizer.learning_rate=nan          error: config.optimizer.learning_rate=nan;
                                                    expected a finite number > 0 (default: ...)
    --config.data.image_size=0                    ... expected an integer >= 8 (custom with 2 dense
                                                    blocks makes feature maps 1/8 of it) ...
    --config.model.dtype=float8                   error: config.model.dtype='float8'; expected one
                                                    of float32, bfloat16, float16 ...
    evaluate/cam/export on a workdir without      error: DIR has no checkpoints: evaluate reads a
      checkpoints                                   trained model ... Train first ...
    a second run on a workdir in use              error: DIR is in use by another mura-jax run:
                                                    pid N on host H, started ... (test_workdir_lock)
    the disk full while saving                    error: The disk holding DIR is full ... the last
                                                    good checkpoint is step N ... (test_train.py)
    a workdir that cannot be written              error: Cannot write to DIR (...) ... pass a --workdir
    a finished run continued with another config  error: DIR holds a run trained with another config
    evaluate/cam/export with another image size   error: evaluate runs with the config the run in
                                                    DIR was trained with ... may change only its
                                                    own keys ... changes --config.data.image_size
    a data_dir without a built dataset            error: No built `mura` dataset with split ...
    a data_dir that is the dataset's mura/ folder error: The data_dir D/mura is the mura/ folder ...
                                                    use --config.data.data_dir=D
    --config.evaluation.readers=MISSING (also     error: --config.evaluation.readers=MISSING: no
      threshold_from, compare, cam.annotations)     such file or folder. It should be ...
    --config.model.init=torchvision:MISSING       error: No weights file at MISSING. (where to get it)
    --config.export.dir that cannot be written    error: Cannot write to DIR ... Pass a
                                                    --config.export.dir you can write to
    a body part without abnormal training images  warning: ... weight 0, so training learns nothing
"""

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import pytest

import conftest
from mura_jax import checkpoints
from mura_jax import main
from mura_jax import workdir as workdir_lib
from mura_jax.configs import base as base_configs
from mura_jax.data import input_pipeline
from mura_jax.errors import ConfigError, UserError
from mura_jax.evaluation import evaluate
from mura_jax.training import loss as loss_lib
from mura_jax.training import train

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def run_main(*flags, cwd=None):
  env = {**os.environ, 'XLA_FLAGS': conftest.xla_flags(1)}
  return subprocess.run([sys.executable, '-m', 'mura_jax.main', *flags], capture_output=True,
                        text=True, cwd=cwd or REPO, env=env, timeout=600)


def tiny_config_file(tmp_path, data_dir) -> str:
  """A --config file giving test_train's tiny_config (what `trained_workdir` was trained with)."""
  path = tmp_path / 'tiny_config.py'
  path.write_text(f'import sys\nsys.path.insert(0, {TESTS!r})\n'
                  'from test_train import tiny_config\n\n'
                  f'def get_config():\n  return tiny_config({str(data_dir)!r})\n')
  return str(path)


def copy_of(trained_workdir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained_workdir[0], workdir)
  return workdir


def assert_user_error(out, *phrases):
  """Exit 2, the phrases on stderr, no traceback."""
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  for phrase in phrases:
    assert phrase in out.stderr, (phrase, out.stderr[-3000:])


# ------------------------------------------------------------------------------------------------
# The command line.


def test_help_lists_the_modes_flags_and_every_config_key():
  out = run_main('--help')
  assert out.returncode == 0, out.stderr
  for mode in ('data', 'train', 'evaluate', 'cam', 'export'):
    assert f'\n  {mode} ' in out.stdout
  assert '--workdir' in out.stdout and '--verbose' in out.stdout and 'densenet169.py' in out.stdout
  # Every key, with its value in the demo config and base.py's comment.
  assert '--config.data.image_size=160' in out.stdout
  assert "--config.data.resize='squash'" in out.stdout and 'keeps the aspect ratio' in out.stdout
  assert '--config.allow_config_change=False' in out.stdout
  # With --config, that config's values.
  paper = run_main('--config', 'configs/densenet169.py', '--help')
  assert paper.returncode == 0 and '--config.data.image_size=224' in paper.stdout


def test_unknown_config_key_is_one_sentence_with_the_keys_there(tmp_path):
  out = run_main('--workdir', str(tmp_path), '--config.train.foo=1')
  assert_user_error(out, "error: --config.train.foo: train has no key 'foo'",
                    'num_epochs', '--help')
  assert len(out.stderr.strip().splitlines()) == 2
  typo = run_main('--workdir', str(tmp_path), '--config.trian.num_epochs=1')
  assert_user_error(typo, "the config has no key 'trian' (did you mean train?)")


def test_config_value_of_the_wrong_type(tmp_path):
  out = run_main('--workdir', str(tmp_path), '--config.train.num_epochs=abc')
  assert_user_error(out, 'error: flag --config.train.num_epochs=abc', "invalid literal for int()")


def test_unknown_mode_lists_the_modes(tmp_path):
  out = run_main('--workdir', str(tmp_path), '--config.mode=fly')
  assert_user_error(out, "error: config.mode='fly'; expected one of data, train, evaluate, cam, "
                    'export.', '--verbose prints the traceback')
  verbose = run_main('--workdir', str(tmp_path), '--config.mode=fly', '--verbose')
  assert verbose.returncode != 0 and 'Traceback' in verbose.stderr
  assert 'ConfigError' in verbose.stderr


def test_a_config_file_that_does_not_exist_or_raises(tmp_path):
  out = run_main('--workdir', str(tmp_path / 'run'), '--config', 'nope.py')
  assert_user_error(out, "error: --config nope.py: no such config file. Pass a Python file with "
                    "get_config(): the repository's configs/ has demo.py, densenet169.py")
  assert len(out.stderr.strip().splitlines()) == 1
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config():\n  return 1 / 0\n')
  out = run_main('--workdir', str(tmp_path / 'run'), '--config', str(broken))
  assert_user_error(out, f'error: --config {broken} failed at line 2: ZeroDivisionError: '
                    'division by zero', '--verbose prints the traceback')
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('key,value,message', [
    ('train.global_batch_size', 0, 'an integer >= 1 (default: --config.train.global_batch_size=8)'),
    ('train.global_batch_size', -8, 'an integer >= 1'),
    ('evaluation.global_batch_size', 0, 'an integer >= 1'),
    ('train.per_device_batch_size', -1, 'an integer >= 0 (0: use the global batch size)'),
    ('data.image_size', 0, 'an integer >= 8 (custom with 2 dense blocks makes feature maps 1/8 '
                           'of it) (default: --config.data.image_size=224)'),
    ('optimizer.learning_rate', float('nan'), 'a finite number > 0 (default: '
                                             '--config.optimizer.learning_rate=0.0001)'),
    ('optimizer.learning_rate', 0.0, 'a finite number > 0'),
    ('optimizer.learning_rate', float('inf'), 'a finite number > 0'),
    ('train.num_epochs', 0, 'an integer >= 1'),
    ('model.dtype', 'float8', 'one of float32, bfloat16, float16 (the compute dtype; parameters '
                              'stay float32)'),
    ('optimizer.b1', 1.0, 'a finite number in [0, 1)'),
    ('data.rotation_degrees', -5.0, 'a finite number in [0, 180]'),
    ('train.keep_best', 0, 'an integer >= 1'),
    ('model.block_config', (2, 0), 'dense layers per block, integers >= 1'),
    ('cam.randomisation_draws', 0, 'an integer >= 1 (default: --config.cam.randomisation_draws=5)'),
    ('cam.randomisation_seed', -1, 'an integer >= 0'),
])
def test_a_bad_value_is_one_sentence_naming_the_key_before_any_work(tmp_path, key, value, message):
  config = _tiny(tmp_path)
  section, name = key.split('.')
  config[section][name] = value
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError) as error:
    main.run(config, str(workdir))
  assert str(error.value).startswith(f'config.{key}={value!r}; expected '), str(error.value)
  assert message in str(error.value)
  assert list(workdir.iterdir()) == []  # nothing written, no lock left


@pytest.mark.parametrize('mode', ['train', 'evaluate', 'cam'])
def test_a_bad_evaluation_value_stops_every_mode_that_evaluates_before_any_work(tmp_path, mode):
  config = _tiny(tmp_path)
  config.mode = mode
  config.evaluation.threshold = float('nan')  # training evaluates at its end, cam thresholds
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError) as error:
    main.run(config, str(workdir))
  assert str(error.value).startswith('--config.evaluation.threshold=nan: expected a number from 0 '
                                     'to 1'), str(error.value)
  assert list(workdir.iterdir()) == []  # nothing written, no lock left


def _tiny(tmp_path):
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path)
  config.data.image_size = 32
  return config


def test_a_bad_value_on_the_command_line_exits_with_the_sentence(tmp_path):
  out = run_main('--workdir', str(tmp_path / 'run'), '--config.optimizer.learning_rate=nan')
  assert_user_error(out, 'error: config.optimizer.learning_rate=nan; expected a finite number > 0')
  assert 'checkpoint' not in out.stderr  # no checkpoint named: none exists
  assert not (tmp_path / 'run' / 'synthetic').exists()  # refused before the demo's data


@pytest.mark.parametrize('mode', ['evaluate', 'cam', 'export'])
def test_a_workdir_without_checkpoints_says_train_first(tmp_path, mode):
  workdir = tmp_path / 'run'
  config = _tiny(tmp_path)
  config.mode = mode
  config.evaluation.ensemble = 5  # not "0 checkpoints, fewer than the 5 asked for"
  with pytest.raises(checkpoints.CheckpointNotFoundError) as error:
    main.run(config, str(workdir))
  assert str(error.value) == (
      f'{workdir} has no checkpoints: {mode} reads a trained model from its workdir. Train first '
      f'with the same --workdir (--config.mode=train, with the config you will {mode} with), or '
      'pass the --workdir of a trained run.')
  assert list(workdir.iterdir()) == []
  # The same from the ensemble's own look-up (another workdir of config.evaluation.workdirs).
  with pytest.raises(checkpoints.CheckpointNotFoundError, match='has no checkpoints'):
    checkpoints.best_steps(workdir, 5)


# ------------------------------------------------------------------------------------------------
# The workdir.


def _unwritable_workdir(tmp_path) -> str:
  """A folder this process cannot write in: chmod 555, or (as root, which ignores modes) a path
  under /sys, where nobody may create folders."""
  parent = tmp_path / 'read-only'
  parent.mkdir()
  parent.chmod(0o555)
  if not os.access(parent, os.W_OK):
    return str(parent / 'run')
  return '/sys/mura-jax-test-workdir'


def test_unwritable_workdir_fails_before_any_work(tmp_path, mura_data_dir):
  workdir = _unwritable_workdir(tmp_path)
  for mode in ('train', 'evaluate', 'export'):
    out = run_main('--workdir', workdir, f'--config.mode={mode}', '--config.data.synthetic=False',
                   f'--config.data.data_dir={mura_data_dir}')
    assert_user_error(out, f'error: Cannot write to {workdir}', 'pass a --workdir you can write to')
    assert 'Config:' not in out.stderr  # refused before the run started


@pytest.mark.parametrize('flag', [
    '--config.evaluation.readers', '--config.evaluation.threshold_from',
    '--config.evaluation.compare', '--config.cam.annotations'])
def test_a_named_file_that_does_not_exist_fails_before_any_work(tmp_path, flag):
  missing = tmp_path / 'no-such-file.csv'
  out = run_main('--workdir', str(tmp_path / 'run'), '--config.mode=evaluate', f'{flag}={missing}')
  assert_user_error(out, f'error: {flag}={missing}: no such file or folder. It should be ')
  assert 'Config:' not in out.stderr


def test_missing_weights_file_and_unwritable_export_dir_fail_first(tmp_path):
  out = run_main('--workdir', str(tmp_path / 'run'), '--config', 'configs/densenet169.py',
                 f'--config.model.init=torchvision:{tmp_path}/densenet169.pth')
  assert_user_error(out, f'error: No weights file at {tmp_path}/densenet169.pth',
                    'densenet169-b2777c0a.pth')
  export_dir = _unwritable_workdir(tmp_path) + '/export'
  out = run_main('--workdir', str(tmp_path / 'run'), '--config.mode=export',
                 f'--config.export.dir={export_dir}')
  assert_user_error(out, 'error: Cannot write to', 'Pass a --config.export.dir you can write to')


def test_finished_run_continued_with_another_config_is_refused(tmp_path, mura_data_dir,
                                                              trained_workdir):
  workdir = copy_of(trained_workdir, tmp_path)
  config_file = tiny_config_file(tmp_path, mura_data_dir)
  before = (workdir / 'config.json').read_text()
  out = run_main('--config', config_file, '--workdir', str(workdir), '--config.seed=3',
                 '--config.optimizer.learning_rate=0.01')
  assert_user_error(out, f'error: {workdir} holds a run trained with another config',
                    'optimizer.learning_rate: 0.001 in the workdir, 0.01 now',
                    'seed: 0 in the workdir, 3 now', '--config.allow_config_change=True')
  assert (workdir / 'config.json').read_text() == before  # nothing written
  assert not (workdir / 'config_changes.json').exists()
  # What does not change results is free: logging cadence, workers, the evaluation's options.
  same = run_main('--config', config_file, '--workdir', str(workdir),
                  '--config.train.log_every_steps=7', '--config.evaluation.bootstrap_resamples=0',
                  '--config.cam.num_abnormal=1')
  assert same.returncode == 0, same.stderr[-3000:]


def test_intended_config_change_is_logged_and_recorded_in_the_report(tmp_path, trained_workdir):
  workdir = copy_of(trained_workdir, tmp_path)
  config = trained_workdir[1].copy_and_resolve_references()
  config.optimizer.learning_rate = 0.01
  with pytest.raises(ConfigError, match='optimizer.learning_rate: 0.001 in the workdir, 0.01 now'):
    train.train_and_evaluate(config, str(workdir))
  config.allow_config_change = True
  assert train.train_and_evaluate(config, str(workdir))['status'] == 'done'
  changes = workdir_lib.config_changes(workdir)
  assert changes[-1]['changes'] == {'optimizer.learning_rate': {'before': 0.001, 'after': 0.01}}
  assert json.loads((workdir / 'config.json').read_text())['optimizer']['learning_rate'] == 0.01
  config.evaluation.bootstrap_resamples = 0
  report = evaluate.evaluate_checkpoint(config, str(workdir))
  assert report['config_changes'] == changes


def test_evaluate_with_another_image_size_is_refused(tmp_path, mura_data_dir, trained_workdir):
  workdir = copy_of(trained_workdir, tmp_path)
  report = workdir / 'eval' / 'validation' / 'report.json'
  before = report.read_text()
  config_file = tiny_config_file(tmp_path, mura_data_dir)
  for mode in ('evaluate', 'cam', 'export'):
    out = run_main('--config', config_file, '--workdir', str(workdir), f'--config.mode={mode}',
                   '--config.data.image_size=64')
    assert_user_error(out, f'error: {mode} runs with the config the run in {workdir} was trained '
                      'with (its config.json), and may change only its own keys',
                      'this command line changes --config.data.image_size:\n  data.image_size: '
                      '32 in the workdir, 64 now\nDrop it')
  assert report.read_text() == before


def test_missing_dataset_says_how_to_build_it(tmp_path):
  out = run_main('--workdir', str(tmp_path / 'run'), '--config.data.synthetic=False',
                 f'--config.data.data_dir={tmp_path / "empty"}')
  assert_user_error(out, 'error: No built `mura` dataset with split', 'python -m tfds_mura.build')
  assert not (tmp_path / 'empty').exists(), 'reading must not start a build in the data_dir'


@pytest.mark.parametrize('inside', ['mura', 'mura/1.1.0'])
def test_data_dir_given_as_the_datasets_own_folder_names_the_right_one(mura_data_dir, inside):
  folder = mura_data_dir / inside
  before = sorted(p.name for p in folder.iterdir())
  with pytest.raises(UserError) as e:
    input_pipeline.data_source(str(folder), 'train')
  assert str(e.value) == (f'The data_dir {folder} is the {inside}/ folder of a built `mura` '
                          f'dataset, not the data_dir that holds it: use '
                          f'--config.data.data_dir={mura_data_dir}')
  assert sorted(p.name for p in folder.iterdir()) == before


# ------------------------------------------------------------------------------------------------
# The data's consequences.


def test_body_part_without_abnormal_images_warns_of_its_zero_weight(caplog):
  counts = {'wrist': {'normal': 10, 'abnormal': 0}, 'hand': {'normal': 5, 'abnormal': 5}}
  with caplog.at_level('WARNING'):
    weights = loss_lib.loss_weights_from_counts(counts, ('hand', 'wrist'))
  assert weights[loss_lib.BODY_PARTS.index('wrist')].tolist() == [0.0, 1.0]
  assert ('The training split has no abnormal wrist images: the paper\'s weights give its 10 '
          'normal views weight 0') in caplog.text
  assert 'hand' not in caplog.text


def test_every_error_class_is_a_user_error():
  """The entry points print these as sentences; each keeps its built-in base for callers."""
  from mura_jax.serving import export  # pylint: disable=g-import-not-at-top
  from mura_jax.data import images  # pylint: disable=g-import-not-at-top
  from mura_jax.evaluation import studies  # pylint: disable=g-import-not-at-top
  from mura_jax.models import weights  # pylint: disable=g-import-not-at-top
  for cls, base in ((images.ImageError, ValueError), (export.ExportError, ValueError),
                    (studies.PredictionsError, ValueError),
                    (checkpoints.CheckpointNotFoundError, FileNotFoundError),
                    (checkpoints.CheckpointMismatchError, ValueError),
                    (weights.WeightsNotFoundError, FileNotFoundError),
                    (weights.WeightsMismatchError, ValueError),
                    (weights.ReaderNotInstalledError, ImportError),
                    (train.TrainingDivergedError, FloatingPointError)):
    assert issubclass(cls, UserError) and issubclass(cls, base), cls


def test_config_differences_name_model_keys_and_pass_new_keys_at_their_default():
  """'mode' is free, 'model.*' is not (a prefix match once made every model key free); a key the
  workdir's config.json predates changes nothing while it keeps its default, and is named when
  it does not."""
  written = base_configs.base_config()
  now = written.copy_and_resolve_references()
  now.mode = 'cam'
  now.model.block_config = (2, 4)
  assert workdir_lib.config_differences(written, now) == {
      'model.block_config': ([6, 12, 32, 32], [2, 4])}
  older = json.loads(written.to_json_best_effort())
  del older['optimizer']['learning_rate']  # a config.json from before the key existed
  older = ml_collections.ConfigDict(older)
  assert workdir_lib.config_differences(older, written) == {}
  written.optimizer.learning_rate = 0.5
  assert workdir_lib.config_differences(older, written) == {
      'optimizer.learning_rate': ('(absent)', 0.5)}
