"""Quiet-STaR: the parallel thought passes against a naive per-position reference, the memory
options and a sharded step against the plain passes, step-0 identities, advantages, and
configuration errors.

Equivalence tests (two computations of the same maths) run in float64 and compare with
`equivalence.assert_close` (1e-9, relative to the compared magnitude; tests/equivalence.py).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstar import model as model_lib
from jaxstar.model import attention
from jaxstar.model import layers as layers_lib
from jaxstar.quietstar import config as qs_config
from jaxstar.quietstar import loss as qs_loss
from jaxstar.quietstar import thoughts
from tests import equivalence
from tests.equivalence import assert_close, assert_far, assert_tree_close, x64

START, END, PAD = 259, 260, 2


def _model(n_ahead=5, talk=3, passes=2, qs_kw=None, float64=True, **cfg_kw):
  """The tiny model with 2 layers; float64 (build and run it inside `x64()`) unless told not."""
  cfg = model_lib.get_config("tiny", num_layers=2, **(equivalence.F64 if float64 else {}),
                             **cfg_kw)
  qs = qs_config.QuietStarConfig(n_ahead=n_ahead, n_ahead_talk=talk, n_passes=passes,
                                 **(qs_kw or {}))
  return thoughts.QuietStarModel(cfg, qs, start_id=START, end_id=END, init_id=48, pad_id=PAD)


def _params(model, tokens, seed=0, perturb_mixing=True):
  params = nn.unbox(model.init(jax.random.key(seed), tokens,
                               method=thoughts.QuietStarModel.init_all)["params"])
  if perturb_mixing:  # a trained-looking head, so the mixing weight is not 0
    out = params["mixing"]["out_proj"]["kernel"]
    params["mixing"]["out_proj"]["kernel"] = jax.random.normal(jax.random.key(7), out.shape,
                                                               out.dtype) * 0.5
    params["start_thought"] = params["start_thought"] + 0.01
  return params


def _batch(b=2, l=8):
  tokens = jax.random.randint(jax.random.key(1), (b, l), 3, 250, jnp.int32)
  mask = jnp.ones((b, l), jnp.int32).at[1, l - 2:].set(0)
  tokens = jnp.where(mask > 0, tokens, PAD)
  return tokens, mask


def _forced(model, b=2, l=8):
  return jax.random.randint(jax.random.key(6), (b * model.qs.n_passes, l, model.qs.num_sampled),
                            3, 250, jnp.int32)


# ------------------------------------------------------------------------- the naive reference


def _naive_texts(qs, tokens, mask, thoughts_nls):
  """The naive texts: after each real position i of each row n (document d = n // P), the text
  x_0 .. x_i, start, the thoughts of (n, i), end, x_{i+1} .. x_{i+A-1} (PAD past the end).

  A static layout, from host arrays: [R, M] arrays of the R texts right-padded to M tokens, ids
  (0 at start/end), is_start, is_end; the (n, i) of each text, n [R] and i [R]; and the slots to
  read: thought_at [R, S] (start, t_1 .. t_{S-1}: the logits that sample t_1 .. t_S) and
  talk_at [R, A] (end, x_{i+1} ..: the talk states).
  """
  tokens, mask, thoughts_nls = (np.asarray(a) for a in (tokens, mask, thoughts_nls))
  b, l = tokens.shape
  p, talk, s_n = qs.n_passes, qs.n_ahead_talk, qs.num_sampled
  rows, texts = [], []
  for n in range(b * p):
    d = n // p
    for i in range(l):
      if mask[d, i]:
        ahead = [tokens[d, i + k] if i + k < l else PAD for k in range(1, talk)]
        texts.append([*tokens[d, :i + 1], -1, *thoughts_nls[n, i], -2, *ahead])
        rows.append((n, i))
  text = np.full((len(texts), max(map(len, texts))), PAD)
  for r, t in enumerate(texts):
    text[r, :len(t)] = t
  n_idx, i_idx = (np.array(a) for a in zip(*rows))
  return dict(ids=np.maximum(text, 0).astype(np.int32), is_start=text == -1, is_end=text == -2,
              n=n_idx, i=i_idx, thought_at=i_idx[:, None] + 1 + np.arange(s_n),
              talk_at=i_idx[:, None] + 2 + s_n + np.arange(talk))


def _naive_states(model, params, tokens, mask, texts):
  """Runs the plain model on the text and on each naive text (causal, positions 0 ..).

  Returns (base_logits [B, L, V], base_hidden [B, L, D], thought_logits [R, S, V] (unmasked),
  talk_hidden [R, A, D]).
  """
  lm, lm_p, scale = model_lib.Transformer(model.cfg), params["lm"], model.qs.embedding_scale
  base_logits, base_hidden = lm.apply({"params": lm_p}, tokens, mask > 0, return_hidden=True)
  x = lm.apply({"params": lm_p}, texts["ids"], method=lm.embed)
  x = jnp.where(texts["is_start"][..., None], params["start_thought"] * scale, x)
  x = jnp.where(texts["is_end"][..., None], params["end_thought"] * scale, x)
  r, m = texts["ids"].shape
  idx = jnp.arange(m)
  causal = jnp.broadcast_to(attention.visible_keys(idx, idx, None, model.cfg.sliding_window),
                            (r, m, m))
  hidden, _ = lm.apply({"params": lm_p}, x, jnp.broadcast_to(idx, (r, m)),
                       attention.CausalAttend(causal), method=lm.run_layers)
  logits = lm.apply({"params": lm_p}, hidden, method=lm.logits)
  row = jnp.arange(r)[:, None]
  return base_logits, base_hidden, logits[row, texts["thought_at"]], hidden[row, texts["talk_at"]]


def _naive_outputs(model, params, tokens, texts, states):
  """The per-position outputs of `QuietStarModel.__call__` from the naive states, written at
  the real positions of [N, L, ...] arrays (0 at padding, which the losses do not score)."""
  qs, cfg = model.qs, model.cfg
  base_logits, base_hidden, thought_rows, talk_rows = states
  n_rows, l, p, talk = tokens.shape[0] * qs.n_passes, tokens.shape[1], qs.n_passes, qs.n_ahead_talk
  at = (texts["n"], texts["i"])
  scatter = lambda rows: jnp.zeros((n_rows, l) + rows.shape[1:], rows.dtype).at[at].set(rows)
  talk_hidden = scatter(talk_rows)
  # The talk state at (i, k) is mixed with the base state at i + k: both predict x_{i+k+1}.
  base_rolled = jnp.repeat(jnp.stack([jnp.roll(base_hidden, -k, axis=1) for k in range(talk)],
                                     axis=2), p, axis=0)
  w = model.apply({"params": params}, base_rolled, talk_hidden,
                  method=lambda m, a, b: m.mixing(a, b))
  targets = jnp.repeat(jnp.stack([jnp.roll(tokens, -k, axis=1) for k in range(1, talk + 1)], 2),
                       p, axis=0)
  w_dv = params["lm"]["lm_head"]
  masked = thoughts.mask_thought_ids(thought_rows, (START, END))
  thoughts_r = jnp.asarray(texts["ids"])[jnp.arange(len(texts["n"]))[:, None],
                                         texts["thought_at"] + 1]       # t_1 .. t_S
  logprob = jnp.take_along_axis(jax.nn.log_softmax(masked / qs.reinforce_temperature, axis=-1),
                                thoughts_r[..., None], axis=-1)[..., 0]
  return dict(
      base_ce=thoughts.token_ce(base_hidden, w_dv, jnp.roll(tokens, -1, axis=1), False,
                                cfg.dtype),
      talk_ce=scatter(thoughts.token_ce((1 - w) * base_rolled + w * talk_hidden, w_dv, targets,
                                        False, cfg.dtype)[at]),
      thought_logprob=scatter(logprob), mix_weight=scatter(w[..., 0][at]),
      base_logits=base_logits, thought_rows=thought_rows, talk_rows=talk_rows)


def _projections(cfg):
  """Fixed random directions that reduce thought logits [.., V] and talk states [.., D] to a
  scalar (start/end excluded: their logits are masked constants in our model)."""
  proj_v = jax.random.normal(jax.random.key(8), (cfg.vocab_size,), jnp.float64)
  proj_d = jax.random.normal(jax.random.key(9), (cfg.embed_dim,), jnp.float64)
  return proj_v.at[START].set(0).at[END].set(0), proj_d


def _objective(model, metrics, thought_rows, talk_rows, weights=(1.0, 1.0)):
  """The scalar whose gradients are compared: NLL + weights[0] * the policy term (1: unscaled,
  so that both weigh alike) + weights[1] * projections of the thought logits and talk states
  of every real position."""
  proj_v, proj_d = _projections(model.cfg)
  return (metrics["nll"] + weights[0] * metrics["policy_loss"] +
          weights[1] * (jnp.sum(thought_rows @ proj_v) + jnp.sum(talk_rows @ proj_d)))


@functools.partial(jax.jit, static_argnums=0)
def _naive_value_and_grad(model, params, tokens, mask, texts):
  """(objective, (outputs, metrics)) and its gradients from the naive texts."""
  def objective(p):
    out = _naive_outputs(model, p, tokens, texts,
                         _naive_states(model, p, tokens, mask, texts))
    metrics = qs_loss.quietstar_loss(out, mask, model.qs)[1]
    return _objective(model, metrics, out["thought_rows"], out["talk_rows"]), (out, metrics)
  return jax.value_and_grad(objective, has_aux=True)(params)


def _setup(chunk):
  """The tiny model (P = 2, 2 sampled thought tokens, A = 3), a padded batch and params with a
  trained-looking mixing head; `chunk` positions per chunk (0: all at once)."""
  model = _model(qs_kw=dict(chunk_positions=chunk))
  tokens, mask = _batch()
  return model, tokens, mask, _params(model, tokens)


@functools.lru_cache(maxsize=None)
def _parallel(chunk):
  """f(params, rng, weights) -> ((objective, (outputs, metrics)), grads) of the parallel passes
  with sampled thoughts (`_objective`; weights is an array, so one compilation serves all)."""
  model, tokens, mask = _model(qs_kw=dict(chunk_positions=chunk)), *_batch()
  at = np.nonzero(np.repeat(np.asarray(mask), model.qs.n_passes, axis=0))  # real (n, i)

  def objective(params, rng, weights):
    out = model.apply({"params": params}, tokens, mask, rng, return_logits=True)
    metrics = qs_loss.quietstar_loss(out, mask, model.qs)[1]
    value = _objective(model, metrics, out["thought_logits"][at], out["talk_hidden"][at],
                       weights)
    return value, (out, metrics)
  return jax.jit(jax.value_and_grad(objective, has_aux=True))


@functools.lru_cache(maxsize=None)
def _parallel_and_naive(chunk):
  """Both computations, once per chunking (the state and gradient tests share them): the
  parallel passes sample the thoughts; the naive texts insert the same ones.

  Returns host trees ((value, (out, metrics)), grads) for ours and for the naive reference, and
  the naive texts.
  """
  with x64():
    model, tokens, mask, params = _setup(chunk)
    parallel = _parallel(chunk)(params, jax.random.key(3), jnp.ones(2))
    texts = _naive_texts(model.qs, tokens, mask, parallel[0][1][0]["thoughts"])
    naive = _naive_value_and_grad(_model(), params, tokens, mask, texts)
    return jax.tree.map(np.asarray, (parallel, naive)), texts


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("chunk", [0, 3])  # all positions at once; 3 chunks, the last padded
def test_parallel_thoughts_match_naive_reference(chunk):
  """Sampled thoughts (P = 2, padding present): the states and every loss term of the parallel
  passes equal those of the naive texts with the same thoughts inserted."""
  (((_, (out, metrics)), _), ((_, (naive, naive_metrics)), _)), texts = _parallel_and_naive(chunk)
  at = (texts["n"], texts["i"])
  assert_close(out["base_logits"], naive["base_logits"], "base_logits")
  # Start/end are masked to a constant while thinking; every other logit is compared.
  thought_logits = out["thought_logits"][at]
  np.testing.assert_array_equal(thought_logits[..., [START, END]], thoughts.MASKED_LOGIT)
  keep = np.ones(thought_logits.shape[-1], bool)
  keep[[START, END]] = False
  assert_close(thought_logits[..., keep], naive["thought_rows"][..., keep], "thought_logits")
  assert_close(out["talk_hidden"][at], naive["talk_rows"], "talk_hidden")
  for key in ("thought_logprob", "mix_weight", "talk_ce"):
    assert_close(out[key][at], naive[key][at], key)
  assert_close(out["base_ce"], naive["base_ce"], "base_ce")
  # The policy term unscaled (it enters the total x policy_weight).
  for key in ("nll", "base_loss", "talk_loss", "reward_mean", "reward_std", "policy_loss"):
    assert_close(metrics[key], naive_metrics[key], key)
  # Live: the mixing head is active, rewards differ, and the policy term is not 0.
  assert float(np.abs(out["mix_weight"][at]).mean()) > 1e-2
  assert float(metrics["reward_std"]) > 1e-3 and float(metrics["policy_loss"]) != 0.0


@pytest.mark.parametrize("chunk", [0, 3])  # passes differentiated as they are; block backward
def test_gradients_match_naive_reference(chunk):
  """The gradients of the losses (NLL, policy term) and of projections of the thought logits and
  talk states, through the parallel passes, equal those through the naive texts."""
  ((value, grads), (naive_value, naive_grads)), texts = _parallel_and_naive(chunk)
  value, naive_value = value[0], naive_value[0]
  assert_close(value, naive_value, "value")
  assert_tree_close(grads, naive_grads, "grads")
  # Live: every parameter group gets gradient (the mixing head and the thought vectors too) ...
  for name in ("start_thought", "end_thought", "mixing", "lm"):
    assert float(optax_norm(grads[name])) > 0, name
  # ... and one other thought token changes the naive value far beyond the tolerance.
  with x64():
    _, tokens, mask, params = _setup(chunk)
    ids = texts["ids"].copy()
    ids[0, texts["thought_at"][0, 1]] += 1  # t_1 of the first text
    (other, _), _ = _naive_value_and_grad(_model(), params, tokens, mask, {**texts, "ids": ids})
  assert_far(other, value, err_msg="value with another thought token")


def test_step_zero_identities_and_gradients():
  """At initialization the mixing weight is 0: the talk logits are the base logits, rewards and
  the policy term vanish, and only the mixing head's last layer and the LM get gradient."""
  with x64():
    model, (tokens, _) = _model(qs_kw=dict(chunk_positions=3)), _batch()
    params = _params(model, tokens, perturb_mixing=False)
    # The total loss (policy term x policy_weight, no projections), by the function of the
    # chunked (block backward) test above.
    (_, (out, metrics)), grads = _parallel(3)(params, jax.random.key(4),
                                              jnp.array([model.qs.policy_weight, 0.0]))
    assert float(jnp.abs(out["mix_weight"]).max()) == 0.0
    base = np.repeat(np.asarray(out["base_logits"]), 2, axis=0)
    talk = np.asarray(out["talk_logits"])
    for k in range(3):
      assert_close(talk[:, :8 - k - 1, k], base[:, k:7], f"talk step {k}")
    assert abs(float(metrics["reward_mean"])) <= equivalence.RTOL * float(metrics["base_loss"])
    assert float(metrics["policy_loss"]) == 0.0
    assert float(metrics["positive_advantage_share"]) == 0.0
    norm = lambda t: float(optax_norm(t))
    assert norm(grads["mixing"]["out_proj"]) > 0
    for name in ("in_proj", "hidden_proj"):
      assert norm(grads["mixing"][name]) == 0.0, name
    assert norm(grads["start_thought"]) == 0.0 and norm(grads["end_thought"]) == 0.0
    assert norm(grads["lm"]) > 0


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_two_passes_give_one_positive_advantage_per_position():
  r = jax.random.normal(jax.random.key(0), (6, 9))  # 3 documents x 2 adjacent copies
  adv = np.asarray(qs_loss.advantages(r, passes=2))
  pairs = adv.reshape(3, 2, 9)
  differ = np.ptp(np.asarray(r).reshape(3, 2, 9), axis=1) > 0
  assert np.all((pairs > 0).sum(axis=1)[differ] == 1)
  np.testing.assert_allclose(pairs.max(axis=1), np.abs(np.diff(np.asarray(r).reshape(3, 2, 9),
                                                                axis=1))[:, 0] / 2, atol=1e-6)


@pytest.mark.parametrize("kw, message", [
    (dict(n_ahead=3), "n_ahead=3 must be >= 4"),
    (dict(n_ahead_talk=0), "n_ahead_talk=0 must be >= 1"),
    (dict(n_passes=0), "n_passes=0 must be >= 1"),
    (dict(reward_reduction="max"), "reward_reduction"),
    (dict(chunk_positions=-1), "chunk_positions=-1 must be >= 0"),
    (dict(chunk_remat="some"), "chunk_remat='some'"),
])
def test_bad_config_is_a_clear_error(kw, message):
  with pytest.raises(ValueError, match=message):
    qs_config.QuietStarConfig(**kw)


def test_sequence_too_short_for_talk():
  with pytest.raises(ValueError, match="seq_len=5 is too short for quietstar.n_ahead_talk=4"):
    qs_config.QuietStarConfig(n_ahead_talk=4).check_seq_len(5)


def _train_step(model, mesh):
  import chex  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxstar import sharding  # pylint: disable=g-import-not-at-top
  from jaxstar import train_lib  # pylint: disable=g-import-not-at-top
  # Clipped SGD: the update is proportional to the gradient, so equal gradients give equal
  # parameters (Adam's sign-like first step would amplify float-level noise).
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1e-2))

  def loss_fn(params, batch, rng):
    out = model.apply({"params": params}, batch["tokens"], batch["mask"], rng)
    return qs_loss.quietstar_loss(out, batch["mask"], model.qs)

  def init(rng):
    params = model.init(rng, jnp.zeros((1, 2), jnp.int32), method=thoughts.QuietStarModel.init_all)
    params = params["params"]
    # A trained-looking mixing head: rewards well above float noise, a live policy term.
    box = params["mixing"]["out_proj"]["kernel"]
    params["mixing"]["out_proj"]["kernel"] = box.replace_boxed(
        jax.random.normal(jax.random.key(7), box.value.shape, box.value.dtype))
    return train_lib.init_train_state(params, optimizer, 0)

  state, shardings = sharding.create_sharded(init, mesh, jax.random.key(0))
  step = chex.assert_max_traces(train_lib.make_train_step(loss_fn, optimizer), n=1)
  data = sharding.batch_sharding(mesh)
  with sharding.use_mesh(mesh):
    jitted = jax.jit(step, in_shardings=(shardings, data), out_shardings=(shardings, None),
                     donate_argnums=0)
  return state, jitted, data


