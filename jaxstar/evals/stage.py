"""The `eval` stage: the papers' evaluations of a jaxstar run or a Hugging Face model.

  python launch/tpu.py --config=configs/eval_gsm8k.py --workdir=workdirs/eval_gsm8k \\
      --config.init_from=workdirs/quietstar_7b --config.eval.limit=100

Metrics (`config.eval.metrics`, each with and without thoughts when the model has them):
  paper      the Quiet-STaR paper metric (spec/quietstar.md §5.1): the probability of the
             correct answer's tokens after "\\nA:", renormalized over the valid answer tokens,
             multiplied, averaged over the items; thoughts only at the answer positions;
  few_shot   exact match of few-shot chain-of-thought generations (the STaR prompts,
             spec/star.md §1.2-1.4), majority vote over `num_samples`;
  zero_shot  "Let's think step by step", then the answer trigger (spec/quietstar.md §5.2),
             majority vote over `num_samples`.
Task 'arithmetic' is the tiny configs' synthetic corpus ("12+34=46" lines): few-shot lines, then
"a+b=", the answer is the generated line; its `paper` metric scores the answer digits and the
newline after "=".

Writes `results.json` (the metrics and the settings) and `predictions.jsonl` (one line per item
and metric) to the workdir and prints a table. Every process runs the same calls; process 0
writes.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import tqdm

from jaxstar import run_lib
from jaxstar import sampling
from jaxstar.data import tasks
from jaxstar.errors import UserError
from jaxstar.evals import answers
from jaxstar.evals import paper_metric
from jaxstar.evals.lm import LanguageModel

TASKS = ("gsm8k", "commonsenseqa", "arithmetic")
METRICS = ("paper", "few_shot", "zero_shot")
THOUGHTS = ("both", "on", "off")
FEW_SHOT_STOP = ("\n\n",)       # exemplars are separated by blank lines
ZERO_SHOT_ANSWER_TOKENS = 12    # the second stage's budget (official)


def _check(config) -> None:
  ev = config.eval
  if ev.task not in TASKS:
    raise UserError(f"config.eval.task={ev.task!r}; choose one of {TASKS}")
  metrics = _metrics(config)
  if ev.task == "arithmetic" and "zero_shot" in metrics:
    raise UserError("config.eval.metrics: zero_shot is for gsm8k and commonsenseqa")
  if ev.thoughts not in THOUGHTS:
    raise UserError(f"config.eval.thoughts={ev.thoughts!r}; choose one of {THOUGHTS}")
  if ev.num_samples < 1:
    raise UserError(f"config.eval.num_samples={ev.num_samples} must be >= 1")
  if ev.num_samples > 1 and ev.temperature == 0:
    raise UserError("config.eval.num_samples > 1 votes over identical greedy samples: set "
                    "config.eval.temperature > 0")
  if not config.init_from:
    raise UserError("config.init_from is empty: name a jaxstar run directory or a Hugging "
                    "Face Mistral folder to evaluate")
  if not os.path.isdir(config.init_from):
    raise UserError(f"config.init_from={config.init_from!r} is not a folder")


def _metrics(config) -> tuple[str, ...]:
  metrics = tuple(m.strip() for m in config.eval.metrics.split(",") if m.strip())
  bad = [m for m in metrics if m not in METRICS]
  if bad or not metrics:
    raise UserError(f"config.eval.metrics={config.eval.metrics!r}; a comma-separated list of "
                    f"{METRICS}")
  return metrics


# ----------------------------------------------------------------------------------- items


def load_items(config) -> list[tasks.Example]:
  """The evaluation items: a task split (config.eval.data_path or the Hub), or arithmetic."""
  ev = config.eval
  if ev.task == "arithmetic":
    rng = np.random.default_rng([config.seed, 1234])
    hi = 10 ** ev.arithmetic_digits
    pairs = rng.integers(0, hi, size=(ev.limit or 100, 2)).tolist()
    return [tasks.Example(question=f"{a}+{b}", answer=str(a + b)) for a, b in pairs]
  split = ev.split or tasks.TASK_SPLITS[ev.task][-1]
  loaded = tasks.load_task(ev.task, split, ev.data_path, max_rows=ev.limit,
                           config_field="eval.data_path")
  return list(loaded.rows)


def _arithmetic_shots(config) -> str:
  rng = np.random.default_rng([config.seed, 99])
  hi = 10 ** config.eval.arithmetic_digits
  return "".join(f"{a}+{b}={a + b}\n" for a, b in rng.integers(0, hi, (4, 2)).tolist())


# --------------------------------------------------------------------------------- metrics


def paper(lm: LanguageModel, config, items, thoughts: bool, bar) -> list[dict]:
  """Per item: the paper metric's probability of the correct answer."""
  task, tok = config.eval.task, lm.tokenizer
  valid = paper_metric.valid_answer_ids(tok, "gsm8k" if task == "arithmetic" else task)
  index = {int(v): j for j, v in enumerate(valid)}
  token_lists, position_lists, target_lists = [], [], []
  shots = _arithmetic_shots(config) if task == "arithmetic" else ""
  for ex in items:
    if task == "arithmetic":
      prompt = f"{shots}{ex.question}="
      ids = tok.encode(prompt + ex.answer + "\n", bos=True)
      start = len(tok.encode(prompt, bos=True))
      at = [t for t in range(start, len(ids)) if ids[t] in index]
      positions, targets = np.array(at) - 1, np.array([ids[t] for t in at])
    else:
      ids = tok.encode(paper_metric.paper_prompt(task, ex), bos=True)
      positions, targets = paper_metric.answer_targets(tok, ids, task)
    cut = max(0, len(ids) - lm.max_length)      # keep the answer: drop the prompt's start
    token_lists.append(ids[cut:])
    position_lists.append((np.asarray(positions) - cut).tolist())
    target_lists.append(np.asarray(targets))
  logits = lm.logits_at(token_lists, position_lists, thoughts=thoughts, ids=valid)
  out = []
  for ex, lg, targets in zip(items, logits, target_lists):
    prob = paper_metric.answer_probability(lg, [index[int(t)] for t in targets],
                                           np.arange(len(valid)))
    out.append({"question": ex.question, "gold": ex.answer, "score": prob})
  bar(len(items))
  return out


