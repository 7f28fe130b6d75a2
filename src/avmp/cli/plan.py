"""``avmp plan``: how many requests of one shape each cache layout holds, and why.

avmp plan jamba-1.5-mini --memory 12GiB --prompt 512 --output 256
avmp plan nemotron-h-47b --memory 64GiB --tensor-parallel 4

With ``--tensor-parallel N`` (or ``--profile``) the model is split over N GPUs of one
host: every unit holds one rank's shard, ``--memory`` is each GPU's cache, and the plan
adds what each GPU holds (weights, cache, activations) against the profile's GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

from avmp.cli import UserError, parse_budget, parse_size
from avmp.cli.options import (
    add_ssm_dtype_option,
    add_static_options_option,
    ssm_dtype_choice,
    static_options,
)
from avmp.memory.planner import MAX_PLANNED_REQUESTS, Plan, plan
from avmp.memory.spec import MemoryConfig
from avmp.models import ModelGeometry, resolve_model
from avmp.models.tensor_parallel import MAX_TENSOR_PARALLEL, rank_geometry
from avmp.sim.timing import DeviceMemory, GpuProfile, device_memory, get_profile
from avmp.units import format_bytes

# Requests at once that plan counts at most: answers in seconds, and is far more than
# any engine runs in one batch (vLLM's max_num_seqs defaults to 256 or 1,024).
MAX_REQUESTS = min(20_000, MAX_PLANNED_REQUESTS)
COLUMNS = ("allocator", "requests", "vs oracle", "needed", "padding", "rounding", "unusable")
DEFAULT_PROFILE = "h200"


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="requests that fit at once per allocator, and the bytes each loses",
        description=(
            "Admit requests of PROMPT + OUTPUT tokens into each allocator until it is full; "
            "print how many fit, their ratio to the oracle, and the bytes lost to padding, "
            "rounding and unusable capacity."
        ),
    )
    parser.add_argument(
        "model", metavar="MODEL", help="zoo name (e.g. jamba-1.5-mini) or config.json path"
    )
    parser.add_argument("--memory", default=None, help="cache memory, e.g. 12GiB (required)")
    parser.add_argument("--prompt", default="512", help="prompt tokens per request (default 512)")
    parser.add_argument("--output", default="256", help="output tokens per request (default 256)")
    add_ssm_dtype_option(parser)
    add_static_options_option(parser)
    parser.add_argument("--chunk", default="2MiB", help="AVMP chunk size (multiple of 2MiB)")
    parser.add_argument("--state-fraction", default=None, help="static: share of memory for state")
    parser.add_argument(
        "--tensor-parallel",
        default=None,
        metavar="N",
        help=f"split the model over N GPUs of one host (1-{MAX_TENSOR_PARALLEL}): units hold "
        "one rank's shard, --memory is each GPU's cache, and each GPU's weights, cache and "
        "activations are checked against --profile",
    )
    parser.add_argument(
        "--profile",
        default=None,
        help=f"GPU of the per-GPU check (default {DEFAULT_PROFILE}; implies the check, "
        "with --tensor-parallel 1 unless given)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result, per_gpu = plan_from_args(args)
    if not resolve_model(args.model).confirmed:
        print(
            f"note: {args.model}'s zoo config rests on recalled values that were not "
            "confirmed; check them against its published config.json",
            file=sys.stderr,
        )
    if args.json:
        data = result.to_dict()
        if per_gpu is not None:
            data["tensor_parallel"] = per_gpu.to_dict()
        print(json.dumps(data, indent=2))
    else:
        print(render(result, per_gpu))
    return 0


@dataclass(frozen=True)
class PerGpu:
    """What each of ``num_gpus`` GPUs holds when the model is split over them (each
    rank's weights, its shard of the cache, the activation estimate), against the
    memory of ``profile``'s GPU."""

    num_gpus: int
    profile: GpuProfile
    memory: DeviceMemory

    @property
    def room_for_cache_bytes(self) -> int:
        """The most cache one GPU holds beside its weights and activations."""
        used = self.memory.weight_bytes + self.memory.activation_bytes
        return max(0, self.memory.device_bytes - used)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_gpus": self.num_gpus,
            "profile": self.profile.name,
            **asdict(self.memory),
            "needed_bytes": self.memory.needed_bytes,
            "room_for_cache_bytes": self.room_for_cache_bytes,
        }


