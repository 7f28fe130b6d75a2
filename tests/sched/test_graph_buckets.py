"""The engine's CUDA graph buckets (`avmp.sched.graph_buckets`), which the engine
captures and the simulator prices alike."""

from __future__ import annotations

import pytest

from avmp.sched.graph_buckets import bucket, graph_width, token_buckets


def test_token_buckets_are_powers_of_two_then_quarters_then_the_step_size() -> None:
    assert token_buckets(1024) == (16, 32, 64, 128, 256, 512, 1024)
    assert token_buckets(3000) == (
        16, 32, 64, 128, 256, 512, 1024, 1280, 1536, 1792, 2048, 2560, 3000
    )  # fmt: skip
    sizes = token_buckets(8192)
    assert sizes[-9:] == (2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192)
    # a large step pads by at most a quarter of itself
    for tokens in range(1025, 8193, 97):
        assert bucket(tokens, sizes) <= 1.25 * tokens  # type: ignore[operator]
    assert token_buckets(12) == (12,)
    assert token_buckets(16) == (16,)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1"):
        token_buckets(0)


def test_bucket_rounds_up_and_refuses_what_no_bucket_holds() -> None:
    sizes = token_buckets(100)
    assert [bucket(n, sizes) for n in (1, 16, 17, 64, 65, 100)] == [16, 16, 32, 64, 100, 100]
    assert bucket(101, sizes) is None


def test_graph_width_is_a_power_of_two_of_pages_from_sixteen() -> None:
    assert [graph_width(p) for p in (0, 1, 16, 17, 32, 33, 1000)] == [16, 16, 16, 32, 32, 64, 1024]
