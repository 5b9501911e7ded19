"""The SSL assets in real Dagster runs: a small MAE pre-training through Pipes, its evaluation and
leak audit, the training source per data variant, resume bookkeeping (settings and data), launch
commands, asset selection."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import dagster as dg
import pytest
import timm
import torch

from cpia_assets.cli import main as cli
from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.locks import start_time
from cpia_assets.core.training.ssl.config import (
    ENCODER_JOB_FILE,
    JOB_FILE,
    PREVIOUS_RUN,
    RUN_OUTPUTS,
    PretrainJob,
    PretrainSettings,
    finish_run,
    launch_command,
    prepare_run_dir,
    training_source,
)
from cpia_assets.definitions import build_definitions
from cpia_assets.defs.instance import GPU_POOL, POOL_LIMITS
from cpia_assets_tests.support.processes import stop_process_group
from cpia_assets_tests.support.ssl_data import (
    labelled_task,
    tiny_settings,
    write_folder_tree,
    write_shards,
)

MAE_MINI = dg.MultiPartitionKey({"method": "mae", "data": "cpia-mini"})


@pytest.fixture
def defs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dg.Definitions:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training child: the cores are shared
    layout = DataLayout(tmp_path)
    write_folder_tree(layout.mini_dir, per_scale=4)
    write_shards(layout.mini_dir, layout.shards_dir("cpia-mini"), shard_size=4)
    return build_definitions(load_catalog("demo"), tmp_path)


def materialize(
    defs: dg.Definitions, asset: str, config: dict, partition_key: str | None = None
) -> dg.ExecuteInProcessResult:
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        asset_selection=[dg.AssetKey(asset)],
        partition_key=partition_key,
        run_config={"ops": {asset: {"config": config}}},
    )


def test_checkpoint_and_evaluation_materialize(
    defs: dg.Definitions, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = DataLayout(tmp_path)
    pretrain = asdict(tiny_settings(steps=4, checkpoint_every=2))
    result = materialize(defs, "ssl_checkpoint", pretrain, partition_key=MAE_MINI)
    assert result.success
    metadata = result.asset_materializations_for_node("ssl_checkpoint")[0].metadata
    out = layout.ssl_checkpoint_dir("mae", "cpia-mini")
    assert metadata["steps"].value == 4
    assert metadata["final_loss"].value > 0
    assert metadata["exported_initial_share"].value == 0.0  # MAE exports what it trains
    assert metadata["encoder"].value == str(out / "encoder.pth")
    assert "data:image/jpeg;base64," in metadata["loss_curve"].value
    job = PretrainJob.load(out / JOB_FILE)  # the resolved config beside the outputs
    index = json.loads((layout.shards_dir("cpia-mini") / "index.json").read_text())
    assert (job.source, job.settings.steps) == (str(layout.shards_dir("cpia-mini")), 4)
    assert (job.data_fingerprint, job.held_out) == (index["fingerprint"], index["held_out"])
    assert PretrainJob.load(out / ENCODER_JOB_FILE) == job  # the encoder's own label
    shared = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True, num_classes=0)
    encoder = torch.load(out / "encoder.pth", weights_only=True)
    assert all(torch.equal(encoder[k], v) for k, v in shared.state_dict().items())
    assert (out / "checkpoints" / "last.ckpt").is_file()

    cells = labelled_task(tmp_path / "cells", {"train": 4, "val": 1, "test": 2})
    tasks = {"cells": str(cells), "missing": str(tmp_path / "missing")}
    finetune = {"tasks": tasks, "epochs": 1, "batch_size": 4, "image_size": 32, "workers": 0,
                "baseline_model": "vit_tiny_patch16_224"}  # fmt: skip
    evaluation = materialize(defs, "downstream_eval", finetune)
    metadata = evaluation.asset_materializations_for_node("downstream_eval")[0].metadata
    table = metadata["table_ii"].value
    assert "| ours | random | MAE | CPIA-Mini |" in table
    assert "| ours | random | none | none |" in table
    assert "| paper | ImageNet | MAE | CPIA-S |" in table
    assert metadata["evaluated"].value == 2
    assert "missing is not a folder" in metadata["failures"].value  # the other task still ran
    assert "true \\ predicted | lymphocyte | neutrophil" in metadata["confusion_matrices"].value
    assert "Cells: test accuracy % (macro F1 %)" in table and "· n=4 · leaks 0 |" in table
    [check] = evaluation.get_asset_check_evaluations()
    assert (check.check_name, check.passed) == ("leak_audit", True)
    results = sorted(p.name for p in (layout.ssl_eval_dir / "cells").iterdir())
    assert results == ["random__MAE__CPIA-Mini.json", "random__none__none.json", "splits.csv"]
    with (layout.ssl_eval_dir / "cells" / "splits.csv").open() as handle:
        used = list(csv.DictReader(handle))
    assert {row["split"] for row in used} == {"train", "val", "test"}
    on_disk = {p.relative_to(tmp_path).as_posix() for p in cells.rglob("*") if p.is_file()}
    assert {row["image"] for row in used} == on_disk  # every image, inside the data folder

    card = (out / "timm" / "README.md").read_text()
    assert "- cells: test accuracy" in card and "leak audit 0" in card
    assert cli(["table2", "--data-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("Cells: test accuracy % (macro F1 %) of fine-tuning at the epoch")
    assert any(line.startswith("| ours | random | MAE | CPIA-Mini |") for line in printed)

    again = materialize(defs, "downstream_eval", finetune)
    metadata = again.asset_materializations_for_node("downstream_eval")[0].metadata
    assert (metadata["evaluated"].value, metadata["reused_from_earlier_runs"].value) == (0, 2)

    # A test image that is also a pre-training sample fails the leak audit.
    planted = next((cells / "test" / "neutrophil").iterdir())
    shutil.copyfile(next(layout.mini_dir.glob("M/*/*.jpg")), planted)
    leaked = materialize(defs, "downstream_eval", finetune)
    [check] = leaked.get_asset_check_evaluations()
    assert not check.passed
    assert "| cells | random / MAE / CPIA-Mini | 1 |" in check.metadata["rows_failing"].value


def test_a_dino_teacher_that_is_still_mostly_its_initialisation_is_flagged(
    defs: dg.Definitions, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two steps at momentum 0.9: the exported teacher keeps about 0.9 x 0.95 of its initial
    weights; the run says so in its metadata and logs a warning."""
    partition = dg.MultiPartitionKey({"method": "dino", "data": "cpia-mini"})
    result = materialize(defs, "ssl_checkpoint", asdict(tiny_settings(steps=2)), partition)
    assert result.success
    metadata = result.asset_materializations_for_node("ssl_checkpoint")[0].metadata
    assert metadata["exported_initial_share"].value == pytest.approx(0.9 * 0.95, abs=1e-3)
    assert "encoder is still 86% its initial weights after 2 steps" in capsys.readouterr().err


