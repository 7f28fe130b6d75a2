"""Prefix caching through the engine: the prefix workloads (`PREFIX_PRESETS`) as token ids,
with and without the cache, on each layout (AVMP, SGLang's static split, vLLM's unified
pool; same model, same kernels).

`sharegpt` (ShareGPT first turns, the `sharegpt_replay` preset) shares nothing: there the
cache can only cost (lookups, checkpoints, evictions), which its req/s and TTFT with and
without the cache show.

A workload names what its prompts share (content segments: a system prompt, a
conversation's earlier messages and answers). Here each segment becomes token ids: a
message or system prompt gets random ids of its own (seeded by the segment, so the same
in every run), and an answer is the tokens the engine
generated for it. So a turn can only start once the turn whose answer it repeats has
finished, as a user sends the next message after reading the answer: a request is
submitted at its arrival (the workload's, scaled by ``--arrival-scale``) or when the
answers it contains are known, whichever is later, and its TTFT counts from there.
Every request generates exactly its output length (``ignore_eos``), so the histories
have the workload's lengths.

Per run: TTFT p50/p99, requests/s (completed over the time from the first submission to
the last token), output tokens/s, prompt tokens taken from the cache over those queried,
and over the ideal (the prompt tokens, in whole 16-token pages, that an earlier
submitted request's prompt or answer already held, with every checkpoint kept), the
tokens computed, checkpoints, evictions, preemptions; per layout the ratios of the cached
run to the uncached one, and how many outputs were token-identical (greedy). TTFT is also
split by whether a request could hit: whether an earlier submitted request's prompt and
answer begin with at least one whole page of its prompt (its ideal > 0), counted from
the run's own token ids, not from the cache's counters.

Each run is timed on its second replay (``--warm-pass``, the default): the first, on the
same engine, makes the CUDA graphs and kernel variants its steps need beyond the
engine's warm-up, and the prefix cache is emptied between the two. A graph captured in
a timed replay blocks the step that makes it (0.18 s per mixed graph on an H200): the
runs count those captures and, per request, the ones its wait for a first token held,
and report the TTFT of the requests that waited on none (session 7's run, without the
warm pass, put agent_loop's TTFT p50 with the cache on the unified layout at 120 ms,
most of it such captures by the simulator's account: docs/design-prefix.md).

``--identity`` answers one question only: does the cache change greedy tokens? A short
run (float32 by default) per layout, without and then with the cache, the cached run
given exactly the uncached run's prompts (its messages and its answers, still each turn
after the one it repeats); per layout how many outputs are identical and, for each one
that is not, its first differing position and the top-2 logit gap there of a fresh
prefill (no cache, no graphs) of the prompt and the tokens both runs agree on.

Granite-4.0-H-Micro's geometry with random weights (as benchmarks/engine_replay.py builds
it; bf16 unless ``--dtype`` says otherwise), the Triton kernels and decode graphs, AVMP and
static on CUDA VMM. One warm-up compiles the kernel variants first. ``--smoke`` runs a
tiny model of the same structure on the CPU (its first layers, reference kernels, lengths
/ 16, a few requests) in seconds.

Usage::

    PYTHONPATH=src python3 -m benchmarks.prefix_engine --out $OUT/prefix_engine_h200.json.gz
    PYTHONPATH=src python3 -m benchmarks.prefix_engine --workloads multi_turn_prefix \
        --num-requests 384 --allocators avmp --out $OUT/prefix_engine_mt384_h200.json.gz
    PYTHONPATH=src python3 -m benchmarks.prefix_engine --identity \\
        --out $OUT/prefix_identity_h200.json.gz
    python -m benchmarks.prefix_engine --markdown benchmarks/results/prefix_engine_h200.json.gz
    python -m benchmarks.prefix_engine --smoke --out /tmp/prefix_engine.json
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import sys
import time
import zlib
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np

from avmp.sched.request import RequestSpec
from avmp.sim.metrics import percentile
from avmp.units import parse_bytes
from benchmarks.common import read_result, write_result

DEFAULT_MODEL = "granite-4.0-h-micro"
ALLOCATORS = ("avmp", "static", "unified")
WORKLOADS = ("multi_turn_prefix", "agent_loop", "sharegpt_multi_turn", "sharegpt")
NO_REUSE = "sharegpt"  # ShareGPT first turns (`sharegpt_replay`): nothing to reuse, so the
# cache's cost alone (its lookups, checkpoints and evictions) shows
# multi_turn_prefix and agent_loop bounded so that they x 3 layouts x 2 runs might finish
# in < 240 s on one H200 (an estimate made before the benchmark ran on a GPU);
# sharegpt_multi_turn (not timed on a GPU yet) takes twice multi_turn_prefix's count, as
# its conversations are shorter, so more of its requests are first turns (at seed 0, 76
# of 192 are later turns; 27 of 96)
DEFAULT_REQUESTS = {"multi_turn_prefix": 96, "agent_loop": 40, "sharegpt_multi_turn": 192,
                    "sharegpt": 192}  # fmt: skip
IDENTITY_REQUESTS = {"multi_turn_prefix": 48, "agent_loop": 20,  # --identity: a short run
                     "sharegpt_multi_turn": 48, "sharegpt": 20}  # fmt: skip
DTYPES = ("bfloat16", "float32")
IDENTITY_DTYPE = "float32"  # the dtype the CPU tests show token identity in
CPU_LAYERS = 6  # Granite-4.0-H's first six: five Mamba2 layers and one attention layer
IDEAL_UNIT_TOKENS = 16  # the ideal counts whole pages of this many tokens, in every layout
SMOKE = {
    "device": "cpu",
    "memory": "64MiB",
    "max_num_seqs": 8,
    "max_batched_tokens": 256,
    "length_divisor": 16,
    "arrival_scale": 0.02,
    "num_requests": 5,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument(
        "--num-requests",
        type=int,
        help="requests per workload (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_REQUESTS.items())
        + ")",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        help=f"the model's dtype, one of {', '.join(DTYPES)} (default: the model's own, bf16 "
        f"on the GPU; {IDENTITY_DTYPE} with --identity)",
    )
    parser.add_argument(
        "--identity",
        action="store_true",
        help="only whether the cache changes greedy tokens: a short run per layout, "
        "without and with the cache on the same prompts",
    )
    parser.add_argument(
        "--arrival-scale",
        type=float,
        default=0.5,
        help="multiply the workload's arrival times (0.5: twice as dense)",
    )
    parser.add_argument(
        "--length-divisor",
        type=int,
        default=1,
        help="divide every segment's and output's length (smoke runs)",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="zoo geometry, random weights")
    parser.add_argument(
        "--policy",
        default="avmp",
        choices=("avmp", "vllm-align", "sglang"),
        help="the prefix cache's placement policy in the cached runs",
    )
    parser.add_argument("--memory", default="8GiB", help="cache budget of each layout")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=8192)
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=ALLOCATORS)
    parser.add_argument("--device", default="cuda", help="cpu: reference kernels")
    parser.add_argument(
        "--backing",
        default="vmm",
        choices=("vmm", "buffer"),
        help="AVMP's and static's memory: CUDA VMM, or one torch buffer",
    )
    parser.add_argument(
        "--warm-pass",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay each run's workload once untimed on its engine before the timed "
        "replay, so that the CUDA graphs and kernel variants it needs are made outside "
        "the timed one (default: on; not in --identity)",
    )
    parser.add_argument("--out", type=Path, help="results file (.json.gz: compressed)")
    parser.add_argument("--markdown", type=Path, help="print the tables of a results file")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny model on the CPU, lengths / 16, 5 requests a workload",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


# -- the workload as token ids --------------------------------------------------------------


def workload_specs(args: argparse.Namespace, name: str) -> list[RequestSpec]:
    """The preset's requests, arrivals scaled and lengths divided as asked."""
    from avmp.bench.workloads import make_prefix_workload, make_workload

    n = args.num_requests or default_requests(args)[name]
    if name == NO_REUSE:
        specs = make_workload("sharegpt_replay", args.seed, n)
    else:
        specs = make_prefix_workload(name, args.seed, n)
    divisor = args.length_divisor
    if divisor == 1 and args.arrival_scale == 1:
        return specs
    return [_scaled(spec, args.arrival_scale, divisor) for spec in specs]


