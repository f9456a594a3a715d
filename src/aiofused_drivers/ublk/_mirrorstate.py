"""Durable replica state of a mirror, as md RAID-1 keeps it: event counts and a
write-intent bitmap, in SQLite (WAL, synchronous=FULL).

Event counts: the mirror has an event count, and so has each replica (the count at
which it was last known to hold every write).  Taking a replica out of service bumps
the mirror's count and gives it to the replicas still in sync, before the write the
failed one missed is acknowledged; so after a restart a replica whose count is behind
(*stale*) is known to have missed writes, and is not read until a resync brought it
back (then it gets the mirror's count).

Write-intent bitmap: the device is cut into regions; a region is marked *dirty*
(durably) before the first write to it is issued, and cleared only once no write to
it is in flight and every replica was synced afterwards.  After a crash, the dirty
regions are those where the replicas may differ.

Tables: ``config(key, value)`` (``region_size``), ``replicas(idx, path, events)``,
``dirty(region)``; the mirror's count is the largest replica count.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence

__all__ = ["DEFAULT_REGION", "MirrorState"]

#: Default region of the write-intent bitmap.
DEFAULT_REGION = 16 << 20


class MirrorState:
    """The state database of one mirror (see the module doc)."""

    def __init__(self, path: str, replica_paths: Sequence[str], region_size: int | None) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise ValueError(f"mirror state {path!r}: {e}") from None
        db = self._db
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS replicas (idx INTEGER PRIMARY KEY,"
                " path TEXT NOT NULL, events INTEGER NOT NULL)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS dirty (region INTEGER PRIMARY KEY)")
            paths = [os.path.abspath(p) for p in replica_paths]
            rows = db.execute("SELECT idx, path, events FROM replicas ORDER BY idx").fetchall()
            cfg = dict(db.execute("SELECT key, value FROM config").fetchall())
            if not rows:
                size = region_size or DEFAULT_REGION
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT OR REPLACE INTO config VALUES ('region_size', ?)", (str(size),))
                db.executemany(
                    "INSERT INTO replicas (idx, path, events) VALUES (?, ?, 0)", enumerate(paths)
                )
                db.execute("COMMIT")
                rows = [(i, p, 0) for i, p in enumerate(paths)]
                cfg = {"region_size": str(size)}
            known = [r[1] for r in rows]
            if known != paths:
                raise ValueError(f"mirror state {path!r} belongs to replicas {known}, not {paths}")
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
        self.replica_events = [int(r[2]) for r in rows]
        #: The mirror's event count.
        self.events = max(self.replica_events)
        #: Dirty regions (what the table holds).
        self.dirty: set[int] = {int(r) for (r,) in db.execute("SELECT region FROM dirty")}

    def in_sync(self) -> list[int]:
        """Replicas holding every write (their count is the mirror's)."""
        return [i for i, e in enumerate(self.replica_events) if e == self.events]

    def stale(self) -> list[int]:
        return [i for i, e in enumerate(self.replica_events) if e != self.events]

    def keep_in_sync(self, replicas: Iterable[int]) -> None:
        """A replica left: bump the mirror's count, give it to ``replicas`` (durably)."""
        keep = sorted(set(replicas))
        new = self.events + 1
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("UPDATE replicas SET events = ? WHERE idx = ?", [(new, r) for r in keep])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.events = new
        for r in keep:
            self.replica_events[r] = new

    def mark_in_sync(self, replica: int) -> None:
        """``replica`` was resynced: it holds every write again (durably)."""
        self._db.execute("UPDATE replicas SET events = ? WHERE idx = ?", (self.events, replica))
        self.replica_events[replica] = self.events

    def mark_dirty(self, regions: Iterable[int]) -> None:
        """Mark ``regions`` dirty, durably, before a write to them is issued."""
        new = [r for r in regions if r not in self.dirty]
        if not new:
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR IGNORE INTO dirty (region) VALUES (?)", [(r,) for r in new])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.dirty.update(new)

    def clear(self, regions: Iterable[int]) -> None:
        """``regions`` are the same on every replica (synced, nothing in flight)."""
        done = [r for r in regions if r in self.dirty]
        if not done:
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("DELETE FROM dirty WHERE region = ?", [(r,) for r in done])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.dirty.difference_update(done)

    def close(self) -> None:
        self._db.close()
