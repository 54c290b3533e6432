"""What every trainer shares: train state, optimizer, the jitted train step, metrics, NaN guard.

A train step is a pure function `(state, batch) -> (state, metrics)`, built by `make_train_step`
from a method's loss function, jitted once with explicit shardings and the state donated. The RNG
key lives in the state; each step folds the step number into it, so a resumed run draws exactly
the random numbers an uninterrupted one would.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

# (params, batch, rng) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]

SCHEDULES = ("constant", "linear", "cosine")
WD_MASKS = ("matrices", "all_but_bias", "all")
NONFINITE = ("stop", "skip")


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


def learning_rate_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then constant, linear or cosine decay to lr * end_factor."""
  lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
  end = lr * float(optim_cfg.get("end_lr_factor", 0.0))
  kind = optim_cfg.get("schedule", "constant")
  if kind not in SCHEDULES:
    raise ValueError(f"optim.schedule={kind!r}; choose one of {SCHEDULES}")
  decay_steps = max(1, int(optim_cfg.get("decay_steps", 0) or num_steps) - warmup)
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
    raise ValueError(f"optim.weight_decay_mask={kind!r}; choose one of {WD_MASKS}")

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
  mask_kind = optim_cfg.get("weight_decay_mask", "matrices")
  chain = []
  if optim_cfg.get("clip_norm", 0.0):
    chain.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
  chain.append(optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                           eps=float(optim_cfg.eps), weight_decay=float(optim_cfg.weight_decay),
                           mask=lambda p: weight_decay_mask(p, mask_kind)))
  return optax.chain(*chain)


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
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


class MetricWriter:
  """Scalars to TensorBoard event files and `metrics.jsonl`; a no-op except on process 0."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {k: float(v) for k, v in scalars.items()}
    for k, v in row.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **row}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


def mean_metrics(history: list[Mapping[str, Any]]) -> dict[str, float]:
  """Averages a list of per-step metric dicts (fetched to host)."""
  host = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def next_token_loss(logits_blv, tokens_bl, mask_bl, segment_ids_bl=None):
  """Mean next-token cross-entropy over real targets, in fp32 (or wider). Returns (loss, n).

  In a packed row (`segment_ids_bl`) the first token of a document is no target of the last
  token of the one before.
  """
  logits = logits_blv[:, :-1]
  targets = tokens_bl[:, 1:]
  weights = mask_bl[:, 1:] * mask_bl[:, :-1]
  if segment_ids_bl is not None:
    weights = weights * (segment_ids_bl[:, 1:] == segment_ids_bl[:, :-1])
  weights = weights.astype(logits.dtype)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  n = jnp.maximum(weights.sum(), 1.0)
  return jnp.sum((logz - target_logit) * weights) / n, weights.sum()


def setup_logging() -> None:
  """INFO for jaxstar's own messages; warnings only from orbax/absl's chatty internals."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass


# ------------------------------------------------------------------------ run set-up helpers


