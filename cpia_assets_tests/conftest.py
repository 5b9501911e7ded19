from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TESTDATA = SHARED / "testdata"
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def testdata() -> Path:
    assert TESTDATA.is_dir(), f"the shared test slides are expected at {TESTDATA}"
    return TESTDATA
