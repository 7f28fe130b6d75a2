"""The runner's step records: a step's shape as the simulator's `BatchShape` counts it."""

from __future__ import annotations

from avmp.engine.profile import step_record
from avmp.engine.runner import SequenceWork
from avmp.sched.scheduler import ScheduledChunk
from avmp.sim.timing import BatchShape


def work(num_tokens: int, num_context: int) -> SequenceWork:
    return SequenceWork([5] * num_tokens, num_context, 0, [0], True)


def test_a_record_counts_what_batch_shape_counts() -> None:
    """Two prefill chunks (one late in a prompt, one a whole 1-token prompt) beside
    decodes: the record and `BatchShape.from_chunks` agree field by field."""
    items = [(300, 4096), (1, 0), (2048, 0), (1, 700), (1, 900)]
    record = step_record([work(n, s) for n, s in items], 1.0, 0.01, False, False)
    shape = BatchShape.from_chunks(
        [ScheduledChunk(i, s, n, 0, n == 1 and s > 0, s == 0) for i, (n, s) in enumerate(items)]
    )
    assert record.longest_prefill_tokens == shape.longest_prefill_tokens == 2048
    assert record.longest_context_tokens == shape.longest_context_tokens == 4396
    assert (record.num_prefill_tokens, record.num_decode_requests) == (2349, 2)
    assert (record.num_context_tokens, record.num_attention_pairs, record.num_requests) == (
        shape.num_context_tokens, shape.num_attention_pairs, shape.num_requests,
    )  # fmt: skip


def test_a_decode_step_has_no_longest_chunk() -> None:
    record = step_record([work(1, 10), work(1, 20)], 0.0, 0.001, True, False)
    assert record.longest_prefill_tokens == 0
    assert record.num_decode_requests == 2


def test_a_decode_step_records_its_longest_context() -> None:
    """A few long requests beside short ones: the longest context is the longest
    request's tokens once the step is done, as `BatchShape.from_chunks` counts it."""
    contexts = [600, 34816, 700, 18432, 650]
    record = step_record([work(1, c) for c in contexts], 0.0, 0.004, True, False)
    shape = BatchShape.from_chunks([ScheduledChunk(i, c, 1, 0, True, False)
                                    for i, c in enumerate(contexts)])  # fmt: skip
    assert record.longest_context_tokens == shape.longest_context_tokens == 34817
    assert record.num_context_tokens == sum(contexts) + len(contexts)