def plan_from_args(args: argparse.Namespace) -> tuple[Plan, PerGpu | None]:
    """Validate every argument (each mistake is one clear line) and run the planner;
    with ``--tensor-parallel`` or ``--profile``, on one rank's geometry, after checking
    that each GPU holds its share."""
    if args.memory is None:
        raise UserError("--memory is required, e.g. --memory 12GiB")
    memory = parse_budget("--memory", args.memory)
    chunk = parse_size("--chunk", args.chunk)
    prompt = _tokens("--prompt", args.prompt, minimum=1)
    output = _tokens("--output", args.output, minimum=0)
    ssm_dtype = ssm_dtype_choice(args.ssm_dtype)
    split = _split_from_args(args)
    static: dict[str, object] = {name: True for name in static_options(args.static_options)}
    if args.state_fraction is not None:
        static["state_fraction"] = _fraction(args.state_fraction)
    options = {"static": static} if static else {}
    try:
        config = MemoryConfig(budget_bytes=memory, chunk_bytes=chunk)
    except ValueError as error:
        raise UserError(f"--memory {args.memory} --chunk {args.chunk}: {error}") from None
    geometry = resolve_model(args.model, ssm_dtype=ssm_dtype)
    per_gpu = None
    if split is not None:
        per_gpu = _per_gpu(geometry, memory, *split)
        geometry = rank_geometry(geometry, split[0])
    _check_count(geometry, memory, prompt + output)
    return plan(geometry, config, prompt, output, options=options), per_gpu


def _split_from_args(args: argparse.Namespace) -> tuple[int, GpuProfile] | None:
    """``(N, profile)`` when ``--tensor-parallel`` or ``--profile`` asks for the per-GPU
    plan, else None (one cache budget, as without them)."""
    if args.tensor_parallel is None and args.profile is None:
        return None
    num_gpus = 1 if args.tensor_parallel is None else num_gpus_choice(args.tensor_parallel)
    return num_gpus, get_profile(args.profile or DEFAULT_PROFILE)


def num_gpus_choice(text: str) -> int:
    """The ``--tensor-parallel`` value: a whole number of GPUs in 1..8.

    Raises:
        UserError: anything else (one line).
    """
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"--tensor-parallel must be a whole number of GPUs, got {text!r}") from None
    if not 1 <= value <= MAX_TENSOR_PARALLEL:
        raise UserError(
            f"--tensor-parallel must be in 1..{MAX_TENSOR_PARALLEL} (the GPUs of one host), "
            f"got {value}"
        )
    return value


def _per_gpu(
    geometry: ModelGeometry, cache_bytes: int, num_gpus: int, profile: GpuProfile
) -> PerGpu:
    """What each of ``num_gpus`` GPUs holds, if its GPU holds it.

    Raises:
        ValueError: a figure of the model does not split over ``num_gpus`` GPUs.
        UserError: one rank's weights, cache and activations exceed the GPU (one line
            with each part, and what would fit).
    """
    memory = device_memory(rank_geometry(geometry, num_gpus), cache_bytes, profile)
    if memory.fits:
        return PerGpu(num_gpus, profile, memory)
    gib = 1 << 30
    parts = (
        f"per GPU weights {memory.weight_bytes / gib:.1f} GiB + cache "
        f"{memory.cache_bytes / gib:.1f} GiB + activations {memory.activation_bytes / gib:.1f} "
        f"GiB = {memory.needed_bytes / gib:.1f} GiB > {memory.device_bytes / gib:.1f} GiB"
    )
    raise UserError(
        f"{geometry.name} on {num_gpus} x {profile.name}: {parts}; "
        + _what_fits(geometry, cache_bytes, num_gpus, profile)
    )


def _what_fits(
    geometry: ModelGeometry, cache_bytes: int, num_gpus: int, profile: GpuProfile
) -> str:
    """The fewest GPUs (more than ``num_gpus``) that hold the model with this cache, or
    less cache when the weights already fit."""
    weights_only = PerGpu(
        num_gpus, profile, device_memory(rank_geometry(geometry, num_gpus), 0, profile)
    )
    if weights_only.memory.fits:
        return f"give at most {format_bytes(weights_only.room_for_cache_bytes)} of --memory"
    for more in range(num_gpus + 1, MAX_TENSOR_PARALLEL + 1):
        try:
            if device_memory(rank_geometry(geometry, more), cache_bytes, profile).fits:
                return f"--tensor-parallel {more} holds it"
        except ValueError:  # the model does not split over that many GPUs
            continue
    return f"no split over at most {MAX_TENSOR_PARALLEL} GPUs holds it"


def _check_count(geometry: ModelGeometry, memory: int, num_tokens: int) -> None:
    """Refuse, before filling any allocator, a plan of more requests than `MAX_REQUESTS`:
    the planner admits them one by one into every allocator, so its time grows with the
    count (about 30 s for 50,000 on a loaded 2-core machine)."""
    most = memory // geometry.request_bytes(num_tokens)
    if most > MAX_REQUESTS:
        raise UserError(
            f"about {most:,} requests of {num_tokens} tokens would fit in "
            f"{format_bytes(memory)}, more than the {MAX_REQUESTS:,} that plan counts "
            "(far beyond any engine's batch); plan with less memory or longer requests"
        )


