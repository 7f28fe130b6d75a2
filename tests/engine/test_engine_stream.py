"""The engine one step at a time: requests added, stepped and aborted between steps,
each with its own sampling settings, reproducible from its seed whatever shares the
batch; aborts give the memory back at the next step."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_helpers import MiB, TinyCheckpoint, random_prompts
from test_memory_pressure import HEAVY, MAX_TOKENS

from avmp.engine.engine import (
    Engine,
    EngineConfig,
    RequestOptions,
    RequestTooLarge,
    RequestUpdate,
)
from avmp.engine.sampling import (
    PenaltyCounts,
    SamplingParams,
    filtered_probs,
    steered_logits,
)

FAMILY = "granitemoehybrid"
# the CUDA cases run the Triton kernels, overlapped, with decode graphs
ON_DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]
PRESSURE_LENGTHS = [4] * 8 + [120] * 4 + [4] * 8  # as test_memory_pressure: preempts
MAX_STEPS = 2000


def light_engine(checkpoint: TinyCheckpoint, **options: Any) -> Engine:
    config = EngineConfig(4 * MiB, block_size=4, preemption="recompute", **options)
    return Engine(checkpoint.path, config)


def pressure_engine(checkpoint: TinyCheckpoint, **options: Any) -> Engine:
    """test_memory_pressure's run: vLLM's greedy admission in 6 MiB, which preempts."""
    config = EngineConfig(
        memory_bytes=6 * MiB,
        block_size=16,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        check_integrity=True,
        **{"preemption": "recompute", "admission": "greedy", **options},
    )
    return Engine(checkpoint.path, config)


def drain(
    engine: Engine, updates: dict[int, list[RequestUpdate]] | None = None
) -> dict[int, list[RequestUpdate]]:
    """Step until every request had its final update; per id, its updates (added to
    ``updates``, those of earlier steps). Checks that nothing follows a final update and
    that the counts add up."""
    updates = {} if updates is None else updates
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished_requests:
            break
        record(updates, engine.step())
        engine.scheduler.check_integrity()
    else:
        raise AssertionError(f"requests unfinished after {MAX_STEPS} steps")
    for request_id, seen in updates.items():
        assert seen[-1].finished and not any(u.finished for u in seen[:-1]), request_id
        assert seen[-1].num_output_tokens == len(tokens_of(seen)), request_id
    return updates


def record(updates: dict[int, list[RequestUpdate]], new: list[RequestUpdate]) -> None:
    for update in new:
        seen = updates.setdefault(update.request_id, [])
        assert not (seen and seen[-1].finished), f"{update.request_id}: after its final"
        seen.append(update)


def tokens_of(updates: list[RequestUpdate]) -> list[int]:
    return [token for update in updates for token in update.new_token_ids]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> TinyCheckpoint:
    return tiny_checkpoint(FAMILY)


@pytest.fixture(scope="module")
def heavy(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> TinyCheckpoint:
    """No end-of-sequence token: the memory pressure does not depend on the answers."""
    return tiny_checkpoint(FAMILY, eos_token_id=None, **HEAVY[FAMILY])


@pytest.mark.parametrize("overlap", [False, True])
def test_steps_give_the_outputs_of_generate(checkpoint: TinyCheckpoint, overlap: bool) -> None:
    engine = light_engine(checkpoint, overlap=overlap)
    prompts = random_prompts([5, 9, 3, 12], seed=4)
    limits = [4, 6, 2, 5]
    expected = engine.generate(prompts, max_tokens=limits)
    ids = [
        engine.add_request(prompt, RequestOptions(max_tokens=limit))
        for prompt, limit in zip(prompts, limits, strict=True)
    ]
    assert engine.has_unfinished_requests and engine.num_waiting == 4
    updates = drain(engine)
    for request_id, output in zip(ids, expected, strict=True):
        assert tokens_of(updates[request_id]) == output.token_ids
        assert output.token_ids == checkpoint.reference(
            output.prompt_token_ids, len(output.token_ids)
        )
        final = updates[request_id][-1]
        assert final.finish_reason == output.finish_reason == "length"
        assert final.num_prompt_tokens == len(output.prompt_token_ids)
    assert engine.allocator.usage().num_requests == 0
    assert engine.step() == [] and not engine.has_unfinished_requests


@pytest.mark.parametrize("device", ON_DEVICES)
@pytest.mark.parametrize("overlap", [False, True])
def test_abort_frees_a_running_request_at_the_next_step(
    checkpoint: TinyCheckpoint, overlap: bool, device: str
) -> None:
    engine = light_engine(checkpoint, overlap=overlap, check_integrity=True, device=device)
    ids = [engine.add_request(p, RequestOptions(max_tokens=20)) for p in random_prompts([6, 7, 8])]
    updates: dict[int, list[RequestUpdate]] = {}
    for _ in range(3):
        record(updates, engine.step())
    assert ids[1] in engine.allocator.request_ids and engine.num_running == 3
    engine.abort_request(ids[1])
    engine.abort_request(ids[1])  # twice is once
    engine.abort_request(12345)  # unknown: ignored
    stepped = engine.step()
    record(updates, stepped)
    final = [u for u in stepped if u.request_id == ids[1]]
    assert len(final) == 1 and final[0].finished and final[0].finish_reason == "abort"
    assert final[0].num_output_tokens == len(tokens_of(updates[ids[1]]))
    assert ids[1] not in engine.allocator.request_ids
    usage = engine.allocator.usage()
    assert usage.num_requests == engine.num_running == 2
    engine.allocator.check_integrity()
    engine.scheduler.check_integrity()
    drain(engine, updates)  # checks that nothing follows the abort's final update
    for request_id in (ids[0], ids[2]):
        assert updates[request_id][-1].finish_reason == "length"
        assert updates[request_id][-1].num_output_tokens == 20
    engine.abort_request(ids[0])  # finished: ignored
    assert engine.step() == [] and engine.allocator.usage().num_requests == 0


def test_abort_of_a_waiting_request_drops_it(checkpoint: TinyCheckpoint) -> None:
    engine = light_engine(checkpoint, max_num_seqs=1)
    first, second = (
        engine.add_request(p, RequestOptions(max_tokens=4)) for p in random_prompts([5, 5])
    )
    updates: dict[int, list[RequestUpdate]] = {}
    record(updates, engine.step())
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.abort_request(second)
    record(updates, engine.step())
    assert updates[second] == [RequestUpdate(second, [], True, "abort", None, 5, 0)]
    assert engine.num_waiting == 0
    assert drain(engine, updates)[first][-1].finish_reason == "length"
    assert engine.totals.num_aborted == 1


@pytest.mark.parametrize("overlap", [False, True])
def test_abort_of_a_swapped_out_request_frees_its_host_copy(
    heavy: TinyCheckpoint, overlap: bool
) -> None:
    engine = pressure_engine(heavy, preemption="swap", overlap=overlap)
    options = RequestOptions(max_tokens=MAX_TOKENS)
    ids = [engine.add_request(p, options) for p in random_prompts(PRESSURE_LENGTHS)]
    host_tier = engine.scheduler.host_tier
    updates: dict[int, list[RequestUpdate]] = {}
    for _ in range(MAX_STEPS):
        record(updates, engine.step())
        if host_tier.request_ids:
            break
    victim = host_tier.request_ids[0]
    assert victim in ids and victim not in engine.allocator.request_ids
    used = host_tier.used_bytes
    engine.abort_request(victim)
    record(updates, engine.step())
    assert updates[victim][-1].finish_reason == "abort"
    assert not host_tier.holds(victim) and host_tier.used_bytes < used
    assert victim not in engine.allocator.request_ids
    engine.allocator.check_integrity()
    engine.scheduler.check_integrity()
    drain(engine, updates)
    assert all(updates[r][-1].finish_reason == "length" for r in ids if r != victim)
    assert host_tier.used_bytes == 0 and engine.allocator.usage().num_requests == 0


SEEDED = RequestOptions(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, top_k=40, seed=1234)


@pytest.mark.parametrize("device", ON_DEVICES)
def test_a_seeded_request_samples_alike_alone_and_in_a_preempting_batch(
    heavy: TinyCheckpoint, device: str
) -> None:
    prompt = random_prompts([120], seed=9)[0]
    alone = light_engine(heavy, check_integrity=True, device=device)
    target = alone.add_request(prompt, SEEDED)
    expected = tokens_of(drain(alone)[target])
    assert len(expected) == MAX_TOKENS
    engine = pressure_engine(heavy, device=device)
    others = [  # every other request samples differently, or not at all
        RequestOptions(MAX_TOKENS, temperature=0.7 * (i % 3), top_k=5 * (i % 4), seed=i)
        for i in range(len(PRESSURE_LENGTHS))
    ]
    ids = []
    for index, (other, options) in enumerate(
        zip(random_prompts(PRESSURE_LENGTHS), others, strict=True)
    ):
        if index == 11:  # the last long prompt: preempted (twice) in this batch
            target = engine.add_request(prompt, SEEDED)
        ids.append(engine.add_request(other, options))
    updates = drain(engine)
    assert engine.totals.num_preemptions > 0
    assert updates[target][-1].num_preemptions > 0
    assert tokens_of(updates[target]) == expected
    reseeded = alone.add_request(prompt, RequestOptions(**{**vars(SEEDED), "seed": 4321}))
    assert tokens_of(drain(alone)[reseeded]) != expected


def test_without_a_seed_requests_draw_differently(checkpoint: TinyCheckpoint) -> None:
    engine = light_engine(checkpoint)
    prompt = random_prompts([6], seed=2)[0]
    options = RequestOptions(max_tokens=8, temperature=1.0)
    ids = [engine.add_request(prompt, options) for _ in range(2)]
    updates = drain(engine)
    assert tokens_of(updates[ids[0]]) != tokens_of(updates[ids[1]])


def test_top_k_one_is_greedy(checkpoint: TinyCheckpoint) -> None:
    engine = light_engine(checkpoint)
    prompt = random_prompts([7], seed=5)[0]
    hot = engine.add_request(prompt, RequestOptions(max_tokens=6, temperature=2.0, top_k=1, seed=1))
    assert tokens_of(drain(engine)[hot]) == checkpoint.reference(prompt, 6)


def test_rows_of_a_batch_filter_as_they_would_alone() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    rows = [
        SamplingParams(1.0, top_k=5),
        SamplingParams(0.7, top_p=0.8),
        SamplingParams(1.3),
        SamplingParams(0.9, top_p=0.6, top_k=9),
    ]
    batch = filtered_probs(logits, rows)
    for index, row in enumerate(rows):
        assert torch.equal(batch[index], filtered_probs(logits[index : index + 1], [row])[0])
    assert int((batch[0] > 0).sum()) == 5
    assert 1 <= int((batch[3] > 0).sum()) <= 9
    assert torch.equal(batch[2], torch.softmax(logits[2] / 1.3, dim=-1))
    torch.testing.assert_close(batch.sum(dim=-1), torch.ones(4))


def test_top_k_comes_before_top_p() -> None:
    """k = 3 keeps [.4, .3, .2], renormalised to [4/9, 3/9, 2/9]; top-p 0.5 then keeps
    the first two (the mass above the third is 7/9), renormalised to [4/7, 3/7]."""
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    kept = filtered_probs(logits, [SamplingParams(1.0, top_p=0.5, top_k=3)])
    torch.testing.assert_close(kept, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))


def test_min_p_keeps_tokens_near_the_most_likely_before_top_k() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]).log()
    kept = filtered_probs(logits, [SamplingParams(1.0, min_p=0.4), SamplingParams(1.0)])
    torch.testing.assert_close(kept[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(kept[1], torch.tensor([0.5, 0.3, 0.15, 0.05]))
    both = filtered_probs(logits[:1], [SamplingParams(1.0, top_k=1, min_p=0.2)])
    torch.testing.assert_close(both[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(1.0, min_p=1.5)
    with pytest.raises(ValueError, match="min_p"):
        RequestOptions(4, min_p=-0.1)


@pytest.mark.parametrize("top_k", [-1, 1.5, True])
def test_top_k_must_be_a_whole_number(top_k: Any) -> None:
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(1.0, top_k=top_k)


def first_new_token(tokens: list[int], start: int) -> int:
    """The first index >= ``start`` whose token did not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.mark.parametrize("overlap", [False, True])
