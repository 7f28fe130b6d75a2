"""The step-time model: roofline sanity, calibration fit and cost loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from avmp.models.geometry import AttentionLayer, ModelGeometry
from avmp.sched.scheduler import ScheduledChunk
from avmp.sim.calibration import CalibratedModel, fit_calibration, load_calibration
from avmp.sim.timing import (
    GPU_PROFILES,
    PCIE_COPY_EFFICIENCY,
    AllocatorCallCosts,
    BatchShape,
    GpuProfile,
    MemoryMoveCosts,
    RooflineModel,
    get_profile,
    load_allocator_call_costs,
    pcie_x16_bytes_per_s,
    without_recompute,
)
from sched_helpers import tiny_geometry

BASE = ("num_prefill_tokens", "num_decode_requests", "num_context_tokens")


def dense_8b(num_active_params: int = 8_000_000_000) -> ModelGeometry:
    """An 8B model with Llama-3-8B's attention (32 layers, 8 KV heads of 128)."""
    return ModelGeometry(
        name="dense-8b",
        family="test",
        num_layers=32,
        attention_layers=tuple(AttentionLayer(i, 8, 128) for i in range(32)),
        recurrent_layers=(),
        hidden_size=4096,
        vocab_size=128_256,
        num_params=8_000_000_000,
        num_active_params=num_active_params,
    )


def decode_batch(num_requests: int, context: int) -> BatchShape:
    return BatchShape.from_chunks(
        [ScheduledChunk(i, context, 1, 0, True, False) for i in range(num_requests)]
    )


def test_profiles_have_datasheet_magnitudes() -> None:
    assert set(GPU_PROFILES) == {"rtx3060", "a100", "h100", "h200"}
    h100, h200 = get_profile("h100"), get_profile("h200")
    assert h200.hbm_bytes_per_s > h100.hbm_bytes_per_s > get_profile("a100").hbm_bytes_per_s
    assert get_profile("rtx3060").memory_bytes == 12 << 30
    with pytest.raises(ValueError, match="known: rtx3060, a100, h100, h200"):
        get_profile("tpu")


@pytest.mark.parametrize("name", sorted(GPU_PROFILES))
def test_every_profile_has_a_host_link_slower_than_its_hbm(name: str) -> None:
    profile = get_profile(name)
    assert 0 < profile.host_link_bytes_per_s < profile.hbm_bytes_per_s / 10
    # 1 GB one way: tens of milliseconds over PCIe, against well under one from HBM
    assert 0.015 < profile.host_copy_seconds(10**9) < 0.05
    assert profile.host_copy_seconds(0) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        profile.host_copy_seconds(-1)


def test_host_links_follow_the_pcie_generation_of_each_datasheet() -> None:
    gen4, gen5 = pcie_x16_bytes_per_s(4), pcie_x16_bytes_per_s(5)
    assert gen4 == pytest.approx(31.5e9, rel=1e-3) and gen5 == pytest.approx(63.0e9, rel=1e-3)
    for name, theoretical in (("rtx3060", gen4), ("a100", gen4), ("h100", gen5), ("h200", gen5)):
        link = get_profile(name).host_link_bytes_per_s
        assert link == pytest.approx(theoretical * PCIE_COPY_EFFICIENCY)
    with pytest.raises(ValueError, match="4 or 5"):
        pcie_x16_bytes_per_s(3)
    with pytest.raises(ValueError, match="must be positive"):
        GpuProfile("x", "x", 1, 1e9, 1e12, 0.0)


def test_decode_of_an_8b_model_at_batch_1_is_memory_bound_on_h100() -> None:
    model = RooflineModel(dense_8b(), get_profile("h100"))
    shape = decode_batch(1, context=1000)
    memory_s = model.step_bytes(shape) / model.profile.effective_bytes_per_s
    compute_s = model.step_flops(shape) / model.profile.effective_flops_per_s
    assert memory_s > 20 * compute_s
    # 16 GB of weights at 80% of 3.35 TB/s: about 6 ms, plus the fixed overhead
    assert model.step_seconds(shape) == pytest.approx(16e9 / 2.68e12 + 1e-3, rel=0.01)


def test_large_prefill_is_compute_bound() -> None:
    model = RooflineModel(dense_8b(), get_profile("h100"))
    shape = BatchShape.from_chunks([ScheduledChunk(0, 0, 8192, 0, False, True)])
    memory_s = model.step_bytes(shape) / model.profile.effective_bytes_per_s
    compute_s = model.step_flops(shape) / model.profile.effective_flops_per_s
    assert compute_s > memory_s


