"""``python -m sgt_jax.data.index``: build a run config's data indexes once into WORKDIR/index_cache.

Offline (gs:// is the fake GCS of remote_fs.py). Evidence: on a config with gs:// tar shards
(sa1b glob + sgt_pairs folder of tars) and a gs:// LLaVA .jsonl, with a gs:// workdir, the command
writes one index per shard / jsonl to WORKDIR/index_cache; a fresh host (empty local cache) then
builds the sources without parsing a tar or streaming the jsonl (tarfile.open and
fileio.open_read raise) and gets the records of the local data; a second run reports everything
cached and reads nothing; an index only in the local cache is copied to the workdir; the CLI
prints the JSON summary.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from fake_data import REPO, same_outcomes
from remote_fs import upload_tree

from sgt_jax import fileio
from sgt_jax.data import config as C
from sgt_jax.data import index, sources
from sgt_jax.data import pipeline as PL

SEG = "sa1b:{r}/sa1b/shards/*.tar; sgt_pairs:{r}/pairs/tars"
VQA = "llava:{r}/llava/data.jsonl::{r}/llava/images"


def cfg_for(root):
    cfg = C.tiny_data_config()
    cfg.sources.seg = SEG.format(r=root)
    cfg.sources.vqa = VQA.format(r=root)
    return cfg


@pytest.fixture
def remote(data, fake_gcs):  # noqa: F811
    upload_tree(data / "sa1b", fake_gcs, "gs://bkt/sa1b")
    upload_tree(data / "pairs", fake_gcs, "gs://bkt/pairs")
    upload_tree(data / "llava", fake_gcs, "gs://bkt/llava")
    return fake_gcs


@pytest.fixture
def no_index_reads(monkeypatch):
    """Parsing a tar or streaming a file (jsonl indexing) raises."""
    def refuse(*a, **k):
        raise AssertionError(f"an index was built: {a}")
    return lambda: (monkeypatch.setattr(tarfile, "open", refuse),
                    monkeypatch.setattr(fileio, "open_read", refuse))


def test_index_command_fills_the_workdir_cache_and_the_trainer_uses_it(data, remote,  # noqa: F811
                                                                        no_index_reads):
    cfg, work = cfg_for("gs://bkt"), "gs://bkt/run"
    assert [k for k, _ in index.targets(cfg, work)] == ["tar"] * 4 + ["jsonl"]
    s = index.run(cfg, workdir=work, workers=2, log=lambda _: None)
    members = sum(len(sources._tar_members(str(p), None)) for p in
                  sorted((data / "sa1b" / "shards").glob("*.tar")) + sorted((data / "pairs" / "tars").glob("*.tar")))
    lines = len(sources._jsonl_index(str(data / "llava" / "data.jsonl"), None)[0])
    assert (s["indexed"], s["already_cached"], s["failed"]) == (5, 0, {})
    assert (s["tar_shards"], s["jsonl_files"], s["members"]) == (4, 1, members + lines)
    assert s["bytes_read"] > 0 and s["reads"] > 0 and s["streamed"] == 4     # tiny: one GET each
    cached = sorted(fileio.listdir("gs://bkt/run/index_cache"))
    assert len(cached) == 5 and sum(c.startswith("jsonl_") for c in cached) == 1
    assert s["records"]["seg"] > 0 and s["records"]["vqa"] == lines

    # another host: empty local cache; no tar is parsed, no jsonl streamed; same records
    want = PL.make_sources(cfg_for(str(data)), None)
    shutil.rmtree(fileio.local_cache_dir("index_cache"))
    no_index_reads()
    got = PL.make_sources(cfg, work)
    for a, b in zip(list(want["seg"]) + [want["vqa"]], list(got["seg"]) + [got["vqa"]]):
        same_outcomes(a, b)
    assert sorted(os.listdir(fileio.local_cache_dir("index_cache"))) == cached     # refilled

    # idempotent: everything cached, nothing read
    s2 = index.run(cfg, workdir=work, workers=2, check=False, log=lambda _: None)
    assert (s2["indexed"], s2["already_cached"], s2["bytes_read"], s2["reads"]) == (0, 5, 0, 0)
    assert s2["members"] == s["members"] and "records" not in s2
    # an index only in the local cache is copied to the workdir's
    fileio.rmtree("gs://bkt/run/index_cache")
    s3 = index.run(cfg, workdir=work, workers=2, check=False, log=lambda _: None)
    assert (s3["indexed"], s3["already_cached"]) == (0, 5)
    assert sorted(fileio.listdir("gs://bkt/run/index_cache")) == cached


def test_index_command_reports_a_bad_shard_and_goes_on(remote):
    (remote / "bkt" / "bad").mkdir()
    (remote / "bkt" / "bad" / "x.tar").write_bytes(b"\x1f\x8b" + b"\0" * 2000)   # gzip
    cfg = cfg_for("gs://bkt")
    cfg.sources.seg = "sa1b:gs://bkt/bad/x.tar,gs://bkt/sa1b/shards/sa_000000.tar"
    s = index.run(cfg, workdir="gs://bkt/run", workers=2, log=lambda _: None)
    assert s["indexed"] == 2 and list(s["failed"]) == ["gs://bkt/bad/x.tar"]
    assert "compressed tar" in s["failed"]["gs://bkt/bad/x.tar"] and "records" not in s


def test_index_cli_prints_the_summary(remote, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    cmd = [sys.executable, "-m", "sgt_jax.data.index", "--config", str(REPO / "configs" / "tiny.py"),
           "--workdir", "gs://bkt/run", "--workers", "2",
           "--config.data.sources.seg=" + SEG.format(r="gs://bkt"),
           "--config.data.sources.vqa=" + VQA.format(r="gs://bkt")]
    out = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads(out.stdout)
    assert (s["indexed"], s["already_cached"], s["failed"]) == (5, 0, {}), s
    assert "[5/5] indexed 5, cached 0" in out.stderr
    out = subprocess.run(cmd + ["--check=false"], check=False, env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and json.loads(out.stdout)["already_cached"] == 5, out.stderr[-3000:]
