"""OmniGen2's diffusion transformer (``OmniGen2Transformer2DModel``, Lumina-2 / NextDiT style) in
Flax NNX, for a batch of differently sized latents under static shapes.

Per row (one sample) the token layout is fixed: ``[text (Lt) | reference images (Lr) | noisy
image (Ln)]``, each segment padded at its end. The original packs the valid tokens of each
segment back to back and masks padding keys; attention is permutation-equivariant given per-token
rotary positions and key masks, so the static layout computes the same thing.

  temb  = TimestepEmbedding(sincos(timestep_scale * t))                  (dim min(hidden, 1024))
  text  = Linear(RMSNorm(text features)) -> context_refiner (no modulation, text keys only)
  noisy = x_embedder(latent patches)      -> noise_refiner (modulated, noisy-image keys only)
  refs  = ref_image_patch_embedder(patches) + image_index_embedding[j] -> ref_image_refiner
          (modulated, keys of the same reference image only)
  joint = [text | refs | noisy] -> ``num_layers`` modulated blocks (all valid keys)
  out   = Linear(LayerNorm(joint) * (1 + Linear(silu(temb))))[noisy segment]

Block (sandwich norms, tanh gates): with (scale_msa, gate_msa, scale_mlp, gate_mlp) =
Linear(silu(temb)),  x += tanh(gate_msa) * norm2(Attn(norm1(x) * (1 + scale_msa)));
x += tanh(gate_mlp) * ffn_norm2(FFN(ffn_norm1(x) * (1 + scale_mlp))). Attention: GQA, RMSNorm on
q and k per head, 3-D rotary on interleaved pairs (axes t/h/w of ``axes_dim_rope`` sizes).

Rotary positions (``layout``, host side): text token i -> (i, i, i); every reference image gets
(shift, row, col) with shift starting at the text length and growing by max(rows, cols) per
reference image; the noisy image gets (shift, row, col) after the last reference.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sgt_jax.models.attention import dot_product_attention
from sgt_jax.models.layers import Dense, RMSNorm, normal_init, param, remat
from sgt_jax.models.omnigen2_config import dit_ffn_dim, validate_dit

# ------------------------------------------------------------------------------------------------
# Host-side layout (numpy)


def patchify_latent(z_chw, p: int) -> np.ndarray:
    """(C, H, W) latent -> (H/p * W/p, p*p*C): 'c (h p1) (w p2) -> (h w) (p1 p2 c)'."""
    c, h, w = z_chw.shape
    if h % p or w % p:
        raise ValueError(f"latent {h}x{w} is not a multiple of the patch size {p}")
    x = np.asarray(z_chw).reshape(c, h // p, p, w // p, p).transpose(1, 3, 2, 4, 0)
    return np.ascontiguousarray(x.reshape((h // p) * (w // p), p * p * c))


def unpatchify_latent(tokens, h: int, w: int, p: int, c: int) -> np.ndarray:
    """Inverse of ``patchify_latent``: (h/p * w/p, p*p*C) -> (C, h, w)."""
    x = np.asarray(tokens)[: (h // p) * (w // p)].reshape(h // p, w // p, p, p, c)
    return np.ascontiguousarray(x.transpose(4, 0, 2, 1, 3).reshape(c, h, w))


def layout(samples, cfg, text_len: int, ref_len: int, img_len: int):
    """``samples``: per row dict(text (n, F) features, latent (C, H, W), refs [list of (C, h, w)]).
    -> dict of static (B, ...) arrays: text, text_valid, ref_tokens, ref_ids, x_tokens, x_valid,
    positions (B, text_len + ref_len + img_len, 3)."""
    p, c = cfg.patch_size, cfg.in_channels
    b, f = len(samples), cfg.text_feat_dim
    total = text_len + ref_len + img_len
    out = dict(text=np.zeros((b, text_len, f), np.float32), text_valid=np.zeros((b, text_len), bool),
               ref_tokens=np.zeros((b, ref_len, p * p * c), np.float32), ref_ids=np.full((b, ref_len), -1, np.int32),
               x_tokens=np.zeros((b, img_len, p * p * c), np.float32), x_valid=np.zeros((b, img_len), bool),
               positions=np.zeros((b, total, 3), np.int32))
    for i, s in enumerate(samples):
        n = len(s["text"])
        if n > text_len:
            raise ValueError(f"sample {i}: {n} text tokens do not fit in text_len={text_len}")
        out["text"][i, :n] = s["text"]
        out["text_valid"][i, :n] = True
        out["positions"][i, :n] = np.arange(n)[:, None]
        shift, at = n, 0
        refs = s.get("refs") or []
        if len(refs) > cfg.max_ref_images:
            raise ValueError(f"sample {i}: {len(refs)} reference images, at most {cfg.max_ref_images}")
        for j, z in enumerate(refs):
            tok = patchify_latent(z, p)
            hh, ww = z.shape[1] // p, z.shape[2] // p
            if at + len(tok) > ref_len:
                raise ValueError(f"sample {i}: reference tokens exceed ref_len={ref_len}")
            out["ref_tokens"][i, at:at + len(tok)] = tok
            out["ref_ids"][i, at:at + len(tok)] = j
            r, cc = np.meshgrid(np.arange(hh), np.arange(ww), indexing="ij")
            out["positions"][i, text_len + at:text_len + at + len(tok)] = np.stack(
                [np.full(hh * ww, shift), r.reshape(-1), cc.reshape(-1)], -1)
            shift += max(hh, ww)
            at += len(tok)
        z = s["latent"]
        tok = patchify_latent(z, p)
        hh, ww = z.shape[1] // p, z.shape[2] // p
        if len(tok) > img_len:
            raise ValueError(f"sample {i}: {len(tok)} latent tokens do not fit in img_len={img_len}")
        out["x_tokens"][i, :len(tok)] = tok
        out["x_valid"][i, :len(tok)] = True
        r, cc = np.meshgrid(np.arange(hh), np.arange(ww), indexing="ij")
        o = text_len + ref_len
        out["positions"][i, o:o + len(tok)] = np.stack([np.full(hh * ww, shift), r.reshape(-1), cc.reshape(-1)], -1)
    if int(out["positions"].max(initial=0)) >= min(cfg.axes_lens):
        raise ValueError(f"a rotary position reaches {int(out['positions'].max())}, beyond axes_lens={tuple(cfg.axes_lens)}")
    return out


# ------------------------------------------------------------------------------------------------
# Pieces


def rope_angles(positions: jax.Array, axes_dim, theta: float) -> jax.Array:
    """(B, L, 3) int positions -> (B, L, head_dim/2) angles: per axis a, pos_a * theta^(-2k/d_a)."""
    parts = []
    for a, d in enumerate(axes_dim):
        inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
        parts.append(positions[..., a:a + 1].astype(jnp.float32) * inv)
    return jnp.concatenate(parts, -1)


def apply_rope_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2k], x[2k+1]) by the angle k (complex multiply), in fp32.
    x (B, L, heads, hd); cos/sin (B, L, hd/2)."""
    xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.stack([a * c - b * s, a * s + b * c], -1).reshape(x.shape).astype(x.dtype)