def test_a_stop_id_finishes_the_request_with_it(checkpoint: TinyCheckpoint, overlap: bool) -> None:
    engine = light_engine(checkpoint, overlap=overlap)
    prompt = random_prompts([9], seed=6)[0]
    reference = checkpoint.reference(prompt, 10)
    cut = first_new_token(reference, 2)
    stop = RequestOptions(max_tokens=10, stop_token_ids=(reference[cut], 127))
    stopped, free = engine.add_request(prompt, stop), engine.add_request(prompt, RequestOptions(10))
    updates = drain(engine)
    assert tokens_of(updates[stopped]) == reference[: cut + 1]
    assert updates[stopped][-1].finish_reason == "stop"
    assert tokens_of(updates[free]) == reference
    assert engine.allocator.usage().num_requests == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_end_of_sequence_stops_unless_ignored(
    tiny_checkpoint: Callable[..., TinyCheckpoint], overlap: bool
) -> None:
    prompt = random_prompts([9], seed=6)[0]
    reference = tiny_checkpoint(FAMILY, eos_token_id=None).reference(prompt, 10)
    cut = first_new_token(reference, 1)
    same_weights = tiny_checkpoint(FAMILY, eos_token_id=reference[cut])
    engine = light_engine(same_weights, overlap=overlap)
    stops = engine.add_request(prompt, RequestOptions(10))
    ignores = engine.add_request(prompt, RequestOptions(10, ignore_eos=True))
    updates = drain(engine)
    assert tokens_of(updates[stops]) == reference[: cut + 1]
    assert updates[stops][-1].finish_reason == "stop"
    assert tokens_of(updates[ignores]) == reference
    assert updates[ignores][-1].finish_reason == "length"


