"""The platform's dagster.yaml on a real PostgreSQL server (`support/postgres.py`): storage taken
from DAGSTER_PG_* variables, pool limits and slot claims in Postgres, SQLite without them."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from cpia_assets.defs.instance import POOL_LIMITS, prepare_instance, storage_yaml
from cpia_assets_tests.support.postgres import use_postgres


@pytest.fixture
def pg_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return use_postgres(monkeypatch)


def test_instance_on_postgres_from_the_environment(pg_env: dict[str, str], tmp_path: Path) -> None:
    config = prepare_instance(tmp_path / "home")
    storage = yaml.safe_load(config.read_text())["storage"]["postgres"]["postgres_db"]
    assert storage["password"] == {"env": "DAGSTER_PG_PASSWORD"}  # no secret in the file
    assert pg_env["DAGSTER_PG_PASSWORD"] not in config.read_text()
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        names = {
            type(store).__name__ for store in (instance.run_storage, instance.event_log_storage)
        }
        assert names == {"PostgresRunStorage", "PostgresEventLogStorage"}
        storage = instance.event_log_storage
        for pool, limit in POOL_LIMITS.items():
            assert storage.get_concurrency_info(pool).slot_count == limit
        # The duckdb pool's one slot goes to one step; a second claim waits.
        first = storage.claim_concurrency_slot("duckdb", "run-1", "tile_manifest")
        second = storage.claim_concurrency_slot("duckdb", "run-2", "tile_manifest")
        assert first.is_claimed and not second.is_claimed
    # A second process sees the same runs and slots: the database, not DAGSTER_HOME, holds them.
    with dg.DagsterInstance.from_config(str(prepare_instance(tmp_path / "other").parent)) as other:
        assert other.event_log_storage.get_concurrency_info("duckdb").claimed_slots


def test_without_pg_variables_the_instance_stays_on_sqlite(tmp_path: Path) -> None:
    config = prepare_instance(tmp_path / "home", env={})
    assert "storage" not in yaml.safe_load(config.read_text())
    assert storage_yaml({"DAGSTER_PG_DB": "x"}) == ""
    with pytest.raises(dg.DagsterInvariantViolationError, match="DAGSTER_PG_PASSWORD"):
        storage_yaml({"DAGSTER_PG_HOST": "db", "DAGSTER_PG_USER": "cpia"})
    defaults = yaml.safe_load(
        storage_yaml({"DAGSTER_PG_HOST": "db", "DAGSTER_PG_USER": "u", "DAGSTER_PG_PASSWORD": "p"})
    )["storage"]["postgres"]["postgres_db"]
    assert (defaults["port"], defaults["db_name"]) == (5432, "dagster")
