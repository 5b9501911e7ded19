"""Each method's maths against hand-computed values, and its reference recipe (optimiser, frozen
parts, schedules) as a setting with the authors' default, exercised for a few CPU steps."""

from __future__ import annotations

import math
from dataclasses import astuple, replace
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from timm.layers import DropPath
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import nn

from cpia_assets.core.training.ssl.common import TrainingTime, momentum_update, resolve_recipe
from cpia_assets.core.training.ssl.config import PretrainJob, PretrainSettings
from cpia_assets.core.training.ssl.dino import (
    dino_loss,
    teacher_initial_share,
    teacher_temperature,
    update_center,
)
from cpia_assets.core.training.ssl.mae import reconstruction_loss
from cpia_assets.core.training.ssl.mocov3 import contrastive_loss
from cpia_assets.core.training.ssl.module import PretrainModule, build_method
from cpia_assets.core.training.ssl.report import initial_share_warning
from cpia_assets.core.training.ssl.train import run_training
from cpia_assets_tests.support.ssl_data import tiny_settings, write_folder_tree

torch.set_num_threads(1)  # the test machine's cores are shared


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "cpia-mini"
    write_folder_tree(root, per_scale=4)  # 16 images: 2 steps of 8 per epoch
    return root


def job(mini: Path, out: Path, method: str, **overrides: object) -> PretrainJob:
    return PretrainJob(method, "cpia-mini", str(mini), ("L", "M", "S"), str(out),
                       tiny_settings(**overrides))  # fmt: skip


# --- the maths, hand-computed ---------------------------------------------------------------


def test_mae_loss_averages_the_masked_patches_only() -> None:
    target = torch.tensor([[[1.0, 1.0], [3.0, 3.0]]])  # two patches of two values
    masked = torch.tensor([[1.0, 0.0]])  # only the first was masked
    loss = reconstruction_loss(torch.zeros(1, 2, 2), target, masked, norm_pix=False)
    assert loss.item() == pytest.approx(1.0)  # (1 + 1) / 2; over every patch it would be 5
    # normalised per patch: mean 1, unbiased variance 2 -> (-1, 1) / sqrt(2), squared mean 0.5
    norm = reconstruction_loss(torch.zeros(1, 1, 2), torch.tensor([[[0.0, 2.0]]]),
                               torch.ones(1, 1), norm_pix=True)  # fmt: skip
    assert norm.item() == pytest.approx(0.5, rel=1e-5)


def test_mocov3_loss_divides_by_the_temperature_and_scales_by_twice_it() -> None:
    identity = torch.eye(2)  # each query equals its own key, orthogonal to the other
    loss = contrastive_loss(identity * 3, identity, temperature=0.25)  # normalised first
    # logits [[4, 0], [0, 4]]: cross-entropy log(1 + e^-4), times 2 * 0.25
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-4)) * 0.5, rel=1e-5)


def test_dino_loss_sharpens_centres_and_pairs_different_views() -> None:
    ln3 = math.log(3)
    teacher = torch.tensor([[0.5 * ln3, 0.0], [0.0, 0.0]])  # global views 1 and 2, batch of 1
    students = [torch.tensor([[0.0, 0.0]]), torch.tensor([[0.1 * ln3, 0.0]])]
    loss = dino_loss(teacher, students, torch.zeros(1, 2), teacher_temp=0.5, student_temp=0.1)
    # teacher 1 -> softmax(ln3, 0) = (3/4, 1/4) against student 2's log-softmax(ln3, 0);
    # teacher 2 -> (1/2, 1/2) against student 1's (1/2, 1/2); same-view pairs are skipped
    first = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert loss.item() == pytest.approx((first + math.log(2)) / 2, rel=1e-5)
    centred = dino_loss(teacher, students, torch.tensor([[0.5 * ln3, 0.0]]), 0.5, 0.1)
    # the centre cancels teacher 1's preference: uniform targets against both students
    second = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert centred.item() == pytest.approx((second + math.log(2)) / 2, rel=1e-5)


def test_dino_centre_moves_towards_the_teacher_mean() -> None:
    center = torch.tensor([[1.0, 0.0]])
    update_center(center, torch.tensor([[3.0, 2.0], [5.0, 0.0]]), momentum=0.9)
    assert center[0].tolist() == pytest.approx([0.9 * 1 + 0.1 * 4, 0.1 * 1])


def test_momentum_update_moves_the_teacher_a_little_towards_the_student() -> None:
    student, teacher = nn.Linear(1, 1), nn.Linear(1, 1)
    nn.init.constant_(student.weight, 0.0)
    nn.init.constant_(teacher.weight, 1.0)
    momentum_update(student, teacher, 0.9)
    assert teacher.weight.item() == pytest.approx(0.9)  # reversed, it would be 0.1
    assert student.weight.item() == 0.0


