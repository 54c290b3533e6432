"""The STaR stage (jaxstar/star/stage.py): two iterations' bookkeeping, resuming after SIGKILL in
generation and in fine-tuning, two processes against one, and errors on bad input.

The base model is the tiny LM pretrained here for a few hundred steps on one-digit scratchpad
additions: it gets some of them right, so every iteration keeps examples.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import common
from configs import star_arithmetic_tiny
from jaxstar import checkpoint
from jaxstar import stages
from jaxstar.data import tasks
from jaxstar.errors import UserError
from jaxstar.star import stage
from tests.pretrain_test import ROOT, _env, _free_port

DATA = os.path.join(ROOT, "tests", "testdata")
# A two-layer version of the tiny model: 400 steps on one-digit scratchpads (a minute on this
# CPU) make it right on ~15% of one-digit sums.
MODEL = {"model.num_layers": 2, "model.embed_dim": 64, "model.num_heads": 2,
         "model.num_kv_heads": 1, "model.head_dim": 32, "model.mlp_dim": 192}


def pretrain_config():
  c = star_arithmetic_tiny.pretrain_config()
  scratch = dict(synthetic_format="scratchpad", synthetic_min_digits=1, synthetic_max_digits=1,
                 synthetic_blocks=1, synthetic_hint_fraction=0.25, seq_len=128, mode="pack")
  c.data = common.lm_data_config(synthetic_docs=5000, seed=5, **scratch)
  c.eval_data = common.lm_data_config(synthetic_docs=16, seed=1234, **scratch)
  c.update_from_flattened_dict({"num_steps": 400, "eval_every": 0, "batch_size": 32,
                                "checkpoint.save_every": 400, "optim.lr": 1e-2, **MODEL})
  return c


def star_config(base: str, **overrides):
  """Two iterations on one-digit sums without exemplars: 24 training items in chunks of 8, the
  held-out ones of 16 dev items, 6 then 8 fine-tuning steps, a checkpoint every 2."""
  c = star_arithmetic_tiny.get_config()
  c.init_from, c.create_init_from = base, ""
  c.update_from_flattened_dict({
      "star.num_iterations": 2, "star.patience": 0, "star.n_train_samples": 24,
      "star.chunk": 8, "star.batch_size": 8, "star.seq_len": 128, "star.start_steps": 6,
      "star.add_steps": 2, "star.keep_checkpoints": "all", "star.arithmetic.digits": "1",
      "star.arithmetic.pool_per_length": 40, "star.arithmetic.dev_per_length": 16,
      "star.arithmetic.shots": 0, "checkpoint.save_every": 2, "checkpoint.async_save": False,
      "batch_size": 8, **MODEL, **overrides})
  return c


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("star") / "base")
  stages.run(pretrain_config(), path)
  return path


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
  """The uninterrupted run, in this process (8 CPU devices, as the subprocesses)."""
  workdir = str(tmp_path_factory.mktemp("star") / "reference")
  return workdir, stages.run(star_config(base), workdir)


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _final_params(workdir, n, dtype="float32"):
  """(step, host arrays) of iteration n's last fine-tuning checkpoint, restored onto one
  device (whatever devices saved it)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxstar import model as model_lib  # pylint: disable=g-import-not-at-top
  from jaxstar import run_lib  # pylint: disable=g-import-not-at-top
  cfg = model_lib.get_config("tiny", **{k.split(".")[1]: v for k, v in MODEL.items()},
                             dtype=dtype, param_dtype=dtype)
  abstract = jax.eval_shape(lambda r: model_lib.Transformer(cfg).init(
      r, jnp.zeros((1, 1), jnp.int32))["params"], jax.random.key(0))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = run_lib.with_shardings(abstract, jax.tree.map(lambda _: one, nn.unbox(abstract)))
  ckpt_dir = os.path.join(workdir, f"iter_{n:03d}", "checkpoints")
  with checkpoint.Checkpointer(ckpt_dir, save_every=0, read_only=True) as saved:
    step = saved.latest_step()
  params = checkpoint.restore_params(ckpt_dir, target)
  return step, [np.asarray(x) for x in jax.tree.leaves(params)]


