"""ssl_checkpoint (one pre-training per Table II cell, method x data) and downstream_eval
(fine-tuning every checkpoint on the labelled tasks). Training runs as its own process through
Dagster Pipes; torch is imported only there and inside the asset bodies (ssl_checkpoint's checks
of the job, downstream_eval)."""

import json
import warnings
from pathlib import Path

import dagster as dg

from cpia_assets.core.locks import owner_token
from cpia_assets.core.manifest.mosaic import preview_data_uri
from cpia_assets.core.training.ssl.config import (
    JOB_FILE,
    LOSS_CURVE_FILE,
    METHODS,
    SUMMARY_FILE,
    FinetuneSettings,
    PretrainJob,
    PretrainSettings,
    export_identity,
    finish_run,
    launch_command,
    prepare_run_dir,
    training_source,
)
from cpia_assets.core.training.ssl.report import initial_share_warning
from cpia_assets.core.training.variants import DATA_VARIANTS
from cpia_assets.defs.instance import GPU_POOL
from cpia_assets.defs.records import config_class, failures_markdown, settings_from
from cpia_assets.defs.resources import CpiaStore
from cpia_assets.defs.versions import content_data_version, files_data_version

PretrainConfig = config_class(PretrainSettings, "PretrainConfig")
FinetuneConfig = config_class(FinetuneSettings, "FinetuneConfig")

SSL_PARTITIONS = dg.MultiPartitionsDefinition(
    {
        "method": dg.StaticPartitionsDefinition(list(METHODS)),
        "data": dg.StaticPartitionsDefinition(list(DATA_VARIANTS)),
    }
)
SHARDS_ASSET = "training_shards"
LEAK_CHECK = "leak_audit"
TRAINING_CHILD = "cpia_assets.defs.ssl_child"
"""The training process this asset starts: the core's training, reporting through Pipes."""


