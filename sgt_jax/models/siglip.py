"""BAGEL's SigLIP-NaViT vision encoder (``vit_model.vision_model``), packed-row form.

Input is a batch of packed rows: every row holds the patches of one or more images back to back,
plus padding. Per token:
  ``patches``    (B, P, 3*p*p) flattened per patch in (py, px, c) order (see ``patchify``);
  ``pos_ids``    (B, P) int, row * max_patches_per_side + col (see ``position_ids``);
  ``image_ids``  (B, P) int, the image the patch belongs to (unique within a row), -1 for padding.

Forward (BAGEL siglip_navit.py, with the ViT's last layer already dropped by the config):
  x = Linear(patches) + position_embedding[pos_ids]
  for each layer:  x += out_proj(attn(LN1 x))    # non-causal, only among patches of the same image
                                                 # (``vit.attention_impl``: "blocked" computes only
                                                 # the blocks of the block diagonal, see image_segments)
                   x += fc2(gelu_tanh(fc1(LN2 x)))
  out = post_layernorm(x)
Padding slots attend to nothing and their outputs are set to 0.

Layers are stored stacked (leading logical axis "layers") and run with ``jax.lax.scan``
(``cfg.vit.scan_layers``); ``cfg.vit.remat_policy`` selects the ``jax.checkpoint`` policy.

Weights convert to and from BAGEL / HF key names through one declarative table,
``torch_key_table``; loading and exporting go through it in sgt_jax/convert/keymap.py
(``load_vit`` / ``export_vit``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sgt_jax.models import attention as attn_lib
from sgt_jax.models.blocked_attention import Blocking
from sgt_jax.models.layers import Dense, LayerNorm, gelu_tanh, normal_init, param, remat


BAGEL_VIT_PREFIX = "vit_model.vision_model."
HF_VIT_PREFIX = "vision_model."

# ------------------------------------------------------------------------------------------------
# Input helpers (numpy or jax arrays)


def patchify(image_hwc, patch: int):
    """(H, W, C) image -> (H/p * W/p, p*p*C): patches in row-major order, each flattened as
    (py, px, c) -- BAGEL's data_utils.patchify (which takes CHW: ``"chpwq->hwpqc"``)."""
    h, w, c = image_hwc.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = image_hwc.reshape(h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 2, 1, 3, 4)                      # (hp, wp, py, px, c)
    return x.reshape((h // patch) * (w // patch), patch * patch * c)


def position_ids(h_patches: int, w_patches: int, max_per_side: int) -> np.ndarray:
    """Flattened position ids r * max_per_side + c of an h x w patch grid (row-major), int32 --
    BAGEL's get_flattened_position_ids_extrapolate."""
    if h_patches > max_per_side or w_patches > max_per_side:
        raise ValueError(f"patch grid {h_patches}x{w_patches} exceeds max_patches_per_side={max_per_side}")
    r, c = np.meshgrid(np.arange(h_patches), np.arange(w_patches), indexing="ij")
    return (r * max_per_side + c).reshape(-1).astype(np.int32)


def image_ids_from_lengths(lengths, total: int | None = None) -> np.ndarray:
    """Per-token image ids 0..n-1 for images of ``lengths`` patches packed back to back, padded
    with -1 up to ``total`` tokens (BAGEL's ``vit_token_seqlens`` -> ``image_ids``)."""
    lengths = [int(n) for n in np.asarray(lengths).reshape(-1)]
    ids = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)] or
                         [np.zeros(0, np.int32)])
    total = len(ids) if total is None else total
    if total < len(ids):
        raise ValueError(f"{len(ids)} patches do not fit in {total} slots")
    return np.concatenate([ids, np.full(total - len(ids), -1, np.int32)])


def image_segments(image_ids: jax.Array) -> attn_lib.Segments:
    """The ViT's block-diagonal mask as BAGEL mask vectors: one document and one FULL split per
    image; every padding slot (-1) its own document after the images (so a padding block is live
    only against itself; padding outputs are zeroed at the end anyway)."""
    b, p = image_ids.shape
    idx = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    doc = jnp.where(image_ids >= 0, image_ids.astype(jnp.int32), p + idx)
    return attn_lib.Segments(doc, doc, jnp.full_like(doc, attn_lib.FULL), idx)


def conv_patch_weight_to_linear(w):
    """Stock (HF) SigLIP Conv2d patch weight (hidden, C, p, p) -> BAGEL's Linear (hidden, p*p*C)
    (feature order (py, px, c), matching ``patchify``)."""
    w = np.asarray(w)
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1))


