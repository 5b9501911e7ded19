from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from cpia_assets.core.catalog import cache as catalog_cache
from cpia_assets.core.catalog import loading as catalog_loading
from cpia_assets.core.catalog.fields import ALL_SCALES, TABLE_I_ORGANS, CatalogError
from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.layout import DataLayout
from cpia_assets.definitions import build_definitions, defs
from cpia_assets_tests.support.paths import REFERENCE


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("catch dataset", "catch")).strip("-")


def test_full_catalog_has_every_cpia_subdataset() -> None:
    catalog = load_catalog()
    kinds = Counter(entry.kind for entry in catalog.subdatasets)
    assert kinds == {"wsi": 55, "roi": 48}
    assert len(set(catalog.keys)) == 103
    assert {entry.table_i_organ for entry in catalog.subdatasets} == set(TABLE_I_ORGANS)
    assert catalog.get("prcc").scales == ("M",)
    assert catalog.get("prcc").labelled


def test_full_catalog_agrees_with_published_table() -> None:
    catalog = load_catalog("cpia")
    with (REFERENCE / "cpia_subdatasets.csv").open() as handle:
        published = list(csv.DictReader(handle))
    assert len(published) == 102  # pRCC is the 103rd, from the paper
    for row in published:
        entry = catalog.get(_slug(row["name"]))
        assert entry.name == row["name"]
        assert entry.kind == row["kind"].lower()
        assert sum(entry.published_counts.values()) == int(row["n_images"]), entry.key
        assert set(entry.scales) >= set(row["scales"].split(";")), entry.key


def test_full_catalog_totals_match_the_repository_spreadsheet() -> None:
    totals = Counter()
    for entry in load_catalog().subdatasets:
        for scale, count in entry.published_counts.items():
            totals[(entry.kind, scale)] += count
    # cpia_repo_notes.md: WSI XL 736,719; L 11,245,935; M 68,844,269; S 66,978,086.
    assert totals[("wsi", "XL")] == 736_719
    assert totals[("wsi", "L")] == 11_245_935
    assert totals[("wsi", "M")] == 68_844_269
    assert totals[("wsi", "S")] == 66_978_086
    # ROI: L 287,541, S 199,259; M 670,777 plus pRCC's 1,417 (not in the spreadsheet).
    assert totals[("roi", "L")] == 287_541
    assert totals[("roi", "M")] == 670_777 + 1_417
    assert totals[("roi", "S")] == 199_259


def test_split_scale_rules_route_by_path() -> None:
    catalog = load_catalog()
    breakhis = catalog.get("breakhis")
    assert breakhis.scale_for("benign/SOB_B_A-14-22549AB-40-001/40X/a.png") == "L"
    assert breakhis.scale_for("malignant/DC/200X/b.png") == "M"
    gashis = catalog.get("gashissdb")
    assert gashis.scale_for("160/Normal/x.jpg") == "M"
    assert gashis.scale_for("80/Abnormal/x.jpg") == "S"
    assert gashis.scale_for("120/Normal/x.jpg") is None  # not part of CPIA


def test_demo_catalog_is_self_contained() -> None:
    catalog = load_catalog("demo")
    kinds = Counter(entry.kind for entry in catalog.subdatasets)
    assert kinds["wsi"] >= 2
    assert kinds["roi"] >= 2
    assert all(entry.source["type"] == "synthetic" for entry in catalog.subdatasets)
    mpps = {s["mpp"] for e in catalog.subdatasets if e.kind == "wsi" for s in e.source["slides"]}
    assert {0.25, 0.5} <= mpps
    assert all(e.labelled and e.splits for e in catalog.subdatasets if e.kind == "roi")
    assert set(ALL_SCALES) == set(catalog.get("demo-wsi-40x").scales)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return path


GOOD_FIELDS = {
    "key": "my-slides",
    "name": "My slides",
    "kind": "wsi",
    "organ": "breast",
    "source": "{type: local, path: slides}",
}


def _entry(**changes: str) -> str:
    """One YAML list item: GOOD_FIELDS with `changes` (the value '' drops a field)."""
    fields = {**GOOD_FIELDS, **changes}
    return "\n- " + "\n  ".join(f"{k}: {v}" for k, v in fields.items() if v != "") + "\n"


GOOD_ENTRY = _entry()


def test_user_catalog_resolves_local_paths_relative_to_the_file(tmp_path: Path) -> None:
    catalog = load_catalog(_write(tmp_path, "subdatasets:" + GOOD_ENTRY))
    assert catalog.get("my-slides").source["path"] == str(tmp_path / "slides")


