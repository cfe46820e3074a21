"""Inference throughput on CPU: the tiny model through sgt_jax.infer and through BAGEL's own
PyTorch inference (InterleaveInferencer) on the same weights (tests/fixtures/bagel_golden/tiny_v1)
and the same prompts, in one process.

    python bench/generate.py --bagel-src BAGEL_CHECKOUT [--tokens 32] [--steps 24] [--repeats 3]

Run it with the torch venv of docs/convert.md (BAGEL needs transformers 4.49; jax comes from the
system site-packages: ``python3 -m venv --system-site-packages``). BAGEL's GPU-only imports get
scripts/check_bagel_loader.py's shims (fp32, pure-torch varlen attention).

* text: VQA (a 3x5-patch ViT image + a 7-token question), prefill + ``--tokens`` greedy steps;
  tokens/s = rows x tokens / wall time. BAGEL generates one request at a time (its
  ``generate_text`` stops on the first row only), so its batch-B time is B x its batch-1 time.
* image: editing (VAE + ViT image 64x48, 5-token instruction), text + image CFG (3 contexts),
  ``--steps`` Euler steps, VAE decode; images/s.

JAX times exclude the one-off compilation (reported separately); every number is the median of
``--repeats`` runs after a warm-up. Writes bench/results/generate.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def timed(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bagel-src", required=True)
    ap.add_argument("--weights", default=os.path.join(ROOT, "tests/fixtures/bagel_golden/tiny_v1"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24, help="Euler steps (num_timesteps - 1)")
    ap.add_argument("--batches", default="1,8", help="rows per batch for the JAX runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/generate.json"))
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    import torch
    from flax import nnx

    jax.config.update("jax_default_matmul_precision", "highest")
    import make_inference_golden as mig
    from sgt_jax.infer.context import Image, Text, cfg_contexts
    from sgt_jax.infer.engine import Engine
    from sgt_jax.infer.image import FlowConfig
    from sgt_jax.convert import check_golden as G
    from sgt_jax.convert.keymap import load_vae
    from sgt_jax.models.vae import AutoEncoder

    with open(os.path.join(args.weights, "meta.json")) as f:
        wmeta = json.load(f)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    question, instruction = rng.integers(0, 150, 7).tolist(), rng.integers(0, 150, 5).tolist()
    flow_kw = dict(num_timesteps=args.steps + 1, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=2.0,
                   cfg_interval=(0.4, 1.0), cfg_renorm_type="global", cfg_renorm_min=0.0)
    res = {"host": platform.node(), "cpu_count": os.cpu_count(), "tokens": args.tokens, "steps": args.steps,
           "repeats": args.repeats, "jax": {}, "bagel_torch": {}}

    # ---- BAGEL (PyTorch, unmodified inference code) ----
    model, vae = mig.build(os.path.abspath(args.bagel_src), args.weights, wmeta)
    from PIL import Image as PILImage

    from inferencer import InterleaveInferencer

    special = wmeta["config"]["special_tokens"]
    inf = InterleaveInferencer(model, vae, mig.IdTokenizer(special), mig.PixelTransform(16), mig.PixelTransform(14),
                               dict(special))
    pil = PILImage.fromarray(img)
    q, ins = mig.ids_text(question), mig.ids_text(instruction)
    with torch.no_grad():
        t_txt = timed(lambda: inf.interleave_inference([pil, q], understanding_output=True, do_sample=False,
                                                       max_think_token_n=args.tokens), args.repeats)
        torch.manual_seed(0)
        t_img = timed(lambda: inf.interleave_inference([pil, ins], **{**flow_kw, "cfg_interval": list(flow_kw["cfg_interval"])}),
                      args.repeats)
    res["bagel_torch"] = {"text_tokens_per_s_batch1": args.tokens / t_txt, "text_s_batch1": t_txt,
                          "images_per_s_batch1": 1 / t_img, "image_s_batch1": t_img,
                          "torch_threads": torch.get_num_threads()}

    # ---- sgt_jax.infer on the same weights ----
    fx = G.load_fixture(args.weights)
    cfg = G.config_from_meta(fx["meta"])
    ae = AutoEncoder(cfg, rngs=nnx.Rngs(0))
    load_vae(ae, fx["ae"])
    eng = Engine.from_model(G.build_model(cfg, fx["model"]), ae)
    vit_img = mig.PixelTransform(14)(pil).numpy().transpose(1, 2, 0)
    vae_img = mig.PixelTransform(16)(pil).numpy().transpose(1, 2, 0)
    flow = FlowConfig(**flow_kw)
    for b in [int(x) for x in args.batches.split(",")]:
        keys = eng.keys(list(range(b)))

        def text():
            cache = eng.prefill(eng.new_cache(b, 128), eng.pack([[Image(vit_img, vae=False), Text(question)]] * b))
            _, out = eng.generate_text(cache, keys, max_new_tokens=args.tokens)
            jax.block_until_ready(out["tokens"])

        gen, cfg_text, cfg_img = cfg_contexts([Image(vae_img, vit_image=vit_img), Text(instruction)])
        rows = [gen] * b + [cfg_text] * b + [cfg_img] * b

        def image():
            cache = eng.prefill(eng.new_cache(3 * b, 64), eng.pack(rows), eng.keys(list(range(b)) * 3))
            lat = eng.sample_latents(cache, 3, 4, flow, keys=keys)
            jax.block_until_ready(eng.decode_latents(lat, 3, 4)[1])

        t0 = time.perf_counter()
        text()
        image()
        compile_s = time.perf_counter() - t0
        tt, ti = timed(text, args.repeats), timed(image, args.repeats)
        res["jax"][f"batch{b}"] = {"text_tokens_per_s": b * args.tokens / tt, "text_s": tt,
                                   "images_per_s": b / ti, "image_s": ti, "first_call_s_incl_compile": compile_s}
    j1, bt = res["jax"]["batch1"], res["bagel_torch"]
    res["ratio_jax_over_torch"] = {
        "text_batch1": j1["text_tokens_per_s"] / bt["text_tokens_per_s_batch1"],
        "image_batch1": j1["images_per_s"] / bt["images_per_s_batch1"]}
    for k, v in res["jax"].items():
        res["ratio_jax_over_torch"][f"text_{k}"] = v["text_tokens_per_s"] / bt["text_tokens_per_s_batch1"]
        res["ratio_jax_over_torch"][f"image_{k}"] = v["images_per_s"] / bt["images_per_s_batch1"]
    res["versions"] = {"jax": jax.__version__, "torch": torch.__version__}
    print(json.dumps(res, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
