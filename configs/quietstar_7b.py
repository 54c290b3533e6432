"""Quiet-STaR on Mistral-7B-v0.1 with the paper's hyper-parameters (spec/quietstar.md §4).

  python launch/tpu.py --config=configs/quietstar_7b.py --workdir=gs://BUCKET/quietstar_7b \\
      --config.init_from=/path/to/Mistral-7B-v0.1

Run the same command on every host of the slice. `init_from` is a Hugging Face Mistral folder
(config.json + safetensors); the vocabulary grows from 32000 to 32002 for the thought tokens.
OpenWebMath (first 1000 documents, as the official run) comes from Hugging Face datasets
(`pip install datasets`; or point data.paths at a local copy). The mesh is for 32 chips (v4-64,
v5p-64 or v5e-32; v4 and v5p names count two cores per chip): FSDP over 8, tensor parallel
over 4; adjust mesh_shape to yours. `--compile_only --num_devices=N` prints what each device
holds (README, "The 7B plan").
"""
from configs import common


def get_config(arg=None):
  del arg
  config = common.base_config()
  config.stage = "quietstar"
  config.model = common.model_config("mistral_7b")
  config.model.vocab_size = 32002       # + <|startthought|>, <|endthought|>
  config.model.dtype = "bfloat16"       # bf16 matmuls, fp32 master weights (a deliberate
  config.model.remat_policy = "full"    # deviation from the official pure-bf16 run, §6.4)
  config.tokenizer = "mistral"
  config.init_from = ""                 # REQUIRED: a Hugging Face Mistral-7B-v0.1 folder
  config.require_init_from = True       # refuse to start from random weights
  config.data = common.lm_data_config(
      source="hf", paths="open-web-math/open-web-math", hf_split="train", max_docs=1000,
      seq_len=256, mode="crop_pad", seed=42)
  # Held-out loss with and without thoughts on the OpenWebMath documents after the first 1000.
  # (The paper's GSM8K / CommonsenseQA answer-probability evals belong to the evals stage.)
  config.eval_data = common.lm_data_config(
      source="hf", paths="open-web-math/open-web-math", hf_split="train", skip_docs=1000,
      max_docs=64, seq_len=256, mode="crop_pad", seed=1234)
  config.eval_batches = 8
  config.eval_answer_start = "="        # answer-token loss: tokens after '=' up to a newline
  config.eval_answer_end = "\n"
  config.batch_size = 8                 # documents per optimizer step (x n_passes rows)
  config.num_steps = 100
  config.log_every = 1
  config.eval_every = 10               # held-out loss (eval_data); 0: never
  config.checkpoint.save_every = 100
  config.mesh_shape = (1, 8, 4)         # ('data', 'fsdp', 'tensor') = 32 devices
  config.quietstar = common.quietstar_config(n_ahead=12, n_ahead_talk=4, n_passes=2)
  config.optim = common.optim_config(
      lr=1e-6, warmup_steps=20, schedule="linear", decay_steps=100000, weight_decay=0.001,
      weight_decay_mask="all_but_bias", clip_norm=1.0, grad_accum=2)
  return config
