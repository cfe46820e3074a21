"""Qwen2.5-VL (OmniGen2's understanding model) in Flax NNX, packed rows under static shapes.

Vision tower (transformers' ``Qwen2_5_VisionTransformerPretrainedModel``):
  patches (C*T*p*p features, the Conv3d patch embedding as one matmul) -> ``depth`` blocks
  x += proj(attn(RMSNorm x)) with 2-D rotary (h, w); x += down(silu(gate) * up)(RMSNorm x)
  -> merger: RMSNorm, every 2x2 merge unit (4 consecutive tokens) -> Linear, GELU, Linear.
  The original reorders tokens window by window and attends within ``cu_seqlens``; here tokens
  stay in the processor's order (merge-unit major) and the same sets are expressed as masks:
  a window layer attends among tokens of the same window of the same image, a full layer
  (``fullatt_block_indexes``) among tokens of the same image. Attention is permutation-equivariant
  and the original un-permutes after the merger, so outputs are the same.

Text model (``Qwen2_5_VLTextModel`` + ``lm_head``): the dense Qwen2 layer of qwen2_mot.py with
M-RoPE: position ids (t, h, w) per token (``rope_index``, the original's ``get_rope_index``), the
rotary frequencies split into ``mrope_section`` chunks taken from t, h and w.

Packed inputs (numpy, built by ``pack_vision`` / ``pack_text``; padding: image_ids = -1, doc = -1):
  vision: ``patches`` (Bv, P, C*T*p*p), ``pos_hw`` (Bv, P, 2), ``image_ids`` (Bv, P), ``window_ids`` (Bv, P);
          P is a multiple of 4 and every image starts at a multiple of 4 (images are whole merge units).
  text:   ``input_ids`` (B, L), ``positions`` (3, B, L), ``doc`` (B, L) sample id within the row
          (causal attention within a sample), ``image_index`` (B, L): the index of the merged vision
          token (flattened over (Bv, P/4)) that replaces this ``<|image_pad|>`` token, -1 for others.
Images are single frames (grid_t = 1; the processor repeats the frame to the temporal patch).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sgt_jax.batch import CAUSAL, Segments
from sgt_jax.models.attention import dot_product_attention
from sgt_jax.models.layers import Dense, Embed, RMSNorm, apply_rope, remat
from sgt_jax.models.omnigen2_config import validate_qwen25_vl
from sgt_jax.models.qwen2_mot import DecoderLayer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


# ------------------------------------------------------------------------------------------------
# Host-side preprocessing (numpy)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The processor's target size: both sides multiples of ``factor``, area within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {height}x{width}: aspect ratio above 200 is not supported")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def preprocess_image(image, vcfg, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    """An RGB image (PIL image or uint8 (H, W, 3) array) -> (patches (N, C*T*p*p) float32,
    grid (1, H/p, W/p)): bicubic resize to ``smart_resize``, rescale to [0, 1], CLIP
    normalisation, the frame repeated to the temporal patch, patches in merge-unit-major order."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    img = img.convert("RGB")
    p, m, t = vcfg.patch_size, vcfg.spatial_merge_size, vcfg.temporal_patch_size
    h, w = smart_resize(img.height, img.width, p * m, min_pixels, max_pixels)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), resample=Image.BICUBIC)
    x = np.asarray(img, np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)
    return patchify(x.transpose(2, 0, 1), p, m, t)


