"""Dispatch from `config.stage` to the stage's `train_and_evaluate(config, workdir)`."""
import importlib

STAGES = {
    "pretrain": "jaxstar.pretrain",
    "quietstar": "jaxstar.quietstar.trainer",
}


def run(config, workdir: str):
  """Runs the stage named by `config.stage`; returns its final metrics."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}; choose one of {sorted(STAGES)}")
  return importlib.import_module(STAGES[config.stage]).train_and_evaluate(config, workdir)
