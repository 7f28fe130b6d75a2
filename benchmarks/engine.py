"""Engine throughput on a GPU against transformers' ``generate`` and the decode roofline,
plus the step-time calibration file the simulator loads.

Models: random bf16 weights with the geometry of a zoo config (vocabulary kept), built
on the GPU. For each decode batch size the engine generates ``--decode-tokens`` tokens
after prompts of ``--prompt-len`` random tokens, once to warm up (Triton compilation,
CUDA graph capture) and once measured with per-step profiling: the runner synchronises
at the end of each step and records its shape; a step's time is the wall time from its
start to the next step's start, so it includes the scheduler, the allocator, sampling
and the host sync, not only the GPU. transformers runs the same model (our weights
loaded into its own module tree) and the same prompts through one ``generate`` (greedy,
``min_new_tokens = max_new_tokens``) with a logits processor that only synchronises and
timestamps: its decode step is the median gap between two of its calls (one whole loop
iteration), its prefill the time to the first call.

Without ``mamba_ssm`` transformers runs Mamba2's chunked scan in torch (5.17), whose
broadcast products hold batch x tokens x chunk size x heads x state floats and, whatever
the chunk size, batch x tokens x heads x head dim x state floats: at the configs' chunk
sizes a 32 x 512-token prefill asked for 64 GiB (Granite, chunk 256) and 128 GiB
(Nemotron-H, chunk 128) on the H100. So its model is built with a smaller Mamba chunk
size (``--hf-mamba-chunk-size``; the same outputs up to rounding, and decode, which is
what is compared, never runs the chunked scan), and a prefill that still runs out of
memory (the chunk-free term: 64 GiB for Nemotron-H at 32 x 512) is retried in pieces of
half the prompt, a quarter, ... (``generate(prefill_chunk_size=...)``), down to 32
tokens. Both are recorded. Our engine keeps the config's chunk size.

The decode roofline of a step: bytes it must move (every weight matrix once; the input
embedding only for the batch's rows unless tied to the LM head; each request's KV
context read and its new K/V written; each request's conv and SSM state read and
written) over the device-to-device copy bandwidth measured in the same run (bytes read
plus written).

Usage (on the device machine)::

    PYTHONPATH=src python3 -m benchmarks.engine --out $OUT/engine.json.gz --calibration-dir $OUT
    python3 -m benchmarks.engine --markdown benchmarks/results/engine_h100.json.gz
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avmp.engine.engine import Engine, EngineConfig
from avmp.engine.fast_runner import FastModelRunner
from avmp.engine.models import model_class
from avmp.engine.models.base import HybridModel
from avmp.engine.profile import StepRecord
from avmp.engine.tiny import init_random_weights
from avmp.engine.triton_ops import TritonOps
from avmp.models.zoo import zoo_config
from avmp.sim.calibration import CalibratedModel, fit_calibration
from avmp.sim.timing import BatchShape, RooflineModel, get_profile
from avmp.units import parse_bytes
from benchmarks.common import copy_bytes_per_s, gpu_profile, read_result, write_result
from benchmarks.skinny_split import tuned_configs

DEFAULT_MODELS = ("granite-4.0-h-micro", "nemotron-h-8b")
DEFAULT_BATCHES = (1, 8, 32, 64, 128, 256)
# Extra cells with longer prompts so decode requests, context tokens and context per
# request vary apart in the calibration fit (with one prompt length they are nearly
# proportional), and so that each cell left out of the fit has neighbours on both axes.
CALIBRATION_CELLS = ((16, 2048), (32, 1024), (64, 1024), (32, 2048), (64, 2048))
MIXED_REQUESTS = 256  # requests of the mixed calibration cell
# Long-context calibration cells: prompts of 4k to 34k tokens prefilled in chunks under a
# step budget of 2,048 tokens (chunks starting at every 2k up to 32k) and of 8,192
# (starting at 0, 8k, 16k, 24k, 32k and, once requests share a step, in between), then
# decoded together over their long contexts. (budget, copies of the prompt lengths)
LONG_PROMPT_TOKENS = (34816, 18432, 10240, 4096)
LONG_CELLS = ((2048, 1), (8192, 4))
LONG_DECODE_TOKENS = 32
# transformers' Mamba2 chunk size for the comparison (see the module doc).
HF_MAMBA_CHUNK_SIZE = 32
MIN_HF_PREFILL_PIECE = 32


# the side-by-side comparisons `run_engine_cells` can run after the cells (``--compare``)
COMPARISONS = ("overlap", "prologue", "skinny")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results file (.json.gz: compressed)")
    parser.add_argument("--calibration-dir", type=Path, help="where calibration files go")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(DEFAULT_BATCHES))
    parser.add_argument("--hf-batches", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--hf-decode-tokens", type=int, default=16)
    parser.add_argument("--skip-calibration", action="store_true",
                        help="only the --batches cells and transformers (a comparison rerun)")
    parser.add_argument("--hf-mamba-chunk-size", type=int, default=HF_MAMBA_CHUNK_SIZE)
    parser.add_argument("--memory", default="24GiB", help="engine cache budget")
    parser.add_argument("--mixed-memory", default="3GiB",
                        help="cache budget of the mixed calibration cell (memory-bound batch)")
    parser.add_argument("--long-memory", default="8GiB",
                        help="cache budget of the long-context calibration cells")
    parser.add_argument("--max-batched-tokens", type=int, default=8192)
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop adding cells after")
    parser.add_argument("--compare", nargs="*", choices=COMPARISONS, default=list(COMPARISONS),
                        help="side-by-side comparisons to run after the cells (default: all)")
    parser.add_argument("--skinny-batches", nargs="+", type=int,
                        help="decode batches of the cuBLAS / skinny GEMM comparison (default: "
                             "the largest of --batches up to 64)")
    parser.add_argument("--skinny-settings", nargs="+", choices=list(SKINNY_SETTINGS),
                        help="settings of the skinny comparison, in this order (default: all; "
                             "the first is the baseline of its ratios)")
    parser.add_argument("--skinny-tuned", type=Path,
                        help="a benchmarks.skinny_split result: adds the skinny comparison's "
                             "'tuned' setting, attention_out with each split shape's "
                             "fastest tiling")
    parser.add_argument("--markdown", type=Path, help="print the docs table of a results file")
    return parser.parse_args(argv)


# -- measurement helpers ----------------------------------------------------------------


def transformers_config(zoo_name: str) -> Any:
    """The zoo config as a transformers config (full size, vocabulary kept)."""
    from transformers import AutoConfig

    raw = zoo_config(zoo_name)
    kwargs = {k: v for k, v in raw.items() if not k.startswith("_") and k != "model_type"}
    kwargs["dtype"] = "bfloat16"
    return AutoConfig.for_model(raw["model_type"], **kwargs)


def build_model(config: Any, device: torch.device, seed: int = 0) -> HybridModel:
    """Our model with random bf16 weights, built directly on the device; on the meta
    device its shapes alone, without weights (what its cache geometry needs)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = model_class(config.model_type)(config)
    finally:
        torch.set_default_dtype(default)
    if torch.device(device).type != "meta":
        init_random_weights(model, seed)
    return model.eval()


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, size=(batch, length)).tolist()


