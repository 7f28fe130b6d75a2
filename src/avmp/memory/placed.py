"""The baselines placed in real memory, so that the engine runs them with AVMP's kernels.

The allocators of baselines.py only count units; the engine needs to know where each
unit's bytes are. Two layouts here carry the same decisions onto a backing:

- `StaticSplitManager` ("static"): SGLang's split. The AVMP manager with both pools
  sized once at start-up (the state pool gets ``static_state_fraction`` of the chunks) and
  migration off: a short pool fails the allocation even when the other is empty. Pools
  hold whole chunks, so each may hold one unit less than `StaticAllocator`'s exact split.
- `PlacedUnifiedAllocator` ("unified"): vLLM v1's one pool of equal blocks
  (`UnifiedLayout`), in one buffer of ``num_blocks`` blocks. An attention block of ``B``
  tokens is ``B / block_size`` consecutive kernel pages (vLLM's kernel-block split), so the
  attention kernels read it as ordinary pages; a request's state is one slot spanning its
  ``S`` state blocks.

Deviation from vLLM: vLLM's ``S`` state blocks of a request may lie anywhere, since each
group of recurrent layers indexes its own block; our kernels read one slot per request, so
the ``S`` blocks must form one aligned run (state group ``g`` = blocks ``g*S .. g*S+S-1``).
State runs take the highest wholly free group; attention blocks take the lowest free block
of a group that is not wholly free (a hole), and break the lowest whole group only when no
hole is left, so runs survive as long as the free blocks allow. An admission that has
enough free blocks (vLLM would admit) but no whole group fails and is counted in
``num_placement_failures``: how often the deviation changed a decision.
"""

from __future__ import annotations

import heapq

from avmp.memory.backing.base import Backing
from avmp.memory.backing.layout import CacheLayout
from avmp.memory.baselines import NO_SLOT, NULL_BLOCK, UnifiedLayout, static_state_fraction
from avmp.memory.manager import AvmpManager
from avmp.memory.spec import (
    CacheAllocator,
    CacheSpec,
    DoubleFreeError,
    DuplicateRequestError,
    MemoryConfig,
    MemoryUsage,
    PoolKind,
    RequestBlocks,
    RequestTooLargeError,
    UnknownRequestError,
)
from avmp.models.geometry import ModelGeometry


class StaticSplitManager(AvmpManager):
    """Two pools split once at start-up, nothing migrates (SGLang on our memory).

    Args:
        state_fraction, mamba_full_memory_ratio: the split, as for `StaticAllocator`
            (default: SGLang's ratio 0.9, about 47% of the budget for state).
    """

    name = "static"

    def __init__(
        self,
        geometry: ModelGeometry,
        config: MemoryConfig,
        backing: Backing | None = None,
        *,
        state_fraction: float | None = None,
        mamba_full_memory_ratio: float | None = None,
    ) -> None:
        super().__init__(geometry, config, backing)
        self.state_fraction = static_state_fraction(
            geometry, state_fraction, mamba_full_memory_ratio
        )
        num_state = round(config.num_chunks * self.state_fraction)
        if num_state:
            self._take_reserve(PoolKind.STATE, num_state)
        if config.num_chunks - num_state:
            self._take_reserve(PoolKind.KV, config.num_chunks - num_state)
        self.events.clear()  # the start-up split is not a run-time event
        has_slot = self._state.num_units >= self._slots_per_request
        self._max_pages_alone = self._kv.num_units if has_slot else -1
        if not self._has_pages and has_slot:
            self._max_pages_alone = 0

    def _make_room(self, num_pages: int, num_slots: int) -> bool:
        """Nothing to take: the split is fixed. Count the OOM event."""
        self.stats.num_failed_allocations += 1
        return False


