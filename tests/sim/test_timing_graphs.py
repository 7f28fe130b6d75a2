"""The time model's CUDA-graph features: which steps replay a graph and on how many rows
(the engine's rule, `avmp.sched.graph_buckets`), how a fit prices graph rows, their
block-table width and eager decode rows, which points may carry them, and the fit's
weighting by the predicted time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from avmp.sched.graph_buckets import DECODE_GRAPH_SIZES, bucket
from avmp.sched.scheduler import ScheduledChunk
from avmp.sim import calibration, timing
from avmp.sim.calibration import (
    EAGER_DECODE_FEATURE,
    GRAPH_ROWS_FEATURE,
    GRAPH_WIDTH_FEATURE,
    fit_calibration,
)
from avmp.sim.timing import BatchShape, decode_graph_rows, graph_width_tokens

GRAPH_FEATURES = (EAGER_DECODE_FEATURE, GRAPH_ROWS_FEATURE, GRAPH_WIDTH_FEATURE)


def test_the_graph_rule_is_the_engines() -> None:
    """Graph sizes and widths come from `avmp.sched.graph_buckets`, which the engine
    captures by; the page size is the engine's."""
    from avmp.memory.spec import MemoryConfig

    assert MemoryConfig.block_size == timing.GRAPH_PAGE_TOKENS
    for requests in range(1, 300):
        assert decode_graph_rows(requests) == (bucket(requests, DECODE_GRAPH_SIZES) or 0)


def test_graph_rows_and_width() -> None:
    assert [decode_graph_rows(n) for n in (0, 1, 3, 32, 33, 256, 257)] == [0, 1, 4, 32, 64, 256, 0]
    # 16 pages at least, then a power of two of 16-token pages
    assert graph_width_tokens(1) == graph_width_tokens(256) == 256
    assert graph_width_tokens(257) == 512
    assert graph_width_tokens(31_000) == 2048 * 16


def decode(n: int, context: int) -> ScheduledChunk:
    return ScheduledChunk(n, context - 1, 1, 0, True, False)


def test_a_pure_decode_step_replays_a_graph_and_a_mixed_one_runs_eagerly() -> None:
    graph = BatchShape.from_chunks([decode(i, 500) for i in range(33)])
    assert graph.num_graph_rows == 64
    mixed = BatchShape.from_chunks([decode(0, 500), ScheduledChunk(1, 0, 64, 0, False, True)])
    assert mixed.num_graph_rows == 0
    too_many = BatchShape.from_chunks([decode(i, 10) for i in range(300)])
    assert too_many.num_graph_rows == 0


def truth(shape: BatchShape) -> float:
    """A step time whose graph steps cost by their padded rows and width, and whose
    eager decode rows cost ten times a graph's."""
    eager = shape.num_decode_requests if shape.num_graph_rows == 0 else 0
    width = shape.num_graph_rows * graph_width_tokens(shape.longest_context_tokens)
    return (
        0.002 + 2e-5 * shape.num_prefill_tokens + 1e-5 * shape.num_decode_requests
        + 1e-9 * shape.num_context_tokens + 0.01 * (shape.num_prefill_tokens > 0)
        + 1e-4 * eager + 2e-5 * shape.num_graph_rows + 3e-9 * width
    )  # fmt: skip


def shapes() -> list[BatchShape]:
    """Graph steps of several batches and longest contexts, and mixed steps beside them
    with one or two prompts of sizes that vary apart from the batch."""
    steps = []
    prompts = iter([64, 900, 300, 2000, 150, 40, 1200] * 10)
    for batch in (1, 3, 8, 20, 33, 60, 100):
        for longest in (600, 5000, 30_000):
            chunks = [decode(i, c) for i, c in enumerate([longest] + [500] * (batch - 1))]
            steps.append(BatchShape.from_chunks(chunks))
            if batch < 100:
                fresh = [ScheduledChunk(999 - k, 0, next(prompts), 0, False, True)
                         for k in range(1 + (longest == 5000))]  # fmt: skip
                steps.append(BatchShape.from_chunks([*chunks, *fresh]))
    return steps


