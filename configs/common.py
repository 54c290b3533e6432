"""Fields shared by every jaxstar config, and the `arg` string parser.

Every field is overridable from the command line: `--config.optim.lr=1e-4`. An unknown field or a
value of the wrong type is an error raised by ml_collections before anything runs.

Defaults have one home each: the `model`, `quietstar`, `optim` and `data` blocks are built from
`jaxstar.model.ModelConfig` (and its variant table), `jaxstar.quietstar.QuietStarConfig`,
`jaxstar.train_lib.OptimConfig` and `jaxstar.data.lm.DEFAULTS`, whose comments document each
field; the run and checkpoint fields of `base_config` are documented here.
"""
from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from jaxstar import train_lib
from jaxstar.data import lm as lm_data
from jaxstar.model import config as model_config_lib
from jaxstar.quietstar import config as qs_config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'variant=tiny,runlocal' into a ConfigDict over `defaults`.

  'key=value' converts value to the default's type ('1'/'true'/'yes' for a bool); a bare 'key'
  sets a bool default to True. An unknown key, or a bare key whose default is not a bool, is a
  ValueError naming the known keys.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if not has_value:
      if kind is not bool:
        raise ValueError(f"config arg {key!r} needs a value: {key}=...")
      result[key] = True
    elif kind is bool:
      result[key] = value.lower() in ("1", "true", "yes")
    else:
      result[key] = kind(value)
  return result


def model_config(variant: str) -> ml_collections.ConfigDict:
  """The `config.model` block: a variant of jaxstar.model.VARIANTS, and every `ModelConfig`
  field as an override that is None (the variant's value) until set."""
  base = model_config_lib.get_config(variant)
  block = ml_collections.ConfigDict({"variant": variant})
  for field in dataclasses.fields(model_config_lib.ModelConfig):
    value = getattr(base, field.name)
    block[field.name] = config_dict.placeholder(int if value is None else type(value))
  return block


def quietstar_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.quietstar` block: `QuietStarConfig`'s fields and defaults, then `overrides`."""
  cfg = ml_collections.ConfigDict(dataclasses.asdict(qs_config.QuietStarConfig()))
  cfg.update(overrides)
  return cfg


def lm_data_config(**overrides) -> ml_collections.ConfigDict:
  """A `config.data` block: `jaxstar.data.lm.DEFAULTS` (documented there), then `overrides`."""
  cfg = ml_collections.ConfigDict(dict(lm_data.DEFAULTS))
  cfg.update(overrides)
  return cfg


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.optim` block: `jaxstar.train_lib.OptimConfig`'s fields and defaults, then
  `overrides`."""
  cfg = ml_collections.ConfigDict(dataclasses.asdict(train_lib.OptimConfig()))
  cfg.update(overrides)
  return cfg


def eval_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.eval` block of the eval stage (jaxstar/evals/stage.py), then `overrides`."""
  cfg = ml_collections.ConfigDict(dict(
      task="gsm8k",              # gsm8k | commonsenseqa | arithmetic (the tiny corpus format)
      split="",                  # '' = the task's evaluation split (GSM8K test, CSQA validation)
      data_path="",              # jsonl copy of the split; '' = the Hugging Face Hub
      limit=0,                   # first N items only (0: all; arithmetic: 100)
      metrics="paper,few_shot",  # comma-separated: paper, few_shot, zero_shot
      thoughts="both",           # both | on | off: with and/or without thoughts (Quiet-STaR)
      n_ahead=0,                 # thought length at eval (0: as trained)
      max_new_tokens=256,        # generation budget (few-shot / zero-shot first stage)
      temperature=0.0,           # 0 = greedy; > 0 samples (needed for num_samples > 1)
      top_p=1.0,                 # nucleus sampling mass
      num_samples=1,             # generations per item, majority-voted (zero-shot maj@8: 8)
      batch_size=8,              # rows per device program (a multiple of the batch shards)
      max_length=2048,           # longest context; longer prompts lose their start
      arithmetic_digits=2,       # arithmetic operands have up to this many digits
  ))
  cfg.update(overrides)
  return cfg


def eval_stage_config(init_from: str = "", mesh_shape=(-1, 1, 1),
                      **eval_overrides) -> ml_collections.ConfigDict:
  """A whole config of the eval stage: `base_config`, then the `eval` block."""
  config = base_config()
  config.stage = "eval"
  config.tokenizer = ""                 # '' = the run's own ('mistral' for a HF folder)
  config.init_from = init_from          # the run directory or HF folder to evaluate
  config.mesh_shape = mesh_shape        # rows over the data axis (batch_size must divide)
  config.eval = eval_config(**eval_overrides)
  return config


def base_config() -> ml_collections.ConfigDict:
  """Fields every stage reads."""
  config = ml_collections.ConfigDict()
  config.stage = ""                     # pretrain | quietstar | star | eval
  config.seed = 0                       # parameter init and the train-state RNG
  config.tokenizer = "bytes"            # bytes | mistral | path/to/sentencepiece.model
  config.init_from = ""                 # a jaxstar workdir or a Hugging Face Mistral folder
  config.require_init_from = False      # refuse to start without init_from (pretrained configs)
  config.create_init_from = ""          # 'configs/x.py[:arg]': train init_from first if missing
  config.batch_size = 8                 # global batch (documents per optimizer step)
  config.num_steps = 100                # optimizer steps
  config.stop_at_step = 0               # stop (with a checkpoint) at this step; 0: run to the end
  config.log_every = 10                 # steps between metric writes
  config.eval_every = 100               # steps between evaluations (0: never)
  config.eval_batches = 4               # held-out batches (config.eval_data) per evaluation
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