def linear_patch_weight_to_conv(w, patch: int, channels: int = 3):
    """Inverse of ``conv_patch_weight_to_linear``: (hidden, p*p*C) -> (hidden, C, p, p)."""
    w = np.asarray(w)
    return np.ascontiguousarray(w.reshape(w.shape[0], patch, patch, channels).transpose(0, 3, 1, 2))


# ------------------------------------------------------------------------------------------------
# Modules


class SiglipEncoderLayer(nnx.Module):
    """One pre-LN SigLIP encoder layer (attention within each image, then the GELU-tanh MLP)."""

    def __init__(self, vit, *, rngs: nnx.Rngs, dtype=jnp.float32, mesh_axes=((), None)):
        d, m = vit.hidden_size, vit.intermediate_size
        self.num_heads = vit.num_heads
        self.head_dim = d // vit.num_heads
        self.attention_blocking = Blocking.from_config(vit)
        self.attention_mesh_axes = mesh_axes
        self.layer_norm1 = LayerNorm(d, vit.layer_norm_eps, ("norm",), rngs=rngs)
        self.q_proj = Dense(d, d, ("embed", "heads"), use_bias=True, rngs=rngs, dtype=dtype)
        self.k_proj = Dense(d, d, ("embed", "heads"), use_bias=True, rngs=rngs, dtype=dtype)
        self.v_proj = Dense(d, d, ("embed", "heads"), use_bias=True, rngs=rngs, dtype=dtype)
        self.out_proj = Dense(d, d, ("heads", "embed"), use_bias=True, rngs=rngs, dtype=dtype)
        self.layer_norm2 = LayerNorm(d, vit.layer_norm_eps, ("norm",), rngs=rngs)
        self.fc1 = Dense(d, m, ("embed", "mlp"), use_bias=True, rngs=rngs, dtype=dtype)
        self.fc2 = Dense(m, d, ("mlp", "embed"), use_bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask) -> jax.Array:
        """``mask``: the (B, P, P) bool mask ("dense") or ``image_segments`` ("blocked")."""
        b, l, _ = x.shape
        nh, hd = self.num_heads, self.head_dim
        h = self.layer_norm1(x)
        q = checkpoint_name(self.q_proj(h), "query_proj").reshape(b, l, nh, hd)
        k = checkpoint_name(self.k_proj(h), "key_proj").reshape(b, l, nh, hd)
        v = checkpoint_name(self.v_proj(h), "value_proj").reshape(b, l, nh, hd)
        if not isinstance(mask, attn_lib.Segments):
            o = attn_lib.dot_product_attention(q, k, v, mask)
        else:
            o = attn_lib.ba.blocked_attention(q, k, v, mask, blocking=self.attention_blocking,
                                              batch_axes=self.attention_mesh_axes[0],
                                              kv_head_axis=self.attention_mesh_axes[1])
        o = checkpoint_name(o, "context")
        x = x + checkpoint_name(self.out_proj(o.reshape(b, l, nh * hd)), "out_proj")
        h = self.layer_norm2(x)
        h = gelu_tanh(checkpoint_name(self.fc1(h), "mlpwi"))
        return x + checkpoint_name(self.fc2(h), "mlpwo")


