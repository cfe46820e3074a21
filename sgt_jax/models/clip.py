"""Image encoders for reconstruction rewards (UAE's Unified-GRPO scorer): CLIP's vision tower
(HF ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``; ViT-L/14 is UAE's reward model) and
the shared pre-LN ViT layer that ``dinov2.py`` reuses.

    enc = CLIPVision(ClipConfig(...), rngs=nnx.Rngs(0))    # weights: sgt_jax.rl.rewards.load_encoder
    emb = enc.encode(images_uint8)                          # (N, H, W, 3) uint8 -> (N, D), unit norm

``encode`` is UAE's ``ClipScore`` preprocessing (its ``clip_score.py``): pixels / 255, a bicubic
resize of the whole image to ``image_size`` x ``image_size`` (``F.interpolate(mode="bicubic",
align_corners=False)``: Keys' cubic with a = -0.75, edge-clamped taps, no antialiasing, no crop),
CLIP's mean / std, then ``get_image_features`` (the CLS token after ``post_layernorm``, through
``visual_projection`` when the checkpoint has one), L2-normalised.

Forward (HF modeling_clip.py): x = [class_embedding; patches @ W] + position_embedding;
x = pre_layrnorm(x); per layer x += out_proj(attn(LN1 x)); x += fc2(act(fc1(LN2 x)));
pooled = post_layernorm(x[:, 0]). Positions are not interpolated: the image is resized to the
checkpoint's own ``image_size``.

Weights come in torch layout through ``torch_key_table`` (HF names) and
``sgt_jax.convert.keymap.load_state``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.models.attention import dot_product_attention
from sgt_jax.models.layers import Dense, LayerNorm, normal_init, param

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class VitConfig:
    """A plain ViT image encoder (HF ``CLIPVisionConfig`` / ``Dinov2Config`` fields)."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768          # 0: no visual_projection (CLIPVisionModel)
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported; expected one of {sorted(ACTIVATIONS)}")


# openai/clip-vit-large-patch14 (UAE's reward model)
CLIP_VIT_L14 = VitConfig()


def from_hf_config(d: dict, **kw) -> VitConfig:
    """A ``VitConfig`` from an HF ``config.json`` dict (CLIP: its ``vision_config`` is used)."""
    v = d.get("vision_config", d)
    return VitConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                     num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                     image_size=v["image_size"], patch_size=v["patch_size"],
                     projection_dim=int(d.get("projection_dim", v.get("projection_dim", 0)) or 0),
                     hidden_act=v.get("hidden_act", "quick_gelu"),
                     layer_norm_eps=v.get("layer_norm_eps", 1e-5), **kw)


# ------------------------------------------------------------------------------------------------
# Preprocessing (on device, static shapes)


def _cubic(x, a=-0.75):
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's ``F.interpolate(mode="bicubic", align_corners=False)``
    along one axis: source x = (i + 0.5) * n_in / n_out - 0.5, taps floor(x) - 1 .. + 2 clamped to
    the edge, Keys' cubic with a = -0.75, no antialiasing."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(src)
    t = src - base
    m = np.zeros((n_out, n_in), np.float64)
    for k in range(-1, 3):
        idx = np.clip(base + k, 0, n_in - 1).astype(np.int64)
        np.add.at(m, (np.arange(n_out), idx), _cubic(t - k))
    return m.astype(np.float32)


