"""Synthetic workloads: the AVMP paper's presets, ours (a mix shift, long documents,
bursts of long prompts, multi-turn conversations), and arrival processes.

Every generator is a pure function of its arguments and an explicit seed (a numpy
`Generator` made from it), so all allocators of one sweep cell replay the exact same
trace and a rerun rebuilds it byte for byte.

The paper's reference code (codepawl/cachepawl, see PEERS.md) adds "one arrival per
step" for `uniform_short` and `mixed_long`, and draws `agentic_burst` inter-arrivals
from an exponential with a mean of 0.1 step. We have a clock in seconds, so a step is
mapped to a fixed interval, `STEP_S`: 20 ms, the order of one decode step of a ~10B
model on one GPU. This keeps the presets' shape (a steady stream that outpaces the
server, or bursts ten times faster) without tying arrivals to our own step lengths,
which differ per allocator and would make the traces differ between allocators.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from avmp.sched.request import RequestSpec

STEP_S = 0.020
"""Seconds of one "step" of the paper's arrival processes (see the module docstring)."""

MAX_PROMPT_TOKENS = 32768
"""The longest prompt of the long-document workloads and of a multi-turn history."""
LONGDOC_SHARE = 0.3
"""Share of documents in `longdoc_mix`."""
LONGDOC_MIX_RATE = 8.0
"""Requests/s of `longdoc_mix`: more than the simulator's H100 roofline serves on this
mix for Nemotron-H-8B at any budget of `avmp bench`, or for the smaller hybrids at
1 GiB, so a queue forms and memory, not arrivals, sets the pace; a real GPU serves
less than that roofline, so the engine's replay is busy throughout too."""
LONGDOC_BURST_SIZE = 32
"""Requests per burst of `longdoc_burst`."""
LONGDOC_BURST_RATE = 1.0 / STEP_S
"""Requests/s within a burst of `longdoc_burst`: one per step, as the paper's steady
presets, so a burst of 32 lands within about 0.6 s."""
LONGDOC_BURST_GAP_S = 4.0
"""Silence between bursts of `longdoc_burst`: shorter than a burst of long prompts takes
to serve (simulated H100, each model of `avmp bench`), so a chat burst arrives while long
prompts still hold the KV pool."""
MULTI_TURN_TURNS = (2, 8)
"""Fewest and most turns of a `multi_turn` conversation."""
MULTI_TURN_SESSION_RATE = 4.0
"""Conversations started per second in `multi_turn`: with 5 turns on average, about 20
requests/s once the first conversations reach their later turns."""
THINK_TIME_S = 5.0
"""Mean seconds a `multi_turn` user takes to write the next message."""
PREFILL_TOKENS_PER_S = 20_000.0
"""Prefill speed assumed by `service_estimate_s`: 2 x 10 G FLOPs per token of a ~10B
model at 40% of an H100's 989 dense bf16 TFLOP/s."""

ARRIVAL_KINDS = ("burst", "steps", "poisson", "gamma", "bursts")
MIN_RATE = 1e-6  # requests/s: one request in about 12 days
MAX_CV = 100.0
MAX_BURST_SIZE = 1_000_000
MAX_GAP_S = 86_400.0  # one day of silence between groups


