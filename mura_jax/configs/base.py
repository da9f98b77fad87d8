"""Defaults shared by every config: the paper's recipe where it has one.

Configs (the files users pass to --config, in the repository's configs/ folder, and the embedded
demo here) start from `base_config()` and override what differs.
"""

import functools
import math

import ml_collections
from mura_jax.errors import ConfigError
from mura_jax.models.densenet import ARCHS


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = 'train'  # data | train | evaluate | cam | export
  config.seed = 0
  config.distributed = 'auto'        # jax.distributed: auto | on | off (parallel.py)
  config.compilation_cache_dir = ''  # '' = ~/.cache/mura_jax/jax; 'none' = no persistent cache
  # True: continue a workdir with a config that changes results (logged, recorded in reports).
  config.allow_config_change = False

  config.data = ml_collections.ConfigDict()
  # MURA-v1.1.zip or MURA-v1.1/ (only needed to build; '' = WORKDIR/synthetic).
  config.data.manual_dir = ''
  config.data.data_dir = ''     # TFDS data_dir holding mura/1.1.0 ('' = WORKDIR/tfds)
  config.data.synthetic = False  # make a synthetic MURA in manual_dir when it has none
  config.data.synthetic_studies_per_part = 60
  config.data.synthetic_valid_studies_per_part = 40
  config.data.synthetic_seed = 0
  config.data.build_workers = 0  # 0: all cores
  config.data.image_size = 224
  config.data.resize = 'squash'  # the paper scales to 224 x 224; 'pad' keeps the aspect ratio
  config.data.flip = True        # random lateral flips
  config.data.rotation_degrees = 30.0
  # grain worker processes: 0 reads in the training process (the demo's tiny views: a worker
  # costs more to start than it saves); -1 one per core, at most 32 (input_pipeline.worker_count)
  config.data.num_workers = 0
  # Study types trained on and evaluated: 'all' (those with training images) or e.g.
  # 'humerus,wrist'; the weighted loss uses these parts only.
  config.data.body_parts = 'all'

  config.model = ml_collections.ConfigDict()
  config.model.arch = 'densenet169'  # densenet121/161/169/201, or 'custom' with the fields below
  config.model.init = 'random'       # 'random', 'torchvision:PATH' or 'keras:PATH'
  config.model.in_channels = 3       # 3: gray replicated (exact); 1: conv0 folded (models.weights)
  config.model.dtype = 'float32'     # compute dtype; 'bfloat16' on accelerators
  config.model.drop_rate = 0.0
  config.model.remat = False         # memory-efficient DenseNet
  # Dense layers per jax.lax.scan (models/scanned_block.py): the same results, a train step that
  # compiles in about half the time (BENCHMARKS.md, "DenseNet-169: throughput and compile
  # time"); 0 compiles every layer on its own, as does a drop_rate > 0 (no dropout in the scan).
  config.model.scan_segment = 8
  # With the scan, the first blocks stay unrolled (DenseNet.unrolled_blocks): at 56 x 56 and
  # 28 x 28 the scan's padded channels cost more than their 18 layers' compile (same section).
  config.model.unrolled_blocks = 2
  config.model.growth_rate = 32
  config.model.block_config = (6, 12, 32, 32)
  config.model.num_init_features = 64
  config.model.bn_size = 4

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.plateau_factor = 0.1    # lr / 10 ...
  config.optimizer.plateau_patience = 1    # ... after one epoch without a lower validation loss
  config.optimizer.plateau_rtol = 1e-4
  # Many devices (configs/tpu_pod.py, gpu_cluster.py): 'sqrt' multiplies the learning rate by
  # sqrt(global batch / reference_batch_size), the square-root rule for Adam (Malladi et al.,
  # "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022); not Goyal
  # et al.'s linear rule, which is derived for SGD.
  config.optimizer.lr_scaling = 'none'   # none | sqrt
  config.optimizer.reference_batch_size = 8  # the paper's batch, for which lr 1e-4 is tuned
  # A linear warm-up of the learning rate over this many epochs' steps (0: none, as the paper);
  # the large-batch configs use 1: Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet
  # in 1 Hour" (2017), section 2.2's gradual warm-up, for a large batch's larger learning rate in
  # the first updates (5 epochs of 90 there, 1 of 20 here: about the same share;
  # training/state.py's warmup_scale).
  config.optimizer.warmup_epochs = 0.0

  config.train = ml_collections.ConfigDict()
  config.train.global_batch_size = 8
  config.train.per_device_batch_size = 0  # > 0: the global batch is this x the device count
  config.train.num_epochs = 20  # not stated in the paper; the best checkpoint is what counts
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 1000
  config.train.keep_checkpoints = 3  # latest steps kept for resuming
  config.train.keep_best = 5         # lowest validation losses kept for inference (later paper: 5)
  # True: after training, the same model and recipe trained again on study labels permuted within
  # body part, into WORKDIR/controls/shuffled_labels: the CAM report's control
  # (training/controls.py)
  config.train.shuffled_labels_control = False

  config.evaluation = ml_collections.ConfigDict()
  config.evaluation.global_batch_size = 64
  config.evaluation.per_device_batch_size = 0  # > 0: this x the device count
  config.evaluation.checkpoint = 'best'   # best | latest | a step
  config.evaluation.split = 'validation'
  config.evaluation.bootstrap_resamples = 10_000
  config.evaluation.seed = 0
  config.evaluation.aggregation = 'mean'  # the paper: mean of the views' probabilities
  config.evaluation.threshold = 0.5
  config.evaluation.readers = ''  # CSV `study,<reader>,...` of radiologists' labels (paper 4.2)
  # Ensembles (ensembles.py): the K best checkpoints of the run (later paper: 5) and of each
  # workdir in `workdirs` (comma-separated: other seeds, architectures, body-part models).
  config.evaluation.ensemble = 1
  config.evaluation.workdirs = ''
  config.evaluation.ensemble_order = 'views'  # views: mean over members, then over views; studies
  config.evaluation.tta = 'none'              # 'flip': mean of each view and its lateral mirror
  config.evaluation.compare = ''   # another workdir or a predictions CSV: paired comparison
  config.evaluation.threshold_from = ''   # a report.json whose operating point sets the threshold
  config.evaluation.operating_point = ''  # its name: specificity@0.95 (default), worklist, ...
  # 'fit': one temperature T fitted on the validation views' logits, stored in
  # WORKDIR/temperature.json; predict, CAM and export then give sigmoid(logit / T).
  # 'keep': a T stored for the evaluated checkpoint is applied, none is fitted; 'none': unscaled
  # (a stored T is removed). evaluation/calibration.py.
  config.evaluation.temperature = 'keep'

  # What runs after a finished training, in order: evaluate (the best checkpoint; with
  # evaluation.ensemble > 1 then the ensemble of the best kept), cam. '' = nothing.
  config.after_training = 'evaluate'  # the demo adds cam
  config.cam = ml_collections.ConfigDict()  # class activation maps (mode cam; cam.py)
  config.cam.split = 'validation'
  config.cam.checkpoint = 'best'
  config.cam.studies = ''          # comma-separated study ids to draw; '' = the choice below
  config.cam.num_abnormal = 4      # the most confidently abnormal studies
  config.cam.num_uncertain = 4     # the studies closest to the threshold
  config.cam.annotations = ''      # boxes CSV; '' = MANUAL_DIR/synthetic_annotations.csv if there
  # confounder boxes CSV (image_path,confounder,x0,y0,x1,y1); '' = MANUAL_DIR/
  # synthetic_confounders.csv if there
  config.cam.confounders = ''
  # The map of a view averaged with its lateral mirror's map mirrored back (inference/steps.py,
  # view_maps): maps that do not lean to the side the network happened to learn. False: the
  # paper's plain CAM. The demo turns it on (measured there: BENCHMARKS.md, "Mirror-averaged maps").
  config.cam.flip_average = False
  config.cam.randomisation_seed = 1  # the cascading randomisation's fresh initialisation ...
  # ... drawn this many times per stage (seeds randomisation_seed, +1, ...): one random network's
  # pointing is one sample (its classifier's random signs decide where its map peaks)
  config.cam.randomisation_draws = 5
  config.cam.bootstrap_resamples = 2_000

  config.export = ml_collections.ConfigDict()  # mode export (export.py)
  config.export.checkpoint = 'best'  # best | latest | a step
  config.export.dir = ''             # '' = WORKDIR/export
  return config


