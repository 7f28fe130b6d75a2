"""A trace replayed with arrival times (`Engine.generate(..., arrival_s=...)`): requests
join only once the clock reaches their arrival, the engine sleeps while nothing is
runnable, the recorded times are consistent, and greedy outputs match the run that has
every prompt at t = 0; and the engine's feasibility check (weights + cache +
activations against the device's memory)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from engine_helpers import DEVICES, MiB, TinyCheckpoint, random_prompts
from test_memory_pressure import HEAVY, MAX_TOKENS
from test_overlap import LENGTHS

import avmp.engine.engine as engine_module
from avmp.engine.engine import (
    Engine,
    EngineConfig,
    GenerationOutput,
    activation_estimate_bytes,
    check_device_holds,
)
from avmp.units import format_bytes

FAMILY = "granitemoehybrid"
# Far apart against a tiny request's few milliseconds, so each request has finished
# before the next arrives and the engine must sleep between them.
SPREAD_S = [0.0, 0.6, 0.3, 0.9]


@pytest.fixture(scope="module", params=DEVICES)
def engine(
    request: pytest.FixtureRequest, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> Engine:
    path = tiny_checkpoint(FAMILY).path
    return Engine(path, EngineConfig(4 * MiB, device=request.param, block_size=4))


def check_times(outputs: list[GenerationOutput], arrivals: list[float]) -> None:
    """Every request joined at or after its arrival and before its first token, which
    came no later than its last; TTFT and TPOT follow from those times."""
    for output, arrival in zip(outputs, arrivals, strict=True):
        assert output.arrival_s == arrival
        assert output.joined_s is not None and output.first_token_s is not None
        assert output.finish_s is not None and output.ttft_s is not None
        assert arrival <= output.joined_s <= output.first_token_s <= output.finish_s
        assert output.ttft_s == pytest.approx(output.first_token_s - arrival)
        steps = len(output.token_ids) - 1
        tpot = (output.finish_s - output.first_token_s) / steps if steps else 0.0
        assert output.tpot_s == pytest.approx(tpot)


def test_requests_wait_for_their_arrival_and_match_the_offline_run(engine: Engine) -> None:
    prompts = random_prompts([5, 9, 3, 7], seed=3)
    offline = engine.generate(prompts, max_tokens=4)
    # On CUDA a generate's first steps may compile kernels and capture graphs for the
    # pools' new sizes (1.1 s on an H200, even on a second pass): there the arrivals
    # are spread five times wider, so that each request still finishes before the next.
    spread = SPREAD_S if engine.device.type == "cpu" else [5 * t for t in SPREAD_S]
    if engine.device.type == "cuda":
        # one request per step needs kernel variants that the batch above did not (the
        # chunked scan's launch shapes follow the step's padded size): compile them first
        engine.generate(prompts, max_tokens=4, arrival_s=spread)
    online = engine.generate(prompts, max_tokens=4, arrival_s=spread)
    assert [o.token_ids for o in online] == [o.token_ids for o in offline]
    check_times(online, spread)
    by_arrival = sorted(online, key=lambda o: o.arrival_s)
    for earlier, later in zip(by_arrival, by_arrival[1:], strict=False):
        # finished (its last token read) before the next arrived, then the engine slept
        assert earlier.finish_s is not None and earlier.finish_s < later.arrival_s
    assert engine.stats.elapsed_s >= max(spread)
    assert 0 < engine.stats.idle_s < engine.stats.elapsed_s
    assert engine.allocator.usage().num_requests == 0


def test_without_arrivals_every_prompt_is_there_from_the_start(engine: Engine) -> None:
    prompts = random_prompts([6, 2, 8], seed=4)
    outputs = engine.generate(prompts, max_tokens=[1, 3, 5])
    check_times(outputs, [0.0] * 3)
    assert outputs[0].tpot_s == 0.0  # one token: no time per output token
    assert engine.stats.idle_s == 0.0


@pytest.mark.parametrize("overlap", [True, False])
def test_staggered_arrivals_under_memory_pressure_keep_greedy_tokens(
    tiny_checkpoint: Callable[..., TinyCheckpoint], overlap: bool
) -> None:
    """Arrivals a few steps apart into a 6 MiB budget: requests join mid-run, are
    preempted and recomputed (vLLM v1's policies: growth-aware admission would not
    preempt here); the tokens are those of the all-at-t=0 run."""
    config = EngineConfig(
        6 * MiB, block_size=16, max_num_seqs=8, max_num_batched_tokens=64,
        check_integrity=True, overlap=overlap, preemption="recompute", admission="greedy",
    )  # fmt: skip
    engine = Engine(tiny_checkpoint(FAMILY, **HEAVY[FAMILY]).path, config)
    prompts = random_prompts(LENGTHS)
    offline = engine.generate(prompts, max_tokens=MAX_TOKENS)
    arrivals = [0.004 * ((7 * i) % len(prompts)) for i in range(len(prompts))]
    online = engine.generate(prompts, max_tokens=MAX_TOKENS, arrival_s=arrivals)
    assert [(o.token_ids, o.finish_reason) for o in online] == [
        (o.token_ids, o.finish_reason) for o in offline
    ]
    assert sum(o.num_preemptions for o in offline) > 0  # the budget is tight
    check_times(online, arrivals)


@pytest.mark.parametrize(
    ("arrivals", "message"),
    [
        ([0.0], "1 arrival times for 2 prompts"),
        ([0.0, -1.0], r"arrival_s\[1\] must be finite and >= 0"),
        ([float("nan"), 0.0], r"arrival_s\[0\] must be finite"),
        ([0.0, float("inf")], r"arrival_s\[1\] must be finite"),
        ([True, 0.0], r"arrival_s\[0\] must be a number"),
        (["1", 0.0], r"arrival_s\[0\] must be a number"),
    ],
)
def test_bad_arrivals_raise_value_error(
    engine: Engine, arrivals: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        engine.generate(random_prompts([3, 4]), max_tokens=2, arrival_s=arrivals)


# -- feasibility ----------------------------------------------------------------------------


def test_activation_estimate_follows_its_stated_formula(engine: Engine) -> None:
    config = EngineConfig(4 * MiB, max_num_seqs=8, max_num_batched_tokens=256)
    geometry = engine.geometry
    expected = 256 * geometry.hidden_size * 16 * 4 + 8 * geometry.vocab_size * 4
    assert activation_estimate_bytes(geometry, config, dtype_bytes=4) == expected


def test_a_run_larger_than_the_host_is_one_line_naming_each_figure(
    tiny_checkpoint: Callable[..., TinyCheckpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget alone fits the host (checked before loading); with the loaded
    weights and the activation estimate it does not."""
    path = tiny_checkpoint(FAMILY).path
    config = EngineConfig(4 * MiB, block_size=4)
    reference = Engine(path, config)
    model = reference.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    dtype_bytes = next(model.parameters()).element_size()
    activations = activation_estimate_bytes(reference.geometry, config, dtype_bytes)
    free = config.memory_bytes + activations - 1  # left beside the loaded weights
    monkeypatch.setattr(engine_module, "host_available_bytes", lambda: free)
    with pytest.raises(ValueError) as error:
        Engine(path, config)
    message = str(error.value)
    assert "\n" not in message
    assert message == (
        f"weights {format_bytes(weights)} + cache 4.0 MiB + activations "
        f"{format_bytes(activations)} = {format_bytes(weights + 4 * MiB + activations)} is "
        f"more than this host has {format_bytes(free + weights)} available before the weights"
    )
    monkeypatch.setattr(engine_module, "host_available_bytes", lambda: free + 1)
    Engine(path, config)  # exactly enough


