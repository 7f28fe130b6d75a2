"""The roofline on one rank of a tensor-parallel split: the rank's bytes and FLOPs, and
the all-reduces between ranks (avmp.sim.timing)."""

from __future__ import annotations

import pytest

from avmp.models import (
    AttentionLayer,
    CacheTensor,
    LayerKind,
    ModelGeometry,
    RecurrentLayer,
    resolve_model,
)
from avmp.models.tensor_parallel import rank_geometry
from avmp.sched.scheduler import ScheduledChunk
from avmp.sim.timing import (
    NVLINK4,
    BatchShape,
    Interconnect,
    RooflineModel,
    all_reduce_bytes_per_token,
    device_memory,
    get_profile,
)

H200 = get_profile("h200")


def _mamba2(index: int, groups: int) -> RecurrentLayer:
    """16 heads of 32, state 64."""
    conv = CacheTensor("conv", (16 * 32 + 2 * groups * 64, 3), "bfloat16")
    ssm = CacheTensor("ssm", (16, 32, 64), "bfloat16")
    return RecurrentLayer(index, LayerKind.MAMBA2, ssm, conv)


def _hybrid(groups: int = 8, family: str = "test") -> ModelGeometry:
    """Attention (8 KV heads of 64) at layer 0, Mamba2 at layer 1, hidden 1024."""
    return ModelGeometry(
        name="tp-hybrid",
        family=family,
        num_layers=2,
        attention_layers=(AttentionLayer(0, 8, 64),),
        recurrent_layers=(_mamba2(1, groups),),
        hidden_size=1024,
        vocab_size=1000,
        num_params=1_000_000_000,
        num_active_params=1_000_000_000,
    )


def _decode(num_requests: int, context: int) -> BatchShape:
    return BatchShape.from_chunks(
        [ScheduledChunk(i, context, 1, 0, True, False) for i in range(num_requests)]
    )


def test_ring_all_reduce_and_all_gather_costs() -> None:
    link = Interconnect("test", "a link", bytes_per_s=100e9, latency_s_per_step=2e-6)
    # 4 ranks: 6 steps of a quarter of the bytes
    assert link.all_reduce_seconds(400e6, 4) == pytest.approx(6 * (100e6 / 100e9 + 2e-6))
    assert link.all_gather_seconds(400e6, 4) == pytest.approx(3 * (100e6 / 100e9 + 2e-6))
    assert link.all_reduce_seconds(1e9, 1) == 0.0
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        Interconnect("bad", "no link", 0.0, 1e-6)


def test_nvlink_figures_are_the_sourced_ones() -> None:
    assert NVLINK4.bytes_per_s == 370e9  # NCCL ring bus bandwidth on NVLink 4
    assert NVLINK4.latency_s_per_step == 3e-6  # 6 us for a 2-rank all-reduce of 2 steps
    assert get_profile("h100").interconnect is NVLINK4
    assert H200.interconnect is NVLINK4


def test_one_gpu_has_no_communication() -> None:
    geometry = _hybrid()
    model = RooflineModel(geometry, H200)
    assert all_reduce_bytes_per_token(geometry) == ()
    assert model.communication_seconds(_decode(64, 512)) == 0.0


def test_communication_term_by_hand() -> None:
    rank = rank_geometry(_hybrid(groups=8), 2)
    # embedding + 2 mixers + 2 MLP layers ("test" family: one MLP per layer), bf16
    assert all_reduce_bytes_per_token(rank) == (1024 * 2,) * 5
    shape = _decode(10, 100)
    reduces = 2 * (10 * 5 * 2048 / 2 / 370e9 + 5 * 3e-6)
    gather = 1 * (10 * 1000 * 2 / 2 / 370e9 + 3e-6)
    model = RooflineModel(rank, H200)
    assert model.communication_seconds(shape) == pytest.approx(reduces + gather)
    kernels = max(
        model.step_bytes(shape) / H200.effective_bytes_per_s,
        model.step_flops(shape) / H200.effective_flops_per_s,
    )
    assert model.step_seconds(shape) == pytest.approx(
        kernels + reduces + gather + H200.step_overhead_s
    )


def test_a_rank_reads_its_share_and_computes_its_share_of_attention() -> None:
    geometry, rank = _hybrid(), rank_geometry(_hybrid(), 4)
    shape = BatchShape.from_chunks([ScheduledChunk(0, 0, 512, 0, False, True)])
    one, four = RooflineModel(geometry, H200), RooflineModel(rank, H200)
    assert four.step_bytes(shape) == pytest.approx(one.step_bytes(shape) / 4)
    assert four.step_flops(shape) == pytest.approx(one.step_flops(shape) / 4)


def test_replicated_groups_add_norm_all_reduces_and_mamba1_adds_x_proj() -> None:
    sharded = all_reduce_bytes_per_token(rank_geometry(_hybrid(groups=8), 4))
    replicated = all_reduce_bytes_per_token(rank_geometry(_hybrid(groups=1), 4))
    assert replicated == (*sharded, 4)  # one fp32 sum of squares per token
    jamba = resolve_model("jamba-1.5-large")
    widths = all_reduce_bytes_per_token(rank_geometry(jamba, 8))
    # embedding, 72 mixers, 72 MLP / MoE layers, 63 x_proj (512 + 2 x 16 wide)
    assert widths.count(8192 * 2) == 1 + 72 + 72
    assert widths.count((512 + 32) * 2) == 63


def test_nemotron_mlp_layers_stand_alone() -> None:
    geometry = resolve_model("nemotron-h-47b")
    widths = all_reduce_bytes_per_token(rank_geometry(geometry, 2))
    assert len(widths) == 1 + geometry.num_layers  # one all-reduce per layer + embedding


def test_a_profile_without_link_figures_refuses_a_split() -> None:
    with pytest.raises(ValueError, match="a100 has no GPU-to-GPU link.*h100, h200"):
        RooflineModel(rank_geometry(_hybrid(), 2), get_profile("a100"))


@pytest.mark.parametrize("batch", [64, 256])
def test_nemotron_47b_decode_speeds_up_less_than_linearly(batch: int) -> None:
    geometry = resolve_model("nemotron-h-47b")
    shape = _decode(batch, 1024)
    seconds = {
        n: RooflineModel(rank_geometry(geometry, n), H200).step_seconds(shape) for n in (1, 2, 4)
    }
    assert seconds[1] > seconds[2] > seconds[4]
    assert seconds[1] / seconds[2] < 2 and seconds[1] / seconds[4] < 4  # the all-reduces


def test_per_gpu_memory_holds_a_rank_of_weights() -> None:
    geometry = resolve_model("jamba-1.5-large")  # 398B parameters: 742 GiB of bf16 weights
    assert not device_memory(geometry, 16 << 30, H200).fits
    per_gpu = device_memory(rank_geometry(geometry, 8), 16 << 30, H200)
    assert per_gpu.weight_bytes == rank_geometry(geometry, 8).weight_bytes
    assert per_gpu.weight_bytes < geometry.weight_bytes / 7
    assert per_gpu.fits


def test_pure_mamba2_has_no_mlp_all_reduces() -> None:
    geometry = resolve_model("mamba2-2.7b")  # 64 Mamba2 layers of 1 group, no MLP
    widths = all_reduce_bytes_per_token(rank_geometry(geometry, 2))
    assert widths.count(geometry.hidden_size * 2) == 1 + 64
    assert widths.count(4) == 64  # the one group's norm spans both ranks
