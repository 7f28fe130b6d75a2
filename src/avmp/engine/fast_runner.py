"""The engine's GPU step: one host-to-device copy per step, device-side step inputs for
the layers' Triton kernels (`avmp.engine.triton_ops`), and CUDA graphs for decode steps
and for prefill and mixed (prefill chunks beside decodes) steps.

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

Prefill and mixed steps pad likewise, to a `StepShape` bucket: tokens to the next of
`token_buckets` (powers of two from 16 to 1,024, then four sizes per doubling, so a
large step pads by at most a quarter, and the engine's tokens per step), sequences
and sampled rows to the next decode graph size, the block table to the decode graphs'
width. Padding sequences own one padding token each (slot -1, context 0), rows past
them none; the layers read no host value that differs within a bucket (tile tables and
scan plans are built on the device) and start their outputs as zeros, so padding rows
stay finite. At most ``max_mixed_graphs`` such graphs are captured (they share the
decode graphs' memory pool); other buckets, and steps larger than every bucket, run
eagerly. So does a step that returns logits of prompt rows too (a request that asked
for its prompt's log-probabilities: `SequenceWork.logit_rows`), unpadded: a graph's LM
head runs over the sampled rows alone.

Models whose layers fall back to per-sequence torch code (mixtures of experts that
route with data-dependent shapes, layers without a Triton path) say so
(`HybridModel.can_capture_decode`, `HybridModel.can_capture_mixed`) and run eagerly:
their Python loops read host integers that a graph would freeze. A capture that raises
turns that kind of graph off for good. The runner does not choose the layers' kernels:
the engine gives the model its `Ops` (the Triton ones with this runner) once, at
construction.
"""

from __future__ import annotations

from typing import Any

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
from avmp.engine.runner import (
    ModelRunner,
    PoolViews,
    SequenceWork,
    fill_carried,
    logit_row_index,
)
from avmp.sched.graph_buckets import DECODE_GRAPH_SIZES as DEFAULT_GRAPH_SIZES
from avmp.sched.graph_buckets import MAX_MIXED_GRAPHS as DEFAULT_MAX_MIXED_GRAPHS
from avmp.sched.graph_buckets import bucket, graph_width, token_buckets


