"""The engine's GPU step: one host-to-device copy per step, Triton kernels in every
cache-touching layer, and CUDA graphs for decode batches.

Per step the runner packs every index the layers need (token ids, positions, slot
mapping, block tables, context lengths, query offsets, state slots, sampled rows) into
one pinned int64 array and copies it to the device once; the layers read views of that
copy, so no layer synchronises with the host. The only sync of a step is the engine
reading the sampled tokens.

Decode steps whose batch fits a captured size replay a CUDA graph: the batch is padded
to the next of ``graph_sizes`` (padding rows have slot -1 and context 0, which every
kernel skips), its packed inputs are copied into the graph's static buffer, and the
graph replays the whole forward pass plus the LM head. Graphs are keyed by padded batch
size and block-table width (a power of two of pages) and captured on first use. The
pool views never move (migration maps chunks behind them, compaction copies inside
them), so a captured graph stays valid for the engine's life.

Models whose layers fall back to per-sequence torch code (Mamba1, mixtures of experts,
which route with data-dependent shapes) run eagerly: their Python loops read host
integers that a graph would freeze.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from avmp.engine.device_batch import (
    DeviceStepBatch,
    PackedStep,
    StepShape,
    device_batch,
    pack_step,
    split_packed,
)
from avmp.engine.models.base import HybridModel
from avmp.engine.models.layers import (
    Mamba1Mixer,
    Mamba2Mixer,
    PagedAttention,
    RMSNorm,
    RMSNormGated,
    Rotary,
)
from avmp.engine.runner import ModelRunner, PoolViews, SequenceWork
from avmp.kernels.ops import TritonOps

DEFAULT_GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_GRAPH_WIDTH = 16  # pages


@dataclass
class StepRecord:
    """One profiled step: its shape (as the simulator's `BatchShape` counts it), when it
    started (``time.perf_counter``) and the wall time of the runner's work, synchronised
    at the end (``seconds``); ``captured`` marks a step that captured a CUDA graph."""

    num_prefill_tokens: int
    num_decode_requests: int
    num_context_tokens: int
    num_attention_pairs: int
    num_requests: int
    started: float
    seconds: float
    graph: bool
    captured: bool = False


@dataclass
class RunnerProfile:
    """Per-step records, kept while ``enabled`` (benchmarks; off in normal runs)."""

    enabled: bool = False
    steps: list[StepRecord] = field(default_factory=list)


class _Graph:
    """One captured decode forward pass and its static input/output buffers."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: torch.Tensor, logits: torch.Tensor):
        self.graph = graph
        self.inputs = inputs
        self.logits = logits


def graph_safe(model: HybridModel) -> bool:
    """Whether every layer of ``model`` runs on device indices alone (no per-sequence
    Python loop, no data-dependent expert routing), so a decode step can be captured."""
    for module in model.modules():
        if isinstance(module, Mamba1Mixer):
            return False
        if hasattr(module, "num_experts") or hasattr(module, "experts"):
            return False
    return True


def _move_rotary(model: HybridModel, device: torch.device) -> None:
    """Rotary tables are plain attributes (not buffers): put them on the device once so
    a step copies nothing from the host (and a graph can capture the embedding)."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Rotary):
                value.inv_freq = value.inv_freq.to(device)


def install_kernels(model: HybridModel, kernels: TritonOps) -> None:
    """Route the model's attention and Mamba2 cores to ``kernels`` for device batches.

    Binds, per layer instance, an ``attend``/``mix`` that takes the Triton path when the
    step batch is a `DeviceStepBatch` and the layer's own (reference) method otherwise,
    so the same model still runs under the reference runner.
    """
    for module in model.modules():
        if isinstance(module, PagedAttention):
            module.attend = _attend_for(module, kernels)  # type: ignore[method-assign]
        elif isinstance(module, Mamba2Mixer):
            module.mix = _mix_for(module, kernels)  # type: ignore[method-assign]


def _attend_for(layer: PagedAttention, kernels: TritonOps) -> Any:
    reference = type(layer).attend

    def attend(q: Any, k: Any, v: Any, batch: Any, cache: Any) -> torch.Tensor:
        if isinstance(batch, DeviceStepBatch):
            return kernels.attend(layer, q, k, v, batch, cache)
        return reference(layer, q, k, v, batch, cache)

    return attend


def _mix_for(mixer: Mamba2Mixer, kernels: TritonOps) -> Any:
    reference = type(mixer).mix

    def mix(xbc: Any, dt: Any, batch: Any, cache: Any) -> torch.Tensor:
        if isinstance(batch, DeviceStepBatch):
            return kernels.mamba2_mix(mixer, xbc, dt, batch, cache)
        return reference(mixer, xbc, dt, batch, cache)

    return mix


class FastModelRunner(ModelRunner):
    """`ModelRunner` with device-side step inputs, Triton kernels and decode graphs.

    Args:
        cuda_graphs: capture decode steps (CUDA devices, graph-safe models only).
        graph_sizes: padded decode batch sizes to capture, ascending.
        pad_decode: without graphs, still pad decode steps to ``graph_sizes`` and run
            the padded pass eagerly (the tests check padding rows this way on the CPU).
        fused_norms: replace the model's RMS norms by the fused Triton norm.
    """

    def __init__(
        self,
        model: HybridModel,
        cache: PoolViews,
        block_size: int,
        device: torch.device,
        cuda_graphs: bool = True,
        graph_sizes: tuple[int, ...] = DEFAULT_GRAPH_SIZES,
        pad_decode: bool = False,
        fused_norms: bool = True,
    ) -> None:
        super().__init__(model, cache, block_size, device)
        self.kernels = TritonOps()
        safe = graph_safe(model)
        self.use_graphs = cuda_graphs and device.type == "cuda" and safe
        self.graph_sizes = tuple(sorted(graph_sizes))
        self.pad_decode = pad_decode and safe
        self.graph_error: str | None = None
        self._captured = False
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.profile = RunnerProfile()
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._pinned = device.type == "cuda"
        self._staging = self._new_staging(1 << 12)
        self._copied: torch.cuda.Event | None = None
        _move_rotary(model, device)
        install_kernels(model, self.kernels)
        if fused_norms:
            install_fused_norms(model)

    # -- host staging ---------------------------------------------------------------

    def _new_staging(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int64, pin_memory=self._pinned)

    def _stage(self, work: list[SequenceWork], shape: StepShape) -> torch.Tensor:
        """Pack ``work`` padded to ``shape`` into the pinned staging buffer."""
        if self._copied is not None:
            self._copied.synchronize()  # the last copy out of this buffer has finished
        if self._staging.numel() < shape.total:
            self._staging = self._new_staging(max(shape.total, 2 * self._staging.numel()))
        host = self._staging[: shape.total]
        pack_step(work, self.block_size, host.numpy(), shape)
        return host

    def _copy_to(self, host: torch.Tensor, dest: torch.Tensor | None = None) -> torch.Tensor:
        """The step's one host-to-device copy (into ``dest`` if given)."""
        if dest is None:
            dest = host.to(self.device, non_blocking=self._pinned)
        else:
            dest.copy_(host, non_blocking=self._pinned)
        if self._pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()
        return dest

    # -- execution --------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, work: list[SequenceWork]) -> torch.Tensor:
        start = time.perf_counter() if self.profile.enabled else 0.0
        is_decode = all(len(w.token_ids) == 1 and w.num_context > 0 for w in work)
        padded = is_decode and (self.use_graphs or self.pad_decode)
        size = self._graph_size(len(work)) if padded else None
        self._captured = False
        logits = self._replay(work, size) if size is not None else self._eager(work, is_decode)
        if self.profile.enabled:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._record(work, start, size is not None and self.use_graphs)
        return logits

    def _graph_size(self, batch: int) -> int | None:
        for size in self.graph_sizes:
            if size >= batch:
                return size
        return None

    def _width(self, work: list[SequenceWork]) -> int:
        pages = max((len(w.page_rows) for w in work), default=1)
        return max(MIN_GRAPH_WIDTH, 1 << max(pages - 1, 0).bit_length())

    def _eager(self, work: list[SequenceWork], is_decode: bool) -> torch.Tensor:
        num_tokens = sum(len(w.token_ids) for w in work)
        width = max((len(w.page_rows) for w in work), default=1) or 1
        shape = StepShape(num_tokens, len(work), width, sum(w.samples for w in work))
        fields = split_packed(self._copy_to(self._stage(work, shape)), shape)
        batch = device_batch(fields, work, self.block_size, is_decode)
        hidden = self.model(fields.input_ids, batch, self.cache)
        if shape.num_samples == 0:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        return self.model.logits(hidden.index_select(0, fields.sample_rows))

    def _replay(self, work: list[SequenceWork], size: int) -> torch.Tensor:
        """A decode step padded to ``size`` rows: through its CUDA graph, or (graphs off,
        ``pad_decode`` on) the same padded forward pass run eagerly."""
        width = self._width(work)
        shape = StepShape(size, size, width, size)
        if not self.use_graphs:
            fields = split_packed(self._copy_to(self._stage(work, shape)), shape)
            return self._padded_forward(fields)[: len(work)]
        graph = self.graphs.get((size, width))
        if graph is None:
            try:
                graph = self._capture(shape)
            except RuntimeError as error:  # a layer that cannot be captured: run eagerly
                self.use_graphs, self.graph_error = False, str(error)
                fields = split_packed(self._copy_to(self._stage(work, shape)), shape)
                return self._padded_forward(fields)[: len(work)]
            self.graphs[(size, width)] = graph
            self._captured = True
        self._copy_to(self._stage(work, shape), graph.inputs)
        graph.graph.replay()
        return graph.logits[: len(work)]

    def _padded_forward(self, fields: PackedStep) -> torch.Tensor:
        """Logits of every row of a padded decode step. The batch names no sequences:
        every layer reads only the device tensors, as a replayed graph does."""
        batch = device_batch(fields, [], self.block_size, is_decode=True)
        hidden = self.model(fields.input_ids, batch, self.cache)
        return self.model.logits(hidden.index_select(0, fields.sample_rows))

    def _capture(self, shape: StepShape) -> _Graph:
        """Capture one padded decode step (all rows padding while capturing, so the
        warm-up and capture runs touch no cache)."""
        inputs = torch.empty(shape.total, dtype=torch.int64, device=self.device)
        self._copy_to(self._stage([], shape), inputs)
        fields = split_packed(inputs, shape)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile the Triton kernels, create cuBLAS handles
                self._padded_forward(fields)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._padded_forward(fields)
        return _Graph(graph, inputs, logits)

    def _record(self, work: list[SequenceWork], started: float, graph: bool) -> None:
        seconds = time.perf_counter() - started
        prefill = decode = context = pairs = 0
        for w in work:
            n, start = len(w.token_ids), w.num_context
            if n == 1 and start > 0:
                decode += 1
            else:
                prefill += n
            context += start + n
            pairs += n * start + n * (n + 1) // 2
        self.profile.steps.append(
            StepRecord(
                prefill, decode, context, pairs, len(work), started, seconds, graph, self._captured
            )
        )


__all__ = ["DeviceStepBatch", "FastModelRunner", "RunnerProfile", "StepRecord", "graph_safe"]


def use_fast_runner(engine: Any, cuda_graphs: bool = True, pad_decode: bool = False) -> None:
    """Give ``engine`` a `FastModelRunner` over its model and views (replacing the
    reference runner); what ``Engine(kernels="triton")`` does at construction."""
    engine.runner = FastModelRunner(
        engine.model,
        engine.views,
        engine.config.block_size,
        engine.device,
        cuda_graphs=cuda_graphs,
        pad_decode=pad_decode,
    )


def install_fused_norms(model: HybridModel) -> int:
    """Replace the forward of every plain `RMSNorm` and `RMSNormGated` of ``model`` by
    the fused Triton norm (one launch instead of six to ten). Returns how many."""
    from avmp.kernels.triton.rms_norm import rms_norm

    count = 0
    for module in model.modules():
        if type(module) is RMSNorm:
            module.forward = _norm_for(module, rms_norm)  # type: ignore[method-assign]
            count += 1
        elif type(module) is RMSNormGated:
            module.forward = _gated_norm_for(module, rms_norm)  # type: ignore[method-assign]
            count += 1
    return count


def _norm_for(norm: RMSNorm, rms_norm: Any) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, norm.weight, norm.variance_epsilon, fp32_weight=norm.fp32_weight)

    return forward


def _gated_norm_for(norm: RMSNormGated, rms_norm: Any) -> Any:
    def forward(x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        return rms_norm(x, norm.weight, norm.variance_epsilon, gate, norm.group_size)

    return forward