def step_periods(steps: list[StepRecord]) -> list[tuple[StepRecord, float]]:
    """Each step with its period (start to the next step's start); the last is dropped."""
    return [(a, b.started - a.started) for a, b in zip(steps, steps[1:], strict=False)]


def is_decode(step: StepRecord) -> bool:
    return step.num_prefill_tokens == 0 and step.num_decode_requests > 0


# -- the engine --------------------------------------------------------------------------


def engine_cell(
    engine: Engine, batch: int, prompt_len: int, decode_tokens: int, seed: int
) -> dict[str, Any]:
    """Warm up, then one profiled generate; decode and prefill figures of the run."""
    runner = engine.runner
    assert isinstance(runner, FastModelRunner)
    vocab = engine.geometry.vocab_size
    engine.generate(random_prompts(batch, prompt_len, vocab, seed + 1), 3, ignore_eos=True)
    prompts = random_prompts(batch, prompt_len, vocab, seed)
    runner.profile.start()
    start = time.perf_counter()
    outputs = engine.generate(prompts, decode_tokens, ignore_eos=True)
    wall = time.perf_counter() - start
    runner.profile.enabled = False
    steps = runner.profile.steps
    assert all(len(o.token_ids) == decode_tokens for o in outputs), "a request stopped early"
    rows = profiled_steps(runner)
    timed = step_periods(steps)
    timed = [(s, p) for s, p in timed if not s.captured]  # capture is one-off work
    decode = [(s, p) for s, p in timed if is_decode(s) and s.num_decode_requests == batch]
    prefill = [(s, p) for s, p in timed if s.num_prefill_tokens > 0]
    decode_s = statistics.median(p for _, p in decode)
    device_s = statistics.median(s.seconds for s, _ in decode)
    middle = sorted(decode, key=lambda sp: sp[0].num_context_tokens)[len(decode) // 2][0]
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "generate_wall_s": wall,
        "decode_steps": len(decode),
        "decode_step_s": decode_s,
        "decode_device_s": device_s,
        "decode_step_s_p10_p90": [
            float(np.percentile([p for _, p in decode], 10)),
            float(np.percentile([p for _, p in decode], 90)),
        ],
        "decode_tokens_per_s": batch / decode_s,
        "decode_graph": all(s.graph for s, _ in decode),
        "median_decode_context_tokens": middle.num_context_tokens,
        "prefill_steps": len(prefill),
        "prefill_tokens_per_s": (
            sum(s.num_prefill_tokens for s, _ in prefill) / sum(p for _, p in prefill)
            if prefill
            else None
        ),
        "steps": rows,
        "device_busy_fraction": device_busy_fraction(rows),
    }


def profiled_generate(
    engine: Engine, runner: FastModelRunner, prompts: list[list[int]], limits: Any
) -> tuple[list[list[Any]], float]:
    """One profiled `generate` (every request to its limit): its steps as calibration
    rows (`profiled_steps`) and its wall seconds."""
    runner.profile.start()
    start = time.perf_counter()
    engine.generate(prompts, limits, ignore_eos=True)
    wall = time.perf_counter() - start
    runner.profile.enabled = False
    return profiled_steps(runner), wall


def profiled_steps(runner: FastModelRunner) -> list[list[Any]]:
    """The runner's profiled steps as calibration rows (captures dropped: one-off work):
    shape (5 fields), period, device time, graph, the device's idle time after the step
    (`device_idle_after`), the longest prefill chunk and the longest context of one
    request (results from before those have 9 or 10 fields, see `row_shape`)."""
    steps = runner.profile.steps
    idle = device_idle_after(steps)
    return [
        [s.num_prefill_tokens, s.num_decode_requests, s.num_context_tokens,
         s.num_attention_pairs, s.num_requests, p, s.seconds, s.graph, idle_s,
         s.longest_prefill_tokens, s.longest_context_tokens]
        for (s, p), idle_s in zip(step_periods(steps), idle, strict=False)
        if not s.captured
    ]  # fmt: skip


def row_shape(row: list[Any]) -> BatchShape:
    """The shape of a `profiled_steps` row; a row from before the longest prefill chunk
    or the longest context was recorded has none (0: the time model takes the fewest
    longest chunk it can be, and the mean context for the longest context)."""
    longest = row[9] if len(row) > 9 else 0
    longest_context = row[10] if len(row) > 10 else 0
    return BatchShape(*row[:5], longest_prefill_tokens=longest,
                      longest_context_tokens=longest_context)  # fmt: skip


def device_idle_after(steps: list[StepRecord]) -> list[float]:
    """Per step, how long the device sat idle after it before the next step began: the
    time it waited for the host, reconstructed from the host's start times.

    A step's begin event is recorded by the host at ``started``; the device reaches it
    then, or when it finishes the previous step if that is later, and finishes the step
    ``seconds`` (its event time) after. So the next step begins at the later of its
    ``started`` and this step's finish, and the difference is idle. Work queued between
    two steps outside them (sampling, the token copy) counts as idle too, which is what
    the step costs the timeline. The last step has nothing after it (0)."""
    idle = []
    finish: float | None = None
    for step in steps:
        if finish is not None:
            idle.append(max(0.0, step.started - finish))
            finish = max(step.started, finish) + step.seconds
        else:
            finish = step.started + step.seconds
    return [*idle, 0.0] if steps else []


def device_busy_fraction(rows: list[list[Any]]) -> float | None:
    """The device's share of the profiled timeline: device time over device time plus
    idle time waiting for the host (rows of `profiled_steps`)."""
    busy = sum(row[6] for row in rows)
    idle = sum(row[8] for row in rows)
    return busy / (busy + idle) if busy + idle > 0 else None


