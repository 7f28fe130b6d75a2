from __future__ import annotations

import os
from pathlib import Path

import pytest

from avmp.bench import sharegpt
from avmp.bench.workloads import make_workload

LIMIT = 400  # conversations read from the dataset: keeps these tests fast


def test_reads_complete_records_of_the_cut_file() -> None:
    convs = sharegpt.read_conversations(LIMIT)
    assert len(convs.turns) == LIMIT
    assert convs.turns[0][0][0] == "human" and convs.turns[0][0][1]


def test_vllm_rules_filter_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVMP_CACHE_DIR", str(tmp_path))
    prompts, outputs = sharegpt.sample_lengths(50, seed=0, rules="vllm", limit=LIMIT)
    assert len(prompts) == 50
    assert prompts.min() >= 4 and prompts.max() <= 1024 and outputs.min() >= 4
    assert (prompts + outputs).max() <= 2048
    cache_files = list(tmp_path.glob("sharegpt-lengths-*.json"))
    assert len(cache_files) == 1
    # the cached run gives the same lengths without calling the tokenizer
    monkeypatch.setattr(sharegpt, "count_tokens", lambda text: pytest.fail("tokenized again"))
    again = sharegpt.sample_lengths(50, seed=0, rules="vllm", limit=LIMIT)
    assert again[0].tolist() == prompts.tolist() and again[1].tolist() == outputs.tolist()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_token_counts_come_from_the_mistral_tokenizer() -> None:
    assert sharegpt.count_tokens("Hello world") == 2
    assert sharegpt.count_tokens("") == 0


def test_paper_rules() -> None:
    prompts, outputs = sharegpt.sample_lengths(100, seed=1, rules="paper", limit=LIMIT)
    assert prompts.min() >= 16 and prompts.max() <= 4096
    assert outputs.min() >= 32 and outputs.max() <= 2048
    other = sharegpt.sample_lengths(100, seed=2, rules="paper", limit=LIMIT)
    assert other[0].tolist() != prompts.tolist()


def test_too_few_conversations_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="only .* pass the vllm rules"):
        sharegpt.sample_lengths(LIMIT + 1, seed=0, rules="vllm", limit=LIMIT)
    with pytest.raises(ValueError, match="unknown ShareGPT rules"):
        sharegpt.sample_lengths(1, seed=0, rules="nope", limit=LIMIT)


def test_sharegpt_replay_preset_uses_the_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sharegpt.sample_lengths
    monkeypatch.setattr(sharegpt, "sample_lengths",
                        lambda n, seed, rules="paper": real(n, seed, rules, limit=LIMIT))
    reqs = make_workload("sharegpt_replay", 0, num_requests=30)
    assert len(reqs) == 30 and all(16 <= r.prompt_tokens <= 4096 for r in reqs)
