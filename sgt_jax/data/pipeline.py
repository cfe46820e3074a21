"""The Grain pipeline: sources -> streams -> samples -> mixing -> packing -> (PackedBatch, stats).

    it = make_train_iterator(cfg, workdir=W, process_index=jax.process_index(),
                             process_count=jax.process_count())
    batch, stats = next(it)      # numpy PackedBatch of rows_per_batch / process_count rows
    state = it.get_state()       # JSON-serialisable; it.set_state(state) continues exactly
    # the trainer stores it per process: checkpoints/<step>/data/process_<i>.json (train/checkpoint.py)

Streams. Each source (``cfg.sources``: name -> spec, ``sources.make_source``; any Sequence of
records works too) becomes ``grain.MapDataset.source(src).shuffle(seed).repeat()``: an infinite,
random-access, per-epoch reshuffled stream. Position ``g`` of stream ``s`` always holds the same
record and builds the same sample (its randomness is ``samples.sample_rng(seed, s, g)``).

Sharding. Process ``p`` of ``P`` and Grain worker ``w`` of ``W`` (``mp_prefetch`` slices the
dataset through ``set_slice``) own the positions ``g = m * (P*W) + (w*P + p)``, m = 0, 1, ...:
disjoint shards of every stream. Each worker packs whole batches from its shard; the process
yields them round-robin; the global batch is the concatenation of the processes' slices.

Mixing (``cfg.mix``), per batch (= per process slice, hence also globally):
  samples  groups of integer counts (2 seg + 1 vqa), placed atomically by the packer: every batch
           holds whole groups, the ratio is exact in every batch;
  tokens   the next sample comes from the stream furthest below its token share (deterministic);
  weights  i.i.d. stream draws with the official code's sampling weights (seeded per draw).

State. A worker's state is tiny and JSON: stream cursors, mixing counters, and the packer's buffer
as (stream, position) descriptors -- restored by rebuilding those samples, which are pure
functions of their position. The outer iterator adds cumulative counters. Restoring needs the same
process and worker counts (checked).

Bad input. ``BadRecord`` from a source or a builder is skipped and counted under
``skipped/<reason>``; any other exception while building a sample under
``skipped/error_<Type>`` -- an unnamed defect, i.e. a reader bug: logged as a WARNING in the main
process with the exception, every batch it happens; a sample that can never fit a row is dropped
and counted under ``dropped/<reason>``; ``packer.max_consecutive_errors`` failures in a row on one
stream raise. Records the sources dropped while indexing (``source.index_counts()``: keys without
their image, damaged tar headers) are ``index/<reason>``, counted once per run.
"""
from __future__ import annotations

import collections
import concurrent.futures
import fractions
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Mapping

import grain
import numpy as np

from sgt_jax import fileio
from sgt_jax.data import config as config_lib
from sgt_jax.data.packer import BestFitPacker, RowSpec, assemble, batch_stats, fit_reason
from sgt_jax.data.records import BadRecord
from sgt_jax.data.samples import Sample, SampleBuilder
from sgt_jax.data.tokenizer import Tokenizer, build_tiny_tokenizer, local_copy

log = logging.getLogger(__name__)


