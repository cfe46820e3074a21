"""BAGEL: the Qwen2 MoT LLM with a SigLIP-NaViT understanding branch and a flow-matching
generation branch over FLUX-VAE latents. Training forward only (inference is a separate function
over the same modules).

One forward, in BAGEL's order (reference/bagel.md 1.2), on an expert-sorted sequence:
  und slice: text embeddings, and connector(ViT) + vit_pos_embed at ViT positions
  gen slice: x0 = patchified latents; t = shift(sigmoid(raw)); x_t = (1 - t) x0 + t noise;
             vae2llm(x_t) + time_embedder(t) + latent_pos_embed
  LLM -> per-token CE (lm_head on the und slice only), per-element MSE of llm2vae(h) against the
  velocity noise - x0 (gen slice only), final hidden states.
Outputs are returned in packing order.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sgt_jax.batch import VIT, PackedBatch
from sgt_jax.models import attention as attn_lib
from sgt_jax.models.config import patch_latent_dim, validate
from sgt_jax.models.layers import Dense, gelu_tanh, sincos_2d_table, timestep_frequencies
from sgt_jax.models.qwen2_mot import Qwen2MoT, Routing, token_cross_entropy
from sgt_jax.models.siglip import SiglipNaViT


class FixedTable(nnx.Variable):
    """A fixed (non-trainable) table, regenerated from its formula, never loaded."""


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class MLPConnector(nnx.Module):
    def __init__(self, d_in, d_out, *, rngs, dtype):
        self.fc1 = Dense(d_in, d_out, ("vit_embed", "embed"), use_bias=True, rngs=rngs, dtype=dtype)
        self.fc2 = Dense(d_out, d_out, ("mlp", "embed"), use_bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))


class TimestepEmbedder(nnx.Module):
    def __init__(self, hidden, *, rngs, dtype, freq_dim: int = 256):
        self.fc1 = Dense(freq_dim, hidden, (None, "embed"), use_bias=True, rngs=rngs, dtype=dtype)
        self.fc2 = Dense(hidden, hidden, ("mlp", "embed"), use_bias=True, rngs=rngs, dtype=dtype)
        self.freq_dim = freq_dim

    def __call__(self, t):
        return self.fc2(jax.nn.silu(self.fc1(timestep_frequencies(t, self.freq_dim))))


def shift_timesteps(raw: jax.Array, shift: float) -> jax.Array:
    """t = s*sigmoid(raw) / (1 + (s-1)*sigmoid(raw)); raw = -inf (clean image) gives t = 0."""
    t = jax.nn.sigmoid(raw.astype(jnp.float32))
    return shift * t / (1.0 + (shift - 1.0) * t)


def row_normal(key: jax.Array, shape: tuple, row_ids: jax.Array | None = None) -> jax.Array:
    """Standard normal (B, ...) where row r is drawn from fold_in(key, row_ids[r])."""
    rows = jnp.arange(shape[0]) if row_ids is None else row_ids
    return jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(key, r), shape[1:], jnp.float32))(rows)


def patchify_latents(latents: jax.Array, p: int) -> jax.Array:
    """(B, N, h, w, C) -> (B, N*(h/p)*(w/p), p*p*C): tokens row-major per image, features
    ordered (pi, qi, c) as BAGEL's einsum('chpwq->hwpqc')."""
    b, n, h, w, c = latents.shape
    x = latents.reshape(b, n, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, n * (h // p) * (w // p), p * p * c)


class Bagel(nnx.Module):
    """``rules``: the logical-axis rules table (sgt_jax/parallel/mesh.py RULES) the attention
    kernel's shard_map follows; the caller passes it (models never import parallel)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, rules=None):
        validate(cfg)
        self.cfg = cfg
        dtype = _dtype(cfg.compute_dtype)
        h = cfg.llm.hidden_size
        self.language_model = Qwen2MoT(cfg, rngs=rngs, dtype=dtype, rules=rules)
        b = cfg.bagel
        if b.visual_und:
            self.vit_model = SiglipNaViT(cfg, rngs=rngs, dtype=dtype, rules=rules)
            self.connector = MLPConnector(cfg.vit.hidden_size, h, rngs=rngs, dtype=dtype)
            self.vit_pos_embed = FixedTable(jnp.asarray(sincos_2d_table(h, b.vit_max_num_patch_per_side)))
        if b.visual_gen:
            d = patch_latent_dim(cfg)
            self.time_embedder = TimestepEmbedder(h, rngs=rngs, dtype=dtype)
            self.vae2llm = Dense(d, h, (None, "embed"), use_bias=True, rngs=rngs, dtype=dtype)
            self.llm2vae = Dense(h, d, ("embed", None), use_bias=True, rngs=rngs, dtype=dtype, zero_init=True)
            self.latent_pos_embed = FixedTable(jnp.asarray(sincos_2d_table(h, b.max_latent_size)))
        self.dtype = dtype

    # -- branches -------------------------------------------------------------------------------

    def vit_embeddings(self, batch: PackedBatch) -> jax.Array:
        """connector(SigLIP(patches)) + vit_pos_embed, per packed patch: (B, P, H)."""
        v = self.vit_model(batch.vit_patches, batch.vit_position_ids, batch.vit_image_ids)
        pos = jnp.clip(batch.vit_position_ids, 0, self.vit_pos_embed.shape[0] - 1)
        return self.connector(v) + jnp.take(self.vit_pos_embed[...], pos, axis=0).astype(self.dtype)

    def embed_und(self, batch: PackedBatch, text_ids, kind, vit_index) -> jax.Array:
        """Embeddings of und tokens (B, T, H): text (and special) tokens, and connector(ViT) +
        vit_pos_embed where ``kind == VIT`` (``vit_index`` into the row's ViT patches)."""
        x = self.language_model.embed_tokens(text_ids)
        if self.cfg.bagel.visual_und:
            vit = self.vit_embeddings(batch)
            vit_tok = jnp.take_along_axis(vit, vit_index[..., None], axis=1)
            x = jnp.where((kind == VIT)[..., None], vit_tok, x)
        return x

    def embed_latents(self, x_t, t, latent_position_ids) -> jax.Array:
        """Embeddings of latent tokens: vae2llm(x_t) + time_embedder(t) + latent_pos_embed."""
        pos = jnp.take(self.latent_pos_embed[...], latent_position_ids, axis=0)
        return self.vae2llm(x_t) + self.time_embedder(t) + pos.astype(self.dtype)

    def und_cross_entropy(self, h, labels, mask, num_ce: int = 0) -> jax.Array:
        """Per-token CE (B, T) of the und slice ``h`` (B, T, H); 0 off ``mask``. ``num_ce`` > 0:
        computed at the first ``num_ce`` positions of ``mask`` per row only (see ``__call__``)."""
        head, chunk = self.language_model.lm_head, self.cfg.llm.ce_chunk_size
        if not num_ce or num_ce >= h.shape[1]:
            return jnp.where(mask, token_cross_entropy(head, h, labels, chunk), 0.0)
        # positions of the CE tokens, in order; the unused slots point at position 0 and add 0 there
        idx = jax.vmap(lambda m: jnp.nonzero(m, size=num_ce, fill_value=0)[0])(mask)
        valid = jnp.arange(num_ce)[None] < jnp.sum(mask, axis=1, keepdims=True)
        ce = token_cross_entropy(head, jnp.take_along_axis(h, idx[..., None], axis=1),
                                 jnp.take_along_axis(labels, idx, axis=1), chunk)
        ce = jnp.where(valid, ce, 0.0)
        rows = jnp.arange(h.shape[0])[:, None]
        return jnp.zeros(mask.shape, jnp.float32).at[rows, idx].add(ce)

    def __call__(self, batch: PackedBatch, *, num_gen: int, noise: jax.Array | None = None,
                 key: jax.Array | None = None, row_ids: jax.Array | None = None, num_ce: int = 0) -> dict:
        """Training forward. ``batch.latents`` must be set (the train step VAE-encodes
        ``vae_images``). Flow noise: ``noise`` (B, L, p*p*C) in packing order, or drawn from
        ``key`` per row: row r uses fold_in(key, row_ids[r]) (default row_ids = arange(B)), so the
        noise of a row does not depend on how the batch is split or sharded.

        ``num_ce`` > 0 (static, the data config's ``ce_tokens_per_row``: the packer puts at most
        that many CE positions in a row): ``lm_head`` and the logsumexp run at the row's first
        ``num_ce`` CE positions only, gathered from the und slice, instead of at every und
        position; 0 runs them at every und position. The per-token CE is the same either way.

        Returns (packing order): ``hidden`` (B, L, H), ``ce`` (B, L) per-token CE (0 off
        ``ce_mask``), ``mse`` (B, L, p*p*C) per-element squared error (0 off ``mse_mask``),
        ``input_embeds`` (B, L, H).
        """
        cfg = self.cfg
        bsz, length = batch.kind.shape
        mot = cfg.llm.layer_module == "mot"
        r = Routing.make(batch.expert, num_gen)
        lu = length - num_gen
        tok = {f: r.sort(getattr(batch, f)) for f in
               ("kind", "text_ids", "position_ids", "ce_mask", "ce_labels", "ce_weights", "mse_mask",
                "vit_index", "vae_token_index", "latent_position_ids", "timesteps")}
        seg = attn_lib.Segments(batch.doc_ids, batch.split_ids, batch.split_mode,
                                jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (bsz, length))
                                ).permute(r.perm)
        und = lambda f: tok[f][:, :lu]    # und slice of a token field
        gen = lambda f: tok[f][:, lu:]    # gen slice

        # und slice: text (and special) tokens, ViT tokens
        parts = [self.embed_und(batch, und("text_ids"), und("kind"), und("vit_index"))]

        # gen slice: noised / clean latent tokens
        if num_gen:
            if not cfg.bagel.visual_gen:
                raise ValueError("num_gen > 0 but bagel.visual_gen is False")
            p = cfg.bagel.latent_patch_size
            lat = patchify_latents(batch.latents.astype(jnp.float32), p)
            x0 = jnp.take_along_axis(lat, gen("vae_token_index")[..., None], axis=1)
            if noise is None:
                if key is None:
                    raise ValueError("pass the flow noise or a key to draw it from")
                eps = row_normal(key, x0.shape, row_ids)
            else:
                eps = r.sort(noise.astype(jnp.float32))[:, lu:]
            t = shift_timesteps(gen("timesteps"), cfg.bagel.timestep_shift)
            x_t = (1.0 - t[..., None]) * x0 + t[..., None] * eps
            parts.append(self.embed_latents(x_t, t, gen("latent_position_ids")))
        x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

        hs = self.language_model.decode(x, tok["position_ids"], seg, num_gen if mot else 0)
        ce = self.und_cross_entropy(hs[:, :lu], und("ce_labels"), und("ce_mask"), num_ce)
        outs = {"ce": [ce]}
        if num_gen:
            pred = self.llm2vae(hs[:, lu:]).astype(jnp.float32)
            mse = jnp.square(pred - (eps - x0))
            outs["mse"] = [jnp.zeros((bsz, lu) + mse.shape[2:], jnp.float32),
                           jnp.where(gen("mse_mask")[..., None], mse, 0.0)]
            outs["ce"].append(jnp.zeros((bsz, num_gen), jnp.float32))
        else:
            outs["mse"] = [jnp.zeros((bsz, length, patch_latent_dim(cfg)), jnp.float32)]
        cat = lambda xs: jnp.concatenate(xs, axis=1) if len(xs) > 1 else xs[0]
        return {"hidden": r.unsort(hs), "ce": r.unsort(cat(outs["ce"])),
                "mse": r.unsort(cat(outs["mse"])), "input_embeds": r.unsort(x)}
