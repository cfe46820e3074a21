"""Dense vs blocked attention on CPU on issue 23's packed row: time (fwd, fwd+bwd) and executed FLOPs
against BAGEL's per-sample attention.

    python bench/attention_cpu.py [--repeats 3] [--block 32 --chunk 32] [--no-stack]

The row (issue 23: one row of 2176 tokens, 1167 ViT, 768 latent, 146 text, 6 samples), built as
bench/attention_blocks.py builds rows (``row_vectors``: BAGEL's splits, start / end tokens, one padding
document, stable-sorted by expert as the decoder does):
  3 seg samples  [ViT 196 patches (full) | text 12/14/16 (causal) | noised latent 16x16 (noise)]
  3 VQA samples  [ViT 196/196/187 patches (full) | question 10/12/14 | answer 22/26/20 (causal)]
each split with its 2 start / end tokens (36), 59 padding tokens; the ViT row packs the 6 images
into 1280 patch slots (113 padding).

Measured side by side in one run, interleaved (each repeat runs every variant once):
  * ``attention``: the op alone at the LLM's shapes (hidden 512: 8 heads, 2 kv heads, hd 64) and
    the ViT's (``--vit-hidden`` / ``--vit-heads``), fwd and fwd+bwd (grads w.r.t. q, k, v);
  * ``stack`` (unless --no-stack): the 4-layer MoT decoder (Qwen2MoT, hidden 512) and a 4-layer
    SigLIP, fwd+bwd (grads of params and input), ``attention_impl`` dense vs blocked.

Executed FLOPs: the dense path is loop-free, so XLA's ``cost_analysis()`` of the compiled program
is what runs. The blocked path runs a while loop whose trip count depends on the row; XLA's cost
analysis counts a loop body once, so executed = cost(whole program) + (trips - 1) x cost(one loop
step), the step compiled alone (``blocked_attention.fwd_step`` / ``bwd_step``) at the same shapes.
BAGEL's per-sample attention (its nested path: one dense SDPA per sample): fwd = sum_s L_s^2 * hd *
heads * 2 * 2 (QK^T and PV), L_s = the sample's tokens (the LLM) or the image's patches (the ViT);
its backward adds 4 such matmuls (dQ, dK, dV, dP; PyTorch's math SDPA keeps P), so fwd+bwd = 3 x
fwd. Ours recomputes QK^T in the backward (5 matmuls), as FlashAttention-2 does.

Writes bench/results/attention_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from attention_blocks import CAUSAL, FULL, NOISE, row_vectors  # noqa: E402
from sgt_jax.models import attention as A  # noqa: E402
from sgt_jax.models import blocked_attention as BA  # noqa: E402
from sgt_jax.models import config as C  # noqa: E402

LENGTH, GEN, VIT_SLOTS = 2176, 768, 1280
VIT = [196, 196, 196, 196, 196, 187]


def issue_row():
    seg_text, q, a = [12, 14, 16], [10, 12, 14], [22, 26, 20]
    samples = [[(FULL, VIT[i] + 2, 0), (CAUSAL, seg_text[i] + 2, 0), (NOISE, 2, 256)] for i in range(3)]
    samples += [[(FULL, VIT[3 + i] + 2, 0), (CAUSAL, q[i] + 2, 0), (CAUSAL, a[i] + 2, 0)] for i in range(3)]
    vecs, info = row_vectors(samples, LENGTH, GEN)
    doc, split, mode, order = vecs
    # the gen rows of the expert-sorted row (exactly GEN of them: the 768 latents)
    expert = np.zeros(LENGTH, np.int32)
    expert[LENGTH - GEN:] = 1
    info["sample_tokens"] = [sum(u + g for _, u, g in s) for s in samples]
    return A.Segments(*(jnp.asarray(v)[None] for v in vecs)), jnp.asarray(expert)[None], info


def vit_row():
    from sgt_jax.models.siglip import image_ids_from_lengths, image_segments

    ids = jnp.asarray(image_ids_from_lengths(VIT, VIT_SLOTS))[None]
    return ids, image_segments(ids)


def _timed(fn, *args):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0))


def attention_op(name, q, k, v, seg, blocking, per_sample_fwd):
    """Compiled fwd / fwd+bwd of dense and blocked attention, and their executed FLOPs."""
    ct = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), q.dtype)
    out = {}
    for impl in ("dense", "blocked"):
        f = (lambda q, k, v: A.dot_product_attention(q, k, v, A.bagel_mask(seg))) if impl == "dense" else \
            (lambda q, k, v: BA.blocked_attention(q, k, v, seg, blocking=blocking))
        fwd = jax.jit(f).lower(q, k, v).compile()
        fb = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct), argnums=(0, 1, 2))).lower(q, k, v).compile()
        out[impl] = dict(fwd=fwd, fwd_bwd=fb, flops_fwd=_flops(fwd), flops_fwd_bwd=_flops(fb))
    # the blocked loops: + (trips - 1) x one step
    st, qb, kb, vb, tok, codes, n, _ = BA.prepare(q, k, v, seg, blocking)
    live = int(BA.live_pairs(seg, blocking.block))
    trips = -(-live // st.chunk)
    carry = BA.fwd_carry(st, qb.shape[0])
    f_step = _flops(jax.jit(lambda c: BA.fwd_step(st, qb, kb, vb, tok, codes, n, c)).lower(carry).compile())
    lse = jnp.zeros((qb.shape[0], st.nkv, st.g, st.bl), jnp.float32)
    bcarry = (jnp.int32(0), jnp.zeros(qb.shape), jnp.zeros(kb.shape), jnp.zeros(vb.shape))
    b_step = _flops(jax.jit(lambda c: BA.bwd_step(st, qb, kb, vb, tok, codes, n, lse, lse, qb, c)).lower(bcarry)
                    .compile())
    b = out["blocked"]
    b["xla_flops_fwd_loop_body_once"], b["xla_flops_fwd_bwd_loop_bodies_once"] = b["flops_fwd"], b["flops_fwd_bwd"]
    b["flops_fwd"] += (trips - 1) * f_step
    b["flops_fwd_bwd"] += (trips - 1) * (f_step + b_step)
    _, lp, nh, hd = q.shape
    n_blocks = -(-lp // st.bl)
    info = dict(live_pairs=live, all_pairs=n_blocks * n_blocks, trips=trips, block=st.bl, chunk=st.chunk,
                step_flops_fwd=f_step, step_flops_bwd=b_step,
                bagel_per_sample_flops_fwd=per_sample_fwd, bagel_per_sample_flops_fwd_bwd=3 * per_sample_fwd)
    return out, info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block", type=int, default=BA.Blocking().block)
    ap.add_argument("--chunk", type=int, default=BA.Blocking().chunk)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vit-hidden", type=int, default=256)
    ap.add_argument("--vit-heads", type=int, default=4)
    ap.add_argument("--no-stack", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention_cpu.json"))
    a = ap.parse_args()
    blocking = BA.Blocking(a.block, a.chunk)
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731

    seg, expert, info = issue_row()
    ids, vseg = vit_row()
    hd, vhd = a.hidden // a.heads, a.vit_hidden // a.vit_heads
    llm_fwd = sum(x * x for x in info["sample_tokens"]) * hd * a.heads * 4
    vit_fwd = sum(x * x for x in VIT) * vhd * a.vit_heads * 4
    ops, op_info = {}, {}
    ops["llm"], op_info["llm"] = attention_op(
        "llm", normal(1, LENGTH, a.heads, hd), normal(1, LENGTH, a.kv_heads, hd), normal(1, LENGTH, a.kv_heads, hd),
        seg, blocking, llm_fwd)
    ops["vit"], op_info["vit"] = attention_op(
        "vit", normal(1, VIT_SLOTS, a.vit_heads, vhd), normal(1, VIT_SLOTS, a.vit_heads, vhd),
        normal(1, VIT_SLOTS, a.vit_heads, vhd), vseg, blocking, vit_fwd)
    args = {"llm": None, "vit": None}
    for name in ops:
        L, nh, nkv, d = (LENGTH, a.heads, a.kv_heads, hd) if name == "llm" else (VIT_SLOTS, a.vit_heads, a.vit_heads, vhd)
        args[name] = (normal(1, L, nh, d), normal(1, L, nkv, d), normal(1, L, nkv, d))

    stacks = {}
    if not a.no_stack:
        from sgt_jax.models.qwen2_mot import Qwen2MoT
        from sgt_jax.models.siglip import SiglipNaViT

        x = normal(1, LENGTH, a.hidden)
        pos = jnp.asarray(seg.order)
        patches = normal(1, VIT_SLOTS, 3 * 14 * 14)
        vpos = jnp.zeros((1, VIT_SLOTS), jnp.int32)
        for impl in ("dense", "blocked"):
            cfg = C.tiny()
            cfg.llm.update(hidden_size=a.hidden, intermediate_size=3 * a.hidden, num_layers=a.layers,
                           num_heads=a.heads, num_kv_heads=a.kv_heads, vocab_size=256, attention_impl=impl,
                           attention_blocked_block=a.block, attention_blocked_chunk=a.chunk)
            cfg.vit.update(hidden_size=a.vit_hidden, intermediate_size=4 * a.vit_hidden, num_layers=a.layers,
                           num_heads=a.vit_heads, attention_impl=impl, attention_blocked_block=a.block,
                           attention_blocked_chunk=a.chunk)
            lm = Qwen2MoT(cfg, rngs=nnx.Rngs(0))
            vit = SiglipNaViT(cfg, rngs=nnx.Rngs(0))
            for name, model, loss in (
                    ("mot_decoder", lm, lambda m, x: jnp.mean(m(x, pos, seg, expert, GEN) ** 2)),
                    ("siglip", vit, lambda m, p: jnp.mean(m(p, vpos, ids) ** 2))):
                gdef, params = nnx.split(model)
                inp = x if name == "mot_decoder" else patches
                fn = jax.jit(jax.grad(lambda p, i, gdef=gdef, loss=loss: loss(nnx.merge(gdef, p), i), argnums=(0, 1)))
                stacks.setdefault(name, {})[impl] = dict(fwd_bwd=fn.lower(params, inp).compile(), args=(params, inp))

    times = {}
    for r in range(a.repeats):          # interleaved: every variant once per repeat
        for name, d in ops.items():
            for impl, c in d.items():
                for kind in ("fwd", "fwd_bwd"):
                    times.setdefault(("attention", name, impl, kind), []).append(_timed(c[kind], *args[name]))
        for name, d in stacks.items():
            for impl, c in d.items():
                times.setdefault(("stack", name, impl, "fwd_bwd"), []).append(_timed(c["fwd_bwd"], *c["args"]))
        print(f"repeat {r + 1}/{a.repeats} done", flush=True)

    def summary(key):
        t = times[key]
        return dict(median_s=float(np.median(t)), min_s=float(np.min(t)), times=t)

    report = {"config": {k: v for k, v in vars(a).items() if k != "out"} | {
        "row": dict(length=LENGTH, gen=GEN, vit_slots=VIT_SLOTS, vit_patches=VIT, **info)},
        "attention": {}, "stack": {}}
    lines = []
    for name in ops:
        ent = dict(op_info[name])
        for impl in ("dense", "blocked"):
            ent[impl] = {kind: summary(("attention", name, impl, kind)) for kind in ("fwd", "fwd_bwd")}
            ent[impl].update({k: v for k, v in ops[name][impl].items() if k.startswith(("flops", "xla"))})
        for kind in ("fwd", "fwd_bwd"):
            ent[f"time_ratio_blocked_over_dense_{kind}"] = ent["blocked"][kind]["median_s"] / ent["dense"][kind]["median_s"]
            ent[f"time_ratio_blocked_over_dense_{kind}_min"] = ent["blocked"][kind]["min_s"] / ent["dense"][kind]["min_s"]
            ent[f"flops_blocked_over_bagel_{kind}"] = ent["blocked"][f"flops_{kind}"] / ent[f"bagel_per_sample_flops_{kind}"]
            ent[f"flops_dense_over_bagel_{kind}"] = ent["dense"][f"flops_{kind}"] / ent[f"bagel_per_sample_flops_{kind}"]
            lines.append(f"{name:4s} {kind:8s} dense {ent['dense'][kind]['median_s'] * 1e3:8.1f} ms "
                         f"blocked {ent['blocked'][kind]['median_s'] * 1e3:7.1f} ms  ratio "
                         f"{ent[f'time_ratio_blocked_over_dense_{kind}']:.3f} | FLOPs / BAGEL per-sample: dense "
                         f"{ent[f'flops_dense_over_bagel_{kind}']:.2f}x, blocked {ent[f'flops_blocked_over_bagel_{kind}']:.3f}x")
        lines.append(f"     live pairs {ent['live_pairs']} of {ent['all_pairs']} (block {ent['block']}), "
                     f"{ent['trips']} loop steps of {ent['chunk']}")
        report["attention"][name] = ent
    for name, d in stacks.items():
        ent = {impl: summary(("stack", name, impl, "fwd_bwd")) for impl in d}
        ent["time_ratio_blocked_over_dense"] = ent["blocked"]["median_s"] / ent["dense"]["median_s"]
        ent["time_ratio_blocked_over_dense_min"] = ent["blocked"]["min_s"] / ent["dense"]["min_s"]
        report["stack"][name] = ent
        lines.append(f"{name} fwd+bwd: dense {ent['dense']['median_s']:.3f} s, blocked {ent['blocked']['median_s']:.3f} s"
                     f", ratio {ent['time_ratio_blocked_over_dense']:.3f} (minima {ent['time_ratio_blocked_over_dense_min']:.3f})")
    report["machine"] = {"backend": jax.default_backend(), "devices": len(jax.devices()),
                         "cpu_count": os.cpu_count(), "platform": platform.platform(),
                         "loadavg_at_end": os.getloadavg()}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
