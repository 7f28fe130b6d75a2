"""The layouts AVMP is compared with, behind the same `CacheAllocator` interface.

- `UnifiedAllocator` ("unified"): vLLM v1 with prefix caching off. One pool of equal
  blocks; the attention block is enlarged until one attention page holds one recurrent
  layer's state, and the state page is padded up to it.
- `StaticAllocator` ("static"): SGLang. A KV pool of exact pages and a state pool of
  exact slots, split once at start-up; the split never changes.
- `OracleAllocator` ("oracle"): exact bytes and free, instant migration: admits while the
  exact bytes in use fit the budget. No real system can do better; it is the reference.

All three are pure bookkeeping: unit ids, no bytes. They are called millions of times by
the simulator, so the hot paths (admit, grow, free) do one dict lookup and list slicing,
and check every precondition before changing anything (a failed call changes nothing).

Models without recurrent layers have no slot: `RequestUnits.slot` is ``NO_SLOT`` (-1).
Models without attention layers never ask for pages.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

from avmp.memory.spec import (
    CacheAllocator,
    CacheSpec,
    DoubleFreeError,
    DuplicateRequestError,
    MemoryConfig,
    MemoryUsage,
    RequestTooLargeError,
    RequestUnits,
    UnknownRequestError,
)
from avmp.models.geometry import ModelGeometry
from avmp.units import ceil_div

NO_SLOT = -1
NULL_BLOCK = 0  # vLLM's BlockPool reserves block 0 as its null block, never allocated
VLLM_BLOCK_ALIGNMENT_TOKENS = 16  # vLLM rounds the hybrid attention block to this many tokens
VLLM_GROUP_SIZE_SLACK = 1.25  # vLLM uses the larger layer count when within 25% of the smaller
SGLANG_MAMBA_FULL_MEMORY_RATIO = 0.9  # SGLang's default --mamba-full-memory-ratio


class _Request:
    """One live request's units; slotted because the simulator keeps thousands alive."""

    __slots__ = ("num_tokens", "slot", "state_blocks", "pages")

    def __init__(self, num_tokens: int, slot: int, state_blocks: list[int], pages: list[int]):
        self.num_tokens = num_tokens
        self.slot = slot
        self.state_blocks = state_blocks
        self.pages = pages


class _RequestTable(CacheAllocator):
    """Live requests in admission order plus the ids freed since, so that a second free
    is told apart from a request that never existed. A freed id may be admitted again
    (preemption by recompute re-admits the same request)."""

    def __init__(self, geometry: ModelGeometry, config: MemoryConfig) -> None:
        super().__init__(geometry, config)
        self._live: dict[int, _Request] = {}
        self._freed: set[int] = set()

    def _check_new(self, request_id: int, num_tokens: int) -> None:
        if request_id in self._live:
            raise DuplicateRequestError(f"request {request_id} is already live")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if not self.fits_alone(num_tokens):
            raise RequestTooLargeError(
                f"request {request_id} of {num_tokens} tokens does not fit in an empty "
                f"{self.name} cache of {self.config.budget_bytes} bytes"
            )

    def _get(self, request_id: int) -> _Request:
        try:
            return self._live[request_id]
        except KeyError:
            raise UnknownRequestError(f"request {request_id} is not live") from None

    def _check_grow(self, request_id: int, num_tokens: int) -> None:
        """Raise unless the grown request fits alone (called only when a grow needs units)."""
        if not self.fits_alone(num_tokens):
            raise RequestTooLargeError(
                f"request {request_id} grown to {num_tokens} tokens does not fit in an empty "
                f"{self.name} cache of {self.config.budget_bytes} bytes"
            )

    def _pop_live(self, request_id: int) -> _Request:
        request = self._live.pop(request_id, None)
        if request is None:
            if request_id in self._freed:
                raise DoubleFreeError(f"request {request_id} was already freed")
            raise UnknownRequestError(f"request {request_id} was never admitted")
        self._freed.add(request_id)
        self.stats.num_frees += 1
        return request

    def _admitted(self, request_id: int, request: _Request) -> None:
        self._live[request_id] = request
        self._freed.discard(request_id)
        self.stats.num_admits += 1

    def num_tokens(self, request_id: int) -> int:
        return self._get(request_id).num_tokens

    @property
    def request_ids(self) -> list[int]:
        return list(self._live)

    def _check_requests(self) -> None:
        """Shared invariants: no unit owned twice, live and freed ids disjoint."""
        assert not (self._freed & self._live.keys()), "a live request is marked freed"
        owned: list[int] = []
        for request in self._live.values():
            owned += request.state_blocks
            owned += request.pages
        assert len(owned) == len(set(owned)), "a unit is owned twice"


