"""The engine with its Triton kernels (and CUDA graphs for decode) stays token-identical
to transformers' greedy ``generate`` on tiny random models of every family.

Runs on a CUDA device, or on the CPU under Triton's interpreter with
``AVMP_TRITON_INTERPRET=1`` (slow: about two minutes for the module); without either,
the module skips. On the CPU there are no graphs, so the graph test pads decode batches
to the graph sizes and runs the padded pass eagerly: the same padding rows (slot -1,
context 0) a replayed graph computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_helpers import CONFIGS, DenseLayerCaches, MiB, TinyCheckpoint, random_prompts

from triton_device import kernel_device

pytestmark = pytest.mark.gpu

DEVICE = kernel_device()

from avmp.engine.engine import Engine, EngineConfig  # noqa: E402
from avmp.engine.fast_runner import FastModelRunner  # noqa: E402
from avmp.engine.loader import load_model  # noqa: E402
from avmp.engine.runner import SequenceWork  # noqa: E402
from avmp.engine.triton_ops import TritonOps  # noqa: E402
from avmp.kernels.choice import use_triton  # noqa: E402

MAX_TOKENS = 8


def _engine(checkpoint: TinyCheckpoint, pad_decode: bool = False) -> Engine:
    config = EngineConfig(
        memory_bytes=4 * MiB,
        device=str(DEVICE),
        block_size=4,
        max_num_seqs=3,
        max_num_batched_tokens=12,  # chunked prefill, and steps mixing prefill and decode
        check_integrity=True,
        kernels="triton",
        pad_decode=pad_decode,
    )
    return Engine(checkpoint.path, config)


def _assert_identical(engine: Engine, checkpoint: TinyCheckpoint, lengths: list[int]) -> None:
    prompts = random_prompts(lengths)
    outputs = engine.generate(prompts, max_tokens=MAX_TOKENS)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == checkpoint.reference(prompt, MAX_TOKENS)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_greedy_matches_transformers_with_triton(
    family: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    checkpoint = tiny_checkpoint(family)
    engine = _engine(checkpoint)
    assert isinstance(engine.runner, FastModelRunner)
    assert isinstance(engine.model.ops, TritonOps)
    engine.runner.profile.start()
    _assert_identical(engine, checkpoint, [3, 19, 1, 11, 26])
    steps = engine.runner.profile.steps
    assert any(s.num_decode_requests and s.num_prefill_tokens for s in steps), "no mixed step"
    assert any(s.num_decode_requests and not s.num_prefill_tokens for s in steps), "no decode"


@pytest.mark.parametrize("family", ["granitemoehybrid", "nemotron_h"])
def test_padded_decode_steps_match_transformers(
    family: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """Decode through CUDA graphs (CPU: the same padded pass, eagerly): three running
    requests pad to four rows, two to two, one to one."""
    overrides = {"num_local_experts": 0} if family == "granitemoehybrid" else {}
    if family == "nemotron_h":
        # no MoE (data-dependent routing keeps a model out of graphs)
        overrides = {
            "layers_block_type": ["linear_attention", "mlp", "full_attention", "linear_attention"]
        }
    checkpoint = tiny_checkpoint(family, **overrides)
    engine = _engine(checkpoint, pad_decode=DEVICE.type == "cpu")
    runner = engine.runner
    assert isinstance(runner, FastModelRunner) and engine.model.can_capture_decode()
    assert runner.pad_decode == (DEVICE.type == "cpu")
    runner.profile.start()
    _assert_identical(engine, checkpoint, [5, 2, 9, 14, 3])
    steps = runner.profile.steps
    assert any(s.num_decode_requests == 3 and not s.num_prefill_tokens for s in steps)
    if DEVICE.type == "cuda":
        assert runner.use_graphs and runner.graphs
        assert any(s.graph for s in runner.profile.steps)


# family -> (config overrides that let its decode step be captured, prologue kinds run)
ONE_ROW = {
    "granitemoehybrid": ({"num_local_experts": 0}, {"NORM", "GATED_NORM", "SILU_MUL"}),
    "nemotron_h": (
        {"layers_block_type": ["linear_attention", "mlp", "full_attention", "linear_attention"]},
        {"NORM", "GATED_NORM", "RELU_SQUARED"},
    ),
    "bamba": ({}, {"NORM", "GATED_NORM", "SILU_MUL"}),
}


@pytest.mark.parametrize("family", sorted(ONE_ROW))
def test_one_row_decode_reads_its_norms_in_the_linears_and_matches_transformers(
    family: str, tiny_checkpoint: Callable[..., TinyCheckpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone request decodes one row a step (in CUDA graphs on CUDA): its norms and
    activations run in the prologues of the linears after them
    (`avmp.kernels.triton.prologue_linear`), and the tokens are transformers'."""
    from avmp.kernels.triton import prologue_linear

    overrides, kinds = ONE_ROW[family]
    names = {prologue_linear.NORM: "NORM", prologue_linear.GATED_NORM: "GATED_NORM",
             prologue_linear.SILU_MUL: "SILU_MUL", prologue_linear.RELU_SQUARED: "RELU_SQUARED"}
    seen: set[str] = set()
    launch = prologue_linear._launch

    def spy(mode: int, *args: Any, **kwargs: Any) -> Any:
        seen.add(names[mode])
        return launch(mode, *args, **kwargs)

    monkeypatch.setattr(prologue_linear, "_launch", spy)
    checkpoint = tiny_checkpoint(family, **overrides)
    engine = _engine(checkpoint)
    engine.runner.profile.start()
    _assert_identical(engine, checkpoint, [13])
    assert seen == kinds
    if DEVICE.type == "cuda":
        assert all(s.graph for s in engine.runner.profile.steps if not s.num_prefill_tokens)


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("family", sorted(ONE_ROW))
def test_decode_rows_run_the_skinny_gemm_and_match_transformers(
    family: str,
    folded: bool,
    tiny_checkpoint: Callable[..., TinyCheckpoint],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Steps of 2-64 rows run each fused linear as its norm or activation kernel, then
    `avmp.kernels.triton.skinny_linear` (dependent launches on Hopper); ``folded``: split
    K's parts summed in the GEMM and decode steps' in_proj applying the conv step as it
    stores xBC, the MLP activation apart; else the activation applied by the GEMM that
    computes its input (Granite's stacked gate and up, Nemotron-H's relu²; Bamba's gate
    and up are two linears), the conv steps' programs sized by the batch
    (``wide_conv``) and, on a GPU made to count 4 SMs, the linears whose tiles overrun a
    wave run by 4 programs sharing their K steps (``balanced``), and split-K outputs that
    only join the residual stream summed by its next norm (``defer_sums``). The tokens stay
    transformers'. Without it (``skinny_rows = 0``) those linears are cuBLAS's."""
    from avmp.kernels import triton as kernels
    from avmp.kernels.triton import skinny_linear

    rows: list[int] = []
    convs: list[int] = []
    acts: list[int] = []
    programs: list[int] = []
    launch = skinny_linear.skinny_linear

    def spy(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows.append(x.shape[0])
        config = kwargs.get("config", args[2] if len(args) > 2 else None)
        programs.append(config.programs if config is not None else 0)
        if kwargs.get("conv") is not None:
            convs.append(x.shape[0])
        if kwargs.get("act") is not None:
            acts.append(x.shape[0])
        return launch(x, *args, **kwargs)

    monkeypatch.setattr(skinny_linear, "skinny_linear", spy)
    deferred: list[int] = []
    parts_launch = skinny_linear.skinny_parts

    def parts_spy(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        deferred.append(x.shape[0])
        return parts_launch(x, *args, **kwargs)

    monkeypatch.setattr(skinny_linear, "skinny_parts", parts_spy)
    conv_blocks: list[int | None] = []
    conv_step = kernels.conv1d_update

    def conv_spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        conv_blocks.append(kwargs.get("block_c"))
        return conv_step(*args, **kwargs)

    monkeypatch.setattr(kernels, "conv1d_update", conv_spy)
    overrides, _ = ONE_ROW[family]
    checkpoint = tiny_checkpoint(family, **overrides)
    engine = _engine(checkpoint)
    ops = engine.model.ops
    assert isinstance(ops, TritonOps)
    ops.fold_parts = ops.fold_conv = folded
    ops.act_epilogue = ops.wide_conv = ops.balanced = ops.defer_sums = not folded
    if not folded:  # few SMs: the tiny model's larger linears overrun a wave, and its
        # one-tile linears reading more than the hidden size (64) split K in two (the
        # MLPs' first linears, K 64, keep their activation epilogue)
        monkeypatch.setattr(skinny_linear, "num_sms", lambda device: 4)
        decode_config = skinny_linear.decode_config

        def split_config(m: int, n: int, k: int, *args: Any) -> Any:
            config = decode_config(m, n, k, *args)
            if n > config.block_n or k <= 64:
                return config
            return dataclasses.replace(config, block_k=32, split_k=2, num_stages=2)

        monkeypatch.setattr(skinny_linear, "decode_config", split_config)
    acts.clear()  # the engine's warm-up steps ran with the defaults
    conv_blocks.clear()
    programs.clear()
    deferred.clear()
    engine.runner.graphs.clear()
    _assert_identical(engine, checkpoint, [6, 9, 4])
    assert rows and min(rows) >= 2 and max(rows) <= ops.skinny_rows
    assert (4 in programs) == (not folded) and set(programs) <= {0, 4}
    # split-K outputs joining the residual stream summed by its next norm (Granite's
    # and Nemotron-H's blocks mark them; Bamba's do not)
    assert bool(deferred) == (not folded and family != "bamba")
    assert bool(convs) == folded  # every Mamba2 layer of a multi-row decode step
    assert bool(acts) == (not folded and family != "bamba")
    # decode steps' conv steps: in the in_proj when folded, else sized by the batch
    assert all(block is not None for block in conv_blocks) and bool(conv_blocks) != folded
    rows.clear()
    ops.skinny_rows = 0
    engine.runner.graphs.clear()
    _assert_identical(engine, checkpoint, [6, 9, 4])
    assert not rows


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_logits_match_transformers_through_the_fast_runner(
    family: str, padded: bool, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """Logits, not only tokens: uneven prefill chunks and single-token decode steps
    (``padded``: through CUDA graphs on CUDA where the model allows, padded eager passes
    on the CPU) over a scattered page table, against one full-sequence forward of
    transformers."""
    checkpoint = tiny_checkpoint(family)
    model = load_model(checkpoint.path, torch.float32, str(DEVICE))
    (prompt,) = random_prompts([23], seed=5)
    cache = DenseLayerCaches(
        model.geometry(torch.float32), num_pages=16, num_slots=3, block_size=4, device=DEVICE
    )
    model.use_ops(TritonOps())
    runner = FastModelRunner(
        model,
        cache,
        4,
        DEVICE,
        cuda_graphs=padded,
        pad_decode=padded,
    )
    pages = [11, 3, 7, 0, 15, 9]
    chunks = [(0, 9), (9, 10), (10, 22), (22, 23)]
    ours = torch.cat(
        # clone: a graph's logits live in its static output until its next replay
        [runner.execute([SequenceWork(prompt[a:b], a, 2, pages, True)]).clone() for a, b in chunks]
    )
    with torch.no_grad():
        theirs = checkpoint.hf(torch.tensor([prompt])).logits[0, [b - 1 for _, b in chunks]]
    torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-4, atol=1e-4)


def test_kernel_choice_is_validated() -> None:
    with pytest.raises(ValueError, match="kernels must be one of"):
        use_triton("fast", DEVICE)
    assert not use_triton("reference", DEVICE)
    assert use_triton("auto", DEVICE) == (DEVICE.type == "cuda")
