"""Block skipping of the flash kernel on SGT-like packed rows, its numerical error, and AOT
memory / cost of dense XLA attention vs the kernel for TPU targets.

    python bench/attention_blocks.py [--rows 4] [--seed 0]                 # skip fractions
    python bench/attention_blocks.py --errors                              # + kernel vs dense errors
    python bench/attention_blocks.py --aot [--aot-lengths 16384 32768]     # + AOT (needs libtpu)
    python bench/attention_blocks.py --keep-skip --aot-layer               # + AOT of a 7B MoT layer

(with libtpu installed: ALLOW_MULTIPLE_LIBTPU_LOAD=1 if another process holds /tmp/libtpu_lockfile,
TPU_SKIP_MDS_QUERY=1 to silence the metadata-server probe)

Writes bench/results/attention_blocks.json (sections present only when run).

Rows are built as the data pipeline builds them (sgt_jax/data/samples.py ``layout``, packer.py
``assemble``), sizes only:
  seg  [vit_image: <soi> 256 patches <eoi> (full, und); text: <bos> 12-30 ids <eos> (causal, und);
        vae_image noised: <soi> h*w latents <eoi> (noise; latents gen), h, w in 32..64 (512-1024 px / 16)]
  vqa  [vit_image 700-5000 patches (full); per turn: question text 10-60 (causal), answer text
        20-300 (causal)], 1-3 turns (the image only in the first)
stream seg, seg, vqa, ... (Seg:VQA = 2:1 as bench/packing.py), packed first-fit (lookahead 16)
under the row's two budgets: gen tokens <= G, und tokens <= L - G, G = 10240 at L = 16384 (the data
config's default) scaled with L; then one padding document fills the row (the last G - gen_used
positions routed to gen) and the row is stable-sorted by expert, as the decoder does.

Per row and block size: the fraction of (q block, kv block) pairs the kernel skips / computes
with the mask / computes unmasked (``flash_attention.classify_blocks``, per-block min/max only),
the fraction of pairs that are truly empty (from the exact mask, computed in chunks -- the best
any block-sparse kernel at that block size could skip), the mask density, the longest live list
per q (kv) block and the grid steps the kernel runs with its 4 grid-length buckets.

AOT (``compile_attention``): one row per chip (B = 1), BAGEL-7B attention shapes (nh 28, nkv 4,
hd 128, bf16), fwd + bwd (``jax.vjp``) of dense XLA attention (``dot_product_attention`` +
``bagel_mask``) vs ``flash_attention``, compiled on one device of a v5p-8 / v6e-4 topology from
this CPU host. Reported: ``memory_analysis()`` (argument, output, temp, generated code) and
``cost_analysis()`` (flops, bytes accessed, optimal_seconds). XLA cannot see inside a Pallas
call: its cost is the kernel's ``CostEstimate`` (dense-equivalent FLOPs, i.e. no skipping), so
the JSON also gives ``flops_after_skipping`` = that x the measured work fraction.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

CAUSAL, FULL, NOISE = 0, 1, 2
BLOCKS = [(256, 256), (512, 512), (1024, 512), (512, 1024), (1024, 1024)]
TOPOLOGIES = {
    "v5p": dict(topology_name="v5:2x2x1", chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1)),
    "v6e": dict(topology_name="v6e:2x2", chip_config_name="default", chips_per_host_bounds=(2, 2, 1)),
}
SHAPE_7B = dict(nh=28, nkv=4, hd=128)


# ------------------------------------------------------------------------------------------------
# SGT-like rows

def seg_sample(rng):
    """[(mode, und tokens, gen tokens), ...] per split, in packing order."""
    h, w = (int(x) for x in rng.integers(32, 65, 2))
    return [(FULL, 258, 0), (CAUSAL, int(rng.integers(12, 31)) + 2, 0), (NOISE, 2, h * w)]


def vqa_sample(rng):
    splits = [(FULL, int(rng.integers(700, 5001)) + 2, 0)]
    for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))):
        splits += [(CAUSAL, int(rng.integers(10, 61)) + 2, 0), (CAUSAL, int(rng.integers(20, 301)) + 2, 0)]
    return splits


def sample_stream(rng):
    while True:
        yield seg_sample(rng)
        yield seg_sample(rng)
        yield vqa_sample(rng)


def pack_rows(rng, length, gen_quota, n_rows, lookahead=16):
    """First-fit with a lookahead buffer under the und / gen budgets -> list of rows of samples."""
    stream, buf, rows = sample_stream(rng), [], []
    und_quota = length - gen_quota
    while len(rows) < n_rows:
        row, und, gen = [], 0, 0
        while True:
            while len(buf) < lookahead:
                buf.append(next(stream))
            fit = None
            for i, s in enumerate(buf):
                su, sg = sum(x[1] for x in s), sum(x[2] for x in s)
                if und + su <= und_quota and gen + sg <= gen_quota:
                    fit = i
                    break
            if fit is None:
                break
            s = buf.pop(fit)
            row.append(s)
            und += sum(x[1] for x in s)
            gen += sum(x[2] for x in s)
        rows.append(row)
    return rows


def row_vectors(samples, length, gen_quota):
    """(doc, split, mode, order) of one row in physical (expert-sorted) order, and its fill."""
    doc, split, mode, expert = [], [], [], []
    s = 0
    for d, sample in enumerate(samples):
        for m, und, gen in sample:
            n = und + gen
            doc += [d] * n
            split += [s] * n
            mode += [m] * n
            # a VAE image: <soi> latents <eoi>; the latents are gen-routed
            expert += ([0] + [1] * gen + [0] * (und - 1)) if gen else [0] * n
            s += 1
    used, gen_used = len(doc), sum(expert)
    n_pad = length - used
    doc += [len(samples)] * n_pad
    split += [s] * n_pad
    mode += [CAUSAL] * n_pad
    expert += [0] * n_pad
    expert = np.asarray(expert, np.int32)
    if gen_quota > gen_used:
        expert[length - (gen_quota - gen_used):] = 1
    perm = np.argsort(expert, kind="stable").astype(np.int32)
    vecs = [np.asarray(x, np.int32)[perm] for x in (doc, split, mode)] + [perm]
    return vecs, dict(real_tokens=used, gen_tokens=gen_used, samples=len(samples),
                      seg=sum(1 for x in samples if x[-1][0] == NOISE))


def grid_fraction(live: int, n: int, buckets: int = 4) -> float:
    """Grid steps run / blocks in the row, with the kernel's default 4 grid-length buckets (per
    row here; in a batch the longest list of all rows picks the bucket)."""
    sizes = sorted({-(-n // 2 ** i) for i in range(buckets)})
    return next(t for t in sizes if t >= live) / n


def exact_block_stats(doc, split, mode, order, bq, bkv, chunk=512):
    """Per (q block, kv block): any allowed / all allowed, from the exact mask (numpy, chunked)."""
    n = len(doc)
    nq, nk = n // bq, n // bkv
    any_, all_ = np.zeros((nq, nk), bool), np.zeros((nq, nk), bool)
    allowed_pairs = 0
    ko_same = np.where(mode == CAUSAL, order, np.iinfo(np.int32).min)
    ko_other = np.where(mode == NOISE, np.iinfo(np.int32).max, order)
    step = max(chunk // bq, 1) * bq
    for a in range(0, n, step):
        sl = slice(a, a + step)
        same = split[sl, None] == split[None, :]
        thr = np.where(same, ko_same[None, :], ko_other[None, :])
        m = (doc[sl, None] == doc[None, :]) & (thr <= order[sl, None])
        allowed_pairs += int(m.sum())
        mb = m.reshape(-1, bq, nk, bkv)
        any_[a // bq:a // bq + mb.shape[0]] = mb.any(axis=(1, 3))
        all_[a // bq:a // bq + mb.shape[0]] = mb.all(axis=(1, 3))
    return any_, all_, allowed_pairs / float(n * n)


def skip_fractions(n_rows, lengths, seed, blocks=BLOCKS, exact=True, log=print):
    import jax.numpy as jnp

    from sgt_jax.models import attention as A
    from sgt_jax.models import flash_attention as F

    out = {}
    for length in lengths:
        gen_quota = int(round(length * 10240 / 16384))
        rng = np.random.default_rng(seed)
        rows = pack_rows(rng, length, gen_quota, n_rows)
        res = {"gen_tokens_per_row": gen_quota, "rows": []}
        for r, samples in enumerate(rows):
            vecs, info = row_vectors(samples, length, gen_quota)
            seg = A.Segments(*(jnp.asarray(v)[None] for v in vecs))
            row = dict(info, fill=info["real_tokens"] / length, blocks={})
            for bq, bkv in blocks:
                _, _, kinds, kinds_dkv = F.plan(seg, F.BlockSizes(bq, bkv, bq, bkv), interpret=False)
                k = np.asarray(kinds)[0]
                kd = np.asarray(kinds_dkv)[0]
                live, live_dkv = int((k != F.SKIP).sum(1).max()), int((kd != F.SKIP).sum(1).max())
                ent = dict(skip=float((k == F.SKIP).mean()), partial=float((k == F.PARTIAL).mean()),
                           full=float((k == F.FULL_BLOCK).mean()), dkv_skip=float((kd == F.SKIP).mean()),
                           max_live_per_q_block=live, max_live_per_kv_block=live_dkv,
                           grid_steps=grid_fraction(live, k.shape[1]),
                           grid_steps_dkv=grid_fraction(live_dkv, kd.shape[1]))
                if exact:
                    any_, all_, density = exact_block_stats(*vecs, bq, bkv)
                    assert not (any_ & (k == F.SKIP)).any() and all_[k == F.FULL_BLOCK].all()
                    ent.update(exact_empty=float((~any_).mean()), exact_full=float(all_.mean()))
                    row["mask_density"] = density
                row["blocks"][f"{bq}x{bkv}"] = ent
            res["rows"].append(row)
            log(f"L={length} row {r}: {info['samples']} samples ({info['seg']} seg), fill "
                f"{row['fill']:.3f}, " + ", ".join(f"{b}: skip {e['skip']:.3f}" + (
                    f" (exact {e['exact_empty']:.3f})" if exact else "") for b, e in row["blocks"].items()))
        summ = {}
        for b in res["rows"][0]["blocks"]:
            vals = [x["blocks"][b] for x in res["rows"]]
            summ[b] = {k: float(np.mean([v[k] for v in vals])) for k in vals[0] if not k.startswith("max_live")}
            for k in ("max_live_per_q_block", "max_live_per_kv_block"):
                summ[b][k] = max(v[k] for v in vals)
        if exact:
            summ["mask_density"] = float(np.mean([x["mask_density"] for x in res["rows"]]))
        res["mean"] = summ
        out[str(length)] = res
    return out


# ------------------------------------------------------------------------------------------------
# numerics (interpret mode)

def kernel_errors(seed=0, log=print):
    import jax
    import jax.numpy as jnp

    from sgt_jax.models import attention as A
    from sgt_jax.models import flash_attention as F

    rng = np.random.default_rng(seed)
    length, b, hd = 512, 2, 32
    gen_quota = int(round(length * 10240 / 16384))
    rows = []
    for _ in range(b):
        samples = [[(FULL, 40, 0), (CAUSAL, 12, 0), (NOISE, 2, 60)], [(FULL, 80, 0), (CAUSAL, 30, 0)],
                   [(CAUSAL, 10, 0), (FULL, 2, 100), (NOISE, 2, 100)]]
        rng.shuffle(samples)
        rows.append(row_vectors(samples, length, gen_quota)[0])
    seg = A.Segments(*(jnp.asarray(np.stack([r[i] for r in rows])) for i in range(4)))
    out = {}
    for nh, nkv in [(4, 4), (4, 2), (14, 2)]:
        for dtype in ("float32", "bfloat16"):
            mk = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
            q, k, v, ct = mk(b, length, nh, hd), mk(b, length, nkv, hd), mk(b, length, nkv, hd), mk(b, length, nh, hd)
            cast = lambda t: t.astype(dtype)  # noqa: E731

            def vg(impl, q, k, v):
                f = (lambda q, k, v: F.flash_attention(q, k, v, seg, block_sizes=F.BlockSizes(128, 128, 128, 128))) \
                    if impl == "flash" else (lambda q, k, v: A.dot_product_attention(q, k, v, A.bagel_mask(seg)))
                o, vjp = jax.vjp(f, q, k, v)
                return (o, *vjp(ct.astype(o.dtype)))

            with jax.default_matmul_precision("highest"):
                ref = jax.jit(lambda q, k, v: vg("dense", q, k, v))(*(cast(t).astype(jnp.float32) for t in (q, k, v)))
                fl = jax.jit(lambda q, k, v: vg("flash", q, k, v))(cast(q), cast(k), cast(v))
                de = jax.jit(lambda q, k, v: vg("dense", q, k, v))(cast(q), cast(k), cast(v))
            e = {}
            for name, x, y, r in zip(("out", "dq", "dk", "dv"), fl, de, ref):
                r = np.asarray(r)
                e[name] = dict(flash=float(np.abs(np.asarray(x, np.float32) - r).max()),
                               dense=float(np.abs(np.asarray(y, np.float32) - r).max()),
                               ref_max=float(np.abs(r).max()))
            out[f"nh{nh}_nkv{nkv}_{dtype}"] = e
            log(f"errors nh={nh} nkv={nkv} {dtype}: " + ", ".join(
                f"{n} {x['flash']:.2e} (dense {x['dense']:.2e})" for n, x in e.items()))
    return dict(length=length, batch=b, head_dim=hd, block=128, reference="dense path in fp32 on the "
                "same (rounded) inputs", cases=out)


# ------------------------------------------------------------------------------------------------
# AOT

def compile_attention(chip: str, impl: str, seq_len: int, batch: int = 1, blocks=None,
                      shape: dict = SHAPE_7B, backward: bool = True) -> dict:
    """Compile fwd (+ bwd) attention for one device of a ``chip`` topology; memory and cost."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.topologies import get_topology_desc
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    from sgt_jax.models import attention as A
    from sgt_jax.models import flash_attention as F

    devs = get_topology_desc(platform="tpu", num_slices=1, wrap=(False, False, False),
                             **TOPOLOGIES[chip]).devices
    mesh = Mesh(np.asarray(devs[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"),
                axis_types=(AxisType.Auto,) * 3)
    rep = NamedSharding(mesh, P())
    nh, nkv, hd = shape["nh"], shape["nkv"], shape["hd"]
    sd = lambda s, dt: jax.ShapeDtypeStruct(s, dt, sharding=rep)  # noqa: E731
    q, kv = sd((batch, seq_len, nh, hd), jnp.bfloat16), sd((batch, seq_len, nkv, hd), jnp.bfloat16)
    seg = A.Segments(*[sd((batch, seq_len), jnp.int32)] * 4)
    bs = blocks or F.BlockSizes()

    def attn(q, k, v, seg):
        if impl == "flash":
            return F.flash_attention(q, k, v, seg, block_sizes=bs, interpret=False)
        return A.dot_product_attention(q, k, v, A.bagel_mask(seg))

    def step(q, k, v, seg, do):
        o, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, seg), q, k, v)
        return (o, *vjp(do)) if backward else o

    t0 = time.time()
    with jax.set_mesh(mesh):
        try:
            compiled = jax.jit(step).lower(q, kv, kv, seg, q).compile()
        except Exception as e:  # noqa: BLE001 -- report OOM and friends as data
            msg = str(e)
            return dict(chip=chip, impl=impl, seq_len=seq_len, device_kind=devs[0].device_kind,
                        error=msg.splitlines()[0][:500], oom="RESOURCE_EXHAUSTED" in msg, **_oom_fields(msg))
    ma, ca = compiled.memory_analysis(), compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    r = dict(chip=chip, impl=impl, seq_len=seq_len, batch=batch, device_kind=devs[0].device_kind,
             compile_seconds=round(time.time() - t0, 1),
             argument_bytes=ma.argument_size_in_bytes, output_bytes=ma.output_size_in_bytes,
             temp_bytes=ma.temp_size_in_bytes, alias_bytes=ma.alias_size_in_bytes,
             code_bytes=ma.generated_code_size_in_bytes,
             flops=float(ca.get("flops", 0.0)), bytes_accessed=float(ca.get("bytes accessed", 0.0)),
             transcendentals=float(ca.get("transcendentals", 0.0)),
             optimal_seconds=float(ca.get("optimal_seconds", 0.0)))
    r["total_bytes"] = r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"]
    if impl == "flash":
        r["block_sizes"] = list(bs.__dict__.values())
    return r


