"""`make demo`: materialize the whole asset graph for every demo partition with the Dagster CLI.

Runs go into a persistent DAGSTER_HOME under the data folder, so `make ui` shows their history.
The catalog entries and source listings are observed first (`source_files`); then only what the
instance sees as missing or stale (Dagster's data and code versions) is launched, so a second
`make demo` with nothing changed launches no run.
Progress lines (per partition, per slide) are echoed; each run's full log is kept under logs/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import polars as pl

from cpia_assets.core.catalog.fields import ALL_SCALES
from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.catalog.model import Catalog
from cpia_assets.core.layout import DataLayout, default_data_dir
from cpia_assets.core.manifest.database import open_manifest
from cpia_assets.core.manifest.queries import count_tiles, markdown_table, table_i
from cpia_assets.core.training.shards import MINI_VARIANT
from cpia_assets.definitions import (
    MANIFEST_ASSET,
    OBSERVE_JOB,
    PARTITIONED_ASSETS,
    build_definitions,
)
from cpia_assets.defs.instance import prepare_instance
from cpia_assets.defs.versions import partitions_to_rebuild

DEMO_PRETRAIN = {
    "model": "vit_tiny_patch16_224", "image_size": 64, "batch_size": 16, "steps": 20,
    "warmup_steps": 5, "lr": 0.016, "workers": 0, "checkpoint_every": 10,  # peak 1e-3 at 16
    "mae": {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 2},
    "monitor": {"every": 20},
}  # fmt: skip
DEMO_EVAL = {
    "epochs": 3, "batch_size": 8, "image_size": 64, "lr": 1e-3, "workers": 0,
    "baseline_model": "vit_tiny_patch16_224",
}  # fmt: skip
PARALLEL_BUILDS = 2
"""Partition builds at a time (`_build_partitions`)."""
UP_TO_DATE = "up to date (no input, setting or code changed), not launched"
SSL_PROGRESS = ("step ", "validation accuracy", "fine-tuning ")


def main() -> int:
    catalog = load_catalog(os.environ.setdefault("CPIA_CATALOG", "demo"))
    layout = DataLayout(default_data_dir())
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(layout.root / "dagster_home")))
    prepare_instance(home)
    logs = layout.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"CPIA demo: {len(catalog.keys)} sub-datasets, data in {layout.root}", flush=True)
    started = time.monotonic()
    defs = build_definitions(catalog, layout.root)
    graph = defs.resolve_asset_graph()
    with dg.DagsterInstance.from_config(str(home)) as instance:

        def to_rebuild(assets: Sequence[str], partitions: Sequence[str] | None = None) -> list[str]:
            return partitions_to_rebuild(instance, graph, assets, partitions)

        defs.resolve_job_def(OBSERVE_JOB).execute_in_process(
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            instance=instance,
        )
        stale = to_rebuild(PARTITIONED_ASSETS, catalog.keys)
        for index, key in enumerate(catalog.keys, 1):
            step = f"[{index}/{len(catalog.keys)}] {key}: {', '.join(PARTITIONED_ASSETS)}"
            print(step if key in stale else f"{step}: {UP_TO_DATE}", flush=True)
        _build_partitions([key for key in catalog.keys if key in stale], logs)
        step = "tile_manifest: loading manifest.duckdb"
        manifest = _announce(step, bool(to_rebuild([MANIFEST_ASSET])))
        step = f"training_shards: {MINI_VARIANT} as WebDataset shards"
        shards = _announce(step, bool(to_rebuild(["training_shards"], [MINI_VARIANT])))
        if manifest or shards:  # one run: Dagster's start-up is paid once
            selection = [MANIFEST_ASSET] if manifest else []
            selection += ["training_shards"] if shards else []
            log = logs / "manifest_and_shards.log"
            _materialize(selection, log, MINI_VARIANT if shards else None)
        _print_summary(layout)
        _pretrain_and_evaluate(layout, logs, to_rebuild, _evaluation_task(catalog))
    print(f"Done in {time.monotonic() - started:.0f} s. Browse the runs: make ui", flush=True)
    return 0


def _build_partitions(keys: Sequence[str], logs: Path) -> None:
    """One `dagster asset materialize` per partition, `PARALLEL_BUILDS` at a time: each run
    spends seconds importing Dagster and loading the definitions on one core, which the other
    run's slides use meanwhile (partitions never share outputs)."""
    with ThreadPoolExecutor(max_workers=PARALLEL_BUILDS) as builds:
        running = [
            builds.submit(_materialize, PARTITIONED_ASSETS, logs / f"{key}.log", key)
            for key in keys
        ]
        for build in running:
            build.result()  # the first failure ends the demo, naming its log


def _announce(step: str, stale: bool) -> bool:
    """Print the step, saying when the instance sees it fresh (nothing to launch); `stale`."""
    print(step if stale else f"{step}: {UP_TO_DATE}", flush=True)
    return stale


