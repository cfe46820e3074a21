"""Build the data indexes a run config needs, once, before the first pod run.

    python -m sgt_jax.data.index --config configs/<preset>.py --workdir WORKDIR \
        [--config.<key>=<value> ...] [--workers N] [--check=false]

A remote tar shard is indexed (member name -> offset, size) from its headers, one ranged GET per
member: minutes for an SA-1B shard of ~11k files. Without this command every host of a pod does
that for every shard at its first start. This command resolves the config's data sources as the
trainer does (``cfg.data.sources``, ``{workdir}`` expanded, ``;``-joined specs), and builds every
index they would build -- tar member indexes and the line index of a remote LLaVA ``.jsonl`` --
with N parallel workers (threads: the work is I/O bound) into ``WORKDIR/index_cache`` (a ``gs://``
workdir too) and the local cache. The hosts of the run then only read the cache (the key is the
URL, the size and the object generation, so a rewritten shard is indexed again).

Idempotent: a second run finds every index cached (``already_cached``) and reads no tar header; an
index found only in the local cache is copied to ``WORKDIR/index_cache``. With ``--check`` (the
default) the sources are then built exactly as the trainer builds them (``pipeline.make_sources``:
this reads the caches, lists folders, and loads small index files such as a ``.json`` list) and
their record counts are reported.

Prints a progress line (stderr) and a JSON summary (stdout): ``indexed`` / ``already_cached``
(counts), ``streamed`` (tars read in big windows: small members, see
``sources.tar.TAR_STREAM_BELOW``), ``members`` (tar members + jsonl lines), ``bytes_read`` / ``reads`` (of the data, for
the indexes built now), ``failed`` (path -> error), ``records`` (per stream, with ``--check``),
``seconds``. Exit status 1 if an index failed.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import threading
import time


def targets(cfg, workdir: str | None) -> list[tuple[str, str]]:
    """Unique (kind, path) indexes of the data config's sources, in config order."""
    from sgt_jax.data.sources.registry import index_targets

    out: dict[tuple[str, str], None] = {}
    for spec in cfg.sources.values():
        for part in [p.strip().format(workdir=workdir or "") for p in spec.split(";") if p.strip()]:
            out.update(dict.fromkeys(index_targets(part)))
    return list(out)


def run(run_cfg, *, workdir: str, workers: int = 16, check: bool = True, log=None) -> dict:
    """Build the indexes (see the module doc); returns the summary."""
    from sgt_jax import fileio
    from sgt_jax.data.sources.registry import build_index

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cfg = run_cfg.data if "data" in run_cfg else run_cfg
    t0 = time.perf_counter()
    todo = targets(cfg, workdir)
    log(f"sgt-jax data index: {len(todo)} index(es) for {len(cfg.sources)} stream(s) -> "
        f"{fileio.join(workdir, 'index_cache')} ({workers} workers)")
    tot = {"indexed": 0, "already_cached": 0, "streamed": 0, "members": 0, "bytes_read": 0,
           "reads": 0}
    failed: dict[str, str] = {}
    lock = threading.Lock()
    done = [0]
    last = [0.0]

    def progress(final=False):
        now = time.perf_counter()
        if not final and now - last[0] < 1.0:
            return
        last[0] = now
        log(f"[{done[0]}/{len(todo)}] indexed {tot['indexed']}, cached {tot['already_cached']}, "
            f"failed {len(failed)}, members {tot['members']}, "
            f"{tot['bytes_read'] / 2 ** 20:.1f} MiB in {tot['reads']} reads, {now - t0:.0f}s")

    def one(t):
        kind, path = t
        try:
            st = build_index(kind, path, workdir=workdir)
        except Exception as e:  # noqa: BLE001 -- reported per path, the others go on
            with lock:
                failed[path] = f"{type(e).__name__}: {e}"
                done[0] += 1
                progress()
            return
        with lock:
            tot["already_cached" if st["cached"] else "indexed"] += 1
            tot["streamed"] += bool(st.get("streamed"))
            for k in ("members", "bytes_read", "reads"):
                tot[k] += st.get(k, 0)
            done[0] += 1
            progress()

    if todo:
        with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(todo)))) as pool:
            list(pool.map(one, todo))
    progress(final=True)
    summary = {"workdir": workdir, "indexes": len(todo),
               "tar_shards": sum(k == "tar" for k, _ in todo),
               "jsonl_files": sum(k == "jsonl" for k, _ in todo), **tot, "failed": failed}
    if check and not failed:
        from sgt_jax.data import pipeline

        srcs = pipeline.make_sources(cfg, workdir)
        summary["records"] = {name: (sum(len(x) for x in s) if isinstance(s, pipeline.Concat)
                                     else len(s)) for name, s in srcs.items()}
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    here = os.path.dirname(os.path.abspath(__file__))
    config_flags.DEFINE_config_file("config", os.path.join(here, "..", "..", "configs", "tiny.py"),
                                    "a configs/<preset>.py file (its `data` section is indexed)",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "the run's workdir: indexes go to WORKDIR/index_cache")
    flags.DEFINE_integer("workers", 16, "indexes built in parallel (threads)")
    flags.DEFINE_bool("check", True, "afterwards build the sources as the trainer does (from the "
                      "cache) and report their record counts")
    flags.mark_flags_as_required(["workdir"])
    status = [0]

    def _main(args):
        del args
        F = flags.FLAGS
        from sgt_jax.data.sources.base import SpecError

        try:
            s = run(F.config, workdir=F.workdir, workers=F.workers, check=F.check)
        except SpecError as e:
            print(e.one_line(), file=sys.stderr, flush=True)
            status[0] = 2
            return 2
        print(json.dumps(s, indent=1), flush=True)
        status[0] = 1 if s["failed"] else 0
        return status[0]

    app.run(_main, argv=argv)
    return status[0]


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
