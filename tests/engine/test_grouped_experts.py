"""Routed experts run grouped (`avmp.engine.experts.grouped_experts`: pairs sorted on the
device, two grouped matmuls over stacked weights) compute what the per-expert loop
computes; the stacked container keeps the checkpoint's per-expert names, views its
stacks through ``.to()`` and loading, and splits across tensor-parallel ranks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import CONFIGS, MiB, TinyCheckpoint, random_prompts
from torch import nn

from avmp.engine.engine import Engine, EngineConfig
from avmp.engine.experts import (
    GATED_MLP,
    ExpertLayout,
    ExpertSlice,
    RoutedExperts,
    activation_hidden,
    can_group,
    grouped_experts,
    run_experts,
    set_grouped,
)
from avmp.engine.loader import load_model, read_tensors, text_model_tensors, weight_files
from avmp.engine.models import model_class
from avmp.engine.models.layers import GatedMLP, local_experts
from avmp.engine.ops import REFERENCE_OPS
from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.tiny import init_random_weights

MOE_FAMILIES = ["granitemoehybrid", "jamba", "minimax", "nemotron_h", "qwen3_5_moe", "qwen3_next"]
HIDDEN, INTER = 64, 32
# fp32 on the CPU: the grouped matmul runs the same products per expert as the loop;
# only the order of a token's k additions may differ
TIGHT = {"rtol": 1e-5, "atol": 1e-6}


def _stacks(num_experts: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    up = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=generator) / HIDDEN**0.5
    down = torch.randn(num_experts, HIDDEN, INTER, generator=generator) / INTER**0.5
    return up, down


def _glu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _loop(
    x: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    first: int = 0,
) -> torch.Tensor:
    def expert(e: int, t: torch.Tensor) -> torch.Tensor:
        return F.linear(_glu(F.linear(t, up[e])), down[e])

    return run_experts(x, index, weights, expert, up.shape[0], first)


def _routing(
    tokens: int, top_k: int, num_experts: int, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, distinct top-k expert ids per token, softmax weights."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=generator)
    scores = torch.rand(tokens, num_experts, generator=generator)
    index = scores.topk(top_k, dim=-1).indices
    weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1)
    return x, index, weights


@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_grouped_equals_the_loop(tokens: int, top_k: int) -> None:
    """Random routing over 8 experts: at batch 1 most experts get no token."""
    up, down = _stacks(8)
    x, index, weights = _routing(tokens, top_k, 8)
    expected = _loop(x, index, weights, up, down)
    torch.testing.assert_close(grouped_experts(x, index, weights, up, down, _glu), expected,
                               **TIGHT)  # fmt: skip


def test_every_token_to_one_expert() -> None:
    up, down = _stacks(6)
    x, _, _ = _routing(64, 1, 6)
    index = torch.full((64, 1), 4)
    weights = torch.rand(64, 1)
    got = grouped_experts(x, index, weights, up, down, _glu)
    torch.testing.assert_close(got, _loop(x, index, weights, up, down), **TIGHT)
    torch.testing.assert_close(got, F.linear(_glu(F.linear(x, up[4])), down[4]) * weights,
                               **TIGHT)  # fmt: skip


@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize(("rank", "size"), [(0, 2), (1, 2), (2, 4), (3, 4)])
def test_a_rank_sums_its_experts_and_the_ranks_sum_to_one(
    tokens: int, rank: int, size: int
) -> None:
    """A rank holds experts ``first .. first + E/size``; pairs routed to other ranks'
    experts contribute zero, and the ranks' parts add up to the whole."""
    up, down = _stacks(8)
    x, index, weights = _routing(tokens, 3, 8)
    count = 8 // size
    first = rank * count
    mine = slice(first, first + count)
    got = grouped_experts(x, index, weights, up[mine], down[mine], _glu, first)
    torch.testing.assert_close(got, _loop(x, index, weights, up[mine], down[mine], first),
                               **TIGHT)  # fmt: skip
    parts = [
        grouped_experts(x, index, weights, up[r * count : (r + 1) * count],
                        down[r * count : (r + 1) * count], _glu, r * count)
        for r in range(size)
    ]  # fmt: skip
    torch.testing.assert_close(sum(parts), _loop(x, index, weights, up, down), **TIGHT)


