"""Batched KV-cache decoding: one jitted program per (batch, prompt bucket, new tokens) shape.

  sampler = Sampler(PlainDecoder(model_cfg), params, tokenizer, mesh=mesh, batch_size=8)
  outs = sampler.generate(prompts, SamplingConfig(max_new_tokens=96, stop=("\\n\\nQ:",)))

The device program (`generate_tokens`) prefills the left-padded prompts (each row's RoPE
positions count its own tokens, so padding changes nothing), then runs a `lax.while_loop` over
one `DecodeState` that feeds the last sampled token, samples the next one and stops early once
every row has produced EOS or a stop sequence. Greedy, temperature, top-k and top-p; the token
of step s is drawn with `fold_in(rng, s)`, so a seed fixes the output.

What a new token costs is the decoder's business: `PlainDecoder` runs the model one token at a
time; `jaxstar.quietstar.decoding.ThoughtDecoder` thinks before every token. A decoder is a
frozen dataclass with `cache_slots(prompt_len, max_new)`, `init_cache(params, batch, slots)`,
`prefill(params, tokens, mask, positions, cache, rng)` and `step(params, tokens, positions,
cache, rng)`; prefill and step return (next-token logits [B, V], cache, aux), aux a dict of
per-token extras [B, ...] (the thoughts and mixing weights of the thought decoder).

`Sampler` is the host side: tokenize, bucket, batch, shard, gather, detokenize. Rows are laid
out on the batch axes of the mesh (data x fsdp) and the parameters keep their own shardings
(model on tensor). With several processes every process calls `generate` with the same prompts,
its devices decode their rows of each batch, and the results are gathered in prompt order.

Stop strings: each is also tokenized as it reads at the start of a line, and a row stops early
when its last tokens equal one of those sequences (a fast path); the returned text is always cut
at the first stop string, however it was tokenized.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxstar import sharding
from jaxstar.errors import UserError
from jaxstar.model import transformer
from jaxstar.model.layers import constrain

PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_WILDCARD = -2  # left padding of stop sequences shorter than the longest: matches anything
_NO_TOKEN = -1  # the token buffer before the first generated token


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens and when to stop.

  Attributes:
    max_new_tokens: tokens generated at most per prompt.
    temperature: 0 is greedy (argmax); otherwise softmax(logits / temperature).
    top_k: keep the k most likely tokens (0: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1: all).
    stop: strings that end a generation (the text is cut before the first one).
    seed: fixes the draws (and the thoughts of a thought decoder).
  """
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop: tuple[str, ...] = ()
  seed: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise UserError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
    if self.top_k < 0:
      raise UserError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p={self.top_p} must be in (0, 1]")
    if isinstance(self.stop, str) or any(not s for s in self.stop):
      raise UserError(f"stop={self.stop!r} must be a tuple of non-empty strings")


# ------------------------------------------------------------------------------- token choice


def sample_inverse_cdf(key, logits):
  """One draw per row from softmax(logits) [..., V]: the first id whose CDF reaches u ~ U(0, 1).

  Exact, and on CPU several times cheaper than Gumbel-max (`jax.random.categorical`), which
  draws a number and takes two logarithms per vocabulary entry (benchmarks/sampling.py).
  """
  cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
  u = jax.random.uniform(key, logits.shape[:-1] + (1,), cdf.dtype) * cdf[..., -1:]
  return jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1)


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
  """Logits [..., V] with every token outside the top-k / top-p set at -inf (static k, p)."""
  neg = jnp.asarray(-jnp.inf, logits.dtype)
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # A token stays when the probability of the tokens before it is still below top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum(before < top_p, axis=-1, keepdims=True)      # >= 1
    cutoff = jnp.take_along_axis(sorted_desc, keep - 1, axis=-1)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


def choose_token(key, logits, cfg: SamplingConfig):
  """The next token [...] from logits [..., V] under `cfg` (greedy when temperature is 0)."""
  if cfg.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits.astype(jnp.float32) / cfg.temperature, cfg.top_k, cfg.top_p)
  return sample_inverse_cdf(key, logits).astype(jnp.int32)


# ----------------------------------------------------------------------------------- decoders


