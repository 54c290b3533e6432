"""The `star` stage: the STaR bootstrap loop (spec/star.md §1) on CommonsenseQA, GSM8K or
scratchpad addition.

  python launch/tpu.py --config=configs/star_arithmetic_tiny.py --workdir=workdirs/star_tiny

Iteration n = 1 .. config.star.num_iterations:
  1. generate: M_{n-1} (M_0 = config.init_from) writes a rationale for `n_train_samples`
     training items drawn with (seed, n); the failures are rationalized with the hint; the kept
     examples, without the hint, are iteration n's fine-tuning set (`rationales.py`);
  2. fine-tune: always from M_0, for steps(n) optimizer steps (`num_steps`: 40 * 1.2^(n-1) by
     default) of config.batch_size packed rows of star.seq_len tokens, with config.optim
     (the paper's lr 1e-6, 100 warm-up steps then constant, Adam, clip 1.0);
  3. evaluate: greedy accuracy on the dev items with the same prompt and no hint.
The loop stops after `patience` iterations without a better dev accuracy; the best iteration is
recorded in star.json and linked as `best`. With `eval_base`, M_0 is evaluated first (row 0 of
the table).

The workdir:
  star.json                progress: per-iteration statistics, accuracies, timings, the best
  base/dev/NNNN.json       M_0's dev predictions (eval_base), one file per chunk of items
  iter_NNN/gen/NNNN.json   the pass's items, one file per chunk of `chunk` items
  iter_NNN/train.jsonl     the fine-tuning set: {index, source, prompt, completion}
  iter_NNN/checkpoints/    the fine-tuning run: iter_NNN is a jaxstar run directory
                           (`jaxstar.evals.lm.LanguageModel.load`, or `--config.init_from`
                           of another stage)
  iter_NNN/dev/NNNN.json   M_n's dev predictions
  best -> iter_NNN

Resuming: each chunk of generation or evaluation is written atomically when done, fine-tuning
checkpoints as every stage's, and star.json after every phase; rerunning the same command skips
what is on disk. Generation is deterministic (greedy by default, seeded draws otherwise), so a
resumed run ends with the same fine-tuning sets and parameters as an uninterrupted one.

Several processes: every process makes every call (the sampler shards rows over the mesh and
gives every process all results; fine-tuning shards its batch); process 0 writes the files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from jaxstar import checkpoint
from jaxstar import model as model_lib
from jaxstar import run_lib
from jaxstar import sampling
from jaxstar import sharding
from jaxstar import tokenizer as tokenizer_lib
from jaxstar import train_lib
from jaxstar.data import sft
from jaxstar.data import tasks
from jaxstar.errors import UserError
from jaxstar.star import rationales

STEP_RULES = ("exponential", "linear")
KEEP = ("best", "all")
STATE_FILE = "star.json"
# Fields that fix what a run computes: a rerun in the same workdir must not change them.
FIXED_FIELDS = ("task", "n_train_samples", "rationalize", "hint_whole_solution",
                "few_shot_train", "loss_on", "seq_len", "temperature", "top_p",
                "max_new_tokens", "chunk")


# ---------------------------------------------------------------------------------- config


def num_steps(star_cfg, n: int) -> int:
  """Fine-tuning steps of iteration n (spec §1.8): 'exponential' int(start * grow^(n-1)) (the
  paper's 40, 48, 57, ...), 'linear' start + add * (n-1) (its arithmetic runs: 300 + 20(n-1));
  at most `max_steps` when that is set."""
  rule = star_cfg.steps_rule
  if rule == "exponential":
    steps = int(star_cfg.start_steps * star_cfg.grow_steps ** (n - 1))
  elif rule == "linear":
    steps = int(star_cfg.start_steps + star_cfg.add_steps * (n - 1))
  else:
    raise UserError(f"config.star.steps_rule={rule!r}; choose one of {STEP_RULES}")
  if star_cfg.max_steps:
    steps = min(steps, int(star_cfg.max_steps))
  return max(steps, 1)


def _check(config) -> None:
  st = config.star
  rationales.check_task(st.task)
  if st.steps_rule not in STEP_RULES:
    raise UserError(f"config.star.steps_rule={st.steps_rule!r}; choose one of {STEP_RULES}")
  if st.keep_checkpoints not in KEEP:
    raise UserError(f"config.star.keep_checkpoints={st.keep_checkpoints!r}; choose one of "
                    f"{KEEP}")
  if st.loss_on not in sft.LOSS_ON:
    raise UserError(f"config.star.loss_on={st.loss_on!r}; choose one of {sft.LOSS_ON}")
  for name in ("num_iterations", "n_train_samples", "chunk", "seq_len", "start_steps"):
    if st[name] < 1:
      raise UserError(f"config.star.{name}={st[name]} must be >= 1")
  if st.patience < 0:
    raise UserError(f"config.star.patience={st.patience} must be >= 0 (0: never stop early)")
  if not (config.init_from or config.get("compile_only")):
    raise UserError("config.init_from is empty: name the base model (a jaxstar run directory "
                    "or a Hugging Face Mistral folder) that every iteration fine-tunes")


def make_task(config):
  """The `rationales` task of `config.star` (arithmetic: up to its largest digit count)."""
  st = config.star
  ar = st.arithmetic
  return rationales.make_task(st.task, hint_whole_solution=st.hint_whole_solution,
                              prompt_path=st.prompt_path, hint_prompt_path=st.hint_prompt_path,
                              shots=ar.shots, exemplar_pool=ar.exemplar_pool, seed=config.seed,
                              max_digits=max(parse_digits(ar.digits)))


def parse_digits(spec: str) -> list[int]:
  """'1-4' or '1,2,5' -> the digit counts."""
  try:
    if "-" in spec:
      lo, hi = (int(x) for x in spec.split("-"))
      out = list(range(lo, hi + 1))
    else:
      out = [int(x) for x in spec.split(",") if x.strip()]
  except ValueError:
    out = []
  if not out or min(out) < 1:
    raise UserError(f"config.star.arithmetic.digits={spec!r}: give a range '1-4' or a list "
                    "'1,2,3' of digit counts >= 1")
  return out


def load_data(config) -> tuple[list[tasks.Example], list[tasks.Example]]:
  """(the training pool, the dev items) of config.star.task."""
  st = config.star
  if st.task == "arithmetic":
    ar = st.arithmetic
    digits = parse_digits(ar.digits)
    pool = [ex for d in digits
            for ex in tasks.generate_addition(ar.pool_per_length, d, seed=config.seed)]
    seen = {(ex.raw["a"], ex.raw["b"]) for ex in pool}
    dev = [ex for d in digits
           for ex in tasks.generate_addition(ar.dev_per_length, d, seed=config.seed + 1)
           if (ex.raw["a"], ex.raw["b"]) not in seen]       # held out: no training problem
    if not pool or not dev:
      raise UserError("config.star.arithmetic: pool_per_length and dev_per_length must be "
                      ">= 1")
    return pool, dev
  train = tasks.load_task(st.task, "train", st.train_path, config_field="star.train_path").rows
  split = st.dev_split or tasks.TASK_SPLITS[st.task][-1]
  dev = tasks.load_task(st.task, split, st.dev_path, max_rows=st.dev_limit,
                        config_field="star.dev_path").rows
  unlabelled = sum(not ex.answer for ex in dev)
  if unlabelled:
    raise UserError(f"config.star.dev_path: {unlabelled} of {len(dev)} dev items have no "
                    "answer (an unlabelled test split?)")
  return list(train), list(dev)


def draw(n_items: int, n: int, iteration: int, seed: int) -> list[int]:
  """The training items of iteration `iteration`: n of them, in a seeded random order."""
  order = np.random.default_rng([seed, 77, iteration]).permutation(n_items)
  return order[:n].tolist()


# -------------------------------------------------------------------------------- progress


class Progress:
  """star.json: what is done. Every process reads it at start; process 0 writes it."""

  def __init__(self, workdir: str, fixed: dict[str, Any]):
    self.path = os.path.join(workdir, STATE_FILE)
    self.data: dict[str, Any] = {"fixed": fixed, "base": None, "iterations": {}}
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        saved = json.load(f)
      changed = {k: (saved["fixed"].get(k), v) for k, v in fixed.items()
                 if saved["fixed"].get(k) != v}
      if changed:
        raise UserError(f"{workdir} holds a STaR run with other settings ("
                        + ", ".join(f"config.star.{k}: {a!r} there, {b!r} now"
                                    for k, (a, b) in changed.items())
                        + "); use its settings or a new --workdir")
      self.data = saved

  def iteration(self, n: int) -> dict[str, Any]:
    """Iteration `n`'s record, added (holding only its number) when missing."""
    return self.data["iterations"].setdefault(str(n), {"iteration": n})

  def done_iterations(self) -> list[dict[str, Any]]:
    """The records of the iterations evaluated on dev, in iteration order."""
    rows = [r for r in self.data["iterations"].values() if "dev" in r]
    return sorted(rows, key=lambda r: r["iteration"])

  def save(self) -> None:
    """Writes star.json atomically (process 0 only)."""
    if jax.process_index() == 0:
      _write_json(self.path, self.data)


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def best_iteration(progress: Progress) -> tuple[int, float]:
  """(n, dev accuracy) of the best finished iteration (the first of equals); (0, -1.0) before
  any."""
  best_n, best = 0, -1.0
  for r in progress.done_iterations():
    if r["dev"]["accuracy"] > best:
      best_n, best = r["iteration"], r["dev"]["accuracy"]
  return best_n, best


def patience_exhausted(progress: Progress, patience: int) -> bool:
  """True when the last `patience` finished iterations did not improve on the best dev
  accuracy before them (the base model's counts, when evaluated)."""
  if not patience:
    return False
  base = progress.data["base"]
  best = base["accuracy"] if base else -1.0
  since = 0
  for r in progress.done_iterations():
    if r["dev"]["accuracy"] > best:
      best, since = r["dev"]["accuracy"], 0
    else:
      since += 1
  return since >= patience


# ---------------------------------------------------------------------------- chunked work


def chunked(out_dir: str, n_items: int, chunk: int,
            compute: Callable[[int, int], list[dict]]) -> tuple[list[dict], float]:
  """`compute(lo, hi)` for consecutive chunks of [0, n_items), each saved atomically as
  out_dir/NNNN.json; chunks already there are read instead. Returns (all rows, seconds spent
  computing them, over every run that did)."""
  rows, seconds = [], 0.0
  for c, lo in enumerate(range(0, n_items, chunk)):
    path = os.path.join(out_dir, f"{c:04d}.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    else:
      start = time.perf_counter()
      saved = {"lo": lo, "rows": compute(lo, min(lo + chunk, n_items)),
               "time_s": time.perf_counter() - start}
      if jax.process_index() == 0:
        _write_json(path, saved)
    rows += saved["rows"]
    seconds += saved["time_s"]
  return rows, seconds


def accuracy(rows: Sequence[dict]) -> dict[str, Any]:
  """{accuracy, items, by_group: {group: accuracy}} of rows with 'right' and 'group'."""
  groups: dict[str, list[bool]] = {}
  for r in rows:
    groups.setdefault(r["group"], []).append(r["right"])
  return {"accuracy": float(np.mean([r["right"] for r in rows])) if rows else 0.0,
          "items": len(rows),
          "by_group": {g: float(np.mean(v)) for g, v in sorted(groups.items())}}


class Generator:
  """M_n's batched sampler, as `rationales.generate_pass` calls it (`sample`); `params` can be
  swapped for a fine-tuned copy without recompiling (same shapes and shardings)."""

  def __init__(self, model_cfg, tokenizer, mesh, batch_size: int, max_len: int):
    self.sampler = sampling.Sampler(sampling.PlainDecoder(model_cfg), None, tokenizer,
                                    mesh=mesh, batch_size=batch_size, max_len=max_len)
    self.of = -1     # which M_n the params are (-1: none)

  def set_params(self, params, n: int) -> None:
    """Samples with `params`, the params of M_n, from now on."""
    self.sampler.params, self.of = params, n

  def sample(self, prompts, cfg: sampling.SamplingConfig, progress=None):
    """One `sampling.Generation` per prompt, in prompt order (`Sampler.generate`)."""
    return self.sampler.generate(prompts, cfg, progress=progress)


def evaluate(lm: Generator, task, dev: Sequence[tasks.Example], cfg: sampling.SamplingConfig,
             out_dir: str, chunk: int, desc: str) -> dict[str, Any]:
  """Greedy (cfg) dev accuracy with the few-shot prompt, no hint; predictions in out_dir."""
  bar = tqdm.tqdm(total=len(dev), desc=desc, unit="item", disable=jax.process_index() != 0)

  def compute(lo, hi):
    exs = dev[lo:hi]
    gens = lm.sample([task.prompt(ex) for ex in exs], cfg, progress=bar.update)
    out = []
    for i, (ex, gen) in enumerate(zip(exs, gens)):
      right, pred = task.check(task.completion(gen.text), ex)
      out.append({"index": lo + i, "group": task.group(ex), "gold": ex.answer,
                  "prediction": pred, "right": bool(right), "text": gen.text,
                  "tokens": len(gen.tokens)})
    return out

  rows, seconds = chunked(out_dir, len(dev), chunk, compute)
  bar.close()
  tokens = sum(r["tokens"] for r in rows)
  return {**accuracy(rows), "time_s": seconds, "tokens": tokens,
          "tokens_per_s": tokens / max(seconds, 1e-9)}


def generate(lm: Generator, task, pool: Sequence[tasks.Example], indices: Sequence[int],
             cfg: sampling.SamplingConfig, out_dir: str, chunk: int, rationalize: bool,
             desc: str) -> tuple[list[rationales.Item], dict[str, Any]]:
  """The generation pass over pool[indices], chunk by chunk; (items, summary)."""
  bar = tqdm.tqdm(total=len(indices), desc=desc, unit="item", disable=jax.process_index() != 0)

  def compute(lo, hi):
    exs = [pool[i] for i in indices[lo:hi]]
    items = rationales.generate_pass(lm, task, exs, cfg, rationalize=rationalize)
    bar.update(len(exs))
    return [{**dataclasses.asdict(it), "index": lo + it.index, "pool_index": indices[lo + k],
             "group": task.group(ex), "right": it.source == "direct"}
            for k, (it, ex) in enumerate(zip(items, exs))]

  rows, seconds = chunked(out_dir, len(indices), chunk, compute)
  bar.close()
  fields = {f.name for f in dataclasses.fields(rationales.Item)}
  items = [rationales.Item(**{k: v for k, v in r.items() if k in fields}) for r in rows]
  tokens = sum(it.tokens for it in items)
  summary = {**rationales.statistics(items, rationalize),
             "train_accuracy": accuracy(rows), "time_s": seconds, "tokens": tokens,
             "tokens_per_s": tokens / max(seconds, 1e-9)}
  return items, summary


# ----------------------------------------------------------------------------- fine-tuning


def finetune(config, workdir: str, examples: Sequence[sft.Example], steps: int, n: int):
  """Fine-tunes config.init_from on `examples` for `steps` steps into `workdir` (resuming its
  checkpoints); returns (params, summary)."""
  st = config.star
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.num_steps, sub.eval_every, sub.create_init_from = steps, 0, ""
  sub.seed = config.seed + n
  with run_lib.Run(sub, workdir) as run:
    module = model_lib.Transformer(run.model_cfg)
    optimizer = run.optimizer()

    init_state = train_lib.lm_init_state(module, optimizer, sub.seed)
    abstract, shardings = run.shard(init_state, f"STaR iteration {n} fine-tuning")

    shape = (config.batch_size, st.seq_len)   # the packed rows of sft.sft_dataset
    train_step = run.jit_train_step(train_lib.lm_loss_fn(module), optimizer, shardings,
                                    {k: shape for k in sft.BATCH_KEYS})
    data = sft.sft_dataset(run.tok, examples, seq_len=st.seq_len,
                           global_batch_size=config.batch_size, loss_on=st.loss_on,
                           seed=sub.seed, process_index=jax.process_index(),
                           process_count=jax.process_count())
    data_iter, num_rows = data.iterator(), data.rows_per_epoch
    state = run.restore(abstract, shardings, data_iter, init_state=init_state,
                        from_params=lambda p: train_lib.init_train_state(p, optimizer,
                                                                         sub.seed))
    start = time.perf_counter()
    summary = run.loop(state, train_step, data_iter, desc=f"fine-tune {n}",
                       tokens_per_step=config.batch_size * st.seq_len)
    summary.update(packed_rows=num_rows, examples=len(examples),
                   epochs=steps * config.batch_size / num_rows)
    params = run.state.params
    del run.state
  return params, summary, time.perf_counter() - start


# ------------------------------------------------------------------------------- the stage


def _iter_dir(workdir: str, n: int) -> str:
  return os.path.join(workdir, f"iter_{n:03d}")


def _load_params(path: str, target, model_cfg):
  try:
    return run_lib.load_init_params(path, target, model_cfg)
  except (checkpoint.NoGoodCheckpointError, ValueError) as e:
    raise UserError(f"{path!r} does not fit this config's model: {e}") from e


def _mark_best(workdir: str, n: int) -> None:
  if jax.process_index() != 0 or n < 1:
    return
  link, tmp = os.path.join(workdir, "best"), os.path.join(workdir, "best.tmp")
  if os.path.lexists(tmp):
    os.remove(tmp)
  os.symlink(os.path.basename(_iter_dir(workdir, n)), tmp)
  os.replace(tmp, link)


def _prune(workdir: str, progress: Progress, latest: int) -> None:
  """keep_checkpoints='best': drops the checkpoints of finished iterations that are neither the
  best nor the latest (which the next iteration generates with)."""
  best, _ = best_iteration(progress)
  if jax.process_index() != 0:
    return
  for r in progress.done_iterations():
    n = r["iteration"]
    ckpt = os.path.join(_iter_dir(workdir, n), "checkpoints")
    if n not in (best, latest) and os.path.isdir(ckpt):
      shutil.rmtree(ckpt)
      logging.info("removed the checkpoints of iteration %d (keep_checkpoints='best')", n)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the STaR loop `config.star` describes in `workdir`; returns the
  progress record (star.json)."""
  run_lib.setup_logging()
  run_lib.validate_config(config)
  _check(config)
  if config.get("compile_only"):  # the fine-tuning step alone: no data, weights or sampling
    finetune(config, workdir, [], 1, 1)
  st = config.star
  task = make_task(config)
  pool, dev = load_data(config)
  progress = Progress(workdir, {k: st[k] for k in FIXED_FIELDS})
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  try:
    tok = tokenizer_lib.get_tokenizer(config.tokenizer)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"config.tokenizer={config.tokenizer!r}: {e}") from None
  model_cfg = run_lib.model_config_from(config, tok)
  mesh = run_lib.make_run_mesh(config)
  abstract = jax.eval_shape(lambda r: model_lib.Transformer(model_cfg).init(
      r, jnp.zeros((1, 1), jnp.int32))["params"], jax.random.key(0))
  target = run_lib.with_shardings(abstract, sharding.shardings_for(abstract, mesh))
  cfg = sampling.SamplingConfig(max_new_tokens=st.max_new_tokens or task.max_new_tokens,
                                temperature=st.temperature, top_p=st.top_p, stop=task.stop,
                                seed=config.seed)
  logging.info("STaR on %s: %d training items (%d per iteration), %d dev items, up to %d "
               "iterations", st.task, len(pool), min(st.n_train_samples, len(pool)), len(dev),
               st.num_iterations)

  lm = Generator(model_cfg, tok, mesh, st.batch_size, st.max_length)

  def model(n: int, params=None) -> Generator:
    """M_n (0: the base model) in the sampler, loaded unless given or already there."""
    if lm.of != n or params is not None:
      if params is None:
        params = _load_params(config.init_from if n == 0 else _iter_dir(workdir, n), target,
                              model_cfg)
      lm.set_params(params, n)
    return lm

  if st.eval_base and progress.data["base"] is None:
    progress.data["base"] = evaluate(model(0), task, dev, cfg,
                                     os.path.join(workdir, "base", "dev"), st.chunk,
                                     "dev, base model")
    progress.save()
    logging.info("base model: dev accuracy %.4f", progress.data["base"]["accuracy"])

  for n in range(1, st.num_iterations + 1):
    rec = progress.iteration(n)
    if "dev" in rec:
      continue
    if patience_exhausted(progress, st.patience):
      progress.data["stopped"] = (f"no better dev accuracy in the last {st.patience} "
                                  "iterations")
      logging.info("stopping: %s", progress.data["stopped"])
      break
    out = _iter_dir(workdir, n)
    rec["steps"] = num_steps(st, n)
    # ---------------------------------------------------------------------- 1. generate
    train_set = os.path.join(out, "train.jsonl")
    if "generation" not in rec:
      indices = draw(len(pool), st.n_train_samples, n, config.seed)
      items, summary = generate(model(n - 1), task, pool, indices,
                                dataclasses.replace(cfg, seed=config.seed + n),
                                os.path.join(out, "gen"), st.chunk, st.rationalize,
                                f"iteration {n}: rationales")
      if is_main:
        rationales.write_examples(train_set, items, task, few_shot_train=st.few_shot_train)
      # Every process has the items; none waits for process 0's file.
      examples = [sft.Example(r["prompt"], r["completion"])
                  for r in rationales.kept_examples(items, task, st.few_shot_train)]
      rec["generation"] = summary
      progress.save()
      logging.info("iteration %d: %s", n, rationales.format_table([{"iteration": n,
                                                                     **summary}]))
    elif rec["generation"]["kept"]:
      examples = sft.read_examples(train_set)
    if not rec["generation"]["kept"]:
      raise UserError(f"STaR iteration {n} kept no example: M_{n - 1} answered none of the "
                      f"{rec['generation']['attempted']} training items right, even with the "
                      "hint. STaR needs a base model whose few-shot accuracy is above zero")
    # ---------------------------------------------------------------------- 2. fine-tune
    lm.set_params(None, -1)     # M_{n-1} need not stay in memory while M_0 is fine-tuned
    params, ft, seconds = finetune(config, out, examples, rec["steps"], n)
    if "finetune" not in rec:
      rec["finetune"] = {"time_s": seconds, "loss": ft.get("loss"), "steps": rec["steps"],
                         "examples": ft["examples"], "packed_rows": ft["packed_rows"],
                         "epochs": ft["epochs"], "tokens_per_s": ft.get("tokens_per_s")}
      progress.save()
    # ---------------------------------------------------------------------- 3. evaluate
    rec["dev"] = evaluate(model(n, params), task, dev, cfg, os.path.join(out, "dev"), st.chunk,
                          f"dev, iteration {n}")
    del params
    best_n, _ = best_iteration(progress)
    progress.data["best_iteration"] = best_n
    progress.save()
    _mark_best(workdir, best_n)
    if st.keep_checkpoints == "best":
      _prune(workdir, progress, n)
    logging.info("iteration %d: dev accuracy %.4f (best: iteration %d)\n%s", n,
                 rec["dev"]["accuracy"], best_n, format_table(progress))
  else:
    progress.data.setdefault("stopped", f"ran all {st.num_iterations} iterations")
  progress.save()
  if is_main:
    print(format_table(progress))
  return progress.data


def format_table(progress: Progress) -> str:
  """The per-iteration table: training-set statistics, dev accuracy (per group when there are
  several), and the wall time of each phase."""
  base = progress.data["base"]
  done = progress.done_iterations()
  groups = sorted({g for r in done for g in r["dev"]["by_group"]}
                  | set(base["by_group"] if base else ()), key=_group_key)
  show_groups = len(groups) > 1
  head = ["iter", "steps", "correct", "rationalized", "kept", "dev acc"]
  head += [f"dev {g}" for g in groups] if show_groups else []
  head += ["gen s", "gen tok/s", "fine-tune s", "eval s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

  def acc_cells(dev):
    cells = [f"{dev['accuracy']:.3f}"]
    if show_groups:
      cells += [f"{dev['by_group'][g]:.3f}" if g in dev["by_group"] else "-" for g in groups]
    return cells

  if base:
    lines.append("| " + " | ".join(["0 (base)", "-", "-", "-", "-", *acc_cells(base), "-", "-",
                                    "-", f"{base['time_s']:.1f}"]) + " |")
  best = progress.data.get("best_iteration")
  for r in done:
    g, f = r["generation"], r["finetune"]
    name = f"{r['iteration']}{' *' if r['iteration'] == best else ''}"
    lines.append("| " + " | ".join([
        name, str(r["steps"]), f"{g['correct']}/{g['attempted']}",
        f"{g['rationalized']}/{g['rationalization_attempts']}", str(g["kept"]),
        *acc_cells(r["dev"]), f"{g['time_s']:.1f}", f"{g['tokens_per_s']:.0f}",
        f"{f['time_s']:.1f}", f"{r['dev']['time_s']:.1f}"]) + " |")
  return "\n".join(lines)


def _group_key(g: str):
  head = g.split(" ", 1)[0]
  return (0, int(head), g) if head.isdigit() else (1, 0, g)