class _Placed:
    """One live request of the unified pool: its state group, its attention blocks and
    their kernel pages (kept, since the engine reads them every step)."""

    __slots__ = ("num_tokens", "group", "blocks", "pages")

    def __init__(self, num_tokens: int, group: int, blocks: list[int], pages: list[int]) -> None:
        self.num_tokens = num_tokens
        self.group = group
        self.blocks = blocks
        self.pages = pages


class PlacedUnifiedAllocator(CacheAllocator):
    """vLLM's padded block pool with a place for every byte (see the module doc).

    Units as the engine sees them: ``spec.page_bytes`` is one kernel page
    (``block_size`` tokens of every attention layer) and ``spec.slot_bytes`` one state run
    (``S`` blocks); `cache_layout()` gives the matching byte layout. `blocks` lists kernel
    pages, ``k`` per attention block; the slot is the request's state group.

    Raises:
        ValueError: a model whose attention layers form more than one vLLM group, or whose
            attention block is not a whole number of kernel pages.
    """

    name = "unified"

    def __init__(self, geometry: ModelGeometry, config: MemoryConfig) -> None:
        super().__init__(geometry, config)
        self.vllm = UnifiedLayout.from_geometry(geometry, config.block_size)
        self._layout = CacheLayout.from_geometry(geometry, config.block_size)
        self._block_bytes = self.vllm.block_bytes
        self._tokens_per_block = self.vllm.block_size or 1
        self._pages_per_block = self._check_geometry()
        self._run = self.vllm.num_state_groups  # blocks per request's state
        self.num_blocks = config.budget_bytes // self._block_bytes
        self.num_groups = self.num_blocks // self._run if self._run else 0
        self.spec = CacheSpec(
            page_bytes=self._layout.page.unit_bytes,
            slot_bytes=self._run * self._block_bytes,
            block_size=config.block_size,
            kv_bytes_per_token=geometry.kv_bytes_per_token,
        )
        self._is_free = bytearray(b"\x01") * self.num_blocks
        if self.num_blocks:
            self._is_free[NULL_BLOCK] = 0  # vLLM's null block, never handed out
        self._num_free = max(0, self.num_blocks - 1)
        self._group_free = [self._run] * self.num_groups
        if self.num_groups:
            self._group_free[0] -= 1
        # heaps whose entries may be stale (checked when popped): free blocks outside
        # whole groups, and whole groups (lowest first, and highest first negated)
        self._holes = [b for b in range(1, self.num_blocks) if not self._in_whole_group(b)]
        whole = [g for g in range(self.num_groups) if self._group_free[g] == self._run]
        self._whole_low = list(whole)
        self._whole_high = [-g for g in reversed(whole)]
        self._live: dict[int, _Placed] = {}
        self._freed: set[int] = set()
        self.num_placement_failures = 0

    def _check_geometry(self) -> int:
        """Kernel pages per attention block (0 without attention)."""
        if not self.geometry.attention_layers:
            return 0
        if self.vllm.num_attention_groups != 1:
            raise ValueError(
                f"{self.geometry.name}: its attention layers form "
                f"{self.vllm.num_attention_groups} vLLM groups; the placed unified layout "
                "needs one"
            )
        pages, rest = divmod(self._block_bytes, self._layout.page.unit_bytes)
        if rest or pages * self.config.block_size != self._tokens_per_block:
            raise ValueError(
                f"{self.geometry.name}: a {self._tokens_per_block}-token attention block of "
                f"{self._block_bytes} bytes is not whole {self.config.block_size}-token pages"
            )
        return pages

    def cache_layout(self) -> CacheLayout:
        """The engine's byte layout: kernel pages as usual, the slot padded to a run."""
        if self._layout.slot.unit_bytes > self.spec.slot_bytes:
            raise ValueError("a state run is smaller than one slot")  # UnifiedLayout forbids it
        slot = self._layout.slot
        padded = type(slot)(slot.tensors, self.spec.slot_bytes, slot.exact_bytes)
        return CacheLayout(self._layout.block_size, self._layout.alignment_bytes,
                           self._layout.page, padded)

    # -- sizes ----------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        if not self._pages_per_block:
            return 0
        return -(-num_tokens // self._tokens_per_block)

    def fits_alone(self, num_tokens: int) -> bool:
        need = self._run + self._blocks_for(num_tokens)
        has_group = not self._run or self.num_groups >= 2  # group 0 holds the null block
        return need <= max(0, self.num_blocks - 1) and has_group

    # -- block choice ---------------------------------------------------------------

    def _group_of(self, block: int) -> int:
        """The state group holding ``block``, or -1 (no state, or past the last group)."""
        group = block // self._run if self._run else -1
        return group if group < self.num_groups else -1

    def _in_whole_group(self, block: int) -> bool:
        group = self._group_of(block)
        return group >= 0 and self._group_free[group] == self._run

    def _take_block(self) -> int:
        """The lowest hole, else the lowest block of the lowest whole group (the caller
        checked that a block is free)."""
        holes = self._holes
        while holes:
            block = heapq.heappop(holes)
            if self._is_free[block] and not self._in_whole_group(block):
                self._mark(block, taken=True)
                return block
        group = self._pop_whole(self._whole_low, 1)
        block = group * self._run
        self._mark(block, taken=True)
        return block

    def _pop_whole(self, heap: list[int], sign: int) -> int:
        """Pop the first whole group of ``heap`` (ids stored times ``sign``), or -1."""
        while heap:
            group = sign * heapq.heappop(heap)
            if self._group_free[group] == self._run:
                return group
        return -1

    def _mark(self, block: int, *, taken: bool) -> None:
        """Flip one block, keeping the free counts and the heaps' candidates current."""
        self._is_free[block] = 0 if taken else 1
        self._num_free += -1 if taken else 1
        group = self._group_of(block)
        if group < 0:
            if not taken:
                heapq.heappush(self._holes, block)
            return
        run = self._run
        was_whole = self._group_free[group] == run
        self._group_free[group] += -1 if taken else 1
        if taken and was_whole:  # a broken group's other blocks become holes
            for other in range(group * run, (group + 1) * run):
                if self._is_free[other]:
                    heapq.heappush(self._holes, other)
        elif not taken and self._group_free[group] == run:
            heapq.heappush(self._whole_low, group)
            heapq.heappush(self._whole_high, -group)
        elif not taken:
            heapq.heappush(self._holes, block)

    # -- the allocator interface ----------------------------------------------------

    def admit(self, request_id: int, num_tokens: int) -> RequestBlocks | None:
        if request_id in self._live:
            raise DuplicateRequestError(f"request {request_id} is already live")
        if num_tokens <= 0:
            raise ValueError(f"num_tokens must be positive, got {num_tokens}")
        if not self.fits_alone(num_tokens):
            raise RequestTooLargeError(
                f"request {request_id} of {num_tokens} tokens does not fit in an empty "
                f"unified pool of {self.num_blocks} blocks"
            )
        num_blocks = self._blocks_for(num_tokens)
        if self._run + num_blocks > self._num_free:
            self.stats.num_failed_allocations += 1
            return None
        group = NO_SLOT
        if self._run:
            group = self._pop_whole(self._whole_high, -1)
            if group < 0:
                self.stats.num_failed_allocations += 1
                self.num_placement_failures += 1
                return None
            for block in range(group * self._run, (group + 1) * self._run):
                self._mark(block, taken=True)
        blocks = [self._take_block() for _ in range(num_blocks)]
        self._live[request_id] = _Placed(num_tokens, group, blocks, self._kernel_pages(blocks))
        self._freed.discard(request_id)
        self.stats.num_admits += 1
        return self.blocks(request_id)

    def grow(self, request_id: int, num_new_tokens: int) -> list[int] | None:
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be positive, got {num_new_tokens}")
        request = self._get(request_id)
        new_tokens = request.num_tokens + num_new_tokens
        extra = self._blocks_for(new_tokens) - len(request.blocks)
        if extra and not self.fits_alone(new_tokens):
            raise RequestTooLargeError(
                f"request {request_id} grown to {new_tokens} tokens does not fit in an empty "
                f"unified pool of {self.num_blocks} blocks"
            )
        if extra > self._num_free:
            self.stats.num_failed_allocations += 1
            return None
        added = [self._take_block() for _ in range(extra)]
        pages = self._kernel_pages(added)
        request.blocks += added
        request.pages += pages
        request.num_tokens = new_tokens
        self.stats.num_grows += 1
        return pages

    def free(self, request_id: int) -> None:
        request = self._live.pop(request_id, None)
        if request is None:
            if request_id in self._freed:
                raise DoubleFreeError(f"request {request_id} was already freed")
            raise UnknownRequestError(f"request {request_id} was never admitted")
        for block in request.blocks:
            self._mark(block, taken=False)
        if request.group != NO_SLOT:
            for block in range(request.group * self._run, (request.group + 1) * self._run):
                self._mark(block, taken=False)
        self._freed.add(request_id)
        self.stats.num_frees += 1

    def _kernel_pages(self, blocks: list[int]) -> list[int]:
        k = self._pages_per_block
        return [block * k + i for block in blocks for i in range(k)]

    def _get(self, request_id: int) -> _Placed:
        request = self._live.get(request_id)
        if request is None:
            raise UnknownRequestError(f"request {request_id} is not live")
        return request

    def blocks(self, request_id: int) -> RequestBlocks:
        request = self._get(request_id)
        return RequestBlocks(request.group, tuple(request.pages))

    def num_tokens(self, request_id: int) -> int:
        return self._get(request_id).num_tokens

    @property
    def request_ids(self) -> list[int]:
        return list(self._live)

    def usage(self) -> MemoryUsage:
        """As `UnifiedAllocator.usage`: state capacity is the blocks holding state now."""
        num_attention = sum(len(r.blocks) for r in self._live.values())
        tokens = sum(r.num_tokens for r in self._live.values())
        state_used = len(self._live) * self._run * self._block_bytes
        pool_bytes = max(0, self.num_blocks - 1) * self._block_bytes
        return MemoryUsage(
            budget_bytes=self.config.budget_bytes,
            kv_capacity_bytes=pool_bytes - state_used,
            state_capacity_bytes=state_used,
            kv_used_bytes=num_attention * self._block_bytes,
            state_used_bytes=state_used,
            kv_needed_bytes=tokens * self.geometry.kv_bytes_per_token,
            state_needed_bytes=len(self._live) * self.geometry.state_bytes_per_request,
            num_requests=len(self._live),
            num_pages_used=num_attention,  # vLLM blocks, as UnifiedAllocator counts
            num_slots_used=len(self._live) if self._run else 0,
        )

    def check_integrity(self) -> None:
        owned: list[int] = []
        for request in self._live.values():
            assert len(request.blocks) == self._blocks_for(request.num_tokens), "block count"
            assert request.pages == self._kernel_pages(request.blocks), "kernel pages drifted"
            owned += request.blocks
            if request.group != NO_SLOT:
                owned += range(request.group * self._run, (request.group + 1) * self._run)
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert NULL_BLOCK not in owned or not self.num_blocks, "the null block is handed out"
        assert all(not self._is_free[b] for b in owned), "an owned block is marked free"
        assert self._num_free == sum(self._is_free), "free count drifted"
        assert len(owned) + self._num_free == max(0, self.num_blocks - 1), "blocks not conserved"
        for group, free in enumerate(self._group_free):
            blocks = range(group * self._run, (group + 1) * self._run)
            assert free == sum(self._is_free[b] for b in blocks), f"group {group} count"
        assert not (self._freed & self._live.keys()), "a live request is marked freed"
