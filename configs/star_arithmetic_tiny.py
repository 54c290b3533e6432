"""STaR on scratchpad addition with a tiny model: pretraining and the bootstrap loop on a CPU.

  python launch/tpu.py --config=configs/star_arithmetic_tiny.py --workdir=workdirs/star_tiny

1. `:pretrain` (run first, automatically, into config.init_from when it holds no finished run;
   5.5 minutes on a 2-core CPU): a two-layer byte-level LM learns STaR's addition scratchpad
   (spec/star.md §2.3) on 1- and 2-digit sums, two solved sums of one digit count per document,
   a quarter of them showing the answer after "Target:" (the rationalization hint).
2. STaR (this config, ~2 minutes per iteration): the training pool has 2- and 3-digit sums;
   each query follows one solved sum of its digit count. The pretrained model gets ~15% of
   held-out 2-digit sums right and no 3-digit one. Every iteration fine-tunes the pretrained
   model on the scratchpads it got right and on its rationalizations of the others; see the
   README ("Tiny arithmetic run") for the table.
"""
from configs import common


def model_config():
  """The tiny variant cut to two layers of width 64 (~0.1M parameters): fast enough on a CPU."""
  model = common.model_config("tiny")
  model.update(dict(num_layers=2, embed_dim=64, num_heads=2, num_kv_heads=1, head_dim=32,
                    mlp_dim=192))
  model.scan_unroll = 0  # both layers unrolled: CPU step 0.74x the time (benchmarks/train_step)
  return model


def pretrain_config():
  config = common.base_config()
  config.stage = "pretrain"
  config.model = model_config()
  config.tokenizer = "bytes"
  # Two solved sums of one digit count per document, a quarter of them with the answer shown
  # after "Target:" (the rationalization hint); documents packed with EOS after each.
  scratch = dict(synthetic_format="scratchpad", synthetic_min_digits=1, synthetic_max_digits=2,
                 synthetic_blocks=2, synthetic_hint_fraction=0.25, seq_len=256, mode="pack")
  config.data = common.lm_data_config(synthetic_docs=40000, seed=5, **scratch)
  config.eval_data = common.lm_data_config(synthetic_docs=256, seed=1234, **scratch)
  config.batch_size = 32
  config.num_steps = 1200
  config.log_every = 50
  config.eval_every = 400
  config.checkpoint.save_every = 400
  config.optim = common.optim_config(lr=1e-2, warmup_steps=50, schedule="cosine",
                                     end_lr_factor=0.1, weight_decay=0.01)
  return config


def get_config(arg=None):
  args = common.parse_arg(arg, pretrain=False)
  if args.pretrain:
    return pretrain_config()
  config = common.star_stage_config(
      "arithmetic", num_iterations=6, patience=3, n_train_samples=2048, seq_len=512,
      steps_rule="linear", start_steps=60, add_steps=20, batch_size=64, max_length=1024,
      chunk=256, keep_checkpoints="best")
  config.star.arithmetic.digits = "2-3"
  config.star.arithmetic.pool_per_length = 2000
  config.star.arithmetic.dev_per_length = 256
  config.star.arithmetic.shots = 1
  config.star.arithmetic.exemplar_pool = 20
  config.model = model_config()
  config.tokenizer = "bytes"
  config.init_from = "workdirs/star_arithmetic_tiny_base"
  config.create_init_from = "configs/star_arithmetic_tiny.py:pretrain"
  config.batch_size = 16
  config.log_every = 20
  config.checkpoint.save_every = 100
  config.optim = common.optim_config(lr=5e-4, warmup_steps=10, schedule="constant",
                                     weight_decay=0.0, clip_norm=1.0)
  return config