def _seed32(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def integer_ratios(ratios: Mapping[str, float]) -> dict[str, int]:
    """{'seg': 2, 'vqa': 1} -> itself; {'a': 0.5, 'b': 0.25} -> {'a': 2, 'b': 1} (smallest integers)."""
    fr = {k: fractions.Fraction(v).limit_denominator(1000) for k, v in ratios.items()}
    den = 1
    for f in fr.values():
        den = den * f.denominator // np.gcd(den, f.denominator)
    ints = {k: int(f * den) for k, f in fr.items()}
    g = 0
    for v in ints.values():
        g = int(np.gcd(g, v))
    return {k: v // g for k, v in ints.items()}


def ensure_tokenizer(cfg, workdir: str | None) -> Tokenizer:
    """The tokenizer at ``cfg.tokenizer_path`` ({workdir} expanded). If that path is inside the
    workdir and absent, a tiny BPE tokenizer is built there (atomically).

    A URL path (gs://...) is copied to local disk once per process (``tokenizer.local_copy``) and
    the returned Tokenizer reads the copy (Grain workers then load it from disk, no download). With
    a URL workdir the tiny tokenizer is built locally (a temp dir), uploaded to
    ``{workdir}/tokenizer`` for the record unless it is already there, and read from a local copy
    of what the URL holds; the build is deterministic, so hosts racing to upload write the same
    files."""
    path = cfg.tokenizer_path.format(workdir=workdir or "")
    if fileio.is_remote(path):
        inside = workdir and path.rstrip("/").startswith(fileio.abspath(workdir) + "/")
        # the tiny build uploads tokenizer.json last: without it an interrupted upload is redone
        if not (fileio.exists(fileio.join(path, "tokenizer.json")) if inside else fileio.listdir(path)):
            if not inside:
                raise FileNotFoundError(
                    f"data.tokenizer_path={path!r} does not exist (no files under it): point it at a "
                    "Qwen2 tokenizer dir, e.g. gs://BUCKET/MODEL_DIR/tokenizer of an imported model dir "
                    "(or leave the default '{workdir}/tokenizer' to build a tiny one)")
            with tempfile.TemporaryDirectory(prefix="sgt_tiny_tokenizer") as tmp:
                build_tiny_tokenizer(tmp, vocab_size=cfg.tiny_tokenizer_vocab_size)
                for name in sorted(os.listdir(tmp), key=lambda n: (n == "tokenizer.json", n)):
                    fileio.copy(os.path.join(tmp, name), fileio.join(path, name))
        return Tokenizer(local_copy(path))
    if not os.path.isdir(path):
        inside = workdir and os.path.abspath(path).startswith(os.path.abspath(workdir) + os.sep)
        if not inside:
            raise FileNotFoundError(f"data.tokenizer_path={path!r} does not exist: point it at a Qwen2 "
                                    "checkpoint directory (or leave the default '{workdir}/tokenizer' to "
                                    "build a tiny one)")
        tmp = f"{path}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("building a tiny tokenizer in %s", path)
        build_tiny_tokenizer(tmp, vocab_size=cfg.tiny_tokenizer_vocab_size)
        try:
            os.rename(tmp, path)
        except OSError:                      # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return Tokenizer(path)


class Concat(tuple):
    """Several sources read as one stream (``;`` in a spec)."""


def make_sources(cfg, workdir: str | None) -> dict[str, object]:
    """name -> source, from the spec strings (``;`` joins several specs of one stream)."""
    from sgt_jax.data.sources.registry import make_source    # lazy: sources pull in optional readers

    out = {}
    for name, spec in cfg.sources.items():
        parts = [p.strip().format(workdir=workdir or "") for p in spec.split(";") if p.strip()]
        srcs = [make_source(p, seed=int(cfg.seed), workdir=workdir) for p in parts]
        if cfg.get("proxy") and name == cfg.proxy_stream:
            from sgt_jax.data.proxy.source import ProxyRecords
            srcs = [ProxyRecords(s, cfg.proxy, str(cfg.proxy_options.depth_dir)) for s in srcs]
        out[name] = srcs[0] if len(srcs) == 1 else Concat(srcs)
    return out


def index_counts(sources: Mapping[str, object]) -> dict[str, int]:
    """Records the sources dropped while indexing, by reason, summed over every stream (sources
    without ``index_counts``, e.g. plain lists, count nothing)."""
    out: collections.Counter = collections.Counter()
    for src in sources.values():
        for s in (src if isinstance(src, Concat) else [src]):
            fn = getattr(s, "index_counts", None)
            if fn is not None:
                out.update({k: int(v) for k, v in fn().items() if v})
    return dict(sorted(out.items()))


def _stream_dataset(name: str, src, seed: int) -> grain.MapDataset:
    srcs = list(src) if isinstance(src, Concat) else [src]
    parts = []
    for s in srcs:
        if len(s) == 0:
            raise ValueError(f"data source for stream {name!r} is empty: {s!r}")
        parts.append(grain.MapDataset.source(s))
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
    return ds.shuffle(seed=_seed32(seed, "shuffle", name)).repeat()


# ------------------------------------------------------------------------------------------------
# the packing dataset (runs in each Grain worker)

class PackIterDataset(grain.IterDataset):
    """Streams -> mixed groups -> best-fit packed ``(PackedBatch, info)``; supports Grain worker slicing."""

    def __init__(self, cfg, sources: Mapping[str, object], tokenizer: Tokenizer, *,
                 process_index: int = 0, process_count: int = 1):
        super().__init__()
        self.cfg = cfg
        self.sources = dict(sources)
        self.tokenizer = tokenizer
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.worker = (0, 1)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:   # grain SupportsInPlaceSlicing
        self.worker = (sl.start or 0, sl.step or 1)

    def __iter__(self) -> "PackIterator":
        return PackIterator(self)

    def __str__(self) -> str:
        return f"PackIterDataset(streams={list(self.sources)}, process={self.process_index}/{self.process_count})"


class PackIterator(grain.DatasetIterator):
    _pool = None

    def __init__(self, ds: PackIterDataset):
        super().__init__()
        cfg = ds.cfg
        self.cfg = cfg
        w, nw = ds.worker
        self.shard = (w * ds.process_count + ds.process_index, nw * ds.process_count)
        self._tokenizer = ds.tokenizer
        self._builder = None       # lazy: Grain may build iterators only to read their state
        self.spec = RowSpec.from_config(cfg)
        self.rows = cfg.rows_per_batch // ds.process_count
        self.packer = BestFitPacker(self.spec, self.rows, cfg.packer.max_buffer)
        self.streams = list(ds.sources)
        self.maps = {s: _stream_dataset(s, ds.sources[s], int(cfg.seed)) for s in self.streams}
        self.mode = cfg.mix.mode
        if self.mode == "weights":
            w_ = np.array([float(cfg.mix.weights[s]) for s in self.streams])
            self.probs = w_ / w_.sum()
        else:
            ints = integer_ratios({s: cfg.mix.ratios[s] for s in self.streams})
            self.ratios = ints
            self.pattern = [s for s in self.streams for _ in range(ints[s])]
        self.max_errors = int(cfg.packer.max_consecutive_errors)
        self.cursor = {s: 0 for s in self.streams}
        self.tokens = {s: 0 for s in self.streams}
        self.draws = 0
        self.batches = 0
        self.pending: collections.Counter = collections.Counter()
        self.errors: list[str] = []
        self.read_threads = int(cfg.grain.read_threads)
        self._futures: dict[tuple[str, int], concurrent.futures.Future] = {}

    # ---- samples ----
    @property
    def builder(self) -> SampleBuilder:
        if self._builder is None:
            self._builder = SampleBuilder(self.cfg, self._tokenizer)
        return self._builder

    def _build(self, s: str, g: int) -> Sample:
        return self.builder(self.maps[s][g], stream=s, index=g)

    def _get(self, s: str, m: int) -> Sample:
        k, K = self.shard
        g = m * K + k
        if not self.read_threads:
            return self._build(s, g)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.read_threads)
        for j in range(m, m + 2 * self.read_threads + 1):   # read ahead on this stream
            key = (s, j * K + k)
            if key not in self._futures:
                self._futures[key] = self._pool.submit(self._build, s, key[1])
        return self._futures.pop((s, g)).result()

    def _next_sample(self, s: str) -> Sample:
        fails = 0
        while True:
            m = self.cursor[s]
            self.cursor[s] += 1
            try:
                sample = self._get(s, m)
            except BadRecord as e:
                self.pending[f"skipped/{e.reason}"] += 1
                last = e
            except Exception as e:      # a reader bug or an unexpected file: count, log, go on
                self.pending[f"skipped/error_{type(e).__name__}"] += 1
                msg = f"stream {s} position {m}: {type(e).__name__}: {e}"
                log.debug("%s", msg)
                if len(self.errors) < 5:     # warned by the main process (StatsIterator)
                    self.errors.append(msg[:500])
                last = e
            else:
                reason = fit_reason(sample, self.spec)
                if reason is None:
                    return sample
                self.pending[f"dropped/{reason}"] += 1
                last = ValueError(f"sample {sample.key!r} dropped: {reason}")
            fails += 1
            if fails >= self.max_errors:
                raise RuntimeError(f"data stream {s!r}: {fails} records in a row were skipped or dropped "
                                   f"(last: {last}); check the source spec and the row budgets") from last

    def _next_group(self) -> list[Sample]:
        if self.mode == "samples":
            return [self._next_sample(s) for s in self.pattern]
        if self.mode == "tokens":
            active = [s for s in self.streams if self.ratios[s] > 0]
            s = min(active, key=lambda x: (self.tokens[x] / self.ratios[x], self.streams.index(x)))
            sample = self._next_sample(s)
            self.tokens[s] += sample.num_tokens
            return [sample]
        k, K = self.shard
        rng = np.random.default_rng([int(self.cfg.seed) & 0xFFFFFFFF, 0x6D6978, K, k, self.draws])
        self.draws += 1
        return [self._next_sample(self.streams[int(rng.choice(len(self.streams), p=self.probs))])]

    # ---- iterator ----
    def __next__(self):
        rows, ev = self.packer.pack(self._next_group)
        self.pending.update(ev)
        batch = assemble(rows, self.spec)
        info = {"batch": batch_stats(batch, rows), "events": dict(self.pending), "errors": self.errors}
        self.pending.clear()
        self.errors = []
        self.batches += 1
        return batch, info

    def get_state(self) -> dict:
        return {"shard": list(self.shard), "cursor": dict(self.cursor), "tokens": dict(self.tokens),
                "draws": self.draws, "batches": self.batches, "pending": dict(self.pending),
                "buffer": [[[s.stream, int(s.index)] for s in grp] for grp in self.packer.buffer]}

    def set_state(self, state: dict) -> None:
        if list(state["shard"]) != list(self.shard):
            raise ValueError(f"data iterator state was saved for shard {state['shard']} (index, count over "
                             f"processes x workers) but this iterator is shard {list(self.shard)}: restore "
                             "with the same process count and grain.num_workers")
        if set(state["cursor"]) != set(self.streams):
            raise ValueError(f"data iterator state has streams {sorted(state['cursor'])}, config has "
                             f"{sorted(self.streams)}")
        self.cursor = {s: int(v) for s, v in state["cursor"].items()}
        self.tokens = {s: int(v) for s, v in state["tokens"].items()}
        self.draws, self.batches = int(state["draws"]), int(state["batches"])
        self.pending = collections.Counter(state["pending"])
        self._futures.clear()
        self.packer.buffer = [[self._build(s, g) for s, g in grp] for grp in state["buffer"]]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        super().close()


# ------------------------------------------------------------------------------------------------
# the outer iterator (main process): cumulative counters

class StatsIterDataset(grain.IterDataset):
    def __init__(self, parent, index: Mapping[str, int] | None = None):
        super().__init__(parent)
        self.index = dict(index or {})

    def __iter__(self) -> "StatsIterator":
        return StatsIterator(self._parent.__iter__(), self.index)

    def __str__(self) -> str:
        return "StatsIterDataset"


class StatsIterator(grain.DatasetIterator):
    """Yields ``(PackedBatch, stats)``: ``batch/*`` this batch (tokens by kind, fill, samples by
    stream), ``total/*`` cumulative since step 0 (the same plus ``skipped/<reason>``,
    ``dropped/<reason>``, ``deferred``, ``batches``, and ``index/<reason>``: the records the
    sources dropped while indexing, ``index_counts``). Logs a WARNING for every batch in which
    records were skipped by an unexpected exception (``skipped/error_<Type>``)."""

    def __init__(self, parent, index: Mapping[str, int] | None = None):
        super().__init__(parent)
        self.index = {f"index/{k}": int(v) for k, v in (index or {}).items()}
        self.totals: collections.Counter = collections.Counter(self.index)

    def __next__(self):
        batch, info = next(self._parent)
        st = info["batch"]
        self.totals.update(info["events"])
        errors = {k: v for k, v in info["events"].items() if k.startswith("skipped/error_")}
        if errors:
            total = {k: self.totals[k] for k in sorted(self.totals) if k.startswith("skipped/error_")}
            log.warning("data: %d record(s) of this batch skipped by an unexpected exception %s "
                        "(run total %s): an unnamed defect is a reader bug -- please report it with "
                        "the record. %s", sum(errors.values()), errors, total,
                        " | ".join(info.get("errors") or ()))
        self.totals.update({k: v for k, v in st.items() if k.startswith(("tokens/", "samples"))})
        self.totals["rows"] += st["rows"]
        self.totals["batches"] += 1
        stats = {f"batch/{k}": v for k, v in st.items()}
        stats.update({f"total/{k}": v for k, v in sorted(self.totals.items())})
        return batch, stats

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "totals": dict(self.totals)}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.totals = collections.Counter(state["totals"])
        for k in [k for k in self.totals if k.startswith("index/")]:
            del self.totals[k]
        self.totals.update(self.index)           # what the sources of this run dropped


