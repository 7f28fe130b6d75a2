"""The engine's GPU step: one host-to-device copy per step, device-side step inputs for
the layers' Triton kernels (`avmp.engine.triton_ops`), and CUDA graphs for decode batches.

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
which route with data-dependent shapes) say so (`HybridModel.can_capture_decode`) and
run eagerly: their Python loops read host integers that a graph would freeze. The
runner does not choose the layers' kernels: the engine gives the model its `Ops` (the
Triton ones with this runner) once, at construction.
"""

from __future__ import annotations

import torch

from avmp.engine.device_batch import (
    PackedStep,
    StepShape,
    device_batch,
    pack_step,
    split_packed,
)
from avmp.engine.models.base import HybridModel
from avmp.engine.models.layers import Rotary
from avmp.engine.profile import RunnerProfile
from avmp.engine.runner import ModelRunner, PoolViews, SequenceWork, fill_carried

DEFAULT_GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_GRAPH_WIDTH = 16  # pages


class _Graph:
    """One captured decode forward pass and its static input/output buffers."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: torch.Tensor, logits: torch.Tensor):
        self.graph = graph
        self.inputs = inputs
        self.logits = logits


def _move_rotary(model: HybridModel, device: torch.device) -> None:
    """Rotary tables are plain attributes (not buffers): put them on the device once so
    a step copies nothing from the host (and a graph can capture the embedding)."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Rotary):
                value.inv_freq = value.inv_freq.to(device)


class FastModelRunner(ModelRunner):
    """`ModelRunner` with device-side step inputs (`DeviceStepBatch`) and decode graphs.

    Args:
        cuda_graphs: capture decode steps (CUDA devices, models that
            `~HybridModel.can_capture_decode` only).
        graph_sizes: padded decode batch sizes to capture, ascending.
        pad_decode: without graphs, still pad decode steps to ``graph_sizes`` and run
            the padded pass eagerly (what a graph computes, checkable on the CPU).
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
    ) -> None:
        super().__init__(model, cache, block_size, device)
        safe = model.can_capture_decode()
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
        mark = self.profile.begin(self.device) if self.profile.enabled else None
        is_decode = all(len(w.token_ids) == 1 and w.num_context > 0 for w in work)
        padded = is_decode and (self.use_graphs or self.pad_decode)
        size = self._graph_size(len(work)) if padded else None
        self._captured = False
        if size is not None:
            logits = self._replay(work, size, carried)
        else:
            logits = self._eager(work, is_decode, carried)
        if mark is not None:
            graph = size is not None and self.use_graphs
            self.profile.end(mark, work, self.device, graph, self._captured)
        return logits

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
                graph, error = self._capture(shape), None
            except RuntimeError as raised:  # a layer that cannot be captured: run eagerly
                graph, error = None, str(raised)
            error = self._agreed_capture_error(error)
            if graph is None or error is not None:
                self.use_graphs, self.graph_error = False, error
                fields = self._copy_to(self._stage(work, shape), shape, carried)
                return self._padded_forward(fields)[: len(work)]
            self.graphs[(size, width)] = graph
            self._captured = True
        self._copy_to(self._stage(work, shape), shape, carried, graph.inputs)
        graph.graph.replay()
        return graph.logits[: len(work)]

    def _agreed_capture_error(self, error: str | None) -> str | None:
        """On several ranks, whether any rank's capture failed (one all-reduce of the
        flags): then every rank runs eagerly, since a rank replaying a graph would wait
        in its all-reduces for a rank that runs none. One rank: ``error`` itself."""
        tp = self.model.tp
        if tp.is_single:
            return error
        failed = torch.tensor([error is not None], dtype=torch.int32, device=self.device)
        tp.all_reduce(failed)
        if error is None and int(failed.item()):
            return "decode graph capture failed on another tensor-parallel rank"
        return error

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