def preprocess(images: jax.Array, size: int, mean, std) -> jax.Array:
    """(N, H, W, 3) uint8 (or float in [0, 255]) -> (N, size, size, 3) float32: / 255, bicubic
    resize to size x size, (x - mean) / std."""
    x = images.astype(jnp.float32) * (1.0 / 255.0)
    h, w = x.shape[1], x.shape[2]
    if (h, w) != (size, size):
        mh, mw = jnp.asarray(bicubic_matrix(h, size)), jnp.asarray(bicubic_matrix(w, size))
        hp = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=hp)
        x = jnp.einsum("pw,nowc->nopc", mw, x, precision=hp)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def patches_of(x: jax.Array, patch: int) -> jax.Array:
    """(N, H, W, C) -> (N, H/p * W/p, p*p*C), each patch flattened (py, px, c) -- the layout of a
    ``conv`` kernel (p, p, C, D) reshaped to (p*p*C, D)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize(x, dim=-1)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# ------------------------------------------------------------------------------------------------
# Modules


class VitLayer(nnx.Module):
    """Pre-LN ViT layer: x += s1 * out(attn(LN1 x)); x += s2 * fc2(act(fc1(LN2 x))) (s1, s2: DINOv2's
    LayerScale, absent for CLIP)."""

    def __init__(self, c: VitConfig, *, layer_scale: bool, rngs: nnx.Rngs):
        d, m = c.hidden_size, c.intermediate_size
        self.num_heads, self.act = c.num_heads, c.hidden_act
        self.layer_norm1 = LayerNorm(d, c.layer_norm_eps, ("norm",), rngs=rngs)
        self.q_proj = Dense(d, d, ("embed", "heads"), use_bias=True, rngs=rngs)
        self.k_proj = Dense(d, d, ("embed", "heads"), use_bias=True, rngs=rngs)
        self.v_proj = Dense(d, d, ("embed", "heads"), use_bias=True, rngs=rngs)
        self.out_proj = Dense(d, d, ("heads", "embed"), use_bias=True, rngs=rngs)
        self.layer_norm2 = LayerNorm(d, c.layer_norm_eps, ("norm",), rngs=rngs)
        self.fc1 = Dense(d, m, ("embed", "mlp"), use_bias=True, rngs=rngs)
        self.fc2 = Dense(m, d, ("mlp", "embed"), use_bias=True, rngs=rngs)
        if layer_scale:
            self.scale1 = param(rngs, nnx.initializers.ones, (d,), ("norm",))
            self.scale2 = param(rngs, nnx.initializers.ones, (d,), ("norm",))
        else:
            self.scale1 = self.scale2 = None

    def __call__(self, x: jax.Array) -> jax.Array:
        b, l, d = x.shape
        nh = self.num_heads
        h = self.layer_norm1(x)
        q, k, v = (p(h).reshape(b, l, nh, d // nh) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = self.out_proj(dot_product_attention(q, k, v, jnp.ones((b, l, l), bool)).reshape(b, l, d))
        x = x + (o if self.scale1 is None else o * self.scale1[...])
        h = self.fc2(ACTIVATIONS[self.act](self.fc1(self.layer_norm2(x))))
        return x + (h if self.scale2 is None else h * self.scale2[...])


def _stacked_layers(c: VitConfig, rngs: nnx.Rngs, layer_scale: bool):
    @nnx.split_rngs(splits=c.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return VitLayer(c, layer_scale=layer_scale, rngs=r)
    return make(rngs)


def run_layers(layers, x: jax.Array) -> jax.Array:
    graphdef, stacked = nnx.split(layers)

    def body(h, st):
        return nnx.merge(graphdef, st)(h), None

    return jax.lax.scan(body, x, stacked)[0]


class CLIPVision(nnx.Module):
    """HF ``CLIPVisionModel(WithProjection)``: (N, S, S, 3) normalised pixels -> pooled features."""

    def __init__(self, c: VitConfig, *, rngs: nnx.Rngs):
        d, p = c.hidden_size, c.patch_size
        self.config = c
        self.class_embedding = param(rngs, normal_init(0.02), (d,), ("embed",))
        self.patch_embedding = param(rngs, normal_init(0.02), (p, p, 3, d), (None, None, None, "embed"))
        self.position_embedding = param(rngs, normal_init(0.02), (c.grid ** 2 + 1, d), (None, "embed"))
        self.pre_layrnorm = LayerNorm(d, c.layer_norm_eps, ("norm",), rngs=rngs)
        self.layers = _stacked_layers(c, rngs, layer_scale=False)
        self.post_layernorm = LayerNorm(d, c.layer_norm_eps, ("norm",), rngs=rngs)
        self.visual_projection = (Dense(d, c.projection_dim, ("embed", None), use_bias=False, rngs=rngs)
                                  if c.projection_dim else None)

    def hidden_states(self, pixels: jax.Array) -> jax.Array:
        """(N, S, S, 3) float -> last_hidden_state (N, 1 + grid^2, D)."""
        c = self.config
        x = patches_of(pixels.astype(jnp.float32), c.patch_size)
        x = x @ self.patch_embedding[...].reshape(-1, c.hidden_size)
        cls = jnp.broadcast_to(self.class_embedding[...], (x.shape[0], 1, c.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...]
        return run_layers(self.layers, self.pre_layrnorm(x))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pooler_output (N, D), or image_embeds (N, projection_dim) with a projection."""
        pooled = self.post_layernorm(self.hidden_states(pixels)[:, 0])
        return pooled if self.visual_projection is None else self.visual_projection(pooled)

    def encode(self, images: jax.Array) -> jax.Array:
        """(N, H, W, 3) uint8 -> (N, D) unit-norm embeddings (UAE's ClipScore features)."""
        c = self.config
        return l2_normalize(self(preprocess(images, c.image_size, c.mean, c.std)))


