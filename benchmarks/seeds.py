"""The tiny demos over several seeds: Quiet-STaR's gain and STaR's accuracy per iteration.

  python -m benchmarks.seeds [--seeds 0,1,2,3,4 --digits 2 --workdir workdirs/seeds]
  python -m benchmarks.seeds --method star [--seeds 0,1,2 --iterations 3]

For each seed, what `make demo` does with `config.seed` set to it (parameter init, the thought
samples and the train-state RNG of all three runs; the data are the same): pretrain the tiny
LM (`configs/pretrain_tiny.py`), continue it with Quiet-STaR (`configs/quietstar_tiny.py`) and,
separately, without thoughts (`original_mode`), then compare the held-out next-token loss on
the answer digits. `--digits 3` makes the task harder (sums of up to 3-digit numbers instead of
2), where a hidden step has more to do. Prints one row per seed and the mean +- sample standard
deviation of each column; the gain is baseline minus mixed loss (positive: thoughts help).
Each run resumes from its directory, so an interrupted sweep continues where it stopped.

`--method star`: `configs/star_arithmetic_tiny.py` (its base model pretrained first, then
`--iterations` STaR iterations) with `config.seed` set to each seed in both (parameter init,
the training draws of every iteration, fine-tuning); prints the held-out accuracy of each
iteration (0: the base model) per seed, overall and on 2-digit sums, and mean +- std.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxstar import allocator  # noqa: E402  pylint: disable=g-import-not-at-top

allocator.ensure()


def configs(seed: int, digits: int, workdir: str):
  """The three configs of one seed: pretraining, Quiet-STaR and the no-thought baseline."""
  from configs import pretrain_tiny  # pylint: disable=g-import-not-at-top
  from configs import quietstar_tiny  # pylint: disable=g-import-not-at-top
  pre = pretrain_tiny.get_config()
  pre.seed = seed
  pre.data.synthetic_max_digits = pre.eval_data.synthetic_max_digits = digits
  out = [pre]
  for original in (False, True):
    c = quietstar_tiny.get_config()
    c.seed = seed
    c.data.synthetic_max_digits = c.eval_data.synthetic_max_digits = digits
    c.init_from = os.path.join(workdir, "pretrain")
    c.quietstar.original_mode = original
    c.eval_every = c.num_steps
    out.append(c)
  return out


def run_seed(seed: int, digits: int, root: str) -> dict:
  from jaxstar import stages  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(root, f"digits{digits}_seed{seed}")
  pre, thought_cfg, base_cfg = configs(seed, digits, workdir)
  start = time.perf_counter()
  if not stages.finished(thought_cfg.init_from, pre.num_steps):
    stages.run(pre, thought_cfg.init_from)
  thought = stages.run(thought_cfg, os.path.join(workdir, "quietstar"))
  baseline = stages.run(base_cfg, os.path.join(workdir, "baseline"))
  return dict(seed=seed, baseline=baseline["eval_answer_loss_base"],
              base_head=thought["eval_answer_loss_base"],
              mixed=thought["eval_answer_loss_thought"],
              gain=baseline["eval_answer_loss_base"] - thought["eval_answer_loss_thought"],
              seconds=time.perf_counter() - start)


def run_star_seed(seed: int, iterations: int, root: str) -> list[tuple[float, float]]:
  """(dev accuracy, 2-digit dev accuracy) of the base model and of each STaR iteration."""
  from configs import star_arithmetic_tiny  # pylint: disable=g-import-not-at-top
  from jaxstar import stages  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(root, f"star_seed{seed}")
  pre = star_arithmetic_tiny.get_config("pretrain")
  pre.seed = seed
  config = star_arithmetic_tiny.get_config()
  config.seed = seed
  config.init_from, config.create_init_from = os.path.join(workdir, "base"), ""
  config.star.num_iterations, config.star.patience = iterations, 0
  if not stages.finished(config.init_from, pre.num_steps):
    stages.run(pre, config.init_from)
  progress = stages.run(config, os.path.join(workdir, "star"))
  records = [progress["base"]] + [progress["iterations"][str(n)]["dev"]
                                  for n in range(1, iterations + 1)]
  return [(r["accuracy"], r["by_group"].get("2 digits", float("nan"))) for r in records]


def star_main(args):
  seeds = [int(s) for s in args.seeds.split(",")]
  runs = {}
  for seed in seeds:
    runs[seed] = run_star_seed(seed, args.iterations, args.workdir)
    print(f"# seed {seed}: {runs[seed]}", flush=True)
  n = args.iterations + 1
  print(f"\n# tiny STaR on scratchpad addition (star_arithmetic_tiny), seeds {args.seeds}; "
        f"greedy dev accuracy, all / 2-digit sums; {platform.processor() or platform.machine()}"
        f", {os.cpu_count()} cores")
  print("| seed | " + " | ".join(["base"] + [f"iteration {i}" for i in range(1, n)]) + " |")
  print("|---" * (n + 1) + "|")
  for seed, accs in runs.items():
    print(f"| {seed} | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in accs) + " |")
  if len(runs) > 1:
    cells = []
    for i in range(n):
      a = [runs[s][i][0] for s in seeds]
      b = [runs[s][i][1] for s in seeds]
      cells.append(f"{statistics.mean(a):.3f} +- {statistics.stdev(a):.3f} / "
                   f"{statistics.mean(b):.3f} +- {statistics.stdev(b):.3f}")
    print("| mean +- std | " + " | ".join(cells) + " |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--method", default="quietstar", choices=("quietstar", "star"))
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--digits", type=int, default=2)
  parser.add_argument("--iterations", type=int, default=3, help="STaR iterations per seed")
  parser.add_argument("--workdir", default="workdirs/seeds")
  args = parser.parse_args()
  if args.method == "star":
    star_main(args)
    return
  rows = []
  for seed in (int(s) for s in args.seeds.split(",")):
    rows.append(run_seed(seed, args.digits, args.workdir))
    print(f"# seed {seed}: {rows[-1]}", flush=True)
  cols = ("baseline", "base_head", "mixed", "gain")
  print(f"\n# tiny Quiet-STaR demo, sums of up to {args.digits} digits, seeds {args.seeds}; "
        f"held-out answer-digit loss (nats); {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores")
  print("| seed | baseline (no thoughts) | Quiet-STaR base head | Quiet-STaR mixed | gain |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['seed']} | " + " | ".join(f"{r[c]:.4f}" for c in cols[:3])
          + f" | {r['gain']:+.4f} |")
  if len(rows) > 1:
    cells = [f"{statistics.mean(r[c] for r in rows):.4f} +- "
             f"{statistics.stdev(r[c] for r in rows):.4f}" for c in cols]
    print("| mean +- std | " + " | ".join(cells) + " |")
  wins = sum(r["gain"] > 0 for r in rows)
  print(f"\nthoughts better in {wins} of {len(rows)} seeds; "
        f"{sum(r['seconds'] for r in rows) / 60:.1f} minutes in all")


if __name__ == "__main__":
  main()