def _materialize(
    selection: Sequence[str],
    log_path: Path,
    partition: str | None = None,
    config: Mapping[str, dict] | None = None,
) -> None:
    """One `dagster asset materialize` of the `selection` (one partition for its partitioned
    assets), `config` per asset, its progress echoed and its whole log kept at `log_path`."""
    command = [
        sys.executable, "-m", "dagster", "asset", "materialize",
        "-m", "cpia_assets.definitions", "--select", ",".join(selection),
    ]  # fmt: skip
    if partition:
        command += ["--partition", partition]
    if config:
        ops = {asset: {"config": values} for asset, values in config.items()}
        command += ["--config-json", json.dumps({"ops": ops})]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if partition and f"[{partition}]" in line:  # kept: two builds print at once
                print("    " + line[line.index(f"[{partition}]") :].rstrip(), flush=True)
            elif any(marker in line for marker in SSL_PROGRESS):
                print("    " + line.split(" - ")[-1].rstrip(), flush=True)
            elif "ASSET_CHECK_EVALUATION - " in line:
                print("    " + line.split("ASSET_CHECK_EVALUATION - ", 1)[1].rstrip(), flush=True)
            elif "STEP_FAILURE" in line or "Error" in line.split(" - ")[-1][:40]:
                print("    " + line.rstrip(), flush=True)
        if process.wait() != 0:
            raise SystemExit(f"materializing {', '.join(selection)} failed; full log: {log_path}")


def _evaluation_task(catalog: Catalog) -> str | None:
    """The first labelled ROI set with a split rule (the demo's blood cells), evaluated through
    its records' split, the one Mini and the shards hold out; None when the catalog has none."""
    for entry in catalog.subdatasets:
        if entry.kind == "roi" and entry.labelled and entry.splits is not None:
            return entry.key
    return None


def _pretrain_and_evaluate(
    layout: DataLayout, logs: Path, to_rebuild: Callable[..., list[str]], task: str | None
) -> None:
    """One small MAE checkpoint (vit_tiny, CPU) pre-trained on the CPIA-Mini shards, and its
    fine-tuning on the labelled demo cells."""
    partition = f"{MINI_VARIANT}|mae"
    step = f"ssl_checkpoint {partition}: MAE pre-training, vit_tiny on CPU"
    pretrain = _announce(step, bool(to_rebuild(["ssl_checkpoint"], [partition])))
    config = {"ssl_checkpoint": DEMO_PRETRAIN} if pretrain else {}
    if task is None:
        print("downstream_eval: skipped, the catalog has no labelled ROI set with split folders")
        if config:
            _materialize(list(config), logs / "ssl.log", partition, config)
        return
    step = "downstream_eval: fine-tuning on the labelled demo cells"
    if _announce(step, pretrain or bool(to_rebuild(["downstream_eval"]))):  # a new encoder, too
        config["downstream_eval"] = DEMO_EVAL | {"tasks": {task: task}}
        # with the pre-training in one run: Dagster and torch start once
        _materialize(list(config), logs / "ssl.log", partition if pretrain else None, config)
    print(f"\n{task}: test split, best epoch on validation; leaks = val/test images with a "
          "near-duplicate in the encoder's pre-training data")  # fmt: skip
    print("accuracy % (macro F1 %): fine-tuned, then kNN and linear probe of the frozen encoder")
    print(f"{'encoder':<26}{'fine-tuned':>15}{'kNN':>15}{'linear':>15}{'n test':>8}{'leaks':>6}")
    for result in sorted((layout.ssl_eval_dir / task).glob("*.json")):
        row = json.loads(result.read_text())
        name = f"{row['init']} / {row['method']} / {row['data']}"
        leaks = "n/a" if row["leaks"] is None else row["leaks"]
        scores = [row, row["knn"], row["linear_probe"]]
        cells = "".join(f"{100 * s['accuracy']:>8.2f} ({100 * s['macro_f1']:5.2f})" for s in scores)
        print(f"{name:<26}{cells}{row['images']['test']:>8}{leaks:>6}")


def _print_summary(layout: DataLayout) -> None:
    with open_manifest(layout) as con:
        counts = count_tiles(con, by=("subdataset", "scale"))
        organs = table_i(con).filter(pl.col("sub-datasets") > 0)  # the demo covers few organs
        table = markdown_table(organs)
        mini = markdown_table(table_i(con, mini_only=True).filter(pl.col("total") > 0))
    per_scale = counts.pivot(on="scale", index="subdataset", values="images").fill_null(0)
    columns = [scale for scale in ALL_SCALES if scale in per_scale.columns]
    print(f"\n{'sub-dataset':<20}" + "".join(f"{scale:>7}" for scale in columns))
    for row in per_scale.sort("subdataset").iter_rows(named=True):
        print(f"{row['subdataset']:<20}" + "".join(f"{row[scale]:>7}" for scale in columns))
    print(f"\nTable I (organ x scale):\n{table}")
    print(f"\nCPIA-Mini (384 px):\n{mini}")
    print(f"\nImages:   {layout.cpia_dir}/{{L,M,S}}/<sub-dataset>/")
    print(f"Mini:     {layout.mini_dir}/{{L,M,S}}/<sub-dataset>/")
    print(f"Shards:   {layout.shards_dir(MINI_VARIANT)}/ (index.json)")
    print(f"Manifest: {layout.duckdb_path} (query it: .venv/bin/cpia table1 / tiles / lineage)")


if __name__ == "__main__":
    raise SystemExit(main())
