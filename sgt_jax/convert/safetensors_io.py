"""Streaming safetensors I/O with strict checks (no torch, no pickle).

Reading: ``SafetensorsSource`` resolves a BAGEL weights file (single file, or HF-style shards
with an index json), validates every header against the file size *before* any data is read
(a truncated download is refused with the tensors it cuts off), and reads tensors -- or blocks
of rows of a tensor -- with positioned reads (``os.preadv``; for a URL such as ``gs://``, ranged
GETs of bounded size: ``fileio.read_into``) into fresh arrays. Positioned reads instead of a
memory map keep the process's resident memory at the size of the block being
converted: pages of a mapped file count toward RSS while the mapping lives, so mapping a 29 GB
release file would report up to 29 GB resident. The header parser is checked against
``safetensors.safe_open`` in the tests.

Writing: ``SafetensorsPlanWriter`` writes a planned list of tensors (names, dtypes, shapes known
up front) into one file or HF-style shards (``{stem}-00001-of-0000N.safetensors`` +
``{stem}.safetensors.index.json``), header first, then the data as it is produced, block by
block, in plan order, to a local path or streamed to a URL (``fileio.open_write``). The header
carries ``{"__metadata__": {"format": "pt"}}`` as ``safetensors.torch`` writes it (accelerate/transformers refuse files without it).

Pickle-based checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ``.pkl``) are refused by name:
loading them runs ``pickle``, i.e. arbitrary code.
"""
from __future__ import annotations

import json
import math
import re
import struct
from typing import Iterable, NamedTuple

import ml_dtypes
import numpy as np

from sgt_jax import fileio
from sgt_jax.keydiff import listing as _listing

