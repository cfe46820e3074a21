"""Test setup: CPU, 8 fake devices for sharding tests, fp32 matmuls at full precision."""
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

GOLDEN = Path(os.environ.get("SGT_GOLDEN_DIR",
                             Path(__file__).resolve().parents[2] / "shared/fixtures/bagel_golden/tiny_v1"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "meta.json").exists():
        pytest.skip(f"golden fixtures not found at {GOLDEN} (set SGT_GOLDEN_DIR)")
    return GOLDEN