class _PagedRequestTable(_RequestTable):
    """A request table whose requests hold ``block_size``-token pages (static, oracle):
    the grow logic is shared, each layout says how pages are taken."""

    @abstractmethod
    def _pages_for(self, num_tokens: int) -> int:
        """Pages that ``num_tokens`` tokens need."""

    @abstractmethod
    def _take_grow_pages(self, num_pages: int) -> list[int] | None:
        """Take ``num_pages`` pages for a grow, or None (nothing taken) if short."""

    def grow(self, request_id: int, num_new_tokens: int) -> list[int] | None:
        request = self._get(request_id)
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        new = request.num_tokens + num_new_tokens
        num_pages = self._pages_for(new) - len(request.pages)
        added: list[int] = []
        if num_pages:
            self._check_grow(request_id, new)
            taken = self._take_grow_pages(num_pages)
            if taken is None:
                self.stats.num_oom_events += 1
                return None
            added = taken
            request.pages += added
        request.num_tokens = new
        self.stats.num_grows += 1
        return added


# ----------------------------------------------------------------------------- unified


@dataclass(frozen=True)
class VllmBlockGeometry:
    """How vLLM v1 cuts one pool for a hybrid model (prefix caching off).

    Attributes:
        block_size: tokens per attention page; None for a model without attention.
        page_bytes: bytes of one page of one layer; state pages are padded up to it.
        state_page_bytes: one recurrent layer's exact state (the largest layer's).
        group_size: layers per group; a block holds one page for each layer of a group.
        num_attention_groups: groups of attention layers; each holds its own pages.
        num_state_groups: groups of recurrent layers; each holds one block per request.
    """

    block_size: int | None
    page_bytes: int
    state_page_bytes: int
    group_size: int
    num_attention_groups: int
    num_state_groups: int

    @property
    def block_bytes(self) -> int:
        """Bytes one block id stands for: a page in each of the group's layers."""
        return self.group_size * self.page_bytes

    @classmethod
    def from_geometry(cls, geometry: ModelGeometry, min_block_size: int = 16) -> VllmBlockGeometry:
        """vLLM's rule, per layer: the attention block is the smallest multiple of 16
        tokens (and at least ``min_block_size``) whose page holds the largest recurrent
        layer's state. Layers whose shapes differ are sized by the largest one, as one
        uniform page size must hold every layer."""
        kv_token_bytes = max((a.kv_bytes_per_token for a in geometry.attention_layers), default=0)
        state_bytes = max((r.state_bytes for r in geometry.recurrent_layers), default=0)
        block_size: int | None = None
        if kv_token_bytes:
            align = VLLM_BLOCK_ALIGNMENT_TOKENS
            needed = align * ceil_div(state_bytes, align * kv_token_bytes)
            block_size = max(min_block_size, needed)
        page_bytes = max(state_bytes, (block_size or 0) * kv_token_bytes)
        num_attention, num_recurrent = geometry.num_attention_layers, geometry.num_recurrent_layers
        group_size = _vllm_group_size([n for n in (num_attention, num_recurrent) if n])
        return cls(
            block_size=block_size,
            page_bytes=page_bytes,
            state_page_bytes=state_bytes,
            group_size=group_size,
            num_attention_groups=ceil_div(num_attention, group_size),
            num_state_groups=ceil_div(num_recurrent, group_size),
        )


def _vllm_group_size(layer_counts: list[int]) -> int:
    """vLLM's `_get_kv_cache_groups_uniform_page_size`: the smallest layer count, or the
    largest when all counts are within 25% of each other (fewer padding layers)."""
    smallest, largest = min(layer_counts), max(layer_counts)
    return largest if largest < smallest * VLLM_GROUP_SIZE_SLACK else smallest


