"""Unified-GRPO rollouts on BAGEL, one jitted program with static shapes (docs/rl.md).

For B input images and group size G (R = B*G rows, row b*G + g = sample g of image b):

  1. caption  the und contexts ``[image (ViT), prompt]`` (packed on the host like any inference
              context, ``infer.context.pack_contexts``) are prefilled into a KV cache and G
              captions per image are sampled (``infer.text.generate``: temperature, at most
              ``max_caption_tokens`` tokens, per-token log-probs under the sampling policy);
  2. generate each caption becomes a text-to-image context ``<|im_start|> caption <|im_end|>``
              built on device (``caption_block``), prefilled with the CFG's empty context beside
              it (BAGEL's t2i ``cfg_text``); Euler flow sampling with CFG (``infer.image``) and the
              VAE decode give R images;
  3. reward   cos(f(x_b), f(x_hat_{b,g})) with the reward encoder (rewards.py).

``policy_logprobs`` is the other half: the log-probs of the same caption tokens under the
*training* forward (``Bagel.__call__`` on ``[context, <|im_start|> caption]`` as one packed row),
differentiable, for the GRPO update.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax import batch as B
from sgt_jax.infer import context as ctx_lib
from sgt_jax.infer import image as image_lib
from sgt_jax.infer import text as text_lib
from sgt_jax.infer.cache import KVCache, block_segments, bucket, run_block
from sgt_jax.models.config import patch_latent_dim, vae_downsample

CAPTION_SPLIT = 1 << 20       # split id of the caption block in the update's packed row (unique)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    group_size: int = 8
    max_caption_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    image_size: int = 512                                  # generated image side (px)
    flow: image_lib.FlowConfig = image_lib.FlowConfig(cfg_img_scale=1.0)   # t2i: no image CFG

    def latent_grid(self, cfg) -> int:
        d = vae_downsample(cfg) * cfg.bagel.latent_patch_size
        if self.image_size % d:
            raise ValueError(f"rollout image_size {self.image_size} is not a multiple of {d}")
        return self.image_size // d


def caption_contexts(images, prompt_ids, vit_size: int, group_size: int):
    """The und contexts ``[image (ViT only), prompt]``, each image repeated ``group_size`` times."""
    from sgt_jax.data.samples import resize

    out = []
    for im in images:
        vit = resize(np.asarray(im), vit_size, vit_size) if im.shape[:2] != (vit_size, vit_size) else im
        ctx = [ctx_lib.Image(np.asarray(vit), vae=False, vit=True), ctx_lib.Text(list(prompt_ids))]
        out += [ctx] * group_size
    return out


def caption_block(tokens: jax.Array, num_tokens: jax.Array, bos: int, eos: int):
    """Sampled answers (R, T) (``num_tokens`` each) -> the t2i text block (R, T+2):
    ``[bos, caption, eos, pad...]``, its valid mask and length n + 2 (a caption cut at T tokens
    is closed with eos too)."""
    r, t = tokens.shape
    i = jnp.arange(t + 2)[None, :]
    n = num_tokens[:, None]
    body = jnp.concatenate([jnp.zeros((r, 1), jnp.int32), tokens.astype(jnp.int32), jnp.zeros((r, 1), jnp.int32)], 1)
    ids = jnp.where(i == 0, bos, jnp.where(i <= n, body, jnp.where(i == n + 1, eos, 0)))
    valid = i <= n + 1
    return ids.astype(jnp.int32), valid, (num_tokens + 2).astype(jnp.int32)


def prefill_text(model, cache: KVCache, ids: jax.Array, valid: jax.Array, n_valid: jax.Array) -> KVCache:
    """Append a causal text block (R, L) (valid prefix of ``n_valid`` tokens per row; 0: nothing)
    at each row's RoPE position."""
    lm = model.language_model
    x = lm.embed_tokens(ids)
    pos = cache.rope[:, None] + jnp.arange(ids.shape[1], dtype=jnp.int32)[None, :]
    seg = block_segments(jnp.full(ids.shape, B.CAUSAL, jnp.int32), valid)
    _, kb, vb = run_block(lm, x, pos, seg, 0, cache)
    return cache.write(kb, vb, n_valid).replace(rope=cache.rope + n_valid)


def sample_captions(model, ctx_batch: B.PackedBatch, n_valid, rope_end, keys, rc: RolloutConfig, special):
    """Prefill the und contexts and sample one caption per row: ``text.generate``'s dict."""
    cfg = model.cfg
    rows, length = ctx_batch.kind.shape
    cache = KVCache.create(cfg, rows, bucket(length + rc.max_caption_tokens))
    cache, _ = ctx_lib.prefill(model, None, cache, ctx_batch, None, n_valid, rope_end, num_gen=0)
    full = lambda v, dt: jnp.full((rows,), v, dt)
    _, out = text_lib.generate(model, cache, keys, full(rc.temperature, jnp.float32), full(rc.top_k, jnp.int32),
                               full(rc.top_p, jnp.float32), start_token=special.bos_token_id,
                               stop_token=special.eos_token_id, max_new_tokens=rc.max_caption_tokens)
    return out


