"""Prompt log-probabilities through the fast runner (`FastModelRunner`): a step that
holds prompt rows runs eagerly with its LM head over them, the other steps still
replay their CUDA graphs (on the CPU under Triton's interpreter: their padded passes),
and the values are transformers'.

Runs on a CUDA device, or on the CPU with ``AVMP_TRITON_INTERPRET=1``; else skips.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from engine_helpers import (
    MiB,
    TinyCheckpoint,
    assert_prompt_logprobs,
    random_prompts,
    run_requests,
)

from triton_device import kernel_device

pytestmark = pytest.mark.gpu

DEVICE = kernel_device()

from avmp.engine.engine import Engine, EngineConfig, RequestOptions  # noqa: E402
from avmp.engine.fast_runner import FastModelRunner  # noqa: E402

MAX_TOKENS = 6


@pytest.mark.parametrize("family", ["bamba", "falcon_h1"])
def test_prompt_logprobs_through_the_fast_runner(
    family: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    checkpoint = tiny_checkpoint(family)
    on_cpu = DEVICE.type == "cpu"
    config = EngineConfig(
        memory_bytes=4 * MiB, device=str(DEVICE), block_size=4, max_num_seqs=4,
        max_num_batched_tokens=12, check_integrity=True, kernels="triton",
        pad_decode=on_cpu, pad_mixed=on_cpu,
    )  # fmt: skip
    engine = Engine(checkpoint.path, config)
    runner = engine.runner
    assert isinstance(runner, FastModelRunner)
    runner.profile.start()
    prompts = random_prompts([19, 4, 26, 9])
    ks = [3, None, 0, None]
    requests = [
        (p, RequestOptions(MAX_TOKENS, prompt_logprobs=k)) for p, k in zip(prompts, ks, strict=True)
    ]
    for (prompt, _), k, updates in zip(requests, ks, run_requests(engine, requests), strict=True):
        assert [t for u in updates for t in u.new_token_ids] == checkpoint.reference(
            prompt, MAX_TOKENS
        )
        given = [u.prompt_logprobs for u in updates if u.prompt_logprobs is not None]
        if k is None:
            assert not given
        else:
            assert len(given) == 1
            assert_prompt_logprobs(checkpoint, prompt, k, given[0])
    steps = runner.profile.steps
    assert any(s.num_padded_tokens == 0 and s.num_prefill_tokens for s in steps)  # the eager ones
    assert any(s.num_padded_tokens for s in steps)  # the others still pad (graphs on CUDA)
    if DEVICE.type == "cuda":
        assert any(s.graph for s in steps)
