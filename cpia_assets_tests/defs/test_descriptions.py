"""Every asset and asset-check description renders as Markdown the way it reads: paths and names
such as `cpia/{L,M,S}/<key>/<slide>-<size>-<x>-<y>.jpg` sit in code spans, because outside them
the UI reads `<key>` as an HTML tag and drops it."""

from __future__ import annotations

import dagster as dg
import pytest
from markdown_it import MarkdownIt

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.definitions import build_definitions


@pytest.fixture(scope="module")
def descriptions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    defs = build_definitions(load_catalog("demo"), tmp_path_factory.mktemp("data"))
    graph = defs.resolve_asset_graph()
    found = {
        key.to_user_string(): graph.get(key).description or "" for key in graph.get_all_asset_keys()
    }
    for checks in defs.assets or []:
        if isinstance(checks, dg.AssetChecksDefinition):
            for spec in checks.check_specs:
                found[f"{spec.asset_key.to_user_string()}:{spec.name}"] = spec.description or ""
    return found


def html_in_markdown(text: str) -> list[str]:
    """The raw HTML a CommonMark renderer would pass through (and a browser hide)."""
    found = []
    for token in MarkdownIt("commonmark").parse(text):
        if token.type == "html_block":
            found.append(token.content)
        for child in token.children or []:
            if child.type == "html_inline":
                found.append(child.content)
    return found


def test_the_check_finds_tags_outside_code_spans() -> None:
    assert html_in_markdown("saved as cpia/<key>/<slide>.jpg") == ["<key>", "<slide>"]
    assert html_in_markdown("saved as `cpia/<key>/<slide>.jpg`, image -> tile") == []


def test_descriptions_exist_for_every_asset_and_check(descriptions: dict[str, str]) -> None:
    assert {"raw_download", "tile_manifest", "training_shards"} <= set(descriptions)
    assert any(":" in name for name in descriptions)  # checks are covered too
    assert all(descriptions.values()), [name for name, text in descriptions.items() if not text]


def test_every_description_renders_without_html(descriptions: dict[str, str]) -> None:
    problems = {
        name: html_in_markdown(text)
        for name, text in descriptions.items()
        if html_in_markdown(text)
    }
    assert problems == {}
