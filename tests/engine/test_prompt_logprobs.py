"""Prompt log-probabilities (`RequestOptions.prompt_logprobs`): for every prompt position
p >= 1, the log-probability of token p given the tokens before it, its rank and the top
k there, equal to transformers' own forward pass (log-softmax of its logits) on tiny
random models of several families, through prompts prefilled over several chunks, in
batches mixing requests that ask with requests that do not, with the prefix cache on
(such a request takes no hit), through preemption (recompute and swap: each position
reported once) and on two tensor-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from engine_helpers import (
    MiB,
    TinyCheckpoint,
    assert_prompt_logprobs,
    random_prompts,
    run_requests,
)
from test_memory_pressure import HEAVY

from avmp.engine.engine import Engine, EngineConfig, RequestOptions
from avmp.engine.runner import SequenceWork
from avmp.engine.sampling import MAX_LOGPROBS
from avmp.engine.tp_step import StepMessage, pack_message, unpack_message

MAX_TOKENS = 4


def _config(**options: Any) -> EngineConfig:
    defaults: dict[str, Any] = dict(
        memory_bytes=8 * MiB,
        block_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=8,  # prompts of 11 to 26 tokens prefill in 2 to 4 chunks
        check_integrity=True,
    )
    return EngineConfig(**{**defaults, **options})


@pytest.mark.parametrize(
    ("family", "overlap"), [("bamba", True), ("jamba", False), ("qwen3_next", True)]
)
def test_prompt_logprobs_match_transformers_in_a_mixed_batch(
    family: str, overlap: bool, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """Requests asking for k = 3, 0 (a prompt of one token), 5 and 20 beside requests that
    do not: the asking ones get transformers' values in exactly one update (their first
    with tokens), the others none, and everyone's greedy tokens are transformers'."""
    checkpoint = tiny_checkpoint(family)
    engine = Engine(checkpoint.path, _config(overlap=overlap))
    prompts = random_prompts([19, 3, 1, 26, 11, 7])
    ks = [3, None, 0, 5, None, MAX_LOGPROBS]
    requests = [
        (p, RequestOptions(MAX_TOKENS, prompt_logprobs=k)) for p, k in zip(prompts, ks, strict=True)
    ]
    for (prompt, _), k, updates in zip(requests, ks, run_requests(engine, requests), strict=True):
        tokens = [t for update in updates for t in update.new_token_ids]
        assert tokens == checkpoint.reference(prompt, MAX_TOKENS)
        given = [u for u in updates if u.prompt_logprobs is not None]
        if k is None:
            assert not given
            continue
        assert len(given) == 1 and given[0] is next(u for u in updates if u.new_token_ids)
        assert_prompt_logprobs(checkpoint, prompt, k, given[0].prompt_logprobs)


@pytest.mark.parametrize("policy", ["avmp", "vllm-align", "sglang"])
def test_prompt_logprobs_take_no_prefix_hit(
    policy: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """A prompt the cache holds (a request without prompt log-probabilities hits it):
    a request asking for them computes it whole (no hit tokens counted, values right,
    tokens right)."""
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None)
    engine = Engine(checkpoint.path, _config(prefix_cache=policy, max_num_batched_tokens=32))
    (prompt,) = random_prompts([100], seed=7)
    for _ in range(2):  # the avmp policy checkpoints a repeated prompt's branch point
        engine.generate([prompt], max_tokens=MAX_TOKENS)
    hits = engine.totals.prefix.num_hit_tokens
    (plain,) = engine.generate([prompt], max_tokens=MAX_TOKENS)
    assert engine.totals.prefix.num_hit_tokens > hits  # the cache is warm
    hits, computed = engine.totals.prefix.num_hit_tokens, engine.stats.num_computed_tokens
    (asked,) = engine.generate([prompt], max_tokens=MAX_TOKENS, prompt_logprobs=2)
    assert engine.totals.prefix.num_hit_tokens == hits
    assert engine.stats.num_computed_tokens > computed  # the whole prompt this time
    assert asked.token_ids == plain.token_ids == checkpoint.reference(prompt, MAX_TOKENS)
    assert_prompt_logprobs(checkpoint, prompt, 2, asked.prompt_logprobs)
    assert plain.prompt_logprobs is None


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_prompt_logprobs_through_preemption(
    preemption: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """test_memory_pressure's run, every request asking: preempted requests (some
    mid-prompt) report each position once, with transformers' values."""
    checkpoint = tiny_checkpoint("bamba", eos_token_id=None, **HEAVY["bamba"])
    config = EngineConfig(
        memory_bytes=6 * MiB, block_size=16, max_num_seqs=8, max_num_batched_tokens=64,
        check_integrity=True, preemption=preemption, admission="greedy",
    )  # fmt: skip
    engine = Engine(checkpoint.path, config)
    prompts = random_prompts([4] * 8 + [120] * 4 + [4] * 8)
    outputs = engine.generate(prompts, max_tokens=12, prompt_logprobs=1)
    assert engine.stats.num_preemptions > 0
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == checkpoint.reference(prompt, 12)
        assert_prompt_logprobs(checkpoint, prompt, 1, output.prompt_logprobs)


def test_prompt_logprobs_on_two_ranks(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> None:
    """Both ranks run the LM head over the prompt rows (its all-gather needs both)."""
    checkpoint = tiny_checkpoint("bamba")
    engine = Engine(checkpoint.path, _config(tensor_parallel=2, max_num_batched_tokens=12))
    try:
        prompts = random_prompts([21, 5])
        outputs = engine.generate(prompts, max_tokens=MAX_TOKENS, prompt_logprobs=4)
        for prompt, output in zip(prompts, outputs, strict=True):
            assert output.token_ids == checkpoint.reference(prompt, MAX_TOKENS)
            assert_prompt_logprobs(checkpoint, prompt, 4, output.prompt_logprobs)
    finally:
        engine.close()


def test_logit_rows_travel_in_step_messages() -> None:
    work = [SequenceWork([5, 6, 7], 0, 1, [2], False, range(0, 3)),
            SequenceWork([-1], 9, 2, [3, 4], True)]  # fmt: skip
    message = StepMessage([], work, carried=True, samples=True)
    assert unpack_message(pack_message(message)) == message


@pytest.mark.parametrize("value", [-1, MAX_LOGPROBS + 1, 1.0, True])
def test_prompt_logprobs_option_is_checked(value: Any) -> None:
    with pytest.raises(ValueError, match="prompt_logprobs must be None or a whole number"):
        RequestOptions(prompt_logprobs=value)