class UnifiedAllocator(_RequestTable):
    """vLLM v1's padded pool: ``num_blocks`` equal blocks shared by every group.

    Block 0 is vLLM's null block (the entry its block tables point at when empty) and is never
    handed out, so ``num_usable_blocks = num_blocks - 1``.

    A request holds one block per recurrent group (its state) and
    ``ceil(tokens / block_size)`` blocks per attention group. A pure-recurrent model has
    one group of all its layers and one block per request; a pure-attention model has
    ``config.block_size``-token blocks.

    `RequestUnits.slot` is the request's first state block; `pages` lists its
    attention blocks group by group, each group in token order (one group in practice).
    Free block ids are kept on a stack that starts lowest on top; freed blocks are pushed
    back (LIFO), so the same calls always get the same blocks.

    Usage: the pool is shared, so ``state_capacity_bytes`` counts the blocks holding state
    now and ``kv_capacity_bytes`` the rest of the pool (free blocks go to either).
    """

    name = "unified"

    def __init__(self, geometry: ModelGeometry, config: MemoryConfig) -> None:
        super().__init__(geometry, config)
        self.vllm = VllmBlockGeometry.from_geometry(geometry, config.block_size)
        self.block_size = self.vllm.block_size
        self.page_bytes = self.vllm.page_bytes
        self.group_size = self.vllm.group_size
        self.block_bytes = self.vllm.block_bytes
        self.num_blocks = config.budget_bytes // self.block_bytes
        self.num_usable_blocks = max(0, self.num_blocks - 1)
        self._tokens_per_block = self.vllm.block_size or 1
        self._attention_groups = self.vllm.num_attention_groups
        self._state_groups = self.vllm.num_state_groups
        self._free = list(range(self.num_blocks - 1, NULL_BLOCK, -1))

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks one request of ``num_tokens`` tokens holds."""
        pages = ceil_div(num_tokens, self._tokens_per_block) * self._attention_groups
        return self._state_groups + pages

    def fits_alone(self, num_tokens: int) -> bool:
        return self.num_blocks_for(num_tokens) <= self.num_usable_blocks

    def admit(self, request_id: int, num_tokens: int) -> RequestUnits | None:
        self._check_new(request_id, num_tokens)
        num_state = self._state_groups
        num_pages = ceil_div(num_tokens, self._tokens_per_block) * self._attention_groups
        free = self._free
        total = num_state + num_pages
        if total > len(free):
            self.stats.num_oom_events += 1
            return None
        taken = free[-total:][::-1] if total else []
        if total:
            del free[-total:]
        state, pages = taken[:num_state], taken[num_state:]
        if self._attention_groups > 1:
            pages = _group_major(pages, self._attention_groups)
        slot = state[0] if state else NO_SLOT
        self._admitted(request_id, _Request(num_tokens, slot, state, pages))
        return RequestUnits(slot, tuple(pages))

    def grow(self, request_id: int, num_new_tokens: int) -> list[int] | None:
        request = self._get(request_id)
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        old, new = request.num_tokens, request.num_tokens + num_new_tokens
        per_group = ceil_div(new, self._tokens_per_block) - ceil_div(old, self._tokens_per_block)
        total = per_group * self._attention_groups
        if total == 0:
            request.num_tokens = new
            self.stats.num_grows += 1
            return []
        self._check_grow(request_id, new)
        free = self._free
        if total > len(free):
            self.stats.num_oom_events += 1
            return None
        added = free[-total:][::-1]
        del free[-total:]
        if self._attention_groups == 1:
            request.pages += added
        else:
            request.pages = _extend_group_major(request.pages, added, self._attention_groups)
        request.num_tokens = new
        self.stats.num_grows += 1
        return added

    def free(self, request_id: int) -> None:
        request = self._pop_live(request_id)
        # Block ids are interchangeable with prefix caching off, so the stack is not
        # re-sorted: LIFO reuse is deterministic and costs O(blocks freed).
        self._free += request.pages
        self._free += request.state_blocks

    def units(self, request_id: int) -> RequestUnits:
        request = self._get(request_id)
        return RequestUnits(request.slot, tuple(request.pages))

    def state_blocks(self, request_id: int) -> tuple[int, ...]:
        """Every block holding a live request's state, one per recurrent group."""
        return tuple(self._get(request_id).state_blocks)

    def usage(self) -> MemoryUsage:
        return unified_usage(self, self.num_usable_blocks, self.block_bytes)

    def check_integrity(self) -> None:
        self._check_requests()
        owned = [b for r in self._live.values() for b in (*r.state_blocks, *r.pages)]
        assert len(self._free) == len(set(self._free)), "a block is free twice"
        assert not set(owned) & set(self._free), "a block is both free and owned"
        assert len(owned) + len(self._free) == self.num_usable_blocks, "blocks are not conserved"
        in_range = all(NULL_BLOCK < b < self.num_blocks for b in self._free)
        assert in_range, "a free block is out of range (or is the null block)"
        for request in self._live.values():
            assert len(request.state_blocks) == self._state_groups, "wrong number of state blocks"
            want = ceil_div(request.num_tokens, self._tokens_per_block) * self._attention_groups
            assert len(request.pages) == want, "pages do not match the request's tokens"


