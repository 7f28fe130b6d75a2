"""``avmp generate``: run a hybrid model on AVMP memory and print what it wrote.

avmp generate ./granite-checkpoint --prompt "Hello" --max-tokens 32 --memory 4GiB
avmp generate granite-4.0-h-tiny --random-weights --scale tiny --prompt "Hello"
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from avmp.cli import UserError
from avmp.cli.options import add_ssm_dtype_option, host_tier_bytes, ssm_dtype_choice
from avmp.units import format_bytes, parse_bytes


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with a hybrid model whose caches live in AVMP pools",
        description=(
            "Generate with MODEL, a Hugging Face checkpoint directory, or a zoo name with "
            "--random-weights --scale tiny (a tiny random model of that structure, no "
            "download). Prints the text, tokens/s and how memory was split between pools."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint directory or zoo name")
    parser.add_argument(
        "--prompt", action="append", required=True, help="a prompt (repeat for a batch)"
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per prompt (32)")
    parser.add_argument("--memory", default="12GiB", help="cache memory, e.g. 12GiB (default)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    add_ssm_dtype_option(parser, default=None)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV page (16)")
    parser.add_argument("--chunk", default="2MiB", help="AVMP chunk size (multiple of 2MiB)")
    parser.add_argument(
        "--allocator", choices=("avmp", "static", "unified"), default="avmp",
        help="cache layout: avmp (default), static (SGLang's fixed split) or unified "
             "(vLLM's padded block pool); the same kernels run on each",
    )  # fmt: skip
    parser.add_argument(
        "--state-fraction", type=float, default=None,
        help="with --allocator static: the state pool's share (default: SGLang's, ~0.47)",
    )  # fmt: skip
    parser.add_argument("--max-num-seqs", type=int, default=64, help="running requests at most")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=1024, help="tokens per step at most"
    )
    parser.add_argument(
        "--preemption", choices=("recompute", "swap", "auto"), default="auto",
        help="how a preempted request gives its memory back: recompute, swap (copy to the "
             "host tier) or auto (per request, the cheaper by measured rates; default)",
    )  # fmt: skip
    parser.add_argument(
        "--admission", choices=("greedy", "reserve", "sglang"), default="reserve",
        help="when a waiting request may start: greedy (vLLM), reserve (room for the "
             "running requests' growth; default) or sglang (its decaying new-token ratio)",
    )  # fmt: skip
    parser.add_argument(
        "--host-tier", default=None,
        help="pinned host memory for swapped-out requests, e.g. 8GiB; 0 for none (default: "
             "twice --memory, at most half the host's available memory)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads with --device cpu (default 1: the tiny steps of a CPU run "
             "are fastest on one thread, most of all on a busy machine)",
    )  # fmt: skip
    parser.add_argument(
        "--random-weights", action="store_true", help="build a random model from a zoo config"
    )
    parser.add_argument("--scale", choices=("tiny",), default=None, help="with --random-weights")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from avmp.engine.engine import Engine, check_device_holds, resolve_host_tier_bytes

    _check(args)
    config = engine_config(args)
    check_device_holds(config.torch_device(), config.memory_bytes)  # before any loading
    resolve_host_tier_bytes(config)  # a host tier larger than the host: one line, too
    model, tokenizer = _model_and_tokenizer(args)
    engine = Engine(model, config, tokenizer)
    engine.warmup()
    if engine.tokenizer is None:
        prompts: list[Any] = [_token_ids(text) for text in args.prompt]
    else:
        prompts = list(args.prompt)
    outputs = engine.generate(prompts, args.max_tokens, args.temperature, args.top_p, args.seed)
    for text, output in zip(args.prompt, outputs, strict=True):
        print(f"[{output.index}] {text}")
        shown = output.text if output.text is not None else " ".join(map(str, output.token_ids))
        print(f"    -> {shown!r}")
        print(
            f"    ({len(output.token_ids)} tokens, {output.finish_reason}"
            + (f": {output.error}" if output.error else "")
            + ")"
        )
    print(*render_stats(engine), sep="\n")
    if all(output.finish_reason == "rejected" for output in outputs):
        raise UserError(f"every request was rejected: {outputs[0].error}")
    return 0


def engine_config(args: argparse.Namespace) -> Any:
    """The `EngineConfig` the options describe (validated: a bad value is a ValueError)."""
    from avmp.engine.engine import DEFAULT_CPU_THREADS, EngineConfig

    return EngineConfig(
        memory_bytes=parse_bytes(args.memory),
        device=args.device,
        dtype=args.dtype,
        allocator=args.allocator,
        state_fraction=args.state_fraction,
        cpu_threads=DEFAULT_CPU_THREADS if args.threads is None else args.threads,
        block_size=args.block_size,
        chunk_bytes=parse_bytes(args.chunk),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        ssm_dtype=_ssm_dtype(args.model, args.ssm_dtype),
        preemption=args.preemption,
        admission=args.admission,
        host_tier_bytes=host_tier_bytes(args.host_tier),
    )


def _ssm_dtype(model: str, choice: str | None) -> str | None:
    """The engine's SSM-state dtype: None (the model's), a named one, or for ``auto``
    the family's default as vLLM and SGLang ship it (read from the model's config)."""
    if choice is None:
        return None
    name = ssm_dtype_choice(choice)
    if name != "auto":
        return name
    from avmp.models.zoo import resolve_model

    return resolve_model(model, ssm_dtype="auto").ssm_dtype


def _check(args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.dtype not in (None, "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    if args.ssm_dtype is not None:
        ssm_dtype_choice(args.ssm_dtype)  # one line for a bad choice, before any work
    host_tier_bytes(args.host_tier)  # "0" (none) or a size, else one line
    sizes = [("--memory", args.memory), ("--chunk", args.chunk)]
    for flag, value in sizes:
        if value is None:
            continue
        try:
            parse_bytes(value)
        except ValueError as error:
            raise UserError(f"{flag}: {error}") from None
    if args.state_fraction is not None and args.allocator != "static":
        raise UserError("--state-fraction goes with --allocator static")
    if args.state_fraction is not None and not 0 < args.state_fraction < 1:
        raise UserError(f"--state-fraction must be in (0, 1), got {args.state_fraction}")
    if args.random_weights != (args.scale is not None):
        raise UserError("--random-weights and --scale tiny go together")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")


def _model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model (a path or a tiny random model) and a tokenizer for it, if any."""
    from avmp.engine.tiny import TINY_VOCAB, tiny_model
    from avmp.engine.tokenizer import MistralTokenizer, load_tokenizer
    from avmp.models.zoo import zoo_config, zoo_names

    path = Path(args.model)
    if args.random_weights:
        if args.model.lower() not in zoo_names():
            raise UserError(f"--random-weights needs a zoo name; known: {', '.join(zoo_names())}")
        model = tiny_model(zoo_config(args.model), seed=args.seed)
        return model, MistralTokenizer()
    if not path.is_dir():
        hint = " (add --random-weights --scale tiny)" if args.model.lower() in zoo_names() else ""
        raise UserError(f"{args.model}: not a checkpoint directory{hint}")
    tokenizer = load_tokenizer(path)
    if tokenizer is None and _vocab_size(path) >= TINY_VOCAB:
        tokenizer = MistralTokenizer()
    return path, tokenizer