def generate_images(model, vae, tokens, num_tokens, keys, rc: RolloutConfig, special):
    """Captions (R, T) -> (R, S, S, 3) uint8 images: t2i contexts ``[gen; empty]`` (and
    ``cfg_img`` = gen again when the image CFG is on), Euler + CFG, VAE decode."""
    cfg = model.cfg
    flow = rc.flow
    rows, t = tokens.shape
    n_ctx = flow.num_contexts
    ids, valid, n = caption_block(tokens, num_tokens, special.bos_token_id, special.eos_token_id)
    empty = jnp.zeros_like(valid)
    blocks = {1: (ids, valid, n), 2: (jnp.concatenate([ids, ids]), jnp.concatenate([valid, empty]),
                                      jnp.concatenate([n, jnp.zeros_like(n)])),
              3: (jnp.concatenate([ids, ids, ids]), jnp.concatenate([valid, empty, valid]),
                  jnp.concatenate([n, jnp.zeros_like(n), n]))}[n_ctx]
    cache = KVCache.create(cfg, n_ctx * rows, bucket(t + 2))
    cache = prefill_text(model, cache, *blocks)
    g = rc.latent_grid(cfg)
    x1 = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (g * g, patch_latent_dim(cfg)),
                                              jnp.float32))(keys)
    ts, dts = image_lib.schedule(flow.num_timesteps, flow.timestep_shift)
    full = lambda v: jnp.full((rows,), v, jnp.float32)
    lat = image_lib.sample_latents(model, cache, x1, jnp.asarray(image_lib.latent_position_ids(cfg, g, g)),
                                   jnp.asarray(ts), jnp.asarray(dts), full(flow.cfg_text_scale),
                                   full(flow.cfg_img_scale), jnp.asarray(flow.cfg_interval, jnp.float32),
                                   full(flow.cfg_renorm_min), n_ctx=n_ctx, renorm_type=flow.cfg_renorm_type,
                                   marks=(special.start_of_image, special.end_of_image))
    return image_lib.decode(vae, cfg, lat, g, g)[1]


def caption_mask(out: dict) -> jax.Array:
    """(R, T) bool: the sampled tokens the policy is scored on -- the caption and its stop token."""
    t = out["tokens"].shape[1]
    scored = out["num_tokens"] + out["stopped"].astype(jnp.int32)
    return jnp.arange(t)[None, :] < scored[:, None]


def update_batch(ctx_batch: B.PackedBatch, rope_end, tokens, mask, bos: int) -> B.PackedBatch:
    """One training row per rollout: the packed context, then ``[bos, t_0 .. t_{T-2}]`` at RoPE
    ``rope_end + i`` (same document, one causal split) with CE labels ``t_0 .. t_{T-1}`` where
    ``mask``; the caption's padding joins the context's padding document."""
    rows, t = tokens.shape
    inp = jnp.concatenate([jnp.full((rows, 1), bos, jnp.int32), tokens[:, :-1].astype(jnp.int32)], 1)
    live = jnp.concatenate([jnp.ones((rows, 1), bool), mask[:, :-1]], 1)     # inputs up to the last scored label
    pad_doc = jnp.max(ctx_batch.doc_ids, axis=1, keepdims=True)
    z = jnp.zeros((rows, t), jnp.int32)
    cap = dict(kind=jnp.where(live, B.TEXT, B.PAD).astype(jnp.int32), text_ids=jnp.where(live, inp, 0),
               position_ids=rope_end[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None, :],
               doc_ids=jnp.where(live, 0, pad_doc).astype(jnp.int32),
               split_ids=jnp.where(live, CAPTION_SPLIT, CAPTION_SPLIT + 1).astype(jnp.int32),
               split_mode=jnp.full((rows, t), B.CAUSAL, jnp.int32), expert=z,
               ce_mask=mask, ce_labels=tokens.astype(jnp.int32), ce_weights=jnp.ones((rows, t), jnp.float32),
               mse_mask=jnp.zeros((rows, t), bool), vit_index=z, vae_token_index=z, latent_position_ids=z,
               timesteps=jnp.zeros((rows, t), jnp.float32))
    fields = {}
    for f in B.TOKEN_FIELDS:
        a = getattr(ctx_batch, f)
        if f == "ce_mask":
            a = jnp.zeros_like(a)
        fields[f] = jnp.concatenate([a.astype(cap[f].dtype), cap[f]], axis=1)
    return B.PackedBatch(**fields, vit_patches=ctx_batch.vit_patches, vit_position_ids=ctx_batch.vit_position_ids,
                         vit_image_ids=ctx_batch.vit_image_ids)


