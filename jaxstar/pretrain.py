"""The `pretrain` stage: plain next-token language modelling from scratch or from `init_from`.

  python launch/tpu.py --config=configs/pretrain_tiny.py --workdir=workdirs/pretrain_tiny

`train_and_evaluate(config, workdir)` runs in the sections every jaxstar trainer uses: setup,
mesh, data, model and optimizer, shard, step functions, restore, evals, loop.
"""
from __future__ import annotations

import logging
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
  train_lib.check_init_from(config)
  is_main = jax.process_index() == 0
  tok = tokenizer_lib.get_tokenizer(config.tokenizer)
  model_cfg = train_lib.model_config_from(config, tok)
  train_lib.save_config(config, workdir)
  writer = train_lib.MetricWriter(workdir)

  # ------------------------------------------------------------------------------------- mesh
  mesh = train_lib.make_run_mesh(config)
  batch_sharding = sharding.batch_sharding(mesh)
  logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())

  # ------------------------------------------------------------------------------------- data
  data_iter, eval_batches = train_lib.lm_data(config, tok)

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
  ckpt = train_lib.open_checkpointer(config, workdir)
  target = train_lib.with_shardings(abstract, state_shardings)
  load = None
  if config.init_from:
    load = lambda: train_lib.load_init_params(config.init_from, target.params, model_cfg)
  state = train_lib.restore_or_init(
      ckpt, target, mesh, data_iter, load_params=load,
      init_from_params=lambda p: train_lib.init_train_state(p, optimizer, config.seed),
      fresh=lambda: sharding.create_sharded(init_state, mesh, rng)[0])

  # ------------------------------------------------------------------------------------ evals
  def evaluate(step: int, params) -> dict:
    del step
    with sharding.use_mesh(mesh):
      losses = [eval_step(params, data_lib.make_global_batch(b, batch_sharding))
                for b in eval_batches()]
    return {"eval_loss": float(np.mean(jax.device_get(losses)))}

  entropy = unigram_entropy(eval_batches(), tok.vocab_size)
  writer.write(int(state.step), {"unigram_entropy": entropy})
  logging.info("unigram entropy of the eval data: %.3f nats", entropy)

  # ------------------------------------------------------------------------------------- loop
  next_batch = lambda: data_lib.make_global_batch(next(data_iter), batch_sharding)
  state, summary = train_lib.train_loop(
      config, state=state, train_step=train_step, next_batch=next_batch, ckpt=ckpt,
      data_iter=data_iter, writer=writer, mesh=mesh, evaluate=evaluate, desc="pretrain")
  summary["unigram_entropy"] = entropy
  summary["perplexity"] = math.exp(min(summary.get("loss", 0.0), 50.0))
  return summary