@pytest.mark.parametrize("device", ON_DEVICES)
@pytest.mark.parametrize("overlap", [False, True])
def test_min_tokens_holds_back_stop_ids_and_end_of_sequence(
    tiny_checkpoint: Callable[..., TinyCheckpoint], overlap: bool, device: str
) -> None:
    """Greedy: where the reference would sample the stop id (or end of sequence) before
    ``min_tokens``, the next best token comes instead; the tokens before it are the
    reference's, and no stop token appears before ``min_tokens``."""
    prompt = random_prompts([9], seed=6)[0]
    reference = tiny_checkpoint(FAMILY, eos_token_id=None).reference(prompt, 10)
    cut = first_new_token(reference, 2)
    stop_id = reference[cut]
    same_weights = tiny_checkpoint(FAMILY, eos_token_id=stop_id)
    engine = light_engine(same_weights, overlap=overlap, device=device)
    held = RequestOptions(10, min_tokens=cut + 2)
    by_id = RequestOptions(10, stop_token_ids=(stop_id,), ignore_eos=True, min_tokens=cut + 2)
    requests = [engine.add_request(prompt, held), engine.add_request(prompt, by_id)]
    plain = engine.add_request(prompt, RequestOptions(10))
    updates = drain(engine)
    assert tokens_of(updates[plain]) == reference[: cut + 1]
    for request in requests:
        tokens = tokens_of(updates[request])
        assert len(tokens) >= cut + 2 and tokens[:cut] == reference[:cut]
        assert stop_id not in tokens[: cut + 2]
        assert updates[request][-1].finish_reason in ("stop", "length")
        if updates[request][-1].finish_reason == "stop":
            assert tokens[-1] == stop_id


