"""gs:// readiness: what the project itself writes and reads in a workdir goes through
etils.epath, tested on a `gs://` bucket kept in memory (fsspec's memory file system registered as
the `gs` protocol, epath told to use fsspec; no network). Orbax (tensorstore) and TFDS's
ArrayRecord reader have their own GCS drivers: test_gcs_emulator.py runs the whole demo on a GCS
API server on localhost, each library pointed at it.

A static audit keeps it so: the package opens no file with the built-ins (open, os.makedirs, ...),
which would take a gs:// path for a local one.
"""

import ast
import importlib
import json
import os
import pathlib

import fsspec
import ml_collections
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from mura_jax import workdir as workdir_lib
from mura_jax.configs import base
from mura_jax.evaluation import scorer
from mura_jax.evaluation import scoring
from mura_jax.training import metric_writer

fsspec_registry = importlib.import_module('fsspec.registry')  # the module, not its mapping
PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'mura_jax'


class FakeGCS(MemoryFileSystem):
  """A bucket in memory that counts whole-object writes (what a round trip costs on GCS)."""
  protocol = ('gs', 'gcs')
  root_marker = ''
  writes: list[str] = []

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # pylint: disable=unused-argument
    super().__init__(*args, **kwargs)

  def _open(self, path, mode='rb', **kwargs):
    if 'w' in mode or 'a' in mode:
      FakeGCS.writes.append(path)
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def bucket(monkeypatch):
  # epath's fsspec backend, not TensorFlow's gfile (epath caches whether TensorFlow is there).
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  saved = {name: fsspec.registry.get(name) for name in ('gs', 'gcs')}
  for name in ('gs', 'gcs'):
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  MemoryFileSystem.store.clear()
  FakeGCS.writes = []
  yield 'gs://mura-test-bucket'
  MemoryFileSystem.store.clear()
  for name, cls in saved.items():
    if cls is not None:
      fsspec.register_implementation(name, cls, clobber=True)
    else:
      fsspec_registry._registry.pop(name, None)  # pylint: disable=protected-access


