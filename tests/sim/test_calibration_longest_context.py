"""The longest context in the time model: a decode step's time follows its longest
request's KV scan (decode attention scans one request's KV serially), which the mean
context does not see when a few long requests decode beside many short ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timing_cases
from timing_cases import BASE, chunk, decodes

from avmp.sched.scheduler import ScheduledChunk
from avmp.sim.calibration import fit_calibration, load_calibration
from avmp.sim.timing import BatchShape

WITH_LONGEST_CONTEXT = (
    *BASE,
    "mean_context_tokens",
    "has_prefill",
    "num_prefill_attention_pairs",
    "longest_context_tokens",
)
# intercept, prefill token, decode request, context token, mean context token, eager
# step, prefill attention pair, token of the longest context (of the order an H200's
# long-document decode batches show: ~3 ms more at a 35k-token longest context)
TRUTH = (0.003, 1.5e-5, 2.5e-5, 6e-9, 3e-8, 0.02, 1e-10, 8e-8)
EXTRA = ("num_attention_pairs", "longest_context_tokens")


def truth_step_s(shape: BatchShape) -> float:
    """`TRUTH` applied to a shape's features, written out (not through the module)."""
    return timing_cases.formula_step_s(shape, TRUTH, WITH_LONGEST_CONTEXT)


def points_of(shapes: list[BatchShape], with_longest: bool = True) -> list[dict[str, float]]:
    return timing_cases.points_of(shapes, truth_step_s, EXTRA if with_longest else EXTRA[:1])


def even_shapes() -> list[BatchShape]:
    """Steps whose requests all hold the same context (the calibration's short cells):
    prefill chunks alone or beside decodes at the chunk's position, decode batches."""
    steps: list[list[ScheduledChunk]] = []
    for start in (0, 4096, 16384):
        for size in (512, 2048):
            steps.append([chunk(0, start, size)])
            steps.append([chunk(0, start, size), *decodes(4, start + size - 1)])
    for batch in (1, 8, 64):
        for context in (512, 4096, 32768):
            steps.append(decodes(batch, context))
    return [BatchShape.from_chunks(step) for step in steps]


def skewed(num_long: int, long_context: int, num_short: int, short_context: int) -> BatchShape:
    """A decode batch of a few long requests beside many short ones."""
    return BatchShape.from_chunks(
        decodes(num_long, long_context) + decodes(num_short, short_context, first_id=500)
    )


def served_shapes() -> list[BatchShape]:
    """The even steps and skewed decode batches (a long-document mix, the calibration's
    long-context cells), with a prefill chunk beside long decodes."""
    steps = [skewed(n, c, s, 600) for n in (1, 4) for c in (10240, 34816) for s in (4, 32)]
    steps.append(BatchShape.from_chunks([chunk(0, 0, 2048), *decodes(3, 20000)]))
    return even_shapes() + steps


def test_the_longest_context_of_a_step() -> None:
    mixed = BatchShape.from_chunks([chunk(0, 4096, 2048), chunk(1, 0, 300), *decodes(5, 9000)])
    assert mixed.longest_context_tokens == 9001  # a decode at 9,000 holds 9,001 once done
    late_chunk = BatchShape.from_chunks([chunk(0, 30000, 2048), *decodes(5, 900)])
    assert late_chunk.longest_context_tokens == 32048
    assert BatchShape.from_chunks(decodes(8, 700)).longest_context_tokens == 701
    assert BatchShape().longest_context_tokens == 0


