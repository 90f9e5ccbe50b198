"""Hot-path metric writes kept in plain Python numbers, handed to prometheus-client when
a scrape reads them.

prometheus-client takes a lock for every increment, and a Histogram walks its buckets in
Python: each decision made four such writes and two histogram observations, about a
third of the engine's own Python time (in-process, store answering at once). In one
process nothing reads those values between scrapes, so the hot path adds to local numbers
and `Tallies.flush()` (called by the scrape) adds them to the client's children first: the
scrape shows exactly what it would have shown.

With several worker processes (prometheus-client's multiprocess mode) a scrape reads the
files of every process, including processes that are not being scraped and so would not
flush: there every write goes straight to the child (`direct=True`).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, Protocol, TypeVar, cast


class Incrementable(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Observable(Protocol):
    def observe(self, amount: float) -> None: ...


class _Count:
    """A counter child's increments since the last flush."""

    __slots__ = ("_child", "_pending")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._pending: float = 0

    def inc(self, amount: float = 1) -> None:
        self._pending += amount

    def flush(self) -> None:
        if self._pending:
            self._child.inc(self._pending)
            self._pending = 0


class _Observations:
    """A histogram child's observations since the last flush, kept as they came and
    counted into buckets in bulk (sorted once, one bisect per bucket bound) when
    _FOLD_AT of them wait or a scrape flushes: a bisect and a list write per observation
    cost more than the append. The child gets a count per bucket and the sum, exactly what
    its own observe() keeps."""

    __slots__ = ("_bounds", "_child", "_counts", "_pending", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        # The child's upper bounds, +Inf last: the bucket of an amount is the first bound
        # >= it, the one prometheus-client's own observe() picks.
        self._bounds: list[float] = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._pending: list[float] = []

    def observe(self, amount: float) -> None:
        pending = self._pending
        pending.append(amount)
        if len(pending) >= _FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        pending = self._pending
        # In arrival order, as the child's own observe() adds them (the same float sum).
        self._sum = sum(pending, self._sum)
        pending.sort()
        counts = self._counts
        below = 0  # amounts at or under the previous bound
        for i, bound in enumerate(self._bounds):
            upto = bisect_right(pending, bound)
            counts[i] += upto - below
            below = upto
        pending.clear()

    def flush(self) -> None:
        if self._pending:
            self._fold()
        counts = self._counts
        if not any(counts):
            return
        # prometheus-client has no "observe n times": add to the child's bucket and sum
        # values, the ones its observe() adds to (tests/test_metrics.py pins the result).
        for i, n in enumerate(counts):
            if n:
                self._child._buckets[i].inc(n)
                counts[i] = 0
        self._child._sum.inc(self._sum)
        self._sum = 0.0


# Observations a histogram's writer keeps before it counts them into buckets (a bound on
# what waits for a scrape: a few tens of KiB per histogram child).
_FOLD_AT = 1024


_Tally = _Count | _Observations
_T = TypeVar("_T", _Count, _Observations)


class Tallies:
    """Makes the hot path's metric writers and flushes them. One writer per child, however
    often it is asked for (label caches that are rebuilt ask again), so their number stays
    bounded by the metrics' label sets."""

    def __init__(self, *, direct: bool) -> None:
        self.direct = direct
        # id(child) -> its writer; the writer holds the child, so the id stays its own.
        self._all: dict[int, _Tally] = {}

    def count(self, child: Any) -> Incrementable:
        """A writer with the counter child's inc()."""
        return self._writer(child, _Count)

    def observations(self, child: Any) -> Observable:
        """A writer with the histogram child's observe()."""
        return self._writer(child, _Observations)

    def _writer(self, child: Any, kind: type[_T]) -> _T:
        if self.direct:
            return cast(_T, child)  # the child has the writer's method itself
        tally = self._all.get(id(child))
        if tally is None:
            tally = self._all[id(child)] = kind(child)
        assert isinstance(tally, kind)
        return tally

    def flush(self) -> None:
        for tally in self._all.values():
            tally.flush()