def test_checkpoint_fails_clearly_without_training_data(tmp_path: Path) -> None:
    defs = build_definitions(load_catalog("demo"), tmp_path)
    partition = dg.MultiPartitionKey({"method": "dino", "data": "cpia-s"})
    with pytest.raises(dg.Failure, match=r"index.json is missing: materialize training_shards"):
        materialize(defs, "ssl_checkpoint", asdict(tiny_settings(steps=1)), partition_key=partition)


def test_training_reads_only_exports_which_hold_out_evaluation_data(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    write_folder_tree(layout.cpia_dir, per_scale=1)  # images alone are not trained on
    with pytest.raises(FileNotFoundError, match="materialize training_shards for cpia-m first"):
        training_source(layout, "cpia-m")
    write_shards(layout.cpia_dir, layout.shards_dir("cpia-m"), shard_size=2)
    assert training_source(layout, "cpia-m") == (layout.shards_dir("cpia-m"), ("M",))
    with pytest.raises(ValueError, match="unknown data variant 'cpia-xl'"):
        training_source(layout, "cpia-xl")


def test_a_rerun_resumes_only_the_same_job(tmp_path: Path) -> None:
    job = PretrainJob(
        "mae", "cpia", str(tmp_path), ("L",), str(tmp_path / "out"), PretrainSettings()
    )
    assert prepare_run_dir(job) == "fresh"
    checkpoint = tmp_path / "out" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"ckpt")
    assert prepare_run_dir(job) == "resume"
    assert checkpoint.exists()
    changed = replace(job, settings=replace(job.settings, lr=1e-3))
    assert prepare_run_dir(changed) == "fresh"
    assert not checkpoint.exists()  # another training's state is never resumed
    assert PretrainJob.load(tmp_path / "out" / JOB_FILE) == changed


