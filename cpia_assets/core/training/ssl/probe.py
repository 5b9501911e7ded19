"""Frozen-encoder evaluations, cheap beside fine-tuning: kNN as DINO evaluates (k = 20, cosine
similarity, votes weighted by exp(similarity / 0.07)) and a linear probe as MAE's linprobe (a
BatchNorm without affine parameters, then a linear layer, trained on the frozen features; the
epoch with the best validation accuracy is tested). Both work on features extracted once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

KNN_K = 20
KNN_TEMPERATURE = 0.07


@dataclass(frozen=True)
class Features:
    """Encoder outputs of one split and their labels."""

    values: torch.Tensor  # (N, D)
    labels: torch.Tensor  # (N,)


@torch.no_grad()
def extract_features(
    encoder: nn.Module, loader: DataLoader, device: torch.device | None = None
) -> Features:
    """The encoder's pooled features of every (image, label) batch of `loader`."""
    encoder.eval()
    device = device or next(encoder.parameters()).device
    values, labels = [], []
    for images, targets in loader:
        values.append(encoder(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(targets))
    return Features(torch.cat(values), torch.cat(labels))


def knn_predict(
    bank: Features,
    queries: torch.Tensor,
    classes: int,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> torch.Tensor:
    """Predicted class of each query: the classes of its k most cosine-similar bank features,
    each vote weighted by exp(similarity / temperature)."""
    similarity = F.normalize(queries, dim=1) @ F.normalize(bank.values, dim=1).T
    top, index = similarity.topk(min(k, len(bank.labels)), dim=1)
    votes = torch.zeros(len(queries), classes)
    votes.scatter_add_(1, bank.labels[index], (top / temperature).exp())
    return votes.argmax(1)


def linear_probe(
    train: Features,
    val: Features,
    classes: int,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    seed: int = 0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A BatchNorm (no affine) + linear classifier trained on frozen `train` features with SGD
    (momentum 0.9, cosine decay), full batch; returns the predictor of the epoch with the best
    `val` accuracy."""
    torch.manual_seed(seed)
    # momentum=None: BatchNorm keeps the cumulative average, so on full batches of fixed features
    # its running statistics are exactly the training features' (no lag after few epochs).
    width = train.values.shape[1]
    head = nn.Sequential(
        nn.BatchNorm1d(width, affine=False, momentum=None), nn.Linear(width, classes)
    )
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    best, best_state = -1.0, head.state_dict()
    for _ in range(epochs):
        head.train()
        loss = F.cross_entropy(head(train.values), train.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        head.eval()
        with torch.no_grad():
            accuracy = (head(val.values).argmax(1) == val.labels).float().mean().item()
        if accuracy > best:
            best = accuracy
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    head.eval()

    def predict(values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return head(values).argmax(1)

    return predict


def probe_predictions(
    splits: dict[str, Features], classes: int, *, seed: int = 0
) -> dict[str, Sequence[int]]:
    """Test predictions of kNN (train as memory bank) and of the linear probe."""
    knn = knn_predict(splits["train"], splits["test"].values, classes)
    probe = linear_probe(splits["train"], splits["val"], classes, seed=seed)
    return {"knn": knn.tolist(), "linear_probe": probe(splits["test"].values).tolist()}