def unified_usage(table: _RequestTable, num_usable_blocks: int, block_bytes: int) -> MemoryUsage:
    """Usage of a unified pool whose requests list their state blocks and attention
    blocks: the pool is shared, so ``state_capacity_bytes`` counts the blocks holding
    state now and ``kv_capacity_bytes`` the rest of the pool (free blocks go to either)."""
    live = table._live.values()
    num_state = sum(len(r.state_blocks) for r in live)
    num_pages = sum(len(r.pages) for r in live)
    tokens = sum(r.num_tokens for r in live)
    state_used = num_state * block_bytes
    has_state = bool(table.geometry.recurrent_layers)
    return MemoryUsage(
        budget_bytes=table.config.budget_bytes,
        kv_capacity_bytes=num_usable_blocks * block_bytes - state_used,
        state_capacity_bytes=state_used,
        kv_used_bytes=num_pages * block_bytes,
        state_used_bytes=state_used,
        kv_needed_bytes=tokens * table.geometry.kv_bytes_per_token,
        state_needed_bytes=len(live) * table.geometry.state_bytes_per_request,
        num_requests=len(live),
        num_pages_used=num_pages,
        num_slots_used=len(live) if has_state else 0,
    )


def _group_major(blocks: list[int], num_groups: int) -> list[int]:
    """Deal blocks taken in order to groups: group g gets blocks g, g + n, g + 2n, ...,
    then list them group by group."""
    return [b for g in range(num_groups) for b in blocks[g::num_groups]]


def _extend_group_major(pages: list[int], added: list[int], num_groups: int) -> list[int]:
    old = len(pages) // num_groups
    groups = [pages[g * old : (g + 1) * old] + added[g::num_groups] for g in range(num_groups)]
    return [b for group in groups for b in group]


# ------------------------------------------------------------------------------ static


def static_state_fraction(
    geometry: ModelGeometry,
    state_fraction: float | None = None,
    mamba_full_memory_ratio: float | None = None,
) -> float:
    """The share of the budget SGLang gives the state pool.

    ``state_fraction`` F is used as given; SGLang's ``mamba_full_memory_ratio`` r means
    r / (1 + r) (default r = 0.9, about 47%). A model with only one kind of cache gives
    it the whole budget, since the other pool would never be used.

    Raises:
        ValueError: both were given, or either is out of range.
    """
    if state_fraction is not None and mamba_full_memory_ratio is not None:
        raise ValueError("give state_fraction or mamba_full_memory_ratio, not both")
    if state_fraction is not None and not 0.0 < state_fraction < 1.0:
        raise ValueError(f"state_fraction must be in (0, 1), got {state_fraction}")
    if mamba_full_memory_ratio is not None and not mamba_full_memory_ratio > 0.0:
        raise ValueError(f"mamba_full_memory_ratio must be > 0, got {mamba_full_memory_ratio}")
    if not geometry.recurrent_layers:
        return 0.0
    if not geometry.attention_layers:
        return 1.0
    if state_fraction is not None:
        return state_fraction
    ratio = mamba_full_memory_ratio
    if ratio is None:
        ratio = SGLANG_MAMBA_FULL_MEMORY_RATIO
    return ratio / (1.0 + ratio)


