"""Thoughts at every position, in parallel (spec/quietstar.md §1.3-1.7).

Axis letters as in the table of `jaxstar/model/transformer.py`: T = n_ahead - 3 sampled thought
tokens, A = n_ahead_talk talk tokens, P copies of each document (adjacent: row n = b * P + p),
N = B * P rows, C positions per chunk, Q tokens per position in one pass (1 while thinking, A in
the talk pass), and `i` the text position (RoPE position within its document) a branch hangs off.

Pass schedule:
  base pass            text x_i at position i, once per document (not once per copy);
  thought pass s=1     start vector at i + 1;  its logits sample t_1
  thought pass s       t_{s-1} at i + s (s = 2 .. T+1); logits sample t_s up to s = T
  talk pass            [end, x_{i+1}, ..., x_{i+A-1}] at i + T + 2 + k, one block per position.

Attention is the official "causal block + one diagonal block per pass" mask computed cheaply:
the base pass's keys/values are kept once per document; each query is scored against its causal
prefix of text keys and, element-wise, against its own branch (the keys of earlier passes at the
same position), plus causally within its own talk block; one softmax over all of them. A
padded position's branch sees only the real prefix (its diagonal entries are masked), as in the
official code.

The thought and talk passes of different positions share nothing but the base pass, so they run
C = `chunk_positions` positions at a time, in a scan over chunks. The forward pass of a chunk
runs the passes above in order, without gradient (every pass keeps only its new keys/values, one
[layers, N, C, K, E] pair per pass). Its backward pass (`_chunk_with_block_grad`) recomputes the
chunk from its inputs and the sampled tokens as one teacher-forced block per position,
[start, t_1 .. t_T, end, x_{i+1} ..] causal within itself: given the tokens, the same function
of the parameters, so the same gradients. The backward therefore holds one chunk's block
activations (linear in the thought length), its matmuls are big, and every weight gets one
gradient per chunk instead of one per pass (XLA keeps all per-pass weight gradients alive at once
to sum them). With `chunk_positions=0` all positions run at once and the passes above are
differentiated as they are, nothing recomputed: the least work, for small models.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxstar import sampling
from jaxstar.model import attention
from jaxstar.model import transformer
from jaxstar.model.config import ModelConfig
from jaxstar.model.layers import cpu_layouts, dense, upcast
from jaxstar.quietstar.config import QuietStarConfig
from jaxstar.quietstar.mixing import MixingHead, mix

MASKED_LOGIT = -1e10  # start/end logits while sampling thoughts (official value)


@flax.struct.dataclass
class ThoughtAttend:
  """Attention of Q new tokens per position and copy against prefix + branch + own block.

  Queries arrive as [N, L * Q, H, E] (position-major) for L branch positions (all of the text or
  a chunk of it). `layer_state` per layer is `(prefix_k, prefix_v, branch)`: prefix [B, S, K, E]
  from the base pass over the S text tokens, branch a tuple of (k, v) pairs [N, L, K, E], one per
  earlier thought pass. Returns the new keys/values.

  Attributes:
    prefix_mask_bij: [B, L, S] bool, text key j visible to branch i (causal, window, padding).
    own_ok_bi: [B, L] bool, False where x_i is padding (its branch and block keys are masked).
    passes: P (static).
    block: Q (static).
  On the CPU backend (`layers.cpu_layouts()`) it runs heads-major with its own gradient
  (`_heads_major`); elsewhere as the einsums below.
  """
  prefix_mask_bij: jax.Array
  own_ok_bi: jax.Array
  passes: int = flax.struct.field(pytree_node=False)
  block: int = flax.struct.field(pytree_node=False)

  def __call__(self, q, k, v, layer_state):
    if cpu_layouts():
      return self._heads_major(q, k, v, layer_state), (k, v)
    prefix_k, prefix_v, branch = layer_state
    b, s_len, kv_heads, e = prefix_k.shape
    l = self.own_ok_bi.shape[1]
    p, qn = self.passes, self.block
    h = q.shape[2]
    g = h // kv_heads
    f32 = upcast(q.dtype)
    # The Q block queries and the G grouped heads of a position share every prefix and branch
    # key, so they ride on one axis X = Q * G ('bpikxe'); only the block part tells them apart.
    qx = q.reshape(b, p, l, qn, kv_heads, g, e).transpose(0, 1, 2, 4, 3, 5, 6)
    qx = qx.reshape(b, p, l, kv_heads, qn * g, e)
    scale = e ** -0.5  # applied to the fp32 scores, as in the base pass
    k6 = k.reshape(b, p, l, qn, kv_heads, e)
    v6 = v.reshape(b, p, l, qn, kv_heads, e)
    per_row = lambda a: a.reshape(b, p, l, kv_heads, e)

    s_pre = jnp.einsum("bpikxe,bjke->bpikxj", qx, prefix_k, preferred_element_type=f32)
    s_pre = jnp.where(self.prefix_mask_bij[:, None, :, None, None, :], s_pre * scale,
                      attention.MASK_VALUE)
    own = self.own_ok_bi[:, None, :, None, None, None]
    s_branch = [jnp.einsum("bpikxe,bpike->bpikx", qx, per_row(bk),
                           preferred_element_type=f32)[..., None] for bk, _ in branch]
    s_branch = [jnp.where(own, s * scale, attention.MASK_VALUE) for s in s_branch]
    s_block = jnp.einsum("bpikxe,bpirke->bpikxr", qx, k6, preferred_element_type=f32)
    causal = (jnp.arange(qn * g)[:, None] // g) >= jnp.arange(qn)[None, :]     # [X, Q]
    s_block = jnp.where(causal & own, s_block * scale, attention.MASK_VALUE)

    probs = jax.nn.softmax(jnp.concatenate([s_pre] + s_branch + [s_block], axis=-1), axis=-1)
    probs = probs.astype(v.dtype)
    out = jnp.einsum("bpikxj,bjke->bpikxe", probs[..., :s_len], prefix_v)
    for j, (_, bv) in enumerate(branch):
      out = out + probs[..., s_len + j, None] * per_row(bv)[:, :, :, :, None, :]
    out = out + jnp.einsum("bpikxr,bpirke->bpikxe", probs[..., s_len + len(branch):], v6)
    out = out.reshape(b, p, l, kv_heads, qn, g, e).transpose(0, 1, 2, 4, 3, 5, 6)
    return out.reshape(b * p, l * qn, h, e), (k, v)

  def _heads_major(self, q, k, v, layer_state):
    """The same attention with the kv heads leading ('bkpixe'), for XLA:CPU: every matmul has
    its batch axes first, so no [.., S]-sized scores or probabilities are transposed, and the
    softmax runs over the prefix, branch and block parts without concatenating them."""
    prefix_k, prefix_v, branch = layer_state
    (b, l), p, qn = self.own_ok_bi.shape, self.passes, self.block
    kv_heads, e = k.shape[2:]
    g = q.shape[2] // kv_heads
    heads = lambda a, r: a.reshape(b, p, l, r, kv_heads, e).transpose(0, 4, 1, 2, 3, 5)
    qx = q.reshape(b, p, l, qn, kv_heads, g, e).transpose(0, 4, 1, 2, 3, 5, 6)
    qx = qx.reshape(b, kv_heads, p, l, qn * g, e).astype(upcast(q.dtype)) * (e ** -0.5)
    causal = (jnp.arange(qn * g)[:, None] // g) >= jnp.arange(qn)[None, :]     # [X, Q]
    out = _thought_attention(
        qx, prefix_k.transpose(0, 2, 1, 3), prefix_v.transpose(0, 2, 1, 3),   # [B, K, S, E]
        heads(k, qn), heads(v, qn),                                          # [B, K, P, L, Q, E]
        tuple(heads(bk, 1)[..., 0, :] for bk, _ in branch),                  # [B, K, P, L, E]
        tuple(heads(bv, 1)[..., 0, :] for _, bv in branch),
        self.prefix_mask_bij, self.own_ok_bi, causal)
    out = out.astype(v.dtype).reshape(b, kv_heads, p, l, qn, g, e)
    return out.transpose(0, 2, 3, 4, 1, 5, 6).reshape(q.shape)


def _thought_probs(qx, pk, k6, branch_k, prefix_mask_bij, own_ok_bi, causal_xq):
  """Softmax over prefix, branch and block keys of heads-major queries, without concatenating
  them: (probs over the prefix [.., S], over the block [.., Q], one [..] per branch key)."""
  f32 = qx.dtype
  own = own_ok_bi[:, None, None, :, None]                                    # [B, 1, 1, L, 1]
  s_pre = jnp.where(prefix_mask_bij[:, None, None, :, None, :],
                    jnp.einsum("bkpixe,bkje->bkpixj", qx, pk, preferred_element_type=f32),
                    attention.MASK_VALUE)
  s_block = jnp.where(causal_xq & own[..., None],
                      jnp.einsum("bkpixe,bkpire->bkpixr", qx, k6, preferred_element_type=f32),
                      attention.MASK_VALUE)
  s_branch = [jnp.where(own, jnp.einsum("bkpixe,bkpie->bkpix", qx, bk,
                                        preferred_element_type=f32), attention.MASK_VALUE)
              for bk in branch_k]
  top = functools.reduce(jnp.maximum, [s_pre.max(-1), s_block.max(-1)] + s_branch)
  e_pre, e_block = jnp.exp(s_pre - top[..., None]), jnp.exp(s_block - top[..., None])
  e_branch = [jnp.exp(sc - top) for sc in s_branch]
  inv = 1.0 / (e_pre.sum(-1) + e_block.sum(-1) + sum(e_branch))  # >= 1 term equal to 1
  return e_pre * inv[..., None], e_block * inv[..., None], tuple(eb * inv for eb in e_branch)


def _thought_values(probs, pv, v6, branch_v):
  p_pre, p_block, p_branch = probs
  f32 = p_pre.dtype
  out = jnp.einsum("bkpixj,bkje->bkpixe", p_pre, pv.astype(f32))
  out = out + jnp.einsum("bkpixr,bkpire->bkpixe", p_block, v6.astype(f32))
  for pb, bv in zip(p_branch, branch_v):
    out = out + pb[..., None] * bv[:, :, :, :, None, :].astype(f32)
  return out


@jax.custom_vjp
def _thought_attention(qx, pk, pv, k6, v6, branch_k, branch_v, prefix_mask_bij, own_ok_bi,
                       causal_xq):
  """`ThoughtAttend` heads-major ('bkpixe'): queries qx [B, K, P, L, X, E] (fp32, pre-scaled)
  against the prefix pk/pv [B, K, S, E], the block k6/v6 [B, K, P, L, Q, E] and the branch keys
  (one [B, K, P, L, E] pair per earlier pass). Returns [B, K, P, L, X, E] in fp32."""
  return _thought_attention_fwd(qx, pk, pv, k6, v6, branch_k, branch_v, prefix_mask_bij,
                                own_ok_bi, causal_xq)[0]


def _thought_attention_fwd(qx, pk, pv, k6, v6, branch_k, branch_v, prefix_mask_bij, own_ok_bi,
                           causal_xq):
  probs = _thought_probs(qx, pk, k6, branch_k, prefix_mask_bij, own_ok_bi, causal_xq)
  out = _thought_values(probs, pv, v6, branch_v)
  return out, (qx, pk, pv, k6, v6, branch_k, branch_v, probs, out)


def _thought_attention_bwd(residuals, d_out):
  # dS = P * (dP - rowsum(dO * O)) for every part of the softmax. The key and value gradients
  # are taken transposed ('bkej': contracting the big [.., S] operand on its leading axes reads
  # it as stored) and their small results transposed back, which keeps XLA:CPU from copying
  # the [.., S] score gradients into a transposed layout.
  qx, pk, pv, k6, v6, branch_k, branch_v, (p_pre, p_block, p_branch), out = residuals
  f32 = qx.dtype
  row = jnp.sum(d_out * out, axis=-1)                                        # [B, K, P, L, X]
  ds_pre = p_pre * (jnp.einsum("bkpixe,bkje->bkpixj", d_out, pv.astype(f32)) - row[..., None])
  ds_block = p_block * (jnp.einsum("bkpixe,bkpire->bkpixr", d_out, v6.astype(f32))
                        - row[..., None])
  ds_branch = [pb * (jnp.sum(d_out * bv[:, :, :, :, None, :].astype(f32), -1) - row)
               for pb, bv in zip(p_branch, branch_v)]
  d_q = (jnp.einsum("bkpixj,bkje->bkpixe", ds_pre, pk.astype(f32))
         + jnp.einsum("bkpixr,bkpire->bkpixe", ds_block, k6.astype(f32)))
  for dsb, bk in zip(ds_branch, branch_k):
    d_q = d_q + dsb[..., None] * bk[:, :, :, :, None, :].astype(f32)
  d_pk = jnp.einsum("bkpixe,bkpixj->bkej", qx, ds_pre).swapaxes(-1, -2)
  d_pv = jnp.einsum("bkpixe,bkpixj->bkej", d_out, p_pre).swapaxes(-1, -2)
  d_k6 = jnp.einsum("bkpixr,bkpixe->bkpire", ds_block, qx)
  d_v6 = jnp.einsum("bkpixr,bkpixe->bkpire", p_block, d_out)
  d_bk = tuple(jnp.sum(dsb[..., None] * qx, axis=4).astype(bk.dtype)
               for dsb, bk in zip(ds_branch, branch_k))
  d_bv = tuple(jnp.sum(pb[..., None] * d_out, axis=4).astype(bv.dtype)
               for pb, bv in zip(p_branch, branch_v))
  return (d_q, d_pk.astype(pk.dtype), d_pv.astype(pv.dtype), d_k6.astype(k6.dtype),
          d_v6.astype(v6.dtype), d_bk, d_bv, None, None, None)


_thought_attention.defvjp(_thought_attention_fwd, _thought_attention_bwd)


def thought_init_vector(embedding_vd, init_id: int, scale: float):
  """Initial start/end parameter: E[id of '---'] / scale (used as scale * parameter)."""
  return embedding_vd[init_id] / scale


class QuietStarModel(nn.Module):
  """The language model plus learned start/end thought vectors and the mixing head.

  Parameters: `lm` (a `Transformer`), `start_thought` [D], `end_thought` [D] (stored divided by
  `embedding_scale`), `mixing` (the `MixingHead`).
  """
  cfg: ModelConfig
  qs: QuietStarConfig
  start_id: int   # token id of <|startthought|> (masked while sampling thoughts)
  end_id: int     # token id of <|endthought|>
  init_id: int = 0  # token whose embedding initializes start/end (the first id of '---')
  pad_id: int = 2   # fed as the teacher-forced token past the end of the sequence

  def setup(self):
    """Declares the parameters and submodules: `lm`, `start_thought`, `end_thought`, `mixing`."""
    d = self.cfg.embed_dim
    self.lm = transformer.Transformer(self.cfg)
    init = lambda rng, shape: thought_init_vector(self.lm.embedding, self.init_id,
                                                  self.qs.embedding_scale)
    names = nn.with_logical_partitioning(init, ("norm",))
    self.start_thought = self.param("start_thought", names, (d,))
    self.end_thought = self.param("end_thought", names, (d,))
    self.mixing = MixingHead(d, jnp.dtype(self.cfg.dtype), jnp.dtype(self.cfg.param_dtype),
                             name="mixing")

  def init_all(self, tokens_bl):
    """Touches every parameter (for `init`)."""
    logits, hidden = self.lm(tokens_bl, return_hidden=True)
    w = self.mixing(hidden, hidden)
    return logits, w, self.start_thought, self.end_thought

  def base_ce(self, tokens_bl, mask_bl, segment_ids_bl=None):
    """Base-pass cross-entropies only, [B, L] (the no-thought baseline, `original_mode`)."""
    positions, attend = self.lm.text_attend(tokens_bl, mask_bl.astype(bool), segment_ids_bl)
    hidden, _ = self.lm.run_layers(self.lm.embed(tokens_bl), positions, attend)
    return token_ce(hidden, self._head(), jnp.roll(tokens_bl, -1, axis=1),
                    self.qs.remat_logits, self.cfg.dtype)

  def _vector(self, param, shape):
    vec = (param * self.qs.embedding_scale).astype(jnp.dtype(self.cfg.dtype))
    return jnp.broadcast_to(vec, shape)

  def _head(self):
    """The lm_head matrix [D, V]."""
    return self.lm.embedding.T if self.cfg.tie_embeddings else self.lm.lm_head

  def __call__(self, tokens_bl, mask_bl, rng, *, segment_ids_bl=None, forced_thoughts=None,
               greedy=False, return_logits=False):
    """Runs the base pass, then the thought passes and the talk pass chunk by chunk.

    Args:
      tokens_bl: [B, L] int token ids; mask_bl: [B, L] real-token mask (right padding).
      segment_ids_bl: optional [B, L] document ids of packed rows: every pass attends only
        within the document, positions restart per document, and talk tokens past the end of
        a document are padding, so a packed row computes what its documents would alone.
      rng: key for sampling thought tokens (temperature 1, start/end excluded).
      forced_thoughts: optional [N, L, T] thought tokens used instead of samples (tests).
      greedy: argmax thoughts instead of sampling.
      return_logits: also return the full logits and hidden states (tests; costs memory).
    Returns:
      dict with
        base_ce [B, L]: CE of x_{i+1} under the base logits at i (0 at i = L-1),
        talk_ce [N, L, A]: CE of x_{i+k+1} under the mixed logits of talk step k,
        thought_logprob [N, L, T]: log-probability of each sampled thought token at the
          REINFORCE temperature (with gradient),
        thoughts [N, L, T], mix_weight [N, L, A]; with return_logits also
        base_logits [B, L, V], base_hidden [B, L, D], talk_hidden [N, L, A, D],
        thought_logits [N, L, T, V] (start/end masked) and talk_logits [N, L, A, V].
    """
    qs, cfg = self.qs, self.cfg
    b, l = tokens_bl.shape
    p, talk = qs.n_passes, qs.n_ahead_talk
    valid = mask_bl.astype(bool)
    out = {}

    # Base pass: once per document; its keys/values are every branch's prefix.
    positions, attend = self.lm.text_attend(tokens_bl, valid, segment_ids_bl, return_kv=True)
    base_hidden, prefix_kv = self.lm.run_layers(self.lm.embed(tokens_bl), positions, attend)
    out["base_ce"] = token_ce(base_hidden, self._head(), jnp.roll(tokens_bl, -1, axis=1),
                              qs.remat_logits, cfg.dtype)
    if return_logits:
      out.update(base_logits=self.lm.logits(base_hidden), base_hidden=base_hidden)

    # Everything a branch at position i needs besides the prefix keys/values, [B, L, ...]:
    # its text keys (prefix_mask), x_i's RoPE position, the teacher-forced talk tokens (padding
    # past the end of the text or of x_i's document) and the targets.
    shifted = lambda x_bl, ks: jnp.stack([jnp.roll(x_bl, -k, axis=1) for k in ks], axis=2)
    segments = jnp.zeros((b, l), jnp.int32) if segment_ids_bl is None else segment_ids_bl
    inside = jnp.stack([attention.same_segment_ahead(segments, k) for k in range(1, talk)]
                       or [jnp.zeros((b, l), bool)], axis=2)[..., :talk - 1]  # [B, L, A-1]
    per_position = dict(
        position=positions, valid=valid, prefix_mask=attend.mask_bll,
        ahead=(jnp.where(inside, shifted(tokens_bl, range(1, talk)), self.pad_id)
               if talk > 1 else jnp.zeros((b, l, 0), jnp.int32)),
        targets=shifted(tokens_bl, range(1, talk + 1)),
        base_rolled=shifted(base_hidden, range(talk)))
    if forced_thoughts is not None:
      per_position["forced"] = forced_thoughts.reshape(b, p, l, -1).transpose(0, 2, 1, 3)

    # Thought and talk passes, `chunk_positions` positions at a time under a scan whose body is
    # recomputed in the backward pass. Only the sampled thought tokens are kept from the forward,
    # so the recomputation sees the same thoughts.
    chunk = min(qs.chunk_positions or l, l)
    num_chunks = -(-l // chunk)
    pad = num_chunks * chunk - l

    def to_chunks(x):  # [B, L, ...] -> [num_chunks, B, chunk, ...] (padding is not real)
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
      return jnp.moveaxis(x.reshape(b, num_chunks, chunk, *x.shape[2:]), 1, 0)

    def from_chunks(y):  # [num_chunks, N, chunk, ...] -> [N, L, ...]
      y = jnp.moveaxis(y, 0, 1)
      return y.reshape(y.shape[0], num_chunks * chunk, *y.shape[3:])[:, :l]

    xs = jax.tree.map(to_chunks, per_position)
    chunk_ids = jnp.arange(num_chunks, dtype=jnp.int32)
    if not qs.chunk_positions:  # all positions at once, each pass differentiated on its own
      ys = self.chunk_passes(prefix_kv, rng, chunk_ids[0],
                             jax.tree.map(lambda x: x[0], xs), greedy=greedy,
                             return_logits=return_logits)
      ys = jax.tree.map(lambda y: y[None], ys)
    else:
      body = _chunk_with_block_grad(self._chunk_module(), greedy, return_logits)
      params = self.variables["params"]
      _, ys = jax.lax.scan(
          lambda carry, x: (carry, body(params, prefix_kv, rng, *x)), None,
          (chunk_ids, xs))
    out.update(jax.tree.map(from_chunks, ys))
    return out

  def _chunk_module(self) -> "QuietStarModel":
    """An unbound copy whose layers use `qs.chunk_remat` (applied to this model's params)."""
    cfg = dataclasses.replace(self.cfg, remat_policy=self.qs.chunk_remat)
    return QuietStarModel(cfg, self.qs, self.start_id, self.end_id, self.init_id, self.pad_id,
                          parent=None)

  def chunk_passes(self, prefix_kv, rng, chunk_id, x, *, greedy, return_logits):
    """The thought passes and the talk pass for a chunk of positions (see `__call__`).

    Pass by pass, as the official graph: the thought tokens are sampled without gradient, each
    pass attending to the prefix and to the keys/values of the branch's earlier passes; then the
    last thought pass and the talk pass. With `chunk_positions=0` this is differentiated as it
    is; with chunks it is the forward of `_chunk_with_block_grad`, whose backward is the
    `block_outputs` pass's.

    Args:
      prefix_kv: the base pass's (k, v), each [layers, B, S, K, E] with S = L.
      rng: the step's sampling key; chunk_id: int32 scalar, this chunk's index.
      x: dict of [B, C, ...] per-position inputs for the C positions of the chunk: position
        (RoPE position of x_i), valid, prefix_mask [.., S] (the text keys the branch sees),
        ahead [.., A-1], targets [.., A], base_rolled [.., A, D], optional forced [.., P, T].
    Returns:
      dict of [N, C, ...] outputs (the per-position entries of `__call__`'s result).
    """
    qs, cfg = self.qs, self.cfg
    b, c = x["valid"].shape
    p, t_n = qs.n_passes, qs.num_sampled
    n, d = b * p, cfg.embed_dim
    w_dv = self._head()
    ids = (self.start_id, self.end_id)
    index = jnp.repeat(x["position"], p, axis=0)                        # [N, C]
    run = self._runner(prefix_kv, x)
    forced = (x["forced"].transpose(0, 2, 1, 3).reshape(n, c, t_n)     # [B, C, P, T] -> [N, C, T]
              if "forced" in x else None)

    rng = jax.random.fold_in(rng, chunk_id)
    branch, tokens, logprobs, thought_h = [], [], [], []
    h = self._vector(self.start_thought, (n, c, d))
    for s in range(1, t_n + 1):
      hidden, kv = run(h, index + s, 1, branch)
      branch.append(kv)
      thought_h.append(hidden)
      logits = mask_thought_ids(_logits(hidden, w_dv, jnp.dtype(cfg.dtype)), ids)
      token = (forced[..., s - 1] if forced is not None
               else sample_thought(jax.random.fold_in(rng, s), logits, greedy))
      tokens.append(token)
      logprobs.append(thought_logprob(logits, token, qs.reinforce_temperature))
      h = self.lm.embed(token)
    thoughts = jax.lax.stop_gradient(jnp.stack(tokens, axis=-1))

    _, kv = run(h, index + t_n + 1, 1, branch)           # t_T: only its keys/values are used
    branch.append(kv)
    talk = qs.n_ahead_talk
    talk_h, _ = run(self._talk_inputs(x).reshape(n, c * talk, d),
                    self._positions(index, t_n + 2, talk), talk, branch)
    return self._outputs(x, thoughts, jnp.stack(logprobs, axis=-1), jnp.stack(thought_h, axis=2),
                         talk_h.reshape(n, c, talk, d), return_logits)

  def block_outputs(self, prefix_kv, x, thoughts, *, return_logits):
    """`chunk_passes`'s outputs from one teacher-forced block pass over the branch, given the
    thought tokens [N, C, T]: [start, t_1 .. t_T, end, x_{i+1} .. x_{i+A-1}] at RoPE positions
    i+1 .. i+T+1+A, causal within the block. Given the tokens, the same function of the
    parameters as `chunk_passes`, as one pass of T+1+A tokens per position: big matmuls and one
    weight gradient per chunk instead of one per pass. The backward of the chunked form."""
    qs, cfg = self.qs, self.cfg
    b, c = x["valid"].shape
    n, d, t_n, talk = b * qs.n_passes, cfg.embed_dim, qs.num_sampled, qs.n_ahead_talk
    q = t_n + 1 + talk                                                  # Q = T + 1 + A
    start = self._vector(self.start_thought, (n, c, 1, d))
    tokens = self.lm.embed(thoughts.reshape(n, -1)).reshape(n, c, t_n, d)
    index = jnp.repeat(x["position"], qs.n_passes, axis=0)
    hidden, _ = self._runner(prefix_kv, x)(
        jnp.concatenate([start, tokens, self._talk_inputs(x)], axis=2).reshape(n, c * q, d),
        self._positions(index, 1, q), q, [])
    hidden = hidden.reshape(n, c, q, d)
    # Slot s-1 (start, t_1, ...) predicts t_s; slots T+1 .. are the talk tokens.
    thought_h = hidden[:, :, :t_n]
    logits = mask_thought_ids(_logits(thought_h, self._head(), jnp.dtype(cfg.dtype)),
                              (self.start_id, self.end_id))
    logprob = thought_logprob(logits, thoughts, qs.reinforce_temperature)
    return self._outputs(x, thoughts, logprob, thought_h, hidden[:, :, t_n + 1:], return_logits)

  def _runner(self, prefix_kv, x):
    """run(x [N, C * Q, D], positions, Q, branch): the layers over a chunk's branch tokens."""
    def run(x_ncd, positions_nc, block, branch):
      attend = ThoughtAttend(x["prefix_mask"], x["valid"], passes=self.qs.n_passes, block=block)
      return self.lm.run_layers(x_ncd, positions_nc, attend, (*prefix_kv, tuple(branch)))
    return run

  @staticmethod
  def _positions(index_nc, first, count):
    """RoPE positions i + first .. i + first + count - 1 per position, [N, C * count]."""
    pos = index_nc[:, :, None] + first + jnp.arange(count)
    return pos.reshape(index_nc.shape[0], -1)

  def _talk_inputs(self, x):
    """[end, x_{i+1}, ..., x_{i+A-1}] embedded, [N, C, A, D]."""
    b, c = x["valid"].shape
    n, d, talk = b * self.qs.n_passes, self.cfg.embed_dim, self.qs.n_ahead_talk
    h = self._vector(self.end_thought, (n, c, 1, d))
    if talk == 1:
      return h
    ahead = jnp.repeat(x["ahead"], self.qs.n_passes, axis=0).reshape(n, -1)
    return jnp.concatenate([h, self.lm.embed(ahead).reshape(n, c, talk - 1, d)], axis=2)

  def _outputs(self, x, thoughts, logprob, thought_h, talk_h, return_logits):
    """The per-position outputs from the thoughts' log-probabilities [N, C, T], the thought
    states [N, C, T, D] (state s-1 predicts t_s) and the talk states [N, C, A, D]."""
    qs, cfg = self.qs, self.cfg
    n, c, t_n, d = thought_h.shape
    w_dv = self._head()
    rows = lambda a: jnp.repeat(a, qs.n_passes, axis=0)                # [B, ...] -> [N, ...]
    out = {"thoughts": thoughts, "thought_logprob": logprob}
    # Mixing: the talk state at (i, k) predicts x_{i+k+1}, as does the base state at i + k.
    base_rolled = rows(x["base_rolled"])                                # [N, C, A, D]
    w = self.mixing(base_rolled, talk_h)                                # [N, C, A, 1]
    h_mix = mix(base_rolled, talk_h, w)
    out["talk_ce"] = token_ce(h_mix, w_dv, rows(x["targets"]), qs.remat_logits, cfg.dtype)
    out["mix_weight"] = w[..., 0]
    if return_logits:
      out["thought_logits"] = self.thought_logits(
          thought_h.reshape(n, c * t_n, d)).reshape(n, c, t_n, -1)
      out["talk_logits"] = self.lm.logits(h_mix.reshape(n, -1, d)).reshape(n, c, -1,
                                                                           cfg.vocab_size)
      out["talk_hidden"] = talk_h
    return out

  def thought_logits(self, h_nld):
    """lm_head logits with the start/end ids masked: the thought sampling distribution."""
    return mask_thought_ids(self.lm.logits(h_nld), (self.start_id, self.end_id))


def _chunk_with_block_grad(module: QuietStarModel, greedy: bool, return_logits: bool):
  """f(params, prefix_kv, rng, chunk_id, x) -> `module.chunk_passes` outputs, the body
  of the scan over chunks: forward pass by pass (`chunk_passes`), backward by the block pass
  (`block_outputs`), recomputed from the inputs and the sampled tokens. The backward therefore
  holds one chunk's block activations, and the forward does no work twice."""
  def apply(params, *args, **kwargs):
    return module.apply({"params": params}, *args, greedy=greedy, return_logits=return_logits,
                        **kwargs)

  @jax.custom_vjp
  def f(params, prefix_kv, rng, chunk_id, x):
    return apply(params, prefix_kv, rng, chunk_id, x,
                 method=QuietStarModel.chunk_passes)

  def fwd(params, prefix_kv, rng, chunk_id, x):
    out = f(params, prefix_kv, rng, chunk_id, x)
    return out, (params, prefix_kv, x, out["thoughts"])

  def bwd(res, ct):
    params, prefix_kv, x, thoughts = res
    float_x = {"base_rolled": x["base_rolled"]}

    def block(params, prefix_kv, float_x):
      out = module.apply({"params": params}, prefix_kv, {**x, **float_x}, thoughts,
                         return_logits=return_logits, method=QuietStarModel.block_outputs)
      del out["thoughts"]
      return out
    _, vjp = jax.vjp(block, params, prefix_kv, float_x)
    d_params, d_prefix_kv, d_float_x = vjp({k: v for k, v in ct.items() if k != "thoughts"})
    d_x = {k: d_float_x.get(k) for k in x}
    return d_params, d_prefix_kv, None, None, d_x

  f.defvjp(fwd, bwd)
  return f


def mask_thought_ids(logits, ids):
  """`logits` [..., V] with the ids in `ids` (start/end) set to MASKED_LOGIT."""
  banned = jnp.zeros(logits.shape[-1], bool).at[jnp.array(ids)].set(True)
  return jnp.where(banned, MASKED_LOGIT, logits)


def _logits(h, w_dv, dtype):
  return dense(h.astype(dtype), w_dv.astype(dtype), out_dtype=upcast(dtype))


def token_ce(h, w_dv, targets, remat: bool, dtype: str = "float32"):
  """Cross-entropy of `targets` under the logits h @ w_dv, in fp32; shape of `targets`.

  With `remat` the [..., V] logits are recomputed in the backward pass instead of stored.
  """
  def ce(h, w_dv, targets):
    logits = _logits(h, w_dv, jnp.dtype(dtype))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit
  return (jax.checkpoint(ce) if remat else ce)(h, w_dv, targets)


def sample_thought(key, logits, greedy):
  """A thought token per row of `logits` [..., V] (start/end already masked): a draw from
  softmax(logits) at temperature 1, or the argmax. No gradient (no straight-through): only REINFORCE
  teaches the choice.

  Sampling is by inverse CDF (`jaxstar.sampling.sample_inverse_cdf`).
  """
  logits = jax.lax.stop_gradient(logits)
  token = jnp.argmax(logits, axis=-1) if greedy else sampling.sample_inverse_cdf(key, logits)
  return token.astype(jnp.int32)


def thought_logprob(logits, tokens, temperature):
  """Log-probability of `tokens` [...] under softmax(logits / temperature), logits [..., V] fp32
  with start/end masked (with gradient: the REINFORCE score function)."""
  logprob = jax.nn.log_softmax(logits / temperature, axis=-1)
  return jnp.take_along_axis(logprob, tokens[..., None], axis=-1)[..., 0]