def test_check_device_holds_names_the_budget_alone_before_loading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_module, "host_available_bytes", lambda: 8 * MiB)
    check_device_holds(torch.device("cpu"), 8 * MiB)
    with pytest.raises(ValueError, match=r"^memory 9.0 MiB is more than this host has 8.0 MiB"):
        check_device_holds(torch.device("cpu"), 9 * MiB)
    with pytest.raises(ValueError, match=r"^weights 1.0 MiB \+ cache 6.0 MiB \+ activations"):
        check_device_holds(torch.device("cpu"), 6 * MiB, 1 * MiB, 2 * MiB)
    monkeypatch.setattr(engine_module, "host_available_bytes", lambda: None)
    check_device_holds(torch.device("cpu"), 1 << 60)  # unknown: nothing to check against


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cache_that_fits_only_without_the_weights_is_refused_on_the_gpu(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """A budget of nearly all the GPU's free memory passes the check before loading and is
    refused once the weights and the activations are counted."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    budget = (free - 64 * MiB) // (2 * MiB) * (2 * MiB)
    # 65,536 tokens per step: at least 128 MiB of activations for this 64-wide model
    config = EngineConfig(budget, device="cuda", max_num_batched_tokens=1 << 16)
    with pytest.raises(ValueError, match=r"^weights .* \+ activations .* has .* free"):
        Engine(tiny_checkpoint(FAMILY).path, config)