def _oom_fields(msg: str) -> dict:
    import re

    m = re.search(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", msg)
    return dict(oom_required_gib=float(m.group(1)), oom_available_gib=float(m.group(2))) if m else {}


def compile_layer(chip: str, impl: str, seq_len: int, batch: int = 1, blocks=None) -> dict:
    """fwd + bwd (grads of params and input) of one BAGEL-7B MoT decoder layer (bf16 compute,
    fp32 params, gen tokens = 10240/16384 of the row) with ``llm.attention_impl = impl``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental.topologies import get_topology_desc
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    from sgt_jax.models import attention as A
    from sgt_jax.models import config as C
    from sgt_jax.models.layers import rope_cos_sin
    from sgt_jax.models.qwen2_mot import DecoderLayer

    cfg = C.bagel_7b()
    cfg.llm.attention_impl = impl
    if blocks is not None:
        cfg.llm.update({f"attention_block_{k}": v for k, v in zip(("q", "kv", "q_dkv", "kv_dkv"), blocks)})
    devs = get_topology_desc(platform="tpu", num_slices=1, wrap=(False, False, False),
                             **TOPOLOGIES[chip]).devices
    mesh = Mesh(np.asarray(devs[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"),
                axis_types=(AxisType.Auto,) * 3)
    rep_ = NamedSharding(mesh, P())
    num_gen = int(round(seq_len * 10240 / 16384))
    h, hd = cfg.llm.hidden_size, C.head_dim(cfg)
    t0 = time.time()
    layer = nnx.eval_shape(lambda: DecoderLayer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    graphdef, state = nnx.split(layer)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep_), state)
    with jax.set_mesh(mesh):
        sd = lambda s, dt: jax.ShapeDtypeStruct(s, dt, sharding=rep_)  # noqa: E731
        x = sd((batch, seq_len, h), jnp.bfloat16)
        pos = sd((batch, seq_len), jnp.int32)
        seg = A.Segments(*[sd((batch, seq_len), jnp.int32)] * 4)

        def loss(state, x, pos, seg):
            cos, sin = rope_cos_sin(pos, hd, cfg.llm.rope_theta, jnp.bfloat16)
            y = nnx.merge(graphdef, state)(x, cos, sin, seg, num_gen)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        try:
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x, pos, seg).compile()
        except Exception as e:  # noqa: BLE001
            msg = str(e)
            return dict(chip=chip, impl=impl, seq_len=seq_len, what="decoder_layer", device_kind=devs[0].device_kind,
                        error=msg.splitlines()[0][:500], oom="RESOURCE_EXHAUSTED" in msg, **_oom_fields(msg))
    ma, ca = compiled.memory_analysis(), compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    r = dict(chip=chip, impl=impl, seq_len=seq_len, batch=batch, what="decoder_layer",
             device_kind=devs[0].device_kind, compile_seconds=round(time.time() - t0, 1),
             argument_bytes=ma.argument_size_in_bytes, output_bytes=ma.output_size_in_bytes,
             temp_bytes=ma.temp_size_in_bytes, alias_bytes=ma.alias_size_in_bytes,
             code_bytes=ma.generated_code_size_in_bytes, flops=float(ca.get("flops", 0.0)),
             bytes_accessed=float(ca.get("bytes accessed", 0.0)),
             optimal_seconds=float(ca.get("optimal_seconds", 0.0)))
    r["total_bytes"] = r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"]
    return r


def aot_table(lengths, skip=None, log=print) -> list[dict]:
    out = []
    for chip in TOPOLOGIES:
        for length in lengths:
            for impl in ("dense", "flash"):
                r = compile_attention(chip, impl, length)
                if impl == "flash" and skip and str(length) in skip and "error" not in r:
                    work = 1.0 - skip[str(length)]["mean"]["512x512"]["skip"]
                    r["work_fraction_512x512"] = work
                    r["flops_after_skipping"] = r["flops"] * work
                out.append(r)
                log(json.dumps(r))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4, help="packed rows per length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--no-exact", action="store_true", help="skip the exact-mask comparison (faster)")
    ap.add_argument("--errors", action="store_true", help="also measure kernel vs dense errors (interpret)")
    ap.add_argument("--aot", action="store_true", help="also AOT-compile dense vs flash (needs libtpu)")
    ap.add_argument("--aot-lengths", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--aot-layer", action="store_true",
                    help="also AOT-compile one 7B MoT decoder layer (fwd+bwd) with dense vs flash")
    ap.add_argument("--keep-skip", action="store_true", help="keep the skip section already in --out (rerun only AOT)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "attention_blocks.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    res = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            res = json.load(f)
    res["env"] = dict(jax=jax.__version__, python=platform.python_version(), machine=platform.machine())
    if not (args.keep_skip and "skip" in res):
        res["skip"] = dict(rows_per_length=args.rows, seed=args.seed, stream="seg, seg, vqa (2:1)",
                           lengths=skip_fractions(args.rows, args.lengths, args.seed, exact=not args.no_exact))
    if args.errors:
        res["errors"] = kernel_errors(args.seed)
    if args.aot:
        import importlib.util

        if importlib.util.find_spec("libtpu") is None:
            res["aot"] = dict(skipped="libtpu is not installed (pip install 'libtpu==0.0.42.*' for jax 0.10.2)")
        else:
            res["aot"] = dict(libtpu=__import__("importlib.metadata").metadata.version("libtpu"),
                              shape=SHAPE_7B, topologies=TOPOLOGIES,
                              results=aot_table(args.aot_lengths, res["skip"]["lengths"]))
    if args.aot_layer:
        layer = []
        for chip in TOPOLOGIES:
            for length in args.aot_lengths:
                for impl in ("dense", "flash"):
                    r = compile_layer(chip, impl, length)
                    print(json.dumps(r))
                    layer.append(r)
        res["aot_layer"] = dict(config="bagel_7b MoT decoder layer, bf16 compute, fp32 params, B=1",
                                results=layer)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
