"""`make demo`: tiny pretraining, then Quiet-STaR and the no-thought baseline, then a table.

  python launch/demo.py --workdir=workdirs/demo [--steps=N]

1. pretrain the tiny LM on the synthetic arithmetic corpus (configs/pretrain_tiny.py);
2. continue it with Quiet-STaR (configs/quietstar_tiny.py);
3. continue it for the same number of steps without thoughts (`original_mode`, the paper's
   baseline), on the same data;
4. print the held-out next-token loss on the answer digits (and on all tokens) of both.
Each stage resumes if its directory already holds a checkpoint.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxstar import allocator  # noqa: E402  pylint: disable=g-import-not-at-top

allocator.ensure()  # re-executes under a caching malloc before JAX is imported (once)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Where the three runs go.")
_STEPS = flags.DEFINE_integer("steps", 0, "Quiet-STaR / baseline steps (0: the config's).")


def main(argv):
  del argv
  from configs import pretrain_tiny  # pylint: disable=g-import-not-at-top
  from configs import quietstar_tiny  # pylint: disable=g-import-not-at-top
  from jaxstar import stages  # pylint: disable=g-import-not-at-top

  pretrained = os.path.join(_WORKDIR.value, "pretrain")
  if not stages.finished(pretrained, pretrain_tiny.get_config().num_steps):
    stages.run(pretrain_tiny.get_config(), pretrained)

  def config(original_mode: bool):
    c = quietstar_tiny.get_config()
    c.init_from = pretrained
    c.quietstar.original_mode = original_mode
    if _STEPS.value:
      c.num_steps = _STEPS.value
    c.eval_every = c.num_steps
    return c

  thought = stages.run(config(False), os.path.join(_WORKDIR.value, "quietstar"))
  baseline = stages.run(config(True), os.path.join(_WORKDIR.value, "baseline"))
  steps = config(False).num_steps
  rows = [
      ("baseline, no thoughts (original_mode)", baseline["eval_answer_loss_base"],
       baseline["eval_loss_base"]),
      ("Quiet-STaR, base head (no thought)", thought["eval_answer_loss_base"],
       thought["eval_loss_base"]),
      ("Quiet-STaR, with thoughts (mixed)", thought["eval_answer_loss_thought"],
       thought["eval_loss_thought"]),
  ]
  print(f"\nHeld-out next-token loss (nats) after {steps} steps from the same pretrained "
        f"tiny LM, same data:")
  width = max(len(r[0]) for r in rows)
  print(f"| {'model':<{width}} | answer digits | all tokens |")
  print(f"|{'-' * (width + 2)}|---------------|------------|")
  for name, answer, everything in rows:
    print(f"| {name:<{width}} | {answer:13.4f} | {everything:10.4f} |")
  gain = baseline["eval_answer_loss_base"] - thought["eval_answer_loss_thought"]
  print(f"\nthoughts vs baseline on answer digits: {gain:+.4f} nats "
        f"({'thoughts better' if gain > 0 else 'thoughts not better'})")


if __name__ == "__main__":
  app.run(main)