def build_ssl_assets() -> list[dg.AssetsDefinition]:
    @dg.asset(
        partitions_def=SSL_PARTITIONS,
        deps=[dg.AssetDep(SHARDS_ASSET, partition_mapping=_data_dimension_mapping())],
        pool=GPU_POOL,
        group_name="ssl",
        code_version="2",
        kinds={"pytorch"},
        description=(
            "Self-supervised pre-training of a timm ViT (MAE, MoCo-v3 or DINO) on one data variant "
            "as its own process (torchrun for several devices). Outputs under "
            "`ssl/checkpoints/<method>__<data>[__imagenet]/`: `encoder.pth` (timm state dict), "
            "Lightning checkpoints (a rerun resumes from the last), `config.json`, metrics."
        ),
    )
    def ssl_checkpoint(
        context: dg.AssetExecutionContext,
        config: PretrainConfig,
        store: CpiaStore,
        pipes_subprocess_client: dg.PipesSubprocessClient,
    ) -> dg.MaterializeResult:
        keys = context.partition_key.keys_by_dimension
        method, data = keys["method"], keys["data"]
        layout = store.layout
        try:
            source, folders = training_source(layout, data)
            fingerprint, held_out = export_identity(source)
        except (OSError, ValueError) as exc:
            raise dg.Failure(str(exc)) from exc
        if not held_out["applied"]:
            context.log.warning(f"{data}: exported without exclusions: its Table II rows say so")
        settings = settings_from(config, PretrainSettings)
        out = layout.ssl_checkpoint_dir(method, data, settings.init_label)
        job = PretrainJob(method, data, str(source), folders, str(out), settings, fingerprint,
                          held_out)  # fmt: skip
        from cpia_assets.core.training.ssl.monitor import (
            KNN_CURVE_FILE,
            monitor_tasks,
            save_monitor_tasks,
        )
        from cpia_assets.core.training.ssl.preflight import check_job  # imports torch
        from cpia_assets.core.training.ssl.runlock import OWNER_ENV, RunFolderBusy, run_lock

        try:
            check_job(job)  # before the run folder is touched: a typo never costs a finished run
            monitored, left_out = monitor_tasks(
                settings.monitor, catalog=store.catalog(), layout=layout, seed=settings.seed
            )  # resolved here: the training process has no catalog
        except ValueError as exc:
            raise dg.Failure(str(exc)) from exc
        for reason in left_out:
            context.log.warning(f"kNN monitor leaves out {reason}")
        try:
            with run_lock(out):
                start = prepare_run_dir(job)
                save_monitor_tasks(out, monitored)
                context.log.info(
                    f"[{context.partition_key}] {start} run on {source} ({', '.join(folders)})"
                )
                try:
                    pipes_subprocess_client.run(
                        context=context,
                        command=launch_command(out / JOB_FILE, settings, module=TRAINING_CHILD),
                        env={OWNER_ENV: owner_token()},  # the training dies with this process
                    ).get_results()
                except BaseException:
                    finish_run(out, succeeded=False)  # a finished run set aside comes back
                    raise
                finish_run(out, succeeded=True)
        except RunFolderBusy as exc:
            raise dg.Failure(str(exc)) from exc
        summary = json.loads((out / SUMMARY_FILE).read_text())
        if warning := initial_share_warning(summary):
            context.log.warning(f"[{context.partition_key}] {warning}")
        curve = preview_data_uri(out / LOSS_CURVE_FILE)
        knn = summary["knn_accuracy"]
        monitor = (
            {
                "knn_curve": dg.MetadataValue.md(
                    f"![kNN accuracy]({preview_data_uri(out / KNN_CURVE_FILE)})"
                ),
                "knn_accuracy": knn[-1]["knn_accuracy"],
            }
            if knn
            else {}
        )
        return dg.MaterializeResult(
            metadata={
                "loss_curve": dg.MetadataValue.md(f"![loss curve]({curve})"),
                **monitor,
                "final_loss": summary["final_loss"],
                "first_loss": summary["first_loss"],
                "exported_initial_share": summary["exported_initial_share"],
                "steps": summary["steps"],
                "images_per_s": summary["images_per_s"],
                "device": summary["device"],
                "precision": summary["precision"],
                "training_data": dg.MetadataValue.path(str(source)),
                "data_fingerprint": fingerprint,
                "held_out_for_evaluation": dg.MetadataValue.json(held_out),
                "encoder": dg.MetadataValue.path(summary["encoder"]),
                "config": dg.MetadataValue.path(str(out / JOB_FILE)),
            },
            data_version=files_data_version([Path(summary["encoder"])], settings),
        )

    @dg.asset(
        deps=[dg.AssetDep(ssl_checkpoint, partition_mapping=dg.AllPartitionMapping())],
        check_specs=[
            dg.AssetCheckSpec(
                LEAK_CHECK,
                asset="downstream_eval",
                description=(
                    "No evaluation image leaked into pre-training: every row's leak audit found "
                    "no val/test image with a near-duplicate in its encoder's pre-training data, "
                    "and that data held out the task's sources."
                ),
            )
        ],
        pool=GPU_POOL,
        group_name="ssl",
        code_version="2",
        kinds={"pytorch"},
        description=(
            "Fine-tunes every pre-trained encoder (plus random-init and optional ImageNet rows) on "
            "the configured labelled tasks (a catalog key: its records' split, the one Mini and "
            "the exports hold out; or an ImageFolder); best epoch on validation, test accuracy, "
            "macro F1 and confusion matrix, a leak audit per row; Table II beside the paper's "
            "numbers. `ssl/eval/<task>/splits.csv` lists the images of each split."
        ),
    )
    def downstream_eval(
        context: dg.AssetExecutionContext, config: FinetuneConfig, store: CpiaStore
    ) -> dg.MaterializeResult:
        from cpia_assets.core.perceptual import NEAR_DUPLICATE_BITS
        from cpia_assets.core.training.ssl.evaluate import evaluate_all
        from cpia_assets.core.training.ssl.table import confusion_markdown, table_ii_markdown

        try:
            settings = settings_from(config, FinetuneSettings)
        except ValueError as exc:  # e.g. a task name that is not a folder name
            raise dg.Failure(str(exc)) from exc
        if not settings.tasks:
            raise dg.Failure(
                "no downstream tasks configured: set tasks: {name: <catalog key or folder>}"
            )
        evaluation = evaluate_all(
            store.layout, store.catalog(), settings, progress=context.log.info
        )
        rows, failures = evaluation.rows, evaluation.failures
        if not rows:
            raise dg.Failure(
                "no task could be evaluated",
                metadata={"failures": dg.MetadataValue.md(failures_markdown(failures))},
            )
        leaked = [row for row in rows if _leaked(row)]
        leak_check = dg.AssetCheckResult(
            check_name=LEAK_CHECK,
            passed=not leaked,
            metadata={
                "rows": len(rows),
                "rows_failing": dg.MetadataValue.md(_leak_table(leaked)),
                "max_hamming_bits": NEAR_DUPLICATE_BITS,
            },
        )
        return dg.MaterializeResult(
            check_results=[leak_check],
            metadata={
                "table_ii": dg.MetadataValue.md(table_ii_markdown(rows, NEAR_DUPLICATE_BITS)),
                "confusion_matrices": dg.MetadataValue.md(confusion_markdown(rows)),
                "evaluated": len(rows) - evaluation.reused,
                "reused_from_earlier_runs": evaluation.reused,
                "failures": dg.MetadataValue.md(failures_markdown(failures)),
            },
            data_version=content_data_version({"results": rows, "settings": settings}),
        )

    return [ssl_checkpoint, downstream_eval]


def _leaked(row: dict) -> bool:
    """A row whose encoder may have seen its task's evaluation images."""
    pretrained = row["method"] != "none"
    unaudited = pretrained and row["leaks"] is None
    return (
        bool(row["leaks"])
        or unaudited
        or bool(row["sources_not_held_out"])
        or (pretrained and not row["exclusions_applied"])
    )


def _leak_table(rows: list[dict]) -> str:
    lines = ["| task | init / method / data | leaks | sources not held out | exclusions |",
             "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        applied = "applied" if row["exclusions_applied"] else "off"
        lines.append(
            f"| {row['task']} | {row['init']} / {row['method']} / {row['data']} | "
            f"{row['leaks']} | {', '.join(row['sources_not_held_out']) or '-'} | {applied} |"
        )
    return "\n".join(lines) if rows else "No leak found."


def _data_dimension_mapping() -> dg.PartitionMapping:
    """Partition `<data>|<method>` reads the shards of partition `<data>` (a beta API in Dagster
    1.13: its warning is silenced here so that loading the definitions stays quiet)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="data")