def mixed_cell(model: HybridModel, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Serving-like steps: prompts of 64-512 tokens generating 16-192 tokens each, more
    than ``--mixed-memory`` holds at once, so requests finish at different steps and the
    waiting ones are admitted into running decode batches. Those mixed steps run eagerly
    (only pure decode steps replay CUDA graphs); the calibration needs them."""
    config = EngineConfig(
        parse_bytes(args.mixed_memory), device="cuda", kernels="triton", max_num_seqs=128,
        max_num_batched_tokens=args.max_batched_tokens,
    )  # fmt: skip
    engine = Engine(model, config)
    runner = engine.runner
    assert isinstance(runner, FastModelRunner)
    rng = np.random.default_rng(seed)
    vocab = engine.geometry.vocab_size
    lengths = rng.integers(64, 513, size=MIXED_REQUESTS)
    prompts = [rng.integers(3, vocab, size=int(n)).tolist() for n in lengths]
    limits = rng.integers(16, 193, size=MIXED_REQUESTS).tolist()
    # warm-up: the same run once, since its ragged shapes need Triton variants (compiled
    # on first use, ~1 s each) that no earlier cell did
    engine.generate(prompts, limits, ignore_eos=True)
    steps, wall = profiled_generate(engine, runner, prompts, limits)
    engine.backing.close()
    mixed = [row for row in steps if row[0] > 0 and row[1] > 0]
    return {
        "memory": args.mixed_memory,
        "num_requests": MIXED_REQUESTS,
        "generate_wall_s": wall,
        "num_steps": len(steps),
        "num_mixed_steps": len(mixed),
        "mixed_step_s_median": statistics.median(row[5] for row in mixed) if mixed else None,
        "device_busy_fraction": device_busy_fraction(steps),
        "steps": steps,
    }


def long_context_cell(
    model: HybridModel, args: argparse.Namespace, chunk_tokens: int, copies: int, seed: int
) -> dict[str, Any]:
    """Long prompts (`LONG_PROMPT_TOKENS`, ``copies`` times) prefilled in chunks of at
    most ``chunk_tokens`` tokens, then decoded together: prefill chunks late in a long
    prompt, mixed steps with long-context decodes, and decode batches over long
    contexts, which the short-prompt cells never reach."""
    config = EngineConfig(
        parse_bytes(args.long_memory), device="cuda", kernels="triton",
        max_num_seqs=len(LONG_PROMPT_TOKENS) * copies, max_num_batched_tokens=chunk_tokens,
    )  # fmt: skip
    engine = Engine(model, config)
    runner = engine.runner
    assert isinstance(runner, FastModelRunner)
    rng = np.random.default_rng(seed)
    vocab = engine.geometry.vocab_size
    lengths = LONG_PROMPT_TOKENS * copies
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in lengths]
    # warm-up on the two shorter prompts: chunked prefill over context and long decodes
    engine.generate(prompts[2:4], 4, ignore_eos=True)
    steps, wall = profiled_generate(engine, runner, prompts, LONG_DECODE_TOKENS)
    engine.backing.close()
    return {
        "memory": args.long_memory,
        "max_num_batched_tokens": chunk_tokens,
        "prompt_tokens": list(lengths),
        "decode_tokens": LONG_DECODE_TOKENS,
        "generate_wall_s": wall,
        "num_steps": len(steps),
        "num_prefill_steps": sum(1 for row in steps if row[0] > 0),
        "max_context_tokens": max((row[2] for row in steps), default=0),
        "device_busy_fraction": device_busy_fraction(steps),
        "steps": steps,
    }


def decode_roofline(
    engine: Engine, batch: int, context_tokens: int, bandwidth: float
) -> dict[str, float]:
    """Fewest bytes a decode step moves, and the step time and tokens/s they allow."""
    geometry = engine.geometry
    model = engine.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = _input_embedding(model)
    head = getattr(model, "lm_head", None)
    if embedding is not None and (head is None or head.weight is not embedding.weight):
        row = embedding.weight[0].numel() * embedding.weight.element_size()
        weight_bytes -= embedding.weight.numel() * embedding.weight.element_size()
        weight_bytes += batch * row
    kv = (context_tokens + batch) * geometry.kv_bytes_per_token
    state = 2 * batch * geometry.state_bytes_per_request
    total = weight_bytes + kv + state
    step = total / bandwidth
    return {
        "weight_bytes": float(weight_bytes),
        "kv_bytes": float(kv),
        "state_bytes": float(state),
        "bytes": float(total),
        "step_s": step,
        "tokens_per_s": batch / step,
    }


def _input_embedding(model: torch.nn.Module) -> torch.nn.Embedding | None:
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            return module
    return None


# -- transformers ------------------------------------------------------------------------


def hf_model(config: Any, ours: HybridModel, device: torch.device) -> Any:
    """transformers' model of the same config holding our weights."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    theirs = set(hf.state_dict())
    state = {}
    for key, tensor in ours.state_dict().items():
        if key not in theirs:  # checkpoint prefix vs module prefix (NemotronH: backbone/model)
            key = next((k for k in theirs if k.split(".", 1)[1:] == key.split(".", 1)[1:]), key)
        state[key] = tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not line up: missing {missing[:5]}, extra {unexpected[:5]}")
    return hf.eval()


def with_mamba_chunk_size(config: Any, chunk_size: int) -> Any:
    """A copy of ``config`` whose Mamba2 layers scan in chunks of ``chunk_size`` tokens.

    The field is ``mamba_chunk_size`` in Granite-H, Bamba and Falcon-H1 configs and
    ``chunk_size`` in Nemotron-H's (which accepts ``mamba_chunk_size`` only as a
    constructor alias); every one of the two the config has is set.
    """
    names = [name for name in ("mamba_chunk_size", "chunk_size") if hasattr(config, name)]
    if not names:
        raise ValueError(f"{config.model_type}: no Mamba chunk size field in its config")
    changed = copy.deepcopy(config)
    for name in names:
        setattr(changed, name, chunk_size)
    return changed


def mamba_chunk_sizes(model: torch.nn.Module) -> list[int]:
    """Chunk sizes the model's Mamba mixers actually use (they read the config once)."""
    return sorted(
        {m.chunk_size for m in model.modules() if isinstance(getattr(m, "chunk_size", None), int)}
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _step_clock(device: torch.device) -> Any:
    """A logits processor that leaves the scores alone and records when it is called:
    once per generated token, after the forward that produced its logits."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            _synchronize(device)
            self.times.append(time.perf_counter())
            return scores

    return StepClock()


def _hf_generate_times(
    hf: Any, ids: torch.Tensor, new_tokens: int, pad: int, prefill_piece: int | None
) -> list[float]:
    """One greedy generate: its start, then the time each token's logits were ready."""
    from transformers import LogitsProcessorList

    clock = _step_clock(ids.device)
    extra = {} if prefill_piece is None else {"prefill_chunk_size": prefill_piece}
    _synchronize(ids.device)
    start = time.perf_counter()
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
        logits_processor=LogitsProcessorList([clock]),
        **extra,
    )
    _synchronize(ids.device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    assert len(clock.times) == new_tokens, "the step clock missed a step"
    return [start, *clock.times]


def prefill_pieces(prompt_len: int) -> list[int | None]:
    """Prefill splits to try in turn: whole (None), then halves, quarters, ... >= 32."""
    pieces: list[int | None] = [None]
    piece = prompt_len // 2
    while piece >= MIN_HF_PREFILL_PIECE:
        pieces.append(piece)
        piece //= 2
    return pieces


@torch.no_grad()
def hf_cell(
    hf: Any,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    vocab: int,
    seed: int,
    device: torch.device | str = "cuda",
) -> dict[str, Any]:
    """transformers' generate of ``1 + new_tokens`` tokens: prefill time and median
    decode step, the prefill split into smaller pieces while it runs out of memory."""
    device = torch.device(device)
    ids = torch.tensor(random_prompts(batch, prompt_len, vocab, seed), device=device)
    pad = int(hf.config.pad_token_id or 0)
    failures: list[str] = []
    for piece in prefill_pieces(prompt_len):
        try:
            _hf_generate_times(hf, ids[:, :16], 2, pad, None)  # warm-up
            times = _hf_generate_times(hf, ids, 1 + new_tokens, pad, piece)
        except torch.OutOfMemoryError as error:
            failures.append(f"prefill piece {piece or prompt_len}: {error}"[:160])
        else:
            _free_memory(device)
            return _hf_row(batch, prompt_len, new_tokens, piece, times, failures)
        _free_memory(device)  # after the except block has dropped the traceback's tensors
    return {"batch": batch, "prompt_len": prompt_len, "error": "out of memory: " + failures[-1]}


def _hf_row(
    batch: int,
    prompt_len: int,
    new_tokens: int,
    piece: int | None,
    times: list[float],
    failures: list[str],
) -> dict[str, Any]:
    periods = np.diff(times[1:])  # one per decode step
    step = float(np.median(periods))
    prefill_s = times[1] - times[0]
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "decode_tokens": new_tokens,
        "prefill_chunk_tokens": piece,
        "out_of_memory_retries": failures,
        "prefill_s": prefill_s,
        "decode_steps": len(periods),
        "decode_step_s": step,
        "decode_step_s_p10_p90": [
            float(np.percentile(periods, 10)),
            float(np.percentile(periods, 90)),
        ],
        "decode_tokens_per_s": batch / step,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
    }


# -- calibration ---------------------------------------------------------------------------


def calibration_points(cells: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Every profiled step of the cells as a calibration point (avmp.sim.calibration).

    A step's time is its device time (CUDA events: from the device reaching the step to
    its last kernel, which covers the launches of an eager step that the device waits
    for) plus the device's idle time after it until the next step begins
    (`device_idle_after`: the host's sampling, settling and planning that the overlap
    did not hide), so the points sum to the run's timeline. Not the host's period from
    one step start to the next: with overlapped steps the host starts step N+1 while N
    runs and then waits for N's tokens, so a period measures the step before it, and a
    decode step after a mixed one would carry the mixed step's cost. ``device_s`` keeps
    the device time alone (the fit ignores it). ``longest_prefill_tokens`` and
    ``longest_context_tokens`` are written when the rows record them (rows from before
    them have 9 or 10 fields)."""
    points = []
    for cell in cells:
        for row in cell["steps"]:
            prefill, decode, context, pairs, reqs, _period, device_s, _graph, idle_s = row[:9]
            point = {
                "num_prefill_tokens": prefill,
                "num_decode_requests": decode,
                "num_context_tokens": context,
                "num_attention_pairs": pairs,
                "num_requests": reqs,
                "step_s": device_s + idle_s,
                "device_s": device_s,
            }
            if len(row) > 9:
                point["longest_prefill_tokens"] = row[9]
            if len(row) > 10:
                point["longest_context_tokens"] = row[10]
            points.append(point)
    return points


def compare_sim(
    engine: Engine,
    cells: list[dict[str, Any]],
    gpu: str,
    model: str,
    extra: list[dict[str, Any]] | None = None,
) -> list[dict]:
    """Simulated (roofline, calibrated in-sample, calibrated leaving the cell out) against
    measured median decode steps; ``extra`` cells (the mixed one) are fitted, not rows."""
    extra = extra or []
    roofline = RooflineModel(engine.geometry, get_profile(gpu))
    everything = fit_calibration(calibration_points(cells + extra), gpu, model)
    rows = []
    for index, cell in enumerate(cells):
        others = cells[:index] + cells[index + 1 :] + extra
        held_out = fit_calibration(calibration_points(others), gpu, model)
        decode = [s for s in cell["steps"] if s[0] == 0 and s[1] == cell["batch"]]
        middle = sorted(decode, key=lambda s: s[2])[len(decode) // 2]
        shape = row_shape(middle)
        measured = cell["decode_step_s"]
        predicted = {
            "roofline": roofline.step_seconds(shape),
            "calibrated": everything.step_seconds(shape),
            "calibrated_held_out": held_out.step_seconds(shape),
        }
        rows.append(
            {
                "batch": cell["batch"],
                "prompt_len": cell["prompt_len"],
                "measured_s": measured,
                **{f"{k}_s": v for k, v in predicted.items()},
                **{f"{k}_error": v / measured - 1 for k, v in predicted.items()},
            }
        )
    return rows


# -- driver --------------------------------------------------------------------------------


def compare_mixed(cells: list[dict[str, Any]], mixed: dict[str, Any], gpu: str, model: str) -> dict:
    """The mixed cell's total step time, measured and predicted by the calibration with
    it (in-sample) and without it (held out), over all its steps and its mixed ones."""
    fits = {
        "in_sample": fit_calibration(calibration_points([*cells, mixed]), gpu, model),
        "held_out": fit_calibration(calibration_points(cells), gpu, model),
    }
    steps = mixed["steps"]
    subsets = {"all": steps, "mixed": [row for row in steps if row[0] > 0 and row[1] > 0]}
    return summed_step_times(fits, subsets)


def compare_long(
    short: list[dict[str, Any]], long: list[dict[str, Any]], gpu: str, model: str
) -> list[dict[str, Any]]:
    """Each long-context cell's total step time, measured and predicted by the
    calibration with every cell (in-sample), without this cell (held out), and from the
    short-prompt cells alone (what a calibration without long prompts predicts), over
    all its steps, its prefill steps and its pure decode steps."""
    rows = []
    for index, cell in enumerate(long):
        others = short + long[:index] + long[index + 1 :]
        fits = {
            "in_sample": fit_calibration(calibration_points([*others, cell]), gpu, model),
            "held_out": fit_calibration(calibration_points(others), gpu, model),
            "short_only": fit_calibration(calibration_points(short), gpu, model),
        }
        steps = cell["steps"]
        subsets = {
            "all": steps,
            "prefill": [row for row in steps if row[0] > 0],
            "decode": [row for row in steps if row[0] == 0],
        }
        summary = summed_step_times(fits, subsets)
        rows.append({"max_num_batched_tokens": cell["max_num_batched_tokens"], **summary})
    return rows


def summed_step_times(
    fits: dict[str, CalibratedModel], subsets: dict[str, list[list[Any]]]
) -> dict[str, Any]:
    """Per subset of step rows: the measured summed step time (device time plus the idle
    after each step, what the fit targets), the host's summed periods, and each fit's
    prediction."""
    summary: dict[str, Any] = {}
    for subset, rows in subsets.items():
        measured = sum(row[6] + row[8] for row in rows)
        periods = sum(row[5] for row in rows)
        summary[subset] = {"measured_s": measured, "period_s": periods, "num_steps": len(rows)}
        for name, fit in fits.items():
            predicted = sum(fit.step_seconds(row_shape(row)) for row in rows)
            summary[subset][f"{name}_s"] = predicted
            summary[subset][f"{name}_error"] = predicted / measured - 1 if measured else None
    return summary


def run_model(args: argparse.Namespace, name: str, bandwidth: float, deadline: float) -> dict:
    """Every cell of one model: the engine's, the calibration's, then transformers'."""
    device = torch.device("cuda")
    config = transformers_config(name)
    model = build_model(config, device)
    num_params = sum(p.numel() for p in model.parameters())
    engine_config = EngineConfig(  # `config` stays the transformers config: hf uses it
        memory_bytes=parse_bytes(args.memory),
        device="cuda",
        kernels="triton",
        block_size=16,
        max_num_seqs=max(args.batches),
        max_num_batched_tokens=args.max_batched_tokens,
    )
    engine = Engine(model, engine_config)
    result: dict[str, Any] = {
        "model": name,
        "num_params": num_params,
        "dtype": "bfloat16",
        "ssm_dtype": engine.geometry.ssm_dtype,
        "memory": args.memory,
        "kv_bytes_per_token": engine.geometry.kv_bytes_per_token,
        "state_bytes_per_request": engine.geometry.state_bytes_per_request,
        "engine": [],
        "calibration_cells": [],
        "long_cells": [],
        "transformers": [],
        "skipped": [],
    }
    print(f"== {name}: {num_params / 1e9:.2f} B parameters", flush=True)
    run_engine_cells(args, engine, bandwidth, deadline, result)
    runner = engine.runner
    assert isinstance(runner, FastModelRunner)
    result["graphs_captured"] = sorted(runner.graphs)
    result["graph_error"] = runner.graph_error
    del engine, runner
    _free_memory(device)
    hf_config = with_mamba_chunk_size(config, args.hf_mamba_chunk_size)
    try:
        hf = hf_model(hf_config, model, device)
    except (RuntimeError, ValueError, TypeError) as error:
        result["skipped"].append(f"transformers: {error}"[:300])
        return result
    del model  # hf holds its own copy of the weights; free ours for its prefill
    _free_memory(device)
    result["transformers_mamba_chunk_size"] = {
        "config_default": _chunk_size_field(config),
        "used": mamba_chunk_sizes(hf),
    }
    run_transformers_cells(args, hf, deadline, result)
    del hf
    _free_memory(device)
    return result


def _chunk_size_field(config: Any) -> int | None:
    value = getattr(config, "mamba_chunk_size", None) or getattr(config, "chunk_size", None)
    return None if value is None else int(value)


def run_engine_cells(
    args: argparse.Namespace,
    engine: Engine,
    bandwidth: float,
    deadline: float,
    result: dict[str, Any],
) -> None:
    """The decode-batch cells, the calibration cells, the simulator comparison and the
    calibration file, into ``result``."""
    for batch in args.batches:
        if time.perf_counter() > deadline:
            result["skipped"].append(f"engine batch {batch}: time budget")
            continue
        cell = engine_cell(engine, batch, args.prompt_len, args.decode_tokens, seed=batch)
        cell["roofline"] = decode_roofline(
            engine, batch, cell["median_decode_context_tokens"], bandwidth
        )
        cell["roofline_fraction"] = cell["decode_tokens_per_s"] / cell["roofline"]["tokens_per_s"]
        result["engine"].append(cell)
        print(_engine_line(cell), flush=True)
    for batch, prompt_len in () if args.skip_calibration else CALIBRATION_CELLS:
        if batch > max(args.batches):
            result["skipped"].append(f"calibration cell {batch}x{prompt_len}: above --batches")
            continue
        if time.perf_counter() > deadline:
            result["skipped"].append(f"calibration cell {batch}x{prompt_len}: time budget")
            continue
        cell = engine_cell(engine, batch, prompt_len, args.decode_tokens // 2, seed=7 * batch)
        result["calibration_cells"].append(cell)
        print(_engine_line(cell), flush=True)
    extra = []
    if args.skip_calibration:
        result["skipped"].append("calibration, mixed and long cells: --skip-calibration")
    elif time.perf_counter() > deadline:
        result["skipped"].append("mixed calibration cell: time budget")
    else:
        result["mixed_cell"] = mixed_cell(engine.model, args, seed=11)
        extra.append(result["mixed_cell"])
        print(f"mixed cell: {result['mixed_cell']['num_mixed_steps']} mixed steps, median "
              f"{result['mixed_cell']['mixed_step_s_median']}", flush=True)  # fmt: skip
    if not args.skip_calibration:
        result["long_cells"] = long_cells(engine, args, deadline, result)
    triton_ops = isinstance(engine.runner.ops, TritonOps)
    if "overlap" in args.compare and time.perf_counter() < deadline:
        result["overlap"] = overlap_comparison(engine, args)
    if "prologue" in args.compare and time.perf_counter() < deadline and triton_ops:
        result["prologue"] = prologue_comparison(engine, args, bandwidth)
    if "skinny" in args.compare and time.perf_counter() < deadline and triton_ops:
        result["skinny"] = [
            skinny_comparison(engine, args, bandwidth, batch) for batch in skinny_batches(args)
        ]
    cells = result["engine"] + result["calibration_cells"]
    name = result["model"]
    profile = gpu_profile(torch.cuda.get_device_name())  # the simulator's figures for it
    if len(cells) >= 2 and not args.skip_calibration:  # the decode cells alone fit nothing
        result["sim_vs_measured"] = compare_sim(
            engine, cells, profile, name, extra + result["long_cells"]
        )
        if extra:
            result["mixed_vs_predicted"] = compare_mixed(cells, extra[0], profile, name)
        if result["long_cells"]:
            short = cells + extra
            result["long_vs_predicted"] = compare_long(short, result["long_cells"], profile, name)
        extra += result["long_cells"]
        result["calibration_features"] = list(
            fit_calibration(calibration_points(cells + extra), profile, name).features
        )
        if args.calibration_dir is not None:
            path = args.calibration_dir / f"calibration_{profile}_{name}.json"
            gpu = torch.cuda.get_device_name()
            points = calibration_points(cells + extra)
            payload = {"gpu": gpu, "model": name, "points": points}
            write_result(path, payload)  # plain JSON: `avmp bench --calibration` reads it


def long_cells(
    engine: Engine, args: argparse.Namespace, deadline: float, result: dict[str, Any]
) -> list[dict[str, Any]]:
    """The long-context cells (`LONG_CELLS`) that the time budget leaves room for."""
    cells = []
    for chunk_tokens, copies in LONG_CELLS:
        if time.perf_counter() > deadline:
            result["skipped"].append(f"long-context cell at {chunk_tokens} tokens: time budget")
            continue
        cell = long_context_cell(engine.model, args, chunk_tokens, copies, seed=13 + copies)
        cells.append(cell)
        print(f"long cell at {chunk_tokens} tokens/step: {cell['num_steps']} steps "
              f"({cell['num_prefill_steps']} with prefill) in {cell['generate_wall_s']:.1f} s, "
              f"device busy {cell['device_busy_fraction'] or 0:.0%}", flush=True)  # fmt: skip
    return cells


def overlap_comparison(engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    """The batch-64 decode cell (or the largest batch below) with steps waiting for
    their own tokens, then overlapped, back to back."""
    batch = max((b for b in args.batches if b <= 64), default=min(args.batches))
    rows = {}
    for overlap in (False, True):
        engine.overlap = overlap
        cell = engine_cell(engine, batch, args.prompt_len, args.decode_tokens, seed=batch)
        rows["on" if overlap else "off"] = {
            k: cell[k] for k in ("decode_step_s", "decode_device_s", "decode_tokens_per_s")
        }
    engine.overlap = True
    off, on = rows["off"]["decode_step_s"], rows["on"]["decode_step_s"]
    print(f"overlap at B={batch}: {off * 1e3:.2f} -> {on * 1e3:.2f} ms/step", flush=True)
    return {"batch": batch, **rows, "speedup": off / on}


# the settings `prologue_comparison` times: label -> TritonOps attributes (None: default)
PROLOGUE_SETTINGS = {
    "unfused": {"prologue_rows": 0, "pdl": False},
    "fused": {"prologue_rows": None, "pdl": False},
    "fused_pdl": {"prologue_rows": None, "pdl": True},
}
# and `skinny_comparison`'s (`TritonOps` attributes; None: the default)
_UNFOLDED = {"fold_parts": False, "fold_conv": False, "act_epilogue": False,
             "wide_conv": False, "balanced": False, "defer_sums": False,
             "stack_linears": False, "attention_out": False, "decode_configs": {},
             "long_parts": False}
SKINNY_SETTINGS = {
    "cublas": {"skinny_rows": 0, "pdl": None, "skinny_prefetch": None, **_UNFOLDED},
    "skinny": {"skinny_rows": None, "pdl": False, "skinny_prefetch": None, **_UNFOLDED},
    "skinny_pdl": {"skinny_rows": None, "pdl": None, "skinny_prefetch": 0, **_UNFOLDED},
    "skinny_pdl_prefetch": {"skinny_rows": None, "pdl": None, "skinny_prefetch": None,
                            **_UNFOLDED},
    "act_epilogue": {"skinny_rows": None, "pdl": None, "skinny_prefetch": None,
                     **_UNFOLDED, "act_epilogue": True},
    "wide_conv": {"skinny_rows": None, "pdl": None, "skinny_prefetch": None,
                  **_UNFOLDED, "act_epilogue": True, "wide_conv": True},
    "balanced": {"skinny_rows": None, "pdl": None, "skinny_prefetch": None,
                 **_UNFOLDED, "act_epilogue": True, "wide_conv": True, "balanced": True},
    "defer_sums": {"skinny_rows": None, "pdl": None, "skinny_prefetch": None,
                   **_UNFOLDED, "act_epilogue": True, "wide_conv": True, "defer_sums": True},
    "stacked": {"skinny_rows": None, "pdl": None, "skinny_prefetch": None, **_UNFOLDED,
                "act_epilogue": True, "wide_conv": True, "defer_sums": True,
                "stack_linears": True},
    "attention_out": {"skinny_rows": None, "pdl": None, "skinny_prefetch": None, **_UNFOLDED,
                      "act_epilogue": True, "wide_conv": True, "defer_sums": True,
                      "stack_linears": True, "attention_out": True},
    # split K's parts of 16 K steps or more through six stages (`decode_config`'s
    # long_parts), over the attention_out setting
    "long_parts": {"skinny_rows": None, "pdl": None, "skinny_prefetch": None, **_UNFOLDED,
                   "act_epilogue": True, "wide_conv": True, "defer_sums": True,
                   "stack_linears": True, "attention_out": True, "long_parts": True},
    # the first weight bytes each GEMM program asks of L2 before its wait (default 512
    # bytes of each weight row), over the attention_out setting
    "prefetch_2k": {"skinny_rows": None, "pdl": None, "skinny_prefetch": 2048, **_UNFOLDED,
                    "act_epilogue": True, "wide_conv": True, "defer_sums": True,
                    "stack_linears": True, "attention_out": True},
    "prefetch_8k": {"skinny_rows": None, "pdl": None, "skinny_prefetch": 8192, **_UNFOLDED,
                    "act_epilogue": True, "wide_conv": True, "defer_sums": True,
                    "stack_linears": True, "attention_out": True},
    "folded": {"skinny_rows": None, "pdl": None, "skinny_prefetch": None,
               **_UNFOLDED, "fold_parts": True, "fold_conv": True},
    # each fold alone, over the default (activation epilogue on)
    "fold_parts": {"skinny_rows": None, "pdl": None, "skinny_prefetch": None,
                   **_UNFOLDED, "act_epilogue": True, "fold_parts": True},
    "fold_conv": {"skinny_rows": None, "pdl": None, "skinny_prefetch": None,
                  **_UNFOLDED, "act_epilogue": True, "fold_conv": True},
}


def ops_comparison(
    engine: Engine,
    args: argparse.Namespace,
    bandwidth: float,
    batch: int,
    settings: dict[str, dict[str, Any]],
    rounds: int = 2,
) -> dict[str, Any]:
    """The decode cell of ``batch`` under each setting of the Triton ops' attributes
    (None: the default), in turn ``rounds`` times; the decode graphs are captured again
    for every setting, and the defaults restored after."""
    ops = engine.runner.ops
    assert isinstance(ops, TritonOps) and isinstance(engine.runner, FastModelRunner)
    names = {name for setting in settings.values() for name in setting}
    defaults = {name: getattr(ops, name) for name in names}
    rows: dict[str, list[dict[str, float]]] = {label: [] for label in settings}
    try:
        for _ in range(rounds):
            for label, setting in settings.items():
                for name, value in setting.items():
                    setattr(ops, name, defaults[name] if value is None else value)
                engine.runner.graphs.clear()
                cell = engine_cell(engine, batch, args.prompt_len, args.decode_tokens, seed=batch)
                roof = decode_roofline(engine, batch, cell["median_decode_context_tokens"],
                                       bandwidth)  # fmt: skip
                rows[label].append({
                    "decode_step_s": cell["decode_step_s"],
                    "decode_device_s": cell["decode_device_s"],
                    "roofline_fraction": cell["decode_tokens_per_s"] / roof["tokens_per_s"],
                })  # fmt: skip
    finally:
        for name, value in defaults.items():
            setattr(ops, name, value)
        engine.runner.graphs.clear()
    line = ", ".join(
        f"{label} {statistics.median(r['decode_step_s'] for r in runs) * 1e3:.2f} ms"
        for label, runs in rows.items()
    )
    print(f"B={batch}: {line}", flush=True)
    return {"batch": batch, "rounds": rows}


def prologue_comparison(
    engine: Engine, args: argparse.Namespace, bandwidth: float
) -> dict[str, Any]:
    """The batch-1 decode cell with each linear's norm or activation as its own kernel,
    fused into the linear's prologue, and fused with dependent launches
    (`avmp.kernels.triton.prologue_linear`)."""
    return ops_comparison(engine, args, bandwidth, 1, PROLOGUE_SETTINGS)


def skinny_batches(args: argparse.Namespace) -> list[int]:
    """``--skinny-batches``, else the largest of ``--batches`` up to 64 (the smallest
    when every one is larger)."""
    if args.skinny_batches:
        return list(args.skinny_batches)
    return [max((b for b in args.batches if b <= 64), default=min(args.batches))]


def skinny_comparison(
    engine: Engine, args: argparse.Namespace, bandwidth: float, batch: int
) -> dict[str, Any]:
    """The decode cell of ``batch`` with the decode linears on cuBLAS, on
    `avmp.kernels.triton.skinny_linear` without and with dependent launches, with its
    weights asked of L2 before the wait, with the MLP activation applied by the GEMM
    before it (the default, `TritonOps.act_epilogue`), with the decode conv step's
    programs sized by the batch (`TritonOps.wide_conv`), with the tiles of linears that
    overrun a wave shared by one program per SM (`TritonOps.balanced`), with split-K
    outputs that only join the residual stream summed by its next norm
    (`TritonOps.defer_sums`), and with a split
    K's parts and the Mamba2 conv step folded into the GEMMs (`TritonOps.fold_parts`,
    `fold_conv`)."""
    names = args.skinny_settings or list(SKINNY_SETTINGS)
    settings = {name: SKINNY_SETTINGS[name] for name in names}
    if args.skinny_tuned is not None:
        settings["tuned"] = {**SKINNY_SETTINGS["attention_out"],
                             "decode_configs": tuned_configs(args.tuned)}
    return ops_comparison(engine, args, bandwidth, batch, settings)


def run_transformers_cells(
    args: argparse.Namespace, hf: Any, deadline: float, result: dict[str, Any]
) -> None:
    """transformers' cells into ``result``, until one fails or the time budget ends."""
    vocab = hf.config.vocab_size
    for batch in args.hf_batches:
        if time.perf_counter() > deadline:
            result["skipped"].append(f"transformers batch {batch}: time budget")
            continue
        row = hf_cell(hf, batch, args.prompt_len, args.hf_decode_tokens, vocab, batch)
        result["transformers"].append(row)
        print("transformers", row, flush=True)
        if "error" in row:
            break


def _engine_line(cell: dict[str, Any]) -> str:
    roof = cell.get("roofline_fraction")
    return (
        f"engine B={cell['batch']} P={cell['prompt_len']}: "
        f"decode {cell['decode_step_s'] * 1e3:.2f} ms/step "
        f"({cell['decode_device_s'] * 1e3:.2f} on the device), "
        f"{cell['decode_tokens_per_s']:.0f} tok/s"
        + (f", {roof:.0%} of roofline" if roof is not None else "")
        + f", prefill {cell['prefill_tokens_per_s'] or 0:.0f} tok/s, graph={cell['decode_graph']}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown is not None:
        print(markdown(read_result(args.markdown)))
        return 0
    if args.skinny_tuned is not None:  # read before any GPU work: a bad file is one line
        try:
            args.tuned = read_result(args.skinny_tuned)
            if not isinstance(args.tuned, dict) or not {"batch", "rows"} <= args.tuned.keys():
                raise ValueError("not a benchmarks.skinny_split result")
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"cannot read --skinny-tuned {args.skinny_tuned}: {error!r}", file=sys.stderr)
            return 2
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    deadline = time.perf_counter() + args.budget_s
    device = torch.device("cuda")
    bandwidth = copy_bytes_per_s(device, 1 << 31)
    import transformers
    import triton

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "copy_bytes_per_s": bandwidth,
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "models": [],
    }
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    for name in args.models:
        try:
            results["models"].append(run_model(args, name, bandwidth, deadline))
        except Exception as error:  # record it and go on with the next model
            traceback.print_exc()
            results.setdefault("errors", []).append(f"{name}: {error!r}"[:500])
        if args.out is not None:
            write_result(args.out, results)
    print(markdown(results))
    return 0


# -- report --------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    """The docs tables of a results file (older files without the newer fields too)."""
    lines = [
        f"Device: {results['device']}, torch {results['torch']}, Triton {results['triton']}, "
        f"transformers {results['transformers']}; copy bandwidth "
        f"{results['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write).",
        "",
    ]
    for model in results["models"]:
        lines += _model_header(model, results)
        lines += _throughput_table(model)
        if model.get("overlap"):
            lines += _overlap_line(model["overlap"])
        if model.get("prologue"):
            lines += _prologue_lines(model["prologue"])
        for row in model.get("skinny") or ():
            lines += _skinny_lines(row)
        if model.get("sim_vs_measured"):
            lines += _sim_table(model)
        if model.get("mixed_vs_predicted"):
            lines += _mixed_lines(model)
        if model.get("long_vs_predicted"):
            lines += _long_lines(model)
        if model["skipped"]:
            lines += ["", "Skipped: " + "; ".join(model["skipped"])]
        lines.append("")
    return "\n".join(lines)


def _mixed_lines(model: dict[str, Any]) -> list[str]:
    cell, summary = model["mixed_cell"], model["mixed_vs_predicted"]
    lines = [
        "",
        f"Mixed cell ({cell['num_requests']} requests of 64-512 prompt and 16-192 output "
        f"tokens, {cell['memory']} cache): {cell['num_steps']} steps, of which "
        f"{cell['num_mixed_steps']} mix prefill into decode (eager; median "
        f"{cell['mixed_step_s_median'] * 1e3:.1f} ms). Summed step time, measured and "
        "calibrated (with this cell / without it):",
        "",
    ]
    for subset in ("all", "mixed"):
        row = summary[subset]
        lines.append(
            f"- {subset} steps ({row['num_steps']}): measured {row['measured_s']:.2f} s, "
            f"calibrated {row['in_sample_s']:.2f} s ({row['in_sample_error']:+.0%}) / "
            f"{row['held_out_s']:.2f} s ({row['held_out_error']:+.0%})"
        )
    return lines


def _long_lines(model: dict[str, Any]) -> list[str]:
    lengths = ", ".join(str(n) for n in LONG_PROMPT_TOKENS)
    lines = [
        "",
        f"Long-context cells (prompts of {lengths} tokens, {LONG_DECODE_TOKENS} generated "
        "each). Summed step time (device time plus the idle after each step), measured and "
        "calibrated (with every cell / this cell held out / short-prompt cells only):",
        "",
    ]
    for cell, row in zip(model["long_cells"], model["long_vs_predicted"], strict=True):
        busy = cell["device_busy_fraction"]
        lines.append(
            f"- {cell['max_num_batched_tokens']} tokens per step, "
            f"{len(cell['prompt_tokens'])} requests, device busy "
            f"{'n/a' if busy is None else f'{busy:.0%}'}:"
        )
        for subset in ("all", "prefill", "decode"):
            r = row[subset]
            if not r["num_steps"]:
                continue
            lines.append(
                f"  - {subset} steps ({r['num_steps']}): measured {r['measured_s']:.2f} s "
                f"(host periods {r['period_s']:.2f} s), calibrated "
                + " / ".join(
                    f"{r[f'{fit}_s']:.2f} s ({r[f'{fit}_error']:+.0%})"
                    for fit in ("in_sample", "held_out", "short_only")
                )
            )
    return lines


def _overlap_line(row: dict[str, Any]) -> list[str]:
    off, on = row["off"], row["on"]
    return [
        "",
        f"Overlapped steps at batch {row['batch']} (the next step planned while the device "
        f"runs this one), back to back: {off['decode_step_s'] * 1e3:.2f} ms/step waiting "
        f"for each step's tokens, {on['decode_step_s'] * 1e3:.2f} ms/step overlapped "
        f"({row['speedup']:.2f}x); the device's own time per step "
        f"{on['decode_device_s'] * 1e3:.2f} ms.",
    ]


def _prologue_lines(row: dict[str, Any]) -> list[str]:
    """The batch-1 decode step per prologue setting: median over the rounds."""
    title = (
        "Batch-1 decode with the norms and activations before the linears as their own "
        "kernels, fused into the linears, and fused with dependent launches"
    )
    return _setting_lines(title, row, "unfused")


def _skinny_lines(row: dict[str, Any]) -> list[str]:
    title = (
        f"Batch-{row['batch']} decode with the linears on cuBLAS and on the skinny Triton "
        "GEMM, per setting run (skinny: ordinary launches; _pdl: dependent launches; "
        "_prefetch: its first weight bytes asked of L2 early; act_epilogue: the MLP "
        "activation applied by the GEMM before it; wide_conv: conv steps sized by the "
        "batch; balanced: tiles past a whole wave shared by one program per SM; defer_sums: "
        "split-K parts summed by the next norm; stacked: an attention layer's q, k and v "
        "as one linear; attention_out: its o_proj on the skinny GEMM; long_parts: split-K "
        "parts of 16 K steps or more through six stages; prefetch_2k, "
        "prefetch_8k: 2 or 8 KiB of each weight row asked of L2 early; tuned: each split "
        "shape's fastest tiling in a skinny_split result (--skinny-tuned); folded, "
        "fold_parts, fold_conv: split-K parts and the conv step summed and "
        "applied in the GEMMs)"
    )
    return _setting_lines(title, row, next(iter(row["rounds"])))


def _setting_lines(title: str, row: dict[str, Any], baseline: str) -> list[str]:
    """One decode cell per setting of an `ops_comparison`: medians over the rounds."""
    lines = [
        "",
        f"{title} ({len(next(iter(row['rounds'].values())))} rounds, settings in turn):",
        "",
        f"| setting | ms/step (each round) | device ms/step | % of roofline | vs {baseline} |",
        "|---|---|---:|---:|---:|",
    ]
    base = statistics.median(r["decode_step_s"] for r in row["rounds"][baseline])
    for label, runs in row["rounds"].items():
        step = statistics.median(r["decode_step_s"] for r in runs)
        each = " / ".join(f"{r['decode_step_s'] * 1e3:.2f}" for r in runs)
        device = statistics.median(r["decode_device_s"] for r in runs)
        roof = statistics.median(r["roofline_fraction"] for r in runs)
        lines.append(f"| {label} | {each} | {device * 1e3:.2f} | {roof:.0%} | {base / step:.2f}x |")
    return lines


def _model_header(model: dict[str, Any], results: dict[str, Any]) -> list[str]:
    lines = [
        f"**{model['model']}** ({model['num_params'] / 1e9:.2f} B parameters, bf16 weights "
        f"and KV, {model['ssm_dtype']} SSM state), prompts of {results['prompt_len']} "
        f"tokens, {results['decode_tokens']} generated:",
        "",
    ]
    chunk = model.get("transformers_mamba_chunk_size")
    if chunk is not None:
        used = ", ".join(str(c) for c in chunk["used"])
        lines += [
            f"transformers runs its torch Mamba2 scan with chunk size {used} (config: "
            f"{chunk['config_default']}; ours keeps the config's), so that its prefill fits "
            "in memory; its decode step is the median step of one `generate`.",
            "",
        ]
    return lines


def _throughput_table(model: dict[str, Any]) -> list[str]:
    hf = {row["batch"]: row for row in model["transformers"]}
    lines = [
        "| batch | engine ms/step | engine tok/s | roofline tok/s | % of roofline | "
        "transformers ms/step | transformers tok/s | speed-up | engine prefill tok/s | "
        "transformers prefill tok/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cell in model["engine"]:
        row = hf.get(cell["batch"], {})
        ok = "decode_step_s" in row
        lines.append(
            f"| {cell['batch']} | {cell['decode_step_s'] * 1e3:.2f} | "
            f"{cell['decode_tokens_per_s']:.0f} | {cell['roofline']['tokens_per_s']:.0f} | "
            f"{cell['roofline_fraction']:.0%} | "
            + (
                f"{row['decode_step_s'] * 1e3:.1f} | {row['decode_tokens_per_s']:.0f} | "
                f"{cell['decode_tokens_per_s'] / row['decode_tokens_per_s']:.1f}x"
                if ok
                else (" | ".join([row.get("error", "not run")[:40], "", ""]))
            )
            + f" | {cell['prefill_tokens_per_s'] or 0:.0f} | "
            + (_hf_prefill(row) if ok else " |")
        )
    return lines


def _hf_prefill(row: dict[str, Any]) -> str:
    piece = row.get("prefill_chunk_tokens")
    split = f" (in {piece}-token pieces)" if piece else ""
    return f"{row['prefill_tokens_per_s']:.0f}{split} |"


def _sim_table(model: dict[str, Any]) -> list[str]:
    features = model.get("calibration_features")
    lines = [""]
    if features:
        lines += [f"Calibrated on {', '.join(features)} (relative-error fit).", ""]
    lines += [
        "| batch | prompt | measured ms/step | roofline sim ms (err) | calibrated ms (err) "
        "| calibrated, cell held out (err) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in model["sim_vs_measured"]:
        lines.append(
            f"| {r['batch']} | {r['prompt_len']} | {r['measured_s'] * 1e3:.2f} | "
            f"{r['roofline_s'] * 1e3:.2f} ({r['roofline_error']:+.0%}) | "
            f"{r['calibrated_s'] * 1e3:.2f} ({r['calibrated_error']:+.0%}) | "
            f"{r['calibrated_held_out_s'] * 1e3:.2f} "
            f"({r['calibrated_held_out_error']:+.0%}) |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
