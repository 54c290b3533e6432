"""Dispatch from `config.stage` to the stage's `train_and_evaluate(config, workdir)`, and the
one piece of stage-to-stage orchestration: training `config.init_from` first when asked to.

`config.create_init_from` names a config file (`path/to/config.py` or `path/to/config.py:arg`,
as for the launcher's --config). When it is set and `config.init_from` holds no finished run
of that config, that config is run (or resumed) into `config.init_from` before the stage
starts. Left empty, a missing `init_from` is an error: a mistyped path never silently trains
a new model.
"""
import importlib
import importlib.util
import logging
import os

from jaxstar import checkpoint
from jaxstar.errors import UserError

STAGES = {
    "pretrain": "jaxstar.pretrain",
    "quietstar": "jaxstar.quietstar.trainer",
    "eval": "jaxstar.evals.stage",
    "star": "jaxstar.star.stage",
}


def stage_module(stage: str):
  """The module of `stage` (`STAGES`); raises `UserError` for an unknown stage."""
  if stage not in STAGES:
    raise UserError(f"config.stage={stage!r}; choose one of {sorted(STAGES)}")
  return importlib.import_module(STAGES[stage])


def load_config_file(spec: str):
  """`get_config(arg)` of 'path/to/config.py[:arg]'."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def finished(workdir: str, num_steps: int) -> bool:
  """True when `workdir` holds a checkpoint of step `num_steps`."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return False
  with checkpoint.Checkpointer(ckpt_dir, save_every=0, read_only=True) as ckpt:
    return ckpt.latest_step() == num_steps


def run(config, workdir: str):
  """Runs the stage named by `config.stage` (after `create_init_from`); returns its metrics."""
  module = stage_module(config.stage)
  spec = config.create_init_from
  if spec and not config.get("compile_only"):   # compiling only trains nothing first
    if not config.init_from:
      raise UserError("config.create_init_from is set but config.init_from is empty: name the "
                      "folder to train it into")
    first = load_config_file(spec)
    if not finished(config.init_from, first.num_steps):
      logging.info("config.init_from=%s holds no finished run of %s: running it there first",
                   config.init_from, spec)
      run(first, config.init_from)
  return module.train_and_evaluate(config, workdir)
