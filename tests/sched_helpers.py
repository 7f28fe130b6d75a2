"""Test helpers of the scheduler and the simulator: a tiny geometry and an exact-bytes
allocator that implements `CacheAllocator` simply enough to be obviously right."""

from __future__ import annotations

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
from avmp.models.geometry import (
    AttentionLayer,
    CacheTensor,
    LayerKind,
    ModelGeometry,
    RecurrentLayer,
)
from avmp.sched.request import RequestSpec
from avmp.sched.scheduler import Scheduler, StepPlan

MIB = 1 << 20


def tiny_geometry(
    kv_heads: int = 8, head_dim: int = 64, ssm_elements: int = 1 << 18
) -> ModelGeometry:
    """One attention layer (2 KiB of KV per token) and one Mamba2 layer (512 KiB state)."""
    return ModelGeometry(
        name="tiny-hybrid",
        family="test",
        num_layers=2,
        attention_layers=(AttentionLayer(0, kv_heads, head_dim),),
        recurrent_layers=(
            RecurrentLayer(1, LayerKind.MAMBA2, CacheTensor("ssm", (ssm_elements,), "bfloat16")),
        ),
        hidden_size=512,
        vocab_size=1000,
        num_params=100_000_000,
        num_active_params=100_000_000,
    )


class ExactBytesAllocator(CacheAllocator):
    """One shared byte budget; a request takes one slot plus whole pages for its tokens.

    Page and slot indices come from free lists (lowest first), so they are unique while
    live. No pools, no migration: only what the scheduler needs to be tested.
    """

    name = "exact-test"

    def __init__(self, geometry: ModelGeometry, config: MemoryConfig) -> None:
        super().__init__(geometry, config)
        self.spec = CacheSpec.from_geometry(geometry, config.block_size)
        self._tokens: dict[int, int] = {}
        self._blocks: dict[int, RequestUnits] = {}
        self._freed: set[int] = set()
        self._used_bytes = 0
        self._next_page = 0
        self._free_pages: list[int] = []
        self._free_slots: list[int] = []
        self._next_slot = 0

    def _bytes_for(self, num_tokens: int) -> int:
        return self.spec.slot_bytes + self.spec.num_pages_for(num_tokens) * self.spec.page_bytes

    def _take_pages(self, count: int) -> list[int]:
        pages = []
        for _ in range(count):
            if self._free_pages:
                pages.append(self._free_pages.pop())
            else:
                pages.append(self._next_page)
                self._next_page += 1
        return pages

    def could_hold(self, num_requests: int, num_kv_units: int) -> bool:
        needed = num_requests * self.spec.slot_bytes + num_kv_units * self.spec.page_bytes
        return needed <= self.config.budget_bytes

    def admit(self, request_id: int, num_tokens: int) -> RequestUnits | None:
        if request_id in self._tokens:
            raise DuplicateRequestError(f"request {request_id} is live")
        if not self.fits_alone(num_tokens):
            raise RequestTooLargeError(f"{num_tokens} tokens never fit")
        need = self._bytes_for(num_tokens)
        self.stats.num_admits += 1
        if self._used_bytes + need > self.config.budget_bytes:
            self.stats.num_oom_events += 1
            return None
        self._freed.discard(request_id)
        slot = self._free_slots.pop() if self._free_slots else self._next_slot
        self._next_slot = max(self._next_slot, slot + 1)
        pages = self._take_pages(self.spec.num_pages_for(num_tokens))
        self._used_bytes += need
        self._tokens[request_id] = num_tokens
        self._blocks[request_id] = RequestUnits(slot, tuple(pages))
        return self._blocks[request_id]

    def grow(self, request_id: int, num_new_tokens: int) -> list[int] | None:
        old = self.num_tokens(request_id)
        new = old + num_new_tokens
        if not self.fits_alone(new):
            raise RequestTooLargeError(f"{new} tokens never fit")
        extra = self._bytes_for(new) - self._bytes_for(old)
        self.stats.num_grows += 1
        if self._used_bytes + extra > self.config.budget_bytes:
            self.stats.num_oom_events += 1
            return None
        added = self._take_pages(self.spec.num_pages_for(new) - self.spec.num_pages_for(old))
        blocks = self._blocks[request_id]
        self._blocks[request_id] = RequestUnits(blocks.slot, blocks.pages + tuple(added))
        self._used_bytes += extra
        self._tokens[request_id] = new
        return added

    def free(self, request_id: int) -> None:
        if request_id in self._freed:
            raise DoubleFreeError(f"request {request_id} already freed")
        tokens = self.num_tokens(request_id)
        blocks = self._blocks.pop(request_id)
        del self._tokens[request_id]
        self._free_pages.extend(reversed(blocks.pages))
        self._free_slots.append(blocks.slot)
        self._used_bytes -= self._bytes_for(tokens)
        self._freed.add(request_id)
        self.stats.num_frees += 1

    def units(self, request_id: int) -> RequestUnits:
        self.num_tokens(request_id)
        return self._blocks[request_id]

    def num_tokens(self, request_id: int) -> int:
        try:
            return self._tokens[request_id]
        except KeyError:
            raise UnknownRequestError(f"request {request_id} is not live") from None

    def fits_alone(self, num_tokens: int) -> bool:
        return self._bytes_for(num_tokens) <= self.config.budget_bytes

    def usage(self) -> MemoryUsage:
        kv_used = sum(len(b.pages) for b in self._blocks.values()) * self.spec.page_bytes
        state_used = len(self._blocks) * self.spec.slot_bytes
        kv_needed = sum(self._tokens.values()) * self.spec.kv_bytes_per_token
        return MemoryUsage(
            budget_bytes=self.config.budget_bytes,
            kv_capacity_bytes=self.config.budget_bytes,
            state_capacity_bytes=self.config.budget_bytes,
            kv_used_bytes=kv_used,
            state_used_bytes=state_used,
            kv_needed_bytes=kv_needed,
            state_needed_bytes=state_used,
            num_requests=len(self._tokens),
            num_pages_used=sum(len(b.pages) for b in self._blocks.values()),
            num_slots_used=len(self._blocks),
        )

    def check_integrity(self) -> None:
        assert self._used_bytes == sum(self._bytes_for(t) for t in self._tokens.values())
        assert self._used_bytes <= self.config.budget_bytes
        pages = [p for b in self._blocks.values() for p in b.pages]
        assert len(pages) == len(set(pages)), "a page is held twice"
        slots = [b.slot for b in self._blocks.values()]
        assert len(slots) == len(set(slots)), "a slot is held twice"

    @property
    def request_ids(self) -> list[int]:
        return list(self._tokens)


def make_allocator(
    budget_mib: int = 64, geometry: ModelGeometry | None = None
) -> ExactBytesAllocator:
    return ExactBytesAllocator(geometry or tiny_geometry(), MemoryConfig(budget_mib * MIB))


def req(request_id: int, prompt: int, output: int, arrival_s: float = 0.0) -> RequestSpec:
    return RequestSpec(request_id, arrival_s, prompt, output)


def run_to_end(scheduler: Scheduler, max_steps: int = 10_000) -> list[StepPlan]:
    """Step until nothing is left, checking the allocator and the scheduler after every
    step."""
    plans = []
    while scheduler.has_unfinished:
        plan = scheduler.schedule()
        scheduler.finish_step(plan)
        scheduler.allocator.check_integrity()
        scheduler.check_integrity()
        plans.append(plan)
        assert len(plans) < max_steps, "scheduler did not finish"
    return plans
