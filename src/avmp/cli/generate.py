"""``avmp generate``: run a hybrid model on AVMP memory and print what it wrote.

avmp generate ./granite-checkpoint --prompt "Hello" --max-tokens 32 --memory 4GiB
avmp generate granite-4.0-h-tiny --random-weights --scale tiny --prompt "Hello"
avmp generate granite-4.0-h-tiny --random-weights --scale tiny --prompt "Hi" --tensor-parallel 2
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

from avmp.cli import UserError
from avmp.cli.options import (
    add_engine_options,
    check_engine_options,
    engine_config,
    model_and_tokenizer,
)
from avmp.units import format_bytes


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
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    add_engine_options(parser)
    add_prefix_cache_option(parser)
    add_tensor_parallel_option(parser)
    parser.set_defaults(run=run)


def add_tensor_parallel_option(parser: Any) -> None:
    """``--tensor-parallel N`` (`EngineConfig.tensor_parallel`; shared by ``avmp
    generate`` and ``avmp serve``)."""
    parser.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split the model over N ranks (1..8; CUDA: GPUs 0..N-1, CPU: gloo processes); "
        "the engine starts them, or joins torchrun's (torchrun --nproc-per-node N); "
        "--memory is each rank's cache (1)",
    )


def add_prefix_cache_option(parser: Any) -> None:
    """``--prefix-cache``: the engine's prefix caching (`EngineConfig.prefix_cache`), off
    by default (shared by ``avmp generate`` and ``avmp serve``)."""
    from avmp.sched.prefix import PREFIX_CACHE_CHOICES

    parser.add_argument(
        "--prefix-cache",
        choices=PREFIX_CACHE_CHOICES,
        default="off",
        help="reuse cached prompt prefixes: KV pages matched by token ids, recurrent state "
        "resumed from checkpoints placed by avmp (output ends and branch points), "
        "vllm-align (vLLM's block-aligned states) or sglang (every 64 prompt and 256 "
        "decoded tokens); off (default) computes every prompt",
    )
    parser.add_argument(
        "--prefix-host-level",
        action="store_true",
        help="with --prefix-cache: keep the checkpoints the prefix cache evicts in the host "
        "tier (pinned host memory, --host-tier) as a second level, so that a later hit "
        "copies the state back instead of computing its prefix again; needs the host tier "
        "(not --preemption recompute, not --host-tier 0)",
    )


def prefixed_engine_config(args: argparse.Namespace) -> Any:
    """`engine_config` with the ``--prefix-cache`` choice, ``--prefix-host-level`` and
    ``--tensor-parallel``.

    Raises:
        UserError: ``--prefix-host-level`` without a prefix cache or without a host tier.
    """
    config = engine_config(args)
    if args.prefix_host_level:
        check_prefix_host_level(args.prefix_cache, config.preemption.value, config.host_tier_bytes)
    return dataclasses.replace(
        config,
        prefix_cache=args.prefix_cache,
        prefix_host_level=args.prefix_host_level,
        tensor_parallel=args.tensor_parallel,
    )


def check_prefix_host_level(prefix_cache: str, preemption: str, host_tier_bytes: int | None
                            ) -> None:  # fmt: skip
    """Refuse ``--prefix-host-level`` where it could keep nothing, naming the options
    (shared with ``avmp replay`` and ``avmp bench``).

    Raises:
        UserError: no prefix cache, or no host tier (``recompute``, or a tier of 0).
    """
    if prefix_cache == "off":
        raise UserError(
            "--prefix-host-level keeps the checkpoints the prefix cache evicts: it needs "
            "--prefix-cache (avmp, vllm-align or sglang)"
        )
    if preemption == "recompute":
        raise UserError(
            "--prefix-host-level keeps evicted checkpoints in the host tier, which "
            "--preemption recompute leaves out: use --preemption auto or swap"
        )
    if host_tier_bytes == 0:
        raise UserError(
            "--prefix-host-level keeps evicted checkpoints in the host tier, which "
            "--host-tier 0 leaves out: give the tier a size, or leave --host-tier out"
        )


def follows_under_torchrun(model: Any, config: Any) -> bool:
    """On ranks 1..N-1 of a torchrun group: follow rank 0's engine until it closes,
    and say so (the command then prints nothing); False elsewhere."""
    from avmp.engine.tp_step import is_torchrun_follower, run_torchrun_follower

    if not is_torchrun_follower(config.tensor_parallel):
        return False
    run_torchrun_follower(model, config)
    return True


def run(args: argparse.Namespace) -> int:
    from avmp.engine.engine import Engine, check_device_holds, resolve_host_tier_bytes

    _check(args)
    config = prefixed_engine_config(args)
    check_device_holds(config.torch_device(), config.memory_bytes)  # before any loading
    resolve_host_tier_bytes(config)  # a host tier larger than the host: one line, too
    model, tokenizer = model_and_tokenizer(args, weights_seed=args.seed)
    if follows_under_torchrun(model, config):
        return 0
    engine = Engine(model, config, tokenizer)
    try:
        return _generate(args, engine)
    finally:
        engine.close()  # on several ranks: the followers stop


def _generate(args: argparse.Namespace, engine: Any) -> int:
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


def _check(args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not -(1 << 63) <= args.seed < 1 << 64:  # what torch.manual_seed takes
        raise UserError(f"--seed must be between {-(1 << 63)} and {(1 << 64) - 1}, got {args.seed}")
    check_engine_options(args)


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
        f"{stats.num_preemptions} preemptions) on {_where(engine)}, after one warm-up request",
    ]
    if usage is not None:
        lines.append(
            f"pools at the end: KV {fb(usage.kv_capacity_bytes)}, state "
            f"{fb(usage.state_capacity_bytes)}, unassigned {fb(usage.unassigned_bytes)} "
            f"of {fb(usage.budget_bytes)} (peak KV {fb(stats.peak_kv_capacity_bytes)}, "
            f"peak state {fb(stats.peak_state_capacity_bytes)})"
        )
    lines.append(_host_tier_line(engine))
    if engine.prefix_cache is not None:
        lines.append(prefix_cache_line(engine))
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


def _where(engine: Any) -> str:
    size = engine.config.tensor_parallel
    return str(engine.device) if size == 1 else f"{size} ranks ({engine.device} is rank 0)"


def prefix_cache_line(engine: Any) -> str:
    """What the prefix cache did in the last run, and holds at its end."""
    prefix, config = engine.stats.prefix, engine.prefix_cache
    return (
        f"prefix cache {config.policy} ({config.eviction} eviction): "
        f"{prefix.num_hit_tokens} of {prefix.num_queried_tokens} prompt tokens from the "
        f"cache ({prefix.hit_rate:.1%}), {prefix.num_checkpoints_taken} checkpoints taken, "
        f"{prefix.num_checkpoints} held ({format_bytes(prefix.checkpoint_bytes)}), evicted "
        f"{prefix.num_evicted_checkpoints} checkpoints and {prefix.num_evicted_pages} pages"
        + (_host_level_part(prefix) if config.host_level else "")
    )


def _host_level_part(prefix: Any) -> str:
    """What the prefix cache's host level did in the last run, and holds at its end."""
    return (
        f"; host level: {prefix.num_host_stored} checkpoints copied out, "
        f"{prefix.num_host_hits} hits copied in ({prefix.num_host_hit_tokens} tokens), "
        f"{prefix.num_host_evicted} dropped, {prefix.num_host_checkpoints} held "
        f"({format_bytes(prefix.host_checkpoint_bytes)})"
    )


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
