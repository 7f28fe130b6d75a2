"""MiniMax-Text-01 in the engine: lightning layers whose slot entry is one matrix per
head and no conv, beyond the families' common tests (token identity, logits, geometry
and memory pressure run MiniMax through ``CONFIGS`` and ``HEAVY``); when decode can be
captured; token identity with the lightning layers on the Triton kernels (CUDA, or the
CPU with ``AVMP_TRITON_INTERPRET=1``: else that test skips)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_helpers import CONFIGS, MiB, TinyCheckpoint, random_prompts

from avmp.engine.batch import StepBatch
from avmp.engine.engine import Engine, EngineConfig
from avmp.engine.experts import ExpertSlice
from avmp.engine.fast_runner import FastModelRunner
from avmp.engine.loader import CheckpointError, load_model, read_tensors, weight_files
from avmp.engine.models.minimax import LightningAttention, MiniMaxModel
from avmp.engine.ops import REFERENCE_OPS, Ops
from avmp.models.geometry import LayerKind
from triton_device import kernel_device


def test_decay_tables_in_the_checkpoint_are_recomputed(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """transformers saves each lightning layer's decay tables; the engine drops them on
    load and computes the same slopes from the config."""
    checkpoint = tiny_checkpoint("minimax")
    assert any(name.endswith("slope_rate") for name in read_tensors(weight_files(checkpoint.path)))
    model = load_model(checkpoint.path)
    assert isinstance(model, MiniMaxModel)
    ours = [m for m in model.modules() if isinstance(m, LightningAttention)]
    theirs = [
        layer.self_attn
        for layer in checkpoint.hf.model.layers
        if layer.block_type == "linear_attention"
    ]  # noqa: E501
    assert len(ours) == len(theirs) == 2
    for mine, hf in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.slope_rate, hf.slope_rate.flatten())


def test_a_missing_weight_is_still_an_error(
    tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path: pytest.TempPathFactory
) -> None:
    from safetensors.torch import save_file

    source = tiny_checkpoint("minimax").path
    tensors = read_tensors(weight_files(source))
    del tensors["model.layers.0.self_attn.qkv_proj.weight"]
    target = tmp_path / "broken"  # type: ignore[operator]
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(CheckpointError, match="qkv_proj"):
        load_model(target)


@pytest.mark.parametrize("ssm_dtype", ["float32", "bfloat16"])
def test_lightning_state_is_one_matrix_per_head(
    ssm_dtype: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """Each lightning layer caches ``[heads, head_dim, head_dim]`` in the state dtype
    and nothing else; softmax attention keeps its pages."""
    checkpoint = tiny_checkpoint("minimax")
    config = EngineConfig(memory_bytes=4 * MiB, block_size=4, max_num_batched_tokens=10,
                          ssm_dtype=ssm_dtype)  # fmt: skip
    engine = Engine(checkpoint.path, config)
    geometry = engine.geometry
    assert [a.layer_index for a in geometry.attention_layers] == [1]
    for layer in geometry.recurrent_layers:
        assert layer.kind is LayerKind.LIGHTNING and layer.conv is None
        assert layer.ssm is not None and layer.ssm.shape == (4, 16, 16)
        assert layer.ssm.dtype == ssm_dtype
    assert geometry.conv_bytes_per_request == 0
    if ssm_dtype == "float32":  # a bf16 state rounds: tokens may then differ
        prompts = random_prompts([7, 20, 1])
        for prompt, output in zip(prompts, engine.generate(prompts, max_tokens=6), strict=True):
            assert output.token_ids == checkpoint.reference(prompt, 6)


class _DeviceLightningOps(Ops):
    """Reference kernels whose lightning core is replaced, as `TritonOps`'s is."""

    def lightning_mix(
        self, mixer: LightningAttention, qkv: torch.Tensor, states: torch.Tensor, batch: StepBatch
    ) -> torch.Tensor:
        return super().lightning_mix(mixer, qkv, states, batch)


