"""Study-level metrics of MURA from integer counts; abnormal is the positive class.

Every metric here is ONE float64 division of two exact integers computed from the confusion
counts of a group (tp, fp, fn, tn) and, for AUROC, twice the Mann-Whitney U statistic. So a point
estimate, a vectorised bootstrap resample and a plain per-resample loop that reach the same counts
give bit-identical metrics: they all end in `metrics_from_counts`.

Definitions (n = tp + fp + fn + tn, P = tp + fn abnormal studies, N = fp + tn normal studies):
  accuracy    (tp + tn) / n
  sensitivity tp / P                       (recall of abnormal)
  specificity tn / N                       (recall of normal)
  precision   tp / (tp + fp)               (positive predictive value)
  npv         tn / (tn + fn)
  f1          2 tp / (2 tp + fp + fn)
  kappa       (n (tp + tn) - S) / (n^2 - S), S = (tp + fp) P + (fn + tn) N   (Cohen's kappa,
              (p_o - p_e) / (1 - p_e) multiplied through by n^2)
  auroc       U2 / (2 P N), U2 = sum over pairs (abnormal a, normal b) of
              2 [s_a > s_b] + [s_a = s_b]
              (ties count 1/2; equals scikit-learn's roc_auc_score)
A zero denominator gives NaN (not scikit-learn's zero_division=0); `undefined_reason` says why.
"""
from __future__ import annotations

import numpy as np
from tfds_mura import BODY_PARTS  # the dataset's ClassLabel order, the one source

# Evaluation groups: the seven study types of the paper, then the aggregate over all studies.
GROUPS = BODY_PARTS + ('all',)
METRICS = ('f1', 'kappa', 'auroc', 'accuracy', 'sensitivity', 'specificity', 'precision', 'npv')
# Order of the last axis of every confusion-count array.
CELLS = ('tp', 'fp', 'fn', 'tn')


def body_part_membership(body_part_index: np.ndarray) -> np.ndarray:
  """(len(GROUPS), num_studies) bool: row g says which studies belong to GROUPS[g]."""
  body_part_index = np.asarray(body_part_index)
  member = body_part_index[None, :] == np.arange(len(BODY_PARTS))[:, None]
  return np.concatenate([member, np.ones((1, body_part_index.size), bool)])


def confusion_counts(predicted, abnormal, membership) -> np.ndarray:
  """Exact confusion counts per group.

  Args:
    predicted: (..., num_studies) 0/1 predictions.
    abnormal: (..., num_studies) 0/1 reference labels, broadcastable against `predicted`.
    membership: (num_groups, num_studies) bool.
  Returns:
    int64 (..., num_groups, 4) counts in CELLS order (tp, fp, fn, tn).
  """
  predicted = np.asarray(predicted, np.int64)[..., None, :]
  abnormal = np.asarray(abnormal, np.int64)[..., None, :]
  member = np.asarray(membership, np.int64)
  cells = [predicted * abnormal, predicted * (1 - abnormal),
           (1 - predicted) * abnormal, (1 - predicted) * (1 - abnormal)]
  return np.stack([(c * member).sum(-1) for c in cells], axis=-1)


def auroc_u2(scores, abnormal, membership) -> np.ndarray:
  """int64 (num_groups,): twice the Mann-Whitney U of each group (see module docstring)."""
  scores = np.asarray(scores, np.float64)
  abnormal = np.asarray(abnormal).astype(bool)
  u2 = np.zeros(len(membership), np.int64)
  for g, member in enumerate(np.asarray(membership, bool)):
    normal_scores = np.sort(scores[member & ~abnormal])
    abnormal_scores = scores[member & abnormal]
    # left = normals strictly below, right = normals below or equal: left + right = 2 below + equal.
    u2[g] = (np.searchsorted(normal_scores, abnormal_scores, 'left').sum()
             + np.searchsorted(normal_scores, abnormal_scores, 'right').sum())
  return u2


def _divide(numerator, denominator) -> np.ndarray:
  numerator = np.asarray(numerator, np.float64)
  denominator = np.asarray(denominator, np.float64)
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(denominator == 0, np.nan, numerator / denominator)


def metrics_from_counts(counts, u2=None) -> dict[str, np.ndarray]:
  """All METRICS from int counts (..., 4) and U2 (...); float64 arrays of shape (...).

  AUROC is NaN everywhere when `u2` is None (no scores, e.g. reader labels).
  """
  counts = np.asarray(counts, np.int64)
  tp, fp, fn, tn = (counts[..., i] for i in range(4))
  n = tp + fp + fn + tn
  pos, neg = tp + fn, fp + tn
  chance = (tp + fp) * pos + (fn + tn) * neg  # n^2 p_e, exact in int64
  out = {
      'f1': _divide(2 * tp, 2 * tp + fp + fn),
      'kappa': _divide(n * (tp + tn) - chance, n * n - chance),
      'auroc': (_divide(u2, 2 * pos * neg) if u2 is not None
                else np.full(tp.shape, np.nan)),
      'accuracy': _divide(tp + tn, n),
      'sensitivity': _divide(tp, pos),
      'specificity': _divide(tn, neg),
      'precision': _divide(tp, tp + fp),
      'npv': _divide(tn, tn + fn),
  }
  return out