def default_requests(args: argparse.Namespace) -> dict[str, int]:
    return IDENTITY_REQUESTS if args.identity else DEFAULT_REQUESTS


def _scaled(spec: RequestSpec, arrival_scale: float, divisor: int) -> RequestSpec:
    segments = tuple((content, max(1, length // divisor)) for content, length in spec.segments)
    prompt = sum(length for _, length in segments) or max(1, spec.prompt_tokens // divisor)
    return RequestSpec(
        spec.request_id, spec.arrival_s * arrival_scale, prompt,
        max(1, spec.output_tokens // divisor), segments, spec.output_segment,
    )  # fmt: skip


class TokenBook:
    """Token ids of every content segment: a message's random ids drawn from its own
    seeded generator (so a message reads the same in every run, whatever order the
    requests were submitted in), the engine's tokens for an answer once its request
    finished. Replaying a run, ``given`` holds that run's ids of every segment; a prompt
    reads them, yet a turn still waits for this run's answer to the turn it repeats."""

    def __init__(
        self,
        specs: list[RequestSpec],
        vocab: int,
        seed: int,
        given: dict[Hashable, list[int]] | None = None,
    ) -> None:
        self.answers = {s.output_segment for s in specs if s.output_segment is not None}
        self.tokens: dict[Hashable, list[int]] = {}
        self._given = given or {}
        self._seed = seed
        self._vocab = vocab

    def ready(self, spec: RequestSpec) -> bool:
        """Whether every answer the prompt repeats is known."""
        return all(c in self.tokens or c not in self.answers for c, _ in spec.segments)

    def prompt(self, spec: RequestSpec) -> list[int]:
        if not spec.segments:
            return self._random(("prompt", spec.request_id), spec.prompt_tokens)
        ids: list[int] = []
        for content, length in spec.segments:
            if content not in self.tokens:
                self.tokens[content] = self._random(content, length)
            ids += self._given.get(content, self.tokens[content])[:length]
        return ids

    def answered(self, spec: RequestSpec, tokens: list[int]) -> None:
        """Record an answer; one cut short (a rejected request) is padded at random."""
        if spec.output_segment is not None:
            missing = spec.output_tokens - len(tokens)
            padding = self._random(spec.output_segment, max(0, missing))
            self.tokens[spec.output_segment] = tokens + padding

    def _random(self, content: Hashable, n: int) -> list[int]:
        key = zlib.crc32(repr(content).encode())
        return np.random.default_rng([self._seed, key]).integers(3, self._vocab, n).tolist()


# -- one run -------------------------------------------------------------------------------


def drive(
    engine: Any,
    specs: list[RequestSpec],
    seed: int,
    given: dict[Hashable, list[int]] | None = None,
) -> dict[str, Any]:
    """Submit each request at its arrival once the answers it repeats are known, step the
    engine until all finished; per request its prompt, tokens and times, and the ids of
    every segment (``given``: another run's, to replay its prompts).

    Also the CUDA graphs the steps captured (`num_graphs`): a capture blocks the host for
    the step that makes it (0.18 s median for a mixed graph on an H200, the calibration's
    ``graph_captures``), so every request still waiting for its first token then waits that
    much longer; per request ``captures_waited`` counts the captures it waited through,
    and the run the captures and the wall seconds of the steps that made them."""
    from avmp.engine.engine import RequestOptions

    book = TokenBook(specs, engine.geometry.vocab_size, seed, given)
    pending = sorted(specs, key=lambda s: (s.arrival_s, s.request_id))
    live: dict[int, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []
    captures = {"num_graph_captures": 0, "capture_step_s": 0.0}
    start = time.perf_counter()
    while pending or live:
        now = time.perf_counter() - start
        for spec in [s for s in pending if s.arrival_s <= now and book.ready(s)]:
            pending.remove(spec)
            prompt = book.prompt(spec)
            options = RequestOptions(max_tokens=spec.output_tokens, ignore_eos=True)
            request_id = engine.add_request(prompt, options)
            live[request_id] = {"spec": spec, "prompt": prompt, "tokens": [], "submitted_s": now,
                                "first_token_s": None, "finish_reason": None,
                                "captures_waited": 0}  # fmt: skip
        if not live:  # nothing runs: wait for the next arrival
            if not any(book.ready(s) for s in pending):
                raise RuntimeError("requests wait for answers that no request will give")
            time.sleep(max(0.0, min(s.arrival_s for s in pending if book.ready(s)) - now))
            continue
        waiting = [r for r in live.values() if r["first_token_s"] is None]
        graphs_before, step_start = num_graphs(engine), time.perf_counter()
        updates = engine.step()
        captured = num_graphs(engine) - graphs_before
        if captured:
            captures["num_graph_captures"] += captured
            captures["capture_step_s"] += time.perf_counter() - step_start
            for request in waiting:
                request["captures_waited"] += captured
        for update in updates:
            request = live[update.request_id]
            if update.new_token_ids and request["first_token_s"] is None:
                request["first_token_s"] = time.perf_counter() - start
            request["tokens"] += update.new_token_ids
            if update.finished:
                request["finish_s"] = time.perf_counter() - start
                request["finish_reason"] = update.finish_reason
                book.answered(request["spec"], request["tokens"])
                done.append(live.pop(update.request_id))
    return {"requests": sorted(done, key=lambda r: r["spec"].request_id), "tokens": book.tokens,
            **captures}  # fmt: skip


def num_graphs(engine: Any) -> int:
    """The CUDA graphs (decode, prefill and mixed) the engine's runner holds: captured
    once per new bucket, never dropped (0 for a runner without graphs: the CPU's)."""
    runner = engine.runner
    return len(getattr(runner, "graphs", ())) + len(getattr(runner, "mixed_graphs", ()))


def engine_config(args: argparse.Namespace, allocator: str, prefix: str, **overrides: Any) -> Any:
    """The engine's configuration for one layout and cache setting."""
    from avmp.engine.engine import EngineConfig

    on_gpu = args.device == "cuda"
    vmm = on_gpu and args.backing == "vmm" and allocator != "unified"
    return EngineConfig(
        memory_bytes=parse_bytes(args.memory), device=args.device, dtype=args.dtype,
        kernels="triton" if on_gpu else "reference", allocator=allocator,
        backing="cuda_vmm" if vmm else "torch", max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens, prefix_cache=prefix, **overrides,
    )  # fmt: skip


def run_one(
    args: argparse.Namespace,
    model: Any,
    allocator: str,
    prefix: str,
    specs: list[RequestSpec],
    given: dict[Hashable, list[int]] | None = None,
    warm_pass: bool = False,
) -> tuple[dict[str, Any], dict[Hashable, list[int]]]:
    """One layout, with the prefix cache ``prefix`` (``off``: none), over the workload
    (its segments' ids ``given``, or drawn afresh). Returns the run's figures and the ids
    of its segments.

    ``warm_pass``: replay the workload once untimed on the same engine first, then empty
    its prefix cache (`Engine.reset_prefix_cache`) and time the second replay, whose
    figures alone are reported. The first meets the step shapes the second will (nearly
    all), so the CUDA graphs and kernel variants the run needs beyond the engine's warm-up
    are made before the timed one: a short run otherwise pays one-off captures in the
    TTFT of whichever requests they land on (`drive`)."""
    from avmp.engine.engine import Engine

    engine = Engine(model, engine_config(args, allocator, prefix))
    engine.warmup()
    if warm_pass:
        drive(engine, specs, args.seed, given)
        engine.reset_prefix_cache()
    computed_before = engine.stats.num_computed_tokens  # `warmup`'s last call's, or the pass's
    totals_before = (engine.totals.prefix, engine.totals.num_preemptions)
    run = drive(engine, specs, args.seed, given)
    result = summarize(run["requests"], engine, totals_before)
    result["num_computed_tokens"] = engine.stats.num_computed_tokens - computed_before
    result["num_graph_captures"] = run["num_graph_captures"]
    result["capture_step_s"] = run["capture_step_s"]
    result |= {"allocator": allocator, "prefix_cache": prefix, "warm_pass": warm_pass}
    engine.close()
    del engine
    gc.collect()
    return result, run["tokens"]


def summarize(
    requests: list[dict[str, Any]],
    engine: Any,
    before: tuple[Any, int] | None = None,
) -> dict[str, Any]:
    """A run's figures from its requests and the engine's counters since ``before`` (the
    totals' prefix counts and preemptions when the run began; None: the engine's life)."""
    completed = [r for r in requests if r["finish_reason"] == "length"]
    ttfts = [r["first_token_s"] - r["submitted_s"] for r in completed]
    ideal = ideal_hit_tokens(requests)
    could_hit = [ideal[r["spec"].request_id] > 0 for r in completed]
    waited = [r.get("captures_waited", 0) for r in completed]
    first = min((r["submitted_s"] for r in requests), default=0.0)
    span_s = max((r["finish_s"] for r in completed), default=first) - first
    totals = engine.totals
    prefix, preemptions = totals.prefix, totals.num_preemptions
    if before is not None:
        prefix, preemptions = prefix.since(before[0]), preemptions - before[1]
    return {
        "num_requests": len(requests),
        "num_completed": len(completed),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "span_s": span_s,
        "request_throughput": len(completed) / span_s if span_s > 0 else 0.0,
        "output_token_throughput": sum(len(r["tokens"]) for r in completed) / span_s
        if span_s > 0
        else 0.0,
        "num_prompt_tokens": sum(len(r["prompt"]) for r in requests),
        "num_preemptions": preemptions,
        "reusable_tokens": sum(ideal.values()),
        "prefix": {
            "num_queried_tokens": prefix.num_queried_tokens,
            "num_hit_tokens": prefix.num_hit_tokens,
            "num_hits": prefix.num_hits,
            "num_checkpoints_taken": prefix.num_checkpoints_taken,
            "num_evicted_pages": prefix.num_evicted_pages,
            "num_evicted_checkpoints": prefix.num_evicted_checkpoints,
            "checkpoint_bytes_at_end": prefix.checkpoint_bytes,
        },
        "ttft_s": ttfts,
        "could_hit": could_hit,  # per completed request, beside ttft_s
        "captures_waited": waited,  # likewise: graph captures it waited through (`drive`)
        "ttft_could_hit": ttft_split(ttfts, could_hit, True),
        "ttft_rest": ttft_split(ttfts, could_hit, False),
        "ttft_no_capture": ttft_split(ttfts, [w == 0 for w in waited], True),
        "outputs": [r["tokens"] for r in requests],
        "prompt_crc32": [zlib.crc32(np.asarray(r["prompt"], np.int64).tobytes()) for r in requests],
    }


def ttft_split(ttfts: list[float], could_hit: list[bool], side: bool) -> dict[str, Any]:
    """TTFT p50/p99 of the requests whose ``could_hit`` is ``side`` (NaN: none)."""
    chosen = [t for t, hit in zip(ttfts, could_hit, strict=True) if hit == side]
    return {"num_requests": len(chosen), "p50_s": percentile(chosen, 50),
            "p99_s": percentile(chosen, 99)}  # fmt: skip


def reusable_tokens(requests: list[dict[str, Any]]) -> int:
    """The ideal's hit tokens over all requests (`ideal_hit_tokens`)."""
    return sum(ideal_hit_tokens(requests).values())


def ideal_hit_tokens(requests: list[dict[str, Any]]) -> dict[int, int]:
    """The ideal's hit tokens per request id: in submission order, the whole pages of a
    request's prompt (all but its last token) that an earlier submitted request's prompt
    and answer begin with (a cache that kept every page and a checkpoint at each)."""
    unit = IDEAL_UNIT_TOKENS
    trie: dict[tuple[int, ...], dict] = {}  # type: ignore[type-arg]
    hits: dict[int, int] = {}
    for request in sorted(requests, key=lambda r: (r["submitted_s"], r["spec"].request_id)):
        prompt = request["prompt"]
        level, matched = trie, 0
        for page in range((len(prompt) - 1) // unit):
            key = tuple(prompt[page * unit : (page + 1) * unit])
            if key not in level:
                break
            level, matched = level[key], matched + 1
        hits[request["spec"].request_id] = matched * unit
        stream = prompt + request["tokens"]
        level = trie
        for page in range(len(stream) // unit):
            level = level.setdefault(tuple(stream[page * unit : (page + 1) * unit]), {})
    return hits


# -- the whole benchmark ---------------------------------------------------------------------


def build(args: argparse.Namespace) -> Any:
    """The model: Granite-4.0-H-Micro at full size (random bf16 weights) on the GPU; on
    the CPU its tiny version, cut to the pattern's first `CPU_LAYERS` layers."""
    import torch

    if args.device != "cuda":
        from avmp.engine.tiny import tiny_model
        from avmp.models.zoo import zoo_config

        raw = dict(zoo_config(args.model))
        if isinstance(raw.get("layer_types"), list):
            raw["layer_types"] = raw["layer_types"][:CPU_LAYERS]
            raw["num_hidden_layers"] = len(raw["layer_types"])
        model = tiny_model(raw, seed=args.seed)
    else:
        from benchmarks.engine import build_model, transformers_config

        model = build_model(transformers_config(args.model), torch.device(args.device))
    return model if args.dtype is None else model.to(getattr(torch, args.dtype))


def model_dtype(model: Any) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def warm_up(args: argparse.Namespace, model: Any) -> None:
    """Compile the Triton kernels' variants before the first timed run (on the GPU)."""
    if args.device == "cuda":
        from benchmarks.engine_replay import warm_up as compile_kernels

        options = argparse.Namespace(device=args.device, seed=args.seed,
                                     max_batched_tokens=args.max_batched_tokens)  # fmt: skip
        compile_kernels(options, model)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every workload on every layout, without and then with the cache."""
    import torch

    model = build(args)
    warm_up(args, model)
    results = conditions(args) | {"dtype": model_dtype(model)}
    for name in args.workloads:
        specs = workload_specs(args, name)
        for allocator in args.allocators:
            for prefix in ("off", args.policy):
                start = time.perf_counter()
                run = run_one(args, model, allocator, prefix, specs,
                              warm_pass=args.warm_pass)[0] | {"workload": name}  # fmt: skip
                results["runs"].append(run)
                print(f"{name}, {allocator}, prefix cache {prefix}: TTFT p50 "
                      f"{run['ttft_p50_s'] * 1e3:.1f} ms, {run['request_throughput']:.2f} req/s, "
                      f"{run['prefix']['num_hit_tokens']} hit tokens, "
                      f"{run['num_graph_captures']} graph captures; "
                      f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return results


def run_identity(args: argparse.Namespace) -> dict[str, Any]:
    """Every workload on every layout without the cache, then with it on the uncached
    run's prompts; per layout which outputs differ, where, and by how much there."""
    import torch

    model = build(args)
    warm_up(args, model)
    results = conditions(args) | {"mode": "identity", "dtype": model_dtype(model), "identity": []}
    for name in args.workloads:
        specs = sorted(workload_specs(args, name), key=lambda s: s.request_id)
        for allocator in args.allocators:
            off, tokens = run_one(args, model, allocator, "off", specs)
            on, _ = run_one(args, model, allocator, args.policy, specs, given=tokens)
            results["runs"] += [off | {"workload": name}, on | {"workload": name}]
            report = identity_report(off, on, [s.request_id for s in specs])
            book = TokenBook(specs, vocab_size(model), args.seed, given=tokens)
            cases = [book.prompt(specs[d["index"]]) + off["outputs"][d["index"]][: d["position"]]
                     for d in report["differing"]]  # fmt: skip
            for case, probe in zip(report["differing"], top2_gaps(args, model, cases), strict=True):
                case |= probe
            results["identity"].append({"workload": name, "allocator": allocator} | report)
            hits = on["prefix"]["num_hit_tokens"]
            print(f"{name}, {allocator}: {report['num_identical']} of {report['num_requests']} "
                  f"outputs identical, {hits} hit tokens", flush=True)  # fmt: skip
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return results


def vocab_size(model: Any) -> int:
    return int(model.config.vocab_size)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (one ending early counts), or None."""
    for position, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return position
    return None if len(a) == len(b) else min(len(a), len(b))


def identity_report(
    off: dict[str, Any], on: dict[str, Any], request_ids: list[int]
) -> dict[str, Any]:
    """How many outputs of the cached run ``on`` equal the uncached run's ``off``, how many
    prompts were the same (a replay's must all be), and per differing request (index in
    request id order) its first differing position and the two runs' tokens there."""
    differing = []
    for index, (a, b) in enumerate(zip(off["outputs"], on["outputs"], strict=True)):
        position = first_difference(a, b)
        if position is not None:
            differing.append({
                "index": index, "request_id": request_ids[index], "position": position,
                "off_token": a[position] if position < len(a) else None,
                "on_token": b[position] if position < len(b) else None,
            })  # fmt: skip
    same = sum(x == y for x, y in zip(off["prompt_crc32"], on["prompt_crc32"], strict=True))
    num = len(off["outputs"])
    return {"num_requests": num, "num_identical": num - len(differing), "num_same_prompt": same,
            "differing": differing}  # fmt: skip


def top2_gaps(args: argparse.Namespace, model: Any, cases: list[list[int]]) -> list[dict[str, Any]]:
    """Per token list, a fresh prefill's (no cache, no graphs, one request at a time) top
    logit minus its second at the list's last position, and its greedy token there
    (``top2_gap`` None where the captured logits do not give the sampled token)."""
    if not cases:
        return []
    import torch

    from avmp.engine.engine import Engine

    engine = Engine(model, engine_config(args, "avmp", "off", cuda_graphs=False, overlap=False))
    last: list[torch.Tensor] = []  # the last token's hidden state of each forward pass
    handle = engine.model.register_forward_hook(lambda _m, _i, out: last.append(out[-1:]))
    probes = []
    try:
        for tokens in cases:
            last.clear()
            sampled = _greedy_token(engine, tokens)
            with torch.inference_mode():
                top = engine.model.logits(last[-1]).topk(2, dim=-1)
            values, indices = top.values[0].tolist(), top.indices[0].tolist()
            gap = values[0] - values[1] if sampled == indices[0] else None
            probes.append({"top2_gap": gap, "fresh_token": sampled})
    finally:
        handle.remove()
        engine.close()
    return probes


def _greedy_token(engine: Any, tokens: list[int]) -> int:
    """The one greedy token ``engine`` generates after ``tokens``, run alone."""
    from avmp.engine.engine import RequestOptions

    engine.add_request(tokens, RequestOptions(max_tokens=1, ignore_eos=True))
    sampled: list[int] = []
    while engine.has_unfinished_requests:
        for update in engine.step():
            sampled += update.new_token_ids
    return sampled[0]


def conditions(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    on_gpu = args.device == "cuda"
    return {
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": args.model if on_gpu else f"{args.model} (tiny, {CPU_LAYERS} layers)",
        "seed": args.seed,
        "num_requests": {w: args.num_requests or default_requests(args)[w] for w in args.workloads},
        "arrival_scale": args.arrival_scale,
        "length_divisor": args.length_divisor,
        "policy": args.policy,
        "memory": args.memory,
        "backing": args.backing if on_gpu else "torch",
        "max_num_seqs": args.max_num_seqs,
        "max_batched_tokens": args.max_batched_tokens,
        "warm_pass": args.warm_pass and not args.identity,
        "runs": [],
    }


# -- tables -----------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    """Per workload, one row per layout and cache setting, then the ratios per layout and
    TTFT split by whether a request could hit; for an ``--identity`` run, the outputs'
    identity per layout instead."""
    c = results
    dtype = f", {c['dtype']} weights" if "dtype" in c else ""
    lines = [
        f"{c['model']} on {c['device']}{dtype}, {c['memory']} cache, max_num_seqs "
        f"{c['max_num_seqs']}, {c['max_batched_tokens']} batched tokens, arrivals "
        f"x{c['arrival_scale']}, seed {c['seed']}, policy {c['policy']}"
        + (", each run timed on its second replay (warm pass)" if c.get("warm_pass") else ""),
    ]
    if c.get("mode") == "identity":
        return "\n".join(lines + identity_tables(c))
    for workload in dict.fromkeys(run["workload"] for run in c["runs"]):
        runs = [run for run in c["runs"] if run["workload"] == workload]
        lines += ["", f"**{workload}** ({runs[0]['num_requests']} requests{dtype})", ""]
        lines += [
            "| layout | prefix cache | TTFT p50 | TTFT p99 | req/s | output tok/s | hit / "
            "queried | hit / ideal | computed tokens | checkpoints taken | evictions "
            "(pages, ckpts) | preemptions |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [_row(run) for run in runs]
        lines += ["", "| layout | TTFT p50 off / on | TTFT p99 off / on | req/s on / off | "
                      "identical outputs |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [_ratio_row(allocator, off, on) for allocator, off, on in _pairs(runs)]
        lines += _split_table(runs)
        lines += _capture_table(runs)
    return "\n".join(lines)


def _pairs(runs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Per layout, its uncached and cached runs (layouts missing either left out)."""
    pairs = []
    for allocator in dict.fromkeys(run["allocator"] for run in runs):
        pair = [run for run in runs if run["allocator"] == allocator]
        off = next((r for r in pair if r["prefix_cache"] == "off"), None)
        on = next((r for r in pair if r["prefix_cache"] != "off"), None)
        if off is not None and on is not None:
            pairs.append((allocator, off, on))
    return pairs


def _split_table(runs: list[dict[str, Any]]) -> list[str]:
    """TTFT of the requests that could hit (the ideal > 0) and of the rest, per layout;
    nothing for results written before the split."""
    pairs = [p for p in _pairs(runs) if "ttft_could_hit" in p[1] and "ttft_could_hit" in p[2]]
    if not pairs:
        return []
    lines = ["", "TTFT of the requests that could hit (an earlier request's prompt and answer "
             "began with a whole page of theirs, from the token ids) and of the rest, off / on:",
             "", "| layout | could hit (off, on) | TTFT p50 | TTFT p99 | rest (off, on) | "
             "TTFT p50 | TTFT p99 |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for allocator, off, on in pairs:
        cells = [allocator]
        for key in ("ttft_could_hit", "ttft_rest"):
            a, b = off[key], on[key]
            cells += [f"{a['num_requests']}, {b['num_requests']}",
                      _off_on(a["p50_s"], b["p50_s"]), _off_on(a["p99_s"], b["p99_s"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _capture_table(runs: list[dict[str, Any]]) -> list[str]:
    """Per layout, off / on: the CUDA graphs the timed run captured, the wall seconds of
    the steps that captured them, the requests whose wait for a first token held one,
    and the TTFT of the others; nothing for results written before captures were
    counted."""
    pairs = [p for p in _pairs(runs) if "captures_waited" in p[1] and "captures_waited" in p[2]]
    if not pairs:
        return []
    lines = ["", "Graph captures in the timed run (each blocks the step that makes it) and the "
             "TTFT of the requests that waited through none, off / on:", "",
             "| layout | captures | seconds of capturing steps | requests that waited on one | "
             "TTFT p50 without | TTFT p99 without |", "|---|---|---|---|---|---|"]  # fmt: skip
    for allocator, off, on in pairs:
        held = [sum(w > 0 for w in run["captures_waited"]) for run in (off, on)]
        a, b = off["ttft_no_capture"], on["ttft_no_capture"]
        lines.append(
            f"| {allocator} | {off['num_graph_captures']}, {on['num_graph_captures']} | "
            f"{off['capture_step_s']:.2f}, {on['capture_step_s']:.2f} | {held[0]}, {held[1]} | "
            f"{_off_on(a['p50_s'], b['p50_s'])} | {_off_on(a['p99_s'], b['p99_s'])} |"
        )
    return lines


def _off_on(off_s: float, on_s: float) -> str:
    if math.isnan(off_s) or math.isnan(on_s):
        return "-"
    return f"{off_s * 1e3:.1f} / {on_s * 1e3:.1f} ms ({_ratio(off_s, on_s)})"


def identity_tables(results: dict[str, Any]) -> list[str]:
    """Per workload and layout: identical outputs of the cached run on the uncached run's
    prompts, and where the others first differ."""
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in results["identity"]):
        reports = [r for r in results["identity"] if r["workload"] == workload]
        runs = [r for r in results["runs"] if r["workload"] == workload]
        lines += ["", f"**{workload}** ({reports[0]['num_requests']} requests, "
                  f"{results.get('dtype', 'dtype not recorded')}): greedy outputs with the cache "
                  "against without, on the same prompts", "",
                  "| layout | identical outputs | same prompts | hit / ideal | first difference: "
                  "request, position (top-2 logit gap of a fresh prefill there) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for report in reports:
            on = next(r for r in runs if r["allocator"] == report["allocator"]
                      and r["prefix_cache"] != "off")  # fmt: skip
            hit, ideal = on["prefix"]["num_hit_tokens"], on["reusable_tokens"]
            lines.append(
                f"| {report['allocator']} | {report['num_identical']} of {report['num_requests']} "
                f"| {report['num_same_prompt']} | {f'{hit / ideal:.1%}' if ideal else '-'} | "
                f"{_differences(report['differing'])} |"
            )
    return lines


def _differences(differing: list[dict[str, Any]], shown: int = 8) -> str:
    if not differing:
        return "-"
    cells = []
    for d in differing[:shown]:
        gap = d.get("top2_gap")
        cells.append(f"{d['request_id']}: {d['position']} ("
                     + ("gap not measured" if gap is None else f"gap {gap:.3g}") + ")")  # fmt: skip
    more = len(differing) - shown
    return "; ".join(cells) + (f"; {more} more" if more > 0 else "")


def _row(run: dict[str, Any]) -> str:
    prefix = run["prefix"]
    queried, hit = prefix["num_queried_tokens"], prefix["num_hit_tokens"]
    reusable = run["reusable_tokens"]
    return (
        f"| {run['allocator']} | {run['prefix_cache']} | {run['ttft_p50_s'] * 1e3:.1f} ms | "
        f"{run['ttft_p99_s'] * 1e3:.1f} ms | {run['request_throughput']:.2f} | "
        f"{run['output_token_throughput']:.0f} | "
        + (f"{hit / queried:.1%} | " if queried else "- | ")
        + (f"{hit / reusable:.1%} | " if reusable and run["prefix_cache"] != "off" else "- | ")
        + f"{run['num_computed_tokens']} | {prefix['num_checkpoints_taken']} | "
        f"{prefix['num_evicted_pages']}, {prefix['num_evicted_checkpoints']} | "
        f"{run['num_preemptions']} |"
    )


def _ratio_row(allocator: str, off: dict[str, Any], on: dict[str, Any]) -> str:
    same = sum(a == b for a, b in zip(off["outputs"], on["outputs"], strict=True))
    prompts = ""
    if "prompt_crc32" in off and "prompt_crc32" in on:  # absent from older results
        num = sum(a == b for a, b in zip(off["prompt_crc32"], on["prompt_crc32"], strict=True))
        prompts = f" ({num} with the same prompt)"
    return (
        f"| {allocator} | {_ratio(off['ttft_p50_s'], on['ttft_p50_s'])} | "
        f"{_ratio(off['ttft_p99_s'], on['ttft_p99_s'])} | "
        f"{_ratio(on['request_throughput'], off['request_throughput'])} | "
        f"{same} of {len(on['outputs'])}{prompts} |"
    )


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator > 0 else "-"


def resolved_dtype(dtype: str | None, identity: bool) -> str | None:
    """The model's dtype: the one asked for, else float32 for ``--identity`` and the
    model's own (None) for the timing run.

    Raises:
        ValueError: a dtype not in `DTYPES`.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype or (IDENTITY_DTYPE if identity else None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown is not None:
        try:
            results = read_result(args.markdown)
        except (ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(markdown(results))
        return 0
    try:  # the user's mistakes, one line each, before the GPU work starts
        parse_bytes(args.memory)
        if args.arrival_scale < 0 or args.length_divisor < 1:
            raise ValueError("--arrival-scale must be >= 0 and --length-divisor >= 1")
        args.dtype = resolved_dtype(args.dtype, args.identity)
        for name in args.workloads:
            workload_specs(args, name)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = run_identity(args) if args.identity else run_all(args)
    if args.out is not None:
        write_result(args.out, results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
