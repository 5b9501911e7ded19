"""Two DDP ranks on CPU (gloo) train MoCo-v3 while one of them meets an undecodable image: both
still see full, equal batches, so the key gathering across ranks works."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from cpia_assets.core.training.ssl.config import PretrainJob
from cpia_assets.core.training.ssl.train import run_training
from cpia_assets_tests.support.ssl_data import (
    corrupt_shard_sample,
    tiny_settings,
    write_folder_tree,
    write_shards,
)

RANKS, BATCH, STEPS = 2, 4, 2  # two steps of 4 = one pass over a rank's shard of 8
TIMEOUT_S = 240  # a rank stuck in a collective must not hang the suite


class Record(pl.Callback, logging.Handler):
    """Writes to `path`, at every step, this rank's batch sizes (every view and the seeds) and how
    many undecodable images its loader has met so far."""

    def __init__(self, path: Path) -> None:
        pl.Callback.__init__(self)
        logging.Handler.__init__(self, logging.WARNING)
        self.path = path
        self.sizes: list[list[int]] = []
        self.failed = 0
        self.failed_by_step: list[int] = []
        logging.getLogger("cpia_assets.core.training.datasets").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if "not a decodable image" in record.getMessage():
            self.failed += 1

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, *_: Any) -> None:
        self.sizes.append([len(view) for view in batch[0]] + [len(batch[1])])
        self.failed_by_step.append(self.failed)
        self.path.write_text(json.dumps({"sizes": self.sizes, "failed": self.failed_by_step}))


def train_rank(rank: int, port: int, job: PretrainJob, records: Path) -> None:
    """One rank, joined to the others the way torchrun does it (Lightning reads these)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0",
                      WORLD_SIZE=str(RANKS), LOCAL_WORLD_SIZE=str(RANKS), OMP_NUM_THREADS="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    run_training(job, callbacks=[Record(records / f"rank-{rank}.json")], progress=lambda _: None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shards_with_one_broken_first_sample(root: Path) -> Path:
    """Two shards of eight, so each rank reads one per pass; the first sample of shard 0 (in the
    first batch of whichever rank gets it) is not an image."""
    write_folder_tree(root / "cpia-mini", per_scale=4)
    write_shards(root / "cpia-mini", root / "shards", shard_size=8)
    corrupt_shard_sample(root / "shards" / "shard-000000.tar")
    return root / "shards"


def test_two_ranks_get_full_equal_batches_when_one_meets_a_broken_image(tmp_path: Path) -> None:
    shards = shards_with_one_broken_first_sample(tmp_path)
    job = PretrainJob("mocov3", "cpia-mini", str(shards), ("L", "M", "S"), str(tmp_path / "out"),
                      tiny_settings(image_size=32, batch_size=BATCH, steps=STEPS, devices=RANKS,
                                    checkpoint_every=STEPS))  # fmt: skip
    port, spawn = free_port(), multiprocessing.get_context("spawn")
    ranks = [
        spawn.Process(target=train_rank, args=(rank, port, job, tmp_path)) for rank in range(RANKS)
    ]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + TIMEOUT_S
    for process in ranks:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [process.pid for process in ranks if process.is_alive()]
    for process in ranks:
        if process.is_alive():
            process.kill()
            process.join()
    records = [
        json.loads(path.read_text()) if (path := tmp_path / f"rank-{rank}.json").exists() else None
        for rank in range(RANKS)
    ]
    assert not hung, f"ranks still running after {TIMEOUT_S} s: {hung}; they saw {records}"
    assert [process.exitcode for process in ranks] == [0] * RANKS, records
    full = [[BATCH] * 3] * STEPS  # two MoCo views and the seeds, BATCH each, at every step
    assert [record["sizes"] for record in records] == [full] * RANKS
    assert sorted(record["failed"][0] for record in records) == [0, 1]  # at the first step
    assert (tmp_path / "out" / "encoder.pth").is_file()
