"""Data sources: random-access readers that turn files on disk into records (``records.py``).

Every source is a Grain ``RandomAccessDataSource`` (``__len__``, ``__getitem__(i) -> record``,
a stable ``__repr__`` for checkpointing; picklable, thread-safe, no open file handles kept), and
raises ``BadRecord(reason, source, key)`` for a record it cannot deliver. Reason keys are stable
counter names (``REASONS``):

  missing_file          an image / annotation / mask file named by the index is not there
  path_outside_root     a path taken from data (a record's image / file_name, a symlink in a
                        data folder) leaves its root: absolute, ``..``, a symlink out, another
                        bucket or scheme (``fileio.resolve_inside``); never opened
  read_error            a file or tar member could not be read (I/O error, truncated shard)
  corrupt_image         an image that does not decode (truncated JPEG, not an image, 0 pixels)
  image_too_large       more pixels than ``max_pixels`` (decompression-bomb guard)
  bad_annotation        broken annotation: unparsable JSON, broken RLE (run lengths out of
                        range, not integers), mask size != image size, an image entry that is
                        no path
  no_masks              a segmentation record without any mask / segment
  bad_json              a LLaVA line / row that is not a JSON object
  bad_conversation      LLaVA turns missing, roles not human/gpt alternating, no gpt turn
  bad_text              a turn whose text is not valid Unicode (a lone surrogate such as
                        ``"\ud800"``: valid JSON, but no tokenizer encodes it)
  placeholder_mismatch  number of ``<image>`` placeholders (human turns) != number of images
  unsupported           a record kind this reader does not handle (e.g. LLaVA ``video``)

Use ``SkippingSource`` (or catch ``BadRecord`` and count ``e.reason``) to skip and count them.
Records dropped while indexing (a key without its image; a damaged tar header) are counted once
by ``source.index_counts()`` under the same reasons.

Spec grammar (``make_source``)::

    spec     := KIND ":" BODY [ "?" OPTIONS ]
    OPTIONS  := NAME "=" VALUE ( "&" NAME "=" VALUE )*
    PATHS    := PATH ( "," PATH )*     each a directory (walked recursively; ``*.tar`` files found
                                        there are read as shards), an uncompressed ``.tar`` shard,
                                        or a glob of those
    PATH, FILE, DIR ...                 a local path or a URL (``gs://bucket/x``, any fsspec URL;
                                        gs:// needs gcsfs), also in ``list=`` and image roots

    sa1b:PATHS                       raw SA-1B: sa_*.jpg + sa_*.json (COCO RLE), rendered
    sgt_pairs:PATHS                  pre-rendered pairs: image + colour-mask PNG with the same key
                                     (released SAM-SGT layout: sam_selection/X.jpg + sam_mask/X.png;
                                     flat layout X.jpg + X.png, or X_mask.png with mask_suffix=)
    coco_panoptic:JSON::PNG_DIR::IMAGE_DIR
    coco_instances:JSON::IMAGE_DIR   instances JSON (polygons / RLE) via pycocotools, rendered
    llava:FILE[::IMAGE_ROOT]         .jsonl / .json (list) / .parquet; IMAGE_ROOT defaults to
                                     FILE's directory
    synthetic_seg:[DIR]              synthetic scenes (generated on first use) read as SA-1B;
                                     DIR defaults to WORKDIR/synthetic; a finished DIR is used
                                     as it is unless generation options are given (then they
                                     must match what DIR holds)
    synthetic_vqa:[DIR]              the LLaVA-format VQA about the same scenes (DIR/vqa.jsonl)
    tfds:NAME:SPLIT                  a prepared TFDS dataset with an ``image`` and a target image
                                     feature (e.g. tfds:coco/2017_panoptic:train)

    options (by kind; unknown names are an error):
      all seg kinds  max_pixels=N (default 67108864), max_side=N (downscale image and target so
                     the long side <= N; target by nearest neighbour, colours stay exact)
      sa1b, coco_instances, synthetic_seg
                     background=R,G,B (unlabelled pixels, default 0,0,0)
      sgt_pairs      mask_suffix=.png  image_dir=sam_selection  mask_dir=sam_mask
                     image_exts=.jpg,.jpeg,.webp  list=FILE (keep only the stems listed there,
                     e.g. file_names/sam_190k_new.txt)
      coco_panoptic  colors=coco|render (target colours: the PNG's own, or our renderer's)
      coco_instances by=instance|category  crowd=0|1
      llava          fix_placeholders=0|1 (prepend missing <image> to the first human turn when a
                     record has images but no placeholder at all), max_pixels=N
      synthetic_*    n=NUM_IMAGES (default 1000)  gen_seed=S (default 0)  size=LO-HI (default
                     64-128)  shapes=LO-HI (default 1-6)
      tfds           data_dir=DIR  target=FEATURE (default panoptic_image)

    examples:  sa1b:/data/sa1b/sa_00000*.tar      sgt_pairs:/data/SAM-SGT?max_side=1024
               llava:/data/ov/all_data.jsonl::/data/ov/images      synthetic_seg:?n=5000

The run seed (``make_source(..., seed=)``) only affects rendered colours (SA-1B, COCO
instances, ``colors=render``); the synthetic scenes themselves depend on ``gen_seed``.
Tar shards are indexed once (member offsets; with ``workdir`` the index is cached under
``WORKDIR/index_cache``) and read by offset -- never extracted. Compressed tars cannot be read
by offset: decompress them first.

URLs go through ``sgt_jax.fileio`` (local paths take the same code as before): a file or a tar
member is one ranged read per sample; a remote tar is indexed from its headers (``tarfile`` over
a read-ahead window of ``TAR_READAHEAD`` bytes per member, or in big windows when members are
small: ``TAR_STREAM_BELOW``; never the whole shard otherwise; shards in parallel) and its index
cached in the local cache (``fileio.local_cache_dir('index_cache')``) and in
``WORKDIR/index_cache`` (also when that is a URL), keyed by URL, size and generation / etag; a
remote .jsonl is indexed in one streaming pass (its line index cached the same way).
``python -m sgt_jax.data.index`` builds all the indexes of a run config once. Sources hold paths
only (no filesystem objects), so each Grain worker process opens its own. A URL workdir's
synthetic data is generated into the local cache (``_synthetic_dir``).
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import json
import logging
import operator
import os
import tarfile
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from sgt_jax import fileio
from sgt_jax.data import render
from sgt_jax.data.records import BadRecord

log = logging.getLogger(__name__)

REASONS = ("missing_file", "path_outside_root", "read_error", "corrupt_image", "image_too_large",
           "bad_annotation", "no_masks", "bad_json", "bad_conversation", "bad_text",
           "placeholder_mismatch", "unsupported")

DEFAULT_MAX_PIXELS = 8192 * 8192
IMAGE_PLACEHOLDER = "<image>"


# ================================================================================================
# images
# ================================================================================================

class _ImageError(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def _fit_size(h: int, w: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _to_rgb(im: Image.Image, composite: bool) -> Image.Image:
    """Any PIL mode -> RGB. 16/32-bit grey is scaled (not clipped); alpha over white if composite."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im)
        if im.mode == "F":
            a = np.clip(a, 0, 255)
        elif a.max(initial=0) > 255:
            a = a.astype(np.int64) >> (16 if a.max() > 65535 else 8)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
    if composite and (im.mode in ("RGBA", "LA", "PA") or
                      (im.mode == "P" and "transparency" in im.info)):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 out_hw: tuple[int, int] | None = None, composite: bool = True,
                 resample: int = Image.BICUBIC) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode image bytes to uint8 RGB ``(H, W, 3)``; returns ``(array, (orig_h, orig_w))``.

    ``out_hw`` resizes (``resample``; JPEG decodes at a reduced DCT scale first when it can).
    ``composite``: alpha composited over white (photos, as BAGEL's ``pil_img2rgb``); colour masks
    pass ``composite=False, resample=NEAREST`` so that label colours stay exact.
    Raises ``_ImageError`` with reason corrupt_image / image_too_large.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _ImageError("image_too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for garbage input
        raise _ImageError("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise _ImageError("corrupt_image", f"image has size {w}x{h}")
    if w * h > max_pixels:
        raise _ImageError("image_too_large", f"{w}x{h} > max_pixels={max_pixels}")
    try:
        if out_hw is not None and (out_hw[0], out_hw[1]) != (h, w) and im.format == "JPEG":
            im.draft("RGB", (out_hw[1], out_hw[0]))
        im.load()
        im = _to_rgb(im, composite)
        if out_hw is not None and im.size != (out_hw[1], out_hw[0]):
            im = im.resize((out_hw[1], out_hw[0]), resample=resample)
        a = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001
        raise _ImageError("corrupt_image", f"{type(e).__name__}: {e}") from None
    if a.ndim != 3 or a.shape[2] != 3:
        raise _ImageError("corrupt_image", f"decoded to shape {a.shape}")
    return np.ascontiguousarray(a), (h, w)


def _image_size(data: bytes) -> tuple[int, int]:
    """(h, w) from the header only; raises _ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            w, h = Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError as e:
        raise _ImageError("image_too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001
        raise _ImageError("corrupt_image", f"{type(e).__name__}: {e}") from None
    return h, w


# ================================================================================================
# files in folders and tar shards
# ================================================================================================

_Ref = tuple[int, str, int, int]   # (container index, name, offset, size); offset -1 = plain file


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
INDEX_THREADS = 16            # remote tar shards indexed concurrently


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


# ================================================================================================
# sources
# ================================================================================================

class _Source:
    name = "source"
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


def _seg_record(key: str, image: np.ndarray, target: np.ndarray) -> dict:
    return {"task": "seg", "id": key, "image": image, "target": target}


class SA1BSource(_Source):
    """Raw SA-1B: ``X.jpg`` + ``X.json`` (SA-1B per-image JSON, COCO RLE masks) -> seg records.

    The target is rendered by ``render.render_masks`` (largest first, distinct colours, seed from
    ``(seed, image.image_id)``; the key when the JSON has no image id).
    """
    name = "sa1b"

    def __init__(self, paths: Sequence[str], *, seed: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: int | None = None, background: Sequence[int] = (0, 0, 0),
                 cache_dir: str | None = None):
        self.paths, self.seed = list(paths), int(seed)
        self.max_pixels, self.max_side = int(max_pixels), max_side
        self.background = tuple(int(c) for c in background)
        files = FileSet(self.paths, cache_dir=cache_dir)

        def classify(name: str):
            stem = _strip_ext(name, (".jpg", ".jpeg"))
            if stem is not None:
                return stem, "image"
            stem = _strip_ext(name, (".json",))
            return (stem, "ann") if stem is not None else None

        self._kf = _KeyedFiles(files, classify, ("image", "ann"), required="image", source=self.name)
        self._keys = self._kf.keys

    def _describe(self) -> str:
        return f"paths={self.paths!r}, seed={self.seed}, max_side={self.max_side}"

    def __getitem__(self, i) -> dict:
        i = self._index(i)
        key, kf = self._keys[i], self._kf
        img_bytes = self._read(kf.files, kf.refs["image"][i], key, "image")
        ann_bytes = self._read(kf.files, kf.refs["ann"][i], key, "annotation (.json)")
        try:
            meta = json.loads(ann_bytes)
            info = meta.get("image", {}) if isinstance(meta, dict) else None
            anns = meta.get("annotations") if isinstance(meta, dict) else None
            if not isinstance(info, dict) or not isinstance(anns, list):
                raise ValueError("expected {'image': {...}, 'annotations': [...]}")
            rles = [a["segmentation"] for a in anns]
        except (ValueError, KeyError, TypeError, RecursionError) as e:   # JSONDecodeError: ValueError
            raise self._bad("bad_annotation", key, f"{type(e).__name__}: {e}") from None
        h, w = _image_size_or_bad(self, img_bytes, key)
        if ("height" in info and "width" in info) and (info["height"], info["width"]) != (h, w):
            raise self._bad("bad_annotation", key, f"JSON image size {info['height']}x"
                                                   f"{info['width']} != image {h}x{w}")
        if not rles:
            raise self._bad("no_masks", key)
        oh, ow = _fit_size(h, w, self.max_side)
        image, _ = self._decode(img_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow))
        try:
            target = render.render_masks(rles, (h, w), seed=self.seed,
                                         image_id=info.get("image_id", key),
                                         background=self.background, out_hw=(oh, ow))
        except (ValueError, TypeError) as e:
            raise self._bad("bad_annotation", key, str(e)) from None
        return _seg_record(key, image, target)


def _image_size_or_bad(src: _Source, data: bytes, key: str) -> tuple[int, int]:
    try:
        return _image_size(data)
    except _ImageError as e:
        raise src._bad(e.reason, key, e.detail) from None


class SgtPairsSource(_Source):
    """Pre-rendered SGT pairs: an RGB image and a colour-mask PNG under the same key -> seg.

    Layouts (folders or tar shards, pairing is global across shards):
      * released SAM-SGT: ``.../sam_selection/X.jpg`` + ``.../sam_mask/X.png`` (``image_dir`` /
        ``mask_dir`` name the two directory components that are dropped from the key);
      * flat: ``X.jpg`` + ``X<mask_suffix>`` (``.png`` by default, e.g. ``_mask.png``).
    The mask is resized to the image size with nearest neighbour if they differ (SGT resizes it
    with PIL's default bicubic, which blends colours at boundaries: documented deviation).
    """
    name = "sgt_pairs"

    def __init__(self, paths: Sequence[str], *, mask_suffix: str = ".png",
                 image_dir: str | None = "sam_selection", mask_dir: str | None = "sam_mask",
                 image_exts: Sequence[str] = (".jpg", ".jpeg", ".webp"),
                 list_file: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: int | None = None, cache_dir: str | None = None):
        self.paths, self.mask_suffix = list(paths), mask_suffix.lower()
        self.image_dir, self.mask_dir = image_dir or None, mask_dir or None
        self.image_exts = tuple(e.lower() if e.startswith(".") else "." + e.lower()
                                for e in image_exts)
        if self.mask_suffix in self.image_exts:
            raise ValueError(f"mask_suffix {mask_suffix!r} is also an image extension: use "
                             f"another mask_suffix (e.g. _mask.png) or image_exts")
        self.max_pixels, self.max_side = int(max_pixels), max_side
        keep = None
        if list_file:
            keep = {os.path.splitext(os.path.basename(ln.strip()))[0]
                    for ln in fileio.read_text(list_file).splitlines() if ln.strip()}

        def drop_dir(parts: list[str], d: str | None) -> list[str] | None:
            if d is None or d not in parts[:-1]:
                return None
            j = len(parts) - 2 - parts[:-1][::-1].index(d)
            return parts[:j] + parts[j + 1:]

        def classify(name: str):
            parts = name.split("/")
            in_mask = drop_dir(parts, self.mask_dir)
            in_image = drop_dir(parts, self.image_dir)
            if in_mask is not None:
                stem = _strip_ext("/".join(in_mask), (self.mask_suffix,))
                kr = (stem, "mask") if stem is not None else None
            elif in_image is not None:
                stem = _strip_ext("/".join(in_image), self.image_exts)
                kr = (stem, "image") if stem is not None else None
            else:
                stem = _strip_ext(name, (self.mask_suffix,))
                if stem is not None:
                    kr = (stem, "mask")
                else:
                    stem = _strip_ext(name, self.image_exts)
                    kr = (stem, "image") if stem is not None else None
            if kr is not None and keep is not None and kr[0].rsplit("/", 1)[-1] not in keep:
                return None
            return kr

        self._kf = _KeyedFiles(FileSet(self.paths, cache_dir=cache_dir), classify,
                               ("image", "mask"), required="image", source=self.name)
        self._keys = self._kf.keys

    def _describe(self) -> str:
        return (f"paths={self.paths!r}, mask_suffix={self.mask_suffix!r}, "
                f"image_dir={self.image_dir!r}, mask_dir={self.mask_dir!r}, max_side={self.max_side}")

    def __getitem__(self, i) -> dict:
        i = self._index(i)
        key, kf = self._keys[i], self._kf
        img_bytes = self._read(kf.files, kf.refs["image"][i], key, "image")
        mask_bytes = self._read(kf.files, kf.refs["mask"][i], key, "colour-mask")
        h, w = _image_size_or_bad(self, img_bytes, key)
        oh, ow = _fit_size(h, w, self.max_side)
        image, _ = self._decode(img_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow))
        target, _ = self._decode(mask_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow),
                                 composite=False, resample=Image.NEAREST)
        return _seg_record(key, image, target)


class CocoPanopticSource(_Source):
    """COCO panoptic: ``images/X.jpg`` + the panoptic PNG -> seg (target = the PNG's colours).

    ``colors='render'`` re-colours the segments (id = R + 256 G + 256^2 B, 0 = void) with our
    renderer instead (largest first, distinct, seeded per image) -- class-agnostic like SA-1B.
    """
    name = "coco_panoptic"

    def __init__(self, json_path: str, png_dir: str, image_dir: str, *, seed: int = 0,
                 colors: str = "coco", max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: int | None = None):
        if colors not in ("coco", "render"):
            raise ValueError(f"colors must be 'coco' or 'render', got {colors!r}")
        self.json_path, self.png_dir, self.image_dir = json_path, png_dir, image_dir
        self.seed, self.colors = int(seed), colors
        self.max_pixels, self.max_side = int(max_pixels), max_side
        meta = fileio.read_json(json_path)
        if not isinstance(meta, dict) or "annotations" not in meta or "images" not in meta:
            raise ValueError(f"{json_path}: not a COCO panoptic JSON (needs 'images' and "
                             f"'annotations')")
        files = {im["id"]: im["file_name"] for im in meta["images"]}
        self._entries = []    # (image file, png file, number of segments)
        for a in meta["annotations"]:
            self._entries.append((files.get(a.get("image_id")), a.get("file_name"),
                                  len(a.get("segments_info") or [])))
        self._keys = [os.path.splitext(png or "")[0] or f"ann{j}"
                      for j, (_, png, _) in enumerate(self._entries)]

    def _describe(self) -> str:
        return f"json={self.json_path!r}, colors={self.colors!r}, max_side={self.max_side}"

    def __getitem__(self, i) -> dict:
        i = self._index(i)
        key = self._keys[i]
        image_file, png_file, n_segments = self._entries[i]
        if image_file is None or png_file is None:
            raise self._bad("bad_annotation", key, "annotation without image entry / file_name")
        if n_segments == 0:
            raise self._bad("no_masks", key)
        img_bytes = _read_path(self, self.image_dir, image_file, key)
        png_bytes = _read_path(self, self.png_dir, png_file, key)
        h, w = _image_size_or_bad(self, img_bytes, key)
        ph, pw = _image_size_or_bad(self, png_bytes, key)
        if (ph, pw) != (h, w):
            raise self._bad("bad_annotation", key, f"panoptic PNG {ph}x{pw} != image {h}x{w}")
        oh, ow = _fit_size(h, w, self.max_side)
        image, _ = self._decode(img_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow))
        if self.colors == "coco":
            target, _ = self._decode(png_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow),
                                     composite=False, resample=Image.NEAREST)
        else:
            rgb, _ = self._decode(png_bytes, key, max_pixels=self.max_pixels, composite=False)
            rgb = rgb.astype(np.int64)
            ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
            uniq = np.unique(ids)
            uniq = uniq[uniq != 0]
            masks = [ids == u for u in uniq]
            target = render.render_masks(masks, (h, w), seed=self.seed, image_id=key,
                                         out_hw=(oh, ow))
        return _seg_record(key, image, target)


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


class CocoInstancesSource(_Source):
    """COCO instances JSON (polygons / RLE / crowd RLE) -> seg, masks via pycocotools.

    ``by='instance'``: every annotation is a mask, rendered like SA-1B (class-agnostic).
    ``by='category'``: masks of a category are merged and coloured with one colour per category,
    fixed for the run (semantic target). Crowd annotations are skipped unless ``crowd=True``.
    """
    name = "coco_instances"

    def __init__(self, json_path: str, image_dir: str, *, seed: int = 0, by: str = "instance",
                 crowd: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: int | None = None, background: Sequence[int] = (0, 0, 0)):
        if by not in ("instance", "category"):
            raise ValueError(f"by must be 'instance' or 'category', got {by!r}")
        try:
            from pycocotools import mask as _  # noqa: F401
        except ImportError:
            raise ImportError("coco_instances needs pycocotools (pip install -r requirements.txt)")
        self.json_path, self.image_dir, self.seed, self.by = json_path, image_dir, int(seed), by
        self.crowd, self.max_pixels, self.max_side = bool(crowd), int(max_pixels), max_side
        self.background = tuple(int(c) for c in background)
        meta = fileio.read_json(json_path)
        if not isinstance(meta, dict) or "images" not in meta or "annotations" not in meta:
            raise ValueError(f"{json_path}: not a COCO instances JSON (needs 'images' and "
                             f"'annotations')")
        per_image: dict[Any, list] = collections.defaultdict(list)
        for a in meta["annotations"]:
            if not self.crowd and a.get("iscrowd", 0):
                continue
            per_image[a.get("image_id")].append(
                [a.get("segmentation"), a.get("category_id", 0), a.get("id")])
        self._images = [(im.get("id"), im.get("file_name"), im.get("height"), im.get("width"),
                         json.dumps(per_image.get(im.get("id"), []), separators=(",", ":")))
                        for im in meta["images"]]
        self._keys = [os.path.splitext(im[1] or "")[0] or f"img{im[0]}" for im in self._images]
        cats = sorted({c["id"] for c in meta.get("categories", [])} |
                      {c for anns in per_image.values() for _, c, _ in anns})
        self._cat_index = {c: j for j, c in enumerate(cats)}
        self._cat_colors = render.distinct_colors(len(cats), render.render_seed(seed, "categories"),
                                                  background=self.background)

    def _describe(self) -> str:
        return f"json={self.json_path!r}, by={self.by!r}, crowd={self.crowd}, max_side={self.max_side}"

    def __getitem__(self, i) -> dict:
        from pycocotools import mask as mask_utils
        i = self._index(i)
        key = self._keys[i]
        image_id, file_name, jh, jw, anns_json = self._images[i]
        anns = json.loads(anns_json)
        if not anns:
            raise self._bad("no_masks", key)
        img_bytes = _read_path(self, self.image_dir, file_name or "", key)
        h, w = _image_size_or_bad(self, img_bytes, key)
        if (jh, jw) != (h, w):
            raise self._bad("bad_annotation", key, f"JSON size {jh}x{jw} != image {h}x{w}")
        masks, cats = [], []
        try:
            for seg, cat, _ in anns:
                if isinstance(seg, list):                      # polygons
                    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
                elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
                    rle = mask_utils.frPyObjects(seg, h, w)    # uncompressed RLE
                elif isinstance(seg, dict):
                    rle = dict(seg)
                    if list(rle.get("size", [])) != [h, w]:
                        raise ValueError(f"RLE size {rle.get('size')} != image [{h}, {w}]")
                    if isinstance(rle["counts"], str):
                        rle["counts"] = rle["counts"].encode("ascii")
                else:
                    raise ValueError(f"unsupported segmentation {type(seg).__name__}")
                masks.append(mask_utils.decode(rle))
                cats.append(cat)
        except Exception as e:  # noqa: BLE001 -- pycocotools raises assorted types
            raise self._bad("bad_annotation", key, f"{type(e).__name__}: {e}") from None
        oh, ow = _fit_size(h, w, self.max_side)
        image, _ = self._decode(img_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow))
        if self.by == "instance":
            target = render.render_masks(masks, (h, w), seed=self.seed, image_id=image_id,
                                         background=self.background, out_hw=(oh, ow))
        else:
            merged: dict[int, np.ndarray] = {}
            for m, c in zip(masks, cats):
                merged[c] = merged[c] | (m != 0) if c in merged else (m != 0)
            order_cats = list(merged)
            labels, order = render.label_map([merged[c] for c in order_cats], (h, w))
            if (oh, ow) != (h, w):
                labels = render.resize_labels(labels, (oh, ow))
            colors = np.stack([self._cat_colors[self._cat_index[order_cats[j]]] for j in order])
            target = render.colorize(labels, colors, self.background)
        return _seg_record(key, image, target)


# ------------------------------------------------------------------------------------------------
# LLaVA-OneVision SFT
# ------------------------------------------------------------------------------------------------

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


class LlavaSource(_Source):
    """LLaVA(-OneVision) SFT records -> vqa records.

    Files: ``.jsonl`` (one object a line; indexed by byte offset), ``.json`` (a list of objects),
    ``.parquet`` (needs pyarrow). Fields: ``id``; ``image``: a path relative to ``image_root``,
    a list of them, ``{"bytes": ..., "path": ...}`` (HF parquet), or absent / null / "" / "None"
    for text-only; ``conversations``: alternating human / gpt turns (``user`` / ``assistant``
    accepted), starting with human and ending with gpt, ``<image>`` placeholders only in human
    turns and exactly one per image.
    """
    name = "llava"

    def __init__(self, path: str, image_root: str | None = None, *,
                 fix_placeholders: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 cache_dir: str | None = None):
        self.path = path
        self.image_root = image_root if image_root is not None else (
            fileio.dirname(path) if fileio.is_remote(path) else os.path.dirname(path))
        self.fix_placeholders, self.max_pixels = bool(fix_placeholders), int(max_pixels)
        low = path.lower()
        self._rows = None
        self._table = None
        if low.endswith(".jsonl"):
            self._offsets, self._lengths = _jsonl_index(path, cache_dir)
            n = len(self._offsets)
        elif low.endswith(".json"):
            rows = fileio.read_json(path)
            if not isinstance(rows, list):
                raise ValueError(f"{path}: a LLaVA .json file must hold a list of records "
                                 f"(got {type(rows).__name__}); use .jsonl for one per line")
            self._rows = rows
            n = len(rows)
        elif low.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)")
            if fileio.is_remote(path):
                with fileio.open_read(path, JSONL_BUFFER) as f:
                    self._table = pq.read_table(f)
            else:
                self._table = pq.read_table(path)
            n = self._table.num_rows
        else:
            raise ValueError(f"{path}: LLaVA data must be .jsonl, .json or .parquet")
        stem = os.path.splitext(fileio.basename(path))[0]
        self._keys = [f"{stem}:{j}" for j in range(n)]

    def _describe(self) -> str:
        return f"path={self.path!r}, image_root={self.image_root!r}"

    def raw(self, i) -> dict:
        """The i-th record as stored (a dict); raises BadRecord('bad_json')."""
        i = self._index(i)
        key = self._keys[i]
        if self._rows is not None:
            row = self._rows[i]
        elif self._table is not None:
            row = self._table.slice(i, 1).to_pylist()[0]
        else:
            try:
                if fileio.is_remote(self.path):
                    line = fileio.read_bytes(self.path, int(self._offsets[i]),
                                             int(self._lengths[i]))
                else:
                    with open(self.path, "rb") as f:
                        f.seek(int(self._offsets[i]))
                        line = f.read(int(self._lengths[i]))
            except Exception as e:  # noqa: BLE001 -- OSError, or a remote backend's own
                raise self._bad("read_error", key, f"{type(e).__name__}: {e}") from None
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise self._bad("bad_json", key, f"{type(e).__name__}: {e}") from None
        if not isinstance(row, dict):
            raise self._bad("bad_json", key, f"record is a {type(row).__name__}, not an object")
        return row

    def __getitem__(self, i) -> dict:
        i = self._index(i)
        row = self.raw(i)
        key = str(row["id"]) if row.get("id") not in (None, "") else self._keys[i]
        if row.get("video") not in (None, "", "None"):
            raise self._bad("unsupported", key, "video records are not supported")
        images = row.get("image", row.get("images"))
        if images is None or (isinstance(images, str) and images.strip() in ("", "None")):
            images = []
        elif not isinstance(images, list):
            images = [images]
        convs = self._conversations(row, key)
        n_ph = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in convs if t["from"] == "human")
        if any(IMAGE_PLACEHOLDER in t["value"] for t in convs if t["from"] == "gpt"):
            raise self._bad("placeholder_mismatch", key, "<image> in a gpt turn")
        if n_ph != len(images):
            if self.fix_placeholders and n_ph == 0:
                convs[0]["value"] = (IMAGE_PLACEHOLDER + "\n") * len(images) + convs[0]["value"]
            else:
                raise self._bad("placeholder_mismatch", key,
                                f"{n_ph} <image> placeholders, {len(images)} images")
        arrays = [self._load(im, key) for im in images]
        return {"task": "vqa", "id": key, "images": arrays, "conversations": convs}

    def _conversations(self, row: dict, key: str) -> list[dict]:
        convs = row.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise self._bad("bad_conversation", key, "missing or empty 'conversations'")
        out = []
        for j, t in enumerate(convs):
            if not isinstance(t, dict) or not isinstance(t.get("value"), str):
                raise self._bad("bad_conversation", key, f"turn {j} is not {{from, value: str}}")
            try:
                t["value"].encode("utf-8")
            except UnicodeEncodeError as e:
                raise self._bad("bad_text", key, f"turn {j}: {e}") from None
            role = _ROLES.get(str(t.get("from", "")).lower())
            want = "human" if j % 2 == 0 else "gpt"
            if role != want:
                raise self._bad("bad_conversation", key,
                                f"turn {j} is from {t.get('from')!r}, expected {want!r} "
                                f"(turns must alternate human, gpt, ...)")
            out.append({"from": role, "value": t["value"]})
        if out[-1]["from"] != "gpt":
            raise self._bad("bad_conversation", key, "the last turn must be from gpt")
        return out

    def _load(self, im, key: str) -> np.ndarray:
        data = None
        if isinstance(im, dict):
            data, im = im.get("bytes"), im.get("path")
        elif isinstance(im, (bytes, bytearray)):
            data, im = bytes(im), None
        if data is None:
            if not isinstance(im, str) or not im:
                raise self._bad("bad_annotation", key, f"image entry {im!r} is not a path")
            data = _read_path(self, self.image_root, im, key)
        arr, _ = self._decode(data, key, max_pixels=self.max_pixels)
        return arr


# ------------------------------------------------------------------------------------------------
# TFDS
# ------------------------------------------------------------------------------------------------

class TfdsSource(_Source):
    """A prepared TFDS dataset read through ``tfds.data_source`` (ArrayRecord random access).

    Records with an ``image`` feature and a target image feature (``panoptic_image`` by default:
    ``coco/2017_panoptic``) become seg records. Needs ``tensorflow_datasets`` (not a dependency).
    """
    name = "tfds"

    def __init__(self, dataset: str, split: str, *, data_dir: str | None = None,
                 target: str = "panoptic_image", max_side: int | None = None):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ImportError("tfds sources need tensorflow_datasets (pip install "
                              "tensorflow-datasets) and a prepared copy of the dataset") from None
        self.dataset, self.split, self.data_dir = dataset, split, data_dir
        self.target, self.max_side = target, max_side
        self._ds = tfds.data_source(dataset, split=split, data_dir=data_dir)
        self._keys = range(len(self._ds))

    def _describe(self) -> str:
        return f"{self.dataset}:{self.split}, target={self.target!r}"

    def __getitem__(self, i) -> dict:
        i = self._index(i)
        key = f"{self.dataset}:{self.split}:{i}"
        try:
            ex = self._ds[i]
        except Exception as e:  # noqa: BLE001
            raise self._bad("read_error", key, f"{type(e).__name__}: {e}") from None
        if "image" not in ex or self.target not in ex:
            raise self._bad("unsupported", key, f"needs features 'image' and {self.target!r}, "
                                                f"has {sorted(ex)}")
        fname = ex.get("image/filename")
        if isinstance(fname, bytes):
            key = os.path.splitext(fname.decode())[0]
        image, target = np.asarray(ex["image"], np.uint8), np.asarray(ex[self.target], np.uint8)
        if image.ndim != 3 or target.shape[:2] != image.shape[:2]:
            raise self._bad("bad_annotation", key, f"image {image.shape} vs target {target.shape}")
        if target.ndim == 2 or target.shape[-1] == 1:
            target = np.repeat(target.reshape(*target.shape[:2], 1), 3, -1)
        h, w = image.shape[:2]
        oh, ow = _fit_size(h, w, self.max_side)
        if (oh, ow) != (h, w):
            image = np.asarray(Image.fromarray(image).resize((ow, oh), Image.BICUBIC))
            target = np.asarray(Image.fromarray(target).resize((ow, oh), Image.NEAREST))
        return _seg_record(key, np.ascontiguousarray(image), np.ascontiguousarray(target))


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


# ================================================================================================
# spec strings
# ================================================================================================

_SEG_OPTS = {"max_pixels", "max_side"}
_SYN_OPTS = {"n", "gen_seed", "size", "shapes"}
_OPTIONS = {
    "sa1b": _SEG_OPTS | {"background"},
    "sgt_pairs": _SEG_OPTS | {"mask_suffix", "image_dir", "mask_dir", "image_exts", "list"},
    "coco_panoptic": _SEG_OPTS | {"colors"},
    "coco_instances": _SEG_OPTS | {"background", "by", "crowd"},
    "llava": {"fix_placeholders", "max_pixels"},
    "synthetic_seg": _SEG_OPTS | {"background"} | _SYN_OPTS,
    "synthetic_vqa": {"max_pixels"} | _SYN_OPTS,
    "tfds": {"data_dir", "target", "max_side"},
}
_USAGE = {
    "sa1b": "sa1b:/path/dir_or_tar[,more][?max_side=1024]",
    "sgt_pairs": "sgt_pairs:/path/SAM-SGT[?mask_suffix=.png]",
    "coco_panoptic": "coco_panoptic:/ann/panoptic_train2017.json::/ann/panoptic_train2017::/train2017",
    "coco_instances": "coco_instances:/ann/instances_train2017.json::/train2017",
    "llava": "llava:/data/all_data.jsonl::/data/images",
    "synthetic_seg": "synthetic_seg:[/dir][?n=1000&gen_seed=0&size=64-128]",
    "synthetic_vqa": "synthetic_vqa:[/dir][?n=1000&gen_seed=0&size=64-128]",
    "tfds": "tfds:coco/2017_panoptic:train[?data_dir=/tfds]",
}


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


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``'kind:body?a=1&b=2'`` -> ``(kind, body, {'a': '1', 'b': '2'})``; raises SpecError."""
    if not isinstance(spec, str) or ":" not in spec:
        raise SpecError(f"source spec {spec!r}: expected KIND:BODY, KIND one of "
                        f"{sorted(_OPTIONS)}; e.g. {_USAGE['sa1b']!r}")
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in _OPTIONS:
        raise SpecError(f"source spec {spec!r}: unknown kind {kind!r}; known kinds: "
                        f"{', '.join(sorted(_OPTIONS))}")
    body, _, query = rest.partition("?")
    opts: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        name, eq, value = item.partition("=")
        if not eq:
            raise SpecError(f"source spec {spec!r}: option {item!r} must be NAME=VALUE; "
                            f"usage: {_USAGE[kind]!r}")
        if name not in _OPTIONS[kind]:
            raise SpecError(f"source spec {spec!r}: unknown option {name!r} for {kind}; valid: "
                            f"{', '.join(sorted(_OPTIONS[kind]))}")
        opts[name] = value
    return kind, body.strip(), opts


def _synthetic_dir(out: str, gen: dict, *, given: bool) -> str:
    """The directory to read synthetic scenes from. A finished set there (its stamp) is used as it
    is unless generation options were given (then they must match). Otherwise the set is generated
    there -- or, for a URL, into the local cache (``fileio.local_cache_dir('synthetic', <key of the
    parameters>)``): generation is deterministic, so every host builds the same set locally, and
    nothing has to be uploaded or coordinated between hosts."""
    from sgt_jax.data import synthetic

    stamp = synthetic.read_stamp(out)
    if stamp is not None and (not given or stamp == synthetic.generation_params(**gen)):
        return out
    if not fileio.is_remote(out):
        synthetic.ensure_generated(out, **gen)
        return out
    if stamp is not None:
        raise ValueError(f"{out} holds synthetic data generated with {stamp}, asked for "
                         f"{synthetic.generation_params(**gen)}: use another directory")
    if fileio.listdir(out):
        raise ValueError(f"{out} is not empty and has no {synthetic.STAMP_FILE}: it is not a "
                         f"synthetic data directory; choose an empty or new directory")
    params = synthetic.generation_params(**gen)
    local = os.path.join(fileio.local_cache_dir("synthetic"),
                         fileio.url_key(json.dumps(params, sort_keys=True)))
    log.info("synthetic data for %s: generated locally in %s (a URL is not written to)", out, local)
    return synthetic.ensure_generated(local, **gen)


def index_targets(spec: str) -> list[tuple[str, str]]:
    """The indexes ``make_source(spec)`` builds: ``("tar", path)`` for each tar shard (given, or
    met in a folder) of ``sa1b`` / ``sgt_pairs``, ``("jsonl", url)`` for a remote ``llava`` .jsonl
    (the only cached kinds; see ``sgt_jax.data.index``). Paths resolve as in ``make_source``."""
    kind, body, _ = parse_spec(spec)
    try:
        if kind in ("sa1b", "sgt_pairs") and body:
            return [("tar", x) for k, x in _plan_files(expand_paths(body)) if k == "tar"]
        if kind == "llava" and body:
            p = body.split("::")[0].strip()
            if fileio.is_remote(p) and p.lower().endswith(".jsonl"):
                return [("jsonl", p)]
    except (ValueError, OSError) as e:
        raise SpecError(f"source spec {spec!r}: {e}; usage: {_USAGE[kind]!r}") from e
    return []


def build_index(kind: str, path: str, *, workdir: str | None, fill_all: bool = True) -> dict:
    """Build (or find cached) the index of one ``index_targets`` entry, as ``make_source`` with
    this ``workdir`` would; returns its stats: ``cached``, ``members``, ``reads``,
    ``bytes_read``."""
    cache_dir = fileio.join(workdir, "index_cache") if workdir else None
    stats: dict = {}
    fn = {"tar": _tar_members, "jsonl": _jsonl_index}[kind]
    fn(path, cache_dir, stats=stats, fill_all=fill_all)
    return stats


def make_source(spec: str, *, seed: int, workdir: str | None = None):
    """Build a source from a spec string (grammar in the module docstring)."""
    kind, body, opts = parse_spec(spec)
    usage = f"usage: {_USAGE[kind]!r}"
    cache_dir = fileio.join(workdir, "index_cache") if workdir else None

    def parts(n_min: int, n_max: int) -> list[str]:
        ps = [p.strip() for p in body.split("::")] if body else []
        if not n_min <= len(ps) <= n_max or not all(ps):
            raise SpecError(f"source spec {spec!r}: {kind} needs {n_min}"
                            f"{'' if n_min == n_max else f'-{n_max}'} '::'-separated paths; {usage}")
        ps = [p if fileio.is_remote(p) else os.path.expanduser(p) for p in ps]
        for p in ps:
            if not fileio.exists(p):
                raise SpecError(f"source spec {spec!r}: path {p!r} does not exist; {usage}")
        return ps

    try:
        seg = {}
        if "max_pixels" in opts:
            seg["max_pixels"] = int(opts["max_pixels"])
        if "max_side" in opts:
            seg["max_side"] = int(opts["max_side"])
        bg = {}
        if "background" in opts:
            rgb = tuple(int(c) for c in opts["background"].split(","))
            if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
                raise ValueError("background must be R,G,B with 0..255 each")
            bg["background"] = rgb

        if kind == "sa1b":
            if not body:
                raise SpecError(f"source spec {spec!r}: no path; {usage}")
            return SA1BSource(expand_paths(body), seed=seed, cache_dir=cache_dir, **seg, **bg)
        if kind == "sgt_pairs":
            if not body:
                raise SpecError(f"source spec {spec!r}: no path; {usage}")
            kw = {k: opts[k] for k in ("mask_suffix", "image_dir", "mask_dir") if k in opts}
            if "image_exts" in opts:
                kw["image_exts"] = tuple(opts["image_exts"].split(","))
            if "list" in opts:
                kw["list_file"] = opts["list"]
            return SgtPairsSource(expand_paths(body), cache_dir=cache_dir, **kw, **seg)
        if kind == "coco_panoptic":
            js, png_dir, img_dir = parts(3, 3)
            return CocoPanopticSource(js, png_dir, img_dir, seed=seed,
                                      colors=opts.get("colors", "coco"), **seg)
        if kind == "coco_instances":
            js, img_dir = parts(2, 2)
            return CocoInstancesSource(js, img_dir, seed=seed, by=opts.get("by", "instance"),
                                       crowd=_parse_bool(opts.get("crowd", "0")), **seg, **bg)
        if kind == "llava":
            ps = parts(1, 2)
            return LlavaSource(ps[0], ps[1] if len(ps) > 1 else None, cache_dir=cache_dir,
                               fix_placeholders=_parse_bool(opts.get("fix_placeholders", "0")),
                               **({"max_pixels": seg["max_pixels"]} if "max_pixels" in seg else {}))
        if kind in ("synthetic_seg", "synthetic_vqa"):
            from sgt_jax.data import synthetic
            out = (body if fileio.is_remote(body) else os.path.expanduser(body)) if body else None
            if out is None:
                if not workdir:
                    raise SpecError(f"source spec {spec!r}: give a directory or a workdir; {usage}")
                out = fileio.join(workdir, "synthetic")
            gen = {"num_images": int(opts.get("n", 1000)), "seed": int(opts.get("gen_seed", 0))}
            if "size" in opts:
                gen["size"] = _parse_range(opts["size"], "size")
            if "shapes" in opts:
                gen["num_shapes"] = _parse_range(opts["shapes"], "shapes")
            out = _synthetic_dir(out, gen, given=bool(_SYN_OPTS & set(opts)))
            if kind == "synthetic_seg":
                return SA1BSource([out], seed=seed, cache_dir=cache_dir, **seg, **bg)
            return LlavaSource(fileio.join(out, synthetic.VQA_FILE), out, **seg)
        if kind == "tfds":
            name, _, split = body.partition(":")
            if not name or not split:
                raise SpecError(f"source spec {spec!r}: tfds needs NAME:SPLIT; {usage}")
            kw = {k: opts[k] for k in ("data_dir", "target") if k in opts}
            try:
                return TfdsSource(name, split, **kw, **({"max_side": seg["max_side"]}
                                                        if "max_side" in seg else {}))
            except ImportError:
                raise
            except Exception as e:  # noqa: BLE001 -- tfds raises its own types
                raise SpecError(f"source spec {spec!r}: {type(e).__name__}: {e}; prepare the "
                                f"dataset first (`tfds build {name}` or download_and_prepare "
                                f"into data_dir); {usage}") from e
    except SpecError:
        raise
    except (ValueError, OSError, ImportError) as e:
        raise SpecError(f"source spec {spec!r}: {e}; {usage}") from e
    raise AssertionError(kind)
