"""The physical form of a calibration: a step's work from the model's geometry in seconds
at the GPU's peak, fitted with non-negative coefficients held to the profile's
efficiencies; what it recovers, how it extrapolates from short contexts to long ones,
its file round trip, and the linear form's files loading as before."""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from timing_cases import chunk, decodes

from avmp.models import resolve_model
from avmp.sim import calibration, timing
from avmp.sim.calibration import (
    LINEAR_FORM,
    PHYSICAL_FEATURES,
    PHYSICAL_FORM,
    CalibratedModel,
    PhysicalFeatures,
    decode_attention_splits,
    fit_calibration,
    load_calibration,
    physical_priors,
)
from avmp.sim.timing import BatchShape, get_profile, mixed_graph_tokens

MODEL, PROFILE = "granite-4.0-h-micro", "h200"
GEOMETRY = resolve_model(MODEL)
WORK = PhysicalFeatures.of(GEOMETRY, get_profile(PROFILE))
STEP_TOKENS = 8192  # the engine's step budget, which sets the mixed graphs' token buckets


# -- the features -----------------------------------------------------------------------------


def test_a_decode_steps_features_are_the_work_written_out() -> None:
    """Granite-4.0-H-Micro on an H200, a decode graph of 64 rows for 40 requests at 2,000
    tokens: each feature computed here from the geometry's and datasheet's figures."""
    shape = BatchShape.from_chunks(decodes(40, 1999))
    assert shape.num_graph_rows == 64
    bandwidth, flops = 4.8e12, 989e12
    lm_head = GEOMETRY.vocab_size * GEOMETRY.hidden_size
    kv = 4 * 2 * 8 * 64 * 2  # 4 attention layers, K and V, 8 KV heads of 64, bf16
    state = GEOMETRY.state_bytes_per_request
    # 40 x 8 programs hold 2 per SM of 132: no split; one head's 2,000 tokens, 4 layers
    expected = {
        "weight_s": GEOMETRY.num_params * 2 / bandwidth,
        "linear_s": (2 * (GEOMETRY.num_params - lm_head) * 64 + 2 * lm_head * 40) / flops,
        "attention_s": 0.0,
        "kv_s": (40 * 2000 + 40) * kv / bandwidth,
        "kv_program_s": 2000 * kv / 8 / (bandwidth / 132),
        "graph_kv_s": 64 * 2048 * kv / bandwidth,  # the block table's width: 128 pages
        "scan_s": 0.0,
        "state_s": 40 * 2 * state / bandwidth,
        "eager_steps": 0.0,
        "eager_decode_requests": 0.0,
    }
    assert dict(zip(PHYSICAL_FEATURES, WORK.values(shape), strict=True)) == pytest.approx(expected)


def test_a_long_prompts_chunk_pays_attention_and_scan_for_its_position() -> None:
    """An 8,192-token chunk at 24k tokens: attention FLOPs over its pairs beyond the
    context, ``4 x hidden x layers`` each; the scan over its tokens; one program scans
    the whole 32k context; run eagerly, one eager step."""
    shape = BatchShape.from_chunks([chunk(0, 24576, 8192)])
    values = dict(zip(PHYSICAL_FEATURES, WORK.values(shape), strict=True))
    pairs = (8192 - 1) * (24576 + 8192 / 2)
    assert values["attention_s"] == pytest.approx(pairs * 4 * 2048 * 4 / 989e12)
    assert values["scan_s"] == pytest.approx(8192 * 4 * 36 * 64 * 64 * 128 / 989e12)
    assert values["kv_program_s"] == pytest.approx(32768 * 4 * 2 * 64 * 2 / (4.8e12 / 132))
    assert (values["eager_steps"], values["graph_kv_s"]) == (1.0, 0.0)


def test_decode_attention_splits_follow_the_kernels_rule() -> None:
    """avmp.kernels.triton.decode_attention.choose_num_splits, checked by hand: about
    two programs per SM, no split under 256 tokens, at most 32."""
    assert decode_attention_splits(64, 8, 2048, 132) == 1  # 512 programs already
    assert decode_attention_splits(4, 8, 1024, 132) == 4  # 9 wanted, 4 by length
    assert decode_attention_splits(1, 8, 32768, 132) == 32  # 33 wanted, capped
    assert decode_attention_splits(1, 0, 300, 1) == 2  # no attention: 2 programs wanted


