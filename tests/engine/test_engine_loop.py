"""The engine loop: a background thread steps the engine while asyncio streams come
and go. Concurrent streams get the tokens of `Engine.generate`; a stream closed early
aborts its request and its memory comes back; a full queue, a shutdown either way and
an engine error each end streams as the contract says."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import torch
from engine_helpers import MiB, TinyCheckpoint, random_prompts

from avmp.engine.engine import Engine, EngineConfig, RequestOptions, RequestTooLarge, RequestUpdate
from avmp.engine.loop import EngineClosed, EngineDead, EngineLoop, EngineSnapshot, QueueFull

FAMILY = "granitemoehybrid"
TIMEOUT_S = 60.0  # every test's asyncio part ends within this, or fails


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, TIMEOUT_S)

    return asyncio.run(bounded())


async def consume(stream: AsyncIterator[RequestUpdate]) -> list[RequestUpdate]:
    return [update async for update in stream]


def tokens_of(updates: list[RequestUpdate]) -> list[int]:
    return [token for update in updates for token in update.new_token_ids]


async def wait_for_snapshot(loop: EngineLoop, ready: Callable[[EngineSnapshot], bool]) -> None:
    """Poll the loop's snapshot until ``ready`` holds."""
    while not ready(loop.snapshot()):
        await asyncio.sleep(0.01)


def config(**options: Any) -> EngineConfig:
    return EngineConfig(8 * MiB, block_size=4, preemption="recompute", **options)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> TinyCheckpoint:
    return tiny_checkpoint(FAMILY)


def check_streams_match_generate(engine: Engine, num_streams: int) -> None:
    """``num_streams`` concurrent greedy streams through the loop give the outputs of
    `Engine.generate` on the same prompts, and the memory is empty afterwards."""
    prompts = random_prompts([3 + (i * 7) % 17 for i in range(num_streams)], seed=8)
    limits = [2 + i % 9 for i in range(num_streams)]
    expected = engine.generate(prompts, max_tokens=limits)
    loop = EngineLoop(engine)
    loop.start()

    async def main() -> list[list[RequestUpdate]]:
        streams = [
            consume(loop.generate(prompt, RequestOptions(max_tokens=limit)))
            for prompt, limit in zip(prompts, limits, strict=True)
        ]
        return await asyncio.gather(*streams)

    try:
        results = run(main())
        for updates, output in zip(results, expected, strict=True):
            assert tokens_of(updates) == output.token_ids
            assert updates[-1].finish_reason == output.finish_reason
        snapshot = loop.snapshot()
        assert snapshot.usage.num_requests == 0 and snapshot.num_running == 0
        assert snapshot.totals.num_requests == 2 * num_streams and snapshot.healthy
    finally:
        loop.shutdown(abort_running=True)


