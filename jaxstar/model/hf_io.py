"""Hugging Face interop: Mistral/Llama-format safetensors checkpoints in and out.

Import (`load_hf_params`) streams: the safetensors files are memory-mapped by a reader written
here (no torch, never pickle), and each parameter is built with `jax.make_array_from_callback`,
whose callback reads only the layers and rows of the device shard it is asked for. Host memory per
call is therefore about one shard, a 7B import never holds two full copies, and on a multi-host
run each process only reads the shards its own devices hold.

Export (`save_hf`) writes a `MistralForCausalLM`-compatible `config.json` and safetensors files
(sharded with an index above `max_shard_bytes`), tensor by tensor: the header is written from shapes
first, then each tensor is gathered to the host one layer at a time and appended.

Layouts (axis letters as in `transformer.py`; our layer leaves carry a leading layer axis):
  ours                                    Hugging Face
  embedding [V, D]                        model.embed_tokens.weight [V, D]
  lm_head [D, V] (absent when tied)       lm_head.weight [V, D]
  final_norm/scale [D]                    model.norm.weight [D]
  layers/attn_norm/scale [D]              model.layers.{i}.input_layernorm.weight
  layers/mlp_norm/scale [D]               model.layers.{i}.post_attention_layernorm.weight
  layers/attn/q_proj [D, H, E]            ...self_attn.q_proj.weight [H*E, D]   (k, v: K heads)
  layers/attn/o_proj [H, E, D]            ...self_attn.o_proj.weight [D, H*E]
  layers/mlp/{gate,up}_proj [D, F]        ...mlp.{gate,up}_proj.weight [F, D]
  layers/mlp/down_proj [F, D]             ...mlp.down_proj.weight [D, F]
Both sides use the rotate-half RoPE convention, so q/k need no permutation.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import flax.traverse_util
import jax
import ml_dtypes
import numpy as np

from jaxstar.model.config import ModelConfig
from jaxstar.model.layers import INIT_STD
from jaxstar.model.transformer import abstract_params

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = ("mistral", "llama")
_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
           "BF16": np.dtype(ml_dtypes.bfloat16)}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
_SAVE_DTYPES = {"float32": _DTYPES["F32"], "bfloat16": _DTYPES["BF16"], "float16": _DTYPES["F16"]}
_MODEL_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")
# Buffers some exporters store next to the weights; they are recomputed, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# ---------------------------------------------------------------------------------------- config


def _load_json(path: str, what: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} {path} is not valid JSON: {e}") from e


def _rope_theta(hf: Mapping[str, Any], where: str) -> float:
  """RoPE base from `rope_theta` (transformers <5) or `rope_parameters` (transformers 5)."""
  params = hf.get("rope_parameters") or {}
  if any(isinstance(v, Mapping) for v in params.values()):
    raise ValueError(f"{where}: per-layer-type rope_parameters are not supported: {params}")
  for spec in (params, hf.get("rope_scaling") or {}):
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind != "default":
      raise ValueError(f"{where}: RoPE type {kind!r} is not supported; jaxstar implements only "
                       f"plain ('default') RoPE without scaling")
  top, nested = hf.get("rope_theta"), params.get("rope_theta")
  if top is not None and nested is not None and float(top) != float(nested):
    raise ValueError(f"{where}: rope_theta={top} disagrees with rope_parameters={params}")
  theta = nested if nested is not None else top
  return float(10000.0 if theta is None else theta)  # MistralConfig's default base


def config_from_hf(path_or_dict, **overrides: Any) -> ModelConfig:
  """Reads a Hugging Face `config.json` (folder, file path or parsed dict) into a `ModelConfig`.

  Only Mistral/Llama-style decoders (no biases, SiLU, plain RoPE) are accepted. `overrides` set
  further `ModelConfig` fields, e.g. `dtype="bfloat16"` or `remat_policy="full"`.
  """
  if isinstance(path_or_dict, Mapping):
    hf, where = dict(path_or_dict), "HF config"
  else:
    where = os.fspath(path_or_dict)
    if os.path.isdir(where):
      where = os.path.join(where, "config.json")
    if not os.path.isfile(where):
      raise FileNotFoundError(f"no Hugging Face config.json at {where}")
    hf = _load_json(where, "HF config")
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{where}: model_type={model_type!r} is not supported; jaxstar reads "
                     f"Mistral/Llama-style decoders {SUPPORTED_MODEL_TYPES}")
  missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "vocab_size") if hf.get(k) is None]
  if missing:
    raise ValueError(f"{where}: missing required field(s) {missing}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
  for bias in ("attention_bias", "mlp_bias"):
    if hf.get(bias):
      raise ValueError(f"{where}: {bias}=true is not supported (the jaxstar decoder has no biases)")
  heads = int(hf["num_attention_heads"])
  fields = dict(
      vocab_size=int(hf["vocab_size"]),
      embed_dim=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
      mlp_dim=int(hf["intermediate_size"]),
      rope_theta=_rope_theta(hf, where),
      # A missing epsilon means HF uses its class default 1e-6 (Mistral-7B's file says 1e-5).
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      sliding_window=hf.get("sliding_window"),
      max_len=int(hf.get("max_position_embeddings") or ModelConfig.max_len),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )
  return ModelConfig(**{**fields, **overrides})


def hf_config_dict(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """The `MistralConfig`-compatible dict that `save_hf` writes as config.json."""
  return {
      "architectures": ["MistralForCausalLM"],
      "model_type": "mistral",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_len,
      "rms_norm_eps": cfg.norm_eps,
      # Both spellings, so that transformers 4 (rope_theta) and 5 (rope_parameters) agree.
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
      "sliding_window": cfg.sliding_window,
      "tie_word_embeddings": cfg.tie_embeddings,
      "initializer_range": INIT_STD,
      "attention_dropout": 0.0,
      "use_cache": True,
      "torch_dtype": dtype,
      "dtype": dtype,
  }

# ----------------------------------------------------------------------------------- safetensors


def _open_file(path: str) -> dict[str, np.ndarray]:
  """Memory-maps one safetensors file: {name: read-only array view}, nothing read yet."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or 8 + n > size:
      raise ValueError(f"{path} is not a safetensors file or is truncated "
                       f"(header length {n}, file size {size})")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: unreadable safetensors header: {e}") from e
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name, info in header.items():
    dtype = _DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')}; "
                       f"supported: {sorted(_DTYPES)}")
    shape = tuple(int(s) for s in info["shape"])
    begin, end = (8 + n + int(o) for o in info["data_offsets"])
    if end - begin != math.prod(shape) * dtype.itemsize or end > size:
      raise ValueError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) has data offsets "
                       f"{info['data_offsets']} that do not fit its size or the file")
    out[name] = data[begin:end].view(dtype).reshape(shape)
  return out


