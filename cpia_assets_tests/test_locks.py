"""Waiting on the DuckDB file lock and on Dagster pools says who holds them; a file that is not
a DuckDB database fails at once; slots of runs whose process is gone are freed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from cpia_assets.core.layout import DataLayout
from cpia_assets.core.manifest import ManifestError, ManifestUnavailableError, open_manifest

HOLD_THE_LOCK = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a database at all" * 100])
def test_a_file_that_is_not_a_duckdb_database_fails_at_once(tmp_path: Path, content: bytes):
    layout = DataLayout(tmp_path)
    layout.duckdb_path.write_bytes(content)
    notices: list[str] = []
    with pytest.raises(ManifestError, match="is not a DuckDB database file") as raised:
        open_manifest(layout, on_wait=notices.append)
    assert not isinstance(raised.value, ManifestUnavailableError)
    assert str(layout.duckdb_path) in str(raised.value)
    assert notices == []  # no waiting for a lock nobody holds


def test_waiting_for_the_file_lock_names_the_process_that_holds_it(tmp_path: Path):
    layout = DataLayout(tmp_path)
    duckdb.connect(str(layout.duckdb_path)).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(layout.duckdb_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        notices: list[str] = []
        with pytest.raises(ManifestUnavailableError, match=f"process {holder.pid} "):
            open_manifest(layout, wait_s=0.5, on_wait=notices.append)
        assert len(notices) == 1
        assert f"process {holder.pid} (" in notices[0] and "waiting up to" in notices[0]
    finally:
        holder.communicate("")
    open_manifest(layout).close()  # free again once the holder is gone
