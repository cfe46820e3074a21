"""Remote paths (gs://bucket/path and other fsspec URLs) in the converter: sgt_jax/fileio.

No network: fsspec's in-memory filesystem (``memory://``) and a fake ``gs://`` protocol mapped
onto a temp dir stand in for GCS. Evidence: an import from a remote BAGEL dir (sharded
safetensors + index, configs, ae, tokenizer) and an export to a remote destination are
byte-identical to the local ones, remote reads are ranged reads of bounded size, every refusal
(truncation measured with the remote size, pickle files never read, missing keys) says what
the local one says, and a gs:// path without gcsfs fails with "install gcsfs".
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from safetensors.numpy import load_file, save_file

from sgt_jax import fileio
from sgt_jax.convert import ConversionError, bagel_io, export_bagel, import_bagel
from sgt_jax.convert import __main__ as cli
from sgt_jax.convert import model_dir as md
from sgt_jax.convert import safetensors_io as sio
from sgt_jax.train import export as train_export

FSSPEC_REGISTRY = importlib.import_module("fsspec.registry")     # (fsspec.registry is the mapping)

GOLDEN_OPTS = dict(preset="tiny", max_latent_size=8, vit_max_patches_per_side=8)
TOKENIZER = {
    "tokenizer_config.json": json.dumps({"added_tokens_decoder": {
        "150": {"content": "<|im_start|>"}, "151": {"content": "<|im_end|>"},
        "152": {"content": "<|vision_start|>"}, "153": {"content": "<|vision_end|>"}}}),
    "vocab.json": json.dumps({"a": 0, "b": 1}),
    "merges.txt": "#version: 0.2\na b\n",
}


def quiet(*a, **k):
    pass


def files_of(d) -> dict[str, bytes]:
    """{name: bytes} of the files directly in a local dir or under a URL."""
    return {n: fileio.read_bytes(fileio.join(d, n)) for n in fileio.listdir(d) if fileio.isfile(fileio.join(d, n))}


def export_and_read(model_dir, out: Path) -> bytes:
    export_bagel(str(model_dir), str(out), progress=False, log=quiet)
    return (out / "ema.safetensors").read_bytes()


def upload(local: Path, url: str):
    for p in sorted(local.iterdir()):
        fileio.copy(str(p), fileio.join(url, p.name))


@pytest.fixture
def mem():
    """A fresh memory:// root, removed afterwards."""
    root = f"memory://sgt-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def no_gcsfs(monkeypatch):
    """gs:// as it is without gcsfs installed, whether or not it is installed here."""
    monkeypatch.delitem(FSSPEC_REGISTRY._registry, "gs", raising=False)
    monkeypatch.delitem(FSSPEC_REGISTRY._registry, "gcs", raising=False)
    for name in ("gs", "gcs"):
        monkeypatch.setitem(FSSPEC_REGISTRY.known_implementations, name, {
            "class": "sgt_no_such_module_gcsfs.GCSFileSystem",
            "err": "Please install gcsfs to access Google Storage"})


@pytest.fixture
def ranged_reads(monkeypatch):
    """Record the (path, bytes) of every ranged read of a memory:// file; small chunks."""
    seen = []
    orig = MemoryFileSystem.cat_file

    def cat_file(self, path, start=None, end=None, **kw):
        data = orig(self, path, start=start, end=end, **kw)
        seen.append((path, start, len(data)))
        return data
    monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)
    monkeypatch.setattr(fileio, "REMOTE_CHUNK", 64 * 1024)
    return seen


@pytest.fixture(scope="module")
def local_src(tmp_path_factory, golden_dir) -> Path:
    """The golden checkpoint as a sharded BAGEL dir: shards + index, configs, ae, tokenizer."""
    d = tmp_path_factory.mktemp("remote_src") / "src"
    d.mkdir()
    for f in ("ae.safetensors", "llm_config.json", "vit_config.json"):
        shutil.copy(golden_dir / f, d / f)
    sio.write_tensors(str(d), "ema", load_file(str(golden_dir / "model.safetensors")), max_shard_bytes=300_000)
    for name, text in TOKENIZER.items():
        (d / name).write_text(text)
    assert (d / "ema.safetensors.index.json").exists() and len(list(d.glob("ema-0000*"))) > 2
    return d


