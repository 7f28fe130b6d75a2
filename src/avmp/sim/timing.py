"""How long a step takes on a GPU: a roofline over a model's bytes and FLOPs, or a fit of
measured engine steps; and what allocation, migration and compaction cost.

The simulator's clock comes only from here, never from the wall time of the Python loop,
so the same trace gives the same simulated seconds on any machine.

Roofline. One step reads the weights it touches, the KV of every scheduled request's
context, writes the new tokens' KV, and reads and writes each scheduled request's
recurrent state; it spends ``2 x active params`` FLOPs per token plus attention FLOPs.
The step takes ``max(bytes / (BW x eff_bw), FLOPs / (peak x eff_compute)) + overhead``.

Calibration file (JSON), written by a GPU benchmark of the engine::

    {
      "gpu": "h100",                      # free text, reported
      "model": "nemotron-h-8b",           # must match the geometry's name when present
      "points": [
        {"num_prefill_tokens": 512, "num_decode_requests": 0,
         "num_context_tokens": 512, "step_s": 0.031},
        ...
      ]
    }

The features mean what `BatchShape` means by them: ``num_prefill_tokens`` counts the
tokens of prefill chunks (recompute included), ``num_decode_requests`` the requests
computing one decode token, and ``num_context_tokens`` the KV tokens attention reads,
i.e. for every scheduled request the tokens in its cache once the step is done (a
decode at position p counts p + 1, a chunk of n tokens starting at s counts s + n).
Step time is fitted by least squares on ``1, num_prefill_tokens, num_decode_requests,
num_context_tokens`` (at least 4 points, of full rank), and never predicted below the
fastest measured step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from avmp.models.geometry import ModelGeometry
from avmp.sim.scheduler import ScheduledChunk


@dataclass(frozen=True)
class GpuProfile:
    """Peak figures of one GPU and how much of them a serving step achieves.

    Attributes:
        hbm_bytes_per_s: peak memory bandwidth (vendor datasheet).
        bf16_flops_per_s: peak dense bf16 tensor-core throughput, no sparsity (datasheet).
        bandwidth_efficiency: fraction of peak bandwidth that weight and KV streaming
            reaches; 0.8 is typical of well-tuned decode kernels.
        compute_efficiency: fraction of peak FLOP/s that large bf16 GEMMs reach in
            serving (model FLOP utilization); 0.6 is typical.
        step_overhead_s: fixed cost of a step outside the kernels (scheduling, launches,
            sampling), an assumption of 1 ms with CUDA graphs.
    """

    name: str
    description: str
    memory_bytes: int
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    bandwidth_efficiency: float = 0.8
    compute_efficiency: float = 0.6
    step_overhead_s: float = 1e-3

    def __post_init__(self) -> None:
        if self.hbm_bytes_per_s <= 0 or self.bf16_flops_per_s <= 0:
            raise ValueError(f"{self.name}: bandwidth and FLOP/s must be positive")
        for value in (self.bandwidth_efficiency, self.compute_efficiency):
            if not 0 < value <= 1:
                raise ValueError(f"{self.name}: efficiencies must be in (0, 1], got {value}")
        if self.step_overhead_s < 0:
            raise ValueError(f"{self.name}: step_overhead_s must be >= 0")

    @property
    def effective_bytes_per_s(self) -> float:
        return self.hbm_bytes_per_s * self.bandwidth_efficiency

    @property
    def effective_flops_per_s(self) -> float:
        return self.bf16_flops_per_s * self.compute_efficiency


_GIB = 1 << 30

# Sources, vendor datasheets:
# - RTX 3060 12 GB: NVIDIA GeForce RTX 3060 specs (192-bit GDDR6 at 15 Gbps = 360 GB/s);
#   NVIDIA Ampere GA102 whitepaper, GeForce tensor FP16/bf16 with FP32 accumulate at half
#   the FP16-accumulate rate: 25.6 dense TFLOP/s for the 3060 (51.2 with FP16 accumulate).
# - A100 80 GB SXM: NVIDIA A100 datasheet, 2,039 GB/s HBM2e, 312 TFLOP/s bf16 dense.
# - H100 80 GB SXM: NVIDIA H100 datasheet, 3.35 TB/s HBM3, 989 TFLOP/s bf16 dense
#   (the datasheet's 1,979 counts 2:4 sparsity).
# - H200 SXM 141 GB: NVIDIA H200 datasheet, 4.8 TB/s HBM3e, 989 TFLOP/s bf16 dense.
GPU_PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in (
        GpuProfile("rtx3060", "NVIDIA GeForce RTX 3060 12 GB", 12 * _GIB, 360e9, 25.6e12),
        GpuProfile("a100", "NVIDIA A100 80 GB SXM", 80 * _GIB, 2.039e12, 312e12),
        GpuProfile("h100", "NVIDIA H100 80 GB SXM", 80 * _GIB, 3.35e12, 989e12),
        GpuProfile("h200", "NVIDIA H200 141 GB SXM", 141 * _GIB, 4.8e12, 989e12),
    )
}


def get_profile(name: str) -> GpuProfile:
    """The GPU profile called ``name`` (raises ValueError naming the known ones)."""
    try:
        return GPU_PROFILES[name]
    except KeyError:
        known = ", ".join(GPU_PROFILES)
        raise ValueError(f"unknown GPU profile {name!r}; known: {known}") from None


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What a step computes, in the quantities its cost depends on.

    Attributes:
        num_prefill_tokens: tokens of prefill chunks (recompute included).
        num_decode_requests: requests computing one decode token.
        num_context_tokens: tokens of KV read, summed over scheduled requests.
        num_attention_pairs: (query token, key token) pairs of causal attention.
        num_requests: scheduled requests (each reads and writes its recurrent state).
    """

    num_prefill_tokens: int = 0
    num_decode_requests: int = 0
    num_context_tokens: int = 0
    num_attention_pairs: int = 0
    num_requests: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_requests

    @classmethod
    def from_chunks(cls, chunks: tuple[ScheduledChunk, ...] | list[ScheduledChunk]) -> BatchShape:
        prefill = decode = context = pairs = 0
        for chunk in chunks:
            n, start = chunk.num_tokens, chunk.start
            if chunk.is_decode:
                decode += 1
            else:
                prefill += n
            context += start + n
            pairs += n * start + n * (n + 1) // 2
        return cls(prefill, decode, context, pairs, len(chunks))


