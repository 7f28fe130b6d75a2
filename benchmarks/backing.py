"""GPU backings: cost of moving capacity between the pools, compaction bandwidth, views.

Measures, on one CUDA GPU:

1. VMM migration: microseconds per 2 MiB chunk to unmap n free chunks from the KV
   pool's tail and map the same physical handles at the state pool's tail (with
   cuMemSetAccess, and the device sync unmap does first). Zero bytes are copied: the
   bytes written at the old address are read back at the new one.
2. The same capacity shift in the one-buffer backing: (a) the boundary move alone when
   the ids come tail first (bookkeeping only), (b) the manager's donor-order mapping,
   which swaps chunks with a device copy, and (c) boundary move + a compaction copy of
   one chunk's worth of live units per chunk (what a static buffer pays when the donor's
   tail is not free); (c) is also given for VMM.
3. Compaction bandwidth of `copy_units` (Triton kernel, and the torch gather/scatter
   fallback), counting bytes read + written, with units sized like real slots and pages,
   moving gigabytes so the GPU is full; the device-to-device copy ceiling beside it.
4. Building all per-layer views for a Jamba-1.5-Mini-like geometry (4 attention + 28
   Mamba layers).

Seeded; every time is the median of repeats after a warm-up. Raw figures go to --out.

    PYTHONPATH=src python3 -m benchmarks.backing --out $OUT/backing.json.gz
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from avmp.kernels.triton import compact
from avmp.memory.backing.cuda_vmm import CudaVmmBacking
from avmp.memory.backing.device import TensorBacking
from avmp.memory.backing.torch_buffer import TorchBufferBacking
from avmp.memory.backing.unit_format import CacheFormat
from avmp.memory.backing.views import build_views
from avmp.memory.spec import CacheSpec, MemoryConfig, PoolKind
from avmp.models.geometry import (
    AttentionLayer,
    CacheTensor,
    LayerKind,
    ModelGeometry,
    RecurrentLayer,
)
from benchmarks.common import RESULTS_DIR, copy_bytes_per_s, event_ms, wall_ms, write_result

MIB = 1 << 20
CHUNK = 2 * MIB
DEVICE = torch.device("cuda", 0)


def median_us(run: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``run`` in microseconds (``run`` synchronizes itself)."""
    return wall_ms(run, repeats, warmup) * 1e3


def shift_spec() -> CacheSpec:
    """Units that divide a chunk, so a pool's bytes are exactly its chunks."""
    return CacheSpec(
        page_bytes=128 * 1024, slot_bytes=MIB, block_size=16, kv_bytes_per_token=8192
    )


def migrate(backing: TensorBacking, donor: PoolKind, num: int, tail_first: bool) -> None:
    """One migration as the manager does it. VMM driver calls return when done (unmap
    waits for the device first); the buffer backing's chunk copy, if any, is waited for."""
    ids = backing.unmap_chunks(donor, num)
    backing.map_chunks(donor.other, ids[::-1] if tail_first else ids)
    if isinstance(backing, TorchBufferBacking):
        torch.cuda.synchronize(DEVICE)


