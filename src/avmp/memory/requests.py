"""What every layout checks in the ids and token counts it is given, the bounded memory
of freed ids that tells a double free apart from an unknown id, and the request table
that the list-based layouts (unified, oracle) share.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, NoReturn, TypeVar

from avmp.memory.spec import (
    CacheAllocator,
    DoubleFreeError,
    DuplicateRequestError,
    MemoryConfig,
    RequestTooLargeError,
    UnknownRequestError,
)
from avmp.models.geometry import ModelGeometry

MAX_REMEMBERED_FREES = 4096  # recent frees kept to name a double free; older ones are forgotten


def _reject(what: str, value: object) -> NoReturn:
    raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})")


def check_request_id(request_id: object) -> None:
    """Raise TypeError unless ``request_id`` is an int (a bool is not)."""
    if type(request_id) is not int:
        _reject("request_id", request_id)


def check_num_tokens(what: str, num_tokens: object) -> None:
    """Raise TypeError unless ``num_tokens`` is an int (not a bool, not a float), and
    ValueError unless it is positive: every call that names tokens must add some."""
    if type(num_tokens) is not int:
        _reject(what, num_tokens)
    if num_tokens <= 0:
        raise ValueError(f"{what} must be positive, got {num_tokens}")


class RecentFrees:
    """The ids of the last `MAX_REMEMBERED_FREES` frees.

    A long-running server frees millions of ids; remembering all of them would leak.
    A bounded window still names the common mistake (freeing twice in a row) as a
    `DoubleFreeError`; an id freed long ago is reported as not live, like one never seen.
    ``_ids`` maps an id to the stamp of its latest free; ``_order`` lists ``(id, stamp)``
    oldest first, so forgetting the oldest is O(1) and an entry whose id was admitted
    again (or freed again later) is simply stale.
    """

    __slots__ = ("_ids", "_order", "_limit", "_stamp")

    def __init__(self, limit: int = MAX_REMEMBERED_FREES) -> None:
        self._ids: dict[int, int] = {}
        self._order: deque[tuple[int, int]] = deque()
        self._limit = limit
        self._stamp = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._ids

    def add(self, request_id: int) -> None:
        # locals for the attributes read twice: every free calls this
        ids, order = self._ids, self._order
        stamp = self._stamp = self._stamp + 1
        ids[request_id] = stamp
        order.append((request_id, stamp))
        if len(order) > self._limit:
            oldest, oldest_stamp = order.popleft()
            if ids.get(oldest) == oldest_stamp:
                del ids[oldest]

    def discard(self, request_id: int) -> None:
        """Forget an id that is admitted again (preemption by recompute re-admits it)."""
        self._ids.pop(request_id, None)

    def not_live(self, request_id: int, *, freeing: bool = False) -> UnknownRequestError:
        """The error for a call on an id that holds nothing now (``freeing``: the call is
        `free`, so a remembered id is a double free)."""
        if request_id in self._ids:
            if freeing:
                return DoubleFreeError(f"request {request_id} was already freed")
            return UnknownRequestError(f"request {request_id} was freed")
        return UnknownRequestError(
            f"request {request_id} is not live (never admitted or already freed)"
        )


class LiveRequest:
    """One live request of a layout that keeps its units in lists (unified, oracle):
    ``slot`` (-1 without state), the blocks holding its state, and its pages in token
    order. Slotted because the simulator keeps thousands alive."""

    __slots__ = ("num_tokens", "slot", "state_blocks", "pages")

    def __init__(self, num_tokens: int, slot: int, state_blocks: list[int], pages: list[int]):
        self.num_tokens = num_tokens
        self.slot = slot
        self.state_blocks = state_blocks
        self.pages = pages


Live = TypeVar("Live", bound=LiveRequest)


class RequestTable(CacheAllocator, Generic[Live]):
    """The request bookkeeping that the unified and oracle layouts share: live requests
    in admission order and the recent frees. A freed id may be admitted again
    (preemption by recompute re-admits the same request). Generic in the layout's
    request record, so that a layout reads its own fields without a runtime check."""

    def __init__(self, geometry: ModelGeometry, config: MemoryConfig) -> None:
        super().__init__(geometry, config)
        self._live: dict[int, Live] = {}
        self._freed = RecentFrees()

    def _check_new(self, request_id: int, num_tokens: int) -> None:
        if type(request_id) is not int:  # the checks are called only on misuse
            check_request_id(request_id)
        if type(num_tokens) is not int or num_tokens <= 0:
            check_num_tokens("num_tokens", num_tokens)
        if request_id in self._live:
            raise DuplicateRequestError(f"request {request_id} is already live")
        if not self.fits_alone(num_tokens):
            raise RequestTooLargeError(
                f"request {request_id} of {num_tokens} tokens does not fit in an empty "
                f"{self.name} cache of {self.config.budget_bytes} bytes"
            )

    def _get(self, request_id: int) -> Live:
        if type(request_id) is not int:  # before the lookup: 1.0 == 1 would find request 1
            check_request_id(request_id)
        request = self._live.get(request_id)
        if request is None:
            raise self._freed.not_live(request_id)
        return request

    def _check_grow(self, request_id: int, num_tokens: int) -> None:
        """Raise unless the grown request fits alone (called only when a grow needs units)."""
        if not self.fits_alone(num_tokens):
            raise RequestTooLargeError(
                f"request {request_id} grown to {num_tokens} tokens does not fit in an empty "
                f"{self.name} cache of {self.config.budget_bytes} bytes"
            )

    def _pop_live(self, request_id: int) -> Live:
        if type(request_id) is not int:  # before the lookup: 1.0 == 1 would find request 1
            check_request_id(request_id)
        request = self._live.pop(request_id, None)
        if request is None:
            raise self._freed.not_live(request_id, freeing=True)
        self._freed.add(request_id)
        self.stats.num_frees += 1
        return request

    def _admitted(self, request_id: int, request: Live) -> None:
        self._live[request_id] = request
        self._freed.discard(request_id)
        self.stats.num_admits += 1

    def num_tokens(self, request_id: int) -> int:
        return self._get(request_id).num_tokens

    @property
    def request_ids(self) -> list[int]:
        return list(self._live)

    def _check_requests(self) -> None:
        """Shared invariants: no unit owned twice, no live id among the recent frees."""
        assert not any(r in self._freed for r in self._live), "a live request is marked freed"
        owned: list[int] = []
        for request in self._live.values():
            owned += request.state_blocks
            owned += request.pages
        assert len(owned) == len(set(owned)), "a unit is owned twice"
