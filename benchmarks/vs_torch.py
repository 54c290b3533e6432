"""The plain LM train step, jaxstar against Hugging Face `transformers` in torch, same weights.

  python -m benchmarks.vs_torch [--allocators as_is,auto --steps 10 --warmup 8 --rounds 3]

Model: the `benchmarks/quietstar_step` model (h=256, 4 layers, 8 query / 4 kv heads, ffn 512,
vocab 4096), batch 4 x 256, fp32, AdamW (lr 1e-4) with global-norm clipping at 1. jaxstar's
params are exported with `hf_io.save_hf` and loaded into a `MistralForCausalLM`, so both steps
start from identical weights (their first losses are printed side by side).

Each allocator setting runs in a process of its own (LD_PRELOAD takes effect at process start),
where both steps are warmed up (`--warmup` steps each: torch keeps speeding up for a few) and
then timed in turns, `--rounds` x `--steps` steps each; the table gives the median step time of
each and their ratio. `as_is` is glibc's malloc untouched; the other names are
`JAXSTAR_ALLOCATOR` settings (`jaxstar/allocator.py`): auto, glibc, tcmalloc, jemalloc,
mimalloc.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, L = 4, 256


def child(args) -> dict:
  """Times both steps in this process; returns the medians (ms) and first losses."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from benchmarks import quietstar_step  # pylint: disable=g-import-not-at-top
  from jaxstar import model as model_lib  # pylint: disable=g-import-not-at-top
  from jaxstar import train_lib  # pylint: disable=g-import-not-at-top
  from jaxstar.model import hf_io  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count() or 1)
  cfg = model_lib.ModelConfig(**quietstar_step.MODEL, **dict(args.model_overrides))
  module = model_lib.Transformer(cfg)
  tokens_np = np.random.default_rng(0).integers(3, cfg.vocab_size - 2, (B, L)).astype(np.int32)
  params = module.init(jax.random.key(0), jnp.asarray(tokens_np))["params"]
  params = nn.unbox(jax.device_get(params))

  # jaxstar
  optim = train_lib.OptimConfig(lr=1e-4, clip_norm=1.0)
  optimizer = train_lib.make_optimizer(optim, 1000)

  def loss_fn(p, batch, rng):
    del rng
    logits = module.apply({"params": p}, batch["tokens"])
    return train_lib.next_token_loss(logits, batch["tokens"], batch["mask"])[0], {}
  step = jax.jit(train_lib.make_train_step(loss_fn, optimizer), donate_argnums=0)
  state = train_lib.init_train_state(params, optimizer, 0)
  batch = {"tokens": jnp.asarray(tokens_np), "mask": jnp.ones((B, L), jnp.int32)}
  jax_losses = []

  def jax_step():
    nonlocal state
    state, metrics = step(state, batch)
    jax_losses.append(metrics["loss"])
    jax.block_until_ready(state.params)

  # transformers, from the same weights
  with tempfile.TemporaryDirectory() as folder:
    hf_io.save_hf(params, cfg, folder)
    hf = transformers.MistralForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                        attn_implementation="sdpa")
  hf.train()
  torch_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.0)
  tokens_t = torch.from_numpy(tokens_np.astype(np.int64))
  torch_losses = []

  def torch_step():
    out = hf(input_ids=tokens_t, labels=tokens_t)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    torch_opt.step()
    torch_opt.zero_grad(set_to_none=True)
    torch_losses.append(float(out.loss))

  def timed(fn, n):
    times = []
    for _ in range(n):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return times

  for _ in range(args.warmup):
    jax_step()
    torch_step()
  jax_times, torch_times = [], []
  for _ in range(args.rounds):
    jax_times += timed(jax_step, args.steps)
    torch_times += timed(torch_step, args.steps)
  from jaxstar import allocator  # pylint: disable=g-import-not-at-top
  return dict(jax_ms=1e3 * float(np.median(jax_times)),
              torch_ms=1e3 * float(np.median(torch_times)),
              jax_loss0=float(jax_losses[0]), torch_loss0=torch_losses[0],
              malloc=allocator.describe())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--allocators", default="as_is,auto")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--model", default="", help="ModelConfig overrides, e.g. scan_unroll=4")
  parser.add_argument("--xla_flags", default="", help="XLA_FLAGS of the timed processes")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  args.model_overrides = common.parse_overrides(args.model)
  if args.child:
    print("RESULT " + json.dumps(child(args)), flush=True)
    return
  from jaxstar import allocator  # pylint: disable=g-import-not-at-top
  print(f"# {platform.machine()} CPU, {os.cpu_count()} cores; model overrides "
        f"{args.model or 'none'}; XLA_FLAGS {args.xla_flags or 'none'}; {args.warmup} warm-up "
        f"steps, then {args.rounds} x {args.steps} steps each in turns")
  rows = []
  for name in args.allocators.split(","):
    env = dict(allocator.clean_environment(), PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    if name == "as_is":
      env[allocator.ENV] = "off"
    else:
      env = allocator.environment(*allocator.choose(name), base=env)
    env["XLA_FLAGS"] = args.xla_flags
    cmd = [sys.executable, "-m", "benchmarks.vs_torch", "--child", f"--steps={args.steps}",
           f"--warmup={args.warmup}", f"--rounds={args.rounds}", f"--model={args.model}"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not lines:
      print(f"# {name}: failed\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
      continue
    r = json.loads(lines[-1][len("RESULT "):])
    rows.append((name, r["malloc"], f"{r['jax_ms']:.0f}", f"{r['torch_ms']:.0f}",
                 f"{r['torch_ms'] / r['jax_ms']:.2f}x",
                 f"{r['jax_loss0']:.4f} / {r['torch_loss0']:.4f}"))
    print(f"# {name}: {json.dumps(r)}", flush=True)
  common.print_table(("allocator", "malloc in the process", "jaxstar ms", "torch ms",
                      "jaxstar speed vs torch", "first loss jaxstar / torch"), rows)


if __name__ == "__main__":
  main()
