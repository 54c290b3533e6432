"""A loaded model for evaluation: scoring, generation, with or without thoughts.

  lm = LanguageModel.load("workdirs/quietstar_tiny")          # a jaxstar run directory
  lm = LanguageModel.load("/models/Mistral-7B-v0.1")          # a Hugging Face Mistral folder
  lm.loglikelihood(["12+34="], ["46"], thoughts=True)         # [(log p, is greedy)]
  lm.generate(["Q: ...\\nA:"], max_new_tokens=96, stop=("\\n\\n",))

Everything is batched (`batch_size` rows per device program, prompts bucketed by length) and
runs on a mesh: rows on its batch axes, the parameters as `jaxstar.sharding` lays them out.
With several processes every process makes the same calls with the same arguments and gets the
same results. `thoughts=True` needs a Quiet-STaR run: scoring then thinks at each scored
position (the training passes, `quietstar.decoding.mixed_logits_at`) and generation thinks
before every token (`quietstar.decoding.ThoughtDecoder`); thoughts run as in the paper's
evaluation, one thought per position, mixed at the end-of-thought state (n_ahead_talk = 1,
n_passes = 1, spec/quietstar.md §5.1).

Token ids at and above the tokenizer's thought ids are not text: scores are log-probabilities
under the distribution over text ids, the one generation draws from.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ml_collections

from jaxstar import checkpoint
from jaxstar import run_lib
from jaxstar import sampling
from jaxstar import sharding
from jaxstar import tokenizer as tokenizer_lib
from jaxstar.errors import UserError
from jaxstar.model import transformer
from jaxstar.quietstar import decoding
from jaxstar.quietstar import trainer
from jaxstar.quietstar.config import QuietStarConfig
from jaxstar.quietstar.thoughts import QuietStarModel, thought_init_vector


class LanguageModel:
  """Parameters, tokenizer and mesh of a model under evaluation.

  Args:
    params: LM params, or Quiet-STaR params {'lm', 'start_thought', 'end_thought', 'mixing'}
      when `qs` is given.
    model_cfg: its `ModelConfig`.
    tokenizer: a jaxstar tokenizer.
    qs: the `QuietStarConfig` of a Quiet-STaR model (None: a plain LM, no thoughts).
    mesh: the mesh the params live on (None: one device).
    batch_size: rows per device program; a multiple of the mesh's batch shards.
    max_length: longest context scored or generated into; longer contexts lose their start.
    seed: key of the thoughts drawn while scoring.
  """

  def __init__(self, params, model_cfg, tokenizer, *, qs: QuietStarConfig | None = None,
               mesh=None, batch_size: int = 8, max_length: int = 2048, seed: int = 0):
    sampling.check_batch_size(batch_size, mesh)
    self.params, self.model_cfg, self.tokenizer = params, model_cfg, tokenizer
    self.mesh, self.batch_size, self.max_length, self.seed = mesh, batch_size, max_length, seed
    self.qs = None if qs is None else dataclasses.replace(qs, n_ahead_talk=1, n_passes=1)
    self.text_ids = sampling.text_vocab_size(tokenizer)
    self._samplers = {}

  @property
  def has_thoughts(self) -> bool:
    """True for a Quiet-STaR model (`qs` given), False for a plain LM."""
    return self.qs is not None

  @property
  def lm_params(self):
    """The LM's params: `params['lm']` of a Quiet-STaR model, else `params`."""
    return self.params["lm"] if self.has_thoughts else self.params

  def thought_model(self) -> QuietStarModel:
    """The `QuietStarModel` of `model_cfg`, `qs` and the tokenizer's thought ids; raises
    `UserError` for a plain LM."""
    tok = self.tokenizer
    return QuietStarModel(self.model_cfg, self._require_thoughts(), tok.start_thought_id,
                          tok.end_thought_id, tok.thought_init_ids[0], tok.pad_id)

  def with_thoughts(self, qs: QuietStarConfig | None = None, seed: int = 0) -> "LanguageModel":
    """This plain LM as a Quiet-STaR model before any training with thoughts, as the quietstar
    stage starts one (spec/quietstar.md §2): thought vectors from the embedding of the
    tokenizer's thought-init token ('---'), a fresh mixing head whose last layer is zero.
    Thought-augmented decoding then thinks before every token (and shows the thoughts) while its
    predictions equal the plain LM's, until `configs/quietstar_*.py` trains it. Only the small
    new parameters are initialized; the LM's are shared, not copied."""
    if self.has_thoughts:
      return self
    qs = qs or QuietStarConfig()
    tok = self.tokenizer
    model = QuietStarModel(self.model_cfg, qs, tok.start_thought_id, tok.end_thought_id,
                           tok.thought_init_ids[0], tok.pad_id)

    def new_params(rng, embedding):
      # Only the mixing head leaves this function: XLA drops the LM's initializers.
      fresh = model.init(rng, jnp.zeros((1, 2), jnp.int32), method=QuietStarModel.init_all)
      vector = thought_init_vector(embedding, tok.thought_init_ids[0], qs.embedding_scale)
      return nn.unbox(fresh["params"]["mixing"]), vector

    mixing, vector = jax.jit(new_params)(jax.random.key(seed), self.params["embedding"])
    params = {"lm": self.params, "start_thought": vector, "end_thought": vector,
              "mixing": mixing}
    return LanguageModel(params, self.model_cfg, tok, qs=qs, mesh=self.mesh,
                         batch_size=self.batch_size, max_length=self.max_length, seed=self.seed)

  def _require_thoughts(self) -> QuietStarConfig:
    if self.qs is None:
      raise UserError("thoughts=True needs a Quiet-STaR model; this one is a plain LM (load a "
                      "jaxstar quietstar run directory)")
    return self.qs

  # ---------------------------------------------------------------------------- loading

  @classmethod
  def load(cls, path: str, *, tokenizer: str = "", mesh=None, n_ahead: int = 0,
           **kwargs) -> "LanguageModel":
    """From a jaxstar run directory (its newest good checkpoint) or a Hugging Face folder.

    Args:
      path: the folder.
      tokenizer: tokenizer name ('mistral', 'bytes', a .model path); default: the run's own,
        or 'mistral' for a Hugging Face folder.
      mesh: where to place the params (None: one device).
      n_ahead: thought length for a Quiet-STaR run (0: as trained).
      kwargs: `LanguageModel` arguments (batch_size, max_length, seed).
    """
    mesh = mesh or sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    ckpt_dir = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpt_dir):
      with checkpoint.Checkpointer(ckpt_dir, save_every=0, read_only=True) as saved:
        config = ml_collections.ConfigDict(saved.restore_config())
      tok = _tokenizer(tokenizer or config.tokenizer)
      model_cfg = run_lib.model_config_from(config, tok)
      thought_run = config.stage == "quietstar"
      if thought_run:   # all Quiet-STaR params (a no-thought baseline keeps its LM only)
        saved_qs = trainer.quietstar_config(config)
        abstract = jax.eval_shape(functools.partial(_init_thought_model, model_cfg, saved_qs,
                                                    tok), jax.random.key(0))
      else:
        abstract = jax.eval_shape(functools.partial(_init_lm, model_cfg), jax.random.key(0))
      target = run_lib.with_shardings(abstract, sharding.shardings_for(abstract, mesh))
      params = checkpoint.restore_params(ckpt_dir, target)
      qs = None
      if thought_run and saved_qs.original_mode:
        params = params["lm"]
      elif thought_run:
        qs = dataclasses.replace(saved_qs, n_ahead=n_ahead or saved_qs.n_ahead)
      return cls(params, model_cfg, tok, qs=qs, mesh=mesh, **kwargs)
    if os.path.exists(os.path.join(path, "config.json")):
      from jaxstar.model import hf_io  # pylint: disable=g-import-not-at-top
      tok = _tokenizer(tokenizer or "mistral")
      model_cfg = hf_io.config_from_hf(path)
      abstract = transformer.abstract_params(model_cfg)
      params = hf_io.load_hf_params(path, cfg=model_cfg,
                                    shardings=sharding.shardings_for(abstract, mesh))
      return cls(params, model_cfg, tok, mesh=mesh, **kwargs)
    raise UserError(f"{path!r} is neither a jaxstar run directory (no checkpoints/ folder) nor "
                    "a Hugging Face folder (no config.json)")

  # ---------------------------------------------------------------------------- scoring

  def logits_at(self, token_lists: Sequence[Sequence[int]],
                position_lists: Sequence[Sequence[int]], *, thoughts: bool = False,
                ids: Sequence[int] | None = None) -> list[np.ndarray]:
    """Next-token logits at chosen positions of each token list: [C_i, V] (or [C_i, len(ids)]).

    Position j's logits predict token j + 1; with `thoughts`, after a thought at j. Lists
    longer than `max_length` are an error (cut them first).
    """
    out = self._score(token_lists, position_lists, None, thoughts, ids)
    return [o["logits"] for o in out]

  def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str], *,
                    thoughts: bool = False) -> list[tuple[float, bool]]:
    """Per request: (sum of the continuation's token log-probabilities given the context,
    whether greedy decoding gives exactly those tokens).

    The context is tokenized with BOS; the continuation's tokens are those of the joined
    text after the context's (the usual convention), cut from the left to `max_length`.
    """
    token_lists, position_lists, target_lists = [], [], []
    for context, continuation in zip(contexts, continuations, strict=True):
      whole = self.tokenizer.encode(context + continuation, bos=True)
      n_ctx = len(self.tokenizer.encode(context, bos=True))
      if n_ctx >= len(whole):  # the joined text tokenized into fewer tokens than the context
        n_ctx = len(whole) - 1
      if n_ctx < 1:
        raise UserError("a loglikelihood request has an empty continuation")
      self._append_windowed(whole, n_ctx, token_lists, position_lists, target_lists)
    return [(float(o["logprob"].sum()), bool(o["greedy"].all()))
            for o in self._score(token_lists, position_lists, target_lists, thoughts)]

  def loglikelihood_rolling(self, texts: Sequence[str], *, thoughts: bool = False
                            ) -> list[float]:
    """Log-probability of each whole text (after BOS), in windows of `max_length` tokens."""
    totals = []
    for text in texts:
      ids = self.tokenizer.encode(text, bos=True)
      if len(ids) < 2:
        raise UserError("loglikelihood_rolling got an empty text")
      token_lists, position_lists, target_lists = [], [], []
      # Each window scores up to max_length - 1 new tokens after as much context as fits.
      for start in range(1, len(ids), self.max_length - 1):
        end = min(start + self.max_length - 1, len(ids))
        first = max(0, end - self.max_length)
        window = ids[first:end]
        token_lists.append(window)
        position_lists.append(list(range(start - 1 - first, end - 1 - first)))
        target_lists.append(ids[start:end])
      totals.append(float(sum(o["logprob"].sum() for o in self._score(
          token_lists, position_lists, target_lists, thoughts))))
    return totals

  def _append_windowed(self, whole, n_ctx, token_lists, position_lists, target_lists):
    first = max(0, len(whole) - self.max_length)
    if first >= n_ctx:
      raise UserError(f"a continuation of {len(whole) - n_ctx} tokens does not fit in "
                      f"max_length={self.max_length}")
    token_lists.append(whole[first:])
    position_lists.append(list(range(n_ctx - 1 - first, len(whole) - 1 - first)))
    target_lists.append(whole[n_ctx:])

  def _score(self, token_lists, position_lists, target_lists, thoughts, ids=None):
    """Batches the requests through the device scorer; per request a dict of numpy arrays."""
    results = [None] * len(token_lists)
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    fn = self._scorer(thoughts, None if ids is None else tuple(ids))
    params = self.params if thoughts else self.lm_params
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      rows = [token_lists[i] for i in chunk]
      if max(map(len, rows)) > self.max_length:
        raise UserError(f"a scored sequence has {max(map(len, rows))} tokens; max_length="
                        f"{self.max_length}")
      length = sampling.bucket(max(map(len, rows)))
      c = sampling.bucket(max(len(position_lists[i]) for i in chunk), (1, 2, 4, 8, 16, 32, 64))
      tokens = np.full((self.batch_size, length), self.tokenizer.pad_id, np.int32)
      mask = np.zeros((self.batch_size, length), bool)
      positions = np.zeros((self.batch_size, c), np.int32)
      targets = np.zeros((self.batch_size, c), np.int32)
      for r, i in enumerate(chunk):
        tokens[r, :len(token_lists[i])] = token_lists[i]
        mask[r, :len(token_lists[i])] = True
        positions[r, :len(position_lists[i])] = position_lists[i]
        if target_lists is not None:
          targets[r, :len(target_lists[i])] = target_lists[i]
      key = jax.random.fold_in(jax.random.key(self.seed), start // self.batch_size)
      with sampling.mesh_context(self.mesh):
        out = fn(params, *(sampling.place_rows(a, self.mesh)
                                for a in (tokens, mask, positions, targets)), key)
      out = sampling.gather_rows(out)
      for r, i in enumerate(chunk):
        n = len(position_lists[i])
        results[i] = {k: v[r, :n] for k, v in out.items()}
    return results

  @functools.lru_cache(maxsize=None)
  def _scorer(self, thoughts: bool, ids: tuple[int, ...] | None) -> Callable:
    """jit(params, tokens, mask, positions, targets, rng) -> {logprob, greedy, logits}."""
    text_ids = self.text_ids
    if thoughts:
      model = self.thought_model()

      def logits_fn(params, tokens, mask, positions, rng):
        mixed, _ = model.apply({"params": params}, tokens, mask, positions, rng,
                               method=decoding.mixed_logits_at)
        return mixed
    else:
      module = transformer.Transformer(self.model_cfg)

      def logits_fn(params, tokens, mask, positions, rng):
        del rng
        return module.apply({"params": params}, tokens, mask, positions, method=_logits_at)

    def score(params, tokens, mask, positions, targets, rng):
      logits = logits_fn(params, tokens, mask, positions, rng)               # [B, C, V]
      text = jnp.where(jnp.arange(logits.shape[-1]) < text_ids, logits, -jnp.inf)
      logprob = jax.nn.log_softmax(text, axis=-1)
      out = {"logprob": jnp.take_along_axis(logprob, targets[..., None], axis=-1)[..., 0],
             "greedy": jnp.argmax(text, axis=-1) == targets}
      out["logits"] = logits if ids is None else logits[..., jnp.asarray(ids)]
      return out
    return jax.jit(score)

  # ------------------------------------------------------------------------- generation

  def sample(self, prompts: Sequence[str | Sequence[int]], cfg: sampling.SamplingConfig, *,
             thoughts: bool = False, progress=None) -> list[sampling.Generation]:
    """`sampling.Generation`s (text, tokens, finish, and with thoughts each token's thought
    ids and mixing weight in `aux`).

    A prompt longer than `max_length - cfg.max_new_tokens` tokens keeps its BOS and its last
    tokens (as the STaR code keeps the end of over-long few-shot contexts), with a warning.
    """
    limit = self.max_length - cfg.max_new_tokens
    if limit < 2:
      raise UserError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in "
                      f"max_length={self.max_length}")
    ids = [self.tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p)
           for p in prompts]
    long = sum(len(i) > limit for i in ids)
    if long:
      logging.warning("%d of %d prompts are longer than max_length - max_new_tokens = %d "
                      "tokens: they keep BOS and their last tokens", long, len(ids), limit)
      ids = [i if len(i) <= limit else i[:1] + i[len(i) - limit + 1:] for i in ids]
    if thoughts not in self._samplers:
      if thoughts:
        m = self.thought_model()
        decoder = decoding.ThoughtDecoder(m.cfg, m.qs, m.start_id, m.end_id, m.init_id, m.pad_id)
        params = self.params
      else:
        decoder, params = sampling.PlainDecoder(self.model_cfg), self.lm_params
      self._samplers[thoughts] = sampling.Sampler(decoder, params, self.tokenizer, mesh=self.mesh,
                                                  batch_size=self.batch_size,
                                                  max_len=self.max_length)
    return self._samplers[thoughts].generate(ids, cfg, progress=progress)

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, stop: tuple[str, ...] = (),
               thoughts: bool = False, seed: int = 0) -> list[str]:
    """The generated continuation of each prompt (BOS is prepended), cut before a stop string."""
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, stop=tuple(stop), seed=seed)
    return [g.text for g in self.sample(prompts, cfg, thoughts=thoughts)]


