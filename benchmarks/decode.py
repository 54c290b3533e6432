"""Decoding speed: plain KV-cache sampling beside Hugging Face `generate`, thought-augmented
decoding, and the two paths of the Quiet-STaR paper metric, in one process and one table.

  python -m benchmarks.decode [--quick] [--skip_hf] [--repeats 5]

Model: the `benchmarks/quietstar_step` model (h=256, 4 layers, 8 query / 4 kv heads, head_dim
32, ffn 512, vocab 4096), fp32, random weights (seed 0) with a random non-zero kernel in the
mixing head's last layer (it is zero at init, which would make every thought a no-op).

  plain       `Sampler` + `PlainDecoder`, greedy, 128-token prompts of random ids in [3, 4096),
              64 new tokens, batch 1 / 8 / 64; beside it `MistralForCausalLM.generate` (greedy,
              KV cache) on the same weights exported with `hf_io.save_hf`, same prompts, timed
              in turns with jaxstar. tokens/s = batch * 64 / median seconds of a whole call
              (prefill included) after a warm-up call that compiles.
  thought     `ThoughtDecoder` (n_ahead = A, thoughts drawn at temperature 1), A = 8 and 12,
              batch 1 and 8; "plain steps per token" = its seconds / the plain decoder's at the
              same batch (the target is A + 1: T = A - 3 thought tokens plus start, end and
              the token itself, each at most one plain step).
  paper       the paper metric on 100 GSM8K items (the 20 of tests/testdata cycled), byte ids
              of `paper_prompt` with BOS, right-padded to 256 (cropped from the left if
              longer), A = 12, greedy thoughts, batches of 10: (a) `mixed_logits_at`, thoughts
              at the answer positions only; (b) `QuietStarModel.__call__`, thoughts at every
              position (chunk_positions 0 and the default 32). Seconds per item cover the
              device program and the host-side scoring (`answer_probability`).

The generation ids: no text tokenizer covers the 4096 ids of the model, so prompts go in as id
lists and a stand-in tokenizer (`_Ids`) names the special ids. Its EOS is the start-thought id,
which the sampler never draws (it masks ids >= the first thought id), so every row runs the
full 64 tokens; the lengths are checked.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(ROOT, "tests", "testdata", "gsm8k_test.jsonl")
PROMPT_LEN, NEW_TOKENS, PLAIN_BATCHES = 128, 64, (1, 8, 64)
THOUGHT_AHEAD, THOUGHT_BATCHES = (8, 12), (1, 8)
PAPER_ITEMS, PAPER_LEN, PAPER_BATCH, PAPER_AHEAD = 100, 256, 10, 12
START, END = 4094, 4095            # the thought ids: the last two of the vocabulary
BOS, INIT_ID = 1, 3 + ord("-")     # INIT_ID: the byte tokenizer's '-' ('---' inits thoughts)
# The official implementation's rates (the project's reference points), and jaxstar's aims.
OFFICIAL_TOK_S, AIM_TOK_S = 1.36, 27.0
OFFICIAL_S_ITEM, AIM_S_ITEM = 1.13, 0.06


class _Ids:
  """The tokenizer interface `Sampler` uses, over the model's full 4096 ids. Prompts are id
  lists; `encode` (bytes as the byte tokenizer's ids) serves only `stop_token_sequences`, which
  the sampler calls even without stop strings. EOS = START: never drawn (module docstring)."""
  vocab_size, bos_id, start_thought_id, end_thought_id = 4096, BOS, START, END
  eos_id = pad_id = START
  unk_id = 0

  def encode(self, text, bos=False, eos=False):
    return [self.bos_id] * bos + [3 + b for b in text.encode()] + [self.eos_id] * eos

  def decode(self, ids):
    return " ".join(map(str, ids))


def _median_times(fns, repeats):
  """Median wall seconds of each of `fns` (called in turns, so a slow spell of a shared
  machine hits them alike) after one warm-up call each; also each one's last output."""
  outs = [fn() for fn in fns]
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      outs[i] = fn()
      times[i].append(time.perf_counter() - start)
  return [float(np.median(t)) for t in times], outs


def _cpu_name() -> str:
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def build(seed: int = 0):
  """(cfg, QuietStarModel params with a live mixing head)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from benchmarks import quietstar_step  # pylint: disable=g-import-not-at-top
  from jaxstar import model as model_lib  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import config as qs_config  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import thoughts  # pylint: disable=g-import-not-at-top

  cfg = model_lib.ModelConfig(**quietstar_step.MODEL)
  model = thoughts.QuietStarModel(cfg, qs_config.QuietStarConfig(), START, END, INIT_ID)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 2), jnp.int32),
                      method=thoughts.QuietStarModel.init_all)["params"]
  params = nn.unbox(params)
  # The mixing head's out_proj starts at zero (the model is then the base model); a random
  # kernel makes the post-thought state count, as after training. Its scale puts the mixing
  # weights around +-0.1..1 (printed in the header).
  kernel = params["mixing"]["out_proj"]["kernel"]
  params["mixing"]["out_proj"]["kernel"] = 0.1 * jax.random.normal(
      jax.random.key(seed + 1), kernel.shape, kernel.dtype)
  return cfg, jax.device_get(params)


def bench_plain(cfg, params, prompts, repeats, skip_hf, notes):
  """Rows of part 1, {batch: plain seconds} and {batch: jaxstar / HF tokens/s}."""
  from jaxstar import sampling  # pylint: disable=g-import-not-at-top

  sampling_cfg = sampling.SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, stop=())
  hf = None
  if not skip_hf:  # torch is imported only for the comparison
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    from jaxstar.model import hf_io  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count() or 1)
    transformers.utils.logging.disable_progress_bar()  # keeps the printed output a table
    with tempfile.TemporaryDirectory() as folder:
      hf_io.save_hf(params["lm"], cfg, folder)
      # transformers 5 renamed torch_dtype to dtype (the old name logs a deprecation warning).
      hf = transformers.MistralForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf.eval()

  rows, plain_seconds, vs_hf = [], {}, {}
  for batch in PLAIN_BATCHES:
    sampler = sampling.Sampler(sampling.PlainDecoder(cfg), params["lm"], _Ids(),
                               batch_size=batch)
    ids = prompts[:batch]
    id_lists = ids.tolist()
    fns = [lambda: sampler.generate(id_lists, sampling_cfg)]
    if hf is not None:
      input_ids = torch.from_numpy(ids.astype(np.int64))

      def hf_generate():
        # min_new_tokens and EOS = START keep every row running; suppressing END gives HF
        # the same candidate ids as jaxstar (which masks both thought ids).
        return hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           do_sample=False, use_cache=True, max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, eos_token_id=START, pad_token_id=START,
                           suppress_tokens=[END])
      fns.append(hf_generate)
    times, outs = _median_times(fns, repeats)
    plain_seconds[batch] = times[0]
    lengths = {len(g.tokens) for g in outs[0]}
    if lengths != {NEW_TOKENS}:
      notes.append(f"plain batch {batch}: generated lengths {sorted(lengths)}, not all "
                   f"{NEW_TOKENS}")
    rate = batch * NEW_TOKENS / times[0]
    row = ["plain: jaxstar Sampler+PlainDecoder", batch, f"{times[0]:.3f}", f"{rate:.0f} tok/s"]
    if hf is not None:
      hf_tokens = outs[1][:, PROMPT_LEN:].numpy()
      if hf_tokens.shape != (batch, NEW_TOKENS):
        notes.append(f"HF batch {batch}: generated shape {hf_tokens.shape}")
      ours = np.array([g.tokens for g in outs[0]])
      same = float(np.mean(ours == hf_tokens)) if ours.shape == hf_tokens.shape else 0.0
      notes.append(f"plain batch {batch}: greedy tokens equal to HF's at {100 * same:.1f}% of "
                   "positions (a near-tie flips the rest of a row)")
      hf_rate = batch * NEW_TOKENS / times[1]
      vs_hf[batch] = rate / hf_rate
      row += [f"HF generate {hf_rate:.0f} tok/s ({times[1]:.3f} s)", f"{rate / hf_rate:.2f}x",
              ">= 1x at batch 1" if batch == 1 else ""]
    else:
      row += ["(HF skipped)", "", ""]
    rows.append(row)
  return rows, plain_seconds, vs_hf


def bench_thought(cfg, params, prompts, repeats, plain_seconds, notes):
  """Rows of part 2 and {(A, batch): tokens/s}."""
  from jaxstar import sampling  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import config as qs_config  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import decoding  # pylint: disable=g-import-not-at-top

  sampling_cfg = sampling.SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, stop=())
  rows, rates = [], {}
  for ahead in THOUGHT_AHEAD:
    qs = qs_config.QuietStarConfig(n_ahead=ahead, n_ahead_talk=1, n_passes=1)
    decoder = decoding.ThoughtDecoder(cfg, qs, START, END, INIT_ID)
    for batch in THOUGHT_BATCHES:
      sampler = sampling.Sampler(decoder, params, _Ids(), batch_size=batch)
      ids = prompts[:batch].tolist()
      (seconds,), (gens,) = _median_times([lambda: sampler.generate(ids, sampling_cfg)],
                                          repeats)
      lengths = {len(g.tokens) for g in gens}
      if lengths != {NEW_TOKENS}:
        notes.append(f"thought A={ahead} batch {batch}: generated lengths {sorted(lengths)}")
      w = np.concatenate([g.aux["mix_weight"] for g in gens])
      notes.append(f"thought A={ahead} batch {batch}: mixing weight mean {w.mean():+.3f}, "
                   f"mean |w| {np.abs(w).mean():.3f} (non-zero: the thoughts change the tokens)")
      rate = batch * NEW_TOKENS / seconds
      rates[ahead, batch] = rate
      steps = seconds / plain_seconds[batch]
      rows.append([f"thought: ThoughtDecoder A={ahead} (T={ahead - 3})", batch, f"{seconds:.3f}",
                   f"{rate:.1f} tok/s", f"plain {batch * NEW_TOKENS / plain_seconds[batch]:.0f} "
                   "tok/s", f"{steps:.2f} plain steps/token", f"<= {ahead + 1}"])
  return rows, rates


def paper_inputs(paper_metric, tasks, tokenizer):
  """[items, 256] ids and mask, and per item (positions, targets) of the answer tokens."""
  examples = tasks.load_gsm8k(GSM8K).rows
  examples = [examples[i % len(examples)] for i in range(PAPER_ITEMS)]
  tokens = np.full((PAPER_ITEMS, PAPER_LEN), tokenizer.pad_id, np.int32)
  mask = np.zeros((PAPER_ITEMS, PAPER_LEN), bool)
  answers = []
  for i, ex in enumerate(examples):
    ids = tokenizer.encode(paper_metric.paper_prompt("gsm8k", ex), bos=True)[-PAPER_LEN:]
    tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
    answers.append(paper_metric.answer_targets(tokenizer, tokens[i], "gsm8k"))
  return tokens, mask, answers


def bench_paper(cfg, params, repeats, notes):
  """Rows of part 3 and {path: seconds per item}."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from jaxstar import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import config as qs_config  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import decoding  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import thoughts  # pylint: disable=g-import-not-at-top
  from jaxstar.data import tasks  # pylint: disable=g-import-not-at-top
  from jaxstar.evals import paper_metric  # pylint: disable=g-import-not-at-top

  tok = tokenizer_lib.get_tokenizer("bytes")
  valid = paper_metric.valid_answer_ids(tok, "gsm8k")
  tokens, mask, answers = paper_inputs(paper_metric, tasks, tok)
  c_max = max(len(p) for p, _ in answers)
  # Answer positions padded to C = the longest answer by repeating the last one (ignored).
  at = np.stack([np.pad(p, (0, c_max - len(p)), mode="edge") for p, _ in answers])
  key = jax.random.key(0)
  batches = [slice(s, s + PAPER_BATCH) for s in range(0, PAPER_ITEMS, PAPER_BATCH)]

  def model(chunk):
    qs = qs_config.QuietStarConfig(n_ahead=PAPER_AHEAD, n_ahead_talk=1, n_passes=1,
                                   chunk_positions=chunk)
    return thoughts.QuietStarModel(cfg, qs, tok.start_thought_id, tok.end_thought_id, INIT_ID)

  # The byte tokenizer's ids are the model's ids 0..260; its thought ids (259, 260) are what
  # the thought passes mask, so the model is built with them.
  m = model(32)

  def at_positions(p, t, k, pos, rng):
    mixed, _ = m.apply({"params": p}, t, k, pos, rng, greedy=True,
                       method=decoding.mixed_logits_at)
    return mixed

  def every_position(module):
    def fn(p, t, k, pos, rng):
      out = module.apply({"params": p}, t, k, rng, greedy=True, return_logits=True)
      # Only the answer positions leave the program; XLA drops the unused outputs.
      return jnp.take_along_axis(out["talk_logits"][:, :, 0], pos[..., None], axis=1)
    return fn

  paths = [("a", "answer positions (mixed_logits_at)", at_positions),
           ("b0", "every position (__call__, chunk_positions=0)", every_position(model(0))),
           ("b32", "every position (__call__, chunk_positions=32)", every_position(model(32)))]
  args0 = (params, tokens[batches[0]], mask[batches[0]], at[batches[0]], key)
  rows, per_item, scores = [], {}, {}
  for name, label, fn in paths:
    compiled = jax.jit(fn).lower(*args0).compile()
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20

    def score_all(compiled=compiled):
      out = []
      for s in batches:
        logits = np.asarray(compiled(params, tokens[s], mask[s], at[s], key))
        for row, (_, targets) in zip(logits, answers[s]):
          out.append(paper_metric.answer_probability(row[:len(targets)], targets, valid))
      return out
    (seconds,), (item_scores,) = _median_times([score_all], repeats)
    per_item[name] = seconds / PAPER_ITEMS
    scores[name] = np.asarray(item_scores)
    rows.append([f"paper metric ({name}) {label}", PAPER_BATCH, f"{seconds:.2f}",
                 f"{per_item[name]:.4f} s/item",
                 f"official {OFFICIAL_S_ITEM} s/item; XLA temp {temp_mib:.0f} MiB",
                 f"{OFFICIAL_S_ITEM / per_item[name]:.0f}x faster", f"<= {AIM_S_ITEM} s/item"])
  notes.append(f"paper metric: {PAPER_ITEMS} items, C = {c_max} answer positions at most, "
               f"metric {paper_metric.paper_metric(scores['a']):.4g} (random weights)")
  for name in ("b0", "b32"):
    diff = np.max(np.abs(scores["a"] - scores[name]))
    rel = np.max(np.abs(scores["a"] - scores[name]) / np.abs(scores["a"]))
    notes.append(f"paper metric sanity, greedy thoughts: max |p(a) - p({name})| = {diff:.2e} "
                 f"(relative {rel:.2e}) over {PAPER_ITEMS} items")
  return rows, per_item


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="2 timed repeats instead of 5")
  parser.add_argument("--repeats", type=int, default=0, help="timed repeats (overrides)")
  parser.add_argument("--skip_hf", action="store_true", help="no Hugging Face comparison")
  args = parser.parse_args()
  repeats = args.repeats or (2 if args.quick else 5)

  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from jaxstar import allocator  # pylint: disable=g-import-not-at-top
  versions = f"JAX {jax.__version__}, Flax {flax.__version__}"
  if not args.skip_hf:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    versions += (f", torch {torch.__version__} ({os.cpu_count()} threads), "
                 f"transformers {transformers.__version__}")
  print(f"# {_cpu_name()}, {os.cpu_count()} cores, {jax.default_backend()} backend; {versions}; "
        f"{allocator.describe()}; {repeats} timed repeats after a warm-up call", flush=True)

  cfg, params = build()
  prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (max(PLAIN_BATCHES),
                                                                   PROMPT_LEN))
  notes = []
  rows, plain_seconds, vs_hf = bench_plain(cfg, params, prompts, repeats, args.skip_hf, notes)
  thought_rows, rates = bench_thought(cfg, params, prompts, repeats, plain_seconds, notes)
  paper_rows, per_item = bench_paper(cfg, params, repeats, notes)

  print(f"# model {cfg.embed_dim}d x {cfg.num_layers} layers, vocab {cfg.vocab_size}, fp32; "
        f"{PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens, greedy; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  common.print_table(("case", "batch", "median s", "rate", "compared with", "ratio", "target"),
                     rows + thought_rows + paper_rows)
  for note in notes:
    print(f"# {note}")

  def status(ok):
    return "met" if ok else "MISSED"
  print("# targets")
  if vs_hf:
    ratio = vs_hf[1]
    print(f"#   plain decoding, batch 1, jaxstar / HF generate: {ratio:.2f}x "
          f"(target >= 1x): {status(ratio >= 1)}")
  for ahead in THOUGHT_AHEAD:
    for batch in THOUGHT_BATCHES:
      steps = batch * NEW_TOKENS / rates[ahead, batch] / plain_seconds[batch]
      print(f"#   thought cost, A={ahead} batch {batch}: {steps:.2f} plain steps per token "
            f"(target <= {ahead + 1}): {status(steps <= ahead + 1)}")
  rate = rates[12, 1]
  print(f"#   thought decoding, A=12 batch 1: {rate:.1f} tok/s = {rate / OFFICIAL_TOK_S:.0f}x "
        f"the official {OFFICIAL_TOK_S} tok/s (aim >= {AIM_TOK_S:.0f}): "
        f"{status(rate >= AIM_TOK_S)}")
  s = per_item["a"]
  print(f"#   paper metric (a), A=12: {s:.4f} s/item = {OFFICIAL_S_ITEM / s:.0f}x faster than "
        f"the official {OFFICIAL_S_ITEM} s (aim <= {AIM_S_ITEM}): {status(s <= AIM_S_ITEM)}")


if __name__ == "__main__":
  main()
