"""Synthetic workloads: the AVMP paper's presets, a mix-shift preset, and arrival processes.

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

import numpy as np

from avmp.sched.request import RequestSpec

STEP_S = 0.020
"""Seconds of one "step" of the paper's arrival processes (see the module docstring)."""

ARRIVAL_KINDS = ("burst", "steps", "poisson", "gamma")
MIN_RATE = 1e-6  # requests/s: one request in about 12 days
MAX_CV = 100.0


@dataclass(frozen=True)
class ArrivalProcess:
    """When requests arrive.

    Attributes:
        kind: ``burst`` (all at t = 0), ``steps`` (one every ``step_s``), ``poisson``
            (exponential gaps at ``rate`` requests/s) or ``gamma`` (gamma gaps with mean
            1/``rate`` and coefficient of variation ``cv``: cv > 1 is burstier than
            Poisson, as in vLLM's ``--burstiness``).
        rate: requests per second (poisson and gamma).
        cv: coefficient of variation of the gaps (gamma only).
        step_s: the interval of one step (steps only).
    """

    kind: str = "steps"
    rate: float = 1.0 / STEP_S
    cv: float = 1.0
    step_s: float = STEP_S

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

    def times(self, num_requests: int, rng: np.random.Generator) -> np.ndarray:
        """Arrival times in seconds, non-decreasing, the first at 0."""
        if self.kind == "burst":
            return np.zeros(num_requests)
        if self.kind == "steps":
            return np.arange(num_requests, dtype=float) * self.step_s
        if self.kind == "poisson":
            gaps = rng.exponential(1.0 / self.rate, size=num_requests)
        else:
            shape = 1.0 / (self.cv * self.cv)
            gaps = rng.gamma(shape, 1.0 / (self.rate * shape), size=num_requests)
        gaps[0] = 0.0
        return np.cumsum(gaps)


def parse_arrival(text: str) -> ArrivalProcess:
    """Parse ``burst``, ``steps``, ``poisson:RATE`` or ``gamma:RATE[:CV]`` (a CLI value)."""
    kind, *params = text.strip().split(":")
    try:
        numbers = [float(p) for p in params]
    except ValueError:
        raise ValueError(
            f"bad arrival {text!r}: write burst, steps, poisson:RATE or gamma:RATE:CV"
        ) from None
    if kind in ("burst", "steps") and not numbers:
        return ArrivalProcess(kind=kind)
    if kind == "poisson" and len(numbers) == 1:
        return ArrivalProcess(kind=kind, rate=numbers[0])
    if kind == "gamma" and len(numbers) in (1, 2):
        return ArrivalProcess(
            kind=kind, rate=numbers[0], cv=numbers[1] if len(numbers) == 2 else 1.0
        )
    raise ValueError(f"bad arrival {text!r}: write burst, steps, poisson:RATE or gamma:RATE:CV")


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


@dataclass(frozen=True)
class WorkloadPreset:
    """A named workload: its default size and arrivals, and how it draws lengths.

    ``lengths`` is None for `sharegpt_replay`, whose lengths come from the dataset.
    """

    name: str
    num_requests: int
    arrival: ArrivalProcess
    lengths: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]] | None
    description: str


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
    )
}
"""The workloads `avmp bench` knows, by name. The paper's rules leave `sharegpt_replay`'s
size and arrivals open; we use 512 requests arriving one per step."""


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
        arrival: overrides the preset's arrival process.
        sharegpt_rules: ``paper`` or ``vllm`` (only for `sharegpt_replay`).
    """
    spec = preset(name)
    n = spec.num_requests if num_requests is None else num_requests
    if n < 1:
        raise ValueError(f"num_requests must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    if spec.lengths is None:
        from avmp.bench.sharegpt import sample_lengths

        prompts, outputs = sample_lengths(n, seed, rules=sharegpt_rules)
    else:
        prompts, outputs = spec.lengths(rng, n)
    times = (arrival or spec.arrival).times(n, rng)
    return build_requests(prompts, outputs, times)


def with_arrivals(
    requests: list[RequestSpec], arrival: ArrivalProcess, seed: int
) -> list[RequestSpec]:
    """The same requests re-timed by another arrival process (lengths unchanged)."""
    times = arrival.times(len(requests), np.random.default_rng(seed))
    return [replace(r, arrival_s=float(t)) for r, t in zip(requests, times, strict=True)]