def test_dino_exports_the_teacher_and_its_centre_moves_in_training(
    mini: Path, tmp_path: Path
) -> None:
    dino = build_method(job(mini, tmp_path, "dino"))
    with torch.no_grad():
        for parameter in dino.student.parameters():
            parameter.add_(1.0)
    exported = dino.export_encoder().state_dict()
    teacher, student = dino.teacher[0].state_dict(), dino.student[0].state_dict()
    assert all(torch.equal(exported[k], teacher[k]) for k in teacher)
    assert not torch.equal(
        exported["blocks.0.attn.qkv.weight"], student["blocks.0.attn.qkv.weight"]
    )
    views = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in (0, 1)]
    with torch.no_grad():
        teacher_mean = dino.teacher(torch.cat(views)).mean(0)
    dino.training_loss(views, torch.zeros(2), TrainingTime(progress=0.0, epoch=0.0))
    torch.testing.assert_close(dino.center[0], 0.1 * teacher_mean)  # from 0, momentum 0.9


def test_dino_reports_how_much_of_its_exported_teacher_is_still_the_initialisation(
    mini: Path, tmp_path: Path
) -> None:
    """The share is what the EMA leaves of the initial teacher: with the student held at zero,
    the teacher after `after_step` over the run is exactly that share of its initial weights."""
    dino = build_method(job(mini, tmp_path, "dino"))
    steps = 100
    initial = dino.teacher[0].blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        for parameter in dino.student.parameters():
            parameter.zero_()
    for step in range(steps):
        dino.after_step(TrainingTime(progress=step / steps, epoch=0.0))
    share = dino.exported_initial_share(steps)
    torch.testing.assert_close(dino.teacher[0].blocks[0].attn.qkv.weight, share * initial)
    reference = teacher_initial_share(0.996, steps)  # the reference momentum
    assert reference == pytest.approx(math.exp(-0.004 * steps / 2), abs=2e-3)  # about 0.82
    summary = {"method": "dino", "steps": steps, "exported_initial_share": reference}
    assert "82% its initial weights" in initial_share_warning(summary)
    assert initial_share_warning(summary | {"exported_initial_share": 0.05}) is None
    for other in ("mae", "mocov3"):  # they export the encoder the optimiser trains
        assert build_method(job(mini, tmp_path, other)).exported_initial_share(steps) == 0.0


# --- the recipes ----------------------------------------------------------------------------


def test_each_method_resolves_its_reference_recipe_scaled_by_the_total_batch() -> None:
    settings = PretrainSettings(accumulation=2, devices=2, nodes=2, rendezvous="h:1")  # 512 images
    mae, moco, dino = (resolve_recipe(settings, m) for m in ("mae", "mocov3", "dino"))
    # (peak lr, weight decay, its end, beta1, beta2, gradient clip)
    assert astuple(mae) == pytest.approx((3e-4, 0.05, 0.05, 0.9, 0.95, 0.0))
    assert astuple(moco) == pytest.approx((3e-4, 0.1, 0.1, 0.9, 0.999, 0.0))
    assert astuple(dino) == pytest.approx((1e-3, 0.04, 0.4, 0.9, 0.999, 3.0))
    ours = replace(settings, lr=1e-4, weight_decay=0.2, gradient_clip=1.0)
    assert resolve_recipe(ours, "mae").base_lr == pytest.approx(2e-4)
    assert resolve_recipe(replace(ours, scale_lr=False), "mae").base_lr == 1e-4
    dino_ours = resolve_recipe(ours, "dino")
    assert (dino_ours.weight_decay, dino_ours.weight_decay_end, dino_ours.gradient_clip) == (
        0.2, 0.4, 1.0)  # fmt: skip
    assert resolve_recipe(ours, "mae").weight_decay_end == 0.2


def test_no_weight_decay_on_biases_norms_position_embeddings_and_tokens(
    mini: Path, tmp_path: Path
) -> None:
    learned = replace(tiny_settings().mae, sincos_pos_embed=False)  # trainable embeddings
    module = PretrainModule(job(mini, tmp_path, "mae", mae=learned), total_steps=4)
    optimizer = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in module.method.named_parameters()}
    plain = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0
             for p in g["params"]}  # fmt: skip
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0
               for p in g["params"]}  # fmt: skip
    assert {"encoder.pos_embed", "encoder.cls_token", "mask_token", "decoder_pos_embed",
            "encoder.norm.weight", "decoder_norm.bias", "decoder_pred.bias"} <= plain  # fmt: skip
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert {"decoder_embed.weight", "encoder.blocks.0.attn.qkv.weight"} <= decayed
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert optimizer.defaults["lr"] == pytest.approx(1e-3)  # 0.032 per 256 at a batch of 8


def test_mae_fixes_sincos_position_embeddings_and_xavier_initialises_the_decoder(
    mini: Path, tmp_path: Path
) -> None:
    mae = build_method(job(mini, tmp_path, "mae"))
    for pos_embed in (mae.encoder.pos_embed, mae.decoder_pos_embed):
        expected = build_sincos2d_pos_embed([4, 4], pos_embed.shape[-1])
        assert torch.equal(pos_embed[0, 1:], expected) and not pos_embed[0, 0].any()
        assert not pos_embed.requires_grad
    for linear in (mae.decoder_embed, mae.decoder_pred, mae.decoder_blocks[0].mlp.fc1):
        bound = math.sqrt(6 / (linear.in_features + linear.out_features))
        assert not linear.bias.any() and linear.weight.abs().max() <= bound
        assert linear.weight.abs().max() > 0.9 * bound  # uniform up to the Xavier bound


