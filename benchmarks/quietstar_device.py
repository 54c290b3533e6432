"""Quiet-STaR train step on an accelerator, beside the plain LM step, all in one process.

  python -m benchmarks.quietstar_device [--out results.jsonl --budget_s 400]

Cases (CASES, most wanted first; each prints one JSON line as it finishes and rewrites --out; a
case that would start after --budget_s seconds is skipped, so a time-limited run keeps its work):
  small       the model of benchmarks/quietstar_step (h=256, 4 layers, vocab 4096), fp32,
              batch 4 x 256, A=4, P=2: the plain step, n_ahead = 4, 8, 12, 16 with chunk_positions
              32, and n_ahead = 12 with chunk_positions 256 (one recomputed chunk) and 0 (one pass,
              model remat only);
  mistral_4l  Mistral-7B-v0.1's layer shapes (h=4096, 32/8 heads, ffn 14336) with 4 of its 32
              layers and the 32002-token vocabulary, bf16 matmuls over fp32 weights, batch 8 x 256
              (the paper's run), A=4, P=2: the plain step and n_ahead = 12 with chunk_positions
              32, 128.
Per case: median step time, analytic model FLOPs (benchmarks/quietstar_step's count: matmuls only,
backward = 2x forward, recomputation not counted), achieved TFLOP/s and that rate as a share of
the plain step's on the same model, the compiled step's XLA temp memory and argument memory
(parameters, optimizer state, batch), and the device allocator's running peak.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks import quietstar_step
from jaxstar.model import config as model_config

MISTRAL_4L = dict(model_config.VARIANTS["mistral_7b"], num_layers=4, vocab_size=32002)

CASES = (  # (name, model overrides, dtype, batch, ahead, chunk_positions), most wanted first
    ("small", None, "float32", 4, 0, 0),
    ("small", None, "float32", 4, 12, 32),
    ("mistral_4l", MISTRAL_4L, "bfloat16", 8, 0, 0),
    ("mistral_4l", MISTRAL_4L, "bfloat16", 8, 12, 32),
    ("small", None, "float32", 4, 4, 32),
    ("small", None, "float32", 4, 8, 32),
    ("small", None, "float32", 4, 16, 32),
    ("small", None, "float32", 4, 12, 256),
    ("small", None, "float32", 4, 12, 0),
    ("mistral_4l", MISTRAL_4L, "bfloat16", 8, 12, 128),
)

def _peak_bytes() -> int:
  stats = jax.local_devices()[0].memory_stats() or {}
  return int(stats.get("peak_bytes_in_use", 0))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="")
  parser.add_argument("--budget_s", type=float, default=1e9)
  parser.add_argument("--remat", default="full")
  parser.add_argument("--chunk_remat", default="dots_no_batch")
  parser.add_argument("--only", default="", help="comma-separated indices into CASES")
  args = parser.parse_args()
  start = time.perf_counter()
  device = jax.local_devices()[0]
  head = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
              host=platform.machine(),
              fp32_matmul_tflops=common.matmul_gflops(4096) / 1e3,
              bf16_matmul_tflops=common.matmul_gflops(8192, jnp.bfloat16) / 1e3)
  lines = [head]
  print(json.dumps(head), flush=True)
  plain_rate = {}
  picked = [CASES[int(i)] for i in args.only.split(",")] if args.only else CASES
  for name, model, dtype, batch, ahead, chunk in picked:
    if time.perf_counter() - start > args.budget_s:
      print(json.dumps(dict(skipped=name, ahead=ahead, chunk=chunk)), flush=True)
      continue
    t0 = time.perf_counter()
    run, flops, memory = quietstar_step.build(ahead, args.remat, chunk, args.chunk_remat,
                                              model=model, batch_size=batch,
                                              dtype=dtype)
    compile_s = time.perf_counter() - t0
    seconds = common.time_fn(run, warmup=2, iters=5)
    rate = flops / seconds / 1e12
    if ahead == 0:
      plain_rate[name] = rate
    row = dict(model=name, dtype=dtype, batch=batch, ahead=ahead, chunk=chunk,
               seconds=seconds, compile_s=compile_s, tflop=flops / 1e12, tflops=rate,
               of_plain=rate / plain_rate[name] if name in plain_rate else None,
               temp_mib=memory.temp_size_in_bytes / 2**20,
               args_mib=memory.argument_size_in_bytes / 2**20,
               running_peak_mib=_peak_bytes() / 2**20)
    lines.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
      with open(args.out, "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    del run
  rows = [(r["model"], r["dtype"], r["ahead"] or "plain", r["chunk"] if r["ahead"] else "",
           f"{r['seconds'] * 1e3:.1f}", f"{r['tflop']:.2f}", f"{r['tflops']:.1f}",
           f"{100 * r['of_plain']:.0f}%" if r["ahead"] else "", f"{r['temp_mib']:.0f}",
           f"{r['args_mib']:.0f}", f"{r['compile_s']:.0f}") for r in lines[1:]]
  print(f"# {head['device']} ({head['platform']}), jax {head['jax']}; matmul "
        f"{head['fp32_matmul_tflops']:.0f} TFLOP/s fp32 (4096^3), "
        f"{head['bf16_matmul_tflops']:.0f} TFLOP/s bf16 (8192^3)")
  common.print_table(("model", "dtype", "n_ahead", "chunk", "step ms", "TFLOP/step", "TFLOP/s",
                      "of plain", "XLA temp MiB", "args MiB", "compile s"), rows)


if __name__ == "__main__":
  main()
