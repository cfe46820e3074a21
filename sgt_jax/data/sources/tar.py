"""Uncompressed tar shards indexed by member offset (never extracted), local or remote.

A remote tar is indexed from its headers by ranged reads (``_TarScanReader``: ``TAR_READAHEAD``
bytes per member, or big windows when members are small: ``TAR_STREAM_BELOW``); a damaged header
partway is skipped to the next valid one, as GNU tar does. The index is cached (``cache.py``)
keyed by path (URL), size and mtime (remote: generation / etag).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile

from sgt_jax import fileio
from sgt_jax.data.sources.cache import _cache_put, _cached, _tar_cache_dirs

log = logging.getLogger(__name__)

TAR_READAHEAD = 64 * 1024     # bytes per ranged read while indexing a remote tar (_TarScanReader)
# Streaming mode of that index (_TarScanReader): when a shard's members are small, reads of
# TAR_STREAM_WINDOW bytes each cover many headers, instead of one read-ahead read per member. Rule:
# a shard of at most TAR_STREAM_WINDOW bytes is read in one GET; otherwise the first TAR_PROBE
# entries are read member by member, and if they averaged less than TAR_STREAM_BELOW bytes each
# the rest is read in TAR_STREAM_WINDOW windows (a member larger than a window is skipped, not
# read). Cost model: a GET costs ~30 ms of latency ~= 3 MB of one stream's ~100 MB/s, so per
# member a ranged read costs ~latency and streaming ~member size / bandwidth; 2 MiB is below the
# ~3 MB break-even. TAR_STREAM_BELOW = 0 turns streaming off.
TAR_STREAM_BELOW = 2 * 2 ** 20
TAR_STREAM_WINDOW = 8 * 2 ** 20
TAR_PROBE = 32


class _TarScanReader:
    """A remote tar as ``tarfile`` reads it while scanning headers: a read outside the current
    window fetches one window (one ranged GET) at that position, ``window`` bytes: TAR_READAHEAD
    (about one GET per member) or, after ``stream()``, TAR_STREAM_WINDOW (one GET for many small
    members). Counts its GETs (``reads``) and bytes (``bytes_read``)."""

    def __init__(self, path: str, size: int):
        self.name, self.size, self.pos = path, int(size), 0
        self.window = self.size if self.size <= TAR_STREAM_WINDOW and TAR_STREAM_BELOW > 0 \
            else TAR_READAHEAD
        self.streaming = self.window == self.size
        self.buf, self.start = b"", 0
        self.reads = self.bytes_read = 0

    def stream(self) -> None:
        self.window, self.streaming = max(self.window, TAR_STREAM_WINDOW), True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        out = []
        while self.pos < end:
            off = self.pos - self.start
            if not 0 <= off < len(self.buf):
                want = min(max(self.window, end - self.pos), self.size - self.pos)
                self.buf, self.start, off = fileio.read_bytes(self.name, self.pos, want), self.pos, 0
                self.reads += 1
                self.bytes_read += len(self.buf)
                if not self.buf:
                    break
            chunk = self.buf[off:off + end - self.pos]
            out.append(chunk)
            self.pos += len(chunk)
        return b"".join(out)

    def close(self) -> None:
        self.buf = b""


def _stat_reads(stats: dict | None, f) -> None:
    raw = f if isinstance(f, _TarScanReader) else getattr(f, "raw", None)
    if stats is not None and raw is not None:
        stats["reads"] = stats.get("reads", 0) + getattr(raw, "reads", 0)
        stats["bytes_read"] = stats.get("bytes_read", 0) + getattr(raw, "bytes_read", 0)


TAR_SCAN_CHUNK = 2 ** 20       # bytes per read while scanning past damage for the next header


def _next_header(f, start: int, size: int) -> tuple[int | None, bool]:
    """(offset of the first block at or after ``start`` that parses as a ustar / GNU / pax header
    -- magic ``ustar`` and a valid checksum -- or None; whether every byte skipped was zero)."""
    pos, zeros = start, True
    while pos + tarfile.BLOCKSIZE <= size:
        f.seek(pos)
        buf = f.read(min(TAR_SCAN_CHUNK, size - pos))
        n = len(buf) - len(buf) % tarfile.BLOCKSIZE
        if n == 0:
            break
        k = buf.find(b"ustar", 257, n)
        while k != -1:
            at = k - 257
            if at % tarfile.BLOCKSIZE == 0:
                try:
                    tarfile.TarInfo.frombuf(buf[at:at + tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
                    return pos + at, zeros and buf.count(0, 0, at) == at
                except tarfile.HeaderError:
                    pass
            k = buf.find(b"ustar", k + 1, n)
        zeros = zeros and buf.count(0, 0, n) == n
        pos += n
    return None, zeros


def _scan_tar(f, size: int) -> tuple[list, list, bool]:
    """(members, damaged regions ``[header offset, next header offset, members before]``,
    truncated) of the tar read through ``f``. ``tarfile`` stops without an error at a header it
    cannot parse. A stop at a block that is neither the end-of-archive marker (zeros) nor the
    end of the file is damage; the scan skips to the next valid header (as GNU tar does) and goes
    on from there. Only zero bytes up to the next header (an end marker inside: concatenated
    archives) are not damage; junk after the end marker with no header in it is ignored.
    Raises ``tarfile.ReadError`` when the first header is unreadable (not a tar)."""
    members, damaged, pos, j = [], [], 0, 0
    while True:
        f.seek(pos)
        stop = pos
        try:
            with tarfile.open(fileobj=f, mode="r:") as tf:
                try:
                    for m in tf:
                        if isinstance(f, _TarScanReader) and j == TAR_PROBE and not f.streaming \
                                and tf.offset < TAR_STREAM_BELOW * TAR_PROBE:
                            f.stream()           # small members: big windows (TAR_STREAM_BELOW)
                        j += 1
                        if m.isfile():
                            name = m.name[2:] if m.name.startswith("./") else m.name.lstrip("/")
                            members.append((name, m.offset_data, m.size))
                except tarfile.ReadError:        # a broken extended (pax / GNU long name) header
                    pass
                stop = tf.offset
        except tarfile.ReadError:                # the header at ``pos`` itself
            if pos == 0:                         # not a tar (or its first header is lost): loud
                raise
        f.seek(stop)
        block = f.read(tarfile.BLOCKSIZE)
        end = len(block) < tarfile.BLOCKSIZE or not block.strip(b"\0")   # EOF / end marker
        nxt, zeros = _next_header(f, stop + tarfile.BLOCKSIZE, size)
        if not end or (nxt is not None and not zeros):
            damaged.append([stop, size if nxt is None else nxt, len(members)])
        if nxt is None:
            break
        pos = nxt
    truncated = bool(members) and members[-1][1] + members[-1][2] > size
    return members, damaged, truncated


def _tar_members(path: str, cache_dir: str | None, *, stats: dict | None = None,
                 fill_all: bool = False) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of an uncompressed tar; cached, keyed by
    path (URL), size and mtime (remote: generation / etag). ``stats`` (a dict) receives
    ``cached`` (bool), ``members``, ``reads`` / ``bytes_read`` (remote reads of the tar),
    ``damaged`` (regions of unreadable headers skipped: [offset, next header, members before])
    and ``truncated`` (the last member is cut short); ``fill_all`` writes a hit into every cache
    that lacks it (``sgt_jax.data.index``). A damaged shard is logged (a warning) every time its
    index is built or read from the cache."""
    remote = fileio.is_remote(path)
    dirs = _tar_cache_dirs(path, cache_dir)
    if not dirs:
        name = None
    elif remote:      # "tar2": the index format with damage (older indexes may be short)
        name = f"tar2_{fileio.url_key(path, fileio.signature(path))}.json"
    else:
        st = os.stat(path)
        tag = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
        name = f"tar2_{tag.hexdigest()}.json"
    caches = [(d, fileio.join(d, name)) for d in dirs]
    index = _cached(caches, json.loads, fill_all)
    if stats is not None:
        stats.update(cached=index is not None, reads=0, bytes_read=0)
    if index is None:
        magic = fileio.read_bytes(path, 0, 6)
        if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00" \
                or magic[:4] == b"\x28\xb5\x2f\xfd":
            raise ValueError(f"{path} is a compressed tar: random access needs an uncompressed tar "
                             f"(decompress it, e.g. `gunzip -k` / `zstd -d`)")
        size = fileio.getsize(path)
        f = _TarScanReader(path, size) if remote else open(path, "rb")
        try:
            members, damaged, truncated = _scan_tar(f, size)
        except tarfile.ReadError as e:
            raise ValueError(f"{path} is not a readable uncompressed tar: {e}") from None
        finally:
            _stat_reads(stats, f)
            f.close()
        if stats is not None:
            stats["streamed"] = bool(remote and f.streaming)
        index = {"members": members, "damaged": damaged, "truncated": truncated, "size": size}
        data = json.dumps(index).encode()
        for d, cache in caches:
            _cache_put(d, cache, data)
    members = [tuple(m) for m in index["members"]]
    for at, nxt, before in index["damaged"]:
        log.warning("tar shard %s: unreadable header at byte %d (after %d members): skipped %d bytes "
                    "to %s; the member(s) in between are lost (counted as read_error)", path, at,
                    before, nxt - at, f"the next valid header at byte {nxt}, read on from there"
                    if nxt < index["size"] else "the end of the file (no valid header after it)")
    if index["truncated"]:
        log.warning("tar shard %s is truncated: its last member %s is cut short (read_error when "
                    "read)", path, members[-1][0])
    if stats is not None:
        stats.update(members=len(members), damaged=index["damaged"], truncated=index["truncated"])
    return members

