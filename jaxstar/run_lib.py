"""The run plumbing every stage shares: set-up, mesh, data, sharding, restore, the loop.

A stage's `train_and_evaluate(config, workdir)` is a few named sections, each a call or two on
one `Run` (big_vision's trainers are the model):

  with run_lib.Run(config, workdir) as run:                       # setup, mesh
    data_iter, eval_batches = run.lm_data()                        # data
    optimizer = run.optimizer()                                    # model and optimizer
    abstract, shardings = run.shard(init_state, name)              # shard
    train_step = run.jit_train_step(loss_fn, optimizer, shardings)  # step functions
    state = run.restore(abstract, shardings, data_iter, ...)       # restore
    return run.loop(state, train_step, data_iter, evaluate)        # evals, loop

`Run` owns what must be closed (the checkpointer, the metric writer) and closes it on exit, on
success or error. Config problems a user can fix raise `jaxstar.errors.UserError` naming the
field; the launcher prints them as one line.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

from jaxstar import checkpoint
from jaxstar import data as data_lib
from jaxstar import model as model_lib
from jaxstar import sharding
from jaxstar import tokenizer as tokenizer_lib
from jaxstar import train_lib
from jaxstar.errors import UserError

NONFINITE = ("stop", "skip")


def setup_logging() -> None:
  """INFO for jaxstar's own messages; warnings only from orbax/absl's chatty internals."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass


def validate_config(config) -> None:
  """Checks the fields every stage reads before anything runs; errors name the field."""
  if config.nonfinite not in NONFINITE:
    raise UserError(f"config.nonfinite={config.nonfinite!r}; choose one of {NONFINITE}")
  for name in ("batch_size", "num_steps", "log_every"):
    if config[name] < 1:
      raise UserError(f"config.{name}={config[name]} must be >= 1")
  if config.get("compile_only"):
    return  # no weights are read: init_from is not needed
  if config.require_init_from and not config.init_from:
    raise UserError("config.init_from is empty: this config trains from pretrained weights; "
                    "set --config.init_from to a Hugging Face Mistral folder (config.json + "
                    "*.safetensors) or a jaxstar run directory")
  if config.init_from and not os.path.isdir(config.init_from):
    raise UserError(f"config.init_from={config.init_from!r} is not a folder: give a jaxstar run "
                    "directory or a Hugging Face Mistral folder (or set "
                    "--config.create_init_from to a config that trains one there first)")


def model_config_from(config, tok) -> model_lib.ModelConfig:
  """The run's `ModelConfig`: `config.model.variant` plus the non-None overrides in config.model."""
  overrides = {k: v for k, v in config.model.items() if k != "variant" and v is not None}
  try:
    cfg = model_lib.get_config(config.model.variant, **overrides)
  except ValueError as e:
    raise UserError(f"config.model: {e}") from None
  if cfg.vocab_size < tok.vocab_size:
    raise UserError(f"config.model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                    f"{tok.vocab_size} ids ({config.tokenizer!r}); set --config.model.vocab_size")
  return cfg


def make_run_mesh(config):
  """The run's mesh from config.mesh_shape / config.dcn_data; errors name the fields to change."""
  try:
    return sharding.make_mesh(config.mesh_shape, dcn_data=config.dcn_data)
  except ValueError as e:
    raise UserError(f"config.mesh_shape={tuple(config.mesh_shape)} (dcn_data="
                    f"{config.dcn_data}) does not fit the {jax.device_count()} "
                    f"{jax.devices()[0].platform} device(s) here: {e}. Set "
                    f"--config.mesh_shape (one entry may be -1).") from None


def lm_batch_shapes(config) -> dict[str, tuple[int, int]]:
  """Shapes of the global batches `Run.lm_data` yields: tokens and mask, plus segment ids when
  `config.data.mode` packs documents."""
  shape = (config.batch_size, config.data.seq_len)
  keys = ("tokens", "mask") + (("segment_ids",) if config.data.mode == "pack" else ())
  return {k: shape for k in keys}


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying shardings: restore and load targets."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.unbox(abstract_tree), shardings)


def saved_stage(run_dir: str) -> str:
  """The `stage` of the config saved with the newest checkpoint of a jaxstar run directory."""
  with checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=0,
                               read_only=True) as saved:
    return saved.restore_config().get("stage", "")


