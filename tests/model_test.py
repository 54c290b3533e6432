"""Tests of the Mistral-style decoder: sizes, KV-cache decoding, remat, bad input.

Equivalence tests (two computations of the same maths) run in float64 and compare with
`equivalence.assert_close` (1e-9, relative to the compared magnitude; tests/equivalence.py).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstar import model as model_lib
from jaxstar.model import attention, layers
from tests import equivalence
from tests.equivalence import assert_close, assert_far, assert_tree_close, x64


def _init(cfg, seed=0):
  module = model_lib.Transformer(cfg)
  params = nn.unbox(module.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"])
  return module, params


def test_mistral_7b_parameter_count():
  assert model_lib.count_params(model_lib.get_config("mistral_7b")) == 7_241_732_096


def test_variant_sizes():
  assert 0.5e6 < model_lib.count_params(model_lib.get_config("tiny")) < 2e6
  assert 10e6 < model_lib.count_params(model_lib.get_config("small")) < 20e6


def test_unknown_variant_and_bad_fields():
  with pytest.raises(ValueError, match="Unknown model variant 'huge'"):
    model_lib.get_config("huge")
  with pytest.raises(ValueError, match="nope"):
    model_lib.get_config("tiny", nope=1)
  with pytest.raises(ValueError, match="num_kv_heads"):
    model_lib.get_config("tiny", num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="remat_policy"):
    model_lib.get_config("tiny", remat_policy="sometimes")


@pytest.mark.parametrize("window", [None, 5])
def test_kv_cache_decoding_equals_full_forward(window):
  """A prefill then one token at a time through the cache gives the full forward's logits."""
  with x64():
    cfg = model_lib.get_config("tiny", num_layers=2, sliding_window=window, **equivalence.F64)
    module, params = _init(cfg)
    b, l, prompt = 3, 12, 5
    tokens = jax.random.randint(jax.random.key(1), (b, l), 0, cfg.vocab_size, jnp.int32)
    # Row 1 has two padding tokens inside the prompt region: they are never attended.
    mask = jnp.ones((b, l), bool).at[1, 3:5].set(False)
    forward = jax.jit(lambda p, t, m: module.apply({"params": p}, t, m))
    full = forward(params, tokens, mask)

    decode = jax.jit(lambda p, t, c, m: module.apply({"params": p}, t, c, m,
                                                     method=model_lib.Transformer.decode))
    cache = model_lib.init_cache(cfg, b, 16)
    first, cache = decode(params, tokens[:, :prompt], cache, mask[:, :prompt])
    steps = [first]
    for i in range(prompt, l):
      logits, cache = decode(params, tokens[:, i:i + 1], cache, mask[:, i:i + 1])
      steps.append(logits)
    stepped = np.asarray(jnp.concatenate(steps, axis=1))
    valid = np.asarray(mask)
    assert_close(stepped[valid], np.asarray(full)[valid])
    assert int(cache.index) == l
    # Live: the decoded steps depend on the cached prompt (token 2 is in the first steps' window).
    other = forward(params, tokens.at[:, 2].add(1), mask)
    assert_far(stepped[:, prompt:], np.asarray(other)[:, prompt:], err_msg="changed prompt")


def test_padding_keys_are_ignored():
  """Changing a padded token must not change any real position's logits."""
  with x64():
    cfg = model_lib.get_config("tiny", num_layers=2, **equivalence.F64)
    module, params = _init(cfg)
    forward = jax.jit(lambda t, m: module.apply({"params": params}, t, m))
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size, jnp.int32)
    mask = jnp.ones((2, 10), bool).at[:, 7:].set(False)
    a = forward(tokens, mask)
    assert_close(forward(tokens.at[:, 8].set(7), mask)[:, :7], a[:, :7])
    # Live: the same change at a real position does change the later logits.
    changed = forward(tokens.at[:, 6].set(7), jnp.ones((2, 10), bool))
    assert_far(changed[:, 6:7], forward(tokens, jnp.ones((2, 10), bool))[:, 6:7])


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_does_not_change_values_or_gradients(policy):
  with x64():
    cfg = model_lib.get_config("tiny", num_layers=2, **equivalence.F64)
    module, params = _init(cfg)
    remat = model_lib.Transformer(cfg.replace(remat_policy=policy))
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, cfg.vocab_size, jnp.int32)

    def loss(m, p):
      logits = m.apply({"params": p}, tokens)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    (l0, g0), (l1, g1) = [jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(params)
                          for m in (module, remat)]
  assert_close(l1, l0, "loss")
  assert_tree_close(g1, g0, "grads")
  # Live: every layer parameter gets gradient, so the recomputed backward is compared.
  assert all(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(g0["layers"]))


