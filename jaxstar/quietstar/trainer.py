"""The `quietstar` stage: continued pretraining with thoughts (spec/quietstar.md §1-4).

  python launch/tpu.py --config=configs/quietstar_tiny.py --workdir=workdirs/quietstar_tiny
  python launch/tpu.py --config=configs/quietstar_7b.py --workdir=gs://bucket/quietstar_7b

Sections as in every jaxstar stage (setup, mesh, data, model and optimizer, shard, step
functions, restore, evals, loop), each a call or two on `run_lib.Run`. Parameters are
{'lm': Mistral params, 'start_thought', 'end_thought', 'mixing'}; all of them are checkpointed
and restored (never re-initialized).
"""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxstar import checkpoint
from jaxstar import run_lib
from jaxstar import train_lib
from jaxstar.errors import UserError
from jaxstar.quietstar import loss as qs_loss
from jaxstar.quietstar import thoughts
from jaxstar.quietstar.config import QuietStarConfig


def quietstar_config(config) -> QuietStarConfig:
  """The `QuietStarConfig` of `config.quietstar`; an unknown key is an error listing the fields."""
  fields = [f.name for f in dataclasses.fields(QuietStarConfig)]
  unknown = sorted(set(config.quietstar.keys()) - set(fields))
  if unknown:
    raise UserError(f"config.quietstar has unknown field(s) {unknown}; fields: {fields}")
  return QuietStarConfig(**config.quietstar.to_dict())


def answer_mask(tokens: np.ndarray, start_ids, end_ids) -> np.ndarray:
  """1 on the tokens after a start id ('=') up to, not including, an end id (newline)."""
  out = np.zeros(tokens.shape, np.int32)
  for r, row in enumerate(tokens):
    inside = False
    for c, t in enumerate(row):
      if t in end_ids:
        inside = False
      elif inside:
        out[r, c] = 1
      elif t in start_ids:
        inside = True
  return out


def marker_ids(tok, text: str) -> set[int]:
  """Ids `text` can take: alone (SentencePiece may give '▁=') and after a digit ('=')."""
  return {tok.encode(text)[-1], tok.encode("1" + text)[-1]}


def _thought_params(params, lm_params, model):
  """Start/end vectors from the (loaded) embedding of '---'; a fresh, zero-output mixing head."""
  init = lambda: thoughts.thought_init_vector(lm_params["embedding"], model.init_id,
                                              model.qs.embedding_scale)
  return {**params, "lm": lm_params, "start_thought": init(), "end_thought": init()}


def _load_params(init_from: str, target_params, model_cfg):
  """{'lm': params} from an HF folder or a pretrain run, or all params of another quietstar run."""
  ckpt_dir = os.path.join(init_from, "checkpoints")
  if os.path.isdir(ckpt_dir) and run_lib.saved_stage(init_from) == "quietstar":
    return checkpoint.restore_params(ckpt_dir, target_params)
  return {"lm": run_lib.load_init_params(init_from, target_params["lm"], model_cfg)}