def test_metrics_on_gs_are_written_once_per_flush_not_per_line(bucket, monkeypatch):
  from etils import epath  # pylint: disable=g-import-not-at-top
  # TensorBoard files go through TensorFlow's own GCS driver, which this fake does not replace.
  monkeypatch.setattr(metric_writer, '_import_clu_writers', lambda: None)
  workdir = f'{bucket}/run'
  writer = metric_writer.MetricWriter(workdir)
  for step in range(1, 201):
    writer.write(step, {'loss': 1.0 / step})
  writer.flush()
  writer.write(201, {'loss': 0.5})
  writer.flush()
  lines = [json.loads(line) for line in
           (epath.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  assert [line['step'] for line in lines] == list(range(1, 202))
  metrics_writes = [w for w in FakeGCS.writes if w.endswith('metrics.jsonl')]
  assert len(metrics_writes) == 2  # two flushes, not 201 round trips


def test_workdir_config_checks_on_gs(bucket):
  workdir = f'{bucket}/run'
  workdir_lib.check_writable(workdir)
  config = base.base_config()
  workdir_lib.record_config(workdir, config, continuing=False)
  assert workdir_lib.read_config(workdir).optimizer.learning_rate == config.optimizer.learning_rate
  changed = ml_collections.ConfigDict(config.to_dict())
  changed.seed = 5
  with pytest.raises(ValueError, match='seed: 0 in the workdir, 5 now'):
    workdir_lib.record_config(workdir, changed, continuing=True)
  changed.allow_config_change = True
  workdir_lib.record_config(workdir, changed, continuing=True)
  assert workdir_lib.config_changes(workdir)[0]['changes'] == {'seed': {'before': 0, 'after': 5}}


def test_scorer_reads_and_writes_gs(bucket, tmp_path):
  """The scorer on files in the bucket writes the same report there as on local files."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  studies = [f'MURA-v1.1/valid/XR_WRIST/patient{i:05d}/study1_{"positive" if i % 2 else "negative"}/'
             for i in range(40)]
  labels = ''.join(f'{s},{i % 2}\n' for i, s in enumerate(studies))
  predictions = ''.join(f'{s},{p:.4f}\n' for s, p in zip(studies, rng.random(len(studies))))
  for folder in (epath.Path(f'{bucket}/in'), epath.Path(tmp_path)):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'labels.csv').write_text(labels)
    (folder / 'predictions.csv').write_text(predictions)
  options = scoring.Options(num_resamples=200, seed=0)
  remote = scorer.score_files(f'{bucket}/in/predictions.csv', f'{bucket}/in/labels.csv',
                                  f'{bucket}/out', options=options)
  local = scorer.score_files(tmp_path / 'predictions.csv', tmp_path / 'labels.csv',
                                 tmp_path / 'out', options=options)
  assert remote == local
  out = epath.Path(f'{bucket}/out')
  for name in ('report.json', 'report.md', 'predictions.csv', 'study_probabilities.csv',
               'roc.png'):
    assert (out / name).exists(), name
  assert json.loads((out / 'report.json').read_text()) == json.loads(
      (tmp_path / 'out' / 'report.json').read_text())


# Reads of the machine's own files, not of a workdir or data_dir.
_LOCAL_ONLY = {('train.py', '/proc/self/stat'), ('train.py', '/proc/uptime'),
               ('host.py', '/sys/kernel/mm/transparent_hugepage/enabled')}


def test_the_package_opens_no_workdir_file_with_the_builtins():
  """open(), os.makedirs, os.path.exists, shutil, glob take a gs:// path for a local one."""
  forbidden = {'open', 'os.makedirs', 'os.mkdir', 'os.listdir', 'os.remove', 'os.rename',
               'os.replace', 'os.path.exists', 'os.path.isdir', 'os.path.isfile', 'shutil.copy',
               'shutil.copytree', 'shutil.rmtree', 'shutil.move', 'glob.glob'}

  def dotted(node):
    if isinstance(node, ast.Name):
      return node.id
    if isinstance(node, ast.Attribute):
      owner = dotted(node.value)
      return owner and f'{owner}.{node.attr}'
    return None

  found = []
  for path in sorted(PACKAGE.rglob('*.py')):
    if path.name in ('main.py', 'cli.py'):  # the command line's config files (local by nature)
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Call) and dotted(node.func) in forbidden:
        first = node.args[0] if node.args else None
        literal = first.value if isinstance(first, ast.Constant) else None
        if (path.name, literal) not in _LOCAL_ONLY:
          found.append(f'{path.relative_to(PACKAGE)}:{node.lineno} {dotted(node.func)}()')
  assert not found, f'use etils.epath for workdir/data_dir files: {found}'
  assert os.path.isdir(PACKAGE)


def test_gs_without_gcsfs_is_a_sentence_naming_the_install(monkeypatch):
  """The README's install has no gcsfs (the tpu, cuda and gcs extras bring it): a gs:// workdir
  is refused before any work, saying what to install, not with fsspec's ImportError."""
  from etils.epath import backend, gpath  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)  # epath's fsspec backend
  cached = backend.fsspec_backend._get_filesystem  # pylint: disable=protected-access
  cached.cache_clear()  # the file system an earlier test used
  for name in ('gs', 'gcs'):  # as fsspec knows them when gcsfs is not installed
    monkeypatch.setitem(fsspec_registry.known_implementations, name,
                        {'class': 'mura_jax_no_gcsfs.GCSFileSystem',
                         'err': 'Please install gcsfs to access Google Storage'})
    monkeypatch.delitem(fsspec_registry._registry, name, raising=False)  # pylint: disable=protected-access
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r'Cannot write to gs://b/run: gs:// paths need gcsfs: pip install '
                           r'"mura-jax\[gcs\]"'):
    workdir_lib.check_writable('gs://b/run')
  cached.cache_clear()


def test_a_gs_data_dir_is_built_locally_then_copied_up(bucket, tiny_tree, monkeypatch):
  """ArrayRecord's writer opens local files only: the build goes to a local folder and is copied
  into the gs:// data_dir (test_gcs_emulator.py does it on a GCS server); a copy that fails is a
  sentence, and what was copied is not taken for a built dataset."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from tfds_mura import build  # pylint: disable=g-import-not-at-top
  from tfds_mura.mura import mura_dataset_builder as mura  # pylint: disable=g-import-not-at-top
  real_open = FakeGCS._open  # pylint: disable=protected-access

  def no_shards(self, path, mode='rb', **kwargs):
    if 'w' in mode and '.array_record' in path:
      raise PermissionError(13, 'Permission denied', path)
    return real_open(self, path, mode, **kwargs)

  monkeypatch.setattr(FakeGCS, '_open', no_shards)
  with pytest.raises(mura.MuraDataError, match=r'The dataset was built, but copying it into '
                                              r'gs://mura-test-bucket/broken/mura/1\.1\.0 failed'):
    build.build(str(tiny_tree), f'{bucket}/broken', num_workers=1)
  assert not (epath.Path(f'{bucket}/broken/mura/1.1.0') / 'dataset_info.json').exists()
  monkeypatch.setattr(FakeGCS, '_open', real_open)
  built = build.build(str(tiny_tree), f'{bucket}/tfds', num_workers=1)
  folder = epath.Path(f'{bucket}/tfds/mura/1.1.0')
  names = {f.name for f in folder.iterdir()}
  assert {'dataset_info.json', 'mura-train.array_record-00000-of-00001',
          'mura-validation.array_record-00000-of-00001'} <= names
  assert built.data_dir == str(folder)
  again = build.build(None, f'{bucket}/tfds')  # no manual_dir: only a built dataset will do
  assert again.info.splits['train'].num_examples == built.info.splits['train'].num_examples > 0
