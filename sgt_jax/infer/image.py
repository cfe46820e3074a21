"""Image generation on prefilled caches (BAGEL ``prepare_vae_latent`` + ``generate_image`` +
``_forward_flow`` + ``decode_image``).

The query block of a row is ``[<|vision_start|>, h*w latent tokens, <|vision_end|>]`` at the row's
current RoPE position (markers und, latents gen, bidirectional, seeing the whole cached context,
never written to it). Euler from t = 1 (x_1 ~ N(0, I), (h*w, p*p*C)) to 0 on BAGEL's schedule
``t_i = s*u_i / (1 + (s-1)*u_i)``, ``u = linspace(1, 0, num_timesteps)``, ``x <- x - v(x, t_i) *
(t_i - t_{i+1})`` for the first ``num_timesteps - 1`` points.

CFG: the cache holds ``n_ctx`` contexts per request stacked as rows ``[gen (B); cfg_text (B);
cfg_img (B)]``; one batched pass evaluates the block on all of them (each at its own RoPE
position). Inside ``cfg_interval[0] < t <= cfg_interval[1]`` (else no CFG)::

    v_txt = v_text_uncond + s_text (v - v_text_uncond)
    'global' / 'channel':  v' = v_img_uncond + s_img (v_txt - v_img_uncond)  (if s_img > 1, else v_txt)
                           v  = v' * clamp(|v| / (|v'| + 1e-8), renorm_min, 1)  (norm over the image /
                                                                               per token)
    'text_channel':        v_txt *= clamp(|v|_tok / (|v_txt|_tok + 1e-8), renorm_min, 1), then the
                           image CFG without renorm

Text CFG needs ``s_text > 1`` (else no CFG at all, as in BAGEL); ``n_ctx`` = 1 + (s_text > 1) +
(s_text > 1 and s_img > 1) contexts are built. 'global' is per image (BAGEL supports batch 1 only;
per row it is the same).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.infer.cache import KVCache, block_segments, run_block
from sgt_jax.batch import NOISE
from sgt_jax.models.config import patch_latent_dim, vae_downsample

RENORM_TYPES = ("global", "channel", "text_channel")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """BAGEL's ``interleave_inference`` defaults."""
    num_timesteps: int = 50
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.5
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0

    def __post_init__(self):
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type={self.cfg_renorm_type!r}: one of {RENORM_TYPES}")
        if int(self.num_timesteps) < 2:
            raise ValueError(f"num_timesteps={self.num_timesteps} must be >= 2")

    @property
    def num_contexts(self) -> int:
        """Contexts the CFG needs: gen, + cfg_text if s_text > 1, + cfg_img if also s_img > 1."""
        if self.cfg_text_scale <= 1.0:
            return 1
        return 3 if self.cfg_img_scale > 1.0 else 2


def schedule(num_timesteps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(t_i, dt_i) of the Euler steps, float32, as BAGEL computes them (torch.linspace: the first
    half from the start, the second half from the end)."""
    n = int(num_timesteps)
    step = np.float32(-1.0 / (n - 1))
    i = np.arange(n, dtype=np.float32)
    u = np.where(i < n // 2, np.float32(1.0) + step * i, np.float32(0.0) - step * (np.float32(n - 1) - i))
    u = u.astype(np.float32)
    s = np.float32(shift)
    t = (s * u / (np.float32(1.0) + (s - np.float32(1.0)) * u)).astype(np.float32)
    return t[:-1], (t[:-1] - t[1:]).astype(np.float32)


def _norm(x, axes):
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def cfg_velocity(v, v_text, v_img, s_text, s_img, renorm_type: str, renorm_min):
    """Combine the three velocities (B, N, d) with per-row applied scales ``s_text``, ``s_img``
    (B,) (1.0 outside the interval) and ``renorm_min`` (B,), as BAGEL's ``_forward_flow``."""
    st, si, rmin = (a[:, None, None] for a in (s_text, s_img, renorm_min))
    text_on, img_on = st > 1.0, si > 1.0
    v_txt = v_text + st * (v - v_text)
    if renorm_type == "text_channel":
        scale = jnp.clip(_norm(v, -1) / (_norm(v_txt, -1) + 1e-8), rmin, 1.0)
        v_txt = v_txt * scale
        out = jnp.where(img_on, v_img + si * (v_txt - v_img), v_txt)
    else:
        out = jnp.where(img_on, v_img + si * (v_txt - v_img), v_txt)
        axes = (1, 2) if renorm_type == "global" else -1
        out = out * jnp.clip(_norm(v, axes) / (_norm(out, axes) + 1e-8), rmin, 1.0)
    return jnp.where(text_on, out, v)


def latent_position_ids(cfg, h: int, w: int) -> np.ndarray:
    """r * max_latent_size + c over an h x w latent-token grid (row-major)."""
    m = cfg.bagel.max_latent_size
    if h > m or w > m:
        raise ValueError(f"a {h}x{w} latent grid exceeds bagel.max_latent_size={m} "
                         f"({m * vae_downsample(cfg) * cfg.bagel.latent_patch_size} px per side)")
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return (r * m + c).reshape(-1).astype(np.int32)


def velocity(model, cache: KVCache, x_t: jax.Array, t: jax.Array, latent_pos: jax.Array, *, n_ctx: int,
             marks: tuple[int, int] | None = None, query_chunk: int = 0) -> jax.Array:
    """The model's velocity for x_t (B, N, d) at time t on each of the ``n_ctx`` contexts of the
    cache (rows ``n_ctx * B``): (n_ctx, B, N, d) fp32. ``marks``: the <|vision_start|> /
    <|vision_end|> ids (default: the model config's)."""
    cfg = model.cfg
    lm = model.language_model
    bsz, n, _ = x_t.shape
    rows = n_ctx * bsz
    xt = jnp.tile(x_t, (n_ctx, 1, 1))
    tt = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (rows, n))
    gen = model.embed_latents(xt, tt, jnp.broadcast_to(latent_pos, (rows, n)))
    marks = jnp.asarray(marks or (cfg.llm.start_of_image, cfg.llm.end_of_image), jnp.int32)
    und = lm.embed_tokens(jnp.broadcast_to(marks, (rows, 2)))
    x = jnp.concatenate([und, gen.astype(und.dtype)], axis=1)
    seg = block_segments(jnp.full((rows, n + 2), NOISE, jnp.int32), jnp.ones((rows, n + 2), bool))
    pos = jnp.broadcast_to(cache.rope[:, None], (rows, n + 2))
    h, _, _ = run_block(lm, x, pos, seg, n, cache, query_chunk=query_chunk)
    v = model.llm2vae(h[:, 2:]).astype(jnp.float32)
    return v.reshape((n_ctx, bsz, n, v.shape[-1]))