def test_changed_data_starts_afresh_and_replaces_every_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = PretrainJob("mae", "cpia", str(tmp_path), ("L",), str(out), PretrainSettings(),
                      "fingerprint-1", {"applied": True, "rules": [], "images": {}})  # fmt: skip
    prepare_run_dir(job)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    for name in RUN_OUTPUTS[:-1]:  # encoder.pth, encoder.json, summary.json, ...
        (out / name).write_bytes(b"of the earlier run")
    assert prepare_run_dir(job) == "resume"
    changed = replace(job, data_fingerprint="fingerprint-2")
    assert prepare_run_dir(changed) == "fresh"
    # No stale encoder is published; the finished run waits aside until the new one has finished.
    assert sorted(p.name for p in out.iterdir()) == [PREVIOUS_RUN, JOB_FILE]
    assert sorted(p.name for p in (out / PREVIOUS_RUN).iterdir()) == sorted(
        [*RUN_OUTPUTS, JOB_FILE]
    )
    finish_run(out, succeeded=False)  # the new run failed: the finished one is back
    assert PretrainJob.load(out / JOB_FILE) == job and (out / "encoder.pth").is_file()
    assert prepare_run_dir(changed) == "fresh"  # set aside again, and this time it succeeds
    finish_run(out, succeeded=True)
    assert sorted(p.name for p in out.iterdir()) == [JOB_FILE]


def test_launch_commands(tmp_path: Path) -> None:
    job_file = tmp_path / JOB_FILE
    one = launch_command(job_file, PretrainSettings(), python="py")
    assert one == ["py", "-m", "cpia_assets.core.training.ssl.train", str(job_file)]
    ddp = launch_command(
        job_file, PretrainSettings(devices=4, nodes=2, rendezvous="n1:29400"), "py"
    )
    assert ddp[:4] == ["py", "-m", "torch.distributed.run", "--nproc-per-node=4"]
    assert "--nnodes=2" in ddp and "--rdzv-endpoint=n1:29400" in ddp
    assert ddp[-3:] == ["-m", "cpia_assets.core.training.ssl.train", str(job_file)]
    with pytest.raises(ValueError, match="rendezvous"):
        PretrainSettings(nodes=2)


def test_partitions_and_pool(tmp_path: Path) -> None:
    defs = build_definitions(load_catalog("demo"), tmp_path)
    checkpoint = defs.resolve_assets_def("ssl_checkpoint")
    keys = checkpoint.partitions_def.get_partition_keys()
    assert len(keys) == 15 and "cpia-mini|mae" in keys and "cpia-s|dino" in keys  # dims sorted
    assert checkpoint.op.pool == GPU_POOL and POOL_LIMITS[GPU_POOL] == 1
    assert defs.resolve_assets_def("downstream_eval").op.pool == GPU_POOL


