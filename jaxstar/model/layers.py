"""Building blocks of the Mistral decoder: RMSNorm, rotary embeddings, attention and MLP.

Parameters are declared with logical axis names only ('embed', 'heads', 'kv_heads', 'head_dim',
'mlp', 'vocab', 'norm'); `jaxstar/sharding.py` maps them to mesh axes. Axis letters follow
`transformer.py`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxstar.model.config import ModelConfig

INIT_STD = 0.02  # Mistral's initializer_range


def dense_init(names: tuple[str, ...]) -> Callable:
  """Mistral's normal(INIT_STD) initializer, boxed with the logical axis names `names`."""
  return nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), names)


def upcast(dtype) -> jnp.dtype:
  """The dtype of softmax, norms, RoPE and losses: fp32, or the compute dtype when wider.

  bf16 models keep their numerically touchy parts in fp32; a float64 model (equivalence tests
  under `jax.experimental.enable_x64`) stays float64 throughout.
  """
  return jnp.promote_types(dtype, jnp.float32)


_CPU_LAYOUTS: list[bool | None] = [None]


def cpu_layouts() -> bool:
  """Whether traced code takes the CPU layouts (`dense`'s 2-D matmul, heads-major attention):
  on the CPU backend, unless `set_cpu_layouts` says otherwise."""
  forced = _CPU_LAYOUTS[0]
  return jax.default_backend() == "cpu" if forced is None else forced


def set_cpu_layouts(enabled: bool | None) -> None:
  """Forces the CPU layouts on or off (None: by backend). A compile-only run on emulated CPU
  devices turns them off, so that it compiles the program an accelerator would run."""
  _CPU_LAYOUTS[0] = enabled


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_2d(x_ni, w_io, out_dtype):
  return jax.lax.dot_general(x_ni, w_io, (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)


def _matmul_2d_fwd(x_ni, w_io, out_dtype):
  return _matmul_2d(x_ni, w_io, out_dtype), (x_ni, w_io)


def _matmul_2d_bwd(out_dtype, residuals, g_no):
  del out_dtype
  x_ni, w_io = residuals
  # In the gradient's dtype (fp32 logits of a bf16 model: fp32), cast back to the inputs'.
  dx_ni = jax.lax.dot_general(g_no, w_io.astype(g_no.dtype), (((1,), (1,)), ((), ())))
  # x^T g from a transposed copy of x: XLA:CPU runs a dot that contracts both operands' leading
  # axes on its Eigen path, asynchronously and beside YNNPACK's threads; from the copy, YNNPACK
  # runs it (the benchmark model's plain step 4-6% faster in interleaved runs, scan unrolled).
  # The barrier keeps XLA from folding the transpose back into the dot. (The einsum's transpose
  # rule copied the larger output gradient instead.)
  x_in = jax.lax.optimization_barrier(x_ni.astype(g_no.dtype).T)
  dw_io = jax.lax.dot_general(x_in, g_no, (((1,), (0,)), ((), ())))
  return dx_ni.astype(x_ni.dtype), dw_io.astype(w_io.dtype)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def dense(x, w, in_axes: int = 1, out_dtype=None, flat: bool | None = None):
  """Contracts the last `in_axes` axes of x [..., *I] with the leading ones of w [*I, *O].

  Returns [..., *O] in `out_dtype` (default: x's dtype). The same math as the einsum
  "...i,io->...o"; on the CPU backend it runs as one 2-D matmul with a custom gradient whose
  weight gradient XLA:CPU computes without materializing transposed activations (the MLP's
  forward and backward x0.6 in time, `benchmarks/layer_grads.py`). Other backends take the einsum.
  `flat` forces one or the other (default: `cpu_layouts()`).
  """
  lead, in_shape = x.shape[:x.ndim - in_axes], x.shape[x.ndim - in_axes:]
  if tuple(w.shape[:in_axes]) != tuple(in_shape):
    raise ValueError(f"dense: x {x.shape} and w {w.shape} disagree on {in_axes} axes")
  out_shape = w.shape[in_axes:]
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if not (cpu_layouts() if flat is None else flat):
    return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - in_axes, x.ndim)),
                                       tuple(range(in_axes))), ((), ())),
                               preferred_element_type=out_dtype)
  n_in = math.prod(in_shape)
  out = _matmul_2d(x.reshape(-1, n_in), w.reshape(n_in, -1), out_dtype)
  return out.reshape(*lead, *out_shape)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Pins an activation's sharding by logical names (a no-op outside a mesh and rules)."""
  return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
  """Root-mean-square norm computed in fp32, scale initialized to one."""
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(upcast(self.dtype))
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # As Hugging Face: cast back to the activation dtype, then scale.
    return (scale.astype(self.dtype) * normed.astype(self.dtype)).astype(self.dtype)


