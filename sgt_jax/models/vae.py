"""The FLUX.1 autoencoder BAGEL uses as its VAE (BAGEL ``modeling/autoencoder.py``), NHWC.

Images are (N, H, W, in_channels) in [-1, 1]; latents are (N, H/f, W/f, z_channels) with
f = 2 ** (len(ch_mult) - 1). Layout of the network (see reference/bagel.md section 1.7):

  Encoder: conv_in -> per level i: num_res_blocks ResnetBlocks (+ Downsample unless last level)
           -> mid (block_1, attn_1, block_2) -> GroupNorm, swish, conv_out -> 2*z (mean || logvar)
  Decoder: conv_in -> mid (block_1, attn_1, block_2) -> levels i = n-1 .. 0: num_res_blocks+1
           ResnetBlocks (+ Upsample unless level 0) -> GroupNorm, swish, conv_out -> out_ch

Module attributes mirror the FLUX state-dict names (``encoder.down[i].block[j].conv1`` is
``encoder.down.{i}.block.{j}.conv1``; ``decoder.up[i]`` is ``decoder.up.{i}`` -- the decoder
stores its levels by index and runs them in reverse). ``torch_key_table`` lists every parameter
as (FLUX key, nnx state path, conversion kind); sgt_jax/convert/keymap.py loads and exports
through it (``load_vae`` / ``export_vae``).

Conventions as in layers.py: fp32 parameters with logical axis names, cast to ``dtype`` at use;
GroupNorm statistics and the attention softmax in fp32. Conv kernels are HWIO
(kh, kw, in, out) -- PyTorch's (out, in, kh, kw) transposed. In bf16 compute the roundings are
BAGEL's under its train loop's CUDA bf16 autocast: a conv accumulates in fp32, adds its bias and
rounds once; GroupNorm returns fp32, swish runs on it and the next conv rounds its input.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.models.config import validate
from sgt_jax.models.layers import ones_init, param, zeros_init

CONV_NAMES = ("conv_h", "conv_w", "conv_in", "conv_out")
# torch.nn.Conv2d's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = kh*kw*in (HWIO axes).
_torch_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_DIMS = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The AE hyper-parameters (hashable; ``cfg.vae`` of a model config converted)."""
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    scale_factor: float
    shift_factor: float
    groupnorm_groups: int
    eps: float


def vae_config(cfg) -> VAEConfig:
    """A VAEConfig from a full model config (uses ``cfg.vae``), its ``vae`` part, or a VAEConfig.
    Raises ValueError on inconsistent values."""
    if isinstance(cfg, VAEConfig):
        c = cfg
    else:
        if "vae" in cfg:                      # a full model config: validate it as a whole
            validate(cfg)
            v = cfg.vae
        else:
            v = cfg
        c = VAEConfig(in_channels=int(v.in_channels), out_ch=int(v.out_ch), ch=int(v.ch),
                      ch_mult=tuple(int(m) for m in v.ch_mult), num_res_blocks=int(v.num_res_blocks),
                      z_channels=int(v.z_channels), scale_factor=float(v.scale_factor),
                      shift_factor=float(v.shift_factor), groupnorm_groups=int(v.groupnorm_groups),
                      eps=float(v.eps))
    for name in ("in_channels", "out_ch", "ch", "num_res_blocks", "z_channels", "groupnorm_groups"):
        if getattr(c, name) <= 0:
            raise ValueError(f"invalid vae config: vae.{name} must be > 0, got {getattr(c, name)}")
    if not c.ch_mult or any(m <= 0 for m in c.ch_mult):
        raise ValueError(f"invalid vae config: vae.ch_mult must be non-empty positive ints, got {c.ch_mult}")
    bad = [c.ch * m for m in c.ch_mult if (c.ch * m) % c.groupnorm_groups]
    if bad:
        raise ValueError(f"invalid vae config: vae.groupnorm_groups={c.groupnorm_groups} must divide "
                         f"every vae.ch*ch_mult (does not divide {bad})")
    if c.scale_factor == 0:
        raise ValueError("invalid vae config: vae.scale_factor must be non-zero")
    return c


