"""The engine on two ranks (CPU, gloo): rank 0 plans, both compute, and the greedy
tokens are transformers' (and one rank's) for a Mamba2 hybrid, Jamba and a gated
DeltaNet family, under memory pressure (preemption by recompute and by swap, migration
both ways, compaction), with overlap on and off and with the prefix cache on; the byte
operations and step messages round-trip; a dead follower is one error on rank 0.

Each engine spawns a follower (a few seconds on two cores), so the runs are few and
each asserts several things.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_helpers import MiB, TinyCheckpoint, random_prompts
from test_memory_pressure import HEAVY

from avmp.cli import main
from avmp.engine.engine import Engine, EngineConfig, RequestOptions, build_memory
from avmp.engine.prefix_cache import StateSlotCopier
from avmp.engine.runner import SequenceWork
from avmp.engine.sampling import TokenLogprobs
from avmp.engine.tp_step import (
    ByteOpLog,
    FollowerFailed,
    Replica,
    StepMessage,
    pack_message,
    unpack_message,
)
from avmp.memory.spec import PoolKind
from avmp.models.tensor_parallel import rank_geometry

MAX_TOKENS = 12
# HEAVY's models with twice the heads (and width), so that one rank's units are
# HEAVY's on one rank: a 6 MiB budget per rank runs out just as it does there
WIDE: dict[str, dict[str, Any]] = {
    "bamba": dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=4,
                  mamba_n_heads=16),
    "jamba": dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=8),
}  # fmt: skip


def _pressure_run(
    checkpoint: TinyCheckpoint, **options: Any
) -> tuple[Engine, list[list[int]], list[list[int]]]:
    """test_memory_pressure's run on two ranks: short requests fill the state pool,
    long ones need KV only the state pool can give, the pools run out, and the short
    ones at the end pull chunks back. Returns the engine, the prompts and the outputs."""
    config = EngineConfig(
        memory_bytes=6 * MiB, block_size=16, max_num_seqs=8, max_num_batched_tokens=64,
        check_integrity=True, admission="greedy", tensor_parallel=2, **options,
    )  # fmt: skip
    engine = Engine(checkpoint.path, config)
    prompts = random_prompts([4] * 8 + [120] * 4 + [4] * 8)
    outputs = engine.generate(prompts, max_tokens=MAX_TOKENS)
    assert all(output.finish_reason == "length" for output in outputs)
    return engine, prompts, [output.token_ids for output in outputs]


def _assert_pools_traded(engine: Engine) -> None:
    moved = engine.stats.allocator
    assert moved.chunks_migrated_to["kv"] > 0 and moved.chunks_migrated_to["state"] > 0
    assert moved.num_compactions > 0 and moved.num_units_moved > 0
    usage = engine.stats.usage
    assert usage is not None and usage.num_requests == 0


def test_mamba2_hybrid_under_pressure_with_overlap(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """Bamba, preempted by recompute, overlap on: transformers' tokens on two ranks."""
    checkpoint = tiny_checkpoint("bamba", eos_token_id=None, **{**HEAVY["bamba"], **WIDE["bamba"]})
    engine, prompts, outputs = _pressure_run(checkpoint, preemption="recompute")
    try:
        assert engine.model.tp.size == 2
        assert engine.geometry.kv_bytes_per_token == 8192  # one rank's: HEAVY's
        for prompt, output in zip(prompts, outputs, strict=True):
            assert output == checkpoint.reference(prompt, MAX_TOKENS)
        assert engine.stats.num_preemptions > 0 and engine.stats.num_recompute_tokens > 0
        _assert_pools_traded(engine)
    finally:
        engine.close()
    assert all(not process.is_alive() for process in engine._leader.processes)


