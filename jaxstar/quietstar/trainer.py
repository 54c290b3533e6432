"""The `quietstar` stage: continued pretraining with thoughts (spec/quietstar.md §1-4).

  python launch/tpu.py --config=configs/quietstar_tiny.py --workdir=workdirs/quietstar_tiny
  python launch/tpu.py --config=configs/quietstar_7b.py --workdir=gs://bucket/quietstar_7b

Sections as in every jaxstar trainer: setup, mesh, data, model and optimizer, shard, step
functions, restore, evals, loop. Parameters are {'lm': Mistral params, 'start_thought',
'end_thought', 'mixing'}; all of them are checkpointed and restored (never re-initialized).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxstar import checkpoint
from jaxstar import data as data_lib
from jaxstar import sharding
from jaxstar import tokenizer as tokenizer_lib
from jaxstar import train_lib
from jaxstar.quietstar import loss as qs_loss
from jaxstar.quietstar import thoughts
from jaxstar.quietstar.config import QuietStarConfig


def quietstar_config(config) -> QuietStarConfig:
  fields = {f.name for f in dataclasses.fields(QuietStarConfig)}
  return QuietStarConfig(**{k: v for k, v in config.quietstar.items() if k in fields})


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


def _load_lm_params(init_from: str, target_params, model_cfg):
  """LM params from an HF folder, a pretrain run, or (all params) another quietstar run."""
  ckpt_dir = os.path.join(init_from, "checkpoints")
  if os.path.isdir(ckpt_dir):
    saved = checkpoint.Checkpointer(ckpt_dir, save_every=0, read_only=True)
    if saved.restore_config().get("stage") == "quietstar":
      return checkpoint.restore_params(ckpt_dir, target_params), True
  return train_lib.load_init_params(init_from, target_params["lm"], model_cfg), False


def _ensure_pretrained(config) -> None:
  """Runs `config.pretrain` into `config.init_from` when that holds no checkpoint yet."""
  if not config.get("pretrain") or not config.init_from:
    return
  if checkpoint.Checkpointer(os.path.join(config.init_from, "checkpoints"), save_every=0,
                             read_only=True).latest_step() == config.pretrain.num_steps:
    return
  from jaxstar import pretrain  # pylint: disable=g-import-not-at-top
  logging.info("config.init_from=%s has no finished pretraining: running config.pretrain",
               config.init_from)
  pretrain.train_and_evaluate(config.pretrain, config.init_from)


def train_and_evaluate(config, workdir: str) -> dict:
  """Quiet-STaR training as `config` says, checkpointing to `workdir`; returns final metrics."""
  # ------------------------------------------------------------------------------------ setup
  train_lib.setup_logging()
  train_lib.check_init_from(config)
  qs = quietstar_config(config)
  qs.check_seq_len(config.data.seq_len)
  _ensure_pretrained(config)
  tok = tokenizer_lib.get_tokenizer(config.tokenizer)
  model_cfg = train_lib.model_config_from(config, tok)
  train_lib.save_config(config, workdir)
  writer = train_lib.MetricWriter(workdir)

  # ------------------------------------------------------------------------------------- mesh
  mesh = train_lib.make_run_mesh(config)
  batch_sharding = sharding.batch_sharding(mesh)

  # ------------------------------------------------------------------------------------- data
  data_iter, held_out = train_lib.lm_data(config, tok)
  answer_ids = (marker_ids(tok, config.eval_answer_start), marker_ids(tok, config.eval_answer_end))

  def eval_batches():
    return [{**b, "answer": answer_mask(b["tokens"], *answer_ids)} for b in held_out()]

  # ------------------------------------------------------------------- model and optimizer
  model = thoughts.QuietStarModel(model_cfg, qs, start_id=tok.start_thought_id,
                                  end_id=tok.end_thought_id, init_id=tok.encode("---")[0],
                                  pad_id=tok.pad_id)
  eval_model = model.clone(qs=dataclasses.replace(qs, n_passes=1, n_ahead_talk=1))
  optimizer = train_lib.make_optimizer(config.optim, config.num_steps)

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, 2), jnp.int32),
                      method=thoughts.QuietStarModel.init_all)["params"]

  def init_state(rng):
    return train_lib.init_train_state(init_params(rng), optimizer, config.seed)

  # ------------------------------------------------------------------------------------ shard
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(init_state, rng)
  state_shardings = sharding.shardings_for(abstract, mesh)
  if jax.process_index() == 0:
    n_params = sum(x.size for x in jax.tree.leaves(nn.unbox(abstract.params)))
    logging.info("quietstar on %s: %s parameters\n%s", config.model.variant, f"{n_params:,}",
                 sharding.report(abstract.params, state_shardings.params))
  if config.check_sharded:
    sharding.assert_sufficiently_sharded(abstract.params, state_shardings.params, mesh)

  # --------------------------------------------------------------------------- step functions
  def loss_fn(params, batch, rng):
    if qs.original_mode:
      ce = model.apply({"params": params}, batch["tokens"], batch["mask"],
                       method=thoughts.QuietStarModel.base_ce)
      return qs_loss.original_mode_loss(ce, batch["mask"])
    out = model.apply({"params": params}, batch["tokens"], batch["mask"], rng)
    return qs_loss.quietstar_loss(out, batch["mask"], qs)

  def eval_sums(params, batch, rng):
    """Sums of CE over answer-digit targets and over all targets, with and without thoughts."""
    base_mask, _ = qs_loss.target_masks(batch["mask"], 1)
    answer = jnp.roll(batch["answer"], -1, axis=1).astype(jnp.float32) * base_mask
    if qs.original_mode:
      base = eval_model.apply({"params": params}, batch["tokens"], batch["mask"],
                              method=thoughts.QuietStarModel.base_ce)
      mixed = base
    else:
      out = eval_model.apply({"params": params}, batch["tokens"], batch["mask"], rng,
                             greedy=qs.greedy_eval_thoughts)
      base, mixed = out["base_ce"], out["talk_ce"][..., 0]
    return dict(answer_base=jnp.sum(base * answer), answer_thought=jnp.sum(mixed * answer),
                all_base=jnp.sum(base * base_mask), all_thought=jnp.sum(mixed * base_mask),
                answer_n=jnp.sum(answer), all_n=jnp.sum(base_mask))

  skip = config.nonfinite == "skip"
  with sharding.use_mesh(mesh):
    train_step = jax.jit(
        train_lib.make_train_step(loss_fn, optimizer, grad_accum=config.optim.grad_accum,
                                  skip_nonfinite=skip),
        in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
        donate_argnums=0)
    eval_step = jax.jit(eval_sums, in_shardings=(state_shardings.params, batch_sharding, None))

  # ---------------------------------------------------------------------------------- restore
  # Precedence: the latest good checkpoint in workdir > config.init_from > fresh init. From an
  # LM checkpoint the thought vectors start from E['---'] / 100 and the mixing head outputs 0.
  ckpt = train_lib.open_checkpointer(config, workdir)
  target = train_lib.with_shardings(abstract, state_shardings)

  def load():
    params, complete = _load_lm_params(config.init_from, target.params, model_cfg)
    return params if complete else {"lm": params}

  def from_params(loaded):
    fresh = nn.unbox(init_params(rng))
    params = loaded if "mixing" in loaded else _thought_params(fresh, loaded["lm"], model)
    return train_lib.init_train_state(params, optimizer, config.seed)

  state = train_lib.restore_or_init(
      ckpt, target, mesh, data_iter, load_params=load if config.init_from else None,
      init_from_params=from_params, fresh=lambda: sharding.create_sharded(init_state, mesh, rng)[0])

  # ------------------------------------------------------------------------------------ evals
  def evaluate(step: int, params) -> dict:
    with sharding.use_mesh(mesh):
      sums = [eval_step(params, data_lib.make_global_batch(b, batch_sharding),
                        jax.random.key(config.seed + 1))
              for b in eval_batches()]
    total = {k: float(np.sum([s[k] for s in jax.device_get(sums)])) for k in sums[0]}
    metrics = {
        "eval_answer_loss_base": total["answer_base"] / max(total["answer_n"], 1),
        "eval_loss_base": total["all_base"] / max(total["all_n"], 1),
    }
    if not qs.original_mode:
      metrics["eval_answer_loss_thought"] = total["answer_thought"] / max(total["answer_n"], 1)
      metrics["eval_loss_thought"] = total["all_thought"] / max(total["all_n"], 1)
    del step
    return metrics

  # ------------------------------------------------------------------------------------- loop
  next_batch = lambda: data_lib.make_global_batch(next(data_iter), batch_sharding)
  _, summary = train_lib.train_loop(
      config, state=state, train_step=train_step, next_batch=next_batch, ckpt=ckpt,
      data_iter=data_iter, writer=writer, mesh=mesh, evaluate=evaluate, desc="quietstar")
  return summary