def test_a_rank_with_no_pair_of_its_own_returns_zeros() -> None:
    up, down = _stacks(8)
    x, _, weights = _routing(5, 2, 8)
    index = torch.tensor([[0, 1]] * 5)
    got = grouped_experts(x, index, weights, up[4:], down[4:], _glu, first_expert=4)
    assert torch.equal(got, torch.zeros_like(got))


def test_no_tokens() -> None:
    up, down = _stacks(4)
    got = grouped_experts(torch.empty(0, HIDDEN), torch.empty(0, 2, dtype=torch.long),
                          torch.empty(0, 2), up, down, _glu)  # fmt: skip
    assert got.shape == (0, HIDDEN)


def test_the_output_takes_the_routing_weights_dtype() -> None:
    """As the loop: bf16 experts with float32 routing weights (MiniMax) sum in float32."""
    up, down = _stacks(4)
    x, index, weights = _routing(6, 2, 4)
    got = grouped_experts(x, index, weights.double(), up, down, _glu)
    assert got.dtype == torch.float64
    expected = _loop(x, index, weights.double(), up, down)
    torch.testing.assert_close(got, expected, **TIGHT)


# -- the stacked container -------------------------------------------------------------


class _BiasedExpert(nn.Module):
    """``down(silu(up(x)))`` with biases: an ungated layout with bias stacks."""

    ops = REFERENCE_OPS
    act = staticmethod(F.silu)

    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=True)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.up_proj(x)))
        return out


UNGATED = ExpertLayout(("up_proj",), "down_proj", activation_hidden)


def _gated(num_experts: int, tp: TensorParallel = SINGLE) -> ExpertSlice:
    experts = local_experts(lambda: GatedMLP(HIDDEN, INTER, "silu"), num_experts, tp)
    return experts


