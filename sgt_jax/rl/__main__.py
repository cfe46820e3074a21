"""Command line: ``python -m sgt_jax.rl --config configs/uae_tiny.py [--config.<key>=<value> ...]
--workdir DIR``. UAE's Unified-GRPO stages (``rl.stages``) from random init or
``train.init_from`` (an imported BAGEL model dir); resumes from the last good checkpoint in DIR
(docs/rl.md)."""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "uae_tiny.py"),
                                "a configs/uae_<preset>.py file", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, tensorboard/")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from sgt_jax.parallel.mesh import initialize_distributed

    initialize_distributed()
    import jax

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from sgt_jax.rl.loop import train
    from sgt_jax.train.checkpoint import CheckpointError

    cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    tok = None
    if cfg.rl.get("tokenizer_path"):
        from sgt_jax.data.tokenizer import load_tokenizer
        tok = load_tokenizer(cfg.rl.tokenizer_path)
    print(f"sgt-jax rl: {jax.device_count()} {jax.devices()[0].platform} device(s); workdir {workdir}", flush=True)
    try:
        s = train(cfg, workdir, tokenizer=tok)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if jax.process_index() == 0:
        for row in s["eval"]:
            sims = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("step", "caption_len"))
            print(f"step {row['step']:>5}: held-out reconstruction similarity {sims}; "
                  f"caption length {row['caption_len']:.1f}")
        print(f"rl step compiled {s['compiles_in_loop']} time(s) in this run (one per stage kind)")
        print(f"metrics: {s['metrics']}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
