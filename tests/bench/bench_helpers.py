"""Hand-built cell records for the bench tests."""

from __future__ import annotations

from typing import Any


def make_cell(allocator: str, workload: str = "uniform_short", seed: int = 0,
              request_throughput: float = 1.0, budget_bytes: int = 1 << 30,
              model: str = "m", profile: str = "h100", **result: Any) -> dict[str, Any]:
    """A cell record shaped like `avmp.bench.sweep.run_cell` writes, with chosen values."""
    base = {
        "allocator": allocator, "num_requests": 10, "num_completed": 10, "num_rejected": 0,
        "rejections": [], "makespan_s": 10.0, "request_throughput": request_throughput,
        "output_token_throughput": 100 * request_throughput, "num_preemptions": 0,
        "num_oom_events": 0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.5, "tpot_p50_s": 0.01,
        "tpot_p99_s": 0.02,
        "phase_s": {"compute": 9.0, "allocation": 0.5, "migration": 0.2, "compaction": 0.1,
                    "recompute": 0.2},
        "timeline": [], "allocator_stats": {}, "measured_allocator_cpu_s": 0.01,
    }
    base.update(result)
    coords = {"allocator": allocator, "workload": workload, "model": model,
              "budget_bytes": budget_bytes, "profile": profile, "seed": seed,
              "cell_id": f"{workload}-{model}-{budget_bytes}-{profile}-{seed}-{allocator}"}
    return {"cell": coords, "settings": {"num_requests": 10}, "trace": {"sha256": "x"},
            "result": base}
