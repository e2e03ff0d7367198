import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OSSRT_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared facts and data (`../shared` beside the repository)."""
    if not (SHARED / "data" / "o200k_base.tiktoken").is_file():
        pytest.fail(f"shared data not found at {SHARED}; set OSSRT_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def o200k_path(shared_dir: Path) -> Path:
    return shared_dir / "data" / "o200k_base.tiktoken"
