"""Real small file systems (tmpfs) for disk-full tests; the test is skipped where mount is not
permitted (not root, or a container without CAP_SYS_ADMIN)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """`folder` as a fresh tmpfs of `size` (e.g. "256k"), unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill up: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def resize(folder: Path, size: str) -> None:
    """Give a mounted tmpfs more (or less) room; its files stay."""
    resized = _mount("-o", f"remount,size={size}", str(folder))
    assert resized.returncode == 0, resized.stderr