def test_a_profile_without_sms_is_refused_and_the_datasheets_are_recorded() -> None:
    with pytest.raises(ValueError, match="num_sms"):
        replace(get_profile("h100"), num_sms=0)
    assert [get_profile(n).num_sms for n in ("rtx3060", "a100", "h100", "h200")] == [
        28, 108, 132, 132,
    ]  # fmt: skip


# -- the fit ----------------------------------------------------------------------------------


def graph_step(chunks: list) -> BatchShape:
    """A step as the engine of sessions 7 and 11 ran it: a decode graph, or a prefill or
    mixed graph padded to its token bucket."""
    shape = BatchShape.from_chunks(chunks)
    if shape.num_prefill_tokens:
        return replace(shape, num_graph_rows=mixed_graph_tokens(shape.num_tokens, STEP_TOKENS))
    return shape


def short_steps() -> list[BatchShape]:
    """Chat-like steps, as many as a replay's few thousand: decode batches of 1-128
    requests at 300-2,000 tokens, and short prompts (16-1,000 tokens) beside them."""
    steps = []
    for batch in range(1, 129, 3):
        for context in (300, 600, 900, 1400, 2000):
            steps.append(graph_step(decodes(batch, context)))
            for prompt in (16 * batch, 1000 - 7 * batch):
                steps.append(graph_step([chunk(0, 0, prompt), *decodes(batch, context)]))
    return steps


def long_steps() -> list[BatchShape]:
    """Long-document steps that no short step resembles: decode batches with a few
    requests at 31k tokens beside short ones, chunks filling the 8k step at 16-28k."""
    steps = []
    for num_long in (1, 4, 12):
        for short in (4, 30):
            steps.append(graph_step(decodes(num_long, 31000) + decodes(short, 6000, 500)))
            start = 16384 + 1024 * num_long
            steps.append(graph_step([chunk(0, start, STEP_TOKENS - short), *decodes(short, 6000)]))
    return steps


def point(shape: BatchShape, step_s: float) -> dict[str, float]:
    """A calibration point of ``shape`` as an engine replay records it."""
    return {
        "num_prefill_tokens": shape.num_prefill_tokens,
        "num_decode_requests": shape.num_decode_requests,
        "num_context_tokens": shape.num_context_tokens,
        "num_attention_pairs": shape.num_attention_pairs,
        "num_requests": shape.num_requests,
        "longest_prefill_tokens": shape.longest_prefill_tokens,
        "longest_context_tokens": shape.longest_context_tokens,
        "graph": int(shape.num_graph_rows > 0),
        "num_padded_tokens": shape.num_graph_rows,
        "step_s": step_s,
    }


# the intercept in seconds, then an inverse efficiency per feature (the host's two: 0);
# of the order the H200 replays gave (docs/BENCHMARKS.md), off the priors on purpose
TRUTH = (1.2e-3, 1.25, 2.1, 2.0, 1.4, 1.5, 0.9, 1.9, 1.1, 0.0, 0.0)


def truth_step_s(shape: BatchShape, truth: tuple[float, ...] = TRUTH) -> float:
    return truth[0] + sum(c * v for c, v in zip(truth[1:], WORK.values(shape), strict=True))


