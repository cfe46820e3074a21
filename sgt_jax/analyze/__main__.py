"""CLI: ``python -m sgt_jax.analyze {features,attention,prompt_attention} --ckpt A --ckpt B ... --data D
--out DIR`` (docs/analysis.md).

``--ckpt``: a model dir or a training run (RUN, RUN/checkpoints, RUN/checkpoints/<step>), as
``python -m sgt_jax.generate --model``; ``NAME=PATH`` names it in the tables and figures (default:
the path). The first is the base the differences are taken from (``--base NAME`` to choose).

features          ViT and connector features of a labelled image set: linear-probe accuracy
                  (cross-validated), silhouette score, t-SNE panels (Fig. 7)
attention         per layer, the attention mass from the text tokens of VQA contexts to their ViT
                  tokens, and its difference from the base (Fig. 8a)
prompt_attention  during T2I sampling, at chosen Euler steps, the attention mass from the latent
                  tokens to each prompt token, aggregated by word category (Fig. 8b)

Outputs in ``--out``: ``<command>.json`` (numbers, settings, skipped inputs by reason) and PNG
figures. Exit status: 0 done, 1 no usable input, 2 bad flags / checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

COMMANDS = ("features", "attention", "prompt_attention")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sgt_jax.analyze", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=COMMANDS)
    ap.add_argument("--ckpt", action="append", required=True, help="[NAME=]model dir or run (repeat)")
    ap.add_argument("--base", help="NAME of the base checkpoint (default: the first)")
    ap.add_argument("--weights", default="ema", choices=["ema", "params"], help="of a training run (default ema)")
    ap.add_argument("--data", default="", help="input set (sgt_jax/analyze/data.py; prompt_attention: default list)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per batch (static: padded)")
    ap.add_argument("--max-items", type=int, default=0, help="use the first N inputs (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    # features
    ap.add_argument("--pool", default="auto", choices=["auto", "flatten", "mean"],
                    help="features per image: all tokens concatenated (the paper) or their mean")
    ap.add_argument("--embedding", default="tsne", choices=["tsne", "pca", "none"])
    ap.add_argument("--folds", type=int, default=5, help="linear-probe cross-validation folds")
    # attention
    ap.add_argument("--no-answer", action="store_true", help="attention: queries are the question tokens only")
    # prompt_attention
    ap.add_argument("--steps", default="0,1,2", help="Euler step indices (default: the first three, as the paper)")
    ap.add_argument("--layers", default="", help="layers averaged for the category shares (default: all)")
    ap.add_argument("--words", help="JSON {category: [words]} (default: sgt_jax/analyze/words.py)")
    ap.add_argument("--height", type=int, help="default: the data config's largest VAE size")
    ap.add_argument("--width", type=int)
    ap.add_argument("--num-timesteps", type=int, default=50)
    ap.add_argument("--timestep-shift", type=float, default=3.0)
    ap.add_argument("--cfg-text-scale", type=float, default=4.0)
    # runtime
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the model's)")
    ap.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1")
    ap.add_argument("--tokenizer", help="tokenizer dir (default: the model's)")
    ap.add_argument("--query-chunk", type=int, default=0, help="attention queries per block (memory; 0: all at once)")
    ap.add_argument("--head-block", type=int, default=0, help="kv heads per attention block (memory)")
    return ap


def _ckpts(specs):
    out = []
    for s in specs:
        name, eq, path = s.partition("=")
        out.append((name, path) if eq and name and "/" not in name else (s, s))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"--ckpt names must differ: {names}")
    return out


def _write_json(path, obj):
    from sgt_jax import fileio

    with open(path, "w") as f:
        json.dump(fileio.jsonable(obj), f, indent=1)


def run_features(args, engines, items, skipped, out):
    from sgt_jax.analyze import metrics, plots

    images, labels = items
    res, panels = {}, {"vit": [], "connector": []}
    for name, an in engines():
        feats = an.features(images, batch_size=args.batch_size, pool=args.pool)
        res[name] = {"source": an.eng.source, "pool": feats["pool"]}
        for which in ("vit", "connector"):
            res[name][which] = metrics.separability(feats[which], labels, folds=args.folds, seed=args.seed)
            if args.embedding != "none":
                panels[which].append((name, metrics.embed_2d(feats[which], method=args.embedding, seed=args.seed)))
    figs = []
    for which in ("vit", "connector"):
        if panels[which]:
            p = os.path.join(out, f"features_{which}.png")
            plots.tsne_panels(p, panels[which], labels, title=f"{which} features ({args.embedding})")
            figs.append(p)
    classes = sorted(set(labels))
    return {"labels": {c: labels.count(c) for c in classes}, "checkpoints": res}, figs


def run_attention(args, engines, items, skipped, out, base):
    import numpy as np

    from sgt_jax.analyze import plots

    res = {}
    for name, an in engines():
        a = an.vqa_attention(items, batch_size=args.batch_size, with_answer=not args.no_answer)
        res[name] = {"source": an.eng.source, "vit_mass_per_layer": a["vit"].mean(0).tolist(),
                     "vit_mass_std_per_layer": a["vit"].std(0).tolist(),
                     "text_mass_per_layer": a["text"].mean(0).tolist(),
                     "mean_text_queries": float(a["queries"].mean()), "items": int(len(a["queries"]))}
    b = np.asarray(res[base]["vit_mass_per_layer"])
    for name in res:
        res[name]["vit_mass_minus_base"] = (np.asarray(res[name]["vit_mass_per_layer"]) - b).tolist()
    p = os.path.join(out, "attention.png")
    others = {n: np.asarray(r["vit_mass_minus_base"]) for n, r in res.items() if n != base}
    if others:
        plots.layer_lines(p, others, ylabel="Δ attention to ViT tokens", title=f"text → ViT attention vs {base}")
    else:
        plots.layer_lines(p, {base: b}, ylabel="attention to ViT tokens", title="text → ViT attention")
    return {"base": base, "checkpoints": res}, [p]


def run_prompt_attention(args, engines, prompts, skipped, out, base):
    import dataclasses

    import numpy as np

    from sgt_jax.analyze import metrics, plots, words as W
    from sgt_jax.infer.tasks import T2I_FLOW

    wl = W.load_words(args.words)
    cats = list(wl) + [W.OTHER, W.SPECIAL]
    flow = dataclasses.replace(T2I_FLOW, num_timesteps=args.num_timesteps, timestep_shift=args.timestep_shift,
                               cfg_text_scale=args.cfg_text_scale)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    res, shares_fig = {}, {}
    for name, an in engines():
        eng = an.eng
        if eng.tokenizer is None:
            raise ValueError(f"{eng.source} has no tokenizer: pass --tokenizer DIR")
        big = eng.transforms.vae.max_size
        hw = (args.height or big, args.width or big)
        per = an.prompt_attention(prompts, flow=flow, height=hw[0], width=hw[1], steps=steps, seed=args.seed,
                                  batch_size=args.batch_size)
        nl = per[0]["mass"].shape[1]
        layers = [int(x) for x in args.layers.split(",") if x.strip()] or list(range(nl))
        sp = eng.special
        marks = {sp.bos_token_id, sp.eos_token_id, sp.start_of_image, sp.end_of_image}
        rows, cat_rows, layer_rows = [], [], []
        for p in per:
            ids = p["token_ids"]
            pieces = [eng.tokenizer.decode([i]) for i in ids]
            tc = W.categorize(pieces, [i in marks for i in ids], wl)
            m = p["mass"][:, layers].mean(axis=(0, 1))                      # steps and layers averaged
            share = metrics.category_shares(m, tc, cats)
            cat_rows.append(share)
            layer_rows.append([[metrics.category_shares(p["mass"][s, l], tc, cats) for l in range(nl)]
                               for s in range(len(p["steps"]))])
            rows.append({"prompt": p["prompt"], "tokens": pieces, "categories": tc,
                         "token_share_pct": (100 * m / max(m.sum(), 1e-30)).tolist(),
                         "prompt_mass": float(m.sum()), "category_share_pct": share})
        mean = {c: float(np.mean([r[c] for r in cat_rows])) for c in cats}
        per_layer = {c: [float(np.mean([lr[s][l][c] for lr in layer_rows for s in range(len(steps))]))
                         for l in range(nl)] for c in cats}
        res[name] = {"source": eng.source, "category_share_pct": mean, "category_share_pct_per_layer": per_layer,
                     "mean_prompt_mass": float(np.mean([r["prompt_mass"] for r in rows])),
                     "timesteps": per[0]["timesteps"], "layers": layers, "prompts": rows,
                     "size": list(hw)}
        shares_fig[name] = mean
    for name in res:
        res[name]["category_share_minus_base"] = {c: res[name]["category_share_pct"][c] - res[base]["category_share_pct"][c]
                                                  for c in cats}
    p = os.path.join(out, "prompt_attention.png")
    plots.category_bars(p, shares_fig, cats, title="latent → prompt attention by word category")
    return {"base": base, "categories": cats, "words": wl, "steps": steps,
            "flow": dataclasses.asdict(flow), "checkpoints": res}, [p]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from sgt_jax.analyze import data as D
    from sgt_jax.analyze.studies import Analyzer, compile_counts
    from sgt_jax.infer.engine import CheckpointNotFound, Engine
    from sgt_jax.parallel import mesh as mesh_lib

    t0 = time.time()
    try:
        ckpts = _ckpts(args.ckpt)
        base = args.base or ckpts[0][0]
        if base not in [n for n, _ in ckpts]:
            raise ValueError(f"--base {base!r} is not a --ckpt name ({[n for n, _ in ckpts]})")
        spec = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
        mesh = mesh_lib.make_mesh(spec)
        skipped = D.Skipped()
        if args.command == "features":
            if not args.data:
                raise ValueError("features needs --data (synthetic:N, coco:JSON::IMAGE_DIR or a .jsonl)")
            images, labels = D.labelled_images(args.data, skipped)
            if args.max_items:
                images, labels = images[:args.max_items], labels[:args.max_items]
            items, n = (images, labels), len(images)
        elif args.command == "attention":
            if not args.data:
                raise ValueError("attention needs --data (synthetic:N or a VQA .jsonl)")
            items = D.vqa_items(args.data, skipped)[:args.max_items or None]
            n = len(items)
        else:
            items = D.prompts(args.data, skipped)[:args.max_items or None]
            n = len(items)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if n == 0:
        print(f"error: no usable input in --data {args.data!r} (skipped: {skipped.counts})", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)

    state = {}

    def engines():
        """Yields (name, Analyzer) per checkpoint, one engine in memory at a time; the jitted
        functions are kept while the model's structure is the same (no recompilation)."""
        for name, path in ckpts:
            eng = Engine.load(path, weights=args.weights, mesh=mesh, compute_dtype=args.dtype,
                              tokenizer_path=args.tokenizer)
            an = state.get("an")
            if an is None or an.eng.graphdef != eng.graphdef or an.eng.param_dtype != eng.param_dtype:
                an = Analyzer(eng, query_chunk=args.query_chunk, head_block=args.head_block)
            # every checkpoint sees the same pixels: the first one's image transforms for all
            eng.transforms = state.setdefault("transforms", eng.transforms)
            an.eng = eng
            state["an"] = an
            yield name, an

    try:
        if args.command == "features":
            result, figs = run_features(args, engines, items, skipped, args.out)
        elif args.command == "attention":
            result, figs = run_attention(args, engines, items, skipped, args.out, base)
        else:
            result, figs = run_prompt_attention(args, engines, items, skipped, args.out, base)
    except (CheckpointNotFound, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(command=args.command, data=args.data or "default", inputs=n,
                  skipped=skipped.counts, skipped_details=skipped.details,
                  seconds=round(time.time() - t0, 2), compilations=compile_counts(),
                  settings={k: v for k, v in vars(args).items() if k not in ("command",)})
    path = os.path.join(args.out, f"{args.command}.json")
    _write_json(path, result)
    print(summary_line(args.command, result))
    print(f"numbers: {path}" + "".join(f"\nfigure: {p}" for p in figs))
    return 0


def summary_line(command, result) -> str:
    out = []
    for name, r in result["checkpoints"].items():
        if command == "features":
            out.append(f"{name}: probe vit {r['vit']['linear_probe_accuracy']:.3f} / connector "
                       f"{r['connector']['linear_probe_accuracy']:.3f}, silhouette vit {r['vit']['silhouette']:.3f} "
                       f"/ connector {r['connector']['silhouette']:.3f}")
        elif command == "attention":
            out.append(f"{name}: text->ViT mass per layer " + " ".join(f"{v:.3f}" for v in r["vit_mass_per_layer"]))
        else:
            out.append(f"{name}: " + ", ".join(f"{c} {v:.1f}%" for c, v in r["category_share_pct"].items()))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
