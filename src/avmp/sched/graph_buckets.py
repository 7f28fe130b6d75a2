"""The shapes the engine pads a step to for a CUDA graph, in one place for the engine
(`avmp.engine.fast_runner`, which captures them) and the simulator (`avmp.sim.timing`,
which prices them): no torch here.

A decode step pads its batch to the next of `DECODE_GRAPH_SIZES`; a prefill or mixed step
pads its tokens to the next of `token_buckets` and its sequences to the next decode graph
size. Either keys its graph also by block-table width: its pages rounded up to a power of
two, at least `MIN_GRAPH_WIDTH` (`graph_width`).
"""

from __future__ import annotations

DECODE_GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_GRAPH_WIDTH = 16  # pages
MIN_TOKEN_BUCKET = 16
# From here up, token buckets come four to a doubling (1,280, 1,536, 1,792, 2,048, ...):
# a step this large is compute-bound, so its padding costs in proportion (a 4,238-token
# mixed step padded to 8,192 ran 1.24x its parts on an H200), while below it padding is
# near free (the weights' read dominates) and fewer graphs are captured.
FINE_TOKEN_BUCKETS_FROM = 1024
# A mixed graph holds no memory of its own beyond the shared pool, but each capture
# costs a forward pass or three; past this many buckets, steps run eagerly.
MAX_MIXED_GRAPHS = 64


def token_buckets(max_num_batched_tokens: int) -> tuple[int, ...]:
    """Padded token counts of prefill and mixed steps below ``max_num_batched_tokens``:
    powers of two from `MIN_TOKEN_BUCKET` to `FINE_TOKEN_BUCKETS_FROM`, then four
    evenly spaced sizes per doubling; then that figure itself (the scheduler's full
    step, which long prompts fill, pads by nothing)."""
    if max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    sizes = []
    size = MIN_TOKEN_BUCKET
    while size < max_num_batched_tokens:
        sizes.append(size)
        size = next_token_bucket(size)
    return (*sizes, max_num_batched_tokens)


def next_token_bucket(size: int) -> int:
    """The token bucket after ``size`` (one of them): double below
    `FINE_TOKEN_BUCKETS_FROM`, from there a quarter of the doubling it lies in."""
    if size < FINE_TOKEN_BUCKETS_FROM:
        return size * 2
    octave = 1 << (size.bit_length() - 1)  # the power of two at or below size
    return size + octave // 4


def bucket(value: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest of ascending ``sizes`` that holds ``value`` (None: none does)."""
    for size in sizes:
        if size >= value:
            return size
    return None


def graph_width(pages: int) -> int:
    """The block-table width (pages) of a graph for a step whose longest page list has
    ``pages`` pages: a power of two, at least `MIN_GRAPH_WIDTH`."""
    return max(MIN_GRAPH_WIDTH, 1 << max(pages - 1, 0).bit_length())
