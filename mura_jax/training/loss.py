"""The paper's weighted binary cross-entropy, one weight pair per study type.

For study type (body part) T with A_T abnormal and N_T normal training images:
  w_T,1 = N_T / (A_T + N_T) on abnormal views,  w_T,0 = A_T / (A_T + N_T) on normal views,
  L(X, y) = -w_T,1 y log p(Y=1|X) - w_T,0 (1 - y) log p(Y=0|X).
Training minimises it; the validation loss (the same formula on the validation split, with the
training split's weights) drives the plateau schedule and picks the kept checkpoints.
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from mura_jax.data import dataset
from mura_jax.errors import ConfigError
from tfds_mura import BODY_PARTS


def loss_weights_from_counts(image_counts: dict[str, dict[str, int]],
                             body_parts=BODY_PARTS) -> np.ndarray:
  """(7, 2) weights [w_T,0, w_T,1] per body part T from its normal (N) and abnormal (A) images.

  Only the parts in `body_parts` (default all seven) get weights; the others, whose views are not
  trained or validated on (`config.data.body_parts`), weigh 0.
  """
  w = np.zeros((len(BODY_PARTS), 2), np.float32)
  for part in body_parts:
    t = BODY_PARTS.index(part)
    counts = image_counts.get(part, {'normal': 0, 'abnormal': 0})
    normal, abnormal = counts['normal'], counts['abnormal']
    if normal + abnormal == 0:
      raise ConfigError(f'The training split has no {part} images: the weighted loss is undefined; '
                       f'leave {part} out of config.data.body_parts.')
    if normal == 0 or abnormal == 0:  # the formula then ignores the part's only class
      absent, present = ('abnormal', 'normal') if abnormal == 0 else ('normal', 'abnormal')
      logging.warning(
          'The training split has no %s %s images: the paper\'s weights give its %d %s views '
          'weight 0, so training learns nothing from them. Add %s %s studies, or leave %s out '
          '(--config.data.body_parts).', absent, part, max(normal, abnormal), present, absent,
          part, part)
    w[t] = abnormal / (normal + abnormal), normal / (normal + abnormal)
  return w


def dataset_loss_weights(data_dir: str, body_parts=BODY_PARTS) -> np.ndarray:
  """The loss weights of the built dataset's training split, from its metadata (no decoding)."""
  return loss_weights_from_counts(dataset.image_counts(data_dir), body_parts)


def weighted_bce_per_view(logits, labels, body_part, loss_weights):
  """-w_T,1 y log p - w_T,0 (1 - y) log(1 - p) of each view, p = sigmoid(logit).

  `loss_weights` is the (7, 2) array [w_T,0, w_T,1] of `loss_weights_from_counts`.
  """
  w = jnp.asarray(loss_weights)[body_part, labels.astype(jnp.int32)]
  labels = labels.astype(jnp.float32)
  return -w * (labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits))


def weighted_bce(logits, labels, body_part, loss_weights, mask=None):
  """The paper's loss: the mean of `weighted_bce_per_view` over the (unmasked) views."""
  per_view = weighted_bce_per_view(logits, labels, body_part, loss_weights)
  if mask is None:
    return jnp.mean(per_view)
  return jnp.sum(per_view * mask) / jnp.maximum(jnp.sum(mask), 1)