def test_tied_embeddings_have_no_lm_head():
  cfg = model_lib.get_config("tiny", tie_embeddings=True)
  _, params = _init(cfg)
  assert "lm_head" not in params
  assert model_lib.count_params(cfg) == sum(x.size for x in jax.tree.leaves(params))


def test_bfloat16_compute_runs_and_returns_fp32_logits():
  cfg = model_lib.get_config("tiny", dtype="bfloat16")
  module, params = _init(cfg)
  logits = module.apply({"params": params}, jnp.ones((1, 4), jnp.int32))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  assert params["embedding"].dtype == jnp.float32


def test_unrolled_layer_scan_computes_the_same():
  with x64():
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 512, jnp.int32)
    outs = []
    for unroll in (1, 2, 0):
      cfg = model_lib.get_config("tiny", scan_unroll=unroll, **equivalence.F64)
      module = model_lib.Transformer(cfg)
      params = module.init(jax.random.key(0), tokens)
      outs.append(jax.jit(jax.value_and_grad(lambda p: module.apply(p, tokens).sum()))(params))
    for out in outs[1:]:
      assert_close(out[0], outs[0][0])
      assert_tree_close(out[1], outs[0][1])
  for bad in (5, -1):
    with pytest.raises(ValueError, match=rf"scan_unroll={bad} must be in \[0, num_layers=4\]"):
      model_lib.get_config("tiny", scan_unroll=bad)


@pytest.mark.parametrize("x_shape,w_shape,in_axes", [
    ((2, 5, 3), (3, 4, 2), 1),        # [B, L, D] x [D, H, E], as the q projection
    ((2, 5, 4, 2), (4, 2, 3), 2),     # [B, L, H, E] x [H, E, D], as the output projection
    ((7, 3), (3, 6), 1)])
def test_flat_dense_matches_the_einsum_in_values_and_gradients(x_shape, w_shape, in_axes):
  with x64():
    rng = np.random.default_rng(0)
    x, w = jnp.asarray(rng.normal(size=x_shape)), jnp.asarray(rng.normal(size=w_shape))
    ct = jnp.asarray(rng.normal(size=x_shape[:len(x_shape) - in_axes] + w_shape[in_axes:]))
    results = [jax.jit(jax.value_and_grad(
        lambda x, w, flat=flat: jnp.sum(layers.dense(x, w, in_axes, flat=flat) * ct), (0, 1)))(x, w)
        for flat in (False, True)]
    assert_close(results[1][0], results[0][0])
    assert_tree_close(results[1][1], results[0][1])
  with pytest.raises(ValueError, match="disagree"):
    layers.dense(jnp.ones((2, 3)), jnp.ones((4, 5)))


def test_heads_major_attention_matches_token_major_in_values_and_gradients(monkeypatch):
  # Blocks of 4 queries over 10 (4, 4, 2): the causal path skips blocks above the diagonal.
  monkeypatch.setattr(attention, "CAUSAL_BLOCK", 4)
  with x64():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 10, 4, 3)))          # [B, L, H, E], two kv heads
    k, v = (jnp.asarray(rng.normal(size=(2, 10, 2, 3))) for _ in range(2))
    idx = jnp.arange(10)
    valid = jnp.asarray(rng.random((2, 10)) > 0.2).at[:, 0].set(True)  # no fully masked row
    mask = attention.visible_keys(idx, idx, valid, 6)
    ct = jnp.asarray(rng.normal(size=q.shape))
    variants = ((False, False), (True, False), (True, True))  # (heads_major, causal)
    results = [jax.jit(jax.value_and_grad(
        lambda q, k, v, hm=hm, c=c: jnp.sum(attention.dot_attention(q, k, v, mask, hm, c) * ct),
        (0, 1, 2)))(q, k, v) for hm, c in variants]
    for result in results[1:]:
      assert_close(result[0], results[0][0])
      assert_tree_close(result[1], results[0][1])
  with pytest.raises(ValueError, match="as many queries as keys"):
    attention.dot_attention(q[:, :5], k, v, mask[:, :5], True, True)
