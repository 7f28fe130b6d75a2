"""Prefill and mixed steps padded to buckets (what a CUDA graph of such a step computes)
give the tokens of the unpadded eager steps.

The bucket rules and the families' answers run everywhere. The engine runs need the
Triton kernels: on a CUDA device through the captured graphs, or on the CPU under
Triton's interpreter (``AVMP_TRITON_INTERPRET=1``; slow, tens of seconds per engine
run) through the same padded pass run eagerly (``pad_mixed``): padding sequences of
slot -1 and context 0, rows past them owned by none, and layers that read device
arrays alone, as a replayed graph does.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_helpers import DenseLayerCaches, MiB, TinyCheckpoint, random_prompts

from triton_device import kernel_device

try:
    DEVICE: torch.device | None = kernel_device()
except pytest.skip.Exception:  # no CUDA, no interpreter: the bucket tests still run
    DEVICE = None

from avmp.engine.device_batch import StepShape  # noqa: E402
from avmp.engine.engine import Engine, EngineConfig  # noqa: E402
from avmp.engine.fast_runner import FastModelRunner  # noqa: E402
from avmp.engine.loader import load_model  # noqa: E402
from avmp.engine.runner import SequenceWork  # noqa: E402

needs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or AVMP_TRITON_INTERPRET=1)")
ON_CUDA = DEVICE is not None and DEVICE.type == "cuda"
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a CUDA device")
MAX_TOKENS = 8

# Families whose prefill path the graphs take, sized as the engine tests size them;
# experts off where routing would keep the model out of graphs (tiny models are fp32).
CAPTURABLE: dict[str, dict[str, Any]] = {
    "granitemoehybrid": {"num_local_experts": 0},
    "bamba": {},
    "nemotron_h": {
        "layers_block_type": ["linear_attention", "mlp", "full_attention", "linear_attention"]
    },
    "falcon_h1": {},
    "zamba2": {},
    "jamba": {"num_experts": 1},
    "lfm2": {},
    "qwen3_next": {"num_experts": 0},
}


# -- buckets --------------------------------------------------------------------------


def _work(lengths: list[tuple[int, int]], pages: int = 3) -> list[SequenceWork]:
    """(new tokens, cached tokens) per sequence."""
    return [
        SequenceWork([5] * n, c, i, list(range(i * pages, (i + 1) * pages)), True)
        for i, (n, c) in enumerate(lengths)
    ]


def _runner(checkpoint: TinyCheckpoint, **options: Any) -> FastModelRunner:
    model = load_model(checkpoint.path, torch.float32, "cpu")
    cache = DenseLayerCaches(model.geometry(torch.float32), 64, 8, 4, torch.device("cpu"))
    return FastModelRunner(model, cache, 4, torch.device("cpu"), **options)  # type: ignore[arg-type]


def test_padded_shape_of_a_mixed_step(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> None:
    """Tokens to the next token bucket, sequences and sampled rows to the next decode
    graph size, the block table to the decode graphs' width; a step larger than every
    bucket, or with padding off, runs unpadded."""
    runner = _runner(tiny_checkpoint("bamba"), cuda_graphs=False, pad_mixed=True,
                     max_num_batched_tokens=48)  # fmt: skip
    assert runner.token_sizes == (16, 32, 48)
    mixed = _work([(20, 0), (1, 9), (1, 4)])  # 22 tokens, 3 sequences
    shape = runner.padded_shape(mixed, is_decode=False)
    assert shape is not None and tuple(shape) == (32, 4, 16, 4)
    assert runner.padded_shape(_work([(40, 0), (9, 0)]), is_decode=False) is None  # 49 tokens
    assert runner.padded_shape(_work([(1, 9)] * 3), is_decode=True) is None  # pad_decode off
    off = _runner(tiny_checkpoint("bamba"), cuda_graphs=False, max_num_batched_tokens=48)
    assert off.padded_shape(mixed, is_decode=False) is None


def test_models_whose_prefill_path_reads_host_values_stay_eager(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """Expert routing by the loop (the CPU, fp32) has data-dependent shapes: no padded
    mixed pass, as no decode graph."""
    moe = _runner(tiny_checkpoint("granitemoehybrid"), cuda_graphs=False, pad_mixed=True)
    assert not moe.model.can_capture_mixed() and not moe.pad_mixed
    dense_checkpoint = tiny_checkpoint("granitemoehybrid", num_local_experts=0)
    dense = _runner(dense_checkpoint, cuda_graphs=False, pad_mixed=True)
    assert dense.model.can_capture_mixed() and dense.pad_mixed
    minimax = load_model(tiny_checkpoint("minimax").path, torch.float32, "cpu")
    assert not minimax.can_capture_mixed()  # reference lightning core, looped experts


@pytest.mark.parametrize("family", sorted(CAPTURABLE))
def test_families_whose_prefill_path_reads_device_arrays_alone_say_so(
    family: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    model = load_model(tiny_checkpoint(family, **CAPTURABLE[family]).path, torch.float32, "cpu")
    assert model.can_capture_mixed()


def test_the_graph_cap_is_validated() -> None:
    with pytest.raises(ValueError, match="max_mixed_graphs must be >= 0"):
        EngineConfig(max_mixed_graphs=-1)


# -- engine runs (Triton: CUDA, or the CPU under the interpreter) -----------------------


def _config(padded: bool, **options: Any) -> EngineConfig:
    """Padded: graphs on CUDA, the padded eager pass on the CPU. Not: every step eager
    and unpadded (no graphs at all, so decode steps are alike in both runs)."""
    assert DEVICE is not None
    on_cuda = DEVICE.type == "cuda"
    base: dict[str, Any] = dict(
        memory_bytes=4 * MiB,
        device=str(DEVICE),
        block_size=4,
        max_num_seqs=5,
        max_num_batched_tokens=24,  # chunked prefill; buckets 16 and 24
        check_integrity=True,
        kernels="triton",
        cuda_graphs=padded and on_cuda,
        pad_mixed=padded and not on_cuda,
    )
    return EngineConfig(**{**base, **options})


def _generate(engine: Engine, lengths: list[int]) -> list[list[int]]:
    engine.runner.profile.start()  # type: ignore[attr-defined]
    outputs = engine.generate(random_prompts(lengths, seed=7), max_tokens=MAX_TOKENS)
    return [o.token_ids for o in outputs]


def _padded_mixed_steps(engine: Engine) -> list[Any]:
    runner = engine.runner
    assert isinstance(runner, FastModelRunner)
    return [s for s in runner.profile.steps if s.num_prefill_tokens and s.num_padded_tokens]


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("family", sorted(CAPTURABLE))
def test_padded_mixed_steps_give_the_eager_tokens(
    family: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """Ragged prompts, chunked, beside decodes: every prefill and mixed step padded
    (to 16 or 24 tokens and 1, 2, 4 or 8 sequences) gives the tokens of the same run
    unpadded, and those of transformers."""
    checkpoint = tiny_checkpoint(family, **CAPTURABLE[family])
    lengths = [3, 19, 1, 11, 30]
    eager = Engine(checkpoint.path, _config(padded=False))
    expected = _generate(eager, lengths)
    padded = Engine(checkpoint.path, _config(padded=True))
    assert _generate(padded, lengths) == expected
    steps = _padded_mixed_steps(padded)
    assert any(s.num_decode_requests for s in steps), "no padded mixed step"
    assert all(s.num_padded_tokens in (16, 24) for s in steps)
    prompts = random_prompts(lengths, seed=7)
    assert expected[1] == checkpoint.reference(prompts[1], MAX_TOKENS)
    if ON_CUDA:
        runner = padded.runner
        assert isinstance(runner, FastModelRunner) and runner.mixed_graph_error is None
        assert all(s.graph for s in steps)


# Large state and KV against 2 MiB chunks (tests/engine/test_memory_pressure.py's sizes).
PRESSURE = dict(
    hidden_size=256, intermediate_size=64, shared_intermediate_size=128,
    num_attention_heads=2, num_key_value_heads=2, num_local_experts=0, num_hidden_layers=6,
    layer_types=["mamba", "attention", "attention", "attention", "attention", "mamba"],
    mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64, mamba_n_groups=1,
    mamba_chunk_size=32, eos_token_id=None,
)  # fmt: skip


@pytest.mark.gpu
@needs_kernels
def test_padded_mixed_steps_through_preemption_migration_and_compaction(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """Short requests fill the state pool, long ones need KV that the state pool gives
    (migration, compaction), the pools run out (preemption, recompute): the padded
    steps still give transformers' tokens."""
    checkpoint = tiny_checkpoint("granitemoehybrid", **PRESSURE)
    config = _config(padded=True, memory_bytes=6 * MiB, block_size=16, max_num_seqs=8,
                     max_num_batched_tokens=64, preemption="recompute",
                     admission="greedy")  # fmt: skip
    engine = Engine(checkpoint.path, config)
    engine.runner.profile.start()  # type: ignore[attr-defined]
    prompts = random_prompts([4] * 8 + [120] * 4 + [4] * 8)
    outputs = engine.generate(prompts, max_tokens=12)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == checkpoint.reference(prompt, 12)
    stats = engine.stats
    assert stats.num_preemptions > 0
    moved = stats.allocator
    assert moved.chunks_migrated_to["kv"] > 0 and moved.num_compactions > 0
    assert any(s.num_decode_requests for s in _padded_mixed_steps(engine))


