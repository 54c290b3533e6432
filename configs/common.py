"""Fields shared by every jaxstar config, and the `arg` string parser.

Every field is overridable from the command line: `--config.optim.lr=1e-4`. An unknown field or a
value of the wrong type is an error raised by ml_collections before anything runs.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults):
  """Parses 'variant=tiny,runlocal' into a ConfigDict; flags without '=' become True."""
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    result[key] = True if not _ else (value.lower() in ("1", "true", "yes") if kind is bool
                                      else kind(value))
  return result


def model_config(variant: str) -> ml_collections.ConfigDict:
  """The `config.model` block: a variant from jaxstar.model.VARIANTS plus per-run overrides."""
  return ml_collections.ConfigDict(dict(
      variant=variant,                           # tiny | small | mistral_7b
      dtype="float32",                           # matmul dtype (float32 | bfloat16)
      remat_policy="none",                       # none | full | dots | dots_no_batch
      vocab_size=config_dict.placeholder(int),   # None: the variant's (must cover the tokenizer)
      sliding_window=config_dict.placeholder(int),  # None: the variant's
  ))


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.optim` block: AdamW, warm-up + schedule, clipping, accumulation."""
  cfg = ml_collections.ConfigDict(dict(
      lr=1e-3,                          # peak learning rate
      warmup_steps=0,                   # linear warm-up from 0
      schedule="constant",              # after warm-up: constant | linear | cosine
      end_lr_factor=0.0,                # linear/cosine decay end, as a fraction of lr
      decay_steps=0,                    # decay horizon (0: num_steps)
      b1=0.9, b2=0.999, eps=1e-8,       # Adam moments
      weight_decay=0.0,                 # decoupled weight decay
      weight_decay_mask="matrices",     # matrices | all_but_bias | all
      clip_norm=1.0,                    # global gradient-norm clip (0: off)
      grad_accum=1,                     # micro-batches per optimizer step
  ))
  cfg.update(overrides)
  return cfg


def base_config() -> ml_collections.ConfigDict:
  """Fields every stage reads."""
  config = ml_collections.ConfigDict()
  config.stage = ""                     # pretrain | quietstar | star | eval
  config.seed = 0                       # parameter init and the train-state RNG
  config.tokenizer = "bytes"            # bytes | mistral | path/to/sentencepiece.model
  config.init_from = ""                 # a jaxstar workdir or a Hugging Face Mistral folder
  config.batch_size = 8                 # global batch (documents per optimizer step)
  config.num_steps = 100                # optimizer steps
  config.stop_at_step = 0               # stop (with a checkpoint) at this step; 0: run to the end
  config.log_every = 10                 # steps between metric writes
  config.eval_every = 100               # steps between evaluations (0: never)
  config.nonfinite = "stop"             # on a non-finite loss: stop | skip (the update)
  config.mesh_shape = (-1, 1, 1)        # ('data', 'fsdp', 'tensor'); one -1 fills the rest
  config.dcn_data = 1                   # slices in a multi-slice run (data axis over DCN)
  config.check_sharded = True           # fail if a large parameter is replicated
  config.checkpoint = ml_collections.ConfigDict(dict(
      save_every=100,                   # steps between checkpoints (also at the end / SIGTERM)
      keep=3,                           # newest checkpoints kept
      async_save=True,                  # write in the background while training continues
  ))
  config.optim = optim_config()
  return config


def lm_data_config(**overrides) -> ml_collections.ConfigDict:
  """A `config.data` block for jaxstar.data.lm_dataset_from_config (see its docstring)."""
  cfg = ml_collections.ConfigDict(dict(
      source="synthetic",               # synthetic | jsonl | hf
      paths="",                         # jsonl paths/globs (comma-separated) or an HF dataset
      hf_split="train",                 # HF split
      text_field="text",                # document field (jsonl, hf)
      max_docs=0,                       # keep the first N documents (0: all)
      skip_docs=0,                      # drop the first N documents first (held-out evals)
      seq_len=256,                      # L
      mode="crop_pad",                  # crop_pad (random window / right-pad) | pack
      seed=42,                          # shuffle, crop offsets and synthetic corpus seed
      num_epochs=0,                     # 0: repeat forever
      skip_malformed=False,             # skip and count malformed jsonl rows instead of failing
      segment_ids=False,                # pack mode: also emit segment ids
      synthetic_docs=1000,              # documents in the synthetic corpus
      synthetic_max_digits=5,           # operand digits in the synthetic corpus
  ))
  cfg.update(overrides)
  return cfg


def quietstar_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.quietstar` block (jaxstar.quietstar.config.QuietStarConfig; spec §4)."""
  cfg = ml_collections.ConfigDict(dict(
      n_ahead=12,                       # thought passes + 1: n_ahead - 3 sampled tokens
      n_ahead_talk=4,                   # true tokens ahead scored after each thought
      n_passes=2,                       # thoughts per position (adjacent document copies)
      policy_weight=1e6,                # REINFORCE term weight
      reinforce_temperature=3.0,        # temperature of the score-function log-probs
      base_loss_weight=0.5,             # NLL = w * base CE + (1 - w) * talk CE
      embedding_scale=100.0,            # start/end vectors stored / scale, used * scale
      remove_negative_rewards=True,     # positive advantages only (official)
      reward_reduction="sum",           # sum (official) | mean over the talk tokens
      original_mode=False,              # the no-thought baseline (plain next-token CE)
      greedy_eval_thoughts=False,       # argmax thoughts at eval (paper) vs T=1 (code)
      remat_logits=False,               # recompute vocabulary logits in backward (saves memory)
      chunk_positions=32,               # positions per scan step (0: one pass, not recomputed)
      chunk_remat="dots_no_batch",      # layer remat inside a chunk's (recomputed) block pass
  ))
  cfg.update(overrides)
  return cfg
