"""The kernel io_uring backend, driven directly on a running loop.

Real files in ``tmp_path`` and real socketpairs; every test is skipped with the
probe's reason where the kernel refuses io_uring.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import mmap
import os
import platform
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from aiofused._abi import CqeFlag, Op
from aiofused._abi import uring as abi
from aiofused._errors import BackendUnavailable
from aiofused.backends import _uring as uring
from aiofused.backends._base import BackendOp, IoOp, select_backend
from aiofused.backends._uring import UringBackend

WAIT = 10.0  # seconds: upper bound of every wait in this file


def _require_uring() -> None:
    probe = UringBackend.probe()
    if not probe.available:
        pytest.skip(probe.reason)


class Done:
    """A completion callback that records ``(res, flags)`` and resolves when final."""

    def __init__(self, loop: asyncio.AbstractEventLoop, final: int = 1) -> None:
        self.results: list[tuple[int, int]] = []
        self.fut: asyncio.Future[list[tuple[int, int]]] = loop.create_future()
        self.final = final
        self.in_call = False  # set by tests around start()/cancel() to catch sync calls
        self.sync_calls = 0

    def __call__(self, res: int, flags: int) -> None:
        if self.in_call:
            self.sync_calls += 1
        self.results.append((res, flags))
        if len(self.results) >= self.final and not self.fut.done():
            self.fut.set_result(self.results)

    async def wait(self) -> list[tuple[int, int]]:
        return await asyncio.wait_for(asyncio.shield(self.fut), WAIT)

    @property
    def res(self) -> int:
        return self.results[0][0]


class CancelResult:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.fut: asyncio.Future[int] = loop.create_future()

    def __call__(self, res: int) -> None:
        self.fut.set_result(res)

    async def wait(self) -> int:
        return await asyncio.wait_for(asyncio.shield(self.fut), WAIT)


def start(b: UringBackend, op: IoOp, done: Done) -> BackendOp:
    done.in_call = True
    try:
        return b.start(op, done)
    finally:
        done.in_call = False


async def run(b: UringBackend, op: IoOp) -> list[tuple[int, int]]:
    done = Done(b.loop, final=2 if op.opcode == Op.SEND_ZC else 1)
    start(b, op, done)
    results = await done.wait()
    assert done.sync_calls == 0
    return results


async def tick(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def until(pred: object, what: str) -> None:
    assert callable(pred)
    for _ in range(int(WAIT / 0.005)):
        if pred():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = b""
    while len(got) < n:
        chunk = await loop.sock_recv(sock, n - len(got))
        if not chunk:
            break
        got += chunk
    return got


@pytest.fixture
async def backend() -> AsyncIterator[UringBackend]:
    _require_uring()
    b = UringBackend(asyncio.get_running_loop())
    try:
        yield b
    finally:
        await b.aclose()
    assert b.in_flight() == 0
    assert b not in uring._OPEN


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    uring.reset_probe_cache()
    yield
    uring.reset_probe_cache()


# ---- probe and selection ---------------------------------------------------------------


def test_probe_finds_the_ops_and_is_cached() -> None:
    _require_uring()
    probe = UringBackend.probe()
    assert probe.name == "uring"
    assert probe.reason == ""
    assert {Op.READ, Op.WRITE, Op.SEND, Op.RECV, Op.FSYNC} <= probe.ops
    assert probe.ops <= uring.IMPLEMENTED_OPS
    assert UringBackend.probe() is probe


@pytest.mark.parametrize(
    ("code", "name"), [(errno.EPERM, "EPERM"), (errno.ENOSYS, "ENOSYS"), (errno.EACCES, "EACCES")]
)
async def test_probe_reports_refused_setup(
    monkeypatch: pytest.MonkeyPatch, fresh_probe: None, code: int, name: str
) -> None:
    def refuse(entries: int, params: abi.io_uring_params) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(uring, "setup_syscall", refuse)
    probe = UringBackend.probe()
    assert not probe.available
    assert name in probe.reason
    assert probe.ops == frozenset()
    loop = asyncio.get_running_loop()
    with pytest.raises(BackendUnavailable) as info:
        UringBackend(loop)
    assert name in info.value.reason
    with pytest.raises(BackendUnavailable):
        select_backend("uring", loop)


def test_probe_honours_the_sysctl(
    monkeypatch: pytest.MonkeyPatch, fresh_probe: None, tmp_path: Path
) -> None:
    sysctl = tmp_path / "io_uring_disabled"
    sysctl.write_text("2\n")
    monkeypatch.setattr(uring, "IO_URING_DISABLED_PATH", str(sysctl))
    calls: list[int] = []

    def setup(entries: int, params: abi.io_uring_params) -> int:
        calls.append(entries)
        raise AssertionError("setup must not be tried when the sysctl says 2")

    monkeypatch.setattr(uring, "setup_syscall", setup)
    probe = UringBackend.probe()
    assert not probe.available
    assert "io_uring_disabled=2" in probe.reason
    assert calls == []


def test_probe_refuses_other_architectures(
    monkeypatch: pytest.MonkeyPatch, fresh_probe: None
) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    probe = UringBackend.probe()
    assert not probe.available
    assert "aarch64" in probe.reason


# ---- plain ops ---------------------------------------------------------------------------


async def test_write_fsync_read(backend: UringBackend, data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    payload = b"uring says hello"
    assert await run(backend, IoOp(Op.WRITE, fd, memoryview(payload), len(payload), 100)) == [
        (len(payload), 0)
    ]
    assert await run(backend, IoOp(Op.FSYNC, fd)) == [(0, 0)]
    buf = bytearray(200)
    assert await run(backend, IoOp(Op.READ, fd, memoryview(buf), 200, 0)) == [(200, 0)]
    assert bytes(buf) == data[:100] + payload + data[100 + len(payload) : 200]


async def test_read_nbytes_and_eof(backend: UringBackend, data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    buf = bytearray(64)
    # nbytes smaller than the buffer: only that much is read.
    assert await run(backend, IoOp(Op.READ, fd, memoryview(buf), 10, 5)) == [(10, 0)]
    assert bytes(buf[:10]) == data[5:15]
    assert buf[10:] == bytearray(54)
    # Short read at the end, then EOF.
    assert await run(backend, IoOp(Op.READ, fd, memoryview(buf), 64, len(data) - 8)) == [(8, 0)]
    assert await run(backend, IoOp(Op.READ, fd, memoryview(buf), 64, len(data))) == [(0, 0)]


async def test_read_at_current_position(
    backend: UringBackend, data_file: tuple[int, bytes]
) -> None:
    fd, data = data_file
    os.lseek(fd, 1000, os.SEEK_SET)
    buf = bytearray(16)
    assert await run(backend, IoOp(Op.READ, fd, memoryview(buf), 16, -1)) == [(16, 0)]
    assert bytes(buf) == data[1000:1016]
    assert os.lseek(fd, 0, os.SEEK_CUR) == 1016


async def test_errors_come_back_as_res(backend: UringBackend, tmp_path: Path) -> None:
    # A read into a read-only view: -EFAULT, without reaching the kernel.
    assert await run(backend, IoOp(Op.READ, 0, memoryview(b"abc"), 3, 0)) == [(-errno.EFAULT, 0)]
    # A bad fd: the kernel says -EBADF.
    buf = bytearray(8)
    assert await run(backend, IoOp(Op.READ, 2**30, memoryview(buf), 8, 0)) == [(-errno.EBADF, 0)]
    # An op this backend does not run: -EINVAL.
    assert await run(backend, IoOp(Op.NOP, -1)) == [(-errno.EINVAL, 0)]
    # Writing to a file opened read-only.
    path = tmp_path / "ro"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert await run(backend, IoOp(Op.WRITE, fd, memoryview(b"y"), 1, 0)) == [(-errno.EBADF, 0)]
    finally:
        os.close(fd)


async def test_send_recv(
    backend: UringBackend, sockpair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = sockpair
    buf = bytearray(32)
    done = Done(backend.loop)
    start(backend, IoOp(Op.RECV, b.fileno(), memoryview(buf), 32, file=b), done)
    await tick()
    assert done.results == []  # parked in the kernel: no data yet
    # SRC views are read-only memoryviews.
    msg = memoryview(bytearray(b"ping over io_uring")).toreadonly()
    assert await run(backend, IoOp(Op.SEND, a.fileno(), msg, len(msg), file=a)) == [(18, 0)]
    assert await done.wait() == [(18, 0)]
    assert bytes(buf[:18]) == b"ping over io_uring"
    # RECV after the peer closed: EOF is res 0.
    a.shutdown(socket.SHUT_WR)
    assert await run(backend, IoOp(Op.RECV, b.fileno(), memoryview(buf), 32)) == [(0, 0)]


async def test_send_zc_posts_result_then_notif(
    backend: UringBackend, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = tcp_pair
    payload = os.urandom(20000)
    mv = memoryview(bytearray(payload)).toreadonly()
    # On loopback the notification may wait until the receiver has consumed the data.
    reader = asyncio.ensure_future(read_exactly(b, len(payload)))
    results = await run(backend, IoOp(Op.SEND_ZC, a.fileno(), mv, len(payload), file=a))
    assert results == [(len(payload), int(CqeFlag.MORE)), (0, int(CqeFlag.NOTIF))]
    assert await asyncio.wait_for(reader, WAIT) == payload


async def test_send_zc_on_a_socket_without_zero_copy(
    backend: UringBackend, sockpair: tuple[socket.socket, socket.socket]
) -> None:
    # AF_UNIX has no zero copy: same CQEs as on TCP (the backend sends by copy).
    a, b = sockpair
    mv = memoryview(b"zero copy or not").toreadonly()
    results = await run(backend, IoOp(Op.SEND_ZC, a.fileno(), mv, len(mv), file=a))
    assert results == [(len(mv), int(CqeFlag.MORE)), (0, int(CqeFlag.NOTIF))]
    assert b.recv(100) == b"zero copy or not"


async def test_send_zc_holds_the_buffer_until_the_notif(
    backend: UringBackend, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    a, _ = tcp_pair
    ba = bytearray(b"z" * 4096)
    seen: list[tuple[int, int, bool]] = []

    def complete(res: int, flags: int) -> None:
        try:
            ba.extend(b"!")
            resized = True
        except BufferError:
            resized = False
        seen.append((res, flags, resized))

    mv = memoryview(ba).toreadonly()
    reader = asyncio.ensure_future(read_exactly(tcp_pair[1], 4096))
    backend.start(IoOp(Op.SEND_ZC, a.fileno(), mv, 4096, file=a), complete)
    del mv
    await until(lambda: len(seen) == 2, "both SEND_ZC completions")
    assert await asyncio.wait_for(reader, WAIT) == b"z" * 4096
    # Pinned at the result CQE (MORE), released by the notification.
    assert seen == [(4096, int(CqeFlag.MORE), False), (0, int(CqeFlag.NOTIF), True)]


async def test_fixed_buffers(backend: UringBackend, data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    pool = mmap.mmap(-1, 2 * 4096)
    views = [memoryview(pool)[0:4096], memoryview(pool)[4096:8192]]
    try:
        if not backend.register_buffers(views):
            pytest.skip("the kernel refused IORING_REGISTER_BUFFERS (memlock)")
        # Registered memory cannot be unmapped while registered.
        with pytest.raises(BufferError):
            pool.close()
        dst = views[1][100:1100]
        assert await run(backend, IoOp(Op.READ_FIXED, fd, dst, 1000, 300, buf_index=1)) == [
            (1000, 0)
        ]
        assert bytes(dst) == data[300:1300]
        views[0][:5] = b"fixed"
        src = views[0][:5]
        assert await run(backend, IoOp(Op.WRITE_FIXED, fd, src, 5, 0, buf_index=0)) == [(5, 0)]
        assert os.pread(fd, 5, 0) == b"fixed"
        # A view outside the registered buffer it names: the kernel refuses it.
        stray = memoryview(bytearray(16))
        assert await run(backend, IoOp(Op.READ_FIXED, fd, stray, 16, 0, buf_index=0)) == [
            (-errno.EFAULT, 0)
        ]
    finally:
        await backend.aclose()
        dst = src = None  # type: ignore[assignment]
        for v in views:
            v.release()
        pool.close()  # unregistered at close: the exports are gone


# ---- batching and wake-ups -------------------------------------------------------------


async def test_a_burst_costs_one_io_uring_enter(
    backend: UringBackend, data_file: tuple[int, bytes]
) -> None:
    fd, data = data_file
    before_enter = backend.enter_calls
    before_wake = backend.eventfd_wakeups
    bufs = [bytearray(512) for _ in range(64)]
    dones = [Done(backend.loop) for _ in bufs]
    for i, (buf, done) in enumerate(zip(bufs, dones, strict=True)):
        start(backend, IoOp(Op.READ, fd, memoryview(buf), 512, i * 512), done)
    assert backend.enter_calls == before_enter  # nothing submitted synchronously
    for done in dones:
        assert await done.wait() == [(512, 0)]
        assert done.sync_calls == 0
    assert backend.enter_calls == before_enter + 1
    assert b"".join(bufs) == data[: 64 * 512]
    # Cached reads complete inside our own io_uring_enter, with the eventfd disabled.
    await tick()
    assert backend.eventfd_wakeups == before_wake


async def test_completion_from_the_peer_wakes_the_loop(
    backend: UringBackend, sockpair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = sockpair
    buf = bytearray(8)
    done = Done(backend.loop)
    start(backend, IoOp(Op.RECV, b.fileno(), memoryview(buf), 8), done)
    await tick()
    before = backend.eventfd_wakeups
    # The peer writes from another thread: only the eventfd can tell the loop.
    await asyncio.to_thread(a.send, b"wake up!")
    assert await done.wait() == [(8, 0)]
    assert backend.eventfd_wakeups > before
    assert backend.watchdog_reaps == 0


# ---- cancellation and buffer pinning (SPEC F13) -------------------------------------------


async def test_cancel_parked_recv_keeps_the_buffer_pinned(
    backend: UringBackend, sockpair: tuple[socket.socket, socket.socket]
) -> None:
    _, b = sockpair
    ba = bytearray(64)
    done = Done(backend.loop)
    handle = start(backend, IoOp(Op.RECV, b.fileno(), memoryview(ba), 64, file=b), done)
    # Drop every reference the test holds except the bytearray, and collect.
    await tick()
    gc.collect()
    assert done.results == []
    with pytest.raises(BufferError):
        ba.extend(b"x")  # the kernel may write it: it cannot move
    cancelled = CancelResult(backend.loop)
    done.in_call = True
    backend.cancel(handle, cancelled)
    done.in_call = False
    with pytest.raises(BufferError):
        ba.extend(b"x")  # cancel requested, CQE not reaped yet: still pinned
    assert await cancelled.wait() == 0
    assert await done.wait() == [(-errno.ECANCELED, 0)]
    assert done.sync_calls == 0
    ba.extend(b"x")  # CQE reaped: the backend has let go
    assert len(ba) == 65
    assert backend.in_flight() == 0


@pytest.mark.parametrize("readonly", [False, True])
async def test_releasing_the_callers_view_does_not_unpin(
    backend: UringBackend, sockpair: tuple[socket.socket, socket.socket], readonly: bool
) -> None:
    a, b = sockpair
    ba = bytearray(b"0123456789abcdef")
    mv = memoryview(ba)
    done = Done(backend.loop)
    if readonly:
        view = mv.toreadonly()
        op = IoOp(Op.SEND, a.fileno(), view, 16)
    else:
        view = mv
        op = IoOp(Op.RECV, b.fileno(), view, 16)
    start(backend, op, done)
    await tick()
    # Whatever the caller does with its views, the memory the kernel was given stays.
    with contextlib.suppress(BufferError):
        view.release()
    with contextlib.suppress(BufferError):
        mv.release()
    del op, view, mv
    gc.collect()
    if not readonly:
        with pytest.raises(BufferError):
            ba.extend(b"x")
        a.send(b"done")
        assert await done.wait() == [(4, 0)]
        assert ba[:4] == b"done"
    else:
        assert await done.wait() == [(16, 0)]
        assert b.recv(16) == b"0123456789abcdef"
    ba.extend(b"resizable")  # the final CQE released every export


async def test_cancel_results(
    backend: UringBackend,
    data_file: tuple[int, bytes],
    sockpair: tuple[socket.socket, socket.socket],
) -> None:
    fd, _ = data_file
    buf = bytearray(16)
    done = Done(backend.loop)
    handle = start(backend, IoOp(Op.READ, fd, memoryview(buf), 16, 0), done)
    await done.wait()
    # Already done: -ENOENT, reported later, not synchronously.
    cancelled = CancelResult(backend.loop)
    backend.cancel(handle, cancelled)
    assert not cancelled.fut.done()
    assert await cancelled.wait() == -errno.ENOENT
    # A cancel issued in the same tick as the op: the kernel sees the op first.
    _, b = sockpair
    done2 = Done(backend.loop)
    h2 = start(backend, IoOp(Op.RECV, b.fileno(), memoryview(buf), 16), done2)
    c2 = CancelResult(backend.loop)
    backend.cancel(h2, c2)
    assert await c2.wait() == 0
    assert await done2.wait() == [(-errno.ECANCELED, 0)]


async def test_cancel_of_an_op_still_in_the_backlog(
    sockpair: tuple[socket.socket, socket.socket],
) -> None:
    _require_uring()
    b = UringBackend(asyncio.get_running_loop(), sq_entries=2)
    try:
        _, s = sockpair
        bufs = [bytearray(4) for _ in range(4)]
        dones = [Done(b.loop) for _ in bufs]
        handles = [
            start(b, IoOp(Op.RECV, s.fileno(), memoryview(x), 4), d)
            for x, d in zip(bufs, dones, strict=True)
        ]
        # The SQ holds 2: the last one never reached the kernel.
        c = CancelResult(b.loop)
        b.cancel(handles[3], c)
        assert await c.wait() == 0
        assert await dones[3].wait() == [(-errno.ECANCELED, 0)]
        bufs[3].extend(b"free")  # never pinned by the kernel, released
        assert b.in_flight() == 3
    finally:
        await b.aclose()
    assert [d.results for d in dones[:3]] == [[(-errno.ECANCELED, 0)]] * 3


# ---- overflow, retries, scale -------------------------------------------------------------


async def test_tiny_cq_overflow_loses_nothing() -> None:
    _require_uring()
    b = UringBackend(asyncio.get_running_loop(), sq_entries=4, cq_entries=4)
    pairs = [socket.socketpair() for _ in range(32)]
    try:
        assert b.cq_entries <= 8
        bufs = [bytearray(8) for _ in pairs]
        dones = [Done(b.loop) for _ in pairs]
        for (_, r), buf, done in zip(pairs, bufs, dones, strict=True):
            start(b, IoOp(Op.RECV, r.fileno(), memoryview(buf), 8), done)
        await until(lambda: b._sq_free == b.sq_entries and not b._backlog, "all RECVs armed")
        # 32 completions, with nobody reaping, into a CQ of 4: the rest overflow.
        for i, (w, _) in enumerate(pairs):
            w.send(b"%08d" % i)
        results = [await d.wait() for d in dones]
        assert results == [[(8, 0)]] * 32
        assert [bytes(x) for x in bufs] == [b"%08d" % i for i in range(32)]
        assert b.overflow_flushes >= 1
        assert b.in_flight() == 0
    finally:
        await b.aclose()
        for w, r in pairs:
            w.close()
            r.close()


@pytest.mark.parametrize("err", [errno.EINTR, errno.EAGAIN, errno.EBUSY])
async def test_transient_enter_errors_are_retried(
    backend: UringBackend,
    data_file: tuple[int, bytes],
    monkeypatch: pytest.MonkeyPatch,
    err: int,
) -> None:
    fd, data = data_file
    real = abi.io_uring_enter_raw
    failures = [3]

    def flaky(ring_fd: int, to_submit: int, min_complete: int, flags: int) -> int:
        if to_submit and failures[0]:
            failures[0] -= 1
            return -err
        return real(ring_fd, to_submit, min_complete, flags)

    monkeypatch.setattr(abi, "io_uring_enter_raw", flaky)
    buf = bytearray(32)
    assert await run(backend, IoOp(Op.READ, fd, memoryview(buf), 32, 64)) == [(32, 0)]
    assert bytes(buf) == data[64:96]
    assert failures == [0]


async def test_hard_enter_error_fails_the_unsubmitted_ops(
    backend: UringBackend, data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, _ = data_file
    real = abi.io_uring_enter_raw
    monkeypatch.setattr(abi, "io_uring_enter_raw", lambda *a: -errno.EFAULT)
    ba = bytearray(32)
    assert await run(backend, IoOp(Op.READ, fd, memoryview(ba), 32, 0)) == [(-errno.EFAULT, 0)]
    ba.extend(b"unpinned")
    monkeypatch.setattr(abi, "io_uring_enter_raw", real)
    # The ring still works afterwards.
    assert await run(backend, IoOp(Op.READ, fd, memoryview(ba), 32, 0)) == [(32, 0)]


async def test_ten_thousand_mixed_ops_leave_nothing_behind(
    backend: UringBackend, tmp_path: Path
) -> None:
    loop = backend.loop
    path = tmp_path / "mixed.bin"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDWR)
    pairs = [socket.socketpair() for _ in range(50)]
    try:
        bufs: list[bytearray] = []
        dones: list[Done] = []
        kinds: list[Op] = []
        recv_bytes = 0
        owed = [0] * len(pairs)  # bytes each pair's receiver still waits for

        def add(op: IoOp, buf: bytearray) -> None:
            done = Done(loop, final=2 if op.opcode == Op.SEND_ZC else 1)
            bufs.append(buf)
            dones.append(done)
            kinds.append(op.opcode)
            start(backend, op, done)

        for i in range(10_000):
            k = i % 10
            p = (i // 10) % len(pairs)
            w, r = pairs[p]
            if k < 4:
                buf = bytearray(512)
                add(IoOp(Op.READ, fd, memoryview(buf), 512, (i * 4096) % (1 << 20)), buf)
            elif k < 6:
                buf = bytearray(b"%0512d" % i)
                add(
                    IoOp(Op.WRITE, fd, memoryview(buf).toreadonly(), 512, (i * 512) % (1 << 20)),
                    buf,
                )
            elif k < 8:
                buf = bytearray(16)
                add(IoOp(Op.RECV, r.fileno(), memoryview(buf), 16), buf)
                recv_bytes += 16
                owed[p] += 16
            elif k == 8:
                buf = bytearray(b"s" * 16)
                opcode = Op.SEND_ZC if i % 20 == 8 else Op.SEND
                add(IoOp(opcode, w.fileno(), memoryview(buf).toreadonly(), 16), buf)
                owed[p] -= 16
            else:
                add(IoOp(Op.FSYNC, fd), bytearray())
        # Every RECV needs 16 bytes: top the senders up to what the receivers want.
        for p, (w, _) in enumerate(pairs):
            for _ in range(owed[p] // 16):
                buf = bytearray(b"t" * 16)
                add(IoOp(Op.SEND, w.fileno(), memoryview(buf).toreadonly(), 16), buf)
        assert backend.in_flight() == len(dones) >= 10_000
        gc.collect()
        results = await asyncio.wait_for(asyncio.gather(*(d.wait() for d in dones)), 60)
        for kind, res in zip(kinds, results, strict=True):
            if kind == Op.SEND_ZC:
                assert res == [(16, int(CqeFlag.MORE)), (0, int(CqeFlag.NOTIF))]
            elif kind == Op.FSYNC:
                assert res == [(0, 0)]
            elif kind == Op.RECV:
                assert res[0][0] > 0
            else:
                assert res[0][0] in (512, 16)
        assert sum(r[0][0] for k, r in zip(kinds, results, strict=True) if k == Op.RECV) == (
            recv_bytes
        )
        assert backend.in_flight() == 0
        assert not backend._inflight
        for buf in bufs:
            buf.extend(b"!")  # nothing is pinned any more
    finally:
        os.close(fd)
        for w, r in pairs:
            w.close()
            r.close()


# ---- close --------------------------------------------------------------------------------


async def test_aclose_cancels_in_kernel_work_and_waits(
    data_file: tuple[int, bytes], sockpair: tuple[socket.socket, socket.socket]
) -> None:
    _require_uring()
    b = UringBackend(asyncio.get_running_loop())
    fd, _ = data_file
    _, s = sockpair
    recv_bufs = [bytearray(8) for _ in range(8)]
    recvs = [Done(b.loop) for _ in recv_bufs]
    for buf, done in zip(recv_bufs, recvs, strict=True):
        start(b, IoOp(Op.RECV, s.fileno(), memoryview(buf), 8), done)
    await tick()
    read_buf = bytearray(100)
    read = Done(b.loop)
    start(b, IoOp(Op.READ, fd, memoryview(read_buf), 100, 0), read)  # not yet submitted
    ring_fd, efd = b._fd, b._efd
    assert b in uring._OPEN
    await asyncio.wait_for(b.aclose(), WAIT)
    assert [d.results for d in recvs] == [[(-errno.ECANCELED, 0)]] * 8
    assert len(read.results) == 1
    assert read.results[0] in ((100, 0), (-errno.ECANCELED, 0))
    assert b.in_flight() == 0
    assert b not in uring._OPEN
    for buf in (*recv_bufs, read_buf):
        buf.extend(b"free")
    for closed in (ring_fd, efd):
        with pytest.raises(OSError):
            os.fstat(closed)
    with pytest.raises(RuntimeError):
        b.start(IoOp(Op.READ, fd, memoryview(bytearray(1)), 1, 0), Done(b.loop))
    await b.aclose()  # idempotent


async def test_backend_cannot_be_collected_while_open() -> None:
    _require_uring()
    b = UringBackend(asyncio.get_running_loop())
    try:
        assert b in uring._OPEN  # a strong reference the GC cannot drop
    finally:
        await b.aclose()
    assert b not in uring._OPEN


# ---- uvloop -----------------------------------------------------------------------------------


def test_on_uvloop(tmp_path: Path) -> None:
    """The sidecar works the same on uvloop: file and socket ops, cancel, SEND_ZC, close."""
    _require_uring()
    uvloop = pytest.importorskip("uvloop")
    path = tmp_path / "uv.bin"
    data = os.urandom(8192)
    path.write_bytes(data)

    async def scenario() -> None:
        b = UringBackend(asyncio.get_running_loop())
        fd = os.open(path, os.O_RDWR)
        x, y = socket.socketpair()
        try:
            bufs = [bytearray(1024) for _ in range(8)]
            dones = [Done(b.loop) for _ in bufs]
            enters = b.enter_calls
            for i, (buf, done) in enumerate(zip(bufs, dones, strict=True)):
                start(b, IoOp(Op.READ, fd, memoryview(buf), 1024, i * 1024), done)
            assert [await d.wait() for d in dones] == [[(1024, 0)]] * 8
            assert b.enter_calls == enters + 1
            assert b"".join(bufs) == data
            # A parked RECV woken by a peer in another thread, through the eventfd.
            rbuf = bytearray(5)
            recv = Done(b.loop)
            start(b, IoOp(Op.RECV, y.fileno(), memoryview(rbuf), 5), recv)
            await tick()
            await asyncio.to_thread(x.send, b"uvl00")
            assert await recv.wait() == [(5, 0)]
            assert rbuf == b"uvl00"
            # Cancel a parked RECV; the buffer is pinned until the CQE.
            ba = bytearray(5)
            parked = Done(b.loop)
            h = start(b, IoOp(Op.RECV, y.fileno(), memoryview(ba), 5), parked)
            await tick()
            c = CancelResult(b.loop)
            b.cancel(h, c)
            with pytest.raises(BufferError):
                ba.extend(b"x")
            assert await c.wait() == 0
            assert await parked.wait() == [(-errno.ECANCELED, 0)]
            ba.extend(b"x")
            zc = await run(b, IoOp(Op.SEND_ZC, x.fileno(), memoryview(b"zc").toreadonly(), 2))
            assert zc == [(2, int(CqeFlag.MORE)), (0, int(CqeFlag.NOTIF))]
            assert y.recv(2) == b"zc"
            # Close with work in flight.
            last = Done(b.loop)
            start(b, IoOp(Op.RECV, y.fileno(), memoryview(bytearray(4)), 4), last)
            await tick()
        finally:
            await asyncio.wait_for(b.aclose(), WAIT)
            os.close(fd)
            x.close()
            y.close()
        assert last.results == [(-errno.ECANCELED, 0)]
        assert b.in_flight() == 0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert "uvloop" in type(runner.get_loop()).__module__
        runner.run(scenario())


async def test_coop_taskrun_still_wakes_a_sleeping_loop(
    backend: UringBackend, tmp_path: Path
) -> None:
    """With IORING_SETUP_COOP_TASKRUN (when the kernel takes it) completions posted by
    task work no longer interrupt the loop with an IPI; a loop asleep in epoll must
    still be woken: a READ on a pipe that a thread fills later, and a buffered file
    WRITE (io-wq on ext4), both complete while the loop has nothing else to do."""
    import threading

    if backend.setup_flags & abi.IORING_SETUP_SUBMIT_ALL:
        assert backend.setup_flags & abi.IORING_SETUP_COOP_TASKRUN  # taken where known
    r, w = os.pipe()
    try:
        buf = bytearray(5)
        done = Done(backend.loop)
        start(backend, IoOp(Op.READ, r, memoryview(buf), 5, -1), done)
        timer = threading.Timer(0.05, os.write, (w, b"hello"))
        timer.start()
        assert await done.wait() == [(5, 0)]
        timer.join()
        assert buf == b"hello"
    finally:
        os.close(r)
        os.close(w)
    data = os.urandom(1 << 16)
    fd = os.open(tmp_path / "w.bin", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert await run(backend, IoOp(Op.WRITE, fd, memoryview(data), len(data), 0)) == [
            (len(data), 0)
        ]
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
