"""Pretrain the tiny model on the synthetic arithmetic corpus: a CPU run of a few minutes.

  python launch/tpu.py --config=configs/pretrain_tiny.py --workdir=workdirs/pretrain_tiny

The loss falls from ~6.2 (uniform over the 512-way vocabulary) to far below the unigram entropy
of the corpus (logged at start as `unigram_entropy`). Its checkpoint is what
`configs/quietstar_tiny.py` starts from.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant="tiny")
  config = common.base_config()
  config.stage = "pretrain"
  config.model = common.model_config(args.variant)
  config.model.scan_unroll = 0  # all layers unrolled: CPU step 0.88x the time (train_step.py)
  config.tokenizer = "bytes"
  config.data = common.lm_data_config(seq_len=96, synthetic_docs=20000, synthetic_max_digits=2)
  config.eval_data = common.lm_data_config(seq_len=96, synthetic_docs=256, seed=1234,
                                           synthetic_max_digits=2)
  config.batch_size = 32
  config.num_steps = 400
  config.log_every = 20
  config.eval_every = 100
  config.checkpoint.save_every = 200
  config.optim = common.optim_config(lr=3e-3, warmup_steps=40, schedule="cosine",
                                     end_lr_factor=0.1, weight_decay=0.01)
  return config