def test_mocov3_vit_tricks_and_predictor_bn(mini: Path, tmp_path: Path) -> None:
    moco = build_method(job(mini, tmp_path, "mocov3"))
    last = moco.predictor[-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine
    encoder = moco.base[0]
    assert not any(p.requires_grad for p in encoder.patch_embed.proj.parameters())
    assert torch.equal(encoder.pos_embed[0, 1:], build_sincos2d_pos_embed([4, 4], 192))
    assert not encoder.pos_embed.requires_grad


def test_dino_student_drops_paths_and_its_head_starts_truncated_normal(
    mini: Path, tmp_path: Path
) -> None:
    dino = build_method(job(mini, tmp_path, "dino"))
    student, teacher = dino.student[0].blocks[-1], dino.teacher[0].blocks[-1]
    assert isinstance(
        student.drop_path1, DropPath
    ) and student.drop_path1.drop_prob == pytest.approx(0.1)
    assert not isinstance(teacher.drop_path1, DropPath)
    first = dino.student[1].mlp[0]
    assert not first.bias.any() and first.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert [teacher_temperature(dino.settings, e) for e in (0, 15, 30, 60)] == pytest.approx(
        [0.04, 0.055, 0.07, 0.07])  # fmt: skip


class Recorder(pl.Callback):
    """Per optimizer step: the decayed group's weight decay, the gradient norm after clipping,
    and chosen parameters; before the first step, their initial values."""

    def __init__(self, parts: dict[str, str]) -> None:
        self.parts = parts  # label -> parameter name in the method
        self.rows: list[dict] = []

    def _parameters(self, module: pl.LightningModule) -> dict[str, torch.Tensor]:
        named = dict(module.method.named_parameters())
        return {label: named[name].detach().clone() for label, name in self.parts.items()}

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.initial = self._parameters(module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, *_: object
    ) -> None:
        grads = [p.grad for p in module.method.parameters() if p.grad is not None]
        self.rows.append({
            "weight_decay": max(g["weight_decay"] for g in trainer.optimizers[0].param_groups),
            "grad_norm": torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item(),
            **self._parameters(module),
        })  # fmt: skip


def test_dino_recipe_over_a_few_cpu_steps(mini: Path, tmp_path: Path) -> None:
    """Two steps per epoch: the last layer holds still for the first two, the weight decay
    follows its cosine from 0.04 to 0.4, gradients are clipped to the set norm."""
    clipped = replace(tiny_settings().dino, gradient_clip=1e-3)  # small enough to bite
    recorder = Recorder({"last": "student.1.last.parametrizations.weight.original1",
                         "teacher_last": "teacher.1.last.parametrizations.weight.original1",
                         "qkv": "student.0.blocks.0.attn.qkv.weight"})  # fmt: skip
    run_training(job(mini, tmp_path, "dino", steps=4, dino=clipped), callbacks=[recorder],
                 log_every=100)  # fmt: skip
    rows, initial = recorder.rows, recorder.initial
    assert [torch.equal(r["last"], initial["last"]) for r in rows] == [True, True, False, False]
    for row in rows[:2]:  # the EMA of equal weights: equal up to rounding
        torch.testing.assert_close(row["teacher_last"], initial["teacher_last"])
    assert not torch.equal(rows[0]["qkv"], initial["qkv"])  # the rest trains from step 1
    expected = [0.4 + (0.04 - 0.4) * (math.cos(math.pi * k / 4) + 1) / 2 for k in range(4)]
    assert [r["weight_decay"] for r in rows] == pytest.approx(expected)
    norms = [r["grad_norm"] for r in rows]  # clipped, then the frozen layer's gradient dropped
    assert norms[2:] == pytest.approx([1e-3] * 2, rel=1e-5) and max(norms[:2]) < 1e-3


@pytest.mark.parametrize(
    ("method", "frozen", "trained"),
    [("mae", ["encoder.pos_embed", "decoder_pos_embed"], "encoder.blocks.0.attn.qkv.weight"),
     ("mocov3", ["base.0.patch_embed.proj.weight", "base.0.pos_embed"],
      "base.0.blocks.0.attn.qkv.weight")],
)  # fmt: skip
def test_frozen_parts_stay_put_while_the_rest_trains(
    mini: Path, tmp_path: Path, method: str, frozen: list[str], trained: str
) -> None:
    recorder = Recorder({name: name for name in [*frozen, trained]})
    run_training(job(mini, tmp_path, method, steps=3), callbacks=[recorder], log_every=100)
    last, initial = recorder.rows[-1], recorder.initial
    assert all(torch.equal(last[name], initial[name]) for name in frozen)
    assert not torch.equal(last[trained], initial[trained])
