"""Tensor-parallel sharding rules and one rank's geometry (avmp.models.tensor_parallel)."""

from __future__ import annotations

import pytest

from avmp.models import (
    AttentionLayer,
    CacheTensor,
    LayerKind,
    ModelGeometry,
    ParallelDims,
    RecurrentLayer,
    resolve_model,
)
from avmp.models.tensor_parallel import (
    check_num_ranks,
    experts_per_rank,
    rank_geometry,
    split_deltanet,
    split_heads,
    split_mamba2,
    vocab_per_rank,
)


def _mamba2(index: int, heads: int, head_dim: int, groups: int, d_state: int) -> RecurrentLayer:
    conv = CacheTensor("conv", (heads * head_dim + 2 * groups * d_state, 3), "bfloat16")
    ssm = CacheTensor("ssm", (heads, head_dim, d_state), "float32")
    return RecurrentLayer(index, LayerKind.MAMBA2, ssm=ssm, conv=conv)


def _hybrid(kv_heads: int = 2, groups: int = 1, dims: ParallelDims | None = None) -> ModelGeometry:
    """One attention layer (kv_heads x 64) and one Mamba2 layer (16 heads of 32, state 64)."""
    return ModelGeometry(
        name="tp-test",
        family="test",
        num_layers=2,
        attention_layers=(AttentionLayer(0, kv_heads, 64),),
        recurrent_layers=(_mamba2(1, 16, 32, groups, 64),),
        hidden_size=1024,
        vocab_size=1000,
        num_params=80_000_000,
        num_active_params=80_000_000,
        parallel_dims=dims,
    )


@pytest.mark.parametrize("bad", [0, -1, 9, 16, True, 2.0])
def test_num_ranks_out_of_range_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="tensor parallel size"):
        check_num_ranks(bad)  # type: ignore[arg-type]


def test_heads_are_sharded_where_the_ranks_divide_them() -> None:
    split = split_heads(8, 4, "KV heads")
    assert (split.per_rank, split.num_replicas) == (2, 1)
    assert [split.first(r) for r in range(4)] == [0, 2, 4, 6]


