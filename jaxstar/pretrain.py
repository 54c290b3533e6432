"""The `pretrain` stage: plain next-token language modelling from scratch or from `init_from`.

  python launch/tpu.py --config=configs/pretrain_tiny.py --workdir=workdirs/pretrain_tiny

`train_and_evaluate(config, workdir)` runs in the sections every jaxstar trainer uses: setup,
mesh, data, model and optimizer, shard, step functions, restore, evals, loop.
"""
from __future__ import annotations

import logging
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxstar import checkpoint
from jaxstar import data as data_lib
from jaxstar import model as model_lib
from jaxstar import sharding
from jaxstar import tokenizer as tokenizer_lib
from jaxstar import train_lib


def unigram_entropy(batches, vocab_size: int) -> float:
  """Entropy (nats) of the token frequencies of `batches`: the loss of a context-free model."""
  counts = np.zeros(vocab_size, np.int64)
  for b in batches:
    np.add.at(counts, np.asarray(b["tokens"])[np.asarray(b["mask"]) > 0], 1)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains a language model as `config` says, checkpointing to `workdir`; returns final metrics."""
  # ------------------------------------------------------------------------------------ setup
  train_lib.setup_logging()
  is_main = jax.process_index() == 0
  tok = tokenizer_lib.get_tokenizer(config.tokenizer)
  model_cfg = train_lib.model_config_from(config, tok)
  train_lib.save_config(config, workdir)
  writer = train_lib.MetricWriter(workdir)

  # ------------------------------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh_shape, dcn_data=config.dcn_data)
  batch_sharding = sharding.batch_sharding(mesh)
  logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())

  # ------------------------------------------------------------------------------------- data
  pipeline = data_lib.lm_dataset_from_config(config.data, tok, config.batch_size,
                                             jax.process_index(), jax.process_count())
  data_iter = pipeline.iterator()
  eval_pipeline = data_lib.lm_dataset_from_config(config.eval_data, tok, config.batch_size,
                                                  jax.process_index(), jax.process_count())

  def eval_batches():
    it = eval_pipeline.iterator()
    return [next(it) for _ in range(config.eval_batches)]

  # ------------------------------------------------------------------- model and optimizer
  module = model_lib.Transformer(model_cfg)
  optimizer = train_lib.make_optimizer(config.optim, config.num_steps)

  def init_state(rng):
    params = module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    return train_lib.init_train_state(params, optimizer, config.seed)

  # ------------------------------------------------------------------------------------ shard
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(init_state, rng)
  state_shardings = sharding.shardings_for(abstract, mesh)
  if is_main:
    logging.info("model %s: %s parameters\n%s", config.model.variant,
                 f"{model_lib.count_params(model_cfg):,}",
                 sharding.report(abstract.params, state_shardings.params))
  if config.check_sharded:
    sharding.assert_sufficiently_sharded(abstract.params, state_shardings.params, mesh)

  # --------------------------------------------------------------------------- step functions
  def loss_fn(params, batch, rng):
    del rng
    logits = module.apply({"params": params}, batch["tokens"], batch["mask"] > 0)
    loss, n_targets = train_lib.next_token_loss(logits, batch["tokens"], batch["mask"])
    return loss, {"targets": n_targets}

  skip = config.nonfinite == "skip"
  if config.nonfinite not in train_lib.NONFINITE:
    raise ValueError(f"config.nonfinite={config.nonfinite!r}; choose one of {train_lib.NONFINITE}")
  with sharding.use_mesh(mesh):
    train_step = jax.jit(
        train_lib.make_train_step(loss_fn, optimizer, grad_accum=config.optim.grad_accum,
                                  skip_nonfinite=skip),
        in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
        donate_argnums=0)
    eval_step = jax.jit(lambda params, batch: loss_fn(params, batch, None)[0],
                        in_shardings=(state_shardings.params, batch_sharding))

  # ---------------------------------------------------------------------------------- restore
  # Precedence: the latest good checkpoint in workdir > config.init_from > fresh init.
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 save_every=config.checkpoint.save_every,
                                 keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
  target = train_lib.with_shardings(abstract, state_shardings)
  if ckpt.latest_step() is not None:
    state, step = ckpt.restore(target, data_iter=data_iter)
    logging.info("resumed from %s at step %d", ckpt.directory, step)
  elif config.init_from:
    params = train_lib.load_init_params(config.init_from, target.params, model_cfg)
    with sharding.use_mesh(mesh):
      state = jax.jit(lambda p: train_lib.init_train_state(p, optimizer, config.seed),
                      out_shardings=state_shardings)(params)
    logging.info("initialized from %s", config.init_from)
  else:
    state, _ = sharding.create_sharded(init_state, mesh, rng)

  # ------------------------------------------------------------------------------------ evals
  def evaluate(step: int) -> dict:
    with sharding.use_mesh(mesh):
      losses = [eval_step(state.params, data_lib.make_global_batch(b, batch_sharding))
                for b in eval_batches()]
    metrics = {"eval_loss": float(np.mean(jax.device_get(losses)))}
    writer.write(step, metrics)
    return metrics

  entropy = unigram_entropy(eval_batches(), tok.vocab_size)
  writer.write(int(state.step), {"unigram_entropy": entropy})
  logging.info("unigram entropy of the eval data: %.3f nats", entropy)

  # ------------------------------------------------------------------------------------- loop
  preemption = train_lib.Preemption()
  start = int(state.step)
  history, summary = [], {"unigram_entropy": entropy}
  tokens_per_step = config.batch_size * config.data.seq_len
  progress = tqdm.tqdm(total=config.num_steps, initial=start, disable=not is_main,
                       desc="pretrain", dynamic_ncols=True)
  last_time, last_step = time.perf_counter(), start

  def flush(step: int):
    nonlocal history, last_time, last_step
    if not history:
      return
    for i, m in enumerate(jax.device_get(history)):
      train_lib.check_finite(m, step - len(history) + i + 1, skip)
    metrics = train_lib.mean_metrics(history)
    now = time.perf_counter()
    metrics["tokens_per_s"] = tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)
    last_time, last_step, history = now, step, []
    writer.write(step, metrics)
    summary.update(metrics)
    progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:,.0f}")

  try:
    for step in range(start + 1, config.num_steps + 1):
      batch = data_lib.make_global_batch(next(data_iter), batch_sharding)
      with sharding.use_mesh(mesh):
        state, metrics = train_step(state, batch)
      history.append(metrics)
      progress.update(1)
      stop = preemption.should_stop() or step == config.stop_at_step
      if step % config.log_every == 0 or step == config.num_steps:
        flush(step)
      if config.eval_every and (step % config.eval_every == 0 or step == config.num_steps):
        summary.update(evaluate(step))
      if ckpt.should_save(step) or step == config.num_steps or stop:
        flush(step)  # never save a state whose loss was not checked
        ckpt.save(step, state, data_iter=data_iter, config=config.to_dict(), force=True)
      if stop:
        ckpt.wait()
        logging.info("stopped at step %d with a checkpoint in %s", step, ckpt.directory)
        if preemption.requested:
          raise train_lib.Preempted(step)
        break
  finally:
    progress.close()
    preemption.close()
    ckpt.close()
    writer.close()
  summary["step"] = int(state.step)
  summary["perplexity"] = math.exp(min(summary.get("loss", 0.0), 50.0))
  return summary