def open_safetensors(path) -> dict[str, np.ndarray]:
  """Memory-maps a checkpoint: a .safetensors file, or a folder holding `model.safetensors` or
  shards listed in `model.safetensors.index.json`. Returns {tensor name: read-only array view};
  bytes are paged in only when a view is read. Never unpickles anything."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return _open_file(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint folder or file at {path}")
  if os.path.isfile(os.path.join(path, INDEX_FILE)):
    weight_map = _load_json(os.path.join(path, INDEX_FILE), "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{os.path.join(path, INDEX_FILE)} has no 'weight_map'")
    files, out = {}, {}
    for name, fname in weight_map.items():
      if fname not in files:
        if not os.path.isfile(os.path.join(path, fname)):
          raise FileNotFoundError(f"{INDEX_FILE} in {path} lists shard {fname}, which is missing")
        files[fname] = _open_file(os.path.join(path, fname))
      if name not in files[fname]:
        raise ValueError(f"{INDEX_FILE} in {path} maps {name} to {fname}, which lacks it")
      out[name] = files[fname][name]
    return out
  if os.path.isfile(os.path.join(path, SINGLE_FILE)):
    return _open_file(os.path.join(path, SINGLE_FILE))
  listing = sorted(os.listdir(path))
  pickles = [f for f in listing if f.startswith("pytorch_model") and f.endswith(".bin")]
  if pickles:
    raise ValueError(
        f"{path} holds only PyTorch pickle weights {pickles}; jaxstar reads safetensors only, "
        f"because unpickling a checkpoint can execute arbitrary code. Convert it once, where you "
        f"trust the file, with transformers: `AutoModelForCausalLM.from_pretrained('{path}')"
        f".save_pretrained(out_dir, safe_serialization=True)`, then load out_dir")
  raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (it holds {listing})")


def _write_safetensors(path: str, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                       fetch: Callable[[str], np.ndarray]) -> None:
  """Writes the header from `specs` (name, shape, dtype), then `fetch(name)`'s bytes one tensor
  at a time, so at most one tensor is on the host at once."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, shape, dtype in specs:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name, shape, dtype in specs:
      arr = np.ascontiguousarray(np.asarray(fetch(name)).astype(dtype, copy=False))
      if arr.shape != tuple(shape):
        raise ValueError(f"tensor {name}: expected shape {tuple(shape)}, got {arr.shape}")
      f.write(arr.reshape(-1).view(np.uint8).data)  # raw bytes; bf16 has no buffer format


