"""Where a hit resumes, and when its first token comes, on a layout whose KV unit is
vLLM's hybrid block (unified: 48 tokens for this tiny Granite, 528 for
Granite-4.0-H-Micro) against AVMP's 16-token pages; and the engine benchmark's count of
the CUDA graphs a timed run captures and of the requests that waited through one.

Why TTFT with the cache is higher on the unified layout (docs/design-prefix.md, The
engine): a hit resumes only at a unit boundary (a checkpoint is a unit's state), so it
recomputes up to a unit less one token of the stream before it; and the ``avmp``
policy's output-end checkpoint sits at the stream's last whole unit, which with units
longer than an answer lies inside the prompt: the prefill ends a step there (a slot
holds the state at a step's end only), one step more before the first token. Both are
the layout's, pinned here; neither costs 100 ms on an H200 (one step is about 10)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from engine_helpers import MiB, TinyCheckpoint, random_prompts

from avmp.engine.engine import Engine, EngineConfig, RequestOptions
from avmp.sched.request import RequestSpec
from benchmarks import prefix_engine

OUT = 6  # tokens per answer: shorter than any unit here, as an agent's action is than 528


def _turn(engine: Engine, prompt: list[int]) -> tuple[list[int], int, int]:
    """Run one request alone (no overlap: a token is read in the step that samples it).
    Returns its tokens, the steps up to its first token, and the prompt tokens it hit."""
    hits_before = engine.totals.prefix.num_hit_tokens
    engine.add_request(prompt, RequestOptions(max_tokens=OUT, ignore_eos=True))
    tokens: list[int] = []
    steps, first = 0, 0
    while engine.has_unfinished_requests:
        updates = engine.step()
        steps += 1
        for update in updates:
            if update.new_token_ids and not first:
                first = steps
            tokens += update.new_token_ids
    return tokens, first, engine.totals.prefix.num_hit_tokens - hits_before


@pytest.mark.parametrize("allocator", ["avmp", "unified"])
def test_a_hit_resumes_at_a_unit_and_waits_a_step_for_the_streams_last_unit(
    tiny_checkpoint: Callable[..., TinyCheckpoint], allocator: str
) -> None:
    config = EngineConfig(
        memory_bytes=16 * MiB, allocator=allocator, prefix_cache="avmp", max_num_seqs=4,
        max_num_batched_tokens=256, overlap=False, check_integrity=True,
    )  # fmt: skip
    engine = Engine(tiny_checkpoint("granitemoehybrid").path, config)
    unit = engine.allocator.kv_unit_tokens
    assert unit == (16 if allocator == "avmp" else 48)  # vLLM's block for this model
    first = random_prompts([2 * unit + 5], seed=1)[0]
    answer, first_steps, hit = _turn(engine, first)
    assert hit == 0 and len(answer) == OUT
    # the stream's last whole unit lies inside the first prompt (the answer is shorter
    # than a unit): its prefill ends a step there for the output end's checkpoint
    stream_end = (len(first) + OUT - 1) // unit * unit
    assert stream_end < len(first) and first_steps == 2

    second = first + answer + random_prompts([unit + 3], seed=2)[0]
    answer, second_steps, hit = _turn(engine, second)
    # resumed at that unit, not at the answer's last whole 16-token page
    assert hit == stream_end == 2 * unit
    cut = (len(second) + OUT - 1) // unit * unit
    assert second_steps == (2 if hit < cut < len(second) else 1)
    if allocator == "unified":  # as 16 of the 38 hits of agent_loop on Granite-Micro's blocks
        assert hit < cut < len(second) and second_steps == 2
    else:  # 16-token pages: the answer's end is past the prompt, no extra step
        assert cut >= len(second) and second_steps == 1

    third = second + answer + random_prompts([5], seed=3)[0]
    _, _, hit = _turn(engine, third)
    assert hit == cut  # the checkpoint that cost the step serves the next turn
    engine.close()


# -- the benchmark's graph-capture accounting ----------------------------------------------


class _CapturingEngine:
    """Stands in for `Engine` in `prefix_engine.drive`: every request answers one token a
    step from the step after it is added (request i's first token in step i + 1), and
    the runner captures a graph in the steps listed."""

    def __init__(self, capture_steps: set[int], num_tokens: int) -> None:
        self.geometry = SimpleNamespace(vocab_size=100)
        self.runner = SimpleNamespace(graphs={}, mixed_graphs={})
        self.capture_steps = capture_steps
        self.num_tokens = num_tokens
        self.steps = 0
        self.requests: dict[int, int] = {}  # id -> tokens left
        self.started: dict[int, int] = {}  # id -> the step of its first token

    def add_request(self, prompt: list[int], options: Any) -> int:
        request_id = len(self.started)
        self.requests[request_id] = self.num_tokens
        self.started[request_id] = request_id + 1
        return request_id

    def step(self) -> list[Any]:
        self.steps += 1
        if self.steps in self.capture_steps:
            self.runner.mixed_graphs[self.steps] = object()
        updates = []
        for request_id, left in list(self.requests.items()):
            if self.started[request_id] > self.steps:
                continue
            self.requests[request_id] = left - 1
            done = left == 1
            if done:
                del self.requests[request_id]
            reason = "length" if done else None
            updates.append(SimpleNamespace(request_id=request_id, new_token_ids=[7],
                                           finished=done, finish_reason=reason))  # fmt: skip
        return updates


def test_drive_charges_a_capture_to_the_requests_waiting_for_a_first_token() -> None:
    specs = [RequestSpec(i, 0.0, 4, 3) for i in range(3)]
    engine = _CapturingEngine(capture_steps={2, 5}, num_tokens=3)
    run = prefix_engine.drive(engine, specs, seed=0)
    # step 2 captures: requests 1 and 2 still wait (first tokens at steps 2 and 3), 0 has
    # its own; step 5's capture comes after every first token
    assert [r["captures_waited"] for r in run["requests"]] == [0, 1, 1]
    assert run["num_graph_captures"] == 2
    assert run["capture_step_s"] >= 0.0
    assert prefix_engine.num_graphs(engine) == 2


def _smoke_args(**overrides: Any) -> argparse.Namespace:
    args = prefix_engine.parse_args(["--smoke", "--workloads", "agent_loop"])
    args.dtype = prefix_engine.resolved_dtype(args.dtype, args.identity)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.slow
def test_a_warm_pass_reports_the_timed_replay_alone() -> None:
    """The warm pass replays the workload first on the same engine; the figures are the
    second replay's: the same tokens computed, hits and outputs as a run without it."""
    # 5 requests, the fifth hits. Every arrival at 0: each request is then submitted when
    # the answers it repeats are known, a matter of steps, not of how fast this machine
    # runs them (with the smoke's spaced arrivals a slow CI machine saw two hits, not one).
    args = _smoke_args(arrival_scale=0.0)
    model = prefix_engine.build(args)
    specs = prefix_engine.workload_specs(args, "agent_loop")
    cold, _ = prefix_engine.run_one(args, model, "avmp", "avmp", specs)
    warm, _ = prefix_engine.run_one(args, model, "avmp", "avmp", specs, warm_pass=True)
    assert warm["warm_pass"] and not cold["warm_pass"]
    assert warm["prefix"]["num_hit_tokens"] == cold["prefix"]["num_hit_tokens"] > 0
    assert warm["num_computed_tokens"] == cold["num_computed_tokens"]
    assert warm["prefix"]["num_checkpoints_taken"] == cold["prefix"]["num_checkpoints_taken"]
    assert warm["outputs"] == cold["outputs"]
    assert warm["num_graph_captures"] == cold["num_graph_captures"] == 0  # the CPU: no graphs
    assert warm["ttft_no_capture"]["num_requests"] == warm["num_completed"]