class SiglipNaViT(nnx.Module):
    """BAGEL's ``vit_model.vision_model``: (B, P, 3*p*p) packed patches -> (B, P, hidden)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, rules=None):
        """``rules``: the logical-axis rules table the blocked attention's shard_map takes its
        batch / head mesh axes from (``attention.mesh_axes_from_rules``); None: not split."""
        vit = cfg.vit
        if vit.hidden_size % vit.num_heads:
            raise ValueError(f"vit.num_heads={vit.num_heads} does not divide "
                             f"vit.hidden_size={vit.hidden_size}")
        d, p = vit.hidden_size, vit.patch_size
        self.hidden_size = d
        self.patch_size = p
        self.max_patches_per_side = vit.max_patches_per_side
        self.num_layers = vit.num_layers
        self.scan_layers = bool(vit.scan_layers)
        self.remat_policy = str(vit.remat_policy)
        self.attention_impl = str(vit.get("attention_impl", "auto"))   # resolved when traced
        remat(lambda: None, self.remat_policy, "vit.remat_policy")  # validate the policy name early
        self.dtype = dtype

        self.patch_embedding = Dense(3 * p * p, d, (None, "embed"), use_bias=True, rngs=rngs,
                                     dtype=dtype)
        self.position_embedding = param(rngs, normal_init(0.02), (vit.max_patches_per_side ** 2, d),
                                        ("vit_pos", "embed"))

        @nnx.split_rngs(splits=vit.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r):
            return SiglipEncoderLayer(vit, rngs=r, dtype=dtype, mesh_axes=attn_lib.mesh_axes_from_rules(rules))

        self.layers = make_layers(rngs)
        self.post_layernorm = LayerNorm(d, vit.layer_norm_eps, ("norm",), rngs=rngs)

    def __call__(self, patches: jax.Array, pos_ids: jax.Array, image_ids: jax.Array) -> jax.Array:
        valid = image_ids >= 0
        if attn_lib.resolve_vit_impl(self.attention_impl) == "dense":
            mask = (image_ids[:, :, None] == image_ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        else:
            mask = image_segments(image_ids)
        pos = jnp.where(valid, pos_ids, 0)
        x = self.patch_embedding(patches)
        x = x + jnp.take(self.position_embedding[...], pos, axis=0, mode="clip").astype(self.dtype)

        graphdef, stacked = nnx.split(self.layers)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, mask), None

        body = remat(body, self.remat_policy, "vit.remat_policy")
        if self.scan_layers:
            x, _ = jax.lax.scan(body, x, stacked)
        else:
            for i in range(self.num_layers):
                x, _ = body(x, jax.tree.map(lambda a: a[i], stacked))
        x = self.post_layernorm(x)
        return jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))


# ------------------------------------------------------------------------------------------------
# Torch <-> JAX weights

_LAYER_TABLE = (
    # (torch suffix under encoder.layers.{j}., path under ("layers",), kind)
    ("self_attn.q_proj.weight", ("q_proj", "kernel"), "linear"),
    ("self_attn.q_proj.bias", ("q_proj", "bias"), "copy"),
    ("self_attn.k_proj.weight", ("k_proj", "kernel"), "linear"),
    ("self_attn.k_proj.bias", ("k_proj", "bias"), "copy"),
    ("self_attn.v_proj.weight", ("v_proj", "kernel"), "linear"),
    ("self_attn.v_proj.bias", ("v_proj", "bias"), "copy"),
    ("self_attn.out_proj.weight", ("out_proj", "kernel"), "linear"),
    ("self_attn.out_proj.bias", ("out_proj", "bias"), "copy"),
    ("layer_norm1.weight", ("layer_norm1", "scale"), "copy"),
    ("layer_norm1.bias", ("layer_norm1", "bias"), "copy"),
    ("layer_norm2.weight", ("layer_norm2", "scale"), "copy"),
    ("layer_norm2.bias", ("layer_norm2", "bias"), "copy"),
    ("mlp.fc1.weight", ("fc1", "kernel"), "linear"),
    ("mlp.fc1.bias", ("fc1", "bias"), "copy"),
    ("mlp.fc2.weight", ("fc2", "kernel"), "linear"),
    ("mlp.fc2.bias", ("fc2", "bias"), "copy"),
)


def _num_layers(cfg) -> int:
    if isinstance(cfg, SiglipNaViT):
        return cfg.num_layers
    return (cfg.vit if "vit" in cfg else cfg).num_layers


def torch_key_table(cfg) -> list[tuple[str, tuple[str, ...], str, int | None]]:
    """Every key under ``vit_model.vision_model.`` (without the prefix) ->
    (torch key, nnx state path, kind, layer index or None).

    kind "linear": torch (out, in) weight <-> kernel (in, out); "copy": same layout. A layer index
    j means the entry fills slice [j] of the stacked (leading "layers" axis) parameter.
    ``cfg`` is the model config (or its ``vit`` part, or a SiglipNaViT)."""
    table: list[tuple[str, tuple[str, ...], str, int | None]] = [
        ("embeddings.patch_embedding.weight", ("patch_embedding", "kernel"), "linear", None),
        ("embeddings.patch_embedding.bias", ("patch_embedding", "bias"), "copy", None),
        ("embeddings.position_embedding.weight", ("position_embedding",), "copy", None),
    ]
    for j in range(_num_layers(cfg)):
        for suffix, path, kind in _LAYER_TABLE:
            table.append((f"encoder.layers.{j}.{suffix}", ("layers",) + path, kind, j))
    table += [
        ("post_layernorm.weight", ("post_layernorm", "scale"), "copy", None),
        ("post_layernorm.bias", ("post_layernorm", "bias"), "copy", None),
    ]
    return table
