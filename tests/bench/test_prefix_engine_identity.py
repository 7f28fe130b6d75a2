"""benchmarks/prefix_engine.py's identity report (first differing position, the top-2
logit gap of a fresh prefill there), TTFT split by whether a request could hit, prompts
that do not depend on submission order, and ``--dtype``'s checks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from avmp.sched.request import RequestSpec
from benchmarks import prefix_engine

UNIT = prefix_engine.IDEAL_UNIT_TOKENS


def _request(request_id: int, prompt: list[int], tokens: list[int], at: float) -> dict[str, Any]:
    spec = RequestSpec(request_id, 0.0, len(prompt), max(1, len(tokens)))
    return {"spec": spec, "prompt": prompt, "tokens": tokens, "submitted_s": at}


# -- prompts ----------------------------------------------------------------------------------


def test_a_message_reads_the_same_whatever_order_prompts_are_built_in() -> None:
    a = RequestSpec(0, 0.0, 20, 2, ((("message", 0), 20),))
    b = RequestSpec(1, 0.0, 30, 2, ((("message", 1), 30),))
    forward = prefix_engine.TokenBook([a, b], vocab=1000, seed=3)
    backward = prefix_engine.TokenBook([a, b], vocab=1000, seed=3)
    first = [forward.prompt(a), forward.prompt(b)]
    second = [backward.prompt(b), backward.prompt(a)][::-1]
    assert first == second and first[0] != first[1][:20]
    other_seed = prefix_engine.TokenBook([a, b], vocab=1000, seed=4)
    assert other_seed.prompt(a) != first[0]


def test_a_replay_reads_the_given_answer_but_waits_for_its_own() -> None:
    first = RequestSpec(0, 0.0, 4, 3, (("system", 4),), "answer-0")
    second = RequestSpec(1, 0.0, 9, 2, (("system", 4), ("answer-0", 3), ("user", 2)))
    given = {"answer-0": [10, 11, 12]}
    book = prefix_engine.TokenBook([first, second], vocab=50, seed=0, given=given)
    assert not book.ready(second)
    book.answered(first, [20, 21, 22])  # this run's answer differs from the given one
    assert book.ready(second)
    assert book.prompt(second)[4:7] == [10, 11, 12]


# -- could hit --------------------------------------------------------------------------------


def test_ideal_hits_per_request_in_submission_order() -> None:
    a = list(range(3, 3 + 2 * UNIT))
    requests = [
        _request(0, a, [1] * UNIT, at=0.0),
        _request(1, a + [1] * UNIT + [5], [2], at=1.0),  # a's pages and its answer's page
        _request(2, a[: UNIT - 1] + [9] * UNIT, [2], at=2.0),  # 15 tokens: not one page
        _request(3, a[:UNIT] + [9] * 3, [2], at=0.5),  # submitted before 1, after 0
    ]
    hits = prefix_engine.ideal_hit_tokens(requests)
    assert hits == {0: 0, 3: UNIT, 1: 3 * UNIT, 2: 0}
    assert prefix_engine.reusable_tokens(requests) == 4 * UNIT


def test_ttft_split_by_could_hit() -> None:
    ttfts = [0.010, 0.020, 0.030, 0.040, 0.100]
    could = [True, False, True, False, True]
    hit = prefix_engine.ttft_split(ttfts, could, True)
    rest = prefix_engine.ttft_split(ttfts, could, False)
    assert hit["num_requests"] == 3 and hit["p50_s"] == pytest.approx(0.030)
    assert hit["p99_s"] == pytest.approx(0.030 + 0.98 * 0.070)
    assert rest["num_requests"] == 2 and rest["p50_s"] == pytest.approx(0.030)
    none = prefix_engine.ttft_split(ttfts, [False] * 5, True)
    assert none["num_requests"] == 0 and math.isnan(none["p50_s"])


# -- identity ---------------------------------------------------------------------------------


def test_first_difference() -> None:
    assert prefix_engine.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert prefix_engine.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert prefix_engine.first_difference([1, 2], [1, 2, 3]) == 2  # one ended early
    assert prefix_engine.first_difference([], []) is None


def test_identity_report_names_each_differing_request() -> None:
    off = {"outputs": [[1, 2, 3], [4, 5], [6]], "prompt_crc32": [7, 8, 9]}
    on = {"outputs": [[1, 2, 3], [4, 0], []], "prompt_crc32": [7, 8, 1]}
    report = prefix_engine.identity_report(off, on, request_ids=[10, 11, 12])
    assert report["num_requests"] == 3 and report["num_identical"] == 1
    assert report["num_same_prompt"] == 2
    assert report["differing"] == [
        {"index": 1, "request_id": 11, "position": 1, "off_token": 5, "on_token": 0},
        {"index": 2, "request_id": 12, "position": 0, "off_token": 6, "on_token": None},
    ]


def _smoke_args(*extra: str) -> Any:
    args = prefix_engine.parse_args(["--smoke", *extra])
    args.dtype = prefix_engine.resolved_dtype(args.dtype, args.identity)
    return args


def test_top2_gap_is_the_fresh_prefills_logit_margin() -> None:
    """The gap comes from the logits of the case's last position: the token sampled
    there is their argmax (else the gap would be None), the greedy continuation of a
    generated prefix is that token, and scaling the head scales the gap."""
    from avmp.engine.engine import Engine, RequestOptions

    args = _smoke_args("--identity")
    model = prefix_engine.build(args)
    prompt = list(range(3, 3 + 40))
    engine = Engine(model, prefix_engine.engine_config(args, "avmp", "off"))
    request_id = engine.add_request(prompt, RequestOptions(max_tokens=4, ignore_eos=True))
    output: list[int] = []
    while engine.has_unfinished_requests:
        output += [t for u in engine.step() if u.request_id == request_id for t in u.new_token_ids]
    engine.close()
    cases = [prompt, prompt + output[:2]]
    probes = prefix_engine.top2_gaps(args, model, cases)
    assert [p["fresh_token"] for p in probes] == [output[0], output[2]]
    assert all(p["top2_gap"] is not None and p["top2_gap"] > 0 for p in probes)
    # a new head, twice the old (the embeddings it may be tied to stay as they were)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 2.0)
    doubled = prefix_engine.top2_gaps(args, model, cases)
    for before, after in zip(probes, doubled, strict=True):
        assert after["top2_gap"] == pytest.approx(2 * before["top2_gap"], rel=1e-4)
    assert prefix_engine.top2_gaps(args, model, []) == []


def test_identity_tables_state_the_dtype_and_each_difference() -> None:
    run = {"allocator": "avmp", "workload": "agent_loop", "reusable_tokens": 64,
           "prefix": {"num_hit_tokens": 48}}  # fmt: skip
    results = {
        "model": "m", "device": "d", "dtype": "float32", "memory": "1GiB", "max_num_seqs": 4,
        "max_batched_tokens": 64, "arrival_scale": 1.0, "seed": 0, "policy": "avmp",
        "mode": "identity",
        "runs": [run | {"prefix_cache": "off"}, run | {"prefix_cache": "avmp"}],
        "identity": [{"workload": "agent_loop", "allocator": "avmp", "num_requests": 3,
                      "num_identical": 1, "num_same_prompt": 3, "differing": [
                          {"request_id": 4, "position": 7, "top2_gap": 0.00012},
                          {"request_id": 9, "position": 0, "top2_gap": None}]}],
    }  # fmt: skip
    text = prefix_engine.markdown(results)
    assert "on d, float32 weights" in text
    assert "**agent_loop** (3 requests, float32)" in text
    assert "| avmp | 1 of 3 | 3 | 75.0% | 4: 7 (gap 0.00012); 9: 0 (gap not measured) |" in text


def test_split_table_from_the_runs() -> None:
    def run(prefix: str, hit_p50: float, rest_p50: float) -> dict[str, Any]:
        return {"allocator": "avmp", "prefix_cache": prefix,
                "ttft_could_hit": {"num_requests": 3, "p50_s": hit_p50, "p99_s": hit_p50},
                "ttft_rest": {"num_requests": 5, "p50_s": rest_p50, "p99_s": math.nan}}  # fmt: skip

    lines = prefix_engine._split_table([run("off", 0.030, 0.012), run("avmp", 0.010, 0.012)])
    assert lines[-1] == (
        "| avmp | 3, 3 | 30.0 / 10.0 ms (3.00x) | 30.0 / 10.0 ms (3.00x) | 5, 5 | "
        "12.0 / 12.0 ms (1.00x) | - |"
    )
    older = [{k: v for k, v in r.items() if not k.startswith("ttft_")} for r in
             (run("off", 1, 1), run("avmp", 1, 1))]  # fmt: skip
    assert prefix_engine._split_table(older) == []


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "fp32", ""])
def test_bad_dtype_is_one_line_and_exit_2(dtype: str, capsys) -> None:
    assert prefix_engine.main(["--smoke", "--dtype", dtype]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err.count("\n") == 1 and "--dtype must be one of bfloat16, float32" in captured.err
    )


def test_dtype_defaults() -> None:
    assert prefix_engine.resolved_dtype(None, identity=False) is None  # the model's own
    assert prefix_engine.resolved_dtype(None, identity=True) == "float32"
    assert prefix_engine.resolved_dtype("bfloat16", identity=True) == "bfloat16"


@pytest.mark.slow
def test_identity_smoke_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "identity.json"
    argv = ["--smoke", "--identity", "--workloads", "agent_loop", "--allocators", "avmp",
            "unified", "--out", str(out)]  # fmt: skip
    assert prefix_engine.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["mode"] == "identity" and result["dtype"] == "float32"
    assert [(r["allocator"], r["num_identical"], r["num_same_prompt"]) for r in
            result["identity"]] == [("avmp", 5, 5), ("unified", 5, 5)]  # fmt: skip
    cached = [r for r in result["runs"] if r["prefix_cache"] != "off"]
    assert all(r["prefix"]["num_hit_tokens"] > 0 for r in cached)
    assert "float32 weights" in printed and "| avmp | 5 of 5 | 5 |" in printed
