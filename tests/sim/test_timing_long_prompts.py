"""The time model on long prompts: prefill attention pairs in the calibration fit and
the roofline, and the prefill cost per token that the swap-or-recompute rule reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import timing_cases
from timing_cases import BASE, chunk, decodes

from avmp.models import resolve_model
from avmp.sched.scheduler import ScheduledChunk
from avmp.sim.calibration import CalibratedModel, fit_calibration
from avmp.sim.timing import BatchShape, RooflineModel, get_profile, prefill_s_per_token

ALL = (*BASE, "mean_context_tokens", "has_prefill", "num_prefill_attention_pairs")
# intercept, prefill token, decode request, context token, mean context token, eager
# step, prefill attention pair (of the order of an 8B hybrid's on an H100)
TRUTH = (0.004, 3e-5, 2e-5, 1e-8, 3e-7, 0.02, 1e-10)


def truth_step_s(shape: BatchShape) -> float:
    """`TRUTH` applied to a shape's features, written out (not through the module)."""
    return timing_cases.formula_step_s(shape, TRUTH, ALL)


def points_of(shapes: list[BatchShape], with_pairs: bool = True) -> list[dict[str, float]]:
    return timing_cases.points_of(
        shapes, truth_step_s, ("num_attention_pairs",) if with_pairs else ()
    )


def long_context_shapes() -> list[BatchShape]:
    """What the engine benchmark's long-context cell profiles: chunks of 512 to 8,192
    tokens starting at 0 to 32k, alone and beside long-context decodes, and decode
    batches over contexts of 512 to 32k."""
    steps: list[list[ScheduledChunk]] = []
    for start in (0, 2048, 8192, 16384, 32768):
        for size in (512, 2048, 8192):
            steps.append([chunk(0, start, size)])
            steps.append([chunk(0, start, size), *decodes(4, 16384)])
    steps.append([chunk(0, 30720, 2048), chunk(1, 0, 6144)])
    for batch in (1, 8, 64):
        for context in (512, 4096, 32768):
            steps.append(decodes(batch, context))
    return [BatchShape.from_chunks(step) for step in steps]


def test_prefill_attention_pairs_of_a_chunk() -> None:
    for start, size in ((0, 1), (0, 512), (2048, 2048), (32768, 8192)):
        shape = BatchShape.from_chunks([chunk(0, start, size)])
        assert shape.num_prefill_attention_pairs == (size - 1) * (2 * start + size) // 2
    decode = BatchShape.from_chunks(decodes(8, 30000))
    assert decode.num_prefill_attention_pairs == 0
    mixed = BatchShape.from_chunks([chunk(0, 16384, 8192), *decodes(8, 30000)])
    assert mixed.num_prefill_attention_pairs == 8191 * (16384 + 4096)


def test_fit_recovers_a_formula_with_prefill_attention(tmp_path: Path) -> None:
    model = timing_cases.load_points(tmp_path, points_of(long_context_shapes()))
    assert model.features == ALL
    assert model.coefficients == pytest.approx(TRUTH, rel=1e-6)
    late = BatchShape.from_chunks([chunk(0, 24576, 8192), *decodes(16, 20000)])
    assert model.step_seconds(late) == pytest.approx(truth_step_s(late), rel=1e-9)


def test_an_old_file_without_pairs_drops_the_feature_and_misses_late_chunks() -> None:
    """A file from before ``num_attention_pairs`` was recorded loads with the features
    it has; on long prompts it then prices a chunk at 32k like one at 0 plus context."""
    shapes = long_context_shapes()
    old = fit_calibration(points_of(shapes, with_pairs=False), "h100", None)
    assert old.features == ALL[:5]
    new = fit_calibration(points_of(shapes), "h100", None)
    late = BatchShape.from_chunks([chunk(0, 32768, 8192)])
    assert new.step_seconds(late) == pytest.approx(truth_step_s(late), rel=1e-9)
    assert abs(old.step_seconds(late) / truth_step_s(late) - 1) > 0.05
    # one point without the field is enough to leave the feature out
    mixed = points_of(shapes)
    del mixed[3]["num_attention_pairs"]
    assert "num_prefill_attention_pairs" not in fit_calibration(mixed, "h100", None).features