def test_two_iterations_keep_their_books(base, reference, capsys):
  workdir, progress = reference
  assert progress["stopped"] == "ran all 2 iterations"
  dev_items = progress["base"]["items"]
  assert 0 < dev_items < 16       # the dev sums that are also training sums are left out
  for n in (1, 2):
    rec = progress["iterations"][str(n)]
    g = rec["generation"]
    assert g["attempted"] == 24 and g["kept"] == g["correct"] + g["rationalized"] > 0
    assert g["rationalization_attempts"] == 24 - g["correct"]
    rows = [json.loads(line) for line in _read(os.path.join(
        workdir, f"iter_{n:03d}", "train.jsonl")).splitlines()]
    assert len(rows) == g["kept"]
    assert sum(r["source"] == "rationalized" for r in rows) == g["rationalized"]
    for r in rows:                           # the hint-free query, the completion to the answer
      assert r["prompt"].startswith("Input:\n") and r["prompt"].endswith("\nTarget:")
      lines = r["completion"].split("\n")
      assert lines[1] == "<scratch>" and lines[-2] == "</scratch>"
      a, b = (int(x.replace(" ", "")) for x in r["prompt"].split("\n")[1].split(" + "))
      assert lines[-1] == tasks.addition_answer(a, b)
    gen_rows = [r for c in range(3) for r in json.loads(_read(os.path.join(
        workdir, f"iter_{n:03d}", "gen", f"{c:04d}.json")))["rows"]]
    assert [r["index"] for r in gen_rows] == list(range(24))
    assert sum(r["source"] == "direct" for r in gen_rows) == g["correct"]
    dev_dir = os.path.join(workdir, f"iter_{n:03d}", "dev")
    dev_rows = [r for c in sorted(os.listdir(dev_dir))
                for r in json.loads(_read(os.path.join(dev_dir, c)))["rows"]]
    assert len(dev_rows) == dev_items
    assert rec["dev"]["accuracy"] == pytest.approx(np.mean([r["right"] for r in dev_rows]))
    assert set(rec["dev"]["by_group"]) == {"1 digits"}
    assert rec["steps"] == 6 + 2 * (n - 1) == _final_params(workdir, n)[0]
    assert rec["finetune"]["examples"] == g["kept"]
  best = progress["best_iteration"]
  accs = {n: progress["iterations"][str(n)]["dev"]["accuracy"] for n in (1, 2)}
  assert accs[best] == max(accs.values()) and (best == 1 or accs[1] < accs[2])
  assert os.readlink(os.path.join(workdir, "best")) == f"iter_{best:03d}"
  table = stage.format_table(stage.Progress(workdir, progress["fixed"]))
  assert table.count("\n") == 4 and "| 0 (base) |" in table and f"| {best} * |" in table
  # Rerunning a finished run does nothing and says so.
  again = stages.run(star_config(base), workdir)
  assert again["iterations"] == progress["iterations"]
  assert "| 1" in capsys.readouterr().out


RUNNER = """
import json, os, signal, sys
sys.path.insert(0, {root!r})
import jax
args = json.loads(sys.argv[1])
if args.get("coordinator"):
  jax.distributed.initialize(args["coordinator"], 2, args["process"])
from jaxstar import checkpoint, stages
from jaxstar.star import stage
from tests.star_stage_test import star_config

def die():
  os.kill(os.getpid(), signal.SIGKILL)   # no chance to clean up

if args.get("kill") == "generation":     # after iteration 1's second chunk of rationales
  write = stage._write_json
  def write_then_die(path, obj):
    write(path, obj)
    if path.endswith(os.path.join("iter_001", "gen", "0001.json")):
      die()
  stage._write_json = write_then_die
if args.get("kill") == "finetune":       # after iteration 2's checkpoint of step 4 (of 8)
  save = checkpoint.Checkpointer.save
  def save_then_die(self, step, state, **kw):
    started = save(self, step, state, **kw)
    self.wait()
    if "iter_002" in self.directory and step == 4:
      die()
    return started
  checkpoint.Checkpointer.save = save_then_die
if "compare" in args:                    # max |a - b| and max |a| of two runs' parameters
  from tests.star_stage_test import _final_params
  (sa, a), (sb, b) = (_final_params(w, 1, "float64") for w in args["compare"])
  print("COMPARE", json.dumps({{"steps": [sa, sb], "dtype": str(a[0].dtype),
        "diff": max(float(abs(x - y).max()) for x, y in zip(a, b)),
        "scale": max(float(abs(x).max()) for x in a)}}))
else:
  stages.run(star_config(args["base"], **args.get("overrides", {{}})), args["workdir"])
"""


