"""CLI: ``python -m sgt_jax.evaluate {heldout,geneval,answers} --model PATH --out DIR ...``
(docs/evaluation.md).

``heldout``: held-out CE / MSE at fixed noise, generated masks scored against their targets
(mIoU, PQ) and greedy VQA answers (exact match) on held-out synthetic scenes (seed
``--scene-seed``, disjoint from training) or on the sources ``--seg`` / ``--vqa`` (source specs:
``sa1b:DIR``, ``coco_panoptic:...``, ``llava:...``, docs/data_sources.md); writes
``summary.json``, ``details.json``, ``grid.png``, ``masks/<key>.png``.

``geneval``: GenEval's prompts JSONL (``evaluation_metadata.jsonl``: one object with ``prompt``
per line) x ``--seeds`` -> GenEval's folder layout for its PyTorch scorer.

``answers``: a multiple-choice benchmark as JSONL (``index``, ``question``, options ``A``, ``B``,
..., ``answer``, ``image`` path relative to the file) -> a VLMEvalKit-style answers TSV + JSONL.

Exit status: 0 done (bad records counted in the summary), 2 no model / bad flags / bad input file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sgt_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["heldout", "geneval", "answers"])
    ap.add_argument("--model", required=True, help="model dir or training run dir")
    ap.add_argument("--weights", default="ema", choices=["ema", "params"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="noise of losses and generation")
    ap.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1")
    # heldout
    ap.add_argument("--num-scenes", type=int, default=64)
    ap.add_argument("--num-questions", type=int, default=128)
    ap.add_argument("--loss-batches", type=int, default=4)
    ap.add_argument("--scene-seed", type=int, default=1000)
    ap.add_argument("--seg", default="", help="held-out seg source spec (default: synthetic scenes)")
    ap.add_argument("--vqa", default="", help="held-out VQA source spec (default: synthetic questions)")
    ap.add_argument("--flow-steps", type=int, default=50)
    ap.add_argument("--cfg-text-scale", type=float, default=4.0)
    ap.add_argument("--cfg-img-scale", type=float, default=2.0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--grid-rows", type=int, default=8)
    # geneval / answers
    ap.add_argument("--prompts", help="geneval: evaluation_metadata.jsonl; answers: the benchmark JSONL")
    ap.add_argument("--seeds", default="0,1,2,3", help="geneval: comma-separated seeds per prompt")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    return ap


def run_config(eng, args, model_path: str):
    """A run config for the evaluation: the run's own (training run) or, for a model dir, its model
    with the default data / train sections (``tiny_data_config`` for small position tables)."""
    import ml_collections

    from sgt_jax import fileio
    from sgt_jax.data.config import default_data_config, tiny_data_config
    from sgt_jax.train.config import default_eval_config, default_train_config
    from sgt_jax.train.export import find_checkpoint, is_training_checkpoint

    if is_training_checkpoint(model_path):
        ckpt_dir, step = find_checkpoint(model_path)
        meta = fileio.read_json(fileio.join(ckpt_dir, str(step), "meta", "metadata"))
        cfg = ml_collections.ConfigDict(meta["config"])
        cfg.model.vae.ch_mult = tuple(cfg.model.vae.ch_mult)
    else:
        cfg = ml_collections.ConfigDict()
        cfg.model = eng.cfg
        small = eng.cfg.bagel.vit_max_num_patch_per_side < 70
        cfg.data = (tiny_data_config if small else default_data_config)(eng.cfg)
        cfg.train = default_train_config()
    cfg.eval = default_eval_config()
    cfg.eval.update(every=0, num_scenes=args.num_scenes, num_questions=args.num_questions,
                    loss_batches=args.loss_batches, scene_seed=args.scene_seed, seed=args.seed,
                    flow_steps=args.flow_steps, cfg_text_scale=args.cfg_text_scale,
                    cfg_img_scale=args.cfg_img_scale, max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size, grid_rows=args.grid_rows, seg=args.seg, vqa=args.vqa)
    return cfg


def heldout(eng, args) -> dict:
    import numpy as np
    from PIL import Image

    from sgt_jax.eval.runner import Evaluator, summary_line

    cfg = run_config(eng, args, args.model)
    ev = Evaluator(cfg, args.out, tokenizer=eng.tokenizer, out_dir=args.out)
    out = ev(eng)
    os.makedirs(os.path.join(args.out, "masks"), exist_ok=True)
    for s, m in zip(ev.data.seg, out["masks"]):
        Image.fromarray(np.asarray(m)).save(os.path.join(args.out, "masks", f"{s['key']}.png"))
    with open(os.path.join(args.out, "details.json"), "w") as f:
        json.dump({k: v for k, v in out["details"].items()}, f, indent=1)
    print(summary_line("-", out["scalars"]))
    return {"scalars": out["scalars"], "sources": ev.specs, "grid": out["details"].get("grid")}


def geneval(eng, args) -> dict:
    from tqdm import tqdm

    from sgt_jax.eval import exports
    from sgt_jax.infer import tasks

    prompts = exports.read_jsonl(args.prompts)
    seeds = [int(s) for s in args.seeds.split(",")]
    big = eng.transforms.vae.max_size
    h, w = args.height or big, args.width or big
    exports.write_seeds(args.out, seeds)
    bar = tqdm(total=len(prompts) * len(seeds), desc="geneval", file=sys.stderr)
    skipped = 0
    for i, meta in enumerate(prompts):
        if not isinstance(meta.get("prompt"), str) or not meta["prompt"]:
            skipped += 1
            print(f"skipped prompt {i}: no 'prompt'", file=sys.stderr)
            continue
        imgs = tasks.text_to_image(eng, [meta["prompt"]] * len(seeds), height=h, width=w, seeds=seeds,
                                   batch_size=args.batch_size, progress=bar)
        exports.write_geneval_prompt(args.out, i, meta, imgs)
    bar.close()
    print(f"{len(prompts) - skipped} prompt folder(s) x {len(seeds)} seed(s) in {args.out}")
    return {"prompts": len(prompts) - skipped, "skipped": skipped, "seeds": seeds, "size": [h, w]}


def answers(eng, args) -> dict:
    from sgt_jax.eval import exports
    from sgt_jax.generate import Skip, load_image
    from sgt_jax.infer import tasks

    rows = exports.read_jsonl(args.prompts)
    base = os.path.dirname(os.path.abspath(args.prompts))
    reqs, kept, skipped = [], [], {}
    for n, r in enumerate(rows):
        try:
            if not isinstance(r.get("question"), str) or "image" not in r:
                raise Skip("bad_request", f"row {n}: needs 'question' and 'image'")
            p = r["image"] if os.path.isabs(r["image"]) else os.path.join(base, r["image"])
            reqs.append(([load_image(p)], exports.mc_prompt(r["question"], exports.options_of(r))))
            kept.append(r)
        except Skip as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            print(f"skipped: {e}", file=sys.stderr)
    outs = tasks.answer(eng, reqs, max_new_tokens=args.max_new_tokens, seeds=[args.seed] * len(reqs),
                        batch_size=args.batch_size) if reqs else []
    table = [{"index": r.get("index", i), "question": r["question"], **exports.options_of(r),
              "answer": r.get("answer"), "prediction": o["text"]} for i, (r, o) in enumerate(zip(kept, outs))]
    tsv, jl = exports.write_answers(os.path.join(args.out, "answers.tsv"), table)
    print(f"{len(table)} answer(s) in {tsv}" + (f"; skipped {skipped}" if skipped else ""))
    return {"answers": len(table), "skipped": skipped, "tsv": tsv, "jsonl": jl}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from sgt_jax.infer.engine import CheckpointNotFound, Engine, compile_counts
    from sgt_jax.parallel import mesh as mesh_lib

    if args.what in ("geneval", "answers") and not (args.prompts and os.path.isfile(args.prompts)):
        print(f"error: {args.what} needs --prompts FILE (got {args.prompts!r})", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        mesh = mesh_lib.make_mesh({k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
        eng = Engine.load(args.model, weights=args.weights, mesh=mesh)
    except (CheckpointNotFound, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if eng.tokenizer is None or not eng.has_vae:
        print(f"error: {eng.source} needs a tokenizer and a VAE for evaluation", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    try:
        res = {"heldout": heldout, "geneval": geneval, "answers": answers}[args.what](eng, args)
    except ValueError as e:          # bad prompts file / source spec / seed clash: one line
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    summary = {"what": args.what, "model": eng.source, **res, "seconds": round(time.time() - t0, 2),
               "compilations": compile_counts()}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