ENTRY_1 = "entry 'my-slides' (#1): "


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_entry(kind="tma"), ENTRY_1 + "field 'kind': input should be 'wsi' or 'roi' (got 'tma')"),
        (_entry(source=""), ENTRY_1 + "field 'source': required field is missing"),
        (_entry(source="{type: ftp}"), ENTRY_1 + "field 'source': unknown source type 'ftp'"),
        (_entry(source="{type: local, paht: slides}"),
         ENTRY_1 + "field 'source.paht': unknown field; did you mean 'path'?\n"),
        (_entry(source="{type: local, path: slides, mdoe: copy}"),
         ENTRY_1 + "field 'source.mdoe': unknown field; did you mean 'mode'?"),
        (_entry(source="{type: http, files: [{url: 'https://h/a.zip', sha256: 'AB'}]}"),
         ENTRY_1 + "field 'source.files[0].sha256': 'AB' is not a hex digest"),
        (_entry(source="{type: gdc, project_id: TCGA-BRCA, token_env: \"GDC_TOKEN\\n\"}"),
         ENTRY_1 + "field 'source.token_env': 'GDC_TOKEN\\n' is not an environment variable "
         "name"),
        (_entry(kind="roi", scale="XXL"),
         ENTRY_1 + "field 'scale': input should be 'L', 'M' or 'S' (got 'XXL')"),
        (_entry(kind="roi"),
         ENTRY_1 + "field 'scale': ROI sub-datasets need 'scale' or 'scale_rules'"),
        (_entry(scale="M"), ENTRY_1 + "field 'scale': applies to ROI sub-datasets only"),
        (_entry(kind="roi", scale="M", wsi="{patterns: ['*.svs']}"),
         ENTRY_1 + "field 'wsi': applies to WSI sub-datasets only"),
        (_entry(key="My Slides"),
         "entry 'My Slides' (#1): field 'key': 'My Slides' must be lower-case letters, digits "
         "and '-'"),
        (_entry(key='"my-slides\\n"'),
         "entry 'my-slides\\n' (#1): field 'key': 'my-slides\\n' must be lower-case letters"),
        # Wrong types are refused, not coerced: YAML's '*.svs' is not a list of characters.
        (_entry(wsi="{patterns: '*.svs'}"),
         ENTRY_1 + "field 'wsi.patterns': should be a list (got '*.svs')"),
        (_entry(labelled="'no'"),
         ENTRY_1 + "field 'labelled': input should be a valid boolean (got 'no')"),
        (_entry(kind="roi", scale_rules="[{pattern: 40, scale: L}]"),
         ENTRY_1 + "field 'scale_rules[0].pattern': should be text (got 40)"),
        (_entry(kind="roi", scale_rules="[{pattern: '(?<!_anno)[.]bmp$', scale: L}]"),
         ENTRY_1 + "field 'scale_rules[0].pattern': '(?<!_anno)[.]bmp$' is not a supported "
         "regular expression (invalid perl operator: (?<!)"),
        (_entry(name="[My, slides]"),
         ENTRY_1 + "field 'name': should be text (got ['My', 'slides'])"),
        (_entry(organ="{a: b}"), ENTRY_1 + "field 'organ': should be text (got {'a': 'b'})"),
        (_entry(wsi="{mpp_overrides: {a.svs: '0.25'}}"),
         ENTRY_1 + "field 'wsi.mpp_overrides.a.svs': input should be a valid number (got '0.25')"),
        (_entry(published_counts="{M: 1.5}"),
         ENTRY_1 + "field 'published_counts.M': input should be a valid integer (got 1.5)"),
        # Unknown fields, at any depth, with a hint.
        (_entry(wsi="{mpp_overides: {a.svs: 0.25}}"),
         ENTRY_1 + "field 'wsi.mpp_overides': unknown field; did you mean 'mpp_overrides'?"),
        (_entry(descripton="x"),
         ENTRY_1 + "field 'descripton': unknown field; did you mean 'description'?"),
        (_entry(source="{type: local, path: [a, b]}"),
         ENTRY_1 + "field 'source.path': must be text, got ['a', 'b']"),
        ("things: []", "expected a top-level 'subdatasets:' list"),
        ("subdatasets: [", "line 2, column 1: not valid YAML: did not find expected node content"),
        ("subdatasets: []\nsubdatasets: []",
         "line 2, column 1: duplicate key 'subdatasets' (first at line 1)"),
        ("subdatasets:" + GOOD_ENTRY + "subdatset: []",
         "unknown top-level field 'subdatset'; did you mean 'subdatasets'?"),
        ("subdatasets:" + GOOD_ENTRY + "  kind: roi\n",
         "line 7, column 3: duplicate key 'kind' (first at line 4)"),
        ("subdatasets:" + GOOD_ENTRY + GOOD_ENTRY,
         "entry 'my-slides' (#2): field 'key': duplicate key 'my-slides' (entry #1 has it too)"),
        ("subdatasets:\n- just a string", "entry #1: should be a mapping (got 'just a string')"),
    ],
)  # fmt: skip
def test_bad_catalogs_are_rejected_naming_file_entry_and_field(
    tmp_path: Path, text: str, message: str
) -> None:
    text = text if text.startswith(("subdatasets", "things")) else "subdatasets:" + text
    path = _write(tmp_path, text)
    with pytest.raises(CatalogError) as error:
        load_catalog(path)
    assert str(error.value).startswith(f"{path}: {message}")


