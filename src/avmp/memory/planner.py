"""How many requests of one shape each layout holds at once, and where the rest goes.

The count is measured, not derived: each allocator is built fresh and fed requests of
``prompt + output`` tokens until it says None, so the plan is exactly what the
allocator would do. The budget is then split, per allocator, into

- ``needed``: the exact bytes of the admitted requests;
- ``padding``: units bigger than the data beyond ordinary page rounding (the unified
  pool's padded state pages and its partly filled large blocks);
- ``rounding``: the last ``config.block_size``-token page of each request, and the part
  of the budget that can never form a unit (a remainder below one block, one chunk, or
  the static pools' leftovers);
- ``unusable``: capacity still free that cannot hold another such request
  (fragmentation, or the wrong pool in a static split).

The four add up to the budget. Pure bookkeeping: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from avmp.memory.manager import AvmpManager
from avmp.memory.oracle import OracleAllocator
from avmp.memory.registry import ALLOCATOR_NAMES, make_allocator
from avmp.memory.spec import CacheAllocator, MemoryConfig, PoolKind, RequestTooLargeError
from avmp.memory.unified import UnifiedAllocator
from avmp.models.geometry import ModelGeometry
from avmp.units import format_bytes, round_up

MAX_PLANNED_REQUESTS = 200_000  # beyond this the question is moot and the count slow


@dataclass(frozen=True)
class AllocatorPlan:
    """One allocator's result; the four byte fields add up to the budget."""

    name: str
    num_requests: int
    ratio_to_oracle: float
    needed_bytes: int
    padding_bytes: int
    rounding_bytes: int
    unusable_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def lost_bytes(self) -> int:
        return self.padding_bytes + self.rounding_bytes + self.unusable_bytes


