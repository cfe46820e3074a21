"""Run the trainer on FakeIterator in a subprocess (resume / kill / SIGTERM tests).

    python tests/train_worker.py WORKDIR STEPS [--kill-at N] [--sleep S] [--save-every N] [--sync]
        [--fsize-limit-at N]

A CheckpointError / ConfigError is printed as one line ``ERROR <message>`` (exit 1).
"""
import argparse
import json
import os
import resource
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from fake_data import FakeIterator  # noqa: E402
from test_train import tiny_run_config  # noqa: E402

from sgt_jax.train import loop  # noqa: E402
from sgt_jax.train.checkpoint import CheckpointError  # noqa: E402
from sgt_jax.train.config import ConfigError  # noqa: E402


class KillAfter(FakeIterator):
    """SIGKILLs the process when asked for batch number ``kill_at`` (after earlier saves); or,
    asked for batch ``fsize_limit_at``, limits the size of every file written from then on to
    64 KiB (RLIMIT_FSIZE: writes past it fail with EFBIG), a fault injected under Orbax."""

    def __init__(self, *a, kill_at=None, sleep=0.0, fsize_limit_at=None, workdir=None, **kw):
        super().__init__(*a, **kw)
        self.kill_at, self.sleep, self.fsize_limit_at, self.workdir = kill_at, sleep, fsize_limit_at, workdir

    def __next__(self):
        if self.kill_at is not None and self.i == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fsize_limit_at is not None and self.i == self.fsize_limit_at:
            ck, deadline = os.path.join(self.workdir, "checkpoints"), time.time() + 120
            while any("tmp" in n for n in os.listdir(ck)) and time.time() < deadline:
                time.sleep(0.1)             # the saves in flight finish first
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        if self.sleep:
            time.sleep(self.sleep)
        return super().__next__()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("steps", type=int)
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--fsize-limit-at", type=int)
    a = ap.parse_args()
    cfg = tiny_run_config(steps=a.steps, save_every=a.save_every)
    cfg.train.async_checkpointing = not a.sync
    it = KillAfter(cfg, rows=2, kill_at=a.kill_at, sleep=a.sleep, fsize_limit_at=a.fsize_limit_at,
                  workdir=a.workdir)
    try:
        s = loop.train(cfg, a.workdir, data_iterator=it, quiet=False)
    except (CheckpointError, ConfigError) as e:
        print("ERROR " + str(e).replace("\n", " | "), flush=True)
        sys.exit(1)
    print("SUMMARY " + json.dumps({k: s[k] for k in ("steps", "preempted", "compiles_in_loop")}), flush=True)


if __name__ == "__main__":
    main()
