"""Thought-augmented decoding and thought-mixed logits at chosen positions (spec/quietstar.md §5).

`ThoughtDecoder` is a decoder for `jaxstar.sampling`: before every new token the model thinks
at the last position only, on a throw-away branch of the KV cache, exactly as training thinks at
every position (`thoughts.QuietStarModel`): the learned start vector at i + 1, T = n_ahead - 3
thought tokens sampled at temperature 1 with start/end excluded, the learned end vector at
i + T + 2, and the mixing head's blend of the base and post-thought states. Each branch pass sees
the prefix that x_i sees (causal, sliding window, padding) and the branch's earlier passes.

The branch lives in scratch cache slots after the text; the next real token overwrites them.
Work per token: the new token and the start vector in one two-token call, T - 1 one-token calls
for the thought tokens, then the last thought token and the end vector in one two-token call:
T + 1 = n_ahead - 2 sequential calls, never a recompute of the sequence. (The official
`infer()` recomputes thoughts at every position for every new token, spec §5.2, and feeds the
untrained rows of the start/end ids instead of the learned vectors, §5.3.)

`mixed_logits_at` is the paper metric's path (§5.1): one base pass over the text, then
thoughts only at the positions asked for, with the training-time thought passes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxstar import sampling
from jaxstar.model import attention
from jaxstar.model import transformer
from jaxstar.quietstar.config import QuietStarConfig
from jaxstar.quietstar.mixing import mix
from jaxstar.quietstar.thoughts import QuietStarModel, mask_thought_ids, sample_thought


@dataclasses.dataclass(frozen=True)
class ThoughtDecoder:
  """A `jaxstar.sampling` decoder that thinks before every token (module docstring).

  Attributes:
    cfg: the ModelConfig; qs: the QuietStarConfig (n_ahead sets T; the talk and pass settings
      are not used); start_id, end_id, init_id, pad_id: as `QuietStarModel`.
    greedy_thoughts: argmax thought tokens instead of temperature-1 draws.
  Aux per token: 'thoughts' [T] int32 (the thought before it) and 'mix_weight' (the mixing
  head's weight of the post-thought state).
  """
  cfg: Any
  qs: QuietStarConfig
  start_id: int
  end_id: int
  init_id: int = 0
  pad_id: int = 2
  greedy_thoughts: bool = False

  @property
  def model(self) -> QuietStarModel:
    """The (unbound) `QuietStarModel` of these settings."""
    return QuietStarModel(self.cfg, self.qs, self.start_id, self.end_id, self.init_id,
                          self.pad_id)

  def cache_slots(self, prompt_len: int, max_new: int) -> int:
    """Slots for the prompt, the new tokens and the thought branch past the last one."""
    # The real tokens, then the branch: start, T thought tokens and end past the last one.
    return prompt_len + max_new + self.qs.num_sampled + 1

  def init_cache(self, params, batch: int, slots: int):
    """As `PlainDecoder.init_cache`: an empty cache of `slots` slots for `batch` rows."""
    del params
    return sampling.constrain_cache(transformer.init_cache(self.cfg, batch, slots))

  def prefill(self, params, tokens_bl, mask_bl, positions_bl, cache, rng):
    """As `PlainDecoder.prefill`, then the thought after the last prompt token (`prefill_thought`):
    (mixed logits [B, V], cache, {'thoughts': [B, T], 'mix_weight': [B]})."""
    return self.model.apply({"params": params}, tokens_bl, mask_bl, positions_bl, cache, rng,
                            self.greedy_thoughts, method=prefill_thought)

  def step(self, params, tokens_b, positions_b, cache, rng):
    """As `PlainDecoder.step`, then the thought after the new token (`step_thought`): (mixed
    logits [B, V], cache, {'thoughts': [B, T], 'mix_weight': [B]})."""
    return self.model.apply({"params": params}, tokens_b, positions_b, cache, rng,
                            self.greedy_thoughts, method=step_thought)


def think(m: QuietStarModel, cache, start_h, base_h, position_b, prefix_bs, scratch, rng,
          greedy: bool = False, forced_bt=None):
  """The thought after x_i and the mixed next-token logits (call inside `m.apply`).

  Args:
    m: the bound QuietStarModel.
    cache: the KV cache holding the text up to x_i and the start vector's keys/values in slot
      `scratch` (the branch's first slot).
    start_h: [B, 1, D] hidden state of the start vector (it predicts t_1).
    base_h: [B, 1, D] base hidden state of x_i.
    position_b: [B] RoPE position of x_i.
    prefix_bs: [B, 1, S] bool, the cache slots x_i sees.
    scratch: int32 scalar, the start vector's slot; t_s goes to scratch + s, end after t_T.
    rng: key of the thought draws; greedy: argmax thought tokens.
    forced_bt: optional [B, T] thought tokens used instead of draws (tests).
  Returns:
    (mixed logits [B, V] (start/end not masked), cache with the branch written,
     {'thoughts': [B, T] int32, 'mix_weight': [B]}).
  """
  t_n = m.qs.num_sampled
  ids = (m.start_id, m.end_id)
  slots = jnp.arange(cache.max_len, dtype=jnp.int32)

  def choose(h_b1d, s):  # t_s from the state that predicts it
    logits = mask_thought_ids(m.lm.logits(h_b1d)[:, 0], ids)
    if forced_bt is not None:
      return jnp.take(forced_bt, s - 1, axis=1)
    return sample_thought(jax.random.fold_in(rng, s), logits, greedy)

  def branch_mask(last_slot, q):  # [B, Q, S]: the prefix and the branch up to each query
    rows = [prefix_bs | ((slots >= scratch) & (slots <= last_slot + j))[None, None]
            for j in range(q)]
    return jnp.concatenate(rows, axis=1)

  def feed(cache, s, token_b):  # t_s at slot scratch + s, position i + s + 1; draws t_{s+1}
    slot = scratch + s
    h, cache = m.lm.cached_layers(m.lm.embed(token_b[:, None]), (position_b + s + 1)[:, None],
                                  cache.replace(index=slot), branch_mask(slot, 1))
    return cache, choose(h, s + 1)

  first = choose(start_h, 1)
  (cache, last), earlier = jax.lax.scan(
      lambda carry, s: (feed(carry[0], s, carry[1]), carry[1]), (cache, first),
      jnp.arange(1, t_n, dtype=jnp.int32))
  thoughts = jnp.concatenate([earlier.T, last[:, None]], axis=1)            # [B, T]

  # t_T and the end vector in one call (the end vector sees t_T through the block's causality).
  slot = scratch + t_n
  b, d = start_h.shape[0], m.cfg.embed_dim
  x = jnp.concatenate([m.lm.embed(last[:, None]), m._vector(m.end_thought, (b, 1, d))], axis=1)
  positions = position_b[:, None] + t_n + 1 + jnp.arange(2, dtype=jnp.int32)
  h, cache = m.lm.cached_layers(x, positions, cache.replace(index=slot), branch_mask(slot, 2))
  end_h = h[:, 1:]
  w = m.mixing(base_h, end_h)                                               # [B, 1, 1]
  logits = m.lm.logits(mix(base_h, end_h, w))[:, 0]
  return logits, cache, {"thoughts": thoughts, "mix_weight": w[:, 0, 0]}


def prefill_thought(m: QuietStarModel, tokens_bl, mask_bl, positions_bl, cache, rng,
                    greedy=False, forced_bt=None):
  """The prompt through an empty cache, then the start vector and the thought after its last
  token.
  Returns `think`'s (logits, cache, aux) with the cache's index after the prompt."""
  hidden, cache = m.lm.decode_hidden(m.lm.embed(tokens_bl), cache, mask_bl, positions_bl,
                                     empty_cache=True)
  x_slot = cache.index - 1
  slots = jnp.arange(cache.max_len, dtype=jnp.int32)
  prefix = attention.visible_keys(x_slot[None], slots, cache.valid, m.cfg.sliding_window)
  position = positions_bl[:, -1]
  b, d = tokens_bl.shape[0], m.cfg.embed_dim
  start_h, branch = m.lm.cached_layers(m._vector(m.start_thought, (b, 1, d)),
                                       (position + 1)[:, None], cache,
                                       prefix | (slots == cache.index)[None, None])
  logits, branch, aux = think(m, branch, start_h, hidden[:, -1:], position, prefix,
                              cache.index, rng, greedy, forced_bt)
  return logits, branch.replace(index=cache.index), aux


def step_thought(m: QuietStarModel, tokens_b, positions_b, cache, rng, greedy=False,
                 forced_bt=None):
  """A new token and the start vector after it in one two-token call, then the thought.
  Returns `think`'s (logits, cache, aux) with the cache's index after the new token."""
  slot = cache.index
  valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((tokens_b.shape[0], 1), bool),
                                       (jnp.zeros_like(slot), slot))
  slots = jnp.arange(cache.max_len, dtype=jnp.int32)
  prefix = attention.visible_keys(slot[None], slots, valid, m.cfg.sliding_window)  # [B, 1, S]
  b, d = tokens_b.shape[0], m.cfg.embed_dim
  x = jnp.concatenate([m.lm.embed(tokens_b[:, None]),
                       m._vector(m.start_thought, (b, 1, d))], axis=1)
  mask = jnp.concatenate([prefix, prefix | (slots == slot + 1)[None, None]], axis=1)
  positions = positions_b[:, None] + jnp.arange(2, dtype=jnp.int32)
  h, cache = m.lm.cached_layers(x, positions, cache.replace(valid=valid), mask)
  logits, cache, aux = think(m, cache, h[:, 1:], h[:, :1], positions_b, prefix, slot + 1, rng,
                             greedy, forced_bt)
  return logits, cache.replace(index=slot + 1), aux


def mixed_logits_at(m: QuietStarModel, tokens_bl, mask_bl, positions_bc, rng, *,
                    greedy: bool = False, forced_bct=None):
  """Thought-mixed next-token logits at C chosen positions of each row (call in `m.apply`).

  One base pass over the text, then the training-time thought passes (`chunk_passes`) at the
  positions `positions_bc` [B, C] only: position j's logits predict token j + 1 after a thought
  at j. `m.qs` must have n_ahead_talk = n_passes = 1 (the eval setting of spec §5.1).

  Returns:
    (mixed logits [B, C, V], base logits [B, C, V]) in fp32 (or wider), start/end not masked.
  """
  if m.qs.n_ahead_talk != 1 or m.qs.n_passes != 1:
    raise ValueError("mixed_logits_at needs a model with n_ahead_talk=1 and n_passes=1")
  b, c = positions_bc.shape
  valid = mask_bl.astype(bool)
  positions, attend = m.lm.text_attend(tokens_bl, valid, return_kv=True)
  base_hidden, prefix_kv = m.lm.run_layers(m.lm.embed(tokens_bl), positions, attend)

  def take(x):  # [B, L, ...] -> [B, C, ...] at the chosen positions
    index = positions_bc.reshape(b, c, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)

  base_at = take(base_hidden)
  x = dict(position=take(positions), valid=take(valid), prefix_mask=take(attend.mask_bll),
           ahead=jnp.zeros((b, c, 0), jnp.int32),
           targets=take(jnp.roll(tokens_bl, -1, axis=1))[..., None],
           base_rolled=base_at[:, :, None])
  if forced_bct is not None:
    x["forced"] = forced_bct[:, :, None]
  out = m.chunk_passes(prefix_kv, rng, jnp.zeros((), jnp.int32), x, greedy=greedy,
                       return_logits=True)
  return out["talk_logits"][:, :, 0], m.lm.logits(base_at)


def thought_trace(tokenizer, generation) -> list[tuple[str, str, float]]:
  """(token text, the thought before it as text, mixing weight) per generated token of a
  `sampling.Generation` from a `ThoughtDecoder` (for notebooks and inspection).

  Thoughts are drawn from the model's whole vocabulary, as in training; an id past the
  tokenizer's (a small model's spare embedding rows) shows as "<id N>".
  """
  def text(ids):
    return "".join(tokenizer.decode([i]) if i < tokenizer.vocab_size else f"<id {i}>"
                   for i in map(int, ids))
  thoughts, weights = generation.aux["thoughts"], generation.aux["mix_weight"]
  return [(text([t]), text(th), float(w))
          for t, th, w in zip(generation.tokens, thoughts, weights)]
