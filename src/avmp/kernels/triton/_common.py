"""Helpers shared by the Triton kernels: host-side shape checks and block sizes, the
reading of tuned launch tables, and the Mamba2 dt discretisation both Mamba2 kernels run
on the device.

Every kernel in this package takes its tensors with arbitrary strides (the AVMP pools
hand out strided per-layer views), so these helpers check shapes and dtypes, never
contiguity.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, TypeVar

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the CPU, where Triton's
    interpreter runs one program at a time. Cached: launch rules ask it every step."""
    if device.type != "cuda":
        return 1
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def compute_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` of a CUDA device (torch caches its properties); (0, 0) off
    CUDA."""
    if device.type != "cuda":
        return (0, 0)
    props = torch.cuda.get_device_properties(device)
    return (int(props.major), int(props.minor))


def next_power_of_2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum): Triton block shapes must be powers of 2."""
    return max(int(triton.next_power_of_2(max(n, 1))), minimum)


def per_token_rows(
    rows: int, tokens: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An uninitialised ``[rows, tokens]`` scratch tensor whose row stride is ``tokens``
    rounded up to 16. Triton compiles a kernel once per integer argument class (1, a
    multiple of 16, other): a row stride equal to the step's token count would compile
    the kernels that read the tensor again whenever a step's count changed class."""
    padded = -(-max(tokens, 1) // 16) * 16
    return torch.empty(rows, padded, dtype=dtype, device=device)[:, :tokens]


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``tensor`` has exactly ``shape``."""
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def check_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    """Raise ValueError unless ``tensor``'s dtype is one of ``allowed``."""
    if tensor.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(f"{name} must be one of {names}, got {tensor.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError if the given tensors live on different devices."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def check_conv_geometry(
    conv_state: torch.Tensor, channels: int, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """The conv kernels' shared checks: ``conv_state [slots, channels, columns]`` with
    ``columns >= d_conv - 1``, ``weight [channels, d_conv]``, ``bias [channels]``, all
    floating point."""
    columns, width = conv_state.shape[2], weight.shape[1]
    check_shape("conv_state", conv_state, (conv_state.shape[0], channels, columns))
    check_shape("weight", weight, (channels, width))
    if bias is not None:
        check_shape("bias", bias, (channels,))
        check_dtype("bias", bias, FLOAT_DTYPES)
    if columns < width - 1:
        raise ValueError(f"conv state keeps {columns} columns; d_conv {width} needs >= {width - 1}")
    for name, t in (("conv_state", conv_state), ("weight", weight)):
        check_dtype(name, t, FLOAT_DTYPES)


def strides(tensor: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    """The strides of ``tensor`` in elements, or zeros for an absent optional tensor."""
    return (0,) * ndim if tensor is None else tuple(tensor.stride())


def dot_precision(dtype: torch.dtype) -> str:
    """Exact fp32 products for fp32 inputs (tf32 would cost ~3e-4 relative error);
    half-precision inputs take the tensor cores' native path either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be upcast to fp32 first: Triton 3.6's CPU
    interpreter multiplies bf16 as raw integers, so only there bf16 dots go through fp32
    (on the GPU they stay bf16 on the tensor cores)."""
    return dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)


# -- tuned launch tables ------------------------------------------------------------------
# A kernel whose launch options are tuned per GPU ships a JSON table in ``tuned/``:
# ``{"about": ..., "entries": [{gpu, command, dtype, <the kernel's int key fields>, tiles,
# notes...}]}``, written by its benchmarks/*_tune.py. The Mamba2 chunked scan and the
# prefill attention read theirs through these helpers.

Key = TypeVar("Key")
Tiles = TypeVar("Tiles")


def gpu_key(name: str) -> str:
    """A CUDA device name as the tuned tables match it: case and spacing ignored, the
    rest exact (an ``NVIDIA H200 NVL`` is not an ``NVIDIA H200``: other clocks, other
    power limit)."""
    return " ".join(name.split()).casefold()


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``bfloat16``, as the tuned tables name dtypes."""
    return str(dtype).removeprefix("torch.")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_tuned_entries(
    data: Any, source: str, int_fields: tuple[str, ...],
    parse_tiles: Callable[[Any], Tiles], make_key: Callable[[Mapping[str, Any]], Key],
) -> dict[Key, Tiles]:
    """The entries of a tuned table by key: each entry's ``gpu``, ``command`` and
    ``dtype`` non-empty strings, its ``int_fields`` positive ints, its ``tiles`` as
    ``parse_tiles`` reads them (raising ValueError), its key as ``make_key`` builds it;
    other fields of an entry are notes.

    Raises:
        ValueError: a malformed table or entry, or one key twice; the message names
            ``source`` and the entry.
    """
    entries = data.get("entries") if isinstance(data, Mapping) else None
    if not isinstance(entries, list):
        raise ValueError(f"{source}: a tuned table is an object with an 'entries' list")
    table: dict[Key, Tiles] = {}
    for index, entry in enumerate(entries):
        where = f"{source}: entry {index}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} is not an object")
        for name in ("gpu", "command", "dtype"):
            if not isinstance(entry.get(name), str) or not entry[name].strip():
                raise ValueError(f"{where}: '{name}' must be a non-empty string")
        for name in int_fields:
            if not _is_positive_int(entry.get(name)):
                raise ValueError(f"{where}: '{name}' must be a positive int")
        try:
            tiles = parse_tiles(entry.get("tiles"))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        key = make_key(entry)
        if key in table:
            raise ValueError(f"{where}: a second entry for {key}")
        table[key] = tiles
    return table


def read_packaged_table(
    parts: tuple[str, ...], parse: Callable[[Any, str], dict[Key, Tiles]]
) -> dict[Key, Tiles]:
    """The tuned table at ``parts`` inside this package, parsed (empty when the file is
    absent).

    Raises:
        ValueError: the file is not JSON, or ``parse`` refuses it.
    """
    path = resources.files(__package__).joinpath(*parts)
    if not path.is_file():
        return {}
    source = "/".join(("avmp/kernels/triton", *parts))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{source}: not JSON ({error})") from None
    return parse(data, source)


# torch.nn.functional.softplus's default threshold: above it softplus(x) == x.
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to the nearest ``DTYPE`` value (ties to even), kept in fp32.
    bf16 is rounded on the bits: Triton 3.6's CPU interpreter truncates fp32 -> bf16
    casts, the GPU rounds to nearest, and the tests run on both."""
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is a constexpr: its == unwraps it)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def discretise_dt(
    dt, dt_bias, dt_min, dt_max,
    ROUND_TO: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    DT_ROUND: tl.constexpr,
):
    """``clamp(softplus(dt + dt_bias), dt_min, dt_max)`` of fp32 values (bias and softplus
    optional). With ``DT_ROUND`` every intermediate is rounded to ``ROUND_TO`` (dt's
    dtype), as torch computes it on tensors of that dtype: the bias cast to it, then the
    sum, the softplus and the clamp each rounded. That is how the reference mixer
    discretises dt, so the fused kernels see the very values it does."""
    if HAS_DT_BIAS:
        if DT_ROUND:
            dt_bias = round_to(dt_bias, ROUND_TO)
        dt += dt_bias
        if DT_ROUND:
            dt = round_to(dt, ROUND_TO)
    if DT_SOFTPLUS:
        dt = tl.where(dt <= SOFTPLUS_THRESHOLD, tl.log(1.0 + tl.exp(dt)), dt)
        if DT_ROUND:
            dt = round_to(dt, ROUND_TO)
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    if DT_ROUND:
        dt = round_to(dt, ROUND_TO)
    return dt