# ------------------------------------------------------------------------------------------------
# The values each key allows, checked by main.py before any work: a bad one is a sentence naming
# the key, not a ZeroDivisionError an hour later. (evaluation.*'s other keys:
# scoring.check_evaluation_config.)

DTYPES = ('float32', 'bfloat16', 'float16')


def _range_text(low, high, low_open, high_open) -> str:
  if high is None:
    return f'{">" if low_open else ">="} {low}'
  return f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'


def _check_number(config, key: str, *, integer: bool, low, high=None, low_open=False,
                  high_open=False, why: str = '') -> None:
  section, _, name = key.rpartition('.')
  node = config[section] if section else config
  if name not in node:
    return
  value = node[name]
  kind = 'an integer' if integer else 'a finite number'
  allowed = f'{kind} {_range_text(low, high, low_open, high_open)}'
  ok = isinstance(value, int) if integer else isinstance(value, (int, float))
  if ok and not isinstance(value, bool):
    ok = math.isfinite(value) and (value > low if low_open else value >= low)
    if ok and high is not None:
      ok = value < high if high_open else value <= high
  else:
    ok = False
  if not ok:
    default = base_config()
    for part in key.split('.'):
      default = default[part]
    raise ConfigError(f'config.{key}={value!r}; expected {allowed}{why} (default: '
                      f'--config.{key}={default}).')


