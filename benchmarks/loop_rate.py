"""Train-loop rate of the launcher on emulated CPU devices, one process or two.

  python -m benchmarks.loop_rate [--processes 1,2 --steps 120 --log_every 40 --root DIR]

Runs `launch/tpu.py` with `configs/pretrain_tiny.py` (batch 8 x 32 tokens, no evals, one
checkpoint at the end) as 1 process with 8 emulated CPU devices, or as 2 processes with 4 each
(coordinator on localhost), and reads the steps per second of each logged window from
`metrics.jsonl`. The first window (compilation) is left out. `--root` runs another checkout's
launcher (e.g. a `git worktree` of an older commit), for before/after figures in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ = 8, 32


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run(root: str, processes: int, steps: int, log_every: int) -> list[float]:
  """Steps/s of each logged window after the first, of one launch."""
  workdir = tempfile.mkdtemp(prefix="loop_rate_")
  cmd = [sys.executable, os.path.join(root, "launch", "tpu.py"),
         "--config=" + os.path.join(root, "configs", "pretrain_tiny.py"), f"--workdir={workdir}",
         f"--config.batch_size={BATCH}", f"--config.data.seq_len={SEQ}", "--config.eval_every=0",
         f"--config.num_steps={steps}", f"--config.log_every={log_every}",
         f"--config.checkpoint.save_every={steps}", f"--cpu_devices={8 // processes}"]
  env = dict(os.environ, PYTHONPATH=root, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  if processes > 1:
    port = _free_port()
    cmd += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}"]
  procs = [subprocess.Popen(cmd + ([f"--process_id={i}"] if processes > 1 else []), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(processes)]
  for p in procs:
    out = p.communicate(timeout=1800)[0]
    if p.returncode:
      raise RuntimeError(f"launch failed ({p.returncode}):\n{out[-3000:]}")
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  rates = [r["tokens_per_s"] / (BATCH * SEQ) for r in rows if "tokens_per_s" in r]
  return rates[1:]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--processes", default="1,2")
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--log_every", type=int, default=40)
  parser.add_argument("--root", default=ROOT, help="checkout whose launcher to run")
  args = parser.parse_args()
  print(f"# {args.root}: pretrain_tiny, batch {BATCH} x {SEQ}, {args.steps} steps, "
        f"log every {args.log_every} (first window left out)")
  print("| processes | devices each | steps/s per window | median steps/s |")
  print("|---|---|---|---|")
  for processes in (int(p) for p in args.processes.split(",")):
    rates = run(args.root, processes, args.steps, args.log_every)
    print(f"| {processes} | {8 // processes} | {' / '.join(f'{r:.1f}' for r in rates)} | "
          f"{np.median(rates):.1f} |", flush=True)


if __name__ == "__main__":
  main()