def undefined_reason(metric: str, counts) -> str | None:
  """Why `metric` is undefined (NaN) for one group's counts (tp, fp, fn, tn); None if defined."""
  tp, fp, fn, tn = (int(c) for c in counts)
  n, pos, neg = tp + fp + fn + tn, tp + fn, fp + tn
  if n == 0:
    return 'no studies in this group'
  if metric == 'auroc':
    if pos == 0:
      return 'no abnormal studies in this group: AUROC needs both classes'
    if neg == 0:
      return 'no normal studies in this group: AUROC needs both classes'
  elif metric == 'sensitivity' and pos == 0:
    return 'no abnormal studies (tp + fn = 0)'
  elif metric == 'specificity' and neg == 0:
    return 'no normal studies (tn + fp = 0)'
  elif metric == 'precision' and tp + fp == 0:
    return 'no study predicted abnormal (tp + fp = 0)'
  elif metric == 'npv' and tn + fn == 0:
    return 'no study predicted normal (tn + fn = 0)'
  elif metric == 'f1' and 2 * tp + fp + fn == 0:
    return 'no abnormal studies and none predicted abnormal (2 tp + fp + fn = 0)'
  elif metric == 'kappa' and n * n == (tp + fp) * pos + (fn + tn) * neg:
    return ('chance agreement is 1 (labels and predictions each take a single value, '
            'kappa is 0/0)')
  return None


def roc_curve(scores, abnormal):
  """ROC points (fpr, tpr, thresholds) with the rule 'abnormal if score > threshold'.

  The first point is (0, 0) at threshold = max score; each next threshold is just below a distinct
  score, ending at (1, 1). Needs both classes.
  """
  scores = np.asarray(scores, np.float64)
  abnormal = np.asarray(abnormal).astype(bool)
  order = np.argsort(-scores, kind='stable')
  s, y = scores[order], abnormal[order]
  last_of_tie = np.r_[s[1:] != s[:-1], True]
  tps = np.cumsum(y)[last_of_tie]
  fps = np.cumsum(~y)[last_of_tie]
  tpr = np.r_[0, tps] / max(int(y.sum()), 1)
  fpr = np.r_[0, fps] / max(int((~y).sum()), 1)
  lower = np.r_[s[last_of_tie][1:], -np.inf]
  thresholds = np.r_[s[0] if s.size else np.inf, _between(s[last_of_tie], lower)]
  return fpr, tpr, thresholds


def _between(upper, lower):
  """Elementwise threshold t with lower < t < upper: the midpoint when it is strictly inside.

  lower = -inf (nothing below): 0 for positive `upper` (probabilities), else one ulp below `upper`.
  """
  upper, lower = np.broadcast_arrays(np.asarray(upper, np.float64), np.asarray(lower, np.float64))
  finite = np.isfinite(lower)
  mid = np.where(finite, (upper + np.where(finite, lower, 0.0)) / 2, 0.0)
  inside = (mid > lower) & (mid < upper)  # fails between adjacent floats
  return np.where(inside, mid, np.nextafter(upper, -np.inf))


def threshold_for_target(scores, abnormal, metric: str, target: float) -> float:
  """The threshold (rule: abnormal if score > t) reaching `metric` >= `target` on these studies.

  'sensitivity': the highest such threshold (best specificity at that sensitivity): below the
  k-th highest abnormal score, k = ceil(target P), midway to the next lower score.
  'specificity': the lowest such threshold (best sensitivity): the k-th lowest normal score,
  k = ceil(target N), or midway to the next higher score when that midpoint is representable.
  Midpoints rather than the scores themselves so the threshold transfers to another split without
  landing exactly on a tie.
  """
  if not 0 < target <= 1:
    raise ValueError(f'target must be in (0, 1], got {target}')
  scores = np.asarray(scores, np.float64)
  abnormal = np.asarray(abnormal).astype(bool)
  if metric not in ('sensitivity', 'specificity'):
    raise ValueError(f"metric must be 'sensitivity' or 'specificity', got {metric!r}")
  group = scores[abnormal] if metric == 'sensitivity' else scores[~abnormal]
  if group.size == 0:
    raise ValueError(f'no {"abnormal" if metric == "sensitivity" else "normal"} studies: '
                     f'no threshold reaches a {metric}')
  k = int(np.ceil(target * group.size - 1e-9))  # tolerance: 0.95 * 20 is 19.000000000000004
  if metric == 'sensitivity':
    kth = np.sort(group)[::-1][k - 1]
    below = scores[scores < kth]
    return float(_between(kth, below.max() if below.size else -np.inf))
  kth = np.sort(group)[k - 1]
  above = scores[scores > kth]
  if not above.size:
    return float(kth)
  mid = (kth + above.min()) / 2
  return float(mid if kth <= mid < above.min() else kth)