def _logits_at(lm: transformer.Transformer, tokens_bl, mask_bl, positions_bc):
  """The plain model's logits [B, C, V] at the chosen positions only (the lm_head on C, not L,
  hidden states)."""
  positions, attend = lm.text_attend(tokens_bl, mask_bl.astype(bool))
  hidden, _ = lm.run_layers(lm.embed(tokens_bl), positions, attend)
  return lm.logits(jnp.take_along_axis(hidden, positions_bc[..., None], axis=1))


def _tokenizer(name: str):
  try:
    return tokenizer_lib.get_tokenizer(name)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"tokenizer {name!r}: {e}") from None


def _init_lm(model_cfg, rng):
  return transformer.Transformer(model_cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def _init_thought_model(model_cfg, qs, tok, rng):
  model = QuietStarModel(model_cfg, qs, tok.start_thought_id, tok.end_thought_id,
                         tok.thought_init_ids[0], tok.pad_id)
  return model.init(rng, jnp.zeros((1, 2), jnp.int32), method=QuietStarModel.init_all)["params"]


def random_model(model_cfg, tokenizer, *, qs: QuietStarConfig | None = None, seed: int = 0,
                 **kwargs) -> LanguageModel:
  """A randomly initialized model (tests, benchmarks). With `qs` a Quiet-STaR model whose
  mixing head has random (non-zero) output weights, so its thoughts change its predictions."""
  rng = jax.random.key(seed)
  if qs is None:
    return LanguageModel(nn.unbox(_init_lm(model_cfg, rng)), model_cfg, tokenizer, **kwargs)
  params = nn.unbox(_init_thought_model(model_cfg, qs, tokenizer, rng))
  out = params["mixing"]["out_proj"]["kernel"]
  params["mixing"]["out_proj"]["kernel"] = 0.5 * jax.random.normal(
      jax.random.fold_in(rng, 1), out.shape, out.dtype)
  return LanguageModel(params, model_cfg, tokenizer, qs=qs, **kwargs)