def without_recompute(chunks: tuple[ScheduledChunk, ...]) -> list[ScheduledChunk]:
    """The step's chunks with their recomputed prefix removed: what the step would have
    computed had no request been preempted (its cost difference is the recompute time)."""
    kept = []
    for chunk in chunks:
        fresh = chunk.num_tokens - chunk.num_recompute_tokens
        if fresh > 0:
            start = chunk.start + chunk.num_recompute_tokens
            kept.append(chunk._replace(start=start, num_tokens=fresh, num_recompute_tokens=0))
    return kept


class StepTimeModel(Protocol):
    """Seconds of GPU work for one step of a given shape."""

    def step_seconds(self, shape: BatchShape) -> float: ...


class RooflineModel:
    """Roofline step time from a model's geometry and a GPU profile (see module doc)."""

    def __init__(self, geometry: ModelGeometry, profile: GpuProfile) -> None:
        self.geometry = geometry
        self.profile = profile
        self._kv_bytes_per_token = geometry.kv_bytes_per_token
        self._state_io_bytes = 2 * geometry.state_bytes_per_request  # read + write
        self._active_fraction = min(1.0, geometry.num_active_params / geometry.num_params)
        self._attention_flops_per_pair = (
            4 * geometry.hidden_size * geometry.num_attention_layers  # QK^T and PV
        )

    def weight_bytes_read(self, num_tokens: int) -> float:
        """Weight bytes a step of ``num_tokens`` tokens reads: all of a dense model; for a
        mixture of experts, the expected fraction of experts that at least one token
        routes to, ``1 - (1 - active / total) ** tokens`` (uniform routing)."""
        untouched = (1.0 - self._active_fraction) ** num_tokens
        return self.geometry.weight_bytes * (1.0 - untouched)

    def step_bytes(self, shape: BatchShape) -> float:
        kv = (shape.num_context_tokens + shape.num_tokens) * self._kv_bytes_per_token
        state = shape.num_requests * self._state_io_bytes
        return self.weight_bytes_read(shape.num_tokens) + kv + state

    def step_flops(self, shape: BatchShape) -> float:
        dense = 2.0 * self.geometry.num_active_params * shape.num_tokens
        return dense + self._attention_flops_per_pair * shape.num_attention_pairs

    def step_seconds(self, shape: BatchShape) -> float:
        if shape.num_tokens == 0:
            return 0.0
        memory_s = self.step_bytes(shape) / self.profile.effective_bytes_per_s
        compute_s = self.step_flops(shape) / self.profile.effective_flops_per_s
        return max(memory_s, compute_s) + self.profile.step_overhead_s


_CALIBRATION_FEATURES = ("num_prefill_tokens", "num_decode_requests", "num_context_tokens")


@dataclass(frozen=True)
class CalibratedModel:
    """Step time fitted to measured engine steps (see module doc for the file format).

    ``coefficients`` are (intercept, per prefill token, per decode request, per context
    token), in seconds.
    """

    gpu: str
    model: str | None
    coefficients: tuple[float, float, float, float]
    min_step_s: float
    num_points: int

    def step_seconds(self, shape: BatchShape) -> float:
        if shape.num_tokens == 0:
            return 0.0
        c0, c_prefill, c_decode, c_context = self.coefficients
        predicted = (
            c0
            + c_prefill * shape.num_prefill_tokens
            + c_decode * shape.num_decode_requests
            + c_context * shape.num_context_tokens
        )
        return max(predicted, self.min_step_s)


