"""The examples run as documented and do what they say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fanout_copy_example(tmp_path: Path) -> None:
    """examples/fanout_copy.py: every replica is byte-identical to the source."""
    src = tmp_path / "src.bin"
    data = os.urandom(3 * (1 << 20) + 12345)
    src.write_bytes(data)
    dsts = [tmp_path / f"r{i}" for i in range(3)]
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fanout_copy.py"), str(src), *map(str, dsts)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert f"copied {len(data)} bytes to 3 replicas" in p.stdout
    for d in dsts:
        assert d.read_bytes() == data


def test_nbd_block_device_example() -> None:
    """examples/nbd_block_device.py: a mirror served over NBD; both replicas match."""
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "nbd_block_device.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert "both replicas match" in p.stdout, p.stdout
