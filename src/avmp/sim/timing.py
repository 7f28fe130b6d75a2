"""How long a step takes on a GPU by a roofline over a model's bytes and FLOPs (a fit of
measured engine steps is `avmp.sim.calibration`); what a step computes (`BatchShape`) and
which steps replay CUDA graphs (`GraphRule`); whether a run fits the GPU's memory; and
what allocation, migration and compaction cost.

The simulator's clock comes only from here and `avmp.sim.calibration`, never from the
wall time of the Python loop, so the same trace gives the same simulated seconds on any
machine.

Roofline. One step reads the weights it touches, the KV of every scheduled request's
context, writes the new tokens' KV, and reads and writes each scheduled request's
recurrent state; it spends ``2 x active params`` FLOPs per token plus attention FLOPs:
``4 x hidden size x attention layers`` (QK^T and PV) per causal (query, key) pair, the
pairs counted exactly, so a chunk late in a long prompt pays for the whole prefix.
The step takes ``max(bytes / (BW x eff_bw), FLOPs / (peak x eff_compute)) + overhead``.
On one rank of a model split over N GPUs (a geometry from
`avmp.models.tensor_parallel.rank_geometry`) the bytes and FLOPs are the rank's and the
step adds its all-reduces between ranks: a ring's ``2 (N - 1) / N x bytes / bandwidth +
2 (N - 1) x latency`` for each (`Interconnect`, `all_reduce_bytes_per_token`).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from avmp.models.geometry import LayerKind, ModelGeometry, dtype_bytes
from avmp.sched.graph_buckets import (
    DECODE_GRAPH_SIZES,
    MAX_MIXED_GRAPHS,
    bucket,
    graph_width,
    token_buckets,
)
from avmp.sched.scheduler import ScheduledChunk


@dataclass(frozen=True)
class Interconnect:
    """The GPU-to-GPU link that tensor parallelism's collectives cross.

    Attributes:
        bytes_per_s: what a ring collective achieves on one direction of a GPU's link
            (NCCL's bus bandwidth), not the datasheet's bidirectional total.
        latency_s_per_step: the fixed cost of one step of a ring (a send to the next
            rank and its arrival), paid ``2 (N - 1)`` times by an all-reduce.
    """

    name: str
    description: str
    bytes_per_s: float
    latency_s_per_step: float

    def __post_init__(self) -> None:
        if self.bytes_per_s <= 0 or self.latency_s_per_step < 0:
            raise ValueError(f"{self.name}: bandwidth must be positive and latency >= 0")

    def all_reduce_seconds(self, num_bytes: float, num_ranks: int, count: int = 1) -> float:
        """``count`` ring all-reduces of ``num_bytes`` in all on each of ``num_ranks``
        ranks: each a reduce-scatter and an all-gather, ``2 (N - 1)`` steps each moving
        ``1 / N`` of its bytes: ``2 (N - 1) / N x bytes / bandwidth + 2 (N - 1) x count x
        latency``."""
        steps = 2 * (num_ranks - 1)
        return steps * (num_bytes / num_ranks / self.bytes_per_s + count * self.latency_s_per_step)

    def all_gather_seconds(self, num_bytes: float, num_ranks: int) -> float:
        """A ring all-gather that leaves ``num_bytes`` in all on every rank (each holds
        ``1 / N`` of them before): ``N - 1`` steps of ``1 / N`` of the bytes."""
        steps = num_ranks - 1
        return steps * (num_bytes / num_ranks / self.bytes_per_s + self.latency_s_per_step)


# NVLink 4 (H100 SXM and H200 SXM, one host of 8 through NVSwitch). Sources:
# - bandwidth: NVIDIA's H100 and H200 datasheets give "NVLink: 900 GB/s", both directions
#   together (450 GB/s each way). On the wire NCCL gets about 80% of a direction's line
#   rate: "450GB/s is the line rate. With the protocol overhead (~20%) NCCL can get an
#   effective NVLink bandwidth of 370GB/s ... when running with NCCL_ALGO=RING"
#   (NCCL maintainer, github.com/NVIDIA/nccl-tests/issues/212); ring all-reduce bus
#   bandwidth of 365-370 GB/s from 2 to 8 H100 SXM is reported in
#   github.com/NVIDIA/nccl/issues/1455. We take 370 GB/s.
# - latency: a small all-reduce on 2 H100s of an HGX node took about 6 us (NCCL 2.20.5,
#   CUDA graphs; github.com/NVIDIA/nccl/issues/1259). A ring all-reduce on 2 ranks has
#   2 steps, so 3 us per step. Charging every step of a larger ring as much overstates
#   small all-reduces on 4 and 8 ranks (NCCL then picks tree or NVLink SHARP
#   algorithms whose latency grows more slowly): the term is an upper bound there.
NVLINK4 = Interconnect("nvlink4", "NVLink 4 through NVSwitch (900 GB/s bidirectional)", 370e9, 3e-6)


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
        host_link_bytes_per_s: achievable copy bandwidth between pinned host memory and
            the device, per direction (what a swap to the host tier moves at); see
            `pcie_x16_bytes_per_s` for the figures.
        step_overhead_s: fixed cost of a step outside the kernels (scheduling, launches,
            sampling), an assumption of 1 ms with CUDA graphs.
        interconnect: the link between the GPUs of one host, which tensor parallelism
            needs (None where no figures are given: such a profile runs one GPU).
        num_sms: streaming multiprocessors (datasheet), among which one kernel's
            programs share the bandwidth: the physical form of a calibration prices the
            longest decode-attention program at one SM's share
            (`avmp.sim.calibration.PhysicalFeatures`); 1 where unknown, which prices it
            at the whole GPU's bandwidth.
    """

    name: str
    description: str
    memory_bytes: int
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    host_link_bytes_per_s: float
    bandwidth_efficiency: float = 0.8
    compute_efficiency: float = 0.6
    step_overhead_s: float = 1e-3
    interconnect: Interconnect | None = None
    num_sms: int = 1

    def __post_init__(self) -> None:
        if min(self.hbm_bytes_per_s, self.bf16_flops_per_s, self.host_link_bytes_per_s) <= 0:
            raise ValueError(f"{self.name}: bandwidths and FLOP/s must be positive")
        if self.num_sms < 1:
            raise ValueError(f"{self.name}: num_sms must be >= 1, got {self.num_sms}")
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

    def host_copy_seconds(self, num_bytes: int) -> float:
        """Seconds to copy ``num_bytes`` one way between pinned host memory and the
        device, at `host_link_bytes_per_s` (one copy at a time per direction)."""
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        return num_bytes / self.host_link_bytes_per_s


_GIB = 1 << 30

# PCIe copy efficiency: an assumption, not a measurement of ours. A transaction layer
# packet carries at most 256 payload bytes (the usual maximum payload size on these
# hosts) behind about 24 bytes of header, sequence number and CRC, which caps payload at
# ~91% of the line rate before flow-control and DMA overheads; pinned-memory
# ``cudaMemcpy`` benchmarks (CUDA samples' bandwidthTest, nvbandwidth) are commonly
# reported at 80-90% of the theoretical figure. We take the low end, 0.8.
PCIE_COPY_EFFICIENCY = 0.8


def pcie_x16_bytes_per_s(generation: int) -> float:
    """Theoretical bytes per second of a PCIe x16 link, per direction (PCI-SIG base
    specifications): 16 GT/s per lane for generation 4 and 32 GT/s for 5, 128b/130b
    encoding, 16 lanes; 31.5 GB/s and 63.0 GB/s."""
    transfers = {4: 16e9, 5: 32e9}
    if generation not in transfers:
        raise ValueError(f"PCIe generation must be 4 or 5, got {generation}")
    return transfers[generation] * 16 * (128 / 130) / 8


def _host_link(generation: int) -> float:
    return pcie_x16_bytes_per_s(generation) * PCIE_COPY_EFFICIENCY


# Sources, vendor datasheets:
# - RTX 3060 12 GB: NVIDIA GeForce RTX 3060 specs (192-bit GDDR6 at 15 Gbps = 360 GB/s);
#   NVIDIA Ampere GA102 whitepaper, GeForce tensor FP16/bf16 with FP32 accumulate at half
#   the FP16-accumulate rate: 25.6 dense TFLOP/s for the 3060 (51.2 with FP16 accumulate).
# - A100 80 GB SXM: NVIDIA A100 datasheet, 2,039 GB/s HBM2e, 312 TFLOP/s bf16 dense.
# - H100 80 GB SXM: NVIDIA H100 datasheet, 3.35 TB/s HBM3, 989 TFLOP/s bf16 dense
#   (the datasheet's 1,979 counts 2:4 sparsity).
# - H200 SXM 141 GB: NVIDIA H200 datasheet, 4.8 TB/s HBM3e, 989 TFLOP/s bf16 dense.
# Streaming multiprocessors (num_sms): RTX 3060 28 (GA106, 3,584 CUDA cores at 128 per
# SM), A100 108, H100 SXM 132 and H200 SXM 132 (NVIDIA A100 and H100 whitepapers; the H200
# is the H100 SXM's GH100 with HBM3e).
# Host link, the interface each datasheet or spec page names: RTX 3060 "PCI Express 4.0"
# (x16 on the desktop card), A100 SXM "PCIe Gen4: 64 GB/s", H100 SXM and H200 SXM "PCIe
# Gen5: 128 GB/s" (both directions together: x16); per direction times
# PCIE_COPY_EFFICIENCY: 25.2 GB/s for PCIe 4.0, 50.4 GB/s for PCIe 5.0.
GPU_PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in (
        GpuProfile(
            "rtx3060",
            "NVIDIA GeForce RTX 3060 12 GB",
            12 * _GIB,
            360e9,
            25.6e12,
            _host_link(4),
            num_sms=28,
        ),
        GpuProfile(
            "a100",
            "NVIDIA A100 80 GB SXM",
            80 * _GIB,
            2.039e12,
            312e12,
            _host_link(4),
            num_sms=108,
        ),
        GpuProfile(
            "h100",
            "NVIDIA H100 80 GB SXM",
            80 * _GIB,
            3.35e12,
            989e12,
            _host_link(5),
            interconnect=NVLINK4,
            num_sms=132,
        ),
        GpuProfile(
            "h200",
            "NVIDIA H200 141 GB SXM",
            141 * _GIB,
            4.8e12,
            989e12,
            _host_link(5),
            interconnect=NVLINK4,
            num_sms=132,
        ),
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
        longest_prefill_tokens: the most tokens one request computes in the step's
            prefill chunks (0 for a pure decode step): a sequence's chunk runs serially.
        longest_context_tokens: the most context tokens of one scheduled request (its
            tokens in the cache once the step is done): decode attention scans one
            request's KV serially. 0 (not recorded) is priced as the mean context.
        num_graph_rows: the rows of the CUDA graph the step replays, padding included
            (`from_chunks`: a pure decode step's requests padded to a captured batch
            size, `decode_graph_rows`); 0 for a step that runs eagerly.
    """

    num_prefill_tokens: int = 0
    num_decode_requests: int = 0
    num_context_tokens: int = 0
    num_attention_pairs: int = 0
    num_requests: int = 0
    longest_prefill_tokens: int = 0
    longest_context_tokens: int = 0
    num_graph_rows: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_requests

    @property
    def num_prefill_attention_pairs(self) -> int:
        """Attention pairs beyond one per context token: over chunks of n tokens at
        position s, ``(n - 1) * (s + n / 2)``, 0 for a decode. This is a prefill chunk's
        quadratic attention work (about ``n * (s + n / 2)``), which grows with the
        chunk's position in a long prompt where the context tokens grow only by n; a
        profiled step's record gives it the same way (pairs minus context)."""
        return self.num_attention_pairs - self.num_context_tokens

    @classmethod
    def from_chunks(cls, chunks: tuple[ScheduledChunk, ...] | list[ScheduledChunk]) -> BatchShape:
        prefill = decode = context = pairs = longest = longest_context = 0
        for chunk in chunks:
            n, start = chunk.num_tokens, chunk.start
            if chunk.is_decode:
                decode += 1
            else:
                prefill += n
                longest = max(longest, n)
            context += start + n
            longest_context = max(longest_context, start + n)
            pairs += n * start + n * (n + 1) // 2
        graph_rows = decode_graph_rows(decode) if prefill == 0 else 0
        return cls(
            prefill, decode, context, pairs, len(chunks), longest, longest_context, graph_rows
        )


# decode_graph_rows of every batch up to the largest graph, looked up once per step
_GRAPH_ROWS = [0] + [
    next(size for size in DECODE_GRAPH_SIZES if size >= n)
    for n in range(1, DECODE_GRAPH_SIZES[-1] + 1)
]

# The engine's graphs are also keyed by their block table's width (`graph_width`), in
# pages of the engine's page size (avmp.memory.spec.MemoryConfig.block_size).
GRAPH_PAGE_TOKENS = 16


def graph_width_tokens(longest_context_tokens: int) -> int:
    """The tokens of block table a decode graph is captured with for a batch whose
    longest context is ``longest_context_tokens`` (`graph_width` of its pages)."""
    return graph_width(-(-max(0, longest_context_tokens) // GRAPH_PAGE_TOKENS)) * GRAPH_PAGE_TOKENS


def decode_graph_rows(num_decode_requests: int) -> int:
    """The rows of the decode graph that a pure decode step of ``num_decode_requests``
    requests replays: the smallest captured size that holds them (the engine pads the
    batch with rows every kernel skips, but a padded row still costs its share of the
    graph's GEMMs and launches), 0 when none does (the step runs eagerly) or for none."""
    if not 0 < num_decode_requests < len(_GRAPH_ROWS):
        return 0
    return _GRAPH_ROWS[num_decode_requests]


@functools.lru_cache(maxsize=16)
def _token_buckets(max_num_batched_tokens: int) -> tuple[int, ...]:
    return token_buckets(max_num_batched_tokens)


def mixed_graph_tokens(num_tokens: int, max_num_batched_tokens: int) -> int:
    """The padded tokens of a prefill or mixed step's graph: its token bucket
    (`token_buckets` of the step budget); 0 for a step above the budget."""
    return bucket(num_tokens, _token_buckets(max_num_batched_tokens)) or 0


# What a step captured (`GraphRule.take`): a decode graph, or a prefill or mixed graph.
DECODE_CAPTURE = "decode"
MIXED_CAPTURE = "mixed"
CAPTURE_KINDS = (DECODE_CAPTURE, MIXED_CAPTURE)
# A graph a step would capture: its kind and key (a decode graph's rows and width in
# tokens; a mixed graph's tokens, sequences and width in tokens).
_NewGraph = tuple[str, tuple[int, ...]]


class GraphRule:
    """Which steps of one run the engine replays as CUDA graphs, and on how many rows,
    as `avmp.engine.fast_runner.FastModelRunner.padded_shape` decides it: every pure
    decode step of at most the largest graph size (`BatchShape.from_chunks` marks them);
    with ``mixed`` (an engine that captures prefill and mixed steps, as the measured one
    did: `avmp.sim.calibration.CalibratedModel.mixed_graphs`) a prefill or mixed step
    padded to its token and sequence buckets, replaying the narrowest captured graph of
    those buckets whose block table is wide enough, or capturing one while fewer than
    ``max_mixed_graphs`` are, else running eagerly. It keeps the run's captured buckets:
    one per run.

    ``captured``: the (tokens, sequences, block-table width in tokens) buckets captured
    before the run (the engine's warm-up captures common ones; nothing by default).
    ``captured_decode``: the decode graphs' (rows, block-table width in tokens) keys, as
    the engine keys them (`FastModelRunner._graph_for`: one graph per batch size and
    width, captured on first use); none before the run, as an engine replay builds a
    fresh engine per run.
    """

    def __init__(
        self,
        max_num_batched_tokens: int,
        mixed: bool,
        max_mixed_graphs: int = MAX_MIXED_GRAPHS,
        captured: tuple[tuple[int, int, int], ...] = (),
    ) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens
        self.mixed = mixed
        self.max_mixed_graphs = max_mixed_graphs
        self.captured: set[tuple[int, int, int]] = set(captured)
        self.captured_decode: set[tuple[int, int]] = set()

    def shape(self, shape: BatchShape, record: bool = True) -> BatchShape:
        """``shape`` with the graph rows the engine runs it on (``record``: a step the
        run takes, whose new bucket is captured; False: a what-if, nothing captured)."""
        return self.take(shape)[0] if record else self._padded(shape)[0]

    def take(self, shape: BatchShape) -> tuple[BatchShape, str | None]:
        """A step the run takes: ``shape`` with the graph rows the engine runs it on, and
        the kind of graph it captures first (`DECODE_CAPTURE`, `MIXED_CAPTURE`; None
        where it replays one captured before or runs eagerly), which is then kept."""
        padded, new = self._padded(shape)
        if new is None:
            return padded, None
        kind, key = new
        if kind == DECODE_CAPTURE:
            self.captured_decode.add((key[0], key[1]))
        else:
            self.captured.add((key[0], key[1], key[2]))
        return padded, kind

    def _padded(self, shape: BatchShape) -> tuple[BatchShape, _NewGraph | None]:
        """``shape`` as the engine runs it, and the graph it would capture for it (None
        where it needs none new); nothing recorded."""
        if shape.num_graph_rows and shape.num_prefill_tokens == 0:  # a decode graph
            width = graph_width_tokens(shape.longest_context_tokens)
            if (shape.num_graph_rows, width) in self.captured_decode:
                return shape, None
            return shape, (DECODE_CAPTURE, (shape.num_graph_rows, width))
        if not self.mixed or shape.num_prefill_tokens == 0 or shape.num_graph_rows:
            return shape, None
        tokens = mixed_graph_tokens(shape.num_tokens, self.max_num_batched_tokens)
        requests = decode_graph_rows(shape.num_requests or 1)
        if not tokens or not requests:
            return shape, None
        width = graph_width_tokens(shape.longest_context_tokens)
        padded = replace(shape, num_graph_rows=tokens)
        if any(key[:2] == (tokens, requests) and key[2] >= width for key in self.captured):
            return padded, None
        if len(self.captured) >= self.max_mixed_graphs:
            return shape, None
        return padded, (MIXED_CAPTURE, (tokens, requests, width))


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
    """Roofline step time from a model's geometry and a GPU profile (see module doc).

    Given one rank's geometry (`avmp.models.tensor_parallel.rank_geometry`), the bytes
    and FLOPs are that rank's (its weights, its shard of every unit, ``1 / N`` of the
    attention), and the step adds the collectives between the ranks
    (`communication_seconds`), which it does not overlap with the kernels.
    """

    def __init__(self, geometry: ModelGeometry, profile: GpuProfile) -> None:
        self.geometry = geometry
        self.profile = profile
        self.num_ranks = geometry.num_ranks
        self._kv_bytes_per_token = geometry.kv_bytes_per_token
        self._state_io_bytes = 2 * geometry.state_bytes_per_request  # read + write
        self._active_fraction = min(1.0, geometry.num_active_params / geometry.num_params)
        self._attention_flops_per_pair = (
            4 * geometry.hidden_size * geometry.num_attention_layers / self.num_ranks
        )  # QK^T and PV, of the rank's query heads
        self._link = _interconnect(profile, self.num_ranks)
        widths = all_reduce_bytes_per_token(geometry)
        self._all_reduce_bytes_per_token = sum(widths)
        self._num_all_reduces = len(widths)
        self._logit_bytes = geometry.vocab_size * dtype_bytes(geometry.weight_dtype)

    def communication_seconds(self, shape: BatchShape) -> float:
        """The step's collectives between ranks (0 on one GPU): a ring all-reduce for
        each of `all_reduce_bytes_per_token`, over the step's tokens, and the all-gather
        of the vocabulary-parallel logits of each scheduled request."""
        if self._link is None or shape.num_tokens == 0:
            return 0.0
        link, ranks = self._link, self.num_ranks
        reduce_bytes = shape.num_tokens * self._all_reduce_bytes_per_token
        all_reduces = link.all_reduce_seconds(reduce_bytes, ranks, self._num_all_reduces)
        requests = shape.num_requests or shape.num_decode_requests + (shape.num_prefill_tokens > 0)
        return all_reduces + link.all_gather_seconds(requests * self._logit_bytes, ranks)

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
        step_s = max(memory_s, compute_s) + self.profile.step_overhead_s
        if self._link is not None:  # one GPU: no call per step
            step_s += self.communication_seconds(shape)
        return step_s


def _interconnect(profile: GpuProfile, num_ranks: int) -> Interconnect | None:
    """The profile's GPU link when the model is split (None on one GPU).

    Raises:
        ValueError: a split model on a profile without link figures.
    """
    if num_ranks == 1:
        return None
    if profile.interconnect is None:
        with_link = ", ".join(name for name, p in GPU_PROFILES.items() if p.interconnect)
        raise ValueError(
            f"GPU profile {profile.name} has no GPU-to-GPU link figures for tensor parallel "
            f"over {num_ranks} GPUs; profiles with them: {with_link}"
        )
    return profile.interconnect


def all_reduce_bytes_per_token(geometry: ModelGeometry) -> tuple[int, ...]:
    """Bytes per token of each all-reduce of one forward pass of a model split over
    ``geometry.num_ranks`` ranks (empty on one GPU), in the activations' dtype.

    One hidden-size all-reduce after each row-parallel output, as vLLM's layers place
    them: the vocabulary-parallel embedding, every attention layer's and recurrent
    mixer's output projection, every MLP or MoE layer (Nemotron-H's MLP layers stand
    alone, Zamba2's sit in its shared blocks, pure Mamba2 mostly has none); one more per Mamba1
    layer at ``x_proj`` (``dt_rank + 2 x d_state`` wide, ``dt_rank`` taken as JambaConfig's
    ``hidden / 16``); and, where Mamba2 groups are fewer than the ranks, one fp32 sum of
    squares per token for each gated norm whose group spans ranks.
    """
    if geometry.num_ranks == 1:
        return ()
    act = dtype_bytes(geometry.weight_dtype)
    mixers = geometry.num_attention_layers + geometry.num_recurrent_layers
    widths = [geometry.hidden_size * act] * (1 + mixers + _num_mlp_layers(geometry))
    groups = geometry.parallel_dims.num_mamba2_groups if geometry.parallel_dims else 0
    for layer in geometry.recurrent_layers:
        if layer.kind is LayerKind.MAMBA1 and layer.ssm is not None:
            dt_rank = -(-geometry.hidden_size // 16)
            widths.append((dt_rank + 2 * layer.ssm.shape[-1]) * act)
        elif layer.kind is LayerKind.MAMBA2 and 0 < groups < geometry.num_ranks:
            widths.append(4)
    return tuple(widths)


def _num_mlp_layers(geometry: ModelGeometry) -> int:
    """MLP or MoE layers of one forward pass (see `all_reduce_bytes_per_token`)."""
    if geometry.family == "nemotron_h":
        mixers = {layer.layer_index for layer in geometry.attention_layers}
        mixers |= {layer.layer_index for layer in geometry.recurrent_layers}
        return geometry.num_layers - len(mixers)
    if geometry.family == "zamba2":
        return geometry.num_attention_layers
    if geometry.family == "mamba2":  # an MLP only where the checkpoint has d_intermediate
        dims = geometry.parallel_dims
        return geometry.num_layers if dims is not None and dims.mlp_widths else 0
    return geometry.num_layers


def prefill_s_per_token(model: StepTimeModel, chunk_tokens: int) -> float:
    """Seconds per prompt token of a full prefill chunk: ``model``'s time for a step
    holding one chunk of ``chunk_tokens`` tokens at position 0, over ``chunk_tokens``.

    What recomputing a preempted request costs per token of its context when it is
    prefilled again in chunks of that size (the swap-or-recompute rule weighs it against
    `GpuProfile.host_copy_seconds`); with the chunk at 0 it leaves out the attention over
    earlier chunks, which a long prompt pays on top.

    Raises:
        ValueError: ``chunk_tokens`` below 1.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    chunk = ScheduledChunk(0, 0, chunk_tokens, 0, False, True)
    return model.step_seconds(BatchShape.from_chunks([chunk])) / chunk_tokens


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
