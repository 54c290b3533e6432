"""lm-evaluation-harness adapter: tasks over a local JSONL, run through lm_eval.simple_evaluate
on a tiny random Quiet-STaR model, with and without thoughts.

Skipped where the `lm-eval` extra is not installed. Nothing is downloaded: the tasks read a
JSONL written here (HF datasets runs offline, its cache under tmp_path).
"""
import json
import sys

import pytest

pytest.importorskip("lm_eval")

# pylint: disable=g-import-not-at-top,wrong-import-position
import lm_eval  # noqa: E402
from lm_eval.api import registry  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from jaxstar import model as model_lib  # noqa: E402
from jaxstar import tokenizer as tokenizer_lib  # noqa: E402
from jaxstar.evals import lm as lm_lib  # noqa: E402
from jaxstar.evals import lm_eval_adapter  # noqa: E402
from jaxstar.model import hf_io  # noqa: E402
from jaxstar.quietstar.config import QuietStarConfig  # noqa: E402

ITEMS = [(12, 34), (5, 7), (20, 22), (3, 9)]
MAX_GEN_TOKS = 3


@pytest.fixture(scope="module")
def language_model():
  """A 1-layer random Quiet-STaR model on bytes (one thought token per position)."""
  return lm_lib.random_model(model_lib.get_config("tiny", num_layers=1),
                             tokenizer_lib.get_tokenizer("bytes"),
                             qs=QuietStarConfig(n_ahead=4), batch_size=4, max_length=64)