def _runner(tmp_path):
  path = tmp_path / "run_star.py"
  path.write_text(RUNNER.format(root=ROOT))
  return str(path)


def _start(runner, env=None, **args):
  return subprocess.Popen([sys.executable, runner, json.dumps(args)], env=env or _env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, returncode=0):
  out = proc.communicate(timeout=900)[0]
  assert proc.returncode == returncode, out[-3000:]
  return out


@pytest.mark.slow
def test_resume_after_sigkill(base, reference, tmp_path):
  """Killed (SIGKILL) in the middle of generation, rerun and killed in the middle of
  fine-tuning, rerun to the end: the same fine-tuning sets and the same final parameters as
  the uninterrupted run."""
  ref_dir, _ = reference
  workdir, runner = str(tmp_path / "run"), _runner(tmp_path)
  state = lambda: json.loads(_read(os.path.join(workdir, "star.json")))["iterations"]
  _finish(_start(runner, base=base, workdir=workdir, kill="generation"), returncode=-9)
  assert "generation" not in state().get("1", {})   # 2 of iteration 1's 3 chunks on disk
  assert sorted(os.listdir(os.path.join(workdir, "iter_001", "gen"))) == ["0000.json",
                                                                          "0001.json"]
  _finish(_start(runner, base=base, workdir=workdir, kill="finetune"), returncode=-9)
  assert "dev" in state()["1"] and "finetune" not in state()["2"]
  with checkpoint.Checkpointer(os.path.join(workdir, "iter_002", "checkpoints"),
                               save_every=0, read_only=True) as saved:
    assert saved.latest_step() == 4                  # of 8
  _finish(_start(runner, base=base, workdir=workdir))
  for n in (1, 2):
    name = os.path.join(f"iter_{n:03d}", "train.jsonl")
    assert _read(os.path.join(workdir, name)) == _read(os.path.join(ref_dir, name))
  step, params = _final_params(workdir, 2)
  ref_step, ref_params = _final_params(ref_dir, 2)
  assert step == ref_step == 8
  for a, b in zip(params, ref_params):
    np.testing.assert_array_equal(a, b)    # the same programs on the same devices: bit-equal


@pytest.mark.slow
def test_two_processes_equal_one(base, tmp_path):
  """One iteration in float64 by 2 processes x 4 devices and by 1 process x 8 devices."""
  runner = _runner(tmp_path)
  overrides = {"star.num_iterations": 1, "model.dtype": "float64",
               "model.param_dtype": "float64"}
  one = str(tmp_path / "one")
  _finish(_start(runner, env=_env(x64=True), base=base, workdir=one, overrides=overrides))
  two, port = str(tmp_path / "two"), _free_port()
  env = _env(devices=4, x64=True)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  procs = [_start(runner, env=env, base=base, workdir=two, overrides=overrides,
                  coordinator=f"localhost:{port}", process=i) for i in range(2)]
  for p in procs:
    _finish(p)
  name = os.path.join("iter_001", "train.jsonl")
  assert _read(os.path.join(two, name)) == _read(os.path.join(one, name))
  with open(os.path.join(one, "star.json"), encoding="utf-8") as f:
    a = json.load(f)["iterations"]["1"]
  with open(os.path.join(two, "star.json"), encoding="utf-8") as f:
    b = json.load(f)["iterations"]["1"]
  assert a["generation"]["kept"] == b["generation"]["kept"]
  assert a["dev"]["accuracy"] == b["dev"]["accuracy"]
  out = _finish(_start(runner, env=_env(x64=True), compare=[one, two]))
  result = json.loads(out.split("COMPARE", 1)[1].splitlines()[0])
  assert result["steps"] == [6, 6] and result["dtype"] == "float64"
  assert result["diff"] <= 1e-9 * result["scale"], result


# ------------------------------------------------------------------------------ bad input