def test_sharded_step_equals_unsharded_and_traces_once():
  import chex  # pylint: disable=g-import-not-at-top
  from jaxstar import sharding  # pylint: disable=g-import-not-at-top
  results = []
  with x64():
    model = _model(n_ahead=5, talk=2, qs_kw=dict(chunk_positions=4))  # a scan of 2 chunks
    tokens, mask = _batch(b=4, l=8)
    for shape in [(1, 1, 1), (2, 2, 2)]:
      chex.clear_trace_counter()  # each mesh gets its own jitted step, traced once
      mesh = sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
      state, step, data = _train_step(model, mesh)
      if shape == (2, 2, 2):  # parameters really are sharded, in float64
        up = state.params["lm"]["layers"]["mlp"]["up_proj"]
        assert tuple(up.sharding.spec) == (None, "fsdp", "tensor") and up.dtype == jnp.float64
      batch = jax.device_put({"tokens": tokens, "mask": mask}, data)
      with sharding.use_mesh(mesh):
        state, m1 = step(state, batch)
        state, m2 = step(state, batch)  # a second call must not retrace
      results.append((jax.device_get(state.params),
                      {f"{k}@{i}": np.asarray(m[k]) for i, m in enumerate((m1, m2))
                       for k in ("nll", "policy_loss", "grad_norm")}))
  (p0, m0), (p1, m1) = results
  for key in m0:  # losses unscaled (the policy term enters the total x 1e6)
    assert_close(m1[key], m0[key], key)
  assert_tree_close(p1, p0, "params")
  assert m0["policy_loss@0"] > 1e-3 and m0["policy_loss@1"] > 1e-3  # live policy terms


