"""Where the tar member / JSONL line indexes are cached, and reading / writing those caches.

A local file's index goes to a local ``WORKDIR/index_cache`` (a URL workdir's cache is not used
for local files: they differ from host to host; the local user cache instead); a remote file's
index to the local user cache (``fileio.local_cache_dir('index_cache')``, looked up first) and to
``WORKDIR/index_cache`` (local or URL: shared by every host, survives VM re-creation).
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from sgt_jax import fileio

log = logging.getLogger(__name__)


def _tar_cache_dirs(path: str, cache_dir: str | None) -> list[str]:
    """Where the member index of ``path`` is cached: a local tar in a local ``cache_dir`` (as
    before; a URL workdir's cache is not used for local files, which differ from host to host:
    the local user cache instead); a remote tar in the local user cache (looked up first) and in
    ``cache_dir`` (local or URL: a URL workdir's cache is shared by every host and survives VM
    re-creation; a hit there refills the local one)."""
    if not fileio.is_remote(path):
        if cache_dir and fileio.is_remote(cache_dir):
            return [fileio.local_cache_dir("index_cache")]
        return [cache_dir] if cache_dir else []
    return [fileio.local_cache_dir("index_cache")] + ([cache_dir] if cache_dir else [])


def _cache_get(cache: str) -> bytes | None:
    """The bytes of a cache file (local or URL), None when absent or unreadable."""
    try:
        if fileio.is_remote(cache):
            return fileio.read_bytes(cache) if fileio.exists(cache) else None
        if os.path.exists(cache):
            with open(cache, "rb") as f:
                return f.read()
    except Exception as e:  # noqa: BLE001 -- a cache that cannot be read is only slower
        log.warning("ignoring unreadable index cache %s: %s", cache, e)
    return None


def _cache_put(cache_dir: str, cache: str, data: bytes) -> None:
    try:
        if fileio.is_remote(cache):
            with fileio.open_write(cache) as f:                # an object write is atomic
                f.write(data)
            return
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, cache)
    except Exception as e:  # noqa: BLE001 -- a cache that cannot be written is only slower
        log.warning("could not write the index cache %s: %s", cache, e)


def _cached(caches: list[tuple[str, str]], decode: Callable[[bytes], object], fill_all: bool):
    """Look ``caches`` ((dir, file), fastest first) up in order; on a hit, write it into the
    caches in front of it (``fill_all``: into every cache that lacks it). Returns the decoded
    value or None."""
    found, missing = None, []
    for d, c in caches:
        data = _cache_get(c)
        value = None
        if data is not None:
            try:
                value = decode(data)
            except Exception as e:  # noqa: BLE001
                log.warning("ignoring unreadable index cache %s: %s", c, e)
        if value is None:
            missing.append((d, c))
            continue
        if found is None:
            found, hit = value, data
        if not fill_all:
            break
    if found is not None:
        for d, c in missing:
            _cache_put(d, c, hit)
    return found

