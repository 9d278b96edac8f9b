"""The config file watcher: in-place edits and Kubernetes-style symlink swaps are seen."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from shadowproxy.configwatch import ConfigWatcher


async def _watch(path: Path, changes: list[int], action: object) -> None:
    async def changed() -> None:
        changes.append(1)

    watcher = ConfigWatcher(path, changed, interval_s=0.02)
    task = asyncio.get_running_loop().create_task(watcher.run())
    try:
        await asyncio.sleep(0.1)
        assert callable(action)
        action()
        for _ in range(100):
            if changes:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # and no second report for the same content
    finally:
        task.cancel()


async def test_an_edit_in_place_is_seen_once(tmp_path: Path) -> None:
    """A bind-mounted file rewritten in place (same inode) is reported once."""
    path = tmp_path / "shadowproxy.yaml"
    path.write_text("a: 1\n")
    inode = path.stat().st_ino
    changes: list[int] = []

    def edit() -> None:
        with path.open("r+") as f:
            f.write("a: 2\n")

    await _watch(path, changes, edit)
    assert path.stat().st_ino == inode
    assert changes == [1]


async def test_a_configmap_symlink_swap_is_seen(tmp_path: Path) -> None:
    """A ConfigMap update (the ..data symlink swapped to a new folder) is reported."""
    first, second = tmp_path / "..2026_12_01", tmp_path / "..2026_12_02"
    first.mkdir()
    second.mkdir()
    (first / "shadowproxy.yaml").write_text("a: 1\n")
    (second / "shadowproxy.yaml").write_text("a: 2\n")
    (tmp_path / "..data").symlink_to(first.name)
    path = tmp_path / "shadowproxy.yaml"
    path.symlink_to("..data/shadowproxy.yaml")
    changes: list[int] = []

    def swap() -> None:
        tmp = tmp_path / "..data_tmp"
        tmp.symlink_to(second.name)
        os.replace(tmp, tmp_path / "..data")  # atomic, as the kubelet does

    await _watch(path, changes, swap)
    assert changes == [1]


async def test_a_touch_without_new_content_is_not_a_change(tmp_path: Path) -> None:
    """Rewriting the same bytes (or touching the file) reloads nothing."""
    path = tmp_path / "shadowproxy.yaml"
    path.write_text("a: 1\n")
    changes: list[int] = []
    await _watch(path, changes, lambda: path.write_text("a: 1\n"))
    assert changes == []


async def test_a_file_missing_for_a_moment_is_not_a_change(tmp_path: Path) -> None:
    """A file removed and written back with the same content is not reported."""
    path = tmp_path / "shadowproxy.yaml"
    path.write_text("a: 1\n")
    changes: list[int] = []

    def remove() -> None:
        path.unlink()

    await _watch(path, changes, remove)
    path.write_text("a: 1\n")
    assert changes == []


async def test_a_file_caught_empty_is_not_a_change(tmp_path: Path) -> None:
    """A file left empty for a while by an in-place rewrite (truncated, not yet written) is
    not offered for a reload; the content written after it is."""
    path = tmp_path / "shadowproxy.yaml"
    path.write_text("a: 1\n")
    changes: list[int] = []

    def truncate() -> None:
        path.write_text("")

    await _watch(path, changes, truncate)
    assert changes == []


async def test_a_file_that_stays_missing_or_empty_is_said_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file removed (a ConfigMap key renamed), or left empty, for longer than a poll is
    said in the log once, with the reason, and so is its return; the running
    configuration stays and nothing is reported as a change."""
    path = tmp_path / "shadowproxy.yaml"
    path.write_text("a: 1\n")
    changes: list[int] = []
    caplog.set_level(logging.INFO, logger="shadowproxy")

    async def changed() -> None:
        changes.append(1)

    watcher = ConfigWatcher(path, changed, interval_s=0.02)
    task = asyncio.get_running_loop().create_task(watcher.run())
    try:
        path.unlink()
        await asyncio.sleep(0.3)
        path.write_text("")
        await asyncio.sleep(0.3)
        path.write_text("a: 1\n")
        await asyncio.sleep(0.3)
    finally:
        task.cancel()
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        f"config file {path} cannot be read (No such file or directory): the running "
        "configuration stays; the file is read again every 0.02 s",
        f"config file {path} is empty (taken for a file being rewritten): the running "
        "configuration stays; the file is read again every 0.02 s",
        f"config file {path} can be read again"]
    assert changes == []
