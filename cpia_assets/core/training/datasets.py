"""Training images from either CPIA layout as a deterministic, resumable PyTorch stream.

Layouts: a folder root (`cpia/` or `cpia-mini/`, images in `{L,M,S}/<sub-dataset>/*.jpg`) or a
shard folder (`shards/<variant>/index.json` + `shard-NNNNNN.tar`, WebDataset samples `<k>.jpg` +
`<k>.json`, see README). Either can be restricted to some top folders (L, M, S).

The stream is endless and a pure function of the seed (and, for shards, of the number of ranks x
loader workers): batch j of rank r is the same on every run, and every sample's augmentation is
seeded from its place in the stream. A run resumed at batch j (optimizer step x accumulation)
therefore sees exactly the images and crops an uninterrupted run would. Folders: position p of the
global stream is image p mod n of the seeded permutation of epoch p // n. Shards: each epoch
permutes the shard list and deals the shards out to the (rank, worker) slots; a slot reads its
shards in order as one sequence of the index's counts, cut into windows of `shuffle_window`
samples (spanning shard boundaries), each emitted in a permutation seeded by (seed, epoch, slot,
window). So batches mix samples from apart in the tar files and group differently every epoch,
while the sample at any place stays computable: a resume skips whole epochs and shards by the
index's counts and reads only the window it starts in. A shard that ends before its index's count
is named once; its missing positions are stood in for like failed samples, so every later
position stays where the index puts it.

Every batch has exactly `batch_size` samples, on every rank: DDP needs equal batches (MoCo-v3
gathers the keys of all ranks, DINO averages its centre over them). An image that cannot be read
or decoded still counts as its position (shard skips stay valid; so does the rest of an unreadable
shard, up to the index's count) and is stood in for by a seeded choice of its batch's decodable
images, augmented with the failed position's own seed. Should a whole batch fail, the stand-ins
come from the latest batch of this loader worker that had a decodable image (before any such
batch, from the next one: the broken batch is held back until then). So only an all-failed batch
right after the resume point can differ from an uninterrupted run (and, for folders, under another
number of workers). The first few failures are named in a warning, then a count every 1000. A
full pass that decodes nothing (every distinct image failed before any succeeded) raises
`NothingDecodableError` naming the source instead of looping for ever.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cpia_assets.core.layout import SCALE_FOLDER_OF, SCALE_FOLDERS

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], list[torch.Tensor]]
"""Turns one image into its views (MAE: one, MoCo-v3: two, DINO: two global + local crops)."""

Batch = tuple[list[torch.Tensor], torch.Tensor]
"""The views of a batch, each stacked to (B, 3, H, W), and every sample's augmentation seed."""

SHARD_INDEX = "index.json"
_ORDER, _FOLDER_SAMPLE, _SHARD_SAMPLE, _STAND_IN, _SHUFFLE = 1, 2, 3, 4, 5  # seeds kept apart
FAILURES_NAMED, FAILURES_LOGGED_EVERY = 10, 1000
SHUFFLE_WINDOW = 1024
"""Shard samples shuffled together: a window's JPEG bytes are held (a few tens of MB)."""


@dataclass(frozen=True)
class StreamSlice:
    """Which part of the global batch stream one process reads: its rank, and where to start."""

    rank: int = 0
    world_size: int = 1
    start_batch: int = 0


def training_loader(
    source: Path,
    *,
    transform: Transform,
    batch_size: int,
    seed: int,
    folders: Sequence[str] = SCALE_FOLDERS,
    workers: int = 0,
    stream_slice: StreamSlice = StreamSlice(),
    shuffle_window: int = SHUFFLE_WINDOW,
) -> DataLoader:
    """A DataLoader of `Batch`es over a folder root or a shard folder (detected by index.json;
    `shuffle_window` applies to shards, folders are permuted whole)."""
    unknown = set(folders) - set(SCALE_FOLDERS)
    if unknown or not folders:
        raise ValueError(f"{source}: folders must be a subset of {SCALE_FOLDERS}, got {folders}")
    common = {"transform": transform, "batch_size": batch_size, "seed": seed}
    if (Path(source) / SHARD_INDEX).is_file():
        stream: _Stream = ShardStream(
            Path(source), folders=tuple(folders), window=shuffle_window,
            stream_slice=stream_slice, **common,
        )  # fmt: skip
        workers = min(workers, len(stream.shards) // stream_slice.world_size)
    else:
        stream = FolderStream(
            list_folder_images(Path(source), folders), stream_slice=stream_slice, **common
        )
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False)