@pytest.mark.parametrize("profile", sorted(GPU_PROFILES))
def test_step_time_is_monotone_in_the_batch(profile: str) -> None:
    model = RooflineModel(dense_8b(), get_profile(profile))
    decode = [model.step_seconds(decode_batch(n, 2000)) for n in (1, 2, 8, 64, 256, 1024)]
    context = [model.step_seconds(decode_batch(32, c)) for c in (10, 1000, 10_000, 100_000)]
    prefill = [
        model.step_seconds(BatchShape.from_chunks([ScheduledChunk(0, 0, n, 0, False, True)]))
        for n in (1, 64, 512, 4096, 16384)
    ]
    for series in (decode, context, prefill):
        assert series == sorted(series) and series[0] < series[-1]


def test_faster_gpu_is_faster() -> None:
    shape = decode_batch(16, 4000)
    times = [RooflineModel(dense_8b(), get_profile(p)).step_seconds(shape) for p in GPU_PROFILES]
    assert times == sorted(times, reverse=True)


def test_moe_reads_active_weights_at_batch_1_and_nearly_all_at_large_batch() -> None:
    model = RooflineModel(dense_8b(num_active_params=1_000_000_000), get_profile("h100"))
    assert model.weight_bytes_read(1) == pytest.approx(2e9)
    assert model.weight_bytes_read(64) > 0.99 * 16e9


def test_state_traffic_is_counted_per_scheduled_request() -> None:
    geometry = tiny_geometry()
    model = RooflineModel(geometry, get_profile("h100"))
    one, two = decode_batch(1, 100), decode_batch(2, 100)
    extra = model.step_bytes(two) - model.step_bytes(one)
    kv = (101 + 1) * geometry.kv_bytes_per_token
    assert extra == pytest.approx(2 * geometry.state_bytes_per_request + kv)


def test_batch_shape_counts_causal_attention_pairs() -> None:
    shape = BatchShape.from_chunks(
        [ScheduledChunk(0, 10, 4, 0, False, False), ScheduledChunk(1, 99, 1, 0, True, False)]
    )
    assert shape.num_prefill_tokens == 4 and shape.num_decode_requests == 1
    assert shape.num_context_tokens == 14 + 100
    assert shape.num_attention_pairs == (11 + 12 + 13 + 14) + 100
    assert shape.num_requests == 2


def test_without_recompute_keeps_only_fresh_tokens() -> None:
    chunks = (
        ScheduledChunk(0, 0, 100, 100, False, True),
        ScheduledChunk(1, 0, 100, 60, False, True),
        ScheduledChunk(2, 50, 1, 0, True, False),
    )
    fresh = without_recompute(chunks)
    assert [(c.request_id, c.start, c.num_tokens) for c in fresh] == [(1, 60, 40), (2, 50, 1)]


def synthetic_points(coefficients: tuple[float, float, float, float]) -> list[dict[str, float]]:
    c0, c1, c2, c3 = coefficients
    points = []
    for prefill in (0, 256, 2048):
        for decode in (0, 8, 64):
            for context in (1000, 50_000):
                step = c0 + c1 * prefill + c2 * decode + c3 * context
                points.append(
                    {
                        "num_prefill_tokens": prefill,
                        "num_decode_requests": decode,
                        "num_context_tokens": context,
                        "step_s": step,
                    }
                )
    return points


def test_calibration_recovers_the_coefficients(tmp_path: Path) -> None:
    truth = (0.004, 2e-5, 1e-4, 3e-8)
    path = tmp_path / "cal.json"
    payload = {"gpu": "h100", "model": "m", "points": synthetic_points(truth)}
    path.write_text(json.dumps(payload))
    model = load_calibration(path)
    # no request counts or pairs: the base features and has_prefill (fitted as ~0 here)
    assert model.features == (*BASE, "has_prefill")
    assert model.coefficients == pytest.approx((*truth, 0.0), rel=1e-6, abs=1e-12)
    assert model.gpu == "h100" and model.model == "m" and model.num_points == 18
    shape = BatchShape(num_prefill_tokens=100, num_decode_requests=3, num_context_tokens=5000)
    assert model.step_seconds(shape) == pytest.approx(0.004 + 2e-3 + 3e-4 + 1.5e-4)
    assert model.step_seconds(BatchShape()) == 0.0