@dataclass(frozen=True)
class ArrivalProcess:
    """When requests arrive.

    Attributes:
        kind: ``burst`` (all at t = 0), ``steps`` (one every ``step_s``), ``poisson``
            (exponential gaps at ``rate`` requests/s), ``gamma`` (gamma gaps with mean
            1/``rate`` and coefficient of variation ``cv``: cv > 1 is burstier than
            Poisson, as in vLLM's ``--burstiness``) or ``bursts`` (groups of
            ``burst_size`` requests, Poisson at ``rate`` within a group, ``gap_s`` of
            silence added before each group after the first: an on-off source).
        rate: requests per second (poisson, gamma, and within a group of bursts).
        cv: coefficient of variation of the gaps (gamma only).
        step_s: the interval of one step (steps only).
        burst_size: requests per group (bursts only).
        gap_s: seconds of silence between groups (bursts only).
    """

    kind: str = "steps"
    rate: float = 1.0 / STEP_S
    cv: float = 1.0
    step_s: float = STEP_S
    burst_size: int = 1
    gap_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ARRIVAL_KINDS:
            raise ValueError(
                f"unknown arrival kind {self.kind!r}; known: {', '.join(ARRIVAL_KINDS)}"
            )
        # Bounds keep every gap and arrival time finite (a rate of 1e-308 would give
        # infinite gaps, a cv of 1e200 a gamma shape of 0).
        if not MIN_RATE <= self.rate < math.inf:
            raise ValueError(
                f"arrival rate must be a number of requests/s >= {MIN_RATE}, got {self.rate}"
            )
        if not 0 < self.cv <= MAX_CV:
            raise ValueError(f"arrival cv must be in (0, {MAX_CV}], got {self.cv}")
        if not self.step_s > 0:
            raise ValueError(f"step_s must be positive, got {self.step_s}")
        if (
            isinstance(self.burst_size, bool)
            or not isinstance(self.burst_size, int)
            or not (1 <= self.burst_size <= MAX_BURST_SIZE)
        ):
            raise ValueError(
                f"burst size must be a whole number in [1, {MAX_BURST_SIZE}], "
                f"got {self.burst_size!r}"
            )
        if not 0 <= self.gap_s <= MAX_GAP_S:
            raise ValueError(f"burst gap must be in [0, {MAX_GAP_S}] s, got {self.gap_s}")

    def times(self, num_requests: int, rng: np.random.Generator) -> np.ndarray:
        """Arrival times in seconds, non-decreasing, the first at 0."""
        if self.kind == "burst":
            return np.zeros(num_requests)
        if self.kind == "steps":
            return np.arange(num_requests, dtype=float) * self.step_s
        if self.kind in ("poisson", "bursts"):
            gaps = rng.exponential(1.0 / self.rate, size=num_requests)
        else:
            shape = 1.0 / (self.cv * self.cv)
            gaps = rng.gamma(shape, 1.0 / (self.rate * shape), size=num_requests)
        if self.kind == "bursts":
            starts_group = np.arange(num_requests) % self.burst_size == 0
            gaps[starts_group] += self.gap_s
        gaps[0] = 0.0
        return np.cumsum(gaps)


ARRIVAL_FORMS = "burst, steps, poisson:RATE, gamma:RATE:CV or bursts:RATE:SIZE:GAP_S"


def parse_arrival(text: str) -> ArrivalProcess:
    """Parse ``burst``, ``steps``, ``poisson:RATE``, ``gamma:RATE[:CV]`` or
    ``bursts:RATE:SIZE:GAP_S`` (a CLI value)."""
    kind, *params = text.strip().split(":")
    try:
        numbers = [float(p) for p in params]
    except ValueError:
        raise ValueError(f"bad arrival {text!r}: write {ARRIVAL_FORMS}") from None
    if kind in ("burst", "steps") and not numbers:
        return ArrivalProcess(kind=kind)
    if kind == "poisson" and len(numbers) == 1:
        return ArrivalProcess(kind=kind, rate=numbers[0])
    if kind == "gamma" and len(numbers) in (1, 2):
        return ArrivalProcess(
            kind=kind, rate=numbers[0], cv=numbers[1] if len(numbers) == 2 else 1.0
        )
    if kind == "bursts" and len(numbers) == 3:
        rate, size, gap_s = numbers
        if not size.is_integer():
            raise ValueError(f"bad arrival {text!r}: the burst SIZE is a whole number")
        return ArrivalProcess(kind=kind, rate=rate, burst_size=int(size), gap_s=gap_s)
    raise ValueError(f"bad arrival {text!r}: write {ARRIVAL_FORMS}")


def build_requests(
    prompts: np.ndarray, outputs: np.ndarray, arrival_s: np.ndarray
) -> list[RequestSpec]:
    """Zip lengths and arrival times into requests with ids 0..n-1."""
    return [
        RequestSpec(request_id=i, arrival_s=float(t), prompt_tokens=int(p), output_tokens=int(o))
        for i, (p, o, t) in enumerate(zip(prompts, outputs, arrival_s, strict=True))
    ]


