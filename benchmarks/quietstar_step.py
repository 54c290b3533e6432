"""Quiet-STaR train-step speed and memory against thought length, beside the plain LM step.

  python -m benchmarks.quietstar_step [--ahead 4,8,12,16 --remat full --chunk 32
                                       --chunk_remat dots_no_batch]

Model: h=256, 4 layers, 8 query / 4 kv heads, ffn 512, vocab 4096; batch 4 x L=256, A=4
talk tokens, P=2 thoughts per position, against n_ahead (T = n_ahead - 3 sampled tokens). Each
case runs in its own process. Memory, per case:
  XLA temp     the compiled step's temporary buffers (what an accelerator would hold beyond
               parameters, optimizer state and batch);
  step RSS     peak resident memory of the process while it runs the step: the high-water mark
               is reset after compilation, once the compiler's freed heap is handed back;
  peak RSS     ru_maxrss over the whole process, compilation included.
Model FLOPs are analytic (matmuls only, backward = 2x forward, recomputation not counted). Each
case's rate is compared with the plain LM step timed in turns with it in the same process
("plain GFLOP/s"); the plain step's own memory comes from a process of its own.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import subprocess
import sys

import numpy as np

B, L, TALK, P = 4, 256, 4, 2
MODEL = dict(vocab_size=4096, embed_dim=256, num_layers=4, num_heads=8, num_kv_heads=4,
             head_dim=32, mlp_dim=512)


def _status_mib(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  raise KeyError(field)


def _reset_peak_rss() -> None:
  """Returns freed heap to the OS, then restarts the high-water mark (VmHWM, and with it
  ru_maxrss) at the current RSS."""
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def build(ahead: int, remat: str, chunk: int, chunk_remat: str, model: dict | None = None,
          batch_size: int = B, dtype: str = "float32"):
  """A compiled train step; ahead == 0 is the plain LM step. `model` overrides MODEL's fields.
  Returns (run, flops, compiled.memory_analysis())."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxstar import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from jaxstar import model as model_lib  # pylint: disable=g-import-not-at-top
  from jaxstar import train_lib  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import config as qs_config  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import loss as qs_loss  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import thoughts  # pylint: disable=g-import-not-at-top

  cfg = model_lib.ModelConfig(**{**MODEL, **(model or {})}, remat_policy=remat, dtype=dtype)
  optimizer = train_lib.make_optimizer(train_lib.OptimConfig(lr=1e-4, clip_norm=1.0), 100)
  tokens = jax.random.randint(jax.random.key(1), (batch_size, L), 3, cfg.vocab_size - 2)
  batch = {"tokens": tokens, "mask": jnp.ones_like(tokens)}
  if ahead == 0:
    module = model_lib.Transformer(cfg)
    params = module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]

    def loss_fn(p, b, rng):
      del rng
      logits = module.apply({"params": p}, b["tokens"])
      return train_lib.next_token_loss(logits, b["tokens"], b["mask"])[0], {}
    flops = flops_lib.lm_step_flops(cfg, batch_size, L)
  else:
    qs = qs_config.QuietStarConfig(n_ahead=ahead, n_ahead_talk=TALK, n_passes=P,
                                   chunk_positions=chunk, chunk_remat=chunk_remat)
    model = thoughts.QuietStarModel(cfg, qs, start_id=cfg.vocab_size - 2,
                                    end_id=cfg.vocab_size - 1, init_id=5)
    params = model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                        method=thoughts.QuietStarModel.init_all)["params"]

    def loss_fn(p, b, rng):
      out = model.apply({"params": p}, b["tokens"], b["mask"], rng)
      return qs_loss.quietstar_loss(out, b["mask"], qs)
    flops = flops_lib.quietstar_step_flops(cfg, batch_size, L, ahead, TALK, P)
  state = train_lib.init_train_state(nn.unbox(params), optimizer, 0)
  step = jax.jit(train_lib.make_train_step(loss_fn, optimizer), donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics["loss"]
  return run, flops, compiled.memory_analysis()


def run_case(ahead: int, remat: str, chunk: int, chunk_remat: str, model: dict | None = None
             ) -> dict:
  """One case in this process: memory first, then times interleaved with the plain step.

  The step's own memory is measured before anything else is compiled. Then, for ahead > 0, the
  plain LM step is compiled in the same process and the two are timed in turns (plain, case,
  plain, case), so a slow spell of this shared machine hits both alike.
  """
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  run, flops, memory = build(ahead, remat, chunk, chunk_remat, model)
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the reset below
  _reset_peak_rss()
  times = [common.time_fn(run, warmup=1, iters=3)]
  step_rss = _status_mib("VmHWM") * 2**20
  out = dict(ahead=ahead, flops=flops, temp_bytes=int(memory.temp_size_in_bytes),
             step_rss=step_rss, peak_rss=max(peak_rss, step_rss))
  if ahead:
    plain_run, plain_flops_, _ = build(0, remat, chunk, chunk_remat, model)
    plain_times = []
    for _ in range(2):
      plain_times.append(common.time_fn(plain_run, warmup=1, iters=5))
      times.append(common.time_fn(run, warmup=0, iters=3))
    out.update(plain_seconds=float(np.median(plain_times)), plain_flops=plain_flops_)
  out["seconds"] = float(np.median(times))
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--ahead", default="4,8,12,16")
  parser.add_argument("--remat", default="full")
  parser.add_argument("--chunk", type=int, default=32, help="quietstar.chunk_positions")
  parser.add_argument("--chunk_remat", default="dots_no_batch", help="quietstar.chunk_remat")
  parser.add_argument("--model", default="", help="MODEL overrides, e.g. scan_unroll=4")
  parser.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  if args.single is not None:
    print(json.dumps(run_case(args.single, args.remat, args.chunk, args.chunk_remat,
                              common.parse_overrides(args.model))))
    return

  def spawn(ahead):
    out = subprocess.run([sys.executable, "-m", "benchmarks.quietstar_step", "--single",
                          str(ahead), "--remat", args.remat, "--chunk", str(args.chunk),
                          "--chunk_remat", args.chunk_remat, "--model", args.model],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])

  peak = common.matmul_gflops()
  plain = spawn(0)
  plain_rate = plain["flops"] / plain["seconds"] / 1e9
  cases = [spawn(int(a)) for a in args.ahead.split(",")]
  print(f"# Quiet-STaR step: {MODEL}, overrides {args.model or 'none'}, batch {B} x {L}, "
        f"A={TALK}, P={P}, remat {args.remat}, "
        f"chunk_positions {args.chunk}, chunk_remat {args.chunk_remat}; "
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores")
  print(f"# plain 2048x2048 fp32 matmul: {peak:.1f} GFLOP/s; plain LM train step: "
        f"{plain['seconds'] * 1e3:.0f} ms, {plain_rate:.1f} GFLOP/s, "
        f"XLA temp {plain['temp_bytes'] / 2**20:.0f} MiB, step RSS {plain['step_rss'] / 2**20:.0f} "
        f"MiB, peak RSS {plain['peak_rss'] / 2**20:.0f} MiB")
  rows = []
  for c in cases:
    rate = c["flops"] / c["seconds"] / 1e9
    beside = c["plain_flops"] / c["plain_seconds"] / 1e9
    rows.append((c["ahead"], c["ahead"] - 3, f"{c['seconds']:.2f}", f"{c['flops'] / 1e9:.0f}",
                 f"{rate:.1f}", f"{beside:.1f}", f"{100 * rate / beside:.0f}%",
                 f"{c['temp_bytes'] / 2**20:.0f}", f"{c['step_rss'] / 2**20:.0f}",
                 f"{c['peak_rss'] / 2**20:.0f}"))
  common.print_table(("n_ahead", "sampled", "step s", "GFLOP/step", "GFLOP/s",
                      "plain GFLOP/s", "of plain step", "XLA temp MiB", "step RSS MiB",
                      "peak RSS MiB"), rows)
  a = np.array([c["ahead"] for c in cases], float)
  for key, name in (("temp_bytes", "XLA temp"), ("step_rss", "step RSS"),
                    ("peak_rss", "peak RSS")):
    y = np.array([c[key] for c in cases], float) / 2**20
    slope, intercept = np.polyfit(a, y, 1)
    quad = np.polyfit(a, y, 2)[0] if len(a) > 2 else 0.0
    resid = np.max(np.abs(np.polyval([slope, intercept], a) - y))
    print(f"# {name} vs n_ahead: linear fit {intercept:.0f} + {slope:.1f} * n_ahead MiB "
          f"(max residual {resid:.1f} MiB; quadratic coefficient {quad:.2f} MiB/n_ahead^2)")


if __name__ == "__main__":
  main()
