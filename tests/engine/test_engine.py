"""Engine API: sampling, repeated calls, and the mistakes it rejects."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_helpers import MiB, TinyCheckpoint, random_prompts, transformers

from avmp.engine.engine import Engine, EngineConfig
from avmp.engine.sampling import SamplingParams, top_p_filter


@pytest.fixture(scope="module")
def engine_and_checkpoint(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> tuple[Engine, TinyCheckpoint]:
    checkpoint = tiny_checkpoint("granitemoehybrid")
    return Engine(checkpoint.path, EngineConfig(4 * MiB, block_size=4)), checkpoint


def test_repeated_generate_calls_reuse_the_memory(
    engine_and_checkpoint: tuple[Engine, TinyCheckpoint],
) -> None:
    engine, checkpoint = engine_and_checkpoint
    for seed in (7, 8):
        prompts = random_prompts([5, 9], seed=seed)
        for prompt, output in zip(prompts, engine.generate(prompts, max_tokens=4), strict=True):
            assert output.token_ids == checkpoint.reference(prompt, 4)
        assert engine.allocator.usage().num_requests == 0
        assert engine.stats.allocator.num_admits == 2  # this call only


def test_sampling_is_seeded_per_request(
    engine_and_checkpoint: tuple[Engine, TinyCheckpoint],
) -> None:
    engine, _ = engine_and_checkpoint
    prompts = random_prompts([6], seed=11) * 2
    first = [o.token_ids for o in engine.generate(prompts, 6, temperature=1.0, seed=5)]
    again = [o.token_ids for o in engine.generate(prompts, 6, temperature=1.0, seed=5)]
    other = [o.token_ids for o in engine.generate(prompts, 6, temperature=1.0, seed=6)]
    assert first == again
    assert first != other
    assert first[0] != first[1]  # same prompt, own generator each


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs, 0.75)
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)


@pytest.mark.parametrize(
    ("prompts", "max_tokens", "message"),
    [
        ([[]], 4, "at least one token"),
        ([[1, 500]], 4, r"token ids must lie in \[0, 128\)"),
        (["text"], 4, "need a tokenizer"),
        ([[1, 2]], 0, "max_tokens"),
        ([[1.5, 2]], 4, r"list of token ids \(whole numbers\), got \[1.5, 2\]"),
        ([["1", "2"]], 4, "list of token ids"),
        ([[True, 2]], 4, "list of token ids"),
        ([b"ab"], 4, "list of token ids"),
    ],
)
def test_mistakes_raise_value_error(
    engine_and_checkpoint: tuple[Engine, TinyCheckpoint],
    prompts: list[list[int]],
    max_tokens: int,
    message: str,
) -> None:
    engine, _ = engine_and_checkpoint
    with pytest.raises(ValueError, match=message):
        engine.generate(prompts, max_tokens=max_tokens)


def test_bad_settings_raise_value_error(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> None:
    path = tiny_checkpoint("granitemoehybrid").path
    with pytest.raises(ValueError, match="multiple of 2 MiB"):
        EngineConfig(8 * MiB, chunk_bytes=1 * MiB)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(ValueError, match="backing must be one of"):
        EngineConfig(8 * MiB, backing="host")
    with pytest.raises(ValueError, match="device must be cpu, cuda"):
        EngineConfig(8 * MiB, device="tpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        EngineConfig(8 * MiB, backing="cuda_vmm")
    with pytest.raises(ValueError, match="cpu_threads"):
        EngineConfig(8 * MiB, cpu_threads=0)
    with pytest.raises(ValueError, match="is more than this host has"):
        Engine(path, EngineConfig(1 << 50))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Engine(path, EngineConfig(8 * MiB, device="cuda"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_bytes", float("nan")),
        ("memory_bytes", 8 * MiB + 0.5),
        ("block_size", 1.5),
        ("block_size", True),
        ("max_num_seqs", float("inf")),
        ("max_num_batched_tokens", "4"),
        ("max_mixed_graphs", float("nan")),
        ("cpu_threads", 1.5),
        ("host_tier_bytes", float("nan")),
        ("max_model_len", float("nan")),
    ],
)
def test_config_numbers_must_be_whole(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{field} must be a whole number"):
        EngineConfig(**{"memory_bytes": 8 * MiB, field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("memory_bytes", [0, -1, MiB])
def test_config_memory_below_one_chunk_names_memory_bytes(memory_bytes: int) -> None:
    with pytest.raises(ValueError, match=r"memory_bytes \(-?\d+\) must hold at least one chunk"):
        EngineConfig(memory_bytes, chunk_bytes=2 * MiB)


@pytest.mark.parametrize("field", ["overlap", "cuda_graphs", "check_integrity"])
def test_config_flags_must_be_booleans(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be true or false, got 'no'"):
        EngineConfig(**{"memory_bytes": 8 * MiB, field: "no"})  # type: ignore[arg-type]


def test_config_derives_the_memory_and_scheduler_configs_once() -> None:
    config = EngineConfig(8 * MiB, block_size=4, max_num_seqs=3, migration_batch_chunks=1)
    memory = config.memory_config
    assert (memory.budget_bytes, memory.block_size) == (8 * MiB, 4)
    assert memory.migration_batch_chunks == 1
    assert config.scheduler_config.max_num_seqs == 3
    assert config.memory_config is memory  # derived once


def test_checkpoint_tokenizer_turns_text_into_text(
    tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path: Path
) -> None:
    """A tokenizer saved beside the weights is found and used both ways."""
    tokenizers = pytest.importorskip("tokenizers")
    source = tiny_checkpoint("bamba").path
    for file in source.iterdir():
        shutil.copy(file, tmp_path / file.name)
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(tmp_path))
    engine = Engine(tmp_path, EngineConfig(4 * MiB, block_size=4))
    assert engine.tokenizer is not None and engine.tokenizer.eos_token_id == 2
    (output,) = engine.generate(["w5 w17 w99 w3"], max_tokens=5)
    assert output.prompt_token_ids == [8, 20, 102, 6]
    assert output.text == fast.decode(output.token_ids, skip_special_tokens=True)
    assert output.token_ids == tiny_checkpoint("bamba").reference([8, 20, 102, 6], 5)