def _uniform(rng: np.random.Generator, low: int, high: int, n: int) -> np.ndarray:
    """Integers uniform on the closed range [low, high] (the paper's U[a, b])."""
    return rng.integers(low, high, size=n, endpoint=True)


def _lognormal_clipped(
    rng: np.random.Generator, mean: float, sigma: float, low: int, high: int, n: int
) -> np.ndarray:
    return np.clip(np.rint(rng.lognormal(mean, sigma, size=n)), low, high).astype(np.int64)


def uniform_short_lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Paper: prompt U[128, 1024], output U[64, 256]."""
    return _uniform(rng, 128, 1024, n), _uniform(rng, 64, 256, n)


def mixed_long_lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Paper: prompt U[16384, 65536] with p = 0.2, else U[512, 4096]; output U[128, 512]."""
    is_long = rng.random(n) < 0.2
    prompts = np.where(is_long, _uniform(rng, 16384, 65536, n), _uniform(rng, 512, 4096, n))
    return prompts, _uniform(rng, 128, 512, n)


def agentic_burst_lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Paper: prompt lognormal(8.5, 1.0) clipped to [64, 65536], output U[64, 256]."""
    return _lognormal_clipped(rng, 8.5, 1.0, 64, 65536, n), _uniform(rng, 64, 256, n)


def shift_lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Short chat, then long documents, then short chat again (thirds of the trace).

    Chat: prompt U[128, 1024], output U[64, 256] (as `uniform_short`): many requests,
    each holding one state slot and few pages, so the state pool is the one that fills.
    Documents: prompt U[8192, 32768], output U[128, 512]: few requests, KV dominates.
    A split fixed at start-up suits at most one phase.
    """
    first, second = n // 3, n - 2 * (n // 3)
    parts = [
        uniform_short_lengths(rng, first),
        (_uniform(rng, 8192, 32768, second), _uniform(rng, 128, 512, second)),
        uniform_short_lengths(rng, n - first - second),
    ]
    return np.concatenate([p for p, _ in parts]), np.concatenate([o for _, o in parts])


def _log_uniform(rng: np.random.Generator, low: int, high: int, n: int) -> np.ndarray:
    """Integers in [low, high] whose logarithm is uniform: as many prompts of 2k-4k tokens
    as of 16k-32k, where a uniform draw would make most of them longer than 8k."""
    exponents = rng.uniform(math.log(low), math.log(high + 1), size=n)
    return np.exp(exponents).astype(np.int64).clip(low, high)


