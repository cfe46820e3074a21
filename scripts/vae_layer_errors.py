#!/usr/bin/env python3
"""fp32 error of the port's VAE per GroupNorm, next to BAGEL's own, both against float64 BAGEL.

    python scripts/vae_layer_errors.py --bagel-src BAGEL_CHECKOUT \\
        [--fixture tests/fixtures/bagel_golden/ae_wide_v1] [--json OUT]
        [--before-issue-12] [--tap-convs] [--canvas 1024]

On the fixture's weights and images (scripts/make_vae_golden.py made them), BAGEL's
``modeling/autoencoder.py`` (imported from ``--bagel-src`` at run time) is run in fp32 and float64
and the port (sgt_jax/models/vae.py, compiled with jit) in fp32. For every GroupNorm it reports the
max |error| vs float64 of the GroupNorm's output

* in the network: the whole encoder on ``padded_images`` / decoder on ``padded_latent`` (error
  accumulated up to that layer), for the port and for BAGEL;
* alone: the layer on float64 BAGEL's own input to it rounded to fp32 (the statistics' error only).

and the ratio port / BAGEL. The target of issue 12 is a ratio <= 1.5 at every GroupNorm.

Experiments (the port's code patched for the run): ``--before-issue-12`` the VAE as it was: one
GroupNorm reduction over h, w and the group's channels, GroupNorm and conv outputs rounded to the
compute dtype before the bias / swish (the same in fp32); ``--tap-convs`` every conv as a sum of
kh*kw one-tap contractions (shows how much of the rest is XLA:CPU's convolution).

``--canvas N``: instead, the encoder moments of the fixture's AE on two non-square images
zero-padded onto an N x N canvas, port in bf16 compute (as the trainer encodes) and fp32,
BAGEL in fp32 and under its train loop's CUDA bf16 autocast (emulated on CPU, see
``make_vae_golden.CudaAutocastBf16``), all against BAGEL in float64.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import make_vae_golden as MG  # noqa: E402
from sgt_jax.convert import check_golden as G  # noqa: E402
from sgt_jax.convert import keymap  # noqa: E402
from sgt_jax.models import vae as V  # noqa: E402


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def nchw(a):
    return np.asarray(a, np.float64).transpose(0, 3, 1, 2)


def single_reduction_groupnorm(self, x):
    """The GroupNorm before issue 12: one reduction over (h, w, channels of the group)."""
    n, h, w, c = x.shape
    x32 = x.astype(jnp.float32).reshape(n, h, w, self.groups, c // self.groups)
    mean = jnp.mean(x32, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 4), keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(n, h, w, c)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def compute_dtype_conv(self, x):
    """The conv before issue 12: output in the compute dtype, bias added in it."""
    p = self.padding
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                     window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
                                     dimension_numbers=V._DIMS)
    return y + self.bias[...].astype(self.dtype)


def tap_conv(self, x):
    """Conv as sum over the kernel taps of (strided, shifted input) @ kernel[i, j]."""
    p, s = self.padding, self.stride
    k = self.kernel[...].astype(self.dtype)
    xp = jnp.pad(x.astype(self.dtype), ((0, 0), (p, p), (p, p), (0, 0)))
    oh, ow = (xp.shape[1] - k.shape[0]) // s + 1, (xp.shape[2] - k.shape[1]) // s + 1
    y = 0
    for i in range(k.shape[0]):
        for j in range(k.shape[1]):
            y = y + jnp.einsum("nhwc,co->nhwo", xp[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s], k[i, j])
    return y + self.bias[...].astype(self.dtype)


def port_groupnorm_outputs(model, fn, *args):
    """jit(fn)(model, *args) with the output of every GroupNorm returned too, by FLUX name."""
    orig = V.GroupNorm.__call__
    seen = {}

    def hooked(self, x):
        y = orig(self, x)
        seen[self] = y
        return y

    def traced(m, *a):
        seen.clear()
        out = fn(m, *a)
        names = {id(node): ".".join(map(str, path)) for path, node in nnx.iter_graph(m)}
        return out, {names[id(k)]: v for k, v in seen.items()}

    V.GroupNorm.__call__ = hooked
    try:
        out, gn = nnx.jit(traced)(model, *args)
    finally:
        V.GroupNorm.__call__ = orig
    return out, {k: nchw(v) for k, v in gn.items()}


def bagel_groupnorm_io(model, fn):
    """{name: (input, output)} of every nn.GroupNorm of a torch model while fn() runs."""
    io, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.GroupNorm):
            hooks.append(m.register_forward_hook(
                lambda _m, i, o, name=name: io.__setitem__(name, (i[0].detach(), o.detach()))))
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in hooks:
            h.remove()
    return io


def port_module(model, name):
    node = model
    for p in name.split("."):
        node = node[int(p)] if p.isdigit() else getattr(node, p)
    return node


def bagel_models(bagel_src: str, fx: dict):
    """BAGEL's AutoEncoder with the fixture's weights, in fp32 and float64."""
    mod = MG.load_bagel_autoencoder(bagel_src)
    c = fx["meta"]["config"]["ae"]
    ae32 = mod.AutoEncoder(mod.AutoEncoderParams(**{k: c[k] for k in MG.CONFIG})).eval()
    ae32.load_state_dict({k: torch.from_numpy(v) for k, v in fx["ae"].items()})
    return ae32, copy.deepcopy(ae32).double()


def measure(bagel_src: str, fixture: str) -> dict:
    fx = G.load_fixture(fixture)
    meta, t = fx["meta"], fx["batch"]
    sd = fx["ae"]
    ae32, ae64 = bagel_models(bagel_src, fx)
    x = torch.from_numpy(t["padded_images"])
    z = torch.from_numpy(t["padded_latent"])

    b32 = {**bagel_groupnorm_io(ae32, lambda: ae32.encoder(x)), **bagel_groupnorm_io(ae32, lambda: ae32.decode(z))}
    b64 = {**bagel_groupnorm_io(ae64, lambda: ae64.encoder(x.double())),
           **bagel_groupnorm_io(ae64, lambda: ae64.decode(z.double()))}

    cfg = G.config_from_meta(meta)
    port = nnx.eval_shape(lambda: V.AutoEncoder(cfg, rngs=nnx.Rngs(0)))
    keymap.load_vae(port, sd)
    mom, gn_enc = port_groupnorm_outputs(port, lambda m, a: m.encode_moments(a), nhwc(t["padded_images"]))
    dec, gn_dec = port_groupnorm_outputs(port, lambda m, a: m.decode(a), nhwc(t["padded_latent"]))
    gn_port = {**gn_enc, **gn_dec}
    # the same without the hook: returning the GroupNorm outputs must not change the result
    mom_plain = nchw(nnx.jit(lambda m, a: m.encode_moments(a))(port, nhwc(t["padded_images"])))
    assert np.array_equal(mom_plain, nchw(mom)), "returning GroupNorm outputs changed the encoder's result"

    alone = nnx.jit(lambda m, a: m(a))
    rows = []
    for name, (i64, o64) in b64.items():
        ref = o64.numpy()
        e_b = float(np.abs(b32[name][1].double().numpy() - ref).max())
        e_p = float(np.abs(gn_port[name] - ref).max())
        xin = i64.float()
        with torch.no_grad():
            a_b = float(np.abs(dict(ae32.named_modules())[name](xin).double().numpy() - ref).max())
        a_p = float(np.abs(nchw(alone(port_module(port, name), nhwc(xin.numpy()))) - ref).max())
        n, ch, h, w = ref.shape
        rows.append(dict(name=name, shape=[n, ch, h, w], values_per_group=ch // 32 * h * w,
                         max_abs=float(np.abs(ref).max()), net_port=e_p, net_bagel=e_b,
                         net_ratio=e_p / max(e_b, 1e-30), alone_port=a_p, alone_bagel=a_b,
                         alone_ratio=a_p / max(a_b, 1e-30)))
    out = {"fixture": os.path.basename(os.path.normpath(fixture)), "rows": rows}
    m64 = t["vae_moments_f64"]
    out["vae_moments"] = dict(port=float(np.abs(nchw(mom) - m64).max()),
                              bagel=float(np.abs(t["vae_moments"].astype(np.float64) - m64).max()),
                              max_abs=float(np.abs(m64).max()))
    with torch.no_grad():
        d64 = ae64.decode(z.double()).numpy()
    out["decoded"] = dict(port=float(np.abs(nchw(dec) - d64).max()),
                          bagel=float(np.abs(t["decoded"].astype(np.float64) - d64).max()),
                          max_abs=float(np.abs(d64).max()))
    return out


CANVAS_SIZES = ((1.0, 0.75), (0.625, 1.0))       # (H, W) of the two images as fractions of N


def measure_canvas(bagel_src: str, fixture: str, canvas: int) -> dict:
    """Encoder moments on an N x N padded batch: port bf16 / fp32 and BAGEL fp32 vs BAGEL float64."""
    fx = G.load_fixture(fixture)
    ae32, ae64 = bagel_models(bagel_src, fx)
    sizes = [(int(canvas * a) // 16 * 16, int(canvas * b) // 16 * 16) for a, b in CANVAS_SIZES]
    g = torch.Generator().manual_seed(MG.IMAGE_SEED)
    x = torch.zeros(len(sizes), 3, canvas, canvas)
    for i, (h, w) in enumerate(sizes):
        x[i, :, :h, :w] = MG.to_bagel_tensor(MG.random_scene(g, h, w))
    out = {"canvas": canvas, "image_sizes": sizes}
    with torch.no_grad():
        m64 = ae64.encoder(x.double()).numpy()
        out["bagel_fp32"] = float(np.abs(ae32.encoder(x).double().numpy() - m64).max())
        with MG.CudaAutocastBf16():
            out["bagel_bf16_autocast"] = float(np.abs(ae32.encoder(x).double().numpy() - m64).max())
    out["max_abs"] = float(np.abs(m64).max())
    cfg = G.config_from_meta(fx["meta"])
    for dtype in ("float32", "bfloat16"):
        port = nnx.eval_shape(lambda: V.AutoEncoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype)))
        keymap.load_vae(port, fx["ae"])
        mom = nnx.jit(lambda m, a: m.encode_moments(a))(port, nhwc(x.numpy()))
        out[f"port_{dtype}"] = float(np.abs(nchw(mom) - m64).max())
    return out


def print_table(out: dict):
    print(f"{'GroupNorm':28s} {'shape':>16s} {'vals/grp':>8s} {'max|y|':>6s}  "
          f"{'net port':>9s} {'net BAGEL':>9s} {'ratio':>5s}  {'alone port':>10s} {'alone BAGEL':>11s} {'ratio':>5s}")
    for r in out["rows"]:
        print(f"{r['name']:28s} {'x'.join(map(str, r['shape'])):>16s} {r['values_per_group']:8d} {r['max_abs']:6.2f}  "
              f"{r['net_port']:9.2e} {r['net_bagel']:9.2e} {r['net_ratio']:5.2f}  "
              f"{r['alone_port']:10.2e} {r['alone_bagel']:11.2e} {r['alone_ratio']:5.2f}")
    for k in ("vae_moments", "decoded"):
        v = out[k]
        print(f"{k}: port {v['port']:.2e}, BAGEL {v['bagel']:.2e} (max |value| {v['max_abs']:.2f}), "
              f"ratio {v['port'] / v['bagel']:.2f}")
    print(f"worst ratio in the network {max(r['net_ratio'] for r in out['rows']):.2f}, "
          f"alone {max(r['alone_ratio'] for r in out['rows']):.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bagel-src", required=True)
    ap.add_argument("--fixture", default=os.path.join(ROOT, "tests/fixtures/bagel_golden/ae_wide_v1"))
    ap.add_argument("--json")
    ap.add_argument("--before-issue-12", action="store_true", help="the GroupNorm and conv before issue 12")
    ap.add_argument("--tap-convs", action="store_true", help="convs as sums of one-tap contractions")
    ap.add_argument("--canvas", type=int, help="bf16 / fp32 encoder moments on an N x N padded batch")
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.before_issue_12:
        V.GroupNorm.__call__, V.Conv.__call__ = single_reduction_groupnorm, compute_dtype_conv
    if args.tap_convs:
        V.Conv.__call__ = tap_conv
    if args.canvas:
        out = measure_canvas(args.bagel_src, args.fixture, args.canvas)
        m = out["max_abs"]
        print(f"canvas {out['canvas']}x{out['canvas']}, images {out['image_sizes']}, max |moments| {m:.2f}")
        for k in ("port_bfloat16", "bagel_bf16_autocast", "port_float32", "bagel_fp32"):
            print(f"  {k:14s} max |moments - float64| {out[k]:.2e} ({out[k] / m:.1e} of max |moments|)")
    else:
        out = measure(args.bagel_src, args.fixture)
        print_table(out)
    out["options"] = {"before_issue_12": args.before_issue_12, "tap_convs": args.tap_convs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
