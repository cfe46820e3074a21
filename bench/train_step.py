"""Train-step benchmark on CPU: step time, tokens/s by kind, fraction of time waiting for data,
for the tiny and the small preset, measured in one run on the real synthetic-data pipeline.

    python bench/train_step.py [--steps 20] [--presets tiny,small]

Writes bench/results/train_step.json. Wall-clock numbers are machine-dependent (this is a shared
2-core CPU); the ratios (small/tiny time per token, data-wait fraction) are the point.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sgt_jax.data.pipeline import ensure_tokenizer, make_train_iterator  # noqa: E402
from sgt_jax.train import loop  # noqa: E402


def run(preset: str, steps: int, workdir: str) -> dict:
    cfg = importlib.import_module(f"configs.{preset}").get_config()
    setup = loop.Program(cfg)
    state, consts = setup.init(0)
    tok = ensure_tokenizer(cfg.data, workdir)
    it = make_train_iterator(cfg.data, workdir=workdir, tokenizer=tok)
    local, _ = next(it)
    t = time.perf_counter()
    state, m = setup.step_fn(state, consts, setup.global_batch(local))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    wait, step_times, tokens = 0.0, [], {"text": 0, "vit": 0, "latent": 0, "pad": 0}
    t0 = time.perf_counter()
    for _ in range(steps):
        tw = time.perf_counter()
        local, _ = next(it)
        wait += time.perf_counter() - tw
        ts = time.perf_counter()
        state, m = setup.step_fn(state, consts, setup.global_batch(local))
        m = jax.device_get(m)
        step_times.append(time.perf_counter() - ts)
        for k in tokens:
            tokens[k] += int(m[f"tokens_{k}"])
    total = time.perf_counter() - t0
    real = tokens["text"] + tokens["vit"] + tokens["latent"]
    return {"preset": preset, "rows": cfg.data.rows_per_batch, "tokens_per_row": cfg.data.tokens_per_row,
            "compile_s": compile_s, "median_step_s": float(np.median(step_times)),
            "tokens_per_s": real / total, "tokens_per_s_by_kind": {k: v / total for k, v in tokens.items()},
            "padding_fraction": tokens["pad"] / max(sum(tokens.values()), 1),
            "data_wait_fraction": wait / total, "steps": steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step.json"))
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as wd:
        for p in a.presets.split(","):
            results[p] = run(p, a.steps, os.path.join(wd, p))
            r = results[p]
            print(f"{p:6s} step {r['median_step_s']*1e3:7.1f} ms  {r['tokens_per_s']:8.0f} tok/s  "
                  f"data wait {100*r['data_wait_fraction']:.1f}%  padding {100*r['padding_fraction']:.1f}%  "
                  f"(compile {r['compile_s']:.1f} s)")
    names = list(results)
    report = {"results": results, "machine": {"backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                                              "platform": platform.platform()}}
    if len(names) == 2:
        a_, b_ = results[names[0]], results[names[1]]
        report["ratio_step_time"] = b_["median_step_s"] / a_["median_step_s"]
        report["ratio_tokens_per_s"] = b_["tokens_per_s"] / a_["tokens_per_s"]
        print(f"{names[1]}/{names[0]}: step time x{report['ratio_step_time']:.2f}, "
              f"tokens/s x{report['ratio_tokens_per_s']:.2f}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
