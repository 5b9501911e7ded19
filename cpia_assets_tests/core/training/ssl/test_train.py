"""Pre-training on CPU with vit_tiny: each method learns, the encoder loads strictly in timm, an
interrupted run resumes to the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import torch

from cpia_assets.core.fsutil import OutputWriteError
from cpia_assets.core.training.ssl.common import create_encoder
from cpia_assets.core.training.ssl.config import (
    JOB_FILE,
    LAST_CHECKPOINT,
    SUMMARY_FILE,
    PretrainJob,
    launch_command,
    prepare_run_dir,
)
from cpia_assets.core.training.ssl.preflight import check_job
from cpia_assets.core.training.ssl.train import run_training
from cpia_assets_tests.support.small_disk import resize, tmpfs
from cpia_assets_tests.support.ssl_data import (
    Interrupt,
    InterruptAt,
    tiny_settings,
    write_folder_tree,
    write_shards,
)

torch.set_num_threads(1)  # the test machine's cores are shared


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "cpia-mini"
    write_folder_tree(root, per_scale=4)
    return root


def job(mini: Path, out: Path, method: str, **overrides: object) -> PretrainJob:
    return PretrainJob(method, "cpia-mini", str(mini), ("L", "M", "S"), str(out),
                       tiny_settings(**overrides))  # fmt: skip


DINO_FIXED_CENTRE = replace(tiny_settings().dino, center_momentum=1.0)


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("mae", {"steps": 16}),
        ("mocov3", {"steps": 16}),
        # DINO's centring makes the raw loss rise again once the centre has caught up with the
        # teacher (that is how it avoids collapse), so this test freezes the centre to see the
        # student learn its teacher's targets; whole-set batches keep the curve smooth.
        ("dino", {"steps": 12, "batch_size": 16, "dino": DINO_FIXED_CENTRE}),
    ],
)
def test_method_learns_and_exports_a_strict_timm_encoder(
    mini: Path, tmp_path: Path, method: str, overrides: dict
) -> None:
    initial = InitialEncoder()
    summary = run_training(job(mini, tmp_path, method, **overrides), callbacks=[initial],
                           log_every=100)  # fmt: skip
    assert summary is not None
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = overrides["steps"]
    assert [row["step"] for row in history] == list(range(1, steps + 1))
    losses = [row["loss"] for row in history]
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    assert summary["final_loss"] == losses[-1] and summary["steps"] == steps
    assert summary["images_per_s"] > 0 and summary["device"].startswith("cpu")
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    encoder = tmp_path / "encoder.pth"
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=64, checkpoint_path=str(encoder)
    )  # strict: a missing, extra (decoder, head, mask token) or renamed key fails
    exported = torch.load(encoder, weights_only=True)
    assert len(exported) == 150 and not any(k.startswith(("head", "decoder")) for k in exported)
    assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())
    assert not torch.equal(  # trained: moved from this run's own initial weights
        initial.state["blocks.0.attn.qkv.weight"], exported["blocks.0.attn.qkv.weight"]
    )


class InitialEncoder(pl.Callback):
    """The encoder a run exports, as it was when training started."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        encoder = pl_module.method.export_encoder()
        self.state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}


@pytest.fixture(scope="module")
def mini_shards(mini: Path) -> Path:
    shards = mini.parent / "shards" / "cpia-mini"
    write_shards(mini, shards, shard_size=4)
    return shards


@pytest.mark.parametrize(
    ("method", "layout", "workers"), [("mae", "folders", 0), ("dino", "folders", 0),
                                      ("mae", "shards", 2)]
)  # fmt: skip
def test_resumed_run_reaches_the_same_weights(
    mini: Path, mini_shards: Path, tmp_path: Path, method: str, layout: str, workers: int
) -> None:
    overrides = {"steps": 6, "checkpoint_every": 3, "keep_checkpoints": 1, "accumulation": 2,
                 "batch_size": 4, "workers": workers}  # fmt: skip
    straight = job(mini, tmp_path / "straight", method, **overrides)
    if layout == "shards":
        straight = replace(straight, source=str(mini_shards))
    run_training(straight, log_every=100)
    resumed = replace(straight, out_dir=str(tmp_path / "resumed"))
    with pytest.raises(Interrupt):
        run_training(resumed, callbacks=[InterruptAt(3)], log_every=100)
    assert not (tmp_path / "resumed" / "encoder.pth").exists()
    run_training(resumed, log_every=100)

    def final_state(out: Path) -> dict[str, torch.Tensor]:
        return torch.load(out / LAST_CHECKPOINT, weights_only=False)["state_dict"]

    ours, theirs = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert ours.keys() == theirs.keys()  # student, teacher, DINO centre, MAE decoder
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [
        k for k in ours if not torch.equal(ours[k], theirs[k])
    ]
    curve = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert [row["step"] for row in curve] == [1, 2, 3, 4, 5, 6]  # one curve across the interrupt
    kept = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert kept == ["last.ckpt", "step-0000006.ckpt"]  # step 3's, from before the interrupt, went
    rerun = run_training(resumed, log_every=100)  # finished: nothing left to train
    assert rerun is not None and rerun["steps"] == 6 and rerun["images_per_s"] > 0