def list_folder_images(root: Path, folders: Sequence[str]) -> list[Path]:
    """The JPEGs of `root/<folder>/<sub-dataset>/`, sorted, so every run lists the same order."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: training image folder does not exist")
    images = sorted(p for folder in folders for p in (root / folder).glob("*/*.jp*g"))
    if not images:
        raise FileNotFoundError(f"{root}: no .jpg images under {', '.join(folders)}/<sub-dataset>/")
    return images


def read_shard_index(folder: Path) -> dict[str, Any]:
    path = folder / SHARD_INDEX
    try:
        index = json.loads(path.read_text())
        files = [entry["file"] for entry in index["shards"]]
        for entry in (index, *index["shards"]):
            if not set(entry["per_scale"]) <= set(SCALE_FOLDER_OF):
                raise ValueError(f"unknown scale in per_scale {entry['per_scale']}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid shard index ({exc})") from exc
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: shards listed but missing: {', '.join(missing[:5])}")
    return index


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, stream coordinates), well mixed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


_Sample = tuple[Image.Image | None, int]
"""A position of the stream as read: its image (None when unreadable or undecodable), its seed."""


class NothingDecodableError(ValueError):
    """A full pass over the training source found no image that can be read and decoded."""


class _Stream(IterableDataset, ABC):
    def __init__(
        self, *, transform: Transform, batch_size: int, seed: int, stream_slice: StreamSlice
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.slice = stream_slice
        self.failures = 0  # failed samples this process has replaced
        self._failed_before_any_image: set[str] | None = set()  # None once one image decoded

    @property
    @abstractmethod
    def total_images(self) -> int:
        """Distinct images in one full pass over the source."""

    @abstractmethod
    def _describe(self) -> str:
        """The source, for the error that it holds nothing decodable."""

    @abstractmethod
    def _batches(self) -> Iterator[list[_Sample]]:
        """This worker's batches of the stream, `batch_size` positions each, in order."""

    def __iter__(self) -> Iterator[Batch]:
        recent: list[Image.Image] = []  # the decodable images of the latest batch that had any
        waiting: list[list[_Sample]] = []  # batches read before any decodable image
        for batch in self._batches():
            recent = [image for image, _ in batch if image is not None] or recent
            waiting.append(batch)
            if recent:
                for pending in waiting:
                    yield self._augment(pending, recent)
                waiting = []

    def _augment(self, batch: list[_Sample], recent: list[Image.Image]) -> Batch:
        """Every sample's views under its seed; a failed one takes a seeded choice of `recent`."""
        views = []
        for image, seed in batch:
            if image is None:
                image = recent[sample_seed(seed, _STAND_IN) % len(recent)]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                views.append(self.transform(image))
        stacked = [torch.stack(group) for group in zip(*views, strict=True)]
        return stacked, torch.tensor([seed for _, seed in batch], dtype=torch.int64)

    def _decode(self, data: bytes | None, name: str) -> Image.Image | None:
        """The image as RGB, or None when it is unreadable (`data` None) or undecodable: named in
        a warning for the first few failures, then counted every `FAILURES_LOGGED_EVERY`."""
        reason = "unreadable"
        if data is not None:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    decoded = image.convert("RGB")
                self._failed_before_any_image = None
                return decoded
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                reason = f"not a decodable image ({exc})"
        self.failures += 1
        if self.failures <= FAILURES_NAMED:
            log.warning("replacing %s in its batch: %s", name, reason)
        elif self.failures % FAILURES_LOGGED_EVERY == 0:
            log.warning("%d unreadable or undecodable images replaced so far", self.failures)
        self._count_failed(name, reason)
        return None

    def _count_failed(self, name: str, reason: str) -> None:
        """Note a failed position towards the guard against a source with nothing decodable."""
        if self._failed_before_any_image is not None:
            # Without this, a stream of nothing decodable would hold its batches back for ever.
            self._failed_before_any_image.add(name)
            if len(self._failed_before_any_image) >= self.total_images:
                raise NothingDecodableError(
                    f"{self._describe()}: none of its {self.total_images} images could be read "
                    f"or decoded in a full pass (e.g. {name}: {reason})"
                )

    @staticmethod
    def _worker() -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)


