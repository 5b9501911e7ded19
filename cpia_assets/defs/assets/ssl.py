"""ssl_checkpoint (one pre-training per Table II cell, method x data) and downstream_eval
(fine-tuning every checkpoint on the labelled tasks). Training runs as its own process through
Dagster Pipes; torch is imported only there and inside downstream_eval's body."""

import json
import warnings
from pathlib import Path

import dagster as dg

from cpia_assets.core.manifest.mosaic import preview_data_uri
from cpia_assets.core.training.ssl.config import (
    JOB_FILE,
    LOSS_CURVE_FILE,
    METHODS,
    SUMMARY_FILE,
    FinetuneSettings,
    PretrainJob,
    PretrainSettings,
    launch_command,
    prepare_run_dir,
    training_source,
)
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
TRAINING_CHILD = "cpia_assets.defs.ssl_child"
"""The training process this asset starts: the core's training, reporting through Pipes."""


def build_ssl_assets() -> list[dg.AssetsDefinition]:
    @dg.asset(
        partitions_def=SSL_PARTITIONS,
        deps=[dg.AssetDep(SHARDS_ASSET, partition_mapping=_data_dimension_mapping())],
        pool=GPU_POOL,
        group_name="ssl",
        code_version="1",
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
        source, folders = training_source(layout, data)
        settings = settings_from(config, PretrainSettings)
        out = layout.ssl_checkpoint_dir(method, data, settings.init_label)
        job = PretrainJob(method, data, str(source), folders, str(out), settings)
        start = prepare_run_dir(job)
        context.log.info(
            f"[{context.partition_key}] {start} run on {source} ({', '.join(folders)})"
        )
        pipes_subprocess_client.run(
            context=context,
            command=launch_command(out / JOB_FILE, settings, module=TRAINING_CHILD),
        ).get_results()
        summary = json.loads((out / SUMMARY_FILE).read_text())
        curve = preview_data_uri(out / LOSS_CURVE_FILE)
        return dg.MaterializeResult(
            metadata={
                "loss_curve": dg.MetadataValue.md(f"![loss curve]({curve})"),
                "final_loss": summary["final_loss"],
                "first_loss": summary["first_loss"],
                "steps": summary["steps"],
                "images_per_s": summary["images_per_s"],
                "device": summary["device"],
                "precision": summary["precision"],
                "training_data": dg.MetadataValue.path(str(source)),
                "encoder": dg.MetadataValue.path(summary["encoder"]),
                "config": dg.MetadataValue.path(str(out / JOB_FILE)),
            },
            data_version=files_data_version([Path(summary["encoder"])], settings),
        )

    @dg.asset(
        deps=[dg.AssetDep(ssl_checkpoint, partition_mapping=dg.AllPartitionMapping())],
        pool=GPU_POOL,
        group_name="ssl",
        code_version="1",
        kinds={"pytorch"},
        description=(
            "Fine-tunes every pre-trained encoder (plus random-init and optional ImageNet rows) on "
            "the configured labelled ImageFolder tasks; best epoch on validation, test accuracy, "
            "macro F1 and confusion matrix; Table II beside the paper's numbers."
        ),
    )
    def downstream_eval(
        context: dg.AssetExecutionContext, config: FinetuneConfig, store: CpiaStore
    ) -> dg.MaterializeResult:
        from cpia_assets.core.training.ssl.evaluate import (
            confusion_markdown,
            evaluate_all,
            table_ii_markdown,
        )

        settings = settings_from(config, FinetuneSettings)
        if not settings.tasks:
            raise dg.Failure("no downstream tasks configured: set tasks: {name: /path/to/folder}")
        evaluation = evaluate_all(store.layout, settings, progress=context.log.info)
        rows, failures = evaluation.rows, evaluation.failures
        if not rows:
            raise dg.Failure(
                "no task could be evaluated",
                metadata={"failures": dg.MetadataValue.md(failures_markdown(failures))},
            )
        return dg.MaterializeResult(
            metadata={
                "table_ii": dg.MetadataValue.md(table_ii_markdown(rows)),
                "confusion_matrices": dg.MetadataValue.md(confusion_markdown(rows)),
                "evaluated": len(rows) - evaluation.reused,
                "reused_from_earlier_runs": evaluation.reused,
                "failures": dg.MetadataValue.md(failures_markdown(failures)),
            },
            data_version=content_data_version({"results": rows, "settings": settings}),
        )

    return [ssl_checkpoint, downstream_eval]


def _data_dimension_mapping() -> dg.PartitionMapping:
    """Partition `<data>|<method>` reads the shards of partition `<data>` (a beta API in Dagster
    1.13: its warning is silenced here so that loading the definitions stays quiet)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="data")