@pytest.mark.gpu
@needs_cuda
def test_mixed_graphs_are_bounded_and_their_captures_counted(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """Each new bucket captures one graph (a step marked captured), up to the cap; the
    buckets past it run eagerly and the tokens stay those of eager steps."""
    checkpoint = tiny_checkpoint("bamba")
    lengths = [3, 19, 1, 11, 30, 7, 2]
    expected = _generate(Engine(checkpoint.path, _config(padded=False)), lengths)
    for cap in (2, 64):
        engine = Engine(checkpoint.path, _config(padded=True, max_mixed_graphs=cap))
        assert _generate(engine, lengths) == expected
        runner = engine.runner
        assert isinstance(runner, FastModelRunner)
        assert 0 < len(runner.mixed_graphs) <= cap
        # a step that captured is marked, decode graphs' and mixed graphs' alike; no step
        # captures twice (on an H200 the records held one capture fewer than the graphs
        # twice: a bound, not an equality, until that is understood)
        captures = [s for s in runner.profile.steps if s.captured]
        assert 0 < len(captures) <= len(runner.mixed_graphs) + len(runner.graphs)
        # the same prompts again meet the same buckets: the captured ones replay (in the
        # first run each bucket may come up once only, as on an H200), the rest stay eager
        graphs_before = dict(runner.mixed_graphs)
        assert _generate(engine, lengths) == expected
        steps = runner.profile.steps
        assert any(s.graph and s.num_prefill_tokens and not s.captured for s in steps)
        assert all(runner.mixed_graphs[k] is g for k, g in graphs_before.items())
        if cap == 2:
            assert runner.mixed_graphs.keys() == graphs_before.keys()
            assert any(s.num_prefill_tokens and not s.num_padded_tokens for s in steps)


@pytest.mark.gpu
@needs_cuda
def test_warmup_captures_the_common_mixed_buckets(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    checkpoint = tiny_checkpoint("bamba")
    engine = Engine(checkpoint.path, _config(padded=True, max_num_batched_tokens=64))
    engine.warmup()
    runner = engine.runner
    assert isinstance(runner, FastModelRunner) and runner.mixed_graph_error is None
    assert runner.mixed_graphs and len(runner.mixed_graphs) <= runner.max_mixed_graphs
    full = [k for k in runner.mixed_graphs if k.num_tokens == 64 and k.num_seqs == 1]
    assert full, "the full prefill step is not captured"


def _grouped_gpu() -> bool:
    return ON_CUDA and torch.cuda.get_device_capability()[0] in (9, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not _grouped_gpu(), reason="grouped experts need an H100/H200/B200")
@pytest.mark.parametrize("family", ["qwen3_5_moe", "granitemoehybrid"])
def test_moe_mixed_graphs_equal_the_padded_eager_pass(
    family: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """bf16 experts on the grouped path: routing sorts every row of the step, padding
    rows (zeros) included; the graphs give the padded eager pass's tokens."""
    checkpoint = tiny_checkpoint(family)
    outputs = []
    for graphs in (True, False):
        config = _config(padded=True, dtype="bfloat16", cuda_graphs=graphs,
                         pad_mixed=not graphs, pad_decode=not graphs)  # fmt: skip
        engine = Engine(checkpoint.path, config)
        assert engine.model.can_capture_mixed()
        outputs.append(_generate(engine, [3, 19, 1, 11, 26]))
        if graphs:
            assert any(s.graph for s in _padded_mixed_steps(engine))
    assert outputs[0] == outputs[1]


def test_common_shapes_start_with_the_full_step_then_the_largest_batches(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    runner = _runner(tiny_checkpoint("bamba"), cuda_graphs=False, max_num_batched_tokens=64)
    shapes = runner.common_mixed_shapes(max_num_seqs=6, context_tokens=100)  # 25 pages
    assert {s.width for s in shapes} == {32}
    assert [tuple(s[:2]) for s in shapes] == [
        (64, 1),
        *[(t, 8) for t in (16, 32, 64)],
        *[(t, 4) for t in (16, 32, 64)],
        *[(t, 2) for t in (16, 32, 64)],
        (16, 1), (32, 1),
    ]  # fmt: skip
    assert all(s.num_samples == s.num_seqs for s in shapes)


def test_common_shapes_put_the_fine_buckets_of_large_steps_after_the_coarse_ones(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """A warm-up that captures only the first shapes keeps the coarse coverage of every
    batch bucket; the quarter-doubling buckets above 1,024 tokens come after them."""
    runner = _runner(tiny_checkpoint("bamba"), cuda_graphs=False, max_num_batched_tokens=3000)
    shapes = runner.common_mixed_shapes(max_num_seqs=2, context_tokens=100)
    tokens = [s.num_tokens for s in shapes]
    assert shapes[0][:2] == (3000, 1)
    first_fine = tokens.index(1280)
    assert all(t & (t - 1) == 0 or t == 3000 for t in tokens[:first_fine])
    assert sorted(set(tokens[first_fine:])) == [1280, 1536, 1792, 2560]
    assert {s.num_seqs for s in shapes[1:first_fine]} == {1, 2}
    assert len(shapes) == len(set(shapes))


def test_a_step_replays_the_narrowest_captured_graph_wide_enough(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """Captured widths 32 and 128 of one bucket: a step needing 16 or 32 pages replays
    the 32-wide graph, one needing 64 the 128-wide one, one needing 256 a new graph;
    once the cap is reached, a bucket with no graph wide enough runs eagerly."""
    runner = _runner(tiny_checkpoint("bamba"), cuda_graphs=False, max_num_batched_tokens=64,
                     max_mixed_graphs=3)  # fmt: skip
    runner.use_mixed_graphs = True  # as on CUDA; no step runs here
    for width in (32, 128):
        runner.mixed_graphs[StepShape(32, 2, width, 2)] = None  # type: ignore[assignment]

    def width_of(pages: int) -> int | None:
        shape = runner.padded_shape(_work([(20, 0), (1, 9)], pages), is_decode=False)
        return None if shape is None else shape.width

    assert [width_of(p) for p in (10, 32, 33, 200)] == [32, 32, 128, 256]
    runner.mixed_graphs[StepShape(16, 1, 16, 1)] = None  # type: ignore[assignment]
    assert width_of(200) is None  # the cap: 3 graphs
    assert width_of(100) == 128


@pytest.mark.gpu
@needs_cuda
def test_a_second_engine_on_the_same_model_leaves_the_first_engines_graphs_working(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """A second engine on the same model gives it new ops; the first engine's graphs
    read tensors its own ops made (Mamba2's ``A = -exp(A_log)``), which the swap once
    freed, and after the second engine's captures the first engine's next replay was an
    illegal memory access (benchmarks/engine.py on an H200, its calibration engines
    beside the main one). The tensor now lives on the layer, shared."""
    assert DEVICE is not None
    checkpoint = tiny_checkpoint("granitemoehybrid", num_local_experts=0)
    model = load_model(checkpoint.path, torch.float32, str(DEVICE))
    lengths = [3, 19, 1, 11, 30, 7, 2]
    first = Engine(model, _config(padded=True))
    expected = _generate(first, lengths)
    second = Engine(model, _config(padded=True, max_num_seqs=3))
    assert _generate(second, lengths) == expected
    runners = [first.runner, second.runner]
    assert all(isinstance(r, FastModelRunner) and r.mixed_graphs for r in runners)
    second.backing.close()
    del second, runners
    gc.collect()
    torch.cuda.empty_cache()
    assert _generate(first, lengths) == expected
    torch.cuda.synchronize()