def test_jamba_swaps_under_pressure_without_overlap(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """Jamba (Mamba1, its extra all-reduce at x_proj), preempted to the host tier, each
    step's tokens read before the next: each rank swaps its own shard out and back."""
    checkpoint = tiny_checkpoint("jamba", eos_token_id=None, **{**HEAVY["jamba"], **WIDE["jamba"]})
    engine, prompts, outputs = _pressure_run(checkpoint, preemption="swap", overlap=False)
    try:
        for prompt, output in zip(prompts, outputs, strict=True):
            assert output == checkpoint.reference(prompt, MAX_TOKENS)
        assert engine.stats.num_swapped_out > 0 and engine.stats.num_swapped_in > 0
        _assert_pools_traded(engine)
    finally:
        engine.close()


def test_gated_deltanet_with_the_prefix_cache_matches_one_rank(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """Qwen3-Next, multi-turn with the prefix cache: checkpoints are copied slot to
    slot on every rank (logged on rank 0, replayed on the follower); each turn's
    tokens are transformers' and one rank's with the cache, and the cache hits."""
    checkpoint = tiny_checkpoint("qwen3_next", eos_token_id=None)
    options: dict[str, Any] = dict(memory_bytes=8 * MiB, block_size=4, max_num_seqs=4,
                                   max_num_batched_tokens=32, prefix_cache="avmp")  # fmt: skip
    one = Engine(checkpoint.path, EngineConfig(**options))
    two = Engine(checkpoint.path, EngineConfig(tensor_parallel=2, **options))
    try:
        prompts = random_prompts([9, 14], seed=3)
        for turn in range(3):
            expected = one.generate(prompts, max_tokens=6)
            outputs = two.generate(prompts, max_tokens=6)
            for prompt, mine, theirs in zip(prompts, outputs, expected, strict=True):
                assert mine.token_ids == theirs.token_ids
                assert mine.token_ids == checkpoint.reference(prompt, 6)
            users = random_prompts([5, 3], seed=10 + turn)
            prompts = [p + o.token_ids + u for p, o, u in zip(prompts, outputs, users, strict=True)]
        assert two.totals.prefix.num_hit_tokens == one.totals.prefix.num_hit_tokens > 0
        assert two.slot_copier.num_copies == one.slot_copier.num_copies > 0
        geometry = rank_geometry(one.geometry, 2)
        assert two.geometry.state_bytes_per_request == geometry.state_bytes_per_request
        # rank 0 samples: penalties, logit_bias, min_tokens and log-probabilities there
        steered = RequestOptions(8, frequency_penalty=1.0, repetition_penalty=1.5, logprobs=2,
                                 min_tokens=3, logit_bias=((5, 2.0),))  # fmt: skip
        mine = _one_request(two, prompts[0], steered)
        theirs = _one_request(one, prompts[0], steered)
        assert mine[0] == theirs[0] and len(mine[0]) == 8
        assert [lp.top[0][0] for lp in mine[1]] == [lp.top[0][0] for lp in theirs[1]]
        assert [lp.logprob for lp in mine[1]] == pytest.approx([lp.logprob for lp in theirs[1]],
                                                               rel=1e-4, abs=1e-5)  # fmt: skip
    finally:
        two.close()


def _one_request(engine: Engine, prompt: list[int], options: RequestOptions
                 ) -> tuple[list[int], list[TokenLogprobs]]:  # fmt: skip
    """One request's tokens and log-probabilities, stepped to its end."""
    request_id = engine.add_request(prompt, options)
    tokens: list[int] = []
    logprobs: list[TokenLogprobs] = []
    while engine.has_unfinished_requests:
        for update in engine.step():
            if update.request_id == request_id:
                tokens += update.new_token_ids
                logprobs += update.new_logprobs or []
    return tokens, logprobs


def test_a_dead_follower_is_one_error_on_rank_0(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    checkpoint = tiny_checkpoint("granitemoehybrid")
    engine = Engine(checkpoint.path, EngineConfig(4 * MiB, block_size=4, tensor_parallel=2))
    prompts = random_prompts([5, 7])
    engine.generate(prompts, max_tokens=2)
    (follower,) = engine._leader.processes
    follower.kill()
    follower.join()
    start = time.perf_counter()
    with pytest.raises(FollowerFailed, match="tensor-parallel rank 1 exited"):
        engine.generate(prompts, max_tokens=2)
    assert time.perf_counter() - start < 30
    with pytest.raises(FollowerFailed, match="stopped"):  # no later step waits either
        engine.step()
    engine.close()


GENERATE = ["generate", "granite-4.0-h-tiny", "--random-weights", "--scale", "tiny",
            "--prompt", "Hello", "--prompt", "Two prompts", "--max-tokens", "5",
            "--memory", "16MiB"]  # fmt: skip


def _answers(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.lstrip().startswith("->")]


def test_avmp_generate_on_two_ranks_writes_what_one_writes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("mistral_common")  # the demo's tokenizer
    assert main(GENERATE) == 0
    one = capsys.readouterr().out
    assert main([*GENERATE, "--tensor-parallel", "2"]) == 0
    two = capsys.readouterr().out
    assert len(_answers(two)) == 2 and _answers(two) == _answers(one)
    assert "on 2 ranks (cpu is rank 0)" in two


@pytest.mark.parametrize("size", ["0", "9"])
def test_avmp_generate_refuses_a_bad_size_in_one_line(
    size: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*GENERATE, "--tensor-parallel", size]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tensor parallel" in err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None or shutil.which("avmp") is None,
                    reason="needs the torchrun and avmp scripts")  # fmt: skip
def test_avmp_generate_under_torchrun() -> None:
    pytest.importorskip("mistral_common")
    argv = [shutil.which("torchrun"), "--nproc-per-node", "2", shutil.which("avmp"),
            *GENERATE, "--tensor-parallel", "2"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(_answers(done.stdout)) == 2  # rank 0 alone prints
    assert "on 2 ranks" in done.stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(tensor_parallel=0), "at least 1|1..8|between"),
        (dict(tensor_parallel=9), "8"),
        (dict(tensor_parallel=2.0), "whole number"),
        (dict(tensor_parallel=2, device="cuda:1"), "CUDA|give device 'cuda'"),
    ],
)
def test_bad_sizes_are_one_line(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        EngineConfig(**options)
    assert "\n" not in str(raised.value)


def test_a_step_message_round_trips() -> None:
    work = [
        SequenceWork([5, 6, 7], 0, 3, [4, 1], True),
        SequenceWork([-1], 9, 0, [2, 8, 0], False),
        SequenceWork([11], 2, 1, [], True),
    ]
    message = StepMessage([1, 0, 2, 5, 6], work, carried=True, samples=True)
    assert unpack_message(pack_message(message)) == message
    empty = StepMessage([], [], carried=False, samples=False)
    assert unpack_message(pack_message(empty)) == empty
    assert unpack_message([0]) is None  # stop
    with pytest.raises(ValueError, match="ends at word"):
        unpack_message(pack_message(message)[:-1])


def test_logged_operations_replayed_give_the_same_bytes(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """Maps, unmaps, unit copies and slot copies done on one backing and replayed on
    another built alike leave both pools byte for byte equal."""
    engine = Engine(tiny_checkpoint("bamba").path, EngineConfig(8 * MiB, block_size=4))
    config, geometry = engine.config, engine.geometry
    (_, first, _), (_, second, _) = (build_memory(config, geometry, engine.device)
                                     for _ in range(2))  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for backing in (first, second):
        generator.manual_seed(0)
        for pool in PoolKind:
            data = backing.pool_bytes(pool)
            data.copy_(torch.randint(0, 256, data.shape, dtype=torch.uint8, generator=generator))
    log = ByteOpLog()
    log.watch_backing(first)
    copier = log.slot_copier(StateSlotCopier(first))
    first.map_chunks(PoolKind.KV, [2, 0])
    first.map_chunks(PoolKind.STATE, [1])
    (moved,) = first.unmap_chunks(PoolKind.KV, 1)  # a migration: KV's tail to state
    first.map_chunks(PoolKind.STATE, [moved])
    first.copy_units(PoolKind.KV, [(0, 5), (3, 1)])
    copier(0, 2)
    words = log.take()
    assert log.take() == []
    Replica(second, None, StateSlotCopier(second)).apply(words)
    for pool in PoolKind:
        assert first.mapped_chunks(pool) == second.mapped_chunks(pool)
        assert torch.equal(first.pool_bytes(pool), second.pool_bytes(pool))
    with pytest.raises(ValueError, match="unknown byte operation"):
        Replica(second, None, StateSlotCopier(second)).apply([99])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("overlap", [True, False])
def test_two_gpus_over_nccl_match_one(
    overlap: bool, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """Triton kernels, decode graphs capturing the all-reduces, CUDA VMM pools on each
    GPU, under pressure: one GPU's tokens (and transformers')."""
    checkpoint = tiny_checkpoint("bamba", eos_token_id=None, **{**HEAVY["bamba"], **WIDE["bamba"]})
    options: dict[str, Any] = dict(device="cuda", backing="cuda_vmm", overlap=overlap,
                                   preemption="recompute")  # fmt: skip
    engine, prompts, outputs = _pressure_run(checkpoint, **options)
    try:
        for prompt, output in zip(prompts, outputs, strict=True):
            assert output == checkpoint.reference(prompt, MAX_TOKENS)
        _assert_pools_traded(engine)
        assert engine.runner.graph_error is None and engine.runner.graphs
    finally:
        engine.close()
