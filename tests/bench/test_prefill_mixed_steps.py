"""benchmarks.prefill's mixed steps, compared step for step: the chunk a mixed step gives
the prompt, the context before each chunk, each mixed step against its decode part plus
the alone step of the same chunk (ratios, their largest and token-weighted figures, and
the mismatches that keep a step out), a whole mixed cell on the CPU through the engine's
real scheduler, and the markdown of the new and the old result shapes."""

from __future__ import annotations

import copy
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from avmp.engine.engine import Engine, EngineConfig  # noqa: E402
from avmp.engine.fast_runner import FastModelRunner  # noqa: E402
from avmp.engine.profile import StepRecord  # noqa: E402
from avmp.engine.tiny import tiny_model  # noqa: E402
from avmp.models.zoo import zoo_config  # noqa: E402
from benchmarks import prefill  # noqa: E402
from benchmarks.common import RESULTS_DIR, read_result  # noqa: E402


def record(prefill_tokens: int, decodes: int, seconds: float, **flags: Any) -> StepRecord:
    return StepRecord(prefill_tokens, decodes, 0, 0, decodes + (prefill_tokens > 0), 0.0,
                      seconds, flags.get("graph", True), flags.get("captured", False))  # fmt: skip


def chunk(tokens: int, context: int, seconds: float, decodes: int = 0, **flags: Any):
    return {"prefill_tokens": tokens, "context_tokens": context, "decodes": decodes,
            "seconds": seconds, "graph": flags.get("graph", True),
            "captured": flags.get("captured", False)}  # fmt: skip


def test_a_mixed_step_gives_the_prompt_what_the_decodes_leave() -> None:
    assert prefill.alone_step_tokens(8192, 64) == 8128
    assert prefill.alone_step_tokens(65, 64) == 1
    with pytest.raises(ValueError, match="no room for a prompt beside 64 decodes"):
        prefill.alone_step_tokens(64, 64)


def test_each_chunk_carries_the_context_its_prompt_had_before_it() -> None:
    steps = [record(8128, 64, 0.1), record(0, 64, 0.01), record(8128, 64, 0.2),
             record(128, 64, 0.02, captured=True), record(0, 64, 0.01)]  # fmt: skip
    chunks = prefill.prompt_chunks(steps)
    assert [(c["context_tokens"], c["prefill_tokens"]) for c in chunks] == [
        (0, 8128), (8128, 8128), (16256, 128),
    ]  # fmt: skip
    assert [c["seconds"] for c in chunks] == [0.1, 0.2, 0.02]
    assert [c["captured"] for c in chunks] == [False, False, True]
    assert all(c["decodes"] == 64 for c in chunks)


def test_each_mixed_step_is_priced_against_the_alone_step_of_its_chunk() -> None:
    """Per step: mixed / (decode + the same chunk alone); the largest ratio and the
    ratios weighted by prompt tokens (here a big step at 1.1x and a small one at 2.0x:
    the median-of-two-steps comparison would have mixed them)."""
    alone = [chunk(8128, 0, 0.100), chunk(8128, 8128, 0.110), chunk(128, 16256, 0.004)]
    mixed = [chunk(8128, 0, 0.121, 64), chunk(8128, 8128, 0.132, 64),
             chunk(128, 16256, 0.024, 64, graph=False)]  # fmt: skip
    result = prefill.compare_steps(mixed, alone, 0.010, 64)
    assert result["mismatches"] == []
    assert result["mixed_chunks"] == result["alone_chunks"] == [[0, 8128], [8128, 8128],
                                                                [16256, 128]]  # fmt: skip
    ratios = [r["ratio"] for r in result["steps"]]
    assert ratios == pytest.approx([0.121 / 0.110, 0.132 / 0.120, 0.024 / 0.014])
    assert result["steps"][1]["prefill_part_s"] == 0.110
    assert result["steps"][1]["decode_part_s"] == 0.010
    assert result["steps"][2]["graph"] is False
    assert result["max_ratio"] == pytest.approx(0.024 / 0.014)
    weighted = (8128 * 1.1 + 8128 * 1.1 + 128 * 0.024 / 0.014) / (8128 + 8128 + 128)
    assert result["token_weighted_ratio"] == pytest.approx(weighted)
    assert not any(key in result for key in ("mixed_step_s", "ratio_to_parts"))


def test_steps_without_a_true_twin_are_listed_and_left_out() -> None:
    """A chunk the alone run cut differently, a step with fewer decodes and a step whose
    twin captured a graph: each named, none in the ratios."""
    alone = [chunk(8192, 0, 0.1), chunk(8192, 8192, 0.1, captured=True), chunk(100, 16384, 0.01)]
    mixed = [chunk(8128, 0, 0.2, 64), chunk(8192, 8192, 0.2, 64), chunk(100, 16384, 0.02, 63)]
    result = prefill.compare_steps(mixed, alone, 0.01, 64)
    assert result["steps"] == []
    assert result["max_ratio"] is None and result["token_weighted_ratio"] is None
    text = "\n".join(result["mismatches"])
    assert "chunks (context, tokens) differ" in text
    assert "8128 prompt tokens after 0: no alone step of that chunk" in text
    assert "8192 prompt tokens after 8192: a graph capture is in its time" in text
    assert "100 prompt tokens after 16384: 63 decodes, not 64" in text