def test_single_pass_uses_the_raw_reward():
  r = jnp.array([[0.5, -0.2, 0.0]])
  np.testing.assert_array_equal(qs_loss.advantages(r, passes=1), [[0.5, 0.0, 0.0]])


def _memory_loss(model, params, tokens, mask, forced):
  """NLL + the unscaled policy term (so both parts weigh alike), and the metrics."""
  out = model.apply({"params": params}, tokens, mask, jax.random.key(5), forced_thoughts=forced)
  metrics = qs_loss.quietstar_loss(out, mask, model.qs)[1]
  return metrics["nll"] + metrics["policy_loss"], metrics


@functools.lru_cache(maxsize=None)
def _memory_reference():
  """Loss, metrics and gradients of the plain passes (chunk_positions=0), computed once."""
  with x64():
    model = _model(n_ahead=5, talk=2, qs_kw=dict(chunk_positions=0))
    tokens, mask = _batch()
    params = _params(model, tokens)
    out = jax.jit(jax.value_and_grad(functools.partial(_memory_loss, model), has_aux=True))(
        params, tokens, mask, _forced(model))
    return jax.tree.map(np.asarray, out)


def test_thought_attention_layouts_agree_in_values_and_gradients():
  """`ThoughtAttend` heads-major (the CPU path, with its own gradient) against token-major (the
  other backends'), with padding, a sliding window and two branch passes, in float64."""
  b, p, l, qn, s_len, kv, g, e = 2, 2, 5, 3, 5, 2, 2, 4
  n = b * p
  with x64():
    rng = np.random.default_rng(4)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape))
    valid = jnp.asarray([[True] * 5, [True, True, True, False, False]])
    idx = jnp.arange(l)
    attend = thoughts.ThoughtAttend(attention.visible_keys(idx, idx, valid, 3), valid,
                                    passes=p, block=qn)
    q, k, v = normal(n, l * qn, kv * g, e), normal(n, l * qn, kv, e), normal(n, l * qn, kv, e)
    prefix = (normal(b, s_len, kv, e), normal(b, s_len, kv, e))
    branch = tuple((normal(n, l, kv, e), normal(n, l, kv, e)) for _ in range(2))
    ct = normal(*q.shape)

    def loss(q, k, v, prefix, branch):
      return jnp.sum(attend(q, k, v, (*prefix, branch))[0] * ct)
    results = []
    for heads_major in (False, True):
      layers_lib.set_cpu_layouts(heads_major)
      try:
        results.append(jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4)))(q, k, v, prefix,
                                                                          branch))
      finally:
        layers_lib.set_cpu_layouts(None)
    assert_close(results[1][0], results[0][0])
    assert_tree_close(results[1][1], results[0][1])
    assert float(optax_norm(results[1][1][4])) > 0  # the branch keys and values get gradient


@pytest.mark.parametrize("qs_kw", [
    dict(remat_logits=True),
    dict(chunk_positions=3),
    dict(chunk_positions=4, chunk_remat="full"),
    dict(chunk_positions=1, chunk_remat="dots_no_batch"),
])
def test_memory_options_change_neither_loss_nor_gradients(qs_kw):
  (l0, m0), g0 = _memory_reference()
  with x64():
    other = _model(n_ahead=5, talk=2, qs_kw=qs_kw)
    tokens, mask = _batch()
    params = _params(other, tokens)
    (l1, m1), g1 = jax.jit(jax.value_and_grad(functools.partial(_memory_loss, other),
                                              has_aux=True))(params, tokens, mask,
                                                             _forced(other))
  assert float(m0["policy_loss"]) != 0.0  # a live policy term: the comparison covers it
  assert_close(l1, l0, "loss")
  for key in ("nll", "policy_loss", "reward_mean", "mix_weight_mean"):
    assert_close(m1[key], m0[key], key)
  assert_tree_close(g1, g0, "grads")
