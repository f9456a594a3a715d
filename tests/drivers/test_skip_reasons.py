"""The interop tests' skip reasons name the package that has the missing tool (issue 13,
item 8: fusermount3 is in fuse3, not in libnbd-bin, qemu-utils or fio)."""

from __future__ import annotations

import shutil

import pytest

from aiofused_drivers.ublk.testing import missing_tools


@pytest.mark.parametrize(
    ("tool", "package"),
    [
        ("fusermount3", "fuse3"),
        ("nbdfuse", "libnbd-bin"),
        ("mkfs.ext4", "e2fsprogs"),
        ("qemu-img", "qemu-utils"),
        ("nbdkit", "nbdkit"),
        ("losetup", "mount"),
    ],
)
def test_the_reason_names_the_package(
    tool: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None if name == tool else f"/usr/bin/{name}")
    assert missing_tools("nbdinfo", tool) == f"not installed: {tool} (apt-get install {package})"


def test_one_package_named_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert missing_tools("fusermount3", "nbdinfo", "nbdfuse") == (
        "not installed: fusermount3, nbdinfo, nbdfuse (apt-get install fuse3 libnbd-bin)"
    )
    monkeypatch.undo()
    assert missing_tools("sh") is None
