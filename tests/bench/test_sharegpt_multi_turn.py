"""`sharegpt_multi_turn`: ShareGPT conversations replayed turn by turn, each prompt the
whole history, in the dataset's own token counts."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from avmp.bench import sharegpt, workloads
from avmp.bench.workloads import make_prefix_workload, sharegpt_multi_turn_requests
from avmp.sched.request import RequestSpec

LIMIT = 400  # conversations read from the dataset: keeps these tests fast


def _trace(seed: int, n: int = 48) -> list[RequestSpec]:
    return sharegpt_multi_turn_requests(np.random.default_rng(seed), n, limit=LIMIT)


def _by_session(requests: list[RequestSpec]) -> dict[int, list[RequestSpec]]:
    """Each conversation's requests in turn order (the last segment names the turn)."""
    sessions = defaultdict(list)
    for request in requests:
        _, session, turn = request.segments[-1][0]
        sessions[session].append((turn, request))
    return {s: [r for _, r in sorted(turns)] for s, turns in sessions.items()}


def test_the_seed_decides_the_trace() -> None:
    trace = _trace(0)
    assert trace == _trace(0) and trace != _trace(1)
    assert [r.request_id for r in trace] == list(range(48))
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)


def test_each_turn_is_the_previous_turn_its_answer_and_a_message() -> None:
    sessions = _by_session(_trace(2, n=96))
    assert sum(len(turns) > 1 for turns in sessions.values()) >= 5
    for session, turns in sessions.items():
        assert [r.segments[-1][0] for r in turns] == [
            ("message", session, k) for k in range(len(turns))
        ]  # the conversation's first turns, none skipped
        for previous, request in zip(turns, turns[1:], strict=False):
            assert request.segments[:-1] == (
                *previous.segments,
                (previous.output_segment, previous.output_tokens),
            )
            assert request.arrival_s > previous.arrival_s
        for request in turns:
            assert sum(length for _, length in request.segments) == request.prompt_tokens


def test_lengths_are_the_dataset_texts_token_counts() -> None:
    """Session k is the k-th conversation of the seed's shuffle with a human/gpt pair;
    its messages and answers are the Tekken token counts of its turns' text."""
    texts = sharegpt.read_conversations(LIMIT).turns
    order = np.random.default_rng(3).permutation(LIMIT)
    conversations = [texts[i] for i in order if sharegpt.leading_pairs(texts[i])]
    sessions = _by_session(_trace(3, n=24))
    assert len(sessions) >= 10
    for session, turns in sessions.items():
        conversation = conversations[session]
        for k, request in enumerate(turns):
            (human, message), (gpt, answer) = conversation[2 * k], conversation[2 * k + 1]
            assert (human, gpt) == ("human", "gpt")
            assert request.segments[-1][1] == sharegpt.count_tokens(message)
            assert request.output_tokens == min(2048, sharegpt.count_tokens(answer))


def test_a_history_past_the_cap_shares_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workloads, "MAX_PROMPT_TOKENS", 1000)
    requests = _trace(4, n=96)
    capped = [r for r in requests if r.segments[0][0][0] == "capped"]
    assert capped and all(r.segments == ((r.segments[0][0], 1000),) for r in capped)
    assert all(r.prompt_tokens <= 1000 for r in requests)
    firsts = [r.segments[0][0] for r in requests]
    assert all(firsts.count(r.segments[0][0]) == 1 for r in capped)  # nobody resumes it
    for turns in _by_session(requests).values():  # once capped, always capped
        kinds = [r.segments[0][0][0] for r in turns]
        assert kinds == sorted(kinds, key=lambda kind: kind == "capped")


def test_the_preset_is_registered_and_bad_names_stay_one_line() -> None:
    assert workloads.PREFIX_PRESETS["sharegpt_multi_turn"][0] == 1024
    with pytest.raises(ValueError, match="sharegpt_multi_turn") as error:
        make_prefix_workload("sharegpt_multiturn", seed=0)
    assert "\n" not in str(error.value) and str(error.value).startswith("unknown prefix")
