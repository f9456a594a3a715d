"""aiofused._abi._cqe: the C twin makes the same CQEs as the reference
(:func:`aiofused._core.sqe.new_cqe`), refuses what it cannot make, and is the one the
Ring's core uses where it was built."""

from __future__ import annotations

import gc
import random
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest

from aiofused import Cqe, Ring
from aiofused._core.sqe import new_cqe as new_cqe_py
from aiofused._runtime.ring import CQE_TWIN

IMPLS: list[tuple[str, Callable[..., Any]]] = [("python", new_cqe_py)]
try:
    from aiofused._abi import _cqe

    IMPLS.append(("c", _cqe.new_cqe))
    C_WHY = ""
except ImportError as exc:
    C_WHY = f"the C twin is not built: {exc}"

needs_c = pytest.mark.skipif(bool(C_WHY), reason=C_WHY or "built")


def _values(rng: random.Random) -> tuple[int, int, int]:
    return (
        rng.choice([0, 1, 255, 257, rng.randrange(2**64), -1]),
        rng.choice([0, -22, 4096, rng.randrange(-(2**31), 2**31)]),
        rng.choice([0, 1, 2, 4, rng.randrange(2**32)]),
    )


@pytest.mark.parametrize(("impl", "make"), IMPLS, ids=[i for i, _ in IMPLS])
def test_a_made_cqe_is_a_cqe(impl: str, make: Callable[..., Any]) -> None:
    rng = random.Random(7)
    for _ in range(2000):
        ud, res, flags = _values(rng)
        cqe = make(Cqe, ud, res, flags)
        want = Cqe(ud, res, flags)
        assert type(cqe) is Cqe
        assert cqe == want and hash(cqe) == hash(want) and repr(cqe) == repr(want)
        assert (cqe.user_data, cqe.res, cqe.flags) == (ud, res, flags)
        assert tuple(cqe) == (ud, res, flags) and len(cqe) == 3
        assert cqe._replace(res=1) == Cqe(ud, 1, flags)
        assert gc.is_tracked(cqe) == gc.is_tracked(want)


@needs_c
def test_the_c_twin_holds_its_items_and_frees_them() -> None:
    ud = 2**70  # a fresh int object, referenced once more by the CQE
    before = sys.getrefcount(ud)
    cqe = _cqe.new_cqe(Cqe, ud, -1, 0)
    assert sys.getrefcount(ud) == before + 1
    del cqe
    assert sys.getrefcount(ud) == before


class _WithFields(tuple):  # type: ignore[type-arg]
    extra: int  # a tuple subclass with a __dict__: not a CQE's layout


class _Other(NamedTuple):
    a: int
    b: int
    c: int


@needs_c
@pytest.mark.parametrize("cls", [int, object, list, _WithFields, "Cqe"])
def test_the_c_twin_refuses_what_is_not_a_plain_tuple_subclass(cls: Any) -> None:
    with pytest.raises(TypeError):
        _cqe.new_cqe(cls, 1, 2, 3)


@needs_c
def test_the_c_twin_checks_its_arity_and_makes_any_plain_tuple_subclass() -> None:
    with pytest.raises(TypeError):
        _cqe.new_cqe(Cqe, 1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _cqe.new_cqe(Cqe, 1, 2, 3, 4)  # type: ignore[call-arg]
    assert _cqe.new_cqe(_Other, 1, 2, 3) == _Other(1, 2, 3)
    assert type(_cqe.new_cqe(tuple, 1, 2, 3)) is tuple


async def test_the_ring_makes_its_cqes_with_the_selected_twin() -> None:
    impl, why, make = CQE_TWIN
    if impl == "c":
        assert make is _cqe.new_cqe and why == "aiofused._abi._cqe"
    else:
        assert make is new_cqe_py
    async with Ring(8) as ring:
        assert ring.new_cqe is make
        sqe = ring.get_sqe()
        assert sqe is not None
        sqe.prep_nop()
        sqe.user_data = 2**63 + 5
        ring.submit()
        (cqe,) = await ring.wait_cqes(1)
        assert type(cqe) is Cqe and cqe == (2**63 + 5, 0, 0)
