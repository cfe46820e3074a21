"""Where the shipped BAGEL golden fixtures are (real BAGEL PyTorch outputs; see their README.md).
A plain module, not conftest: tests/data/ has a conftest of its own, and ``import conftest``
would find whichever was loaded first. SGT_GOLDEN_DIR points the tiny_v1 tests at another copy."""
import os
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bagel_golden"
GOLDEN = Path(os.environ.get("SGT_GOLDEN_DIR", FIXTURES / "tiny_v1"))