def test_calibration_never_predicts_below_the_fastest_measured_step() -> None:
    points = synthetic_points((-0.01, 1e-4, 1e-3, 1e-7))
    points = [p for p in points if p["step_s"] > 0]
    model = fit_calibration(points, "x", None)
    tiny = BatchShape(num_decode_requests=1, num_context_tokens=1)
    assert model.step_seconds(tiny) == min(p["step_s"] for p in points)


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"points": []}, "at least 4 points"),
        ({"nope": 1}, "points"),
        ({"points": [{"num_prefill_tokens": 1}] * 4}, "bad or missing field"),
        ({"points": synthetic_points((1, 0, 0, 0))[:1] * 5}, "do not vary enough"),
        ({"points": [{**p, "step_s": 0.0} for p in synthetic_points((1, 0, 0, 0))]}, "> 0"),
        ({"points": [{**p, "num_requests": 0} for p in synthetic_points((1, 0, 0, 0))]}, ">= 1"),
        ({"points": [{**p, "num_requests": 1} for p in synthetic_points((1, 0, 0, 0))]}, ">= 1"),
        ({"points": [{**p, "num_requests": "x"} for p in synthetic_points((1, 0, 0, 0))]}, "bad"),
    ],
)
def test_bad_calibration_files_name_the_file(tmp_path: Path, payload: object, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=message) as info:
        load_calibration(path)
    assert "bad.json" in str(info.value)


def decode_point(requests: int, mean_context: int, step_s: float) -> dict[str, float]:
    return {
        "num_prefill_tokens": 0,
        "num_decode_requests": requests,
        "num_context_tokens": requests * mean_context,
        "num_requests": requests,
        "step_s": step_s,
    }


def prefill_point(tokens: int, requests: int, step_s: float) -> dict[str, float]:
    return {
        "num_prefill_tokens": tokens,
        "num_decode_requests": 0,
        "num_context_tokens": tokens,
        "num_requests": requests,
        "step_s": step_s,
    }


# intercept, prefill, decode, context, mean context, eager step (has prefill)
SIX = (0.004, 2e-6, 3e-5, 1e-8, 4e-7, 0.03)


def linear_step_s(shape: BatchShape, coefficients: tuple[float, ...] = SIX) -> float:
    c0, c_prefill, c_decode, c_context, c_mean, c_eager = coefficients
    mean = shape.num_context_tokens / shape.num_requests
    return (
        c0
        + c_prefill * shape.num_prefill_tokens
        + c_decode * shape.num_decode_requests
        + c_context * shape.num_context_tokens
        + c_mean * mean
        + c_eager * (shape.num_prefill_tokens > 0)
    )


def exact_points(shapes: list[BatchShape]) -> list[dict[str, float]]:
    """Calibration points whose step times follow `linear_step_s` exactly."""
    return [
        {
            "num_prefill_tokens": s.num_prefill_tokens,
            "num_decode_requests": s.num_decode_requests,
            "num_context_tokens": s.num_context_tokens,
            "num_requests": s.num_requests,
            "step_s": linear_step_s(s),
        }
        for s in shapes
    ]


def test_calibration_with_request_counts_recovers_six_coefficients(tmp_path: Path) -> None:
    shapes = [BatchShape(0, b, b * m, 0, b) for b in (1, 8, 64) for m in (512, 2048)]
    shapes += [BatchShape(p, 0, p, 0, r) for p, r in ((512, 1), (4096, 2), (8192, 4))]
    shapes += [BatchShape(256, 8, 8 * 1000 + 256, 0, 9), BatchShape(40, 60, 60 * 700, 0, 61)]
    points = exact_points(shapes)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"gpu": "h100", "model": "m", "points": points}))
    model = load_calibration(path)
    assert model.features[-2:] == ("mean_context_tokens", "has_prefill")
    assert model.coefficients == pytest.approx(SIX, rel=1e-6)
    shape = BatchShape(0, 32, 32 * 700, 0, 32)
    assert model.step_seconds(shape) == pytest.approx(linear_step_s(shape), rel=1e-9)
    # a shape that does not count its requests: its decode requests + one prefilling
    uncounted = BatchShape(num_prefill_tokens=100, num_decode_requests=3, num_context_tokens=5000)
    counted = BatchShape(100, 3, 5000, 0, 4)
    assert model.step_seconds(uncounted) == pytest.approx(linear_step_s(counted), rel=1e-9)


def decode_truth(requests: int, mean_context: int) -> float:
    return linear_step_s(BatchShape(0, requests, requests * mean_context, 0, requests))