def model_config_from(config, tok) -> "model_lib.ModelConfig":
  """The run's `ModelConfig`: `config.model.variant` plus the non-None overrides in config.model."""
  from jaxstar import model as model_lib  # pylint: disable=g-import-not-at-top
  overrides = {k: v for k, v in config.model.items() if k != "variant" and v is not None}
  cfg = model_lib.get_config(config.model.variant, **overrides)
  if cfg.vocab_size < tok.vocab_size:
    raise ValueError(f"config.model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                     f"{tok.vocab_size} ids ({config.tokenizer!r}); set --config.model.vocab_size")
  return cfg


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying shardings: restore and load targets."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.unbox(abstract_tree), shardings)


def load_init_params(init_from: str, abstract_params, model_cfg):
  """Params for `config.init_from`: a Hugging Face Mistral folder or another jaxstar workdir.

  Args:
    init_from: folder path.
    abstract_params: ShapeDtypeStructs with shardings (see `with_shardings`).
    model_cfg: the run's ModelConfig (an HF checkpoint's vocabulary may be grown to it).
  """
  from jaxstar import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxstar.model import hf_io  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(init_from):
    raise FileNotFoundError(f"config.init_from={init_from!r} is not a folder")
  ckpt_dir = os.path.join(init_from, "checkpoints")
  if os.path.isdir(ckpt_dir):  # a jaxstar run directory (it also holds a config.json)
    return checkpoint.restore_params(ckpt_dir, abstract_params)
  if os.path.exists(os.path.join(init_from, "config.json")):
    shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
    return hf_io.load_hf_params(init_from, cfg=model_cfg, shardings=shardings,
                                vocab_size=model_cfg.vocab_size)
  return checkpoint.restore_params(init_from, abstract_params)  # a checkpoints folder itself


class Preemption:
  """Turns SIGTERM into a flag that the loop polls; every process agrees on the step to stop.

  On a multi-process run the flags are combined with a tiny all-gather at each poll, so all
  processes save the same step. Exit status after a preemption save: `EXIT_PREEMPTED`.
  """
  EXIT_PREEMPTED = 143  # 128 + SIGTERM, as if terminated; rerun the same command to resume

  def __init__(self):
    import signal  # pylint: disable=g-import-not-at-top
    self.requested = False
    self._previous = None
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      pass

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the end of this step")
    self.requested = True

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.any(flags))

  def close(self):
    import signal  # pylint: disable=g-import-not-at-top
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Preempted(SystemExit):
  """Raised after a preemption checkpoint is written; its exit code is 143."""

  def __init__(self, step: int):
    super().__init__(Preemption.EXIT_PREEMPTED)
    self.step = step


def lm_data(config, tok):
  """The run's training iterator, and a function returning the first `config.eval_batches`
  held-out batches (the same ones at every evaluation)."""
  from jaxstar import data as data_lib  # pylint: disable=g-import-not-at-top
  make = lambda data_cfg: data_lib.lm_dataset_from_config(
      data_cfg, tok, config.batch_size, jax.process_index(), jax.process_count())
  data_iter = make(config.data).iterator()
  eval_pipeline = make(config.eval_data)

  def eval_batches():
    it = eval_pipeline.iterator()
    return [next(it) for _ in range(config.eval_batches)]
  return data_iter, eval_batches


def make_run_mesh(config):
  """The run's mesh from config.mesh_shape / config.dcn_data; errors name the fields to change."""
  from jaxstar import sharding  # pylint: disable=g-import-not-at-top
  try:
    return sharding.make_mesh(config.mesh_shape, dcn_data=config.dcn_data)
  except ValueError as e:
    raise ValueError(f"config.mesh_shape={tuple(config.mesh_shape)} (dcn_data="
                     f"{config.dcn_data}) does not fit the {jax.device_count()} "
                     f"{jax.devices()[0].platform} device(s) here: {e}. Set "
                     f"--config.mesh_shape (one entry may be -1).") from None


def check_init_from(config) -> None:
  """Stops at once when a config that needs pretrained weights has none."""
  if config.get("require_init_from") and not config.init_from:
    raise ValueError("config.init_from is empty: this config trains from pretrained weights; "
                     "set --config.init_from to a Hugging Face Mistral folder (config.json + "
                     "*.safetensors) or a jaxstar run directory")
  if config.init_from and not os.path.isdir(config.init_from) and not config.get("pretrain"):
    raise FileNotFoundError(f"config.init_from={config.init_from!r} is not a folder")


