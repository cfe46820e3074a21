"""Qwen2 Mixture-of-Transformers decoder (BAGEL's ``Qwen2MoTDecoderLayer``) and its dense baseline.

Routing. Every token belongs to one expert: ``und`` (text, special and ViT tokens) or ``gen``
(VAE latent tokens). The decoder stable-sorts each row by expert once, before the first layer, so
that und tokens occupy ``[0, L - num_gen)`` and gen tokens ``[L - num_gen, L)``; every projection,
norm and MLP is then two dense matmuls over static slices, so each token passes through exactly
one expert's weights and MoT costs what a dense model costs. Attention is permutation-equivariant
given per-token mask vectors and positions, which are permuted along (causality follows the
``order`` vector, see attention.py). The rows are un-sorted once, after the final norm.

``num_gen`` is static: the packer gives every row exactly ``num_gen`` gen-routed positions
(padding fills whichever expert is short), so one program serves every batch.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sgt_jax.batch import GEN, UND
from sgt_jax.models import attention as attn_lib
from sgt_jax.models.config import head_dim, validate
from sgt_jax.models.layers import Dense, Embed, RMSNorm, apply_rope, remat, rope_cos_sin
from jax.ad_checkpoint import checkpoint_name  # noqa: E402


class Routing(NamedTuple):
    """A row-wise stable sort by expert: ``sorted = take_along_axis(x, perm)``."""
    perm: jax.Array      # (B, L) int32
    inverse: jax.Array   # (B, L) int32
    num_gen: int         # static: gen tokens per row, at [L - num_gen, L) after sorting

    @staticmethod
    def make(expert: jax.Array, num_gen: int) -> "Routing":
        perm = jnp.argsort(expert, axis=1, stable=True).astype(jnp.int32)
        return Routing(perm, jnp.argsort(perm, axis=1).astype(jnp.int32), int(num_gen))

    def sort(self, x: jax.Array) -> jax.Array:
        return _take_rows(x, self.perm)

    def unsort(self, x: jax.Array) -> jax.Array:
        return _take_rows(x, self.inverse)


def _take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def expert_slices(length: int, num_gen: int, mot: bool):
    """[(expert, start, stop)] over the sorted sequence."""
    if not mot or num_gen == 0:
        return [(UND, 0, length)]
    if num_gen == length:
        return [(GEN, 0, length)]
    return [(UND, 0, length - num_gen), (GEN, length - num_gen, length)]


class ExpertWeights(nnx.Module):
    """One expert's copy of a decoder layer's weights (BAGEL: the plain names or ``*_moe_gen``)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype):
        c = cfg.llm
        hd = head_dim(cfg)
        h, q, kv = c.hidden_size, c.num_heads * hd, c.num_kv_heads * hd
        self.input_layernorm = RMSNorm(h, c.rms_norm_eps, ("norm",), rngs=rngs)
        self.q_proj = Dense(h, q, ("embed", "heads"), use_bias=True, rngs=rngs, dtype=dtype)
        self.k_proj = Dense(h, kv, ("embed", "kv_heads"), use_bias=True, rngs=rngs, dtype=dtype)
        self.v_proj = Dense(h, kv, ("embed", "kv_heads"), use_bias=True, rngs=rngs, dtype=dtype)
        self.o_proj = Dense(q, h, ("heads", "embed"), use_bias=False, rngs=rngs, dtype=dtype)
        if c.qk_norm:
            self.q_norm = RMSNorm(hd, c.rms_norm_eps, ("head_dim",), rngs=rngs)
            self.k_norm = RMSNorm(hd, c.rms_norm_eps, ("head_dim",), rngs=rngs)
        else:
            self.q_norm = self.k_norm = None
        self.post_attention_layernorm = RMSNorm(h, c.rms_norm_eps, ("norm",), rngs=rngs)
        self.gate_proj = Dense(h, c.intermediate_size, ("embed", "mlp"), use_bias=False, rngs=rngs, dtype=dtype)
        self.up_proj = Dense(h, c.intermediate_size, ("embed", "mlp"), use_bias=False, rngs=rngs, dtype=dtype)
        self.down_proj = Dense(c.intermediate_size, h, ("mlp", "embed"), use_bias=False, rngs=rngs, dtype=dtype)
        self.nh, self.nkv, self.hd = c.num_heads, c.num_kv_heads, hd

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        b, l, _ = x.shape
        hn = self.input_layernorm(x)
        q = checkpoint_name(self.q_proj(hn), "query_proj").reshape(b, l, self.nh, self.hd)
        k = checkpoint_name(self.k_proj(hn), "key_proj").reshape(b, l, self.nkv, self.hd)
        v = checkpoint_name(self.v_proj(hn), "value_proj").reshape(b, l, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def mlp(self, x: jax.Array) -> jax.Array:
        hn = self.post_attention_layernorm(x)
        g = checkpoint_name(self.gate_proj(hn), "mlpwi_0")
        u = checkpoint_name(self.up_proj(hn), "mlpwi_1")
        return checkpoint_name(self.down_proj(jax.nn.silu(g) * u), "mlpwo")


class DecoderLayer(nnx.Module):
    """``Qwen2MoTDecoderLayer`` (und + gen experts, one joint attention) or, with
    ``layer_module="dense"``, ``Qwen2DecoderLayer`` (one copy of the weights for every token).
    ``rules``: the logical-axis rules table (parallel/mesh.py RULES) the flash kernel's shard_map
    takes its batch / kv-head mesh axes from (the blocked path's too); None: not split."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype, rules=None):
        self.mot = cfg.llm.layer_module == "mot"
        self.und = ExpertWeights(cfg, rngs=rngs, dtype=dtype)
        self.gen = ExpertWeights(cfg, rngs=rngs, dtype=dtype) if self.mot else None
        self.attention_impl = cfg.llm.attention_impl
        self.attention_blocks = None
        if self.attention_impl != "dense":
            from sgt_jax.models.flash_attention import BlockSizes

            self.attention_blocks = BlockSizes.from_config(cfg.llm)
        self.attention_blocking = attn_lib.ba.Blocking.from_config(cfg.llm)
        self.attention_mesh_axes = attn_lib.mesh_axes_from_rules(rules)
        self.freeze_und = bool(cfg.llm.freeze_und)

    def _experts(self, length: int, num_gen: int):
        return [(e, self.gen if e == GEN else self.und, a, b)
                for e, a, b in expert_slices(length, num_gen, self.mot)]

    def _stop(self):
        # freeze_und (BAGEL): und rows are detached at the input, after q/k(-norm)/v, after o_proj
        # and after the MLP, so no gradient reaches und weights or flows through und tokens.
        return (lambda e, y: jax.lax.stop_gradient(y) if e == UND else y) if self.freeze_und else (lambda e, y: y)

    def project_qkv(self, x, cos, sin, num_gen: int):
        """Per-expert input norm, q/k/v projections, qk-norm and RoPE over the expert-sorted
        ``x`` (B, L, H) -> q (B, L, nh, hd), k, v (B, L, nkv, hd)."""
        detach = self._stop()
        qkv = [tuple(detach(e, t) for t in w.qkv(detach(e, x[:, a:b]), cos[:, a:b], sin[:, a:b]))
               for e, w, a, b in self._experts(x.shape[1], num_gen)]
        return tuple(_cat(list(t)) for t in zip(*qkv))

    def finish(self, x, o, num_gen: int):
        """The rest of the layer after attention: per-expert o_proj + residual, MLP + residual;
        ``o`` (B, L, nh*hd) is the attention output."""
        detach = self._stop()
        parts = self._experts(x.shape[1], num_gen)
        x = x + _cat([detach(e, checkpoint_name(w.o_proj(o[:, a:b]), "out_proj")) for e, w, a, b in parts])
        return x + _cat([detach(e, w.mlp(x[:, a:b])) for e, w, a, b in parts])

    def __call__(self, x, cos, sin, seg: attn_lib.Segments, num_gen: int):
        q, k, v = self.project_qkv(x, cos, sin, num_gen)
        o = checkpoint_name(attn_lib.attention(q, k, v, seg, self.attention_impl, self.attention_blocks,
                                               self.attention_mesh_axes, self.attention_blocking),
                            "context")
        return self.finish(x, o.reshape(x.shape[:2] + (-1,)), num_gen)


def _cat(ts):
    return jnp.concatenate(ts, axis=1) if len(ts) > 1 else ts[0]


class Qwen2MoT(nnx.Module):
    """BAGEL's ``language_model``: embeddings, stacked decoder layers, final norms, lm_head."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, rules=None):
        validate(cfg)
        c = cfg.llm
        self.cfg = cfg
        self.mot = c.layer_module == "mot"
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), rngs=rngs, dtype=dtype)

        @nnx.split_rngs(splits=c.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r):
            return DecoderLayer(cfg, rngs=r, dtype=dtype, rules=rules)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, ("norm",), rngs=rngs)
        self.norm_gen = RMSNorm(c.hidden_size, c.rms_norm_eps, ("norm",), rngs=rngs) if self.mot else None
        self.lm_head = Dense(c.hidden_size, c.vocab_size, ("embed", "vocab"), use_bias=False, rngs=rngs, dtype=dtype)
        self.dtype = dtype

    def decode(self, x: jax.Array, positions: jax.Array, seg: attn_lib.Segments, num_gen: int) -> jax.Array:
        """Run the decoder on an expert-sorted sequence; returns the final-normed hidden states
        (und norm on the und slice, gen norm on the gen slice), still sorted."""
        c = self.cfg.llm
        cos, sin = rope_cos_sin(positions, head_dim(self.cfg), c.rope_theta, self.dtype)
        graphdef, stacked = nnx.split(self.layers)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, cos, sin, seg, num_gen), None

        body = remat(body, c.remat_policy, "llm.remat_policy")
        x = x.astype(self.dtype)
        if c.scan_layers:
            x, _ = jax.lax.scan(body, x, stacked)
        else:
            for i in range(c.num_layers):
                x, _ = body(x, jax.tree.map(lambda a: a[i], stacked))
        return self.final_norm(x, num_gen)

    def final_norm(self, x: jax.Array, num_gen: int) -> jax.Array:
        """The per-expert final RMSNorm of an expert-sorted sequence."""
        outs = []
        for e, a, b in expert_slices(x.shape[1], num_gen, self.mot):
            y = (self.norm_gen if e == GEN else self.norm)(x[:, a:b])
            outs.append(jax.lax.stop_gradient(y) if self.cfg.llm.freeze_und and e == UND else y)
        return _cat(outs)

    def __call__(self, x: jax.Array, positions: jax.Array, seg: attn_lib.Segments,
                 expert: jax.Array, num_gen: int) -> jax.Array:
        """x (B, L, H) in packing order -> final hidden states (B, L, H) in packing order."""
        if not self.mot:
            return self.decode(x, positions, seg, 0)
        r = Routing.make(expert, num_gen)
        h = self.decode(r.sort(x), r.sort(positions), seg.permute(r.perm), r.num_gen)
        return r.unsort(h)


def token_cross_entropy(lm_head: Dense, h: jax.Array, labels: jax.Array, chunk: int = 0) -> jax.Array:
    """Per-token CE of ``lm_head(h)`` against ``labels`` (B, T) in fp32; ``chunk`` > 0 computes the
    logits ``chunk`` tokens at a time under remat, so (T, vocab) logits never exist at once."""

    def ce(hc, lc):
        logits = jnp.dot(hc, lm_head.kernel[...].astype(hc.dtype), preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return lse - jnp.take_along_axis(logits, lc[..., None], axis=-1)[..., 0]

    b, t, d = h.shape
    if chunk <= 0 or t <= chunk:
        return ce(h, labels)
    n = -(-t // chunk)
    pad = n * chunk - t
    hp = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    lp = jnp.pad(labels, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    out = jax.lax.map(lambda a: jax.checkpoint(ce)(*a), (hp, lp))
    return out.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
