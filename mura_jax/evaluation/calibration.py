"""Calibration: whether a study probability of p means abnormal p of the time.

Expected calibration error (ECE), as reported: the study probabilities (what the 0.5 verdict and
the worklist read) fall into NUM_BINS = 10 equal-width bins of [0, 1] (bin k holds
k/10 <= p < (k+1)/10, the last one p = 1 too), and

    ECE = sum_k (n_k / n) |mean probability in bin k - abnormal fraction in bin k|
        = (1 / n) sum_k |sum over the studies i in bin k of (p_i - y_i)|

per body part and over all studies. Its CI comes from the very resamples that score every other
metric (`bootstrap.bootstrap_sums`, same seed): each resample sums the signed errors p_i - y_i of
each (group, bin) with the study's multiplicity.

Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks"): one scalar
T > 0, view probability sigmoid(logit / T) (`predictor.temperature_scaled`). `fit_temperature`
minimises the plain negative log-likelihood of the validation views, not the paper's weighted
BCE: the weights w_T,1 = N_T / (A_T + N_T) balance the classes, so their minimiser pulls each
body part towards 0.5 instead of its observed abnormal rate, which is what calibration is
measured against. The NLL is convex in 1 / T, so its minimum is the root of a monotone
derivative (found by Brent's method between T = 0.01 and 100).
"""
from __future__ import annotations

import numpy as np
from scipy import optimize
from scipy import special

from mura_jax.evaluation import bootstrap

NUM_BINS = 10
BINNING = ('10 equal-width bins of the study probability on [0, 1] (k/10 <= p < (k+1)/10, the '
           'last bin with p = 1); ECE = sum over the bins of (studies in the bin / studies) x '
           '|mean probability - abnormal fraction|')
TEMPERATURE_BOUNDS = (0.01, 100.0)
OBJECTIVE = ('negative log-likelihood of the views (unweighted binary cross-entropy): the '
             "paper's class weights would pull each body part towards 0.5, not towards its "
             'observed abnormal rate')


def bin_index(probability, num_bins: int = NUM_BINS) -> np.ndarray:
  """int64 bin k of each probability: k / num_bins <= p < (k + 1) / num_bins, with the edges
  k / num_bins as doubles (so that p = 0.3 is in bin 3); p = 1 in the last bin."""
  inner_edges = np.arange(1, num_bins) / num_bins
  return np.searchsorted(inner_edges, np.asarray(probability, np.float64), 'right').astype(np.int64)


def _error_columns(probability, abnormal, membership, num_bins: int) -> np.ndarray:
  """(num_studies, G * num_bins + G): each study's p - y in its (group, bin) columns, then its
  group memberships (whose sums are the group sizes)."""
  p = np.asarray(probability, np.float64)
  y = np.asarray(abnormal, np.float64)
  member = np.asarray(membership, np.float64)  # (G, N)
  in_bin = bin_index(p, num_bins)[None, :] == np.arange(num_bins)[:, None]  # (K, N)
  signed = member[:, None, :] * in_bin[None] * (p - y)  # (G, K, N)
  return np.concatenate([signed.reshape(-1, p.size), member]).T


def _ece_of_sums(sums, num_groups: int, num_bins: int) -> np.ndarray:
  """ECE (..., G) from column sums (..., G * num_bins + G); NaN for a group without studies."""
  sums = np.asarray(sums, np.float64)
  signed = sums[..., :num_groups * num_bins].reshape(sums.shape[:-1] + (num_groups, num_bins))
  n = sums[..., num_groups * num_bins:]
  return np.where(n > 0, np.abs(signed).sum(-1) / np.where(n > 0, n, 1), np.nan)


def expected_calibration_error(probability, abnormal, membership,
                               num_bins: int = NUM_BINS) -> np.ndarray:
  """float64 (G,): the ECE of each group's studies (membership (G, N) bool); NaN if empty."""
  columns = _error_columns(probability, abnormal, membership, num_bins)
  return _ece_of_sums(columns.sum(0), len(membership), num_bins)


def bootstrap_ece(probability, abnormal, membership, *, num_resamples: int, seed: int,
                  chunk_size: int | None = None, num_bins: int = NUM_BINS) -> np.ndarray:
  """float64 (B, G): the ECE of every group in each of the bootstrap's resamples (those of
  `bootstrap.bootstrap_counts` with this seed); NaN where a resample holds none of a group."""
  columns = _error_columns(probability, abnormal, membership, num_bins)
  sums = bootstrap.bootstrap_sums(columns, num_resamples=num_resamples, seed=seed,
                                  chunk_size=chunk_size)
  return _ece_of_sums(sums, len(membership), num_bins)


