"""Data sources, tokenizer and pipeline on URLs (gs://, memory://): sgt_jax/data via sgt_jax/fileio.

No network: ``gs://`` is ``remote_fs.FakeGCS`` (a temp dir, registered by class path so that Grain
worker processes see it too), ``memory://`` is fsspec's in-memory filesystem. Evidence: the same
data read through a local path and through a URL gives identical records and identical skip
reasons (SA-1B folder + tar shards, SGT pairs + list file, LLaVA jsonl / json + image root, COCO
panoptic); a remote tar is indexed from its headers by bounded ranged reads (not the whole shard)
and its members read by one ranged read each; the index is cached (remote workdir + local cache);
the pipeline with URL sources, a URL tokenizer and a URL workdir gives the local run's batches,
with Grain worker processes; synthetic data and the tiny tokenizer of a URL workdir; errors.
"""
import io
import json
import os
import pickle
import shutil
import tarfile
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fake_data import _enc, _same_record, _tar, _write, outcomes, same_outcomes
from fsspec.implementations.memory import MemoryFileSystem
from remote_fs import FakeGCS, upload_tree

from sgt_jax import batch as B
from sgt_jax import fileio
from sgt_jax.data import config as C
from sgt_jax.data import pipeline as PL
from sgt_jax.data import sources, synthetic
from sgt_jax.data import tokenizer as T

FSSPEC_REGISTRY = __import__("importlib").import_module("fsspec.registry")


@pytest.fixture
def mem():
    root = f"memory://sgt-data-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def mem_upload(local, url):
    for name in fileio.walk_files(local):
        fileio.copy(os.path.join(local, name), fileio.join(url, name))
    return url


@pytest.fixture
def reads(monkeypatch):
    """(path, start, nbytes) of every read of a remote file (memory:// and the fake gs://)."""
    seen = []
    for cls in (MemoryFileSystem, FakeGCS):
        orig = cls.cat_file

        def cat_file(self, path, start=None, end=None, _orig=orig, **kw):
            data = _orig(self, path, start=start, end=end, **kw)
            seen.append((path, start, len(data)))
            return data
        monkeypatch.setattr(cls, "cat_file", cat_file)
    return seen


# ------------------------------------------------------------------------------------------------
# fileio additions

def test_fileio_glob_walk_open_read_signature(data, mem, fake_gcs):
    local = str(data / "sa1b")
    for url in (mem_upload(local, mem + "/sa1b"), upload_tree(local, fake_gcs, "gs://bkt/sa1b")):
        assert fileio.walk_files(url) == fileio.walk_files(local)         # os.walk order
        assert fileio.walk_files(url + "/folder")[:2] == ["sa_1.jpg", "sa_1.json"] and \
            fileio.walk_files(url + "/folder")[-2:] == ["sub/sa_900.jpg", "sub/sa_900.json"]
        assert fileio.glob(url + "/shards/*.tar") == [f"{url}/shards/sa_00000{i}.tar" for i in (0, 1)]
        assert fileio.glob(url + "/folder/sa_90[12].j*") == [
            url + f"/folder/sa_90{i}.{e}" for i in (1, 2) for e in ("jpg", "json")]
        assert fileio.glob(url + "/nothing*") == []
        tar = url + "/shards/sa_000000.tar"
        blob = Path(local, "shards", "sa_000000.tar").read_bytes()
        with fileio.open_read(tar, 1000) as f:
            f.seek(3000)
            assert f.read(10) == blob[3000:3010]
            f.seek(2995)
            assert f.read(2000) == blob[2995:4995] and f.tell() == 4995
            f.seek(0, os.SEEK_END)
            assert f.read(5) == b""
        sig = fileio.signature(tar)
        assert sig.startswith(f"{len(blob)}|") and sig == fileio.signature(tar)
    assert fileio.signature(local + "/shards/sa_000000.tar").startswith(f"{len(blob)}|")


# ------------------------------------------------------------------------------------------------
# sources: local path == URL