def test_relative_fit_keeps_many_short_decode_steps_close() -> None:
    """Decode steps follow the five-feature model; a few long prefill steps grow with the
    square of their length (attention), which no linear fit matches. A fit of absolute
    error bends every coefficient towards the long steps; the relative fit does not."""
    decode = [(b, m) for b in (1, 4, 16, 64, 128) for m in (256, 1024, 4096)]
    points = [decode_point(b, m, decode_truth(b, m)) for b, m in decode for _ in range(4)]
    for tokens, requests in ((2048, 1), (8192, 1), (8192, 4), (4096, 2)):
        step_s = 0.004 + 2e-6 * tokens + 4e-10 * tokens * tokens / requests
        points.append(prefill_point(tokens, requests, step_s))
    model = fit_calibration(points, "x", None)
    relative = [
        model.step_seconds(BatchShape(0, b, b * m, 0, b)) / decode_truth(b, m) - 1
        for b, m in decode
    ]
    assert max(abs(e) for e in relative) < 0.02
    # the same points fitted by plain least squares miss decode steps by > 10%
    matrix = np.array(
        [
            [
                1.0,
                p["num_prefill_tokens"],
                p["num_decode_requests"],
                p["num_context_tokens"],
                p["num_context_tokens"] / p["num_requests"],
            ]
            for p in points
        ]
    )
    plain = np.linalg.lstsq(matrix, np.array([p["step_s"] for p in points]), rcond=None)[0]
    plain_relative = [plain @ [1, 0, b, b * m, m] / decode_truth(b, m) - 1 for b, m in decode]
    assert max(abs(e) for e in plain_relative) > 0.10


def test_calibration_without_request_counts_fits_no_mean_context() -> None:
    """Files written before ``num_requests`` was recorded, or mixing points with and
    without it, fit no mean context (has_prefill needs no request count)."""
    old = synthetic_points((0.004, 2e-5, 1e-4, 3e-8))
    assert fit_calibration(old, "x", None).features == (*BASE, "has_prefill")
    mixed = [{**p, "num_requests": max(1, p["num_decode_requests"])} for p in old[:9]] + old[9:]
    model = fit_calibration(mixed, "x", None)
    assert model.features == (*BASE, "has_prefill")
    expected = (0.004, 2e-5, 1e-4, 3e-8, 0.0)
    assert model.coefficients == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_mean_context_that_does_not_vary_apart_falls_back_to_four_features() -> None:
    # batch 1 only: context per request == context, so the fifth column repeats the fourth
    points = [decode_point(1, m, 0.004 + 1e-7 * m) for m in (100, 200, 400, 800)]
    points += [prefill_point(p, 1, 0.004 + 1e-6 * p + 1e-7 * p) for p in (256, 1024)]
    model = fit_calibration(points, "x", None)
    assert len(model.features) == 3
    shape = BatchShape(0, 1, 300, 0, 1)
    assert model.step_seconds(shape) == pytest.approx(0.004 + 3e-5, rel=1e-6)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[2] / "benchmarks/results").glob("calibration_*.json"))
)
def test_committed_calibration_files_load(path: Path) -> None:
    model = load_calibration(path)
    assert model.num_points >= 4 and model.gpu
    decode = BatchShape(0, 64, 64 * 600, 0, 64)
    assert model.min_step_s <= model.step_seconds(decode) < 1.0


def test_calibrated_model_checks_its_features_and_coefficients() -> None:
    with pytest.raises(ValueError, match="3 features has 4 coefficients, got 2"):
        CalibratedModel("x", None, (1.0, 2.0), 0.0, 4)
    mean, eager = "mean_context_tokens", "has_prefill"
    with pytest.raises(ValueError, match="5 features has 6 coefficients, got 7"):
        CalibratedModel("x", None, (1.0,) * 7, 0.0, 4, (*BASE, mean, eager))
    with pytest.raises(ValueError, match="must be in the order"):
        CalibratedModel("x", None, (1.0,) * 6, 0.0, 4, (*BASE, eager, mean))
    with pytest.raises(ValueError, match="some of longest_prefill_tokens, num_prefill_attention"):
        CalibratedModel("x", None, (1.0,) * 4, 0.0, 4, ("num_prefill_tokens", "a", "b"))
    five = CalibratedModel("x", None, (1.0,) * 5, 0.0, 4, (*BASE, "mean_context_tokens"))
    assert five.step_seconds(BatchShape(0, 2, 100, 0, 2)) == 1 + 2 + 100 + 50


