"""Reconstruction rewards: image encoders behind one interface and UAE's reward.

Every encoder is an nnx.Module with ``encode(images) -> (N, D)`` unit-norm embeddings from
(N, H, W, 3) uint8 images (any H, W; static per compile):

  ``clip``   ``models/clip.CLIPVision`` -- CLIP ViT-L/14 (UAE's reward model), the default;
  ``dinov2`` ``models/dinov2.Dinov2``;
  ``siglip`` BAGEL's own SigLIP-NaViT (``SiglipPooled`` below: mean of the ViT's output tokens,
             images resized to ``image_size``, mean / std 0.5 as BAGEL's ViT transform).

``reward(enc, x, x_hat)`` = cos(f(x), f(x_hat)) (UAE Sec. 2.1: R(x, x_hat) = cos(f_CLIP(x),
f_CLIP(x_hat))). ``load_encoder(kind, path)`` reads an HF safetensors checkpoint (a file or a
directory with ``config.json`` + ``model.safetensors`` / shards) through the converter's
``SafetensorsSource`` and ``keymap.load_state`` (missing / unexpected / mis-shaped keys listed
through ``keydiff`` before anything is assigned).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax import fileio
from sgt_jax.convert import keymap
from sgt_jax.convert.safetensors_io import SafetensorsSource
from sgt_jax.models import clip, dinov2, siglip

ENCODERS = ("clip", "dinov2", "siglip")


class SiglipPooled(nnx.Module):
    """BAGEL's SigLIP-NaViT as a reward encoder: mean-pooled output tokens of one image per row."""

    def __init__(self, model_cfg, image_size: int, *, rngs: nnx.Rngs):
        self.vit = siglip.SiglipNaViT(model_cfg, rngs=rngs)
        self.image_size = int(image_size)
        if self.image_size % self.vit.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch {self.vit.patch_size}")

    def encode(self, images: jax.Array) -> jax.Array:
        p, s = self.vit.patch_size, self.image_size
        x = clip.preprocess(images, s, (0.5,) * 3, (0.5,) * 3)
        patches = clip.patches_of(x, p)
        n, g = patches.shape[0], s // p
        pos = jnp.broadcast_to(jnp.asarray(siglip.position_ids(g, g, self.vit.max_patches_per_side)), (n, g * g))
        h = self.vit(patches, pos, jnp.zeros((n, g * g), jnp.int32))
        return clip.l2_normalize(jnp.mean(h.astype(jnp.float32), axis=1))


def reward(enc, images: jax.Array, recon: jax.Array) -> jax.Array:
    """cos(f(images), f(recon)) per image, (N,) float32."""
    e = enc.encode(jnp.concatenate([images, recon], axis=0))
    n = images.shape[0]
    return jnp.sum(e[:n] * e[n:], axis=-1)


def rewards_vs_reference(enc, ref_emb: jax.Array, recon: jax.Array) -> jax.Array:
    """cos(ref_emb, f(recon)) with the input's embedding computed once (rollouts: one input image,
    G reconstructions)."""
    return jnp.sum(ref_emb * enc.encode(recon), axis=-1)


def _table_entries(table):
    return [keymap.KeyEntry(k, tuple(p), kind, layer) for k, p, kind, layer in table]


def load_tensors(model, kind: str, tensors: dict, what: str = "reward encoder") -> None:
    """Assign an HF state dict (torch layout) to a ``CLIPVision`` / ``Dinov2`` / ``SiglipPooled``."""
    if kind == "clip":
        tensors = {clip.canonical_key(k): v for k, v in tensors.items()}
        tensors = {k: v for k, v in tensors.items()
                   if k.startswith("vision_model.") or k == "visual_projection.weight"}
        keymap.load_state(model, tensors, _table_entries(clip.torch_key_table(model)), what=what)
    elif kind == "dinov2":
        tensors = {dinov2.canonical_key(k): v for k, v in tensors.items()}
        keymap.load_state(model, tensors, _table_entries(dinov2.torch_key_table(model)),
                          ignore=dinov2.OPTIONAL_KEYS, what=what)
    elif kind == "siglip":
        keymap.load_vit(model.vit, tensors, prefix=siglip.HF_VIT_PREFIX)
    else:
        raise ValueError(f"unknown reward encoder {kind!r}; expected one of {ENCODERS}")


def _weights_file(path: str) -> str:
    if path.endswith((".safetensors", ".json")) and not path.endswith("config.json"):
        return path
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if fileio.exists(fileio.join(path, name)):
            return fileio.join(path, name)
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def encoder_config(kind: str, path: str):
    """The ``VitConfig`` of an HF checkpoint dir's ``config.json`` (clip / dinov2)."""
    cfg = fileio.read_json(fileio.join(path, "config.json"))
    if kind == "dinov2":
        return dinov2.from_hf_config(cfg)
    c = clip.from_hf_config(cfg)
    src = SafetensorsSource(_weights_file(path))
    if "visual_projection.weight" not in src:
        c = clip.VitConfig(**{**c.__dict__, "projection_dim": 0})
    return c


def load_encoder(kind: str, path: str, *, model_cfg=None, image_size: int = 224, init: bool = True):
    """An encoder built from an HF checkpoint directory (config.json + safetensors). ``siglip``
    takes the ViT shape from ``model_cfg`` (BAGEL's model config) instead of a config.json.
    ``init=False``: the module with its shapes only, weights not read (``nnx.eval_shape``)."""
    if kind not in ENCODERS:
        raise ValueError(f"unknown reward encoder {kind!r}; expected one of {ENCODERS}")
    if kind == "siglip":
        model = SiglipPooled(model_cfg, image_size, rngs=nnx.Rngs(0))
    else:
        c = encoder_config(kind, path)
        model = (clip.CLIPVision if kind == "clip" else dinov2.Dinov2)(c, rngs=nnx.Rngs(0))
    if init:
        src = SafetensorsSource(_weights_file(path))
        load_tensors(model, kind, {k: src.read(k) for k in src.keys()}, what=f"{kind} reward encoder {path}")
    return model


def random_encoder(kind: str, *, seed: int = 0, config: clip.VitConfig | None = None, model_cfg=None,
                   image_size: int = 224):
    """A randomly initialised encoder (tiny presets and tests: a fixed random ViT is a usable
    perceptual feature for synthetic scenes)."""
    if kind == "clip":
        return clip.CLIPVision(config or clip.CLIP_VIT_L14, rngs=nnx.Rngs(seed))
    if kind == "dinov2":
        return dinov2.Dinov2(config, rngs=nnx.Rngs(seed))
    if kind == "siglip":
        return SiglipPooled(model_cfg, image_size, rngs=nnx.Rngs(seed))
    raise ValueError(f"unknown reward encoder {kind!r}; expected one of {ENCODERS}")



def rescale_random(model, scale: float, *, seed: int = 0):
    """Redraw a random encoder's weights as N(0, scale^2) (norm scales 1 + N(0, scale^2), biases
    N(0, scale^2)): at the default 0.02 init a random ViT maps every image to nearly the same
    embedding (cosine ~ 1), useless as a reward; larger weights give discriminative random features."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        v = rng.normal(scale=scale, size=shape).astype(np.float32)
        if path[-1] == "scale" and "norm" in "/".join(map(str, path)):
            v = v + 1.0
        var.set_value(jnp.asarray(v))
    return model