def test_sa1b_folder_and_tars_from_urls_equal_local(data, fake_gcs, tmp_path):
    upload_tree(data / "sa1b", fake_gcs, "gs://bkt/sa1b")
    local = sources.make_source(f"sa1b:{data}/sa1b/folder", seed=3)
    want = outcomes(local)
    assert len(want) == 9 and sorted(r for _, r in want if isinstance(r, str)) == [
        "bad_annotation", "corrupt_image", "missing_file", "no_masks"]
    specs = ["sa1b:gs://bkt/sa1b/folder", "sa1b:gs://bkt/sa1b/shards/*.tar",
             "sa1b:gs://bkt/sa1b/shards",
             "sa1b:gs://bkt/sa1b/shards/sa_000000.tar,gs://bkt/sa1b/shards/sa_000001.tar"]
    for spec in specs:
        remote = sources.make_source(spec, seed=3, workdir="gs://bkt/run")
        same_outcomes(local, remote)
        assert b"FakeGCS" not in pickle.dumps(remote) and b"fsspec" not in pickle.dumps(remote)
        _same_record(pickle.loads(pickle.dumps(remote))[0], local[0])
    # the tar index is cached in the URL workdir and in the local cache
    cached = sorted(fileio.listdir("gs://bkt/run/index_cache"))
    assert len(cached) == 2 and sorted(os.listdir(fileio.local_cache_dir("index_cache"))) == cached
    # ... and used: no tar is parsed again, whichever cache still holds it
    orig = tarfile.open
    tarfile.open = None
    try:
        same_outcomes(local, sources.make_source(specs[1], seed=3, workdir="gs://bkt/run"))
        shutil.rmtree(fileio.local_cache_dir("index_cache"))
        same_outcomes(local, sources.make_source(specs[1], seed=3, workdir="gs://bkt/run"))
        assert sorted(os.listdir(fileio.local_cache_dir("index_cache"))) == cached   # refilled
        same_outcomes(local, sources.make_source(specs[1], seed=3))        # local cache only
    finally:
        tarfile.open = orig
    # a local workdir caches remote shards there too (key: URL + size + generation / mtime)
    shutil.rmtree(fileio.local_cache_dir("index_cache"))
    sources.make_source(specs[1], seed=3, workdir=str(tmp_path))
    assert sorted(os.listdir(tmp_path / "index_cache")) == cached


def test_remote_tar_index_reads_headers_not_the_shard(tmp_path, mem, reads, monkeypatch):
    """Members of 20 KB, a read-ahead of 2 KB: the index costs ~2 KB per member, not the tar; a
    long (pax / GNU) name and a directory entry parse as tarfile parses them locally; a member is
    one ranged read of exactly its size."""
    rng = np.random.default_rng(0)
    members = [(f"d/m{i}.bin", rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
               for i in range(12)]
    members.append(("d/" + "long_name_" * 15 + ".bin", b"tail" * 100))
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("d")
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
        for n, b in members:
            ti = tarfile.TarInfo(n)
            ti.size = len(b)
            tf.addfile(ti, io.BytesIO(b))
    url = mem + "/s.tar"
    fileio.copy(str(path), url)
    size = path.stat().st_size
    monkeypatch.setattr(sources.tar, "TAR_READAHEAD", 2048)
    monkeypatch.setattr(sources.tar, "TAR_STREAM_BELOW", 0)      # per-member reads (no streaming)
    reads.clear()
    got = sources._tar_members(url, None)
    assert got == sources._tar_members(str(path), None)
    assert [n for n, _, _ in got] == [n for n, _ in members]
    header_bytes = sum(n for _, _, n in reads)
    assert max(n for _, _, n in reads) <= 2048 and header_bytes < size / 5, (header_bytes, size)
    assert len(reads) <= 2 * len(members) + 4
    fs = sources.FileSet([url])
    reads.clear()
    for j, (name, blob) in enumerate(members):
        assert fs.read(fs.entries[j]) == blob
    assert [n for _, _, n in reads] == [len(b) for _, b in members]      # one read per member


def test_remote_tar_index_streams_small_members(tmp_path, mem, reads, monkeypatch):
    """Streaming mode (sources.tar.TAR_STREAM_BELOW): a shard that fits one window is one GET; in a
    larger one, after TAR_PROBE members read one by one, small members are read in big windows
    (few GETs, about the shard's bytes) and a member larger than a window is skipped, not read;
    big members keep the per-member reads. Same index as tarfile's local scan every time."""
    rng = np.random.default_rng(1)
    sizes = [300] * 40 + [50_000] + [700] * 30                # small, one big, small
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i, n in enumerate(sizes):
            ti = tarfile.TarInfo(f"m{i:03d}" + ("_" * 120 if i == 7 else "") + ".bin")   # one pax
            ti.size = n
            tf.addfile(ti, io.BytesIO(rng.integers(0, 256, n, dtype=np.uint8).tobytes()))
    url = mem + "/s.tar"
    fileio.copy(str(path), url)
    size = path.stat().st_size
    want = sources._tar_members(str(path), None)
    monkeypatch.setattr(sources.tar, "TAR_READAHEAD", 1024)
    monkeypatch.setattr(sources.tar, "TAR_PROBE", 8)
    monkeypatch.setenv("SGT_JAX_CACHE_DIR", str(tmp_path / "cache"))

    def scan(window, below):
        monkeypatch.setattr(sources.tar, "TAR_STREAM_WINDOW", window)
        monkeypatch.setattr(sources.tar, "TAR_STREAM_BELOW", below)
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)      # no cached index
        reads.clear()
        st = {}
        assert sources._tar_members(url, None, stats=st) == want
        assert (st["reads"], st["bytes_read"]) == (len(reads) - 1, sum(n for _, _, n in reads[1:]))
        return st                                  # reads[0]: the compression check (6 bytes)

    st = scan(size, 2048)                         # fits one window: one GET of the shard
    assert st["streamed"] and st["reads"] == 1 and st["bytes_read"] == size
    ranged = scan(16_384, 0)                      # streaming off: about one GET per member
    assert not ranged["streamed"] and ranged["reads"] >= len(sizes) // 2
    st = scan(16_384, 2048)                       # probe 8 members (mean < 2 KiB), then windows
    assert st["streamed"] and st["reads"] < ranged["reads"] / 3, (st, ranged)
    assert st["bytes_read"] < size - 30_000      # the 50 KB member was skipped
    st = scan(16_384, 200)                         # members above the threshold: per member
    assert not st["streamed"] and st["reads"] == ranged["reads"]