def test_concurrent_streams_get_the_tokens_of_generate(checkpoint: TinyCheckpoint) -> None:
    check_streams_match_generate(Engine(checkpoint.path, config()), 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_concurrent_streams_on_cuda_with_overlap_and_graphs(checkpoint: TinyCheckpoint) -> None:
    engine = Engine(
        checkpoint.path, config(device="cuda", overlap=True, cuda_graphs=True, kernels="auto")
    )
    check_streams_match_generate(engine, 32)


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_a_stream_stopped_early_aborts_and_frees_its_memory(
    checkpoint: TinyCheckpoint, how: str
) -> None:
    loop = EngineLoop(Engine(checkpoint.path, config()))
    loop.start()
    options = RequestOptions(max_tokens=500, ignore_eos=True)

    async def main() -> None:
        stream = loop.generate(random_prompts([6])[0], options)
        first = await anext(stream)
        assert not first.finished
        if how == "aclose":
            await stream.aclose()
        else:
            started = asyncio.Event()

            async def read_on() -> None:
                started.set()
                async for _ in stream:
                    pass

            task = asyncio.create_task(read_on())
            await started.wait()
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await wait_for_snapshot(loop, lambda s: s.totals.num_aborted == 1)
        snapshot = loop.snapshot()
        assert snapshot.usage.num_requests == 0 and snapshot.usage.used_bytes == 0
        assert snapshot.num_running == snapshot.num_waiting == 0
        # and the loop keeps serving
        after = await consume(loop.generate([5, 6], RequestOptions(max_tokens=3)))
        assert after[-1].finish_reason in ("length", "stop")

    try:
        run(main())
    finally:
        loop.shutdown(abort_running=True)


def test_abort_by_id_ends_the_stream(checkpoint: TinyCheckpoint) -> None:
    loop = EngineLoop(Engine(checkpoint.path, config()))
    loop.start()

    async def main() -> list[RequestUpdate]:
        stream = loop.generate([7, 8, 9], RequestOptions(max_tokens=500, ignore_eos=True))
        first = await anext(stream)
        loop.abort(first.request_id)
        return [first] + await consume(stream)

    try:
        updates = run(main())
        assert updates[-1].finish_reason == "abort" and len(tokens_of(updates)) < 500
    finally:
        loop.shutdown(abort_running=True)


def test_bad_requests_raise_on_the_first_step_of_the_stream(checkpoint: TinyCheckpoint) -> None:
    engine = Engine(checkpoint.path, config())
    loop = EngineLoop(engine)
    with pytest.raises(RuntimeError, match="start"):
        run(consume(loop.generate([1, 2], RequestOptions())))
    loop.start()
    with pytest.raises(ValueError, match="at least one token"):
        run(consume(loop.generate([], RequestOptions())))
    with pytest.raises(RequestTooLarge):
        run(consume(loop.generate([5] * 100_000, RequestOptions())))
    updates = run(consume(loop.generate([5, 6], RequestOptions(max_tokens=2, ignore_eos=True))))
    assert len(tokens_of(updates)) == 2
    loop.shutdown(abort_running=False)


class GatedEngine(Engine):
    """Steps only once ``gate`` is open: the loop's thread waits inside a step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def step(self) -> list[RequestUpdate]:
        assert self.gate.wait(TIMEOUT_S), "the gate never opened"
        return super().step()


def test_queue_full_when_too_many_are_waiting(checkpoint: TinyCheckpoint) -> None:
    engine = GatedEngine(checkpoint.path, config())
    loop = EngineLoop(engine, max_waiting=2)
    loop.start()
    options = RequestOptions(max_tokens=3, ignore_eos=True)

    async def main() -> None:
        held = [asyncio.create_task(consume(loop.generate([5, 6, i], options))) for i in (7, 8)]
        await asyncio.sleep(0.05)  # both submitted; the thread waits in a step
        with pytest.raises(QueueFull) as refused:
            await consume(loop.generate([5, 6, 9], options))
        assert refused.value.retry_after_s > 0
        engine.gate.set()
        for updates in await asyncio.gather(*held):
            assert len(tokens_of(updates)) == 3
        after = await consume(loop.generate([5, 6, 9], options))  # room again
        assert after[-1].finish_reason == "length"

    try:
        run(main())
    finally:
        engine.gate.set()
        loop.shutdown(abort_running=True)


@pytest.mark.parametrize("max_waiting", [0, math.nan, 1.5, "3", True])
def test_max_waiting_must_be_a_whole_number(checkpoint: TinyCheckpoint, max_waiting: Any) -> None:
    engine = Engine(checkpoint.path, config())
    with pytest.raises(ValueError, match="max_waiting must be a whole number >= 1"):
        EngineLoop(engine, max_waiting)
    engine.close()


def test_shutdown_aborting_ends_every_stream_and_closes_the_engine(
    checkpoint: TinyCheckpoint,
) -> None:
    engine = Engine(checkpoint.path, config())
    loop = EngineLoop(engine)
    loop.start()
    options = RequestOptions(max_tokens=2000, ignore_eos=True)

    async def main() -> list[list[RequestUpdate]]:
        streams = [loop.generate(prompt, options) for prompt in random_prompts([4, 5, 6])]
        firsts = [await anext(stream) for stream in streams]
        await asyncio.to_thread(loop.shutdown, True)
        with pytest.raises(EngineClosed):
            await consume(loop.generate([5, 6], options))
        return [[first] + await consume(s) for first, s in zip(firsts, streams, strict=True)]

    for updates in run(main()):
        assert updates[-1].finish_reason == "abort" and len(tokens_of(updates)) < 2000
    assert not loop.snapshot().accepting
    with pytest.raises(RuntimeError, match="closed"):
        engine.step()


def test_shutdown_finishing_lets_requests_end_until_the_timeout(
    checkpoint: TinyCheckpoint,
) -> None:
    engine = Engine(checkpoint.path, config())
    loop = EngineLoop(engine)
    loop.start()
    short = RequestOptions(max_tokens=4, ignore_eos=True)
    long = RequestOptions(max_tokens=2000, ignore_eos=True)

    async def main() -> tuple[list[RequestUpdate], list[RequestUpdate]]:
        quick = loop.generate([5, 6, 7], short)
        slow = loop.generate([5, 6, 8], long)
        firsts = [await anext(quick), await anext(slow)]
        started = time.monotonic()
        await asyncio.to_thread(loop.shutdown, False, 0.3)
        assert time.monotonic() - started < 0.3 + 5.0
        return [firsts[0]] + await consume(quick), [firsts[1]] + await consume(slow)

    finished, cut = run(main())
    assert finished[-1].finish_reason == "length" and len(tokens_of(finished)) == 4
    assert cut[-1].finish_reason == "abort" and len(tokens_of(cut)) < 2000
    with pytest.raises(RuntimeError, match="closed"):
        engine.step()


class FailingEngine(Engine):
    """Its fourth step raises, as a device error would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_calls = 0

    def step(self) -> list[RequestUpdate]:
        self.num_calls += 1
        if self.num_calls == 4:
            raise RuntimeError("device lost")
        return super().step()


def test_an_engine_error_ends_every_stream_with_engine_dead(checkpoint: TinyCheckpoint) -> None:
    loop = EngineLoop(FailingEngine(checkpoint.path, config()))
    loop.start()
    options = RequestOptions(max_tokens=100, ignore_eos=True)

    async def main() -> None:
        streams = [consume(loop.generate(p, options)) for p in random_prompts([4, 9])]
        results = await asyncio.gather(*streams, return_exceptions=True)
        for result in results:
            assert isinstance(result, EngineDead) and "device lost" in str(result)
        with pytest.raises(EngineDead, match="device lost"):
            await consume(loop.generate([5, 6], options))

    run(main())
    snapshot = loop.snapshot()
    assert not snapshot.healthy and snapshot.error == "RuntimeError: device lost"
    loop.shutdown(abort_running=True)  # after a death: returns at once
