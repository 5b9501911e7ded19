"""kNN and linear probe on constructed features whose answer is known."""

from __future__ import annotations

import math

import torch

from cpia_assets.core.training.ssl.probe import (
    Features,
    knn_predict,
    linear_probe,
    probe_predictions,
)


def _unit(angle_degrees: float) -> list[float]:
    angle = math.radians(angle_degrees)
    return [math.cos(angle), math.sin(angle)]


def test_knn_votes_are_weighted_by_cosine_similarity_over_the_temperature() -> None:
    # One very similar neighbour of class 0 outweighs two weaker ones of class 1 (a plain
    # majority vote would say 1): exp(0.99 / 0.07) >> 2 exp(0.5 / 0.07).
    bank = Features(
        torch.tensor([_unit(math.degrees(math.acos(s))) for s in (0.99, 0.5, 0.5)]),
        torch.tensor([0, 1, 1]),
    )
    query = torch.tensor([_unit(0.0)])
    assert knn_predict(bank, query, classes=2, k=3).tolist() == [0]
    assert knn_predict(bank, query, classes=2, k=3, temperature=100.0).tolist() == [1]
    scaled = torch.tensor([[5.0, 0.0]])  # cosine similarity: the length does not matter
    assert knn_predict(bank, scaled, classes=2, k=3).tolist() == [0]
    assert knn_predict(bank, query, classes=2, k=1).tolist() == [0]


def _two_clusters(count: int, seed: int) -> Features:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    noise = torch.randn(count, 8, generator=generator)
    values = noise * torch.tensor([1.0] * 7 + [0.01]) + 1000.0  # a large offset: BatchNorm's job
    values[:, 7] += 0.05 * (2 * labels - 1)  # the class lies in one tiny-scale dimension
    return Features(values, labels)


def test_linear_probe_learns_a_separable_task_and_keeps_the_best_validation_epoch() -> None:
    train, val, test = (_two_clusters(64, seed) for seed in (0, 1, 2))
    predict = linear_probe(train, val, classes=2, epochs=50)
    assert (predict(test.values) == test.labels).float().mean().item() == 1.0
    predictions = probe_predictions({"train": train, "val": val, "test": test}, classes=2)
    assert predictions["linear_probe"] == test.labels.tolist()
    # kNN sees the noise dimensions (no normalisation), so it is near chance here: the two
    # evaluations measure different things, both are reported.
    assert len(predictions["knn"]) == 64