def test_string_asset_selection_works_in_this_environment(tmp_path: Path) -> None:
    # lightly would pull hydra-core, whose antlr 4.9 pin breaks Dagster's selection parser.
    assert importlib.metadata.version("antlr4-python3-runtime").startswith("4.13")
    env = {**os.environ, "CPIA_CATALOG": "demo", "CPIA_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "dagster", "asset", "list", "-m", "cpia_assets.definitions",
               "--select", "ssl_checkpoint,downstream_eval"]  # fmt: skip
    listed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["downstream_eval", "ssl_checkpoint"]
    graph = build_definitions(load_catalog("demo"), tmp_path).resolve_asset_graph()
    selected = dg.AssetSelection.from_string("group:ssl and kind:pytorch").resolve(graph)
    assert {key.to_user_string() for key in selected} == {"ssl_checkpoint", "downstream_eval"}


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_run_takes_its_training_with_it_and_a_live_one_keeps_its_folder(
    defs: dg.Definitions, tmp_path: Path, kill: signal.Signals
) -> None:
    forever = tiny_settings(steps=100_000, checkpoint_every=10**9)  # no disk filled meanwhile
    endless = {
        "execution": {"config": {"in_process": {}}},
        "ops": {"ssl_checkpoint": {"config": asdict(forever)}},
    }
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m",
               "cpia_assets.definitions", "--select", "ssl_checkpoint", "--partition",
               "cpia-mini|mae", "--config-json", json.dumps(endless)]  # fmt: skip
    home = tmp_path / "dagster-home"  # else a killed CLI leaves its temporary home in the cwd
    home.mkdir()
    env = {**os.environ, "CPIA_CATALOG": "demo", "CPIA_DATA_DIR": str(tmp_path),
           "DAGSTER_HOME": str(home)}  # fmt: skip
    out = DataLayout(tmp_path).ssl_checkpoint_dir("mae", "cpia-mini")
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)  # fmt: skip
    training = None
    try:
        deadline = time.monotonic() + 300  # a loaded CI machine takes minutes to import torch
        while not (registered := list(out.glob(".lock.*[0-9]"))) and run.poll() is None:
            assert time.monotonic() < deadline, "the training never registered in its folder"
            time.sleep(0.1)  # the training process registers in its run folder
        assert registered, run.communicate(timeout=60)[0][-3000:]
        training = int(registered[0].name.rsplit(".", 1)[1])
        assert _parent(training) == run.pid  # the run's own process started it
        job_file = (out / JOB_FILE).read_text()
        with pytest.raises(dg.Failure, match=r"another training is running in this folder"):
            materialize(defs, "ssl_checkpoint", asdict(tiny_settings(steps=2)), MAE_MINI)
        assert (out / JOB_FILE).read_text() == job_file  # the refused run touched nothing

        os.kill(run.pid, kill)
        for _ in range(50):
            if start_time(training) is None:
                break
            time.sleep(0.1)
        assert start_time(training) is None, f"training pid {training} outlived its run"
    finally:
        if run.poll() is None or (training is not None and start_time(training) is not None):
            stop_process_group(run)
        run.communicate()
    again = materialize(defs, "ssl_checkpoint", asdict(tiny_settings(steps=2)), MAE_MINI)
    assert again.success  # the dead run's lock is taken over


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and PREVIOUS_RUN not in p.parts}  # fmt: skip


def test_a_failed_relaunch_keeps_the_finished_run(defs: dg.Definitions, tmp_path: Path) -> None:
    out = DataLayout(tmp_path).ssl_checkpoint_dir("mae", "cpia-mini")
    finished = asdict(tiny_settings(steps=2, checkpoint_every=2))
    assert materialize(defs, "ssl_checkpoint", finished, MAE_MINI).success
    before = _files(out)
    assert "encoder.pth" in before and "checkpoints/last.ckpt" in before
    typo = {**finished, "model": "vit_tiny_patch16_22"}
    with pytest.raises(dg.Failure, match="unknown timm model 'vit_tiny_patch16_22'"):
        materialize(defs, "ssl_checkpoint", typo, MAE_MINI)
    assert _files(out) == before and not (out / PREVIOUS_RUN).exists()  # untouched

    exploding = {**finished, "lr": 1e30, "warmup_steps": 0, "steps": 4}
    with pytest.raises(Exception, match="process failed"):  # its loss turns nan: training fails
        materialize(defs, "ssl_checkpoint", exploding, MAE_MINI)
    assert _files(out) == before  # the finished run is back in place, config.json included
    unfinished = PretrainJob.load(out / PREVIOUS_RUN / JOB_FILE)  # kept for its relaunch
    assert unfinished.settings.lr == 1e30