def _qa_config(base, task="gsm8k", **kw):
  c = star_config(base)
  c.update_from_flattened_dict({"star.task": task, **kw})
  return c


def test_bad_inputs_are_clear_errors(tmp_path):
  base = str(tmp_path)            # an existing folder: every check runs before any model
  train = os.path.join(DATA, "gsm8k_train.jsonl")
  dev = os.path.join(DATA, "gsm8k_test.jsonl")
  run = lambda c: stages.run(c, str(tmp_path / "w"))
  with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
    run(_qa_config(base, **{"star.train_path": str(tmp_path / "nothere.jsonl"),
                            "star.dev_path": dev}))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(UserError, match="empty.jsonl.*star.dev_path"):
    run(_qa_config(base, **{"star.train_path": train, "star.dev_path": str(empty)}))
  blank = tmp_path / "prompts.txt"
  blank.write_text("\n\n\n")
  with pytest.raises(UserError, match="prompts.txt: no prompt exemplars"):
    run(_qa_config(base, **{"star.train_path": train, "star.dev_path": dev,
                            "star.prompt_path": str(blank)}))
  # A CommonsenseQA item whose answer is none of its choices: no choice to mark (CORRECT).
  row = json.loads(_read(os.path.join(DATA, "commonsenseqa_train.jsonl")).splitlines()[0])
  row["answerKey"] = "F"
  bad = tmp_path / "csqa.jsonl"
  bad.write_text(json.dumps(row) + "\n")
  with pytest.raises(UserError, match=r"csqa.jsonl:1: malformed row: answerKey 'F' is not a choice label"):
    run(_qa_config(base, "commonsenseqa", **{"star.train_path": str(bad),
                                             "star.dev_path": str(bad)}))
  for field, value, match in [
      ("star.task", "sums", "STaR task 'sums'"),
      ("star.steps_rule", "cubic", "steps_rule='cubic'"),
      ("star.loss_on", "prompt", "loss_on='prompt'"),
      ("star.n_train_samples", 0, "n_train_samples=0 must be >= 1"),
      ("star.arithmetic.digits", "two", "digits='two'")]:
    with pytest.raises(UserError, match=match):
      run(star_config(base, **{field: value}))
  c = star_config(base)
  c.init_from = ""
  with pytest.raises(UserError, match="init_from is empty"):
    run(c)


def test_a_changed_setting_in_the_same_workdir_is_refused(base, reference):
  workdir, _ = reference
  c = star_config(base, **{"star.n_train_samples": 25})
  with pytest.raises(UserError, match=r"n_train_samples: 24 there, 25 now"):
    stages.run(c, workdir)


@pytest.mark.slow
def test_star_notebook_plots_accuracy_and_shows_rationales(base, tmp_path, monkeypatch):
  """colab/star_demo.ipynb on this module's base model: one iteration of star_config's run."""
  from tests import notebooks  # pylint: disable=g-import-not-at-top
  settings = star_config(base).to_dict()
  keys = ["star.n_train_samples", "star.chunk", "star.batch_size", "star.seq_len",
          "star.start_steps", "star.arithmetic.digits", "star.arithmetic.pool_per_length",
          "star.arithmetic.dev_per_length", "star.arithmetic.shots", "batch_size"]
  overrides = {k: _get(settings, k) for k in keys}
  overrides.update({f"model.{k}": v for k, v in settings["model"].items()
                    if k != "variant" and v is not None})
  nb = notebooks.execute("star_demo.ipynb", monkeypatch, WORKDIR=str(tmp_path),
                         BASE_DIR=base, ITERATIONS=1, OVERRIDES=overrides)
  text = notebooks.text_output(nb)
  progress = json.loads(_read(os.path.join(tmp_path, "star", "star.json")))
  accuracy = progress["iterations"]["1"]["dev"]["accuracy"]
  assert f"1 {accuracy:.3f}" in text and f"0 {progress['base']['accuracy']:.3f}" in text
  assert any(o.get("data", {}).get("image/png") for c in nb.cells for o in c.get("outputs", []))
  assert text.count("=== dev item") == 3 and "--- iteration 1:" in text


def _get(tree, dotted):
  for k in dotted.split("."):
    tree = tree[k]
  return tree