def _vocab_size(path: Path) -> int:
    import json

    try:
        return int(json.loads((path / "config.json").read_text()).get("vocab_size", 0))
    except (OSError, ValueError):
        return 0  # the loader reports the broken config with a clear message


def _token_ids(text: str) -> list[int]:
    """Without a tokenizer a prompt is token ids separated by spaces or commas."""
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(
            f"this model has no tokenizer: give prompts as token ids, e.g. --prompt '1 5 9', "
            f"got {text!r}"
        ) from None


def render_stats(engine: Any) -> list[str]:
    """Throughput and the pool split at the end of the run."""
    stats, usage, moved = engine.stats, engine.stats.usage, engine.stats.allocator
    fb = format_bytes
    lines = [
        f"{stats.num_generated_tokens} tokens generated in {stats.elapsed_s:.2f} s: "
        f"{stats.generated_tokens_per_s:.1f} tokens/s "
        f"({stats.num_computed_tokens} tokens computed, {stats.num_steps} steps, "
        f"{stats.num_preemptions} preemptions) on {engine.device}, after one warm-up request",
    ]
    if usage is not None:
        lines.append(
            f"pools at the end: KV {fb(usage.kv_capacity_bytes)}, state "
            f"{fb(usage.state_capacity_bytes)}, unassigned {fb(usage.unassigned_bytes)} "
            f"of {fb(usage.budget_bytes)} (peak KV {fb(stats.peak_kv_capacity_bytes)}, "
            f"peak state {fb(stats.peak_state_capacity_bytes)})"
        )
    lines.append(_host_tier_line(engine))
    name = engine.allocator.name
    if name == "avmp":
        lines.append(
            f"AVMP: {moved.num_migrations} migrations ({moved.chunks_migrated_to['kv']} chunks "
            f"to KV, {moved.chunks_migrated_to['state']} to state), {moved.num_compactions} "
            f"compactions, {moved.num_oom_events} OOM events"
        )
    else:
        placement = getattr(engine.allocator, "num_placement_failures", None)
        lines.append(
            f"{name}: {moved.num_oom_events} OOM events"
            + (f" ({placement} for want of a whole state group)" if placement else "")
        )
    return lines


def _host_tier_line(engine: Any) -> str:
    """What the preemption policy did: swaps, bytes copied, and the rates it compared."""
    stats, config = engine.stats, engine.scheduler.config
    line = (
        f"preemption {config.preemption.value}, admission {config.admission.value}: "
        f"{stats.num_swapped_out} swapped out, {stats.num_swapped_in} swapped in, "
        f"{format_bytes(stats.swapped_bytes)} copied, host tier "
        f"{format_bytes(config.host_tier_bytes)}"
    )
    costs = engine.preemption_costs
    if costs is not None:
        line += (
            f" (prefill {costs.prefill_s_per_token * 1e6:.1f} us/token, copies "
            f"{format_bytes(int(costs.host_bytes_per_s))}/s)"
        )
    return line
