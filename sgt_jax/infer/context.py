"""Contexts as BAGEL builds them, packed into static-shape rows, and their prefill into the cache.

A context is a list of ``Text`` and ``Image`` items (``InterleaveInferencer``'s input list):

  Text   -> ``<|im_start|> ids <|im_end|>``, und expert, causal, positions rope .. rope+n+1
  Image  -> (``vae=True``) ``<|vision_start|> latent tokens <|vision_end|>``: the sampled VAE
            latent of the image with the t = 0 timestep embedding, latent tokens through the gen
            expert, bidirectional, all at one position, rope += 1; then (``vit=True``) the same
            with SigLIP tokens through the und expert, rope += 1. Understanding-only contexts use
            ``vit=True, vae=False``; SGT's segmentation context is a ViT-only image then the
            instruction (data/samples.py ``seg_items``).

The token layout is the training layout (``data.samples.layout``, ``data.packer.assemble``):
one context per row, a RoPE / split / expert vector per token, padding as its own document
routed to fill the static gen quota. So BAGEL's successive ``forward_cache_update_text / vit /
vae`` calls are one ``prefill`` of the whole block: inside it the mask is the training mask of
the document (text causal, image blocks full), and every token also sees the row's earlier
cache (a context may be prefilled in several pieces, e.g. a "think" text after decoding).

``cfg_contexts`` gives the three contexts of image generation exactly as
``interleave_inference`` keeps them: ``cfg_text`` = the context before the last text (after an
image, the context so far), ``cfg_img`` = the texts only.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax import batch as B
from sgt_jax.data import packer, samples
from sgt_jax.data.tokenizer import SpecialTokens
from sgt_jax.infer.cache import KVCache, bucket, run_block
from sgt_jax.models import attention as attn_lib
from sgt_jax.models.bagel import patchify_latents, shift_timesteps
from sgt_jax.models.config import vae_downsample
from sgt_jax.models.qwen2_mot import Routing
from sgt_jax.models.vae import latent_from_moments


@dataclasses.dataclass
class Text:
    """A text block: a string (tokenized with the model's tokenizer) or token ids, without the
    ``<|im_start|>`` / ``<|im_end|>`` markers (they are added)."""
    text: Union[str, Sequence[int]]


@dataclasses.dataclass
class Image:
    """An image, already at its final size (VAE side a multiple of 16 px, ViT side of 14 px;
    ``tasks`` applies the data config's transforms). ``image``: HWC uint8, or float in [-1, 1].
    ``vit_image``: the ViT's copy when it differs (BAGEL resizes the two separately)."""
    image: np.ndarray
    vae: bool = True
    vit: bool = True
    vit_image: np.ndarray | None = None
    eps: np.ndarray | None = None      # VAE sampling noise (h/8, w/8, z), else drawn from the row key


Context = list  # of Text | Image


def special_tokens(cfg) -> SpecialTokens:
    c = cfg.llm
    return SpecialTokens(c.bos_token_id, c.eos_token_id, c.start_of_image, c.end_of_image)


def layout_spec(cfg, special: SpecialTokens | None = None) -> samples.LayoutSpec:
    """The layout constants of a model; ``special``: the tokenizer's marker ids (training lays
    samples out with the tokenizer's ids; default: the model config's)."""
    return samples.LayoutSpec(special=special or special_tokens(cfg), vit_patch_size=cfg.vit.patch_size,
                              vit_max_patches_per_side=cfg.bagel.vit_max_num_patch_per_side,
                              vae_downsample=vae_downsample(cfg) * cfg.bagel.latent_patch_size,
                              max_latent_size=cfg.bagel.max_latent_size)


def text_ids(item: Text, tokenizer) -> list[int]:
    if isinstance(item.text, str):
        if tokenizer is None:
            raise ValueError("a text given as a string needs a tokenizer (or give token ids)")
        return list(tokenizer.encode(item.text))
    return [int(i) for i in item.text]


def to_items(context: Context, tokenizer) -> list[samples.Item]:
    out = []
    for it in context:
        if isinstance(it, Text):
            out.append(samples.Item("text", text_ids=text_ids(it, tokenizer)))
        elif isinstance(it, Image):
            if not (it.vae or it.vit):
                raise ValueError("an Image item needs vae=True or vit=True")
            if it.vae:
                out.append(samples.Item("vae_image", image=it.image))
            if it.vit:
                out.append(samples.Item("vit_image", image=it.image if it.vit_image is None else it.vit_image))
        else:
            raise TypeError(f"context items are Text or Image, got {type(it).__name__}")
    return out


def cfg_contexts(inputs: Context, system: Context = ()) -> tuple[Context, Context, Context]:
    """(gen, cfg_text, cfg_img) for an input list, as ``InterleaveInferencer.interleave_inference``
    builds them; ``system`` (e.g. a think-mode system prompt) starts gen and cfg_img."""
    gen, cfg_text, cfg_img = list(system), [], list(system)
    for it in inputs:
        if isinstance(it, Text):
            cfg_text = list(gen)
            gen.append(it)
            cfg_img.append(it)
        else:
            gen.append(it)
            cfg_text = list(gen)
    return gen, cfg_text, cfg_img


@dataclasses.dataclass
class ContextBatch:
    """Contexts packed one per row (numpy), with the static ``num_gen`` and what the cache needs."""
    batch: B.PackedBatch
    num_gen: int             # static: gen-routed positions per row
    n_valid: np.ndarray      # (B,) tokens of each context (the rest is padding)
    rope_end: np.ndarray     # (B,) RoPE advance of each context
    vae_eps: np.ndarray | None   # (B, N, h, w, z) given noise, or None (drawn from the row keys)
    latent_shape: tuple[int, int, int]   # (h, w, z) of a VAE latent of this batch

    @property
    def rows(self) -> int:
        return int(self.n_valid.shape[0])

    @property
    def length(self) -> int:
        return int(self.batch.kind.shape[1])


def pack_contexts(cfg, contexts: Sequence[Context], tokenizer=None, *, special: SpecialTokens | None = None,
                  min_tokens: int = 16) -> ContextBatch:
    """Lay out and pack contexts (one per row) into static shapes bucketed by ``cache.bucket``:
    und tokens, gen tokens, ViT patches each to a power of two; all VAE images of the batch
    padded (bottom/right, zeros, as BAGEL pads a batch) to the largest."""
    spec = layout_spec(cfg, special)
    lay = [samples.layout(to_items(c, tokenizer), spec) for c in contexts]
    und = max([s.num_und for s in lay] + [0])
    gen = max([s.num_gen for s in lay] + [0])
    vit = max([s.num_vit_patches for s in lay] + [0])
    n_img = max([s.num_vae_images for s in lay] + [0])
    hs = [im.shape[0] for s in lay for im in s.vae_images]
    ws = [im.shape[1] for s in lay for im in s.vae_images]
    d = spec.vae_downsample
    hw = (max(hs), max(ws)) if hs else (d, d)
    G = bucket(gen, min_tokens) if gen else 0
    rs = packer.RowSpec(tokens_per_row=bucket(und, min_tokens) + G, gen_tokens_per_row=G,
                        vit_patches_per_row=bucket(vit, min_tokens), vae_images_per_row=max(n_img, 1),
                        vae_hw=hw, vae_downsample=d, vit_patch_size=spec.vit_patch_size)
    batch = packer.assemble([[s] for s in lay], rs)
    f = vae_downsample(cfg)
    z = cfg.vae.z_channels
    latent_shape = (hw[0] // f, hw[1] // f, z)
    eps = None
    given = [[it.eps for it in c if isinstance(it, Image) and it.vae] for c in contexts]
    if any(e is not None for g in given for e in g):
        eps = np.zeros((len(lay), max(n_img, 1)) + latent_shape, np.float32)
        for r, g in enumerate(given):
            for j, e in enumerate(g):
                if e is None:
                    raise ValueError("give eps for every VAE image of a batch or for none")
                e = np.asarray(e, np.float32)
                eps[r, j, :e.shape[0], :e.shape[1]] = e
    rope_end = np.asarray([int(s.tokens["position_ids"].max()) + 1 if s.num_tokens else 0 for s in lay], np.int32)
    n_valid = np.asarray([s.num_tokens for s in lay], np.int32)
    return ContextBatch(batch, G, n_valid, rope_end, eps, latent_shape)


def draw_vae_eps(keys: jax.Array, shape: tuple) -> jax.Array:
    """VAE sampling noise (B, N, h, w, z): image j of row r from fold_in(fold_in(keys[r], 0), j),
    so the same image in the same place of two contexts of one request gets the same draw."""
    def row(k):
        k = jax.random.fold_in(k, 0)
        return jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(k, j), shape[2:], jnp.float32))(
            jnp.arange(shape[1]))
    return jax.vmap(row)(keys)


def prefill(model, vae, cache: KVCache, batch: B.PackedBatch, eps: jax.Array | None, n_valid: jax.Array,
            rope_end: jax.Array, *, num_gen: int, query_chunk: int = 0):
    """Run a packed block of contexts (``pack_contexts``) through the model against ``cache`` and
    append it: returns (cache with the block's keys / values, ``length += n_valid``, ``rope +=
    rope_end``; hidden states (B, L, H) in packing order). ``vae``: the AutoEncoder (needed when
    the block has VAE images); ``eps`` (B, N, h, w, z) its sampling noise."""
    cfg = model.cfg
    lm = model.language_model
    length = batch.kind.shape[1]
    r = Routing.make(batch.expert, num_gen)
    lu = length - num_gen
    tok = {f: r.sort(getattr(batch, f)) for f in ("kind", "text_ids", "vit_index", "vae_token_index",
                                                    "latent_position_ids", "timesteps")}
    parts = [model.embed_und(batch, tok["text_ids"][:, :lu], tok["kind"][:, :lu], tok["vit_index"][:, :lu])]
    if num_gen:
        imgs = batch.vae_images
        bsz, n = imgs.shape[:2]
        moments = vae.encode_moments(imgs.reshape((bsz * n,) + imgs.shape[2:]))
        lat = latent_from_moments(moments, eps.reshape((bsz * n,) + eps.shape[2:]),
                                  vae.config.scale_factor, vae.config.shift_factor)
        lat = patchify_latents(lat.reshape((bsz, n) + lat.shape[1:]), cfg.bagel.latent_patch_size)
        x0 = jnp.take_along_axis(lat, tok["vae_token_index"][:, lu:, None], axis=1)
        t = shift_timesteps(tok["timesteps"][:, lu:], cfg.bagel.timestep_shift)   # clean: t = 0
        parts.append(model.embed_latents(x0, t, tok["latent_position_ids"][:, lu:]))
    x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    order = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), batch.kind.shape)
    seg = attn_lib.Segments(batch.doc_ids, batch.split_ids, batch.split_mode, order).permute(r.perm)
    pos = r.sort(batch.position_ids + cache.rope[:, None])
    h, kb, vb = run_block(lm, x, pos, seg, num_gen, cache, query_chunk=query_chunk)
    inv = r.inverse[None, :, :, None, None]
    kb, vb = (jnp.take_along_axis(a, inv, axis=2) for a in (kb, vb))    # back to packing order
    cache = cache.write(kb, vb, n_valid).replace(rope=cache.rope + rope_end.astype(jnp.int32))
    return cache, r.unsort(h)
