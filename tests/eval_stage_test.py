"""The eval stage end to end on a tiny Quiet-STaR run, in one and in two processes, and its
errors on bad input."""
import json
import os
import subprocess
import sys

import pytest

from configs import eval_arithmetic_tiny
from configs import eval_gsm8k
from jaxstar import stages
from jaxstar.errors import UserError
from tests.pretrain_test import ROOT, _env, _free_port
from tests.quietstar_trainer_test import _pretrain_config

LAUNCH = os.path.join(ROOT, "launch", "tpu.py")


@pytest.fixture(scope="module")
def quietstar_run(tmp_path_factory):
  """A tiny pretrain run (2 steps) continued by Quiet-STaR (2 steps)."""
  from configs import quietstar_tiny  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("runs")
  stages.run(_pretrain_config(), str(root / "pretrain"))
  c = quietstar_tiny.get_config()
  c.update_from_flattened_dict({"init_from": str(root / "pretrain"), "num_steps": 2,
                                "eval_every": 0, "data.seq_len": 16,
                                "data.synthetic_docs": 64})
  stages.run(c, str(root / "quietstar"))
  return str(root / "quietstar")


def _config(run_dir, **kw):
  c = eval_arithmetic_tiny.get_config()
  c.init_from = run_dir
  c.update_from_flattened_dict({"eval.limit": 8, "eval.batch_size": 8, **kw})
  return c


def _predictions(workdir):
  with open(os.path.join(workdir, "predictions.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_arithmetic_eval_end_to_end(quietstar_run, tmp_path, capsys):
  workdir = str(tmp_path / "eval")
  results = stages.run(_config(quietstar_run), workdir)
  assert set(results) == {"paper", "paper_thoughts", "few_shot", "few_shot_thoughts"}
  assert all(0 <= v <= 1 for v in results.values())
  assert 0 < results["paper"] < 1 and results["paper"] != results["paper_thoughts"]
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["metrics"] == results and saved["num_items"] == 8 and saved["thought_model"]
  rows = _predictions(workdir)
  assert len(rows) == 4 * 8
  few = [r for r in rows if r["metric"] == "few_shot"]
  assert all(r["score"] == float(r["prediction"] == r["gold"]) for r in few)
  assert "| paper |" in capsys.readouterr().out


@pytest.mark.slow
def test_two_process_eval_equals_one_process(quietstar_run, tmp_path):
  """Sampled generation, rows over the data axis: 2 processes x 4 devices = 1 x 8."""
  flags = [f"--config.init_from={quietstar_run}", "--config.mesh_shape=-1,1,1",
           "--config.eval.limit=8", "--config.eval.batch_size=8",
           "--config.eval.metrics=few_shot,paper", "--config.eval.temperature=1.0",
           "--config.eval.thoughts=on"]
  config = "--config=" + os.path.join(ROOT, "configs", "eval_arithmetic_tiny.py")
  one = str(tmp_path / "one")
  out = subprocess.run([sys.executable, LAUNCH, config, f"--workdir={one}", *flags],
                       env=_env(), capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  two = str(tmp_path / "two")
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, LAUNCH, config, f"--workdir={two}", *flags,
                             f"--coordinator_address=localhost:{port}", "--num_processes=2",
                             f"--process_id={i}", "--cpu_devices=4"], env=_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for p in procs:
    output = p.communicate(timeout=600)[0]
    assert p.returncode == 0, output[-3000:]
  strip = lambda rows: [{k: v for k, v in r.items() if k != "score"} | {"score": r["score"]}
                        for r in rows]
  a, b = strip(_predictions(one)), strip(_predictions(two))
  assert [r["generations"] for r in a if "generations" in r] == [
      r["generations"] for r in b if "generations" in r]
  for ra, rb in zip(a, b):   # paper scores: float32 sums over the same rows
    assert abs(ra["score"] - rb["score"]) <= 1e-6 * max(1.0, abs(ra["score"]))


def test_bad_eval_input_is_a_clear_error(quietstar_run, tmp_path):
  with pytest.raises(UserError, match="config.eval.task='sums'"):
    stages.run(_config(quietstar_run, **{"eval.task": "sums"}), str(tmp_path / "a"))
  with pytest.raises(UserError, match="config.eval.metrics='paper,vibes'"):
    stages.run(_config(quietstar_run, **{"eval.metrics": "paper,vibes"}), str(tmp_path / "b"))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  c = eval_gsm8k.get_config()
  c.init_from = quietstar_run
  c.eval.data_path = str(empty)
  with pytest.raises(UserError, match="empty.jsonl"):
    stages.run(c, str(tmp_path / "c"))
  c = _config(str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match="is not a folder"):
    stages.run(c, str(tmp_path / "d"))


@pytest.mark.parametrize("task", ["gsm8k", "commonsenseqa"])
def test_question_answering_metrics_run_on_fixture_data(quietstar_run, tmp_path, task):
  """Paper metric, few-shot and zero-shot chain of thought (with a vote of two samples) on
  the tiny run over the repository's small task fixtures: every metric, every item."""
  from configs import eval_csqa  # pylint: disable=g-import-not-at-top
  c = (eval_gsm8k if task == "gsm8k" else eval_csqa).get_config()
  split = "gsm8k_test.jsonl" if task == "gsm8k" else "commonsenseqa_dev.jsonl"
  c.init_from = quietstar_run
  c.update_from_flattened_dict({
      "eval.data_path": os.path.join(ROOT, "tests", "testdata", split), "eval.limit": 3,
      "eval.metrics": "paper,few_shot,zero_shot", "eval.max_new_tokens": 6,
      "eval.num_samples": 2, "eval.temperature": 1.0, "eval.batch_size": 8,
      "eval.max_length": 512, "eval.thoughts": "off"})
  workdir = str(tmp_path / task)
  results = stages.run(c, workdir)
  assert set(results) == {"paper", "few_shot", "zero_shot"}
  assert 0 < results["paper"] < 1
  rows = _predictions(workdir)
  assert len(rows) == 3 * 3
  for row in rows:
    if row["metric"] != "paper":
      assert len(row["generations"]) == 2