@dataclasses.dataclass(frozen=True)
class PlainDecoder:
  """Next-token logits of a `Transformer`, one cached step per token."""
  cfg: Any  # jaxstar.model.ModelConfig

  @property
  def module(self):
    """The (unbound) `Transformer` of `cfg`."""
    return transformer.Transformer(self.cfg)

  def cache_slots(self, prompt_len: int, max_new: int) -> int:
    """Cache slots for a prompt of `prompt_len` tokens and `max_new` new ones."""
    return prompt_len + max_new

  def init_cache(self, params, batch: int, slots: int):
    """An empty `KVCache` of `slots` slots for `batch` rows, sharded like the activations."""
    del params
    return constrain_cache(transformer.init_cache(self.cfg, batch, slots))

  def prefill(self, params, tokens_bl, mask_bl, positions_bl, cache, rng):
    """The prompts [B, L] through the empty cache: (next-token logits [B, V], cache, {})."""
    del rng
    logits, cache = self.module.apply({"params": params}, tokens_bl, cache, mask_bl,
                                      positions_bl, empty_cache=True,
                                      method=transformer.Transformer.decode)
    return logits[:, -1], cache, {}

  def step(self, params, tokens_b, positions_b, cache, rng):
    """One token per row [B] at `positions_b`: (next-token logits [B, V], cache, {})."""
    del rng
    logits, cache = self.module.apply({"params": params}, tokens_b[:, None], cache, None,
                                      positions_b[:, None], method=transformer.Transformer.decode)
    return logits[:, 0], cache, {}


def constrain_cache(cache: transformer.KVCache) -> transformer.KVCache:
  """Cache rows on the batch axes and kv heads on tensor, like the activations."""
  names = ("layers", "act_batch", None, "act_kv_heads", None)
  return cache.replace(k=constrain(cache.k, names), v=constrain(cache.v, names))


# ------------------------------------------------------------------------ the device program


@flax.struct.dataclass
class DecodeState:
  """The `while_loop` carry of `generate_tokens` (B rows, M = max_new_tokens, W = the longest
  stop sequence, S cache slots).

  Attributes:
    step: int32 scalar, tokens generated so far.
    tokens: [B, W - 1 + M] int32; the first W - 1 columns are `_NO_TOKEN`, so a stop sequence
      can be compared with the last W tokens at every step; -1 after a row is done.
    positions: [B] int32 RoPE position of the last generated token.
    done: [B] bool, the row produced EOS or a stop sequence.
    cache: the decoder's cache ([layers, B, S, K, E] keys and values, ...).
    aux: the decoder's per-token extras, each [B, M, ...].
    rng: the generation's key.
  """
  step: jax.Array
  tokens: jax.Array
  positions: jax.Array
  done: jax.Array
  cache: Any
  aux: Any
  rng: jax.Array


def generate_tokens(decoder, params, tokens_bl, mask_bl, rng, *, cfg: SamplingConfig,
                    stop_seqs: tuple[tuple[int, ...], ...] = (), eos_id: int = 2,
                    num_text_ids: int | None = None):
  """Decodes up to `cfg.max_new_tokens` tokens after left-padded prompts (jit this).

  Args:
    decoder: a decoder (see the module docstring), static.
    params: its parameters.
    tokens_bl: [B, L] int32 prompts, left-padded (the last column is every row's last token).
    mask_bl: [B, L] bool, False at padding.
    rng: key of the draws.
    cfg: SamplingConfig (static); `cfg.stop` is ignored here, `stop_seqs` is its token form.
    stop_seqs: token sequences that end a row (static).
    eos_id: the token that ends a row.
    num_text_ids: only ids below this are drawn: the tokenizer's text vocabulary, without the
      thought tokens (never taught as output, spec/quietstar.md §5.2) and the embedding rows
      past the tokenizer (static; None: every id).
  Returns:
    (tokens [B, M] int32, -1 after a row's end (its EOS or stop sequence included), aux dict
    of [B, M, ...]).
  """
  b, l = tokens_bl.shape
  m = cfg.max_new_tokens
  w = max([len(s) for s in stop_seqs] + [1])
  stops = np.full((max(len(stop_seqs), 1), w), _WILDCARD, np.int32)
  for i, s in enumerate(stop_seqs):
    stops[i, w - len(s):] = s
  stops = jnp.asarray(stops)

  mask_bl = mask_bl.astype(bool)
  positions_bl = jnp.maximum(jnp.cumsum(mask_bl, axis=1, dtype=jnp.int32) - 1, 0)
  cache = decoder.init_cache(params, b, decoder.cache_slots(l, m))
  logits, cache, aux = decoder.prefill(params, tokens_bl, mask_bl, positions_bl, cache,
                                       jax.random.fold_in(rng, 0))

  def record(tokens, aux_buf, done, step, logits, aux):
    """Samples token `step` from `logits` and writes it and its aux; returns the new done."""
    if num_text_ids is not None and num_text_ids < logits.shape[-1]:
      logits = jnp.where(jnp.arange(logits.shape[-1]) < num_text_ids, logits, -jnp.inf)
    token = choose_token(jax.random.fold_in(jax.random.fold_in(rng, 1), step), logits, cfg)
    token = jnp.where(done, _NO_TOKEN, token)
    col = w - 1 + step
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], col, 1)
    aux_buf = jax.tree.map(
        lambda buf, a: jax.lax.dynamic_update_slice_in_dim(buf, a[:, None].astype(buf.dtype),
                                                           step, 1), aux_buf, aux)
    ended = token == eos_id
    if stop_seqs:
      window = jax.lax.dynamic_slice_in_dim(tokens, col - w + 1, w, axis=1)   # [B, W]
      hit = (window[:, None, :] == stops[None]) | (stops[None] == _WILDCARD)
      ended |= jnp.any(jnp.all(hit, axis=-1), axis=-1)
    return tokens, aux_buf, done | ended

  aux_buf = jax.tree.map(lambda a: jnp.zeros((b, m) + a.shape[1:], a.dtype), aux)
  tokens = jnp.full((b, w - 1 + m), _NO_TOKEN, jnp.int32)
  tokens, aux_buf, done = record(tokens, aux_buf, jnp.zeros((b,), bool), 0, logits, aux)
  state = DecodeState(step=jnp.ones((), jnp.int32), tokens=tokens, positions=positions_bl[:, -1],
                      done=done, cache=cache, aux=aux_buf, rng=rng)

  def cond(state):
    return (state.step < m) & ~jnp.all(state.done)

  def body(state):
    last = jax.lax.dynamic_index_in_dim(state.tokens, w - 2 + state.step, axis=1,
                                        keepdims=False)
    last = jnp.where(last < 0, eos_id, last)   # rows already done feed a harmless EOS
    positions = state.positions + 1
    logits, cache, aux = decoder.step(params, last, positions, state.cache,
                                      jax.random.fold_in(rng, 2 * m + state.step))
    tokens, aux_buf, done = record(state.tokens, state.aux, state.done, state.step, logits, aux)
    return state.replace(step=state.step + 1, tokens=tokens, positions=positions, done=done,
                         cache=cache, aux=aux_buf)

  state = jax.lax.while_loop(cond, body, state)
  return state.tokens[:, w - 1:], state.aux