def bench_migration(backing: TensorBacking, sizes: list[int], tail_first: bool) -> dict[str, Any]:
    """us per chunk of moving n free chunks KV -> state and back (alternating)."""
    total = backing.config.num_chunks
    backing.map_chunks(PoolKind.KV, list(range(total // 2)))
    backing.map_chunks(PoolKind.STATE, list(range(total - 1, total // 2 - 1, -1)))
    kv = backing.pool_bytes(PoolKind.KV)
    out: dict[str, Any] = {}
    for num in sizes:
        start = (backing.num_mapped_chunks(PoolKind.KV) - num) * CHUNK
        marker = torch.randint(0, 256, (num * CHUNK,), dtype=torch.uint8, device=DEVICE)
        kv[start : start + num * CHUNK] = marker
        migrate(backing, PoolKind.KV, num, tail_first)
        state = backing.pool_bytes(PoolKind.STATE)
        landed = backing.num_mapped_chunks(PoolKind.STATE) - num
        same = None  # the buffer's state pool is mirrored: chunk bytes are not in range order
        if not backing.is_reversed(PoolKind.STATE):
            chunks = marker.view(num, CHUNK)
            expected = chunks.flip(0) if tail_first else chunks
            landed_bytes = state[landed * CHUNK : (landed + num) * CHUNK].view(num, CHUNK)
            same = bool(torch.equal(landed_bytes, expected))
        migrate(backing, PoolKind.STATE, num, tail_first)

        def there_and_back(n: int = num) -> None:
            migrate(backing, PoolKind.KV, n, tail_first)
            migrate(backing, PoolKind.STATE, n, tail_first)

        us = median_us(there_and_back, repeats=7) / 2
        out[str(num)] = {"us_per_migration": us, "us_per_chunk": us / num, "bytes_intact": same}
    return out


def bench_shift_with_compaction(backing: TensorBacking, num: int) -> dict[str, Any]:
    """Free n donor tail chunks by compacting a chunk's worth of units each, then migrate."""
    total = backing.config.num_chunks
    backing.map_chunks(PoolKind.KV, list(range(total // 2)))
    backing.map_chunks(PoolKind.STATE, list(range(total - 1, total // 2 - 1, -1)))
    units_per_chunk = CHUNK // backing.spec.slot_bytes
    mapped = backing.num_mapped_units(PoolKind.STATE)
    movers = list(range(mapped - num * units_per_chunk, mapped))
    moves = list(zip(movers, range(num * units_per_chunk), strict=True))

    def shift() -> None:
        backing.copy_units(PoolKind.STATE, moves)
        migrate(backing, PoolKind.STATE, num, tail_first=True)
        migrate(backing, PoolKind.KV, num, tail_first=True)  # give them back (not counted)

    def back_only() -> None:
        migrate(backing, PoolKind.STATE, num, tail_first=True)
        migrate(backing, PoolKind.KV, num, tail_first=True)

    us = median_us(shift, repeats=7) - median_us(back_only, repeats=7) / 2
    return {"chunks": num, "us_per_chunk": us / num}


def bench_compaction(backing: TensorBacking, pool: PoolKind, move_bytes: int) -> dict[str, Any]:
    """GB/s of copy_units moving ``move_bytes`` of units from the top half to the bottom."""
    backing.map_chunks(pool, list(range(backing.config.num_chunks)))
    unit = backing.spec.unit_bytes(pool)
    mapped = backing.num_mapped_units(pool)
    num = min(move_bytes // unit, mapped // 2)
    moves = list(zip(range(mapped - num, mapped), range(num), strict=True))
    table = backing.unit_table(pool)  # [max_units, unit] uint8, every unit mapped here
    table.random_(0, 256)
    rows = backing.rows_of(pool, torch.tensor(moves, device=DEVICE))
    src, dst = rows[:, 0].contiguous(), rows[:, 1].contiguous()
    expected = table.index_select(0, src)
    backing.copy_units(pool, moves)
    torch.cuda.synchronize(DEVICE)
    assert torch.equal(table.index_select(0, dst), expected), "compaction copied wrong bytes"
    del expected
    moved = 2 * num * unit
    result: dict[str, Any] = {"unit_bytes": unit, "units": num, "bytes_read_written": moved}
    for name, fn in (("triton", compact.copy_rows_triton), ("torch", compact.copy_rows_torch)):
        ms = event_ms(lambda fn=fn: fn(table, src, dst), repeats=10)
        result[name] = {"ms": ms, "GB_per_s": moved / ms / 1e6}
    ms = event_ms(lambda: backing.copy_units(pool, moves), repeats=10)
    result["copy_units"] = {"ms": ms, "GB_per_s": moved / ms / 1e6}
    return result


def bench_device_copy(num_bytes: int) -> dict[str, Any]:
    """The ceiling: one device-to-device copy, bytes read + written."""
    rate = copy_bytes_per_s(DEVICE, num_bytes)
    return {"bytes_read_written": 2 * num_bytes, "ms": 2 * num_bytes / rate * 1e3,
            "GB_per_s": rate / 1e9}


def jamba_like() -> ModelGeometry:
    """Jamba-1.5-Mini's cache shapes: 4 attention layers (8 KV heads x 128) and 28 Mamba1
    layers (d_inner 8192, d_state 16, conv 4 -> 3 columns), bf16."""
    attention = tuple(AttentionLayer(i, 8, 128) for i in range(4, 32, 8))
    recurrent = tuple(
        RecurrentLayer(
            i, LayerKind.MAMBA1, ssm=CacheTensor("ssm", (8192, 16), "bfloat16"),
            conv=CacheTensor("conv", (8192, 3), "bfloat16"),
        )
        for i in range(32) if i % 8 != 4
    )
    return ModelGeometry(
        name="jamba-like", family="jamba", num_layers=32, attention_layers=attention,
        recurrent_layers=recurrent, hidden_size=4096, vocab_size=65536,
        num_params=52_000_000_000, num_active_params=12_000_000_000,
    )


def bench_views() -> dict[str, Any]:
    cache_format = CacheFormat.from_geometry(jamba_like())
    with CudaVmmBacking(0) as backing:
        backing.attach(cache_format.cache_spec(), MemoryConfig(budget_bytes=1024 * MIB))
        us = median_us(lambda: build_views(backing, cache_format), repeats=20)
        views = build_views(backing, cache_format)
        num_views = 2 * len(views.attention_layers) + 2 * len(views.recurrent_layers)
    return {"geometry": "jamba-like (4 attn + 28 mamba1)", "views": num_views, "us": us,
            "padding_bytes": cache_format.padding_bytes}


def environment() -> dict[str, Any]:
    from cuda.bindings import driver

    _, version = driver.cuDriverGetVersion()
    props = torch.cuda.get_device_properties(DEVICE)
    return {
        "gpu": torch.cuda.get_device_name(DEVICE),
        "gpu_memory_bytes": props.total_memory,
        "cuda_driver_api_version": int(version),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


FACTORIES: list[tuple[str, Callable[[], TensorBacking]]] = [
    ("vmm", lambda: CudaVmmBacking(0)),
    ("buffer", lambda: TorchBufferBacking(DEVICE)),
]


def run(budget_gib: int, compaction_gib: int) -> dict[str, Any]:
    torch.manual_seed(0)
    budget = MemoryConfig(budget_bytes=budget_gib * 1024 * MIB)
    results: dict[str, Any] = {"environment": environment(), "budget_bytes": budget.budget_bytes}
    torch.cuda.synchronize(DEVICE)
    results["idle_device_sync_us"] = median_us(lambda: torch.cuda.synchronize(DEVICE), 50)
    sizes = [1, 8, 64, 256]
    with CudaVmmBacking(0) as vmm:
        vmm.attach(shift_spec(), budget)
        start = time.perf_counter()
        vmm.map_chunks(PoolKind.KV, list(range(256)))
        torch.cuda.synchronize(DEVICE)
        results["vmm_first_map_us_per_chunk"] = (time.perf_counter() - start) * 1e6 / 256
        vmm.unmap_chunks(PoolKind.KV, 256)
        results["vmm_migration"] = bench_migration(vmm, sizes, tail_first=False)
        results["vmm_num_chunks_created"] = vmm.num_chunks_created
    for tail_first, key in ((True, "buffer_boundary_move"), (False, "buffer_donor_order_copy")):
        with TorchBufferBacking(DEVICE) as buffer:
            buffer.attach(shift_spec(), budget)
            results[key] = bench_migration(buffer, sizes, tail_first=tail_first)
            results[key + "_bytes_copied"] = buffer.num_migration_bytes_copied
        torch.cuda.empty_cache()
    for name, factory in FACTORIES:
        with factory() as backing:
            backing.attach(shift_spec(), budget)
            results[f"{name}_shift_with_compaction"] = bench_shift_with_compaction(backing, 64)
        torch.cuda.empty_cache()
    compaction_budget = MemoryConfig(budget_bytes=2 * compaction_gib * 1024 * MIB)
    # Jamba-1.5-Mini's page (16 tokens x 32 KiB) and slot (8.3 MiB, straddles chunks)
    slot_spec = CacheSpec(page_bytes=512 * 1024, slot_bytes=8_716_288, block_size=16,
                          kv_bytes_per_token=32768)
    for name, factory in FACTORIES:
        for pool in PoolKind:
            with factory() as backing:
                backing.attach(slot_spec, compaction_budget)
                key = f"compaction_{name}_{pool.value}"
                results[key] = bench_compaction(backing, pool, compaction_gib * 1024 * MIB)
            torch.cuda.empty_cache()
    results["device_copy"] = bench_device_copy(compaction_gib * 1024 * MIB)
    results["views"] = bench_views()
    return results


def table(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"GPU: {env['gpu']}, torch {env['torch']}, "
             f"CUDA driver API {env['cuda_driver_api_version']}",
             "capacity shift KV -> state, us per 2 MiB chunk (median):",
             f"{'chunks':>8} {'VMM':>10} {'buffer tail-first':>18} {'buffer donor-order':>19}"]
    for num in results["vmm_migration"]:
        row = [results[k][num]["us_per_chunk"] for k in
               ("vmm_migration", "buffer_boundary_move", "buffer_donor_order_copy")]
        lines.append(f"{num:>8} {row[0]:>10.1f} {row[1]:>18.1f} {row[2]:>19.1f}")
    lines.append(f"idle torch.cuda.synchronize(): {results['idle_device_sync_us']:.1f} us "
                 "(VMM unmap waits for the device once per migration)")
    lines.append(f"VMM first map (cuMemCreate + map + access): "
                 f"{results['vmm_first_map_us_per_chunk']:.1f} us/chunk")
    for name in ("vmm", "buffer"):
        shift = results[f"{name}_shift_with_compaction"]
        lines.append(f"{name}: compaction of a chunk of units + migration: "
                     f"{shift['us_per_chunk']:.1f} us/chunk")
    lines.append("compaction (bytes read + written):")
    for key, value in results.items():
        if key.startswith("compaction_"):
            lines.append(f"  {key:<24} unit {value['unit_bytes']:>9} B x {value['units']:>6}: "
                         f"triton {value['triton']['GB_per_s']:7.0f} GB/s, "
                         f"torch {value['torch']['GB_per_s']:7.0f} GB/s, "
                         f"copy_units {value['copy_units']['GB_per_s']:7.0f} GB/s")
    lines.append(f"  device-to-device copy ceiling: {results['device_copy']['GB_per_s']:.0f} GB/s")
    views = results["views"]
    lines.append(f"views: {views['views']} tensors for {views['geometry']} in {views['us']:.0f} us")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "backing.json.gz")
    parser.add_argument("--budget-gib", type=int, default=4, help="budget of the shift runs")
    parser.add_argument("--compaction-gib", type=int, default=8, help="bytes moved per compaction")
    args = parser.parse_args()
    results = run(args.budget_gib, args.compaction_gib)
    write_result(args.out, results)
    print(table(results))


if __name__ == "__main__":
    main()
