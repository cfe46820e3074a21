"""One process of a multi-process trainer job on this CPU host (tests/test_multihost.py).

    python tests/multihost_worker.py WORKDIR STEPS [--kill-at N] [--sleep S] [--save-every N]
        [--shards K]

The job is named by the environment, as on a pod: JAX_COORDINATOR_ADDRESS=localhost:PORT,
JAX_NUM_PROCESSES, JAX_PROCESS_ID (``initialize_distributed`` reads them), and the fake CPU
devices per process by XLA_FLAGS. The data is the tiny preset's real Grain pipeline over its
synthetic scenes in WORKDIR; each process reads its own shard. ``--shards K`` (one process
only): feed this process the concatenation of the K shards' slices, i.e. the global batch a
K-process job assembles -- the single-process reference run. ``--kill-at N``: SIGKILL this
process when it asks for batch N (counting from 0). Prints ``SUMMARY {json}`` at the end.
"""
import argparse
import json
import logging
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from sgt_jax.parallel.mesh import initialize_distributed  # noqa: E402

initialize_distributed()             # before any other JAX call

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from fake_data import tiny_run_config  # noqa: E402

from sgt_jax import batch as B  # noqa: E402
from sgt_jax.data.pipeline import make_train_iterator  # noqa: E402
from sgt_jax.train import loop  # noqa: E402


class Shards:
    """The slices of ``k`` processes' iterators concatenated (rows), as one global batch."""

    def __init__(self, cfg, workdir, k):
        self.its = [make_train_iterator(cfg.data, workdir=workdir, process_index=i, process_count=k)
                    for i in range(k)]

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self.its]
        batch = B.PackedBatch(**{f: np.concatenate([getattr(b, f) for b, _ in parts])
                                 for f in B.PackedBatch.__dataclass_fields__ if getattr(parts[0][0], f) is not None})
        return batch, parts[0][1]

    def get_state(self):
        return [it.get_state() for it in self.its]

    def set_state(self, states):
        for it, s in zip(self.its, states, strict=True):
            it.set_state(s)


class Wrapped:
    """An iterator that SIGKILLs its process when asked for batch ``kill_at`` or sleeps per batch."""

    def __init__(self, it, kill_at=None, sleep=0.0):
        self.it, self.kill_at, self.sleep, self.i = it, kill_at, sleep, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.sleep:
            time.sleep(self.sleep)
        self.i += 1
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("steps", type=int)
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--shards", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"[p{jax.process_index()}] %(name)s: %(message)s", force=True)
    for noisy in ("absl", "orbax", "jax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = tiny_run_config()
    cfg.train.update(steps=a.steps, save_every=a.save_every, log_every=1, warmup_steps=2)
    cfg.mesh.update(data=1, fsdp=-1, tensor=1)
    it = Shards(cfg, a.workdir, a.shards) if a.shards else loop.make_data_iterator(cfg, a.workdir)
    s = loop.train(cfg, a.workdir, data_iterator=Wrapped(it, a.kill_at, a.sleep), quiet=jax.process_index() != 0)
    out = {k: s[k] for k in ("steps", "preempted", "compiles_in_loop", "stop_agreement_s")}
    out.update(process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
               losses={h["step"]: h["loss"] for h in s["history"]})
    print("SUMMARY " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
