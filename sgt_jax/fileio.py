"""Local paths and remote URLs (``gs://bucket/path``) behind one small set of file operations.

Every file operation of ours outside an Orbax checkpoint goes through here: the converter's
safetensors reads and writes, the JSON / tokenizer / config files of a BAGEL dir, of a model dir
and of a training run. (Orbax and tensorstore open ``gs://`` checkpoints themselves.)

* A plain path (no ``scheme://``) is local and handled exactly as before: ``os`` / ``open`` /
  ``shutil``, and positioned reads with ``os.preadv`` (no memory map, so resident memory stays
  at the size of the block being converted).
* A URL ``scheme://...`` goes through `fsspec <https://filesystem-spec.readthedocs.io>`_:
  ``gs://`` needs ``gcsfs`` (``pip install gcsfs``; in requirements-tpu.txt). Range reads are
  ranged GETs of at most ``REMOTE_CHUNK`` bytes (``fs.cat_file(path, start, end)``), writes
  stream through ``fs.open(path, "wb")`` (gcsfs: a resumable upload, one buffered block at a
  time), so no file is ever held whole in memory. Object stores have no directories:
  ``makedirs`` is a no-op there and a "directory" exists when an object lies under it.

fsspec rather than ``etils.epath``: epath knows only gs/s3/az/hf (no ``memory://`` for offline
tests), prefers ``tf.io.gfile`` whenever TensorFlow is installed, and has no ranged read; its
fsspec backend is the same gcsfs underneath, which Orbax's own directory operations on
``gs://`` also need when TensorFlow is absent.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
from typing import IO

REMOTE_CHUNK = 32 * 2 ** 20          # bytes per ranged GET / per copied piece
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_BACKENDS = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub"}


class BackendMissingError(ImportError):
    """A URL whose fsspec filesystem package is not installed (e.g. gs:// without gcsfs)."""


def _str(path) -> str:
    return os.fspath(path)


def scheme(path) -> str | None:
    m = _SCHEME.match(_str(path))
    return m.group(1).lower() if m else None


def is_remote(path) -> bool:
    """True for a URL (gs://bucket/x, memory://x, ...), False for a plain local path."""
    return scheme(path) is not None


def _fs(path):
    """(fsspec filesystem, the path as it understands it) for a remote URL."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(_str(path))
    except ImportError as e:
        s = scheme(path)
        pkg = _BACKENDS.get(s, f"the fsspec backend for {s}://")
        raise BackendMissingError(f"{path}: install {pkg} to use {s}:// paths (pip install {pkg}; "
                                  f"fsspec says: {e})") from None


# --------------------------------------------------------------------------------------------------
# paths


def join(base, *parts) -> str:
    base = _str(base)
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts) if parts else base
    return os.path.join(base, *parts)


def dirname(path) -> str:
    """The containing directory (local: of the absolute path)."""
    path = _str(path)
    if is_remote(path):
        head = posixpath.dirname(path.rstrip("/"))
        return head if not head.endswith(":/") else head + "/"
    return os.path.dirname(os.path.abspath(path))


def basename(path) -> str:
    path = _str(path)
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def abspath(path) -> str:
    path = _str(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def isabs(path) -> bool:
    return is_remote(path) or os.path.isabs(_str(path))


# --------------------------------------------------------------------------------------------------
# queries


def exists(path) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def isfile(path) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    fs, p = _fs(path)
    return fs.isfile(p)


def isdir(path) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


def listdir(path) -> list[str]:
    """Names of the entries of a directory (like ``os.listdir``); [] for an absent remote prefix."""
    if not is_remote(path):
        return os.listdir(path)
    fs, p = _fs(path)
    try:
        entries = fs.ls(p, detail=False)
    except FileNotFoundError:
        return []
    p = p.rstrip("/")
    return sorted({posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != p})


def getsize(path) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, p = _fs(path)
    return int(fs.size(p))


# --------------------------------------------------------------------------------------------------
# reading


def read_into(path, offset: int, buf) -> int:
    """Fill ``buf`` (a writable buffer, e.g. a uint8 numpy view) with the bytes of ``path`` from
    ``offset``; returns how many were read (fewer only when the file ends first)."""
    mv = memoryview(buf).cast("B")
    n, done = mv.nbytes, 0
    if not is_remote(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            while done < n:
                k = os.preadv(fd, [mv[done:]], offset + done)
                if k <= 0:
                    break
                done += k
        finally:
            os.close(fd)
        return done
    fs, p = _fs(path)
    while done < n:
        want = min(REMOTE_CHUNK, n - done)
        data = fs.cat_file(p, start=offset + done, end=offset + done + want)
        mv[done:done + len(data)] = data
        done += len(data)
        if len(data) < want:
            break
    return done


def read_bytes(path, offset: int = 0, size: int | None = None) -> bytes:
    """``size`` bytes from ``offset`` (fewer when the file ends first); the whole rest of a
    (small) file when ``size`` is None."""
    if size is None:
        if not is_remote(path):
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read()
        fs, p = _fs(path)
        return fs.cat_file(p, start=offset or None)
    buf = bytearray(max(size, 0))
    return bytes(buf[:read_into(path, offset, buf)])


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path):
    return json.loads(read_text(path))


# --------------------------------------------------------------------------------------------------
# writing


def open_write(path) -> IO[bytes]:
    """A binary file for streaming writes (remote: uploaded block by block, committed on close)."""
    if not is_remote(path):
        return open(path, "wb")
    fs, p = _fs(path)
    return fs.open(p, "wb")


def write_text(path, text: str):
    with open_write(path) as f:
        f.write(text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def makedirs(path):
    """``os.makedirs(exist_ok=True)``; nothing for a URL (object stores have no directories and
    fsspec's writers create what their filesystem needs)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def rmtree(path):
    if not is_remote(path):
        shutil.rmtree(path)
        return
    fs, p = _fs(path)
    fs.rm(p, recursive=True)


def copy(src, dst):
    """Copy one file (local -> local keeps shutil.copy2's metadata; anything else is streamed
    in REMOTE_CHUNK pieces)."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copy2(src, dst)
        return
    size = getsize(src)
    buf = bytearray(min(REMOTE_CHUNK, size))
    with open_write(dst) as out:
        off = 0
        while off < size:
            n = read_into(src, off, memoryview(buf)[:min(len(buf), size - off)])
            if n == 0:
                raise OSError(f"{src}: ended at {off} of {size} bytes while copying to {dst}")
            out.write(memoryview(buf)[:n])
            off += n