def test_every_problem_of_every_entry_is_reported_at_once(tmp_path: Path) -> None:
    text = "subdatasets:" + _entry(labelled="'yes'", organ="") + _entry(key="other", kind="x")
    path = _write(tmp_path, text)
    with pytest.raises(CatalogError) as error:
        load_catalog(path)
    assert str(error.value).splitlines() == [
        f"{path}: entry 'my-slides' (#1): field 'organ': required field is missing",
        f"{path}: entry 'my-slides' (#1): field 'labelled': input should be a valid boolean "
        "(got 'yes')",
        f"{path}: entry 'other' (#2): field 'kind': input should be 'wsi' or 'roi' (got 'x')",
    ]


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    data = ("subdatasets:" + GOOD_ENTRY).replace("My slides", "Lames \xe9").encode("latin-1")
    path.write_bytes(data)
    with pytest.raises(CatalogError) as error:
        load_catalog(path)
    assert str(error.value) == f"{path}: not UTF-8 text (byte 0xe9 at offset {data.index(0xE9)})"


def test_a_local_source_in_a_symlink_loop_is_named(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    path = _write(tmp_path, "subdatasets:" + _entry(source="{type: local, path: loop/slides}"))
    with pytest.raises(CatalogError) as error:
        load_catalog(path)
    assert str(error.value).startswith(
        f"{path}: entry 'my-slides' (#1): field 'source.path': cannot resolve 'loop/slides': "
    )


def test_a_catalog_is_parsed_once_per_version_of_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "subdatasets:" + GOOD_ENTRY)
    first = load_catalog(path)
    assert load_catalog(str(path)) is first  # same file, same size and time: no re-parse
    path.write_text("subdatasets:" + _entry(name="Renamed slides"))
    os.utime(path, ns=(1, 1))  # a new version even within the file system's time resolution
    assert load_catalog(path).get("my-slides").name == "Renamed slides"