def fit_calibration(points: list[dict[str, float]], gpu: str, model: str | None) -> CalibratedModel:
    """Least-squares fit of measured steps (each a dict of the features and ``step_s``).

    Raises:
        ValueError: fewer than 4 points, a missing or negative field, or features that do
            not vary enough to determine every coefficient.
    """
    if len(points) < 4:
        raise ValueError(f"a calibration needs at least 4 points, got {len(points)}")
    rows, targets = [], []
    for index, point in enumerate(points):
        try:
            values = [float(point[name]) for name in (*_CALIBRATION_FEATURES, "step_s")]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"calibration point {index}: bad or missing field ({error})") from None
        if any(v < 0 or not math.isfinite(v) for v in values):
            raise ValueError(f"calibration point {index}: values must be finite and >= 0")
        rows.append([1.0, *values[:3]])
        targets.append(values[3])
    matrix = np.array(rows)
    if np.linalg.matrix_rank(matrix) < matrix.shape[1]:
        raise ValueError("calibration points do not vary enough to fit every coefficient")
    solution = np.linalg.lstsq(matrix, np.array(targets), rcond=None)[0]
    c0, c1, c2, c3 = (float(x) for x in solution)
    return CalibratedModel(gpu, model, (c0, c1, c2, c3), min(targets), len(points))


def load_calibration(path: str | Path) -> CalibratedModel:
    """Read and fit a calibration JSON file (raises ValueError naming the file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return fit_calibration(list(data["points"]), str(data.get("gpu", "")), data.get("model"))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a valid step-time calibration: {error}") from None


# ---- allocator, migration and compaction costs ----------------------------------------------

DEFAULT_ALLOCATOR_CALLS_PATH = Path("benchmarks/results/allocator_calls.json")


@dataclass(frozen=True)
class AllocatorCallCosts:
    """Simulated CPU cost of each allocator call, in microseconds.

    Deterministic by design: the clock must not depend on measured time. The defaults are
    assumptions of the order of a Python block manager's bookkeeping (a few dict and list
    operations per call); `load_allocator_call_costs` replaces them with the figures of
    the allocator-call benchmark when its results exist.
    """

    admit_us: float = 10.0
    grow_us: float = 2.0
    free_us: float = 5.0
    failed_us: float = 2.0
    source: str = "assumed constants (avmp.sim.timing.AllocatorCallCosts)"

    def __post_init__(self) -> None:
        if min(self.admit_us, self.grow_us, self.free_us, self.failed_us) < 0:
            raise ValueError("allocator call costs must be >= 0")


def load_allocator_call_costs(
    allocator_name: str, path: str | Path = DEFAULT_ALLOCATOR_CALLS_PATH
) -> AllocatorCallCosts:
    """Per-call costs of ``allocator_name`` from the allocator-call benchmark's results
    (``benchmarks/allocator_calls.py``).

    Reads ``{"allocators": {NAME: {"median_of_repeats": {"admit_median_us": ..,
    "grow_median_us": .., "free_median_us": ..}}}}``. A missing file or allocator gives
    the documented defaults; a missing or NaN figure, and the cost of a failed call (not
    measured there), keep their defaults.

    Raises:
        ValueError: the file exists but is not such a result (names the file).
    """
    path = Path(path)
    if not path.is_file():
        return AllocatorCallCosts()
    try:
        entry = json.loads(path.read_text())["allocators"].get(allocator_name)
        figures = None if entry is None else entry["median_of_repeats"]
        if figures is None:
            return AllocatorCallCosts()
        values = {f"{op}_us": _figure(figures, f"{op}_median_us", op) for op in _MEASURED_OPS}
        return AllocatorCallCosts(**values, source=str(path))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: not an allocator-call benchmark result: {e}") from None


_MEASURED_OPS = ("admit", "grow", "free")


def _figure(figures: dict[str, object], key: str, op: str) -> float:
    """One measured median, or the default of ``op`` when it is absent or NaN."""
    value = figures.get(key)
    if value is None:
        return float(getattr(AllocatorCallCosts(), f"{op}_us"))
    number = float(value)  # type: ignore[arg-type]
    return number if math.isfinite(number) else float(getattr(AllocatorCallCosts(), f"{op}_us"))


# PEERS.md, measured on an H100 with CUDA VMM: unmap + map + set access of one 2 MiB chunk.
VMM_MIGRATION_S_PER_CHUNK = 68e-6


@dataclass(frozen=True)
class MemoryMoveCosts:
    """What moving capacity costs.

    Attributes:
        migration_s_per_chunk: remapping one chunk between pools (no bytes copied).
        compaction_bytes_per_s: bytes of live units copied per second; None means the
            profile's effective bandwidth halved (each byte is read and written).
    """

    migration_s_per_chunk: float = VMM_MIGRATION_S_PER_CHUNK
    compaction_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        if self.migration_s_per_chunk < 0:
            raise ValueError("migration_s_per_chunk must be >= 0")
        if self.compaction_bytes_per_s is not None and self.compaction_bytes_per_s <= 0:
            raise ValueError("compaction_bytes_per_s must be positive")

    def compaction_rate(self, profile: GpuProfile) -> float:
        if self.compaction_bytes_per_s is not None:
            return self.compaction_bytes_per_s
        return profile.effective_bytes_per_s / 2