def test_without_the_prior_the_fit_recovers_every_coefficient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Points spanning short and long steps, timed by `TRUTH`: with the prior weighing
    nothing the non-negative fit is plain least squares and finds `TRUTH` (the weights'
    term, constant for a dense model, cannot be told from the intercept: their sum)."""
    monkeypatch.setattr(calibration, "PHYSICAL_PRIOR_WEIGHT", 0.0)
    steps = short_steps() + long_steps() + [BatchShape.from_chunks([chunk(0, 0, 300)])]
    model = fit_calibration([point(s, truth_step_s(s)) for s in steps], "h200", MODEL,
                            PHYSICAL_FORM, PROFILE)  # fmt: skip
    intercept, weights, *rest = model.coefficients
    assert intercept + weights * WORK.weight_s == pytest.approx(TRUTH[0] + TRUTH[1] * WORK.weight_s)
    assert rest == pytest.approx(TRUTH[2:], rel=1e-6, abs=1e-9)
    assert model.form == PHYSICAL_FORM and model.features == PHYSICAL_FEATURES


def test_the_prior_holds_what_the_steps_do_not_exercise() -> None:
    """Short steps alone say nothing of long-context attention: the fit prices it at the
    profile's compute efficiency (its prior) rather than at 0 or at noise, and keeps
    every coefficient non-negative. What the steps exercise most, the linear layers,
    moves from its prior most of the way to the truth (the prior still holds it ~10%
    short with a few hundred steps: `PHYSICAL_PRIOR_WEIGHT` is strong)."""
    steps = short_steps()
    model = fit_calibration([point(s, truth_step_s(s)) for s in steps], "h200", MODEL,
                            PHYSICAL_FORM, PROFILE)  # fmt: skip
    coefficients = dict(zip(("intercept", *PHYSICAL_FEATURES), model.coefficients, strict=True))
    priors = dict(zip(PHYSICAL_FEATURES, physical_priors(get_profile(PROFILE)), strict=True))
    assert min(model.coefficients) >= 0
    assert coefficients["attention_s"] == pytest.approx(priors["attention_s"], rel=0.05)
    assert priors["linear_s"] < coefficients["linear_s"] < TRUTH[2]
    assert coefficients["linear_s"] == pytest.approx(TRUTH[2], rel=0.15)


# Fitted on short steps, the long steps' time within this: the truth's long-context
# coefficients sit 20-30% off their priors (attention, the longest program's scan, a
# wide graph's block table), which short steps cannot tell, and the prior holds the
# linear layers' ~10% short of the truth.
EXTRAPOLATION_TOLERANCE = 0.12


def test_a_fit_on_short_steps_prices_long_ones_where_the_linear_form_cannot() -> None:
    """Fitted on chat-like steps, each long-document step's price is within
    `EXTRAPOLATION_TOLERANCE` of the truth's; the linear form fitted on the same points
    misses them by more than twice as much."""
    short = [point(s, truth_step_s(s)) for s in short_steps()]
    physical = fit_calibration(short, "h200", MODEL, PHYSICAL_FORM, PROFILE)
    linear = fit_calibration(short, "h200", MODEL)
    long = long_steps()
    errors = [physical.step_seconds(s) / truth_step_s(s) - 1 for s in long]
    linear_errors = [linear.step_seconds(s) / truth_step_s(s) - 1 for s in long]
    assert max(map(abs, errors)) < EXTRAPOLATION_TOLERANCE, errors
    assert max(map(abs, linear_errors)) > 2 * max(map(abs, errors)), linear_errors


def test_noise_moves_the_fit_little() -> None:
    """Each step timed 5% high or low at random: the long steps still within the
    tolerance."""
    rng = np.random.default_rng(1)
    short = [point(s, truth_step_s(s) * (1 + rng.choice([-0.05, 0.05]))) for s in short_steps()]
    model = fit_calibration(short, "h200", MODEL, PHYSICAL_FORM, PROFILE)
    errors = [model.step_seconds(s) / truth_step_s(s) - 1 for s in long_steps()]
    assert max(map(abs, errors)) < EXTRAPOLATION_TOLERANCE, errors


# -- files ------------------------------------------------------------------------------------


def write(path: Path, data: dict) -> Path:
    text = json.dumps(data).encode()
    path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
    return path


def physical_file(**fields: object) -> dict:
    points = [point(s, truth_step_s(s)) for s in short_steps()]
    captures = {"decode": {"median_s": 0.07, "count": 3}}
    data = {"gpu": "NVIDIA H200", "model": MODEL, "form": PHYSICAL_FORM, "profile": PROFILE,
            "graph_captures": captures, "points": points}  # fmt: skip
    return {**data, **fields}


@pytest.mark.parametrize("name", ["cal.json", "cal.json.gz"])
def test_a_physical_file_round_trips(tmp_path: Path, name: str) -> None:
    data = physical_file()
    model = load_calibration(write(tmp_path / name, data))
    fitted = fit_calibration(data["points"], "NVIDIA H200", MODEL, PHYSICAL_FORM, PROFILE)
    assert model == replace(fitted, decode_capture_s=0.07)
    assert (model.form, model.profile, model.gpu, model.mixed_graphs) == (
        PHYSICAL_FORM, PROFILE, "NVIDIA H200", True,
    )  # fmt: skip
    assert model.capture_seconds("decode") == 0.07
    assert model.step_seconds(BatchShape()) == 0.0


def test_a_file_without_a_form_is_linear_and_one_saying_so_the_same(tmp_path: Path) -> None:
    data = physical_file()
    del data["form"], data["profile"]
    old = load_calibration(write(tmp_path / "old.json", data))
    said = load_calibration(write(tmp_path / "said.json", {**data, "form": LINEAR_FORM}))
    assert old == said and old.form == LINEAR_FORM and old.physical is None
    assert old == replace(fit_calibration(data["points"], "NVIDIA H200", MODEL),
                          decode_capture_s=0.07)  # fmt: skip


# The committed calibrations' prices of two steps, as they were before the physical form
# (pinned with main's tree at 463c366): a file from before it must price exactly as then.
PINNED = {
    "calibration_h200_granite-4.0-h-micro.json.gz": (0.003974942914647147, 0.0131335904552448),
    "calibration_h100_granite-4.0-h-micro.json": (0.005218159173070247, 0.01175051911509209),
}
PINNED_STEPS = (
    BatchShape.from_chunks(decodes(40, 1999)),
    graph_step([chunk(0, 1000, 300), *decodes(70, 1200)]),
)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_committed_linear_files_price_as_before(name: str) -> None:
    from benchmarks.common import RESULTS_DIR

    model = load_calibration(RESULTS_DIR / name)
    assert model.form == LINEAR_FORM
    prices = tuple(model.step_seconds(step) for step in PINNED_STEPS)
    assert prices == PINNED[name]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"form": "quadratic"}, "unknown calibration form 'quadratic'; known: linear, physical"),
        ({"profile": None}, "needs the calibration's model and GPU profile"),
        ({"model": None}, "needs the calibration's model and GPU profile"),
        ({"model": 3}, "needs the calibration's model and GPU profile"),
        ({"profile": "b200"}, "unknown GPU profile 'b200'"),
        ({"model": "no-such-model"}, "prices the model's geometry: unknown model"),
    ],
)
def test_a_bad_physical_file_is_one_line_naming_it(
    tmp_path: Path, fields: dict, message: str
) -> None:
    path = write(tmp_path / "bad.json", physical_file(**fields))
    with pytest.raises(ValueError) as error:
        load_calibration(path)
    assert str(error.value).startswith(f"{path}: not a valid step-time calibration")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_model_of_one_form_with_the_others_parts_is_refused() -> None:
    physical = fit_calibration(
        [point(s, truth_step_s(s)) for s in short_steps()], "h200", MODEL, PHYSICAL_FORM, PROFILE
    )
    with pytest.raises(ValueError, match="physical form's features"):
        replace(physical, features=PHYSICAL_FEATURES[:-1], coefficients=physical.coefficients[:-1])
    with pytest.raises(ValueError, match="needs the model, the GPU profile"):
        replace(physical, physical=None)
    with pytest.raises(ValueError, match="linear form prices no physical"):
        replace(physical, form=LINEAR_FORM)
    with pytest.raises(ValueError, match="unknown calibration form"):
        CalibratedModel("x", None, (1.0,) * 4, 0.0, 4, form="cubic")


def test_a_split_model_has_no_physical_form() -> None:
    from avmp.models.tensor_parallel import rank_geometry

    with pytest.raises(ValueError, match="one GPU"):
        PhysicalFeatures.of(rank_geometry(resolve_model("nemotron-h-8b"), 2), get_profile("h100"))


def test_the_simulator_runs_on_a_physical_calibration(tmp_path: Path) -> None:
    """A physical file drives the simulator's clock as a linear one does: same class,
    mixed graphs and capture costs read from it."""
    from avmp.sim.simulator import SimConfig

    path = write(tmp_path / "cal.json", physical_file())
    model = SimConfig(calibration=str(path)).time_model(GEOMETRY)
    assert isinstance(model, CalibratedModel) and model.form == PHYSICAL_FORM
    per_token = timing.prefill_s_per_token(model, 2048)
    assert math.isfinite(per_token) and per_token > 0
