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

Data readers (``sgt_jax/data``) use the same functions per sample: one ranged read per tar member
or file, never a whole shard (``open_read`` gives a read-ahead file object for the few streaming
reads: tar headers, a jsonl's line index). No filesystem object is ever stored or pickled: every
call resolves the URL with ``fsspec.core.url_to_fs``, whose instance cache is per process (fsspec
drops it after a fork, and its event loop too), so sources forked or spawned into Grain worker
processes open their own connections there.

``SGT_FSSPEC_IMPLEMENTATIONS="proto=package.module.Class[,proto=...]"`` registers a filesystem
class for a protocol in every process that reads it (checked at first use; spawned workers inherit
the environment): a custom or caching filesystem, or, in the tests, ``gs://`` mapped to a temp dir.
``local_cache_dir()`` (``$SGT_JAX_CACHE_DIR``, default ``~/.cache/sgt_jax``) holds what a URL
needs on local disk: tokenizer copies, tar indexes, synthetic data of a remote workdir.

fsspec rather than ``etils.epath``: epath knows only gs/s3/az/hf (no ``memory://`` for offline
tests), prefers ``tf.io.gfile`` whenever TensorFlow is installed, and has no ranged read; its
fsspec backend is the same gcsfs underneath, which Orbax's own directory operations on
``gs://`` also need when TensorFlow is absent.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import importlib
import io
import json
import math
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


_ENV_IMPLS = "SGT_FSSPEC_IMPLEMENTATIONS"
_env_state: dict = {"spec": "", "saved": {}}


def _register_env_implementations():
    """Register the classes named in $SGT_FSSPEC_IMPLEMENTATIONS (again whenever it changes; the
    registrations of a previous value are undone first)."""
    spec = os.environ.get(_ENV_IMPLS, "")
    if spec == _env_state["spec"]:
        return
    reg = importlib.import_module("fsspec.registry")
    for proto, (known, imported, cls) in _env_state["saved"].items():   # undo the previous value
        if (reg.known_implementations.get(proto) or {}).get("class") == cls:  # (unless replaced)
            if known is None:
                reg.known_implementations.pop(proto, None)
            else:
                reg.known_implementations[proto] = known
            if imported is not None and proto not in reg._registry:
                reg._registry[proto] = imported
    _env_state.update(spec="", saved={})
    for item in filter(None, (x.strip() for x in spec.split(","))):
        proto, eq, cls = (x.strip() for x in item.partition("="))
        if not eq or not proto or not cls:
            raise ValueError(f"${_ENV_IMPLS}={spec!r}: expected proto=package.module.Class[,...]")
        _env_state["saved"].setdefault(proto, (reg.known_implementations.get(proto),
                                               reg._registry.get(proto), cls))
        reg.known_implementations[proto] = {"class": cls, "err": f"{cls} (from ${_ENV_IMPLS}) "
                                                                 f"failed to import"}
        reg._registry.pop(proto, None)          # an already imported class would win otherwise
    _env_state["spec"] = spec


def _fs(path):
    """(fsspec filesystem, the path as it understands it) for a remote URL."""
    import fsspec

    _register_env_implementations()
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


class PathOutsideRoot(ValueError):
    """A path taken from data (a record's image path, a file found under a data directory) that
    resolves outside the root it is relative to."""


def resolve_inside(root, rel) -> str:
    """The path of ``rel`` (a path read from data: a record's field, a listed file) under ``root``,
    refusing anything that leaves it: raises ``PathOutsideRoot`` for an absolute path, a URL, a
    ``..`` that climbs above ``root`` and, for local paths, a symlink (in any component) that
    resolves outside ``root`` -- checked on the real paths (``os.path.realpath``), so a
    symlinked root itself is fine. A URL root: the key is normalised (``posixpath.normpath``),
    so ``gs://b/data/../x`` and another bucket or scheme are refused; object stores have no
    symlinks (a ``file://`` root is checked as a local path). Raises ``ValueError`` for a
    ``rel`` that is no path at all (not a str, a NUL byte, a lone surrogate). Local: returns the
    real path, to be opened as it is (no second symlink lookup)."""
    if not isinstance(rel, str):
        raise ValueError(f"path {rel!r} is a {type(rel).__name__}, not a string")
    if "\0" in rel:
        raise ValueError(f"path {rel!r} contains a NUL byte")
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"path {rel!r} is not valid UTF-8 (a lone surrogate)") from None
    root = _str(root)
    if is_remote(rel) or rel.startswith(("/", "\\")) or os.path.isabs(rel):
        raise PathOutsideRoot(f"{rel!r} is absolute (a path or URL of its own): paths read from "
                              f"data must be relative to their root {root!r}")
    s = scheme(root)
    if s is not None and s not in ("file", "local"):
        key = posixpath.normpath(rel)
        if key == ".." or key.startswith("../"):
            raise PathOutsideRoot(f"{rel!r} climbs out of {root!r} ('..')")
        return root.rstrip("/") + "/" + key if key != "." else root.rstrip("/")
    local = root[len(s) + 3:] if s is not None else root
    base = os.path.realpath(local)
    real = os.path.realpath(os.path.join(base, rel))
    if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
        why = "through a symlink" if os.path.normpath(os.path.join(base, rel)).startswith(
            base.rstrip(os.sep) + os.sep) else "('..')"
        raise PathOutsideRoot(f"{rel!r} resolves to {real!r}, outside {root!r} {why}")
    return real if s is None else f"{s}://{real}"


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