def reliability_bins(probability, abnormal, membership, num_bins: int = NUM_BINS) -> list:
  """Per group, per bin: {'low', 'high', 'n_studies', 'mean_probability', 'abnormal_rate'} (the
  last two None for an empty bin): the points of the reliability diagram."""
  p = np.asarray(probability, np.float64)
  y = np.asarray(abnormal, np.float64)
  bins = bin_index(p, num_bins)
  out = []
  for member in np.asarray(membership, bool):
    rows = []
    for k in range(num_bins):
      inside = member & (bins == k)
      n = int(inside.sum())
      rows.append({'low': k / num_bins, 'high': (k + 1) / num_bins, 'n_studies': n,
                   'mean_probability': float(p[inside].mean()) if n else None,
                   'abnormal_rate': float(y[inside].mean()) if n else None})
    out.append(rows)
  return out


# ------------------------------------------------------------------------------------------------
# Temperature scaling.


def mean_nll(logits, abnormal, temperature: float = 1.0) -> float:
  """Mean binary cross-entropy of sigmoid(logits / T) against 0/1 labels, computed stably."""
  z = np.asarray(logits, np.float64) / temperature
  y = np.asarray(abnormal, np.float64)
  return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits, abnormal) -> dict:
  """The temperature T minimising `mean_nll` over the views, within TEMPERATURE_BOUNDS.

  Returns {'temperature', 'at_bound' (the minimum lies outside the bounds: e.g. separable or
  single-class views), 'num_views', 'nll_before' (T = 1), 'nll_after'}.
  """
  l = np.asarray(logits, np.float64)
  y = np.asarray(abnormal, np.float64)
  if l.ndim != 1 or l.shape != y.shape or not l.size or not np.isfinite(l).all():
    raise ValueError(f'fit_temperature needs as many finite logits as labels, got {l.shape} '
                     f'logits and {y.shape} labels')

  def slope(log_inverse_t):  # d mean_nll / d(1/T), increasing in 1/T (the NLL is convex)
    return float(np.mean((special.expit(np.exp(log_inverse_t) * l) - y) * l))

  low, high = np.log(1 / TEMPERATURE_BOUNDS[1]), np.log(1 / TEMPERATURE_BOUNDS[0])
  if slope(low) >= 0:
    log_inverse_t, at_bound = low, True
  elif slope(high) <= 0:
    log_inverse_t, at_bound = high, True
  else:
    log_inverse_t = optimize.brentq(slope, low, high, xtol=1e-12, rtol=1e-12)
    at_bound = False
  temperature = float(1 / np.exp(log_inverse_t))
  return {'temperature': temperature, 'at_bound': bool(at_bound), 'num_views': int(l.size),
          'nll_before': mean_nll(l, y), 'nll_after': mean_nll(l, y, temperature)}


def temperature_section(record: dict, before: dict, split: str) -> dict:
  """report['calibration']['temperature']: the stored record (fit_temperature's, where and how
  it was fitted), the ECE per group before scaling (`before`: the unscaled probabilities'
  calibration section) and what the comparison is worth."""
  caveat = ('T is fitted on the validation split and measured here on the same split (which also '
            'chose the checkpoint): the ECE after scaling is optimistic.'
            if split == 'validation' else
            f'T is fitted on the validation split and measured here on the {split} split.')
  return {**record, 'ece_before': {group: section['ece']
                                   for group, section in before['groups'].items()},
          'caveat': caveat}


# ------------------------------------------------------------------------------------------------
# Rendering (reports.py writes the files).