@pytest.mark.parametrize("device", ON_DEVICES)
@pytest.mark.parametrize("overlap", [False, True])
def test_logprobs_come_with_each_token_from_the_raw_distribution(
    tiny_checkpoint: Callable[..., TinyCheckpoint], overlap: bool, device: str
) -> None:
    """Greedy: each token is its position's most likely, with that log-probability; the
    top k are sorted and are log-probabilities; one per token in every update; none
    without asking. Under min_tokens' mask the top still shows the stop id (the raw
    distribution) where the sampled token is the next best."""
    prompt = random_prompts([9], seed=6)[0]
    reference = tiny_checkpoint(FAMILY, eos_token_id=None).reference(prompt, 10)
    cut = first_new_token(reference, 2)
    engine = light_engine(tiny_checkpoint(FAMILY, eos_token_id=reference[cut]),
                          overlap=overlap, device=device)  # fmt: skip
    asked = engine.add_request(prompt, RequestOptions(10, logprobs=3))
    held = engine.add_request(prompt, RequestOptions(10, logprobs=0, min_tokens=cut + 2))
    plain = engine.add_request(prompt, RequestOptions(10))
    updates = drain(engine)
    for update in updates[asked] + updates[held]:
        assert update.new_logprobs is not None
        assert len(update.new_logprobs) == len(update.new_token_ids)
    assert all(u.new_logprobs is None for u in updates[plain])
    tokens = tokens_of(updates[asked])
    logprobs = [lp for u in updates[asked] for lp in u.new_logprobs or []]
    assert tokens == reference[: cut + 1] and len(logprobs) == len(tokens)
    for token, lp in zip(tokens, logprobs, strict=True):
        assert len(lp.top) == 3 and lp.top[0][0] == token
        assert lp.logprob == pytest.approx(lp.top[0][1]) and lp.logprob <= 0.0
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    held_lps = [lp for u in updates[held] for lp in u.new_logprobs or []]
    assert all(lp.top == () for lp in held_lps)
    assert held_lps[cut].logprob < logprobs[cut].logprob  # not the argmax: that was masked
    with pytest.raises(ValueError, match="logprobs"):
        RequestOptions(4, logprobs=21)


