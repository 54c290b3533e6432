"""The step maths every stage shares: train state, optimizer, the train step, losses, NaN guard.

A train step is a pure function `(state, batch) -> (state, metrics)`, built by `make_train_step`
from a method's loss function, jitted once with explicit shardings and the state donated. The RNG
key lives in the state; each step folds the step number into it, so a resumed run draws exactly
the random numbers an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxstar.errors import UserError

# (params, batch, rng) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]

SCHEDULES = ("constant", "linear", "cosine")
WD_MASKS = ("matrices", "all_but_bias", "all")


class NonFiniteError(RuntimeError):
  """Raised on the host when a step produced a non-finite loss or gradient."""


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the model's (and method's extra) parameters.
    opt_state: optax state.
    rng: typed PRNG key; step k uses fold_in(rng, k).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW, warm-up + schedule, clipping, accumulation: the fields of `config.optim`.

  `make_optimizer` reads these fields by name from this dataclass or from a config block
  built from it (`configs/common.optim_config`), so the defaults live here only.
  """
  lr: float = 1e-3                    # peak learning rate
  warmup_steps: int = 0               # linear warm-up from 0
  schedule: str = "constant"          # after warm-up: constant | linear | cosine
  end_lr_factor: float = 0.0          # linear/cosine decay end, as a fraction of lr
  decay_steps: int = 0                # decay horizon (0: num_steps)
  b1: float = 0.9                     # Adam first-moment decay
  b2: float = 0.999                   # Adam second-moment decay
  eps: float = 1e-8                   # Adam epsilon
  weight_decay: float = 0.0           # decoupled weight decay
  weight_decay_mask: str = "matrices"  # matrices | all_but_bias | all
  clip_norm: float = 1.0              # global gradient-norm clip (0: off)
  grad_accum: int = 1                 # micro-batches per optimizer step


def learning_rate_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then constant, linear or cosine decay to lr * end_factor."""
  lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
  end = lr * float(optim_cfg.end_lr_factor)
  kind = optim_cfg.schedule
  if kind not in SCHEDULES:
    raise UserError(f"config.optim.schedule={kind!r}; choose one of {SCHEDULES}")
  decay_steps = max(1, int(optim_cfg.decay_steps or num_steps) - warmup)
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "linear":
    after = optax.linear_schedule(lr, end, decay_steps)
  else:
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def weight_decay_mask(params, kind: str):
  """Which leaves are decayed: 'matrices' (ndim >= 2), 'all_but_bias', or 'all'."""
  if kind not in WD_MASKS:
    raise UserError(f"config.optim.weight_decay_mask={kind!r}; choose one of {WD_MASKS}")

  def decide(path, leaf):
    name = "/".join(str(k.key) for k in path if hasattr(k, "key"))  # skips a box's `.value`
    if kind == "all":
      return True
    if kind == "all_but_bias":
      return not name.endswith("bias")
    return leaf.ndim >= 2 and not name.endswith("scale")
  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(optim_cfg, num_steps: int) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then AdamW with the schedule and the decay mask."""
  schedule = learning_rate_schedule(optim_cfg, num_steps)
  mask_kind = optim_cfg.weight_decay_mask
  chain = []
  if optim_cfg.clip_norm:
    chain.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
  chain.append(optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                           eps=float(optim_cfg.eps), weight_decay=float(optim_cfg.weight_decay),
                           mask=lambda p: weight_decay_mask(p, mask_kind)))
  return optax.chain(*chain)


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """A `TrainState` at step 0: `params`, `optimizer`'s initial state and the key of `seed`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=jax.random.key(seed))


def _split_micro(batch, accum: int):
  """[B, ...] -> [accum, B / accum, ...], micro-batch i = rows i, i + accum, ...

  Strided rather than contiguous, so each micro-batch takes rows from every batch shard and
  stays evenly spread over the devices.
  """
  def split(x):
    if x.shape[0] % accum:
      raise ValueError(f"batch of {x.shape[0]} rows is not divisible by grad_accum={accum}")
    return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    grad_accum: int = 1, skip_nonfinite: bool = False):
  """Returns the pure `train_step(state, batch) -> (state, metrics)`.

  With `grad_accum` > 1 the batch is split into that many micro-batches along its leading axis,
  gradients are averaged over a `lax.scan` of them and one update is applied. With
  `skip_nonfinite` a step with a non-finite loss or gradient leaves params and optimizer state
  unchanged (it still counts as a step, and `metrics['skipped']` is 1).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum == 1:
      (loss, aux), grads = grad_fn(state.params, batch, rng)
    else:
      micro = _split_micro(batch, grad_accum)
      out = jax.eval_shape(loss_fn, state.params, jax.tree.map(lambda x: x[0], micro), rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (out, state.params))

      def body(acc, xs):
        i, mb = xs
        out_and_grads = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, acc, out_and_grads), None
      ((loss, aux), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
      loss, aux, grads = jax.tree.map(lambda x: x / grad_accum, (loss, aux, grads))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
               "skipped": 1 - finite.astype(jnp.int32), **aux}
    return new_state, metrics

  return train_step


def check_finite(metrics: Mapping[str, Any], step: int, skip_nonfinite: bool) -> None:
  """Host-side guard: raises `NonFiniteError` on a non-finite loss unless skipping is on."""
  loss = float(metrics["loss"])
  if not np.isfinite(loss) and not skip_nonfinite:
    raise NonFiniteError(
        f"step {step}: loss is {loss} (grad_norm {float(metrics['grad_norm'])}); stopping "
        f"without saving this state. Lower optim.lr, check the data, or set "
        f"--config.nonfinite=skip to skip such updates.")


def next_token_loss(logits_blv, tokens_bl, mask_bl, segment_ids_bl=None, target_mask_bl=None):
  """Mean next-token cross-entropy over real targets, in fp32 (or wider). Returns (loss, n).

  In a packed row (`segment_ids_bl`) the first token of a document is no target of the last
  token of the one before. With `target_mask_bl` only the tokens marked there are targets
  (e.g. a completion after its prompt, `jaxstar.data.sft`).
  """
  logits = logits_blv[:, :-1]
  targets = tokens_bl[:, 1:]
  weights = mask_bl[:, 1:] * mask_bl[:, :-1]
  if segment_ids_bl is not None:
    weights = weights * (segment_ids_bl[:, 1:] == segment_ids_bl[:, :-1])
  if target_mask_bl is not None:
    weights = weights * target_mask_bl[:, 1:]
  weights = weights.astype(logits.dtype)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  n = jnp.maximum(weights.sum(), 1.0)
  return jnp.sum((logz - target_logit) * weights) / n, weights.sum()


def lm_init_state(module, optimizer: optax.GradientTransformation, seed: int):
  """`init_state(rng)` of a plain language model `module`: fresh params in a `TrainState`."""
  def init_state(rng):
    params = module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    return init_train_state(params, optimizer, seed)
  return init_state


def lm_loss_fn(module) -> LossFn:
  """The next-token `LossFn` of a plain language model `module` over batches {tokens, mask} and
  optionally segment_ids (packed rows) and targets (the tokens scored, e.g. completions)."""
  def loss_fn(params, batch, rng):
    del rng
    segments = batch.get("segment_ids")
    logits = module.apply({"params": params}, batch["tokens"], batch["mask"] > 0,
                          segment_ids_bl=segments)
    loss, n_targets = next_token_loss(logits, batch["tokens"], batch["mask"], segments,
                                      batch.get("targets"))
    return loss, {"targets": n_targets}
  return loss_fn
