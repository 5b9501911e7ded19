"""A real PostgreSQL server for tests: Debian's `postgresql` package, started by the test run.

`PostgresServer.start()` runs `initdb` into a new temporary folder and `pg_ctl start` with the
server listening on 127.0.0.1 at a free port (trust authentication, so any password works).
initdb refuses to run as root: as root, the server runs as the `postgres` user the Debian
package creates. `make test` installs the package where it is missing (Makefile, `pg-server`).
`database()` creates an empty database per test; `env()` gives the DAGSTER_PG_* variables that
make `prepare_instance` write a Postgres-backed dagster.yaml (cpia_assets/defs/instance.py).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

PG_USER = "cpia"
PG_PASSWORD = "cpia-test"  # trust authentication: checked by nobody, passed like a real one
REQUIRE_ENV = "CPIA_REQUIRE_POSTGRES"  # set by .ci/run: a missing server fails, not skips


def find_bin_dir() -> Path | None:
    """The folder holding `initdb` and `pg_ctl`: PG_BIN_DIR, then Debian's newest, then PATH."""
    if os.environ.get("PG_BIN_DIR"):
        return Path(os.environ["PG_BIN_DIR"])
    debian = Path("/usr/lib/postgresql").glob("*/bin/initdb")
    newest = max(debian, key=lambda path: int(path.parts[-3]), default=None)
    if newest is not None:
        return newest.parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int
    as_user: str | None  # run the server programs as this user (we are root)

    @classmethod
    def start(cls, bin_dir: Path) -> PostgresServer:
        as_user = "postgres" if os.geteuid() == 0 else None
        root = Path(tempfile.mkdtemp(prefix="cpia-pg-"))
        if as_user:
            entry = pwd.getpwnam(as_user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        server = cls(bin_dir, root, _free_port(), as_user)
        try:
            server._run("initdb", "-D", str(root / "data"), "-U", PG_USER, "--auth=trust",
                        "--encoding=UTF8", "--locale=C", "--no-sync")  # fmt: skip
            for attempt in range(3):  # another process may take the free port first
                options = (
                    f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root} "
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                    "-c max_connections=200"
                )
                try:
                    server._run("pg_ctl", "start", "-D", str(root / "data"), "-w", "-t", "60",
                                "-l", str(root / "server.log"), "-o", options)  # fmt: skip
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
                    server.port = _free_port()
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return server

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin_dir / program), *args]
        if self.as_user:
            command = ["runuser", "-u", self.as_user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/")
        if done.returncode:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} failed:\n{done.stdout}{done.stderr}{tail}")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "stop", "-D", str(self.root / "data"), "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def connect(self, db_name: str = "postgres"):
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1", port=self.port, user=PG_USER, password=PG_PASSWORD, dbname=db_name
        )

    def database(self) -> str:
        """A new empty database; its name."""
        name = f"dagster_{uuid.uuid4().hex[:12]}"
        connection = self.connect()
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return name

    def env(self, db_name: str) -> dict[str, str]:
        """The variables that point the platform's dagster.yaml at `db_name` on this server."""
        return {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USER": PG_USER,
            "DAGSTER_PG_PASSWORD": PG_PASSWORD,
            "DAGSTER_PG_DB": db_name,
        }


_SERVER: list[PostgresServer] = []


def shared_server() -> PostgresServer:
    """This test process's server (one per pytest-xdist worker), started on first use and stopped
    when the process exits. Without the server programs or psycopg2 the test is skipped, or fails
    where CPIA_REQUIRE_POSTGRES is set (`make test`, CI)."""
    import pytest

    if _SERVER:
        return _SERVER[0]
    bin_dir = find_bin_dir()
    missing = None
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        missing = "PostgreSQL's initdb/pg_ctl (Debian package postgresql; `make test` installs it)"
    elif importlib.util.find_spec("dagster_postgres") is None:
        missing = 'dagster-postgres (`pip install -e ".[postgres]"`; `make test` installs it)'
    if missing:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{missing} is missing and {REQUIRE_ENV} is set")
        pytest.skip(f"{missing} is missing")
    server = PostgresServer.start(bin_dir)
    atexit.register(server.stop)
    _SERVER.append(server)
    return server


def use_postgres(monkeypatch) -> dict[str, str]:
    """Point this test's Dagster instances at a new database on `shared_server()`: sets the
    DAGSTER_PG_* variables (with `monkeypatch`, so `prepare_instance` writes Postgres storage and
    child processes inherit them) and returns them."""
    server = shared_server()
    env = server.env(server.database())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env