def test_steered_logits_add_to_a_copy_and_skip_ids_past_the_vocabulary() -> None:
    logits = torch.arange(12, dtype=torch.float32).view(3, 4)
    inf = float("-inf")
    rows = [(0, [(1, inf), (3, inf)]), (2, [(0, inf), (9, 5.0), (3, 2.5)])]
    steered = steered_logits(logits, rows)
    assert torch.equal(logits, torch.arange(12, dtype=torch.float32).view(3, 4))
    assert steered.tolist() == [[0.0, inf, 2.0, inf], [4.0, 5.0, 6.0, 7.0], [inf, 9.0, 10.0, 13.5]]
    assert steered_logits(logits, [(1, [(7, 1.0)])]) is logits
    both = steered_logits(logits, [(1, [(2, -1.0), (2, inf)])])  # a bias on a masked id
    assert both[1].tolist() == [4.0, 5.0, inf, 7.0]


def test_penalty_counts_follow_vllms_order_and_count_on_the_device() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0], [4.0, -2.0, 0.0, 1.0]])
    counts = PenaltyCounts(4, torch.device("cpu"))
    counts.add(10, prompt=[0])
    counts.add(20, prompt=[3])
    counts.count([(0, 10), (2, 20)], torch.tensor([3, 9, 0]))  # sampled: 3 for 10, 0 for 20
    counts.count([(0, 10), (1, 20)], torch.tensor([3, 1, 2]))  # 3 again for 10, 1 for 20
    counts.count([(0, 10)], torch.tensor([2]))
    rows = [(0, 10, (0.5, 0.25, 1.0)), (2, 20, (0.0, 1.0, 2.0))]
    out = counts.apply(logits, rows)
    assert out[0].tolist() == pytest.approx([2.0, -1.0, 0.5 - 0.5 - 0.25, 3.0 - 1.0 - 0.25])
    assert out[1].tolist() == [1.0, 1.0, 1.0, 1.0]  # no penalty row
    # request 20: seen 0 and 1 (output) and 3 (prompt); presence on its outputs alone
    assert out[2].tolist() == pytest.approx([4.0 / 2 - 1.0, -2.0 * 2 - 1.0, 0.0, 1.0 / 2])
    assert logits[0, 3] == 3.0 and counts.apply(logits, []) is logits  # copies
    counts.remove(10)
    counts.add(30, prompt=[])  # reuses request 10's row, cleared
    assert 10 not in counts and 30 in counts and len(counts) == 2
    assert counts.apply(logits, [(0, 30, (1.0, 1.0, 1.5))])[0].tolist() == logits[0].tolist()
    for i in range(40, 50):  # the table grows
        counts.add(i, prompt=[1])
    assert counts.apply(logits, [(1, 45, (0.0, 0.0, 2.0))])[1].tolist() == [1.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("device", ON_DEVICES)
def test_penalties_give_the_same_tokens_with_and_without_overlap(
    checkpoint: TinyCheckpoint, device: str
) -> None:
    """With overlap a request's last token is still on the device when the next is
    sampled; the penalties count it there: the tokens equal a run without overlap."""
    prompt = random_prompts([9], seed=6)[0]
    options = [RequestOptions(12, frequency_penalty=1.5, presence_penalty=0.5, ignore_eos=True),
               RequestOptions(12, repetition_penalty=1.8, ignore_eos=True),
               RequestOptions(12, ignore_eos=True)]  # fmt: skip
    runs = []
    for overlap in (False, True):
        engine = light_engine(checkpoint, overlap=overlap, device=device)
        ids = [engine.add_request(prompt, o) for o in options]
        updates = drain(engine)
        runs.append([tokens_of(updates[i]) for i in ids])
    assert runs[0] == runs[1]
    plain = runs[0][2]
    if len(set(plain)) < len(plain):  # greedy repeats a token: the penalties change that
        assert runs[0][0] != plain and runs[0][1] != plain
    for bad in [dict(frequency_penalty=2.5), dict(presence_penalty=math.nan),
                dict(repetition_penalty=0.0), dict(repetition_penalty=math.inf)]:  # fmt: skip
        with pytest.raises(ValueError, match="penalty"):
            RequestOptions(4, **bad)


@pytest.mark.parametrize("device", ON_DEVICES)
def test_logit_bias_steers_greedy_tokens(checkpoint: TinyCheckpoint, device: str) -> None:
    engine = light_engine(checkpoint, device=device)
    prompt = random_prompts([9], seed=6)[0]
    reference = checkpoint.reference(prompt, 6)
    push = RequestOptions(6, logit_bias=((77, 100.0),), ignore_eos=True)
    ban = RequestOptions(6, logit_bias=((reference[0], -100),), logprobs=1)
    pushed, banned = engine.add_request(prompt, push), engine.add_request(prompt, ban)
    updates = drain(engine)
    assert tokens_of(updates[pushed]) == [77] * 6
    tokens = tokens_of(updates[banned])
    assert tokens[0] != reference[0]
    assert updates[banned][0].new_logprobs[0].top[0][0] == reference[0]  # reported: the model's
    for bad in [((-1, 1.0),), ((3, 101.0),), ((3, math.nan),), (3, 1.0)]:
        with pytest.raises(ValueError, match="logit_bias"):
            RequestOptions(4, logit_bias=bad)


def test_a_request_that_can_never_fit_is_refused_before_queueing(
    checkpoint: TinyCheckpoint,
) -> None:
    engine = light_engine(checkpoint)
    with pytest.raises(RequestTooLarge, match="do not fit even in an empty memory"):
        engine.add_request([5] * 100_000, RequestOptions(max_tokens=4))
    assert not engine.has_unfinished_requests and engine.num_waiting == 0
    limited = light_engine(checkpoint, max_model_len=10)
    with pytest.raises(
        RequestTooLarge, match="8 \\+ max_tokens 3 = 11 tokens is more than max_model_len 10"
    ):
        limited.add_request([5] * 8, RequestOptions(max_tokens=3))
    fits = limited.add_request([5] * 7, RequestOptions(max_tokens=3))
    assert drain(limited)[fits][-1].finish_reason == "length"
    rejected, kept = limited.generate([[5] * 8, [5] * 4], max_tokens=3)
    assert rejected.finish_reason == "rejected" and "max_model_len 10" in (rejected.error or "")
    assert kept.finish_reason == "length" and len(kept.token_ids) == 3
    assert limited.totals.num_rejected == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(seed=1.5), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
        (dict(stop_token_ids=7), "stop_token_ids"),
        (dict(ignore_eos="yes"), "ignore_eos"),
        (dict(max_tokens=4, min_tokens=5), "min_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=1.5), "min_tokens"),
    ],
)
def test_bad_options_raise_value_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RequestOptions(**options)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "at least one token"),
        ([1, 500], r"token ids must lie in \[0, 128\)"),
        ("hi", "tokenizer"),
    ],
)
def test_bad_prompts_raise_value_error(
    checkpoint: TinyCheckpoint, prompt: Any, message: str
) -> None:
    engine = light_engine(checkpoint)
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, RequestOptions())
    assert not engine.has_unfinished_requests


