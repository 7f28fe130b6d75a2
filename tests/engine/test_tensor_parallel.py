"""Tensor parallelism on CPU (gloo): every family's shards on 2 and 4 ranks give the
logits and greedy tokens of one rank, each rank's cache shapes are those of the plan
(`avmp.models.tensor_parallel.rank_geometry`), the loader reads each rank's slices,
and one rank builds exactly the unsharded modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import CONFIGS, TinyCheckpoint
from torch import nn
from tp_helpers import full_model, run_families

from avmp.engine import loader
from avmp.engine.loader import CheckpointError, load_model
from avmp.engine.models import model_class
from avmp.engine.parallel import (
    SINGLE,
    Rows,
    Shard,
    TensorParallel,
    check_world_size,
    model_shards,
    run_ranks,
    shard_of,
)
from avmp.engine.parallel.layers import ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from avmp.models.tensor_parallel import rank_geometry

FAMILIES = sorted(CONFIGS)


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    return run_ranks(run_families, 2, FAMILIES, "cpu")


@pytest.fixture(scope="module")
def four_ranks() -> list[dict[str, Any]]:
    return run_ranks(run_families, 4, FAMILIES, "cpu")


def _check_against_one_rank(
    ranks: list[dict[str, Any]], family: str, size: int, tolerance: float = 1e-4
) -> None:
    """Every rank's logits are one rank's, its greedy tokens the same, its parameters
    a share, and its cache shapes the plan's (or the plan and every rank refuse)."""
    full = full_model(family, "cpu")
    try:
        plan = rank_geometry(full.geometry(torch.float32), size)
    except ValueError as error:
        assert all("refused" in rank[family] for rank in ranks), error
        return
    reference = ranks[0][family]
    for rank in ranks:
        result = rank[family]
        assert "refused" not in result, result.get("refused")
        for ours, theirs in zip(result["logits"], reference["full_logits"], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)
        assert result["tokens"] == reference["full_tokens"]
        assert result["num_params"] < result["full_num_params"]
        geometry = result["geometry"]
        assert geometry.num_ranks == size
        assert geometry.attention_layers == plan.attention_layers
        assert geometry.recurrent_layers == plan.recurrent_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_match_one(family: str, two_ranks: list[dict[str, Any]]) -> None:
    _check_against_one_rank(two_ranks, family, 2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_four_ranks_match_one(family: str, four_ranks: list[dict[str, Any]]) -> None:
    """Four ranks: KV heads (2) and Mamba2 groups (2) fewer than ranks are replicated,
    and each gated-norm group spans two ranks; the gated DeltaNet's 2 key heads do not
    split, and the plan and the model refuse alike."""
    _check_against_one_rank(four_ranks, family, 4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_two_gpus_match_one_over_nccl(family: str, kernels: str) -> None:
    """The same on two GPUs over NCCL, with the reference kernels and with the fast
    runner's Triton kernels and CUDA graphs (all-reduces captured) against one GPU's
    same path (fp32, TF32 off; sums in another order than one rank's, hence the
    looser bound)."""
    ranks = run_ranks(run_families, 2, [family], "cuda", kernels)
    _check_against_one_rank(ranks, family, 2, tolerance=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_rank_builds_the_unsharded_modules(family: str) -> None:
    """World size 1 is the code path of before: plain linears and embeddings, nothing
    recorded as a shard, nothing that communicates."""
    config = CONFIGS[family]()
    model = model_class(config.model_type)(config)
    assert model.tp is SINGLE and model_shards(model) == {}
    parallel = (RowParallelLinear, VocabParallelEmbedding, ParallelLMHead)
    assert not any(isinstance(m, parallel) for m in model.modules())
    assert type(model.lm_head) is nn.Linear


def test_a_split_that_does_not_divide_names_the_figure() -> None:
    config = CONFIGS["bamba"]()
    with pytest.raises(ValueError, match=r"tensor parallel size 3 must divide Mamba2 heads \(8\)"):
        model_class(config.model_type)(config, TensorParallel(0, 3))


@pytest.mark.parametrize(
    ("size", "device", "message"),
    [
        (0, "cpu", "must be in 1..8"),
        (16, "cpu", "must be in 1..8"),
        (2, "cuda", "needs 2 CUDA devices"),
    ],
)
def test_bad_world_sizes_are_refused(size: int, device: str, message: str) -> None:
    if device == "cuda" and torch.cuda.device_count() >= size:
        pytest.skip("this machine has the devices")
    with pytest.raises(ValueError, match=message):
        check_world_size(size, device)


def test_a_shard_is_not_sharded_again() -> None:
    shard = full_model("lfm2", "cpu").sharded(TensorParallel(1, 2))
    with pytest.raises(ValueError, match="lfm2: already one of 2 ranks' shards"):
        shard.sharded(TensorParallel(0, 2))


def test_torchrun_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    from avmp.engine.tp_step import is_torchrun_follower, torchrun_rank

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert torchrun_rank(2) is None and not is_torchrun_follower(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert torchrun_rank(2) == 1 and is_torchrun_follower(2)
    with pytest.raises(ValueError, match="--tensor-parallel 4 under torchrun with 2 processes"):
        torchrun_rank(4)


def test_rank_outside_its_group_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 2 is outside a tensor parallel group of 2"):
        TensorParallel(2, 2)


def test_shard_takes_sections_and_pads() -> None:
    full = torch.arange(24.0).view(12, 2)
    heads = Rows.units(1, 1, 2, 3)  # the second of 3 heads of 2 rows
    fused = Rows.sections([heads, Rows.units(0, 2, 1, 6)])
    assert fused.ranges == ((2, 4), (6, 8)) and fused.full == 12
    assert torch.equal(Shard(0, fused).take(full), full[[2, 3, 6, 7]])
    padded = Shard(1, Rows(((1, 2),), 2, 3)).take(full)
    assert torch.equal(padded, torch.cat([full[:, 1:2], torch.zeros(12, 2)], dim=1))


def test_split_or_replicate_follows_vllm() -> None:
    assert TensorParallel(3, 4).split_or_replicate(8, "KV heads") == (6, 2)
    assert [TensorParallel(r, 4).split_or_replicate(2, "KV heads") for r in range(4)] == [
        (0, 1), (0, 1), (1, 1), (1, 1),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"KV heads \(3\) neither split evenly over 2 ranks"):
        TensorParallel(0, 2).split_or_replicate(3, "KV heads")


@pytest.mark.parametrize("family", ["nemotron_h", "jamba", "qwen3_next"])
def test_loader_reads_each_ranks_slices(
    family: str,
    tiny_checkpoint: Callable[..., TinyCheckpoint],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each rank's parameters are its slices of the checkpoint's tensors, read lazily
    (the whole-file reader is never called), and the ranks' slices differ."""
    checkpoint = tiny_checkpoint(family)
    full = dict(load_model(checkpoint.path).named_parameters(remove_duplicate=False))

    def read_whole(files: list[Path]) -> None:
        raise AssertionError("a rank read whole tensors")

    monkeypatch.setattr(loader, "read_tensors", read_whole)
    ranks = [load_model(checkpoint.path, tp=TensorParallel(r, 2)) for r in range(2)]
    for model in ranks:
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, param in params.items():
            shard = shard_of(param)
            expected = full[name] if shard is None else shard.take(full[name].detach())
            assert torch.equal(param.detach(), expected), name
    sharded = model_shards(ranks[0])
    first, second = (dict(model.named_parameters()) for model in ranks)
    assert sharded and any(not torch.equal(first[n], second[n]) for n in sharded if n in first)


def test_loader_refuses_a_tensor_of_the_wrong_full_shape(
    tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    checkpoint = tiny_checkpoint("bamba")
    for item in checkpoint.path.iterdir():
        shutil.copy(item, tmp_path / item.name)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mamba.in_proj.weight"
    tensors[name] = tensors[name][:-2]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"shape mismatch for {name}"):
        load_model(tmp_path, tp=TensorParallel(1, 2))