def test_fit_recovers_a_formula_with_a_longest_context_term(tmp_path: Path) -> None:
    model = timing_cases.load_points(tmp_path, points_of(served_shapes()))
    assert model.features == WITH_LONGEST_CONTEXT
    assert model.coefficients == pytest.approx(TRUTH, rel=1e-6)
    few_long = skewed(3, 30000, 60, 1500)  # mean ~2,900 tokens, longest 30,001
    even = BatchShape.from_chunks(decodes(63, few_long.num_context_tokens // 63))
    assert model.step_seconds(few_long) == pytest.approx(truth_step_s(few_long), rel=1e-9)
    assert model.step_seconds(few_long) > model.step_seconds(even) + 0.002


def test_without_the_field_the_fit_misses_skewed_batches() -> None:
    """Points without ``longest_context_tokens`` (every file before it) fit the features
    they have and underpredict a skewed batch; one point without it is enough to leave
    the feature out."""
    shapes = served_shapes()
    old = fit_calibration(points_of(shapes, with_longest=False), "h200", None)
    assert old.features == WITH_LONGEST_CONTEXT[:-1]
    few_long = skewed(3, 30000, 60, 1500)
    assert old.step_seconds(few_long) / truth_step_s(few_long) - 1 < -0.1
    mixed = points_of(shapes)
    del mixed[3]["longest_context_tokens"]
    assert fit_calibration(mixed, "h200", None) == old


def test_even_contexts_drop_the_feature_first_and_fit_as_without_it() -> None:
    """When every step's requests hold the same context, the longest context is the mean
    context: the fit drops the new feature (not the mean context, not ``has_prefill``)
    and gives exactly the fit without the field."""
    shapes = even_shapes()
    with_field = fit_calibration(points_of(shapes), "h200", None)
    assert with_field.features == WITH_LONGEST_CONTEXT[:-1]
    assert with_field == fit_calibration(points_of(shapes, with_longest=False), "h200", None)


def test_a_shape_without_its_longest_context_is_priced_as_its_mean() -> None:
    """A shape without the field (0: hand-built, a row from before it) is priced as if
    its contexts were even, the mean context: old rows keep their predictions."""
    model = fit_calibration(points_of(served_shapes()), "h200", None)
    even = BatchShape.from_chunks(decodes(16, 4095))
    unknown = BatchShape(0, 16, even.num_context_tokens, even.num_attention_pairs, 16)
    assert model.step_seconds(unknown) == pytest.approx(model.step_seconds(even), rel=1e-12)
    few_long = skewed(2, 30000, 14, 600)
    unrecorded = BatchShape(0, 16, few_long.num_context_tokens, few_long.num_attention_pairs, 16)
    assert model.step_seconds(unrecorded) < model.step_seconds(few_long)


@pytest.mark.parametrize(
    ("requests", "longest"),
    [(4, 30000), (4, 1000), (4, 0), (4, -1), (4, float("nan")), (None, 30000)],
)
def test_an_impossible_longest_context_is_refused(requests: int | None, longest: float) -> None:
    """Above the context tokens, below their mean, negative or NaN: refused, naming the
    point (point 0 is a 2,048-token chunk at 16,384 alone: 18,432 context tokens)."""
    points = points_of(served_shapes())
    shape = BatchShape.from_chunks([chunk(0, 16384, 2048), *decodes(3, 0)])  # 4 requests
    points[0].update(num_context_tokens=shape.num_context_tokens, longest_context_tokens=longest)
    points[0]["num_requests"] = requests
    if requests is None:
        del points[0]["num_requests"]
    with pytest.raises(ValueError, match="point 0: "):
        fit_calibration(points, "h200", None)


def test_committed_calibrations_fit_without_the_feature() -> None:
    """The committed calibration files from before the field load with the features they
    had and none of the new one; those written since fit with it."""
    results = Path(__file__).parents[2] / "benchmarks" / "results"
    paths = sorted(results.glob("calibration_*.json"))
    with_field = []
    for path in paths:
        points = json.loads(path.read_text())["points"]
        has_field = all("longest_context_tokens" in point for point in points)
        assert has_field or all("longest_context_tokens" not in point for point in points)
        model = load_calibration(path)
        assert ("longest_context_tokens" in model.features) == has_field
        assert model.num_points == len(points)
        with_field.append(has_field)
    assert False in with_field and True in with_field  # files of both kinds are committed
