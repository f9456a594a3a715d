"""Mapping stores for the ``linear`` target: logical extent -> (PV index, physical extent).

A store is a small key-value interface (:class:`MappingStore`); the default keeps the
table in SQLite, so the mapping survives restarts.  An allocation is committed to the
store before the data write that needs it is issued, and only after the ``prepare``
callback made the physical extent ready (the linear target zeroes it durably: a new
extent's unwritten bytes read as zeroes, never as what the PV held before).

Several processes (``nbd serve --workers N``) may share one SQLite store: an
allocation is one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock, waited for up
to :data:`BUSY_TIMEOUT` seconds) that looks the extent up again (another worker may
have mapped it meanwhile: that mapping is returned), takes a physical extent the
table does not use (the free list in memory is only a hint: others allocate too, and
nothing is ever unmapped), prepares it and records it.  A mapping, once recorded,
never changes, so workers may cache it forever; "unmapped" may be cached only until
another connection commits, which :meth:`SqliteMappingStore.changed` tells
(``PRAGMA data_version``).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["MappingStore", "SqliteMappingStore"]

DEFAULT_EXTENT = 4 << 20
#: Seconds to wait for another process's write transaction (an allocation).
BUSY_TIMEOUT = 30.0


class MappingStore(Protocol):
    """What the linear target needs from a mapping store."""

    size: int
    extent_size: int
    pv_paths: list[str]

    def lookup(self, le: int) -> tuple[int, int] | None:
        """The (pv, pe) of logical extent ``le``, or ``None`` if unmapped."""
        ...

    def allocate(
        self, le: int, prepare: Callable[[int, int], None] | None = None
    ) -> tuple[int, int]:
        """Map ``le`` to a free physical extent (durably) and return it; ENOSPC if full.
        ``prepare(pv, pe)`` runs first; if it raises, nothing is recorded."""
        ...

    def changed(self) -> bool:
        """Whether another process may have mapped extents since the last call (so
        cached "unmapped" answers must be looked up again)."""
        ...

    def close(self) -> None: ...


class SqliteMappingStore:
    """The mapping table in an SQLite database (``extents(le, pv, pe)``)."""

    def __init__(
        self,
        path: str,
        pv_paths: Sequence[str] = (),
        size: int | None = None,
        extent_size: int | None = None,
    ) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            self._open(pv_paths, size, extent_size)
        except sqlite3.Error as e:
            self._db_close()
            raise ValueError(f"mapping database {path!r}: {e}") from None
        except BaseException:
            self._db_close()
            raise

    def _db_close(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()

    def _open(self, pv_paths: Sequence[str], size: int | None, extent_size: int | None) -> None:
        path = self.path
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS pvs (id INTEGER PRIMARY KEY, path TEXT NOT NULL,"
            " extents INTEGER NOT NULL)"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS extents (le INTEGER PRIMARY KEY, pv INTEGER NOT NULL,"
            " pe INTEGER NOT NULL, UNIQUE (pv, pe))"
        )
        cfg = dict(db.execute("SELECT key, value FROM config").fetchall())
        if not cfg:
            if not pv_paths:
                raise ValueError(f"new mapping database {path!r} needs at least one pv=FILE")
            ext = extent_size or DEFAULT_EXTENT
            pvs = [(os.path.abspath(p), os.stat(p).st_size // ext) for p in pv_paths]
            total = sum(n for _, n in pvs) * ext
            vsize = total if size is None else size
            db.execute("BEGIN IMMEDIATE")
            try:
                # Another worker may have created it since the look above.
                cfg = dict(db.execute("SELECT key, value FROM config").fetchall())
                if not cfg:
                    db.executemany(
                        "INSERT INTO config VALUES (?, ?)",
                        [("size", str(vsize)), ("extent_size", str(ext))],
                    )
                    db.executemany(
                        "INSERT INTO pvs (id, path, extents) VALUES (?, ?, ?)",
                        [(i, p, n) for i, (p, n) in enumerate(pvs)],
                    )
                    cfg = {"size": str(vsize), "extent_size": str(ext)}
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        self.size = int(cfg["size"])
        self.extent_size = int(cfg["extent_size"])
        rows = db.execute("SELECT id, path, extents FROM pvs ORDER BY id").fetchall()
        self.pv_paths = [r[1] for r in rows]
        self._pv_extents = [int(r[2]) for r in rows]
        used: dict[int, set[int]] = {i: set() for i in range(len(rows))}
        for pv, pe in db.execute("SELECT pv, pe FROM extents"):
            used[pv].add(pe)
        self._free = [
            sorted(set(range(n)) - used[i], reverse=True) for i, n in enumerate(self._pv_extents)
        ]
        self._data_version = self._version()

    def _version(self) -> int:
        (v,) = self._db.execute("PRAGMA data_version").fetchone()
        return int(v)

    def changed(self) -> bool:
        v = self._version()
        if v == self._data_version:
            return False
        self._data_version = v
        return True

    def lookup(self, le: int) -> tuple[int, int] | None:
        row = self._db.execute("SELECT pv, pe FROM extents WHERE le = ?", (le,)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def allocate(
        self, le: int, prepare: Callable[[int, int], None] | None = None
    ) -> tuple[int, int]:
        existing = self.lookup(le)
        if existing is not None:
            return existing
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # the write lock: one allocation at a time
        try:
            got = self._allocate_locked(le, prepare)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return got

    def _allocate_locked(
        self, le: int, prepare: Callable[[int, int], None] | None
    ) -> tuple[int, int]:
        existing = self.lookup(le)  # mapped by another worker meanwhile
        if existing is not None:
            return existing
        db = self._db
        for pv, free in enumerate(self._free):
            while free:
                pe = free[-1]
                used = db.execute(
                    "SELECT 1 FROM extents WHERE pv = ? AND pe = ?", (pv, pe)
                ).fetchone()
                if used is not None:  # taken by another worker
                    free.pop()
                    continue
                if prepare is not None:
                    prepare(pv, pe)
                db.execute("INSERT INTO extents (le, pv, pe) VALUES (?, ?, ?)", (le, pv, pe))
                free.pop()
                return pv, pe
        raise OSError(28, "no free physical extent")

    def mapped_count(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM extents").fetchone()
        return int(n)

    def close(self) -> None:
        self._db.close()
