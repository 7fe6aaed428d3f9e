"""What a training task brings to the shared loop: its data, its programs, its evaluation.

`loop.train_and_evaluate` runs any task the same way (mesh, sharding, optimizer, EMA,
checkpoints and resumption, metrics, the progress line); a `Task` supplies what differs:

  * `train_batches` / `eval_batches`: the data iterators (a train iterator has
    `steps_per_epoch`, `get_state` and `set_state`, saved with each checkpoint);
  * `build_programs`: the jitted steps (`steps.build_programs` with the task's network, loss and
    evaluation);
  * `evaluate`: one pass over the held-out data -> {split: {metric: value}};
  * `variables_for_network` and `checkpoint_metadata`: how `init_from` weights fit the network,
    and what each checkpoint says about it.

`loop.task_for(config)` picks the one that `config.task` names: 'classification' (the default,
this module) or 'segmentation' (`segmentation.py`).
"""

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from rmt_jax.data import eval_preprocessing
from rmt_jax.data import input_pipeline
from rmt_jax.train import sharding
from rmt_jax.train import steps

TASKS = ('classification', 'segmentation')


class Task:
  """The interface; `Classification` and `segmentation.Segmentation` implement it."""

  name: str

  def train_batches(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Any:
    """Endless global training batches, with `steps_per_epoch`, `get_state`, `set_state`."""
    raise NotImplementedError

  def eval_batches(self, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh) -> Iterable[Any]:
    """The held-out data, iterated afresh for each evaluation."""
    raise NotImplementedError

  def build_programs(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     steps_per_epoch: int, total_steps: int) -> steps.Programs:
    raise NotImplementedError

  def evaluate(self, eval_step: Callable[..., Any], state: Any, batches: Iterable[Any],
               step: int) -> dict[str, dict[str, float]]:
    """One pass of `eval_step` over `batches` -> {'eval': raw weights' metrics, 'eval_ema':
    the EMA's}; `step` is the train step being evaluated."""
    raise NotImplementedError

  def variables_for_network(self, variables: Mapping[str, Any]) -> dict[str, Any]:
    """`init_from` weights ({'params', 'batch_stats'}) as this task's network names them."""
    return dict(variables)

  def checkpoint_metadata(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
    raise NotImplementedError


def sum_over_batches(eval_step: Callable[..., Any], weights: Any,
                     batches: Iterable[Any]) -> Any:
  """The sums of `eval_step(weights, batch)` over all batches, on the host."""
  totals = None
  for batch in batches:
    sums = eval_step(weights, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return jax.device_get(totals)


# The metrics' split names of the weight sets that the eval step scores.
SPLITS = {'raw': 'eval', 'ema': 'eval_ema'}


def classification_means(totals: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
  """`steps.eval_step`'s sums -> {name: {'loss', 'top1', 'top5', 'count'}} means."""
  return {name: {'loss': s['loss'] / max(s['count'], 1), 'top1': s['top1'] / max(s['count'], 1),
                 'top5': s['top5'] / max(s['count'], 1), 'count': s['count']}
          for name, s in totals.items()}


class Classification(Task):
  """Image classification: the official ImageNet recipe, the folder and digits datasets."""

  name = 'classification'

  def train_batches(self, config, mesh):
    return input_pipeline.create_train_iterator(
        config.data, global_batch_size=config.global_batch_size, seed=config.seed,
        mesh_sharding=sharding.batch_sharding(mesh))

  def eval_batches(self, config, mesh):
    return input_pipeline.create_eval_iterator(
        config.data, global_batch_size=config.eval_batch_size,
        mesh_sharding=sharding.batch_sharding(mesh))

  def build_programs(self, config, mesh, steps_per_epoch, total_steps):
    return steps.build_programs(config, mesh, steps_per_epoch, total_steps)

  def evaluate(self, eval_step, state, batches, step):
    del step
    means = classification_means(sum_over_batches(eval_step, state, batches))
    return {SPLITS.get(k, k): {m: v[m] for m in ('loss', 'top1', 'top5')}
            for k, v in means.items()}

  def checkpoint_metadata(self, config):
    # The evaluation's preprocessing travels with the weights: predict, visualize and eval-only
    # runs prepare images as this run's evaluation did (a 32 px digit is no 224 px photo).
    meta = {'model': config.model, 'model_overrides': steps.model_overrides(config),
            eval_preprocessing.METADATA_KEY:
                eval_preprocessing.from_config(config.data).to_metadata()}
    names = input_pipeline.class_names(config.data)
    if names:  # `predict` prints them (a folder's class names, ImageNet's readable names).
      meta['class_names'] = names
    return meta