def few_shot(lm: LanguageModel, config, items, thoughts: bool, bar) -> list[dict]:
  """Per item: the majority-voted answer of few-shot chain-of-thought generations."""
  ev, task = config.eval, config.eval.task
  if task == "arithmetic":
    shots = _arithmetic_shots(config)
    prompts = [f"{shots}{ex.question}=" for ex in items]
    stop = ("\n",)
  else:
    exemplars = tasks.packaged_prompts(task)
    query = tasks.format_gsm8k_query if task == "gsm8k" else tasks.format_csqa_query
    prompts = [tasks.few_shot_context(exemplars, query(ex)) for ex in items]
    stop = FEW_SHOT_STOP
  votes = []
  for k in range(ev.num_samples):
    gens = lm.sample(prompts, _sampling(config, ev.max_new_tokens, stop, k), thoughts=thoughts,
                     progress=bar)
    votes.append([g.text for g in gens])
  out = []
  for i, ex in enumerate(items):
    texts = [v[i] for v in votes]
    if task == "arithmetic":
      preds = [t.strip().split("\n")[0].strip() or None for t in texts]
    else:
      preds = [answers.extract_answer(task, t, "few_shot") for t in texts]
    pred = answers.majority_vote(preds)
    correct = pred == ex.answer if task == "arithmetic" else answers.is_correct(task, pred,
                                                                                ex.answer)
    out.append({"question": ex.question, "gold": ex.answer, "prediction": pred,
                "score": float(correct), "generations": texts})
  return out