def apply_rope(x_blhe, positions_bl, theta: float):
  """Rotary embedding in the Hugging Face rotate-half convention, computed in fp32 (or wider)."""
  e = x_blhe.shape[-1]
  f32 = upcast(x_blhe.dtype)
  inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=f32) / e))
  angles = positions_bl.astype(f32)[..., None] * inv_freq  # [B, L, E/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x_blhe.astype(f32)
  x1, x2 = x[..., : e // 2], x[..., e // 2:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_blhe.dtype)


class Attention(nn.Module):
  """Projections of grouped-query attention; the key set and mask come from `attend`."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_bld, positions_bl, attend, layer_state):
    cfg = self.cfg
    dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, h, k, e = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q_dhe = self.param("q_proj", dense_init(("embed", "heads", "head_dim")), (d, h, e), pdt)
    k_dke = self.param("k_proj", dense_init(("embed", "kv_heads", "head_dim")), (d, k, e), pdt)
    v_dke = self.param("v_proj", dense_init(("embed", "kv_heads", "head_dim")), (d, k, e), pdt)
    o_hed = self.param("o_proj", dense_init(("heads", "head_dim", "embed")), (h, e, d), pdt)
    x = x_bld.astype(dtype)
    q = dense(x, q_dhe.astype(dtype))          # [B, L, H, E]
    kk = dense(x, k_dke.astype(dtype))         # [B, L, K, E]
    v = dense(x, v_dke.astype(dtype))
    q = constrain(apply_rope(q, positions_bl, cfg.rope_theta),
                  ("act_batch", "act_len", "act_heads", None))
    kk = constrain(apply_rope(kk, positions_bl, cfg.rope_theta),
                   ("act_batch", "act_len", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_len", "act_kv_heads", None))
    out_blhe, layer_out = attend(q, kk, v, layer_state)
    out = dense(out_blhe.astype(dtype), o_hed.astype(dtype), in_axes=2)   # [B, L, D]
    return out, layer_out


class Mlp(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_bld):
    cfg = self.cfg
    dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, f = cfg.embed_dim, cfg.mlp_dim
    gate_df = self.param("gate_proj", dense_init(("embed", "mlp")), (d, f), pdt)
    up_df = self.param("up_proj", dense_init(("embed", "mlp")), (d, f), pdt)
    down_fd = self.param("down_proj", dense_init(("mlp", "embed")), (f, d), pdt)
    x = x_bld.astype(dtype)
    gate = dense(x, gate_df.astype(dtype))     # [B, L, F]
    up = dense(x, up_df.astype(dtype))
    act = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_len", "act_mlp"))
    return dense(act, down_fd.astype(dtype))   # [B, L, D]


class Block(nn.Module):
  """Pre-norm decoder block. Signature fits `nn.scan`: (carry, *broadcast, scanned)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_bld, positions_bl, attend, layer_state):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    norm = lambda name: RMSNorm(cfg.norm_eps, dtype, jnp.dtype(cfg.param_dtype), name=name)
    attn_out, layer_out = Attention(cfg, name="attn")(
        norm("attn_norm")(x_bld), positions_bl, attend, layer_state)
    x_bld = x_bld + attn_out
    x_bld = x_bld + Mlp(cfg, name="mlp")(norm("mlp_norm")(x_bld))
    x_bld = constrain(x_bld.astype(dtype), ("act_batch", "act_len", "act_embed"))
    return x_bld, layer_out