def timestep_features(t: jax.Array, dim: int, scale: float) -> jax.Array:
    """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale)``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = scale * (t.astype(jnp.float32)[:, None] * freqs[None])
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)


class LayerNormNoAffine(nnx.Module):
    def __init__(self, eps: float):
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, -1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)


class DiTBlock(nnx.Module):
    """``OmniGen2TransformerBlock`` (``modulation``: the tanh-gated, temb-modulated form)."""

    def __init__(self, cfg, modulation: bool, *, rngs: nnx.Rngs, dtype):
        d, nh, nkv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
        hd, eps, inner = d // nh, cfg.norm_eps, dit_ffn_dim(cfg)
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.modulation = modulation
        self.to_q = Dense(d, nh * hd, ("embed", "heads"), use_bias=False, rngs=rngs, dtype=dtype)
        self.to_k = Dense(d, nkv * hd, ("embed", "kv_heads"), use_bias=False, rngs=rngs, dtype=dtype)
        self.to_v = Dense(d, nkv * hd, ("embed", "kv_heads"), use_bias=False, rngs=rngs, dtype=dtype)
        self.to_out = Dense(nh * hd, d, ("heads", "embed"), use_bias=False, rngs=rngs, dtype=dtype)
        self.norm_q = RMSNorm(hd, 1e-5, ("head_dim",), rngs=rngs)
        self.norm_k = RMSNorm(hd, 1e-5, ("head_dim",), rngs=rngs)
        self.linear_1 = Dense(d, inner, ("embed", "mlp"), use_bias=False, rngs=rngs, dtype=dtype)
        self.linear_3 = Dense(d, inner, ("embed", "mlp"), use_bias=False, rngs=rngs, dtype=dtype)
        self.linear_2 = Dense(inner, d, ("mlp", "embed"), use_bias=False, rngs=rngs, dtype=dtype)
        self.norm1 = RMSNorm(d, eps, ("norm",), rngs=rngs)
        self.adaln = Dense(min(d, 1024), 4 * d, (None, "embed"), use_bias=True, rngs=rngs,
                           dtype=dtype) if modulation else None
        self.ffn_norm1 = RMSNorm(d, eps, ("norm",), rngs=rngs)
        self.norm2 = RMSNorm(d, eps, ("norm",), rngs=rngs)
        self.ffn_norm2 = RMSNorm(d, eps, ("norm",), rngs=rngs)

    def attn(self, x, cos, sin, mask):
        b, l, _ = x.shape
        q = self.norm_q(checkpoint_name(self.to_q(x), "query_proj").reshape(b, l, self.nh, self.hd))
        k = self.norm_k(checkpoint_name(self.to_k(x), "key_proj").reshape(b, l, self.nkv, self.hd))
        v = checkpoint_name(self.to_v(x), "value_proj").reshape(b, l, self.nkv, self.hd)
        q, k = apply_rope_pairs(q, cos, sin), apply_rope_pairs(k, cos, sin)
        o = checkpoint_name(dot_product_attention(q, k, v, mask), "context")
        return checkpoint_name(self.to_out(o.reshape(b, l, -1)), "out_proj")

    def ffn(self, x):
        g = checkpoint_name(self.linear_1(x), "mlpwi_0")
        u = checkpoint_name(self.linear_3(x), "mlpwi_1")
        return checkpoint_name(self.linear_2(jax.nn.silu(g) * u), "mlpwo")

    def __call__(self, x, cos, sin, mask, temb=None):
        if not self.modulation:
            x = x + self.norm2(self.attn(self.norm1(x), cos, sin, mask))
            return x + self.ffn_norm2(self.ffn(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(self.adaln(jax.nn.silu(temb)), 4, axis=-1)
        h = self.norm1(x) * (1 + scale_msa[:, None])
        x = x + jnp.tanh(gate_msa)[:, None] * self.norm2(self.attn(h, cos, sin, mask))
        h = self.ffn_norm1(x) * (1 + scale_mlp[:, None])
        return x + jnp.tanh(gate_mlp)[:, None] * self.ffn_norm2(self.ffn(h))


def _stack(cfg, n: int, modulation: bool, rngs, dtype):
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return DiTBlock(cfg, modulation, rngs=r, dtype=dtype)

    return make(rngs)


class OmniGen2DiT(nnx.Module):
    """``OmniGen2Transformer2DModel``: ``layout`` arrays + timesteps -> velocity tokens (B, Ln, p*p*C)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        validate_dit(cfg)
        self.cfg = cfg
        dtype = jnp.dtype(cfg.compute_dtype)
        d, pc = cfg.hidden_size, cfg.patch_size ** 2 * cfg.in_channels
        te = min(d, 1024)
        self.x_embedder = Dense(pc, d, (None, "embed"), use_bias=True, rngs=rngs, dtype=dtype)
        self.ref_image_patch_embedder = Dense(pc, d, (None, "embed"), use_bias=True, rngs=rngs, dtype=dtype)
        self.t_linear_1 = Dense(256, te, (None, "embed"), use_bias=True, rngs=rngs, dtype=dtype)
        self.t_linear_2 = Dense(te, te, ("embed", None), use_bias=True, rngs=rngs, dtype=dtype)
        self.caption_norm = RMSNorm(cfg.text_feat_dim, cfg.norm_eps, ("norm",), rngs=rngs)
        self.caption_proj = Dense(cfg.text_feat_dim, d, (None, "embed"), use_bias=True, rngs=rngs, dtype=dtype)
        n_ref = cfg.num_refiner_layers
        self.noise_refiner = _stack(cfg, n_ref, True, rngs, dtype) if n_ref else None
        self.ref_image_refiner = _stack(cfg, n_ref, True, rngs, dtype) if n_ref else None
        self.context_refiner = _stack(cfg, n_ref, False, rngs, dtype) if n_ref else None
        self.layers = _stack(cfg, cfg.num_layers, True, rngs, dtype)
        self.norm_out = LayerNormNoAffine(1e-6)
        self.out_linear_1 = Dense(te, d, (None, "embed"), use_bias=True, rngs=rngs, dtype=dtype)
        self.out_linear_2 = Dense(d, cfg.patch_size ** 2 * cfg.out_channels, ("embed", None), use_bias=True,
                                  rngs=rngs, dtype=dtype)
        self.image_index_embedding = param(rngs, normal_init(0.02), (cfg.max_ref_images, d), (None, "embed"))
        self.dtype = dtype

    def _run(self, stack, x, cos, sin, mask, temb, name):
        graphdef, stacked = nnx.split(stack)

        def body(h, state):
            return nnx.merge(graphdef, state)(h, cos, sin, mask, temb), None

        body = remat(body, self.cfg.remat_policy, "remat_policy")
        if self.cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, stacked)
        else:
            n = jax.tree.leaves(stacked)[0].shape[0]
            for i in range(n):
                x, _ = body(x, jax.tree.map(lambda a: a[i], stacked))
        return x

    def __call__(self, t, text, text_valid, ref_tokens, ref_ids, x_tokens, x_valid, positions):
        cfg = self.cfg
        lt, lr, ln = text.shape[1], ref_tokens.shape[1], x_tokens.shape[1]
        temb = self.t_linear_2(jax.nn.silu(self.t_linear_1(timestep_features(t, 256, cfg.timestep_scale))))
        ang = rope_angles(positions, tuple(cfg.axes_dim_rope), cfg.rope_theta)
        cos, sin = jnp.cos(ang), jnp.sin(ang)
        seg = lambda a, b: (cos[:, a:b], sin[:, a:b])  # noqa: E731

        def key_mask(valid):
            return jnp.broadcast_to(valid[:, None, :], valid.shape[:1] + valid.shape[1:] * 2)

        c = self.caption_proj(self.caption_norm(text.astype(self.dtype)))
        x = self.x_embedder(x_tokens.astype(self.dtype))
        if cfg.num_refiner_layers:
            c = self._run(self.context_refiner, c, *seg(0, lt), key_mask(text_valid), None, "context")
            x = self._run(self.noise_refiner, x, *seg(lt + lr, lt + lr + ln), key_mask(x_valid), temb, "noise")
        parts = [c]
        ref_valid = ref_ids >= 0
        if lr:
            r = self.ref_image_patch_embedder(ref_tokens.astype(self.dtype))
            idx = jnp.take(self.image_index_embedding[...], jnp.maximum(ref_ids, 0), axis=0).astype(self.dtype)
            r = r + jnp.where(ref_valid[..., None], idx, jnp.zeros((), self.dtype))
            if cfg.num_refiner_layers:
                same = (ref_ids[:, :, None] == ref_ids[:, None, :]) & ref_valid[:, None, :]
                r = self._run(self.ref_image_refiner, r, *seg(lt, lt + lr), same, temb, "ref")
            parts.append(r)
        parts.append(x)
        h = jnp.concatenate(parts, 1)
        valid = jnp.concatenate([text_valid, ref_valid, x_valid], 1)
        h = self._run(self.layers, h, cos, sin, key_mask(valid), temb, "joint")
        scale = self.out_linear_1(jax.nn.silu(temb))
        h = self.norm_out(h[:, lt + lr:]) * (1 + scale[:, None])
        return self.out_linear_2(h)