def sample_latents(model, cache: KVCache, x1: jax.Array, latent_pos: jax.Array, ts: jax.Array,
                   dts: jax.Array, s_text: jax.Array, s_img: jax.Array, interval: jax.Array,
                   renorm_min: jax.Array, *, n_ctx: int, renorm_type: str, query_chunk: int = 0,
                   return_trajectory: bool = False, constrain=lambda a: a, marks=None):
    """Euler integration from ``x1`` (B, N, d) over (``ts``, ``dts``) with CFG; per-row scales
    ``s_text``, ``s_img``, ``renorm_min`` (B,), ``interval`` (2,). Returns the final latents (B, N,
    d) fp32, and with ``return_trajectory`` a dict of per-step ``x_t``, ``v`` (combined) and
    ``v_ctx`` (S, n_ctx, B, N, d). ``constrain``: a sharding constraint for the (B, N, d) carry
    (the Engine pins it to its row sharding: left free, XLA's CPU SPMD partitioner was seen to
    compute a wrong first step on a data 2 x fsdp 2 x tensor 2 mesh)."""
    one = jnp.ones_like(s_text)

    def step(x, td):
        t, dt = td
        on = (t > interval[0]) & (t <= interval[1])
        st = jnp.where(on, s_text, one)
        si = jnp.where(on, s_img, one)
        vs = velocity(model, cache, x, t, latent_pos, n_ctx=n_ctx, marks=marks, query_chunk=query_chunk)
        zero = jnp.zeros_like(vs[0])
        v = cfg_velocity(vs[0], vs[1] if n_ctx > 1 else zero, vs[2] if n_ctx > 2 else zero,
                         st if n_ctx > 1 else one, si if n_ctx > 2 else one, renorm_type, renorm_min)
        out = (x, v, vs) if return_trajectory else None
        return constrain(x - v * dt), out

    x, traj = jax.lax.scan(step, constrain(x1.astype(jnp.float32)), (ts, dts))
    if return_trajectory:
        return x, {"x_t": traj[0], "v": traj[1], "v_ctx": traj[2]}
    return x


def unpatchify(cfg, latents: jax.Array, h: int, w: int) -> jax.Array:
    """(B, h*w, p*p*C) tokens -> (B, h*p, w*p, C) NHWC latents (BAGEL ``decode_image``'s einsum)."""
    p = cfg.bagel.latent_patch_size
    c = patch_latent_dim(cfg) // (p * p)
    x = latents.reshape((latents.shape[0], h, w, p, p, c)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape((latents.shape[0], h * p, w * p, c))


def decode(vae, cfg, latents: jax.Array, h: int, w: int):
    """Latent tokens -> (float image (B, H, W, 3) in [-1, 1], uint8 image): BAGEL's
    ``((x * 0.5 + 0.5).clamp(0, 1) * 255).to(uint8)`` (truncation)."""
    img = vae.decode(unpatchify(cfg, latents, h, w)).astype(jnp.float32)
    u8 = (jnp.clip(img * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    return img, u8