def load_init_params(init_from: str, abstract_params, model_cfg):
  """Params for `config.init_from`: a Hugging Face Mistral folder or another jaxstar workdir.

  Args:
    init_from: folder path.
    abstract_params: ShapeDtypeStructs with shardings (see `with_shardings`).
    model_cfg: the run's ModelConfig (an HF checkpoint's vocabulary may be grown to it).
  """
  from jaxstar.model import hf_io  # pylint: disable=g-import-not-at-top
  ckpt_dir = os.path.join(init_from, "checkpoints")
  if os.path.isdir(ckpt_dir):  # a jaxstar run directory (it also holds a config.json)
    return checkpoint.restore_params(ckpt_dir, abstract_params)
  if os.path.exists(os.path.join(init_from, "config.json")):
    shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
    return hf_io.load_hf_params(init_from, cfg=model_cfg, shardings=shardings,
                                vocab_size=model_cfg.vocab_size)
  return checkpoint.restore_params(init_from, abstract_params)  # a checkpoints folder itself


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
    """Logs `scalars` at `step` to TensorBoard and as one line of metrics.jsonl (when enabled)."""
    if not self.enabled:
      return
    row = {k: float(v) for k, v in scalars.items()}
    for k, v in row.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **row}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    """Closes the event file and metrics.jsonl; later writes and closes do nothing."""
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


def mean_metrics(history: list[Mapping[str, Any]]) -> dict[str, float]:
  """Averages a list of per-step metric dicts (fetched to host)."""
  host = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


class Preemption:
  """Decides, without touching the devices, when to stop for a SIGTERM (preemption).

  One process: a SIGTERM handler sets a flag that the loop reads every step.

  Several processes: the distributed runtime's preemption service (on by default in
  `jax.distributed.initialize`) catches SIGTERM on any process and the processes agree on a step
  through the coordination service; `should_stop(step)` is a local check of that agreement
  (no device work, no host round trip), so every process stops and saves at the same step.
  Without the service (`jax_enable_preemption_service=False`) the flags are combined with a
  small all-gather, but only at log steps (`poll`), where the loop reads the devices anyway.

  Exit status after a preemption save: `EXIT_PREEMPTED`.
  """
  EXIT_PREEMPTED = 143  # 128 + SIGTERM, as if terminated; rerun the same command to resume

  def __init__(self):
    import signal  # pylint: disable=g-import-not-at-top
    self.requested = False
    self._previous = None
    self._service = jax.process_count() > 1 and _preemption_service_running()
    if self._service:
      return  # the runtime's own SIGTERM handler feeds the service; ours would replace it
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      pass

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the next agreed step")
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Every step: True when this step is where the run stops for a SIGTERM (host-only)."""
    if self._service:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        logging.warning("preemption notice: every process saves at step %d", step)
        self.requested = True
    elif jax.process_count() > 1:
      return False  # decided in `poll`, at log steps, by all processes together
    return self.requested

  def poll(self) -> bool:
    """At log steps: combines the processes' flags when there is no preemption service."""
    if jax.process_count() > 1 and not self._service:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
      self.requested = bool(np.any(flags))
    return self.requested

  def close(self):
    """Puts back the SIGTERM handler that was there before, when this object replaced it."""
    import signal  # pylint: disable=g-import-not-at-top
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _preemption_service_running() -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  try:
    multihost_utils.reached_preemption_sync_point(0)
  except RuntimeError:  # the service is off, or jax.distributed was not initialized
    return False
  return True


class Preempted(SystemExit):
  """Raised after a preemption checkpoint is written; its exit code is 143."""

  def __init__(self, step: int):
    super().__init__(Preemption.EXIT_PREEMPTED)
    self.step = step


