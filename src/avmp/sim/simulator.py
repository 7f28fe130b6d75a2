"""Trace replay: run a trace through the scheduler and an allocator on a simulated clock.

Requests join the waiting queue when the clock reaches their arrival (an idle simulator
jumps to the next arrival). A request whose prompt holds an earlier request's output (a
conversation's next turn: its segments name that request's ``output_segment``) joins no
earlier than that output's last token, as a client sends the next turn only once it has
the answer: a trace times turns by a fixed guess of the service time, which a slower
model or a longer queue overruns. Each step, the scheduler plans a batch, the time model says
how long it takes, and the allocator's counters say how much allocation, migration and
compaction cost on top. The clock never reads the machine's time, so the same inputs
give the same result; the real time spent in allocator calls is measured separately.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from avmp.memory.backing.unit_format import CacheFormat
from avmp.memory.spec import CHUNK_GRANULARITY_BYTES, CacheAllocator, MemoryUsage, RequestUnits
from avmp.models.geometry import ModelGeometry
from avmp.sched.prefix import (
    EVICTION_POLICIES,
    PREFIX_CACHE_CHOICES,
    DeviceRates,
    PrefixCache,
    PrefixCacheConfig,
    prefill_flops,
    prefix_cache_config,
)
from avmp.sched.request import RequestSpec
from avmp.sched.scheduler import Scheduler, SchedulerConfig, StepPlan
from avmp.sched.swap import (
    HOST_TIER_RATIO,
    Admission,
    PreemptionCosts,
    PreemptionMode,
    parse_choice,
)
from avmp.sched.timeline import TimelineRecorder
from avmp.sim.calibration import CalibratedModel, load_calibration
from avmp.sim.metrics import PHASES, RequestClock, SimResult, percentile
from avmp.sim.timing import (
    DEFAULT_ALLOCATOR_CALLS_PATH,
    VMM_MIGRATION_S_PER_CHUNK,
    AllocatorCallCosts,
    BatchShape,
    GraphRule,
    MemoryMoveCosts,
    RooflineModel,
    StepTimeModel,
    get_profile,
    load_allocator_call_costs,
    prefill_s_per_token,
    without_recompute,
)

ProgressCallback = Callable[[int, int], None]
# Called once per step with the shape the time model priced and its seconds (recompute
# included), so that a benchmark can set the simulated steps beside an engine's.
StepCallback = Callable[[BatchShape, float], None]

_REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class SimConfig:
    """How a trace is replayed.

    Attributes:
        profile: GPU profile name from `avmp.sim.timing.GPU_PROFILES`.
        calibration: a step-time calibration JSON that replaces the roofline.
        max_num_seqs: running requests at most.
        max_num_batched_tokens: tokens per step at most (chunked prefill).
        max_steps: a safety bound; exceeding it raises instead of stopping silently.
        timeline_samples: timeline points kept, evenly spaced in steps (0: none).
        migration_s_per_chunk: cost of moving one chunk between pools (PEERS.md, VMM).
        compaction_bytes_per_s: copy rate of compaction; None: the profile's bandwidth / 2.
        allocator_calls_path: the allocator-call benchmark's results, read for per-call
            costs when the file exists (relative paths are from the repository root);
            None: the documented constants of `AllocatorCallCosts`.
        check_integrity: check the allocator's and the scheduler's invariants after every
            step (tests; slow).
        preemption: ``recompute``, ``swap`` or ``auto`` (`avmp.sched.swap.PreemptionMode`);
            ``auto`` weighs the time model's prefill speed against the profile's host link.
        admission: ``greedy``, ``reserve`` or ``sglang`` (`avmp.sched.swap.Admission`).
        host_tier_bytes: the host tier swapped-out requests go to; None: twice the cache
            budget (SGLang HiCache's default ``--hicache-ratio 2``); 0: none (recompute).
        prefix_cache: one of `avmp.sched.prefix.PREFIX_CACHE_CHOICES`: ``off``, or the
            checkpoint placement policy of the prefix cache.
        prefix_eviction: one of `avmp.sched.prefix.EVICTION_POLICIES`; None: the
            policy's own (``flops`` for ``avmp``, ``lru`` for the peers' rules, as vLLM
            and SGLang evict).
        prefix_host_level: keep checkpoints the prefix cache evicts in the host tier (a
            second level, `avmp.sched.prefix.HostLevel`; copies charged at the profile's
            host link). Needs a host tier (``host_tier_bytes`` not 0, preemption not
            ``recompute``).
        captured_mixed_graphs: the engine's prefill and mixed graph buckets captured
            before the run, (tokens, sequences, block-table width in tokens) each
            (`avmp.sim.timing.GraphRule`; with a calibration that shows mixed graphs).
        charge_graph_captures: with a calibration, charge a CUDA graph capture (the
            file's cost) whenever a step meets a bucket the run has not captured yet:
            an engine that did not warm up, as an engine replay measures one. Off (the
            default), every bucket counts as captured before the run: a server's steady
            state, since it captures each bucket once in its life, so that layouts
            whose steps meet more distinct shapes are not charged for it.
        overlap: plan each step while the previous one runs, as the engine does by
            default (`avmp.engine.EngineConfig.overlap`; vLLM's async scheduling and
            SGLang's overlap scheduler alike): a step's plan sees only the requests that
            arrived (or were released by their parents' end) before the previous step
            began, so one arriving mid-step waits for the step after the next, and its
            time to first token includes that step. Off: each plan sees every request
            that arrived before it (an engine that plans between steps).
    """

    profile: str = "h100"
    calibration: str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_steps: int = 10_000_000
    timeline_samples: int = 200
    migration_s_per_chunk: float = VMM_MIGRATION_S_PER_CHUNK
    compaction_bytes_per_s: float | None = None
    allocator_calls_path: str | None = str(DEFAULT_ALLOCATOR_CALLS_PATH)
    check_integrity: bool = False
    preemption: str = PreemptionMode.AUTO.value
    admission: str = Admission.RESERVE.value
    host_tier_bytes: int | None = None
    prefix_cache: str = "off"
    prefix_eviction: str | None = None
    prefix_host_level: bool = False
    captured_mixed_graphs: tuple[tuple[int, int, int], ...] = ()
    charge_graph_captures: bool = False
    overlap: bool = False

    def __post_init__(self) -> None:
        get_profile(self.profile)
        if self.prefix_cache not in PREFIX_CACHE_CHOICES:
            raise ValueError(
                f"unknown prefix cache {self.prefix_cache!r}; known: "
                f"{', '.join(PREFIX_CACHE_CHOICES)}"
            )
        if self.prefix_eviction is not None and self.prefix_eviction not in EVICTION_POLICIES:
            raise ValueError(
                f"unknown prefix eviction {self.prefix_eviction!r}; known: "
                f"{', '.join(EVICTION_POLICIES)}"
            )
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.timeline_samples < 0:
            raise ValueError(f"timeline_samples must be >= 0, got {self.timeline_samples}")
        if self.host_tier_bytes is not None and self.host_tier_bytes < 0:
            raise ValueError(f"host_tier_bytes must be >= 0, got {self.host_tier_bytes}")
        # validates the batching limits and the policy names
        self.scheduler_config(CHUNK_GRANULARITY_BYTES, PreemptionCosts(1.0, 1.0))
        self.move_costs()

    def host_tier_for(self, budget_bytes: int) -> int:
        """The host tier's bytes for a cache budget of ``budget_bytes``."""
        if self.host_tier_bytes is None:
            return HOST_TIER_RATIO * budget_bytes
        return self.host_tier_bytes

    def scheduler_config(
        self, budget_bytes: int, costs: PreemptionCosts | None
    ) -> SchedulerConfig:
        """The scheduler's limits and policy for a cache budget of ``budget_bytes``."""
        preemption = parse_choice(PreemptionMode, "preemption", self.preemption)
        host_tier = self.host_tier_for(budget_bytes)
        if host_tier == 0 and preemption is PreemptionMode.AUTO:
            preemption = PreemptionMode.RECOMPUTE  # nowhere to swap to
        if preemption is PreemptionMode.RECOMPUTE:
            host_tier = 0
        return SchedulerConfig(
            self.max_num_seqs,
            self.max_num_batched_tokens,
            preemption=preemption,
            admission=parse_choice(Admission, "admission", self.admission),
            host_tier_bytes=host_tier,
            costs=costs,
        )

    def prefix_cache_config(
        self, geometry: ModelGeometry, block_size: int, model: StepTimeModel | None = None
    ) -> PrefixCacheConfig | None:
        """The prefix cache's policy (None when off; `avmp.sched.prefix.prefix_cache_config`
        resolves it), priced at this run's rates (`prefix_rates`; ``model``: the run's
        time model, None: `time_model`'s)."""
        if self.prefix_cache == "off":
            return None
        rates = self.prefix_rates(geometry, model or self.time_model(geometry))
        return prefix_cache_config(self.prefix_cache, geometry, block_size,
                                   self.prefix_eviction, rates, self.prefix_host_level)  # fmt: skip

    def prefix_rates(self, geometry: ModelGeometry, model: StepTimeModel) -> DeviceRates:
        """What this run charges, as the prefix cache's rules price time: the FLOP rate
        that ``model`` gives a full prefill chunk of this model, the migration and
        compaction costs the clock charges, and the profile's host link.

        Raises:
            ValueError: a time model whose prefill step is not a positive duration.
        """
        profile = get_profile(self.profile)
        chunk = self.max_num_batched_tokens
        per_token = prefill_s_per_token(model, chunk)
        if not (math.isfinite(per_token) and per_token > 0):
            raise ValueError(
                f"the time model ({type(model).__name__}) gave a prefill of {per_token} s/token"
            )
        return DeviceRates(
            flops_per_s=prefill_flops(geometry, chunk) / (chunk * per_token),
            migration_s_per_chunk=self.migration_s_per_chunk,
            compaction_bytes_per_s=self.move_costs().compaction_rate(profile),
            host_bytes_per_s=profile.host_link_bytes_per_s,
        )

    def preemption_costs(self, model: StepTimeModel) -> PreemptionCosts | None:
        """The rates the ``auto`` rule compares (None for the other policies): the time
        model's prefill speed on a full chunk and the profile's host link.

        Raises:
            ValueError: a time model whose prefill step is not a positive duration.
        """
        if self.preemption != PreemptionMode.AUTO:
            return None
        per_token = prefill_s_per_token(model, self.max_num_batched_tokens)
        if not (math.isfinite(per_token) and per_token > 0):
            raise ValueError(
                f"the time model ({type(model).__name__}) gave a prefill of {per_token} s/token"
            )
        return PreemptionCosts(per_token, get_profile(self.profile).host_link_bytes_per_s)

    def move_costs(self) -> MemoryMoveCosts:
        return MemoryMoveCosts(self.migration_s_per_chunk, self.compaction_bytes_per_s)

    def call_costs(self, allocator_name: str) -> AllocatorCallCosts:
        if self.allocator_calls_path is None:
            return AllocatorCallCosts()
        path = Path(self.allocator_calls_path)
        return load_allocator_call_costs(
            allocator_name, path if path.is_absolute() else _REPO_ROOT / path
        )

    def time_model(self, geometry: ModelGeometry) -> StepTimeModel:
        """The calibrated model when a calibration is given, else the roofline."""
        if self.calibration is None:
            return RooflineModel(geometry, get_profile(self.profile))
        model = load_calibration(self.calibration)
        if model.model is not None and model.model != geometry.name:
            raise ValueError(
                f"{self.calibration}: calibrated for model {model.model!r}, not {geometry.name!r}"
            )
        return model


class TimedAllocator(CacheAllocator):
    """Forwards every call to an allocator and adds up the time spent in it.

    Measured with ``perf_counter`` (a thread clock costs ten times more per call and
    would slow the simulation down): in a single-threaded run it is the calls' CPU time
    unless the OS deschedules the process.
    """

    def __init__(self, inner: CacheAllocator) -> None:
        super().__init__(inner.geometry, inner.config)
        self.inner = inner
        self.name = inner.name
        self.stats = inner.stats
        self.elapsed_s = 0.0

    def admit(
        self, request_id: int, num_tokens: int, cached: Sequence[int] = ()
    ) -> RequestUnits | None:
        start = time.perf_counter()
        if cached:
            blocks = self.inner.admit(request_id, num_tokens, cached)
        else:  # stand-ins without a prefix cache take two arguments
            blocks = self.inner.admit(request_id, num_tokens)
        self.elapsed_s += time.perf_counter() - start
        return blocks

    def cache_kv_unit(self, request_id: int, index: int) -> int:
        return self.inner.cache_kv_unit(request_id, index)

    def cache_checkpoint(self) -> int | None:
        return self.inner.cache_checkpoint()

    def free_keeping_slot(self, request_id: int) -> int:
        start = time.perf_counter()
        key = self.inner.free_keeping_slot(request_id)
        self.elapsed_s += time.perf_counter() - start
        return key

    def release_cached(self, key: int) -> None:
        self.inner.release_cached(key)

    def cached_unit(self, key: int) -> int:
        return self.inner.cached_unit(key)

    def cached_keys(self) -> list[int]:
        return self.inner.cached_keys()

    def grow(self, request_id: int, num_new_tokens: int) -> list[int] | None:
        start = time.perf_counter()
        pages = self.inner.grow(request_id, num_new_tokens)
        self.elapsed_s += time.perf_counter() - start
        return pages

    def free(self, request_id: int) -> None:
        start = time.perf_counter()
        self.inner.free(request_id)
        self.elapsed_s += time.perf_counter() - start

    def units(self, request_id: int) -> RequestUnits:
        return self.inner.units(request_id)

    def num_tokens(self, request_id: int) -> int:
        return self.inner.num_tokens(request_id)

    def fits_alone(self, num_tokens: int) -> bool:
        return self.inner.fits_alone(num_tokens)

    def usage(self) -> MemoryUsage:
        return self.inner.usage()

    @property
    def kv_unit_tokens(self) -> int:
        return self.inner.kv_unit_tokens

    def could_hold(self, num_requests: int, num_kv_units: int) -> bool:
        return self.inner.could_hold(num_requests, num_kv_units)

    def cache_format(self) -> CacheFormat:
        return self.inner.cache_format()

    def check_integrity(self) -> None:
        self.inner.check_integrity()

    @property
    def placement_epoch(self) -> int:
        return self.inner.placement_epoch

    @property
    def request_ids(self) -> list[int]:
        return self.inner.request_ids


def _read_counters(allocator: CacheAllocator) -> tuple[int, int, int, int, int, int]:
    """The allocator counters that the time model charges for: admits, grows, frees,
    OOM events, chunks migrated, bytes compacted."""
    s = allocator.stats
    return (
        s.num_admits,
        s.num_grows,
        s.num_frees,
        s.num_oom_events,
        s.num_chunks_migrated,
        s.num_bytes_compacted,
    )


def _host_level_bytes(prefix: PrefixCache | None) -> int:
    """Bytes the prefix cache's host level has copied so far, both ways."""
    host = None if prefix is None else prefix.tree.host
    return 0 if host is None else host.stats.num_bytes_out + host.stats.num_bytes_in


def prefix_report(prefix: PrefixCache | None) -> dict[str, Any]:
    """What the prefix cache did in a run (empty without one): tokens hit and the ideal
    (every reusable token reused), their ratio, checkpoints taken, refused, held at the
    peak (and their bytes), evictions."""
    if prefix is None:
        return {}
    stats, tree = prefix.stats, prefix.tree
    return {
        "policy": tree.config.policy,
        "eviction": tree.config.eviction,
        "num_hit_tokens": stats.num_hit_tokens,
        "num_ideal_tokens": stats.num_ideal_tokens,
        "num_prompt_tokens": stats.num_prompt_tokens,
        "hit_rate_vs_ideal": stats.hit_rate_vs_ideal,
        "num_hits": stats.num_hits,
        "num_checkpoints_taken": stats.num_checkpoints_taken,
        "num_checkpoints_refused": stats.num_checkpoints_refused,
        "peak_checkpoint_bytes": stats.peak_checkpoint_bytes,
        "num_evicted_pages": tree.num_evicted_pages,
        "num_evicted_checkpoints": tree.num_evicted_checkpoints,
        "unit_tokens": tree.unit_tokens,
        **({"host_level": asdict(tree.host.stats)} if tree.host is not None else {}),
        **_rules_report(tree),
    }


def _rules_report(tree: Any) -> dict[str, Any]:
    """``avmp``'s placement rules: checkpoints each took and those requests resumed
    from, and the rules demoted or promoted at the end (`PrefixTree.demoted`)."""
    taken = {kind: n for kind, n in tree.kinds_taken.items() if n}
    if not taken:
        return {}
    rules = {kind: {"taken": n, "reused": tree.kinds_reused[kind]} for kind, n in taken.items()}
    return {"rules": rules, "demoted": sorted(tree.demoted()), "promoted": sorted(tree.promoted())}


def simulate(
    requests: Sequence[RequestSpec],
    allocator: CacheAllocator,
    geometry: ModelGeometry,
    config: SimConfig,
    on_progress: ProgressCallback | None = None,
    on_step: StepCallback | None = None,
) -> SimResult:
    """Replay ``requests`` on ``allocator`` (fresh, holding no request) and report.

    Args:
        on_progress: called with (requests done, total) whenever a request finishes or is
            rejected, for progress bars.
        on_step: called with each step's shape and compute seconds (`StepCallback`).
    Raises:
        ValueError: duplicate request ids, a non-finite arrival time, a used allocator,
            a bad calibration, or a time model that gives a NaN or negative step.
        RuntimeError: more than ``config.max_steps`` steps.
    """
    return _Simulation(requests, allocator, geometry, config, on_progress, on_step).run()


def _output_parents(arrivals: Sequence[RequestSpec]) -> dict[int, list[int]]:
    """For each request whose prompt names an earlier arrival's output, those earlier
    requests (in arrival order). A later arrival's output is no parent: a trace that
    names it is taken as it is, which also rules out cycles."""
    producer: dict[Hashable, int] = {}
    parents: dict[int, list[int]] = {}
    for spec in arrivals:
        named = [producer[c] for c, _ in spec.segments if c in producer]
        if named:
            parents[spec.request_id] = list(dict.fromkeys(named))
        if spec.output_segment is not None:
            producer.setdefault(spec.output_segment, spec.request_id)
    return parents


def _check_finite_arrivals(requests: Sequence[RequestSpec]) -> None:
    """Refuse a NaN or infinite arrival: the clock could never reach it, so the event
    loop would spin forever (NaN) or jump to infinity (inf)."""
    for spec in requests:
        if not math.isfinite(spec.arrival_s):
            raise ValueError(f"request {spec.request_id}: arrival_s is {spec.arrival_s}")


class _Simulation:
    """One replay: the clock, the scheduler and the recorders it fills."""

    def __init__(
        self,
        requests: Sequence[RequestSpec],
        allocator: CacheAllocator,
        geometry: ModelGeometry,
        config: SimConfig,
        on_progress: ProgressCallback | None,
        on_step: StepCallback | None = None,
    ) -> None:
        if allocator.request_ids:
            raise ValueError("simulate() needs an allocator that holds no request")
        if len({r.request_id for r in requests}) != len(requests):
            raise ValueError("request ids must be unique")
        _check_finite_arrivals(requests)
        self.config = config
        self.arrivals = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
        self.parents = _output_parents(self.arrivals)
        self.held: dict[int, list[RequestSpec]] = {}  # unfinished parent -> requests held
        # held requests whose parents have all ended, with the time each was released
        self.ready: list[tuple[float, RequestSpec]] = []
        self.ended: set[int] = set()  # rejected requests (finished ones: `clock.finish_s`)
        self.num_held_s = 0.0
        self.num_held = 0
        self.allocator = allocator
        self.timed = TimedAllocator(allocator)
        self.model = config.time_model(geometry)
        mixed = isinstance(self.model, CalibratedModel) and self.model.mixed_graphs
        self.graphs = GraphRule(
            config.max_num_batched_tokens, mixed, captured=config.captured_mixed_graphs
        )
        self.num_graph_captures = 0  # graphs captured mid-run, with a calibrated model
        self.graph_capture_s = 0.0
        self.captured_steps_s = 0.0  # the time of the steps that captured them
        scheduler_config = config.scheduler_config(
            allocator.config.budget_bytes, config.preemption_costs(self.model)
        )
        prefix = config.prefix_cache_config(geometry, allocator.config.block_size, self.model)
        if prefix is not None:
            scheduler_config = replace(scheduler_config, prefix_cache=prefix)
        self.scheduler = Scheduler(self.timed, scheduler_config)
        if self.scheduler.prefix is not None:  # evicted checkpoints go to the host tier
            self.scheduler.prefix.use_host_tier(self.scheduler.host_tier)
        self.host_link_bytes_per_s = get_profile(config.profile).host_link_bytes_per_s
        self.num_swap_bytes = 0
        self.call_costs = config.call_costs(allocator.name)
        self.compaction_rate = config.move_costs().compaction_rate(get_profile(config.profile))
        self.on_progress = on_progress
        self.on_step = on_step
        self.clock = RequestClock()
        self.timeline = TimelineRecorder(config.timeline_samples)
        self.phase_s = dict.fromkeys(PHASES, 0.0)
        self.now_s = self.arrivals[0].arrival_s if self.arrivals else 0.0
        # under ``overlap``, when the step now ending began (its successor was planned
        # then); None when no step runs back to back with the next plan
        self.planned_s: float | None = None
        self.next_arrival = 0
        self.num_steps = 0
        self.num_done = 0
        self.num_recompute_tokens = 0

    def run(self) -> SimResult:
        while (self.next_arrival < len(self.arrivals) or self.ready
               or self.scheduler.has_unfinished):  # fmt: skip
            self._add_arrivals(self._plan_sees_until())
            if self.scheduler.has_unfinished:
                self._step()
                continue
            # idle: the next plan is made when work comes, and sees what came
            self.planned_s = None
            if not self.ready and self.next_arrival < len(self.arrivals):
                self.now_s = max(self.now_s, self.arrivals[self.next_arrival].arrival_s)
        assert not self.held, "a held request outlived its parents"
        self._report_progress(force=True)
        return self._result()

    def _plan_sees_until(self) -> float:
        """The latest arrival the next plan sees: now, or under ``overlap`` while steps
        run back to back, the start of the step now ending (when the engine planned
        the next one)."""
        if self.config.overlap and self.planned_s is not None:
            return self.planned_s
        return self.now_s

    def _add_arrivals(self, until_s: float) -> None:
        """Queue the requests that arrived by ``until_s``, and those released by their
        parents' end by then; hold an arrival whose parent's output is not finished yet."""
        ready, self.ready = self.ready, []
        for released_s, spec in ready:
            if released_s <= until_s:
                self._queue(spec, released_s)
            else:
                self.ready.append((released_s, spec))
        while (
            self.next_arrival < len(self.arrivals)
            and self.arrivals[self.next_arrival].arrival_s <= until_s
        ):
            spec = self.arrivals[self.next_arrival]
            self.next_arrival += 1
            if not self._hold(spec):
                self._queue(spec, spec.arrival_s)

    def _hold(self, spec: RequestSpec) -> bool:
        """Hold ``spec`` on its latest parent still live; False when none is."""
        waiting_for = [p for p in self.parents.get(spec.request_id, ()) if self._is_live(p)]
        if waiting_for:
            self.held.setdefault(waiting_for[-1], []).append(spec)
        return bool(waiting_for)

    def _is_live(self, request_id: int) -> bool:
        """Whether a request has arrived (or been held) and not ended yet."""
        return (request_id not in self.clock.finish_s
                and request_id not in self.ended)  # fmt: skip

    def _queue(self, spec: RequestSpec, arrival_s: float) -> None:
        if arrival_s > spec.arrival_s:
            self.num_held += 1
            self.num_held_s += arrival_s - spec.arrival_s
        self.clock.arrival_s[spec.request_id] = arrival_s
        self.clock.num_output[spec.request_id] = 0
        self.scheduler.add_request(spec)

    def _release(self, ended: Sequence[int]) -> None:
        """Requests ``ended`` (finished or rejected): release what they held, or hold it
        on another parent not ended yet."""
        for request_id in ended:
            self.ended.add(request_id)
            for spec in self.held.pop(request_id, ()):
                if not self._hold(spec):
                    self.ready.append((self.now_s, spec))

    def _step(self) -> None:
        self.planned_s = self.now_s  # the next step is planned as this one begins
        before = _read_counters(self.allocator)
        host_before = _host_level_bytes(self.scheduler.prefix)
        plan = self.scheduler.schedule()
        if plan.is_empty and not plan.rejected and not plan.preempted:
            self._raise_stalled()
        compute_s, recompute_s = self._compute_seconds(plan)
        outcome = self.scheduler.finish_step(plan)
        self._charge(before, compute_s, recompute_s)
        self._charge_swaps(plan, _host_level_bytes(self.scheduler.prefix) - host_before)
        self.num_steps += 1
        if self.num_steps > self.config.max_steps:
            raise RuntimeError(f"simulation exceeded max_steps={self.config.max_steps}")
        for request_id in outcome.emitted:
            self.clock.num_output[request_id] += 1
        self.clock.record_emitted(outcome.emitted, self.now_s)
        self.clock.record_finished(outcome.finished, self.now_s)
        self.num_done += len(outcome.finished) + len(plan.rejected)
        if self.held:
            self._release([*outcome.finished, *(r.request_id for r in plan.rejected)])
        if outcome.finished or plan.rejected:
            self._report_progress()
        if self.config.check_integrity:
            self.allocator.check_integrity()
            self.scheduler.check_integrity()
        self._maybe_sample()

    def _compute_seconds(self, plan: StepPlan) -> tuple[float, float]:
        """GPU seconds of the step, split into fresh work and recompute after preemption
        (the recompute share is the step's cost minus that of its fresh tokens alone)."""
        shape = BatchShape.from_chunks(plan.chunks)
        captured = None
        if isinstance(self.model, CalibratedModel):  # the roofline knows no graphs
            shape, captured = self.graphs.take(shape)
            if not self.config.charge_graph_captures:
                captured = None  # captured before the run (a warmed-up server)
            if captured is not None:
                self._charge_capture(self.model.capture_seconds(captured))
        total_s = self.model.step_seconds(shape)
        if not (math.isfinite(total_s) and total_s >= 0):
            # A NaN step would freeze the clock (NaN compares false with every arrival).
            raise ValueError(
                f"the time model ({type(self.model).__name__}) gave a step of {total_s} s"
            )
        if captured is not None:  # the engine times this step with its capture
            self.captured_steps_s += total_s
        if self.on_step is not None:
            self.on_step(shape, total_s)
        recompute_tokens = plan.num_recompute_tokens
        if recompute_tokens == 0:
            return total_s, 0.0
        self.num_recompute_tokens += recompute_tokens
        fresh = BatchShape.from_chunks(without_recompute(plan.chunks))
        fresh_s = self.model.step_seconds(self.graphs.shape(fresh, record=False))
        return fresh_s, total_s - fresh_s

    def _charge_capture(self, seconds: float) -> None:
        """A CUDA graph captured in this step: the engine captures it before the step's
        kernels run, so the step's tokens come that much later. Not a phase of
        ``phase_s``: the engine reports its captures apart too (``graph_capture_s``)."""
        self.num_graph_captures += 1
        self.graph_capture_s += seconds
        self.now_s += seconds

    def _charge(self, before: tuple[int, ...], compute_s: float, recompute_s: float) -> None:
        """Advance the clock by the step's phases, each from a deterministic model."""
        phase_s = self.phase_s
        phase_s["compute"] += compute_s
        phase_s["recompute"] += recompute_s
        self.now_s += compute_s + recompute_s
        after = _read_counters(self.allocator)
        if after == before:
            return
        costs = self.call_costs
        allocation_us = (
            (after[0] - before[0]) * costs.admit_us
            + (after[1] - before[1]) * costs.grow_us
            + (after[2] - before[2]) * costs.free_us
            + (after[3] - before[3]) * costs.failed_us
        )
        moves = {
            "allocation": allocation_us * 1e-6,
            "migration": (after[4] - before[4]) * self.config.migration_s_per_chunk,
            "compaction": (after[5] - before[5]) / self.compaction_rate,
        }
        for phase, seconds in moves.items():
            phase_s[phase] += seconds
            self.now_s += seconds

    def _charge_swaps(self, plan: StepPlan, num_checkpoint_bytes: int = 0) -> None:
        """The step's copies to and from the host tier, at the profile's host link:
        swapped requests, and the prefix cache's checkpoints (``num_checkpoint_bytes``,
        kept or restored while the step was planned and finished); the engine orders
        them before the step's kernels or after them, so they add to the step."""
        self.num_swap_bytes += plan.num_swap_bytes  # requests' (checkpoints': their report)
        num_bytes = plan.num_swap_bytes + num_checkpoint_bytes
        if num_bytes:
            seconds = num_bytes / self.host_link_bytes_per_s
            self.phase_s["swap"] += seconds
            self.now_s += seconds

    def _raise_stalled(self) -> None:
        raise RuntimeError(
            f"scheduler stalled at step {self.num_steps}: {self.scheduler.num_waiting} waiting, "
            f"{self.scheduler.num_running} running, nothing scheduled (allocator "
            f"{self.allocator.name!r} refuses work that fits_alone() accepts?)"
        )

    def _maybe_sample(self) -> None:
        if self.timeline.should_sample(self.num_steps - 1):
            self.timeline.add(
                self.now_s,
                self.allocator.usage(),
                self.scheduler.num_running,
                self.scheduler.num_waiting,
            )

    def _report_progress(self, *, force: bool = False) -> None:
        if self.on_progress is not None:
            total = len(self.arrivals)
            self.on_progress(total if force else self.num_done, total)

    def _result(self) -> SimResult:
        completed = len(self.clock.finish_s)
        output_tokens = sum(self.clock.num_output[r] for r in self.clock.finish_s)
        first_arrival = self.arrivals[0].arrival_s if self.arrivals else 0.0
        last_finish = max(self.clock.finish_s.values(), default=first_arrival)
        makespan_s = last_finish - first_arrival
        ttfts, tpots = self.clock.ttfts(), self.clock.tpots()
        rejections = [
            {"request_id": r.request_id, "reason": r.reason} for r in self.scheduler.rejections
        ]
        return SimResult(
            allocator=self.allocator.name,
            num_requests=len(self.arrivals),
            num_completed=completed,
            num_rejected=len(rejections),
            rejections=rejections,
            makespan_s=makespan_s,
            request_throughput=completed / makespan_s if makespan_s > 0 else 0.0,
            output_token_throughput=output_tokens / makespan_s if makespan_s > 0 else 0.0,
            num_preemptions=self.scheduler.num_preemptions,
            num_oom_events=self.allocator.stats.num_oom_events,
            ttft_p50_s=percentile(ttfts, 50),
            ttft_p99_s=percentile(ttfts, 99),
            tpot_p50_s=percentile(tpots, 50),
            tpot_p99_s=percentile(tpots, 99),
            phase_s=dict(self.phase_s),
            timeline=self.timeline.samples(),
            allocator_stats=asdict(self.allocator.stats),
            measured_allocator_cpu_s=self.timed.elapsed_s,
            num_steps=self.num_steps,
            num_output_tokens=output_tokens,
            num_recompute_tokens=self.num_recompute_tokens,
            time_model=type(self.model).__name__,
            completed_requests=self.clock.completed_columns(),
            num_swapped_out=self.scheduler.num_swapped_out,
            num_swapped_in=self.scheduler.num_swapped_in,
            num_swap_bytes=self.num_swap_bytes,
            policy=self._policy(),
            prefix=prefix_report(self.scheduler.prefix),
            held_arrivals=(
                {"num_requests": self.num_held, "total_s": self.num_held_s} if self.num_held else {}
            ),
            num_graph_captures=self.num_graph_captures,
            graph_capture_s=self.graph_capture_s,
            captured_steps_s=self.captured_steps_s,
        )

    def _policy(self) -> dict[str, Any]:
        config = self.scheduler.config
        return {
            "preemption": config.preemption.value,
            "admission": config.admission.value,
            "host_tier_bytes": config.host_tier_bytes,
        }
