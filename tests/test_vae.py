"""FLUX autoencoder (sgt_jax/models/vae.py) against the BAGEL golden fixtures tiny_v1 and ae_wide_v1.

tiny_v1's AE has ch_mult (1, 1, 1, 1): one channel per GroupNorm group, no ``nin_shortcut``;
``test_matches_torch_functional_reference`` covers channel changes with a small PyTorch functional
re-statement of the FLUX forward on a (1, 2) config. ae_wide_v1 (ch_mult (1, 2, 2, 2), two channels
per group, nine padded non-square images, with BAGEL's float64 answer) checks the GroupNorm
statistics are as accurate as BAGEL's own (issue 12). Tolerances: check_golden.limits (a multiple
of the fixture's own fp32 error, see its README).
"""
from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sgt_jax.convert import check_golden as G
from sgt_jax.convert import keymap
from sgt_jax.models import vae as V
from sgt_jax.models.config import tiny

from golden import GOLDEN  # noqa: E402  (the shipped golden fixtures)

WIDE = Path(__file__).resolve().parent / "fixtures/bagel_golden/ae_wide_v1"


def nhwc(a: np.ndarray) -> jax.Array:
    return jnp.asarray(a.transpose(0, 2, 3, 1))


def build(cfg, tensors, dtype=jnp.float32) -> V.AutoEncoder:
    """Abstract construction (no random init) + load, as a real-size AE would be loaded."""
    model = nnx.eval_shape(lambda: V.AutoEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    keymap.load_vae(model, tensors)
    return model


@nnx.jit
def _golden_forward(m, x, eps, z, keys):
    """Everything the golden tests compare, in one compilation (compiles are the slow part)."""
    moments = m.encode_moments(x)
    latent = m.encode(x, eps=eps)
    decoded = m.decode(z)
    keyed = jax.vmap(lambda k: m.encode(x, key=k))(keys)   # encoder traced once, eps per key
    return moments, latent, decoded, keyed


_decode = nnx.jit(lambda m, z: m.decode(z))


@pytest.fixture(scope="module")
def golden():
    from safetensors.numpy import load_file
    return load_file(str(GOLDEN / "ae.safetensors")), load_file(str(GOLDEN / "batch.safetensors"))


@pytest.fixture(scope="module")
def tol():
    """{quantity: tolerance} for tiny_v1 (4x its self-check error, >= 2 fp32 ulps of the values)."""
    return {k: v[0] for k, v in G.limits(G.load_fixture(str(GOLDEN))).items()}


@pytest.fixture(scope="module")
def ae32(golden):
    return build(tiny().vae, golden[0])


@pytest.fixture(scope="module")
def out32(golden, ae32):
    _, b = golden
    keys = jnp.stack([jax.random.key(1), jax.random.key(1), jax.random.key(2)])
    return _golden_forward(ae32, nhwc(b["padded_images"]), nhwc(b["vae_eps"]),
                           nhwc(b["padded_latent"]), keys)


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ------------------------------------------------------------------------------------------------
# golden fixture


def test_key_table_covers_fixture_and_state(golden):
    ae, _ = golden
    table = V.torch_key_table(tiny())
    assert len(table) == len(ae) == 172
    assert {k for k, _, _ in table} == set(ae)
    assert len({p for _, p, _ in table}) == 172
    abstract = nnx.eval_shape(lambda: V.AutoEncoder(tiny(), rngs=nnx.Rngs(0)))
    paths = [p for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
    assert sorted(map(str, paths)) == sorted(str(p) for _, p, _ in table)
    assert {kind for _, _, kind in table} == {"conv", "copy"}
    assert ("encoder.down.0.block.0.conv1.weight", ("encoder", "down", 0, "block", 0, "conv1", "kernel"),
            "conv") in table
    # fp32 masters with logical axis names
    k = abstract.decoder.up[3].upsample.conv.kernel
    assert k.get_value().dtype == jnp.float32 and k.out_sharding == V.CONV_NAMES
    assert abstract.encoder.norm_out.scale.out_sharding == ("norm",)


def test_encode_moments_matches_golden(golden, out32, tol):
    _, b = golden
    mom = out32[0]
    assert mom.shape == (7, 4, 6, 8)
    err = maxdiff(mom, b["vae_moments"].transpose(0, 2, 3, 1))
    print(f"moments max|diff| {err:.3e} (tol {tol['vae_moments']:.1e})")
    assert err <= tol["vae_moments"] <= 1e-5


def test_encode_with_eps_matches_golden(golden, out32, tol):
    _, b = golden
    lat = out32[1]
    assert lat.dtype == jnp.float32 and lat.shape == (7, 4, 6, 4)
    err = maxdiff(lat, b["padded_latent"].transpose(0, 2, 3, 1))
    print(f"latent max|diff| {err:.3e} (tol {tol['padded_latent']:.1e})")
    assert err <= tol["padded_latent"] <= 1e-5


def test_decode_matches_golden(golden, out32, tol):
    _, b = golden
    dec = out32[2]
    assert dec.shape == (7, 32, 48, 3)
    err = maxdiff(dec, b["decoded"].transpose(0, 2, 3, 1))
    print(f"decoded max|diff| {err:.3e} (tol {tol['decoded']:.1e})")
    assert err <= tol["decoded"] <= 1e-5


def test_export_round_trip_is_bit_exact(golden, ae32):
    ae, _ = golden
    out = keymap.export_vae(ae32)
    assert sorted(out) == sorted(ae)
    for k, v in ae.items():
        assert out[k].dtype == v.dtype == np.float32, k
        assert out[k].shape == v.shape, k
        assert np.array_equal(out[k], v), k


def test_load_reports_every_problem(golden):
    ae, _ = golden
    bad = dict(ae)
    del bad["decoder.mid.attn_1.q.bias"]
    bad["encoder.mid.attn_2.q.weight"] = np.zeros((32, 32, 1, 1), np.float32)
    bad["encoder.conv_in.weight"] = np.zeros((32, 3, 1, 1), np.float32)
    bad["decoder.norm_out.bias"] = np.zeros((16,), np.float32)
    model = nnx.eval_shape(lambda: V.AutoEncoder(tiny(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError) as exc:
        keymap.load_vae(model, bad)
    msg = str(exc.value)
    for name in ["decoder.mid.attn_1.q.bias", "encoder.mid.attn_2.q.weight",
                 "encoder.conv_in.weight", "decoder.norm_out.bias"]:
        assert name in msg, (name, msg)
    assert "missing" in msg and "unexpected" in msg and "shape" in msg
    assert "(32, 3, 3, 3)" in msg  # the expected torch shape of conv_in.weight
    # nothing was assigned: the model is still abstract
    assert isinstance(model.encoder.conv_in.kernel.get_value(), jax.ShapeDtypeStruct)


def test_encode_key_is_deterministic(out32):
    a, a2, c = out32[3]
    assert a.shape == (7, 4, 6, 4)
    assert np.array_equal(np.asarray(a), np.asarray(a2))
    assert maxdiff(a, c) > 1e-3


def test_bf16_decode_close_to_fp32(golden, out32):
    ae, b = golden
    ae16 = build(tiny().vae, ae, dtype=jnp.bfloat16)
    d16 = _decode(ae16, nhwc(b["padded_latent"]))
    d32 = out32[2]
    assert d16.dtype == jnp.bfloat16
    err = maxdiff(d16, d32)
    print(f"bf16 decode max|diff| {err:.3e} (max|decoded| {float(jnp.max(jnp.abs(d32))):.3f})")
    assert err <= 5e-2
    assert ae16.encoder.conv_in.kernel.get_value().dtype == jnp.float32  # fp32 masters


def test_bf16_encode_close_to_golden(golden):
    """The trainer encodes in the compute dtype (BAGEL: bf16 autocast); bf16 moments stay close
    to the fp32 golden ones."""
    ae, b = golden
    ae16 = build(tiny().vae, ae, dtype=jnp.bfloat16)
    mom = ae16.encode_moments(nhwc(b["padded_images"]))
    want = b["vae_moments"].transpose(0, 2, 3, 1)
    assert mom.dtype == jnp.bfloat16
    err = maxdiff(mom, want)
    print(f"bf16 moments max|diff| {err:.3e} (max|moments| {float(np.max(np.abs(want))):.3f})")
    assert err <= 5e-2 * float(np.max(np.abs(want)))


def test_encode_argument_errors():
    model = nnx.eval_shape(lambda: V.AutoEncoder(tiny(), rngs=nnx.Rngs(0)))
    x = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(ValueError, match="exactly one of key"):
        model.encode(x)
    with pytest.raises(ValueError, match="exactly one of key"):
        model.encode(x, key=jax.random.key(0), eps=jnp.zeros((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="NHWC"):
        model.encode_moments(jnp.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match="NHWC"):
        model.decode(jnp.zeros((1, 4, 2, 2)))


# ------------------------------------------------------------------------------------------------
# ae_wide_v1: GroupNorm statistics as accurate as BAGEL's (issue 12)


def _single_reduction_groupnorm(self, x):
    """The GroupNorm before issue 12: one reduction over (h, w, channels of the group)."""
    n, h, w, c = x.shape
    x32 = x.astype(jnp.float32).reshape(n, h, w, self.groups, c // self.groups)
    mean = jnp.mean(x32, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 4), keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(n, h, w, c)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


@pytest.fixture(scope="module")
def wide():
    fx = G.load_fixture(str(WIDE))
    return fx, G.limits(fx)


def test_wide_fixture_is_what_its_readme_says(wide):
    fx, _ = wide
    meta, b = fx["meta"], fx["batch"]
    sizes = [tuple(s) for s in b["image_sizes"].tolist()]
    assert len(sizes) == len(set(sizes)) == 9 and all(h != w for h, w in sizes)
    imgs = b["padded_images"]
    for i, (h, w) in enumerate(sizes):              # zero-padded bottom/right, content inside
        assert not imgs[i, :, h:, :].any() and not imgs[i, :, :, w:].any()
        assert np.abs(imgs[i, :, :h, :w]).min() > 0 or np.abs(imgs[i, :, :h, :w]).mean() > 0.1
    assert meta["config"]["ae"]["ch_mult"] == [1, 2, 2, 2] and meta["config"]["ae"]["z_channels"] == 16
    assert fx["ae"]["encoder.conv_in.weight"].dtype == np.float32          # decoded from int8 codes
    assert b["vae_moments_f64"].dtype == np.float64
    assert max(v["channels_per_group"] for v in meta["self_check"]["groupnorm"].values()) == 2


def test_wide_matches_golden_and_float64(wide):
    """fp32 port vs BAGEL's fp32 outputs within 4x BAGEL's own fp32 error; vs the float64 answer
    within 2x BAGEL's (measured: 1.3x; the single-reduction GroupNorm gave 2.3x-7x)."""
    fx, lim = wide
    err = G.run(str(WIDE))
    assert set(err) == {"vae_moments", "padded_latent", "decoded", "vae_moments_vs_f64"}
    for k, v in err.items():
        tol, yard, _ = lim[k]
        print(f"{k:20s} {v:.2e} (BAGEL's own {yard:.2e}, tol {tol:.2e})")
        assert v <= tol, (k, v, tol)


def test_wide_bf16_as_accurate_as_bagel_autocast(wide):
    """bf16 compute (as the trainer encodes) vs the float64 answer within 2x BAGEL's own error under
    its train loop's bf16 autocast (fixture self_check; README)."""
    fx, _ = wide
    b = fx["batch"]
    model = build(G.config_from_meta(fx["meta"]), fx["ae"], dtype=jnp.bfloat16)
    mom = nnx.jit(lambda m, x: m.encode_moments(x))(model, nhwc(b["padded_images"]))
    assert mom.dtype == jnp.bfloat16
    err = float(np.abs(np.asarray(mom, np.float64).transpose(0, 3, 1, 2) - b["vae_moments_f64"]).max())
    own = fx["meta"]["self_check"]["vae_moments_bf16_autocast"]["bagel_bf16_vs_f64"]
    print(f"bf16 moments vs float64 {err:.2e} (BAGEL autocast {own:.2e}, max|moments| "
          f"{float(np.abs(b['vae_moments_f64']).max()):.2f})")
    assert err <= 2 * own


@pytest.mark.parametrize("shape", [(9, 24, 40, 64), (4, 64, 64, 128), (2, 128, 128, 256)])
def test_groupnorm_as_accurate_as_torch(shape):
    """On packed-canvas-like input (zero borders, content with a positive mean per channel), the
    compiled GroupNorm's fp32 error vs float64 is within 2x torch's fp32 group_norm (BAGEL's op);
    the single-reduction form was 10-370x (XLA:CPU, depending on the host device count)."""
    torch = pytest.importorskip("torch")
    n, h, w, c = shape
    rng = np.random.default_rng(0)
    x = np.zeros(shape, np.float32)
    for i in range(n):
        hh, ww = rng.integers(h // 3, h + 1), rng.integers(w // 3, w + 1)
        x[i, :hh, :ww] = rng.standard_normal((hh, ww, c)) + 2 + rng.uniform(0, 3, c)
    scale = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(c)).astype(np.float32)
    gn = V.GroupNorm(c, 32, 1e-6, rngs=nnx.Rngs(0))
    gn.scale[...], gn.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
    xt, st, bt = (torch.from_numpy(np.ascontiguousarray(a)) for a in (x.transpose(0, 3, 1, 2), scale, bias))
    ref = torch.nn.functional.group_norm(xt.double(), 32, st.double(), bt.double(), 1e-6).numpy()
    ours32 = torch.nn.functional.group_norm(xt, 32, st, bt, 1e-6).numpy()
    err = lambda y: float(np.abs(np.asarray(y, np.float64).transpose(0, 3, 1, 2) - ref).max())
    e_torch = float(np.abs(ours32.astype(np.float64) - ref).max())
    e_new = err(nnx.jit(lambda m, a: m(a))(gn, jnp.asarray(x)))
    e_old = err(nnx.jit(_single_reduction_groupnorm)(gn, jnp.asarray(x)))
    print(f"{shape}: torch {e_torch:.2e}, ours {e_new:.2e}, single reduction {e_old:.2e}")
    assert e_new <= 2 * e_torch
    assert e_old > 3 * e_torch          # the input does exercise the failure of issue 12


def _reduces(hlo: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(operand shape, reduced dims) of every reduce in an HLO module's text."""
    shapes = {m.group(1): tuple(int(d) for d in m.group(2).split(",") if d)
              for m in re.finditer(r"%([\w.\-]+) = [a-z0-9]+\[([\d,]*)\]", hlo)}
    return [(shapes[m.group(1)], tuple(int(d) for d in m.group(2).split(",")))
            for m in re.finditer(r" reduce\(%([\w.\-]+), %[\w.\-]+\), dimensions=\{([\d,]+)\}", hlo)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_groupnorm_sums_stay_short_under_jit(dtype):
    """In the compiled HLO no reduction adds more than max(h, w) values per output: XLA keeps
    the row and column sums apart (without the barriers it merges them into one over h*w)."""
    n, h, w, c = 2, 24, 40, 64
    gn = V.GroupNorm(c, 32, 1e-6, rngs=nnx.Rngs(0))
    hlo = nnx.jit(lambda m, x: m(x)).lower(gn, jnp.zeros((n, h, w, c), dtype)).compile().as_text()
    red = _reduces(hlo)
    assert red, hlo
    counts = [int(np.prod([shape[d] for d in dims])) for shape, dims in red]
    print(counts)
    assert max(counts) <= max(h, w), red
    assert counts.count(w) >= 2 and counts.count(h) >= 2          # mean and variance: rows, then columns
    old = nnx.jit(_single_reduction_groupnorm).lower(gn, jnp.zeros((n, h, w, c), dtype))
    assert max(int(np.prod([s[d] for d in dims])) for s, dims in _reduces(old.compile().as_text())) == h * w * 2


# ------------------------------------------------------------------------------------------------
# nin_shortcut / channel changes, against an independent PyTorch statement of the FLUX forward


def _small_cfg():
    return ml_collections.ConfigDict(dict(
        in_channels=3, out_ch=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=2,
        scale_factor=0.5, shift_factor=0.1, groupnorm_groups=4, eps=1e-6))


def _torch_ae(sd, cfg, x, z):
    """FLUX AE forward with torch.nn.functional from a state dict; returns (moments, decoded)."""
    import torch
    import torch.nn.functional as F

    def conv(h, name, stride=1, pad=1):
        return F.conv2d(h, sd[name + ".weight"], sd[name + ".bias"], stride=stride, padding=pad)

    def gn(h, name):
        return F.group_norm(h, cfg.groupnorm_groups, sd[name + ".weight"], sd[name + ".bias"], cfg.eps)

    def res(h, name):
        r = conv(F.silu(gn(h, name + ".norm1")), name + ".conv1")
        r = conv(F.silu(gn(r, name + ".norm2")), name + ".conv2")
        if name + ".nin_shortcut.weight" in sd:
            h = conv(h, name + ".nin_shortcut", pad=0)
        return h + r

    def attn(h, name):
        n, c, hh, ww = h.shape
        hn = gn(h, name + ".norm")
        q, k, v = (conv(hn, f"{name}.{p}", pad=0).reshape(n, c, hh * ww).transpose(1, 2)
                   for p in ("q", "k", "v"))
        o = torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, dim=-1) @ v
        return h + conv(o.transpose(1, 2).reshape(n, c, hh, ww), name + ".proj_out", pad=0)

    def mid(h, p):
        return res(attn(res(h, p + ".block_1"), p + ".attn_1"), p + ".block_2")

    n = len(cfg.ch_mult)
    h = conv(x, "encoder.conv_in")
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            h = res(h, f"encoder.down.{i}.block.{j}")
        if i != n - 1:
            h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", stride=2, pad=0)
    h = mid(h, "encoder.mid")
    moments = conv(F.silu(gn(h, "encoder.norm_out")), "encoder.conv_out")

    h = mid(conv(z / cfg.scale_factor + cfg.shift_factor, "decoder.conv_in"), "decoder.mid")
    for i in reversed(range(n)):
        for j in range(cfg.num_res_blocks + 1):
            h = res(h, f"decoder.up.{i}.block.{j}")
        if i != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{i}.upsample.conv")
    return moments, conv(F.silu(gn(h, "decoder.norm_out")), "decoder.conv_out")


def test_matches_torch_functional_reference():
    torch = pytest.importorskip("torch")
    cfg = _small_cfg()
    model = nnx.eval_shape(lambda: V.AutoEncoder(cfg, rngs=nnx.Rngs(0)))
    table = V.torch_key_table(cfg)
    paths = [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert sorted(map(str, paths)) == sorted(str(p) for _, p, _ in table)
    assert any("nin_shortcut" in k for k, _, _ in table)
    assert "decoder.up.1.upsample.conv.weight" in {k for k, _, _ in table}

    rng = np.random.default_rng(0)
    shapes = keymap.vae_torch_shapes(model)
    sd = {k: (rng.standard_normal(s) * (0.3 if len(s) == 4 else 1.0)).astype(np.float32)
          for k, s in shapes.items()}
    keymap.load_vae(model, sd)
    exported = keymap.export_vae(model)
    assert all(np.array_equal(exported[k], sd[k]) for k in sd)

    x = rng.uniform(-1, 1, (2, 3, 8, 12)).astype(np.float32)
    z = rng.standard_normal((2, 2, 4, 6)).astype(np.float32)
    with torch.no_grad():
        tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
        t_mom, t_dec = _torch_ae(tsd, cfg, torch.from_numpy(x), torch.from_numpy(z))
    mom, dec = nnx.jit(lambda m, x, z: (m.encode_moments(x), m.decode(z)))(model, nhwc(x), nhwc(z))
    scale = max(1.0, float(np.abs(t_mom.numpy()).max()), float(np.abs(t_dec.numpy()).max()))
    assert maxdiff(mom, t_mom.numpy().transpose(0, 2, 3, 1)) <= 1e-4 * scale
    assert maxdiff(dec, t_dec.numpy().transpose(0, 2, 3, 1)) <= 1e-4 * scale
