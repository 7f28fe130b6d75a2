"""What `benchmarks.kernels` runs on the GPU: the shapes, the inputs, each kernel against
its baseline, and `measure`, which times every section and returns the result ``--out``
saves. It imports Triton; `benchmarks.kernels` imports it only to measure.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from avmp.kernels import reference
from avmp.kernels.triton import (
    conv1d_update,
    decode_attention,
    mamba1_state_update,
    mamba1_varlen_scan,
    mamba2_chunk_scan,
    mamba2_state_update,
    mamba2_varlen_scan,
    prefill_attention,
)
from avmp.kernels.triton.mamba1 import scan_block_t
from avmp.kernels.triton.mamba2_chunk_scan import chunk_layout
from benchmarks.common import copy_bytes_per_s, rel_error, warm_up_gpu
from benchmarks.kernels import HBM_TBPS, PEAK_BF16_TFLOPS

DTYPE = torch.bfloat16
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, ATTN_LAYERS = 32, 8, 128, 16, 4
SSM_HEADS, SSM_HEAD_DIM, D_STATE, GROUPS, D_CONV = 128, 64, 128, 8, 4
CHUNK_SIZE = 256
CONV_CHANNELS = SSM_HEADS * SSM_HEAD_DIM + 2 * GROUPS * D_STATE
# Input sets the in-place kernels rotate through, so repeats do not time the L2 cache.
ROTATIONS = 8
DEVICE = "cuda"
DECODE_CASES = ((1, 4096), (64, 1024), (64, 4096), (256, 1024))  # (batch, context)
VARIANT_CASES = ((1, 4096), (64, 4096))
PREFILL_CASES = ((4, 1024, 0), (4, 512, 1536))  # (batch, new tokens, cached tokens)
STEP_BATCHES = (1, 64, 256)
SCAN_CASES = ((1, 1024), (4, 1024))  # (batch, tokens)
# The scan section's steps (its geometries follow; its ceilings are in benchmarks.kernels).
SSD_CASES = ((1, 8192), (2, 4096), (8, 2048), (1, 16384))  # (sequences, tokens each)
# Jamba-1.5-Mini's Mamba1 mixer (hidden 4096, expand 2): channels and state per channel.
MAMBA1_D_INNER, MAMBA1_D_STATE = 8192, 16
MAMBA1_SCAN_CASES = ((1, 2048), (4, 1024), (16, 128))  # (sequences, tokens each)


@dataclass(frozen=True)
class ScanGeometry:
    """A model's Mamba2 mixer, as the scan sees it."""

    heads: int
    head_dim: int
    d_state: int
    groups: int
    chunk_size: int


SCAN_GEOMETRIES = {
    "granite-4.0-h-micro": ScanGeometry(64, 64, 128, 1, 256),
    "nemotron-h-8b": ScanGeometry(SSM_HEADS, SSM_HEAD_DIM, D_STATE, GROUPS, 128),
}


@dataclass(frozen=True)
class Row:
    kernel: str
    shape: str
    triton_ms: float
    baseline: str
    baseline_ms: float
    min_bytes: int
    rel_error: float
    # Wall time per call of back-to-back Triton calls, synchronised once at the end: the
    # larger of host (Python + launch) and device time, what an eager step loop pays.
    wall_us: float = 0.0

    @property
    def triton_gbps(self) -> float:
        return self.min_bytes / self.triton_ms / 1e6


def median_ms(fn: Callable[[], object]) -> float:
    """Median of CUDA-event-timed repeats after warm-up (ms)."""
    return float(do_bench(fn, warmup=50, rep=200, return_mode="median"))


