"""The simulator with prefix caching: hits skip prefill work, the result reports hits
against the ideal, and with the cache off nothing changes."""

from __future__ import annotations

import dataclasses

import pytest

from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig
from avmp.models.zoo import resolve_model
from avmp.sched.request import RequestSpec
from avmp.sim.simulator import SimConfig, SimResult, simulate
from sched_helpers import MIB, tiny_geometry


def _conversations(num: int, turns: int) -> list[RequestSpec]:
    """``num`` conversations behind one system prompt, a turn every 2 s."""
    specs = []
    for conversation in range(num):
        history: list[tuple[object, int]] = [("system", 800)]
        for turn in range(turns):
            history.append((("user", conversation, turn), 40))
            output = ("answer", conversation, turn)
            specs.append(RequestSpec(len(specs), 2.0 * turn + 0.1 * conversation,
                                     sum(n for _, n in history), 24, tuple(history), output))
            history.append((output, 24))
    return specs


def _run(specs: list[RequestSpec], prefix_cache: str, layout: str = "avmp",
         budget_mib: int = 64, model: str | None = None) -> SimResult:  # fmt: skip
    geometry = resolve_model(model) if model else tiny_geometry()
    allocator = make_allocator(layout, geometry, MemoryConfig(budget_mib * MIB))
    config = SimConfig(allocator_calls_path=None, check_integrity=True, prefix_cache=prefix_cache)
    return simulate(specs, allocator, geometry, config)


def test_off_reports_nothing_and_keeps_the_result_as_before() -> None:
    specs = _conversations(3, 3)
    result = _run(specs, "off")
    assert result.prefix == {} and "prefix" not in result.to_dict()
    plain = [RequestSpec(s.request_id, s.arrival_s, s.prompt_tokens, s.output_tokens)
             for s in specs]  # fmt: skip
    assert _run(plain, "off").deterministic_dict() == result.deterministic_dict()


@pytest.mark.parametrize("layout", ["avmp", "static", "unified", "oracle"])
def test_hits_skip_prefill_and_lower_ttft(layout: str) -> None:
    """On an 8B hybrid, whose prefill costs what a hit saves (the tiny test model's
    steps cost their weight reads, whatever they compute)."""
    specs = _conversations(4, 4)
    off = _run(specs, "off", layout, 4096, "nemotron-h-8b")
    on = _run(specs, "avmp", layout, 4096, "nemotron-h-8b")
    assert on.num_completed == off.num_completed == len(specs)
    report = on.prefix
    assert report["num_hit_tokens"] > 0
    assert 0 < report["hit_rate_vs_ideal"] <= 1
    assert report["num_checkpoints_taken"] > 0 and report["peak_checkpoint_bytes"] > 0
    assert on.phase_s["compute"] < off.phase_s["compute"]
    assert on.ttft_p50_s < off.ttft_p50_s


def test_the_policies_share_one_ideal_and_trade_hits_for_checkpoint_bytes() -> None:
    """Marconi's placement reaches most of the ideal with fewer checkpoint bytes than
    SGLang's grid, and more hits than vLLM's aligned states."""
    specs = _conversations(4, 4)
    reports = {p: _run(specs, p).prefix for p in ("avmp", "vllm-align", "sglang")}
    assert len({r["num_ideal_tokens"] for r in reports.values()}) == 1  # the trace's alone
    avmp, align, sglang = reports["avmp"], reports["vllm-align"], reports["sglang"]
    assert avmp["hit_rate_vs_ideal"] >= 0.9
    assert avmp["num_hit_tokens"] > align["num_hit_tokens"]
    assert avmp["peak_checkpoint_bytes"] < sglang["peak_checkpoint_bytes"]


def test_unknown_prefix_cache_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown prefix cache 'lru'; known: off, avmp"):
        SimConfig(prefix_cache="lru")
    with pytest.raises(ValueError, match="unknown prefix eviction"):
        SimConfig(prefix_eviction="random")


@pytest.mark.parametrize("layout", ["avmp", "unified", "oracle"])
def test_models_with_one_kind_of_cache(layout: str) -> None:
    """Without attention a hit is a checkpoint alone; without recurrent layers it needs
    no checkpoint, and none is taken."""
    specs = _conversations(3, 3)
    recurrent_only = resolve_model("mamba2-2.7b")
    attention_only = dataclasses.replace(tiny_geometry(), recurrent_layers=(), name="attn")
    for geometry, checkpoints in ((recurrent_only, True), (attention_only, False)):
        allocator = make_allocator(layout, geometry, MemoryConfig(1 << 32))
        config = SimConfig(allocator_calls_path=None, check_integrity=True, prefix_cache="avmp")
        report = simulate(specs, allocator, geometry, config).prefix
        assert report["num_hit_tokens"] > 0
        assert (report["num_checkpoints_taken"] > 0) == checkpoints


def test_the_report_counts_avmp_rules_and_replay_prints_them() -> None:
    """Conversations behind a system prompt: `avmp`'s report says how many checkpoints
    each placement rule took and how many requests resumed from them (the answers' ends
    are what the next turns resume from); the peers' policies have no rules to report."""
    from avmp.cli.replay import prefix_summary

    specs = _conversations(4, 3)
    report = _run(specs, "avmp").prefix
    rules = report["rules"]
    assert rules["output"]["taken"] >= 8 and rules["output"]["reused"] >= 8
    assert sum(r["reused"] for r in rules.values()) <= report["num_hits"]
    assert report["demoted"] == [] and report["promoted"] == []
    line = prefix_summary([{"allocator": "avmp", "prefix": report}])
    assert "; rules (checkpoints taken/resumed from): output " in line
    assert "rules" not in _run(specs, "sglang").prefix
