"""Quiet-STaR on the tiny model and the synthetic arithmetic corpus: a CPU run of minutes.

  python launch/tpu.py --config=configs/quietstar_tiny.py --workdir=workdirs/quietstar_tiny

Starts from the tiny LM pretrained by `configs/pretrain_tiny.py` in `config.init_from`
(workdirs/pretrain_tiny). Run that first, or add
`--config.create_init_from=configs/pretrain_tiny.py` to have it run (or resumed) there when it is
not finished. `--config.quietstar.original_mode=True` trains the no-thought baseline on the same
data.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant="tiny")
  config = common.base_config()
  config.stage = "quietstar"
  config.model = common.model_config(args.variant)
  config.tokenizer = "bytes"
  config.init_from = "workdirs/pretrain_tiny"   # the pretrained tiny LM
  config.data = common.lm_data_config(seq_len=32, synthetic_docs=20000, seed=7,
                                      synthetic_max_digits=2)
  config.eval_data = common.lm_data_config(seq_len=32, synthetic_docs=512, seed=1234,
                                           synthetic_max_digits=2)
  config.eval_batches = 16              # held-out batches per evaluation
  config.eval_answer_start = "="        # the answer digits follow this token ...
  config.eval_answer_end = "\n"         # ... up to this one
  config.batch_size = 8
  config.num_steps = 200
  config.log_every = 10
  config.eval_every = 50
  config.checkpoint.save_every = 100
  # Paper settings except the policy weight: at 1e6 the REINFORCE term drowns the NLL in
  # every clipped Adam update, and in a few hundred CPU steps that either wrecks the tiny LM
  # (lr >= 1e-4) or leaves the mixing head at ~0 (lr 1e-5); see README "Demo".
  # chunk_positions=0: all 32 positions at once, the passes differentiated as they are, nothing
  # recomputed (memory is no concern at this size).
  config.quietstar = common.quietstar_config(n_ahead=8, n_ahead_talk=4, n_passes=2,
                                             policy_weight=1.0, chunk_positions=0)
  config.optim = common.optim_config(lr=1e-4, warmup_steps=20, weight_decay=0.001,
                                     weight_decay_mask="all_but_bias", clip_norm=1.0)
  return config
