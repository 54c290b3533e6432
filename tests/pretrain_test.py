"""The pretrain stage end to end: exact resume, SIGTERM preemption, two processes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import pretrain_tiny
from jaxstar import checkpoint
from jaxstar import model as model_lib
from jaxstar import pretrain
from jaxstar import run_lib
from jaxstar import sharding
from jaxstar import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "tpu.py")


def config(**overrides):
  """`configs/pretrain_tiny.py` shrunk to a few seconds' run (also used by run_lib_test)."""
  c = pretrain_tiny.get_config()
  c.update_from_flattened_dict({
      "num_steps": 6, "batch_size": 8, "data.seq_len": 32, "eval_data.seq_len": 32,
      "eval_batches": 1, "log_every": 1, "eval_every": 0, "checkpoint.save_every": 100,
      "data.synthetic_docs": 200, **overrides})
  return c


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _final_params(config, workdir):
  cfg = run_lib.model_config_from(config, tokenizer.get_tokenizer(config.tokenizer))
  mesh = sharding.make_mesh((-1, 1, 1))
  abstract = model_lib.abstract_params(cfg)
  target = run_lib.with_shardings(abstract, sharding.shardings_for(abstract, mesh))
  return jax.device_get(checkpoint.restore_params(os.path.join(workdir, "checkpoints"), target))


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  pretrain.train_and_evaluate(config(), straight)
  first = pretrain.train_and_evaluate(config(stop_at_step=3), split)
  assert first["step"] == 3
  second = pretrain.train_and_evaluate(config(), split)
  assert second["step"] == 6
  assert _losses(straight) == _losses(split)  # same loss curve, step by step, bitwise
  a, b = _final_params(config(), straight), _final_params(config(), split)
  jax.tree.map(np.testing.assert_array_equal, a, b)


FLOAT64 = {"model.dtype": "float64", "model.param_dtype": "float64"}


def _env(devices=None, x64=False):
  env = dict(os.environ, PYTHONPATH=ROOT)
  if devices is not None:
    env["XLA_FLAGS"] = ""
  if x64:
    env["JAX_ENABLE_X64"] = "1"
  return env


def _launch(workdir, *flags, devices=None):
  cmd = [sys.executable, LAUNCH, "--config=" + os.path.join(ROOT, "configs", "pretrain_tiny.py"),
         f"--workdir={workdir}", "--config.batch_size=8", "--config.data.seq_len=32",
         "--config.eval_data.seq_len=32", "--config.eval_batches=1", "--config.eval_every=0",
         "--config.data.synthetic_docs=200", *flags]
  if devices:
    cmd.append(f"--cpu_devices={devices}")
  x64 = any(f.startswith("--config.model.dtype=float64") for f in flags)
  return subprocess.Popen(cmd, env=_env(devices, x64), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _launch(workdir, "--config.num_steps=100000", "--config.log_every=1",
                 "--config.checkpoint.save_every=100000")
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(_losses(workdir)) >= 3:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == run_lib.Preemption.EXIT_PREEMPTED, output[-3000:]
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                             read_only=True) as ckpt:
    saved = ckpt.latest_step()
  assert saved is not None and saved >= 3
  assert max(_losses(workdir)) == saved
  summary = pretrain.train_and_evaluate(config(num_steps=saved + 2), workdir)
  assert summary["step"] == saved + 2
  assert sorted(_losses(workdir)) == list(range(1, saved + 3))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_two(workdir, *flags):
  port = _free_port()
  return [_launch(workdir, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                  f"--process_id={i}", *flags, devices=4) for i in range(2)]


def _two_processes(workdir, *flags, returncode=0):
  procs = _start_two(workdir, *flags)
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == returncode, out[-3000:]
  return outputs


@pytest.mark.slow
def test_two_processes_sigterm_on_one_stops_both_at_the_same_step(tmp_path):
  """SIGTERM to one process of two: the distributed preemption service agrees on a step, both
  save it together and exit 143, with no per-step device round trip (log_every is large)."""
  workdir = str(tmp_path / "run")
  flags = ["--config.log_every=100000", "--config.checkpoint.save_every=100000"]
  procs = _start_two(workdir, "--config.num_steps=100000", *flags)
  deadline = time.time() + 300
  while not os.path.exists(os.path.join(workdir, "config.json")) and time.time() < deadline:
    time.sleep(0.5)  # the run has started (after jax.distributed.initialize)
  time.sleep(5)
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == run_lib.Preemption.EXIT_PREEMPTED, out[-3000:]
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                               read_only=True) as ckpt:
    saved = ckpt.all_steps()
  assert len(saved) == 1, saved
  for out in outputs:  # each process stopped at that step
    assert f"every process saves at step {saved[0]}" in out, out[-3000:]
  _two_processes(workdir, f"--config.num_steps={saved[0] + 2}", *flags)
  assert max(_losses(workdir)) == saved[0] + 2


@pytest.mark.slow
def test_two_processes_train_save_and_resume(tmp_path):
  """Two processes of 4 devices each, stopped at step 2 and resumed, give the losses of one
  process with 8 devices: compared in float64, where summation order cannot flip the test."""
  workdir = str(tmp_path / "multi")
  common = ["--config.num_steps=4", "--config.log_every=1", "--config.checkpoint.save_every=2",
            *(f"--config.{k}={v}" for k, v in FLOAT64.items())]
  _two_processes(workdir, *common, "--config.stop_at_step=2")
  assert sorted(_losses(workdir)) == [1, 2]
  _two_processes(workdir, *common)
  assert sorted(_losses(workdir)) == [1, 2, 3, 4]
  # One process with all 8 devices sees the same global batches: the same losses.
  single = str(tmp_path / "single")
  with jax.enable_x64(True):
    pretrain.train_and_evaluate(config(num_steps=4, **{"checkpoint.save_every": 2}, **FLOAT64),
                                single)
  multi, ref = _losses(workdir), _losses(single)
  np.testing.assert_allclose([multi[s] for s in range(1, 5)], [ref[s] for s in range(1, 5)],
                             rtol=1e-9)
  assert ref[4] != ref[1]  # the model trained: the comparison covers the updates
