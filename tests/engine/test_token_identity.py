"""Greedy outputs of the engine are token-identical to transformers' ``generate`` on tiny
random models of every family, on batches of mixed prompt lengths with chunked prefill."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from engine_helpers import CONFIGS, DEVICES, DenseLayerCaches, MiB, TinyCheckpoint, random_prompts

from avmp.engine.batch import StepBatch
from avmp.engine.engine import Engine, EngineConfig
from avmp.engine.loader import load_model

MAX_TOKENS = 8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_greedy_matches_transformers(
    family: str, device: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    checkpoint = tiny_checkpoint(family)
    prompts = random_prompts([3, 19, 1, 11, 26])
    config = EngineConfig(
        memory_bytes=4 * MiB,
        device=device,
        block_size=4,
        max_num_seqs=3,
        max_num_batched_tokens=12,  # prompts of 19 and 26 tokens prefill in chunks
        check_integrity=True,
    )
    engine = Engine(checkpoint.path, config)
    outputs = engine.generate(prompts, max_tokens=MAX_TOKENS)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.prompt_token_ids == prompt
        assert output.token_ids == checkpoint.reference(prompt, MAX_TOKENS)
        assert output.finish_reason in ("stop", "length")
    assert engine.stats.num_generated_tokens == sum(len(o.token_ids) for o in outputs)
    assert engine.stats.allocator.num_admits == len(prompts)


@pytest.mark.parametrize("batched_decode", [True, False])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_logits_match_transformers_through_chunked_prefill_and_decode(
    family: str, batched_decode: bool, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """Token identity on tiny random models can hide small errors; logits cannot.

    The prompt is prefilled in uneven chunks (the last one a single token, which takes
    the decode path) over a scattered page table, then compared position by position
    with one full-sequence forward of transformers. Without the batched decode group
    (a batch built by another runner), layers take the decode token one by one.
    """
    checkpoint = tiny_checkpoint(family)
    model = load_model(checkpoint.path)
    (prompt,) = random_prompts([23], seed=5)
    cache = DenseLayerCaches(model.geometry(torch.float32), num_pages=16, num_slots=3, block_size=4)
    pages = [11, 3, 7, 0, 15, 9]
    hidden = []
    with torch.inference_mode():
        for start, end in [(0, 9), (9, 10), (10, 22), (22, 23)]:
            batch = StepBatch.build([(start, end - start, 2, pages)], 4, torch.device("cpu"))
            if not batched_decode:
                batch = dataclasses.replace(batch, decode=None)
            hidden.append(model(torch.tensor(prompt[start:end]), batch, cache))
        ours = model.logits(torch.cat(hidden))
        theirs = checkpoint.hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_falcon_without_its_mamba_norm_matches_transformers(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """The published Falcon-H1 configs set ``mamba_rms_norm`` false: the mixer gates
    with silu alone and holds no norm weight."""
    checkpoint = tiny_checkpoint("falcon_h1", mamba_rms_norm=False)
    prompts = random_prompts([5, 17])
    engine = Engine(checkpoint.path, EngineConfig(memory_bytes=4 * MiB, block_size=4))
    outputs = engine.generate(prompts, max_tokens=MAX_TOKENS)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == checkpoint.reference(prompt, MAX_TOKENS)