def _both_paths(experts: RoutedExperts, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    outs = []
    for grouped in (False, True):
        set_grouped(experts, grouped)
        outs.append(experts(*inputs))
    set_grouped(experts, None)
    return tuple(outs)


def test_expert_weights_are_views_of_the_stacks() -> None:
    torch.manual_seed(0)
    experts = _gated(4)
    experts.check_integrity()
    assert experts.stacks["up"].shape == (4, 2 * INTER, HIDDEN)
    assert experts.stacks["down"].shape == (4, HIDDEN, INTER)
    assert torch.equal(experts.stacks["up"][2, :INTER], experts[2].gate_proj.weight)
    assert torch.equal(experts.stacks["up"][2, INTER:], experts[2].up_proj.weight)
    with torch.no_grad():
        experts[1].down_proj.weight.fill_(3.0)
    assert bool((experts.stacks["down"][1] == 3.0).all())


def test_built_experts_get_the_weights_plain_modules_got() -> None:
    """Built on meta and initialised into the stacks, in the order plain modules would
    have drawn them: the same weights for the same seed."""
    torch.manual_seed(7)
    plain = nn.ModuleList(GatedMLP(HIDDEN, INTER, "silu") for _ in range(3))
    torch.manual_seed(7)
    stacked = _gated(3)
    assert stacked.state_dict().keys() == plain.state_dict().keys()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(stacked.state_dict()[name], tensor), name


def test_to_converts_the_stacks_once_and_keeps_the_views() -> None:
    experts = _gated(4)
    params = list(experts.parameters())
    experts.to(torch.float64)
    experts.check_integrity()
    assert list(experts.parameters()) == params  # the same parameter objects, converted
    assert experts.stacks["up"].dtype == torch.float64
    storages = {p.untyped_storage().data_ptr() for p in experts.parameters()}
    assert storages == {s.untyped_storage().data_ptr() for s in experts.stacks.values()}
    converted = [p.data_ptr() for p in experts.parameters()]
    experts.to(torch.float64)  # a no-op conversion moves nothing
    assert [p.data_ptr() for p in experts.parameters()] == converted


def test_meta_build_holds_no_memory() -> None:
    with torch.device("meta"):
        experts = _gated(4)
    assert experts.stacks["up"].is_meta and experts[3].down_proj.weight.is_meta


def test_a_rank_holds_its_experts_under_their_global_names() -> None:
    experts = _gated(8, TensorParallel(rank=1, size=4))
    assert (experts.first_expert, len(experts)) == (2, 2)
    assert list(experts.state_dict()) == [
        f"{i}.{p}.weight" for i in (2, 3) for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert experts.is_elsewhere(0) and not experts.is_elsewhere(3)
    assert [e is experts[i] for i, e in enumerate(experts)] == [True, True]
    with pytest.raises(IndexError):
        experts[2]


@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("rank", [0, 1])
def test_the_container_runs_either_path_alike(tokens: int, rank: int) -> None:
    torch.manual_seed(0)
    experts = _gated(8, TensorParallel(rank=rank, size=2))
    x, index, weights = _routing(tokens, 3, 8)
    loop, grouped = _both_paths(experts, x, index, weights)
    torch.testing.assert_close(grouped, loop, **TIGHT)


def test_biased_ungated_experts_run_either_path_alike() -> None:
    torch.manual_seed(0)
    experts = local_experts(_BiasedExpert, 6, SINGLE, UNGATED)
    assert set(experts.stacks) == {"up", "down", "up_bias", "down_bias"}
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_()
    x, index, weights = _routing(10, 2, 6)
    loop, grouped = _both_paths(experts, x, index, weights)
    torch.testing.assert_close(grouped, loop, **TIGHT)


def test_an_expert_with_weights_outside_the_layout_is_refused() -> None:
    """A gated MLP under the ungated layout: its gate would be left out of the stacks."""
    with pytest.raises(TypeError, match=r"outside the layout \['gate_proj.weight'\]"):
        local_experts(lambda: GatedMLP(HIDDEN, INTER, "silu"), 2, SINGLE, UNGATED)


def test_the_cpu_and_float32_take_the_loop() -> None:
    """The loop stays where torch's grouped GEMM has no fast kernel: the CPU (whose
    float32 tokens tests compare with transformers) and float32 anywhere."""
    experts = _gated(4)
    up, down = experts.stacks["up"], experts.stacks["down"]
    assert not can_group(torch.zeros(1, HIDDEN), up, down)
    assert not experts.is_capturable()
    assert not can_group(torch.zeros(1, HIDDEN, dtype=torch.bfloat16), up.bfloat16(),
                         down.bfloat16())  # fmt: skip


def test_layouts_need_distinct_linears() -> None:
    with pytest.raises(ValueError, match="distinct"):
        ExpertLayout(("down_proj",), "down_proj", activation_hidden)
    assert GATED_MLP.up == ("gate_proj", "up_proj")


# -- the families ------------------------------------------------------------------------


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE blocks: modules whose forward calls experts (they own a RoutedExperts)."""
    return [
        m for m in model.modules()
        if isinstance(m, RoutedExperts) and not isinstance(m, ExpertSlice)
        or any(isinstance(c, ExpertSlice) for c in m.children())
    ]  # fmt: skip


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_each_family_moe_block_is_the_same_either_way(family: str) -> None:
    config = CONFIGS[family]()
    torch.manual_seed(0)
    model = model_class(config.model_type)(config).eval()
    init_random_weights(model)  # some families' expert weights start as torch.empty
    blocks = _moe_blocks(model)
    assert blocks, family
    x = torch.randn(9, config.hidden_size)
    for block in blocks:
        loop, grouped = _both_paths(block, x)
        torch.testing.assert_close(grouped, loop, **TIGHT)
    for experts in (m for m in model.modules() if isinstance(m, ExpertSlice)):
        experts.check_integrity()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_loaded_checkpoints_keep_the_views(
    family: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    checkpoint = tiny_checkpoint(family)
    model = load_model(checkpoint.path, dtype=torch.float64)
    stored = text_model_tensors(read_tensors(weight_files(checkpoint.path)))
    for experts in (m for m in model.modules() if isinstance(m, ExpertSlice)):
        experts.check_integrity()
        assert experts.stacks["down"].dtype == torch.float64
    ours = model.state_dict()
    for name in (n for n in ours if ".experts." in n):
        assert torch.equal(ours[name], stored[name].double()), name


@pytest.mark.parametrize("family", ["granitemoehybrid", "qwen3_5_moe", "minimax"])
def test_greedy_tokens_match_transformers_on_the_grouped_path(
    family: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """The CPU's grouped path (float32; the engine takes it where the GPU kernel runs)
    through the whole engine: chunked prefill, batched decode."""
    checkpoint = tiny_checkpoint(family)
    model = load_model(checkpoint.path)
    set_grouped(model, True)
    config = EngineConfig(4 * MiB, block_size=4, max_num_seqs=3, max_num_batched_tokens=12)
    engine = Engine(model, config)
    prompts = random_prompts([3, 19, 1, 11])
    for prompt, output in zip(prompts, engine.generate(prompts, max_tokens=6), strict=True):
        assert output.token_ids == checkpoint.reference(prompt, 6)


# -- on a GPU ------------------------------------------------------------------------------

HAS_GROUPED_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)


def on_grouped_gpu(test: Callable[..., None]) -> Callable[..., None]:
    """A GPU test that needs torch's grouped GEMM kernel (compute capability 9.x, 10.x)."""
    reason = "needs a CUDA GPU of compute capability 9.x or 10.x (grouped GEMM kernel)"
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_GROUPED_GPU, reason=reason)(test))