def cpu_engine(model: Any, memory_bytes: int, step: int, max_seqs: int) -> Engine:
    """An engine on the CPU whose runner records steps as the GPU's fast runner does
    (the reference kernels, no graphs)."""
    config = EngineConfig(memory_bytes, device="cpu", kernels="reference",
                          max_num_seqs=max_seqs, max_num_batched_tokens=step)  # fmt: skip
    engine = Engine(model, config)
    engine.runner = FastModelRunner(model, engine.views, engine.config.block_size,
                                    engine.device, cuda_graphs=False,
                                    max_num_batched_tokens=step)  # fmt: skip
    return engine


def test_a_mixed_cell_through_the_real_scheduler_matches_every_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four requests decode while a 130-token prompt arrives under 64-token steps: the
    scheduler gives it 60 tokens a step, the alone run at 60 tokens a step cuts the same
    chunks at the same contexts, and every mixed step gets its ratio."""
    model = tiny_model(zoo_config("granite-4.0-h-tiny"), seed=0)
    for name, value in (("MIXED_STEP_TOKENS", 64), ("MIXED_PROMPT_TOKENS", 130),
                        ("MIXED_SHORT_TOKENS", 20), ("MIXED_DECODE_LIMIT", 12)):  # fmt: skip
        monkeypatch.setattr(prefill, name, value)
    monkeypatch.setattr(prefill, "engine_for", cpu_engine)
    probe = cpu_engine(model, 8 << 20, 64, 1)
    cell = prefill.mixed_cell(model, probe.geometry, 4)
    assert cell["alone_step_tokens"] == 60
    assert cell["mixed_chunks"] == cell["alone_chunks"] == [[0, 60], [60, 60], [120, 10]]
    assert cell["mismatches"] == []
    assert [r["prefill_tokens"] for r in cell["steps"]] == [60, 60, 10]
    assert cell["num_decode_steps"] > 0 and cell["decode_alone_s"] > 0
    for r in cell["steps"]:
        assert r["ratio"] == pytest.approx(r["step_s"] / (r["decode_part_s"] + r["prefill_part_s"]))
    text = "\n".join(prefill.mixed_markdown([("tiny", cell)]))
    assert text.count("| tiny | 4 |") == 3
    assert "| tiny | 130, 64 (60) | 3 |" in text


CAPTURED = "mixed step of 8128 prompt tokens after 8128: a graph capture is in its time"


def new_result() -> dict[str, Any]:
    """The committed tuned run with its mixed cells in the new shape (figures made up)."""
    result = read_result(RESULTS_DIR / "prefill_tuned_h200.json.gz")
    steps = [
        {"prefill_tokens": 8128, "context_tokens": 0, "step_s": 0.125, "decode_part_s": 0.008,
         "prefill_part_s": 0.1, "ratio": 0.125 / 0.108, "graph": True, "prefill_part_graph": True},
        {"prefill_tokens": 128, "context_tokens": 16256, "step_s": 0.02, "decode_part_s": 0.008,
         "prefill_part_s": 0.004, "ratio": 0.02 / 0.012, "graph": True,
         "prefill_part_graph": False},
    ]  # fmt: skip
    for model in result["models"]:
        model["mixed"] = {
            "decodes": 64, "prompt_tokens": 16384, "step_tokens": 8192,
            "alone_step_tokens": 8128, "decode_alone_s": 0.008, "num_decode_steps": 50,
            "mixed_chunks": [[0, 8128], [8128, 8128], [16256, 128]],
            "alone_chunks": [[0, 8128], [8128, 8128], [16256, 128]], "steps": steps,
            "max_ratio": 0.02 / 0.012, "token_weighted_ratio": 1.2,
            "mismatches": [CAPTURED],
        }  # fmt: skip
    return result


def test_markdown_lists_every_mixed_step_and_the_summary() -> None:
    text = prefill.markdown(new_result())
    assert (
        "| granite-4.0-h-micro | 64 | 8,128 | 0 | 125.00 | 8.00 | 100.00 | 1.16x | True / True |"
        in text
    )
    assert (
        "| nemotron-h-8b | 64 | 128 | 16,256 | 20.00 | 8.00 | 4.00 | 1.67x | True / False |" in text
    )
    assert "| granite-4.0-h-micro | 16,384, 8,192 (8,128) | 2 | 1.67x | 1.20x |" in text
    assert f"- nemotron-h-8b: {CAPTURED}" in text
    assert "prefill chunk tokens" not in text  # the old table is not printed


def test_old_results_render_their_median_table() -> None:
    """A file from before the step-for-step pairs prints the old table, as the docs hold
    it; a file holding both shapes prints both."""
    old = read_result(RESULTS_DIR / "prefill_tuned_h200.json.gz")
    text = prefill.markdown(old)
    assert "| granite-4.0-h-micro | 64 | 7.91 | 4,174 | 79.97 | 1.30x | True |" in text
    assert "context before" not in text
    both = new_result()
    both["models"][1] = copy.deepcopy(old["models"][1])
    text = prefill.markdown(both)
    assert "| nemotron-h-8b | 64 | 11.03 | 4,174 | 138.05 | 1.15x | True |" in text
    assert "| granite-4.0-h-micro | 16,384, 8,192 (8,128) | 2 | 1.67x | 1.20x |" in text


def test_a_mixed_cell_without_decode_steps_says_so() -> None:
    text = prefill.markdown({**new_result(), "models": [{
        "model": "m", "weight_bytes": 1, "cells": [],
        "mixed": {"decodes": 64, "prompt_tokens": 16384, "step_tokens": 8192,
                  "alone_step_tokens": 8128, "steps": [],
                  "error": "no decode-only step of the whole batch was recorded"},
    }]})  # fmt: skip
    assert (
        "| m | 16,384, 8,192 (8,128) | no decode-only step of the whole batch was recorded |"
        in text
    )
