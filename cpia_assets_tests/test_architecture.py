"""The package's shape: the core's stage packages import only earlier stages and the shared
plumbing, the core never imports Dagster, the Dagster shell mirrors the stages, and no module
grows past the size a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cpia_assets_tests.support.paths import REPO

PACKAGE = REPO / "cpia_assets"
CORE = PACKAGE / "core"
STAGE_ORDER = {"catalog": 0, "downloads": 1, "wsi": 2, "roi": 2, "manifest": 3, "training": 4}
"""Pipeline order; wsi and roi are parallel branches and do not import each other."""
ASSET_MODULE_STAGE = {
    "downloads": "downloads",
    "standardize": "roi",  # standardized_wsi runs both branches: it may import wsi and roi
    "tiles": "wsi",
    "manifest": "manifest",
    "training": "training",
    "ssl": "training",
}
MAX_MODULE_LINES = 520


def _modules(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (lazy imports in functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _core_stage(module: str) -> str | None:
    """The stage package of a `cpia_assets.core...` module name; None for the plumbing."""
    parts = module.split(".")
    if parts[:2] != ["cpia_assets", "core"] or len(parts) < 3:
        return None
    return parts[2] if parts[2] in STAGE_ORDER else None


def _core_modules() -> list[tuple[Path, str | None]]:
    return [(path, _core_stage("cpia_assets.core." + path.relative_to(CORE).parts[0]))
            for path in _modules(CORE)]  # fmt: skip


def test_stages_import_only_earlier_stages_and_the_plumbing() -> None:
    wrong = []
    for path, own in _core_modules():
        for module in _imported(path):
            target = _core_stage(module)
            if target is None or target == own:
                continue
            if own is None or STAGE_ORDER[target] >= STAGE_ORDER[own]:
                wrong.append(f"{path.relative_to(PACKAGE)} ({own or 'plumbing'}) imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_core_never_imports_dagster() -> None:
    wrong = [
        f"{path.relative_to(PACKAGE)}: {module}"
        for path, _ in _core_modules()
        for module in _imported(path)
        if module.split(".")[0] == "dagster" or module.startswith("dagster_")
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("asset_module", sorted(ASSET_MODULE_STAGE))
def test_each_asset_module_uses_its_stage_and_earlier_ones(asset_module: str) -> None:
    own = STAGE_ORDER[ASSET_MODULE_STAGE[asset_module]]
    path = PACKAGE / "defs" / "assets" / f"{asset_module}.py"
    later = sorted(
        module
        for module in _imported(path)
        if (stage := _core_stage(module)) is not None and STAGE_ORDER[stage] > own
    )
    assert not later, f"{path.name} imports later stages: {later}"


def test_every_asset_module_is_mapped_to_a_stage() -> None:
    found = {path.stem for path in (PACKAGE / "defs" / "assets").glob("*.py")} - {"__init__"}
    assert found == set(ASSET_MODULE_STAGE)


def test_every_stage_package_says_what_it_takes_and_gives() -> None:
    for stage in STAGE_ORDER:
        docstring = ast.get_docstring(ast.parse((CORE / stage / "__init__.py").read_text()))
        assert docstring and "takes" in docstring and "gives" in docstring, stage


def test_no_module_is_over_the_size_a_reader_can_hold() -> None:
    sizes = {path: len(path.read_text().splitlines()) for path in _modules(PACKAGE)}
    large = {str(path.relative_to(PACKAGE)): n for path, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not large, f"split these along their seams: {large}"