@pytest.fixture
def yaml_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The catalog files parsed from YAML from now on (a cached catalog is not among them);
    the in-process cache is emptied first, as in a new process."""
    reads: list[Path] = []
    parse = catalog_loading._read_entries

    def recording_parse(path: Path) -> list[object]:
        reads.append(path)
        return parse(path)

    monkeypatch.setattr(catalog_loading, "_read_entries", recording_parse)
    catalog_loading._load.cache_clear()
    return reads


def test_ten_thousand_entries_load_through_the_cache_and_build_definitions(
    tmp_path: Path, yaml_reads: list[Path]
) -> None:
    """A large catalog loads (libyaml, one validation per entry), later processes read the
    validated entries back from the cache, and its definitions build."""
    entries = "".join(
        _entry(key=f"slides-{index:05d}", name=f"Slides {index}",
               source=f"{{type: local, path: slides/{index}}}")
        + f"  wsi: {{mpp_overrides: {{s{index}.svs: 0.25}}, patterns: ['*.svs']}}\n"
        for index in range(5_000)
    ) + "".join(
        _entry(key=f"rois-{index:05d}", name=f"ROIs {index}", kind="roi", scale="M",
               labelled="true", source="{type: manual, landing_page: 'https://example.org/rois'}")
        + "  scale_rules: [{pattern: '(?i)(^|/)40x/', scale: L}]\n"
        + "  labels: {from: regex, pattern: '^(?P<value>[a-z]+)/'}\n"
        + "  splits: {from: parent_folder, level: 2, map: {Training: train}}\n"
        for index in range(5_000)
    )  # fmt: skip
    path, cache = _write(tmp_path, "subdatasets:" + entries), tmp_path / "cache"
    parsed = load_catalog(path, cache_dir=cache)
    assert yaml_reads == [path] and len(list(cache.iterdir())) == 1

    catalog_loading._load.cache_clear()  # another process
    catalog = load_catalog(path, cache_dir=cache)
    assert yaml_reads == [path]  # not parsed again
    assert catalog.subdatasets == parsed.subdatasets
    assert len(catalog.keys) == 10_000
    assert catalog.get("slides-04999").source["path"] == str(tmp_path / "slides" / "4999")
    assert catalog.get("slides-04999").wsi.mpp_overrides == {"s4999.svs": 0.25}
    assert catalog.get("rois-00007").scale_for("a/40X/b.png") == "L"
    definitions = build_definitions(catalog, tmp_path / "data", workers=1)
    partitions = definitions.resolve_assets_def("scale_tiles").partitions_def
    assert partitions is not None
    assert partitions.get_partition_keys()[-1] == "rois-04999"
    assert len(partitions.get_partition_keys()) == 10_000


def _cache_file(cache: Path) -> Path:
    (file,) = cache.iterdir()
    return file


def test_a_changed_file_or_code_version_invalidates_the_cache(
    tmp_path: Path, yaml_reads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, cache = _write(tmp_path, "subdatasets:" + GOOD_ENTRY), tmp_path / "cache"
    load_catalog(path, cache_dir=cache)
    path.write_text("subdatasets:" + _entry(name="Renamed slides"))
    os.utime(path, ns=(1, 1))
    catalog_loading._load.cache_clear()
    assert load_catalog(path, cache_dir=cache).get("my-slides").name == "Renamed slides"
    assert b"Renamed slides" in _cache_file(cache).read_bytes()  # rewritten for the new version

    monkeypatch.setattr(catalog_cache, "_code_version", lambda: "another version of the code")
    catalog_loading._load.cache_clear()
    load_catalog(path, cache_dir=cache)
    assert yaml_reads == [path] * 3
    assert b"another version of the code" in _cache_file(cache).read_bytes()


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # cut short
        lambda data: b"\xff\xfe not json",
        lambda data: data.replace(b'"kind":"wsi"', b'"kind":"tiff"'),  # an entry made invalid
    ],
    ids=["truncated", "garbage", "invalid-entry"],
)
def test_a_damaged_cache_is_ignored_and_rewritten(
    tmp_path: Path, yaml_reads: list[Path], damage: Callable[[bytes], bytes]
) -> None:
    path, cache = _write(tmp_path, "subdatasets:" + GOOD_ENTRY), tmp_path / "cache"
    expected = load_catalog(path, cache_dir=cache)
    good = _cache_file(cache).read_bytes()
    _cache_file(cache).write_bytes(damage(good))
    catalog_loading._load.cache_clear()
    assert load_catalog(path, cache_dir=cache).subdatasets == expected.subdatasets
    assert yaml_reads == [path, path]
    assert _cache_file(cache).read_bytes() == good


def test_definitions_keep_the_catalog_cache_in_the_data_folder(
    tmp_path: Path, yaml_reads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CPIA_CATALOG", str(_write(tmp_path, "subdatasets:" + GOOD_ENTRY)))
    monkeypatch.setenv("CPIA_DATA_DIR", str(tmp_path / "data"))
    assert defs().resolve_assets_def("raw_download").partitions_def.get_partition_keys() == [
        "my-slides"
    ]
    cached = _cache_file(DataLayout(tmp_path / "data").catalog_cache_dir).read_bytes()
    assert b'"key":"my-slides"' in cached


def test_entries_json_cannot_hold_exactly_are_not_cached(
    tmp_path: Path, yaml_reads: list[Path]
) -> None:
    """A YAML date would come back from JSON as text: such a catalog is parsed every time."""
    path = _write(tmp_path, "subdatasets:" + _entry(
        source="{type: synthetic, recipe: wsi, slides: [], made: 2020-01-31}"))  # fmt: skip
    cache = tmp_path / "cache"
    assert repr(load_catalog(path, cache_dir=cache).get("my-slides").source["made"]) == (
        "datetime.date(2020, 1, 31)"
    )
    catalog_loading._load.cache_clear()
    load_catalog(path, cache_dir=cache)
    assert yaml_reads == [path, path] and not list(cache.glob("*.json"))
