"""What every source shares: skip reasons, the ``Kind`` a spec names (one registry row), the parsed
``Spec`` its ``from_spec`` receives, the ``_Source`` base class and ``SkippingSource``."""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import operator
import os
import threading
from collections.abc import Sequence

import numpy as np

from sgt_jax import fileio
from sgt_jax.data.records import BadRecord
from sgt_jax.data.sources.files import FileSet, _Ref
from sgt_jax.data.sources.images import _image_size, _ImageError, decode_image

log = logging.getLogger(__name__)

REASONS = ("missing_file", "path_outside_root", "read_error", "corrupt_image", "image_too_large",
           "bad_annotation", "no_masks", "bad_json", "bad_conversation", "bad_text",
           "placeholder_mismatch", "unsupported")

SEG_OPTIONS = frozenset({"max_pixels", "max_side"})    # every seg kind takes these


# ================================================================================================
# spec strings
# ================================================================================================

class SpecError(ValueError):
    """A malformed source spec; the message names the spec and the fix."""

    def one_line(self) -> str:
        """The message as the command lines print it: one line, no traceback."""
        return "error: " + " ".join(str(self).split())


def _parse_range(v: str, name: str) -> tuple[int, int]:
    lo, _, hi = v.partition("-")
    a, b = int(lo), int(hi or lo)
    if a <= 0 or b < a:
        raise ValueError(f"{name}={v!r} must be N or LO-HI with 0 < LO <= HI")
    return a, b


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{v!r} is not a boolean (use 0 or 1)")


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed spec ``KIND:BODY?OPTIONS`` as a kind's ``from_spec`` receives it (options already
    checked against ``Kind.options``), with the run's seed and workdir."""
    text: str                  # the spec as written (quoted in errors)
    kind: str
    body: str
    opts: dict[str, str]
    usage: str                 # the kind's usage line
    seed: int = 0
    workdir: str | None = None

    @property
    def cache_dir(self) -> str | None:
        return fileio.join(self.workdir, "index_cache") if self.workdir else None

    def error(self, msg: str) -> SpecError:
        return SpecError(f"source spec {self.text!r}: {msg}; usage: {self.usage!r}")

    def flag(self, name: str) -> bool:
        return _parse_bool(self.opts.get(name, "0"))

    def paths(self, n_min: int, n_max: int) -> list[str]:
        """The BODY's ``::``-separated paths (each must exist)."""
        ps = [p.strip() for p in self.body.split("::")] if self.body else []
        if not n_min <= len(ps) <= n_max or not all(ps):
            raise self.error(f"{self.kind} needs {n_min}{'' if n_min == n_max else f'-{n_max}'} "
                             f"'::'-separated paths")
        ps = [p if fileio.is_remote(p) else os.path.expanduser(p) for p in ps]
        for p in ps:
            if not fileio.exists(p):
                raise self.error(f"path {p!r} does not exist")
        return ps

    def seg(self) -> dict:
        """``max_pixels`` / ``max_side`` as given (ints), as keyword arguments."""
        return {k: int(self.opts[k]) for k in ("max_pixels", "max_side") if k in self.opts}

    def subset(self) -> dict:
        """``subset=N`` / ``subset_seed=S`` as keyword arguments (empty when not given)."""
        out = {}
        if "subset" in self.opts:
            out["subset"] = int(self.opts["subset"])
            if out["subset"] <= 0:
                raise ValueError(f"subset={self.opts['subset']} must be a positive number of images")
        if "subset_seed" in self.opts:
            out["subset_seed"] = int(self.opts["subset_seed"])
        return out

    def background(self) -> dict:
        """``background=R,G,B`` as a keyword argument (empty when not given)."""
        if "background" not in self.opts:
            return {}
        rgb = tuple(int(c) for c in self.opts["background"].split(","))
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ValueError("background must be R,G,B with 0..255 each")
        return {"background": rgb}


class Kind:
    """A spec kind: one row of the registry (``registry.KINDS``). ``name`` is the spec's KIND,
    ``options`` the option names it accepts, ``usage`` the line errors show; ``from_spec`` builds
    the source (raising ``SpecError``, or ValueError / OSError / ImportError, which
    ``make_source`` turns into a SpecError with the usage); ``index_targets`` lists the cached
    indexes it builds (``sgt_jax.data.index``)."""
    name = "source"
    options: frozenset[str] = frozenset()
    usage = ""

    @classmethod
    def from_spec(cls, spec: Spec):
        raise NotImplementedError(cls.__name__)

    @classmethod
    def index_targets(cls, spec: Spec) -> list[tuple[str, str]]:
        return []


# ================================================================================================
# sources
# ================================================================================================

