"""Building blocks shared by the LLM, the ViT and the top-level model.

Conventions (every module in sgt_jax/models follows them):
  * Parameters are fp32 masters; a module casts them to ``dtype`` (the compute dtype) at use.
  * Every parameter carries logical axis names (``out_sharding`` metadata on the nnx.Param); the
    trainer maps them to mesh axes with one rules table (sgt_jax/parallel). Model code never
    names a mesh axis.
  * Dense kernels are stored (in, out) -- PyTorch ``nn.Linear.weight`` transposed.
  * Normalisation statistics are computed in fp32 whatever the compute dtype.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.models.config import REMAT_POLICIES, REMAT_SAVED_NAMES

Names = tuple[str | None, ...]


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], names: Names) -> nnx.Param:
    """An fp32 parameter with logical axis names (no mesh needed at construction)."""
    assert len(names) == len(shape), (names, shape)
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), jnp.float32), out_sharding=tuple(names),
                     eager_sharding=False)


normal_init = nnx.initializers.normal
zeros_init = nnx.initializers.zeros
ones_init = nnx.initializers.ones


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel is (in, out)."""

    def __init__(self, in_features: int, out_features: int, names: Names, *, use_bias: bool,
                 rngs: nnx.Rngs, dtype=jnp.float32, kernel_init=None, zero_init: bool = False):
        kernel_init = zeros_init if zero_init else (kernel_init or normal_init(0.02))
        self.kernel = param(rngs, kernel_init, (in_features, out_features), names)
        self.bias = param(rngs, zeros_init, (out_features,), names[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: w * (x32 * rsqrt(mean(x32^2) + eps)).astype(x.dtype)."""

    def __init__(self, dim: int, eps: float, names: Names = ("norm",), *, rngs: nnx.Rngs | None = None):
        self.scale = param(rngs, ones_init, (dim,), names)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with affine scale and bias; statistics in fp32."""

    def __init__(self, dim: int, eps: float, names: Names = ("norm",), *, rngs: nnx.Rngs | None = None):
        self.scale = param(rngs, ones_init, (dim,), names)
        self.bias = param(rngs, zeros_init, (dim,), names)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table (vocab, embed)."""

    def __init__(self, num: int, dim: int, names: Names = ("vocab", "embed"), *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.embedding = param(rngs, normal_init(0.02), (num, dim), names)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """PyTorch's gelu(approximate='tanh') == HF 'gelu_pytorch_tanh'."""
    return jax.nn.gelu(x, approximate=True)


# ------------------------------------------------------------------------------------------------
# Rotary embedding (Qwen2 / GPT-NeoX half-split)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape positions.shape + (head_dim,), computed in fp32, cast to ``dtype``."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (..., L, heads, hd); cos/sin: (..., L, hd)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


# ------------------------------------------------------------------------------------------------
# Fixed tables (regenerated, never stored as parameters)


def sincos_2d_table(dim: int, grid: int) -> np.ndarray:
    """BAGEL's fixed 2-D sin-cos table (grid*grid, dim); row r*grid + c is
    [sin(c*w), cos(c*w), sin(r*w), cos(r*w)] with w_k = 10000^(-k/(dim/4)) (column first)."""
    assert dim % 4 == 0, f"sin-cos position embedding needs dim % 4 == 0, got {dim}"
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                             indexing="ij")
    c = np.outer(cols.reshape(-1), omega)
    r = np.outer(rows.reshape(-1), omega)
    return np.concatenate([np.sin(c), np.cos(c), np.sin(r), np.cos(r)], axis=1).astype(np.float32)


def timestep_frequencies(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """BAGEL's TimestepEmbedder features: [cos(t f), sin(t f)], f_k = exp(-ln(max_period) k / (dim/2))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def remat(fn, policy: str, key: str = "remat_policy"):
    """Wrap a layer body ``fn`` with jax.checkpoint according to a MaxText-named policy
    (config.REMAT_SAVED_NAMES); ``key`` names the config key in the error."""
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    if policy in REMAT_SAVED_NAMES:
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(*REMAT_SAVED_NAMES[policy]))
    raise ValueError(f"unknown {key} {policy!r}; expected one of {REMAT_POLICIES}")
