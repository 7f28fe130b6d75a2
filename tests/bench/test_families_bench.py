"""benchmarks.families: what it counts (FLOPs of the experts a token is routed to, the
delta rule's recurrent form, the experts a decode step is not expected to read), the copy
of our weights into transformers' fused experts, and the --smoke run end to end (on the
CPU under Triton's interpreter, in a child process so that the flag is set before triton
loads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from avmp.engine.models.qwen3_next import SparseMoe
from benchmarks.common import REPO_ROOT, read_result
from benchmarks.engine import build_model
from benchmarks.families import (
    GEOMETRIES,
    delta_rule_flops_per_token,
    family_config,
    hf_model,
    linear_flops_per_token,
    markdown,
    untouched_expert_bytes,
)

NEXT = GEOMETRIES["qwen3-next-80b-a3b-128e"]


def tiny_next(num_experts: int, device: str = "meta") -> tuple[Any, torch.nn.Module]:
    """Qwen3-Next at smoke size (tiny widths keep 4 experts), with ``num_experts``."""
    config = family_config(NEXT, smoke=True)
    config.num_experts = num_experts
    return config, build_model(config, torch.device(device))


def test_only_routed_experts_count_towards_the_linear_flops() -> None:
    """Doubling the experts adds only the router's columns: a token does top-k experts'
    work whatever the number of experts."""
    config, few = tiny_next(4)
    _, many = tiny_next(8)
    moe_layers = sum(1 for m in few.modules() if isinstance(m, SparseMoe))
    assert moe_layers == config.num_hidden_layers
    router = 2 * config.hidden_size * (8 - 4) * moe_layers
    assert linear_flops_per_token(many) - linear_flops_per_token(few) == router


def test_delta_rule_flops_are_the_recurrent_form() -> None:
    config, model = tiny_next(4)
    heads, dk, dv = (config.linear_num_value_heads, config.linear_key_head_dim,
                     config.linear_value_head_dim)  # fmt: skip
    conv = 2 * config.linear_num_key_heads * dk + heads * dv
    layers = config.layer_types.count("linear_attention")
    assert layers == 3
    expected = layers * (7 * heads * dk * dv + 2 * conv * config.linear_conv_kernel_dim)
    assert delta_rule_flops_per_token(model) == expected


def test_untouched_experts_follow_uniform_routing() -> None:
    config, model = tiny_next(4)
    moe = next(m for m in model.modules() if isinstance(m, SparseMoe))
    each = sum(p.numel() * p.element_size() for p in moe.experts[0].parameters())
    layers = config.num_hidden_layers
    top_k = config.num_experts_per_tok
    # one token reads exactly top-k of the 4 experts
    assert untouched_expert_bytes(model, 1) == pytest.approx(layers * each * (4 - top_k))
    assert untouched_expert_bytes(model, 10_000) == pytest.approx(0.0)


def test_transformers_gets_our_weights_with_fused_experts() -> None:
    config, ours = tiny_next(4, device="cpu")
    hf = hf_model(config, ours, torch.device("cpu"))
    theirs = hf.state_dict()
    for name, tensor in ours.state_dict().items():
        if ".experts." not in name:
            assert torch.equal(theirs[name], tensor), name
    experts = ours.model.layers[0].mlp.experts
    fused = hf.model.layers[0].mlp.experts
    for e, expert in enumerate(experts):
        gate_up = torch.cat([expert.gate_proj.weight, expert.up_proj.weight])
        assert torch.equal(fused.gate_up_proj[e], gate_up)
        assert torch.equal(fused.down_proj[e], expert.down_proj.weight)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("AVMP_TRITON_INTERPRET") != "1",
    reason="runs the benchmark's Triton kernels under the interpreter (about 5 minutes on "
    "2 cores): set AVMP_TRITON_INTERPRET=1, as for the other interpreter tests",
)
def test_smoke_run_writes_a_result_and_its_table(tmp_path: Path) -> None:
    out = tmp_path / "families.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)])
    run = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "benchmarks.families", "--smoke", "--out",
         str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = read_result(out)
    assert result["smoke"] and not result.get("errors")
    assert [m["model"] for m in result["models"]] == list(GEOMETRIES)
    for model in result["models"]:
        assert model["decode"]["decode_tokens_per_s"] > 0
        assert model["decode"]["roofline"]["tokens_per_s"] > 0
        assert model["prefill"]["flops"]["recurrent"] > 0
        assert "error" not in model["transformers"]["decode"]
        assert model["transformers"]["prefill"]["prefill_tokens_per_s"] > 0
    table = markdown(result)
    assert "qwen3-next-80b-a3b-128e" in table and "(smoke run)" in table
