"""STaR on scratchpad addition with a tiny model: pretraining and the bootstrap loop on a CPU.

  python launch/tpu.py --config=configs/star_arithmetic_tiny.py --workdir=workdirs/star_tiny

1. `:pretrain` (run first, automatically, into config.init_from when it holds no finished run):
   the tiny byte-level LM learns STaR's addition scratchpad (spec/star.md §2.3) on problems of
   1-2 digits only, a few solved blocks of one digit count per document.
2. STaR (this config): the training pool has 1-4 digits. With a few solved problems of the same
   digit count before each query the pretrained model solves short problems and, rarely,
   longer ones; every iteration fine-tunes the pretrained model on the scratchpads it got
   right (and on its rationalizations of the others, with the answer as hint) and the
   held-out accuracy on the longer problems grows.
"""
from configs import common


def pretrain_config():
  config = common.base_config()
  config.stage = "pretrain"
  config.model = common.model_config("tiny")
  config.tokenizer = "bytes"
  scratch = dict(synthetic_format="scratchpad", synthetic_min_digits=1, synthetic_max_digits=2,
                 synthetic_blocks=3, seq_len=256)
  config.data = common.lm_data_config(synthetic_docs=20000, seed=5, **scratch)
  config.eval_data = common.lm_data_config(synthetic_docs=64, seed=1234, **scratch)
  config.batch_size = 16
  config.num_steps = 600
  config.log_every = 20
  config.eval_every = 200
  config.checkpoint.save_every = 200
  config.optim = common.optim_config(lr=3e-3, warmup_steps=40, schedule="cosine",
                                     end_lr_factor=0.1, weight_decay=0.01)
  return config


def get_config(arg=None):
  args = common.parse_arg(arg, pretrain=False)
  if args.pretrain:
    return pretrain_config()
  config = common.star_stage_config(
      "arithmetic", num_iterations=6, patience=2, n_train_samples=384, seq_len=512,
      start_steps=60, add_steps=20, steps_rule="linear", batch_size=64, max_length=2048,
      chunk=128, keep_checkpoints="best")
  config.star.arithmetic.digits = "1-4"
  config.star.arithmetic.pool_per_length = 2000
  config.star.arithmetic.dev_per_length = 64
  config.star.arithmetic.shots = 2
  config.star.arithmetic.exemplar_pool = 20
  config.model = common.model_config("tiny")
  config.tokenizer = "bytes"
  config.init_from = "workdirs/star_arithmetic_tiny_base"
  config.create_init_from = "configs/star_arithmetic_tiny.py:pretrain"
  config.batch_size = 16
  config.log_every = 20
  config.checkpoint.save_every = 100
  config.optim = common.optim_config(lr=3e-4, warmup_steps=10, schedule="constant",
                                     weight_decay=0.0, clip_norm=1.0)
  return config