# ------------------------------------------------------------------------------- the host side


@dataclasses.dataclass
class Generation:
  """One prompt's result.

  Attributes:
    text: the generated text, cut before the first stop string (without EOS).
    tokens: the generated token ids up to the end (EOS or the stop sequence included).
    finish: 'eos', 'stop' or 'length'.
    aux: the decoder's per-token extras for these tokens (numpy, [len(tokens), ...]).
  """
  text: str
  tokens: list[int]
  finish: str
  aux: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def stop_token_sequences(tokenizer, stop: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """Token forms of the stop strings as they read after a newline (SentencePiece drops its
  word-start marker there), and as they read alone; duplicates removed."""
  out = []
  prefix = tokenizer.encode("\n")
  for s in stop:
    after_newline = tokenizer.encode("\n" + s)
    if after_newline[:len(prefix)] == prefix:
      out.append(tuple(after_newline[len(prefix):]))
    out.append(tuple(tokenizer.encode(s)))
  return tuple(dict.fromkeys(s for s in out if s))


def mesh_context(mesh):
  """The mesh and logical rules for a jitted call (nothing without a mesh)."""
  return contextlib.nullcontext() if mesh is None else sharding.use_mesh(mesh)


def place_rows(array: np.ndarray, mesh=None):
  """A global array of host rows on the mesh's batch axes; each process supplies the rows of
  its own devices (every process holds the same host array)."""
  if mesh is None:
    return jnp.asarray(array)
  spec = sharding.batch_sharding(mesh, array.ndim)
  return jax.make_array_from_callback(array.shape, spec, lambda index: array[index])


def gather_rows(tree):
  """Every row of every output, on every process, as numpy."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                        tree)
  return jax.tree.map(np.asarray, jax.device_get(tree))


def check_batch_size(batch_size: int, mesh) -> None:
  """A UserError unless `batch_size` rows split evenly over the mesh's batch axes."""
  if mesh is not None:
    rows = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
    if batch_size % rows:
      raise UserError(f"batch_size={batch_size} is not a multiple of the mesh's "
                      f"{rows} batch shards ({dict(mesh.shape)})")


def text_vocab_size(tokenizer) -> int:
  """Ids below this are text: every jaxstar tokenizer puts its two thought tokens last."""
  return min(tokenizer.start_thought_id, tokenizer.end_thought_id)


def bucket(length: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
  """The smallest bucket that holds `length` tokens (or `length` itself past the last)."""
  for size in buckets:
    if length <= size:
      return size
  return length


class Sampler:
  """Generates text for lists of prompts with a decoder on a mesh.

  Args:
    decoder: `PlainDecoder` or `jaxstar.quietstar.decoding.ThoughtDecoder`.
    params: its parameters (already placed, e.g. sharded by `jaxstar.sharding`).
    tokenizer: a jaxstar tokenizer (`encode`, `decode`, `bos_id`, `eos_id`).
    mesh: the mesh of the run; rows go on its batch axes. None: one device.
    batch_size: rows per device program (global); a multiple of the mesh's batch axes.
    max_len: prompt + new tokens at most (e.g. the model's trained context); a longer request
      is an error naming the prompt.
    buckets: prompt lengths compiled for (the shortest that fits is used).
  """

  def __init__(self, decoder, params, tokenizer, *, mesh=None, batch_size: int = 8,
               max_len: int = 32768, buckets: Sequence[int] = PROMPT_BUCKETS):
    self.decoder, self.params, self.tokenizer = decoder, params, tokenizer
    self.mesh = mesh
    self.batch_size, self.max_len, self.buckets = batch_size, max_len, tuple(buckets)
    check_batch_size(batch_size, mesh)
    self._compiled = {}

  def encode(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Token ids of each prompt: text gets BOS prepended, id lists are taken as they are."""
    return [self.tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p)
            for p in prompts]

  def generate(self, prompts: Sequence[str | Sequence[int]], cfg: SamplingConfig,
               progress=None) -> list[Generation]:
    """One `Generation` per prompt, in prompt order.

    Prompts are sorted by length into batches (less padding); the draws of a prompt depend on
    the seed and on the batch it lands in, so the same prompt list and seed give the same texts.
    `progress`, if given, is called with the number of prompts finished after each batch.
    """
    ids = self.encode(prompts)
    if not ids:
      return []
    for i, row in enumerate(ids):
      if not row:
        raise UserError(f"prompt {i} is empty")
      if len(row) + cfg.max_new_tokens > self.max_len:
        raise UserError(f"prompt {i} has {len(row)} tokens; with max_new_tokens="
                        f"{cfg.max_new_tokens} that exceeds the {self.max_len} tokens the "
                        "sampler allows (max_len)")
    stop_seqs = stop_token_sequences(self.tokenizer, cfg.stop)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    results: list[Generation | None] = [None] * len(ids)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      tokens, aux = self._run_batch([ids[i] for i in chunk], cfg, stop_seqs,
                                    start // self.batch_size)
      for row, i in enumerate(chunk):
        results[i] = self._result(tokens[row], cfg, {k: v[row] for k, v in aux.items()})
      if progress is not None:
        progress(len(chunk))
    return results

  def _run_batch(self, rows: list[list[int]], cfg: SamplingConfig, stop_seqs, batch_index):
    length = bucket(max(len(r) for r in rows), self.buckets)
    pad = self.tokenizer.eos_id
    tokens = np.full((self.batch_size, length), pad, np.int32)
    mask = np.zeros((self.batch_size, length), bool)
    tokens[:, -1] = self.tokenizer.bos_id   # filler rows: a lone BOS
    mask[:, -1] = True
    for r, row in enumerate(rows):
      tokens[r, :] = pad
      mask[r, :] = False
      tokens[r, length - len(row):] = row
      mask[r, length - len(row):] = True
    key = jax.random.fold_in(jax.random.key(cfg.seed), batch_index)
    fn = self._program(length, cfg, stop_seqs)
    with mesh_context(self.mesh):
      out = fn(self.params, place_rows(tokens, self.mesh), place_rows(mask, self.mesh), key)
    out = gather_rows(out)
    return out[0][:len(rows)], {k: v[:len(rows)] for k, v in out[1].items()}

  def _program(self, length: int, cfg: SamplingConfig, stop_seqs):
    key = (length, dataclasses.replace(cfg, stop=(), seed=0), stop_seqs)
    if key not in self._compiled:
      fn = functools.partial(generate_tokens, self.decoder, cfg=dataclasses.replace(cfg, stop=()),
                             stop_seqs=stop_seqs, eos_id=self.tokenizer.eos_id,
                             num_text_ids=text_vocab_size(self.tokenizer))
      self._compiled[key] = jax.jit(fn)
    return self._compiled[key]

  def _result(self, tokens: np.ndarray, cfg: SamplingConfig, aux) -> Generation:
    length = int(np.sum(np.cumprod(tokens >= 0)))
    kept = tokens[:length].tolist()
    eos = bool(kept) and kept[-1] == self.tokenizer.eos_id
    text = self.tokenizer.decode(kept[:-1] if eos else kept)
    cut = min([i for i in (text.find(s) for s in cfg.stop) if i >= 0], default=-1)
    finish = "eos" if eos else "length"
    if cut >= 0:
      text, finish = text[:cut], "stop"
    return Generation(text=text, tokens=kept, finish=finish,
                      aux={k: v[:length] for k, v in aux.items()})