def _check_choice(config, key: str, choices, why: str = '') -> None:
  section, _, name = key.rpartition('.')
  if name not in config[section]:
    return
  value = config[section][name]
  if value not in choices:
    raise ConfigError(f'config.{key}={value!r}; expected one of {", ".join(map(str, choices))}'
                      f'{why}.')


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises errors.ConfigError naming the first key whose value cannot be used, and what it
  allows. Only the values: files are checked by workdir.check_named_files."""
  integer = functools.partial(_check_number, config, integer=True)
  number = functools.partial(_check_number, config, integer=False)
  for key in ('train.global_batch_size', 'evaluation.global_batch_size'):
    integer(key, low=1)
  for key in ('train.per_device_batch_size', 'evaluation.per_device_batch_size'):
    integer(key, low=0, why=' (0: use the global batch size)')
  integer('train.num_epochs', low=1)
  integer('train.log_every_steps', low=1)
  integer('train.checkpoint_every_steps', low=0, why=' (0: only at the end of each epoch)')
  integer('train.keep_checkpoints', low=1)
  integer('train.keep_best', low=1)
  number('optimizer.learning_rate', low=0, low_open=True)
  number('optimizer.b1', low=0, high=1, high_open=True)
  number('optimizer.b2', low=0, high=1, high_open=True)
  number('optimizer.eps', low=0, low_open=True)
  number('optimizer.plateau_factor', low=0, high=1, low_open=True)
  integer('optimizer.plateau_patience', low=0)
  number('optimizer.plateau_rtol', low=0)
  integer('optimizer.reference_batch_size', low=1)
  number('optimizer.warmup_epochs', low=0)
  _check_choice(config, 'optimizer.lr_scaling', ('none', 'sqrt'))
  integer('seed', low=0)
  integer('cam.randomisation_seed', low=0)
  integer('cam.randomisation_draws', low=1)
  integer('data.synthetic_studies_per_part', low=1)
  integer('data.synthetic_valid_studies_per_part', low=1)
  integer('data.synthetic_seed', low=0)
  integer('data.build_workers', low=0, why=' (0: all cores)')
  integer('data.num_workers', low=-1, why=' (0: read in the main process; -1: one per core)')
  number('data.rotation_degrees', low=0, high=180)
  _check_choice(config, 'data.resize', ('squash', 'pad'))
  m = config.model
  _check_choice(config, 'model.arch', (*ARCHS, 'custom'))
  _check_choice(config, 'model.dtype', DTYPES, ' (the compute dtype; parameters stay float32)')
  _check_choice(config, 'model.in_channels', (1, 3))
  number('model.drop_rate', low=0, high=1, high_open=True)
  integer('model.scan_segment', low=0, why=' (0: no scan)')
  integer('model.unrolled_blocks', low=0)
  if m.arch == 'custom':
    integer('model.growth_rate', low=1)
    integer('model.num_init_features', low=1)
    integer('model.bn_size', low=1)
    blocks = m.block_config
    if (not isinstance(blocks, (tuple, list)) or not blocks
        or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in blocks)):
      raise ConfigError(f'config.model.block_config={blocks!r}; expected dense layers per block, '
                        'integers >= 1, e.g. (6, 12, 32, 32) (densenet169).')
  num_blocks = len(ARCHS[m.arch]['block_config'] if m.arch in ARCHS else m.block_config)
  # conv0 and the max pool halve the input, each transition halves it again: below this size a
  # feature map would be empty.
  smallest = 4 * 2 ** (num_blocks - 1)
  integer('data.image_size', low=smallest,
          why=f' ({m.arch} with {num_blocks} dense blocks makes feature maps 1/{smallest} of it)')
  kind, _, path = str(m.init).partition(':')
  if m.init != 'random' and (kind not in ('torchvision', 'keras') or not path):
    raise ConfigError(f'config.model.init={m.init!r}; expected random, torchvision:PATH (a .pth '
                      'or .safetensors file) or keras:PATH (a .h5 file).')