@pytest.mark.parametrize("options", [None, {"max_tokens": 2}, SamplingParams()])
def test_options_of_another_type_raise_type_error(checkpoint: TinyCheckpoint, options: Any) -> None:
    engine = light_engine(checkpoint)
    with pytest.raises(TypeError, match="options must be a RequestOptions"):
        engine.add_request([1, 2], options)
    assert not engine.has_unfinished_requests


def test_generate_waits_for_no_one_and_close_ends_the_engine(checkpoint: TinyCheckpoint) -> None:
    engine = light_engine(checkpoint)
    engine.add_request([4, 5, 6], RequestOptions(max_tokens=3))
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.generate([[4, 5]], max_tokens=2)
    engine.step()
    engine.close()
    engine.close()  # idempotent
    assert not engine.has_unfinished_requests
    with pytest.raises(RuntimeError, match="closed"):
        engine.step()
    with pytest.raises(RuntimeError, match="closed"):
        engine.add_request([4, 5, 6], RequestOptions())


def test_totals_count_the_whole_life(checkpoint: TinyCheckpoint) -> None:
    engine = light_engine(checkpoint)
    outputs = engine.generate(random_prompts([4, 6]), max_tokens=3)
    first_steps = engine.totals.num_steps
    assert first_steps == engine.stats.num_steps > 0
    added = engine.add_request([7, 8, 9], RequestOptions(max_tokens=5))
    drain(engine)
    totals = engine.totals
    assert totals.num_requests == 3 and totals.num_prompt_tokens == 4 + 6 + 3
    assert totals.num_generated_tokens == sum(len(o.token_ids) for o in outputs) + 5
    assert totals.num_steps > first_steps and added == 2