_LAYER_TABLE = (
    ("self_attn.q_proj", ("q_proj",)), ("self_attn.k_proj", ("k_proj",)),
    ("self_attn.v_proj", ("v_proj",)), ("self_attn.out_proj", ("out_proj",)),
    ("mlp.fc1", ("fc1",)), ("mlp.fc2", ("fc2",)),
)
_LAYER_NORMS = (("layer_norm1", ("layer_norm1",)), ("layer_norm2", ("layer_norm2",)))


def torch_key_table(model: CLIPVision) -> list[tuple[str, tuple, str, int | None]]:
    """HF CLIP key -> (nnx state path, kind, layer) rows, keys as stored on disk
    (``vision_model.*``, ``visual_projection.weight``)."""
    c = model.config
    v = "vision_model."
    t = [(v + "embeddings.class_embedding", ("class_embedding",), "copy", None),
         (v + "embeddings.patch_embedding.weight", ("patch_embedding",), "conv", None),
         (v + "embeddings.position_embedding.weight", ("position_embedding",), "copy", None),
         (v + "pre_layrnorm.weight", ("pre_layrnorm", "scale"), "copy", None),
         (v + "pre_layrnorm.bias", ("pre_layrnorm", "bias"), "copy", None)]
    for j in range(c.num_layers):
        pre = f"{v}encoder.layers.{j}."
        for key, path in _LAYER_TABLE:
            t.append((pre + key + ".weight", ("layers",) + path + ("kernel",), "linear", j))
            t.append((pre + key + ".bias", ("layers",) + path + ("bias",), "copy", j))
        for key, path in _LAYER_NORMS:
            t.append((pre + key + ".weight", ("layers",) + path + ("scale",), "copy", j))
            t.append((pre + key + ".bias", ("layers",) + path + ("bias",), "copy", j))
    t += [(v + "post_layernorm.weight", ("post_layernorm", "scale"), "copy", None),
          (v + "post_layernorm.bias", ("post_layernorm", "bias"), "copy", None)]
    if c.projection_dim:
        t.append(("visual_projection.weight", ("visual_projection", "kernel"), "linear", None))
    return t


def canonical_key(key: str) -> str:
    """In-memory transformers names -> on-disk names (a CLIPVisionModel state dict without the
    ``vision_model.`` level; a full CLIPModel's keys are kept, its text tower is ignored)."""
    if key.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):
        return "vision_model." + key
    return key

