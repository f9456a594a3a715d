"""Durable replica state of a mirror, as md RAID-1 keeps it: event counts and a
write-intent bitmap, in SQLite (WAL, synchronous=FULL), shared by every process that
serves the mirror (``nbd serve --workers N``), as md-cluster shares its superblock.

Event counts: the mirror has an event count, and so has each replica (the count at
which it was last known to hold every write).  Taking a replica out of service bumps
the mirror's count and gives it to the replicas still in sync, before the write the
failed one missed is acknowledged; so after a restart a replica whose count is behind
(*stale*) is known to have missed writes, and is not read until a resync brought it
back (then it gets the mirror's count).  A stale replica is written only while it is
being resynced (``replicas.resync``), so every process writes it from then on.

Write-intent bitmap: the device is cut into regions; a region is marked *dirty*
(durably) before the first write to it is issued, and cleared only once no write to
it is in flight and every replica was synced afterwards.  Each process has a bitmap of
its own (rows ``(region, owner)``, as md-cluster has one per node): it clears only its
own rows, from what it has in flight, so no process can clear a region under another
one's writes.  A process is named by boot id, pid and start time (:func:`owner_id`);
the rows of a process that is gone (crashed, or an earlier run) are where the replicas
may differ, to be copied by the resync leader.

Locks: a region being copied by a resync is in ``locks``; the copier takes the lock
in a write transaction, then waits until no live process but itself has a row for the
region (a process with writes in flight there keeps its row).  A process marks a
region dirty in a write transaction that first looks for a lock, so a write starts
either before the lock (its row makes the copier wait) or sees it (and waits).

Every change is one ``BEGIN IMMEDIATE`` transaction; a process sees the others' by
``PRAGMA data_version`` (:meth:`MirrorState.changed`) and reloads the small tables.

Tables: ``config(key, value)`` (``region_size``), ``replicas(idx, path, events,
resync)``, ``dirty(region, owner)``, ``locks(region, owner)``; the mirror's count is
the largest replica count.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["DEFAULT_REGION", "MirrorState", "owner_id"]

#: Default region of the write-intent bitmap.
DEFAULT_REGION = 16 << 20
#: Seconds to wait for another process's write transaction.
BUSY_TIMEOUT = 30.0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "-"


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]  # field 22, starttime


_BOOT = _boot_id()


def owner_id(pid: int | None = None) -> str:
    """This process (or ``pid``) as an owner of bitmap rows: ``boot/pid/start``."""
    pid = os.getpid() if pid is None else pid
    return f"{_BOOT}/{pid}/{_start_time(pid)}"


def owner_alive(owner: str) -> bool:
    """Whether the process that wrote rows as ``owner`` still runs."""
    boot, _, rest = owner.partition("/")
    pid, _, start = rest.partition("/")
    if boot != _BOOT or not pid.isdigit():
        return False
    return _start_time(int(pid)) == start


class MirrorState:
    """The state database of one mirror, as one process sees it (see the module doc)."""

    def __init__(self, path: str, replica_paths: Sequence[str], region_size: int | None) -> None:
        self.path = path
        self.owner = owner_id()
        self._lease_fd = -1
        try:
            self._db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise ValueError(f"mirror state {path!r}: {e}") from None
        db = self._db
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            with self._write():
                cfg = self._create(replica_paths, region_size)
        except sqlite3.Error as e:
            db.close()
            raise ValueError(f"mirror state {path!r}: {e}") from None
        except BaseException:
            db.close()
            raise
        self.region_size = int(cfg["region_size"])
        if self.region_size <= 0 or self.region_size & (self.region_size - 1):
            db.close()
            raise ValueError(f"mirror state {path!r}: region size must be a power of two")
        #: Dirty regions of this process (its rows).
        self.mine: set[int] = set()
        self.replica_events: list[int] = []
        self.replica_resync: list[bool] = []
        self.events = 0
        #: Dirty regions of other processes, live or gone.
        self.others: set[int] = set()
        #: Regions locked by another process (being copied there).
        self.locked_elsewhere: set[int] = set()
        self.reload()
        self._data_version = self._version()

    def _create(self, replica_paths: Sequence[str], region_size: int | None) -> dict[str, str]:
        db, path = self._db, self.path
        db.execute("CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS replicas (idx INTEGER PRIMARY KEY,"
            " path TEXT NOT NULL, events INTEGER NOT NULL, resync INTEGER NOT NULL DEFAULT 0)"
        )
        cols = [r[1] for r in db.execute("PRAGMA table_info(replicas)")]
        if "resync" not in cols:  # a state database from before --workers
            db.execute("ALTER TABLE replicas ADD COLUMN resync INTEGER NOT NULL DEFAULT 0")
        cols = [r[1] for r in db.execute("PRAGMA table_info(dirty)")]
        if cols and "owner" not in cols:  # one bitmap: its rows belong to a process gone
            db.execute("ALTER TABLE dirty RENAME TO dirty_v1")
        db.execute(
            "CREATE TABLE IF NOT EXISTS dirty (region INTEGER NOT NULL, owner TEXT NOT NULL,"
            " PRIMARY KEY (region, owner))"
        )
        if cols and "owner" not in cols:
            db.execute("INSERT INTO dirty SELECT region, '' FROM dirty_v1")
            db.execute("DROP TABLE dirty_v1")
        db.execute(
            "CREATE TABLE IF NOT EXISTS locks (region INTEGER PRIMARY KEY, owner TEXT NOT NULL)"
        )
        paths = [os.path.abspath(p) for p in replica_paths]
        rows = db.execute("SELECT idx, path FROM replicas ORDER BY idx").fetchall()
        cfg = dict(db.execute("SELECT key, value FROM config").fetchall())
        if not rows:
            size = region_size or DEFAULT_REGION
            db.execute("INSERT OR REPLACE INTO config VALUES ('region_size', ?)", (str(size),))
            db.executemany(
                "INSERT INTO replicas (idx, path, events) VALUES (?, ?, 0)", enumerate(paths)
            )
            rows = list(enumerate(paths))
            cfg = {"region_size": str(size)}
        known = [r[1] for r in rows]
        if known != paths:
            raise ValueError(f"mirror state {path!r} belongs to replicas {known}, not {paths}")
        return cfg

    # ---- transactions and what the others did -------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (SQLite's write lock: one process at a time)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _version(self) -> int:
        (v,) = self._db.execute("PRAGMA data_version").fetchone()
        return int(v)

    def changed(self) -> bool:
        """Whether another process committed since the last call; if so the view
        (:attr:`replica_events`, :attr:`others`, :attr:`locked_elsewhere`) is reloaded."""
        v = self._version()
        if v == self._data_version:
            return False
        self._data_version = v
        self.reload()
        return True

    def reload(self) -> None:
        db = self._db
        rows = db.execute("SELECT events, resync FROM replicas ORDER BY idx").fetchall()
        self.replica_events = [int(r[0]) for r in rows]
        self.replica_resync = [bool(r[1]) for r in rows]
        self.events = max(self.replica_events)
        me = self.owner
        self.others = {
            int(r) for (r,) in db.execute("SELECT region FROM dirty WHERE owner != ?", (me,))
        }
        self.locked_elsewhere = {
            int(r) for (r,) in db.execute("SELECT region FROM locks WHERE owner != ?", (me,))
        }

    @property
    def dirty(self) -> set[int]:
        """Every dirty region this process knows of (its own and the others')."""
        return self.mine | self.others

    # ---- replicas ---------------------------------------------------------------------------

    def in_sync(self) -> list[int]:
        """Replicas holding every write (their count is the mirror's)."""
        return [i for i, e in enumerate(self.replica_events) if e == self.events]

    def stale(self) -> list[int]:
        return [i for i, e in enumerate(self.replica_events) if e != self.events]

    def resyncing(self) -> list[int]:
        """Stale replicas being resynced: written by every process, read by none."""
        return [r for r in self.stale() if self.replica_resync[r]]

    def take_out(self, replica: int) -> None:
        """``replica`` failed: if it was in sync, bump the mirror's count and give it to
        the others in sync (the last one stays: it holds the data); it is no longer
        resynced.  Durably, from the table's state (another process may have taken
        replicas out meanwhile)."""
        with self._write() as db:
            rows = db.execute("SELECT idx, events FROM replicas").fetchall()
            top = max(int(e) for _, e in rows)
            keep = [int(i) for i, e in rows if int(e) == top and int(i) != replica]
            if keep and any(int(i) == replica and int(e) == top for i, e in rows):
                db.executemany(
                    "UPDATE replicas SET events = ? WHERE idx = ?", [(top + 1, r) for r in keep]
                )
            db.execute("UPDATE replicas SET resync = 0 WHERE idx = ?", (replica,))
        self.reload()

    def start_resync(self, replicas: Iterable[int]) -> None:
        """Every process writes ``replicas`` from now on (their resync starts)."""
        with self._write() as db:
            db.executemany("UPDATE replicas SET resync = 1 WHERE idx = ?", [(r,) for r in replicas])
        self.reload()

    def mark_in_sync(self, replica: int) -> None:
        """``replica`` was resynced: it holds every write again (durably)."""
        with self._write() as db:
            (top,) = db.execute("SELECT max(events) FROM replicas").fetchone()
            db.execute(
                "UPDATE replicas SET events = ?, resync = 0 WHERE idx = ?", (int(top), replica)
            )
        self.reload()

    # ---- this process's bitmap -------------------------------------------------------------

    def mark_dirty(self, regions: Iterable[int]) -> set[int]:
        """Mark ``regions`` dirty, durably, before a write to them is issued.  Returns
        the regions another process has locked (nothing is marked then: wait)."""
        new = [r for r in regions if r not in self.mine]
        if not new:
            return set()
        with self._write() as db:
            marks = ",".join("?" * len(new))
            locked = {
                int(r)
                for (r,) in db.execute(
                    f"SELECT region FROM locks WHERE owner != ? AND region IN ({marks})",
                    (self.owner, *new),
                )
            }
            if not locked:
                db.executemany(
                    "INSERT OR IGNORE INTO dirty (region, owner) VALUES (?, ?)",
                    [(r, self.owner) for r in new],
                )
        if locked:
            self.locked_elsewhere |= locked
            return locked
        self.mine.update(new)
        return set()

    def clear(self, regions: Iterable[int]) -> None:
        """``regions`` are the same on every replica as far as this process's writes go
        (synced, none in flight)."""
        done = [r for r in regions if r in self.mine]
        if not done:
            return
        with self._write() as db:
            db.executemany(
                "DELETE FROM dirty WHERE region = ? AND owner = ?", [(r, self.owner) for r in done]
            )
        self.mine.difference_update(done)

    # ---- the resync leader ---------------------------------------------------------------

    def lead(self) -> bool:
        """Become the one process that resyncs (a lock on ``PATH-leader`` held until
        :meth:`close` or the process ends); True if this process is it."""
        if self._lease_fd >= 0:
            return True
        fd = os.open(f"{self.path}-leader", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lease_fd = fd
        # Locks are the leader's: any left are a dead leader's.
        with self._write() as db:
            db.execute("DELETE FROM locks WHERE owner != ?", (self.owner,))
        self.reload()
        return True

    @property
    def leader(self) -> bool:
        return self._lease_fd >= 0

    def orphans(self) -> set[int]:
        """Regions dirty in the bitmap of a process that is gone."""
        rows = self._db.execute("SELECT DISTINCT owner FROM dirty WHERE owner != ?", (self.owner,))
        gone = [o for (o,) in rows if not owner_alive(o)]
        out: set[int] = set()
        for o in gone:
            rows = self._db.execute("SELECT region FROM dirty WHERE owner = ?", (o,))
            out |= {int(r) for (r,) in rows}
        return out

    def lock(self, region: int) -> None:
        """Hold back every process's new writes to ``region`` (a copy starts)."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO locks (region, owner) VALUES (?, ?)", (region, self.owner)
            )

    def writers_elsewhere(self, region: int) -> bool:
        """Whether a live process but this one may have writes in flight on ``region``."""
        rows = self._db.execute(
            "SELECT owner FROM dirty WHERE region = ? AND owner != ?", (region, self.owner)
        )
        return any(owner_alive(o) for (o,) in rows)

    def copied(self, region: int) -> None:
        """``region`` was copied: the rows of processes gone and the lock go."""
        with self._write() as db:
            rows = db.execute(
                "SELECT owner FROM dirty WHERE region = ? AND owner != ?", (region, self.owner)
            ).fetchall()
            gone = [(region, o) for (o,) in rows if not owner_alive(o)]
            db.executemany("DELETE FROM dirty WHERE region = ? AND owner = ?", gone)
            db.execute("DELETE FROM locks WHERE region = ? AND owner = ?", (region, self.owner))
        self.reload()

    def unlock(self, region: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM locks WHERE region = ? AND owner = ?", (region, self.owner))

    def unlock_all(self) -> None:
        """Drop this process's locks (a resync stopped)."""
        with self._write() as db:
            db.execute("DELETE FROM locks WHERE owner = ?", (self.owner,))

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.unlock_all()
        self._db.close()
        if self._lease_fd >= 0:
            os.close(self._lease_fd)
            self._lease_fd = -1
