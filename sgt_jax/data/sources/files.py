"""File sets: the files under folders and tar shards (local paths or URLs), read by reference,
and grouped by key into roles (image + annotation / mask)."""
from __future__ import annotations

import concurrent.futures
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Sequence

from sgt_jax import fileio
from sgt_jax.data.sources.tar import _tar_members

log = logging.getLogger(__name__)

_Ref = tuple[int, str, int, int]   # (container index, name, offset, size); offset -1 = plain file
INDEX_THREADS = 16            # remote tar shards indexed concurrently


def expand_paths(body: str, what: str = "path") -> list[str]:
    """Comma-separated paths / URLs / globs -> sorted existing paths. Raises ValueError naming the
    body."""
    out: list[str] = []
    for part in [p.strip() for p in body.split(",") if p.strip()]:
        if not fileio.is_remote(part):
            part = os.path.expanduser(part)
        if any(c in part for c in "*?["):
            hits = fileio.glob(part)
            if not hits:
                raise ValueError(f"{what} glob {part!r} matches nothing")
            out.extend(hits)
        elif fileio.exists(part):
            out.append(part)
        else:
            raise ValueError(f"{what} {part!r} does not exist")
    if not out:
        raise ValueError(f"no {what} given")
    return out


def _is_tar(path: str) -> bool:
    if path.endswith(".tar"):
        return True
    if not fileio.is_remote(path):
        return tarfile.is_tarfile(path)
    try:                                     # one header block: checksum and ustar / v7 layout
        tarfile.TarInfo.frombuf(fileio.read_bytes(path, 0, tarfile.BLOCKSIZE), "utf-8",
                                "surrogateescape")
        return True
    except (tarfile.HeaderError, OSError):
        return False


def _plan_files(paths: Sequence[str]) -> list[tuple[str, object]]:
    """``("dir", (path, names))`` / ``("tar", path)`` for a list of folders and tar shards: the
    folders walked (one listing each), the tars in them and the given tars."""
    plan: list[tuple[str, object]] = []
    for p in paths:
        if fileio.isdir(p):
            names = fileio.walk_files(p)
            plan.append(("dir", (p, [n for n in names if not n.endswith(".tar")])))
            plan.extend(("tar", fileio.join(p, n)) for n in names if n.endswith(".tar"))
        elif _is_tar(p):
            plan.append(("tar", p))
        else:
            raise ValueError(f"{p!r} is neither a directory nor an uncompressed .tar shard")
    return plan


class FileSet:
    """The files under a list of folders and uncompressed tar shards (local paths or URLs),
    readable by reference.

    Folders are walked recursively; ``*.tar`` files met there (or given directly) are indexed as
    shards (remote shards concurrently, by ranged reads of their headers). Names are relative
    (folder) or member names (tar), with '/' separators.
    """

    def __init__(self, paths: Sequence[str], *, cache_dir: str | None = None):
        self.containers: list[tuple[str, bool]] = []        # (path, is_tar)
        self.entries: list[_Ref] = []
        self.damaged = 0          # damaged regions of tar shards skipped while indexing
        plan = _plan_files(paths)
        tars = [x for k, x in plan if k == "tar"]
        remote = [t for t in tars if fileio.is_remote(t)]

        def index(t):
            st: dict = {}
            return _tar_members(t, cache_dir, stats=st), st

        found: dict[str, tuple] = {}
        if len(remote) > 1:
            with concurrent.futures.ThreadPoolExecutor(min(INDEX_THREADS, len(remote))) as pool:
                found.update(zip(remote, pool.map(index, remote)))
        for kind, x in plan:
            if kind == "dir":
                d, names = x
                ci = self._add(d, False)
                self.entries.extend((ci, n, -1, -1) for n in names)
            else:
                ci = self._add(x, True)
                ms, st = found[x] if x in found else index(x)
                self.damaged += len(st["damaged"])
                self.entries.extend((ci, n, o, sz) for n, o, sz in ms)

    def _add(self, path: str, is_tar: bool) -> int:
        self.containers.append((fileio.abspath(path), is_tar))
        return len(self.containers) - 1

    def read(self, ref: _Ref) -> bytes:
        """Bytes of a file (one read; a remote tar member: one ranged read); raises
        FileNotFoundError or OSError (short read of a damaged shard; any remote failure), or
        ``fileio.PathOutsideRoot`` for a listed file that is a symlink leading out of its folder
        (never opened)."""
        ci, name, offset, size = ref
        path, is_tar = self.containers[ci]
        if not is_tar:           # a listed file: a symlink may lead out of the folder
            path = fileio.resolve_inside(path, name)
        if not fileio.is_remote(path):
            if not is_tar:
                with open(path, "rb") as f:
                    return f.read()
            with open(path, "rb") as f:      # open per read: thread- and fork-safe, ~10 us
                f.seek(offset)
                data = f.read(size)
        else:
            try:
                data = fileio.read_bytes(path) if not is_tar else fileio.read_bytes(path, offset, size)
            except OSError:
                raise
            except Exception as e:  # backends raise their own (HTTP) errors
                raise OSError(f"{type(e).__name__}: {e}") from e
            if not is_tar:
                return data
        if len(data) != size:
            raise OSError(f"short read of {name} in {path}: {len(data)} of {size} bytes "
                          f"(truncated shard?)")
        return data

    def describe(self, ref: _Ref) -> str:
        path, is_tar = self.containers[ref[0]]
        return f"{path}:{ref[1]}" if is_tar else fileio.join(path, ref[1])


class _KeyedFiles:
    """Files grouped by key into roles (e.g. image + annotation), sorted by key.

    ``classify(name) -> (key, role) | None``. Keys that lack ``required`` are dropped (orphans:
    counted in ``orphans``, logged, and reported as ``missing_file`` by ``index_counts``); other
    missing roles are kept and reported at read time.
    """

    def __init__(self, files: FileSet, classify: Callable[[str], tuple[str, str] | None],
                 roles: Sequence[str], required: str, source: str = ""):
        groups: dict[str, dict[str, _Ref]] = {}
        self.duplicates = 0
        for ref in files.entries:
            kr = classify(ref[1])
            if kr is None:
                continue
            key, role = kr
            g = groups.setdefault(key, {})
            if role in g:
                self.duplicates += 1
                continue
            g[role] = ref
        self.files = files
        self.keys = sorted(k for k, g in groups.items() if required in g)
        self.orphans = len(groups) - len(self.keys)
        self.refs = {r: [groups[k].get(r) for k in self.keys] for r in roles}
        if self.duplicates:
            log.warning("%s: %d duplicate files (same key and role) ignored", source, self.duplicates)
        if self.orphans:
            lone = sorted(k for k, g in groups.items() if required not in g)
            log.warning("%s: %d key(s) have no %s file and are dropped (e.g. %s: %s), counted as "
                        "missing_file", source, self.orphans, required, lone[0],
                        ", ".join(sorted(groups[lone[0]])))

    def index_counts(self) -> dict[str, int]:
        return {"missing_file": self.orphans, "read_error": self.files.damaged}


def _strip_ext(name: str, exts: Iterable[str]) -> str | None:
    low = name.lower()
    for e in exts:
        if low.endswith(e):
            return name[: len(name) - len(e)]
    return None



def _tar_targets(body: str) -> list[tuple[str, str]]:
    """``("tar", path)`` for each tar shard in a PATHS body (given, or met in a folder): the
    indexes a file-set source builds (``Kind.index_targets``)."""
    return [("tar", x) for k, x in _plan_files(expand_paths(body)) if k == "tar"] if body else []
