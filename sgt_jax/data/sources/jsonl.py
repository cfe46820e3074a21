"""The line index (byte offsets) of a .jsonl file: one streaming pass; a remote file's index is
cached like a remote tar's (``cache.py``)."""
from __future__ import annotations

import io

import numpy as np

from sgt_jax import fileio
from sgt_jax.data.sources.cache import _cache_put, _cached, _tar_cache_dirs
from sgt_jax.data.sources.tar import _stat_reads

JSONL_BUFFER = 8 * 2 ** 20     # bytes per ranged read while indexing a remote .jsonl


JSONL_BUFFER = 8 * 2 ** 20     # bytes per ranged read while indexing a remote .jsonl
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def _jsonl_index(path: str, cache_dir: str | None, *, stats: dict | None = None,
                 fill_all: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) of the non-blank lines of a .jsonl, int64: one streaming pass (remote:
    sequential ranged reads of JSONL_BUFFER bytes). A remote file's index is cached like a remote
    tar's (local cache, then ``cache_dir``; key: URL, size, generation); a local file is not
    (reading it again is fast). ``stats`` / ``fill_all``: as ``_tar_members``."""
    caches = []
    if fileio.is_remote(path):
        name = f"jsonl_{fileio.url_key(path, fileio.signature(path))}.npz"
        caches = [(d, fileio.join(d, name)) for d in _tar_cache_dirs(path, cache_dir)]

    def decode(b: bytes):
        with np.load(io.BytesIO(b)) as z:
            return z["offsets"].astype(np.int64), z["lengths"].astype(np.int64)

    hit = _cached(caches, decode, fill_all) if caches else None
    if stats is not None:
        stats.update(cached=hit is not None, reads=0, bytes_read=0)
    if hit is not None:
        if stats is not None:
            stats["members"] = len(hit[0])
        return hit
    offsets, lengths, pos = [], [], 0
    with fileio.open_read(path, JSONL_BUFFER) as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
                lengths.append(len(line))
            pos += len(line)
        _stat_reads(stats, f)
    out = np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)
    if stats is not None:
        stats["members"] = len(offsets)
    if caches:
        buf = io.BytesIO()
        np.savez_compressed(buf, offsets=out[0], lengths=out[1])
        for d, c in caches:
            _cache_put(d, c, buf.getvalue())
    return out