# ------------------------------------------------------------------------------------------------
# Building blocks


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


class Conv(nnx.Module):
    """2-D convolution, NHWC input, HWIO kernel, with bias. ``padding`` is symmetric per side."""

    def __init__(self, cin: int, cout: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        k = kernel_size
        self.kernel = param(rngs, _torch_conv_init, (k, k, cin, cout), CONV_NAMES)
        self.bias = param(rngs, zeros_init, (cout,), CONV_NAMES[-1:])
        self.stride = stride
        self.padding = padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
            dimension_numbers=_DIMS, preferred_element_type=jnp.float32)
        return (y + self.bias[...]).astype(self.dtype)


def _sum_hw(v: jax.Array) -> jax.Array:
    """(n, h, w, c) -> (n, c) in fp32: over w, then over h.

    One reduction over all h*w values is lowered by XLA:CPU to one running fp32 sum per output,
    whose rounding error grows with h*w (and, with the zero borders of packed images, in one
    direction): 77x BAGEL's error on a 24x40 norm of the ``ae_wide_v1`` fixture (issue 12). Summing
    rows first keeps every running sum to <= max(h, w) terms, as accurate as PyTorch's cascaded
    sum. The barriers keep XLA from merging the two reductions back into one (it does without)."""
    rows = jax.lax.optimization_barrier(jnp.sum(v, axis=2))
    return jax.lax.optimization_barrier(jnp.sum(rows, axis=1))


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm(groups, C, eps, affine=True) on NHWC, in fp32 (biased var); returns fp32
    whatever x's dtype (the consumer -- swish, then a conv -- rounds once, as under CUDA autocast).

    Mean and centred variance from per-channel row-then-column sums (``_sum_hw``), then summed over
    the group's channels; y = x * a + b with a = scale * rsqrt(var + eps), b = bias - mean * a per
    (image, channel), as PyTorch's kernel applies it."""

    def __init__(self, channels: int, groups: int, eps: float, *, rngs: nnx.Rngs | None = None):
        assert channels % groups == 0, (channels, groups)
        self.scale = param(rngs, ones_init, (channels,), ("norm",))
        self.bias = param(rngs, zeros_init, (channels,), ("norm",))
        self.groups = groups
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        g = self.groups
        count = h * w * (c // g)
        x32 = x.astype(jnp.float32)

        def group_mean(v):               # (n, h, w, c) -> (n, 1, 1, c): the mean of v's group
            s = jnp.sum(_sum_hw(v).reshape(n, g, c // g), axis=-1) / count
            return jnp.repeat(s, c // g, axis=-1)[:, None, None, :]

        mean = group_mean(x32)
        var = group_mean(jnp.square(x32 - mean))
        a = self.scale[...] * jax.lax.rsqrt(var + self.eps)
        b = self.bias[...] - mean * a
        return x32 * a + b


class ResnetBlock(nnx.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1 x))))); 1x1 ``nin_shortcut`` on x iff in != out."""

    def __init__(self, cin: int, cout: int, c: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm1 = GroupNorm(cin, c.groupnorm_groups, c.eps, rngs=rngs)
        self.conv1 = Conv(cin, cout, 3, padding=1, rngs=rngs, dtype=dtype)
        self.norm2 = GroupNorm(cout, c.groupnorm_groups, c.eps, rngs=rngs)
        self.conv2 = Conv(cout, cout, 3, padding=1, rngs=rngs, dtype=dtype)
        self.nin_shortcut = Conv(cin, cout, 1, rngs=rngs, dtype=dtype) if cin != cout else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over the h*w positions (scale 1/sqrt(C)), residual."""

    def __init__(self, channels: int, c: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm = GroupNorm(channels, c.groupnorm_groups, c.eps, rngs=rngs)
        self.q = Conv(channels, channels, 1, rngs=rngs, dtype=dtype)
        self.k = Conv(channels, channels, 1, rngs=rngs, dtype=dtype)
        self.v = Conv(channels, channels, 1, rngs=rngs, dtype=dtype)
        self.proj_out = Conv(channels, channels, 1, rngs=rngs, dtype=dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        n, h, w, ch = x.shape
        hn = self.norm(x).astype(self.dtype)          # one rounding for q, k and v
        q = self.q(hn).reshape(n, h * w, ch)
        k = self.k(hn).reshape(n, h * w, ch)
        v = self.v(hn).reshape(n, h * w, ch)
        scores = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores * (1.0 / np.sqrt(ch)), axis=-1)
        out = jnp.einsum("nqk,nkc->nqc", probs.astype(self.dtype), v,
                         preferred_element_type=jnp.float32).astype(self.dtype)
        return x + self.proj_out(out.reshape(n, h, w, ch))


class Downsample(nnx.Module):
    """Zero-pad right 1 / bottom 1, then 3x3 conv, stride 2, no padding."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv = Conv(channels, channels, 3, stride=2, padding=0, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then 3x3 conv, padding 1."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv = Conv(channels, channels, 3, padding=1, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Level(nnx.Module):
    """One resolution level: ``block`` (list of ResnetBlocks) and an optional resampler, named
    ``downsample`` (encoder) or ``upsample`` (decoder) as in FLUX."""

    def __init__(self, blocks: Sequence[ResnetBlock], *, downsample: Downsample | None = None,
                 upsample: Upsample | None = None):
        self.block = nnx.List(blocks)
        self.downsample = downsample
        self.upsample = upsample

    def __call__(self, x: jax.Array) -> jax.Array:
        for blk in self.block:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Mid(nnx.Module):
    def __init__(self, channels: int, c: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.block_1 = ResnetBlock(channels, channels, c, rngs=rngs, dtype=dtype)
        self.attn_1 = AttnBlock(channels, c, rngs=rngs, dtype=dtype)
        self.block_2 = ResnetBlock(channels, channels, c, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x)))


# ------------------------------------------------------------------------------------------------
# Encoder / decoder


def _encoder_channels(c: VAEConfig) -> list[tuple[int, int]]:
    """(block_in, block_out) of each encoder level."""
    in_mult = (1,) + c.ch_mult
    return [(c.ch * in_mult[i], c.ch * c.ch_mult[i]) for i in range(len(c.ch_mult))]


def _decoder_channels(c: VAEConfig) -> list[tuple[int, int]]:
    """(block_in, block_out) of each decoder level, indexed by level i (run from n-1 to 0)."""
    n = len(c.ch_mult)
    out: list[tuple[int, int]] = [(0, 0)] * n
    block_in = c.ch * c.ch_mult[-1]
    for i in reversed(range(n)):
        block_out = c.ch * c.ch_mult[i]
        out[i] = (block_in, block_out)
        block_in = block_out
    return out


class Encoder(nnx.Module):
    def __init__(self, c: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        n = len(c.ch_mult)
        self.conv_in = Conv(c.in_channels, c.ch, 3, padding=1, rngs=rngs, dtype=dtype)
        levels = []
        for i, (block_in, block_out) in enumerate(_encoder_channels(c)):
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, c, rngs=rngs, dtype=dtype))
                block_in = block_out
            down = Downsample(block_in, rngs=rngs, dtype=dtype) if i != n - 1 else None
            levels.append(Level(blocks, downsample=down))
        self.down = nnx.List(levels)
        top = c.ch * c.ch_mult[-1]
        self.mid = Mid(top, c, rngs=rngs, dtype=dtype)
        self.norm_out = GroupNorm(top, c.groupnorm_groups, c.eps, rngs=rngs)
        self.conv_out = Conv(top, 2 * c.z_channels, 3, padding=1, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, c: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        top = c.ch * c.ch_mult[-1]
        self.conv_in = Conv(c.z_channels, top, 3, padding=1, rngs=rngs, dtype=dtype)
        self.mid = Mid(top, c, rngs=rngs, dtype=dtype)
        chans = _decoder_channels(c)
        levels: list[Level | None] = [None] * len(chans)
        for i in reversed(range(len(chans))):        # build in run order (as FLUX does)
            block_in, block_out = chans[i]
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, c, rngs=rngs, dtype=dtype))
                block_in = block_out
            up = Upsample(block_in, rngs=rngs, dtype=dtype) if i != 0 else None
            levels[i] = Level(blocks, upsample=up)
        self.up = nnx.List(levels)                   # up[i] == FLUX decoder.up.{i}
        bottom = c.ch * c.ch_mult[0]
        self.norm_out = GroupNorm(bottom, c.groupnorm_groups, c.eps, rngs=rngs)
        self.conv_out = Conv(bottom, c.out_ch, 3, padding=1, rngs=rngs, dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
        return self.conv_out(swish(self.norm_out(h)))


def latent_from_moments(moments: jax.Array, eps: jax.Array, scale: float, shift: float) -> jax.Array:
    """scale * (mean + exp(logvar/2) * eps - shift) in fp32; moments (..., 2z) = mean || logvar."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    if eps.shape != mean.shape:
        raise ValueError(f"eps has shape {tuple(eps.shape)}, expected the latent shape {tuple(mean.shape)}")
    sample = mean + jnp.exp(0.5 * logvar) * eps.astype(jnp.float32)
    return scale * (sample - shift)


class AutoEncoder(nnx.Module):
    """The FLUX AE. ``cfg``: a full model config (its ``vae`` part is used), ``cfg.vae`` or a
    VAEConfig. ``dtype``: compute dtype (parameters stay fp32)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        c = vae_config(cfg)
        self.config = c
        self.dtype = dtype
        self.encoder = Encoder(c, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(c, rngs=rngs, dtype=dtype)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode_moments(self, x: jax.Array) -> jax.Array:
        """x (N, H, W, in_channels) in [-1, 1] -> (N, h, w, 2*z) = mean || logvar, in ``dtype``."""
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(f"encode expects NHWC images (N, H, W, {self.config.in_channels}), "
                             f"got shape {tuple(x.shape)}")
        return self.encoder(x)

    def encode(self, x: jax.Array, *, key: jax.Array | None = None,
               eps: jax.Array | None = None) -> jax.Array:
        """Sampled, scaled latent (N, h, w, z) in fp32: scale * (mean + exp(logvar/2) * eps - shift).
        Pass exactly one of ``eps`` (standard normal, shape (N, h, w, z)) or ``key`` (eps drawn
        with jax.random.normal)."""
        if (key is None) == (eps is None):
            raise ValueError("AutoEncoder.encode needs exactly one of key= (to draw eps) or eps= "
                             f"(given: key={'set' if key is not None else 'None'}, "
                             f"eps={'set' if eps is not None else 'None'})")
        moments = self.encode_moments(x)
        if eps is None:
            eps = jax.random.normal(key, moments.shape[:-1] + (self.config.z_channels,), jnp.float32)
        c = self.config
        return latent_from_moments(moments, eps, c.scale_factor, c.shift_factor)

    def decode(self, z: jax.Array) -> jax.Array:
        """z (N, h, w, z_channels) scaled latent -> image (N, h*f, w*f, out_ch) in ``dtype``."""
        if z.ndim != 4 or z.shape[-1] != self.config.z_channels:
            raise ValueError(f"decode expects NHWC latents (N, h, w, {self.config.z_channels}), "
                             f"got shape {tuple(z.shape)}")
        c = self.config
        z = z.astype(jnp.float32) / c.scale_factor + c.shift_factor
        return self.decoder(z.astype(self.dtype))


# ------------------------------------------------------------------------------------------------
# PyTorch (FLUX) state-dict mapping

KeyRow = tuple[str, tuple, str]     # (FLUX key, nnx state path, kind)


def _conv_keys(tk: str, path: tuple) -> Iterator[KeyRow]:
    yield f"{tk}.weight", path + ("kernel",), "conv"
    yield f"{tk}.bias", path + ("bias",), "copy"


def _norm_keys(tk: str, path: tuple) -> Iterator[KeyRow]:
    yield f"{tk}.weight", path + ("scale",), "copy"
    yield f"{tk}.bias", path + ("bias",), "copy"


def _resnet_keys(tk: str, path: tuple, cin: int, cout: int) -> Iterator[KeyRow]:
    yield from _norm_keys(f"{tk}.norm1", path + ("norm1",))
    yield from _conv_keys(f"{tk}.conv1", path + ("conv1",))
    yield from _norm_keys(f"{tk}.norm2", path + ("norm2",))
    yield from _conv_keys(f"{tk}.conv2", path + ("conv2",))
    if cin != cout:
        yield from _conv_keys(f"{tk}.nin_shortcut", path + ("nin_shortcut",))


def _mid_keys(tk: str, path: tuple, ch: int) -> Iterator[KeyRow]:
    yield from _resnet_keys(f"{tk}.block_1", path + ("block_1",), ch, ch)
    yield from _norm_keys(f"{tk}.attn_1.norm", path + ("attn_1", "norm"))
    for name in ("q", "k", "v", "proj_out"):
        yield from _conv_keys(f"{tk}.attn_1.{name}", path + ("attn_1", name))
    yield from _resnet_keys(f"{tk}.block_2", path + ("block_2",), ch, ch)


def torch_key_table(cfg) -> list[KeyRow]:
    """Every AE parameter as (FLUX state-dict key, path in ``nnx.state(model)``, kind);
    kind "conv": torch (out, in, kh, kw) <-> ours (kh, kw, in, out); "copy": same array."""
    c = vae_config(cfg)
    n = len(c.ch_mult)
    top = c.ch * c.ch_mult[-1]
    table: list[KeyRow] = []
    e, E = "encoder", ("encoder",)
    table += _conv_keys(f"{e}.conv_in", E + ("conv_in",))
    for i, (block_in, block_out) in enumerate(_encoder_channels(c)):
        for j in range(c.num_res_blocks):
            table += _resnet_keys(f"{e}.down.{i}.block.{j}", E + ("down", i, "block", j),
                                  block_in, block_out)
            block_in = block_out
        if i != n - 1:
            table += _conv_keys(f"{e}.down.{i}.downsample.conv", E + ("down", i, "downsample", "conv"))
    table += _mid_keys(f"{e}.mid", E + ("mid",), top)
    table += _norm_keys(f"{e}.norm_out", E + ("norm_out",))
    table += _conv_keys(f"{e}.conv_out", E + ("conv_out",))
    d, D = "decoder", ("decoder",)
    table += _conv_keys(f"{d}.conv_in", D + ("conv_in",))
    table += _mid_keys(f"{d}.mid", D + ("mid",), top)
    chans = _decoder_channels(c)
    for i in reversed(range(n)):
        block_in, block_out = chans[i]
        for j in range(c.num_res_blocks + 1):
            table += _resnet_keys(f"{d}.up.{i}.block.{j}", D + ("up", i, "block", j),
                                  block_in, block_out)
            block_in = block_out
        if i != 0:
            table += _conv_keys(f"{d}.up.{i}.upsample.conv", D + ("up", i, "upsample", "conv"))
    table += _norm_keys(f"{d}.norm_out", D + ("norm_out",))
    table += _conv_keys(f"{d}.conv_out", D + ("conv_out",))
    return table