def test_short_prompt_points_barely_need_the_pairs() -> None:
    """On 64-512-token prompts (what the committed calibrations saw) the feature adds
    little: fitted with and without it, predictions of short steps agree within 1%."""
    steps = [[chunk(0, 0, n)] for n in (64, 128, 256, 512)]
    steps += [[chunk(0, 0, n), *decodes(b, 600)] for n in (64, 256, 512) for b in (4, 32)]
    steps += [decodes(b, c) for b in (1, 8, 64) for c in (300, 700)]
    shapes = [BatchShape.from_chunks(step) for step in steps]
    with_pairs = fit_calibration(points_of(shapes), "h100", None)
    without = fit_calibration(points_of(shapes, with_pairs=False), "h100", None)
    assert "num_prefill_attention_pairs" in with_pairs.features
    for shape in shapes:
        expected = with_pairs.step_seconds(shape)
        assert without.step_seconds(shape) == pytest.approx(expected, rel=0.01)


def test_batch_one_points_keep_the_pairs_without_mean_or_eager_terms() -> None:
    """Batch-1 steps cannot tell the mean context from the context, nor ``has_prefill``
    from decode requests; the fit drops those two and keeps the pairs."""
    steps = [[chunk(0, s, n)] for s in (0, 4096, 16384) for n in (1024, 4096)]
    steps += [decodes(1, c) for c in (1000, 8000, 30000)]
    shapes = [BatchShape.from_chunks(step) for step in steps]
    points = points_of(shapes)
    for point, shape in zip(points, shapes, strict=True):
        pairs = shape.num_attention_pairs - shape.num_context_tokens
        point["step_s"] = 0.005 + 3e-5 * shape.num_prefill_tokens + 1e-8 * shape.num_context_tokens
        point["step_s"] += 1e-10 * pairs + 1e-4 * shape.num_decode_requests
    model = fit_calibration(points, "h100", None)
    assert model.features == (*BASE, "num_prefill_attention_pairs")
    assert model.coefficients == pytest.approx((0.005, 3e-5, 1e-4, 1e-8, 1e-10), rel=1e-6)


def test_a_point_with_fewer_pairs_than_context_is_refused() -> None:
    points = points_of(long_context_shapes())
    points[0]["num_attention_pairs"] = points[0]["num_context_tokens"] - 1
    with pytest.raises(ValueError, match="point 0: num_attention_pairs must be >="):
        fit_calibration(points, "h100", None)


def test_roofline_charges_the_causal_pairs_of_a_late_chunk() -> None:
    geometry = resolve_model("nemotron-h-8b")
    model = RooflineModel(geometry, get_profile("h200"))
    early = BatchShape.from_chunks([chunk(0, 0, 8192)])
    late = BatchShape.from_chunks([chunk(0, 32768, 8192)])
    per_pair = 4 * geometry.hidden_size * geometry.num_attention_layers
    extra_flops = model.step_flops(late) - model.step_flops(early)
    assert extra_flops == per_pair * 32768 * 8192
    # both compute-bound: the late chunk costs exactly its extra FLOPs more
    extra_s = extra_flops / model.profile.effective_flops_per_s
    assert model.step_seconds(late) - model.step_seconds(early) == pytest.approx(extra_s)


def test_prefill_seconds_per_token() -> None:
    roofline = RooflineModel(resolve_model("granite-4.0-h-micro"), get_profile("h200"))
    step = roofline.step_seconds(BatchShape.from_chunks([chunk(0, 0, 2048)]))
    assert prefill_s_per_token(roofline, 2048) == pytest.approx(step / 2048)
    # the fixed costs spread over more tokens: a full chunk is cheaper per token
    assert prefill_s_per_token(roofline, 8192) < prefill_s_per_token(roofline, 64)
    calibrated = CalibratedModel("g", None, TRUTH, 0.0, 4, ALL)
    shape = BatchShape.from_chunks([chunk(0, 0, 4096)])
    assert prefill_s_per_token(calibrated, 4096) == pytest.approx(truth_step_s(shape) / 4096)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        prefill_s_per_token(roofline, 0)
