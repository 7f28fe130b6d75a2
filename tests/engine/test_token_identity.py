"""Greedy outputs of the engine are token-identical to transformers' ``generate`` on tiny
random models of every family, on batches of mixed prompt lengths with chunked prefill."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import CONFIGS, DEVICES, TinyCheckpoint, random_prompts

from avmp.engine.engine import Engine

MAX_TOKENS = 8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_greedy_matches_transformers(
    family: str, device: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    checkpoint = tiny_checkpoint(family)
    prompts = random_prompts([3, 19, 1, 11, 26])
    engine = Engine(
        checkpoint.path,
        memory="4MiB",
        device=device,
        block_size=4,
        max_num_seqs=3,
        max_num_batched_tokens=12,  # prompts of 19 and 26 tokens prefill in chunks
        check_integrity=True,
    )
    outputs = engine.generate(prompts, max_tokens=MAX_TOKENS)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.prompt_token_ids == prompt
        assert output.token_ids == checkpoint.reference(prompt, MAX_TOKENS)
        assert output.finish_reason in ("stop", "length")
    assert engine.stats.num_generated_tokens == sum(len(o.token_ids) for o in outputs)
    assert engine.stats.allocator.num_admits == len(prompts)