def _tokens(flag: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{flag} must be a whole number of tokens, got {text!r}") from None
    if value < minimum:
        raise UserError(f"{flag} must be >= {minimum} tokens, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--state-fraction must be a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise UserError(f"--state-fraction must be in (0, 1), got {text}")
    return value


def render(result: Plan, per_gpu: PerGpu | None = None) -> str:
    """The plan as aligned plain text: a header (and each GPU's memory when the model is
    split), one row per allocator, the explanation."""
    gpus = [] if per_gpu is None else _per_gpu_lines(per_gpu)
    return "\n".join([*_header(result), *gpus, "", *_table(result), "", *_explain_unified(result)])


def _per_gpu_lines(per_gpu: PerGpu) -> list[str]:
    m, fb = per_gpu.memory, format_bytes
    n = per_gpu.num_gpus
    share = "the whole model" if n == 1 else f"1/{n} of every unit (the sizes above are one GPU's)"
    return [
        f"{n} x {per_gpu.profile.description} ({per_gpu.profile.name}), each holding {share}:",
        f"  per GPU: weights {fb(m.weight_bytes)} + cache {fb(m.cache_bytes)} + activations "
        f"{fb(m.activation_bytes)} = {fb(m.needed_bytes)} of {fb(m.device_bytes)} "
        f"(room for {fb(per_gpu.room_for_cache_bytes)} of cache)",
    ]


def _header(result: Plan) -> list[str]:
    kv = format_bytes(result.kv_bytes_per_token)
    state = format_bytes(result.state_bytes_per_request)
    block = result.vllm_block_size
    break_even = result.break_even_tokens
    lines = [
        f"{result.model}: {format_bytes(result.budget_bytes)} of cache, requests of "
        f"{result.prompt_tokens} + {result.output_tokens} = {result.request_tokens} tokens "
        f"({format_bytes(result.request_bytes)} each, exact)",
        f"KV {kv}/token, state {state}/request; break-even length "
        + (
            f"{break_even} tokens (KV = state)" if break_even is not None else "none (no attention)"
        ),
        "vLLM's block size: "
        + (f"{block} tokens" if block is not None else "none (no attention layers)")
        + f"; AVMP chunk {format_bytes(result.chunk_bytes)}, pages of {result.block_size} tokens",
    ]
    return lines


def _table(result: Plan) -> list[str]:
    rows = [list(COLUMNS)]
    for a in result.allocators:
        rows.append(
            [
                a.name,
                str(a.num_requests),
                f"{100 * a.ratio_to_oracle:.1f}%",
                format_bytes(a.needed_bytes),
                format_bytes(a.padding_bytes),
                format_bytes(a.rounding_bytes),
                format_bytes(a.unusable_bytes),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"{name}: not built in this checkout" for name in result.missing]
    return lines


def _explain_unified(result: Plan) -> list[str]:
    """A few lines on where the unified pool's bytes go, in bytes."""
    if "unified" not in [a.name for a in result.allocators]:
        return []
    u, row, fb = result.unified, result.allocator("unified"), format_bytes
    num_blocks = u.num_state_blocks_per_request + u.num_kv_blocks_per_request
    lines = [f"Why unified loses {fb(row.lost_bytes)} (vLLM v1, prefix caching off):"]
    if u.block_size is None:
        lines.append(f"  no attention: a request holds one block of {u.group_size} layers' states.")
    else:
        pad = u.page_bytes - u.state_page_bytes
        lines += [
            f"  the attention block grows to {u.block_size} tokens so that one layer's page "
            f"({fb(u.page_bytes)}) holds",
            f"  one recurrent layer's state ({fb(u.state_page_bytes)}); each state page is "
            f"padded by {fb(pad)} ({100 * pad / u.page_bytes:.1f}%).",
        ]
    lines += [
        f"  a block is one page for each of {u.group_size} layers ({fb(u.block_bytes)}); "
        f"a request holds {u.num_state_blocks_per_request} state",
        f"  + {u.num_kv_blocks_per_request} KV blocks = {fb(num_blocks * u.block_bytes)} "
        f"for {fb(result.request_bytes)} of data.",
        f"  over {row.num_requests} requests: {fb(u.state_padding_bytes)} state padding, "
        f"{fb(u.kv_padding_bytes)} in KV blocks beyond {result.block_size}-token pages,",
        f"  {fb(row.unusable_bytes)} of free blocks too few for one more request, "
        f"{fb(row.rounding_bytes)} of rounding.",
    ]
    return lines
