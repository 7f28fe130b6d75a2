"""The engine's GPU step: one host-to-device copy per step, Triton kernels in every
cache-touching layer, and CUDA graphs for decode batches.

Per step the runner packs every index the layers need (token ids, positions, slot
mapping, block tables, context lengths, query offsets, state slots, sampled rows) into
one pinned int64 array and copies it to the device once; the layers read views of that
copy, so no layer synchronises with the host. The only sync of a step is the engine
reading the sampled tokens, one step later (the engine overlaps steps): a token id the
host does not know yet arrives as a carried id (``-1 - i``) and is read from the previous step's
sampled tokens on the device (`fill_carried`), outside the graph, before it replays.

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
import torch.nn.functional as F

from avmp.engine.device_batch import (
    DeviceStepBatch,
    PackedStep,
    StepShape,
    device_batch,
    pack_step,
    split_packed,
)
from avmp.engine.models import layers
from avmp.engine.models.base import HybridModel
from avmp.engine.models.layers import (
    Mamba1Mixer,
    Mamba2Mixer,
    PagedAttention,
    RMSNorm,
    RMSNormGated,
    Rotary,
)
from avmp.engine.runner import ModelRunner, PoolViews, SequenceWork, fill_carried
from avmp.kernels.ops import TritonOps

DEFAULT_GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_GRAPH_WIDTH = 16  # pages


@dataclass
class StepRecord:
    """One profiled step: its shape (as the simulator's `BatchShape` counts it), when the
    host started it (``time.perf_counter``) and its ``seconds``: on CUDA the device time
    from reaching the step to its last kernel (CUDA events, so profiling adds no sync and
    steps still overlap), on the CPU the runner's wall time. ``captured`` marks a step
    that captured a CUDA graph."""

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
    """Per-step records, kept while ``enabled`` (benchmarks; off in normal runs). A
    record's device time is read (waiting for its events) when `steps` is asked for."""

    enabled: bool = False
    _steps: list[StepRecord] = field(default_factory=list)
    _events: list[tuple[StepRecord, Any, Any]] = field(default_factory=list)

    def start(self) -> None:
        """Forget earlier records and record from now on."""
        self.enabled, self._steps, self._events = True, [], []

    def add(self, record: StepRecord, events: tuple[Any, Any] | None) -> None:
        self._steps.append(record)
        if events is not None:
            self._events.append((record, *events))

    @property
    def steps(self) -> list[StepRecord]:
        for record, begin, end in self._events:
            end.synchronize()
            record.seconds = begin.elapsed_time(end) / 1e3
        self._events = []
        return self._steps


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
        fused_ops: replace the model's RMS norms (with the residual addition before them)
            and MLP activations by fused Triton kernels (`install_fused_ops`).
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
        fused_ops: bool = True,
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
        # two staging buffers in turn: packing step N+1 never waits for step N's copy
        self._staging = [self._new_staging(1 << 12) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        _move_rotary(model, device)
        install_kernels(model, self.kernels)
        if fused_ops:
            install_fused_ops(model)

    # -- host staging ---------------------------------------------------------------

    def _new_staging(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int64, pin_memory=self._pinned)

    def _stage(self, work: list[SequenceWork], shape: StepShape) -> torch.Tensor:
        """Pack ``work`` padded to ``shape`` into the next pinned staging buffer."""
        self._turn ^= 1
        turn = self._turn
        copied = self._copied[turn]
        if copied is not None:
            copied.synchronize()  # the last copy out of this buffer has finished
        if self._staging[turn].numel() < shape.total:
            size = max(shape.total, 2 * self._staging[turn].numel())
            self._staging[turn] = self._new_staging(size)
        host = self._staging[turn][: shape.total]
        pack_step(work, self.block_size, host.numpy(), shape)
        return host

    def _copy_to(
        self,
        host: torch.Tensor,
        shape: StepShape,
        carried: torch.Tensor | None,
        dest: torch.Tensor | None = None,
    ) -> PackedStep:
        """The step's one host-to-device copy (into ``dest`` if given), with the
        carried token ids filled from ``carried`` on the device."""
        if dest is None:
            dest = host.to(self.device, non_blocking=self._pinned)
        else:
            dest.copy_(host, non_blocking=self._pinned)
        if self._pinned:
            event = self._copied[self._turn] or torch.cuda.Event()
            event.record()
            self._copied[self._turn] = event
        fields = split_packed(dest, shape)
        fill_carried(fields.input_ids, carried)
        return fields

    # -- execution --------------------------------------------------------------------

    @torch.inference_mode()
    def execute(
        self, work: list[SequenceWork], carried: torch.Tensor | None = None
    ) -> torch.Tensor:
        profiling = self.profile.enabled
        started = time.perf_counter() if profiling else 0.0
        begin = self._event() if profiling else None
        is_decode = all(len(w.token_ids) == 1 and w.num_context > 0 for w in work)
        padded = is_decode and (self.use_graphs or self.pad_decode)
        size = self._graph_size(len(work)) if padded else None
        self._captured = False
        if size is not None:
            logits = self._replay(work, size, carried)
        else:
            logits = self._eager(work, is_decode, carried)
        if profiling:
            end = self._event()
            events = None if begin is None or end is None else (begin, end)
            self._record(work, started, size is not None and self.use_graphs, events)
        return logits

    def _event(self) -> torch.cuda.Event | None:
        """A timing event recorded now on the device's stream (None on the CPU)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _graph_size(self, batch: int) -> int | None:
        for size in self.graph_sizes:
            if size >= batch:
                return size
        return None

    def _width(self, work: list[SequenceWork]) -> int:
        pages = max((len(w.page_rows) for w in work), default=1)
        return max(MIN_GRAPH_WIDTH, 1 << max(pages - 1, 0).bit_length())

    def _eager(
        self, work: list[SequenceWork], is_decode: bool, carried: torch.Tensor | None
    ) -> torch.Tensor:
        num_tokens = sum(len(w.token_ids) for w in work)
        width = max((len(w.page_rows) for w in work), default=1) or 1
        shape = StepShape(num_tokens, len(work), width, sum(w.samples for w in work))
        fields = self._copy_to(self._stage(work, shape), shape, carried)
        batch = device_batch(fields, work, self.block_size, is_decode)
        hidden = self.model(fields.input_ids, batch, self.cache)
        if shape.num_samples == 0:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        return self.model.logits(hidden.index_select(0, fields.sample_rows))

    def _replay(
        self, work: list[SequenceWork], size: int, carried: torch.Tensor | None
    ) -> torch.Tensor:
        """A decode step padded to ``size`` rows: through its CUDA graph, or (graphs off,
        ``pad_decode`` on) the same padded forward pass run eagerly."""
        width = self._width(work)
        shape = StepShape(size, size, width, size)
        if not self.use_graphs:
            fields = self._copy_to(self._stage(work, shape), shape, carried)
            return self._padded_forward(fields)[: len(work)]
        graph = self.graphs.get((size, width))
        if graph is None:
            try:
                graph = self._capture(shape)
            except RuntimeError as error:  # a layer that cannot be captured: run eagerly
                self.use_graphs, self.graph_error = False, str(error)
                fields = self._copy_to(self._stage(work, shape), shape, carried)
                return self._padded_forward(fields)[: len(work)]
            self.graphs[(size, width)] = graph
            self._captured = True
        self._copy_to(self._stage(work, shape), shape, carried, graph.inputs)
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
        fields = self._copy_to(self._stage([], shape), shape, None, inputs)
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

    def _record(
        self, work: list[SequenceWork], started: float, graph: bool, events: tuple[Any, Any] | None
    ) -> None:
        seconds = time.perf_counter() - started  # replaced by the events' time where given
        prefill = decode = context = pairs = 0
        for w in work:
            n, start = len(w.token_ids), w.num_context
            if n == 1 and start > 0:
                decode += 1
            else:
                prefill += n
            context += start + n
            pairs += n * start + n * (n + 1) // 2
        record = StepRecord(
            prefill, decode, context, pairs, len(work), started, seconds, graph, self._captured
        )
        self.profile.add(record, events)


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


def install_fused_ops(model: HybridModel) -> int:
    """Replace, per module instance of ``model``, the elementwise chains a decode step
    launches most by one Triton launch each; returns how many were replaced.

    - every `RMSNorm` and `RMSNormGated` forward (six to ten launches each), and the
      residual addition a norm follows (`RMSNorm.add_norm`, see `Residual`);
    - ``act(gate) * up`` of gated MLPs whose activation is SiLU;
    - the squared ReLU of Nemotron-H's MLP.

    Each computes the values of the torch code it replaces (same roundings), so the
    reference runner and this one agree. The replacement stays for the model's life.
    """
    from avmp.kernels.triton.activations import relu_squared, silu_mul
    from avmp.kernels.triton.rms_norm import add_rms_norm, rms_norm

    count = 0
    for module in model.modules():
        if type(module) is RMSNorm:
            module.forward = _norm_for(module, rms_norm)  # type: ignore[method-assign]
            module.add_norm = _add_norm_for(module, add_rms_norm)  # type: ignore[method-assign]
            count += 1
        elif type(module) is RMSNormGated:
            module.forward = _gated_norm_for(module, rms_norm)  # type: ignore[method-assign]
            count += 1
        elif hasattr(module, "glu") and getattr(module, "act", None) is F.silu:
            module.glu = silu_mul
            count += 1
        elif getattr(module, "act", None) is layers.relu_squared:
            module.act = relu_squared
            count += 1
    return count


def _norm_for(norm: RMSNorm, rms_norm: Any) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, norm.weight, norm.variance_epsilon, fp32_weight=norm.fp32_weight)

    return forward


def _add_norm_for(norm: RMSNorm, add_rms_norm: Any) -> Any:
    def add_norm(
        x: torch.Tensor, delta: torch.Tensor, scale: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(  # type: ignore[no-any-return]
            x, delta, norm.weight, norm.variance_epsilon, scale, fp32_weight=norm.fp32_weight
        )

    return add_norm


def _gated_norm_for(norm: RMSNormGated, rms_norm: Any) -> Any:
    def forward(x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        return rms_norm(x, norm.weight, norm.variance_epsilon, gate, norm.group_size)

    return forward