class _Source(Kind):
    _keys: Sequence[str]

    def __len__(self) -> int:
        return len(self._keys)

    def _index(self, i) -> int:
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range [0, {n})")
        return i

    def key(self, i: int) -> str:
        return self._keys[self._index(i)]

    def index_counts(self) -> dict[str, int]:
        """Records dropped while indexing, by skip reason (each counted once per run, not per
        read): ``missing_file`` for keys without their image (an annotation / mask alone),
        ``read_error`` for each damaged region of a tar shard. The pipeline reports them as
        ``index/<reason>``."""
        kf = getattr(self, "_kf", None)
        return kf.index_counts() if kf is not None else {}

    def _bad(self, reason: str, key: str, detail: str = "") -> BadRecord:
        return BadRecord(reason, self.name, key, detail)

    def _read(self, files: FileSet, ref: _Ref | None, key: str, what: str) -> bytes:
        if ref is None:
            raise self._bad("missing_file", key, f"no {what} file for this key")
        try:
            return files.read(ref)
        except fileio.PathOutsideRoot as e:
            raise self._bad("path_outside_root", key, str(e)) from None
        except FileNotFoundError:
            raise self._bad("missing_file", key, files.describe(ref)) from None
        except OSError as e:
            raise self._bad("read_error", key, f"{files.describe(ref)}: {e}") from None

    def _decode(self, data: bytes, key: str, **kw) -> tuple[np.ndarray, tuple[int, int]]:
        try:
            return decode_image(data, **kw)
        except _ImageError as e:
            raise self._bad(e.reason, key, e.detail) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()}, n={len(self)})"

    def _describe(self) -> str:
        return ""


SUBSET_OPTIONS = frozenset({"subset", "subset_seed"})     # the COCO kinds (coco_*, tfds)


def subset_ids(ids, n: int | None, seed: int = 0) -> set:
    """The ``n`` image ids of ``ids`` ranked first by a seeded hash of the id (all of them when
    ``n`` is None or >= their number): deterministic, independent of the order the reader lists
    them in, so every reader and every proxy task over the same images keeps the same ones (the
    paper's shared image set), and nested (the ``n`` kept for a smaller ``n`` are among those
    kept for a larger one: the data-scaling sweep grows one set)."""
    uniq = list(dict.fromkeys(ids))
    if n is None or n >= len(uniq):
        return set(uniq)

    def rank(i) -> bytes:
        return hashlib.blake2b(f"sgt-subset/{int(seed)}/{i}".encode(), digest_size=8).digest()

    return set(sorted(uniq, key=rank)[:n])


def _seg_record(key: str, image: np.ndarray, target: np.ndarray) -> dict:
    return {"task": "seg", "id": key, "image": image, "target": target}



def _image_size_or_bad(src: _Source, data: bytes, key: str) -> tuple[int, int]:
    try:
        return _image_size(data)
    except _ImageError as e:
        raise src._bad(e.reason, key, e.detail) from None



def _read_path(src: _Source, root: str, rel, key: str) -> bytes:
    """The bytes of ``rel`` (a path taken from a record) under ``root``: ``path_outside_root``
    for anything that leaves it (``fileio.resolve_inside``; never opened), ``bad_annotation``
    for a field that is no path, else missing_file / read_error."""
    try:
        path = fileio.resolve_inside(root, rel)
    except fileio.PathOutsideRoot as e:
        raise src._bad("path_outside_root", key, str(e)) from None
    except ValueError as e:
        raise src._bad("bad_annotation", key, str(e)) from None
    try:
        if not fileio.is_remote(path):
            with open(path, "rb") as f:
                return f.read()
        return fileio.read_bytes(path)
    except FileNotFoundError:
        raise src._bad("missing_file", key, path) from None
    except IsADirectoryError:
        raise src._bad("missing_file", key, f"{path} is a directory") from None
    except OSError as e:
        raise src._bad("read_error", key, f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- remote backends raise their own (HTTP) errors
        raise src._bad("read_error", key, f"{path}: {type(e).__name__}: {e}") from None



# ================================================================================================
# skipping
# ================================================================================================

class SkippingSource:
    """Wraps a source: ``BadRecord`` becomes ``None`` and a count under ``counts[reason]``.

    Counts are per process (Grain workers each hold a copy); ``last`` keeps the latest BadRecord
    for logging. Thread-safe.
    """

    def __init__(self, source):
        self.source = source
        self.counts: collections.Counter = collections.Counter()
        self.last: BadRecord | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        try:
            return self.source[i]
        except BadRecord as e:
            with self._lock:
                self.counts[e.reason] += 1
                self.last = e
            log.debug("skip %s", e)
            return None

    def __repr__(self) -> str:
        return f"SkippingSource({self.source!r})"

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("_lock")
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

