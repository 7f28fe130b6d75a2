"""The longest prefill chunk in the time model: a step's time follows its longest
prefill chunk (one sequence's chunk runs serially), which the token count cannot tell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timing_cases
from timing_cases import BASE, chunk, decodes

from avmp.sched.scheduler import ScheduledChunk
from avmp.sim.calibration import fit_calibration, load_calibration
from avmp.sim.timing import BatchShape

WITH_LONGEST = (
    *BASE,
    "mean_context_tokens",
    "has_prefill",
    "num_prefill_attention_pairs",
    "longest_prefill_tokens",
)
# intercept, prefill token, decode request, context token, mean context token, eager
# step, prefill attention pair, token of the longest chunk (of the order the H200 shows:
# 8,192 tokens as one chunk ~430 ms, as 16 chunks of 512 ~160 ms)
TRUTH = (0.004, 1.5e-5, 2e-5, 1e-8, 3e-7, 0.02, 1e-10, 3.3e-5)


def truth_step_s(shape: BatchShape) -> float:
    """`TRUTH` applied to a shape's features, written out (not through the module)."""
    return timing_cases.formula_step_s(shape, TRUTH, WITH_LONGEST)


def points_of(shapes: list[BatchShape], with_longest: bool = True) -> list[dict[str, float]]:
    extra = ("num_attention_pairs", "longest_prefill_tokens")
    return timing_cases.points_of(shapes, truth_step_s, extra if with_longest else extra[:1])


def served_shapes() -> list[BatchShape]:
    """Steps a long-document mix produces: one long chunk alone, the same tokens split
    over many requests' chunks, such splits beside decodes, and decode batches."""
    steps: list[list[ScheduledChunk]] = []
    for start in (0, 8192, 24576):
        for size in (512, 2048, 8192):
            steps.append([chunk(0, start, size)])
    for pieces in (2, 4, 16):
        for total in (2048, 8192):
            size = total // pieces
            steps.append([chunk(i, 0, size) for i in range(pieces)])
            steps.append([chunk(i, 0, size) for i in range(pieces)] + decodes(8, 3000))
    steps.append([chunk(0, 16384, 6144), chunk(1, 0, 1024), chunk(2, 0, 1024)])
    for batch in (1, 8, 64):
        for context in (512, 4096, 32768):
            steps.append(decodes(batch, context))
    return [BatchShape.from_chunks(step) for step in steps]


def test_the_longest_chunk_of_a_step() -> None:
    mixed = BatchShape.from_chunks([chunk(0, 4096, 2048), chunk(1, 0, 300), *decodes(5, 900)])
    assert mixed.longest_prefill_tokens == 2048
    assert mixed.num_prefill_tokens == 2348
    assert BatchShape.from_chunks(decodes(8, 700)).longest_prefill_tokens == 0
    one_token = BatchShape.from_chunks([chunk(0, 0, 1)])  # a 1-token prompt is prefill
    assert one_token.longest_prefill_tokens == 1


def test_fit_recovers_a_formula_with_a_longest_chunk_term(tmp_path: Path) -> None:
    model = timing_cases.load_points(tmp_path, points_of(served_shapes()))
    assert model.features == WITH_LONGEST
    assert model.coefficients == pytest.approx(TRUTH, rel=1e-6)
    one = BatchShape.from_chunks([chunk(0, 0, 8192)])
    split = BatchShape.from_chunks([chunk(i, 0, 512) for i in range(16)])
    assert model.step_seconds(one) == pytest.approx(truth_step_s(one), rel=1e-9)
    assert model.step_seconds(split) == pytest.approx(truth_step_s(split), rel=1e-9)
    assert model.step_seconds(one) > 2 * model.step_seconds(split)


def test_without_the_field_the_fit_cannot_tell_one_chunk_from_many() -> None:
    """Points without ``longest_prefill_tokens`` (every file before it) fit the features
    they have; one point without it is enough to leave the feature out."""
    shapes = served_shapes()
    old = fit_calibration(points_of(shapes, with_longest=False), "h200", None)
    assert old.features == WITH_LONGEST[:-1]
    one = BatchShape.from_chunks([chunk(0, 0, 8192)])
    assert abs(old.step_seconds(one) / truth_step_s(one) - 1) > 0.1
    mixed = points_of(shapes)
    del mixed[5]["longest_prefill_tokens"]
    assert fit_calibration(mixed, "h200", None) == old


def test_single_chunk_steps_drop_the_feature_and_fit_as_without_it() -> None:
    """When every prefill step holds one chunk, the longest chunk is the prefill tokens:
    the fit drops it and gives exactly the fit without the field."""
    steps = [[chunk(0, s, n)] for s in (0, 4096, 16384) for n in (512, 2048, 8192)]
    steps += [[chunk(0, 0, n), *decodes(b, 600)] for n in (256, 512) for b in (4, 32)]
    steps += [decodes(b, c) for b in (1, 8, 64) for c in (300, 7000)]
    shapes = [BatchShape.from_chunks(step) for step in steps]
    with_field = fit_calibration(points_of(shapes), "h200", None)
    assert "longest_prefill_tokens" not in with_field.features
    assert with_field == fit_calibration(points_of(shapes, with_longest=False), "h200", None)


def test_a_shape_without_its_longest_chunk_takes_an_even_split() -> None:
    """A hand-built shape (longest 0 beside prefill tokens) is priced as its prefill
    tokens split evenly over its prefilling requests, the shortest longest chunk."""
    model = fit_calibration(points_of(served_shapes()), "h200", None)
    split = BatchShape.from_chunks([chunk(i, 0, 512) for i in range(16)])
    unknown = BatchShape(split.num_prefill_tokens, 0, split.num_context_tokens,
                         split.num_attention_pairs, 16)  # fmt: skip
    assert model.step_seconds(unknown) == pytest.approx(model.step_seconds(split), rel=1e-12)
    alone = BatchShape.from_chunks([chunk(0, 0, 3000)])
    uncounted = BatchShape(3000, 0, 3000, alone.num_attention_pairs)  # one request at most
    assert model.step_seconds(uncounted) == pytest.approx(model.step_seconds(alone), rel=1e-12)


@pytest.mark.parametrize(
    ("prefill", "longest"), [(512, 513), (512, 0), (0, 1), (512, -1), (512, float("nan"))]
)
def test_an_impossible_longest_chunk_is_refused(prefill: int, longest: float) -> None:
    points = points_of(served_shapes())
    points[0]["num_prefill_tokens"] = prefill
    points[0]["longest_prefill_tokens"] = longest
    with pytest.raises(ValueError, match="point 0: "):
        fit_calibration(points, "h200", None)


def test_committed_calibrations_use_the_feature_when_they_record_it() -> None:
    """The committed calibration files from before the field load with the features they
    had and none of the new one; those that record it (the H200 rerun) use it, since
    their long-context cells split prefill tokens over one or many chunks."""
    results = Path(__file__).parents[2] / "benchmarks" / "results"
    paths = sorted(results.glob("calibration_*.json"))
    assert paths
    for path in paths:
        points = json.loads(path.read_text())["points"]
        recorded = ["longest_prefill_tokens" in point for point in points]
        assert all(recorded) or not any(recorded)
        model = load_calibration(path)
        assert ("longest_prefill_tokens" in model.features) == all(recorded)
        assert model.num_points == len(points)
