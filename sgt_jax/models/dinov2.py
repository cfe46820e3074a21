"""DINOv2 (HF ``Dinov2Model``) as a reconstruction-reward encoder, same interface as
``clip.CLIPVision``: ``encode(images uint8) -> (N, D) unit-norm`` (pooler_output: the CLS token
after the final ``layernorm``).

Forward (HF modeling_dinov2.py): x = [cls_token; conv(x) + b] + position_embeddings; per layer
x += lambda1 * o(attn(norm1 x)); x += lambda2 * fc2(gelu(fc1(norm2 x))); out = layernorm(x).
Position embeddings are not interpolated: images are resized (bicubic, as clip.preprocess) to the
checkpoint's own ``image_size`` (518 for the released DINOv2 models), with ImageNet mean / std.
The SwiGLU MLP of dinov2-giant is not ported (refused by ``from_hf_config``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sgt_jax.models.clip import (VitConfig, _stacked_layers, l2_normalize, patches_of, preprocess,
                                 run_layers)
from sgt_jax.models.layers import LayerNorm, normal_init, param, zeros_init

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def from_hf_config(d: dict) -> VitConfig:
    if d.get("use_swiglu_ffn"):
        raise ValueError("DINOv2 with use_swiglu_ffn (dinov2-giant) is not supported")
    return VitConfig(hidden_size=d["hidden_size"], intermediate_size=int(d["hidden_size"] * d.get("mlp_ratio", 4)),
                     num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                     image_size=d["image_size"], patch_size=d["patch_size"], projection_dim=0,
                     hidden_act=d.get("hidden_act", "gelu"), layer_norm_eps=d.get("layer_norm_eps", 1e-6),
                     mean=IMAGENET_MEAN, std=IMAGENET_STD)


class Dinov2(nnx.Module):
    def __init__(self, c: VitConfig, *, rngs: nnx.Rngs):
        d, p = c.hidden_size, c.patch_size
        self.config = c
        self.cls_token = param(rngs, normal_init(0.02), (1, 1, d), (None, None, "embed"))  # torch shapes
        self.patch_embedding = param(rngs, normal_init(0.02), (p, p, 3, d), (None, None, None, "embed"))
        self.patch_bias = param(rngs, zeros_init, (d,), ("embed",))
        self.position_embedding = param(rngs, normal_init(0.02), (1, c.grid ** 2 + 1, d), (None, None, "embed"))
        self.layers = _stacked_layers(c, rngs, layer_scale=True)
        self.layernorm = LayerNorm(d, c.layer_norm_eps, ("norm",), rngs=rngs)

    def hidden_states(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        x = patches_of(pixels.astype(jnp.float32), c.patch_size)
        x = x @ self.patch_embedding[...].reshape(-1, c.hidden_size) + self.patch_bias[...]
        cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, c.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...]
        return self.layernorm(run_layers(self.layers, x))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.hidden_states(pixels)[:, 0]

    def encode(self, images: jax.Array) -> jax.Array:
        c = self.config
        return l2_normalize(self(preprocess(images, c.image_size, c.mean, c.std)))


_LINEARS = (("attention.attention.query", "q_proj"), ("attention.attention.key", "k_proj"),
            ("attention.attention.value", "v_proj"), ("attention.output.dense", "out_proj"),
            ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"))
_NORMS = (("norm1", "layer_norm1"), ("norm2", "layer_norm2"))
# transformers >= 5 renames some modules in memory; on-disk checkpoints keep the names above
_RENAMES = ((".attention.q_proj.", ".attention.attention.query."),
            (".attention.k_proj.", ".attention.attention.key."),
            (".attention.v_proj.", ".attention.attention.value."),
            (".attention.o_proj.", ".attention.output.dense."))
OPTIONAL_KEYS = ("embeddings.mask_token",)       # used only for masked pre-training


def canonical_key(key: str) -> str:
    for a, b in _RENAMES:
        key = key.replace(a, b)
    return key


def torch_key_table(model: Dinov2) -> list[tuple[str, tuple, str, int | None]]:
    c = model.config
    t = [("embeddings.cls_token", ("cls_token",), "copy", None),
         ("embeddings.position_embeddings", ("position_embedding",), "copy", None),
         ("embeddings.patch_embeddings.projection.weight", ("patch_embedding",), "conv", None),
         ("embeddings.patch_embeddings.projection.bias", ("patch_bias",), "copy", None)]
    for j in range(c.num_layers):
        pre = f"encoder.layer.{j}."
        for key, name in _LINEARS:
            t.append((pre + key + ".weight", ("layers", name, "kernel"), "linear", j))
            t.append((pre + key + ".bias", ("layers", name, "bias"), "copy", j))
        for key, name in _NORMS:
            t.append((pre + key + ".weight", ("layers", name, "scale"), "copy", j))
            t.append((pre + key + ".bias", ("layers", name, "bias"), "copy", j))
        t.append((pre + "layer_scale1.lambda1", ("layers", "scale1"), "copy", j))
        t.append((pre + "layer_scale2.lambda1", ("layers", "scale2"), "copy", j))
    t += [("layernorm.weight", ("layernorm", "scale"), "copy", None),
          ("layernorm.bias", ("layernorm", "bias"), "copy", None)]
    return t
