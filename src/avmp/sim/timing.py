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
         "num_context_tokens": 512, "num_requests": 1, "step_s": 0.031},
        ...
      ]
    }

The features mean what `BatchShape` means by them: ``num_prefill_tokens`` counts the
tokens of prefill chunks (recompute included), ``num_decode_requests`` the requests
computing one decode token, ``num_context_tokens`` the KV tokens attention reads, i.e.
for every scheduled request the tokens in its cache once the step is done (a decode at
position p counts p + 1, a chunk of n tokens starting at s counts s + n), and
``num_requests`` the scheduled requests.

Step time is fitted on ``1, num_prefill_tokens, num_decode_requests, num_context_tokens,
num_context_tokens / num_requests, has_prefill``. ``has_prefill`` (1 when the step
computes any prefill token) is the fixed cost of a step the engine runs eagerly: only
pure decode steps replay CUDA graphs, so a step that mixes one short prefill chunk into
a decode batch pays every kernel launch from Python (tens of milliseconds on an H100
host, docs/BENCHMARKS.md). The mean context per request exists because a decode
attention kernel scans one request's KV serially within a thread block: while the batch
does not fill the GPU, a step's latency follows the longest per-request scan, not the
total KV read, so 64 requests of 2,048 tokens cost less than four times 64 of 512. The
fit minimises the *relative* error (least squares weighted by ``1 / step_s``): a plain
fit lets the few long prefill steps dominate the squared error and misses the many short
decode steps by tens of percent. Files written before ``num_requests`` was recorded
still load: when any point lacks it, or when the mean context does not vary
independently of the other features (e.g. only batch-1 steps), the fit drops that
feature; when ``has_prefill`` cannot be told apart from the rest (no prefill steps,
say), it drops that one too, down to the first four. At least 4 points of full rank are
needed; a step is never predicted below the fastest measured step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from avmp.models.geometry import ModelGeometry
from avmp.sched.scheduler import ScheduledChunk


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


# Activation estimate of one step, stated and simple (not measured): every token of the
# step's batch keeps ACTIVATION_COPIES hidden-size bf16 vectors alive at the peak (the
# residual stream, the norm's output, a layer's QKV / in-projection and its gated MLP's
# two up-projections at about 4x hidden each, with slack), and every running request's
# last token produces fp32 logits over the vocabulary for sampling.
ACTIVATION_COPIES = 16
ACTIVATION_BYTES = 2
LOGIT_BYTES = 4


@dataclass(frozen=True)
class DeviceMemory:
    """What one run needs on the GPU, against what the profile's GPU holds."""

    weight_bytes: int
    cache_bytes: int
    activation_bytes: int
    device_bytes: int

    @property
    def needed_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.device_bytes


def activation_bytes(
    geometry: ModelGeometry, max_num_batched_tokens: int, max_num_seqs: int
) -> int:
    """The estimated peak activation memory of one step (see `ACTIVATION_COPIES`)."""
    hidden = max_num_batched_tokens * geometry.hidden_size * ACTIVATION_COPIES * ACTIVATION_BYTES
    logits = min(max_num_seqs, max_num_batched_tokens) * geometry.vocab_size * LOGIT_BYTES
    return hidden + logits


def device_memory(
    geometry: ModelGeometry,
    cache_bytes: int,
    profile: GpuProfile,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
) -> DeviceMemory:
    """Weights (every parameter, at the weights' dtype), the cache budget and the
    activation estimate, beside the memory of ``profile``'s GPU."""
    return DeviceMemory(
        weight_bytes=geometry.weight_bytes,
        cache_bytes=cache_bytes,
        activation_bytes=activation_bytes(geometry, max_num_batched_tokens, max_num_seqs),
        device_bytes=profile.memory_bytes,
    )


def check_feasible(
    geometry: ModelGeometry,
    cache_bytes: int,
    profile: GpuProfile,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
) -> DeviceMemory:
    """The run's memory, if the profile's GPU holds it.

    Raises:
        ValueError: weights + cache + activations exceed the GPU's memory (one line,
            with each part, so the user sees what to shrink).
    """
    memory = device_memory(geometry, cache_bytes, profile, max_num_batched_tokens, max_num_seqs)
    if not memory.fits:
        raise ValueError(infeasible_message(geometry.name, profile, memory))
    return memory


def infeasible_message(model: str, profile: GpuProfile, memory: DeviceMemory) -> str:
    gib = 1 << 30
    return (
        f"{model} cannot run on {profile.description} ({profile.name}): weights "
        f"{memory.weight_bytes / gib:.1f} GiB + cache {memory.cache_bytes / gib:.1f} GiB + "
        f"activations {memory.activation_bytes / gib:.1f} GiB = "
        f"{memory.needed_bytes / gib:.1f} GiB > {memory.device_bytes / gib:.1f} GiB"
    )


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


_BASE_FEATURES = ("num_prefill_tokens", "num_decode_requests", "num_context_tokens")
MEAN_CONTEXT_FEATURE = "mean_context_tokens"
EAGER_FEATURE = "has_prefill"
_MEAN_FEATURES = (*_BASE_FEATURES, MEAN_CONTEXT_FEATURE)
_FULL_FEATURES = (*_MEAN_FEATURES, EAGER_FEATURE)
_FEATURE_SETS = (_FULL_FEATURES, _MEAN_FEATURES, _BASE_FEATURES)  # the fit's preference


