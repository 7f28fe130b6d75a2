"""``avmp serve`` with the prefix cache on: answers equal those of an engine without it,
and ``/metrics`` reports the prefix cache (tokens queried and hit, checkpoints taken and
held, their bytes, evictions)."""

from __future__ import annotations

import pytest
from serve_helpers import MODEL_NAME, make_app, make_engine, serving

pytest.importorskip("openai")
pytest.importorskip("fastapi")

MAX_TOKENS = 6
SYSTEM = " ".join(f"w{(5 * i) % 100}" for i in range(48))  # 48 tokens: 3 pages of 16
PROMPTS = [f"{SYSTEM} w{i} w{i + 1} w{i + 2}" for i in range(1, 6)]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_prefix_cache_metrics_and_answers(checkpoints) -> None:
    reference = make_engine(checkpoints["plain"]).generate(PROMPTS, max_tokens=MAX_TOKENS)
    engine = make_engine(checkpoints["plain"], prefix_cache="avmp")
    slot_bytes = engine.allocator.cache_format().slot.unit_bytes
    with serving(make_app(engine)) as server, server.client() as http:
        before = _samples(http.get("/metrics").text)
        client = server.openai()
        texts = [  # one at a time: each finds what the ones before left
            client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            .choices[0]
            .text
            for prompt in PROMPTS
        ]
        values = _samples(http.get("/metrics").text)
    assert texts == [output.text for output in reference]

    def value(name: str, **labels: str) -> float:
        return values[(name, tuple(sorted(labels.items())))]

    # the warm-up left nothing in the cache and counts nothing
    assert before[("avmp_prefix_cache_queried_tokens_total", ())] == 0
    assert before[("avmp_prefix_cache_checkpoints", ())] == 0
    queried = value("avmp_prefix_cache_queried_tokens_total")
    assert queried == engine.totals.num_prompt_tokens == 51 * len(PROMPTS)
    # the first request's checkpoint at its stream's last whole page (51 + 6 - 1 tokens:
    # 48) lies in the shared part: the four after it resume from there
    assert value("avmp_prefix_cache_hit_tokens_total") == 48 * 4
    held = value("avmp_prefix_cache_checkpoints")
    assert held >= 1 and value("avmp_prefix_cache_checkpoint_bytes") == held * slot_bytes
    assert value("avmp_prefix_cache_checkpoints_taken_total") >= held
    assert value("avmp_prefix_cache_pages") >= 3
    assert value("avmp_prefix_cache_evictions_total", unit="page") == 0
    assert value("avmp_prefix_cache_evictions_total", unit="checkpoint") == 0


def test_metrics_report_zeros_without_the_cache(checkpoints) -> None:
    engine = make_engine(checkpoints["plain"])
    with serving(make_app(engine)) as server, server.client() as http:
        body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 2}
        http.post("/v1/completions", json=body)
        values = _samples(http.get("/metrics").text)
    assert values[("avmp_prefix_cache_queried_tokens_total", ())] == 0
    assert values[("avmp_prefix_cache_hit_tokens_total", ())] == 0
    assert values[("avmp_prefix_cache_checkpoint_bytes", ())] == 0
