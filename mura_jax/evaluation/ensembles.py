"""Ensembles at evaluation: several checkpoints -> one probability per view -> studies.

Members (`members`): the `config.evaluation.ensemble` = K best checkpoints (lowest validation loss)
of the run's workdir and of each workdir in `config.evaluation.workdirs` (other seeds,
architectures, body-part models); K = 1, or `config.evaluation.checkpoint` other than 'best',
takes that checkpoint of the run and the best of the others. The later MURA paper ensembles the 5 best checkpoints of one run.

Every member predicts the views of the body parts it was trained on (its checkpoint's spec), with
its own preprocessing and, with `config.evaluation.tta='flip'`, the mean over each view and its
lateral mirror; a study is scored by the members that cover its body part.

Order (`config.evaluation.ensemble_order`):
  'views' (default)  a view's probability is the mean over the members, then the study's is the
                     mean of its views (the paper's aggregation);
  'studies'          each member's study probabilities first, then their mean over the members.
With the mean aggregation both are means over (member, view) pairs and agree up to rounding; with
`aggregation='max'` they differ.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging
from etils import epath
from tfds_mura import BODY_PARTS

from mura_jax import checkpoints
from mura_jax.data import input_pipeline
from mura_jax.errors import ConfigError
from mura_jax.evaluation import studies

ORDERS = ('views', 'studies')


@dataclasses.dataclass(frozen=True)
class Member:
  """One checkpoint of an ensemble."""
  workdir: str
  which: str | int      # 'best', 'latest' or a step
  step: int
  spec: dict            # the checkpoint's spec: model, preprocessing, epoch, validation loss, ...

  @property
  def body_parts(self) -> tuple[str, ...]:
    """The parts it was trained on (older checkpoints, without the record: all seven)."""
    return checkpoints.body_parts_of(self.spec)

  def name(self, several_workdirs: bool) -> str:
    step = f'step {self.step}'
    return f'{epath.Path(self.workdir).name} {step}' if several_workdirs else step


def other_workdirs(value) -> list[str]:
  """config.evaluation.workdirs: a comma-separated string or a sequence of workdirs."""
  if isinstance(value, str):
    value = value.split(',')
  return [str(w).strip() for w in value if str(w).strip()]


def members(config, workdir) -> list[Member]:
  """The ensemble's checkpoints: this run's first (its chosen or best one leads), then the others."""
  e = config.evaluation
  k = int(e.get('ensemble', 1))
  if k < 1:
    raise ConfigError(f'config.evaluation.ensemble={k}; it counts checkpoints, use 1 or more.')
  if k > 1 and str(e.checkpoint) != 'best':
    # A checkpoint asked for by name is what is evaluated (the demo's ensemble=5 included).
    logging.warning('config.evaluation.checkpoint=%s: evaluating it alone, not the ensemble of '
                    'the %d best (config.evaluation.ensemble).', e.checkpoint, k)
    k = 1
  found = []
  for w in [str(workdir)] + other_workdirs(e.get('workdirs', '')):
    if k == 1:
      chosen = [e.checkpoint if w == str(workdir) else 'best']
    else:
      chosen = checkpoints.best_steps(w, k)
    for which in chosen:
      name, step = checkpoints.choose(w, which)
      found.append(Member(w, which, step, checkpoints.read_spec(w, name, step)))
  return found


def evaluated_body_parts(requested: tuple[str, ...] | None,
                         ensemble: list[Member]) -> tuple[str, ...]:
  """The parts evaluated: those asked for (None: all) that a member covers; a part asked for by
  name that none covers is an error."""
  covered = {p for m in ensemble for p in m.body_parts}
  if requested is None:
    return tuple(p for p in BODY_PARTS if p in covered)
  missing = [p for p in requested if p not in covered]
  if missing:
    raise ConfigError(f'config.data.body_parts asks for {", ".join(missing)}, which no evaluated '
                     f'checkpoint was trained on (they cover {", ".join(sorted(covered))}); '
                     'leave it out or add a workdir that covers it (config.evaluation.workdirs).')
  return requested


def covered_views(split_index: input_pipeline.SplitIndex, member: Member) -> np.ndarray:
  """Positions of the split's views of the body parts this member covers."""
  return input_pipeline.views_of_body_parts(
      split_index, [BODY_PARTS.index(p) for p in member.body_parts])


def combine(view_probabilities: np.ndarray, split_index: input_pipeline.SplitIndex,
            order: str = 'views', aggregation: str = 'mean') -> studies.StudyTable:
  """The ensemble's StudyTable from (members, views) probabilities, NaN where a member does not
  cover a view (see the module docstring for the orders)."""
  view_probabilities = np.asarray(view_probabilities, np.float64)
  covered = ~np.isnan(view_probabilities)
  if not covered.any(0).all():
    raise ConfigError('some views are covered by no ensemble member; evaluate only the body parts '
                     'the members were trained on.')
  if order == 'views':
    mean = np.where(covered, view_probabilities, 0).sum(0) / covered.sum(0)
    return studies.from_split(split_index, mean, aggregation)
  if order != 'studies':
    raise ConfigError(f'config.evaluation.ensemble_order={order!r}; expected one of {ORDERS}.')
  index = np.asarray(split_index.study_index, np.int64)
  per_member = np.stack([  # NaN for a study of a part the member does not cover
      studies.aggregate_float64(np.where(c, p, 0), index, len(split_index.studies), c,
                                aggregation)[0]
      for p, c in zip(view_probabilities, covered)])
  counted = ~np.isnan(per_member)
  mean = np.where(counted, per_member, 0).sum(0) / counted.sum(0)
  return dataclasses.replace(studies.from_split(split_index, np.zeros(len(split_index)),
                                                aggregation), probability=mean)


def member_table(view_probabilities: np.ndarray, split_index: input_pipeline.SplitIndex,
                 aggregation: str = 'mean') -> studies.StudyTable:
  """One member's StudyTable over the studies it covers (its probabilities, NaN elsewhere)."""
  views = np.flatnonzero(~np.isnan(view_probabilities))
  return studies.from_split(input_pipeline.subset(split_index, views), view_probabilities[views],
                            aggregation)