HEADER_LIMIT = 100 * 2 ** 20       # safetensors' own limit on the JSON header (100 MB)
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_EXPLANATION = (
    "pickle-based PyTorch checkpoints are refused: loading one (torch.load) unpickles it, which "
    "can execute arbitrary code, so this tool never opens them. Convert them to safetensors in a "
    "trusted environment, e.g.\n"
    "    python -c \"import torch; from safetensors.torch import save_file; "
    "save_file(torch.load('IN.bin', weights_only=True, map_location='cpu'), 'model.safetensors')\"\n"
    "(weights_only=True restricts unpickling to tensors), then convert the safetensors file.")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message lists every offending name."""


class TensorInfo(NamedTuple):
    file: str
    dtype: str             # safetensors dtype name ("BF16", "F32", ...)
    shape: tuple
    start: int             # absolute byte offset in ``file``
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def refuse_pickle(path: str):
    raise ConversionError(f"{path}: {PICKLE_EXPLANATION}")


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and validate a safetensors header without reading tensor data.

    Returns ({name: TensorInfo}, __metadata__). Raises ConversionError for a file that is
    truncated (header or data shorter than the header declares; the message lists the tensors
    that extend past the end), not safetensors, or internally inconsistent."""
    if path.endswith(PICKLE_SUFFIXES):
        refuse_pickle(path)
    size = fileio.getsize(path)
    head = fileio.read_bytes(path, 0, 8)
    if len(head) < 8:
        raise ConversionError(f"{path}: truncated: {size} bytes, shorter than the 8-byte safetensors "
                              "header length")
    (n,) = struct.unpack("<Q", head)
    if n > HEADER_LIMIT:
        raise ConversionError(f"{path}: not a safetensors file (declared header length {n} bytes "
                              f"> {HEADER_LIMIT}); if it is a zip/pickle torch file: {PICKLE_EXPLANATION}")
    if 8 + n > size:
        raise ConversionError(f"{path}: truncated: the header declares {n} bytes but the file has only "
                              f"{size} bytes in total (incomplete download/copy?)")
    raw = fileio.read_bytes(path, 8, n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base, data_len = 8 + n, size - 8 - n
    out, beyond, bad = {}, [], []
    for name, d in header.items():
        try:
            dtype, shape, (b, e) = d["dtype"], tuple(int(s) for s in d["shape"]), d["data_offsets"]
        except (KeyError, TypeError, ValueError):
            bad.append(f"{name}: malformed entry {d!r}")
            continue
        if dtype not in DTYPES:
            bad.append(f"{name}: unknown dtype {dtype}")
            continue
        want = math.prod(shape) * DTYPES[dtype].itemsize
        if e - b != want or b < 0:
            bad.append(f"{name}: data_offsets {[b, e]} hold {e - b} bytes, {dtype}{list(shape)} needs {want}")
            continue
        if e > data_len:
            beyond.append(name)
            continue
        out[name] = TensorInfo(path, dtype, shape, base + b, want)
    if beyond:
        raise ConversionError(
            f"{path}: truncated: {len(beyond)} tensors extend past the end of the file "
            f"(data region {data_len} bytes, header needs {max(int(header[k]['data_offsets'][1]) for k in beyond)}): "
            f"{_listing(sorted(beyond))}")
    if bad:
        raise ConversionError(f"{path}: inconsistent safetensors header: {_listing(bad)}")
    return out, meta


class SafetensorsSource:
    """The tensors of one logical state dict (one file, or shards + index), name -> TensorInfo."""

    def __init__(self, path: str):
        self.path = path
        self.files: list[str] = []
        self.tensors: dict[str, TensorInfo] = {}
        if path.endswith(".json"):
            self._open_index(path)
        else:
            self._add_file(path)

    def _add_file(self, path: str, expect: set | None = None):
        if not fileio.exists(path):
            raise ConversionError(f"{path}: file not found")
        infos, _ = read_header(path)
        dup = sorted(set(infos) & set(self.tensors))
        if dup:
            raise ConversionError(f"{path}: tensors also present in another shard: {_listing(dup)}")
        if expect is not None:
            missing = sorted(expect - set(infos))
            extra = sorted(set(infos) - expect)
            if missing:
                raise ConversionError(f"{self.path}: the index maps {len(missing)} tensors to {fileio.basename(path)} "
                                      f"but that file does not contain them: {_listing(missing)}")
            if extra:
                raise ConversionError(f"{path}: holds {len(extra)} tensors the index does not list: {_listing(extra)}")
        self.files.append(path)
        self.tensors.update(infos)

    def _open_index(self, index_path: str):
        try:
            idx = fileio.read_json(index_path)
            wm = idx["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index_path}: not a safetensors index json ({e!r})") from None
        by_file: dict[str, set] = {}
        for k, fn in wm.items():
            by_file.setdefault(fn, set()).add(k)
        d = fileio.dirname(index_path)
        pick = sorted(fn for fn in by_file if fn.endswith(PICKLE_SUFFIXES))
        if pick:
            raise ConversionError(f"{index_path} indexes pickle files {pick}: {PICKLE_EXPLANATION}")
        missing_files = sorted(fn for fn in by_file if not fileio.exists(fileio.join(d, fn)))
        if missing_files:
            raise ConversionError(f"{index_path}: shard files listed in the index are missing: {_listing(missing_files)}")
        for fn in sorted(by_file):
            self._add_file(fileio.join(d, fn), expect=by_file[fn])

    def __contains__(self, key) -> bool:
        return key in self.tensors

    def keys(self):
        return self.tensors.keys()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor ``key`` (or rows [r0, r1) of its first axis) as a fresh numpy array."""
        t = self.tensors[key]
        shape = t.shape
        start, nbytes = t.start, t.nbytes
        if rows is not None:
            r0, r1 = rows
            row = t.nbytes // max(shape[0], 1)
            start, nbytes = t.start + r0 * row, (r1 - r0) * row
            shape = (r1 - r0,) + tuple(shape[1:])
        out = np.empty(shape, t.np_dtype)
        if fileio.read_into(t.file, start, out.reshape(-1).view(np.uint8)) < nbytes:
            raise ConversionError(f"{t.file}: truncated while reading {key} (file changed on disk?)")
        return out


# --------------------------------------------------------------------------------------------------


def parse_size(s: str | int | None) -> int | None:
    """'5GB' -> 5e9, '500MB', '2GiB', '123' (bytes); None/''/'0' -> None (no sharding)."""
    if s is None:
        return None
    if isinstance(s, int):
        return s or None
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", s, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {s!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    mult = (1024 if binary else 1000) ** " KMGT".index(unit or " ")
    return int(num * mult) or None


class PlannedTensor(NamedTuple):
    key: str
    dtype: np.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def plan_shards(plan: list[PlannedTensor], max_bytes: int | None) -> list[list[PlannedTensor]]:
    """HF's greedy split: start a new shard when the next tensor would exceed ``max_bytes``
    (a tensor larger than ``max_bytes`` gets a shard of its own)."""
    if not max_bytes:
        return [list(plan)]
    shards, cur, size = [], [], 0
    for t in plan:
        if cur and size + t.nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += t.nbytes
    if cur or not shards:
        shards.append(cur)
    return shards


def _header_bytes(tensors: list[PlannedTensor], metadata: dict) -> bytes:
    header, off = {"__metadata__": metadata}, 0
    for t in tensors:
        dt = np.dtype(t.dtype)
        if dt not in DTYPE_NAMES:
            raise ValueError(f"{t.key}: dtype {dt} has no safetensors name")
        header[t.key] = {"dtype": DTYPE_NAMES[dt], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)          # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsPlanWriter:
    """Write ``plan`` (in order) to ``directory``: ``{stem}.safetensors``, or, with
    ``max_shard_bytes``, ``{stem}-0000i-of-0000N.safetensors`` + ``{stem}.safetensors.index.json``.

    Call ``write(key, block)`` with each tensor's data in plan order, as whole arrays or as
    consecutive blocks of rows (first axis); ``close()`` checks every byte was written."""

    def __init__(self, directory: str, stem: str, plan: list[PlannedTensor], max_shard_bytes: int | None = None,
                 metadata: dict | None = None):
        self.directory, self.stem = directory, stem
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(plan, max_shard_bytes)
        n = len(self.shards)
        self.sharded = max_shard_bytes is not None and max_shard_bytes > 0
        self.names = ([f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if self.sharded
                      else [f"{stem}.safetensors"])
        if len(self.names) != len(self.shards):
            raise AssertionError("shard plan")
        self._queue = [(si, t) for si, shard in enumerate(self.shards) for t in shard]
        self._pos = 0                 # index into _queue of the tensor being written
        self._written = 0             # bytes of that tensor written so far
        self._fh = None
        self._shard = -1
        fileio.makedirs(directory)

    @property
    def paths(self) -> list[str]:
        return [fileio.join(self.directory, n) for n in self.names]

    def _open_shard(self, si: int):
        if self._fh is not None:
            self._fh.close()
        self._fh = fileio.open_write(self.paths[si])
        self._fh.write(_header_bytes(self.shards[si], self.metadata))
        self._shard = si

    def write(self, key: str, block: np.ndarray):
        if self._pos >= len(self._queue):
            raise ValueError(f"write({key}): every planned tensor is already written")
        si, t = self._queue[self._pos]
        while key != t.key and t.nbytes == 0 and self._pos + 1 < len(self._queue):
            self._pos += 1                     # empty tensors need no write
            si, t = self._queue[self._pos]
        if key != t.key:
            raise ValueError(f"write({key}): the plan expects {t.key} next")
        block = np.asarray(block)
        if block.dtype != np.dtype(t.dtype):
            raise ValueError(f"write({key}): dtype {block.dtype}, planned {np.dtype(t.dtype)}")
        if tuple(block.shape[1:]) != tuple(t.shape[1:]) and tuple(block.shape) != tuple(t.shape):
            raise ValueError(f"write({key}): block shape {block.shape} does not fit planned {t.shape}")
        while self._shard < si:                 # (a shard holding only empty tensors is opened too)
            self._open_shard(self._shard + 1)
        data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        if self._written + data.nbytes > t.nbytes:
            raise ValueError(f"write({key}): {self._written + data.nbytes} bytes > planned {t.nbytes}")
        self._fh.write(data)
        self._written += data.nbytes
        if self._written == t.nbytes:
            self._pos += 1
            self._written = 0

    def close(self) -> list[str]:
        while self._pos < len(self._queue) and self._queue[self._pos][1].nbytes == 0:
            self._pos += 1
        if self._pos != len(self._queue):
            raise ValueError(f"close(): {len(self._queue) - self._pos} planned tensors not written "
                             f"(next: {self._queue[self._pos][1].key})")
        while self._shard < len(self.shards) - 1:      # trailing shards that only hold empty tensors
            self._open_shard(self._shard + 1)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.sharded:
            total = sum(t.nbytes for s in self.shards for t in s)
            wm = {t.key: self.names[si] for si, s in enumerate(self.shards) for t in s}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wm.items()))}
            fileio.write_text(fileio.join(self.directory, f"{self.stem}.safetensors.index.json"),
                              json.dumps(index, indent=2))
        return self.paths


def write_tensors(directory: str, stem: str, tensors: dict[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                  max_shard_bytes: int | None = None) -> list[str]:
    """Convenience: write in-memory arrays (dict or (key, array) pairs) through the plan writer."""
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    w = SafetensorsPlanWriter(directory, stem, [PlannedTensor(k, a.dtype, a.shape) for k, a in items], max_shard_bytes)
    for k, a in items:
        w.write(k, a)
    return w.close()
