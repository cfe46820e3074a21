"""Offline stand-ins for GCS that also work in spawned worker processes (Grain workers).

``FakeGCS`` maps ``gs://bucket/key`` (and ``gcs://``) onto ``$SGT_FAKE_GCS_ROOT/bucket/key`` on
the local disk. It is registered by class path through ``$SGT_FSSPEC_IMPLEMENTATIONS`` (read by
``sgt_jax.fileio`` at first use in every process): a spawned worker inherits the environment and
sys.path (this directory, from pytest), imports this module and maps gs:// to the same directory
-- no fixture runs there, and gcsfs (installed or not) is never asked.

    def test_x(fake_gcs):        # the fixture (tests/conftest.py) calls use_fake_gcs
        fileio.write_text("gs://bucket/a.txt", "hi")     # -> fake_gcs / "bucket" / "a.txt"

``$SGT_JAX_CACHE_DIR`` points at a temp dir as well, so local copies / indexes of remote data do
not land in ~/.cache.
"""
from __future__ import annotations

import os
import shutil

from fsspec.implementations.local import LocalFileSystem

ROOT_ENV = "SGT_FAKE_GCS_ROOT"
IMPLS = "gs=remote_fs.FakeGCS,gcs=remote_fs.FakeGCS"


class FakeGCS(LocalFileSystem):
    """gs://bucket/key -> $SGT_FAKE_GCS_ROOT/bucket/key (what gcsfs would do, offline)."""

    protocol = ("gs", "gcs")

    def __init__(self, *args, **kwargs):
        super().__init__(auto_mkdir=True)

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for p in ("gs://", "gcs://"):
            if path.startswith(p):
                path = os.path.join(os.environ[ROOT_ENV], path[len(p):])
        return super()._strip_protocol(path)


def use_fake_gcs(tmp_path, monkeypatch):
    """Map gs:// to tmp_path/gcs in this process and in every child it spawns (the ``fake_gcs``
    fixture of conftest.py); returns that directory."""
    root = tmp_path / "gcs"
    root.mkdir()
    monkeypatch.setenv(ROOT_ENV, str(root))
    monkeypatch.setenv("SGT_FSSPEC_IMPLEMENTATIONS", IMPLS)
    monkeypatch.setenv("SGT_JAX_CACHE_DIR", str(tmp_path / "sgt_cache"))
    return root


def upload_tree(local, root, url: str) -> str:
    """Copy a local file or directory tree to ``gs://...`` under the fake root; returns url."""
    assert url.startswith("gs://")
    dst = os.path.join(str(root), url[len("gs://"):])
    if os.path.isdir(local):
        shutil.copytree(local, dst, dirs_exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(local, dst)
    return url
