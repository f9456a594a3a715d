"""A kernel filesystem on the device: nbdfuse -> /dev/fuse -> loop device -> ext4.

Every command runs in a subprocess: the server shares this test's event loop, so the
test itself must never block on I/O that goes through it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil

import pytest

from aiofused_drivers.ublk.testing import missing_tools, run_client, serve, settle, short_tmpdir

pytestmark = pytest.mark.interop

MiB = 1 << 20


def _skip_reason() -> str | None:
    reason = missing_tools("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount")
    if reason:
        return reason
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing"
    if os.geteuid() != 0:
        return "mounting needs root"
    return None


_REASON = _skip_reason()


async def sh(script: str, timeout: float = 60) -> str:
    return (await run_client("sh", "-ec", script, timeout=timeout)).check().stdout


@pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["loop", "mirror"])
async def test_mkfs_ext4_mount_write_fsck(kind: str, ring_backend: str) -> None:
    with short_tmpdir() as d:
        imgs = []
        for i in range(2 if kind == "mirror" else 1):
            p = os.path.join(d, f"disk{i}.img")
            with open(p, "wb") as f:
                f.truncate(128 * MiB)
            imgs.append(p)
        spec = f"disk={kind}:{','.join(imgs)}"
        fuse_dir, fs_dir = os.path.join(d, "fuse"), os.path.join(d, "fs")
        os.mkdir(fuse_dir)
        os.mkdir(fs_dir)
        fuse_file = os.path.join(fuse_dir, "disk")
        async with serve(backend=ring_backend, exports=[spec]) as srv:
            nbdfuse = await asyncio.create_subprocess_exec(
                "nbdfuse",
                fuse_file,
                srv.uri("disk"),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            loopdev = ""
            mounted = False
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 15
                while not os.path.exists(fuse_file) and loop.time() < deadline:
                    assert nbdfuse.returncode is None, "nbdfuse exited early"
                    await asyncio.sleep(0.05)
                assert os.path.exists(fuse_file), "nbdfuse did not come up"
                await sh(f"mkfs.ext4 -q -F {fuse_file}")
                loopdev = (await sh(f"losetup -f --show {fuse_file}")).strip()
                await sh(f"mount {loopdev} {fs_dir}")
                mounted = True
                await sh(
                    f"head -c 3145728 /dev/urandom > {d}/payload && cp {d}/payload {fs_dir}/a.bin"
                    f" && mkdir {fs_dir}/dir && for i in $(seq 1 50); do echo file $i >"
                    f" {fs_dir}/dir/f$i.txt; done && sync"
                )
                await sh(f"umount {fs_dir}")
                mounted = False
                await sh(f"mount {loopdev} {fs_dir}")
                mounted = True
                await sh(
                    f"cmp {d}/payload {fs_dir}/a.bin && grep -q 'file 50' {fs_dir}/dir/f50.txt"
                )
                await sh(f"umount {fs_dir}")
                mounted = False
                out = await sh(f"e2fsck -f -n {loopdev}; echo rc=$?")
                assert out.strip().endswith("rc=0"), out
                await sh(f"losetup -d {loopdev}")
                loopdev = ""
            finally:
                if mounted:
                    await run_client("umount", "-l", fs_dir)
                if loopdev:
                    await run_client("losetup", "-d", loopdev)
                await run_client("fusermount3", "-u", fuse_dir)
                try:
                    await asyncio.wait_for(nbdfuse.wait(), 10)
                except TimeoutError:
                    nbdfuse.kill()
                    await nbdfuse.wait()
                assert nbdfuse.stderr is not None
                with contextlib.suppress(Exception):
                    await nbdfuse.stderr.read()
            assert await settle(srv.service) == {
                "buffers": 0,
                "lent": 0,
                "inflight": 0,
                "connections": 0,
            }
        if kind == "mirror":
            with open(imgs[0], "rb") as a, open(imgs[1], "rb") as b:
                assert a.read() == b.read()
        shutil.rmtree(fuse_dir, ignore_errors=True)
