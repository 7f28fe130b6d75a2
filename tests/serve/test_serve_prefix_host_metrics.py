"""``avmp serve`` with the prefix cache's host level: ``/metrics`` reports the
checkpoints kept in the host tier, their bytes, the hits served from there, the copies
each way and the host's evictions, and they agree with the engine's own counts; the
answers equal those of an engine without a cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from serve_helpers import MAX_MODEL_LEN, MODEL_NAME, VOCAB, WORDS, make_app, serving, word_tokenizer
from test_serve_prefix_metrics import _samples

from avmp.sched.swap import PreemptionCosts

pytest.importorskip("openai")
pytest.importorskip("fastapi")
transformers = pytest.importorskip("transformers")

MiB = 1 << 20
MAX_TOKENS = 10
# priced as a slow device (10 us a prompt token, a 1 GB/s host link): a hit on this tiny
# model then saves more than a checkpoint's copy costs, so the host level keeps them
SLOW_DEVICE = PreemptionCosts(prefill_s_per_token=1e-5, host_bytes_per_s=1e9)


@pytest.fixture(scope="module")
def heavy_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Granite-4.0-H-style model whose state slot (two Mamba2 layers of 8 heads x
    64 x 64) is large beside 4 MiB of cache, so that checkpoints are evicted; the serve
    tests' word-level tokenizer."""
    import torch

    config = transformers.GraniteMoeHybridConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=64, shared_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, num_local_experts=0,
        layer_types=["mamba", "attention", "attention", "mamba"], mamba_n_heads=8,
        mamba_d_head=64, mamba_d_state=64, mamba_n_groups=1, mamba_chunk_size=32,
        position_embedding_type="rope", max_position_embeddings=MAX_MODEL_LEN,
        initializer_range=0.1, eos_token_id=None,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("heavy-state")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(str(path))
    word_tokenizer(chat_template=False).save_pretrained(str(path))
    return path


def _engine(path: Path, **overrides: Any) -> Any:
    from avmp.engine.engine import Engine, EngineConfig

    settings: dict[str, Any] = dict(
        memory_bytes=4 * MiB, device="cpu", block_size=16, max_num_seqs=8,
        max_num_batched_tokens=64, admission="greedy", preemption="swap",
        preemption_costs=SLOW_DEVICE, max_model_len=MAX_MODEL_LEN,
    )  # fmt: skip
    engine = Engine(path, EngineConfig(**{**settings, **overrides}))
    engine.warmup()
    return engine


def _text(seed: int, lengths: list[int]) -> list[str]:
    """Prompts of the given numbers of words (none of the special tokens)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[7:]) for _ in range(n)) for n in lengths]


def _conversations(ask: Any, num_turns: int = 3) -> list[list[str]]:
    """Six conversations turn by turn, each turn's prompt the whole history; the
    answers of each turn."""
    prompts = _text(3, [40, 70, 20, 90, 33, 50])
    answers_by_turn = []
    for turn in range(num_turns):
        answers = [ask(prompt) for prompt in prompts]
        answers_by_turn.append(answers)
        users = _text(10 + turn, [15, 13, 18, 9, 20, 14])
        prompts = [f"{p} {a} {u}" for p, a, u in zip(prompts, answers, users, strict=True)]
    return answers_by_turn


def test_host_level_metrics_after_hits_from_the_host(heavy_state: Path) -> None:
    reference = _engine(heavy_state)

    def ask_reference(prompt: str) -> str:
        (output,) = reference.generate([prompt], max_tokens=MAX_TOKENS)
        return output.text

    expected = _conversations(ask_reference)
    engine = _engine(heavy_state, prefix_cache="avmp", prefix_host_level=True)
    prefix = engine.scheduler.prefix
    assert prefix is not None and prefix.tree.host is not None
    slot_bytes = engine.allocator.cache_format().slot.unit_bytes
    with serving(make_app(engine)) as server, server.client() as http:
        before = _samples(http.get("/metrics").text)
        client = server.openai()

        def ask(prompt: str) -> str:  # one request at a time, each bounded
            answer = client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            return answer.choices[0].text

        answers = _conversations(ask)
        values = _samples(http.get("/metrics").text)
    assert answers == expected

    def value(name: str, **labels: str) -> float:
        return values[(name, tuple(sorted(labels.items())))]

    assert before[("avmp_prefix_cache_host_checkpoints", ())] == 0
    assert before[("avmp_prefix_cache_host_copies_total", (("direction", "out"),))] == 0
    host = prefix.tree.host.stats
    assert host.num_kept > 0 and host.num_restored > 0  # the level was used both ways
    stored = value("avmp_prefix_cache_host_copies_total", direction="out")
    hits = value("avmp_prefix_cache_host_hits_total")
    assert stored == host.num_kept and hits == host.num_restored
    assert value("avmp_prefix_cache_host_copies_total", direction="in") == hits
    assert value("avmp_prefix_cache_host_copied_bytes_total", direction="out") == (
        stored * slot_bytes
    )
    assert value("avmp_prefix_cache_host_copied_bytes_total", direction="in") == hits * slot_bytes
    assert value("avmp_prefix_cache_host_hit_tokens_total") == host.num_hit_tokens > 0
    # a host hit is a hit: its tokens are among the cache's hit tokens
    assert value("avmp_prefix_cache_hit_tokens_total") >= host.num_hit_tokens
    held = value("avmp_prefix_cache_host_checkpoints")
    assert held == len(prefix.tree.host.nodes)
    assert value("avmp_prefix_cache_host_checkpoint_bytes") == held * slot_bytes
    assert value("avmp_prefix_cache_host_evictions_total") == host.num_dropped
    assert stored - value("avmp_prefix_cache_host_evictions_total") == held
    # checkpoints reach the host only by device evictions
    assert value("avmp_prefix_cache_evictions_total", unit="checkpoint") >= stored


def test_host_level_metrics_are_zeros_without_it(heavy_state: Path) -> None:
    engine = _engine(heavy_state, prefix_cache="avmp")
    with serving(make_app(engine)) as server, server.client() as http:
        body = {"model": MODEL_NAME, "prompt": _text(1, [20])[0], "max_tokens": 2}
        assert http.post("/v1/completions", json=body).status_code == 200
        values = _samples(http.get("/metrics").text)
    for name in ("avmp_prefix_cache_host_checkpoints", "avmp_prefix_cache_host_hits_total",
                 "avmp_prefix_cache_host_evictions_total"):  # fmt: skip
        assert values[(name, ())] == 0