# ------------------------------------------------------------------------------------------------
# Torch <-> JAX weights (diffusers layout of OmniGen2's transformer/)

_BLOCK = (
    ("attn.to_q.weight", ("to_q", "kernel"), "linear"),
    ("attn.to_k.weight", ("to_k", "kernel"), "linear"),
    ("attn.to_v.weight", ("to_v", "kernel"), "linear"),
    ("attn.to_out.0.weight", ("to_out", "kernel"), "linear"),
    ("attn.norm_q.weight", ("norm_q", "scale"), "copy"),
    ("attn.norm_k.weight", ("norm_k", "scale"), "copy"),
    ("feed_forward.linear_1.weight", ("linear_1", "kernel"), "linear"),
    ("feed_forward.linear_2.weight", ("linear_2", "kernel"), "linear"),
    ("feed_forward.linear_3.weight", ("linear_3", "kernel"), "linear"),
    ("ffn_norm1.weight", ("ffn_norm1", "scale"), "copy"),
    ("norm2.weight", ("norm2", "scale"), "copy"),
    ("ffn_norm2.weight", ("ffn_norm2", "scale"), "copy"),
)
_MODULATED = (
    ("norm1.norm.weight", ("norm1", "scale"), "copy"),
    ("norm1.linear.weight", ("adaln", "kernel"), "linear"),
    ("norm1.linear.bias", ("adaln", "bias"), "copy"),
)