def point(shape: BatchShape, step_s: float, graph: bool = True) -> dict[str, float]:
    fields = {
        "num_prefill_tokens": shape.num_prefill_tokens,
        "num_decode_requests": shape.num_decode_requests,
        "num_context_tokens": shape.num_context_tokens,
        "num_requests": shape.num_requests,
        "longest_prefill_tokens": shape.longest_prefill_tokens,
        "longest_context_tokens": shape.longest_context_tokens,
        "step_s": step_s,
    }
    return fields | ({"graph": int(shape.num_graph_rows > 0)} if graph else {})


def test_a_fit_prices_graph_rows_width_and_eager_decode_rows() -> None:
    steps = shapes()
    model = fit_calibration([point(s, truth(s)) for s in steps], "test", None)
    assert set(GRAPH_FEATURES) <= set(model.features)
    for shape in steps:
        assert model.step_seconds(shape) == pytest.approx(truth(shape), rel=1e-6)
    # 33 rows run as 64: dearer than 32 at the same contexts, by the padding's cost
    contexts = [30_000] + [500] * 32
    rows_33 = BatchShape.from_chunks([decode(i, c) for i, c in enumerate(contexts)])
    rows_32 = BatchShape.from_chunks([decode(i, c) for i, c in enumerate(contexts[:32])])
    padding_s = 32 * (2e-5 + 3e-9 * graph_width_tokens(30_000))
    assert model.step_seconds(rows_33) - model.step_seconds(rows_32) == pytest.approx(
        padding_s + 1e-5 + 1e-9 * 500, rel=1e-4
    )


def test_points_without_the_graph_flag_fit_without_graph_features() -> None:
    """Calibration files from before the flag keep the features they had."""
    steps = shapes()
    old = fit_calibration([point(s, truth(s), graph=False) for s in steps], "test", None)
    assert not set(GRAPH_FEATURES) & set(old.features)
    mixed = [point(s, truth(s), graph=i % 2 == 0) for i, s in enumerate(steps)]
    assert not set(GRAPH_FEATURES) & set(fit_calibration(mixed, "test", None).features)


def test_graph_points_must_run_at_least_their_tokens() -> None:
    steps = shapes()
    good = [point(s, truth(s)) for s in steps]
    mixed_graph = good[1] | {"graph": 1}  # prefill tokens: a mixed graph
    assert mixed_graph["num_prefill_tokens"] > 0
    with pytest.raises(ValueError, match="num_padded_tokens"):
        fit_calibration([*good, mixed_graph], "test", None)
    tokens = mixed_graph["num_prefill_tokens"] + mixed_graph["num_decode_requests"]
    fit_calibration([*good, mixed_graph | {"num_padded_tokens": 2 * tokens}], "test", None)
    three = next(p for p in good if p["graph"] and p["num_decode_requests"] == 3)
    with pytest.raises(ValueError, match="num_padded_tokens"):
        fit_calibration([*good, three | {"num_padded_tokens": 2}], "test", None)
    huge = good[0] | {"num_decode_requests": 300, "num_requests": 300}
    with pytest.raises(ValueError, match="a decode graph at most 256"):
        fit_calibration([*good, huge], "test", None)