def markdown_lines(report: dict) -> list[str]:
  """report.md's calibration section: ECE per group (before and after a temperature), the
  binning, the reliability diagram."""
  section = report.get('calibration')
  if not section:
    return []
  temperature = section.get('temperature')
  lines = ['', '## Calibration', '',
           f'Expected calibration error (ECE) of the study probabilities: {section["binning"]}. '
           'Lower is better; 0 = each bin\'s abnormal fraction equals its mean probability. CIs '
           'from the bootstrap resamples above. With few studies per bin (a body part) ECE is '
           'biased upwards: even perfectly calibrated probabilities score above 0.']
  if temperature:
    lines += ['', f'Temperature scaling on: view probability = sigmoid(logit / T), T = '
              f'{temperature["temperature"]:.4f}, fitted on the {temperature["fitted_on"]} '
              f'split\'s {temperature["num_views"]} views by minimising the {OBJECTIVE} '
              f'(NLL {temperature["nll_before"]:.4f} -> {temperature["nll_after"]:.4f}'
              + (', at the bound of the search' if temperature['at_bound'] else '') + '). '
              'Every metric of this report is of the scaled probabilities. ' +
              temperature['caveat']]
    before = temperature['ece_before']
    lines += ['', '| Study type | Studies | ECE before T | ECE after T |', '|---|---:|---|---|']
    for group, entry in section['groups'].items():
      lines.append(f'| {_title(group)} | {entry["ece"]["n_studies"]} | '
                   f'{bootstrap.ci_text(before[group])} | {bootstrap.ci_text(entry["ece"])} |')
  else:
    lines += ['', '| Study type | Studies | ECE |', '|---|---:|---|']
    for group, entry in section['groups'].items():
      lines.append(f'| {_title(group)} | {entry["ece"]["n_studies"]} | '
                   f'{bootstrap.ci_text(entry["ece"])} |')
  lines += ['', '![Reliability diagram: abnormal fraction against mean probability per bin]'
            '(reliability.png)', '']
  lines.append('[reliability.png](reliability.png): per study type, each bin\'s abnormal '
               'fraction against its mean probability (the diagonal is perfect calibration), '
               'the studies per bin below.')
  return lines


def _title(group: str) -> str:
  return 'Aggregate' if group == 'all' else group.capitalize()


def reliability_figure(section: dict):
  """A matplotlib Figure: for each group of report['calibration'] (the aggregate first), the
  reliability curve over the diagonal and the studies per bin below it; no pyplot state."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  groups = ['all'] + [g for g in section['groups'] if g != 'all']
  columns = min(4, len(groups))
  rows = -(-len(groups) // columns)
  width, height = 4 * columns, 4.6 * rows
  figure = Figure(figsize=(width, height))
  FigureCanvasAgg(figure)
  # Margins in inches (two-line titles above, axis labels below), whatever the number of rows;
  # each panel: the curve over its bin counts, close together.
  outer = figure.add_gridspec(rows, columns, left=0.7 / width, right=1 - 0.3 / width,
                              top=1 - 0.85 / height, bottom=0.5 / height, wspace=0.3,
                              hspace=0.75 / 4.6 * 2)
  for i, group in enumerate(groups):
    inner = outer[divmod(i, columns)].subgridspec(2, 1, height_ratios=[3.2, 1], hspace=0.08)
    curve = figure.add_subplot(inner[0])
    counts = figure.add_subplot(inner[1], sharex=curve)
    entry = section['groups'][group]
    bins = [b for b in entry['bins'] if b['n_studies']]
    curve.plot([0, 1], [0, 1], ls='--', color='0.6', lw=1, label='perfect calibration')
    curve.plot([b['mean_probability'] for b in bins], [b['abnormal_rate'] for b in bins],
               'o-', color='C0', lw=1.5, ms=4,
               label="each bin's abnormal fraction at its mean study probability")
    ece = entry['ece']
    curve.set_title(f'{_title(group)} (n={ece["n_studies"]})\nECE {bootstrap.ci_text(ece)}',
                    fontsize=10)
    curve.set(xlim=(0, 1), ylim=(-0.02, 1.02))
    curve.set_ylabel('abnormal fraction', fontsize=9)
    curve.tick_params(labelbottom=False, labelsize=8)
    if i == 0:  # above the panels: inside one it would cover some curve
      figure.legend(*curve.get_legend_handles_labels(), loc='upper center', ncol=2, fontsize=9,
                    frameon=False)
    centres = [(b['low'] + b['high']) / 2 for b in entry['bins']]
    heights = [b['n_studies'] for b in entry['bins']]
    width = entry['bins'][0]['high'] - entry['bins'][0]['low']
    bars = counts.bar(centres, heights, width=0.9 * width, color='0.75')
    counts.bar_label(bars, [str(h) if h else '' for h in heights], fontsize=7, padding=1)
    counts.set_ylim(0, max(max(heights), 1) * 1.35)
    counts.set_xlabel('study probability', fontsize=9)
    counts.set_ylabel('studies', fontsize=9)
    counts.tick_params(labelsize=8)
  return figure
