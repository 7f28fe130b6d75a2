"""Overlapped steps (the engine launches step N+1 before it reads step N's tokens) give
the tokens and finish reasons of steps that wait for their own tokens: end-of-sequence
tokens are learned one step late, also while requests are preempted and recomputed."""

from __future__ import annotations

from collections.abc import Callable

from engine_helpers import MiB, TinyCheckpoint, random_prompts
from test_memory_pressure import HEAVY, MAX_TOKENS

from avmp.engine.engine import Engine, EngineConfig, GenerationOutput

FAMILY = "granitemoehybrid"
LENGTHS = [4] * 8 + [120] * 4 + [4] * 8  # fills the state pool, then the KV pool


def generate(checkpoint: TinyCheckpoint, overlap: bool) -> tuple[Engine, list[GenerationOutput]]:
    config = EngineConfig(
        memory_bytes=6 * MiB,
        block_size=16,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        check_integrity=True,
        overlap=overlap,
        preemption="recompute",  # vLLM v1's policies, which preempt here
        admission="greedy",
    )
    engine = Engine(checkpoint.path, config)
    return engine, engine.generate(random_prompts(LENGTHS), max_tokens=MAX_TOKENS)


def test_overlap_stops_at_end_of_sequence_like_waiting_steps(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    _, free_running = generate(tiny_checkpoint(FAMILY, eos_token_id=None, **HEAVY[FAMILY]), False)
    eos = 2  # the configs' default; this model writes it in 7 of the 20 answers
    checkpoint = tiny_checkpoint(FAMILY, eos_token_id=eos, **HEAVY[FAMILY])  # same weights
    expected = []
    for output in free_running:
        tokens = output.token_ids
        cut = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        expected.append((tokens[:cut], "stop" if eos in tokens else "length"))
    assert sum(reason == "stop" for _, reason in expected) >= 3
    for overlap in (False, True):
        engine, outputs = generate(checkpoint, overlap)
        assert [(o.token_ids, o.finish_reason) for o in outputs] == expected, overlap
        assert engine.stats.num_preemptions > 0
        assert engine.allocator.usage().num_requests == 0
        assert not engine.scheduler.has_unfinished


def test_overlap_takes_the_same_steps_without_end_of_sequence(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """With every request running to its limit, overlapping changes no decision: the
    same steps, preemptions and migrations (what the simulator comparison relies on)."""
    checkpoint = tiny_checkpoint(FAMILY, eos_token_id=None, **HEAVY[FAMILY])
    runs = [generate(checkpoint, overlap) for overlap in (False, True)]
    (waiting, first), (overlapped, second) = runs
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    for name in ("num_steps", "num_preemptions", "num_recompute_tokens"):
        assert getattr(waiting.stats, name) == getattr(overlapped.stats, name), name
    assert waiting.stats.allocator == overlapped.stats.allocator
