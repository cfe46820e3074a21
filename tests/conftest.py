"""Test setup: CPU, 8 fake devices for sharding tests, fp32 matmuls at full precision."""
import os
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# local copies / indexes of remote test data: a fresh dir per session, never ~/.cache
os.environ.setdefault("SGT_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="sgt_jax_test_cache_"))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# XLA:CPU runs every device's program on ONE Eigen pool of max(NPROC or cores, devices) threads,
# and its thunk executor hands a device's independent ready thunks to further pool threads. With
# 8 fake devices and 8 threads, 7 devices blocked in a top-level all-gather and the 8th in an
# all-reduce inside a while loop (FSDP gathers in the scanned layers) leave no thread for the
# 8th device's own all-gather: a deadlock (gdb, session 3; "Termination timeout" SIGABRT after
# 40 s). XLA reads NPROC for the pool size; 32 threads leave room for every blocked collective.
os.environ.setdefault("NPROC", "32")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same programs (the tiny train step under several tests, subprocess
# workers): a persistent compilation cache shared by the test session and its subprocesses
# saves most of CI's time. Keyed by the HLO, so a code change never hits a stale entry.
CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                              os.path.join(os.environ.get("TMPDIR", "/tmp"), "sgt_jax_test_xla_cache"))
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The BAGEL golden fixtures ship with the tests, so the parity tests always run (tests/golden.py).
from golden import GOLDEN  # noqa: E402


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "meta.json").exists():
        pytest.fail(f"golden fixtures not found at {GOLDEN} (SGT_GOLDEN_DIR)")
    return GOLDEN


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs:// (and gcs://) mapped onto tmp_path/gcs, here and in spawned worker processes, and
    $SGT_JAX_CACHE_DIR in tmp_path (tests/remote_fs.py)."""
    from remote_fs import use_fake_gcs

    return use_fake_gcs(tmp_path, monkeypatch)