class Run:
  """One stage's run in `workdir`: tokenizer, model config, mesh, writer and checkpointer.

  Use as a context manager: the checkpointer (finishing a pending save) and the metric writer
  are closed on exit, also on an error.

  Attributes:
    config, workdir: as given. tok: the tokenizer. model_cfg: the `ModelConfig`.
    mesh: the device mesh. batch_sharding: the sharding of [B, L] batches.
    writer: the `MetricWriter`. ckpt: the run's `checkpoint.Checkpointer`.
  """

  def __init__(self, config, workdir: str):
    setup_logging()
    validate_config(config)
    self.config, self.workdir = config, workdir
    self.is_main = jax.process_index() == 0
    self.compile_only = bool(config.get("compile_only"))
    self._abstract = None
    try:
      self.tok = tokenizer_lib.get_tokenizer(config.tokenizer)
    except (FileNotFoundError, ValueError) as e:
      raise UserError(f"config.tokenizer={config.tokenizer!r}: {e}") from None
    self.model_cfg = model_config_from(config, self.tok)
    self.mesh = make_run_mesh(config)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    logging.info("%s: mesh %s over %d processes", config.stage, dict(self.mesh.shape),
                 jax.process_count())
    if self.compile_only:  # nothing is written: no workdir, metrics or checkpoints
      self.writer, self.ckpt = MetricWriter(workdir, enabled=False), None
      return
    if self.is_main:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    self.writer, self.ckpt = MetricWriter(workdir), None
    try:
      self.ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                          save_every=config.checkpoint.save_every,
                                          keep=config.checkpoint.keep,
                                          async_save=config.checkpoint.async_save)
    except ValueError as e:
      self.writer.close()
      raise UserError(f"config.checkpoint: {e}") from None

  def __enter__(self) -> Run:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Closes the checkpointer (finishing a pending save) and the metric writer."""
    if self.ckpt is not None:
      self.ckpt.close()
    self.writer.close()

  # ------------------------------------------------------------------------------------ data

  def lm_data(self):
    """The training iterator over `config.data`, and a function returning the first
    `config.eval_batches` batches of `config.eval_data` (the same ones at every evaluation).
    Compiling only: (None, a function returning no batches); nothing is read."""
    config = self.config
    if self.compile_only:
      return None, list
    make = lambda data_cfg: data_lib.lm_dataset_from_config(
        data_cfg, self.tok, config.batch_size, jax.process_index(), jax.process_count())
    data_iter = make(config.data).iterator()
    eval_pipeline = make(config.eval_data)

    def eval_batches():
      it = eval_pipeline.iterator()
      return [next(it) for _ in range(config.eval_batches)]
    return data_iter, eval_batches

  def global_batch(self, local_batch):
    """This process's rows as global arrays on the batch sharding."""
    return data_lib.make_global_batch(local_batch, self.batch_sharding)

  # -------------------------------------------------------------------- model and optimizer

  def optimizer(self):
    """The optimizer of `config.optim` over `config.num_steps` (`train_lib.make_optimizer`)."""
    return train_lib.make_optimizer(self.config.optim, self.config.num_steps)

  # ----------------------------------------------------------------------------------- shard

  def shard(self, init_state: Callable[[jax.Array], train_lib.TrainState], name: str):
    """Shapes and shardings of the state `init_state(rng)` makes, without allocating it.

    Logs the parameter count and the sharding report, and (config.check_sharded) fails when a
    large parameter would be replicated. Returns (abstract state, state shardings).
    """
    abstract = jax.eval_shape(init_state, jax.random.key(self.config.seed))
    shardings = sharding.shardings_for(abstract, self.mesh)
    self._abstract = (abstract, shardings)
    if self.is_main:
      count = sum(int(x.size) for x in jax.tree.leaves(nn.unbox(abstract.params)))
      logging.info("%s: %s parameters\n%s", name, f"{count:,}",
                   sharding.report(abstract.params, shardings.params))
    if self.config.check_sharded:
      sharding.assert_sufficiently_sharded(abstract.params, shardings.params, self.mesh)
    return abstract, shardings

  # -------------------------------------------------------------------------- step functions

  def jit_train_step(self, loss_fn: train_lib.LossFn, optimizer, shardings,
                     batch_shapes: Mapping[str, tuple[int, ...]] | None = None):
    """The jitted, donated `(state, batch) -> (state, metrics)` of `loss_fn`.

    Compiling only (`config.compile_only`), it lowers and compiles the step for int32 batches of
    `batch_shapes` (default: `lm_batch_shapes(config)`) and the state `shard` described, prints
    `compile_plan.report` and raises `compile_plan.CompiledOnly` (exit status 0).
    """
    step = train_lib.make_train_step(loss_fn, optimizer, grad_accum=self.config.optim.grad_accum,
                                     skip_nonfinite=self.config.nonfinite == "skip")
    with sharding.use_mesh(self.mesh):
      jitted = jax.jit(step, in_shardings=(shardings, self.batch_sharding),
                       out_shardings=(shardings, None), donate_argnums=0)
    if self.compile_only:
      self._compile_and_stop(jitted, batch_shapes or lm_batch_shapes(self.config))
    return jitted

  def _compile_and_stop(self, jitted, batch_shapes):
    from jaxstar import compile_plan  # pylint: disable=g-import-not-at-top
    if self._abstract is None:
      raise RuntimeError("compile_only: call Run.shard before Run.jit_train_step")
    abstract, shardings = self._abstract
    state = with_shardings(abstract, shardings)
    batch = {k: jax.ShapeDtypeStruct(tuple(v), np.int32, sharding=self.batch_sharding)
             for k, v in batch_shapes.items()}
    with sharding.use_mesh(self.mesh):
      compiled, seconds = compile_plan.compile_step(jitted, (state, batch))
    memory = compile_plan.memory_bytes(compiled)
    text = compile_plan.report(self.config, self.model_cfg, self.mesh, memory, seconds,
                               batch_shapes)
    if self.is_main:
      print(text, flush=True)
    raise compile_plan.CompiledOnly(text, memory)

  def jit_eval_step(self, fn, params_shardings, num_rest: int = 0):
    """`fn(params, batch, *rest)` jitted with the params and batch shardings; the `num_rest`
    further arguments (an RNG key, ...) are laid out by jit."""
    with sharding.use_mesh(self.mesh):
      shardings = (params_shardings, self.batch_sharding) + (None,) * num_rest
      return jax.jit(fn, in_shardings=shardings)

  def eval_sums(self, eval_step, params, batches, *args) -> dict[str, float]:
    """Sums over `batches` of each scalar in `eval_step(params, batch, *args)`'s dict."""
    with sharding.use_mesh(self.mesh):
      outs = [eval_step(params, self.global_batch(b), *args) for b in batches]
    host = jax.device_get(outs)
    return {k: float(np.sum([o[k] for o in host])) for k in host[0]}

  # --------------------------------------------------------------------------------- restore

  def restore(self, abstract, shardings, data_iter, *, init_state, load_params=None,
              from_params=None) -> train_lib.TrainState:
    """The sharded train state, by the precedence every stage uses:

    1. the latest good checkpoint in the run's own directory (state, data position, RNG);
    2. else, with `config.init_from`, `from_params(load_params())` (a fresh train state around
       the loaded params; `load_params` defaults to `load_init_params`);
    3. else `init_state(rng)`, a fresh init.
    """
    config = self.config
    target = with_shardings(abstract, shardings)
    if self.ckpt.latest_step() is not None:
      try:
        state, step = self.ckpt.restore(target, data_iter=data_iter)
      except checkpoint.NoGoodCheckpointError as e:
        raise UserError(f"{e}. If the model or optimizer in the config changed since these "
                        f"were saved, use the saved config ({self.workdir}/config.json) or a "
                        "new --workdir") from e
      logging.info("resumed from %s at step %d", self.ckpt.directory, step)
      return state
    if config.init_from:
      load = load_params or (lambda target_params: load_init_params(
          config.init_from, target_params, self.model_cfg))
      try:
        params = load(target.params)
      except (checkpoint.NoGoodCheckpointError, ValueError) as e:
        # Shapes or tensors that do not match this config's model, an unreadable folder.
        raise UserError(f"config.init_from={config.init_from!r} does not fit this config's "
                        f"model: {e}") from e
      with sharding.use_mesh(self.mesh):
        state = jax.jit(from_params, out_shardings=shardings)(params)
      logging.info("initialized from config.init_from=%s", config.init_from)
      return state
    return sharding.create_sharded(init_state, self.mesh, jax.random.key(config.seed))[0]

  # ------------------------------------------------------------------------------------ loop

  def loop(self, state, train_step, data_iter, evaluate=None, desc: str = "train",
           tokens_per_step: int | None = None):
    """Steps from `state.step` to `config.num_steps`: log, evaluate, checkpoint, handle SIGTERM.

    Args:
      train_step: the jitted `(state, batch) -> (state, metrics)`.
      data_iter: the training iterator (its position is saved with each checkpoint).
      evaluate: optional `(step, params) -> dict of metrics`, every `config.eval_every` steps.
      desc: the progress bar's label.
      tokens_per_step: for the tokens/s metric (default: batch_size * config.data.seq_len).
    Returns:
      the summary of the last logged metrics and evaluation, with `step`; the final state is
      `self.state`. Raises `Preempted` after a SIGTERM save.
    """
    import tqdm  # pylint: disable=g-import-not-at-top
    config, ckpt, writer = self.config, self.ckpt, self.writer
    skip = config.nonfinite == "skip"
    preemption = Preemption()
    start = int(state.step)
    tokens_per_step = tokens_per_step or config.batch_size * config.data.seq_len
    history, summary = [], {}
    progress = tqdm.tqdm(total=config.num_steps, initial=start, disable=not self.is_main,
                         desc=desc, dynamic_ncols=True)
    clock = {"time": time.perf_counter(), "step": start}

    def flush(step: int):
      nonlocal history
      if not history:
        return
      host = jax.device_get(history)
      for i, m in enumerate(host):
        train_lib.check_finite(m, step - len(host) + i + 1, skip)
      metrics = mean_metrics(host)
      now = time.perf_counter()
      metrics["tokens_per_s"] = (tokens_per_step * (step - clock["step"])
                                 / max(now - clock["time"], 1e-9))
      clock.update(time=now, step=step)
      history = []
      writer.write(step, metrics)
      summary.update(metrics)
      progress.set_postfix(loss=f"{metrics['loss']:.4g}", tok_s=f"{metrics['tokens_per_s']:,.0f}")

    # Between log, eval and checkpoint steps the loop never reads the devices, so the host runs
    # ahead (fetching and sending the next batches) while they compute; the device-to-host
    # transfer guard enforces it on accelerators (on CPU arrays live on the host; the tests
    # emulate the guard there).
    try:
      with jax.transfer_guard_device_to_host("disallow"):
        for step in range(start + 1, config.num_steps + 1):
          batch = self.global_batch(next(data_iter))
          with sharding.use_mesh(self.mesh):
            state, metrics = train_step(state, batch)
          history.append(metrics)
          progress.update(1)
          last = step == config.num_steps
          log = step % config.log_every == 0 or last
          stop = preemption.should_stop(step) or step == config.stop_at_step
          evaluating = evaluate is not None and config.eval_every and (
              step % config.eval_every == 0 or last)
          saving = ckpt.should_save(step) or last or stop
          if not (log or evaluating or saving):
            continue
          with jax.transfer_guard_device_to_host("allow"):
            if log:
              flush(step)
              stop = preemption.poll() or stop
              saving = saving or stop
            if evaluating:
              eval_metrics = evaluate(step, state.params)
              writer.write(step, eval_metrics)
              summary.update(eval_metrics)
            if saving:
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
    self.state = state
    summary["step"] = int(state.step)
    return summary
