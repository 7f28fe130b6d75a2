from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
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


def test_leading_pairs_stop_at_the_first_break() -> None:
    human, gpt = ("human", "hi"), ("gpt", "hello")
    assert sharegpt.leading_pairs([human, gpt, human, gpt]) == 2
    assert sharegpt.leading_pairs([human, gpt, human]) == 1  # an unanswered message
    assert sharegpt.leading_pairs([human, gpt, human, human, gpt]) == 1
    assert sharegpt.leading_pairs([human, gpt, ("human", " \n"), gpt]) == 1  # empty turn
    assert sharegpt.leading_pairs([human, ("bing", "hey"), human, gpt]) == 0
    assert sharegpt.leading_pairs([gpt, human, gpt]) == 0  # a split piece opening with gpt
    assert sharegpt.leading_pairs([("system", "be brief"), human, gpt]) == 0


def test_conversations_are_cached_with_every_turns_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AVMP_CACHE_DIR", str(tmp_path))
    chosen = sharegpt.sample_conversations(20, np.random.default_rng(5), limit=LIMIT)
    other = sharegpt.sample_conversations(20, np.random.default_rng(6), limit=LIMIT)
    assert other != chosen and all(pairs for pairs in chosen)
    cache = sharegpt.load_length_cache(LIMIT)  # read back from the file
    turns = sharegpt.read_conversations(LIMIT).turns
    assert 20 < len(cache.turn_tokens) <= 40 and len(cache.num_pairs) == LIMIT
    for i, counts in cache.turn_tokens.items():
        assert counts == [sharegpt.count_tokens(text) for _, text in turns[i]]
        assert cache.num_pairs[i] >= 1
    # the cached run gives the same conversations without calling the tokenizer
    monkeypatch.setattr(sharegpt, "count_tokens", lambda text: pytest.fail("tokenized again"))
    assert sharegpt.sample_conversations(20, np.random.default_rng(5), limit=LIMIT) == chosen


@pytest.mark.parametrize("content", ["schema 1", "not json", "schema 2 without turn tokens"])
def test_an_old_or_broken_cache_file_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str
) -> None:
    monkeypatch.setenv("AVMP_CACHE_DIR", str(tmp_path))
    path = tmp_path / f"sharegpt-lengths-{sharegpt._cache_key(LIMIT)}.json"
    old = {
        "schema": 1,
        "key": sharegpt._cache_key(LIMIT),
        "words": [1] * LIMIT,
        "num_turns": [2] * LIMIT,
        "first_is_human": [True] * LIMIT,
        "tokens": {"0": [5, 6]},
    }
    texts = {
        "schema 1": json.dumps(old),
        "not json": '{"schema": 2, ',
        "schema 2 without turn tokens": json.dumps(old | {"schema": 2, "num_pairs": [1] * LIMIT}),
    }
    path.write_text(texts[content])
    cache = sharegpt.load_length_cache(LIMIT)
    convs = sharegpt.read_conversations(LIMIT).turns
    assert cache.num_pairs == [sharegpt.leading_pairs(c) for c in convs]
    assert cache.tokens == {} and cache.turn_tokens == {}
    assert json.loads(path.read_text())["schema"] == sharegpt._CACHE_SCHEMA


def test_too_few_conversations_with_a_pair_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"only \d+ ShareGPT conversations open with a human"):
        sharegpt.sample_conversations(LIMIT, np.random.default_rng(0), limit=LIMIT)
