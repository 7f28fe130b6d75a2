"""The unified layout: vLLM v1's one pool of equal blocks (prefix caching off), with a
place for every byte so that the engine runs it with AVMP's kernels.

The attention block is enlarged until one attention page holds one recurrent layer's
state, and the state page is padded up to it (`VllmBlockGeometry`). The pool is
``num_blocks`` blocks in one buffer. An attention block of ``B`` tokens is
``B / block_size`` consecutive kernel pages (vLLM's kernel-block split), so the
attention kernels read it as ordinary pages; a request's state is one slot spanning its
``S`` state blocks. Without a backing this is bookkeeping only (the simulator's case).

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

from collections.abc import Sequence
from dataclasses import dataclass

from avmp.memory.backing.base import Backing
from avmp.memory.backing.unit_format import CacheFormat, UnitFormat
from avmp.memory.cached import CachedUnits
from avmp.memory.requests import LiveRequest, RequestTable, check_num_tokens, check_request_id
from avmp.memory.spec import (
    NO_SLOT,
    AllocatorError,
    CacheSpec,
    MemoryConfig,
    MemoryUsage,
    PoolKind,
    RequestUnits,
)
from avmp.models.geometry import ModelGeometry
from avmp.units import ceil_div

NULL_BLOCK = 0  # vLLM's BlockPool reserves block 0 as its null block, never allocated
VLLM_BLOCK_ALIGNMENT_TOKENS = 16  # vLLM rounds the hybrid attention block to this many tokens
VLLM_GROUP_SIZE_SLACK = 1.25  # vLLM uses the larger layer count when within 25% of the smaller
MAX_CACHED_IDS = 1 << 20  # ids kept as int objects (~40 MB): a 256 GiB pool of 256 KiB pages


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


def unified_buffer_bytes(geometry: ModelGeometry, config: MemoryConfig) -> int:
    """Bytes of the one buffer that holds the unified pool: its whole blocks."""
    block_bytes = VllmBlockGeometry.from_geometry(geometry, config.block_size).block_bytes
    return config.budget_bytes // block_bytes * block_bytes


def _unified_usage(
    table: UnifiedAllocator, num_usable_blocks: int, block_bytes: int
) -> MemoryUsage:
    """Usage of a unified pool whose requests list their state blocks and attention
    blocks: the pool is shared, so ``state_capacity_bytes`` counts the blocks holding
    state now (checkpoints' runs included) and ``kv_capacity_bytes`` the rest of the pool
    (free blocks go to either). A block shared through the prefix cache counts once."""
    live = table._live.values()
    cached = table._cached
    num_checkpoint_blocks = len(cached.held(PoolKind.STATE)) * table._run
    num_state = sum(len(r.state_blocks) for r in live) + num_checkpoint_blocks
    num_pages = num_usable_blocks - table._num_free - num_state
    tokens = sum(r.num_tokens - r.num_adopted * table._tokens_per_block for r in live)
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
        kv_cached_bytes=cached.num_cache_only(PoolKind.KV) * block_bytes,
        state_cached_bytes=num_checkpoint_blocks * block_bytes,
    )


def _id_table(num_ids: int) -> Sequence[int]:
    """Ids ``0 .. num_ids - 1`` to slice a request's ids from.

    A list of int objects made once (about 36 bytes per id, and a kernel page is 256 KiB
    or more), so that admitting a request allocates no int objects and freeing it
    deallocates none: that churn cost an eighth of an admission and a fifth of a free.
    A pool of more than `MAX_CACHED_IDS` ids gets a range, sliced the same way, as the
    objects would then cost more memory than they save time.
    """
    return list(range(num_ids)) if num_ids <= MAX_CACHED_IDS else range(num_ids)


class _Placed(LiveRequest):
    """One live request of the unified pool: ``slot`` is its state group,
    ``state_blocks`` that group's blocks, ``pages`` its attention blocks, and
    ``kernel_pages`` theirs (kept, since the engine reads them every step)."""

    __slots__ = ("kernel_pages", "num_adopted")

    def __init__(self, num_tokens: int, group: int, state_blocks: list[int],
                 blocks: list[int], kernel_pages: list[int], num_adopted: int) -> None:  # fmt: skip
        # the fields set here, not through super().__init__: one call less per admission
        self.num_tokens = num_tokens
        self.slot = group
        self.state_blocks = state_blocks
        self.pages = blocks
        self.kernel_pages = kernel_pages
        self.num_adopted = num_adopted  # leading blocks adopted from the prefix cache


class UnifiedAllocator(RequestTable[_Placed]):
    """vLLM's padded block pool with a place for every byte (see the module doc).

    Block 0 is vLLM's null block (the entry its block tables point at when empty) and is
    never handed out, so ``num_usable_blocks = num_blocks - 1``.

    Units as the engine sees them: ``spec.page_bytes`` is one kernel page
    (``block_size`` tokens of every attention layer) and ``spec.slot_bytes`` one state run
    (``S`` blocks); `cache_format()` gives the matching byte format. `blocks` lists kernel
    pages, ``k`` per attention block; the slot is the request's state group.

    Raises:
        ValueError: a model whose attention layers form more than one vLLM group, or whose
            attention block is not a whole number of kernel pages.
    """

    name = "unified"

    def __init__(
        self, geometry: ModelGeometry, config: MemoryConfig, backing: Backing | None = None
    ) -> None:
        super().__init__(geometry, config)
        self.vllm = VllmBlockGeometry.from_geometry(geometry, config.block_size)
        self._format = CacheFormat.from_geometry(geometry, config.block_size)
        self._block_bytes = self.vllm.block_bytes
        self._tokens_per_block = self.vllm.block_size or 1
        self._pages_per_block = self._check_geometry()
        self._run = self.vllm.num_state_groups  # blocks per request's state
        self.num_blocks = unified_buffer_bytes(geometry, config) // self._block_bytes
        self.num_usable_blocks = max(0, self.num_blocks - 1)  # block 0 is vLLM's null block
        self.num_groups = self.num_blocks // self._run if self._run else 0
        has_group = not self._run or self.num_groups >= 2  # group 0 holds the null block
        # attention blocks one request may hold alone (-1: not even its state run fits)
        self._max_blocks_alone = self.num_usable_blocks - self._run if has_group else -1
        self._run_taken = bytes(self._run)  # a run's map bytes, made once, not per call
        self._block_ids = _id_table(self.num_blocks)
        self._page_ids = _id_table(self.num_blocks * self._pages_per_block)
        self._run_free = b"\x01" * self._run
        self.spec = CacheSpec(
            page_bytes=self._format.page.unit_bytes,
            slot_bytes=self._run * self._block_bytes,
            block_size=config.block_size,
            kv_bytes_per_token=geometry.kv_bytes_per_token,
        )
        self._is_free = bytearray(b"\x01") * self.num_blocks
        if self.num_blocks:
            self._is_free[NULL_BLOCK] = 0  # vLLM's null block, never handed out
        self._num_free = self.num_usable_blocks
        self._group_free = [self._run] * self.num_groups
        if self.num_groups:
            self._group_free[0] -= 1
        # byte maps searched with find/rfind at C speed: 1 marks a free block outside any
        # wholly free group (a hole), and a wholly free group. Built with slice stores, not
        # a Python step per block: every group but the null block's starts whole.
        self._whole = bytearray(b"\x01") * self.num_groups
        first_whole = 0
        if self.num_groups and self._group_free[0] != self._run:
            self._whole[0] = 0
            first_whole = 1
        self._holes = bytearray(self._is_free)
        start, stop = first_whole * self._run, self.num_groups * self._run
        self._holes[start:stop] = bytes(stop - start)
        self.num_placement_failures = 0
        self._cached = CachedUnits()
        self.backing = backing
        if backing is not None:  # one buffer of `unified_buffer_bytes`, nothing mapped later
            backing.attach(self.spec, config)

    def _check_geometry(self) -> int:
        """Kernel pages per attention block (0 without attention)."""
        if not self.geometry.attention_layers:
            return 0
        if self.vllm.num_attention_groups != 1:
            raise ValueError(
                f"{self.geometry.name}: its attention layers form "
                f"{self.vllm.num_attention_groups} vLLM groups; the unified layout needs one "
                "(its blocks are read as kernel pages)"
            )
        pages, rest = divmod(self._block_bytes, self._format.page.unit_bytes)
        if rest or pages * self.config.block_size != self._tokens_per_block:
            raise ValueError(
                f"{self.geometry.name}: a {self._tokens_per_block}-token attention block of "
                f"{self._block_bytes} bytes is not whole {self.config.block_size}-token pages"
            )
        return pages

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: a page for each layer of a group."""
        return self._block_bytes

    def cache_format(self) -> CacheFormat:
        """The engine's byte format: kernel pages as usual, the slot padded to a run."""
        if self._format.slot.unit_bytes > self.spec.slot_bytes:
            raise ValueError("a state run is smaller than one slot")  # VllmBlockGeometry forbids it
        slot = self._format.slot
        padded = UnitFormat(slot.tensors, self.spec.slot_bytes, slot.exact_bytes)
        return CacheFormat(self._format.block_size, self._format.alignment_bytes,
                           self._format.page, padded)

    # -- sizes ----------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        if not self._pages_per_block:
            return 0
        return ceil_div(num_tokens, self._tokens_per_block)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks one request of ``num_tokens`` tokens holds: its state run and its
        attention blocks."""
        return self._run + self._blocks_for(num_tokens)

    def fits_alone(self, num_tokens: int) -> bool:
        # `_blocks_for` inlined: every admission asks
        blocks = -(-num_tokens // self._tokens_per_block) if self._pages_per_block else 0
        return blocks <= self._max_blocks_alone

    @property
    def kv_unit_tokens(self) -> int:
        """vLLM's attention block: ``k`` kernel pages."""
        return self._tokens_per_block if self._pages_per_block else 0

    def could_hold(self, num_requests: int, num_kv_units: int) -> bool:
        # every request's state run is a whole group; group 0 holds the null block
        if self._run and num_requests > max(0, self.num_groups - 1):
            return False
        return num_requests * self._run + num_kv_units <= self.num_usable_blocks

    # -- block choice ---------------------------------------------------------------

    def _group_of(self, block: int) -> int:
        """The state group holding ``block``, or -1 (no state, or past the last group)."""
        group = block // self._run if self._run else -1
        return group if group < self.num_groups else -1

    def _in_whole_group(self, block: int) -> bool:
        group = self._group_of(block)
        return group >= 0 and self._group_free[group] == self._run

    def _take_blocks(self, num_blocks: int) -> tuple[list[int], list[int]]:
        """The lowest holes, breaking the lowest whole group only when no hole is left
        (the caller checked that enough blocks are free); returns the blocks and their
        kernel pages. The maps are updated inline: a Python call per block would double
        the cost of an admission."""
        is_free, holes, whole, group_free, run = (
            self._is_free, self._holes, self._whole, self._group_free, self._run
        )
        k, num_groups = self._pages_per_block, len(group_free)
        block_ids, page_ids = self._block_ids, self._page_ids
        blocks: list[int] = []
        pages: list[int] = []
        remaining, block = num_blocks, 0
        while remaining:  # one run of consecutive holes per turn
            block = holes.find(1, block)  # no hole is left below the last run taken
            if block < 0:  # break the lowest whole group: its free blocks become holes
                group = whole.find(1)
                whole[group] = 0
                block = group * run
                holes[block : block + run] = is_free[block : block + run]
            stop = holes.find(0, block, block + remaining)  # the run ends, or suffices
            if stop < 0:
                stop = block + remaining if block + remaining < len(holes) else len(holes)
            # item stores, not slice stores: a slice store costs as much as five of them
            for taken in range(block, stop):
                is_free[taken] = 0
                holes[taken] = 0
                if run and taken // run < num_groups:  # blocks past the last group: none
                    group_free[taken // run] -= 1
            blocks += block_ids[block:stop]
            pages += page_ids[block * k : stop * k]  # a block is k consecutive kernel pages
            remaining -= stop - block
            block = stop
        self._num_free -= num_blocks
        return blocks, pages

    def _release_blocks(self, blocks: list[int]) -> None:
        """Free attention blocks; a group that becomes whole again loses its holes."""
        is_free, holes, whole, group_free, run = (
            self._is_free, self._holes, self._whole, self._group_free, self._run
        )
        if not run:  # no state groups: every free block is a hole
            for block in blocks:
                is_free[block] = 1
                holes[block] = 1
        else:
            num_groups, no_holes = len(group_free), self._run_taken
            for block in blocks:
                is_free[block] = 1
                group = block // run
                if group < num_groups:
                    free = group_free[group] + 1
                    group_free[group] = free
                    if free == run:
                        whole[group] = 1
                        holes[group * run : group * run + run] = no_holes
                        continue
                holes[block] = 1
        self._num_free += len(blocks)

    def _take_run(self, group: int) -> list[int]:
        """Take the wholly free ``group`` as one request's state run. A whole group has
        no holes and a run fills its group, so a few slice stores keep every map current
        (a loop over its blocks would cost a Python step each)."""
        run = self._run
        self._is_free[group * run : (group + 1) * run] = self._run_taken
        self._whole[group] = 0
        self._group_free[group] = 0
        self._num_free -= run
        return list(self._block_ids[group * run : (group + 1) * run])

    def _release_run(self, group: int) -> None:
        """Give a state run back: its group is wholly free again, still without holes."""
        run = self._run
        self._is_free[group * run : (group + 1) * run] = self._run_free
        self._whole[group] = 1
        self._group_free[group] = run
        self._num_free += run

    # -- the allocator interface ----------------------------------------------------

    def admit(
        self, request_id: int, num_tokens: int, cached: Sequence[int] = ()
    ) -> RequestUnits | None:
        self._check_new(request_id, num_tokens)
        num_blocks = -(-num_tokens // self._tokens_per_block) if self._pages_per_block else 0
        adopted: list[int] = []
        if cached:
            if len(cached) * self._tokens_per_block > num_tokens or not self._pages_per_block:
                raise AllocatorError(
                    f"{len(cached)} cached blocks hold more than the request's {num_tokens} tokens"
                )
            adopted = self._cached.kv_units(cached)
            num_blocks -= len(adopted)
        if self._run + num_blocks > self._num_free:
            self.stats.num_oom_events += 1
            return None
        group, run = NO_SLOT, []
        if self._run:
            group = self._whole.rfind(1)
            if group < 0:
                self.stats.num_oom_events += 1
                self.num_placement_failures += 1
                return None
            run = self._take_run(group)
        blocks, kernel_pages = self._take_blocks(num_blocks)
        if adopted:
            self._cached.adopt(adopted)
            blocks = adopted + blocks
            kernel_pages = self._kernel_pages(adopted) + kernel_pages
        placed = _Placed(num_tokens, group, run, blocks, kernel_pages, len(adopted))
        self._admitted(request_id, placed)
        return RequestUnits(group, tuple(kernel_pages))

    def grow(self, request_id: int, num_new_tokens: int) -> list[int] | None:
        if type(num_new_tokens) is not int or num_new_tokens <= 0:  # the call only on misuse
            check_num_tokens("num_new_tokens", num_new_tokens)
        # `_get` and `_blocks_for` inlined: each call would add a fifth to a decode step
        if type(request_id) is not int:  # before the lookup: 1.0 == 1 would find request 1
            check_request_id(request_id)
        request = self._live.get(request_id)
        if request is None:
            raise self._freed.not_live(request_id)
        new_tokens = request.num_tokens + num_new_tokens
        blocks = -(-new_tokens // self._tokens_per_block) if self._pages_per_block else 0
        extra = blocks - len(request.pages)
        if not extra:  # most grows (decode steps) stay inside the last block
            request.num_tokens = new_tokens
            self.stats.num_grows += 1
            return []
        self._check_grow(request_id, new_tokens)
        if extra > self._num_free:
            self.stats.num_oom_events += 1
            return None
        added, kernel_pages = self._take_blocks(extra)
        request.pages += added
        request.kernel_pages += kernel_pages
        request.num_tokens = new_tokens
        self.stats.num_grows += 1
        return kernel_pages

    def free(self, request_id: int) -> None:
        request = self._pop_live(request_id)
        self._release_request_blocks(request)
        if request.slot != NO_SLOT:
            self._release_run(request.slot)

    def free_keeping_slot(self, request_id: int) -> int:
        if not self._run:
            raise AllocatorError(f"{self.geometry.name} has no recurrent state to checkpoint")
        request = self._pop_live(request_id)
        self._release_request_blocks(request)
        return self._cached.hold_slot(request.slot)  # its state run stays taken

    def _release_request_blocks(self, request: _Placed) -> None:
        if self._cached.refs:  # blocks the prefix cache or another request also holds
            self._release_blocks(self._cached.freed_of(request.pages))
        else:
            self._release_blocks(request.pages)

    def cache_kv_unit(self, request_id: int, index: int) -> int:
        request = self._get(request_id)
        if type(index) is not int or not 0 <= index < request.num_tokens // self._tokens_per_block:
            raise AllocatorError(
                f"request {request_id} holds no full block {index!r} ({request.num_tokens} tokens)"
            )
        return self._cached.hold_kv(request.pages[index])

    def cache_checkpoint(self) -> int | None:
        """A checkpoint is a whole state run here: ``S`` blocks padded to the attention
        block, as vLLM keeps a cached state in a block of the one pool."""
        if not self._run:
            raise AllocatorError(f"{self.geometry.name} has no recurrent state to checkpoint")
        group = self._whole.rfind(1)
        if group < 0:
            self.stats.num_oom_events += 1
            return None
        self._take_run(group)
        return self._cached.hold_slot(group)

    def release_cached(self, key: int) -> None:
        pool, unit, freed = self._cached.release(key)
        if pool is PoolKind.STATE:
            self._release_run(unit)
        elif freed:
            self._release_blocks([unit])

    def cached_unit(self, key: int) -> int:
        return self._cached.lookup(key)[1]

    def cached_keys(self) -> list[int]:
        return self._cached.keys()

    def _kernel_pages(self, blocks: list[int]) -> list[int]:
        k = self._pages_per_block
        return [block * k + i for block in blocks for i in range(k)]

    def units(self, request_id: int) -> RequestUnits:
        request = self._get(request_id)
        return RequestUnits(request.slot, tuple(request.kernel_pages))

    def usage(self) -> MemoryUsage:
        """Pages counted in vLLM blocks; the pool is shared, so ``state_capacity_bytes``
        counts the blocks holding state now and ``kv_capacity_bytes`` the rest."""
        return _unified_usage(self, self.num_usable_blocks, self._block_bytes)

    def check_integrity(self) -> None:
        assert not any(r in self._freed for r in self._live), "a live request is marked freed"
        owned = self._cached.check(r.pages for r in self._live.values())
        for group in self._cached.held(PoolKind.STATE):
            owned += range(group * self._run, (group + 1) * self._run)
        for request in self._live.values():
            assert len(request.pages) == self._blocks_for(request.num_tokens), "block count"
            assert request.kernel_pages == self._kernel_pages(request.pages), "kernel pages"
            assert request.num_adopted * self._tokens_per_block <= request.num_tokens
            run = range(request.slot * self._run, (request.slot + 1) * self._run)
            assert request.state_blocks == (list(run) if request.slot != NO_SLOT else [])
            owned += request.state_blocks
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert NULL_BLOCK not in owned or not self.num_blocks, "the null block is handed out"
        assert all(not self._is_free[b] for b in owned), "an owned block is marked free"
        assert self._num_free == sum(self._is_free), "free count drifted"
        assert len(owned) + self._num_free == self.num_usable_blocks, "blocks not conserved"
        for group, free in enumerate(self._group_free):
            blocks = range(group * self._run, (group + 1) * self._run)
            assert free == sum(self._is_free[b] for b in blocks), f"group {group} count"
            assert self._whole[group] == (free == self._run), f"group {group} whole flag"
        for block in range(self.num_blocks):
            hole = bool(self._is_free[block]) and not self._in_whole_group(block)
            assert self._holes[block] == hole, f"block {block} hole flag"
