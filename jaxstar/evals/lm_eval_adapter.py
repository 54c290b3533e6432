"""lm-evaluation-harness adapter: lets `lm_eval` score and sample a jaxstar model.

`JaxstarLM` is an `lm_eval.api.model.LM` around a `jaxstar.evals.lm.LanguageModel`, registered
with lm_eval under the name "jaxstar":

  from jaxstar.evals import lm_eval_adapter
  import lm_eval
  from lm_eval.tasks import TaskManager

  lm = lm_eval_adapter.JaxstarLM(language_model, thoughts=True)  # or path="workdirs/run"
  results = lm_eval.simple_evaluate(model=lm, tasks=["my_task"],
                                    task_manager=TaskManager(include_path="my_tasks/"))
  # or, by name (the registration happens on first use of this module's JaxstarLM/register):
  lm_eval_adapter.register()
  lm_eval.simple_evaluate(model="jaxstar", model_args="path=workdirs/run,thoughts=True", ...)

lm_eval is an optional extra (`pip install -e .[lm-eval]`). It is imported lazily, on the first
access to `JaxstarLM` or call of `register()`, so this module and `jaxstar.evals` import
without it; only using the adapter raises an ImportError that names the extra.

Each lm_eval request type maps onto one LanguageModel method, called once with the whole
request list (the LanguageModel batches and pads internally); results come back in request
order:
  loglikelihood          Instance.args (context, continuation) -> (logprob, is_greedy)
  loglikelihood_rolling  Instance.args (text,)                 -> logprob
  generate_until         Instance.args (context, gen_kwargs)   -> continuation text
`generate_until` calls the model once per distinct generation setting (`until`, `max_gen_toks`,
`do_sample`, `temperature`, `top_k`, `top_p`; see `generation_settings`): one
LanguageModel.generate call takes one setting for its whole batch.
"""
import importlib
import logging
from typing import Any, Sequence

_EXTRA = "pip install -e .[lm-eval]"
# gen_kwargs the adapter maps; others (repetition_penalty, min_p, ...) are HF-backend options
# that a LanguageModel lacks: the adapter warns once and generates without them rather than fail
# the task.
_GEN_KEYS = frozenset({"until", "max_gen_toks", "temperature", "do_sample", "top_k", "top_p"})

_log = logging.getLogger(__name__)
_cls = None  # JaxstarLM, built on first use (it subclasses lm_eval's LM).


def _import_lm_eval():
  """Imports lm_eval's model API, or raises an ImportError that says how to install it."""
  try:
    # pylint: disable=g-import-not-at-top,import-outside-toplevel
    from lm_eval.api import model as lm_model
    from lm_eval.api import registry
  except ImportError as e:
    raise ImportError(
        "jaxstar.evals.lm_eval_adapter needs lm-evaluation-harness (the `lm_eval` package), "
        f"an optional extra of jaxstar: {_EXTRA}") from e
  return lm_model, registry


def generation_settings(gen_kwargs: dict[str, Any] | None,
                        default_max_gen_toks: int) -> dict[str, Any]:
  """Maps lm_eval's generation kwargs to `LanguageModel.generate` keyword arguments.

  Follows lm_eval's HF backend: `until` is a string or a list of strings; `do_sample`
  defaults to temperature > 0; decoding is greedy (temperature 0) unless `do_sample` is true,
  and sampling without a temperature uses 1.0. `top_k` / `top_p` pass through only when the
  task sets them and samples (a LanguageModel without them still serves every other task).

  Returns:
    {"max_new_tokens", "temperature", "stop"[, "top_k"][, "top_p"]}.
  """
  kwargs = dict(gen_kwargs or {})
  until = kwargs.get("until") or ()
  if isinstance(until, str):
    until = (until,)
  elif not isinstance(until, (list, tuple)):
    raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, not {until!r}")
  temperature = kwargs.get("temperature")
  do_sample = bool(kwargs.get("do_sample", temperature is not None and float(temperature) > 0))
  if not do_sample:
    temperature = 0.0
  elif temperature is None:
    temperature = 1.0
  out = {"max_new_tokens": int(kwargs.get("max_gen_toks", default_max_gen_toks)),
         "temperature": float(temperature), "stop": tuple(str(u) for u in until)}
  if do_sample and kwargs.get("top_k") is not None:
    out["top_k"] = int(kwargs["top_k"])
  if do_sample and kwargs.get("top_p") is not None:
    out["top_p"] = float(kwargs["top_p"])
  return out