def test_a_fit_of_noisy_steps_is_not_biased_low(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps timed with noise of mean 1 (each shape timed 0.5x to 1.5x, as overlapped
    steps are): weighted by the prediction the fitted total is the measured one within
    a few percent; weighted by the measurement alone it is far below."""
    rng = np.random.default_rng(0)
    steps = shapes() * 20
    noisy = [point(s, truth(s) * rng.uniform(0.5, 1.5)) for s in steps]
    measured = sum(p["step_s"] for p in noisy)

    def fitted_total() -> float:
        model = fit_calibration(noisy, "test", None)
        return sum(model.step_seconds(s) for s in steps)

    assert fitted_total() == pytest.approx(measured, rel=0.03)
    monkeypatch.setattr(calibration, "REWEIGHTING_ROUNDS", 0)
    assert fitted_total() < 0.93 * measured


def test_mixed_graph_tokens_pad_to_the_token_buckets() -> None:
    assert timing.mixed_graph_tokens(5, 8192) == 16
    assert timing.mixed_graph_tokens(300, 8192) == 512
    assert timing.mixed_graph_tokens(4238, 8192) == 5120  # a quarter step above 1,024
    assert timing.mixed_graph_tokens(8000, 8192) == 8192
    assert timing.mixed_graph_tokens(8193, 8192) == 0  # above the budget: eager
    assert timing.mixed_graph_tokens(100, 100) == 100 and timing.mixed_graph_tokens(7, 12) == 12


def mixed(requests: int, prompt: int, context: int = 500) -> BatchShape:
    chunks = [decode(i, context) for i in range(requests - 1)]
    return BatchShape.from_chunks([*chunks, ScheduledChunk(999, 0, prompt, 0, False, True)])


def test_the_graph_rule_pads_mixed_steps_and_caps_their_graphs() -> None:
    off = timing.GraphRule(8192, mixed=False)
    assert off.shape(mixed(4, 100)) == mixed(4, 100)  # an engine without mixed graphs
    rule = timing.GraphRule(8192, mixed=True, max_mixed_graphs=2)
    assert rule.shape(mixed(4, 100)).num_graph_rows == 128  # 103 tokens -> 128
    assert rule.shape(mixed(3, 7000, 20_000)).num_graph_rows == 7168  # a quarter step
    assert len(rule.captured) == 2
    assert rule.shape(mixed(9, 100)).num_graph_rows == 0  # a third bucket: eager
    assert rule.shape(mixed(4, 110)).num_graph_rows == 128  # a captured bucket replays
    # a narrower block table replays the wider graph of its buckets; a wider one cannot
    assert rule.shape(mixed(3, 7100, 600)).num_graph_rows == 7168
    assert rule.shape(mixed(4, 100, 9000)).num_graph_rows == 0
    decode_step = BatchShape.from_chunks([decode(i, 500) for i in range(5)])
    assert rule.shape(decode_step) == decode_step  # decode graphs: from_chunks's
    what_if = timing.GraphRule(8192, mixed=True)
    assert what_if.shape(mixed(4, 100), record=False).num_graph_rows == 128
    assert not what_if.captured


def test_a_fit_learns_whether_the_engine_captured_mixed_steps() -> None:
    steps = shapes()
    eager_only = [point(s, truth(s)) for s in steps]
    assert not fit_calibration(eager_only, "test", None).mixed_graphs
    rule = timing.GraphRule(8192, mixed=True)
    graphed = [rule.shape(s) for s in steps]
    points = [point(s, truth(s)) | {"num_padded_tokens": s.num_graph_rows} for s in graphed]
    model = fit_calibration(points, "test", None)
    assert model.mixed_graphs
    # a mixed graph pays no eager step's fixed cost; the same step run eagerly does
    step = next(s for s in graphed if s.num_prefill_tokens and s.num_graph_rows)
    assert calibration_has_prefill(step) == 0.0
    assert calibration_has_prefill(dataclasses.replace(step, num_graph_rows=0)) == 1.0


def calibration_has_prefill(shape: BatchShape) -> float:
    column = calibration._FULL_FEATURES.index(calibration.EAGER_FEATURE)
    return calibration.calibration_features(shape)[column]


def test_the_graph_rule_starts_from_the_graphs_captured_before_the_run() -> None:
    rule = timing.GraphRule(8192, mixed=True, max_mixed_graphs=1, captured=((128, 4, 512),))
    assert rule.shape(mixed(4, 100)).num_graph_rows == 128  # replays the warm-up's graph
    assert rule.shape(mixed(9, 100)).num_graph_rows == 0  # the one graph allowed is taken


def graphed_truth(shape: BatchShape) -> float:
    """A step time where a prefill or mixed step pays the eager fixed cost and eager
    decode rows only when it runs eagerly, and its padded tokens when it replays a graph."""
    prefill, rows = shape.num_prefill_tokens, shape.num_graph_rows
    eager = prefill > 0 and rows == 0
    decode_rows = rows if prefill == 0 else 0
    width = decode_rows * graph_width_tokens(shape.longest_context_tokens)
    return (
        0.002 + 2e-5 * prefill + 1e-5 * shape.num_decode_requests
        + 1e-9 * shape.num_context_tokens + 0.01 * eager
        + 1e-4 * shape.num_decode_requests * (rows == 0)
        + 2e-5 * decode_rows + 3e-9 * width + 4e-6 * (rows if prefill else 0)
    )  # fmt: skip


def test_a_fit_prices_mixed_graphs_by_their_padded_tokens() -> None:
    """Some mixed steps replay graphs (the first buckets met), the rest run eagerly: the
    fit tells them apart and prices both exactly."""
    rule = timing.GraphRule(8192, mixed=True, max_mixed_graphs=4)
    steps = [rule.shape(s) for s in shapes()]
    kinds = {(s.num_prefill_tokens > 0, s.num_graph_rows > 0) for s in steps}
    assert kinds == {(False, True), (True, True), (True, False)}
    points = [point(s, graphed_truth(s)) | {"num_padded_tokens": s.num_graph_rows}
              for s in steps]  # fmt: skip
    model = fit_calibration(points, "test", None)
    assert calibration.MIXED_GRAPH_FEATURE in model.features and model.mixed_graphs
    for shape in steps:
        assert model.step_seconds(shape) == pytest.approx(graphed_truth(shape), rel=1e-6)


def test_the_graph_rule_says_which_graph_a_step_captures_and_only_the_first_time() -> None:
    """Decode graphs are the engine's per (rows, block-table width); mixed graphs per
    bucket, a narrower block table replaying a wider graph; the warm-up's cost nothing."""
    rule = timing.GraphRule(8192, mixed=True, captured=((128, 4, 512),))
    five = BatchShape.from_chunks([decode(i, 500) for i in range(5)])  # 8 rows, 512 wide
    assert rule.take(five) == (five, timing.DECODE_CAPTURE)
    assert rule.take(five) == (five, None)
    six = BatchShape.from_chunks([decode(i, 500) for i in range(6)])  # the same graph
    assert rule.take(six)[1] is None
    wider = BatchShape.from_chunks([decode(i, 600) for i in range(5)])  # 1,024 wide
    assert rule.take(wider)[1] == timing.DECODE_CAPTURE
    assert rule.captured_decode == {(8, 512), (8, 1024)}
    assert rule.take(mixed(4, 100))[1] is None  # the warm-up's graph
    assert rule.take(mixed(4, 100, 900)) == (
        dataclasses.replace(mixed(4, 100, 900), num_graph_rows=128), timing.MIXED_CAPTURE
    )  # fmt: skip
    assert rule.take(mixed(4, 100, 300))[1] is None  # replays the wider one
    eager = timing.GraphRule(8192, mixed=False)
    assert eager.take(mixed(4, 100)) == (mixed(4, 100), None)
    what_if = timing.GraphRule(8192, mixed=True)
    assert what_if.shape(five, record=False) == five and not what_if.captured_decode
    assert what_if.take(five)[1] == timing.DECODE_CAPTURE  # the what-if recorded nothing


def test_a_calibrated_model_knows_what_a_capture_costs() -> None:
    steps = shapes()
    model = fit_calibration([point(s, truth(s)) for s in steps], "test", None)
    assert model.capture_seconds("decode") == model.capture_seconds("mixed") == 0.0
    costly = dataclasses.replace(model, decode_capture_s=0.07, mixed_capture_s=0.2)
    assert (costly.capture_seconds("decode"), costly.capture_seconds("mixed")) == (0.07, 0.2)
    with pytest.raises(ValueError, match="unknown graph kind"):
        costly.capture_seconds("prefill")
    for bad in (-0.01, float("inf")):
        with pytest.raises(ValueError, match="graph capture's cost"):
            dataclasses.replace(model, mixed_capture_s=bad)