def test_truncated_and_bad_remote_tars(tmp_path, mem):
    folder = str(tmp_path / "f")
    synthetic.generate(folder, 3, seed=2, size=(32, 40))
    names = sorted(n for n in os.listdir(folder) if n.startswith("sa_"))
    shard = _tar(tmp_path / "s.tar", [(n, Path(folder, n).read_bytes()) for n in names])
    blob = Path(shard).read_bytes()
    with tarfile.open(shard) as tf:
        last = tf.getmembers()[-1]
    cut = blob[: last.offset_data + last.size // 2]
    with open(shard, "wb") as f:
        f.write(cut)
    fileio.write_text(mem + "/x", "")
    with fileio.open_write(mem + "/t/s.tar") as f:
        f.write(cut)
    counts = {}
    for p in (shard, mem + "/t/s.tar"):
        sk = sources.SkippingSource(sources.SA1BSource([p], seed=0))
        assert sum(sk[i] is not None for i in range(len(sk))) == 2
        counts[p] = dict(sk.counts)
    assert counts[shard] == counts[mem + "/t/s.tar"] and sum(counts[shard].values()) == 1
    import gzip
    with fileio.open_write(mem + "/t/z.tar") as f:
        f.write(gzip.compress(b"\0" * 1024))
    with pytest.raises(ValueError, match="compressed tar"):
        sources.SA1BSource([mem + "/t/z.tar"], seed=0)
    fileio.write_text(mem + "/t/notatar", "hello")
    with pytest.raises(ValueError, match="neither a directory nor an uncompressed .tar"):
        sources.SA1BSource([mem + "/t/notatar"], seed=0)
    fileio.copy(str(tmp_path / "s.tar"), mem + "/t/noext")                # a tar without .tar
    assert len(sources.SA1BSource([mem + "/t/noext"], seed=0)) == 3


def test_sgt_pairs_from_urls_equal_local(data, fake_gcs):
    upload_tree(data / "pairs", fake_gcs, "gs://bkt/pairs")
    for body, n in (("SAM-SGT", 6), ("tars/part*.tar", 5), ("SAM-SGT?list={root}/list.txt", 3)):
        local = sources.make_source(f"sgt_pairs:{data}/pairs/{body.format(root=data / 'pairs')}", seed=0)
        remote = sources.make_source(f"sgt_pairs:gs://bkt/pairs/{body.format(root='gs://bkt/pairs')}",
                                     seed=0)
        got = same_outcomes(local, remote)
        assert len(got) == n
    reasons = dict(outcomes(sources.make_source("sgt_pairs:gs://bkt/pairs/SAM-SGT", seed=0)))
    assert reasons["lonely"] == "missing_file" and reasons["sa_2"] == "corrupt_image"


def test_llava_from_urls_equal_local(data, fake_gcs, mem):
    upload_tree(data / "llava", fake_gcs, "gs://bkt/llava")
    mem_upload(str(data / "llava"), mem + "/llava")
    want = {"one": None, "text": None, "data:2": "bad_json", "missing": "missing_file",
            "corrupt": "corrupt_image", "roles": "bad_conversation"}
    for root in ("gs://bkt/llava", mem + "/llava"):
        for f in ("data.jsonl", "data.json"):
            local = sources.make_source(f"llava:{data}/llava/{f}::{data}/llava/images", seed=0)
            remote = sources.make_source(f"llava:{root}/{f}::{root}/images", seed=0)
            got = same_outcomes(local, remote)
            assert {(r["id"] if isinstance(r, dict) else k): (None if isinstance(r, dict) else r)
                    for k, r in got} == {k: v for k, v in want.items() if f == "data.jsonl" or k != "data:2"}
        # IMAGE_ROOT defaults to the directory of FILE
        d = sources.make_source(f"llava:{root}/images/data.jsonl", seed=0)
        assert d.image_root == f"{root}/images"
        same_outcomes(sources.make_source(f"llava:{data}/llava/images/data.jsonl", seed=0), d)


def test_llava_jsonl_index_streams_in_bounded_reads(data, mem, reads, monkeypatch):
    monkeypatch.setattr(sources.jsonl, "JSONL_BUFFER", 64)
    mem_upload(str(data / "llava"), mem + "/llava")
    reads.clear()
    src = sources.LlavaSource(mem + "/llava/data.jsonl", mem + "/llava/images")
    size = (data / "llava" / "data.jsonl").stat().st_size
    assert max(n for _, _, n in reads) <= 64 and sum(n for _, _, n in reads) == size
    reads.clear()
    src.raw(1)
    assert [n for _, _, n in reads] == [int(src._lengths[1])]


def test_coco_panoptic_from_urls_equal_local(tmp_path, fake_gcs):
    h, w = 24, 32
    ids = np.zeros((h, w), np.int64)
    ids[:, :12] = 769
    ids[5:15, 16:28] = 300
    png = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], -1).astype(np.uint8)
    img = np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)
    d = tmp_path / "coco"
    _write(f"{d}/images/000001.jpg", _enc(img))
    _write(f"{d}/ann/000001.png", _enc(png, "PNG"))
    _write(f"{d}/images/000002.jpg", _enc(img))                      # PNG missing
    segs = [{"id": i, "category_id": 1} for i in (769, 300)]
    meta = {"images": [{"id": k, "file_name": f"00000{k}.jpg"} for k in (1, 2)],
            "annotations": [{"image_id": k, "file_name": f"00000{k}.png", "segments_info": segs}
                            for k in (1, 2)]}
    _write(f"{d}/ann/panoptic.json", json.dumps(meta))
    upload_tree(d, fake_gcs, "gs://bkt/coco")
    spec = "coco_panoptic:{r}/ann/panoptic.json::{r}/ann::{r}/images?colors=render"
    got = same_outcomes(sources.make_source(spec.format(r=d), seed=0),
                        sources.make_source(spec.format(r="gs://bkt/coco"), seed=0))
    assert got[1] == ("000002", "missing_file")