def calls_result(figures: dict[str, dict[str, float]]) -> str:
    """A result file shaped like benchmarks/allocator_calls.py writes it."""
    allocators = {name: {"median_of_repeats": f, "repeats": [f]} for name, f in figures.items()}
    return json.dumps({"repeats": 1, "allocators": allocators})


def test_allocator_call_costs_from_the_benchmark_file(tmp_path: Path) -> None:
    assert load_allocator_call_costs("avmp", tmp_path / "absent.json") == AllocatorCallCosts()
    path = tmp_path / "calls.json"
    figures = {"admit_median_us": 7.5, "grow_median_us": 1.25, "free_median_us": float("nan")}
    path.write_text(calls_result({"avmp": figures}))
    costs = load_allocator_call_costs("avmp", path)
    assert (costs.admit_us, costs.grow_us) == (7.5, 1.25)
    defaults = AllocatorCallCosts()
    assert (costs.free_us, costs.failed_us) == (defaults.free_us, defaults.failed_us)
    assert costs.source == str(path)
    assert load_allocator_call_costs("static", path) == defaults
    for bad in ("[1, 2]", calls_result({"avmp": {"grow_median_us": "fast"}})):  # type: ignore[dict-item]
        path.write_text(bad)
        with pytest.raises(ValueError, match="calls.json"):
            load_allocator_call_costs("avmp", path)


def test_compaction_runs_at_half_the_effective_bandwidth_unless_given() -> None:
    h100 = get_profile("h100")
    assert MemoryMoveCosts().compaction_rate(h100) == h100.effective_bytes_per_s / 2
    assert MemoryMoveCosts(compaction_bytes_per_s=1e9).compaction_rate(h100) == 1e9
    # PEERS.md: a 128 MiB device copy took ~0.1 ms on an H100
    assert (128 << 20) / MemoryMoveCosts().compaction_rate(h100) == pytest.approx(1e-4, rel=0.2)


def test_points_that_all_have_prefill_drop_the_eager_feature() -> None:
    """When every step has prefill tokens, ``has_prefill`` is the intercept again: the
    fit keeps the five features it can determine."""
    shapes = [BatchShape(p, b, b * m + p, 0, b + 1)
              for p in (16, 300) for b in (1, 8, 64) for m in (512, 2048)]  # fmt: skip
    points = exact_points(shapes)
    model = fit_calibration(points, "h100", None)
    assert model.features[-1] == "mean_context_tokens"
    shape = BatchShape(100, 32, 32 * 700 + 100, 0, 33)
    assert model.step_seconds(shape) == pytest.approx(linear_step_s(shape), rel=1e-6)


# -- feasibility: weights + cache + activations against the profile's memory ---------


def test_jamba_weights_do_not_fit_an_80gb_profile() -> None:
    from avmp.models import resolve_model
    from avmp.sim.timing import check_feasible, device_memory, get_profile

    jamba = resolve_model("jamba-1.5-mini")
    memory = device_memory(jamba, 1 << 30, get_profile("h100"))
    assert memory.weight_bytes == jamba.num_params * 2 > 90 * (1 << 30)
    assert not memory.fits
    with pytest.raises(ValueError, match=r"weights 96\.1 GiB \+ cache 1\.0 GiB"):
        check_feasible(jamba, 1 << 30, get_profile("h100"))
    assert check_feasible(jamba, 1 << 30, get_profile("h200")).fits


def test_a_12gib_cache_does_not_fit_the_12gb_rtx3060() -> None:
    from avmp.models import resolve_model
    from avmp.sim.timing import check_feasible, get_profile

    micro = resolve_model("granite-4.0-h-micro")
    with pytest.raises(ValueError, match=r"cannot run on NVIDIA GeForce RTX 3060 12 GB"):
        check_feasible(micro, 12 << 30, get_profile("rtx3060"))
    assert check_feasible(micro, 1 << 30, get_profile("rtx3060")).fits


def test_activation_estimate_is_the_stated_rule() -> None:
    from avmp.models import resolve_model
    from avmp.sim.timing import ACTIVATION_COPIES, activation_bytes

    g = resolve_model("nemotron-h-8b")
    expected = 8192 * g.hidden_size * ACTIVATION_COPIES * 2 + 256 * g.vocab_size * 4
    assert activation_bytes(g, 8192, 256) == expected
    assert activation_bytes(g, 16, 256) == 16 * g.hidden_size * ACTIVATION_COPIES * 2 + (
        16 * g.vocab_size * 4
    )  # no more logits than tokens in the step
