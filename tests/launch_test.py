"""The launcher turns user errors into one line naming the problem, with exit status 2."""
import os
import subprocess
import sys

import pytest

from configs import pretrain_tiny
from jaxstar import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "tpu.py")
SMALL = ["--config.batch_size=8", "--config.data.seq_len=16", "--config.eval_every=0",
         "--config.num_steps=1", "--config.data.synthetic_docs=32"]


def _launch(workdir, *flags, env=None):
  cmd = [sys.executable, LAUNCH, "--config=" + os.path.join(ROOT, "configs", "pretrain_tiny.py"),
         f"--workdir={workdir}", *SMALL, *flags]
  env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def _one_line_error(proc):
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxstar: error: ")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return errors[0]


@pytest.mark.parametrize("flags, message", [
    (["--config.optim.lr=abc"], "--config.optim.lr=abc: could not convert string to float"),
    (["--config.init_from=/nonexistent/run"], "config.init_from='/nonexistent/run' is not a "
                                               "folder"),
    (["--config.mesh_shape=(3,1,1)"], r"config.mesh_shape=(3, 1, 1) (dcn_data=1) does not fit "
                                      "the 1 cpu device(s)"),
    (["--config.nonfinite=skipp"], "config.nonfinite='skipp'; choose one of"),
    (["--config.data.source=jsonl", "--config.data.paths={tmp}/empty.jsonl"],
     "{tmp}/empty.jsonl: empty: no rows (config field data.paths)"),
])
def test_user_errors_are_one_line_with_status_2(tmp_path, flags, message):
  (tmp_path / "empty.jsonl").write_text("")
  flags = [f.format(tmp=tmp_path) for f in flags]
  line = _one_line_error(_launch(str(tmp_path / "run"), *flags, env={"XLA_FLAGS": ""}))
  assert message.format(tmp=tmp_path) in line


@pytest.mark.slow
def test_checkpoint_that_does_not_fit_the_model(tmp_path):
  config = pretrain_tiny.get_config()
  config.update_from_flattened_dict({"batch_size": 8, "data.seq_len": 16, "eval_every": 0,
                                     "num_steps": 1, "data.synthetic_docs": 32})
  workdir = str(tmp_path / "run")
  pretrain.train_and_evaluate(config, workdir)
  proc = _launch(workdir, "--config.model.num_layers=2", env={"XLA_FLAGS": ""})
  line = _one_line_error(proc)
  assert "checkpoint steps in" in line and "use the saved config" in line and workdir in line
  shown = _launch(workdir, "--config.model.num_layers=2", "--traceback", env={"XLA_FLAGS": ""})
  assert shown.returncode != 0 and "Traceback" in shown.stderr