def policy_logprobs(model, ctx_batch: B.PackedBatch, rope_end, tokens, mask, bos: int) -> jax.Array:
    """log pi(t_i | context, t_<i) (R, T) from the training forward (0 where not ``mask``)."""
    batch = update_batch(ctx_batch, rope_end, tokens, mask, bos)
    ce = model(batch, num_gen=0)["ce"]
    return jnp.where(mask, -ce[:, ctx_batch.kind.shape[1]:], 0.0)


def recon_batch(cfg, tokens, num_tokens, images, raw_t, special, vit_patch_dim: int) -> B.PackedBatch:
    """The flow-matching row of (policy caption -> input image), built on device in the training
    layout (``data.samples.layout`` of ``[text, noised vae_image]``): ``<|im_start|> caption
    <|im_end|>`` (causal, RoPE 0..n+1), then ``<|vision_start|> h*w noised latents
    <|vision_end|>`` (one NOISE split at RoPE n+2; latents through the gen expert, MSE on them).
    ``images`` (R, S, S, 3) uint8, ``raw_t`` (R,) raw timesteps (N(0, 1), shifted by the model)."""
    rows, t = tokens.shape
    s = images.shape[1]
    g = s // (vae_downsample(cfg) * cfg.bagel.latent_patch_size)
    ids, valid, n = caption_block(tokens, num_tokens, special.bos_token_id, special.eos_token_id)
    lt = t + 2
    hw = g * g
    zt = jnp.zeros((rows, lt), jnp.int32)
    rr, cc = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    lat_pos = jnp.asarray((rr * cfg.bagel.max_latent_size + cc).reshape(-1), jnp.int32)
    img_pos = jnp.broadcast_to(n[:, None], (rows, hw + 2))
    kind_img = jnp.concatenate([jnp.full((rows, 1), B.TEXT), jnp.full((rows, hw), B.VAE_NOISED),
                                jnp.full((rows, 1), B.TEXT)], 1)
    marks = jnp.zeros((rows, hw + 2), jnp.int32).at[:, 0].set(special.start_of_image).at[:, -1].set(special.end_of_image)
    fields = dict(
        kind=(jnp.where(valid, B.TEXT, B.PAD), kind_img),
        text_ids=(ids, marks),
        position_ids=(jnp.where(valid, jnp.arange(lt)[None, :], 0), img_pos),
        doc_ids=(jnp.where(valid, 0, 1), jnp.zeros((rows, hw + 2))),
        split_ids=(jnp.where(valid, 0, 2), jnp.ones((rows, hw + 2))),
        split_mode=(jnp.full((rows, lt), B.CAUSAL), jnp.full((rows, hw + 2), B.NOISE)),
        expert=(zt, jnp.zeros((rows, hw + 2)).at[:, 1:-1].set(B.GEN)),
        ce_mask=(jnp.zeros((rows, lt), bool), jnp.zeros((rows, hw + 2), bool)),
        ce_labels=(zt, jnp.zeros((rows, hw + 2))),
        ce_weights=(jnp.ones((rows, lt)), jnp.ones((rows, hw + 2))),
        mse_mask=(jnp.zeros((rows, lt), bool), jnp.zeros((rows, hw + 2), bool).at[:, 1:-1].set(True)),
        vit_index=(zt, jnp.zeros((rows, hw + 2))),
        vae_token_index=(zt, jnp.zeros((rows, hw + 2)).at[:, 1:-1].set(jnp.arange(hw))),
        latent_position_ids=(zt, jnp.zeros((rows, hw + 2)).at[:, 1:-1].set(lat_pos)),
        timesteps=(jnp.zeros((rows, lt)), jnp.zeros((rows, hw + 2)).at[:, 1:-1].set(raw_t[:, None])),
    )
    out = {}
    for f, (a, b) in fields.items():
        dt = B.dtype(f)
        out[f] = jnp.concatenate([a.astype(dt), b.astype(dt)], axis=1)
    pix = (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5      # data.samples.normalize
    return B.PackedBatch(**out, vit_patches=jnp.zeros((rows, 1, vit_patch_dim), jnp.float32),
                         vit_position_ids=jnp.zeros((rows, 1), jnp.int32),
                         vit_image_ids=jnp.full((rows, 1), -1, jnp.int32), vae_images=pix[:, None])