def make_dataset(cfg, *, workdir: str | None, process_index: int = 0, process_count: int = 1,
                 sources: Mapping[str, object] | None = None, tokenizer: Tokenizer | None = None
                 ) -> grain.IterDataset:
    """The whole pipeline as a Grain IterDataset (see ``make_train_iterator``)."""
    config_lib.validate(cfg, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    tok = tokenizer or ensure_tokenizer(cfg, workdir)
    srcs = dict(sources) if sources is not None else make_sources(cfg, workdir)
    missing = set(cfg.sources.keys()) - set(srcs)
    if missing:
        raise ValueError(f"no source for streams {sorted(missing)}")
    srcs = {k: srcs[k] for k in cfg.sources.keys()}     # config order
    ds: grain.IterDataset = PackIterDataset(cfg, srcs, tok, process_index=process_index,
                                            process_count=process_count)
    if cfg.grain.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():     # Grain's multiprocessing reads absl flags (defaults)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.grain.num_workers,
                                                         per_worker_buffer_size=cfg.grain.worker_buffer_size))
    return StatsIterDataset(ds, index_counts(srcs))


def make_train_iterator(cfg, *, workdir: str | None, process_index: int = 0, process_count: int = 1,
                        sources: Mapping[str, object] | None = None,
                        tokenizer: Tokenizer | None = None) -> StatsIterator:
    """An exactly-resumable iterator of ``(PackedBatch of numpy, stats)``; each process reads a
    disjoint shard and yields its ``rows_per_batch / process_count`` rows of the global batch.

    ``sources`` (name -> Sequence of records) and ``tokenizer`` override the config (tests). With
    the default config the synthetic data and a tiny tokenizer are generated in ``workdir`` when
    absent."""
    return iter(make_dataset(cfg, workdir=workdir, process_index=process_index,
                             process_count=process_count, sources=sources, tokenizer=tokenizer))
