"""Shared drivers for the device-backing tests (CPU buffer, CUDA VMM).

`BackingDriver` plays a tiny allocator over a `TensorBacking`: it maps chunks, fills
units with patterns that depend on a tag, frees them, compacts a pool's live units
downward with one `copy_units` batch and migrates free tail chunks (tail first, the
manager's rule), and checks after each step that every live unit still holds its pattern.

`ManagerDriver` does the same end to end through `AvmpManager`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from avmp.memory.backing.device import TensorBacking
from avmp.memory.manager import AvmpManager
from avmp.memory.spec import CacheSpec, MemoryConfig, PoolKind
from avmp.models.geometry import (
    AttentionLayer,
    CacheTensor,
    LayerKind,
    ModelGeometry,
    RecurrentLayer,
)

MIB = 1 << 20
# unit sizes that do not divide a chunk, so units straddle chunk boundaries
TEST_SPEC = CacheSpec(
    page_bytes=100_000, slot_bytes=700_000, block_size=16, kv_bytes_per_token=6250
)


_PATTERNS: dict[tuple[int, int, str], torch.Tensor] = {}


def pattern(tag: int, num_bytes: int, device: torch.device) -> torch.Tensor:
    """Bytes that differ between tags and along the unit: [num_bytes] uint8 (cached)."""
    key = (tag, num_bytes, str(device))
    if key not in _PATTERNS:
        if len(_PATTERNS) > 4096:
            _PATTERNS.clear()
        index = torch.arange(num_bytes, device=device, dtype=torch.int32)
        _PATTERNS[key] = ((index * (2 * tag + 1) + tag * 7 + (index >> 8)) % 251).to(torch.uint8)
    return _PATTERNS[key]


def tiny_geometry(ssm_dtype: str = "float32") -> ModelGeometry:
    """2 attention + 2 Mamba2 layers, bf16 conv beside an fp32 (or bf16) SSM state."""
    attention = tuple(AttentionLayer(i, num_kv_heads=2, head_dim=8) for i in (1, 3))
    recurrent = tuple(
        RecurrentLayer(
            i,
            LayerKind.MAMBA2,
            ssm=CacheTensor("ssm", (2, 8, 4), ssm_dtype),
            conv=CacheTensor("conv", (24, 3), "bfloat16"),
        )
        for i in (0, 2)
    )
    return ModelGeometry(
        name="tiny-hybrid",
        family="test",
        num_layers=4,
        attention_layers=attention,
        recurrent_layers=recurrent,
        hidden_size=16,
        vocab_size=32,
        num_params=1000,
        num_active_params=1000,
        ssm_dtype=ssm_dtype,
    )


@dataclass
class BackingDriver:
    """A minimal allocator over a backing, with the expected content of every live unit."""

    backing: TensorBacking
    rng: random.Random
    live: dict[PoolKind, dict[int, int]] = field(
        default_factory=lambda: {PoolKind.KV: {}, PoolKind.STATE: {}}
    )  # unit -> tag
    next_tag: int = 1
    num_migrations: int = 0
    num_compactions: int = 0

    @property
    def spec(self) -> CacheSpec:
        return self.backing.spec

    @property
    def num_chunks(self) -> int:
        return self.backing.config.num_chunks

    def unowned(self) -> list[int]:
        owned = {c for pool in PoolKind for c in self.backing.mapped_chunks(pool)}
        return [c for c in range(self.num_chunks) if c not in owned]

    def grow(self, pool: PoolKind, count: int) -> None:
        """Map unowned chunks: KV the lowest ids ascending, state the highest descending."""
        free = self.unowned()
        ids = free[:count] if pool is PoolKind.KV else free[::-1][:count]
        self.backing.map_chunks(pool, ids)

    def write(self, pool: PoolKind, use_write_unit: bool = False) -> bool:
        """Fill the lowest free mapped unit with a fresh pattern; False if none is free."""
        unit = next(
            (u for u in range(self.backing.num_mapped_units(pool)) if u not in self.live[pool]),
            None,
        )
        if unit is None:
            return False
        tag, self.next_tag = self.next_tag, self.next_tag + 1
        data = pattern(tag, self.spec.unit_bytes(pool), self.backing.device)
        if use_write_unit:
            self.backing.write_unit(pool, unit, data.cpu().numpy().tobytes())
        else:
            self.backing.unit_table(pool)[self.backing.row_of(pool, unit)] = data
        self.live[pool][unit] = tag
        return True

    def free(self, pool: PoolKind) -> None:
        if self.live[pool]:
            del self.live[pool][self.rng.choice(sorted(self.live[pool]))]

    def compact(self, pool: PoolKind) -> int:
        """Move live units from the top down into the lowest free units, as one batch."""
        live = sorted(self.live[pool])
        holes = [u for u in range(len(live)) if u not in self.live[pool]]
        movers = [u for u in reversed(live) if u >= len(live)][: len(holes)]
        moves = list(zip(movers, holes, strict=False))
        self.backing.copy_units(pool, moves)
        for src, dst in moves:
            self.live[pool][dst] = self.live[pool].pop(src)
        self.num_compactions += bool(moves)
        return len(moves)

    def free_tail_chunks(self, pool: PoolKind) -> int:
        """Chunks at the pool's tail that no live unit overlaps."""
        unit = self.spec.unit_bytes(pool)
        end = (max(self.live[pool]) + 1) * unit if self.live[pool] else 0
        used_chunks = -(-end // self.backing.config.chunk_bytes)
        return self.backing.num_mapped_chunks(pool) - used_chunks

    def migrate(self, donor: PoolKind, count: int) -> int:
        """Move up to ``count`` free tail chunks from ``donor`` to the other pool.

        As the manager does, unowned chunks go first: migration only when none is left.
        """
        if self.unowned():
            count = min(count, len(self.unowned()))
            self.grow(donor.other, count)
            return 0
        count = min(count, self.free_tail_chunks(donor))
        if count <= 0:
            return 0
        ids = self.backing.unmap_chunks(donor, count)
        self.backing.map_chunks(donor.other, ids[::-1])
        self.num_migrations += 1
        return count

    def check(self) -> None:
        """Every live unit holds its pattern (one batched read per pool)."""
        for pool in PoolKind:
            if not self.live[pool]:
                continue
            units = sorted(self.live[pool])
            rows = self.backing.rows_of(pool, torch.tensor(units)).to(self.backing.device)
            got = self.backing.unit_table(pool).index_select(0, rows)
            unit_bytes = self.spec.unit_bytes(pool)
            want = torch.stack(
                [pattern(self.live[pool][u], unit_bytes, self.backing.device) for u in units]
            )
            bad = (got != want).any(dim=1).nonzero().flatten().tolist()
            assert not bad, f"{pool.value} units {[units[i] for i in bad]} lost their bytes"

    def random_step(self) -> bool:
        """One random action; True when it moved bytes or mappings (worth a check)."""
        pool = self.rng.choice(list(PoolKind))
        action = self.rng.random()
        if action < 0.45:
            if not self.write(pool, use_write_unit=self.rng.random() < 0.1) and self.unowned():
                self.grow(pool, self.rng.randint(1, 2))
                return True
            return False
        if action < 0.75:
            self.free(pool)
            return False
        if action < 0.87:
            return self.compact(pool) > 0
        self.migrate(pool, self.rng.randint(1, 3))
        return True


def small_config(num_chunks: int = 8) -> MemoryConfig:
    return MemoryConfig(budget_bytes=num_chunks * 2 * MIB)


def gpu_geometry() -> ModelGeometry:
    """Units that straddle chunks: 128 KiB pages, ~1.02 MiB slots (fp32 SSM, bf16 conv)."""
    attention = tuple(AttentionLayer(i, num_kv_heads=8, head_dim=128) for i in (1, 3))
    recurrent = tuple(
        RecurrentLayer(
            i,
            LayerKind.MAMBA2,
            ssm=CacheTensor("ssm", (16, 64, 128), "float32"),
            conv=CacheTensor("conv", (2048, 3), "bfloat16"),
        )
        for i in (0, 2)
    )
    return ModelGeometry(
        name="gpu-test-hybrid",
        family="test",
        num_layers=4,
        attention_layers=attention,
        recurrent_layers=recurrent,
        hidden_size=1024,
        vocab_size=32,
        num_params=1000,
        num_active_params=1000,
        ssm_dtype="float32",
    )


@dataclass
class ManagerDriver:
    """Random admit / grow / free through an AvmpManager over a device backing; every live
    unit holds a pattern derived from (request, position), checked in one batch per pool."""

    manager: AvmpManager
    backing: TensorBacking
    rng: random.Random
    max_admit_tokens: int = 200
    max_grow_tokens: int = 64
    tags: dict[int, int] = field(default_factory=dict)  # request id -> tag
    next_id: int = 0

    def _expected(self, request_id: int, pool: PoolKind, position: int) -> torch.Tensor:
        tag = (self.tags[request_id] * 4099 + (0 if pool is PoolKind.STATE else position + 1))
        return pattern(tag % 1_000_003, self.backing.spec.unit_bytes(pool), self.backing.device)

    def _fill(self, request_id: int, new_pages: list[int] | None = None) -> None:
        blocks = self.manager.units(request_id)
        if new_pages is None:
            row = self.backing.row_of(PoolKind.STATE, blocks.slot)
            self.backing.unit_table(PoolKind.STATE)[row] = self._expected(
                request_id, PoolKind.STATE, 0
            )
        num_new = len(blocks.pages) if new_pages is None else len(new_pages)
        table = self.backing.unit_table(PoolKind.KV)
        for position in range(len(blocks.pages) - num_new, len(blocks.pages)):
            table[blocks.pages[position]] = self._expected(request_id, PoolKind.KV, position)

    def step(self) -> None:
        live = self.manager.request_ids
        action = self.rng.random()
        if action < 0.4 or not live:
            request_id, self.next_id = self.next_id, self.next_id + 1
            self.tags[request_id] = request_id + 1
            tokens = self.rng.randint(1, self.max_admit_tokens)
            if self.manager.fits_alone(tokens) and self.manager.admit(request_id, tokens):
                self._fill(request_id)
        elif action < 0.75:
            request_id = self.rng.choice(live)
            tokens = self.rng.randint(1, self.max_grow_tokens)
            if self.manager.fits_alone(self.manager.num_tokens(request_id) + tokens):
                added = self.manager.grow(request_id, tokens)
                if added:
                    self._fill(request_id, list(added))
        else:
            self.manager.free(self.rng.choice(live))

    def check(self) -> None:
        self.manager.check_integrity()
        for pool in PoolKind:
            rows: list[int] = []
            want: list[torch.Tensor] = []
            for request_id in self.manager.request_ids:
                blocks = self.manager.units(request_id)
                if pool is PoolKind.STATE:
                    rows.append(self.backing.row_of(pool, blocks.slot))
                    want.append(self._expected(request_id, pool, 0))
                else:
                    rows.extend(blocks.pages)
                    num_pages = len(blocks.pages)
                    want.extend(self._expected(request_id, pool, i) for i in range(num_pages))
            if rows:
                index = torch.tensor(rows, device=self.backing.device)
                got = self.backing.unit_table(pool).index_select(0, index)
                assert torch.equal(got, torch.stack(want)), f"{pool.value} units lost bytes"