class StaticAllocator(_PagedRequestTable):
    """SGLang's two pools, split once: exact pages of ``config.block_size`` tokens and
    exact slots. A full state pool stops admission even when the KV pool is empty, and
    the other way round; nothing moves between them.

    Free pages and slots are stacks that start lowest on top; freed units are pushed back
    (LIFO), so the same calls always get the same units.
    """

    name = "static"

    def __init__(
        self,
        geometry: ModelGeometry,
        config: MemoryConfig,
        *,
        state_fraction: float | None = None,
        mamba_full_memory_ratio: float | None = None,
    ) -> None:
        super().__init__(geometry, config)
        self.spec = CacheSpec.from_geometry(geometry, config.block_size)
        self.state_fraction = static_state_fraction(
            geometry, state_fraction, mamba_full_memory_ratio
        )
        state_budget = int(config.budget_bytes * self.state_fraction)
        slot_bytes, page_bytes = self.spec.slot_bytes, self.spec.page_bytes
        self.num_slots = state_budget // slot_bytes if slot_bytes else 0
        self.num_pages = (config.budget_bytes - state_budget) // page_bytes if page_bytes else 0
        self._needs_slot = slot_bytes > 0
        self._tokens_per_page = config.block_size if page_bytes else 0
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self._free_pages = list(range(self.num_pages - 1, -1, -1))

    def _pages_for(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self._tokens_per_page) if self._tokens_per_page else 0

    def fits_alone(self, num_tokens: int) -> bool:
        return self._pages_for(num_tokens) <= self.num_pages and self.num_slots >= self._needs_slot

    def admit(self, request_id: int, num_tokens: int) -> RequestUnits | None:
        self._check_new(request_id, num_tokens)
        num_pages = self._pages_for(num_tokens)
        free_pages, free_slots = self._free_pages, self._free_slots
        if num_pages > len(free_pages) or (self._needs_slot and not free_slots):
            self.stats.num_oom_events += 1
            return None
        slot = free_slots.pop() if self._needs_slot else NO_SLOT
        pages = free_pages[-num_pages:][::-1] if num_pages else []
        if num_pages:
            del free_pages[-num_pages:]
        self._admitted(request_id, _Request(num_tokens, slot, [], pages))
        return RequestUnits(slot, tuple(pages))

    def _take_grow_pages(self, num_pages: int) -> list[int] | None:
        free_pages = self._free_pages
        if num_pages > len(free_pages):
            return None
        added = free_pages[-num_pages:][::-1]
        del free_pages[-num_pages:]
        return added

    def free(self, request_id: int) -> None:
        request = self._pop_live(request_id)
        self._free_pages += request.pages
        if request.slot != NO_SLOT:
            self._free_slots.append(request.slot)

    def units(self, request_id: int) -> RequestUnits:
        request = self._get(request_id)
        return RequestUnits(request.slot, tuple(request.pages))

    def usage(self) -> MemoryUsage:
        num_pages = sum(len(r.pages) for r in self._live.values())
        num_slots = self.num_slots - len(self._free_slots)
        tokens = sum(r.num_tokens for r in self._live.values())
        return MemoryUsage(
            budget_bytes=self.config.budget_bytes,
            kv_capacity_bytes=self.num_pages * self.spec.page_bytes,
            state_capacity_bytes=self.num_slots * self.spec.slot_bytes,
            kv_used_bytes=num_pages * self.spec.page_bytes,
            state_used_bytes=num_slots * self.spec.slot_bytes,
            kv_needed_bytes=tokens * self.geometry.kv_bytes_per_token,
            state_needed_bytes=len(self._live) * self.spec.slot_bytes,
            num_requests=len(self._live),
            num_pages_used=num_pages,
            num_slots_used=num_slots,
        )

    def check_integrity(self) -> None:
        self._check_requests()
        pages = [p for r in self._live.values() for p in r.pages]
        _check_stack(self._free_pages, pages, self.num_pages)
        slots = [r.slot for r in self._live.values() if r.slot != NO_SLOT]
        _check_stack(self._free_slots, slots, self.num_slots)
        for request in self._live.values():
            want = self._pages_for(request.num_tokens)
            assert len(request.pages) == want, "pages do not match the request's tokens"
            assert (request.slot != NO_SLOT) == self._needs_slot, "slot missing or unexpected"


def _check_stack(free: list[int], owned: list[int], num_units: int) -> None:
    """Free and owned unit ids partition ``range(num_units)``."""
    assert len(owned) == len(set(owned)), "a unit is owned twice"
    assert len(free) == len(set(free)), "a unit is free twice"
    assert not set(owned) & set(free), "a unit is both free and owned"
    assert len(owned) + len(free) == num_units, "units are not conserved"
    assert all(0 <= u < num_units for u in free), "a free unit is out of range"


# ------------------------------------------------------------------------------ oracle


