"""The training loader over both layouts: content, scale subsets, exact resume, bad inputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpia_assets.core.training import datasets
from cpia_assets.core.training.datasets import (
    StreamSlice,
    count_training_images,
    list_folder_images,
    training_loader,
)
from cpia_assets_tests.support.ssl_data import (
    corrupt_jpeg,
    corrupt_shard_sample,
    truncate_shard,
    write_folder_tree,
    write_shards,
)

torch.set_num_threads(1)  # the test machine's cores are shared


def mean_colour(image: Image.Image) -> list[torch.Tensor]:
    """A 'view' that identifies the image: its mean RGB."""
    return [torch.tensor(np.asarray(image, dtype=np.float64).mean(axis=(0, 1)))]


def _key(colour: torch.Tensor) -> tuple[float, ...]:
    return tuple(round(value, 3) for value in colour.tolist())


def file_colours(paths: list[Path]) -> list[tuple[float, ...]]:
    return sorted(_key(mean_colour(Image.open(p).convert("RGB"))[0]) for p in paths)


def batch_colours(batch: tuple[list[torch.Tensor], torch.Tensor]) -> list[tuple[float, ...]]:
    return sorted(_key(row) for row in batch[0][0])


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    write_folder_tree(root / "cpia", per_scale=4)
    write_shards(root / "cpia", root / "shards", shard_size=5)
    return root / "cpia", root / "shards"


@pytest.mark.parametrize("layout", ["folders", "shards"])
@pytest.mark.parametrize("folders", [("L", "M", "S"), ("S",), ("L",)])
def test_one_epoch_yields_each_selected_image_once(
    layouts: tuple[Path, Path], layout: str, folders: tuple[str, ...]
) -> None:
    root, shards = layouts
    source = root if layout == "folders" else shards
    expected = file_colours(list_folder_images(root, folders))
    assert count_training_images(source, folders) == len(expected)  # XL and L both under L
    loader = training_loader(
        source, transform=mean_colour, batch_size=len(expected), seed=3, folders=folders
    )
    first = next(iter(loader))
    assert batch_colours(first) == expected
    assert len(set(first[1].tolist())) == len(expected)  # every sample its own augmentation seed


@pytest.mark.parametrize(("layout", "workers"), [("folders", 0), ("folders", 2), ("shards", 2)])
def test_a_resumed_stream_continues_exactly(
    layouts: tuple[Path, Path], layout: str, workers: int
) -> None:
    source = layouts[0] if layout == "folders" else layouts[1]

    def batches(start: int, count: int) -> list:
        loader = training_loader(
            source, transform=mean_colour, batch_size=3, seed=5, workers=workers,
            stream_slice=StreamSlice(start_batch=start),
        )  # fmt: skip
        iterator = iter(loader)
        return [next(iterator) for _ in range(count)]

    straight = batches(0, 9)  # 27 samples: crosses an epoch of 16 images
    resumed = batches(5, 4)
    for ours, theirs in zip(straight[5:], resumed, strict=True):
        assert torch.equal(ours[0][0], theirs[0][0])
        assert torch.equal(ours[1], theirs[1])


def test_shard_batches_regroup_every_epoch(tmp_path: Path) -> None:
    write_folder_tree(tmp_path / "cpia", per_scale=4)  # sixteen images
    write_shards(tmp_path / "cpia", tmp_path / "shards", shard_size=16)  # one tar order only
    iterator = iter(training_loader(tmp_path / "shards", transform=mean_colour, batch_size=4,
                                    seed=0))  # fmt: skip
    groups = [frozenset(batch_colours(next(iterator))) for _ in range(8)]  # two epochs
    expected = file_colours(list_folder_images(tmp_path / "cpia", "LMS"))
    for epoch in (groups[:4], groups[4:]):
        assert sorted(colour for group in epoch for colour in group) == expected
    assert set(groups[:4]) != set(groups[4:])  # not runs of tar members: new batches each epoch


def test_a_shuffle_window_across_shards_resumes_inside_a_window(layouts: tuple[Path, Path]) -> None:
    def batches(start: int, count: int) -> list:
        loader = training_loader(
            layouts[1], transform=mean_colour, batch_size=2, seed=4, workers=2, shuffle_window=3,
            stream_slice=StreamSlice(start_batch=start),
        )  # fmt: skip
        iterator = iter(loader)
        return [next(iterator) for _ in range(count)]

    straight = batches(0, 20)  # shards of 5: windows of 3 span them; 40 samples, 2.5 epochs
    assert len({seed for batch in straight for seed in batch[1].tolist()}) == 40
    for ours, theirs in zip(straight[7:], batches(7, 13), strict=True):  # mid-window, odd role
        assert torch.equal(ours[0][0], theirs[0][0])
        assert torch.equal(ours[1], theirs[1])


def test_a_short_shard_is_named_once_and_keeps_its_positions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = write_folder_tree(tmp_path / "cpia", per_scale=2)  # eight images
    source = tmp_path / "shards"
    write_shards(tmp_path / "cpia", source, shard_size=5)  # shards of 5 and 3
    dropped = truncate_shard(source / "shard-000000.tar", keep=3)
    kept = [path for path in paths if not any(key.endswith(path.stem) for key in dropped)]
    assert len(dropped) == 2 and len(kept) == 6
    with caplog.at_level(logging.WARNING, logger="cpia_assets.core.training.datasets"):
        straight = full_batches(source, 0, 3, batch_size=8)  # one epoch per batch
    assert caplog.text.count("shard-000000.tar: holds 3 samples in folders L, M, S, its index "
                             "says 5") == 1  # fmt: skip
    assert "replacing" not in caplog.text  # not taken for unreadable images
    for views, _ in straight:  # every kept image once per epoch, the next shard not shifted
        assert sorted(set(batch_colours((views, _)))) == file_colours(kept)
    resumed = full_batches(source, 2, 1, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(straight[2][0], resumed[0][0], strict=True))


def test_folder_stream_is_the_same_for_any_number_of_workers(layouts: tuple[Path, Path]) -> None:
    def seeds(workers: int) -> list[list[int]]:
        loader = training_loader(layouts[0], transform=mean_colour, batch_size=4, seed=1,
                                 workers=workers)  # fmt: skip
        iterator = iter(loader)
        return [next(iterator)[1].tolist() for _ in range(6)]

    assert seeds(0) == seeds(2)


def test_ranks_read_disjoint_batches(layouts: tuple[Path, Path]) -> None:
    def first(rank: int) -> list[tuple[float, ...]]:
        loader = training_loader(
            layouts[0], transform=mean_colour, batch_size=8, seed=2,
            stream_slice=StreamSlice(rank=rank, world_size=2),
        )  # fmt: skip
        return batch_colours(next(iter(loader)))

    both = first(0) + first(1)
    assert sorted(both) == file_colours(list_folder_images(layouts[0], "LMS"))


def colour_and_noise(image: Image.Image) -> list[torch.Tensor]:
    """Two 'views': the image's mean RGB, and noise from the sample's seeded augmentation."""
    return [*mean_colour(image), torch.rand(4)]


def full_batches(
    source: Path, start: int, count: int, batch_size: int = 4, seed: int = 0
) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    loader = training_loader(
        source, transform=colour_and_noise, batch_size=batch_size, seed=seed,
        stream_slice=StreamSlice(start_batch=start),
    )  # fmt: skip
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(count)]
    sizes = {len(part) for views, seeds in batches for part in (*views, seeds)}
    assert sizes == {batch_size}, sizes  # every view and the seeds: full batches only
    return batches


@pytest.mark.parametrize("layout", ["folders", "shards"])
def test_an_undecodable_image_is_stood_in_for_and_the_stream_still_resumes(
    tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    paths = write_folder_tree(tmp_path / "cpia", per_scale=2)  # eight images
    bad = paths[3]
    good = file_colours([path for path in paths if path != bad])
    source = tmp_path / "cpia"
    if layout == "shards":
        write_shards(source, tmp_path / "shards", shard_size=3)
        source = tmp_path / "shards"
        shard = next(p for p in source.glob("*.tar") if bad.stem.encode() in p.read_bytes())
        corrupt_shard_sample(shard, bad.stem)
    else:
        corrupt_jpeg(bad)
    with caplog.at_level(logging.WARNING, logger="cpia_assets.core.training.datasets"):
        straight = full_batches(source, 0, 6)  # three epochs of two full batches
    assert bad.stem in caplog.text
    assert "not a decodable image" in caplog.text
    hit = []  # the batches holding the broken image's position: one per epoch
    for number, (views, _) in enumerate(straight):
        colours = [_key(row) for row in views[0]]
        assert set(colours) <= set(good)
        if len(set(colours)) < len(colours):
            hit.append(number)  # the stand-in: another image of the batch, augmented anew
            twins = [row for row, colour in enumerate(colours) if colours.count(colour) == 2]
            assert len(twins) == 2 and not torch.equal(views[1][twins[0]], views[1][twins[1]])
    assert [number // 2 for number in hit] == [0, 1, 2]
    seeds = torch.cat([batch[1] for batch in straight]).tolist()
    assert len(set(seeds)) == 24  # every position keeps its own seed, the broken ones too
    resumed = full_batches(source, hit[0] + 1, 5 - hit[0])  # after the first broken batch
    for ours, theirs in zip(straight[hit[0] + 1 :], resumed, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours[0], theirs[0], strict=True))
        assert torch.equal(ours[1], theirs[1])


def test_an_all_failed_batch_borrows_from_its_neighbours(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_folder_tree(tmp_path / "cpia", per_scale=2)
    for path in paths[1:]:
        corrupt_jpeg(path)  # one decodable image of eight: every other batch fails whole
    monkeypatch.setattr(datasets, "FAILURES_LOGGED_EVERY", 10)
    with caplog.at_level(logging.WARNING, logger="cpia_assets.core.training.datasets"):
        iterator = iter(training_loader(tmp_path / "cpia", transform=colour_and_noise,
                                        batch_size=4, seed=1))  # fmt: skip
        batches = [next(iterator)]
        # Seed 1: batch 0 failed whole (4 warnings), so it waited for batch 1's image (3 more).
        assert caplog.text.count("replacing") == 7
        batches += [next(iterator) for _ in range(5)]
    only = file_colours(paths[:1])
    for views, seeds in batches:
        assert [_key(row) for row in views[0]] == only * 4 and len(seeds) == 4
        assert len({tuple(row.tolist()) for row in views[1]}) == 4  # four augmentations
    assert caplog.text.count("replacing") == 10  # then a count: 21 failures in 24 positions
    assert "20 unreadable or undecodable images replaced so far" in caplog.text


def test_bad_sources_fail_naming_the_path(tmp_path: Path, layouts: tuple[Path, Path]) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        training_loader(tmp_path / "nowhere", transform=mean_colour, batch_size=2, seed=0)
    (tmp_path / "empty" / "M").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"empty: no \.jpg images"):
        training_loader(tmp_path / "empty", transform=mean_colour, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="folders must be a subset"):
        training_loader(layouts[0], transform=mean_colour, batch_size=2, seed=0, folders=("XL",))
    broken = tmp_path / "broken"
    broken.mkdir()
    index = json.loads((layouts[1] / "index.json").read_text())
    (broken / "index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"shard-000000\.tar"):
        training_loader(broken, transform=mean_colour, batch_size=2, seed=0)
    (broken / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken/index\.json: not a valid shard index"):
        training_loader(broken, transform=mean_colour, batch_size=2, seed=0)


@pytest.mark.parametrize("broken", ["folders", "undecodable shards", "shards not tar"])
def test_a_source_with_nothing_decodable_fails_after_one_pass(
    tmp_path: Path, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    paths = write_folder_tree(tmp_path / "cpia", per_scale=2)  # eight images
    source = tmp_path / "cpia"
    if broken == "folders":
        for path in paths:
            corrupt_jpeg(path)
    else:
        write_shards(source, tmp_path / "shards", shard_size=3)
        source = tmp_path / "shards"
        for shard in source.glob("*.tar"):
            if broken == "shards not tar":
                shard.write_bytes(b"not a tar archive" * 100)
            else:
                for path in paths:
                    if path.stem.encode() in shard.read_bytes():
                        corrupt_shard_sample(shard, path.stem)
    named = "image folders" if broken == "folders" else "shard-000000.tar, shard-000001.tar"
    with (
        caplog.at_level(logging.WARNING, logger="cpia_assets.core.training.datasets"),
        pytest.raises(datasets.NothingDecodableError, match=f"{named}.*none of its 8 images"),
    ):
        next(iter(training_loader(source, transform=mean_colour, batch_size=4, seed=0)))
    assert caplog.text.count("replacing") == 8  # each image named once, one pass
    assert caplog.text.count("unreadable from here on") == (3 if broken == "shards not tar" else 0)