def longdoc_mix_lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A stationary mix: 30% documents, prompt log-uniform on [2048, 32768], output
    U[128, 512]; 70% chat, prompt U[128, 1024], output U[64, 256].

    Unlike `shift`, the mix does not move: both pools are contested at every moment,
    the case a split chosen for the average mix should handle best.
    """
    is_doc = rng.random(n) < LONGDOC_SHARE
    chat_prompts, chat_outputs = uniform_short_lengths(rng, n)
    doc_prompts = _log_uniform(rng, 2048, MAX_PROMPT_TOKENS, n)
    doc_outputs = _uniform(rng, 128, 512, n)
    return np.where(is_doc, doc_prompts, chat_prompts), np.where(is_doc, doc_outputs, chat_outputs)


def longdoc_burst_lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Groups of `LONGDOC_BURST_SIZE` requests that alternate, chat first: chat (prompt
    U[128, 1024], output U[64, 256]), then long prompts (U[12288, 24576], output
    U[128, 512]).

    Timed by the preset's ``bursts`` arrivals, one group per burst: each burst needs
    the pool that the burst before it left small (state slots for chat, KV pages for
    long prompts) while that burst's requests still run.
    """
    is_long = (np.arange(n) // LONGDOC_BURST_SIZE) % 2 == 1
    chat_prompts, chat_outputs = uniform_short_lengths(rng, n)
    long_prompts, long_outputs = _uniform(rng, 12288, 24576, n), _uniform(rng, 128, 512, n)
    return (
        np.where(is_long, long_prompts, chat_prompts),
        np.where(is_long, long_outputs, chat_outputs),
    )


def conversation_prompts(
    messages: np.ndarray, outputs: np.ndarray, max_prompt_tokens: int = MAX_PROMPT_TOKENS
) -> np.ndarray:
    """Each turn's prompt: the whole history (earlier messages and outputs) plus its
    own message, capped at ``max_prompt_tokens`` (a front end drops the oldest turns).

    Args:
        messages, outputs: [sessions, turns] new-message and output lengths.
    Returns:
        [sessions, turns] prompt lengths, non-decreasing along each row.
    """
    history: np.ndarray = messages.cumsum(axis=1) + outputs.cumsum(axis=1) - outputs
    return history.clip(max=max_prompt_tokens)


def service_estimate_s(prompts: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """A fixed guess of a turn's time in the server: its prompt at
    `PREFILL_TOKENS_PER_S`, then one `STEP_S` decode step per output token.

    Fixed, not the simulator's: the trace must be the same for every allocator, model
    and GPU profile that replays it.
    """
    return prompts / PREFILL_TOKENS_PER_S + outputs * STEP_S


class Turns(NamedTuple):
    """The turns of a `multi_turn` trace, in arrival order: lengths, times, and which
    conversation and turn of it each one is."""

    prompts: np.ndarray
    outputs: np.ndarray
    arrival_s: np.ndarray
    session: np.ndarray
    turn: np.ndarray


def multi_turn_trace(
    rng: np.random.Generator, n: int, sessions: ArrivalProcess
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The preset's trace: prompts, outputs and arrival times of `multi_turn_turns`."""
    turns = multi_turn_turns(rng, n, sessions)
    return turns.prompts, turns.outputs, turns.arrival_s


def multi_turn_turns(rng: np.random.Generator, n: int, sessions: ArrivalProcess) -> Turns:
    """Conversations of U{2..8} turns: a new message U[32, 512], output lognormal(5, 0.8)
    clipped to [32, 1024], each prompt the whole history (`conversation_prompts`).

    Sessions start as ``sessions`` says; a later turn arrives the previous turn's
    `service_estimate_s` plus an exponential think time (mean `THINK_TIME_S`) after
    the previous turn's arrival. The first n turns by arrival time are kept, so every
    conversation keeps a prefix of its turns. n conversations always suffice: a turn
    of a later one arrives after the first turns of the n before it.
    """
    starts = sessions.times(n, rng)  # [n]
    num_turns = _uniform(rng, *MULTI_TURN_TURNS, n)
    shape = (n, MULTI_TURN_TURNS[1])
    messages = _uniform(rng, 32, 512, n * shape[1]).reshape(shape)
    outputs = _lognormal_clipped(rng, 5.0, 0.8, 32, 1024, n * shape[1]).reshape(shape)
    think_s = rng.exponential(THINK_TIME_S, size=shape)
    prompts = conversation_prompts(messages, outputs)
    gaps_s = service_estimate_s(prompts, outputs) + think_s
    offsets_s = np.cumsum(gaps_s, axis=1) - gaps_s  # turn k waits for turns 0..k-1
    times = starts[:, None] + offsets_s
    session, turn = np.indices(shape)
    live = turn < num_turns[:, None]
    # Row-major flattening and a stable sort: ties go to the earlier session, then turn.
    first = np.argsort(times[live], kind="stable")[:n]
    return Turns(*(a[live][first] for a in (prompts, outputs, times, session, turn)))


LengthsFn = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
TraceFn = Callable[
    [np.random.Generator, int, ArrivalProcess], tuple[np.ndarray, np.ndarray, np.ndarray]
]


@dataclass(frozen=True)
class WorkloadPreset:
    """A named workload: its default size and arrivals, and how it draws lengths.

    ``lengths`` draws lengths that ``arrival`` then times; it is None for
    `sharegpt_replay`, whose lengths come from the dataset. ``trace`` replaces it where
    arrival times depend on the lengths (`multi_turn`: a turn follows the previous one's
    service): it draws lengths and times together, ``arrival`` timing what starts
    independently (conversations).
    """

    name: str
    num_requests: int
    arrival: ArrivalProcess
    lengths: LengthsFn | None
    description: str
    trace: TraceFn | None = None

    def __post_init__(self) -> None:
        if self.lengths is not None and self.trace is not None:
            raise ValueError(f"workload {self.name!r}: give lengths or trace, not both")


PRESETS: dict[str, WorkloadPreset] = {
    p.name: p
    for p in (
        WorkloadPreset(
            "uniform_short",
            512,
            ArrivalProcess("steps"),
            uniform_short_lengths,
            "paper: 512 req, prompt U[128,1024], output U[64,256], 1 arrival/step",
        ),
        WorkloadPreset(
            "mixed_long",
            256,
            ArrivalProcess("steps"),
            mixed_long_lengths,
            "paper: 256 req, 20% prompt U[16k,64k] else U[512,4096], output U[128,512]",
        ),
        WorkloadPreset(
            "agentic_burst",
            256,
            ArrivalProcess("poisson", rate=1.0 / (0.1 * STEP_S)),
            agentic_burst_lengths,
            "paper: 256 req, exp gaps mean 0.1 step, prompt lognormal(8.5,1) [64,64k]",
        ),
        WorkloadPreset(
            "sharegpt_replay",
            512,
            ArrivalProcess("steps"),
            None,
            "paper: ShareGPT first turns, prompt 1.3 x words [16,4096], "
            "output lognormal(4.5,1) [32,2048]",
        ),
        WorkloadPreset(
            "shift",
            384,
            ArrivalProcess("steps"),
            shift_lengths,
            "ours: chat U[128,1024] -> documents U[8k,32k] -> chat, thirds",
        ),
        WorkloadPreset(
            "longdoc_mix",
            256,
            ArrivalProcess("poisson", rate=LONGDOC_MIX_RATE),
            longdoc_mix_lengths,
            "ours: 256 req, 30% documents log-U[2k,32k] else chat U[128,1024], "
            f"Poisson {LONGDOC_MIX_RATE:g} req/s",
        ),
        WorkloadPreset(
            "longdoc_burst",
            256,
            ArrivalProcess(
                "bursts",
                rate=LONGDOC_BURST_RATE,
                burst_size=LONGDOC_BURST_SIZE,
                gap_s=LONGDOC_BURST_GAP_S,
            ),
            longdoc_burst_lengths,
            f"ours: 256 req, bursts of {LONGDOC_BURST_SIZE} alternating chat U[128,1024] "
            f"and U[12k,24k], {LONGDOC_BURST_GAP_S:g} s apart",
        ),
        WorkloadPreset(
            "multi_turn",
            1024,
            ArrivalProcess("poisson", rate=MULTI_TURN_SESSION_RATE),
            None,
            "ours: 1024 turns of 2-8-turn conversations, prompt = history + U[32,512], "
            f"{MULTI_TURN_SESSION_RATE:g} conversations/s",
            trace=multi_turn_trace,
        ),
    )
}
"""The workloads `avmp bench` knows, by name. The paper's rules leave `sharegpt_replay`'s
size and arrivals open; we use 512 requests arriving one per step. `multi_turn` is
longer than the others so that most of its turns are later turns: at 256 requests about
two turns in five would be first turns, at 1024 about one in four."""


def preset(name: str) -> WorkloadPreset:
    """The preset called ``name`` (ValueError listing the known ones otherwise)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(PRESETS)}") from None


def make_workload(
    name: str,
    seed: int,
    num_requests: int | None = None,
    arrival: ArrivalProcess | None = None,
    sharegpt_rules: str = "paper",
) -> list[RequestSpec]:
    """Generate a preset's trace: same name, seed, size and arrivals give the same trace.

    Args:
        name: a key of `PRESETS`.
        seed: seeds the lengths and (for random arrivals) the arrival times.
        num_requests: overrides the preset's size.
        arrival: overrides the preset's arrival process. A preset drawn with its
            times (`multi_turn`) keeps its lengths and order and takes these times
            instead, as every other preset does.
        sharegpt_rules: ``paper`` or ``vllm`` (only for `sharegpt_replay`).
    """
    spec = preset(name)
    n = spec.num_requests if num_requests is None else num_requests
    if n < 1:
        raise ValueError(f"num_requests must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    if spec.trace is not None:
        prompts, outputs, times = spec.trace(rng, n, spec.arrival)
        if arrival is not None:
            times = arrival.times(n, rng)
        return build_requests(prompts, outputs, times)
    if spec.lengths is None:
        from avmp.bench.sharegpt import sample_lengths

        prompts, outputs = sample_lengths(n, seed, rules=sharegpt_rules)
    else:
        prompts, outputs = spec.lengths(rng, n)
    return build_requests(prompts, outputs, (arrival or spec.arrival).times(n, rng))


def with_arrivals(
    requests: list[RequestSpec], arrival: ArrivalProcess, seed: int
) -> list[RequestSpec]:
    """The same requests re-timed by another arrival process (lengths unchanged)."""
    times = arrival.times(len(requests), np.random.default_rng(seed))
    return [replace(r, arrival_s=float(t)) for r, t in zip(requests, times, strict=True)]


# ---- workloads with shared content, for prefix caching ------------------------------
#
# Their requests carry `RequestSpec.segments`: which content their prompts share. They
# are kept apart from `PRESETS`, so that `avmp bench`'s default grid and its figures do
# not change; `benchmarks/prefix.py` runs them.

AGENT_SYSTEM_TOKENS = 6000
"""An agent's system prompt and tool definitions, shared by every session."""
AGENT_TURNS = (8, 24)
"""Fewest and most turns (tool calls) of an `agent_loop` session."""
AGENT_SESSION_RATE = 1.0
"""Agent sessions started per second."""
FEW_SHOT_TEMPLATES = 4
"""Few-shot templates of `few_shot`, each a shared prefix of examples."""
FEW_SHOT_RATE = 20.0
"""Requests/s of `few_shot` and `shared_shift`."""
SHAREGPT_OUTPUT_TOKENS = (1, 2048)
"""Fewest and most output tokens of a `sharegpt_multi_turn` turn (its answer's tokens,
clipped): at most 2,048, as the ShareGPT paper rules clip outputs (few answers are
longer), and at least one, as every request generates."""
SHARED_SHIFT_TOKENS = (1500, 700, 100)
"""vllm-project/vllm#45238's shape: 1,500 shared + 700 unique tokens, and the same
requests with the shared part 100 tokens longer (the unique part as much shorter)."""


def multi_turn_prefix_requests(rng: np.random.Generator, n: int) -> list[RequestSpec]:
    """`multi_turn`'s conversations (its lengths, turns and times), each turn's prompt
    the whole history as segments: earlier messages and outputs, then its own message.
    A history cut at `MAX_PROMPT_TOKENS` (the front end dropped its oldest turns) shares
    nothing with the turns before."""
    turns = multi_turn_turns(rng, n, preset("multi_turn").arrival)
    history: dict[int, list[tuple[object, int]]] = {}
    requests = []
    for i in np.argsort(turns.session * 1000 + turns.turn, kind="stable"):
        session, turn = int(turns.session[i]), int(turns.turn[i])
        prompt, output = int(turns.prompts[i]), int(turns.outputs[i])
        past = history.setdefault(session, [])
        message = prompt - sum(length for _, length in past)
        segments = [*past, (("message", session, turn), message)]
        if message < 1:  # capped: the oldest turns were dropped
            segments = [(("capped", session, turn), prompt)]
        output_id = ("output", session, turn)
        requests.append(RequestSpec(int(i), float(turns.arrival_s[i]), prompt, output,
                                    tuple(segments), output_id))  # fmt: skip
        past[:] = [*segments, (output_id, output)] if message >= 1 else []
    return sorted(requests, key=lambda r: r.request_id)


def sharegpt_multi_turn_requests(
    rng: np.random.Generator, n: int, limit: int | None = None, progress: bool = False
) -> list[RequestSpec]:
    """ShareGPT conversations replayed turn by turn: ``n`` conversations shuffled by
    ``rng`` (`sharegpt.sample_conversations`: their human/gpt pairs in Tekken token
    counts), each turn's prompt the whole history as segments, earlier messages and
    answers, then its own message; output = the answer's tokens clipped to
    `SHAREGPT_OUTPUT_TOKENS`.

    Timed as `multi_turn`: conversations start as a Poisson process at
    `MULTI_TURN_SESSION_RATE`, a later turn arrives the previous turn's
    `service_estimate_s` plus an exponential think time (mean `THINK_TIME_S`) after it.
    A turn whose history exceeds `MAX_PROMPT_TOKENS` is capped to it and shares nothing
    (the front end dropped its oldest turns), as are the conversation's later turns. The
    first n turns by arrival are kept (ids in arrival order).

    Args:
        limit: use only the first ``limit`` conversations of the dataset (tests).
        progress: show a progress bar while tokenizing what the length cache lacks.
    """
    from avmp.bench.sharegpt import sample_conversations

    conversations = sample_conversations(n, rng, limit=limit, progress=progress)
    starts = ArrivalProcess("poisson", rate=MULTI_TURN_SESSION_RATE).times(n, rng)
    think_s = iter(rng.exponential(THINK_TIME_S, size=sum(map(len, conversations))).tolist())
    records = []
    for session, pairs in enumerate(conversations):
        past: list[tuple[object, int]] = []
        history, now = 0, float(starts[session])  # history: every earlier token, uncapped
        for turn, (message, answer) in enumerate(pairs):
            output = int(np.clip(answer, *SHAREGPT_OUTPUT_TOKENS))
            history += message
            if history > MAX_PROMPT_TOKENS:
                past = [(("capped", session, turn), MAX_PROMPT_TOKENS)]
            else:
                past.append((("message", session, turn), message))
            prompt, output_id = sum(length for _, length in past), ("output", session, turn)
            records.append((now, prompt, output, tuple(past), output_id))
            past.append((output_id, output))
            history += output
            now += float(service_estimate_s(np.array(prompt), np.array(output))) + next(think_s)
    return _first_by_arrival(records, n)


def agent_loop_requests(rng: np.random.Generator, n: int) -> list[RequestSpec]:
    """Agent sessions behind one shared system prompt and tools (`AGENT_SYSTEM_TOKENS`):
    U{8..24} turns each, a tool result U[50, 400] per turn, a short action U[16, 160] as
    output, each prompt the session's whole history; the next turn arrives the turn's
    `service_estimate_s` plus an exponential 0.5 s of tool time later."""
    starts = ArrivalProcess("poisson", rate=AGENT_SESSION_RATE).times(n, rng)
    records = []
    for session in range(n):
        past: list[tuple[object, int]] = [("agent-system", AGENT_SYSTEM_TOKENS)]
        now = float(starts[session])
        for turn in range(int(_uniform(rng, *AGENT_TURNS, 1)[0])):
            result = ("tool-result", session, turn)
            past.append((result, int(_uniform(rng, 50, 400, 1)[0])))
            prompt = sum(length for _, length in past)
            output = int(_uniform(rng, 16, 160, 1)[0])
            action = ("action", session, turn)
            records.append((now, prompt, output, tuple(past), action))
            past.append((action, output))
            now += float(service_estimate_s(np.array(prompt), np.array(output)))
            now += float(rng.exponential(0.5))
    return _first_by_arrival(records, n)


def few_shot_requests(rng: np.random.Generator, n: int) -> list[RequestSpec]:
    """Few-shot prompts: one of `FEW_SHOT_TEMPLATES` templates (its examples, U[1000,
    3000] tokens, shared by every request that picks it) and a question U[20, 300];
    output U[8, 128]; Poisson `FEW_SHOT_RATE` requests/s."""
    template_tokens = _uniform(rng, 1000, 3000, FEW_SHOT_TEMPLATES)
    picks = rng.integers(0, FEW_SHOT_TEMPLATES, size=n)
    questions, outputs = _uniform(rng, 20, 300, n), _uniform(rng, 8, 128, n)
    times = ArrivalProcess("poisson", rate=FEW_SHOT_RATE).times(n, rng)
    requests = []
    for i in range(n):
        template = int(picks[i])
        segments = ((("examples", template), int(template_tokens[template])),
                    (("question", i), int(questions[i])))  # fmt: skip
        prompt = sum(length for _, length in segments)
        requests.append(RequestSpec(i, float(times[i]), prompt, int(outputs[i]), segments))
    return requests


def shared_shift_requests(rng: np.random.Generator, n: int) -> list[RequestSpec]:
    """vllm#45238's shape: every prompt 2,200 tokens, the first 1,500 shared and 700
    unique; every other request shares 1,600 and keeps 600 unique (the 100-token shift
    that moved vLLM's one kept state into the shared part). Output U[32, 128]; Poisson
    `FEW_SHOT_RATE` requests/s."""
    shared, unique, shift = SHARED_SHIFT_TOKENS
    times = ArrivalProcess("poisson", rate=FEW_SHOT_RATE).times(n, rng)
    outputs = _uniform(rng, 32, 128, n)
    requests = []
    for i in range(n):
        extra = shift if i % 2 else 0
        segments = (("document", shared + extra), (("unique", i), unique - extra))
        requests.append(RequestSpec(i, float(times[i]), shared + unique, int(outputs[i]),
                                    segments))  # fmt: skip
    return requests


def _first_by_arrival(records: list[tuple[float, int, int, tuple[tuple[object, int], ...],
                                          object]], n: int) -> list[RequestSpec]:  # fmt: skip
    """The first ``n`` records by arrival time, as requests with ids in arrival order."""
    records.sort(key=lambda record: record[0])
    return [RequestSpec(i, t, prompt, output, segments, output_id)
            for i, (t, prompt, output, segments, output_id) in enumerate(records[:n])]  # fmt: skip


PrefixTraceFn = Callable[[np.random.Generator, int], list[RequestSpec]]
PREFIX_PRESETS: dict[str, tuple[int, PrefixTraceFn, str]] = {
    "multi_turn_prefix": (1024, multi_turn_prefix_requests,
                          "multi_turn's conversations, each prompt the whole history"),
    "sharegpt_multi_turn": (1024, sharegpt_multi_turn_requests,
                            "ShareGPT conversations turn by turn, each prompt the whole "
                            "history"),
    "agent_loop": (512, agent_loop_requests,
                   f"agent sessions: {AGENT_SYSTEM_TOKENS}-token shared system prompt + "
                   "tools, 8-24 short turns each"),
    "few_shot": (512, few_shot_requests,
                 f"{FEW_SHOT_TEMPLATES} few-shot templates U[1000,3000] + a question U[20,300]"),
    "shared_shift": (256, shared_shift_requests,
                     "vllm#45238: 1,500 shared + 700 unique tokens, half shifted by 100"),
}  # fmt: skip
"""Workloads with shared content, by name: default size, generator, description."""


def make_prefix_workload(name: str, seed: int, num_requests: int | None = None,
                         progress: bool = False) -> list[RequestSpec]:  # fmt: skip
    """Generate a `PREFIX_PRESETS` trace (ValueError for an unknown name or a size < 1);
    ``progress``: a progress bar while `sharegpt_multi_turn` tokenizes conversations."""
    if name not in PREFIX_PRESETS:
        raise ValueError(f"unknown prefix workload {name!r}; known: {', '.join(PREFIX_PRESETS)}")
    default, generate, _ = PREFIX_PRESETS[name]
    n = default if num_requests is None else num_requests
    if n < 1:
        raise ValueError(f"num_requests must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    if generate is sharegpt_multi_turn_requests:
        return sharegpt_multi_turn_requests(rng, n, progress=progress)
    return generate(rng, n)