class OracleAllocator(_PagedRequestTable):
    """Exact bytes with free, instant migration: a request is admitted (or grown) while
    the exact bytes in use (whole slots plus pages of ``config.block_size`` tokens, no
    chunk rounding) fit the budget. No layout can hold more; it is the reference.

    Unit ids are recycled lowest-freed-last (a stack) and new ids are minted in order;
    they only exist so that the interface can name units.
    """

    name = "oracle"

    def __init__(self, geometry: ModelGeometry, config: MemoryConfig) -> None:
        super().__init__(geometry, config)
        self.spec = CacheSpec.from_geometry(geometry, config.block_size)
        self._page_bytes = self.spec.page_bytes
        self._slot_bytes = self.spec.slot_bytes
        self._tokens_per_page = config.block_size if self._page_bytes else 0
        self._budget = config.budget_bytes
        self._used_bytes = 0
        self._free_pages: list[int] = []
        self._free_slots: list[int] = []
        self._num_page_ids = 0
        self._num_slot_ids = 0

    def _pages_for(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self._tokens_per_page) if self._tokens_per_page else 0

    def fits_alone(self, num_tokens: int) -> bool:
        return self._slot_bytes + self._pages_for(num_tokens) * self._page_bytes <= self._budget

    def _take_pages(self, num_pages: int) -> list[int]:
        free = self._free_pages
        reused = min(num_pages, len(free))
        pages = free[-reused:][::-1] if reused else []
        if reused:
            del free[-reused:]
        if num_pages > reused:
            start = self._num_page_ids
            self._num_page_ids = start + num_pages - reused
            pages += range(start, self._num_page_ids)
        return pages

    def admit(self, request_id: int, num_tokens: int) -> RequestUnits | None:
        self._check_new(request_id, num_tokens)
        num_pages = self._pages_for(num_tokens)
        need = self._slot_bytes + num_pages * self._page_bytes
        if self._used_bytes + need > self._budget:
            self.stats.num_oom_events += 1
            return None
        self._used_bytes += need
        slot = NO_SLOT
        if self._slot_bytes:
            if self._free_slots:
                slot = self._free_slots.pop()
            else:
                slot, self._num_slot_ids = self._num_slot_ids, self._num_slot_ids + 1
        pages = self._take_pages(num_pages)
        self._admitted(request_id, _Request(num_tokens, slot, [], pages))
        return RequestUnits(slot, tuple(pages))

    def _take_grow_pages(self, num_pages: int) -> list[int] | None:
        need = num_pages * self._page_bytes
        if self._used_bytes + need > self._budget:
            return None
        self._used_bytes += need
        return self._take_pages(num_pages)

    def free(self, request_id: int) -> None:
        request = self._pop_live(request_id)
        self._used_bytes -= len(request.pages) * self._page_bytes
        self._free_pages += request.pages
        if request.slot != NO_SLOT:
            self._used_bytes -= self._slot_bytes
            self._free_slots.append(request.slot)

    def units(self, request_id: int) -> RequestUnits:
        request = self._get(request_id)
        return RequestUnits(request.slot, tuple(request.pages))

    def usage(self) -> MemoryUsage:
        """Capacity follows use exactly: each pool's capacity is what it uses, and the
        free bytes stay unassigned, ready for either pool."""
        num_pages = sum(len(r.pages) for r in self._live.values())
        num_slots = sum(r.slot != NO_SLOT for r in self._live.values())
        tokens = sum(r.num_tokens for r in self._live.values())
        kv_used, state_used = num_pages * self._page_bytes, num_slots * self._slot_bytes
        return MemoryUsage(
            budget_bytes=self._budget,
            kv_capacity_bytes=kv_used,
            state_capacity_bytes=state_used,
            kv_used_bytes=kv_used,
            state_used_bytes=state_used,
            kv_needed_bytes=tokens * self.geometry.kv_bytes_per_token,
            state_needed_bytes=state_used,
            num_requests=len(self._live),
            num_pages_used=num_pages,
            num_slots_used=num_slots,
        )

    def check_integrity(self) -> None:
        self._check_requests()
        pages = [p for r in self._live.values() for p in r.pages]
        _check_stack(self._free_pages, pages, self._num_page_ids)
        slots = [r.slot for r in self._live.values() if r.slot != NO_SLOT]
        _check_stack(self._free_slots, slots, self._num_slot_ids)
        used = len(pages) * self._page_bytes + len(slots) * self._slot_bytes
        assert used == self._used_bytes, "byte count drifted"
        assert used <= self._budget, "more bytes in use than the budget"
        for request in self._live.values():
            want = self._pages_for(request.num_tokens)
            assert len(request.pages) == want, "pages do not match the request's tokens"
