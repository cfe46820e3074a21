"""Run the tiny Unified-GRPO loop in a subprocess (resume / kill tests).

    python tests/rl_worker.py WORKDIR [--kill-after N]

Prints one JSON line ``RESULT {...}``: the logged rows and a digest of the final parameters."""
import argparse
import hashlib
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sgt_jax.rl import loop  # noqa: E402


def tiny_rl_config():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "uae_tiny.py")
    spec = importlib.util.spec_from_file_location("uae_tiny", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.rl.update(stages="und:3,gen:1", images_per_step=1, group_size=2, max_caption_tokens=4, num_timesteps=2,
                  eval_every=0, updates_per_batch=2)
    cfg.train.update(steps=4, save_every=2, keep=3, async_checkpointing=False, log_every=1)
    return cfg


def digest(tree) -> str:
    h = hashlib.sha256()
    for x in jax.tree.leaves(jax.device_get(tree)):
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--kill-after", type=int, default=None)
    a = ap.parse_args()

    cfg = tiny_rl_config()
    final = {}

    def on_step(step, state):
        if a.kill_after is not None and step == a.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == cfg.train.steps:
            final["params"], final["ema"] = digest(state.params), digest(state.ema)

    s = loop.train(cfg, a.workdir, on_step=on_step)
    from sgt_jax.train.checkpoint import Checkpointer
    from sgt_jax.train.metrics import read_rows

    print("RESULT " + json.dumps({"history": s["history"], "compiles": s["compiles_in_loop"], **final,
                                  "rows": read_rows(os.path.join(a.workdir, "metrics.jsonl")) if os.path.exists(
                                      os.path.join(a.workdir, "metrics.jsonl")) else [],
                                  "steps": Checkpointer(os.path.join(a.workdir, "checkpoints")).steps()}), flush=True)


if __name__ == "__main__":
    main()
