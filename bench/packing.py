"""Padding fraction of our packer vs BAGEL's greedy loop on the same sample stream.

    python bench/packing.py [--batches 150] [--rows 8] [--seed 0] [--out bench/results/packing.json]

Two sample streams, both Seg:VQA = 2:1 in stream order (seg, seg, vqa, ...):

* ``sgt``  -- SGT sizes at a 16k-token row: segmentation samples sized by BAGEL's resize rule on
  SA-1B-like images (short side 1500, aspect 1:1 .. 16:9, both orientations; ViT 224 rule, VAE
  512-1024 / 16), VQA samples sized like LLaVA-OneVision SFT (20 % text-only, images 300-2000 px
  through the 378-980 / 14 rule with max_pixels, log-normal question / answer lengths, 25 % two
  turns). Only sizes are simulated (the packers only see sizes); the assumptions are in the JSON.
* ``tiny`` -- the real tiny CPU preset: real samples built by ``SampleBuilder`` from the built-in
  synthetic scenes and their VQA (``tiny_data_config``).

Policies, all on the identical stream, padding = 1 - real tokens / (rows * L):

  ours            ``BestFitPacker``: B rows at once, best fit over the four row budgets, atomic
                  (seg, seg, vqa) groups (exact 2:1 per batch), buffer 16 groups
  ours_sample     the same with single-sample groups (ratio exact only in expectation)
  ours_buffer64   ours with a 64-group buffer (more lookahead, 4x the buffered memory)
  bagel           BAGEL's ``PackedDataset.__iter__`` loop, token budget only (max = L,
                  expected = L * 32768/36864 as BAGEL's defaults; its rows do NOT satisfy our
                  gen / ViT / VAE budgets, so it cannot feed the static-shape model)
  bagel_full      the same loop with expected = max = L (BAGEL at its densest)
  bagel_sgt       expected / max = 16384 / 36864 as in SGT's train_sgt.sh
  bagel_budgets   BAGEL's loop (expected = max = L) with our four budgets added to its fit test
                  (a valid static-shape row per sequence)

Also: the share of unused und and gen capacity for ours, the samples BAGEL's loop drops (the
flush-triggering sample), and sweeps of ``gen_tokens_per_row`` and of the row length for the sgt
stream.
Writes bench/results/packing.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from sgt_jax.data import config as C  # noqa: E402
from sgt_jax.data import packer as PK  # noqa: E402
from sgt_jax.data.samples import resize_hw  # noqa: E402

BAGEL_RATIO = 32768 / 36864
SGT_RATIO = 16384 / 36864


class Sized:
    """A sample reduced to what the packers look at."""

    def __init__(self, stream, index, und, gen, vit, vae):
        self.stream, self.index = stream, index
        self._sizes = (und, gen, vit, vae)
        self.num_tokens = und + gen
        self.vae_images = []


def sgt_stream(seed: int, cfg):
    """Infinite 2:1 stream of SGT-sized samples."""
    rng = np.random.default_rng(seed)
    t = cfg.transforms
    i = 0
    while True:
        for _ in range(2):     # segmentation: ViT(224 rule) + instruction + VAE(mask, 512-1024 / 16)
            a = rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9])
            w, h = 1500, int(round(1500 * a))
            if rng.random() < 0.5:
                w, h = h, w
            vw, vh = resize_hw(w, h, t.vit_image_size, t.vit_image_size, 14, t.seg_vit_max_pixels)
            gw, gh = resize_hw(w, h, t.vae_max, t.vae_min, t.vae_stride, t.vae_max_pixels)
            n_vit = (vw // 14) * (vh // 14)
            n_txt = int(rng.integers(6, 15))
            und = (n_vit + 2) + (n_txt + 2) + 2
            yield Sized("seg", i, und, (gw // 16) * (gh // 16), n_vit, 1)
            i += 1
        # VQA: LLaVA-OneVision-like
        n_img = 0 if rng.random() < 0.2 else 1
        turns = 2 if rng.random() < 0.25 else 1
        n_vit = 0
        for _ in range(n_img):
            w, h = int(rng.integers(300, 2001)), int(rng.integers(300, 2001))
            vw, vh = resize_hw(w, h, t.vqa_vit_max, t.vqa_vit_min, 14, t.vqa_vit_max_pixels, img_num=n_img)
            n_vit += (vw // 14) * (vh // 14)
        und = n_img * (n_vit + 2)
        for _ in range(turns):
            q = int(min(2000, rng.lognormal(np.log(60), 0.8)))
            a = int(min(3000, rng.lognormal(np.log(60), 1.2)))
            und += (q + 2) + (a + 2)
        yield Sized("vqa", i, und, 0, n_vit, 0)
        i += 1


def tiny_stream(workdir: str, cfg, n_images: int):
    from sgt_jax.data import pipeline as PL
    from sgt_jax.data.samples import SampleBuilder

    cfg.sources.seg = f"synthetic_seg:{{workdir}}/synthetic?n={n_images}"
    cfg.sources.vqa = f"synthetic_vqa:{{workdir}}/synthetic?n={n_images}"
    tok = PL.ensure_tokenizer(cfg, workdir)
    srcs = PL.make_sources(cfg, workdir)
    b = SampleBuilder(cfg, tok)
    pos = {"seg": 0, "vqa": 0}

    def nxt(s):
        while True:
            g = pos[s]
            pos[s] += 1
            try:
                return b(srcs[s][g % len(srcs[s])], stream=s, index=g)
            except Exception:
                continue
    while True:
        yield nxt("seg")
        yield nxt("seg")
        yield nxt("vqa")


def take(stream, n):
    return [next(stream) for _ in range(n)]


def run_ours(pool, spec, rows, batches, group, max_buffer=16):
    pk = PK.BestFitPacker(spec, rows, max_buffer=max_buffer)
    used = und = gen = n_samples = 0
    deferred = dropped = 0
    ok = [s for s in pool if PK.fit_reason(s, spec) is None]
    it = iter(ok)
    for _ in range(batches):
        rws, ev = pk.pack(lambda: [next(it) for _ in range(group)])
        deferred += ev["deferred"]
        dropped += sum(v for k, v in ev.items() if k.startswith("dropped"))
        for d in rws:
            for s in d:
                z = PK.sizes(s)
                und += z[0]
                gen += z[1]
                n_samples += 1
    total = batches * rows * spec.tokens_per_row
    return {"padding": 1 - (und + gen) / total,
            "unused_und": 1 - und / (batches * rows * spec.und_budget),
            "unused_gen": 1 - gen / (batches * rows * spec.gen_tokens_per_row) if spec.gen_tokens_per_row else 0.0,
            "samples": n_samples, "deferred": deferred, "dropped_over_long": len(pool) - len(ok),
            "rows": batches * rows}


def run_bagel(pool, L, expected, rows_total, fits=None, spec=None):
    ok = [s for s in pool if spec is None or PK.fit_reason(s, spec) is None]
    used = n = dropped = 0
    seqs = 0
    for seq, drop in PK.bagel_pack(iter(ok), max_num_tokens=L, expected_num_tokens=expected,
                                   max_num_tokens_per_sample=L, fits=fits, num_sequences=rows_total):
        used += sum(s.num_tokens for s in seq)
        n += len(seq)
        dropped += drop
        seqs += 1
    return {"padding": 1 - used / (seqs * L), "samples": n, "dropped_flush_trigger": dropped, "rows": seqs}


def compare(name, pool, spec, rows, batches):
    L = spec.tokens_per_row
    res = {
        "ours": run_ours(pool, spec, rows, batches, 3),
        "ours_sample": run_ours(pool, spec, rows, batches, 1),
        "ours_buffer64": run_ours(pool, spec, rows, batches, 3, max_buffer=64),
        "bagel": run_bagel(pool, L, int(L * BAGEL_RATIO), rows * batches),
        "bagel_full": run_bagel(pool, L, L, rows * batches),
        "bagel_sgt": run_bagel(pool, L, int(L * SGT_RATIO), rows * batches),
        "bagel_budgets": run_bagel(pool, L, L, rows * batches, fits=PK.row_budgets(spec), spec=spec),
    }
    print(f"\n[{name}] L={L} num_gen={spec.gen_tokens_per_row} P={spec.vit_patches_per_row} "
          f"N={spec.vae_images_per_row} rows/batch={rows} batches={batches}")
    print(f"  {'policy':<15}{'padding':>9}{'vs ours':>9}{'samples':>9}  notes")
    base = res["ours"]["padding"]
    for k, v in res.items():
        ratio = v["padding"] / base if base > 0 else float("inf")
        notes = ""
        if k.startswith("ours"):
            notes = f"unused und {v['unused_und']:.3f}, unused gen {v['unused_gen']:.3f}, deferred {v['deferred']}"
        else:
            notes = f"dropped (flush trigger) {v['dropped_flush_trigger']}"
        print(f"  {k:<15}{v['padding']:>9.4f}{ratio:>8.2f}x{v['samples']:>9}  {notes}")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=150)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny-images", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "packing.json"))
    args = ap.parse_args()
    out = {"assumptions": __doc__.split("Policies")[0].strip(), "platform": platform.platform(),
           "batches": args.batches, "rows_per_batch": args.rows, "seed": args.seed}

    # ---- SGT sizes ----
    cfg = C.default_data_config()
    spec = PK.RowSpec.from_config(cfg)
    need = args.batches * args.rows * 12 + 20000
    pool = take(sgt_stream(args.seed, cfg), need)
    seg = [s for s in pool if s.stream == "seg"]
    vqa = [s for s in pool if s.stream == "vqa"]
    mean = lambda xs, i: float(np.mean([PK.sizes(s)[i] for s in xs]))   # noqa: E731
    stream_stats = {k: {"und": mean(v, 0), "gen": mean(v, 1), "vit": mean(v, 2)} for k, v in
                    (("seg", seg), ("vqa", vqa))}
    gen_share = sum(PK.sizes(s)[1] for s in pool) / sum(s.num_tokens for s in pool)
    print(f"sgt stream: mean sizes {json.dumps(stream_stats)}; gen share of tokens {gen_share:.3f}")
    out["sgt"] = {"row_spec": spec.__dict__ | {"vae_hw": list(spec.vae_hw)}, "stream_mean_sizes": stream_stats,
                  "gen_share": gen_share, "results": compare("sgt", pool, spec, args.rows, args.batches)}
    sweep = {}
    print("\n  gen_tokens_per_row sweep (sgt, L=16384): padding ours vs bagel_budgets")
    for g in (8192, 9216, 10240, 11264, 12288):
        sp = PK.RowSpec(spec.tokens_per_row, g, min(spec.vit_patches_per_row, spec.tokens_per_row - g),
                        spec.vae_images_per_row, spec.vae_hw, max_tokens_per_sample=spec.max_tokens_per_sample)
        o = run_ours(pool, sp, args.rows, args.batches // 3, 3)["padding"]
        bb = run_bagel(pool, sp.tokens_per_row, sp.tokens_per_row, args.rows * args.batches // 3,
                       fits=PK.row_budgets(sp), spec=sp)["padding"]
        sweep[g] = {"ours": o, "bagel_budgets": bb}
        print(f"    num_gen={g:>6}: ours {o:.4f}  bagel_budgets {bb:.4f}")
    out["sgt"]["gen_sweep"] = sweep
    print("\n  row length sweep (sgt, same tokens per batch, num_gen = 0.65 L rounded to 1024): padding")
    lsweep = {}
    for L, rows in ((8192, 2 * args.rows), (16384, args.rows), (32768, max(1, args.rows // 2)),
                    (65536, max(1, args.rows // 4))):
        g = int(round(0.65 * L / 1024)) * 1024
        sp = PK.RowSpec(L, g, L - g, max(6, L // 2048), spec.vae_hw, max_tokens_per_sample=L)
        o = run_ours(pool, sp, rows, args.batches // 3, 3)["padding"]
        bb = run_bagel(pool, L, L, rows * args.batches // 3, fits=PK.row_budgets(sp), spec=sp)["padding"]
        bt = run_bagel(pool, L, int(L * BAGEL_RATIO), rows * args.batches // 3)["padding"]
        lsweep[L] = {"rows": rows, "num_gen": g, "ours": o, "bagel_budgets": bb, "bagel": bt}
        print(f"    L={L:>6} rows={rows:>3} num_gen={g:>6}: ours {o:.4f}  bagel_budgets {bb:.4f}  bagel {bt:.4f}")
    out["sgt"]["length_sweep"] = lsweep

    # ---- tiny preset, real synthetic samples ----
    tcfg = C.tiny_data_config()
    with tempfile.TemporaryDirectory() as wd:
        stream = tiny_stream(wd, tcfg, args.tiny_images)
        pool = take(stream, args.batches * tcfg.rows_per_batch * 12 + 3000)
    tspec = PK.RowSpec.from_config(tcfg)
    out["tiny"] = {"row_spec": tspec.__dict__ | {"vae_hw": list(tspec.vae_hw)},
                   "results": compare("tiny (real synthetic samples)", pool, tspec, tcfg.rows_per_batch,
                                      args.batches)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