class _Recorder:
  """Passes calls through to a LanguageModel and records each one's arguments and result."""

  def __init__(self, model):
    self.model, self.calls = model, []
    self.max_length = model.max_length

  def __getattr__(self, name):
    fn = getattr(self.model, name)

    def call(*args, **kwargs):
      out = fn(*args, **kwargs)
      self.calls.append((name, args, kwargs, out))
      return out
    return call


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  """A JSONL of sums and three tasks over it: multiple choice, generation, perplexity.

  The choices (" 46") and the perplexity texts ("=46") are short alike, so that both score
  in the same padded shape: one compilation of the scorer per thoughts setting.
  """
  d = tmp_path_factory.mktemp("lm_eval_tasks")
  rows = [{"question": f"{a}+{b}=", "answer": str(a + b),
           "choices": [str(a + b), str(a + b + 1), str(a + b - 10)], "label": 0}
          for a, b in ITEMS]
  (d / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  # cache_dir: HF datasets' Arrow copy stays here, not in ~/.cache/huggingface. json.dumps
  # makes the paths YAML-safe double-quoted scalars.
  common = (f"dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(d / 'sums.jsonl'))}\n"
            f"  cache_dir: {json.dumps(str(d / 'hf_datasets'))}\n"
            f"test_split: test\n")
  (d / "sums_mc.yaml").write_text(
      "task: sums_mc\noutput_type: multiple_choice\n" + common
      + 'doc_to_text: "{{question}}"\ndoc_to_target: label\ndoc_to_choice: "{{choices}}"\n'
      + "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
  (d / "sums_gen.yaml").write_text(
      "task: sums_gen\noutput_type: generate_until\n" + common
      + 'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
      + f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {MAX_GEN_TOKS}\n'
      + "  do_sample: false\n"
      + "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
      + "    higher_is_better: true\n")
  (d / "sums_ppl.yaml").write_text(
      "task: sums_ppl\noutput_type: loglikelihood_rolling\n" + common
      + 'doc_to_text: ""\ndoc_to_target: "={{answer}}"\n'
      + "metric_list:\n  - metric: word_perplexity\n")
  return d


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
  # The tasks read a local file: any attempt to reach the Hub should fail, not hang. HF datasets
  # and huggingface_hub read these variables when imported (lm_eval imported them above), so
  # set their module constants too.
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  import datasets.config  # pylint: disable=g-import-not-at-top
  import huggingface_hub.constants  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _evaluate(lm, task_dir):
  tm = TaskManager(include_path=str(task_dir), include_defaults=False)
  return lm_eval.simple_evaluate(model=lm, tasks=["sums_mc", "sums_gen", "sums_ppl"],
                                 task_manager=tm, bootstrap_iters=0, log_samples=True)


@pytest.mark.parametrize("thoughts", [False, True])
def test_simple_evaluate_matches_direct_calls(language_model, task_dir, thoughts):
  recorder = _Recorder(language_model)
  out = _evaluate(lm_eval_adapter.JaxstarLM(recorder, thoughts=thoughts), task_dir)
  res = out["results"]
  assert 0.0 <= res["sums_mc"]["acc,none"] <= 1.0
  assert 0.0 <= res["sums_gen"]["exact_match,none"] <= 1.0
  assert res["sums_ppl"]["word_perplexity,none"] > 0
  assert out["config"]["thoughts"] is thoughts

  # One call per request type with the whole request list (the LanguageModel batches).
  calls = {name: (args, kwargs) for name, args, kwargs, _ in recorder.calls}
  assert sorted(n for n, *_ in recorder.calls) == [
      "generate", "loglikelihood", "loglikelihood_rolling"]
  assert all(kw["thoughts"] is thoughts for _, kw in calls.values())
  samples = out["samples"]
  n_choices = len(samples["sums_mc"][0]["doc"]["choices"])
  assert len(calls["loglikelihood"][0][0]) == len(ITEMS) * n_choices

  # The same lists called directly (thought scoring draws per batch, so the same batches)
  # give what lm_eval recorded for each request.
  contexts, continuations = calls["loglikelihood"][0]
  direct = dict(zip(zip(contexts, continuations),
                    language_model.loglikelihood(contexts, continuations, thoughts=thoughts)))
  for s in samples["sums_mc"]:
    doc = s["doc"]
    assert [tuple(a) for a in s["arguments"]] == [(doc["question"], " " + c)
                                                  for c in doc["choices"]]
    assert [tuple(r[0]) for r in s["resps"]] == [direct[tuple(a)] for a in s["arguments"]]

  (prompts,), gen_kw = calls["generate"]
  assert gen_kw == dict(max_new_tokens=MAX_GEN_TOKS, temperature=0.0, stop=("\n",),
                        thoughts=thoughts, seed=0)
  direct = dict(zip(prompts, language_model.generate(prompts, **gen_kw)))
  assert [s["resps"][0][0] for s in samples["sums_gen"]] == [
      direct[s["doc"]["question"]] for s in samples["sums_gen"]]

  texts = ["=" + s["doc"]["answer"] for s in samples["sums_ppl"]]
  assert [s["arguments"][0][0] for s in samples["sums_ppl"]] == texts
  direct = language_model.loglikelihood_rolling(texts, thoughts=thoughts)
  assert [s["resps"][0][0] for s in samples["sums_ppl"]] == direct


class _Req:
  """The part of lm_eval's Instance the adapter reads."""

  def __init__(self, *args):
    self.args = args


def test_generate_until_groups_settings_in_request_order():
  calls = []

  class Generator:
    max_length = 64

    def generate(self, prompts, **kwargs):
      calls.append((list(prompts), kwargs))
      return [f"{p}:{kwargs['max_new_tokens']}" for p in prompts]

  lm = lm_eval_adapter.JaxstarLM(Generator(), max_gen_toks=5, seed=3)
  greedy = {"until": ["\n"], "max_gen_toks": 2, "top_p": 0.5}  # top_p: greedy ignores it
  reqs = [_Req("a", greedy), _Req("b", {"until": "c", "do_sample": True}),
          _Req("c", dict(greedy)), _Req("d", {"temperature": 0.7, "top_p": 0.9, "top_k": 4})]
  assert lm.generate_until(reqs) == ["a:2", "b:5", "c:2", "d:5"]
  assert calls == [
      (["a", "c"], dict(max_new_tokens=2, temperature=0.0, stop=("\n",), thoughts=False,
                        seed=3)),
      (["b"], dict(max_new_tokens=5, temperature=1.0, stop=("c",), thoughts=False, seed=3)),
      (["d"], dict(max_new_tokens=5, temperature=0.7, stop=(), top_k=4, top_p=0.9,
                   thoughts=False, seed=3)),
  ]


def test_registered_and_created_from_arg_string(language_model, tmp_path):
  assert lm_eval_adapter.register() is lm_eval_adapter.JaxstarLM
  assert registry.get_model("jaxstar") is lm_eval_adapter.JaxstarLM
  assert "hf" in registry.model_registry  # lm_eval's own backends are still found by name
  # A Hugging Face folder of the fixture's LM, loaded by LanguageModel.load from model_args
  # as `lm_eval --model jaxstar --model_args ...` would (device: lm_eval's, ignored).
  hf_io.save_hf(language_model.lm_params, language_model.model_cfg, str(tmp_path))
  lm = registry.get_model("jaxstar").create_from_arg_string(
      f"path={tmp_path},tokenizer=bytes,thoughts=False,batch_size=2,max_length=32",
      {"batch_size": None, "device": "cpu"})
  assert isinstance(lm.model, lm_lib.LanguageModel)
  assert (lm.model.batch_size, lm.model.max_length, lm.max_length) == (2, 32, 32)
  assert lm.thoughts is False and lm.get_model_info()["jaxstar_path"] == str(tmp_path)


def test_missing_lm_eval_names_the_extra(monkeypatch):
  monkeypatch.setattr(lm_eval_adapter, "_cls", None)
  for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
  with pytest.raises(ImportError, match=r"pip install -e \.\[lm-eval\]"):
    lm_eval_adapter.JaxstarLM  # pylint: disable=pointless-statement