def patchify(chw, patch: int, merge: int, temporal: int):
    """(C, H, W) normalised frame -> (H/p * W/p, C*T*p*p) in the processor's order."""
    c, h, w = chw.shape
    if h % (patch * merge) or w % (patch * merge):
        raise ValueError(f"image {h}x{w} is not a multiple of patch*merge={patch * merge}")
    gh, gw = h // patch, w // patch
    x = np.broadcast_to(chw[None], (temporal, c, h, w))
    x = x.reshape(temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(2, 5, 3, 6, 1, 0, 4, 7)        # (gh/m, gw/m, m, m, C, T, p, p)
    return np.ascontiguousarray(x.reshape(gh * gw, c * temporal * patch * patch)), (1, gh, gw)


def vision_layout(grid, vcfg):
    """Per patch of one image (processor order): (h, w) rotary position and window id (unique
    within the image)."""
    t, gh, gw = (int(v) for v in grid)
    if t != 1:
        raise ValueError(f"grid {grid}: only single-frame images (grid_t=1) are supported")
    m = vcfg.spatial_merge_size
    ws = vcfg.window_size // m // vcfg.patch_size
    lh, lw = gh // m, gw // m
    r, c, dy, dx = np.meshgrid(np.arange(lh), np.arange(lw), np.arange(m), np.arange(m), indexing="ij")
    pos = np.stack([r * m + dy, c * m + dx], -1).reshape(-1, 2)
    win = ((r // ws) * (-(-lw // ws)) + c // ws).reshape(-1)
    return pos.astype(np.int32), win.astype(np.int32)


def pack_vision(rows, vcfg, num_patches: int):
    """``rows``: per packed row a list of (patches, grid). -> dict of (Bv, P, ...) arrays."""
    if num_patches % (vcfg.spatial_merge_size ** 2):
        raise ValueError(f"num_patches={num_patches} must be a multiple of spatial_merge_size**2")
    feat = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    b = len(rows)
    out = dict(patches=np.zeros((b, num_patches, feat), np.float32),
               pos_hw=np.zeros((b, num_patches, 2), np.int32),
               image_ids=np.full((b, num_patches), -1, np.int32),
               window_ids=np.full((b, num_patches), -1, np.int32))
    for i, images in enumerate(rows):
        at, win0 = 0, 0
        for j, (patches, grid) in enumerate(images):
            n = len(patches)
            if at + n > num_patches:
                raise ValueError(f"row {i}: the images' {at + n} patches do not fit in num_patches={num_patches}")
            pos, win = vision_layout(grid, vcfg)
            if len(pos) != n:
                raise ValueError(f"row {i} image {j}: {n} patches but grid {tuple(grid)} has {len(pos)}")
            out["patches"][i, at:at + n] = patches
            out["pos_hw"][i, at:at + n] = pos
            out["image_ids"][i, at:at + n] = j
            out["window_ids"][i, at:at + n] = win + win0
            at, win0 = at + n, win0 + int(win.max()) + 1
    return out


def rope_index(input_ids, grids, cfg):
    """M-RoPE positions (3, L) of one sample, as the original's ``get_rope_index``: text tokens
    count up on all three axes; the merged tokens of an image (a run of ``image_token_id``) take
    (t, h, w) = start + (0, row, col), and the text after it resumes at start + max(rows, cols)."""
    ids = np.asarray(input_ids)
    m = cfg.vision.spatial_merge_size
    is_img = ids == cfg.llm.image_token_id
    pos = np.zeros((3, len(ids)), np.int64)
    cur, i, k = 0, 0, 0
    while i < len(ids):
        j = i
        while j < len(ids) and is_img[j] == is_img[i]:
            j += 1
        if not is_img[i]:
            pos[:, i:j] = cur + np.arange(j - i)
            cur += j - i
        else:
            if k >= len(grids):
                raise ValueError(f"more image-token runs than the {len(grids)} images given")
            _, gh, gw = (int(v) for v in grids[k])
            lh, lw = gh // m, gw // m
            if j - i != lh * lw:
                raise ValueError(f"image {k}: {j - i} <|image_pad|> tokens, but its grid {tuple(grids[k])} "
                                 f"merges to {lh * lw}")
            r, c = np.meshgrid(np.arange(lh), np.arange(lw), indexing="ij")
            pos[0, i:j] = cur
            pos[1, i:j] = cur + r.reshape(-1)
            pos[2, i:j] = cur + c.reshape(-1)
            cur += max(lh, lw)
            k += 1
        i = j
    if k != len(grids):
        raise ValueError(f"{len(grids)} images given but {k} image-token runs found")
    return pos


def pack_text(rows, cfg, length: int, vision_offsets=None):
    """``rows``: per packed row a list of samples (input_ids, grids). ``vision_offsets``: per row,
    per sample, the flat index of the sample's first merged vision token (default: the samples'
    images in order, one vision row per text row, each vision row P/4 merged tokens --
    pass explicitly when the vision rows are laid out otherwise). -> dict of (B, L) / (3, B, L)."""
    b = len(rows)
    out = dict(input_ids=np.zeros((b, length), np.int32), positions=np.zeros((3, b, length), np.int32),
               doc=np.full((b, length), -1, np.int32), image_index=np.full((b, length), -1, np.int32))
    for i, samples in enumerate(rows):
        at = 0
        for s, (ids, grids) in enumerate(samples):
            ids = np.asarray(ids, np.int32)
            n = len(ids)
            if at + n > length:
                raise ValueError(f"row {i}: {at + n} tokens do not fit in length={length}")
            out["input_ids"][i, at:at + n] = ids
            out["positions"][:, i, at:at + n] = rope_index(ids, grids, cfg)
            out["doc"][i, at:at + n] = s
            img = ids == cfg.llm.image_token_id
            if vision_offsets is not None:
                out["image_index"][i, at:at + n][img] = vision_offsets[i][s] + np.arange(int(img.sum()))
            at += n
    return out


# ------------------------------------------------------------------------------------------------
# Rotary tables


def vision_cos_sin(pos_hw: jax.Array, head_dim: int, theta: float):
    """2-D rotary of the vision tower: head_dim/4 frequencies on h, then on w, the pair repeated
    (fp32). pos_hw (B, P, 2) -> cos, sin (B, P, head_dim)."""
    half = head_dim // 2
    inv = 1.0 / (theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
    f = (pos_hw.astype(jnp.float32)[..., None] * inv).reshape(pos_hw.shape[:-1] + (half,))
    emb = jnp.concatenate([f, f], -1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float, section, dtype):
    """M-RoPE: positions (3, B, L) -> cos, sin (B, L, head_dim); frequency j takes its angle
    from axis t, h or w by the ``section`` split of the head_dim/2 frequencies."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    f = positions.astype(jnp.float32)[..., None] * inv            # (3, B, L, hd/2)
    axis = np.repeat(np.arange(3), np.asarray(section))
    f = jnp.where(axis == 0, f[0], jnp.where(axis == 1, f[1], f[2]))
    emb = jnp.concatenate([f, f], -1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


# ------------------------------------------------------------------------------------------------
# Modules


class VisionBlock(nnx.Module):
    """``Qwen2_5_VLVisionBlock``: RMSNorm, fused qkv attention with 2-D rotary, biased SwiGLU."""

    def __init__(self, v, *, rngs: nnx.Rngs, dtype):
        d, m = v.hidden_size, v.intermediate_size
        self.nh, self.hd = v.num_heads, d // v.num_heads
        self.norm1 = RMSNorm(d, v.rms_norm_eps, ("norm",), rngs=rngs)
        self.qkv = Dense(d, 3 * d, ("embed", "heads"), use_bias=True, rngs=rngs, dtype=dtype)
        self.proj = Dense(d, d, ("heads", "embed"), use_bias=True, rngs=rngs, dtype=dtype)
        self.norm2 = RMSNorm(d, v.rms_norm_eps, ("norm",), rngs=rngs)
        self.gate_proj = Dense(d, m, ("embed", "mlp"), use_bias=True, rngs=rngs, dtype=dtype)
        self.up_proj = Dense(d, m, ("embed", "mlp"), use_bias=True, rngs=rngs, dtype=dtype)
        self.down_proj = Dense(m, d, ("mlp", "embed"), use_bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x, cos, sin, mask):
        b, l, d = x.shape
        qkv = checkpoint_name(self.qkv(self.norm1(x)), "query_proj").reshape(b, l, 3, self.nh, self.hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(v.dtype)   # rotary in fp32, as the original
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(v.dtype)
        o = checkpoint_name(dot_product_attention(q, k, v, mask), "context")
        x = x + checkpoint_name(self.proj(o.reshape(b, l, d)), "out_proj")
        h = self.norm2(x)
        g = checkpoint_name(self.gate_proj(h), "mlpwi_0")
        u = checkpoint_name(self.up_proj(h), "mlpwi_1")
        return x + checkpoint_name(self.down_proj(jax.nn.silu(g) * u), "mlpwo")


class VisionTower(nnx.Module):
    """``model.visual``: packed patches (Bv, P, C*T*p*p) -> merged tokens (Bv, P/4, llm width)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        v = cfg.vision
        d = v.hidden_size
        self.v = v
        self.unit = v.spatial_merge_size ** 2
        feat = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        self.patch_embed = Dense(feat, d, (None, "embed"), use_bias=False, rngs=rngs, dtype=dtype)

        @nnx.split_rngs(splits=v.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return VisionBlock(v, rngs=r, dtype=dtype)

        self.blocks = make_blocks(rngs)
        self.ln_q = RMSNorm(d, 1e-6, ("norm",), rngs=rngs)
        self.merger_fc1 = Dense(d * self.unit, d * self.unit, (None, "mlp"), use_bias=True, rngs=rngs, dtype=dtype)
        self.merger_fc2 = Dense(d * self.unit, v.out_hidden_size, ("mlp", "embed"), use_bias=True,
                                rngs=rngs, dtype=dtype)
        self.full = tuple(i in tuple(v.fullatt_block_indexes) for i in range(v.depth))   # static, per layer
        self.dtype = dtype

    def __call__(self, patches, pos_hw, image_ids, window_ids):
        valid = image_ids >= 0
        pair = valid[:, :, None] & valid[:, None, :]
        full_mask = pair & (image_ids[:, :, None] == image_ids[:, None, :])
        win_mask = full_mask & (window_ids[:, :, None] == window_ids[:, None, :])
        cos, sin = vision_cos_sin(pos_hw, self.v.hidden_size // self.v.num_heads, self.v.rope_theta)
        x = self.patch_embed(patches)
        graphdef, stacked = nnx.split(self.blocks)

        def body(h, xs):
            state, full = xs
            mask = jnp.where(full, full_mask, win_mask)
            return nnx.merge(graphdef, state)(h, cos, sin, mask), None

        body = remat(body, self.v.remat_policy, "vision.remat_policy")
        full = jnp.asarray(self.full)
        if self.v.scan_layers:
            x, _ = jax.lax.scan(body, x, (stacked, full))
        else:
            for i in range(self.v.depth):
                x, _ = body(x, (jax.tree.map(lambda a: a[i], stacked), full[i]))
        b, p, d = x.shape
        x = self.ln_q(x).reshape(b, p // self.unit, d * self.unit)
        x = self.merger_fc2(jax.nn.gelu(self.merger_fc1(x), approximate=False))
        return jnp.where(valid[:, ::self.unit, None], x, jnp.zeros((), x.dtype))


class TextModel(nnx.Module):
    """``model.language_model`` (+ ``lm_head``): Qwen2 layers under M-RoPE."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, rules=None):
        c = cfg.llm
        self.c = c
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), rngs=rngs, dtype=dtype)

        @nnx.split_rngs(splits=c.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r):
            return DecoderLayer(cfg, rngs=r, dtype=dtype, rules=rules)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, ("norm",), rngs=rngs)
        self.lm_head = None if c.tie_word_embeddings else Dense(
            c.hidden_size, c.vocab_size, ("embed", "vocab"), use_bias=False, rngs=rngs, dtype=dtype)
        self.dtype = dtype

    def __call__(self, x, positions, doc):
        """x (B, L, H) input embeddings -> final-normed hidden states (B, L, H)."""
        c = self.c
        b, l, _ = x.shape
        hd = c.hidden_size // c.num_heads
        cos, sin = mrope_cos_sin(positions, hd, c.rope_theta, tuple(c.mrope_section), self.dtype)
        order = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        seg = Segments(doc=doc, split=order, mode=jnp.full((b, l), CAUSAL, jnp.int32), order=order)
        graphdef, stacked = nnx.split(self.layers)

        def body(h, state):
            return nnx.merge(graphdef, state)(h, cos, sin, seg, 0), None

        body = remat(body, c.remat_policy, "llm.remat_policy")
        x = x.astype(self.dtype)
        if c.scan_layers:
            x, _ = jax.lax.scan(body, x, stacked)
        else:
            for i in range(c.num_layers):
                x, _ = body(x, jax.tree.map(lambda a: a[i], stacked))
        return self.norm(x)

    def head_kernel(self) -> jax.Array:
        """(H, vocab): ``lm_head`` or, tied, the embedding table transposed."""
        return self.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]

    def logits(self, h: jax.Array) -> jax.Array:
        return jnp.dot(h, self.head_kernel().astype(h.dtype), preferred_element_type=jnp.float32)


class Qwen25VL(nnx.Module):
    """``Qwen2_5_VLForConditionalGeneration``'s computation on packed rows."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, rules=None):
        validate_qwen25_vl(cfg)
        dtype = jnp.dtype(cfg.compute_dtype)
        self.cfg = cfg
        self.visual = VisionTower(cfg, rngs=rngs, dtype=dtype)
        self.language_model = TextModel(cfg, rngs=rngs, dtype=dtype, rules=rules)

    def embed(self, input_ids, image_index, vision_tokens):
        """Token embeddings with every ``<|image_pad|>`` replaced by its merged vision token."""
        x = self.language_model.embed_tokens(input_ids)
        flat = vision_tokens.reshape(-1, vision_tokens.shape[-1]).astype(x.dtype)
        img = jnp.take(flat, jnp.maximum(image_index, 0), axis=0)
        return jnp.where((image_index >= 0)[..., None], img, x)

    def __call__(self, vision: dict, text: dict) -> jax.Array:
        """Final hidden states (B, L, H) (OmniGen2 conditions its DiT on these)."""
        v = self.visual(vision["patches"], vision["pos_hw"], vision["image_ids"], vision["window_ids"])
        x = self.embed(text["input_ids"], text["image_index"], v)
        return self.language_model(x, text["positions"], text["doc"])

    def logits(self, h: jax.Array) -> jax.Array:
        return self.language_model.logits(h)


# ------------------------------------------------------------------------------------------------
# Torch <-> JAX weights (the released checkpoint's key names, transformers 4.x layout)

_VISION_BLOCK = (
    ("norm1.weight", ("norm1", "scale"), "copy"),
    ("norm2.weight", ("norm2", "scale"), "copy"),
    ("attn.qkv.weight", ("qkv", "kernel"), "linear"),
    ("attn.qkv.bias", ("qkv", "bias"), "copy"),
    ("attn.proj.weight", ("proj", "kernel"), "linear"),
    ("attn.proj.bias", ("proj", "bias"), "copy"),
    ("mlp.gate_proj.weight", ("gate_proj", "kernel"), "linear"),
    ("mlp.gate_proj.bias", ("gate_proj", "bias"), "copy"),
    ("mlp.up_proj.weight", ("up_proj", "kernel"), "linear"),
    ("mlp.up_proj.bias", ("up_proj", "bias"), "copy"),
    ("mlp.down_proj.weight", ("down_proj", "kernel"), "linear"),
    ("mlp.down_proj.bias", ("down_proj", "bias"), "copy"),
)
_TEXT_LAYER = (
    ("input_layernorm.weight", ("und", "input_layernorm", "scale"), "copy"),
    ("post_attention_layernorm.weight", ("und", "post_attention_layernorm", "scale"), "copy"),
    ("self_attn.q_proj.weight", ("und", "q_proj", "kernel"), "linear"),
    ("self_attn.q_proj.bias", ("und", "q_proj", "bias"), "copy"),
    ("self_attn.k_proj.weight", ("und", "k_proj", "kernel"), "linear"),
    ("self_attn.k_proj.bias", ("und", "k_proj", "bias"), "copy"),
    ("self_attn.v_proj.weight", ("und", "v_proj", "kernel"), "linear"),
    ("self_attn.v_proj.bias", ("und", "v_proj", "bias"), "copy"),
    ("self_attn.o_proj.weight", ("und", "o_proj", "kernel"), "linear"),
    ("mlp.gate_proj.weight", ("und", "gate_proj", "kernel"), "linear"),
    ("mlp.up_proj.weight", ("und", "up_proj", "kernel"), "linear"),
    ("mlp.down_proj.weight", ("und", "down_proj", "kernel"), "linear"),
)


def torch_key_table(cfg) -> list[tuple[str, tuple[str, ...], str, int | None]]:
    """Every key of a Qwen2.5-VL checkpoint -> (torch key, nnx state path, kind, layer index).

    kind "linear": torch (out, in) <-> kernel (in, out); "copy": same layout; "patch": the
    Conv3d weight (D, C, T, p, p) <-> kernel (C*T*p*p, D). A layer index j fills slice [j] of a
    stacked parameter. Names are the released checkpoint's (``visual.*``, ``model.*``,
    ``lm_head.weight`` unless the head is tied)."""
    table = [("visual.patch_embed.proj.weight", ("visual", "patch_embed", "kernel"), "patch", None)]
    for j in range(cfg.vision.depth):
        table += [(f"visual.blocks.{j}.{k}", ("visual", "blocks") + p, kind, j) for k, p, kind in _VISION_BLOCK]
    table += [
        ("visual.merger.ln_q.weight", ("visual", "ln_q", "scale"), "copy", None),
        ("visual.merger.mlp.0.weight", ("visual", "merger_fc1", "kernel"), "linear", None),
        ("visual.merger.mlp.0.bias", ("visual", "merger_fc1", "bias"), "copy", None),
        ("visual.merger.mlp.2.weight", ("visual", "merger_fc2", "kernel"), "linear", None),
        ("visual.merger.mlp.2.bias", ("visual", "merger_fc2", "bias"), "copy", None),
        ("model.embed_tokens.weight", ("language_model", "embed_tokens", "embedding"), "copy", None),
    ]
    for i in range(cfg.llm.num_layers):
        table += [(f"model.layers.{i}.{k}", ("language_model", "layers") + p, kind, i) for k, p, kind in _TEXT_LAYER]
    table.append(("model.norm.weight", ("language_model", "norm", "scale"), "copy", None))
    if not cfg.llm.tie_word_embeddings:
        table.append(("lm_head.weight", ("language_model", "lm_head", "kernel"), "linear", None))
    return table


def torch_to_jax(kind: str, w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if kind == "linear":
        return np.ascontiguousarray(w.T)
    if kind == "patch":
        return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
    return w


def jax_to_torch(kind: str, w: np.ndarray, torch_shape=None) -> np.ndarray:
    w = np.asarray(w)
    if kind == "linear":
        return np.ascontiguousarray(w.T)
    if kind == "patch":
        return np.ascontiguousarray(w.T.reshape(torch_shape))
    return w


def patch_torch_shape(cfg) -> tuple[int, ...]:
    v = cfg.vision
    return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