def calibration_features(shape: BatchShape) -> tuple[float, float, float, float, float]:
    """The fit's features of a step, in `_FULL_FEATURES` order: prefill tokens, decode
    requests, context tokens, context tokens per scheduled request, and 1.0 when the step
    has prefill tokens.

    A shape that does not count its requests (``num_requests`` 0, as hand-built shapes
    may) is taken as its decode requests plus one prefilling request when it has
    prefill tokens: the fewest requests that can produce it.
    """
    requests = shape.num_requests or shape.num_decode_requests + (shape.num_prefill_tokens > 0)
    mean_context = shape.num_context_tokens / requests if requests else 0.0
    return (
        float(shape.num_prefill_tokens),
        float(shape.num_decode_requests),
        float(shape.num_context_tokens),
        mean_context,
        float(shape.num_prefill_tokens > 0),
    )


@dataclass(frozen=True)
class CalibratedModel:
    """Step time fitted to measured engine steps (see module doc for the file format).

    ``coefficients`` are the intercept then one per feature, in seconds per unit:
    (intercept, per prefill token, per decode request, per context token[, per token of
    mean context[, per step with prefill]]). Their number says which of the three sets of
    the module doc (four, five or six terms with the intercept) the fit used.
    """

    gpu: str
    model: str | None
    coefficients: tuple[float, ...]
    min_step_s: float
    num_points: int

    def __post_init__(self) -> None:
        sizes = sorted(1 + len(names) for names in _FEATURE_SETS)
        if len(self.coefficients) not in sizes:
            raise ValueError(
                f"a calibration has {', '.join(map(str, sizes))} coefficients, "
                f"got {len(self.coefficients)}"
            )

    @property
    def features(self) -> tuple[str, ...]:
        """The fitted features, in `_FULL_FEATURES` order (each set is a prefix of it)."""
        return _FULL_FEATURES[: len(self.coefficients) - 1]

    def step_seconds(self, shape: BatchShape) -> float:
        if shape.num_tokens == 0:
            return 0.0
        values = calibration_features(shape)[: len(self.features)]
        intercept, *slopes = self.coefficients
        predicted = intercept + sum(c * v for c, v in zip(slopes, values, strict=True))
        return max(predicted, self.min_step_s)


def fit_calibration(points: list[dict[str, float]], gpu: str, model: str | None) -> CalibratedModel:
    """Relative-error least-squares fit of measured steps (each a dict of the features,
    optionally ``num_requests``, and ``step_s``); see the module doc for the features.

    Raises:
        ValueError: fewer than 4 points, a missing or negative field, a ``step_s`` of 0,
            a ``num_requests`` below 1 or below the point's decode requests, or features
            that do not vary enough to determine every coefficient.
    """
    if len(points) < 4:
        raise ValueError(f"a calibration needs at least 4 points, got {len(points)}")
    parsed = [_calibration_point(index, point) for index, point in enumerate(points)]
    targets = np.array([step_s for _, step_s in parsed])
    has_requests = all(features[3] is not None for features, _ in parsed)
    for names in _FEATURE_SETS:
        if MEAN_CONTEXT_FEATURE in names and not has_requests:
            continue
        columns = [_FULL_FEATURES.index(name) for name in names]
        matrix = np.array([[1.0, *(features[i] for i in columns)] for features, _ in parsed])
        fitted = _weighted_fit(matrix, targets)
        if fitted is not None:
            return CalibratedModel(gpu, model, fitted, float(targets.min()), len(points))
    raise ValueError("calibration points do not vary enough to fit every coefficient")


def _calibration_point(
    index: int, point: dict[str, float]
) -> tuple[tuple[float, float, float, float | None, float], float]:
    """One point's features in `_FULL_FEATURES` order (mean context None without
    ``num_requests``) and its step time."""
    try:
        values = [float(point[name]) for name in (*_BASE_FEATURES, "step_s")]
        requests = None if point.get("num_requests") is None else float(point["num_requests"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"calibration point {index}: bad or missing field ({error})") from None
    if any(v < 0 or not math.isfinite(v) for v in values):
        raise ValueError(f"calibration point {index}: values must be finite and >= 0")
    prefill, decode, context, step_s = values
    if step_s == 0:
        raise ValueError(f"calibration point {index}: step_s must be > 0 (the fit is relative)")
    eager = float(prefill > 0)
    if requests is None:
        return (prefill, decode, context, None, eager), step_s
    if not math.isfinite(requests) or requests < max(1.0, decode):
        raise ValueError(
            f"calibration point {index}: num_requests must be >= 1 and >= num_decode_requests"
        )
    return (prefill, decode, context, context / requests, eager), step_s


def _weighted_fit(matrix: np.ndarray, targets: np.ndarray) -> tuple[float, ...] | None:
    """Coefficients minimising the summed squared relative error, or None when the
    columns of ``matrix`` [N, K] are not independent."""
    weighted = matrix / targets[:, None]  # relative error: residual / step_s
    scale = np.abs(weighted).max(axis=0)  # equilibrate columns (tokens vs intercept)
    scale[scale == 0] = 1.0
    scaled = weighted / scale
    if np.linalg.matrix_rank(scaled) < matrix.shape[1]:
        return None
    solution = np.linalg.lstsq(scaled, np.ones(len(targets)), rcond=None)[0] / scale
    return tuple(float(x) for x in solution)


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
