"""Mapping stores for the ``linear`` target: logical extent -> (PV index, physical extent).

A store is a small key-value interface (:class:`MappingStore`); the default keeps the
table in SQLite, so the mapping survives restarts.  An allocation is committed to the
store before the data write that needs it is issued, and only after the ``prepare``
callback made the physical extent ready (the linear target zeroes it durably: a new
extent's unwritten bytes read as zeroes, never as what the PV held before).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["MappingStore", "SqliteMappingStore"]

DEFAULT_EXTENT = 4 << 20


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
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
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
            db.executemany(
                "INSERT INTO config VALUES (?, ?)",
                [("size", str(vsize)), ("extent_size", str(ext))],
            )
            db.executemany(
                "INSERT INTO pvs (id, path, extents) VALUES (?, ?, ?)",
                [(i, p, n) for i, (p, n) in enumerate(pvs)],
            )
            db.execute("COMMIT")
            cfg = {"size": str(vsize), "extent_size": str(ext)}
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

    def lookup(self, le: int) -> tuple[int, int] | None:
        row = self._db.execute("SELECT pv, pe FROM extents WHERE le = ?", (le,)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def allocate(
        self, le: int, prepare: Callable[[int, int], None] | None = None
    ) -> tuple[int, int]:
        existing = self.lookup(le)
        if existing is not None:
            return existing
        for pv, free in enumerate(self._free):
            if free:
                pe = free[-1]
                if prepare is not None:
                    prepare(pv, pe)
                self._db.execute("INSERT INTO extents (le, pv, pe) VALUES (?, ?, ?)", (le, pv, pe))
                free.pop()
                return pv, pe
        raise OSError(28, "no free physical extent")

    def mapped_count(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM extents").fetchone()
        return int(n)

    def close(self) -> None:
        self._db.close()