class FolderStream(_Stream):
    """Endless seeded permutations of a list of image files."""

    def __init__(self, images: Sequence[Path], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.images = list(images)

    @property
    def total_images(self) -> int:
        return len(self.images)

    def _describe(self) -> str:
        folders = sorted({path.parent.parent for path in self.images})
        return f"image folders {', '.join(map(str, folders))}"

    def _batches(self) -> Iterator[list[_Sample]]:
        worker, workers = self._worker()
        # The DataLoader takes batches from its workers in turn, starting with worker 0: its i-th
        # batch is batch start + i of this rank's stream and comes from worker i mod workers.
        order, epoch, size = torch.empty(0, dtype=torch.int64), -1, self.batch_size
        for local_batch in range(self.slice.start_batch + worker, 2**62, workers):
            global_batch = local_batch * self.slice.world_size + self.slice.rank
            batch = []
            for position in range(global_batch * size, (global_batch + 1) * size):
                if position // len(self.images) != epoch:
                    epoch = position // len(self.images)
                    generator = torch.Generator().manual_seed(sample_seed(self.seed, _ORDER, epoch))
                    order = torch.randperm(len(self.images), generator=generator)
                path = self.images[int(order[position % len(self.images)])]
                try:
                    data: bytes | None = path.read_bytes()
                except OSError:
                    data = None
                seed = sample_seed(self.seed, _FOLDER_SAMPLE, position)
                batch.append((self._decode(data, str(path)), seed))
            yield batch


class ShardStream(_Stream):
    """Endless passes over WebDataset shards; each pass deals a seeded shard order to the slots."""

    def __init__(
        self, folder: Path, *, folders: tuple[str, ...], window: int = SHUFFLE_WINDOW, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if window < 1:
            raise ValueError(f"shuffle_window must be at least 1, got {window}")
        self.folder = folder
        self.window = window
        index = read_shard_index(folder)
        self.shards = [entry["file"] for entry in index["shards"]]
        # Images per shard inside the selected folders, so that skipping needs no reading.
        self.counts = [
            sum(n for scale, n in entry["per_scale"].items() if SCALE_FOLDER_OF[scale] in folders)
            for entry in index["shards"]
        ]
        self.folders = folders
        if len(self.shards) < self.slice.world_size:
            raise ValueError(
                f"{folder}: {len(self.shards)} shards cannot feed {self.slice.world_size} ranks"
            )
        if sum(self.counts) == 0:
            raise ValueError(f"{folder}: no images in folders {', '.join(folders)}")
        self._unreadable: set[int] = set()  # shards already named as unreadable
        self._short: set[int] = set()  # shards already named as shorter than the index says

    @property
    def total_images(self) -> int:
        return sum(self.counts)

    def _describe(self) -> str:
        used = [name for name, count in zip(self.shards, self.counts, strict=True) if count]
        more = f" and {len(used) - 5} more" if len(used) > 5 else ""
        return f"{self.folder}: shards {', '.join(used[:5])}{more}"

    def _batches(self) -> Iterator[list[_Sample]]:
        worker, workers = self._worker()
        # Batch b of this rank comes from role b mod workers: the shards of slot (rank, role), read
        # in order. The DataLoader's i-th batch (batch start + i) comes from worker i mod workers,
        # so a worker plays role (start + worker) mod workers from its batch (start + worker) //
        # workers on.
        first = self.slice.start_batch + worker
        slot = self.slice.rank * workers + first % workers
        slots = self.slice.world_size * workers
        skip = (first // workers) * self.batch_size  # samples of this slot before its first batch
        batch: list[_Sample] = []
        for epoch in range(2**62):
            generator = torch.Generator().manual_seed(sample_seed(self.seed, _ORDER, epoch))
            mine = torch.randperm(len(self.shards), generator=generator).tolist()[slot::slots]
            size = sum(self.counts[shard] for shard in mine)
            if size == 0:
                raise ValueError(
                    f"{self.folder}: the shards of loader slot {slot} hold no images in folders "
                    f"{', '.join(self.folders)}; use fewer workers or the variant's own shards"
                )
            if skip >= size:
                skip -= size
                continue
            for sample in self._shuffled(mine, epoch, slot, skip):
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            skip = 0

    def _shuffled(self, mine: list[int], epoch: int, slot: int, start: int) -> Iterator[_Sample]:
        """The slot's samples of `epoch` from place `start` on: each window of the slot's
        sequence in its seeded permutation."""
        size = sum(self.counts[shard] for shard in mine)
        first = start - start % self.window
        sequence = self._sequence(mine, epoch, first)
        for begin in range(first, size, self.window):
            window = list(itertools.islice(sequence, min(self.window, size - begin)))
            generator = torch.Generator().manual_seed(
                sample_seed(self.seed, _SHUFFLE, epoch, slot, begin)
            )
            for offset in torch.randperm(len(window), generator=generator)[max(0, start - begin) :]:
                name, data, seed, missing = window[int(offset)]
                if missing:
                    self._count_failed(name, "missing from its shard")
                    yield None, seed
                else:
                    yield self._decode(data, name), seed

    def _sequence(
        self, mine: list[int], epoch: int, skip: int
    ) -> Iterator[tuple[str, bytes | None, int, bool]]:
        """(name, jpeg bytes or None, seed, missing from a short shard) of every position of the
        slot's shards, as many per shard as the index counts (skips stay valid), from `skip` on."""
        for shard in mine:
            if skip >= self.counts[shard]:
                skip -= self.counts[shard]
                continue
            samples = self._read(shard)
            path = self.folder / self.shards[shard]
            for number in range(self.counts[shard]):
                key, data = next(samples, (f"#{number}", None))
                missing = data is None and shard not in self._unreadable
                if missing and shard not in self._short:
                    self._short.add(shard)
                    log.warning(
                        "%s: holds %d samples in folders %s, its index says %d: the missing "
                        "positions are stood in for", path, number, ", ".join(self.folders),
                        self.counts[shard],
                    )  # fmt: skip
                if number >= skip:
                    seed = sample_seed(self.seed, _SHARD_SAMPLE, epoch, shard, number)
                    yield f"{path}:{key}", data, seed, missing
            skip = 0

    def _read(self, shard: int) -> Iterator[tuple[str, bytes]]:
        """(key, jpeg bytes) of the shard's samples in the selected folders, in tar order."""
        path = self.folder / self.shards[shard]
        members: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(path, "r|") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    handle = tar.extractfile(member) if member.isfile() else None
                    if handle is None:
                        continue
                    members.setdefault(key, {})[ext] = handle.read()
                    if {"jpg", "json"} <= members[key].keys():
                        sample = members.pop(key)
                        if json.loads(sample["json"])["folder"] in self.folders:
                            yield key, sample["jpg"]
        except (OSError, tarfile.TarError, ValueError, KeyError) as exc:
            if shard not in self._unreadable:  # once, not on every pass
                self._unreadable.add(shard)
                log.warning("%s: unreadable from here on, the rest are failed samples (%s)", path,
                            exc)  # fmt: skip


def count_training_images(source: Path, folders: Sequence[str]) -> int:
    """How many images a stream over `source` cycles through (from index.json for shards)."""
    if (source / SHARD_INDEX).is_file():
        per_scale = read_shard_index(source)["per_scale"]
        return sum(n for scale, n in per_scale.items() if SCALE_FOLDER_OF[scale] in folders)
    return len(list_folder_images(source, folders))
