"""The web UI's GraphQL API on a real `dagster dev` (webserver + daemon) on 127.0.0.1: the asset
graph and partitions, a partition run launched through it, its materialization metadata."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cpia_assets.definitions import PARTITIONED_ASSETS
from cpia_assets.defs.automation import SENSOR_NAME
from cpia_assets_tests.defs.test_orchestration import (
    KEYS,
    MODULE,
    _dagster,
    platform_env,
)
from cpia_assets_tests.support.processes import stop_process_group

__all__ = ["platform_env"]  # the fixture, shared with test_orchestration

GRAPH = "{ assetNodes { assetKey { path } dependencyKeys { path } partitionKeys } }"
WORKSPACE = "{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { ... on RepositoryLocation { repositories { name } } } } } } }"  # noqa: E501
LAUNCH = """mutation ($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
STATUS = "query ($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
MATERIALIZATION = """query ($key: AssetKeyInput!, $partition: String!) {
  assetOrError(assetKey: $key) { ... on Asset {
    assetMaterializations(partitions: [$partition], limit: 1) { runId partition
      metadataEntries { label ... on IntMetadataEntry { intValue } } } } } }"""


class GraphQL:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/graphql"

    def __call__(self, query: str, **variables: Any) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert "errors" not in answer, answer["errors"]
        return answer["data"]

    def wait_ready(self, server: subprocess.Popen, log: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                entries = self(WORKSPACE)["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["locationOrLoadError"]:
                    return
            except (urllib.error.URLError, ConnectionError, AssertionError):
                pass
            time.sleep(1)
        raise AssertionError(f"webserver not ready after {timeout} s: {log.read_text()[-3000:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def graphql(platform_env: dict[str, str], tmp_path: Path) -> Iterator[GraphQL]:
    """`dagster dev` (webserver and daemon) in its own process group, always stopped."""
    _dagster(platform_env, "sensor", "stop", SENSOR_NAME, *MODULE)
    port, log_path = _free_port(), tmp_path / "dev.log"
    log = log_path.open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(port), *MODULE],
        env=platform_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        client = GraphQL(port)
        client.wait_ready(server, log_path, timeout=300)
        yield client
    finally:
        stop_process_group(server)
        log.close()


def test_graphql_shows_the_graph_launches_a_partition_and_reads_its_metadata(
    graphql: GraphQL,
) -> None:
    nodes = {tuple(n["assetKey"]["path"]): n for n in graphql(GRAPH)["assetNodes"]}
    assert nodes[("cpia_mini",)]["partitionKeys"] == list(KEYS)
    assert {"path": ["scale_tiles"]} in nodes[("cpia_mini",)]["dependencyKeys"]
    assert {"path": ["source_files"]} in nodes[("raw_download",)]["dependencyKeys"]
    assert nodes[("tile_manifest",)]["partitionKeys"] == []

    entry = graphql(WORKSPACE)["workspaceOrError"]["locationEntries"][0]
    params = {
        "selector": {
            "repositoryLocationName": entry["name"],
            "repositoryName": entry["locationOrLoadError"]["repositories"][0]["name"],
            "jobName": "build_subdatasets",
        },
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": KEYS[1]}]},
        "runConfigData": {},
    }
    launched = graphql(LAUNCH, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline, status = time.monotonic() + 300, None
    while time.monotonic() < deadline and status not in ("SUCCESS", "FAILURE", "CANCELED"):
        time.sleep(2)
        status = graphql(STATUS, id=run_id)["runOrError"]["status"]
    assert status == "SUCCESS"
    for name in PARTITIONED_ASSETS:
        asset = graphql(MATERIALIZATION, key={"path": [name]}, partition=KEYS[1])["assetOrError"]
        [materialization] = asset["assetMaterializations"]
        assert materialization["runId"] == run_id
    entries = {e["label"]: e.get("intValue") for e in materialization["metadataEntries"]}
    assert entries["images"] == entries["images_S"] == 2