def test_warmup_leaves_the_totals_and_memory_as_they_were(checkpoint: TinyCheckpoint) -> None:
    engine = light_engine(checkpoint)
    before = dataclasses.asdict(engine.totals)
    engine.warmup()
    assert dataclasses.asdict(engine.totals) == before
    assert engine.allocator.usage().num_requests == 0
    engine.allocator.check_integrity()


def test_the_cuda_warmup_runs_a_prompt_longer_than_a_step_beside_short_ones(
    checkpoint: TinyCheckpoint,
) -> None:
    # what `warmup` runs on CUDA (the shapes that compile Triton variants): checked here
    # on the CPU, where it runs only a short request
    engine = light_engine(checkpoint, max_num_batched_tokens=64)
    prompts = engine._warmup_prompts()
    lengths = [len(p) for p in prompts]
    assert lengths[:3] == [5, 16, 33] and lengths[3] > 64
    assert all(0 <= t < engine.geometry.vocab_size for p in prompts for t in p)
    outputs = engine.generate(prompts, max_tokens=8, ignore_eos=True)
    assert all(len(o.token_ids) == 8 for o in outputs)
    small = light_engine(checkpoint, max_num_batched_tokens=1 << 16)  # 4 MiB: halves it
    long_tokens = len(small._warmup_prompts()[3])
    assert small.allocator.fits_alone(long_tokens + 8) and long_tokens < (1 << 16) + 17


def test_the_scheduler_forgets_requests_once_their_final_update_is_out(
    heavy: TinyCheckpoint,
) -> None:
    # a server runs for days: no record may stay per request served; generate still
    # reports each request's preemptions
    engine = pressure_engine(heavy)
    outputs = engine.generate(random_prompts(PRESSURE_LENGTHS, seed=5), MAX_TOKENS)
    assert not engine.scheduler.requests
    assert sum(o.num_preemptions for o in outputs) == engine.stats.num_preemptions > 0
    request_id = engine.add_request([5, 6, 7], RequestOptions(max_tokens=3))
    engine.abort_request(engine.add_request([5, 6], RequestOptions(max_tokens=3)))
    drain(engine)
    assert not engine.scheduler.requests and request_id not in engine.scheduler.requests
