"""Command line: ``python -m sgt_jax.train --config configs/<preset>.py [--config.<key>=<value> ...]
--workdir DIR``. Starts from random init or ``train.init_from`` (an imported BAGEL model dir),
and resumes automatically from the last good checkpoint in DIR."""
import signal
import threading
import time

T_START = time.perf_counter()

# First thing, before the heavy imports: a SIGTERM (TPU preemption) from here on is a clean stop.
SIGTERM = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: SIGTERM.set())

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.py"),
                                "a configs/<preset>.py file", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, tensorboard/, loss_curve.png")
flags.DEFINE_string("compilation_cache", "auto",
                    "persistent XLA compilation cache (a warm run skips compiling the step): a directory, "
                    "'auto' = $JAX_COMPILATION_CACHE_DIR if set, else $SGT_JAX_CACHE_DIR/xla "
                    "(default ~/.cache/sgt_jax/xla); '' = off")
flags.mark_flags_as_required(["workdir"])


def compilation_cache(value: str) -> str:
    """Turn on JAX's persistent compilation cache (docs/performance.md); returns the dir or ''."""
    import jax

    if value == "auto":
        value = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
        if not value:
            from sgt_jax.fileio import local_cache_dir

            value = local_cache_dir("xla")
    if value:
        jax.config.update("jax_compilation_cache_dir", value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return value


def main(argv):
    del argv
    from sgt_jax.parallel.mesh import initialize_distributed

    initialize_distributed()      # before any other JAX call, on pods
    import jax

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from sgt_jax.train.checkpoint import CheckpointError
    from sgt_jax.train.config import ConfigError
    from sgt_jax.train.loop import NonFiniteLossError, train

    cfg = flags.FLAGS.config
    workdir = flags.FLAGS.workdir
    cache = compilation_cache(flags.FLAGS.compilation_cache)
    print(f"sgt-jax: {jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"{jax.process_count()} process(es); workdir {workdir}; compilation cache {cache or 'off'}", flush=True)
    if SIGTERM.is_set() and jax.process_count() == 1:     # several processes agree inside train()
        print("stopped by SIGTERM before training started; rerun the same command to start or resume")
        return 0
    from sgt_jax.data.sources import SpecError

    from sgt_jax.eval.runner import make_hook, summary_line

    try:
        hook = make_hook(cfg, workdir)
    except ValueError as e:           # the eval block against the data config: one line
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    t_train = time.perf_counter()
    try:
        s = train(cfg, workdir, sigterm=SIGTERM, evaluate=hook)
    except SpecError as e:            # a data-source spec error: one line, no traceback
        print(e.one_line(), file=sys.stderr, flush=True)
        return 2
    except (ConfigError, CheckpointError, NonFiniteLossError) as e:
        # a clear message, not a traceback: these name the key or file and the fix
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if jax.process_index() == 0:
        h = s["history"]
        if h:
            first, last = h[0], h[-1]
            print(f"\nsteps {s['steps']}: loss {first['loss']:.4f} -> {last['loss']:.4f}, "
                  f"segmentation MSE {first['mse']:.4f} -> {last['mse']:.4f}, VQA CE {first['ce']:.4f} -> {last['ce']:.4f}")
        for row in (s["eval"][:1] + s["eval"][-1:]) if len(s["eval"]) > 1 else s["eval"]:
            print(summary_line(row["step"], row))
        if s["eval"]:
            print(f"eval grids:  {os.path.join(workdir, 'eval')}/grid_<step>.png (and TensorBoard eval/grid)")
        print(f"train step compiled {s['compiles_in_loop']} time(s) in this run")
        tm = s["timing"]
        if "to_first_step_s" in tm:
            print(f"time to first step: {t_train - T_START + tm['to_first_step_s']:.1f} s from the command's start "
                  f"(imports {t_train - T_START:.1f} s, state {tm['state_s']:.1f} s, eval at start "
                  f"{tm.get('eval_at_start_s', 0.0):.1f} s, first step incl. its compile {tm['first_step_s']:.1f} s)")
        print(f"checkpoints: {s['checkpoints']}\nmetrics:     {s['metrics']}\n"
              f"tensorboard: {s['tensorboard']}\nloss curve:  {s['loss_curve']}")
        if s["preempted"]:
            print(f"stopped by SIGTERM at step {s['steps']}, which is checkpointed; rerun the same command to resume")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