class _Graph:
    """One captured forward pass (decode, or prefill and mixed) and its static
    input/output buffers."""

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
    """`ModelRunner` with device-side step inputs (`DeviceStepBatch`) and CUDA graphs.

    Args:
        cuda_graphs: capture decode steps (CUDA devices, models that
            `~HybridModel.can_capture_decode` only), and with ``mixed_graphs`` prefill
            and mixed steps (models that `~HybridModel.can_capture_mixed`).
        graph_sizes: padded decode batch sizes to capture, ascending; also the padded
            sequence counts of prefill and mixed steps.
        pad_decode: without graphs, still pad decode steps to ``graph_sizes`` and run
            the padded pass eagerly (what a graph computes, checkable on the CPU).
        mixed_graphs: capture prefill and mixed steps too (with ``cuda_graphs``).
        max_num_batched_tokens: the engine's tokens per step, the largest token bucket
            (`token_buckets`).
        max_mixed_graphs: prefill and mixed graphs captured at most.
        pad_mixed: without graphs, still pad prefill and mixed steps to their buckets
            and run the padded pass eagerly (as ``pad_decode``).
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
        mixed_graphs: bool = True,
        max_num_batched_tokens: int = 1024,
        max_mixed_graphs: int = DEFAULT_MAX_MIXED_GRAPHS,
        pad_mixed: bool = False,
    ) -> None:
        super().__init__(model, cache, block_size, device)
        if max_mixed_graphs < 0:
            raise ValueError(f"max_mixed_graphs must be >= 0, got {max_mixed_graphs}")
        safe, mixed_safe = model.can_capture_decode(), model.can_capture_mixed()
        on_cuda = cuda_graphs and device.type == "cuda"
        self.use_graphs = on_cuda and safe
        self.use_mixed_graphs = on_cuda and mixed_graphs and mixed_safe and max_mixed_graphs > 0
        self.graph_sizes = tuple(sorted(graph_sizes))
        self.token_sizes = token_buckets(max_num_batched_tokens)
        self.max_mixed_graphs = max_mixed_graphs
        self.pad_decode = pad_decode and safe
        self.pad_mixed = pad_mixed and mixed_safe
        self.graph_error: str | None = None
        self.mixed_graph_error: str | None = None
        self._captured = False
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.mixed_graphs: dict[StepShape, _Graph] = {}
        # The logits of every prefill and mixed graph, rows [:B] for a graph of B rows:
        # one buffer, not one per graph (256 rows of a 100k vocabulary are 100 MiB).
        self._mixed_logits: torch.Tensor | None = None
        self.profile = RunnerProfile()
        graphs_on = self.use_graphs or self.use_mixed_graphs
        self._pool = torch.cuda.graph_pool_handle() if graphs_on else None
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
        self.own_ops()
        mark = self.profile.begin(self.device) if self.profile.enabled else None
        is_decode = all(len(w.token_ids) == 1 and w.num_context > 0 for w in work)
        # a step that returns prompt rows' logits runs eagerly: a graph's LM head runs
        # over the sampled rows alone
        prompt_rows = logit_row_index(work) if any(w.logit_rows for w in work) else None
        shape = None if prompt_rows else self.padded_shape(work, is_decode)
        self._captured = False
        graph = False
        if shape is not None:
            logits, graph = self._run_padded(work, shape, is_decode, carried)
        else:
            logits = self._eager(work, is_decode, carried, prompt_rows)
        if mark is not None:
            padded = 0 if shape is None else shape.num_tokens
            self.profile.end(mark, work, self.device, graph, self._captured, padded)
        return logits

    def padded_shape(self, work: list[SequenceWork], is_decode: bool) -> StepShape | None:
        """The bucket ``work`` pads to, or None where it runs unpadded and eagerly:
        padding off for its kind, a step larger than every bucket, or (graphs on) a
        new prefill or mixed bucket past ``max_mixed_graphs``. A prefill or mixed step
        replays the narrowest captured graph of its tokens and sequences whose block
        table is at least as wide as it needs (a wider table only adds zero columns
        that no kernel reads), so block-table widths multiply the graphs little."""
        if is_decode:
            size = bucket(len(work), self.graph_sizes)
            if size is None or not (self.use_graphs or self.pad_decode):
                return None
            return StepShape(size, size, self._width(work), size)
        if not (self.use_mixed_graphs or self.pad_mixed):
            return None
        tokens = bucket(sum(len(w.token_ids) for w in work), self.token_sizes)
        seqs = bucket(len(work), self.graph_sizes)
        if tokens is None or seqs is None:
            return None
        shape = StepShape(tokens, seqs, self._width(work), seqs)
        if not self.use_mixed_graphs:
            return shape
        widths = [
            key.width
            for key in self.mixed_graphs
            if key[:2] == shape[:2] and key.width >= shape.width
        ]
        if widths:
            return shape._replace(width=min(widths))
        if len(self.mixed_graphs) >= self.max_mixed_graphs:
            return None
        return shape

    def common_mixed_shapes(self, max_num_seqs: int, context_tokens: int) -> list[StepShape]:
        """The prefill and mixed buckets a serving workload meets most, in the order the
        warm-up captures them: the full prefill step of one sequence, then for the
        largest sequence buckets first (many decodes beside a prompt's chunk, a loaded
        server's step) every power-of-two token bucket that holds more tokens than
        sequences, and after all of those the finer buckets of large steps in the same
        order (a warm-up that captures only some keeps the coarse coverage). All with
        block tables wide enough for ``context_tokens`` per sequence."""
        width = graph_width(-(-context_tokens // self.block_size))
        most = bucket(max_num_seqs, self.graph_sizes) or self.graph_sizes[-1]
        full = StepShape(self.token_sizes[-1], 1, width, 1)
        coarse: list[StepShape] = []
        fine: list[StepShape] = []
        for seqs in sorted((b for b in self.graph_sizes if b <= most), reverse=True):
            for tokens in self.token_sizes:
                shape = StepShape(tokens, seqs, width, seqs)
                if tokens > seqs and shape != full:
                    power_of_two = tokens & (tokens - 1) == 0 or tokens == self.token_sizes[-1]
                    (coarse if power_of_two else fine).append(shape)
        return [full, *coarse, *fine]

    def _width(self, work: list[SequenceWork]) -> int:
        return graph_width(max((len(w.page_rows) for w in work), default=1))

    def _eager(
        self,
        work: list[SequenceWork],
        is_decode: bool,
        carried: torch.Tensor | None,
        prompt_rows: list[int] | None = None,
    ) -> torch.Tensor:
        """The step unpadded; ``prompt_rows``: the step's rows of the sequences'
        ``logit_rows`` (`logit_row_index`), whose logits follow the sampled rows'."""
        num_tokens = sum(len(w.token_ids) for w in work)
        width = max((len(w.page_rows) for w in work), default=1) or 1
        shape = StepShape(num_tokens, len(work), width, sum(w.samples for w in work))
        fields = self._copy_to(self._stage(work, shape), shape, carried)
        batch = device_batch(fields, work, self.block_size, is_decode)
        hidden = self.model(fields.input_ids, batch, self.cache)
        rows = fields.sample_rows
        if prompt_rows:  # a second small copy, in the steps that report prompt rows only
            extra = torch.tensor(prompt_rows, dtype=rows.dtype).to(self.device)
            rows = torch.cat([rows, extra])
        if rows.numel() == 0:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        return self.model.logits(hidden.index_select(0, rows))

    def _run_padded(
        self,
        work: list[SequenceWork],
        shape: StepShape,
        is_decode: bool,
        carried: torch.Tensor | None,
    ) -> tuple[torch.Tensor, bool]:
        """A step padded to ``shape``: through its CUDA graph (captured on first use),
        or (graphs off for its kind) the same padded forward pass run eagerly. Returns
        the sampled rows' logits and whether a graph replayed."""
        num_samples = sum(w.samples for w in work)
        graph = self._graph_for(shape, is_decode)
        if graph is None:
            fields = self._copy_to(self._stage(work, shape), shape, carried)
            return self._padded_forward(fields, is_decode)[:num_samples], False
        self._copy_to(self._stage(work, shape), shape, carried, graph.inputs)
        graph.graph.replay()
        return graph.logits[:num_samples], True

    def _graph_for(self, shape: StepShape, is_decode: bool) -> _Graph | None:
        """The captured graph of ``shape``, captured now if new; None while graphs of
        its kind are off (or once a capture failed, which turns them off for good)."""
        if is_decode:
            graphs: dict[Any, _Graph] = self.graphs
            key: Any = (shape.num_seqs, shape.width)
            if not self.use_graphs:
                return None
        else:
            graphs, key = self.mixed_graphs, shape
            if not self.use_mixed_graphs:
                return None
        graph = graphs.get(key)
        if graph is not None:
            return graph
        try:
            graph, error = self._capture(shape, is_decode), None
        except RuntimeError as raised:  # a layer that cannot be captured: run eagerly
            graph, error = None, str(raised)
        error = self._agreed_capture_error(error, "decode" if is_decode else "mixed")
        if graph is None or error is not None:
            if is_decode:
                self.use_graphs, self.graph_error = False, error
            else:
                self.use_mixed_graphs, self.mixed_graph_error = False, error
            return None
        graphs[key] = graph
        self._captured = True
        return graph

    @torch.inference_mode()
    def capture_mixed(self, shapes: list[StepShape]) -> int:
        """Capture the prefill and mixed graphs of ``shapes`` ahead of use (the engine's
        warm-up: captures in a timed run are one-off work the run pays), up to
        ``max_mixed_graphs`` in all. Returns how many were captured now."""
        captured = 0
        for shape in shapes:
            full = len(self.mixed_graphs) >= self.max_mixed_graphs
            if not self.use_mixed_graphs or full:
                break
            if shape not in self.mixed_graphs and self._graph_for(shape, False) is not None:
                captured += 1
        self._captured = False
        return captured

    def _agreed_capture_error(self, error: str | None, kind: str = "decode") -> str | None:
        """On several ranks, whether any rank's capture failed (one all-reduce of the
        flags): then every rank runs eagerly, since a rank replaying a graph would wait
        in its all-reduces for a rank that runs none. One rank: ``error`` itself."""
        tp = self.model.tp
        if tp.is_single:
            return error
        failed = torch.tensor([error is not None], dtype=torch.int32, device=self.device)
        tp.all_reduce(failed)
        if error is None and int(failed.item()):
            return f"{kind} graph capture failed on another tensor-parallel rank"
        return error

    def _padded_forward(self, fields: PackedStep, is_decode: bool) -> torch.Tensor:
        """Logits of every sampled row of a padded step. The batch names no sequences:
        every layer reads only the device tensors, as a replayed graph does."""
        batch = device_batch(fields, [], self.block_size, is_decode, padded=True)
        hidden = self.model(fields.input_ids, batch, self.cache)
        return self.model.logits(hidden.index_select(0, fields.sample_rows))

    def _capture(self, shape: StepShape, is_decode: bool) -> _Graph:
        """Capture one padded step (all rows padding while capturing, so the warm-up
        and capture runs touch no cache)."""
        inputs = torch.empty(shape.total, dtype=torch.int64, device=self.device)
        fields = self._copy_to(self._stage([], shape), shape, None, inputs)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile the Triton kernels, create cuBLAS handles
                logits = self._padded_forward(fields, is_decode)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        shared = None if is_decode else self._shared_logits(logits)[: shape.num_samples]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._padded_forward(fields, is_decode)
            if shared is not None:  # the graph's own logits return to the pool
                logits = shared.copy_(logits)
        return _Graph(graph, inputs, logits)

    def _shared_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The prefill and mixed graphs' one logits buffer, made at the first capture.
        Sharing is safe: the engine samples a step's logits (on the stream) before it
        launches the next step, which is the only thing that overwrites them."""
        if self._mixed_logits is None:
            rows = max(self.graph_sizes[-1], logits.shape[0])
            self._mixed_logits = logits.new_empty((rows, logits.shape[1]))
        return self._mixed_logits
