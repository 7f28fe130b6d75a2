"""Kernels are chosen once, through the model's `Ops`: every layer with a kernel choice
receives the same object, a new model runs the reference, families declare whether a
decode step can be captured, and the kernels package knows nothing of the engine."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest
import torch
from engine_helpers import CONFIGS, MiB, reference_tokens_with_ops

import avmp.kernels
from avmp.engine.engine import Engine, EngineConfig
from avmp.engine.models import model_class
from avmp.engine.models.base import HybridModel
from avmp.engine.models.layers import OpsLayer, RMSNorm
from avmp.engine.ops import REFERENCE_OPS, Ops
from avmp.engine.runner import ModelRunner


def _model(family: str, **overrides: object) -> HybridModel:
    config = CONFIGS[family](**overrides)
    return model_class(config.model_type)(config)


class _CountingOps(Ops):
    """The reference kernels, counting the norms they compute."""

    def __init__(self) -> None:
        self.num_norms = 0

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, fp32_weight: bool = False
    ) -> torch.Tensor:
        self.num_norms += 1
        return super().rms_norm(x, weight, eps, fp32_weight)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_use_ops_reaches_every_layer_with_a_kernel_choice(family: str) -> None:
    model = _model(family)
    layers = [m for m in model.modules() if isinstance(m, OpsLayer)]
    assert layers and all(layer.ops is REFERENCE_OPS for layer in layers)
    ops = _CountingOps()
    model.use_ops(ops)
    assert all(layer.ops is ops for layer in layers) and model.ops is ops
    norm = next(m for m in model.modules() if isinstance(m, RMSNorm))  # or a subclass
    norm(torch.ones(2, norm.weight.shape[0]))
    assert ops.num_norms == 1


def test_engine_gives_the_reference_ops_to_the_reference_runner() -> None:
    model = _model("bamba")
    model.use_ops(_CountingOps())
    engine = Engine(model, EngineConfig(4 * MiB, block_size=4, kernels="reference"))
    assert type(engine.runner) is ModelRunner and engine.model.ops is REFERENCE_OPS


@pytest.mark.parametrize(
    ("family", "overrides", "capturable"),
    [
        ("bamba", {}, True),
        ("falcon_h1", {}, True),
        ("granitemoehybrid", {}, False),  # experts
        ("granitemoehybrid", {"num_local_experts": 0}, True),
        ("nemotron_h", {}, False),  # a MoE block
        ("nemotron_h", {"layers_block_type": ["linear_attention", "mlp", "full_attention"]},
         True),
        ("jamba", {}, False),  # Mamba1
    ],
)  # fmt: skip
def test_families_declare_whether_decode_can_be_captured(
    family: str, overrides: dict[str, object], capturable: bool
) -> None:
    assert _model(family, **overrides).can_capture_decode() == capturable


def test_kernels_import_nothing_from_the_engine() -> None:
    root = Path(avmp.kernels.__file__).parent
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.startswith("avmp.engine") for n in names), file


def test_a_runner_takes_its_ops_back_after_another_engine_replaced_them() -> None:
    """Each engine gives the shared model its own ops; a runner built before gives the
    model its own again when it runs a step, so an engine never runs another's kernels
    (a graph captured through its ops reads what its ops hold)."""
    model = _model("bamba")
    mine, theirs = _CountingOps(), _CountingOps()
    model.use_ops(mine)
    runner = ModelRunner(model, None, 4, torch.device("cpu"))  # type: ignore[arg-type]
    assert runner.ops is mine
    model.use_ops(theirs)
    runner.own_ops()
    assert model.ops is mine and all(
        m.ops is mine for m in model.modules() if isinstance(m, OpsLayer))


def test_mamba2_decay_lives_on_the_layer_and_updates_in_place() -> None:
    """``A = -exp(A_log)`` is one tensor per layer whichever `TritonOps` asks (each
    engine makes its own), computed again in place when A_log changes, so CUDA graphs
    captured with it stay valid and read the new values."""
    pytest.importorskip("triton")
    from avmp.engine.models.layers import Mamba2Mixer
    from avmp.engine.triton_ops import TritonOps

    model = _model("bamba")
    mixer = next(m for m in model.modules() if isinstance(m, Mamba2Mixer))
    first = TritonOps().decay(mixer)
    assert torch.equal(first, -torch.exp(mixer.A_log.detach().float()))
    assert TritonOps().decay(mixer) is first  # another engine's ops: the same tensor
    with torch.no_grad():
        mixer.A_log.add_(1.0)  # a weight reload bumps the version
    again = TritonOps().decay(mixer)
    assert again is first and torch.equal(again, -torch.exp(mixer.A_log.detach().float()))
    mixer.A_log = torch.nn.Parameter(torch.zeros(mixer.A_log.shape[0] + 1))  # new shape
    assert torch.equal(TritonOps().decay(mixer), -torch.ones(mixer.A_log.shape[0]))


class _FusingOps(Ops):
    """The reference kernels, taking every one-row linear as fused with its prologue
    (computed by the reference compositions) and counting those calls."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def fuses_prologue(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> bool:
        return x.shape[0] == 1

    def norm_linear(self, x, delta, *args):  # type: ignore[no-untyped-def]
        self.calls["add_norm_linear" if delta is not None else "norm_linear"] += 1
        return super().norm_linear(x, delta, *args)

    def gated_norm_linear(self, *args):  # type: ignore[no-untyped-def]
        self.calls["gated_norm_linear"] += 1
        return super().gated_norm_linear(*args)

    def glu_linear(self, *args):  # type: ignore[no-untyped-def]
        self.calls["glu_linear"] += 1
        return super().glu_linear(*args)

    def act_linear(self, *args):  # type: ignore[no-untyped-def]
        self.calls["act_linear"] += 1
        return super().act_linear(*args)


# family -> the fused linears a decode step of its test config runs
FUSED = {
    "granitemoehybrid": {"add_norm_linear", "norm_linear", "gated_norm_linear", "glu_linear"},
    "bamba": {"add_norm_linear", "norm_linear", "gated_norm_linear", "glu_linear"},
    "nemotron_h": {"add_norm_linear", "norm_linear", "gated_norm_linear", "act_linear"},
    "jamba": {"add_norm_linear", "norm_linear", "glu_linear"},
    "zamba2": {"gated_norm_linear", "glu_linear"},
}


@pytest.mark.parametrize("family", sorted(FUSED))
def test_decode_rows_read_their_norms_through_the_fused_linears(family: str) -> None:
    """A one-row decode step routes its norms and activations into the linears after
    them (the residual sum made by the first reader, later readers norming the updated
    stream); with the reference compositions behind them the tokens are the reference's.
    Prefill rows (many) are never fused."""
    prompts = [[3, 14, 15, 9, 2, 6, 5, 35, 8], [9, 7]]
    fusing = _FusingOps()
    expected, _ = reference_tokens_with_ops(family, None, prompts)
    assert reference_tokens_with_ops(family, fusing, prompts)[0] == expected
    assert set(fusing.calls) == FUSED[family], fusing.calls


def test_reference_ops_offer_no_conv_step_and_refuse_a_done_one() -> None:
    """The reference applies no decode conv step in a linear: it offers none, and a core
    told the step was done raises rather than skipping it."""
    from avmp.engine.ops import Ops

    ops = Ops()
    assert ops.decode_conv(None, None, torch.zeros(1)) is None  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="apply no conv step"):
        ops.mamba2_mix(None, torch.zeros(1), torch.zeros(1), torch.zeros(1),  # type: ignore[arg-type]
                       torch.zeros(1), None, conv_done=True)  # type: ignore[arg-type]
