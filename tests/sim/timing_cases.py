"""Steps and calibration points that the time-model tests share."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from avmp.sched.scheduler import ScheduledChunk
from avmp.sim.calibration import CalibratedModel, load_calibration
from avmp.sim.timing import BatchShape

# the features every calibration fit starts from
BASE = ("num_prefill_tokens", "num_decode_requests", "num_context_tokens")
# what every calibration point records; the optional fields are added per test
POINT_FIELDS = (*BASE, "num_requests")


def chunk(request_id: int, start: int, num_tokens: int) -> ScheduledChunk:
    """A prefill chunk of ``num_tokens`` tokens from position ``start``."""
    return ScheduledChunk(request_id, start, num_tokens, 0, False, start == 0)


def decodes(num_requests: int, context: int, first_id: int = 100) -> list[ScheduledChunk]:
    """``num_requests`` decode tokens, each at position ``context``."""
    return [ScheduledChunk(first_id + i, context, 1, 0, True, False) for i in range(num_requests)]


def points_of(
    shapes: Iterable[BatchShape], step_s: Callable[[BatchShape], float], extra: Iterable[str] = ()
) -> list[dict[str, float]]:
    """Calibration points of ``shapes`` timed by ``step_s``, with the `POINT_FIELDS` and
    the ``extra`` fields (BatchShape attribute names) recorded."""
    fields = (*POINT_FIELDS, *extra)
    return [
        {**{name: getattr(shape, name) for name in fields}, "step_s": step_s(shape)}
        for shape in shapes
    ]


def written_out(shape: BatchShape) -> dict[str, float]:
    """Every calibration feature of ``shape``, computed here from its fields (not through
    `avmp.sim.calibration`), so a test checks the module against an independent formula."""
    return {
        "num_prefill_tokens": shape.num_prefill_tokens,
        "num_decode_requests": shape.num_decode_requests,
        "num_context_tokens": shape.num_context_tokens,
        "mean_context_tokens": shape.num_context_tokens / shape.num_requests,
        "has_prefill": float(shape.num_prefill_tokens > 0),
        "num_prefill_attention_pairs": shape.num_attention_pairs - shape.num_context_tokens,
        "longest_prefill_tokens": shape.longest_prefill_tokens,
        "longest_context_tokens": shape.longest_context_tokens,
    }


def formula_step_s(
    shape: BatchShape, coefficients: tuple[float, ...], features: tuple[str, ...]
) -> float:
    """An intercept plus ``coefficients[1:]`` times the named features of ``shape``."""
    values = written_out(shape)
    return coefficients[0] + sum(
        c * values[f] for c, f in zip(coefficients[1:], features, strict=True)
    )


def load_points(directory: Path, points: list[dict[str, float]], gpu: str = "h200"
                ) -> CalibratedModel:  # fmt: skip
    """The calibration fitted to ``points``, written as a file in ``directory`` and read
    back as `avmp bench --calibration` reads one."""
    path = directory / "cal.json"
    path.write_text(json.dumps({"gpu": gpu, "points": points}))
    return load_calibration(path)
