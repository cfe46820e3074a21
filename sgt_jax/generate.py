"""CLI: ``python -m sgt_jax.generate {answer,t2i,edit,segment} --model PATH --out DIR ...``
(docs/inference.md).

``--model``: a model dir (``python -m sgt_jax.convert import``, e.g. BAGEL-7B-MoT) or a training
run (RUN, RUN/checkpoints, RUN/checkpoints/<step>; ``--weights ema|params``). One request from
flags (``--image``, ``--question`` / ``--prompt`` / ``--instruction``) or many from ``--jsonl``
(one JSON object per line: ``id``, ``image`` or ``images`` (paths relative to the JSONL file),
``question`` / ``prompt`` / ``instruction``, ``seed``, ``height`` / ``width``); ``--seeds 0,1,..``
repeats every request once per seed (GenEval style). Outputs in DIR: ``<id>.png`` (image tasks),
``<id>.json`` (request, settings, output) per output, ``results.jsonl`` (all of them),
``summary.json`` (counts, skipped requests by reason, time, compilations).

A request with an unreadable image, a missing field, a bad size or a context longer than
``--max-context-tokens`` is skipped and counted (never a crash mid-run). Exit status: 0 (done,
maybe with counted skips), 1 (every request skipped), 2 (no model / bad flags).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

TASKS = ("answer", "t2i", "edit", "segment")
FIELD = {"answer": "question", "t2i": "prompt", "edit": "instruction", "segment": "instruction"}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sgt_jax.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("--model", required=True, help="model dir or training run dir")
    ap.add_argument("--weights", default="ema", choices=["ema", "params"], help="of a training run (default ema)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--jsonl", help="requests, one JSON object per line")
    ap.add_argument("--image", action="append", default=[], help="input image (answer: repeatable)")
    ap.add_argument("--question", help="answer: the question")
    ap.add_argument("--prompt", help="t2i: the prompt")
    ap.add_argument("--instruction", help="edit: the instruction; segment: default SGT's trained instruction")
    ap.add_argument("--seed", type=int, default=0, help="seed of requests that give none")
    ap.add_argument("--seeds", help="comma-separated: every request once per seed")
    ap.add_argument("--batch-size", type=int, default=4, help="requests per batch (static: padded)")
    ap.add_argument("--max-context-tokens", type=int, default=8192,
                    help="longest context + generation a request may need (KV cache capacity)")
    # text
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (BAGEL's do_sample=False)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--think", action="store_true", help="BAGEL's think mode (answer, t2i)")
    ap.add_argument("--think-prompt", help="system prompt of think mode (default: this project's wording)")
    ap.add_argument("--think-tokens", type=int, default=256, help="t2i think: plan length")
    # images
    ap.add_argument("--height", type=int, help="t2i: default the data config's largest VAE size")
    ap.add_argument("--width", type=int)
    ap.add_argument("--num-timesteps", type=int, default=50)
    ap.add_argument("--timestep-shift", type=float, default=3.0)
    ap.add_argument("--cfg-text-scale", type=float)
    ap.add_argument("--cfg-img-scale", type=float)
    ap.add_argument("--cfg-interval", help="LO,HI: CFG where LO < t <= HI")
    ap.add_argument("--cfg-renorm-type", choices=["global", "channel", "text_channel"])
    ap.add_argument("--cfg-renorm-min", type=float)
    ap.add_argument("--vae-condition", action="store_true", help="segment: add the image's VAE block too")
    ap.add_argument("--resize-to-input", action="store_true", help="segment: mask nearest-resized to the input size")
    # runtime
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the model's)")
    ap.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1", help="mesh axes (sgt_jax/parallel/mesh.py)")
    ap.add_argument("--tokenizer", help="tokenizer dir (default: the model's)")
    ap.add_argument("--query-chunk", type=int, default=0, help="attention query chunk of image blocks (memory)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


class Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def load_image(path: str):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (FileNotFoundError, IsADirectoryError) as e:
        raise Skip("bad_image", f"{path}: no such image file ({e.__class__.__name__})") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise Skip("bad_image", f"{path}: not a readable image ({e})") from None


def read_requests(args) -> list[dict]:
    """Raw request dicts (from --jsonl, else from the flags), each with an ``_base`` dir."""
    if args.jsonl:
        base = os.path.dirname(os.path.abspath(args.jsonl))
        out = []
        with open(args.jsonl) as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    if not isinstance(r, dict):
                        raise ValueError("not an object")
                except ValueError as e:
                    r = {"_error": f"{args.jsonl}:{n + 1}: not a JSON object ({e})"}
                r.setdefault("id", f"{len(out):05d}")
                out.append(dict(r, _base=base))
        return out
    r = {"id": "00000", "_base": os.getcwd()}
    if args.image:
        r["images" if args.task == "answer" else "image"] = args.image if args.task == "answer" else args.image[0]
    for k in ("question", "prompt", "instruction"):
        if getattr(args, k) is not None:
            r[k] = getattr(args, k)
    return [r]


def flow_config(args, default):
    import dataclasses

    kw = dict(num_timesteps=args.num_timesteps, timestep_shift=args.timestep_shift)
    for k in ("cfg_text_scale", "cfg_img_scale", "cfg_renorm_type", "cfg_renorm_min"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    if args.cfg_interval:
        lo, hi = (float(x) for x in args.cfg_interval.split(","))
        kw["cfg_interval"] = (lo, hi)
    return dataclasses.replace(default, **kw)


def prepare(eng, args, req: dict, flow):
    """(inputs for the task function, output size or None) of one request, or raises Skip."""
    from sgt_jax.data.instructions import SEGMENT_INSTRUCTION
    from sgt_jax.infer import tasks

    if "_error" in req:
        raise Skip("bad_request", req["_error"])
    path = lambda p: p if os.path.isabs(p) else os.path.join(req["_base"], p)
    field = FIELD[args.task]
    text = req.get(field)
    if args.task == "segment":
        text = text or args.instruction or SEGMENT_INSTRUCTION
    if not isinstance(text, str) or not text:
        raise Skip("bad_request", f"request {req['id']}: no {field!r}")
    if args.task == "answer":
        ims = req.get("images", [req["image"]] if "image" in req else [])
        images = [load_image(path(p)) for p in ims]
        ctx = tasks.answer_context(eng, images, text, think=args.think, think_prompt=args.think_prompt)
        n = tasks.context_tokens(eng, ctx) + args.max_new_tokens
        item = {"request": (images, text)}
    else:
        if args.task == "t2i":
            d = eng.cfg.bagel.latent_patch_size * 2 ** (len(eng.cfg.vae.ch_mult) - 1)
            big = eng.transforms.vae.max_size
            hw = (int(req.get("height", args.height or big)), int(req.get("width", args.width or big)))
            side = eng.cfg.bagel.max_latent_size * d
            if hw[0] % d or hw[1] % d or max(hw) > side or min(hw) < d:
                raise Skip("bad_size", f"request {req['id']}: {hw[0]}x{hw[1]} must be multiples of {d} px, "
                                       f"at most {side} (the latent position table)")
            item = {"inputs": tasks.t2i_inputs(text), "hw": hw}
        else:
            if "image" not in req:
                raise Skip("bad_request", f"request {req['id']}: no 'image'")
            image = load_image(path(req["image"]))
            inputs, hw = (tasks.edit_inputs(eng, image, text) if args.task == "edit" else
                          tasks.segment_inputs(eng, image, text, args.vae_condition))
            item = {"inputs": inputs, "hw": hw, "input_hw": image.shape[:2]}
        n = tasks.image_request_tokens(eng, item["inputs"], item["hw"], flow, think=args.think and args.task == "t2i",
                                       think_prompt=args.think_prompt, think_tokens=args.think_tokens)
    if n > args.max_context_tokens:
        raise Skip("prompt_too_long", f"request {req['id']}: needs {n} cache entries > --max-context-tokens="
                                      f"{args.max_context_tokens}")
    return item


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import numpy as np
    from PIL import Image as PILImage
    from tqdm import tqdm

    from sgt_jax.infer import tasks
    from sgt_jax.infer.engine import CheckpointNotFound, Engine, compile_counts
    from sgt_jax.parallel import mesh as mesh_lib

    t0 = time.time()
    try:
        spec = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
        mesh = mesh_lib.make_mesh(spec)
    except ValueError as e:
        print(f"error: --mesh {args.mesh!r}: {e}", file=sys.stderr)
        return 2
    try:
        eng = Engine.load(args.model, weights=args.weights, mesh=mesh, compute_dtype=args.dtype,
                          tokenizer_path=args.tokenizer, query_chunk=args.query_chunk)
    except (CheckpointNotFound, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if eng.tokenizer is None:
        print(f"error: {eng.source} has no tokenizer (a model dir without tokenizer/): pass --tokenizer DIR",
              file=sys.stderr)
        return 2
    if args.task != "answer" and not eng.has_vae:
        print(f"error: {eng.source} has no VAE: {args.task} needs one (import with ae.safetensors)", file=sys.stderr)
        return 2
    default_flow = {"answer": tasks.T2I_FLOW, "t2i": tasks.T2I_FLOW, "edit": tasks.EDIT_FLOW,
                    "segment": tasks.SEGMENT_FLOW}[args.task]
    try:
        flow = flow_config(args, default_flow)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    os.makedirs(args.out, exist_ok=True)

    jobs, skipped = [], []
    for req in read_requests(args):
        try:
            item = prepare(eng, args, req, flow)
        except Skip as e:
            skipped.append({"id": req.get("id"), "reason": e.reason, "detail": e.detail})
            print(f"skipped {req.get('id')}: {e}", file=sys.stderr)
            continue
        for s in (seeds or [int(req.get("seed", args.seed))]):
            oid = f"{req['id']}_s{s}" if seeds and len(seeds) > 1 else str(req["id"])
            jobs.append((oid, s, req, item))

    bar = tqdm(total=len(jobs), desc=args.task, disable=args.no_progress, file=sys.stderr)
    js = [j[1] for j in jobs]
    settings = {"model": eng.source, "batch_size": args.batch_size}
    common = dict(seeds=js, batch_size=args.batch_size, max_context_tokens=args.max_context_tokens, progress=bar)
    if args.task == "answer":
        settings.update(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, think=args.think)
        outs = tasks.answer(eng, [j[3]["request"] for j in jobs], max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, think=args.think,
                            think_prompt=args.think_prompt, **common) if jobs else []
    else:
        import dataclasses

        from sgt_jax.data.samples import resize

        settings.update(flow=dataclasses.asdict(flow))
        think = args.think and args.task == "t2i"
        imgs, thoughts = tasks.generate_images(eng, [j[3]["inputs"] for j in jobs], [j[3]["hw"] for j in jobs],
                                               flow=flow, think=think, think_prompt=args.think_prompt,
                                               think_tokens=args.think_tokens, temperature=args.temperature,
                                               **common)
        outs = []
        for (oid, _, _, item), im, th in zip(jobs, imgs, thoughts):
            if args.task == "segment" and args.resize_to_input:
                im = resize(im, item["input_hw"][1], item["input_hw"][0], "nearest")
            PILImage.fromarray(np.asarray(im)).save(os.path.join(args.out, f"{oid}.png"))
            outs.append({"image": f"{oid}.png", "size": list(np.asarray(im).shape[:2])}
                        | ({"think": th} if think else {}))
    bar.close()
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        for (oid, s, req, _), o in zip(jobs, outs):
            rec = {"id": oid, "task": args.task, "seed": s,
                   "request": {k: v for k, v in req.items() if not k.startswith("_")}, "output": o}
            with open(os.path.join(args.out, f"{oid}.json"), "w") as g:
                json.dump(rec | {"settings": settings}, g, indent=1)
            f.write(json.dumps(rec) + "\n")
    reasons = {}
    for s in skipped:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    summary = {"task": args.task, "model": eng.source, "outputs": len(outs), "skipped": reasons,
               "skipped_requests": skipped, "seconds": round(time.time() - t0, 2),
               "compilations": compile_counts(), "settings": settings}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{len(outs)} output(s) in {args.out}" + (f"; skipped {reasons}" if reasons else ""))
    return 0 if outs or not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