@pytest.mark.parametrize(
    ("ops", "grouped_experts", "capturable"),
    [
        (REFERENCE_OPS, True, False),  # the reference builds its decode batch per step
        (_DeviceLightningOps(), False, False),  # the experts' loop routes per token
        (_DeviceLightningOps(), True, True),
    ],
)
def test_decode_is_captured_with_lightning_on_device_and_grouped_experts(
    ops: Ops, grouped_experts: bool, capturable: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = MiniMaxModel(CONFIGS["minimax"]())
    # the grouped path's fast kernel needs bf16 on an sm90 GPU: stand in for it here
    monkeypatch.setattr(ExpertSlice, "is_capturable", lambda self: grouped_experts)
    model.use_ops(ops)
    assert model.can_capture_decode() == capturable


def _lightning_through_triton(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """Route `TritonOps.lightning_mix` through `avmp.engine.triton_lightning` (what the
    engine's wiring does) and record (device batch, decode step) of every call."""
    from avmp.engine import triton_lightning
    from avmp.engine.device_batch import DeviceStepBatch
    from avmp.engine.triton_ops import TritonOps

    calls: list[tuple[bool, bool]] = []

    def lightning_mix(
        self: TritonOps, mixer: LightningAttention, qkv: torch.Tensor, states: torch.Tensor,
        batch: StepBatch,
    ) -> torch.Tensor:  # fmt: skip
        calls.append((isinstance(batch, DeviceStepBatch), getattr(batch, "is_decode", False)))
        return triton_lightning.lightning_mix(mixer, qkv, states, batch)

    monkeypatch.setattr(TritonOps, "lightning_mix", lightning_mix)
    return calls


def _triton_engine(checkpoint: TinyCheckpoint, device: torch.device, **options: Any) -> Engine:
    config = EngineConfig(memory_bytes=4 * MiB, device=str(device), block_size=4,
                          max_num_seqs=3, max_num_batched_tokens=12, check_integrity=True,
                          kernels="triton", **options)  # fmt: skip
    return Engine(checkpoint.path, config)


@pytest.mark.gpu
def test_greedy_matches_transformers_through_the_triton_lightning_path(
    tiny_checkpoint: Callable[..., TinyCheckpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine with Triton kernels, its lightning layers through
    `avmp.engine.triton_lightning` (prefill chunks of one prompt over several steps,
    steps mixing prefill and decode, decode steps) gives transformers' greedy tokens."""
    device = kernel_device()
    calls = _lightning_through_triton(monkeypatch)
    checkpoint = tiny_checkpoint("minimax")
    engine = _triton_engine(checkpoint, device)
    prompts = random_prompts([3, 19, 1, 11, 26])
    for prompt, output in zip(prompts, engine.generate(prompts, max_tokens=8), strict=True):
        assert output.token_ids == checkpoint.reference(prompt, 8)
    assert calls and all(on_device for on_device, _ in calls)
    assert any(decode for _, decode in calls) and not all(decode for _, decode in calls)


@pytest.mark.gpu
def test_padded_steps_through_the_triton_lightning_path(
    tiny_checkpoint: Callable[..., TinyCheckpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode, prefill and mixed steps padded to the graphs' buckets (naming no
    sequences: the lightning layers read the device arrays alone, padding rows slot -1),
    run eagerly here, give transformers' tokens. The runner pads only for a model whose
    steps can be captured, so this run lets it: the experts' loop is eager here anyway."""
    device = kernel_device()
    calls = _lightning_through_triton(monkeypatch)
    monkeypatch.setattr(ExpertSlice, "is_capturable", lambda self: True)
    monkeypatch.setattr(MiniMaxModel, "can_capture_mixed", lambda self: True)
    checkpoint = tiny_checkpoint("minimax")
    engine = _triton_engine(checkpoint, device, cuda_graphs=False, pad_decode=True,
                            pad_mixed=True)  # fmt: skip
    runner = engine.runner
    assert isinstance(runner, FastModelRunner) and runner.pad_decode and runner.pad_mixed
    runner.profile.start()
    prompts = random_prompts([5, 2, 9, 14, 3])
    for prompt, output in zip(prompts, engine.generate(prompts, max_tokens=8), strict=True):
        assert output.token_ids == checkpoint.reference(prompt, 8)
    padded = [s for s in runner.profile.steps if s.num_padded_tokens]
    assert any(s.num_prefill_tokens and s.num_decode_requests for s in padded), "no mixed step"
    assert any(s.num_decode_requests == 3 and not s.num_prefill_tokens for s in padded)
    assert calls and all(on_device for on_device, _ in calls)


@pytest.mark.gpu
def test_bf16_decode_steps_replay_in_cuda_graphs(
    tiny_checkpoint: Callable[..., TinyCheckpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In bf16 on an H100/H200-class GPU (the experts' grouped path) the whole decode step
    is on the device: captured in CUDA graphs, it gives the tokens of the same padded
    pass run eagerly (unpadded, GEMMs of other widths could round bf16 differently)."""
    if kernel_device().type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    _lightning_through_triton(monkeypatch)
    checkpoint = tiny_checkpoint("minimax")
    prompts = random_prompts([5, 2, 9, 14, 3])
    graphed = _triton_engine(checkpoint, torch.device("cuda"), dtype="bfloat16")
    assert graphed.model.can_capture_decode(), "needs bf16 grouped experts (sm90 or sm100)"
    runner = graphed.runner
    assert isinstance(runner, FastModelRunner)
    runner.profile.start()
    ours = graphed.generate(prompts, max_tokens=8)
    assert runner.graph_error is None and any(s.graph for s in runner.profile.steps)
    eager = _triton_engine(checkpoint, torch.device("cuda"), dtype="bfloat16",
                           cuda_graphs=False, pad_decode=True, pad_mixed=True)  # fmt: skip
    assert isinstance(eager.runner, FastModelRunner) and eager.runner.pad_decode
    theirs = eager.generate(prompts, max_tokens=8)
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
