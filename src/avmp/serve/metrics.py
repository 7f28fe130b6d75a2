"""The ``/metrics`` endpoint's figures, in Prometheus' text format (prometheus-client).

Two kinds: what the engine loop knows (requests running and waiting, how each pool's
bytes are used, what the allocator and the scheduler did: migrations, chunks moved each
way, compactions, preemptions, swaps, prefix-cache hits and checkpoints, on the device
and in the host level), read from one `EngineLoop.snapshot` per scrape so that the
figures of one scrape agree with each other; and latencies the server measures as it
streams (time to first token, between tokens, end to end), as histograms.

Each app has its own registry, so several servers (or tests) in one process never share
a counter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# seconds; from 1 ms (a tiny model on a GPU) to minutes (a long request under load)
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
)


class EngineCollector(Collector):
    """Reads the engine's gauges and lifetime counters from a snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], Any]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield _gauge(
            "avmp_engine_healthy", "1 while the engine loop runs, else 0", int(snap.healthy)
        )
        yield _gauge("avmp_requests_running", "requests in the running batch", snap.num_running)
        yield _gauge(
            "avmp_requests_waiting", "requests waiting to start or resume", snap.num_waiting
        )
        yield from _memory(snap.usage)
        yield from _allocator(snap.allocator)
        yield from _totals(snap.totals)
        yield from _prefix_cache(snap.totals.prefix)


def _memory(usage: Any) -> Iterator[Metric]:
    yield _gauge("avmp_cache_budget_bytes", "cache memory for both pools", usage.budget_bytes)
    yield _gauge(
        "avmp_cache_unassigned_bytes", "cache memory no pool owns yet", usage.unassigned_bytes
    )
    for pool, used, capacity in (
        ("kv", usage.kv_used_bytes, usage.kv_capacity_bytes),
        ("state", usage.state_used_bytes, usage.state_capacity_bytes),
    ):
        what = "KV pool (pages)" if pool == "kv" else "state pool (slots)"
        yield _gauge(f"avmp_{pool}_pool_used_bytes", f"bytes of the {what} handed out", used)
        yield _gauge(f"avmp_{pool}_pool_capacity_bytes", f"bytes backing the {what}", capacity)


def _allocator(stats: Any) -> Iterator[Metric]:
    yield _counter(
        "avmp_migrations", "migrations of chunks between the pools", stats.num_migrations
    )
    moved = CounterMetricFamily(
        "avmp_chunks_migrated", "chunks migrated, by the pool they went to", labels=["to"]
    )
    for pool in ("kv", "state"):
        moved.add_metric([pool], stats.chunks_migrated_to.get(pool, 0))
    yield moved
    yield _counter("avmp_compactions", "compactions of a pool's tail", stats.num_compactions)
    yield _counter(
        "avmp_oom_events",
        "allocations that failed after migration and compaction",
        stats.num_oom_events,
    )


def _totals(totals: Any) -> Iterator[Metric]:
    yield _counter("avmp_preemptions", "requests preempted", totals.num_preemptions)
    yield _counter(
        "avmp_swapped_out", "preempted requests copied to the host tier", totals.num_swapped_out
    )
    yield _counter("avmp_swapped_in", "requests resumed from the host tier", totals.num_swapped_in)
    yield _counter(
        "avmp_swapped_bytes", "bytes copied to and from the host tier", totals.swapped_bytes
    )
    yield _counter("avmp_engine_steps", "engine steps", totals.num_steps)
    yield _counter(
        "avmp_prompt_tokens", "prompt tokens of requests added", totals.num_prompt_tokens
    )
    yield _counter("avmp_generation_tokens", "tokens generated", totals.num_generated_tokens)