def torch_key_table(cfg) -> list[tuple[str, tuple[str, ...], str, int | None]]:
    """Every key of the diffusers ``transformer/`` checkpoint -> (key, nnx path, kind, layer)."""
    table = []
    for name, path, kind in [
        ("x_embedder.weight", ("x_embedder", "kernel"), "linear"),
        ("x_embedder.bias", ("x_embedder", "bias"), "copy"),
        ("ref_image_patch_embedder.weight", ("ref_image_patch_embedder", "kernel"), "linear"),
        ("ref_image_patch_embedder.bias", ("ref_image_patch_embedder", "bias"), "copy"),
        ("time_caption_embed.timestep_embedder.linear_1.weight", ("t_linear_1", "kernel"), "linear"),
        ("time_caption_embed.timestep_embedder.linear_1.bias", ("t_linear_1", "bias"), "copy"),
        ("time_caption_embed.timestep_embedder.linear_2.weight", ("t_linear_2", "kernel"), "linear"),
        ("time_caption_embed.timestep_embedder.linear_2.bias", ("t_linear_2", "bias"), "copy"),
        ("time_caption_embed.caption_embedder.0.weight", ("caption_norm", "scale"), "copy"),
        ("time_caption_embed.caption_embedder.1.weight", ("caption_proj", "kernel"), "linear"),
        ("time_caption_embed.caption_embedder.1.bias", ("caption_proj", "bias"), "copy"),
        ("norm_out.linear_1.weight", ("out_linear_1", "kernel"), "linear"),
        ("norm_out.linear_1.bias", ("out_linear_1", "bias"), "copy"),
        ("norm_out.linear_2.weight", ("out_linear_2", "kernel"), "linear"),
        ("norm_out.linear_2.bias", ("out_linear_2", "bias"), "copy"),
        ("image_index_embedding", ("image_index_embedding",), "copy"),
    ]:
        table.append((name, path, kind, None))
    stacks = [("noise_refiner", cfg.num_refiner_layers, True), ("ref_image_refiner", cfg.num_refiner_layers, True),
              ("context_refiner", cfg.num_refiner_layers, False), ("layers", cfg.num_layers, True)]
    for stack, n, mod in stacks:
        for j in range(n):
            rows = _BLOCK + (_MODULATED if mod else (("norm1.weight", ("norm1", "scale"), "copy"),))
            table += [(f"{stack}.{j}.{k}", (stack,) + p, kind, j) for k, p, kind in rows]
    return table
