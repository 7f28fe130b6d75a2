"""How long a step takes on a GPU: a roofline over a model's bytes and FLOPs, or a fit of
measured engine steps; and what allocation, migration and compaction cost.

The simulator's clock comes only from here, never from the wall time of the Python loop,
so the same trace gives the same simulated seconds on any machine.

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

Calibration file (JSON), written by a GPU benchmark of the engine::

    {
      "gpu": "h100",                      # free text, reported
      "model": "nemotron-h-8b",           # must match the geometry's name when present
      "points": [
        {"num_prefill_tokens": 512, "num_decode_requests": 0, "num_context_tokens": 512,
         "num_attention_pairs": 131328, "num_requests": 1, "step_s": 0.031},
        ...
      ]
    }

The features mean what `BatchShape` means by them: ``num_prefill_tokens`` counts the
tokens of prefill chunks (recompute included), ``num_decode_requests`` the requests
computing one decode token, ``num_context_tokens`` the KV tokens attention reads, i.e.
for every scheduled request the tokens in its cache once the step is done (a decode at
position p counts p + 1, a chunk of n tokens starting at s counts s + n),
``num_attention_pairs`` the causal pairs (a chunk counts ``n * s + n * (n + 1) / 2``),
``num_requests`` the scheduled requests, ``longest_prefill_tokens`` the most tokens
one request computes in the step's prefill chunks (0 for a pure decode step), and
``longest_context_tokens`` the most context tokens of one scheduled request (``s + n``
for a chunk of n tokens at s, decode or prefill), ``graph`` 1 when the step replayed a
CUDA graph and 0 when it ran eagerly, and ``num_padded_tokens`` the rows a graph ran,
padding included (a decode graph without it ran `decode_graph_rows`). Other fields are
ignored.

Optionally the file says what capturing a CUDA graph mid-run costs, as the engine measured
it (benchmarks/calibrate.py, from replays' steps that captured one)::

      "graph_captures": {"decode": {"median_s": 0.07, "count": 39},
                         "mixed": {"median_s": 0.31, "count": 66}}

``median_s`` is the seconds a capture adds to the step that makes it, for a new decode
graph and for a new prefill or mixed graph; the simulator charges it whenever its
`GraphRule` meets a graph the run has not captured (`CalibratedModel.capture_seconds`).
Without the field (files from before it) captures cost nothing.

Step time is fitted on ``1, num_prefill_tokens, num_decode_requests, num_context_tokens,
num_context_tokens / num_requests, has_prefill, num_prefill_attention_pairs,
longest_prefill_tokens, longest_context_tokens, eager_decode_requests, graph_rows,
graph_row_width_tokens, mixed_graph_tokens``.
``has_prefill`` (1 when the step computes any prefill token and runs eagerly, not in a
graph) is the fixed cost of a step the engine runs eagerly: before 238ae36 only pure
decode steps replayed CUDA graphs, so a step that mixed one short prefill chunk into a
decode batch paid every kernel launch from Python (prefill and mixed steps may now
replay graphs too, `GraphRule`; a point without the ``graph`` field is eager). The
mean context per request exists because a decode attention kernel scans one request's KV
serially within a thread block: while the batch does not fill the GPU, a step's latency
follows the longest per-request scan, not the total KV read, so 64 requests of 2,048
tokens cost less than four times 64 of 512. ``num_prefill_attention_pairs`` (pairs minus
context tokens: ``(n - 1) * (s + n / 2)`` per chunk, 0 for decodes) is a prefill chunk's
attention, quadratic over a long prompt: the first three features see a chunk of 8,192
tokens at position 32k as one at 0 plus 32k context tokens, priced at the decode rate.
``longest_prefill_tokens`` exists because the Mamba2 varlen scan (and likely the conv
and attention kernels) runs one sequence's chunk serially: on an H200 a step of 8,192
prefill tokens took ~430 ms as one request's chunk but ~160 ms as 16 chunks of 512, so a
prefill step's time follows its longest chunk, which the token count cannot tell.
``longest_context_tokens`` is the same effect in decode attention: the longest
per-request KV scan. The mean context sees it only when contexts are even; on an H200 a
long-document mix's decode batches (a few requests at 20k-35k tokens beside many short
ones, ~5,000 per request on average) took 5.7-9.4 ms where the mean-context fit predicted
3.6-5.4. It sits beside the mean context rather than replacing it: in batches of even
contexts the two are equal (the fit cannot tell them apart there and keeps the older),
and only skewed batches (the calibration's long-context cells) determine it.

The last four tell a step that replays a CUDA graph from one that runs eagerly, which
the step's shape alone cannot: the engine replays graphs of pure decode steps padded to a
captured batch size (`DECODE_GRAPH_SIZES`), which `BatchShape.from_chunks` marks, and
since 238ae36 of prefill and mixed steps padded to token buckets, which the simulator
marks with a `GraphRule` when the calibration's points show them (`mixed_graphs`).
``eager_decode_requests`` (the decode requests of a step without a graph) prices decode
rows that launch their kernels from Python: on an H200 (Granite-4.0-H-Micro geometry,
replays of ShareGPT and of a long-document mix) a step mixing a few hundred prefill
tokens with 12-18 decode rows took 35-45 ms and one with 25-40 rows 70-80 ms, where a
graph of the same rows took 5-10 ms. ``graph_rows`` (a decode graph's rows, padding
included) and ``graph_row_width_tokens`` (those rows times the graph's block-table width
in tokens, `graph_width_tokens`) price what a graph runs rather than what it needs: in
the long-document replay a decode graph of 33 rows (padded to 64) at contexts up to 31k
tokens took 9.4 ms and one of 32 rows at the same contexts 6.8 ms, while 64-row graphs
of ShareGPT's 1-2k-token contexts took about 5 ms; without the width term a fit on the
long-document steps priced ShareGPT's graph steps 60-90% too high, with it within 6%.
``mixed_graph_tokens`` (a prefill or mixed graph's tokens, padding included) is apart
from the decode graphs' rows: a padded token of a mixed step's GEMMs is not a padded
decode request's row, and no GPU run has measured either against the other yet.

The time the device waits for the host is in ``step_s`` as the benchmarks measure it
(benchmarks/engine.py from its cells, benchmarks/calibrate.py from engine replays' step
rows): the device time of the step (CUDA events recorded by the host
before its first launch and after its last, so an eager step whose launches are slower
than its kernels counts the device's waits between them) plus the device's idle time
before the next step begins, reconstructed from the host's start times. ``has_prefill``
then carries the host's cost of an eager step: its launches and the sampling, settling and
planning after it that the overlap with the next step cannot hide. There is no separate
host-time floor: step records hold no host time of their own on the GPU.

The fit minimises the *relative* error: a plain fit lets the few long prefill steps
dominate the squared error and misses the many short decode steps by tens of percent.
Relative to the *predicted* time (least squares weighted by ``1 / step_s`` first, then
reweighted by the prediction, `_reweighted_fit`), since weighting by the measured time
biases the fit low when steps of one shape are timed noisily (see there). A file from
before a field was recorded still loads: the fit uses mean context only when every point
has ``num_requests``, prefill attention pairs only when every point has
``num_attention_pairs``, the longest chunk only when every point has
``longest_prefill_tokens``, the longest context only when every point has
``longest_context_tokens``, the graph features only when every point has ``graph`` (and
the width term only beside the longest context), and it drops the optional features that
the points cannot tell apart from the rest (the mean context of batch-1 steps,
``has_prefill`` when every step or none has prefill, the longest chunk when every prefill
step holds one chunk, the longest context when every step's contexts are even, the graph
features when no step or every step ran a graph), the mixed graphs' tokens first, then
the graph width, the graph rows, the eager decode requests, the longest context,
``has_prefill``, the mean context, the prefill attention pairs, and the longest chunk
last. At least 4 points of full rank are needed; a step is never predicted below the
fastest measured step.

That is the linear form, of every file without a ``form`` field. A file may instead say
``"form": "physical"`` and name a GPU profile (``"profile": "h200"``) beside its model:
the same points then fit `PhysicalFeatures`, each kind of work a step does in seconds at
the profile's peak (weights read, linear-layer FLOPs over the rows run, prefill
attention FLOPs, KV bytes, the longest attention program's scan, a decode graph's block
table, the recurrent scan, state bytes, and the host's cost of eager steps), with
non-negative coefficients held to the profile's efficiencies where the points do not
determine them (`_anchored_fit`), so that a fit on one kind of workload prices the
steps of another (docs/BENCHMARKS.md). The committed linear files keep their fits.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from avmp.models import resolve_model
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
            longest decode-attention program at one SM's share (`PhysicalFeatures`); 1
            where unknown, which prices it at the whole GPU's bandwidth.
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
    did: `CalibratedModel.mixed_graphs`) a prefill or mixed step padded to its token
    and sequence buckets, replaying the narrowest captured graph of those buckets whose
    block table is wide enough, or capturing one while fewer than ``max_mixed_graphs``
    are, else running eagerly. It keeps the run's captured buckets: one per run.

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


_BASE_FEATURES = ("num_prefill_tokens", "num_decode_requests", "num_context_tokens")
MEAN_CONTEXT_FEATURE = "mean_context_tokens"
EAGER_FEATURE = "has_prefill"
PREFILL_ATTENTION_FEATURE = "num_prefill_attention_pairs"
LONGEST_PREFILL_FEATURE = "longest_prefill_tokens"
LONGEST_CONTEXT_FEATURE = "longest_context_tokens"
EAGER_DECODE_FEATURE = "eager_decode_requests"
GRAPH_ROWS_FEATURE = "graph_rows"
GRAPH_WIDTH_FEATURE = "graph_row_width_tokens"
MIXED_GRAPH_FEATURE = "mixed_graph_tokens"
_LONGEST_FEATURES = (LONGEST_PREFILL_FEATURE, LONGEST_CONTEXT_FEATURE)
# Every feature in coefficient order; a fit uses the base ones and a subset of the rest.
_FULL_FEATURES = (
    *_BASE_FEATURES,
    MEAN_CONTEXT_FEATURE,
    EAGER_FEATURE,
    PREFILL_ATTENTION_FEATURE,
    LONGEST_PREFILL_FEATURE,
    LONGEST_CONTEXT_FEATURE,
    EAGER_DECODE_FEATURE,
    GRAPH_ROWS_FEATURE,
    GRAPH_WIDTH_FEATURE,
    MIXED_GRAPH_FEATURE,
)
# The optional features, the one a fit keeps longest first (see `_feature_sets`).
_OPTIONAL_FEATURES = (
    LONGEST_PREFILL_FEATURE,
    PREFILL_ATTENTION_FEATURE,
    MEAN_CONTEXT_FEATURE,
    EAGER_FEATURE,
    LONGEST_CONTEXT_FEATURE,
    EAGER_DECODE_FEATURE,
    GRAPH_ROWS_FEATURE,
    GRAPH_WIDTH_FEATURE,
    MIXED_GRAPH_FEATURE,
)


def calibration_features(shape: BatchShape) -> tuple[float, ...]:
    """The fit's features of a step, in `_FULL_FEATURES` order: prefill tokens, decode
    requests, context tokens, context tokens per scheduled request, 1.0 when the step
    has prefill tokens, prefill attention pairs beyond the context
    (`BatchShape.num_prefill_attention_pairs`), the longest prefill chunk and the
    longest context of one request, the decode requests of a step that runs eagerly
    (no graph: ``num_graph_rows`` 0), the rows of the decode graph a step replays,
    those rows times the graph's block-table width in tokens (`graph_width_tokens`), and
    the tokens of the prefill or mixed graph a step replays.

    A shape that does not count its requests (``num_requests`` 0, as hand-built shapes
    may) is taken as its decode requests plus one prefilling request when it has
    prefill tokens: the fewest requests that can produce it. One that does not count its
    attention pairs has no prefill attention pairs beyond its context (the fewest). One
    with prefill tokens but no longest chunk (0) is taken as its prefill tokens split
    evenly over its prefilling requests: the shortest longest chunk that can produce it.
    One without a longest context (0) is taken as its mean context (even contexts), so
    rows from before the field keep their predictions. One without graph rows runs its
    decode requests eagerly.
    """
    prefill, decode = shape.num_prefill_tokens, shape.num_decode_requests
    decode_rows = shape.num_graph_rows if prefill == 0 else 0  # else a mixed graph's tokens
    requests = shape.num_requests or decode + (prefill > 0)
    mean_context = shape.num_context_tokens / requests if requests else 0.0
    longest = shape.longest_prefill_tokens
    if prefill > 0 and longest == 0:
        longest = -(-prefill // max(1, requests - decode))
    return (
        float(prefill),
        float(decode),
        float(shape.num_context_tokens),
        mean_context,
        float(prefill > 0 and shape.num_graph_rows == 0),
        float(max(0, shape.num_prefill_attention_pairs)),
        float(longest),
        float(shape.longest_context_tokens or mean_context),
        float(decode if shape.num_graph_rows == 0 else 0),
        float(decode_rows),
        float(decode_rows * graph_width_tokens(shape.longest_context_tokens)),
        float(shape.num_graph_rows - decode_rows),
    )


_MIXED_COLUMN = _FULL_FEATURES.index(MIXED_GRAPH_FEATURE)


@functools.cache
def _columns(features: tuple[str, ...]) -> tuple[int, ...]:
    """Where each of ``features`` sits in `_FULL_FEATURES`."""
    return tuple(_FULL_FEATURES.index(name) for name in features)


# ---- the physical form ----------------------------------------------------------------------

LINEAR_FORM = "linear"
PHYSICAL_FORM = "physical"
# A calibration file's ``form``; files without the field (all from before it) are linear.
CALIBRATION_FORMS = (LINEAR_FORM, PHYSICAL_FORM)

# The physical form's features, each a kind of work one step does, in seconds at the
# profile's peak (`PhysicalFeatures`): the weights read once; the linear layers' FLOPs
# over the rows the step runs (graph padding included) and the LM head's over its
# requests; a prefill chunk's attention FLOPs (its pairs beyond one per context token);
# the KV bytes read and written; the longest attention program's KV bytes at one SM's
# share of the bandwidth (it scans serially); the KV bytes a decode graph's block table
# spans (rows, padding included, times its width: what a graph runs, not what it
# needs); the recurrent scan's FLOPs over the prefill tokens; the state bytes each
# scheduled request reads and writes; and the host's two, in steps and requests: a
# prefill or mixed step run eagerly, and the decode requests of an eager step.
PHYSICAL_FEATURES = (
    "weight_s",
    "linear_s",
    "attention_s",
    "kv_s",
    "kv_program_s",
    "graph_kv_s",
    "scan_s",
    "state_s",
    "eager_steps",
    "eager_decode_requests",
)
# Which peak each feature is priced at, and so which of the profile's efficiencies its
# coefficient is anchored to (`physical_priors`); the host's terms have no peak.
_BYTES_FEATURES = ("weight_s", "kv_s", "kv_program_s", "graph_kv_s", "state_s")
_FLOPS_FEATURES = ("linear_s", "attention_s", "scan_s")

# How strongly a physical fit holds each coefficient to its prior: a coefficient at
# twice its prior costs the fit as much as this many steps each priced 100% off. A
# strong prior, chosen on the H200 replays of sessions 7 and 11 (docs/BENCHMARKS.md, "A
# time model from the model's work"), where weaker ones let a fit on one workload price
# the other's steps worse; a replay's thousands of steps still move the coefficients
# they exercise most (the intercept, the linear layers, the state, the graph width).
PHYSICAL_PRIOR_WEIGHT = 100.0

# The engine's decode attention kernel (avmp.kernels.triton.decode_attention), which the
# simulator cannot import (it needs triton): tokens one program scans at most per
# (request, KV head) split, the most splits, the key block, and programs per SM wanted.
DECODE_SPLIT_MIN_TOKENS = 256
DECODE_MAX_SPLITS = 32
DECODE_BLOCK_TOKENS = 32
DECODE_PROGRAMS_PER_SM = 2


def decode_attention_splits(
    num_rows: int, num_kv_heads: int, max_context_tokens: int, num_sms: int
) -> int:
    """Programs per (request, KV head) of a decode attention launch, as
    ``choose_num_splits`` in avmp.kernels.triton.decode_attention picks them: enough for
    about two programs per SM, never a split shorter than `DECODE_SPLIT_MIN_TOKENS`."""
    wanted = -(-DECODE_PROGRAMS_PER_SM * num_sms // max(num_rows * num_kv_heads, 1))
    by_length = -(-max(max_context_tokens, 1) // DECODE_SPLIT_MIN_TOKENS)
    return max(1, min(wanted, by_length, DECODE_MAX_SPLITS))


@dataclass(frozen=True)
class PhysicalFeatures:
    """What one step of a model does on one GPU, each kind of work apart, in seconds at
    the GPU profile's peak (`PHYSICAL_FEATURES`): the physical form of a calibration
    multiplies them by fitted coefficients, each an inverse efficiency (2.0: that work
    ran at half the peak), so one fit prices any step shape of that model on that GPU.

    Built by `of`; each attribute is what one unit of a kind of work takes at the peak:
    the weights read once (``weight_s``; of a mixture of experts the share its tokens
    route to, ``active_fraction``), a row of the linear layers (2 FLOPs per active
    parameter outside the vocabulary's matrix) and the LM head per scheduled request, a
    causal attention pair (QK^T and PV: ``4 x hidden size`` FLOPs per attention layer),
    a token of KV, a token of one KV head's KV (all attention layers) at one SM's share
    of the bandwidth, a prefill token's recurrent scan (4 FLOPs per state element:
    update and readout) and a scheduled request's state read and written.
    """

    weight_s: float
    active_fraction: float
    linear_s_per_row: float
    lm_head_s_per_request: float
    attention_s_per_pair: float
    kv_s_per_token: float
    kv_program_s_per_token: float
    num_kv_heads: int
    num_sms: int
    scan_s_per_token: float
    state_s_per_request: float

    @classmethod
    def of(cls, geometry: ModelGeometry, profile: GpuProfile) -> PhysicalFeatures:
        """The work of one step of ``geometry`` at ``profile``'s peak.

        Raises:
            ValueError: a model split over ranks (a calibration is of one GPU).
        """
        if geometry.num_ranks != 1:
            raise ValueError("the physical form prices one GPU's steps, not a rank's")
        bandwidth, flops = profile.hbm_bytes_per_s, profile.bf16_flops_per_s
        lm_head = geometry.vocab_size * geometry.hidden_size
        heads = geometry.attention_layers[0].num_kv_heads if geometry.attention_layers else 0
        per_head = sum(layer.kv_bytes_per_token / layer.num_kv_heads
                       for layer in geometry.attention_layers)  # fmt: skip
        scan_flops = 4 * sum(layer.ssm.num_elements for layer in geometry.recurrent_layers
                             if layer.ssm is not None)  # fmt: skip
        return cls(
            weight_s=geometry.weight_bytes / bandwidth,
            active_fraction=min(1.0, geometry.num_active_params / geometry.num_params),
            linear_s_per_row=2.0 * max(0, geometry.num_active_params - lm_head) / flops,
            lm_head_s_per_request=2.0 * lm_head / flops,
            attention_s_per_pair=4.0 * geometry.hidden_size * geometry.num_attention_layers / flops,
            kv_s_per_token=geometry.kv_bytes_per_token / bandwidth,
            kv_program_s_per_token=per_head * profile.num_sms / bandwidth,
            num_kv_heads=heads,
            num_sms=profile.num_sms,
            scan_s_per_token=scan_flops / flops,
            state_s_per_request=2.0 * geometry.state_bytes_per_request / bandwidth,
        )

    def values(self, shape: BatchShape) -> tuple[float, ...]:
        """``shape``'s features in `PHYSICAL_FEATURES` order. Counts a shape leaves at 0
        are taken as `calibration_features` takes them (requests: its decode requests and
        one prefilling request; longest context: the mean)."""
        prefill, decode = shape.num_prefill_tokens, shape.num_decode_requests
        tokens = prefill + decode
        requests = shape.num_requests or decode + (prefill > 0)
        longest = shape.longest_context_tokens or -(-shape.num_context_tokens // max(requests, 1))
        decode_rows = shape.num_graph_rows if prefill == 0 else 0
        untouched = (1.0 - self.active_fraction) ** tokens
        return (
            self.weight_s * (1.0 - untouched),
            self.linear_s_per_row * (shape.num_graph_rows or tokens)
            + self.lm_head_s_per_request * requests,
            self.attention_s_per_pair * max(0, shape.num_prefill_attention_pairs),
            self.kv_s_per_token * (shape.num_context_tokens + tokens),
            self.kv_program_s_per_token * self._program_tokens(shape, longest),
            self.kv_s_per_token * decode_rows * graph_width_tokens(shape.longest_context_tokens),
            self.scan_s_per_token * prefill,
            self.state_s_per_request * requests,
            float(prefill > 0 and shape.num_graph_rows == 0),
            float(decode if shape.num_graph_rows == 0 else 0),
        )

    def _program_tokens(self, shape: BatchShape, longest: int) -> int:
        """The most tokens one attention program scans: in a decode step the longest
        request's share of its splits (`decode_attention_splits`, over the rows the step
        runs and its block table's width), in a prefill or mixed step its longest context
        (the prefill kernel scans a query tile's whole context in one program)."""
        if shape.num_prefill_tokens:
            return longest
        rows = shape.num_graph_rows or shape.num_decode_requests
        pages = -(-longest // GRAPH_PAGE_TOKENS)
        width = graph_width_tokens(longest) if shape.num_graph_rows else pages * GRAPH_PAGE_TOKENS
        splits = decode_attention_splits(rows, self.num_kv_heads, width, self.num_sms)
        if splits == 1:
            return longest
        per_split = -(-width // splits)  # rounded up to whole key blocks, as the kernel does
        return min(longest, -(-per_split // DECODE_BLOCK_TOKENS) * DECODE_BLOCK_TOKENS)


def physical_priors(profile: GpuProfile) -> tuple[float | None, ...]:
    """The coefficient each of `PHYSICAL_FEATURES` takes where the measured steps do not
    determine it: the inverse of ``profile``'s bandwidth efficiency for bytes, of its
    compute efficiency for FLOPs (the roofline's figures); None for the host's terms."""
    return tuple(
        1 / profile.bandwidth_efficiency if name in _BYTES_FEATURES
        else 1 / profile.compute_efficiency if name in _FLOPS_FEATURES
        else None
        for name in PHYSICAL_FEATURES
    )  # fmt: skip


def calibration_shape(point: dict[str, float]) -> BatchShape:
    """The `BatchShape` of a calibration point, what the simulator prices for that step:
    a graph step runs its recorded rows (padding included), or a decode graph's rows
    where a row from before them does not record them; a field the point lacks is 0."""
    decode = int(point["num_decode_requests"])
    rows = 0
    if point.get("graph"):
        rows = int(point.get("num_padded_tokens") or 0) or decode_graph_rows(decode)
    return BatchShape(
        int(point["num_prefill_tokens"]), decode, int(point["num_context_tokens"]),
        int(point.get("num_attention_pairs") or 0), int(point.get("num_requests") or 0),
        int(point.get("longest_prefill_tokens") or 0),
        int(point.get("longest_context_tokens") or 0), rows,
    )  # fmt: skip


@dataclass(frozen=True)
class CalibratedModel:
    """Step time fitted to measured engine steps (see module doc for the file format).

    ``form`` is how a step's time is built from its shape (`CALIBRATION_FORMS`). The
    linear form: ``coefficients`` are the intercept then one per name of ``features``,
    in seconds per unit; ``features`` are the base three and the optional ones the fit
    could determine, in `_FULL_FEATURES` order. The physical form: ``features`` are
    `PHYSICAL_FEATURES`, priced by ``physical`` (the work of the calibration's ``model``
    at the peak of GPU ``profile``), and ``coefficients`` are the intercept in seconds
    then one inverse efficiency per feature (seconds per step and per eager decode
    request for the host's two). ``mixed_graphs``: some measured prefill or mixed step
    replayed a graph, so the engine measured captures them (the simulator then marks
    such steps with a `GraphRule`). ``decode_capture_s`` and ``mixed_capture_s``: what
    capturing a new decode graph, and a new prefill or mixed graph, costs a run on top
    of the step that captures it (the calibration file's ``graph_captures``; 0 for files
    without them).
    """

    gpu: str
    model: str | None
    coefficients: tuple[float, ...]
    min_step_s: float
    num_points: int
    features: tuple[str, ...] = _BASE_FEATURES
    mixed_graphs: bool = False
    decode_capture_s: float = 0.0
    mixed_capture_s: float = 0.0
    form: str = LINEAR_FORM
    profile: str | None = None
    physical: PhysicalFeatures | None = None

    def __post_init__(self) -> None:
        for cost in (self.decode_capture_s, self.mixed_capture_s):
            if not (math.isfinite(cost) and cost >= 0):
                raise ValueError(f"a graph capture's cost must be finite and >= 0, got {cost}")
        if self.form not in CALIBRATION_FORMS:
            raise ValueError(
                f"unknown calibration form {self.form!r}; known: {', '.join(CALIBRATION_FORMS)}"
            )
        if self.form == PHYSICAL_FORM:
            self._check_physical()
        else:
            self._check_linear()
        if len(self.coefficients) != 1 + len(self.features):
            raise ValueError(
                f"a calibration on {len(self.features)} features has "
                f"{1 + len(self.features)} coefficients, got {len(self.coefficients)}"
            )

    def _check_physical(self) -> None:
        if self.features != PHYSICAL_FEATURES:
            raise ValueError(f"the physical form's features are {', '.join(PHYSICAL_FEATURES)}")
        if self.physical is None or self.model is None or self.profile is None:
            raise ValueError("the physical form needs the model, the GPU profile and their work")

    def _check_linear(self) -> None:
        if self.physical is not None:
            raise ValueError("the linear form prices no physical features")
        if self.features[: len(_BASE_FEATURES)] != _BASE_FEATURES or any(
            name not in _OPTIONAL_FEATURES for name in self.features[len(_BASE_FEATURES) :]
        ):
            raise ValueError(
                f"calibration features must be {', '.join(_BASE_FEATURES)} and some of "
                f"{', '.join(_OPTIONAL_FEATURES)}, got {', '.join(self.features)}"
            )
        if list(_columns(self.features)) != sorted(set(_columns(self.features))):
            raise ValueError(f"calibration features must be in the order {_FULL_FEATURES}")

    def step_seconds(self, shape: BatchShape) -> float:
        if shape.num_tokens == 0:
            return 0.0
        intercept, *slopes = self.coefficients
        if self.physical is not None:
            values = self.physical.values(shape)
            predicted = intercept + sum(c * v for c, v in zip(slopes, values, strict=True))
        else:
            features = calibration_features(shape)
            columns = _columns(self.features)
            predicted = intercept + sum(
                c * features[i] for c, i in zip(slopes, columns, strict=True)
            )
        return max(predicted, self.min_step_s)

    def capture_seconds(self, kind: str) -> float:
        """What capturing a new graph of ``kind`` (`CAPTURE_KINDS`) adds to its step."""
        if kind not in CAPTURE_KINDS:
            raise ValueError(f"unknown graph kind {kind!r}; known: {', '.join(CAPTURE_KINDS)}")
        return self.decode_capture_s if kind == DECODE_CAPTURE else self.mixed_capture_s


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


def fit_calibration(
    points: list[dict[str, float]],
    gpu: str,
    model: str | None,
    form: str = LINEAR_FORM,
    profile: str | None = None,
) -> CalibratedModel:
    """Relative-error least-squares fit of measured steps (each a dict of the base
    features, optionally ``num_requests``, ``num_attention_pairs``,
    ``longest_prefill_tokens`` and ``longest_context_tokens``, and ``step_s``) in
    ``form`` (`CALIBRATION_FORMS`); see the module doc for the features and which of
    them a linear fit keeps. The physical form needs ``model`` (a zoo name or a config
    path, `avmp.models.resolve_model`) and ``profile`` (a GPU profile name).

    Raises:
        ValueError: fewer than 4 points, a missing or negative field, a ``step_s`` of 0,
            a ``num_requests`` below 1 or below the point's decode requests, a
            ``num_attention_pairs`` below its context tokens, a
            ``longest_prefill_tokens`` above the prefill tokens or 0 beside some, a
            ``longest_context_tokens`` above the context tokens or below their mean,
            features that do not vary enough to determine every coefficient (linear),
            an unknown form, or a physical form without a known model and profile.
    """
    if form not in CALIBRATION_FORMS:
        forms = ", ".join(CALIBRATION_FORMS)
        raise ValueError(f"unknown calibration form {form!r}; known: {forms}")
    if len(points) < 4:
        raise ValueError(f"a calibration needs at least 4 points, got {len(points)}")
    parsed = [_calibration_point(index, point) for index, point in enumerate(points)]
    targets = np.array([step_s for _, step_s in parsed])
    mixed = any(_is_mixed_graph(features) for features, _ in parsed)
    if form == PHYSICAL_FORM:
        return _fit_physical(points, targets, gpu, model, profile, mixed)
    known = [all(f[i] is not None for f, _ in parsed) for i in range(len(_FULL_FEATURES))]
    available = [name for name in _OPTIONAL_FEATURES if known[_FULL_FEATURES.index(name)]]
    for names in _feature_sets(available):
        columns = _columns(names)
        matrix = np.array([[1.0, *(features[i] for i in columns)] for features, _ in parsed])
        fitted = _weighted_fit(matrix, targets)
        if fitted is not None:
            fitted = _reweighted_fit(matrix, targets, fitted)
            return CalibratedModel(
                gpu, model, fitted, float(targets.min()), len(points), names, mixed
            )
    raise ValueError("calibration points do not vary enough to fit every coefficient")


def _fit_physical(
    points: list[dict[str, float]],
    targets: np.ndarray,
    gpu: str,
    model: str | None,
    profile: str | None,
    mixed: bool,
) -> CalibratedModel:
    """The physical form fitted to checked ``points`` (see `fit_calibration`)."""
    if not isinstance(model, str) or not isinstance(profile, str):
        known = ", ".join(GPU_PROFILES)
        raise ValueError(
            f"the physical form needs the calibration's model and GPU profile (one of {known})"
        )
    gpu_profile = get_profile(profile)
    try:
        geometry = resolve_model(model)
    except ValueError as error:
        raise ValueError(f"the physical form prices the model's geometry: {error}") from None
    physical = PhysicalFeatures.of(geometry, gpu_profile)
    matrix = np.array([[1.0, *physical.values(calibration_shape(p))] for p in points])
    priors = np.array([np.nan, *(np.nan if p is None else p for p in physical_priors(gpu_profile))])
    coefficients = _anchored_fit(matrix, targets, priors)
    return CalibratedModel(
        gpu, model, coefficients, float(targets.min()), len(points), PHYSICAL_FEATURES, mixed,
        form=PHYSICAL_FORM, profile=profile, physical=physical,
    )  # fmt: skip


def _anchored_fit(matrix: np.ndarray, targets: np.ndarray, priors: np.ndarray) -> tuple[float, ...]:
    """Non-negative coefficients minimising the summed squared relative error of
    ``matrix`` [N, K] against ``targets``, plus `PHYSICAL_PRIOR_WEIGHT` times each
    coefficient's squared relative distance from its prior (``priors`` [K], NaN for
    none): weighted by the measured time first, then reweighted by the predicted time
    (`REWEIGHTING_ROUNDS` rounds, as `_reweighted_fit` and for the same reason).

    Non-negative, so that no kind of work lowers a step's time however far a shape lies
    from the measured ones; anchored, so that a kind the measured steps barely exercise
    (long-context attention in a fit on short chats) is priced at the profile's
    efficiency rather than at whatever the noise makes of it.
    """
    try:
        from scipy.optimize import nnls
    except ImportError:
        raise ValueError(
            "a calibration in the physical form is fitted with scipy (the bench extra): "
            "pip install 'avmp[bench]'"
        ) from None

    floor = float(targets.min())
    anchored = np.flatnonzero(~np.isnan(priors))
    strength = math.sqrt(PHYSICAL_PRIOR_WEIGHT)
    predicted = targets
    for _ in range(1 + REWEIGHTING_ROUNDS):
        weighted = matrix / predicted[:, None]
        scale = np.abs(weighted).max(axis=0)  # equilibrate columns, as `_weighted_fit`
        scale[scale == 0] = 1.0
        prior_rows = np.zeros((len(anchored), matrix.shape[1]))
        prior_rows[np.arange(len(anchored)), anchored] = strength / priors[anchored]
        system = np.vstack([weighted, prior_rows]) / scale
        wanted = np.concatenate([targets / predicted, np.full(len(anchored), strength)])
        solution = nnls(system, wanted)[0] / scale
        predicted = np.maximum(matrix @ solution, floor)
    return tuple(float(x) for x in solution)


REWEIGHTING_ROUNDS = 10


def _reweighted_fit(
    matrix: np.ndarray, targets: np.ndarray, coefficients: tuple[float, ...]
) -> tuple[float, ...]:
    """Refit with each point's residual relative to its *predicted* time (iteratively
    reweighted least squares, `REWEIGHTING_ROUNDS` rounds from ``coefficients``).

    Weighting by the measured time instead biases the fit low where steps of one shape
    are timed noisily: a step timed short weighs more than one timed long, so the fit
    follows the short ones. Engine replays time their steps so (overlapped steps, the
    host racing one ahead): fitted on all of an H200 replay's steps and summed over each
    of its runs, the steps came out 1.5-14.5% below their measured time weighted by the
    measurement, and between -7% and +5% weighted by the prediction, whose weights do
    not depend on a step's noise.
    """
    floor = float(targets.min())
    solution = np.array(coefficients)
    for _ in range(REWEIGHTING_ROUNDS):
        predicted = np.maximum(matrix @ solution, floor)
        weighted = matrix / predicted[:, None]
        scale = np.abs(weighted).max(axis=0)
        scale[scale == 0] = 1.0
        solution = np.linalg.lstsq(weighted / scale, targets / predicted, rcond=None)[0] / scale
    return tuple(float(x) for x in solution)


def _is_mixed_graph(features: list[float | None]) -> bool:
    """Whether a parsed point is a prefill or mixed step that replayed a graph."""
    return (features[_MIXED_COLUMN] or 0.0) > 0


def _feature_sets(optional: list[str]) -> list[tuple[str, ...]]:
    """The feature sets a fit tries, best first: the base features with as many of the
    ``optional`` ones as possible, a set keeping the earlier ones of `_OPTIONAL_FEATURES`
    before one of the same size that keeps later ones; each in `_FULL_FEATURES` order."""
    sets = []
    for size in range(len(optional), -1, -1):
        for kept in itertools.combinations(optional, size):
            sets.append(tuple(name for name in _FULL_FEATURES if name in _BASE_FEATURES + kept))
    return sets


def _calibration_point(index: int, point: dict[str, float]) -> tuple[list[float | None], float]:
    """One point's features in `_FULL_FEATURES` order (mean context None without
    ``num_requests``, prefill attention pairs None without ``num_attention_pairs``, the
    longest chunk None without ``longest_prefill_tokens``, the longest context None without
    ``longest_context_tokens``) and its step time."""
    optional = ("num_requests", "num_attention_pairs", *_LONGEST_FEATURES)
    try:
        values = [float(point[name]) for name in (*_BASE_FEATURES, "step_s")]
        requests, pairs, longest, longest_context = (
            None if point.get(name) is None else float(point[name]) for name in optional
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"calibration point {index}: bad or missing field ({error})") from None
    if any(v < 0 or not math.isfinite(v) for v in values):
        raise ValueError(f"calibration point {index}: values must be finite and >= 0")
    prefill, decode, context, step_s = values
    if step_s == 0:
        raise ValueError(f"calibration point {index}: step_s must be > 0 (the fit is relative)")
    if requests is not None and (not math.isfinite(requests) or requests < max(1.0, decode)):
        raise ValueError(
            f"calibration point {index}: num_requests must be >= 1 and >= num_decode_requests"
        )
    if pairs is not None and (not math.isfinite(pairs) or pairs < context):
        raise ValueError(
            f"calibration point {index}: num_attention_pairs must be >= num_context_tokens"
        )
    if longest is not None and (
        not math.isfinite(longest) or not 0 <= longest <= prefill or (longest > 0) != (prefill > 0)
    ):
        raise ValueError(
            f"calibration point {index}: longest_prefill_tokens must be in [1, "
            "num_prefill_tokens] when the step has prefill tokens, else 0"
        )
    _check_longest_context(index, longest_context, context, requests)
    mean = None if requests is None else context / requests
    extra_pairs = None if pairs is None else pairs - context
    eager_decode, graph_rows = _graph_features(index, point, prefill, decode)
    eager = float(prefill > 0 and not graph_rows)
    decode_rows = mixed_rows = row_width = None
    if graph_rows is not None:  # a decode graph's rows, or a mixed graph's tokens
        decode_rows, mixed_rows = (0.0, graph_rows) if prefill > 0 else (graph_rows, 0.0)
        if longest_context is not None:
            row_width = decode_rows * graph_width_tokens(int(longest_context))
    return [
        prefill, decode, context, mean, eager, extra_pairs, longest, longest_context,
        eager_decode, decode_rows, row_width, mixed_rows,
    ], step_s  # fmt: skip


def _graph_features(
    index: int, point: dict[str, float], prefill: float, decode: float
) -> tuple[float | None, float | None]:
    """A point's eager decode requests and graph rows from its ``graph`` field (whether
    the step replayed a CUDA graph) and ``num_padded_tokens`` (the rows the graph ran,
    padding included); both None when ``graph`` is not recorded. A decode graph that
    does not record its rows ran `decode_graph_rows` of them.

    Raises:
        ValueError: a graph step with fewer rows than tokens, or a graph step with
            prefill tokens that does not record its rows.
    """
    graph = point.get("graph")
    if graph is None:
        return None, None
    if not graph:
        return decode, 0.0
    padded = float(point.get("num_padded_tokens") or 0)
    if padded == 0 and prefill == 0 and decode == int(decode):
        padded = float(decode_graph_rows(int(decode)))
    if not math.isfinite(padded) or padded == 0 or padded < prefill + decode:
        raise ValueError(
            f"calibration point {index}: a graph step runs at least its tokens as rows "
            "(num_padded_tokens; a decode graph at most "
            f"{DECODE_GRAPH_SIZES[-1]} requests when it does not record them)"
        )
    return 0.0, padded


def _check_longest_context(
    index: int, longest: float | None, context: float, requests: float | None
) -> None:
    """Refuse a longest context that no step can have: above the context tokens, below
    their mean over the requests (when counted), or 0 beside some (a step's every request
    holds at least one token once it is done)."""
    if longest is None:
        return
    low = context / requests if requests is not None else min(context, 1.0)
    if not math.isfinite(longest) or not low - 1e-9 <= longest <= context:
        raise ValueError(
            f"calibration point {index}: longest_context_tokens must be in [num_context_tokens"
            " / num_requests, num_context_tokens]"
        )


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
    """Read and fit a calibration JSON file, gzip-compressed where its name ends in
    ``.gz`` (raises ValueError naming the file)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
        model = fit_calibration(
            list(data["points"]), str(data.get("gpu", "")), data.get("model"),
            data.get("form", LINEAR_FORM), data.get("profile"),
        )  # fmt: skip
        decode_s, mixed_s = capture_costs(data.get("graph_captures"))
        return replace(model, decode_capture_s=decode_s, mixed_capture_s=mixed_s)
    except (OSError, EOFError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a valid step-time calibration: {error}") from None


def capture_costs(graph_captures: object) -> tuple[float, float]:
    """`CalibratedModel`'s capture costs, decode and mixed, from a calibration file's
    ``graph_captures`` (``{"decode": {"median_s": S, "count": N}, "mixed": {...}}``,
    either kind optional, costing 0 when absent; None, as in files from before it: no
    cost).

    Raises:
        ValueError: not such a mapping, or a kind with a negative, non-finite or missing
            ``median_s`` or a ``count`` below 1.
    """
    if graph_captures is None:
        return 0.0, 0.0
    if not isinstance(graph_captures, dict) or set(graph_captures) - set(CAPTURE_KINDS):
        raise ValueError(f"graph_captures must map some of {', '.join(CAPTURE_KINDS)} to costs")
    costs = dict.fromkeys(CAPTURE_KINDS, 0.0)
    for kind, entry in graph_captures.items():
        if not isinstance(entry, dict):
            raise ValueError(f"graph_captures[{kind!r}] must be {{'median_s': .., 'count': ..}}")
        seconds, count = float(entry["median_s"]), int(entry["count"])
        if not (math.isfinite(seconds) and seconds >= 0) or count < 1:
            raise ValueError(
                f"graph_captures[{kind!r}]: median_s must be finite and >= 0 and count >= 1"
            )
        costs[kind] = seconds
    return costs[DECODE_CAPTURE], costs[MIXED_CAPTURE]


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