def _prefix_cache(prefix: Any) -> Iterator[Metric]:
    """What the prefix cache did and holds (`avmp.engine.prefix_cache.PrefixCounts`;
    zeros while it is off). The queried and hit tokens are vLLM's two prefix-cache
    counters (``prefix_cache_queries``, ``prefix_cache_hits``), so a hit rate over any
    window is the ratio of their increases."""
    yield _counter(
        "avmp_prefix_cache_queried_tokens",
        "prompt tokens matched against the prefix cache (first admissions)",
        prefix.num_queried_tokens,
    )
    yield _counter(
        "avmp_prefix_cache_hit_tokens",
        "prompt tokens taken from the prefix cache instead of computed",
        prefix.num_hit_tokens,
    )
    yield _counter(
        "avmp_prefix_cache_checkpoints_taken",
        "state checkpoints taken (slot copies, and final states kept in place)",
        prefix.num_checkpoints_taken,
    )
    evicted = CounterMetricFamily(
        "avmp_prefix_cache_evictions", "cached units evicted, by kind", labels=["unit"]
    )
    evicted.add_metric(["page"], prefix.num_evicted_pages)
    evicted.add_metric(["checkpoint"], prefix.num_evicted_checkpoints)
    yield evicted
    yield _gauge(
        "avmp_prefix_cache_checkpoints", "state checkpoints the cache holds", prefix.num_checkpoints
    )
    yield _gauge(
        "avmp_prefix_cache_checkpoint_bytes",
        "bytes of the state checkpoints the cache holds",
        prefix.checkpoint_bytes,
    )
    yield _gauge(
        "avmp_prefix_cache_pages",
        "KV pages in the prefix tree (shared or cache-only)",
        prefix.num_pages,
    )
    yield from _prefix_host_level(prefix)


def _prefix_host_level(prefix: Any) -> Iterator[Metric]:
    """The prefix cache's second level: checkpoints the device evicted, kept in the host
    tier (`avmp.sched.prefix.HostLevel`; zeros while it is off). A host hit is counted
    in ``avmp_prefix_cache_hit_tokens_total`` too; these say which hits came from the
    host and what their copies moved."""
    yield _gauge(
        "avmp_prefix_cache_host_checkpoints",
        "state checkpoints the prefix cache keeps in the host tier",
        prefix.num_host_checkpoints,
    )
    yield _gauge(
        "avmp_prefix_cache_host_checkpoint_bytes",
        "bytes of the state checkpoints the prefix cache keeps in the host tier",
        prefix.host_checkpoint_bytes,
    )
    yield _counter(
        "avmp_prefix_cache_host_hits",
        "prefix-cache hits whose checkpoint was copied in from the host tier",
        prefix.num_host_hits,
    )
    yield _counter(
        "avmp_prefix_cache_host_hit_tokens",
        "prompt tokens of the hits served from the host tier",
        prefix.num_host_hit_tokens,
    )
    copies = CounterMetricFamily(
        "avmp_prefix_cache_host_copies",
        "checkpoint copies between the device and the host tier, by direction",
        labels=["direction"],
    )
    copied = CounterMetricFamily(
        "avmp_prefix_cache_host_copied_bytes",
        "bytes of checkpoint copies between the device and the host tier, by direction",
        labels=["direction"],
    )
    for direction, num_copies, num_bytes in (
        ("out", prefix.num_host_stored, prefix.host_bytes_out),
        ("in", prefix.num_host_hits, prefix.host_bytes_in),
    ):
        copies.add_metric([direction], num_copies)
        copied.add_metric([direction], num_bytes)
    yield copies
    yield copied
    yield _counter(
        "avmp_prefix_cache_host_evictions",
        "checkpoints dropped from the host tier (for better ones, for swapped-out "
        "requests, or with their pages)",
        prefix.num_host_evicted,
    )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class ServerMetrics:
    """One app's registry: the engine collector plus the server's own latencies."""

    def __init__(self, snapshot: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(snapshot))
        histogram = _histogram_factory(self.registry)
        self.ttft_s = histogram(
            "avmp_time_to_first_token_seconds", "from the request's arrival to its first token"
        )
        self.inter_token_s = histogram(
            "avmp_inter_token_latency_seconds", "between successive tokens of a request"
        )
        self.e2e_s = histogram(
            "avmp_e2e_request_latency_seconds", "from the request's arrival to its end"
        )
        self.finished = Counter(
            "avmp_requests_finished",
            "requests that ended, by finish reason",
            ["finish_reason"],
            registry=self.registry,
        )
        self.errors = Counter(
            "avmp_http_errors",
            "requests answered with an error, by HTTP status",
            ["status"],
            registry=self.registry,
        )


def _histogram_factory(registry: CollectorRegistry) -> Callable[[str, str], Histogram]:
    def make(name: str, documentation: str) -> Histogram:
        return Histogram(name, documentation, buckets=LATENCY_BUCKETS_S, registry=registry)

    return make