def save_safetensors(path, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes host arrays (float32/float16/bfloat16) to one safetensors file."""
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  _write_safetensors(os.fspath(path), [(k, v.shape, v.dtype) for k, v in arrays.items()],
                     arrays.__getitem__)

# -------------------------------------------------------------------------------- tensor mapping


class _Map(NamedTuple):
  hf_name: str                      # with {i} for the layer index
  hf_shape: tuple[int, ...]         # None marks the checkpoint's vocabulary size
  to_ours: Callable[[Any], Any]     # HF layout -> ours (views only: reshape / transpose)
  to_hf: Callable[[Any], Any]       # ours -> HF layout


def _mapping(cfg: ModelConfig) -> dict[str, _Map]:
  """Our flat param path -> how to find and convert its Hugging Face tensor."""
  d, h, k, e, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  same, t = (lambda w: w), (lambda w: w.T)
  heads_in = lambda n: (lambda w: w.reshape(n, e, d).transpose(2, 0, 1),  # [N*E, D] -> [D, N, E]
                        lambda w: w.reshape(d, n * e).T)
  layer = "model.layers.{i}."
  return {
      "embedding": _Map("model.embed_tokens.weight", (None, d), same, same),
      "lm_head": _Map("lm_head.weight", (None, d), t, t),
      "final_norm/scale": _Map("model.norm.weight", (d,), same, same),
      "layers/attn_norm/scale": _Map(layer + "input_layernorm.weight", (d,), same, same),
      "layers/mlp_norm/scale": _Map(layer + "post_attention_layernorm.weight", (d,), same, same),
      "layers/attn/q_proj": _Map(layer + "self_attn.q_proj.weight", (h * e, d), *heads_in(h)),
      "layers/attn/k_proj": _Map(layer + "self_attn.k_proj.weight", (k * e, d), *heads_in(k)),
      "layers/attn/v_proj": _Map(layer + "self_attn.v_proj.weight", (k * e, d), *heads_in(k)),
      "layers/attn/o_proj": _Map(layer + "self_attn.o_proj.weight", (d, h * e),
                                 lambda w: w.reshape(d, h, e).transpose(1, 2, 0),
                                 lambda w: w.reshape(h * e, d).T),
      "layers/mlp/gate_proj": _Map(layer + "mlp.gate_proj.weight", (f, d), t, t),
      "layers/mlp/up_proj": _Map(layer + "mlp.up_proj.weight", (f, d), t, t),
      "layers/mlp/down_proj": _Map(layer + "mlp.down_proj.weight", (d, f), t, t),
  }


def _flat_abstract(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  return flax.traverse_util.flatten_dict(nn.unbox(abstract_params(cfg)), sep="/")


def _hf_names(key: str, m: _Map, num_layers: int) -> list[str]:
  return [m.hf_name.format(i=i) for i in range(num_layers)] if key.startswith("layers/") \
      else [m.hf_name]

# ---------------------------------------------------------------------------------------- import


def _full_index(index, shape) -> tuple[slice, ...]:
  index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _vocab_callback(old, new, axis: int, shape, dtype) -> Callable:
  """Shards of `concatenate([old, new], axis)` without ever building the whole array."""
  v0 = old.shape[axis]

  def cb(index):
    index = _full_index(index, shape)
    lo, hi = index[axis].start, index[axis].stop
    pieces = []
    for part, start, stop in ((old, lo, min(hi, v0)), (new, max(lo, v0) - v0, hi - v0)):
      if stop > start:
        idx = list(index)
        idx[axis] = slice(start, stop)
        pieces.append(np.array(part[tuple(idx)], dtype=dtype))
    return np.concatenate(pieces, axis) if len(pieces) > 1 else pieces[0]
  return cb


def _resolve_shardings(shardings, mesh, cfg: ModelConfig, keys) -> dict[str, Any]:
  if shardings is None and mesh is not None:
    from jaxstar import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    shardings = sharding_lib.shardings_for(abstract_params(cfg), mesh)
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    return {k: shardings for k in keys}
  flat = flax.traverse_util.flatten_dict(shardings, sep="/")
  if set(flat) != set(keys):
    raise ValueError(f"shardings tree does not match the params of cfg: missing "
                     f"{sorted(set(keys) - set(flat))}, unexpected {sorted(set(flat) - set(keys))}")
  return flat


def load_hf_params(path, cfg: ModelConfig | None = None, mesh=None, shardings=None,
                   vocab_size: int | None = None, dtype=np.float32, rng_seed: int = 0):
  """Loads a Hugging Face Mistral/Llama safetensors checkpoint into our params pytree, streaming.

  Args:
    path: folder with config.json and `model.safetensors` or sharded files + index json.
    cfg: model config; defaults to `config_from_hf(path)`. Its sizes must match the checkpoint.
    mesh: build each leaf sharded by `jaxstar.sharding.shardings_for` on this mesh.
    shardings: a pytree of shardings matching the params (or one sharding for all leaves);
      overrides `mesh`. With neither, everything lands on the first local device.
    vocab_size: grow the vocabulary to this size (default cfg.vocab_size). New rows of the
      embedding and of the lm_head are drawn from N(0, 0.02) with numpy seeded by `rng_seed`
      (the same on every process); shrinking is an error.
    dtype: dtype of the returned arrays.
  Returns:
    The unboxed params dict, as `Transformer(cfg).apply({'params': params}, ...)` expects.
  """
  folder = os.fspath(path)
  tensors = open_safetensors(folder)
  cfg_file = os.path.join(folder, "config.json")
  raw_cfg = _load_json(cfg_file, "HF config") if os.path.isfile(cfg_file) else {}
  if cfg is None:
    cfg = config_from_hf(folder)
  elif raw_cfg:
    ckpt = config_from_hf(raw_cfg)
    for name in ("rope_theta", "norm_eps", "sliding_window"):
      if getattr(ckpt, name) != getattr(cfg, name):
        logging.warning("loading %s with %s=%s, but its config.json says %s", folder, name,
                        getattr(cfg, name), getattr(ckpt, name))
  if vocab_size is not None:
    cfg = cfg.replace(vocab_size=vocab_size)
  ckpt_tied = bool(raw_cfg.get("tie_word_embeddings", False))
  mapping, abstract = _mapping(cfg), _flat_abstract(cfg)

  # Check every tensor's presence and shape from the headers before reading any data.
  source = {k: _hf_names(k, mapping[k], cfg.num_layers) for k in abstract}
  if "lm_head" in source and "lm_head.weight" not in tensors and ckpt_tied:
    source["lm_head"] = ["model.embed_tokens.weight"]  # untie: the head starts as the embedding
  missing = [n for names in source.values() for n in names if n not in tensors]
  if missing:
    raise ValueError(f"checkpoint {folder} lacks tensor(s) {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''} needed by {cfg}")
  emb_name = "model.embed_tokens.weight"
  ckpt_vocab = tensors[emb_name].shape[0]
  for key, names in source.items():
    want = tuple(ckpt_vocab if s is None else s for s in mapping[key].hf_shape)
    for n in names:
      if tuple(tensors[n].shape) != want:
        raise ValueError(f"checkpoint {folder}: tensor {n} has shape {list(tensors[n].shape)}, "
                         f"expected {list(want)} for {cfg}")
  used = {n for names in source.values() for n in names}
  if ckpt_tied:
    used.add("lm_head.weight")  # HF itself ignores a stored head when the config ties it
  unused = sorted(n for n in set(tensors) - used if not n.endswith(_IGNORED_SUFFIXES))
  if unused:  # e.g. biases or extra layers: silently dropping them would give another model
    raise ValueError(f"checkpoint {folder} has tensor(s) the model would not use: {unused[:8]}")
  if cfg.vocab_size < ckpt_vocab:
    raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the checkpoint's {ckpt_vocab}; "
                     f"shrinking the vocabulary is not supported")

  n_new, dtype = cfg.vocab_size - ckpt_vocab, np.dtype(dtype)
  flat_shardings = _resolve_shardings(shardings, mesh, cfg, abstract)
  out = {}
  for key, leaf in abstract.items():
    m, names, shape = mapping[key], source[key], tuple(leaf.shape)
    if key in ("embedding", "lm_head"):
      # Separate streams per matrix; identical on every process, so shards agree.
      salt = 0 if key == "embedding" else 1
      new = np.random.default_rng([rng_seed, salt]).normal(0.0, INIT_STD, (n_new, cfg.embed_dim))
      axis = 0 if key == "embedding" else 1
      cb = _vocab_callback(m.to_ours(tensors[names[0]]), m.to_ours(new), axis, shape, dtype)
    elif key.startswith("layers/"):
      def cb(index, m=m, names=names, shape=shape):
        index = _full_index(index, shape)
        # Convert layer by layer and slice before the dtype cast: only the shard is copied.
        parts = [np.array(m.to_ours(tensors[names[i]])[index[1:]], dtype=dtype)
                 for i in range(index[0].start, index[0].stop)]
        return np.stack(parts) if parts else np.zeros(
            (0,) + tuple(s.stop - s.start for s in index[1:]), dtype)
    else:
      def cb(index, m=m, names=names, shape=shape):
        return np.array(m.to_ours(tensors[names[0]])[_full_index(index, shape)], dtype=dtype)
    out[key] = jax.make_array_from_callback(shape, flat_shardings[key], cb)
  return flax.traverse_util.unflatten_dict(out, sep="/")

# ---------------------------------------------------------------------------------------- export


@jax.jit
def _layer_slice(x, i):
  # A traced index: one compilation per leaf shape, not one per layer.
  return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def _to_host(x) -> np.ndarray:
  """Gathers a (possibly sharded, possibly multi-host) array to a host numpy array."""
  if isinstance(x, jax.Array) and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save_hf(params, cfg: ModelConfig, out_dir, max_shard_bytes: float = 5e9,
            dtype: str = "float32", overwrite: bool = False) -> list[str]:
  """Exports params as a Hugging Face `MistralForCausalLM` folder (config.json + safetensors).

  Streams one tensor (one layer of one leaf) at a time to the host. Every process of a multi-host
  run must call this (the gathers are collective); only process 0 writes. Files are written under
  temporary names and renamed at the end, so a crash leaves no half-written checkpoint.

  Args:
    params: the (boxed or unboxed) params of `Transformer(cfg)`; jax or numpy arrays.
    cfg: their config.
    out_dir: output folder, created if needed.
    max_shard_bytes: above this, split into `model-0000k-of-0000n.safetensors` plus an index.
    dtype: 'float32' (lossless, default), 'bfloat16' (Mistral's own format) or 'float16'.
    overwrite: replace an existing checkpoint in out_dir (else that is an error).
  Returns:
    Paths of the files written (on process 0; [] elsewhere).
  """
  if dtype not in _SAVE_DTYPES:
    raise ValueError(f"dtype={dtype!r}; choose one of {sorted(_SAVE_DTYPES)}")
  out_dir, np_dtype = os.fspath(out_dir), _SAVE_DTYPES[dtype]
  flat = flax.traverse_util.flatten_dict(nn.unbox(params), sep="/")
  abstract, mapping = _flat_abstract(cfg), _mapping(cfg)
  if set(flat) != set(abstract):
    raise ValueError(f"params do not match cfg: missing {sorted(set(abstract) - set(flat))}, "
                     f"unexpected {sorted(set(flat) - set(abstract))}")
  for key, leaf in abstract.items():
    if tuple(flat[key].shape) != tuple(leaf.shape):
      raise ValueError(f"param {key} has shape {tuple(flat[key].shape)}, cfg implies {leaf.shape}")
  # Checked on every process so that all of them stop together (the loop below is collective).
  existing = sorted(f for f in os.listdir(out_dir) if _MODEL_FILE.match(f) or f == "config.json") \
      if os.path.isdir(out_dir) else []
  if existing and not overwrite:
    raise FileExistsError(f"{out_dir} already holds a checkpoint {existing}; pass overwrite=True")

  plan = []  # (hf name, hf shape, fetch) in Hugging Face's order
  def add(key, layer=None):
    m, leaf = mapping[key], flat[key]
    shape = tuple(cfg.vocab_size if s is None else s for s in m.hf_shape)
    if layer is None:
      plan.append((m.hf_name, shape, lambda: m.to_hf(_to_host(leaf))))
    else:
      get = (lambda: leaf[layer]) if isinstance(leaf, np.ndarray) else \
          (lambda: _layer_slice(leaf, layer))
      plan.append((m.hf_name.format(i=layer), shape, lambda: m.to_hf(_to_host(get()))))
  add("embedding")
  for i in range(cfg.num_layers):
    for key in ("attn_norm/scale", "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj",
                "mlp_norm/scale", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"):
      add("layers/" + key, i)
  add("final_norm/scale")
  if not cfg.tie_embeddings:
    add("lm_head")

  groups, size = [[]], 0  # greedy packing in order; a tensor larger than a shard gets its own
  for entry in plan:
    nbytes = math.prod(entry[1]) * np_dtype.itemsize
    if groups[-1] and size + nbytes > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(entry)
    size += nbytes
  n = len(groups)
  names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                                        for k in range(n)]
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  for fname, group in zip(names, groups):
    fetch = {name: get for name, _, get in group}
    specs = [(name, shape, np_dtype) for name, shape, _ in group]
    if writer:
      _write_safetensors(os.path.join(out_dir, fname + ".tmp"), specs, lambda k: fetch[k]())
    else:
      for _, _, get in group:
        get()  # take part in the collective gathers
  if not writer:
    return []
  for f in existing:  # stale shards or a stale index would shadow the new files
    os.remove(os.path.join(out_dir, f))
  for fname in names:
    os.replace(os.path.join(out_dir, fname + ".tmp"), os.path.join(out_dir, fname))
  written = [os.path.join(out_dir, f) for f in names]
  if n > 1:
    total = sum(math.prod(s) * np_dtype.itemsize for _, s, _ in plan)
    index = {"metadata": {"total_size": total},
             "weight_map": {name: f for f, g in zip(names, groups) for name, _, _ in g}}
    written.append(os.path.join(out_dir, INDEX_FILE))
    with open(written[-1], "w", encoding="utf-8") as fh:
      json.dump(index, fh, indent=2)
  written.append(os.path.join(out_dir, "config.json"))
  with open(written[-1], "w", encoding="utf-8") as fh:
    json.dump(hf_config_dict(cfg, dtype), fh, indent=2)
  return written
