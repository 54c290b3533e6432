"""Compile-only runs: the stage's train step compiled on its mesh, memory reported, nothing run."""
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import star_arithmetic_tiny
from jaxstar import compile_plan
from jaxstar import flops
from jaxstar import model as model_lib
from jaxstar import run_lib
from jaxstar import sharding
from jaxstar import stages
from jaxstar import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state_and_batch_bytes_per_device(config, abstract, shardings, batch_shapes, mesh):
  """What the arguments of the step take on one device, from the shardings alone."""
  def itemsize(dtype):   # a threefry key is two uint32 words
    return 8 if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype).itemsize
  per_leaf = lambda a, s: math.prod(s.shard_shape(a.shape)) * itemsize(a.dtype)
  state = sum(jax.tree.leaves(jax.tree.map(per_leaf, run_lib.with_shardings(abstract, shardings),
                                           shardings)))
  batch_sharding = sharding.batch_sharding(mesh)
  batch = sum(math.prod(batch_sharding.shard_shape(tuple(s))) * 4 for s in batch_shapes.values())
  return state + batch


def test_star_compile_only_reports_the_fine_tuning_step_and_writes_nothing(tmp_path,
                                                                            monkeypatch):
  config = star_arithmetic_tiny.get_config()
  config.compile_only = True
  config.mesh_shape = (2, 2, 2)
  config.init_from = str(tmp_path / "missing")       # not read: no weights are needed
  captured = {}
  real_shard = run_lib.Run.shard

  def shard(run, init_state, name):                    # keep what the stage laid out
    out = real_shard(run, init_state, name)
    captured.update(abstract=out[0], shardings=out[1], mesh=run.mesh)
    return out
  monkeypatch.setattr(run_lib.Run, "shard", shard)
  workdir = tmp_path / "run"
  with pytest.raises(compile_plan.CompiledOnly) as done:
    stages.run(config, str(workdir))
  assert done.value.code == 0
  assert not workdir.exists() and not (tmp_path / "missing").exists()
  text, memory = done.value.report, done.value.memory
  assert "stage star" in text and "'data': 2, 'fsdp': 2, 'tensor': 2} over 8 cpu" in text
  shape = (config.batch_size, config.star.seq_len)
  expected = _state_and_batch_bytes_per_device(
      config, captured["abstract"], captured["shardings"],
      {k: shape for k in ("tokens", "mask", "targets", "segment_ids")}, captured["mesh"])
  assert memory["arguments"] == expected
  assert memory["total"] == (memory["arguments"] + memory["outputs"] - memory["aliased"]
                             + memory["temporaries"])
  assert memory["aliased"] > 0.9 * memory["outputs"] > 0     # the donated state is reused
  cfg = run_lib.model_config_from(config, tokenizer.get_tokenizer("bytes"))
  step_flops = flops.lm_step_flops(cfg, *shape)
  assert f"model FLOPs per step: {step_flops:.4g}" in text


def test_model_flops_of_the_plain_step_count_every_matmul():
  cfg = model_lib.get_config("tiny")
  d, f, v, l = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size, 16
  qkvo = 2 * d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  attention = 4 * cfg.num_heads * cfg.head_dim * l
  per_token = cfg.num_layers * (qkvo + 6 * d * f + attention) + 2 * d * v
  assert flops.lm_step_flops(cfg, 3, l) == 3 * 3 * l * per_token
  # Quiet-STaR with no thought tokens and one talk token on one pass: the base pass, one
  # thought pass without logits ((n_ahead - 2) = 1), one talk pass with the mixing head.
  longer = lambda c: cfg.num_layers * (qkvo + 6 * d * f + 4 * cfg.num_heads * cfg.head_dim * c)
  mixing = 2 * (3 * d * d + d)
  expected = 3 * 2 * l * ((longer(l) + 2 * d * v) + longer(l + 1)
                          + (longer(l + 2) + mixing + 2 * d * v))
  assert flops.quietstar_step_flops(cfg, 2, l, 3, 1, 1) == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
def test_launcher_compile_only_on_emulated_devices(tmp_path):
  """`--compile_only --num_devices=N`: N CPU devices, the quietstar step's table, status 0."""
  cmd = [sys.executable, os.path.join(ROOT, "launch", "tpu.py"),
         "--config=" + os.path.join(ROOT, "configs", "quietstar_tiny.py"), "--compile_only",
         "--num_devices=4", "--config.mesh_shape=(1,2,2)"]
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False,
                        cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert list(tmp_path.iterdir()) == []                     # no workdir, nothing written
  assert "stage quietstar" in proc.stdout
  assert "{'data': 1, 'fsdp': 2, 'tensor': 2} over 4 cpu device(s)" in proc.stdout
  temps = re.search(r"\| temporaries \| [\d.]+ \| ([\d,]+) \|", proc.stdout)
  assert temps and int(temps.group(1).replace(",", "")) > 0, proc.stdout
  for chip in compile_plan.CHIPS:
    assert f"| {chip.name} |" in proc.stdout
  bad = subprocess.run(cmd[:3] + ["--num_devices=4"], env=env, capture_output=True, text=True,
                       timeout=300, check=False, cwd=tmp_path)
  assert bad.returncode == 2 and "--num_devices is for --compile_only" in bad.stderr
