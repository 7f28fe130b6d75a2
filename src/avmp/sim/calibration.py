"""Step time fitted to measured engine steps: the calibration file, its features, the
linear and physical forms and their fits (`fit_calibration`, `load_calibration`), and what
capturing a CUDA graph costs (`capture_costs`). A `CalibratedModel` is a
`avmp.sim.timing.StepTimeModel`, pricing the same `avmp.sim.timing.BatchShape` as the
roofline.

Calibration file (JSON), written by a GPU benchmark of the engine::

    {
      "gpu": "h100",                      # free text, reported
      "model": "nemotron-h-8b",           # must match the geometry's name when present
      "points": [
        {"num_prefill_tokens": 512, "num_decode_requests": 0, "num_context_tokens": 512,
         "num_attention_pairs": 131328, "num_requests": 1, "step_s": 0.031},
        ...
      ]
    }

The features mean what `BatchShape` means by them: ``num_prefill_tokens`` counts the
tokens of prefill chunks (recompute included), ``num_decode_requests`` the requests
computing one decode token, ``num_context_tokens`` the KV tokens attention reads, i.e.
for every scheduled request the tokens in its cache once the step is done (a decode at
position p counts p + 1, a chunk of n tokens starting at s counts s + n),
``num_attention_pairs`` the causal pairs (a chunk counts ``n * s + n * (n + 1) / 2``),
``num_requests`` the scheduled requests, ``longest_prefill_tokens`` the most tokens
one request computes in the step's prefill chunks (0 for a pure decode step), and
``longest_context_tokens`` the most context tokens of one scheduled request (``s + n``
for a chunk of n tokens at s, decode or prefill), ``graph`` 1 when the step replayed a
CUDA graph and 0 when it ran eagerly, and ``num_padded_tokens`` the rows a graph ran,
padding included (a decode graph without it ran `decode_graph_rows`). Other fields are
ignored.

Optionally the file says what capturing a CUDA graph mid-run costs, as the engine measured
it (benchmarks/calibrate.py, from replays' steps that captured one)::

      "graph_captures": {"decode": {"median_s": 0.07, "count": 39},
                         "mixed": {"median_s": 0.31, "count": 66}}

``median_s`` is the seconds a capture adds to the step that makes it, for a new decode
graph and for a new prefill or mixed graph; the simulator charges it whenever its
`GraphRule` meets a graph the run has not captured (`CalibratedModel.capture_seconds`).
Without the field (files from before it) captures cost nothing.

Step time is fitted on ``1, num_prefill_tokens, num_decode_requests, num_context_tokens,
num_context_tokens / num_requests, has_prefill, num_prefill_attention_pairs,
longest_prefill_tokens, longest_context_tokens, eager_decode_requests, graph_rows,
graph_row_width_tokens, mixed_graph_tokens``.
``has_prefill`` (1 when the step computes any prefill token and runs eagerly, not in a
graph) is the fixed cost of a step the engine runs eagerly: before 238ae36 only pure
decode steps replayed CUDA graphs, so a step that mixed one short prefill chunk into a
decode batch paid every kernel launch from Python (prefill and mixed steps may now
replay graphs too, `GraphRule`; a point without the ``graph`` field is eager). The
mean context per request exists because a decode attention kernel scans one request's KV
serially within a thread block: while the batch does not fill the GPU, a step's latency
follows the longest per-request scan, not the total KV read, so 64 requests of 2,048
tokens cost less than four times 64 of 512. ``num_prefill_attention_pairs`` (pairs minus
context tokens: ``(n - 1) * (s + n / 2)`` per chunk, 0 for decodes) is a prefill chunk's
attention, quadratic over a long prompt: the first three features see a chunk of 8,192
tokens at position 32k as one at 0 plus 32k context tokens, priced at the decode rate.
``longest_prefill_tokens`` exists because the Mamba2 varlen scan (and likely the conv
and attention kernels) runs one sequence's chunk serially: on an H200 a step of 8,192
prefill tokens took ~430 ms as one request's chunk but ~160 ms as 16 chunks of 512, so a
prefill step's time follows its longest chunk, which the token count cannot tell.
``longest_context_tokens`` is the same effect in decode attention: the longest
per-request KV scan. The mean context sees it only when contexts are even; on an H200 a
long-document mix's decode batches (a few requests at 20k-35k tokens beside many short
ones, ~5,000 per request on average) took 5.7-9.4 ms where the mean-context fit predicted
3.6-5.4. It sits beside the mean context rather than replacing it: in batches of even
contexts the two are equal (the fit cannot tell them apart there and keeps the older),
and only skewed batches (the calibration's long-context cells) determine it.

The last four tell a step that replays a CUDA graph from one that runs eagerly, which
the step's shape alone cannot: the engine replays graphs of pure decode steps padded to a
captured batch size (`DECODE_GRAPH_SIZES`), which `BatchShape.from_chunks` marks, and
since 238ae36 of prefill and mixed steps padded to token buckets, which the simulator
marks with a `GraphRule` when the calibration's points show them (`mixed_graphs`).
``eager_decode_requests`` (the decode requests of a step without a graph) prices decode
rows that launch their kernels from Python: on an H200 (Granite-4.0-H-Micro geometry,
replays of ShareGPT and of a long-document mix) a step mixing a few hundred prefill
tokens with 12-18 decode rows took 35-45 ms and one with 25-40 rows 70-80 ms, where a
graph of the same rows took 5-10 ms. ``graph_rows`` (a decode graph's rows, padding
included) and ``graph_row_width_tokens`` (those rows times the graph's block-table width
in tokens, `graph_width_tokens`) price what a graph runs rather than what it needs: in
the long-document replay a decode graph of 33 rows (padded to 64) at contexts up to 31k
tokens took 9.4 ms and one of 32 rows at the same contexts 6.8 ms, while 64-row graphs
of ShareGPT's 1-2k-token contexts took about 5 ms; without the width term a fit on the
long-document steps priced ShareGPT's graph steps 60-90% too high, with it within 6%.
``mixed_graph_tokens`` (a prefill or mixed graph's tokens, padding included) is apart
from the decode graphs' rows: a padded token of a mixed step's GEMMs is not a padded
decode request's row, and no GPU run has measured either against the other yet.

The time the device waits for the host is in ``step_s`` as the benchmarks measure it
(benchmarks/engine.py from its cells, benchmarks/calibrate.py from engine replays' step
rows): the device time of the step (CUDA events recorded by the host
before its first launch and after its last, so an eager step whose launches are slower
than its kernels counts the device's waits between them) plus the device's idle time
before the next step begins, reconstructed from the host's start times. ``has_prefill``
then carries the host's cost of an eager step: its launches and the sampling, settling and
planning after it that the overlap with the next step cannot hide. There is no separate
host-time floor: step records hold no host time of their own on the GPU.

The fit minimises the *relative* error: a plain fit lets the few long prefill steps
dominate the squared error and misses the many short decode steps by tens of percent.
Relative to the *predicted* time (least squares weighted by ``1 / step_s`` first, then
reweighted by the prediction, `_reweighted_fit`), since weighting by the measured time
biases the fit low when steps of one shape are timed noisily (see there). A file from
before a field was recorded still loads: the fit uses mean context only when every point
has ``num_requests``, prefill attention pairs only when every point has
``num_attention_pairs``, the longest chunk only when every point has
``longest_prefill_tokens``, the longest context only when every point has
``longest_context_tokens``, the graph features only when every point has ``graph`` (and
the width term only beside the longest context), and it drops the optional features that
the points cannot tell apart from the rest (the mean context of batch-1 steps,
``has_prefill`` when every step or none has prefill, the longest chunk when every prefill
step holds one chunk, the longest context when every step's contexts are even, the graph
features when no step or every step ran a graph), the mixed graphs' tokens first, then
the graph width, the graph rows, the eager decode requests, the longest context,
``has_prefill``, the mean context, the prefill attention pairs, and the longest chunk
last. At least 4 points of full rank are needed; a step is never predicted below the
fastest measured step.

That is the linear form, of every file without a ``form`` field. A file may instead say
``"form": "physical"`` and name a GPU profile (``"profile": "h200"``) beside its model:
the same points then fit `PhysicalFeatures`, each kind of work a step does in seconds at
the profile's peak (weights read, linear-layer FLOPs over the rows run, prefill
attention FLOPs, KV bytes, the longest attention program's scan, a decode graph's block
table, the recurrent scan, state bytes, and the host's cost of eager steps), with
non-negative coefficients held to the profile's efficiencies where the points do not
determine them (`_anchored_fit`), so that a fit on one kind of workload prices the
steps of another (docs/BENCHMARKS.md). The committed linear files keep their fits.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from avmp.models import resolve_model
from avmp.models.geometry import ModelGeometry
from avmp.sched.graph_buckets import DECODE_GRAPH_SIZES
from avmp.sim.timing import (
    CAPTURE_KINDS,
    DECODE_CAPTURE,
    GPU_PROFILES,
    GRAPH_PAGE_TOKENS,
    MIXED_CAPTURE,
    BatchShape,
    GpuProfile,
    decode_graph_rows,
    get_profile,
    graph_width_tokens,
)

_BASE_FEATURES = ("num_prefill_tokens", "num_decode_requests", "num_context_tokens")
MEAN_CONTEXT_FEATURE = "mean_context_tokens"
EAGER_FEATURE = "has_prefill"
PREFILL_ATTENTION_FEATURE = "num_prefill_attention_pairs"
LONGEST_PREFILL_FEATURE = "longest_prefill_tokens"
LONGEST_CONTEXT_FEATURE = "longest_context_tokens"
EAGER_DECODE_FEATURE = "eager_decode_requests"
GRAPH_ROWS_FEATURE = "graph_rows"
GRAPH_WIDTH_FEATURE = "graph_row_width_tokens"
MIXED_GRAPH_FEATURE = "mixed_graph_tokens"
_LONGEST_FEATURES = (LONGEST_PREFILL_FEATURE, LONGEST_CONTEXT_FEATURE)
# Every feature in coefficient order; a fit uses the base ones and a subset of the rest.
_FULL_FEATURES = (
    *_BASE_FEATURES,
    MEAN_CONTEXT_FEATURE,
    EAGER_FEATURE,
    PREFILL_ATTENTION_FEATURE,
    LONGEST_PREFILL_FEATURE,
    LONGEST_CONTEXT_FEATURE,
    EAGER_DECODE_FEATURE,
    GRAPH_ROWS_FEATURE,
    GRAPH_WIDTH_FEATURE,
    MIXED_GRAPH_FEATURE,
)
# The optional features, the one a fit keeps longest first (see `_feature_sets`).
_OPTIONAL_FEATURES = (
    LONGEST_PREFILL_FEATURE,
    PREFILL_ATTENTION_FEATURE,
    MEAN_CONTEXT_FEATURE,
    EAGER_FEATURE,
    LONGEST_CONTEXT_FEATURE,
    EAGER_DECODE_FEATURE,
    GRAPH_ROWS_FEATURE,
    GRAPH_WIDTH_FEATURE,
    MIXED_GRAPH_FEATURE,
)


def calibration_features(shape: BatchShape) -> tuple[float, ...]:
    """The fit's features of a step, in `_FULL_FEATURES` order: prefill tokens, decode
    requests, context tokens, context tokens per scheduled request, 1.0 when the step
    has prefill tokens, prefill attention pairs beyond the context
    (`BatchShape.num_prefill_attention_pairs`), the longest prefill chunk and the
    longest context of one request, the decode requests of a step that runs eagerly
    (no graph: ``num_graph_rows`` 0), the rows of the decode graph a step replays,
    those rows times the graph's block-table width in tokens (`graph_width_tokens`), and
    the tokens of the prefill or mixed graph a step replays.

    A shape that does not count its requests (``num_requests`` 0, as hand-built shapes
    may) is taken as its decode requests plus one prefilling request when it has
    prefill tokens: the fewest requests that can produce it. One that does not count its
    attention pairs has no prefill attention pairs beyond its context (the fewest). One
    with prefill tokens but no longest chunk (0) is taken as its prefill tokens split
    evenly over its prefilling requests: the shortest longest chunk that can produce it.
    One without a longest context (0) is taken as its mean context (even contexts), so
    rows from before the field keep their predictions. One without graph rows runs its
    decode requests eagerly.
    """
    prefill, decode = shape.num_prefill_tokens, shape.num_decode_requests
    decode_rows = shape.num_graph_rows if prefill == 0 else 0  # else a mixed graph's tokens
    requests = shape.num_requests or decode + (prefill > 0)
    mean_context = shape.num_context_tokens / requests if requests else 0.0
    longest = shape.longest_prefill_tokens
    if prefill > 0 and longest == 0:
        longest = -(-prefill // max(1, requests - decode))
    return (
        float(prefill),
        float(decode),
        float(shape.num_context_tokens),
        mean_context,
        float(prefill > 0 and shape.num_graph_rows == 0),
        float(max(0, shape.num_prefill_attention_pairs)),
        float(longest),
        float(shape.longest_context_tokens or mean_context),
        float(decode if shape.num_graph_rows == 0 else 0),
        float(decode_rows),
        float(decode_rows * graph_width_tokens(shape.longest_context_tokens)),
        float(shape.num_graph_rows - decode_rows),
    )


_MIXED_COLUMN = _FULL_FEATURES.index(MIXED_GRAPH_FEATURE)


@functools.cache
def _columns(features: tuple[str, ...]) -> tuple[int, ...]:
    """Where each of ``features`` sits in `_FULL_FEATURES`."""
    return tuple(_FULL_FEATURES.index(name) for name in features)


# ---- the physical form ----------------------------------------------------------------------

LINEAR_FORM = "linear"
PHYSICAL_FORM = "physical"
# A calibration file's ``form``; files without the field (all from before it) are linear.
CALIBRATION_FORMS = (LINEAR_FORM, PHYSICAL_FORM)

# The physical form's features, each a kind of work one step does, in seconds at the
# profile's peak (`PhysicalFeatures`): the weights read once; the linear layers' FLOPs
# over the rows the step runs (graph padding included) and the LM head's over its
# requests; a prefill chunk's attention FLOPs (its pairs beyond one per context token);
# the KV bytes read and written; the longest attention program's KV bytes at one SM's
# share of the bandwidth (it scans serially); the KV bytes a decode graph's block table
# spans (rows, padding included, times its width: what a graph runs, not what it
# needs); the recurrent scan's FLOPs over the prefill tokens; the state bytes each
# scheduled request reads and writes; and the host's two, in steps and requests: a
# prefill or mixed step run eagerly, and the decode requests of an eager step.
PHYSICAL_FEATURES = (
    "weight_s",
    "linear_s",
    "attention_s",
    "kv_s",
    "kv_program_s",
    "graph_kv_s",
    "scan_s",
    "state_s",
    "eager_steps",
    "eager_decode_requests",
)
# Which peak each feature is priced at, and so which of the profile's efficiencies its
# coefficient is anchored to (`physical_priors`); the host's terms have no peak.
_BYTES_FEATURES = ("weight_s", "kv_s", "kv_program_s", "graph_kv_s", "state_s")
_FLOPS_FEATURES = ("linear_s", "attention_s", "scan_s")

# How strongly a physical fit holds each coefficient to its prior: a coefficient at
# twice its prior costs the fit as much as this many steps each priced 100% off. A
# strong prior, chosen on the H200 replays of sessions 7 and 11 (docs/BENCHMARKS.md, "A
# time model from the model's work"), where weaker ones let a fit on one workload price
# the other's steps worse; a replay's thousands of steps still move the coefficients
# they exercise most (the intercept, the linear layers, the state, the graph width).
PHYSICAL_PRIOR_WEIGHT = 100.0

# The engine's decode attention kernel (avmp.kernels.triton.decode_attention), which the
# simulator cannot import (it needs triton): tokens one program scans at most per
# (request, KV head) split, the most splits, the key block, and programs per SM wanted.
DECODE_SPLIT_MIN_TOKENS = 256
DECODE_MAX_SPLITS = 32
DECODE_BLOCK_TOKENS = 32
DECODE_PROGRAMS_PER_SM = 2


def decode_attention_splits(
    num_rows: int, num_kv_heads: int, max_context_tokens: int, num_sms: int
) -> int:
    """Programs per (request, KV head) of a decode attention launch, as
    ``choose_num_splits`` in avmp.kernels.triton.decode_attention picks them: enough for
    about two programs per SM, never a split shorter than `DECODE_SPLIT_MIN_TOKENS`."""
    wanted = -(-DECODE_PROGRAMS_PER_SM * num_sms // max(num_rows * num_kv_heads, 1))
    by_length = -(-max(max_context_tokens, 1) // DECODE_SPLIT_MIN_TOKENS)
    return max(1, min(wanted, by_length, DECODE_MAX_SPLITS))


@dataclass(frozen=True)
class PhysicalFeatures:
    """What one step of a model does on one GPU, each kind of work apart, in seconds at
    the GPU profile's peak (`PHYSICAL_FEATURES`): the physical form of a calibration
    multiplies them by fitted coefficients, each an inverse efficiency (2.0: that work
    ran at half the peak), so one fit prices any step shape of that model on that GPU.

    Built by `of`; each attribute is what one unit of a kind of work takes at the peak:
    the weights read once (``weight_s``; of a mixture of experts the share its tokens
    route to, ``active_fraction``), a row of the linear layers (2 FLOPs per active
    parameter outside the vocabulary's matrix) and the LM head per scheduled request, a
    causal attention pair (QK^T and PV: ``4 x hidden size`` FLOPs per attention layer),
    a token of KV, a token of one KV head's KV (all attention layers) at one SM's share
    of the bandwidth, a prefill token's recurrent scan (4 FLOPs per state element:
    update and readout) and a scheduled request's state read and written.
    """

    weight_s: float
    active_fraction: float
    linear_s_per_row: float
    lm_head_s_per_request: float
    attention_s_per_pair: float
    kv_s_per_token: float
    kv_program_s_per_token: float
    num_kv_heads: int
    num_sms: int
    scan_s_per_token: float
    state_s_per_request: float

    @classmethod
    def of(cls, geometry: ModelGeometry, profile: GpuProfile) -> PhysicalFeatures:
        """The work of one step of ``geometry`` at ``profile``'s peak.

        Raises:
            ValueError: a model split over ranks (a calibration is of one GPU).
        """
        if geometry.num_ranks != 1:
            raise ValueError("the physical form prices one GPU's steps, not a rank's")
        bandwidth, flops = profile.hbm_bytes_per_s, profile.bf16_flops_per_s
        lm_head = geometry.vocab_size * geometry.hidden_size
        heads = geometry.attention_layers[0].num_kv_heads if geometry.attention_layers else 0
        per_head = sum(layer.kv_bytes_per_token / layer.num_kv_heads
                       for layer in geometry.attention_layers)  # fmt: skip
        scan_flops = 4 * sum(layer.ssm.num_elements for layer in geometry.recurrent_layers
                             if layer.ssm is not None)  # fmt: skip
        return cls(
            weight_s=geometry.weight_bytes / bandwidth,
            active_fraction=min(1.0, geometry.num_active_params / geometry.num_params),
            linear_s_per_row=2.0 * max(0, geometry.num_active_params - lm_head) / flops,
            lm_head_s_per_request=2.0 * lm_head / flops,
            attention_s_per_pair=4.0 * geometry.hidden_size * geometry.num_attention_layers / flops,
            kv_s_per_token=geometry.kv_bytes_per_token / bandwidth,
            kv_program_s_per_token=per_head * profile.num_sms / bandwidth,
            num_kv_heads=heads,
            num_sms=profile.num_sms,
            scan_s_per_token=scan_flops / flops,
            state_s_per_request=2.0 * geometry.state_bytes_per_request / bandwidth,
        )

    def values(self, shape: BatchShape) -> tuple[float, ...]:
        """``shape``'s features in `PHYSICAL_FEATURES` order. Counts a shape leaves at 0
        are taken as `calibration_features` takes them (requests: its decode requests and
        one prefilling request; longest context: the mean)."""
        prefill, decode = shape.num_prefill_tokens, shape.num_decode_requests
        tokens = prefill + decode
        requests = shape.num_requests or decode + (prefill > 0)
        longest = shape.longest_context_tokens or -(-shape.num_context_tokens // max(requests, 1))
        decode_rows = shape.num_graph_rows if prefill == 0 else 0
        untouched = (1.0 - self.active_fraction) ** tokens
        return (
            self.weight_s * (1.0 - untouched),
            self.linear_s_per_row * (shape.num_graph_rows or tokens)
            + self.lm_head_s_per_request * requests,
            self.attention_s_per_pair * max(0, shape.num_prefill_attention_pairs),
            self.kv_s_per_token * (shape.num_context_tokens + tokens),
            self.kv_program_s_per_token * self._program_tokens(shape, longest),
            self.kv_s_per_token * decode_rows * graph_width_tokens(shape.longest_context_tokens),
            self.scan_s_per_token * prefill,
            self.state_s_per_request * requests,
            float(prefill > 0 and shape.num_graph_rows == 0),
            float(decode if shape.num_graph_rows == 0 else 0),
        )

    def _program_tokens(self, shape: BatchShape, longest: int) -> int:
        """The most tokens one attention program scans: in a decode step the longest
        request's share of its splits (`decode_attention_splits`, over the rows the step
        runs and its block table's width), in a prefill or mixed step its longest context
        (the prefill kernel scans a query tile's whole context in one program)."""
        if shape.num_prefill_tokens:
            return longest
        rows = shape.num_graph_rows or shape.num_decode_requests
        pages = -(-longest // GRAPH_PAGE_TOKENS)
        width = graph_width_tokens(longest) if shape.num_graph_rows else pages * GRAPH_PAGE_TOKENS
        splits = decode_attention_splits(rows, self.num_kv_heads, width, self.num_sms)
        if splits == 1:
            return longest
        per_split = -(-width // splits)  # rounded up to whole key blocks, as the kernel does
        return min(longest, -(-per_split // DECODE_BLOCK_TOKENS) * DECODE_BLOCK_TOKENS)


def physical_priors(profile: GpuProfile) -> tuple[float | None, ...]:
    """The coefficient each of `PHYSICAL_FEATURES` takes where the measured steps do not
    determine it: the inverse of ``profile``'s bandwidth efficiency for bytes, of its
    compute efficiency for FLOPs (the roofline's figures); None for the host's terms."""
    return tuple(
        1 / profile.bandwidth_efficiency if name in _BYTES_FEATURES
        else 1 / profile.compute_efficiency if name in _FLOPS_FEATURES
        else None
        for name in PHYSICAL_FEATURES
    )  # fmt: skip


def calibration_shape(point: dict[str, float]) -> BatchShape:
    """The `BatchShape` of a calibration point, what the simulator prices for that step:
    a graph step runs its recorded rows (padding included), or a decode graph's rows
    where a row from before them does not record them; a field the point lacks is 0."""
    decode = int(point["num_decode_requests"])
    rows = 0
    if point.get("graph"):
        rows = int(point.get("num_padded_tokens") or 0) or decode_graph_rows(decode)
    return BatchShape(
        int(point["num_prefill_tokens"]), decode, int(point["num_context_tokens"]),
        int(point.get("num_attention_pairs") or 0), int(point.get("num_requests") or 0),
        int(point.get("longest_prefill_tokens") or 0),
        int(point.get("longest_context_tokens") or 0), rows,
    )  # fmt: skip


@dataclass(frozen=True)
class CalibratedModel:
    """Step time fitted to measured engine steps (see module doc for the file format).

    ``form`` is how a step's time is built from its shape (`CALIBRATION_FORMS`). The
    linear form: ``coefficients`` are the intercept then one per name of ``features``,
    in seconds per unit; ``features`` are the base three and the optional ones the fit
    could determine, in `_FULL_FEATURES` order. The physical form: ``features`` are
    `PHYSICAL_FEATURES`, priced by ``physical`` (the work of the calibration's ``model``
    at the peak of GPU ``profile``), and ``coefficients`` are the intercept in seconds
    then one inverse efficiency per feature (seconds per step and per eager decode
    request for the host's two). ``mixed_graphs``: some measured prefill or mixed step
    replayed a graph, so the engine measured captures them (the simulator then marks
    such steps with a `GraphRule`). ``decode_capture_s`` and ``mixed_capture_s``: what
    capturing a new decode graph, and a new prefill or mixed graph, costs a run on top
    of the step that captures it (the calibration file's ``graph_captures``; 0 for files
    without them).
    """

    gpu: str
    model: str | None
    coefficients: tuple[float, ...]
    min_step_s: float
    num_points: int
    features: tuple[str, ...] = _BASE_FEATURES
    mixed_graphs: bool = False
    decode_capture_s: float = 0.0
    mixed_capture_s: float = 0.0
    form: str = LINEAR_FORM
    profile: str | None = None
    physical: PhysicalFeatures | None = None

    def __post_init__(self) -> None:
        for cost in (self.decode_capture_s, self.mixed_capture_s):
            if not (math.isfinite(cost) and cost >= 0):
                raise ValueError(f"a graph capture's cost must be finite and >= 0, got {cost}")
        if self.form not in CALIBRATION_FORMS:
            raise ValueError(
                f"unknown calibration form {self.form!r}; known: {', '.join(CALIBRATION_FORMS)}"
            )
        if self.form == PHYSICAL_FORM:
            self._check_physical()
        else:
            self._check_linear()
        if len(self.coefficients) != 1 + len(self.features):
            raise ValueError(
                f"a calibration on {len(self.features)} features has "
                f"{1 + len(self.features)} coefficients, got {len(self.coefficients)}"
            )

    def _check_physical(self) -> None:
        if self.features != PHYSICAL_FEATURES:
            raise ValueError(f"the physical form's features are {', '.join(PHYSICAL_FEATURES)}")
        if self.physical is None or self.model is None or self.profile is None:
            raise ValueError("the physical form needs the model, the GPU profile and their work")

    def _check_linear(self) -> None:
        if self.physical is not None:
            raise ValueError("the linear form prices no physical features")
        if self.features[: len(_BASE_FEATURES)] != _BASE_FEATURES or any(
            name not in _OPTIONAL_FEATURES for name in self.features[len(_BASE_FEATURES) :]
        ):
            raise ValueError(
                f"calibration features must be {', '.join(_BASE_FEATURES)} and some of "
                f"{', '.join(_OPTIONAL_FEATURES)}, got {', '.join(self.features)}"
            )
        if list(_columns(self.features)) != sorted(set(_columns(self.features))):
            raise ValueError(f"calibration features must be in the order {_FULL_FEATURES}")

    def step_seconds(self, shape: BatchShape) -> float:
        if shape.num_tokens == 0:
            return 0.0
        intercept, *slopes = self.coefficients
        if self.physical is not None:
            values = self.physical.values(shape)
            predicted = intercept + sum(c * v for c, v in zip(slopes, values, strict=True))
        else:
            features = calibration_features(shape)
            columns = _columns(self.features)
            predicted = intercept + sum(
                c * features[i] for c, i in zip(slopes, columns, strict=True)
            )
        return max(predicted, self.min_step_s)

    def capture_seconds(self, kind: str) -> float:
        """What capturing a new graph of ``kind`` (`CAPTURE_KINDS`) adds to its step."""
        if kind not in CAPTURE_KINDS:
            raise ValueError(f"unknown graph kind {kind!r}; known: {', '.join(CAPTURE_KINDS)}")
        return self.decode_capture_s if kind == DECODE_CAPTURE else self.mixed_capture_s


def fit_calibration(
    points: list[dict[str, float]],
    gpu: str,
    model: str | None,
    form: str = LINEAR_FORM,
    profile: str | None = None,
) -> CalibratedModel:
    """Relative-error least-squares fit of measured steps (each a dict of the base
    features, optionally ``num_requests``, ``num_attention_pairs``,
    ``longest_prefill_tokens`` and ``longest_context_tokens``, and ``step_s``) in
    ``form`` (`CALIBRATION_FORMS`); see the module doc for the features and which of
    them a linear fit keeps. The physical form needs ``model`` (a zoo name or a config
    path, `avmp.models.resolve_model`) and ``profile`` (a GPU profile name).

    Raises:
        ValueError: fewer than 4 points, a missing or negative field, a ``step_s`` of 0,
            a ``num_requests`` below 1 or below the point's decode requests, a
            ``num_attention_pairs`` below its context tokens, a
            ``longest_prefill_tokens`` above the prefill tokens or 0 beside some, a
            ``longest_context_tokens`` above the context tokens or below their mean,
            features that do not vary enough to determine every coefficient (linear),
            an unknown form, or a physical form without a known model and profile.
    """
    if form not in CALIBRATION_FORMS:
        forms = ", ".join(CALIBRATION_FORMS)
        raise ValueError(f"unknown calibration form {form!r}; known: {forms}")
    if len(points) < 4:
        raise ValueError(f"a calibration needs at least 4 points, got {len(points)}")
    parsed = [_calibration_point(index, point) for index, point in enumerate(points)]
    targets = np.array([step_s for _, step_s in parsed])
    mixed = any(_is_mixed_graph(features) for features, _ in parsed)
    if form == PHYSICAL_FORM:
        return _fit_physical(points, targets, gpu, model, profile, mixed)
    known = [all(f[i] is not None for f, _ in parsed) for i in range(len(_FULL_FEATURES))]
    available = [name for name in _OPTIONAL_FEATURES if known[_FULL_FEATURES.index(name)]]
    for names in _feature_sets(available):
        columns = _columns(names)
        matrix = np.array([[1.0, *(features[i] for i in columns)] for features, _ in parsed])
        fitted = _weighted_fit(matrix, targets)
        if fitted is not None:
            fitted = _reweighted_fit(matrix, targets, fitted)
            return CalibratedModel(
                gpu, model, fitted, float(targets.min()), len(points), names, mixed
            )
    raise ValueError("calibration points do not vary enough to fit every coefficient")


def _fit_physical(
    points: list[dict[str, float]],
    targets: np.ndarray,
    gpu: str,
    model: str | None,
    profile: str | None,
    mixed: bool,
) -> CalibratedModel:
    """The physical form fitted to checked ``points`` (see `fit_calibration`)."""
    if not isinstance(model, str) or not isinstance(profile, str):
        known = ", ".join(GPU_PROFILES)
        raise ValueError(
            f"the physical form needs the calibration's model and GPU profile (one of {known})"
        )
    gpu_profile = get_profile(profile)
    try:
        geometry = resolve_model(model)
    except ValueError as error:
        raise ValueError(f"the physical form prices the model's geometry: {error}") from None
    physical = PhysicalFeatures.of(geometry, gpu_profile)
    matrix = np.array([[1.0, *physical.values(calibration_shape(p))] for p in points])
    priors = np.array([np.nan, *(np.nan if p is None else p for p in physical_priors(gpu_profile))])
    coefficients = _anchored_fit(matrix, targets, priors)
    return CalibratedModel(
        gpu, model, coefficients, float(targets.min()), len(points), PHYSICAL_FEATURES, mixed,
        form=PHYSICAL_FORM, profile=profile, physical=physical,
    )  # fmt: skip


def _anchored_fit(matrix: np.ndarray, targets: np.ndarray, priors: np.ndarray) -> tuple[float, ...]:
    """Non-negative coefficients minimising the summed squared relative error of
    ``matrix`` [N, K] against ``targets``, plus `PHYSICAL_PRIOR_WEIGHT` times each
    coefficient's squared relative distance from its prior (``priors`` [K], NaN for
    none): weighted by the measured time first, then reweighted by the predicted time
    (`REWEIGHTING_ROUNDS` rounds, as `_reweighted_fit` and for the same reason).

    Non-negative, so that no kind of work lowers a step's time however far a shape lies
    from the measured ones; anchored, so that a kind the measured steps barely exercise
    (long-context attention in a fit on short chats) is priced at the profile's
    efficiency rather than at whatever the noise makes of it.
    """
    try:
        from scipy.optimize import nnls
    except ImportError:
        raise ValueError(
            "a calibration in the physical form is fitted with scipy (the bench extra): "
            "pip install 'avmp[bench]'"
        ) from None

    floor = float(targets.min())
    anchored = np.flatnonzero(~np.isnan(priors))
    strength = math.sqrt(PHYSICAL_PRIOR_WEIGHT)
    predicted = targets
    for _ in range(1 + REWEIGHTING_ROUNDS):
        weighted = matrix / predicted[:, None]
        scale = np.abs(weighted).max(axis=0)  # equilibrate columns, as `_weighted_fit`
        scale[scale == 0] = 1.0
        prior_rows = np.zeros((len(anchored), matrix.shape[1]))
        prior_rows[np.arange(len(anchored)), anchored] = strength / priors[anchored]
        system = np.vstack([weighted, prior_rows]) / scale
        wanted = np.concatenate([targets / predicted, np.full(len(anchored), strength)])
        solution = nnls(system, wanted)[0] / scale
        predicted = np.maximum(matrix @ solution, floor)
    return tuple(float(x) for x in solution)


REWEIGHTING_ROUNDS = 10


def _reweighted_fit(
    matrix: np.ndarray, targets: np.ndarray, coefficients: tuple[float, ...]
) -> tuple[float, ...]:
    """Refit with each point's residual relative to its *predicted* time (iteratively
    reweighted least squares, `REWEIGHTING_ROUNDS` rounds from ``coefficients``).

    Weighting by the measured time instead biases the fit low where steps of one shape
    are timed noisily: a step timed short weighs more than one timed long, so the fit
    follows the short ones. Engine replays time their steps so (overlapped steps, the
    host racing one ahead): fitted on all of an H200 replay's steps and summed over each
    of its runs, the steps came out 1.5-14.5% below their measured time weighted by the
    measurement, and between -7% and +5% weighted by the prediction, whose weights do
    not depend on a step's noise.
    """
    floor = float(targets.min())
    solution = np.array(coefficients)
    for _ in range(REWEIGHTING_ROUNDS):
        predicted = np.maximum(matrix @ solution, floor)
        weighted = matrix / predicted[:, None]
        scale = np.abs(weighted).max(axis=0)
        scale[scale == 0] = 1.0
        solution = np.linalg.lstsq(weighted / scale, targets / predicted, rcond=None)[0] / scale
    return tuple(float(x) for x in solution)


def _is_mixed_graph(features: list[float | None]) -> bool:
    """Whether a parsed point is a prefill or mixed step that replayed a graph."""
    return (features[_MIXED_COLUMN] or 0.0) > 0


def _feature_sets(optional: list[str]) -> list[tuple[str, ...]]:
    """The feature sets a fit tries, best first: the base features with as many of the
    ``optional`` ones as possible, a set keeping the earlier ones of `_OPTIONAL_FEATURES`
    before one of the same size that keeps later ones; each in `_FULL_FEATURES` order."""
    sets = []
    for size in range(len(optional), -1, -1):
        for kept in itertools.combinations(optional, size):
            sets.append(tuple(name for name in _FULL_FEATURES if name in _BASE_FEATURES + kept))
    return sets


# Longest step a calibration point may record: an hour, far past any engine step, so that
# a file in the wrong unit (or corrupt) is refused rather than fitted to absurd costs.
MAX_STEP_S = 3600.0


def _calibration_point(index: int, point: dict[str, float]) -> tuple[list[float | None], float]:
    """One point's features in `_FULL_FEATURES` order (mean context None without
    ``num_requests``, prefill attention pairs None without ``num_attention_pairs``, the
    longest chunk None without ``longest_prefill_tokens``, the longest context None without
    ``longest_context_tokens``) and its step time."""
    optional = ("num_requests", "num_attention_pairs", *_LONGEST_FEATURES)
    try:
        values = [float(point[name]) for name in (*_BASE_FEATURES, "step_s")]
        requests, pairs, longest, longest_context = (
            None if point.get(name) is None else float(point[name]) for name in optional
        )
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"calibration point {index}: bad or missing field ({error})") from None
    if any(v < 0 or not math.isfinite(v) for v in values):
        raise ValueError(f"calibration point {index}: values must be finite and >= 0")
    prefill, decode, context, step_s = values
    if step_s == 0:
        raise ValueError(f"calibration point {index}: step_s must be > 0 (the fit is relative)")
    if step_s > MAX_STEP_S:
        raise ValueError(f"calibration point {index}: step_s {step_s:g} is more than "
                         f"{MAX_STEP_S:g} s (a step is measured in seconds)")  # fmt: skip
    if requests is not None and (not math.isfinite(requests) or requests < max(1.0, decode)):
        raise ValueError(
            f"calibration point {index}: num_requests must be >= 1 and >= num_decode_requests"
        )
    if pairs is not None and (not math.isfinite(pairs) or pairs < context):
        raise ValueError(
            f"calibration point {index}: num_attention_pairs must be >= num_context_tokens"
        )
    if longest is not None and (
        not math.isfinite(longest) or not 0 <= longest <= prefill or (longest > 0) != (prefill > 0)
    ):
        raise ValueError(
            f"calibration point {index}: longest_prefill_tokens must be in [1, "
            "num_prefill_tokens] when the step has prefill tokens, else 0"
        )
    _check_longest_context(index, longest_context, context, requests)
    mean = None if requests is None else context / requests
    extra_pairs = None if pairs is None else pairs - context
    eager_decode, graph_rows = _graph_features(index, point, prefill, decode)
    eager = float(prefill > 0 and not graph_rows)
    decode_rows = mixed_rows = row_width = None
    if graph_rows is not None:  # a decode graph's rows, or a mixed graph's tokens
        decode_rows, mixed_rows = (0.0, graph_rows) if prefill > 0 else (graph_rows, 0.0)
        if longest_context is not None:
            row_width = decode_rows * graph_width_tokens(int(longest_context))
    return [
        prefill, decode, context, mean, eager, extra_pairs, longest, longest_context,
        eager_decode, decode_rows, row_width, mixed_rows,
    ], step_s  # fmt: skip


def _graph_features(
    index: int, point: dict[str, float], prefill: float, decode: float
) -> tuple[float | None, float | None]:
    """A point's eager decode requests and graph rows from its ``graph`` field (whether
    the step replayed a CUDA graph) and ``num_padded_tokens`` (the rows the graph ran,
    padding included); both None when ``graph`` is not recorded. A decode graph that
    does not record its rows ran `decode_graph_rows` of them.

    Raises:
        ValueError: a graph step with fewer rows than tokens, or a graph step with
            prefill tokens that does not record its rows.
    """
    graph = point.get("graph")
    if graph is None:
        return None, None
    if not graph:
        return decode, 0.0
    padded = float(point.get("num_padded_tokens") or 0)
    if padded == 0 and prefill == 0 and decode == int(decode):
        padded = float(decode_graph_rows(int(decode)))
    if not math.isfinite(padded) or padded == 0 or padded < prefill + decode:
        raise ValueError(
            f"calibration point {index}: a graph step runs at least its tokens as rows "
            "(num_padded_tokens; a decode graph at most "
            f"{DECODE_GRAPH_SIZES[-1]} requests when it does not record them)"
        )
    return 0.0, padded


def _check_longest_context(
    index: int, longest: float | None, context: float, requests: float | None
) -> None:
    """Refuse a longest context that no step can have: above the context tokens, below
    their mean over the requests (when counted), or 0 beside some (a step's every request
    holds at least one token once it is done)."""
    if longest is None:
        return
    low = context / requests if requests is not None else min(context, 1.0)
    if not math.isfinite(longest) or not low - 1e-9 <= longest <= context:
        raise ValueError(
            f"calibration point {index}: longest_context_tokens must be in [num_context_tokens"
            " / num_requests, num_context_tokens]"
        )


def _weighted_fit(matrix: np.ndarray, targets: np.ndarray) -> tuple[float, ...] | None:
    """Coefficients minimising the summed squared relative error, or None when the
    columns of ``matrix`` [N, K] are not independent."""
    weighted = matrix / targets[:, None]  # relative error: residual / step_s
    scale = np.abs(weighted).max(axis=0)  # equilibrate columns (tokens vs intercept)
    scale[scale == 0] = 1.0
    scaled = weighted / scale
    if np.linalg.matrix_rank(scaled) < matrix.shape[1]:
        return None
    solution = np.linalg.lstsq(scaled, np.ones(len(targets)), rcond=None)[0] / scale
    return tuple(float(x) for x in solution)


def load_calibration(path: str | Path) -> CalibratedModel:
    """Read and fit a calibration JSON file, gzip-compressed where its name ends in
    ``.gz`` (raises ValueError naming the file)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
        model = fit_calibration(
            list(data["points"]), str(data.get("gpu", "")), data.get("model"),
            data.get("form", LINEAR_FORM), data.get("profile"),
        )  # fmt: skip
        decode_s, mixed_s = capture_costs(data.get("graph_captures"))
        return replace(model, decode_capture_s=decode_s, mixed_capture_s=mixed_s)
    except (OSError, EOFError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a valid step-time calibration: {error}") from None


def capture_costs(graph_captures: object) -> tuple[float, float]:
    """`CalibratedModel`'s capture costs, decode and mixed, from a calibration file's
    ``graph_captures`` (``{"decode": {"median_s": S, "count": N}, "mixed": {...}}``,
    either kind optional, costing 0 when absent; None, as in files from before it: no
    cost).

    Raises:
        ValueError: not such a mapping, or a kind with a negative, non-finite or missing
            ``median_s`` or a ``count`` below 1.
    """
    if graph_captures is None:
        return 0.0, 0.0
    if not isinstance(graph_captures, dict) or set(graph_captures) - set(CAPTURE_KINDS):
        raise ValueError(f"graph_captures must map some of {', '.join(CAPTURE_KINDS)} to costs")
    costs = dict.fromkeys(CAPTURE_KINDS, 0.0)
    for kind, entry in graph_captures.items():
        if not isinstance(entry, dict):
            raise ValueError(f"graph_captures[{kind!r}] must be {{'median_s': .., 'count': ..}}")
        seconds, count = float(entry["median_s"]), int(entry["count"])
        if not (math.isfinite(seconds) and seconds >= 0) or count < 1:
            raise ValueError(
                f"graph_captures[{kind!r}]: median_s must be finite and >= 0 and count >= 1"
            )
        costs[kind] = seconds
    return costs[DECODE_CAPTURE], costs[MIXED_CAPTURE]