def train_and_evaluate(config, workdir: str) -> dict:
  """Quiet-STaR training as `config` says, checkpointing to `workdir`; returns final metrics."""
  # ------------------------------------------------------------------------------- setup, mesh
  qs = quietstar_config(config)
  qs.check_seq_len(config.data.seq_len)
  with run_lib.Run(config, workdir) as run:
    tok = run.tok

    # ----------------------------------------------------------------------------------- data
    data_iter, held_out = run.lm_data()
    answer_ids = (marker_ids(tok, config.eval_answer_start),
                  marker_ids(tok, config.eval_answer_end))

    def eval_batches():
      return [{**b, "answer": answer_mask(b["tokens"], *answer_ids)} for b in held_out()]

    # -------------------------------------------------------------------- model and optimizer
    model = thoughts.QuietStarModel(run.model_cfg, qs, start_id=tok.start_thought_id,
                                    end_id=tok.end_thought_id, init_id=tok.encode("---")[0],
                                    pad_id=tok.pad_id)
    eval_model = model.clone(qs=dataclasses.replace(qs, n_passes=1, n_ahead_talk=1))
    optimizer = run.optimizer()

    def init_params(rng):
      return model.init(rng, jnp.zeros((1, 2), jnp.int32),
                        method=thoughts.QuietStarModel.init_all)["params"]

    def init_state(rng):
      return train_lib.init_train_state(init_params(rng), optimizer, config.seed)

    # ---------------------------------------------------------------------------------- shard
    abstract, shardings = run.shard(init_state, f"quietstar on {config.model.variant}")

    # ------------------------------------------------------------------------- step functions
    def loss_fn(params, batch, rng):
      segments = batch.get("segment_ids")
      if qs.original_mode:
        ce = model.apply({"params": params}, batch["tokens"], batch["mask"], segments,
                         method=thoughts.QuietStarModel.base_ce)
        return qs_loss.original_mode_loss(ce, batch["mask"], segments)
      out = model.apply({"params": params}, batch["tokens"], batch["mask"], rng,
                        segment_ids_bl=segments)
      return qs_loss.quietstar_loss(out, batch["mask"], qs, segments)

    def eval_sums(params, batch, rng):
      """Sums of CE over answer-digit targets and over all targets, with and without thoughts."""
      segments = batch.get("segment_ids")
      base_mask, _ = qs_loss.target_masks(batch["mask"], 1, segments)
      answer = jnp.roll(batch["answer"], -1, axis=1).astype(base_mask.dtype) * base_mask
      if qs.original_mode:
        base = eval_model.apply({"params": params}, batch["tokens"], batch["mask"], segments,
                                method=thoughts.QuietStarModel.base_ce)
        mixed = base
      else:
        out = eval_model.apply({"params": params}, batch["tokens"], batch["mask"], rng,
                               segment_ids_bl=segments, greedy=qs.greedy_eval_thoughts)
        base, mixed = out["base_ce"], out["talk_ce"][..., 0]
      return dict(answer_base=jnp.sum(base * answer), answer_thought=jnp.sum(mixed * answer),
                  all_base=jnp.sum(base * base_mask), all_thought=jnp.sum(mixed * base_mask),
                  answer_n=jnp.sum(answer), all_n=jnp.sum(base_mask))

    train_step = run.jit_train_step(loss_fn, optimizer, shardings)
    eval_step = run.jit_eval_step(eval_sums, shardings.params, num_rest=1)

    # -------------------------------------------------------------------------------- restore
    # Precedence: the latest good checkpoint in workdir > config.init_from > fresh init. From an
    # LM checkpoint the thought vectors start from E['---'] / 100 and the mixing head outputs 0.
    def from_params(loaded):
      fresh = nn.unbox(init_params(jax.random.key(config.seed)))
      params = loaded if "mixing" in loaded else _thought_params(fresh, loaded["lm"], model)
      return train_lib.init_train_state(params, optimizer, config.seed)

    state = run.restore(
        abstract, shardings, data_iter, init_state=init_state, from_params=from_params,
        load_params=lambda target: _load_params(config.init_from, target, run.model_cfg))

    # ---------------------------------------------------------------------------------- evals
    def evaluate(step: int, params) -> dict:
      del step
      total = run.eval_sums(eval_step, params, eval_batches(), jax.random.key(config.seed + 1))
      metrics = {
          "eval_answer_loss_base": total["answer_base"] / max(total["answer_n"], 1),
          "eval_loss_base": total["all_base"] / max(total["all_n"], 1),
      }
      if not qs.original_mode:
        metrics["eval_answer_loss_thought"] = total["answer_thought"] / max(total["answer_n"], 1)
        metrics["eval_loss_thought"] = total["all_thought"] / max(total["all_n"], 1)
      return metrics

    # ----------------------------------------------------------------------------------- loop
    return run.loop(state, train_step, data_iter, evaluate, desc="quietstar")