def test_fewer_heads_than_ranks_are_replicated_as_vllm_does() -> None:
    # vLLM's QKVParallelLinear: rank r holds KV head r // (ranks / kv_heads)
    split = split_heads(2, 8, "KV heads")
    assert (split.per_rank, split.num_replicas) == (1, 4)
    assert [split.first(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="rank must be in 0..7"):
        split.first(8)


@pytest.mark.parametrize(("total", "ranks"), [(3, 2), (6, 4), (12, 8)])
def test_heads_that_neither_divide_nor_are_divided_are_refused(total: int, ranks: int) -> None:
    with pytest.raises(ValueError, match=rf"KV heads \({total}\) .* {ranks} ranks"):
        split_heads(total, ranks, "KV heads")


def test_mamba2_groups_sharded_or_replicated() -> None:
    sharded = split_mamba2(num_heads=256, num_groups=8, head_dim=64, d_state=256, num_ranks=4)
    assert (sharded.heads.per_rank, sharded.groups.per_rank) == (64, 2)
    assert sharded.groups.num_replicas == 1
    assert sharded.conv_channels_per_rank == 64 * 64 + 2 * 2 * 256
    one_group = split_mamba2(num_heads=16, num_groups=1, head_dim=32, d_state=64, num_ranks=4)
    assert (one_group.heads.per_rank, one_group.groups.per_rank) == (4, 1)
    assert one_group.groups.num_replicas == 4  # the norm's one group spans every rank
    assert one_group.conv_channels_per_rank == 4 * 32 + 2 * 64
    with pytest.raises(ValueError, match=r"Mamba2 heads \(20\)"):
        split_mamba2(num_heads=20, num_groups=1, head_dim=64, d_state=128, num_ranks=8)
    with pytest.raises(ValueError, match=r"Mamba2 groups \(6\)"):
        split_mamba2(num_heads=48, num_groups=6, head_dim=64, d_state=128, num_ranks=4)


def test_deltanet_experts_and_vocabulary() -> None:
    assert (split_deltanet(16, 32, 8).key_heads, split_deltanet(16, 32, 8).value_heads) == (2, 4)
    with pytest.raises(ValueError, match=r"gated DeltaNet key heads \(2\)"):
        split_deltanet(2, 4, 4)
    assert experts_per_rank(16, 8) == 2
    with pytest.raises(ValueError, match=r"routed experts \(72\)"):
        experts_per_rank(72, 5)
    assert vocab_per_rank(131_072, 8) == 16_384
    assert vocab_per_rank(1000, 2) == 512  # padded to 1,024 = 64 x 2


def test_rank_geometry_of_one_rank_is_the_model() -> None:
    geometry = _hybrid()
    assert rank_geometry(geometry, 1) is geometry


def test_rank_geometry_shards_pages_and_slots_exactly() -> None:
    geometry = _hybrid(kv_heads=8, groups=8)
    rank = rank_geometry(geometry, 4)
    assert rank.attention_layers[0].num_kv_heads == 2
    assert rank.kv_bytes_per_token * 4 == geometry.kv_bytes_per_token
    assert rank.state_bytes_per_request * 4 == geometry.state_bytes_per_request
    assert rank.recurrent_layers[0].ssm is not None
    assert rank.recurrent_layers[0].ssm.shape == (4, 32, 64)
    assert rank.recurrent_layers[0].ssm.dtype == "float32"  # dtypes stay
    assert rank.weight_bytes == geometry.weight_bytes // 4  # nothing replicated


def test_replicated_kv_heads_and_groups_make_units_and_weights_larger_than_a_share() -> None:
    geometry = _hybrid(kv_heads=2, groups=1)
    rank = rank_geometry(geometry, 4)
    assert rank.attention_layers[0].num_kv_heads == 1  # a copy of one KV head
    assert rank.kv_bytes_per_token * 2 == geometry.kv_bytes_per_token
    conv = rank.recurrent_layers[0].conv
    assert conv is not None and conv.shape == (4 * 32 + 2 * 64, 3)  # the group, replicated
    # K and V projections of one head per rank (2 x 1024 x 64) against a quarter of two,
    # and the B and C projections of the one group (2 x 1024 x 64) against a quarter
    extra = (2 * 1024 * 64 - 2 * 1024 * 64 * 2 // 4) + (2 * 1024 * 64 - 2 * 1024 * 64 // 4)
    assert rank.num_params == 80_000_000 // 4 + extra
    assert rank.weight_bytes == 2 * (80_000_000 // 4 + extra)


def test_parallel_dims_that_do_not_divide_name_the_model_and_figure() -> None:
    geometry = _hybrid(dims=ParallelDims(num_attention_heads=12, mlp_widths=(4096,)))
    rank_geometry(geometry, 2)
    with pytest.raises(ValueError, match=r"tp-test on 8 GPUs: attention heads \(12\)"):
        rank_geometry(geometry, 8)
    widths = _hybrid(dims=ParallelDims(mlp_widths=(4100,)))
    with pytest.raises(ValueError, match=r"MLP intermediate channels \(4100\)"):
        rank_geometry(widths, 8)
    experts = _hybrid(dims=ParallelDims(num_experts=6))
    with pytest.raises(ValueError, match=r"routed experts \(6\)"):
        rank_geometry(experts, 4)


def test_a_state_without_heads_is_refused_with_its_shape() -> None:
    flat = RecurrentLayer(1, LayerKind.MAMBA2, CacheTensor("ssm", (4096,), "bfloat16"))
    geometry = ModelGeometry("flat", "test", 1, (), (flat,), 512, 100, 1000, 1000)
    with pytest.raises(ValueError, match=r"shape \(4096,\) does not name its heads"):
        rank_geometry(geometry, 2)


@pytest.mark.parametrize(
    "name",
    ["nemotron-h-47b", "jamba-1.5-mini", "qwen3-next-80b-a3b", "minimax-text-01", "lfm2-1.2b"],
)
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_zoo_models_with_enough_kv_heads_split_their_units_exactly(
    name: str, num_ranks: int
) -> None:
    geometry = resolve_model(name)
    rank = rank_geometry(geometry, num_ranks)
    assert rank.state_bytes_per_request * num_ranks == geometry.state_bytes_per_request
    kv_heads = min(layer.num_kv_heads for layer in geometry.attention_layers)
    sharded = min(num_ranks, kv_heads)  # below that, KV heads are replicated
    assert rank.kv_bytes_per_token * sharded == geometry.kv_bytes_per_token
    assert rank.weight_bytes < geometry.weight_bytes


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("nemotron-h-47b", ParallelDims(64, (30_720,), 0, 8)),
        ("jamba-1.5-mini", ParallelDims(32, (14_336,), 16)),
        ("qwen3-next-80b-a3b", ParallelDims(16, (512,), 512)),
        ("mamba2-2.7b", ParallelDims(0, (), 0, 1)),
        ("bamba-9b", ParallelDims(32, (14_336,), 0, 1)),
    ],
)
def test_configs_record_what_ranks_split(name: str, dims: ParallelDims) -> None:
    assert resolve_model(name).parallel_dims == dims


def test_a_zoo_model_whose_query_heads_do_not_split_is_refused() -> None:
    geometry = resolve_model("falcon-h1-7b")  # 12 query heads, 2 KV heads
    assert rank_geometry(geometry, 4).attention_layers[0].num_kv_heads == 1
    with pytest.raises(ValueError, match=r"falcon-h1-7b on 8 GPUs: attention heads \(12\)"):
        rank_geometry(geometry, 8)


def test_a_rank_geometry_says_it_is_one_share_and_is_not_split_again() -> None:
    geometry = _hybrid(kv_heads=8, groups=8)
    assert geometry.num_ranks == 1
    rank = rank_geometry(geometry, 2)
    assert rank.num_ranks == 2
    with pytest.raises(ValueError, match="already one of 2 ranks' shares"):
        rank_geometry(rank, 2)


def test_a_hand_built_geometry_split_gets_its_mamba2_groups_from_its_layers() -> None:
    rank = rank_geometry(_hybrid(kv_heads=8, groups=2), 4)
    assert rank.parallel_dims == ParallelDims(num_mamba2_groups=2)
