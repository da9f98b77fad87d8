r"""Bootstrap speed: 10,000 resamples x 1,199 studies x 8 groups x all metrics, in one run.

Compares `mura_jax.evaluation.bootstrap` (jitted, chunked, every group and metric at once) with the naive
loop most reimplementations use: per resample, per group, one scikit-learn call per metric. The
loop is timed on a slice (--loop-resamples) and scaled to the full count.

Both do the same work: draw the resample, then F1, Cohen's kappa, AUROC, accuracy, sensitivity,
specificity, precision and NPV for the 7 body parts and the aggregate; the vectorised side also
turns the samples into 95% percentile CIs (the loop's share of that is negligible and left out).

The data is synthetic with MURA-valid group sizes (1,199 studies: normal/abnormal per body part as
in the paper) and continuous study probabilities.

  python benchmarks/bootstrap_speed.py [--resamples 10000] [--loop-resamples 50] [--repeats 5]
"""
import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np
from sklearn import metrics as skm

from mura_jax.evaluation import bootstrap
from mura_jax.evaluation import reports
from mura_jax.evaluation import metrics
from mura_jax.evaluation.scoring import Options
from mura_jax.evaluation.studies import StudyTable

# MURA v1.1 validation studies per body part: (normal, abnormal); 661 + 538 = 1,199.
VALID_STUDIES = {'elbow': (92, 66), 'finger': (92, 83), 'forearm': (69, 64), 'hand': (101, 66),
                 'humerus': (68, 67), 'shoulder': (99, 95), 'wrist': (140, 97)}


def synthetic_valid(seed=0):
  rng = np.random.default_rng(seed)
  part = np.concatenate([[metrics.BODY_PARTS.index(p)] * (n + a)
                         for p, (n, a) in VALID_STUDIES.items()])
  abnormal = np.concatenate([[0] * n + [1] * a for n, a in VALID_STUDIES.values()])
  probability = rng.beta(2 + 3 * abnormal, 5 - 3 * abnormal)
  return part, abnormal, probability


def vectorised(part, abnormal, probability, num_resamples, seed, chunk_size):
  """All metrics of all groups for every resample, and their 95% CIs."""
  membership = metrics.body_part_membership(part)
  predicted = (probability > 0.5).astype(np.int64)
  counts, u2 = bootstrap.bootstrap_counts(predicted[None], abnormal[None], membership,
                                          probability, num_resamples=num_resamples, seed=seed,
                                          chunk_size=chunk_size)
  samples = metrics.metrics_from_counts(counts[:, 0], u2)
  return bootstrap.percentile_ci(np.stack([samples[m] for m in metrics.METRICS], 1))


def naive_loop(part, abnormal, probability, num_resamples, seed):
  """The per-resample scikit-learn loop."""
  rng = np.random.default_rng(seed)
  num_studies = len(part)
  out = np.zeros((num_resamples, len(metrics.GROUPS), len(metrics.METRICS)))
  for b in range(num_resamples):
    drawn = rng.integers(0, num_studies, num_studies)
    for g, group in enumerate(metrics.GROUPS):
      rows = drawn if group == 'all' else drawn[part[drawn] == g]
      y, s = abnormal[rows], probability[rows]
      pred = (s > 0.5).astype(int)
      tn, _, fn, _ = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
      out[b, g] = [
          skm.f1_score(y, pred, zero_division=np.nan),
          skm.cohen_kappa_score(y, pred),
          skm.roc_auc_score(y, s) if 0 < y.sum() < y.size else np.nan,
          skm.accuracy_score(y, pred),
          skm.recall_score(y, pred, zero_division=np.nan),
          skm.recall_score(y, pred, pos_label=0, zero_division=np.nan),
          skm.precision_score(y, pred, zero_division=np.nan),
          tn / (tn + fn) if tn + fn else np.nan,
      ]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--resamples', type=int, default=10_000)
  parser.add_argument('--loop-resamples', type=int, default=50)
  parser.add_argument('--repeats', type=int, default=5, help='steady-state runs (median)')
  parser.add_argument('--chunk-size', type=int, default=None)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  part, abnormal, probability = synthetic_valid(args.seed)
  num_studies = len(part)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), '
        f'{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; '
        f'load average at start {os.getloadavg()[0]:.2f}')
  chunk_size = args.chunk_size or bootstrap.default_chunk_size(args.resamples, num_studies,
                                                               2 * num_studies)
  print(f'{args.resamples} resamples x {num_studies} studies x {len(metrics.GROUPS)} groups x '
        f'{len(metrics.METRICS)} metrics; chunk size {chunk_size}')


  def run():
    return vectorised(part, abnormal, probability, args.resamples, args.seed, args.chunk_size)

  start = time.perf_counter()
  run()
  first = time.perf_counter() - start
  steady = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    run()
    steady.append(time.perf_counter() - start)
  steady_median = statistics.median(steady)

  # For context: the whole report as reports.evaluate builds it (3 more thresholds: sensitivity
  # and specificity 0.95 and the worklist's), no files written; compiled by now except new shapes.
  paths = [f'MURA-v1.1/valid/XR_{metrics.BODY_PARTS[p].upper()}/patient{i:05d}/study1/'
           for i, p in enumerate(part)]
  table = StudyTable.checked(paths, probability, abnormal)
  report = lambda: reports.evaluate(table, Options(  # pylint: disable=g-long-lambda
      num_resamples=args.resamples, seed=args.seed, chunk_size=args.chunk_size))
  start = time.perf_counter()
  report()
  report_first = time.perf_counter() - start
  start = time.perf_counter()
  report()
  report_again = time.perf_counter() - start

  start = time.perf_counter()
  naive_loop(part, abnormal, probability, args.loop_resamples, args.seed)
  loop_per_resample = (time.perf_counter() - start) / args.loop_resamples
  loop_total = loop_per_resample * args.resamples

  print(f'vectorised, first call (trace + compile + run): {first:.2f} s')
  print(f'vectorised, steady state: median {steady_median:.3f} s of {args.repeats} '
        f'(min {min(steady):.3f}, max {max(steady):.3f})')
  print(f'  compile and trace, first - median: {first - steady_median:.2f} s')
  print(f'naive scikit-learn loop: {loop_per_resample * 1e3:.1f} ms per resample '
        f'(timed on {args.loop_resamples}), {loop_total:.0f} s scaled to {args.resamples}')
  print(f'speed-up: {loop_total / steady_median:.0f}x steady state, '
        f'{loop_total / first:.0f}x including compilation')
  print(f'whole report (reports.evaluate, 4 thresholds, no files): first {report_first:.2f} s, '
        f'again {report_again:.2f} s')
  print(f'load average at end {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