def test_url_errors_read_like_local_ones(fake_gcs, no_gcsfs_env):
    (fake_gcs / "bkt" / "d").mkdir(parents=True)
    (fake_gcs / "bkt" / "d" / "x.json").write_text("[]")
    for spec, match in [("sa1b:gs://bkt/nothing", "path 'gs://bkt/nothing' does not exist"),
                        ("sa1b:gs://bkt/d/*.tar", "glob 'gs://bkt/d/\\*.tar' matches nothing"),
                        ("llava:gs://bkt/d/missing.jsonl", "does not exist"),
                        ("llava:gs://bkt/d/x.json::gs://bkt/nope", "'gs://bkt/nope' does not exist"),
                        ("sgt_pairs:gs://bkt/d?list=gs://bkt/d/nolist.txt", "nolist.txt"),
                        ("sa1b:s3://bkt/d", "install s3fs to use s3:// paths")]:
        with pytest.raises(sources.SpecError, match=match) as e:
            sources.make_source(spec, seed=0)
        assert repr(spec) in str(e.value)


@pytest.fixture
def no_gcsfs_env():
    """s3:// as without s3fs installed (whether or not it is)."""
    saved = {k: FSSPEC_REGISTRY.known_implementations.get(k) for k in ("s3", "s3a")}
    for k in saved:
        FSSPEC_REGISTRY.known_implementations[k] = {"class": "sgt_no_such_module_s3fs.S3FileSystem",
                                                    "err": "Install s3fs to access S3"}
    reg = {k: FSSPEC_REGISTRY._registry.pop(k, None) for k in saved}
    yield
    for k, v in saved.items():
        FSSPEC_REGISTRY.known_implementations[k] = v
        if reg[k] is not None:
            FSSPEC_REGISTRY._registry[k] = reg[k]


