"""Compile-only runs: a stage's train step lowered and compiled on its mesh, never run.

  python launch/tpu.py --config=configs/quietstar_7b.py --compile_only --num_devices=32

With `config.compile_only` (the launcher's --compile_only) a stage builds its model, optimizer,
shardings and train step exactly as for training, from abstract shapes only (no data is read,
no weights are loaded or allocated, nothing is written), then `Run.jit_train_step` compiles the
step for a batch of the configured shape and prints `report`: XLA's per-device memory analysis
(arguments, outputs, temporaries, total) and the analytic model FLOPs per step, with what those
mean as tokens/s per chip on TPU generations at a stated MFU. --num_devices=N emulates N CPU
devices; XLA:CPU's buffer assignment then stands in for the accelerator's, so the memory is an
estimate of what a TPU of that mesh would hold (its fusion and layout choices differ).
"""
from __future__ import annotations

import dataclasses
import time

from jaxstar import flops as flops_lib
from jaxstar import model as model_lib

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation: its name, peak dense bf16 TFLOP/s and HBM per chip."""
  name: str
  bf16_tflops: float  # peak dense bf16 matmul TFLOP/s per chip
  hbm_gib: float


# Public per-chip figures of Cloud TPU generations.
CHIPS = (Chip("v4", 275, 32), Chip("v5e", 197, 16), Chip("v5p", 459, 95), Chip("v6e", 918, 32))
MFU = 0.4  # the utilization the tokens/s column assumes


class CompiledOnly(SystemExit):
  """Raised once a compile-only run has printed its report: exits the process with status 0.
  `report` is the printed text, `memory` XLA's per-device sizes in bytes."""

  def __init__(self, report: str, memory: dict[str, int]):
    super().__init__(0)
    self.report, self.memory = report, memory


def memory_bytes(compiled) -> dict[str, int]:
  """XLA's per-device memory analysis of `compiled`: arguments, outputs, aliased, temporaries
  and total (arguments + outputs - aliased + temporaries), in bytes."""
  mem = compiled.memory_analysis()
  out = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
             aliased=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes)
  out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return {k: int(v) for k, v in out.items()}


def step_flops(config, model_cfg) -> tuple[float, int]:
  """(model FLOPs of one optimizer step, tokens per step) of `config`'s stage."""
  seq_len = config.star.seq_len if config.stage == "star" else config.data.seq_len
  tokens = config.batch_size * seq_len
  if config.stage == "quietstar" and not config.quietstar.original_mode:
    qs = config.quietstar
    return flops_lib.quietstar_step_flops(model_cfg, config.batch_size, seq_len, qs.n_ahead,
                                          qs.n_ahead_talk, qs.n_passes), tokens
  return flops_lib.lm_step_flops(model_cfg, config.batch_size, seq_len), tokens


def compile_step(jitted, abstract_args) -> tuple[object, float]:
  """(compiled executable, seconds to lower and compile) of `jitted` at `abstract_args`."""
  start = time.perf_counter()
  compiled = jitted.lower(*abstract_args).compile()
  return compiled, time.perf_counter() - start


def report(config, model_cfg, mesh, mem: dict[str, int], compile_s: float,
           batch_shapes: dict) -> str:
  """The compile-only table from `memory_bytes`' figures: per-device memory and FLOPs, and what
  fits where."""
  total = mem["total"]
  n_dev = mesh.devices.size
  flops, tokens = step_flops(config, model_cfg)
  per_token = flops / tokens
  params = model_lib.count_params(model_cfg)
  platform = mesh.devices.flat[0].platform
  shapes = ", ".join(f"{k} {tuple(v)}" for k, v in sorted(batch_shapes.items()))
  lines = [
      f"# compile-only: stage {config.stage}, model {config.model.variant} "
      f"({params:,} parameters, dtype {model_cfg.dtype}, params {model_cfg.param_dtype}, "
      f"remat {model_cfg.remat_policy}), mesh {dict(mesh.shape)} over {n_dev} {platform} "
      f"device(s), batch {shapes}, grad_accum {config.optim.grad_accum}; "
      f"lowered and compiled in {compile_s:.0f} s",
      "| per device | GiB | bytes |",
      "|---|---|---|",
      *(f"| {label} | {mem[key] / GIB:.2f} | {mem[key]:,} |" for key, label in (
          ("arguments", "arguments (parameters, optimizer state, batch)"),
          ("outputs", "outputs"),
          ("aliased", "of which aliased with donated arguments"),
          ("temporaries", "temporaries"),
          ("total", "total (arguments + outputs - aliased + temporaries)"))),
      "",
      f"model FLOPs per step: {flops:.4g} ({per_token / 1e9:.3g} GFLOP per token, "
      f"{tokens} tokens per step; matmuls only, backward = 2x forward)",
      "| chip | bf16 peak TFLOP/s | HBM GiB | fits (total above) | "
      f"tokens/s per chip at {MFU:.0%} MFU | step s on {n_dev} chips |",
      "|---|---|---|---|---|---|",
  ]
  for chip in CHIPS:
    rate = MFU * chip.bf16_tflops * 1e12 / per_token
    fits = "yes" if total <= 0.9 * chip.hbm_gib * GIB else "no"
    lines.append(f"| {chip.name} | {chip.bf16_tflops:.0f} | {chip.hbm_gib:.0f} | {fits} | "
                 f"{rate:,.0f} | {tokens / (rate * n_dev):.2f} |")
  lines.append('("fits": under 90% of HBM. The memory is XLA\'s analysis of this compilation; '
               "on emulated CPU devices it estimates an accelerator's.)")
  return "\n".join(lines)