def zero_shot(lm: LanguageModel, config, items, thoughts: bool, bar) -> list[dict]:
  """Per item: zero-shot chain of thought, then the answer trigger, majority-voted."""
  ev, task = config.eval, config.eval.task
  prompts = [answers.zero_shot_prompt(task, ex) for ex in items]
  votes, reasons = [], []
  for k in range(ev.num_samples):
    first = lm.sample(prompts, _sampling(config, ev.max_new_tokens, answers.FIRST_STAGE_STOPS,
                                         k), thoughts=thoughts, progress=bar)
    second_prompts = [answers.answer_stage_prompt(task, p, g.text)
                      for p, g in zip(prompts, first)]
    second = lm.sample(second_prompts, _sampling(config, ZERO_SHOT_ANSWER_TOKENS, (), k),
                       thoughts=thoughts)
    reasons.append([g.text for g in first])
    votes.append([answers.extract_zero_shot_answer(task, g.text) for g in second])
  out = []
  for i, ex in enumerate(items):
    pred = answers.majority_vote([v[i] for v in votes])
    out.append({"question": ex.question, "gold": ex.answer, "prediction": pred,
                "score": float(answers.is_correct(task, pred, ex.answer)),
                "generations": [r[i] for r in reasons]})
  return out


METRIC_FNS = {"paper": paper, "few_shot": few_shot, "zero_shot": zero_shot}


def _sampling(config, max_new: int, stop, vote: int) -> sampling.SamplingConfig:
  ev = config.eval
  return sampling.SamplingConfig(max_new_tokens=max_new, temperature=ev.temperature,
                                 top_p=ev.top_p, stop=tuple(stop), seed=config.seed + vote)


# ------------------------------------------------------------------------------- the stage


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs the evaluations `config.eval` names on `config.init_from`; returns the metrics."""
  run_lib.setup_logging()
  _check(config)
  ev = config.eval
  metrics = _metrics(config)
  mesh = run_lib.make_run_mesh(config)
  lm = LanguageModel.load(config.init_from, tokenizer=config.tokenizer, mesh=mesh,
                          n_ahead=ev.n_ahead, batch_size=ev.batch_size,
                          max_length=ev.max_length, seed=config.seed)
  modes = {"both": (False, True), "on": (True,), "off": (False,)}[ev.thoughts]
  if not lm.has_thoughts:
    if ev.thoughts == "on":
      raise UserError("config.eval.thoughts='on' but the model has no Quiet-STaR parameters")
    modes = (False,)
  items = load_items(config)
  if not items:
    raise UserError(f"no evaluation items for task {ev.task!r}")
  logging.info("eval: %d %s items, metrics %s, thoughts %s", len(items), ev.task, metrics, modes)

  results, rows = {}, []
  is_main = jax.process_index() == 0
  total = sum(len(items) * (1 if m == "paper" else ev.num_samples) for m in metrics) * len(modes)
  bar = tqdm.tqdm(total=total, desc="eval", disable=not is_main, unit="item")
  for metric in metrics:
    for thoughts in modes:
      name = f"{metric}{'_thoughts' if thoughts else ''}"
      per_item = METRIC_FNS[metric](lm, config, items, thoughts, bar.update)
      results[name] = float(np.mean([r["score"] for r in per_item]))
      rows += [{"metric": name, "index": i, **r} for i, r in enumerate(per_item)]
  bar.close()

  summary = {"task": ev.task, "model": config.init_from, "num_items": len(items),
             "thought_model": lm.has_thoughts, "metrics": results, "config": config.to_dict()}
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2, default=str)
    with open(os.path.join(workdir, "predictions.jsonl"), "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, default=_plain) + "\n")
    print(format_table(ev.task, len(items), results))
  return results


def format_table(task: str, num_items: int, results: dict[str, float]) -> str:
  """| metric | no thoughts | with thoughts | for the metrics in `results`."""
  names = [m for m in METRICS if m in results or f"{m}_thoughts" in results]
  cell = lambda k: f"{results[k]:.4f}" if k in results else "-"
  lines = [f"{task}, {num_items} items", "| metric | no thoughts | with thoughts |",
           "|---|---|---|"]
  lines += [f"| {m} | {cell(m)} | {cell(m + '_thoughts')} |" for m in names]
  return "\n".join(lines)


def _plain(x):
  return x.item() if isinstance(x, np.generic) else str(x)