def test_missing_backend_says_install_gcsfs(monkeypatch, tmp_path):
    monkeypatch.delitem(FSSPEC_REGISTRY._registry, "gs", raising=False)
    monkeypatch.setitem(FSSPEC_REGISTRY.known_implementations, "gs", {
        "class": "sgt_no_such_module_gcsfs.GCSFileSystem", "err": "Please install gcsfs"})
    with pytest.raises(sources.SpecError, match="install gcsfs to use gs:// paths"):
        sources.make_source("sgt_pairs:gs://bkt/SAM-SGT", seed=0)
    cfg = C.tiny_data_config()
    cfg.tokenizer_path = "gs://bkt/model/tokenizer"
    with pytest.raises(fileio.BackendMissingError, match="install gcsfs"):
        PL.ensure_tokenizer(cfg, str(tmp_path))


# ------------------------------------------------------------------------------------------------
# tokenizer, synthetic data, the pipeline

def test_tokenizer_from_a_url_is_copied_once(fake_gcs, tmp_path, reads):
    local = T.build_tiny_tokenizer(str(tmp_path / "tok"))
    upload_tree(local, fake_gcs, "gs://bkt/model/tokenizer")
    cfg = C.tiny_data_config()
    cfg.tokenizer_path = "gs://bkt/model/tokenizer"
    tok = PL.ensure_tokenizer(cfg, "gs://bkt/run")
    assert not fileio.is_remote(tok.path) and tok.path.startswith(os.environ["SGT_JAX_CACHE_DIR"])
    ref = T.Tokenizer(local)
    text = "How many red circles are there? <|im_start|>"
    assert tok.encode(text) == ref.encode(text) and tok.special == ref.special
    n = len(reads)
    assert PL.ensure_tokenizer(cfg, "gs://bkt/run").path == tok.path and len(reads) == n  # once
    url_tok = T.Tokenizer("gs://bkt/model/tokenizer")                 # a URL path works too
    assert url_tok.encode(text) == ref.encode(text)
    assert pickle.loads(pickle.dumps(url_tok)).path == "gs://bkt/model/tokenizer"
    cfg.tokenizer_path = "gs://bkt/model/tokenizer_missing"
    with pytest.raises(FileNotFoundError, match="tokenizer_missing.*does not exist"):
        PL.ensure_tokenizer(cfg, "gs://bkt/run")


def _default_cfg(n=6):
    cfg = C.tiny_data_config()
    cfg.sources.seg = f"synthetic_seg:{{workdir}}/synthetic?n={n}"
    cfg.sources.vqa = f"synthetic_vqa:{{workdir}}/synthetic?n={n}"
    return cfg