@pytest.fixture(scope="module")
def local_md(local_src, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("remote_md") / "md"
    import_bagel(str(local_src), str(d), progress=False, log=quiet, **GOLDEN_OPTS)
    return d


# ----------------------------------------------------------------------------------------------


def test_fileio_primitives_local_and_remote(tmp_path, mem, ranged_reads):
    blob = bytes(range(256)) * 1000                                   # 256000 bytes: 4 chunks
    for base in (str(tmp_path / "loc"), mem + "/dir"):
        fileio.makedirs(base)
        p = fileio.join(base, "a.bin")
        with fileio.open_write(p) as f:
            f.write(blob[:100_000])
            f.write(np.frombuffer(blob[100_000:], np.uint8))
        assert fileio.exists(p) and fileio.isfile(p) and fileio.isdir(base) and not fileio.isfile(base)
        assert fileio.getsize(p) == len(blob) and fileio.listdir(base) == ["a.bin"]
        buf = np.zeros(200_000, np.uint8)
        assert fileio.read_into(p, 50_000, buf) == 200_000 and buf.tobytes() == blob[50_000:250_000]
        assert fileio.read_into(p, 250_000, buf) == 6000                  # short at the end of the file
        assert fileio.read_bytes(p, 3, 5) == blob[3:8] and fileio.read_bytes(p) == blob
        fileio.makedirs(fileio.join(base, "sub"))
        fileio.write_json(fileio.join(base, "sub", "x.json"), {"k": 1})
        assert fileio.read_json(fileio.join(base, "sub", "x.json")) == {"k": 1}
        assert sorted(fileio.listdir(base)) == ["a.bin", "sub"] and fileio.isdir(fileio.join(base, "sub"))
        assert fileio.basename(p) == "a.bin" and fileio.dirname(p) == fileio.abspath(base)
    assert fileio.is_remote(mem) and fileio.is_remote("gs://b/x") and not fileio.is_remote(str(tmp_path))
    assert fileio.join("gs://b/x/", "y", "z") == "gs://b/x/y/z" and fileio.dirname("gs://b/x/y") == "gs://b/x"
    assert fileio.listdir(mem + "/absent") == [] and not fileio.exists(mem + "/absent")
    # every remote read was a ranged read of at most REMOTE_CHUNK bytes
    assert ranged_reads and max(n for p, s, n in ranged_reads if s is not None) <= fileio.REMOTE_CHUNK
    # copies across local <-> remote, streamed in chunks
    fileio.copy(str(tmp_path / "loc" / "a.bin"), mem + "/c/a.bin")
    fileio.copy(mem + "/c/a.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == blob
    fileio.rmtree(mem + "/c")
    assert not fileio.exists(mem + "/c/a.bin")


def test_safetensors_writer_to_a_url_is_byte_identical(tmp_path, mem):
    """Shards (one holding only an empty tensor) + index, written locally and to a URL."""
    t = {"small": np.ones((2, 2), np.float16), "big": np.arange(50, dtype=np.float32),
         "empty": np.zeros((0, 3), np.float32)}              # greedy split: [small] [big] [empty]
    for d in (str(tmp_path), mem + "/st"):
        sio.write_tensors(d, "model", t, max_shard_bytes=100)
        sio.write_tensors(d, "one", t)
    got = files_of(mem + "/st")
    assert got == files_of(tmp_path) and len([n for n in got if n.startswith("model-")]) == 3
    src = sio.SafetensorsSource(mem + "/st/model.safetensors.index.json")
    assert {k: src.read(k).tobytes() for k in t} == {k: v.tobytes() for k, v in t.items()}
    assert load_file(str(tmp_path / "one.safetensors"))["small"].tobytes() == t["small"].tobytes()


def test_import_from_remote_source_is_bit_exact(local_src, local_md, mem, ranged_reads, tmp_path):
    src = mem + "/bagel"
    upload(local_src, src)
    notes = []
    stats = import_bagel(src, str(tmp_path / "md"), progress=False, log=notes.append, **GOLDEN_OPTS)
    assert stats["params_dtype"] == "float32"
    # the same model dir as from the local copy: config, tokenizer, BAGEL configs, info, arrays
    for f in (md.CONFIG_FILE, f"{md.TOKENIZER_DIR}/tokenizer_config.json", f"{md.TOKENIZER_DIR}/vocab.json",
              f"{md.TOKENIZER_DIR}/merges.txt", f"{md.BAGEL_CONFIGS_DIR}/llm_config.json",
              f"{md.BAGEL_CONFIGS_DIR}/vit_config.json"):
        assert (tmp_path / "md" / f).read_bytes() == (local_md / f).read_bytes(), f
    info = md.read_info(tmp_path / "md")
    assert info["provenance"]["source"] == src and info["tokenizer_files"] == md.read_info(local_md)["tokenizer_files"]
    a, b = md.ModelDirReader(local_md), md.ModelDirReader(tmp_path / "md")
    assert a.stored == b.stored
    for name in a.stored:
        assert a.read(name).tobytes() == b.read(name).tobytes(), name
    # tensor data came in bounded ranged reads, from the shards only
    data = [(p, n) for p, s, n in ranged_reads if s is not None and p.endswith(".safetensors")]
    assert {os.path.basename(p) for p, _ in data} >= {f.name for f in local_src.glob("ema-0000*")} | {"ae.safetensors"}
    assert max(n for _, n in data) <= fileio.REMOTE_CHUNK
    assert sum(n for _, n in data) >= sum(f.stat().st_size for f in local_src.glob("*.safetensors")) - 100_000


def test_export_to_remote_destination_is_bit_exact(local_md, mem, tmp_path):
    export_bagel(str(local_md), str(tmp_path / "out"), shard_size="300KB", progress=False, log=quiet)
    dst = mem + "/out"
    stats = export_bagel(str(local_md), dst, shard_size="300KB", progress=False, log=quiet)
    want = files_of(tmp_path / "out")
    assert "model.safetensors.index.json" in want and "tokenizer_config.json" in want and "ae.safetensors" in want
    assert files_of(dst) == want and sorted(stats["files"]) == sorted(n for n in want if n.endswith(".safetensors"))
    # the destination rules are the local ones
    with pytest.raises(ConversionError, match="exists and is not empty"):
        export_bagel(str(local_md), dst, progress=False, log=quiet)
    export_bagel(str(local_md), dst, overwrite=True, progress=False, log=quiet)       # one file now
    assert "model.safetensors.index.json" not in fileio.listdir(dst)
    assert files_of(dst)["ema.safetensors"] == export_and_read(local_md, tmp_path / "one")


def test_gs_urls_through_the_cli(local_src, local_md, fake_gcs, tmp_path, capsys):
    """gs://bucket/... strings end to end (a fake gs protocol on a temp dir stands in for gcsfs)."""
    upload(local_src, "gs://bucket/bagel")
    assert (fake_gcs / "bucket" / "bagel" / "ema.safetensors.index.json").exists()
    rc = cli.main(["import", "--from", "gs://bucket/bagel", "--to", str(tmp_path / "md"), "--preset", "tiny",
                   "--max-latent-size", "8", "--vit-max-patches-per-side", "8", "--no-progress",
                   "--stats", "gs://bucket/stats/import.json"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((fake_gcs / "bucket" / "stats" / "import.json").read_text())["src"] == "gs://bucket/bagel"
    rc = cli.main(["export", "--from", str(tmp_path / "md"), "--to", "gs://bucket/out", "--shard-size", "300KB",
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    export_bagel(str(local_md), str(tmp_path / "ref"), shard_size="300KB", progress=False, log=quiet)
    assert files_of(fake_gcs / "bucket" / "out") == files_of(tmp_path / "ref")
    # a weights file given by URL: configs from its "directory"
    path, cfg_dir, _ = bagel_io.find_weights("gs://bucket/bagel/ema.safetensors.index.json")
    assert (path, cfg_dir) == ("gs://bucket/bagel/ema.safetensors.index.json", "gs://bucket/bagel")


def test_missing_backend_says_install_gcsfs(local_md, no_gcsfs, tmp_path, capsys):
    rc = cli.main(["import", "--from", "gs://bucket/bagel", "--to", str(tmp_path / "md"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "install gcsfs to use gs:// paths" in err, err
    assert not (tmp_path / "md").exists()
    with pytest.raises(fileio.BackendMissingError, match="install gcsfs to use gs:// paths"):
        export_bagel(str(local_md), "gs://bucket/out", progress=False, log=quiet)
    with pytest.raises(fileio.BackendMissingError, match="install gcsfs"):
        md.read_info("gs://bucket/model_dir")


# ----------------------------------------------------------------------------------------------
# refusals read the same from a remote source


def _remote_import_error(local: Path, url: str, **kw) -> str:
    upload(local, url)
    with pytest.raises(ConversionError) as e:
        import_bagel(url, str(local.parent / "md_refused"), progress=False, log=quiet, **{**GOLDEN_OPTS, **kw})
    assert not (local.parent / "md_refused").exists()
    return str(e.value)


def _src(golden_dir, d: Path) -> Path:
    d.mkdir(parents=True)
    for f in ("model.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json"):
        shutil.copy(golden_dir / f, d / f)
    return d


def test_remote_truncated_files_are_refused_with_the_remote_size(golden_dir, mem, tmp_path):
    d = _src(golden_dir, tmp_path / "trunc")
    p = d / "model.safetensors"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 1000)
    msg = _remote_import_error(d, mem + "/t1")
    last = max(sio.read_header(str(golden_dir / "model.safetensors"))[0].items(), key=lambda kv: kv[1].start)[0]
    assert "truncated" in msg and f"{mem}/t1/model.safetensors" in msg and last in msg
    with open(p, "r+b") as f:
        f.truncate(100)
    assert "truncated: the header declares" in _remote_import_error(d, mem + "/t2")
    with open(p, "r+b") as f:
        f.truncate(3)
    assert "shorter than the 8-byte" in _remote_import_error(d, mem + "/t3")


def test_remote_pickle_files_are_refused_unread(golden_dir, mem, ranged_reads, tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    for f in ("llm_config.json", "vit_config.json"):
        shutil.copy(golden_dir / f, d / f)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    msg = _remote_import_error(d, mem + "/pt")
    assert "pytorch_model.bin" in msg and "arbitrary code" in msg
    with pytest.raises(ConversionError, match="weights_only=True"):
        import_bagel(mem + "/pt/pytorch_model.bin", str(tmp_path / "md"), progress=False, log=quiet, **GOLDEN_OPTS)
    assert not [p for p, _, _ in ranged_reads if p.endswith(".bin")]


def test_remote_missing_keys_and_shards_are_refused(golden_dir, mem, tmp_path):
    d = _src(golden_dir, tmp_path / "keys")
    t = load_file(str(d / "model.safetensors"))
    k = "language_model.model.layers.1.self_attn.q_proj_moe_gen.weight"
    del t[k]
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert "1 missing keys: " + k in _remote_import_error(d, mem + "/keys")
    # an index naming a shard that is not there
    d2 = _src(golden_dir, tmp_path / "shards")
    os.remove(d2 / "model.safetensors")
    sio.write_tensors(str(d2), "model", load_file(str(golden_dir / "model.safetensors")), max_shard_bytes=300_000)
    gone = sorted(d2.glob("model-0000*.safetensors"))[1]
    gone.unlink()
    msg = _remote_import_error(d2, mem + "/shards")
    assert "shard files listed in the index are missing" in msg and gone.name in msg


# ----------------------------------------------------------------------------------------------
# model dir and training-run files behind a URL


def test_model_dir_json_and_run_layout_through_urls(local_md, mem):
    url = mem + "/md"
    for rel in (md.INFO_FILE, md.CONFIG_FILE, f"{md.TOKENIZER_DIR}/vocab.json"):
        fileio.copy(str(local_md / rel), fileio.join(url, rel))
    assert md.read_info(url) == md.read_info(local_md)
    assert md.read_config(url).to_json() == md.read_config(local_md).to_json()
    fileio.copy(str(local_md / md.CONFIG_FILE), mem + "/half/" + md.CONFIG_FILE)
    with pytest.raises(md.ModelDirError, match="the write was interrupted"):
        md.read_info(mem + "/half")
    fileio.write_json(mem + "/rel/llm_config.json", {})
    with pytest.raises(md.ModelDirError, match="looks like a BAGEL release dir"):
        md.read_info(mem + "/rel")
    # a training run: RUN/checkpoints/<step>/state, latest step wins
    for step in (5, 12):
        fileio.write_text(f"{mem}/run/checkpoints/{step}/state/x", "")
    assert train_export.find_checkpoint(mem + "/run") == (mem + "/run/checkpoints", 12)
    assert train_export.find_checkpoint(mem + "/run/checkpoints/5") == (mem + "/run/checkpoints", 5)
    assert not train_export.is_training_checkpoint(mem + "/md")
