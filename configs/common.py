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


def star_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.star` block of the STaR stage (jaxstar/star/stage.py), then `overrides`.

  Defaults are the paper's (spec/star.md §1, §7) with the re-do decisions of its §1.10."""
  cfg = ml_collections.ConfigDict(dict(
      task="commonsenseqa",      # commonsenseqa | gsm8k | arithmetic
      train_path="",             # jsonl of the training split; '' = the Hugging Face Hub
      dev_path="",               # jsonl of the dev split; '' = the Hub
      dev_split="",              # '' = the task's evaluation split (CSQA validation, GSM8K test)
      dev_limit=0,               # first N dev items only (0: all)
      prompt_path="",            # few-shot prompt file, exemplars split on blank lines
                                 # ('' = the STaR paper's, shipped in jaxstar/data/prompts)
      hint_prompt_path="",       # its hinted version, for rationalization ('' = shipped)
      num_iterations=30,         # outer iterations at most
      patience=3,                # stop after this many iterations without a better dev
                                 # accuracy (0: never; the shipped code never stops)
      eval_base=True,            # evaluate the base model first (row 0 of the table)
      n_train_samples=10000,     # training items drawn per iteration (seeded)
      rationalize=True,          # retry failures with the hint (spec §1.6)
      hint_whole_solution=False,  # GSM8K: the hint is the whole gold solution (shipped code)
      few_shot_train=False,      # prepend the few-shot exemplars to every saved example
      loss_on="completion",      # completion (rationale + answer) | all (as the code trains)
      steps_rule="exponential",  # exponential: start * grow^(n-1); linear: start + add*(n-1)
      start_steps=40,
      grow_steps=1.2,
      add_steps=20,
      max_steps=0,               # cap on steps per iteration (0: none; GSM8K paper: 7912)
      seq_len=1024,              # packed fine-tuning rows (paper: 1024 with packing)
      max_new_tokens=0,          # generation budget (0: the task's: CSQA 96, GSM8K 256,
                                 # arithmetic 48 per digit + 48)
      temperature=0.0,           # 0 = greedy (the paper; the code: top-p 0.9 at T 0.01)
      top_p=1.0,
      batch_size=64,             # sampler rows per device program (a multiple of the
                                 # mesh's batch shards)
      max_length=2048,           # longest prompt + generation
      chunk=512,                 # items per saved chunk of generation / evaluation
      keep_checkpoints="best",   # best: only the best and the latest iteration's; all
      arithmetic=ml_collections.ConfigDict(dict(
          digits="1-5",          # digit counts of the problems ('1-5' or '1,3,5')
          pool_per_length=10000,  # training pool per digit count (paper: 10000 for 1-5)
          dev_per_length=100,    # held-out problems per digit count
          shots=9,               # in-sample exemplars before each query (paper: 9)
          exemplar_pool=50,      # ... drawn from this many fixed ones per digit count
      )),
  ))
  cfg.update(overrides)
  return cfg


def star_stage_config(task: str, **star_overrides) -> ml_collections.ConfigDict:
  """A whole config of the STaR stage with the paper's fine-tuning recipe (spec §1.8): batch 8,
  lr 1e-6 after 100 linear warm-up steps then constant, Adam, clip 1.0, no weight decay."""
  config = base_config()
  config.stage = "star"
  config.require_init_from = True
  config.batch_size = 8
  config.num_steps = 1                  # unused: each iteration sets its own (star.steps_rule)
  config.log_every = 10
  config.eval_every = 0
  config.checkpoint.save_every = 50     # within an iteration's fine-tuning
  config.checkpoint.keep = 1
  config.optim = optim_config(lr=1e-6, warmup_steps=100, schedule="constant", weight_decay=0.0,
                              clip_norm=1.0)
  config.star = star_config(task=task, **star_overrides)
  return config


def star_7b_config(task: str, **star_overrides) -> ml_collections.ConfigDict:
  """`star_stage_config` on Mistral-7B-v0.1 (from a Hugging Face folder in init_from), sharded
  for fine-tuning on a 32-chip slice: FSDP over 8, tensor parallel over 4."""
  config = star_stage_config(task, **star_overrides)
  config.model = model_config("mistral_7b")
  config.model.vocab_size = 32002       # the "mistral" tokenizer's ids include the two thought
                                        # tokens; the imported embedding grows to match
  config.model.dtype = "bfloat16"       # bf16 matmuls, fp32 master weights and Adam
  config.model.remat_policy = "full"
  config.tokenizer = "mistral"
  config.init_from = ""                 # REQUIRED: a Hugging Face Mistral-7B-v0.1 folder
  config.mesh_shape = (1, 8, 4)         # ('data', 'fsdp', 'tensor') = 32 devices
  config.star.batch_size = 64           # sampler rows per program: 8 per batch shard
                                        # (data x fsdp = 8 shards)
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
  config.compile_only = False           # compile the train step, print its memory, stop (no
                                        # data, weights or writes); the launcher's --compile_only
  config.checkpoint = ml_collections.ConfigDict(dict(
      save_every=100,                   # steps between checkpoints (also at the end / SIGTERM)
      keep=3,                           # newest checkpoints kept
      async_save=True,                  # write in the background while training continues
  ))
  config.optim = optim_config()
  return config