def test_url_workdir_synthetic_data_and_tiny_tokenizer(fake_gcs, tmp_path):
    """Synthetic data of a URL workdir is generated into the local cache (nothing uploaded); the
    tiny tokenizer is built locally and uploaded to WORKDIR/tokenizer; batches = the local run's."""
    cfg = _default_cfg()
    a = PL.make_train_iterator(cfg, workdir=str(tmp_path / "run"))
    b = PL.make_train_iterator(cfg, workdir="gs://bkt/run")
    for _ in range(2):
        (ba, sa), (bb, sb) = next(a), next(b)
        for f in B.TOKEN_FIELDS + ("vit_patches", "vae_images"):
            assert np.array_equal(getattr(ba, f), getattr(bb, f)), f
        assert sa == sb
    run = fake_gcs / "bkt" / "run"
    assert sorted(os.listdir(run)) == ["tokenizer"]                     # no synthetic/ uploaded
    assert sorted(os.listdir(run / "tokenizer")) == sorted(os.listdir(tmp_path / "run" / "tokenizer"))
    for f in os.listdir(run / "tokenizer"):
        assert (run / "tokenizer" / f).read_bytes() == (tmp_path / "run" / "tokenizer" / f).read_bytes()
    # an interrupted upload (no tokenizer.json, which goes last) is redone, not loaded
    (run / "tokenizer" / "tokenizer.json").unlink()
    (run / "tokenizer" / "vocab.json").write_text("{}")
    tok = PL.ensure_tokenizer(cfg, "gs://bkt/run")
    assert (run / "tokenizer" / "vocab.json").read_bytes() == (tmp_path / "run" / "tokenizer" / "vocab.json").read_bytes()
    assert tok.vocab_size == PL.ensure_tokenizer(cfg, str(tmp_path / "run")).vocab_size
    cache = fileio.local_cache_dir("synthetic")
    (gen,) = os.listdir(cache)
    assert synthetic.read_stamp(os.path.join(cache, gen))["num_images"] == 6
    # a finished set at a URL is read from there; other generation options are refused
    upload_tree(tmp_path / "run" / "synthetic", fake_gcs, "gs://bkt/syn")
    src = sources.make_source("synthetic_seg:gs://bkt/syn", seed=0)
    assert src.paths == ["gs://bkt/syn"] and len(src) == 6
    assert sources.make_source("synthetic_vqa:gs://bkt/syn?n=6", seed=0).path == "gs://bkt/syn/vqa.jsonl"
    with pytest.raises(sources.SpecError, match="generated with"):
        sources.make_source("synthetic_seg:gs://bkt/syn?n=7", seed=0)


def test_pipeline_url_sources_and_tokenizer_with_worker_processes(data, fake_gcs, tmp_path):
    """make_train_iterator with gs:// sources (sgt_pairs tar shards, llava jsonl + image root), a
    gs:// tokenizer and a gs:// workdir, two Grain worker processes: the local run's batches."""
    upload_tree(data / "pairs", fake_gcs, "gs://bkt/pairs")
    upload_tree(data / "llava", fake_gcs, "gs://bkt/llava")
    tok = T.build_tiny_tokenizer(str(tmp_path / "tok"))
    upload_tree(tok, fake_gcs, "gs://bkt/model/tokenizer")

    def cfg_for(root, tok_path):
        cfg = C.tiny_data_config()
        cfg.sources.seg = f"sgt_pairs:{root}/pairs/tars/*.tar"
        cfg.sources.vqa = f"llava:{root}/llava/data.jsonl::{root}/llava/images"
        cfg.tokenizer_path = tok_path
        cfg.grain.num_workers = 2
        cfg.rows_per_batch = 2
        cfg.packer.max_consecutive_errors = 50
        return cfg

    def run(cfg, workdir, n=3):
        it = PL.make_train_iterator(cfg, workdir=workdir)
        out = [next(it) for _ in range(n)]
        it.close()
        return out

    want = run(cfg_for(str(data), tok), str(tmp_path / "run"))
    got = run(cfg_for("gs://bkt", "gs://bkt/model/tokenizer"), "gs://bkt/run")
    for (ba, sa), (bb, sb) in zip(want, got):
        for f in B.TOKEN_FIELDS + ("vit_patches", "vit_position_ids", "vae_images"):
            assert np.array_equal(getattr(ba, f), getattr(bb, f)), f
        assert sa == sb
    assert sa["total/skipped/missing_file"] > 0 and sa["total/skipped/bad_json"] > 0
    assert fileio.listdir("gs://bkt/run/index_cache")          # indexes of the remote shards