def save_config(config, workdir: str) -> None:
  """Writes the run's config as JSON to `workdir/config.json` (process 0)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))


# ----------------------------------------------------------------- restore and the train loop


def restore_or_init(ckpt, target, mesh, data_iter, *, load_params, init_from_params, fresh):
  """The checkpoint precedence every trainer uses; returns the sharded train state.

  1. the latest good checkpoint in the run's own directory (state, data position, RNG);
  2. else, when `load_params` is given (config.init_from), its params in a fresh train state
     built by `init_from_params(params)`;
  3. else `fresh()`.
  """
  from jaxstar import sharding  # pylint: disable=g-import-not-at-top
  if ckpt.latest_step() is not None:
    state, step = ckpt.restore(target, data_iter=data_iter)
    logging.info("resumed from %s at step %d", ckpt.directory, step)
    return state
  if load_params is not None:
    params = load_params()
    shardings = jax.tree.map(lambda a: a.sharding, target)
    with sharding.use_mesh(mesh):
      state = jax.jit(init_from_params, out_shardings=shardings)(params)
    logging.info("initialized from config.init_from")
    return state
  return fresh()


def open_checkpointer(config, workdir: str):
  from jaxstar import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 save_every=config.checkpoint.save_every,
                                 keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)


def train_loop(config, *, state, train_step, next_batch, ckpt, data_iter, writer, mesh,
               evaluate=None, desc: str = "train") -> tuple[TrainState, dict]:
  """Steps from `state.step` to `config.num_steps`: log, evaluate, checkpoint, handle SIGTERM.

  Args:
    train_step: the jitted `(state, batch) -> (state, metrics)`.
    next_batch: returns the next global batch (from `data_iter`).
    evaluate: optional `(step, params) -> dict of metrics`, every `config.eval_every` steps.
  Returns:
    (final state, summary of the last logged metrics). Raises `Preempted` after a SIGTERM save.
  """
  import tqdm  # pylint: disable=g-import-not-at-top
  from jaxstar import sharding  # pylint: disable=g-import-not-at-top
  skip = config.nonfinite == "skip"
  is_main = jax.process_index() == 0
  preemption = Preemption()
  start = int(state.step)
  tokens_per_step = config.batch_size * config.data.seq_len
  history, summary = [], {}
  progress = tqdm.tqdm(total=config.num_steps, initial=start, disable=not is_main, desc=desc,
                       dynamic_ncols=True)
  clock = {"time": time.perf_counter(), "step": start}

  def flush(step: int):
    nonlocal history
    if not history:
      return
    for i, m in enumerate(jax.device_get(history)):
      check_finite(m, step - len(history) + i + 1, skip)
    metrics = mean_metrics(history)
    now = time.perf_counter()
    metrics["tokens_per_s"] = (tokens_per_step * (step - clock["step"])
                               / max(now - clock["time"], 1e-9))
    clock.update(time=now, step=step)
    history = []
    writer.write(step, metrics)
    summary.update(metrics)
    progress.set_postfix(loss=f"{metrics['loss']:.4g}", tok_s=f"{metrics['tokens_per_s']:,.0f}")

  try:
    for step in range(start + 1, config.num_steps + 1):
      batch = next_batch()
      with sharding.use_mesh(mesh):
        state, metrics = train_step(state, batch)
      history.append(metrics)
      progress.update(1)
      stop = preemption.should_stop() or step == config.stop_at_step
      last = step == config.num_steps
      if step % config.log_every == 0 or last:
        flush(step)
      if evaluate is not None and config.eval_every and (step % config.eval_every == 0 or last):
        eval_metrics = evaluate(step, state.params)
        writer.write(step, eval_metrics)
        summary.update(eval_metrics)
      if ckpt.should_save(step) or last or stop:
        flush(step)  # never save a state whose loss was not checked
        ckpt.save(step, state, data_iter=data_iter, config=config.to_dict(), force=True)
      if stop:
        ckpt.wait()
        logging.info("stopped at step %d with a checkpoint in %s", step, ckpt.directory)
        if preemption.requested:
          raise Preempted(step)
        break
  finally:
    progress.close()
    preemption.close()
    ckpt.close()
    writer.close()
  summary["step"] = int(state.step)
  return state, summary