def _define():
  """Builds (once) and registers the JaxstarLM class; needs lm_eval."""
  global _cls
  if _cls is not None:
    return _cls
  lm_model, registry = _import_lm_eval()
  # lm_eval fills its registry with its own backends (lazily, by name) only when the registry
  # is empty at lookup; registering "jaxstar" first would hide "hf" and the rest.
  importlib.import_module("lm_eval.models")

  class JaxstarLM(lm_model.LM):
    """lm_eval model backed by a jaxstar LanguageModel (see the module docstring).

    Args:
      model: a `jaxstar.evals.lm.LanguageModel` (anything with its `loglikelihood`,
        `loglikelihood_rolling` and `generate` methods); or None with `path`.
      path: a jaxstar run directory or a Hugging Face Mistral folder, loaded with
        `LanguageModel.load(path, **load_kwargs)` when `model` is None.
      thoughts: score and generate with Quiet-STaR thoughts (passed to every call).
      max_gen_toks: new-token budget of a generate_until request whose gen_kwargs set none.
      seed: sampling seed of generate_until requests with do_sample; with `path`, also
        `LanguageModel.load`'s seed (the key of the thoughts drawn while scoring).
      batch_size: forwarded to `LanguageModel.load` when an int (lm_eval passes its
        --batch_size here; "auto" and None are dropped: the LanguageModel batches itself).
      device, max_batch_size: accepted because lm_eval passes them; ignored (JAX places
        the model).
      **load_kwargs: further `LanguageModel.load` options, e.g. from a model_args string.
    """

    def __init__(self, model=None, *, path: str | None = None, thoughts: bool = False,
                 max_gen_toks: int = 256, seed: int = 0, batch_size: int | str | None = None,
                 device: str | None = None, max_batch_size: int | None = None,
                 **load_kwargs):
      super().__init__()
      del device, max_batch_size  # lm_eval's torch options; JAX places the model itself.
      if model is None:
        if path is None:
          raise ValueError("JaxstarLM needs a LanguageModel or path=<run dir or HF folder>")
        if isinstance(batch_size, int):
          load_kwargs["batch_size"] = batch_size
        load_kwargs["seed"] = seed
        # pylint: disable-next=g-import-not-at-top,import-outside-toplevel
        from jaxstar.evals import lm as jaxstar_lm
        model = jaxstar_lm.LanguageModel.load(str(path), **load_kwargs)
      elif load_kwargs:
        raise TypeError(f"load options {sorted(load_kwargs)} given with a loaded model")
      self.model = model
      self.path = path
      self.thoughts = bool(thoughts)
      self.max_gen_toks = int(max_gen_toks)
      self.seed = int(seed)
      self._warned_keys: set[str] = set()

    @property
    def max_length(self) -> int:
      """The LanguageModel's longest scored/generated sequence, in tokens."""
      return self.model.max_length

    def get_model_info(self) -> dict[str, Any]:
      """Extra entries for the results' "config" (simple_evaluate reads this)."""
      return {"jaxstar_path": self.path, "thoughts": self.thoughts}

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
      """(log p(continuation | context), is_greedy) per request; args (context, cont)."""
      contexts, continuations = _columns(requests, 2)
      out = self.model.loglikelihood(contexts, continuations, thoughts=self.thoughts)
      results = [(float(lp), bool(greedy)) for lp, greedy in out]
      _check_count(results, requests, "loglikelihood")
      for req, res in zip(requests, results):
        self.cache_hook.add_partial("loglikelihood", req.args, res)
      return results

    def loglikelihood_rolling(self, requests) -> list[float]:
      """Log-likelihood of each whole text (perplexity tasks); args (text,)."""
      (texts,) = _columns(requests, 1)
      results = [float(lp) for lp in
                 self.model.loglikelihood_rolling(texts, thoughts=self.thoughts)]
      _check_count(results, requests, "loglikelihood_rolling")
      for req, res in zip(requests, results):
        self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
      return results

    def generate_until(self, requests) -> list[str]:
      """Continuation of each context, cut before the first `until` string.

      Args are (context, gen_kwargs); requests that share gen_kwargs go to the model in one
      call, in their original order.
      """
      groups: dict[tuple, list[int]] = {}
      for i, req in enumerate(requests):
        gen_kwargs = req.args[1] if len(req.args) > 1 else {}
        self._warn_unused(gen_kwargs)
        settings = generation_settings(gen_kwargs, self.max_gen_toks)
        groups.setdefault(tuple(sorted(settings.items())), []).append(i)
      results: list[str | None] = [None] * len(requests)
      for key, idx in groups.items():
        texts = self.model.generate([requests[i].args[0] for i in idx], **dict(key),
                                    thoughts=self.thoughts, seed=self.seed)
        if len(texts) != len(idx):
          raise RuntimeError(f"generate returned {len(texts)} texts for {len(idx)} prompts")
        for i, text in zip(idx, texts):
          results[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
      return results

    def _warn_unused(self, gen_kwargs) -> None:
      for key in sorted(set(gen_kwargs or {}) - _GEN_KEYS - self._warned_keys):
        self._warned_keys.add(key)
        _log.warning("JaxstarLM ignores generation option %s=%r (it maps until, max_gen_toks, "
                     "do_sample, temperature, top_k, top_p)", key, gen_kwargs[key])

  # Named as if defined at module level, where __getattr__ finds it (pickle, repr, docs).
  JaxstarLM.__module__, JaxstarLM.__qualname__ = __name__, "JaxstarLM"
  registry.register_model("jaxstar")(JaxstarLM)
  _cls = JaxstarLM
  return _cls


def _columns(requests, n: int) -> tuple[list[str], ...]:
  """Splits the requests' args into n parallel lists of strings."""
  cols = tuple([] for _ in range(n))
  for req in requests:
    args = req.args
    if len(args) < n:
      raise ValueError(f"request args {args!r} need {n} fields")
    for col, arg in zip(cols, args):
      col.append(arg)
  return cols


def _check_count(results: Sequence[Any], requests: Sequence[Any], what: str) -> None:
  if len(results) != len(requests):
    raise RuntimeError(f"{what} returned {len(results)} results for {len(requests)} requests")


def register():
  """Registers JaxstarLM with lm_eval as "jaxstar" (idempotent) and returns the class."""
  return _define()


def __getattr__(name: str):
  # PEP 562: `JaxstarLM` exists only once lm_eval is importable; building it on first access
  # keeps this module importable (and the ImportError clear) without the extra.
  if name == "JaxstarLM":
    return _define()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
