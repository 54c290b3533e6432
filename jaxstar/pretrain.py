"""The `pretrain` stage: plain next-token language modelling from scratch or from `init_from`.

  python launch/tpu.py --config=configs/pretrain_tiny.py --workdir=workdirs/pretrain_tiny

`train_and_evaluate(config, workdir)` runs in the sections every jaxstar stage uses (setup,
mesh, data, model and optimizer, shard, step functions, restore, evals, loop), each a call or
two on `run_lib.Run`.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from jaxstar import model as model_lib
from jaxstar import run_lib
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
  # ------------------------------------------------------------------------------- setup, mesh
  with run_lib.Run(config, workdir) as run:

    # ----------------------------------------------------------------------------------- data
    data_iter, eval_batches = run.lm_data()

    # -------------------------------------------------------------------- model and optimizer
    module = model_lib.Transformer(run.model_cfg)
    optimizer = run.optimizer()

    init_state = train_lib.lm_init_state(module, optimizer, config.seed)

    # ---------------------------------------------------------------------------------- shard
    abstract, shardings = run.shard(init_state, f"model {config.model.variant}")

    # ------------------------------------------------------------------------- step functions
    loss_fn = train_lib.lm_loss_fn(module)
    train_step = run.jit_train_step(loss_fn, optimizer, shardings)
    eval_step = run.jit_eval_step(lambda params, batch: {"loss": loss_fn(params, batch, None)[0]},
                                  shardings.params)

    # -------------------------------------------------------------------------------- restore
    # Precedence: the latest good checkpoint in workdir > config.init_from > fresh init.
    state = run.restore(abstract, shardings, data_iter, init_state=init_state,
                        from_params=lambda p: train_lib.init_train_state(p, optimizer,
                                                                         config.seed))

    # ---------------------------------------------------------------------------------- evals
    def evaluate(step: int, params) -> dict:
      del step
      batches = eval_batches()
      return {"eval_loss": run.eval_sums(eval_step, params, batches)["loss"] / len(batches)}

    entropy = unigram_entropy(eval_batches(), run.tok.vocab_size)
    run.writer.write(int(state.step), {"unigram_entropy": entropy})
    logging.info("unigram entropy of the eval data: %.3f nats", entropy)

    # ----------------------------------------------------------------------------------- loop
    summary = run.loop(state, train_step, data_iter, evaluate, desc="pretrain")
  summary["unigram_entropy"] = entropy
  summary["perplexity"] = math.exp(min(summary.get("loss", 0.0), 50.0))
  return summary