def test_imagenet_style_init_is_loaded_and_resampled(tmp_path: Path) -> None:
    source = timm.create_model("vit_tiny_patch16_224", num_classes=1000)  # a 224 px classifier
    weights = tmp_path / "imagenet.pth"
    torch.save({"state_dict": source.state_dict()}, weights)
    encoder = create_encoder("vit_tiny_patch16_224", 64, weights=weights)
    assert torch.equal(
        encoder.state_dict()["blocks.3.mlp.fc1.weight"], source.blocks[3].mlp.fc1.weight
    )
    assert encoder.pos_embed.shape == (1, 17, 192)  # resampled from 197 tokens
    wrong = tmp_path / "small.pth"
    torch.save(timm.create_model("vit_small_patch16_224").state_dict(), wrong)
    with pytest.raises(
        ValueError,
        match=r"small\.pth: does not match the encoder: cls_token has shape \(1, 1, 384\)",
    ):
        create_encoder("vit_tiny_patch16_224", 64, weights=wrong)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth: cannot read the weights file"):
        create_encoder("vit_tiny_patch16_224", 64, weights=tmp_path / "garbage.pth")


def test_two_processes_under_torchrun_train_one_model(mini: Path, tmp_path: Path) -> None:
    """The DDP path the asset uses for several devices, on CPU (gloo): MoCo-v3 gathers the keys
    of both ranks, each rank reads its own half of every global batch."""
    ddp = job(mini, tmp_path, "mocov3", steps=3, devices=2, batch_size=4)
    prepare_run_dir(ddp)
    command = launch_command(tmp_path / JOB_FILE, ddp.settings)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["steps"] == 3
    timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64,
                      checkpoint_path=str(tmp_path / "encoder.pth"))  # fmt: skip
    assert (tmp_path / LAST_CHECKPOINT).is_file()


@pytest.mark.parametrize(
    ("method", "overrides", "error"),
    [
        ("mae", {"mae": replace(tiny_settings().mae, mask_ratio=0.01)},
         r"mask_ratio 0\.01 masks none of the 16 patches of a 64 px image"),
        ("dino", {"image_size": 72}, "image_size 72 is not a multiple of the patch size 16"),
        ("mocov3", {"batch_size": 1}, "BatchNorm needs batch_size >= 2"),
        ("mae", {"model": "vit_tiny_patch16_22"}, "unknown timm model 'vit_tiny_patch16_22'"),
    ],
)  # fmt: skip
def test_settings_that_cannot_train_fail_before_training(
    mini: Path, tmp_path: Path, method: str, overrides: dict, error: str
) -> None:
    bad = job(mini, tmp_path / "out", method, **overrides)
    with pytest.raises(ValueError, match=error):
        check_job(bad)
    with pytest.raises(ValueError, match=error):  # the training process checks again
        run_training(bad)
    assert not (tmp_path / "out").exists()


def test_a_loss_that_is_not_finite_stops_the_run_naming_the_step(
    mini: Path, tmp_path: Path
) -> None:
    exploding = job(mini, tmp_path, "mae", lr=1e30, warmup_steps=0, steps=6)
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 2\b"):
        run_training(exploding, log_every=100)
    published = {"encoder.pth", "summary.json", "metrics.jsonl", "loss_curve.png"}
    assert not published & {p.name for p in tmp_path.iterdir()}


def test_a_full_disk_leaves_no_broken_checkpoint_and_reruns_resume(
    mini: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run = job(mini, out, "mae", steps=4, checkpoint_every=2)  # checkpoints of 67 MB
    said: list[str] = []
    with tmpfs(out, "100m"):  # room for the step-2 checkpoint, not for last.ckpt beside it
        with pytest.raises(OutputWriteError, match=rf"disk full: cannot write {out}/checkpoints/"
                           r"last\.ckpt: No space left on device"):  # fmt: skip
            run_training(run, progress=said.append, log_every=100)
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002.ckpt"]
        resize(out, "300m")
        summary = run_training(run, progress=said.append, log_every=100)
        assert summary is not None and summary["steps"] == 4
        assert (
            f"{out / LAST_CHECKPOINT} is missing or unreadable: resuming from step-0000002.ckpt"
            in said
        )
        curve = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()]
        assert curve == [1, 2, 3, 4]

        last = out / LAST_CHECKPOINT  # cut short, as a crash mid-write used to leave it
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
        said.clear()
        summary = run_training(run, progress=said.append, log_every=100)
        assert summary is not None and summary["steps"] == 4
        assert said[0].startswith(f"cannot read checkpoint {last} (")
        assert said[1] == f"{last} is missing or unreadable: resuming from step-0000004.ckpt"
