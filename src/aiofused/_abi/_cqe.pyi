"""Types of the C twin of :func:`aiofused._core.sqe.new_cqe`."""

from typing import TypeVar

_T = TypeVar("_T", bound=tuple[int, int, int])

def new_cqe(cls: type[_T], user_data: int, res: int, flags: int, /) -> _T: ...