def signature(path) -> str:
    """``size|version`` of a file, for cache keys: local mtime_ns; remote the object generation /
    etag / mtime, whichever the filesystem reports first."""
    if not is_remote(path):
        st = os.stat(path)
        return f"{st.st_size}|{st.st_mtime_ns}"
    fs, p = _fs(path)
    info = fs.info(p)
    for k in ("generation", "etag", "ETag", "md5Hash", "mtime", "LastModified", "last_modified",
              "updated", "created"):
        if info.get(k) not in (None, ""):
            return f"{info.get('size')}|{k}={info[k]}"
    return f"{info.get('size')}|"


def glob(pattern) -> list[str]:
    """Sorted paths matching a glob pattern (``*``, ``?``, ``[...]``; remote: also ``**``), as
    local paths or as URLs of the pattern's scheme."""
    pattern = _str(pattern)
    if not is_remote(pattern):
        return sorted(globlib.glob(pattern))
    fs, p = _fs(pattern)
    cut = min((pattern.find(c) for c in "*?[" if c in pattern), default=len(pattern))
    base_url = pattern[:pattern.rfind("/", 0, cut) + 1]          # up to the last '/' before it
    if base_url.endswith("://"):
        raise ValueError(f"{pattern}: a glob in the bucket / host name is not supported")
    base = fs._strip_protocol(base_url).rstrip("/") + "/"
    out = []
    for hit in fs.glob(p):
        hit = hit.rstrip("/")
        if not hit.startswith(base):
            raise OSError(f"{pattern}: the filesystem returned {hit!r} outside {base!r}")
        out.append(base_url + hit[len(base):])
    return sorted(out)


def walk_files(path) -> list[str]:
    """Relative '/'-separated names of every file under a directory, in ``os.walk`` order
    (a directory's files sorted, then its subdirectories, sorted, recursively). Local: follows
    symlinks, as ``os.walk(followlinks=True)``. Remote: one recursive listing (``fs.find``)."""
    path = _str(path)
    if not is_remote(path):
        out = []
        for root, dirs, files in os.walk(path, followlinks=True):
            dirs.sort()
            for fn in sorted(files):
                out.append(os.path.relpath(os.path.join(root, fn), path).replace(os.sep, "/"))
        return out
    fs, p = _fs(path)
    p = p.rstrip("/")
    rel = []
    for hit in fs.find(p, withdirs=False, detail=False):
        if hit.endswith("/"):                   # a "directory" placeholder object
            continue
        if hit.startswith(p + "/"):
            rel.append(hit[len(p) + 1:])
    # os.walk order: at every level the files (sorted) before the subdirectories (sorted)
    return sorted(rel, key=lambda r: [(1, d) for d in r.split("/")[:-1]] + [(0, r.split("/")[-1])])


def local_cache_dir(*parts) -> str:
    """A local directory for copies and indexes of remote data: ``$SGT_JAX_CACHE_DIR`` (default
    ``~/.cache/sgt_jax``) / parts; created."""
    base = os.environ.get("SGT_JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "sgt_jax")
    d = os.path.join(base, *parts)
    os.makedirs(d, exist_ok=True)
    return d


def url_key(*parts) -> str:
    """A short stable hex key (for cache file names) of strings such as URL + signature."""
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:24]


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


class _RangedRaw(io.RawIOBase):
    """A read-only, seekable raw file over ranged reads of a URL (under ``open_read``)."""

    def __init__(self, path, size: int):
        super().__init__()
        self.name, self._size, self._pos = _str(path), int(size), 0
        self.reads = self.bytes_read = 0          # ranged reads made, bytes they returned

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b):
        n = min(len(memoryview(b)), max(0, self._size - self._pos))
        if n == 0:
            return 0
        k = read_into(self.name, self._pos, memoryview(b).cast("B")[:n])
        self._pos += k
        self.reads += 1
        self.bytes_read += k
        return k


def open_read(path, buffer_size: int = 1 << 20) -> IO[bytes]:
    """A binary, seekable file for streaming reads. Remote: every refill of the buffer is one
    ranged read of ``buffer_size`` bytes from the current position (a read-ahead window: a seek
    inside the buffer costs nothing), so reading a few hundred bytes at scattered offsets (tar
    headers) reads about ``buffer_size`` bytes per spot, not the file."""
    if not is_remote(path):
        return open(path, "rb", buffering=buffer_size)
    return io.BufferedReader(_RangedRaw(path, getsize(path)), buffer_size=buffer_size)


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


def jsonable(x):
    """Nested dicts / lists / numpy scalars -> plain JSON values (non-finite floats as strings)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:       # numpy scalar
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


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