def wall_us_per_call(fn: Callable[[], object], calls: int = 200) -> float:
    """Back-to-back calls, one sync at the end: what an eager step loop pays per call."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def kv_pool(num_pages: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 1's K and V views over a page-major pool of ATTN_LAYERS layers."""
    page = (ATTN_LAYERS, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    pool = torch.randn((num_pages, *page), generator=gen, device=DEVICE, dtype=DTYPE)
    return pool[:, 1, 0], pool[:, 1, 1]  # [P, bs, Hkv, D], page stride = whole page


def paged_batch(batch: int, context: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    pages_per_req = math.ceil(context / BLOCK_SIZE)
    num_pages = batch * pages_per_req
    k, v = kv_pool(num_pages, gen)
    perm = torch.randperm(num_pages, generator=gen, device=DEVICE).int()
    return {"k": k, "v": v, "bt": perm.view(batch, pages_per_req),
            "ctx": torch.full((batch,), context, dtype=torch.int32, device=DEVICE)}


def torch_batched_decode(
    q: torch.Tensor, case: dict[str, torch.Tensor], scale: float
) -> torch.Tensor:
    """Plain batched torch: gather every request's pages, then one SDPA call."""
    batch = q.shape[0]
    k = case["k"][case["bt"].long()].flatten(1, 2).transpose(1, 2)  # [B, Hkv, T, D]
    v = case["v"][case["bt"].long()].flatten(1, 2).transpose(1, 2)
    positions = torch.arange(k.shape[2], device=q.device)
    mask = (positions[None, :] < case["ctx"][:, None])[:, None, None, :]  # [B, 1, 1, T]
    out = F.scaled_dot_product_attention(
        q.view(batch, HEADS, 1, HEAD_DIM), k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.view(batch, HEADS, HEAD_DIM)


def bench_decode(batch: int, context: int, gen: torch.Generator) -> list[Row]:
    case = paged_batch(batch, context, gen)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
    scale = HEAD_DIM**-0.5
    out = decode_attention(q, case["k"], case["v"], case["bt"], case["ctx"], scale)
    batched = torch_batched_decode(q, case, scale)

    def loop() -> list[torch.Tensor]:
        return [reference.paged_attention(q[b : b + 1], case["k"], case["v"],
                                          case["bt"][b].long(), context - 1, scale)
                for b in range(batch)]

    min_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2 + 2 * q.numel() * 2
    shape = f"B={batch} ctx={context} Hq/Hkv={HEADS}/{KV_HEADS} D={HEAD_DIM} bs={BLOCK_SIZE}"
    run = functools.partial(decode_attention, q, case["k"], case["v"], case["bt"],
                            case["ctx"], scale)
    t_triton, wall = median_ms(run), wall_us_per_call(run)
    return [
        Row("decode_attention", shape, t_triton, "torch gather+SDPA (batched)",
            median_ms(lambda: torch_batched_decode(q, case, scale)), min_bytes,
            rel_error(out, batched), wall),
        Row("decode_attention", shape, t_triton, "reference.paged_attention per request",
            median_ms(loop), min_bytes, rel_error(out, torch.cat(loop())), wall),
    ]


def decode_variants(gen: torch.Generator) -> list[dict[str, object]]:
    """Tile and split choices of decode attention, the default timed twice (noise)."""
    # The package re-exports the function under the module's name: fetch the module.
    module = importlib.import_module("avmp.kernels.triton.decode_attention")
    default_block_n = module.BLOCK_N
    results: list[dict[str, object]] = []
    for batch, context in VARIANT_CASES:
        case = paged_batch(batch, context, gen)
        q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
        min_bytes = batch * context * KV_HEADS * HEAD_DIM * 4
        for block_n, splits in ((default_block_n, None), (default_block_n, None), (64, None),
                                (default_block_n, 1), (default_block_n, 4), (default_block_n, 16)):
            module.BLOCK_N = block_n
            ms = median_ms(functools.partial(decode_attention, q, case["k"], case["v"],
                                             case["bt"], case["ctx"], 0.1, num_splits=splits))
            results.append({"shape": f"B={batch} ctx={context}", "block_n": block_n,
                            "num_splits": splits or "auto", "ms": ms,
                            "gbps": min_bytes / ms / 1e6})
        module.BLOCK_N = default_block_n
    return results


def bench_prefill(batch: int, new: int, cached: int, gen: torch.Generator) -> Row:
    case = paged_batch(batch, cached + new, gen)
    q = torch.randn(batch * new, HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
    qsl = torch.arange(0, batch * new + 1, new, dtype=torch.int32, device=DEVICE)
    scale = HEAD_DIM**-0.5

    def run() -> torch.Tensor:
        return prefill_attention(q, case["k"], case["v"], case["bt"], qsl, case["ctx"], scale, new)

    def loop() -> torch.Tensor:
        return torch.cat([reference.paged_attention(q[b * new : (b + 1) * new], case["k"],
                                                    case["v"], case["bt"][b].long(), cached,
                                                    scale) for b in range(batch)])

    min_bytes = batch * (cached + new) * KV_HEADS * HEAD_DIM * 4 + 2 * q.numel() * 2
    shape = f"B={batch} new={new} cached={cached} Hq/Hkv={HEADS}/{KV_HEADS} D={HEAD_DIM}"
    return Row("prefill_attention", shape, median_ms(run), "reference.paged_attention per request",
               median_ms(loop), min_bytes, rel_error(run(), loop()), wall_us_per_call(run))


def mamba_inputs(batch: int, gen: torch.Generator, rows_per_request: int = 1
                 ) -> dict[str, torch.Tensor]:
    """Slot-major SSM states for ``batch`` requests (several slot sets to rotate through
    when one set would sit in L2) and ``batch * rows_per_request`` rows of inputs."""
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE)

    set_bytes = batch * SSM_HEADS * SSM_HEAD_DIM * D_STATE * 4
    rotations = ROTATIONS if set_bytes < (256 << 20) else 2
    rows = batch * rows_per_request
    # A slot holds 3 layers' SSM states; this is the middle one's view.
    pool = rand(rotations * batch, 3, SSM_HEADS, SSM_HEAD_DIM, D_STATE) * 0.1
    return {
        "state": pool[:, 1], "slot_sets": torch.randperm(rotations * batch, device=DEVICE,
                                                         generator=gen).int().view(-1, batch),
        "x": rand(rows, SSM_HEADS, SSM_HEAD_DIM).to(DTYPE), "dt": rand(rows, SSM_HEADS).to(DTYPE),
        "A": -torch.rand(SSM_HEADS, device=DEVICE, generator=gen) - 0.5,
        "B": rand(rows, GROUPS, D_STATE).to(DTYPE), "C": rand(rows, GROUPS, D_STATE).to(DTYPE),
        "D": rand(SSM_HEADS), "dt_bias": rand(SSM_HEADS) * 0.5,
    }


def bench_mamba2(batch: int, gen: torch.Generator) -> Row:
    m = mamba_inputs(batch, gen)
    sets = itertools.cycle(range(m["slot_sets"].shape[0]))

    def run(i: int | None = None) -> torch.Tensor:
        slots = m["slot_sets"][next(sets) if i is None else i]
        return mamba2_state_update(m["state"], slots, m["x"], m["dt"], m["A"], m["B"], m["C"],
                                   D=m["D"], dt_bias=m["dt_bias"])

    def torch_step(i: int | None = None) -> torch.Tensor:
        slots = m["slot_sets"][next(sets) if i is None else i].long()
        dt = F.softplus(m["dt"].float() + m["dt_bias"])
        state = m["state"][slots]  # gather [b, H, P, N]
        y = reference.mamba2_step(state, m["x"].float(), dt, m["A"], m["B"].float(),
                                  m["C"].float(), m["D"])
        m["state"][slots] = state  # scatter back
        return y

    saved = m["state"].clone()
    ref = torch_step(0)
    m["state"].copy_(saved)
    err = rel_error(run(0), ref)
    min_bytes = batch * SSM_HEADS * SSM_HEAD_DIM * D_STATE * 4 * 2
    shape = f"B={batch} H={SSM_HEADS} P={SSM_HEAD_DIM} N={D_STATE} G={GROUPS} fp32 state"
    return Row("mamba2_state_update", shape, median_ms(run),
               "reference.mamba2_step + slot gather/scatter", median_ms(torch_step), min_bytes, err,
               wall_us_per_call(run))


def chunked_scan_baseline() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """transformers' batched torch SSD scan (the path a torch engine runs for prefill)."""
    try:
        from transformers.models.bamba import modeling_bamba
    except ImportError:
        return None
    return getattr(modeling_bamba, "mamba2_chunk_scan", None)


def bench_scan(batch: int, tokens: int, gen: torch.Generator) -> list[Row]:
    """Prefill scan of ``batch`` requests of ``tokens`` each, from their slots' states."""
    chunk_scan = chunked_scan_baseline()
    if chunk_scan is None:
        print("transformers has no mamba2_chunk_scan here: scan baseline skipped")
        return []
    m = mamba_inputs(batch, gen, rows_per_request=tokens)
    slots = m["slot_sets"][0, :batch]
    qsl = torch.arange(0, batch * tokens + 1, tokens, dtype=torch.int32, device=DEVICE)
    saved = m["state"].clone()

    def run() -> torch.Tensor:
        return mamba2_varlen_scan(m["state"], slots, qsl, m["x"], m["dt"], m["A"], m["B"],
                                  m["C"], D=m["D"], dt_bias=m["dt_bias"])

    def torch_scan() -> torch.Tensor:
        y, final = chunk_scan(
            m["x"].view(batch, tokens, SSM_HEADS, SSM_HEAD_DIM), m["dt"].view(batch, tokens, -1),
            m["A"], m["B"].view(batch, tokens, GROUPS, D_STATE),
            m["C"].view(batch, tokens, GROUPS, D_STATE), CHUNK_SIZE, D=m["D"],
            dt_bias=m["dt_bias"], initial_states=m["state"][slots.long()], dt_softplus=True,
            return_final_states=True,
        )
        m["state"][slots.long()] = final
        return y.reshape(batch * tokens, SSM_HEADS, SSM_HEAD_DIM)

    ref = torch_scan()
    m["state"].copy_(saved)
    err = rel_error(run(), ref)
    per_token = SSM_HEADS * SSM_HEAD_DIM * 2 * 2 + 2 * GROUPS * D_STATE * 2 + SSM_HEADS * 2
    min_bytes = batch * tokens * per_token + batch * SSM_HEADS * SSM_HEAD_DIM * D_STATE * 4 * 2
    shape = f"B={batch} T={tokens} H={SSM_HEADS} P={SSM_HEAD_DIM} N={D_STATE} G={GROUPS}"
    return [Row("mamba2_varlen_scan", shape, median_ms(run),
                f"transformers mamba2_chunk_scan (torch, chunk {CHUNK_SIZE}) + slot gather/scatter",
                median_ms(torch_scan), min_bytes, err, wall_us_per_call(run, calls=20))]


def ssd_flops(geo: ScanGeometry, tokens: int) -> float:
    """FLOPs of the chunked scan (a multiply-add counts 2), causal products at their mean
    width (half a chunk): per token and head the chunk state and the state's
    contribution (2 x 2 P N) and the intra-chunk output (2 x L/2 x P); per token and
    group CB (2 x L/2 x N). The state passing's elementwise work is left out."""
    p, n, chunk = geo.head_dim, geo.d_state, geo.chunk_size
    return float(tokens * (geo.heads * (4 * p * n + chunk * p) + geo.groups * chunk * n))


def scan_min_bytes(geo: ScanGeometry, batch: int, tokens: int) -> int:
    """Bytes a scan must move: x, y (bf16), B and C, dt per token; each request's fp32
    state read and written once."""
    per_token = geo.heads * geo.head_dim * 2 * 2 + 2 * geo.groups * geo.d_state * 2 + geo.heads * 2
    return tokens * per_token + batch * geo.heads * geo.head_dim * geo.d_state * 4 * 2


def bench_ssd(name: str, geo: ScanGeometry, batch: int, tokens_each: int,
              gen: torch.Generator) -> dict[str, object]:
    """The chunked and the varlen scan over one prefill step of ``batch`` prompts of
    ``tokens_each`` tokens, continuing from their slots (the chunk table precomputed, as
    the engine builds it once per step)."""
    tokens = batch * tokens_each

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE)

    pool = rand(batch, 3, geo.heads, geo.head_dim, geo.d_state) * 0.1
    state, saved = pool[:, 1], pool[:, 1].clone()
    slots = torch.arange(batch, dtype=torch.int32, device=DEVICE)
    qsl = torch.arange(0, tokens + 1, tokens_each, dtype=torch.int32, device=DEVICE)
    args = (rand(tokens, geo.heads, geo.head_dim).to(DTYPE), rand(tokens, geo.heads).to(DTYPE),
            -torch.rand(geo.heads, device=DEVICE, generator=gen) - 0.5,
            rand(tokens, geo.groups, geo.d_state).to(DTYPE),
            rand(tokens, geo.groups, geo.d_state).to(DTYPE))
    kwargs = {"D": rand(geo.heads), "dt_bias": rand(geo.heads) * 0.5}
    layout = chunk_layout(qsl, slots, geo.chunk_size, tokens)
    chunked = functools.partial(mamba2_chunk_scan, state, slots, qsl, *args, geo.chunk_size,
                                **kwargs, layout=layout)
    varlen = functools.partial(mamba2_varlen_scan, state, slots, qsl, *args, **kwargs)
    y_varlen, state_varlen = varlen(), state.clone()
    state.copy_(saved)
    err = max(rel_error(chunked(), y_varlen), rel_error(state, state_varlen))
    chunked_ms, varlen_ms = median_ms(chunked), median_ms(varlen)
    tflops = ssd_flops(geo, tokens) / chunked_ms / 1e9
    gbps = scan_min_bytes(geo, batch, tokens) / chunked_ms / 1e6
    return {"geometry": name, "shape": f"{batch} x {tokens_each} tokens, chunk {geo.chunk_size}",
            "chunked_ms": chunked_ms, "varlen_ms": varlen_ms,
            "tokens_per_s": tokens / chunked_ms * 1e3, "tflops": tflops,
            "peak_share": tflops / PEAK_BF16_TFLOPS, "gbps": gbps,
            "hbm_share": gbps / (HBM_TBPS * 1e3), "rel_error": err}


def mamba1_inputs(batch: int, rows: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Jamba-1.5-Mini's Mamba1 inputs: fp32 states of ``batch`` requests in slot sets to
    rotate through (the middle layer's view of three per slot), ``rows`` bf16 tokens."""

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE)

    i, n = MAMBA1_D_INNER, MAMBA1_D_STATE
    rotations = ROTATIONS if batch * i * n * 4 < (256 << 20) else 2
    pool = rand(rotations * batch, 3, i, n) * 0.1
    return {
        "state": pool[:, 1], "slot_sets": torch.randperm(rotations * batch, device=DEVICE,
                                                         generator=gen).int().view(-1, batch),
        "x": rand(rows, i).to(DTYPE), "dt": rand(rows, i).to(DTYPE),
        "A": -torch.rand(i, n, device=DEVICE, generator=gen) - 0.5,
        "B": rand(rows, n).to(DTYPE), "C": rand(rows, n).to(DTYPE), "D": rand(i),
        "dt_bias": rand(i) * 0.5 - 2.0, "z": rand(rows, i).to(DTYPE),
    }


def mamba1_torch_path(m: dict[str, torch.Tensor], slots: torch.Tensor, lens: list[int]
                      ) -> torch.Tensor:
    """The reference path of `Ops.mamba1_mix` after the conv: dt's bias and softplus,
    each sequence's scan from its slot (one batched step when every sequence has one
    token, with a gather and a scatter of the slots), then the gate."""
    dt = F.softplus(m["dt"].float() + m["dt_bias"])
    inputs = (m["x"], dt, m["A"])
    if all(n == 1 for n in lens):
        state = m["state"][slots.long()]
        y = reference.mamba1_step(state, *inputs, m["B"], m["C"], m["D"])
        m["state"][slots.long()] = state
    else:
        parts, start = [], 0
        for slot, n in zip(slots.tolist(), lens, strict=True):
            rows = slice(start, start + n)
            parts.append(reference.mamba1_scan(m["x"][rows], dt[rows], m["A"], m["B"][rows],
                                               m["C"][rows], m["D"], m["state"][slot]))
            start += n
        y = torch.cat(parts)
    return (y * F.silu(m["z"].float())).to(DTYPE)


def bench_mamba1(batch: int, tokens_each: int, gen: torch.Generator,
                 block_t: int | None = None) -> Row:
    """Jamba's Mamba1 core after the conv: the decode update (``tokens_each`` 1) or the
    varlen prefill scan of ``batch`` sequences in blocks of ``block_t`` tokens (None:
    the kernel's default), against `mamba1_torch_path`."""
    tokens = batch * tokens_each
    m = mamba1_inputs(batch, tokens, gen)
    sets = itertools.cycle(range(m["slot_sets"].shape[0]))
    qsl = torch.arange(0, tokens + 1, tokens_each, dtype=torch.int32, device=DEVICE)
    decode = tokens_each == 1
    args = (m["x"], m["dt"], m["A"], m["B"], m["C"], m["D"], m["dt_bias"], m["z"])

    def run(i: int | None = None) -> torch.Tensor:
        slots = m["slot_sets"][next(sets) if i is None else i]
        if decode:
            return mamba1_state_update(m["state"], slots, *args)
        return mamba1_varlen_scan(m["state"], slots, qsl, *args, block_t=block_t)

    def torch_path(i: int | None = None) -> torch.Tensor:
        slots = m["slot_sets"][next(sets) if i is None else i]
        return mamba1_torch_path(m, slots, [tokens_each] * batch)

    saved = m["state"].clone()
    ref = torch_path(0)
    m["state"].copy_(saved)
    err = rel_error(run(0), ref)
    i, n = MAMBA1_D_INNER, MAMBA1_D_STATE
    min_bytes = tokens * (4 * i * 2 + 2 * n * 2) + batch * i * n * 4 * 2  # x dt z y, B C; state
    shape = f"B={batch} T={tokens_each} d_inner={i} d_state={n} fp32 state"
    if not decode:
        shape += f" block_t={block_t or scan_block_t(n)}"
    baseline = ("reference.mamba1_step + slot gather/scatter" if decode
                else "reference.mamba1_scan per request")
    calls = 200 if decode else 20
    return Row("mamba1_state_update" if decode else "mamba1_varlen_scan", shape,
               median_ms(run), baseline, median_ms(torch_path), min_bytes, err,
               wall_us_per_call(run, calls=calls))


def bench_conv(batch: int, gen: torch.Generator) -> Row:
    slots = ROTATIONS * batch
    pool = torch.randn(slots, 3, CONV_CHANNELS, D_CONV - 1, generator=gen, device=DEVICE).to(DTYPE)
    state = pool[:, 1]
    slot_sets = torch.randperm(slots, device=DEVICE, generator=gen).int().view(ROTATIONS, batch)
    x = torch.randn(batch, CONV_CHANNELS, generator=gen, device=DEVICE).to(DTYPE)
    weight = torch.randn(CONV_CHANNELS, D_CONV, generator=gen, device=DEVICE).to(DTYPE)
    bias = torch.randn(CONV_CHANNELS, generator=gen, device=DEVICE).to(DTYPE)
    sets = itertools.cycle(range(ROTATIONS))

    def run(i: int | None = None) -> torch.Tensor:
        return conv1d_update(state, slot_sets[next(sets) if i is None else i], x, weight, bias)

    def loop(i: int | None = None) -> torch.Tensor:
        chosen = slot_sets[next(sets) if i is None else i].tolist()
        return torch.cat([reference.causal_conv1d(x[b : b + 1], state[s], weight, bias)
                          for b, s in enumerate(chosen)])

    saved = state.clone()
    ref = loop(0)
    state.copy_(saved)
    err = rel_error(run(0), ref)
    min_bytes = batch * CONV_CHANNELS * ((D_CONV - 1) * 2 * 2 + 2 * 2)
    shape = f"B={batch} C={CONV_CHANNELS} d_conv={D_CONV} bf16 state"
    return Row("conv1d_update", shape, median_ms(run), "reference.causal_conv1d per request",
               median_ms(loop), min_bytes, err, wall_us_per_call(run))


def measure() -> dict[str, object]:
    """Every section, seeded, after the GPU's warm-up; returns the result as ``--out``
    saves it."""
    torch.manual_seed(0)
    warm_up_gpu()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows: list[Row] = []
    for batch, context in DECODE_CASES:
        rows += bench_decode(batch, context, gen)
    rows += [bench_prefill(batch, new, cached, gen) for batch, new, cached in PREFILL_CASES]
    rows += [bench_mamba2(batch, gen) for batch in STEP_BATCHES]
    rows += [bench_conv(batch, gen) for batch in STEP_BATCHES]
    for batch, tokens in SCAN_CASES:
        rows += bench_scan(batch, tokens, gen)
    variants = decode_variants(gen)
    scans = [bench_ssd(name, geo, batch, tokens, gen) for name, geo in SCAN_GEOMETRIES.items()
             for batch, tokens in SSD_CASES]
    mamba1 = [bench_mamba1(batch, 1, gen) for batch in STEP_BATCHES]
    mamba1 += [bench_mamba1(batch, tokens, gen, block_t)
               for batch, tokens in MAMBA1_SCAN_CASES for block_t in (None, 1)]
    copy_gbps = copy_bytes_per_s(DEVICE, 1 << 30, median_ms) / 1e9  # HBM ceiling, 1 GiB
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "dtype": str(DTYPE), "copy_gbps": copy_gbps,
              "rows": [asdict(r) | {"triton_gbps": r.triton_gbps} for r in rows],
              "decode_variants": variants, "scan_throughput": scans,
              "mamba1": [asdict(r) | {"triton_gbps": r.triton_gbps} for r in mamba1]}
    return result