@dataclass(frozen=True)
class UnifiedBreakdown:
    """Why the unified pool loses bytes, for the planner's explanation.

    ``state_padding_bytes``: padding of every state block beyond the exact state, over
    all admitted requests; ``kv_padding_bytes``: the rest of the padding (KV blocks
    partly filled beyond 16-token granularity, and padding layers of short groups).
    """

    block_size: int | None
    page_bytes: int
    state_page_bytes: int
    group_size: int
    block_bytes: int
    num_blocks: int
    num_state_blocks_per_request: int
    num_kv_blocks_per_request: int
    state_padding_bytes: int
    kv_padding_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """Everything `avmp plan` prints, for one model, budget and request shape."""

    model: str
    budget_bytes: int
    chunk_bytes: int
    block_size: int
    prompt_tokens: int
    output_tokens: int
    request_bytes: int
    kv_bytes_per_token: int
    state_bytes_per_request: int
    break_even_tokens: int | None
    unified: UnifiedBreakdown
    allocators: tuple[AllocatorPlan, ...]
    missing: tuple[str, ...] = ()

    @property
    def request_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    @property
    def vllm_block_size(self) -> int | None:
        """The attention block size vLLM's hybrid rule chooses."""
        return self.unified.block_size

    def allocator(self, name: str) -> AllocatorPlan:
        for result in self.allocators:
            if result.name == name:
                return result
        raise KeyError(f"no plan for allocator {name!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["request_tokens"] = self.request_tokens
        data["vllm_block_size"] = self.vllm_block_size
        data["missing"] = list(self.missing)
        data["allocators"] = [a.to_dict() for a in self.allocators]
        return data


def plan(
    geometry: ModelGeometry,
    config: MemoryConfig,
    prompt_tokens: int,
    output_tokens: int,
    *,
    names: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Plan:
    """Measure how many requests of ``prompt_tokens + output_tokens`` each allocator holds.

    Args:
        names: allocators to plan (default: every one available); the oracle is always
            measured, since every ratio is to it.
        options: constructor options per allocator name, e.g.
            ``{"static": {"state_fraction": 0.3}}``.
    Raises:
        ValueError: bad lengths, a request that cannot fit in the whole budget, or more
            than `MAX_PLANNED_REQUESTS` requests that would fit.
    """
    _check_lengths(prompt_tokens, output_tokens)
    num_tokens = prompt_tokens + output_tokens
    if geometry.request_bytes(num_tokens) > config.budget_bytes:
        need, budget = geometry.request_bytes(num_tokens), config.budget_bytes
        raise ValueError(
            f"one request of {num_tokens} tokens needs {format_bytes(need)}, "
            f"more than the whole budget ({format_bytes(budget)})"
        )
    wanted = tuple(names) if names is not None else ALLOCATOR_NAMES
    chosen = [n for n in ALLOCATOR_NAMES if n in wanted or n == "oracle"]
    options = options or {}
    oracle_count = _fill(OracleAllocator(geometry, config), num_tokens)
    results = [
        _measure(name, geometry, config, num_tokens, options.get(name, {}), oracle_count)
        for name in chosen
    ]
    return Plan(
        model=geometry.name,
        budget_bytes=config.budget_bytes,
        chunk_bytes=config.chunk_bytes,
        block_size=config.block_size,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        request_bytes=geometry.request_bytes(num_tokens),
        kv_bytes_per_token=geometry.kv_bytes_per_token,
        state_bytes_per_request=geometry.state_bytes_per_request,
        break_even_tokens=geometry.break_even_tokens,
        unified=_unified_breakdown(geometry, config, num_tokens),
        allocators=tuple(results),
        missing=tuple(n for n in wanted if n not in chosen),
    )


def _check_lengths(prompt_tokens: int, output_tokens: int) -> None:
    if prompt_tokens < 1:
        raise ValueError(f"prompt length must be >= 1 token, got {prompt_tokens}")
    if output_tokens < 0:
        raise ValueError(f"output length must be >= 0 tokens, got {output_tokens}")


def _fill(allocator: CacheAllocator, num_tokens: int) -> int:
    """Admit requests of ``num_tokens`` into a fresh allocator until it says None."""
    count = 0
    try:
        while allocator.admit(count, num_tokens) is not None:
            count += 1
            if count > MAX_PLANNED_REQUESTS:
                raise ValueError(
                    f"more than {MAX_PLANNED_REQUESTS} requests of {num_tokens} tokens fit "
                    f"in {allocator.config.budget_bytes} bytes; plan with less memory"
                )
    except RequestTooLargeError:
        return 0
    return count


def _measure(
    name: str,
    geometry: ModelGeometry,
    config: MemoryConfig,
    num_tokens: int,
    options: Mapping[str, Any],
    oracle_count: int,
) -> AllocatorPlan:
    allocator = make_allocator(name, geometry, config, **options)
    count = _fill(allocator, num_tokens)
    usage = allocator.usage()
    needed = count * geometry.request_bytes(num_tokens)
    page_rounding = count * _page_rounding_bytes(geometry, config.block_size, num_tokens)
    remainder = _never_usable_bytes(allocator)
    return AllocatorPlan(
        name=name,
        num_requests=count,
        ratio_to_oracle=count / oracle_count if oracle_count else 0.0,
        needed_bytes=needed,
        padding_bytes=usage.used_bytes - needed - page_rounding,
        rounding_bytes=page_rounding + remainder,
        unusable_bytes=config.budget_bytes - usage.used_bytes - remainder,
    )


def _page_rounding_bytes(geometry: ModelGeometry, block_size: int, num_tokens: int) -> int:
    """KV bytes one request loses in its last, partly filled ``block_size``-token page."""
    padded = round_up(num_tokens, block_size)
    return (padded - num_tokens) * geometry.kv_bytes_per_token


def _never_usable_bytes(allocator: CacheAllocator) -> int:
    """Budget that can never hold a unit, whatever the requests: below one block and
    the null block (unified), nothing (oracle), below one chunk (AVMP), and for the
    static split also each pool's chunk bytes that form no whole unit."""
    config = allocator.config
    if isinstance(allocator, UnifiedAllocator):
        return config.budget_bytes - allocator.num_usable_blocks * allocator.block_bytes
    if isinstance(allocator, OracleAllocator):
        return 0
    if isinstance(allocator, AvmpManager) and allocator.fixed_state_fraction is not None:
        spec = allocator.spec
        units = (allocator.num_units(PoolKind.KV) * spec.page_bytes
                 + allocator.num_units(PoolKind.STATE) * spec.slot_bytes)
        return config.budget_bytes - units
    return config.budget_bytes - config.num_chunks * config.chunk_bytes


def _unified_breakdown(
    geometry: ModelGeometry, config: MemoryConfig, num_tokens: int
) -> UnifiedBreakdown:
    allocator = UnifiedAllocator(geometry, config)
    count = _fill(allocator, num_tokens)
    vllm = allocator.vllm
    state_blocks = vllm.num_state_groups
    kv_blocks = allocator.num_blocks_for(num_tokens) - state_blocks
    usage = allocator.usage()
    state_padding = usage.state_used_bytes - usage.state_needed_bytes
    page_rounding = count * _page_rounding_bytes(geometry, config.block_size, num_tokens)
    kv_padding = usage.kv_used_bytes - usage.kv_needed_bytes - page_rounding
    return UnifiedBreakdown(
        block_size=vllm.block_size,
        page_bytes=vllm.page_bytes,
        state_page_bytes=vllm.state_page_bytes,
        group_size=vllm.group_size,
        block_bytes=vllm.block_bytes,
        num_blocks=allocator.num_blocks,
        num_state_blocks_per_request=state_blocks,
        num_kv_blocks_per_request=kv_blocks,
        state_padding_bytes=state_padding,
        kv_padding_bytes=kv_padding,
    )
