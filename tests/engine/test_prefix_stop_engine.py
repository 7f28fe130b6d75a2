"""A request that stops on its end-of-sequence token before ``max_tokens`` still leaves
a checkpoint near its output's end (`PrefixCache` stop checkpoints), so that the next
turn, which repeats the answer, resumes after it; outputs stay token-identical to the
run without a cache."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_helpers import MiB, TinyCheckpoint, random_prompts

from avmp.engine.engine import Engine, EngineConfig

MAX_TOKENS = 24
UNIT = 4  # tokens per page (block_size)
FIRST = [21, 34, 17, 40, 26, 31]
USERS = [[9, 6, 11, 5, 8, 7], [7, 10, 5, 9, 6, 12]]


def _config(**options: Any) -> EngineConfig:
    defaults: dict[str, Any] = dict(
        memory_bytes=16 * MiB, block_size=UNIT, max_num_seqs=8, max_num_batched_tokens=64,
        admission="greedy", check_integrity=True,
    )  # fmt: skip
    return EngineConfig(**{**defaults, **options})


def _eos_it_produces(tiny_checkpoint: Callable[..., TinyCheckpoint], **options: Any) -> int:
    """A token the model (weights seeded alike whatever its eos) emits early in most
    first turns: with it as end-of-sequence, most answers stop before ``MAX_TOKENS``."""
    plain = tiny_checkpoint("granitemoehybrid", eos_token_id=None)
    engine = Engine(plain.path, _config(**options))
    outputs = engine.generate(random_prompts(FIRST, seed=3), MAX_TOKENS)
    seen = Counter(t for o in outputs for t in set(o.token_ids[1 : MAX_TOKENS // 2]))
    return seen.most_common(1)[0][0]


def _conversations(engine: Engine) -> tuple[list[list[list[int]]], list[int], list[int]]:
    """Six conversations of three turns, each turn's prompt the whole history; the
    outputs of each turn, the hit tokens of each turn's call, and a lower bound of each
    turn's hits: the last whole page of the stream before it (up to the end-of-sequence
    token, or ``max_tokens``) wherever that lies past the stream's prompt."""
    prompts = random_prompts(FIRST, seed=3)
    outputs_by_turn, hits, bounds = [], [], [0]
    for turn in range(3):
        outputs = engine.generate(prompts, max_tokens=MAX_TOKENS)
        outputs_by_turn.append([o.token_ids for o in outputs])
        hits.append(engine.stats.prefix.num_hit_tokens)
        if turn == 2:
            break
        bound = 0
        for prompt, output in zip(prompts, outputs, strict=True):
            last_page = (len(prompt) + len(output.token_ids) - 1) // UNIT * UNIT
            if last_page >= len(prompt):  # stopped or not: a checkpoint is due there
                bound += last_page
        bounds.append(bound)
        users = random_prompts(USERS[turn], seed=10 + turn)
        prompts = [p + o.token_ids + u for p, o, u in zip(prompts, outputs, users, strict=True)]
    return outputs_by_turn, hits, bounds


@pytest.mark.parametrize("overlap", [False, True])
def test_a_turn_after_a_stop_resumes_after_the_answer(
    overlap: bool, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    _check_stops(tiny_checkpoint, overlap=overlap)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overlap", [False, True])
def test_stop_checkpoints_on_cuda(
    overlap: bool, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """On the GPU: Triton kernels, decode graphs; each stop checkpoint's copy is queued
    after the decode step that wrote the state and before the next one."""
    _check_stops(tiny_checkpoint, device="cuda", kernels="triton", cuda_graphs=True,
                 overlap=overlap)  # fmt: skip


def _check_stops(tiny_checkpoint: Callable[..., TinyCheckpoint], **options: Any) -> None:
    eos = _eos_it_produces(tiny_checkpoint, **options)
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=eos)
    off, _, _ = _conversations(Engine(checkpoint.path, _config(**options)))
    engine = Engine(checkpoint.path, _config(prefix_cache="avmp", **options))
    on, hits, bounds = _conversations(engine)
    assert on == off
    stops = [sum(o[-1] == eos and len(o) < MAX_TOKENS for o in turn) for turn in off]
    assert stops[0] >= 2 and stops[1] >= 2  # answers stopped early
    assert bounds[1] > 0 and bounds[2] > 0
    # each turn after a stop resumes at or past the answer's last whole page
    assert hits[1] >= bounds[1] and hits[2] >= bounds[2]
    prefix = engine.scheduler.prefix
    assert prefix is not None
    assert prefix.stats.num_stop_checkpoints > 0
    assert prefix.stats.num_stop_checkpoints_released > 0  # superseded as decode went on


def test_a_request_that_cannot_stop_takes_no_stop_checkpoints(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """With ``ignore_eos`` and no stop token every answer reaches ``max_tokens``: no
    stop checkpoint is taken (each would be a slot copy per page for nothing), and the
    planned output end holds the stream's checkpoint."""
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None)
    engine = Engine(checkpoint.path, _config(prefix_cache="avmp"))
    prompts = random_prompts(FIRST, seed=3)
    outputs = engine.generate(prompts, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert all(len(o.token_ids) == MAX_TOKENS for o in outputs)
    prefix = engine.scheduler.prefix
    assert prefix is not None
    stats = prefix.stats
    assert stats.num_stop_checkpoints == stats.num_stop_checkpoints_released == 0
    # one checkpoint per stream, at its planned end (no two prompts share a page)
    assert prefix.tree.num_checkpoints == len(prompts)
