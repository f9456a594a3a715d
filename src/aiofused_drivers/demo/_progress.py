"""The demo's progress bars: rich's on a terminal, plain lines anywhere else.

On a terminal the bar redraws in place (rich). Written to a pipe, a file or a CI log,
it is a plain line now and then (every ``plain_step`` of progress, and the end), with
no ``\\r`` and no escape sequences.
"""

from __future__ import annotations

from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

__all__ = ["Bar"]


class Bar:
    """One progress bar from 0 to ``total``; ``note`` is the text shown after it.

    ``terminal`` forces one mode (default: ``out.isatty()``).  Use it as a context
    manager: leaving it normally draws the finished bar; leaving it by an exception
    (Ctrl-C) ends the line where it was.
    """

    def __init__(
        self,
        out: TextIO,
        description: str,
        total: float,
        *,
        plain_step: float,
        terminal: bool | None = None,
    ) -> None:
        self._out = out
        self._description = description
        self._total = total
        self._step = plain_step
        self._next = 0.0
        self._last = ""
        isatty = getattr(out, "isatty", None)
        self.terminal = bool(isatty and isatty()) if terminal is None else terminal
        self._progress: Progress | None = None
        if self.terminal:
            self._progress = Progress(
                TextColumn("  {task.description:<22}"),
                BarColumn(bar_width=30),
                TaskProgressColumn(),
                TextColumn("{task.fields[note]}"),
                console=Console(file=out, force_terminal=True),
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._task = self._progress.add_task(description, total=total or 1, note="")
            self._progress.start()

    def update(self, done: float, note: str = "", description: str | None = None) -> None:
        """Progress is ``done`` of ``total`` (and the description, when given, changes)."""
        changed = description is not None and description != self._description
        if description is not None:
            self._description = description
        if self._progress is not None:
            self._progress.update(
                self._task, completed=done, description=self._description, note=note
            )
            self._progress.refresh()
            return
        if changed or done >= self._next or (self._total and done >= self._total):
            self._plain(done, note)
            self._next = done + self._step

    def _plain(self, done: float, note: str) -> None:
        pct = min(100.0, 100.0 * done / self._total) if self._total else 100.0
        line = f"  {self._description:<22} {pct:5.1f}%  {note}".rstrip()
        if line != self._last:
            self._out.write(line + "\n")
            self._out.flush()
            self._last = line

    def finish(self, note: str = "", description: str | None = None) -> None:
        """The bar is full: draw it so (once) and end it."""
        self.update(self._total, note, description)
        self.close()

    def close(self) -> None:
        """End the bar where it is (a terminal gets its newline)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