def _gpu_experts(num_experts: int, tp: TensorParallel = SINGLE) -> ExpertSlice:
    torch.manual_seed(0)
    with torch.device("cuda"):
        experts = local_experts(lambda: GatedMLP(256, 128, "silu"), num_experts, tp)
    return experts.to(torch.bfloat16)


def _gpu_routing(
    tokens: int, top_k: int, num_experts: int, seed: int = 1
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(tokens, 256, device="cuda", generator=generator).bfloat16()
    scores = torch.rand(tokens, num_experts, device="cuda", generator=generator)
    index = scores.topk(top_k, dim=-1).indices
    weights = torch.softmax(torch.randn(tokens, top_k, device="cuda", generator=generator), -1)
    return x, index, weights.bfloat16()


def _close_in_bf16(got: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16 sums in another order (the loop adds one expert at a time in bf16)."""
    scale = expected.float().abs().max().item()
    assert (got.float() - expected.float()).abs().max().item() <= 2e-2 * scale


@on_grouped_gpu
@pytest.mark.parametrize("tokens", [1, 64, 4096])
@pytest.mark.parametrize("rank", [None, 1])
def test_bf16_grouped_matches_the_loop_on_the_gpu(tokens: int, rank: int | None) -> None:
    tp = SINGLE if rank is None else TensorParallel(rank=rank, size=2)
    experts = _gpu_experts(16, tp)
    x, index, weights = _gpu_routing(tokens, 4, 16)
    assert can_group(x, experts.stacks["up"], experts.stacks["down"])
    assert experts.is_capturable()
    loop, grouped = _both_paths(experts, x, index, weights)
    _close_in_bf16(grouped, loop)
    assert torch.equal(experts(x, index, weights), grouped)  # the default is grouped here


@on_grouped_gpu
def test_a_cuda_graph_replays_new_routing() -> None:
    experts = _gpu_experts(16)
    x, index, weights = _gpu_routing(64, 4, 16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        experts(x, index, weights)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = experts(x, index, weights)
    for seed in (2, 3):
        new = _gpu_routing(64, 4, 16, seed)
        for static, value in zip((x, index, weights), new, strict=True):
            static.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, experts(*new))


@on_grouped_gpu
def test_qwen3_moe_decode_graphs_equal_the_padded_eager_pass(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """bf16 on the GPU: the experts take the grouped path, so decode is captured; the
    graphs give the tokens the same padded pass gives eagerly."""
    checkpoint = tiny_checkpoint("qwen3_5_moe")
    prompts = random_prompts([3, 19, 1, 11, 26])
    outputs = []
    for graphs in (True, False):
        config = EngineConfig(4 * MiB, device="cuda", dtype="bfloat16", block_size=4,
                              max_num_seqs=3, max_num_batched_tokens=12, kernels="triton",
                              cuda_graphs=graphs, pad_decode=not graphs)  # fmt: skip
        engine = Engine(checkpoint.path, config)
        assert engine.model.can_capture_decode()
        engine.runner.profile.start()
        outputs.append([o.token_ids for o in engine.generate(prompts, max_tokens=8)])
        if graphs:
            assert any(s.graph for s in engine.runner.profile.steps)
    assert outputs[0] == outputs[1]


def test_the_benchmark_smoke_run_writes_a_result_and_its_table(tmp_path: Path) -> None:
    from benchmarks import moe
    from benchmarks.common import read_result

    out = tmp_path / "moe.json"
    assert moe.main(["--smoke", "--repeats", "1", "--out", str(out)]) == 0
    result = read_result(out)
    assert [(p["phase"], [c["path"] for c in p["cells"]]) for p in result["phases"]] == [
        ("decode", ["loop", "grouped"]),
        ("prefill", ["loop", "grouped"]),
    ]
    assert all(c["rel_error"] < 1e-5 for p in result["phases"] for c in p["cells"])
    assert "| prefill | 70 | grouped |" in moe.markdown(result)
