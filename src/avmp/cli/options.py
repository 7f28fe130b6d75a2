"""Options that several subcommands share, defined once so they read and fail alike."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from avmp.cli import UserError
from avmp.memory.registry import STATIC_SHIPPED_OPTIONS
from avmp.models.dtypes import SSM_DTYPE_CHOICES, ssm_dtype_name
from avmp.units import parse_bytes


def add_ssm_dtype_option(parser: Any, default: str | None = "bf16") -> None:
    """``--ssm-dtype {auto,bf16,fp16,fp32}``. The simulator's commands keep bf16 as their
    default (the published figures were made with it); ``auto`` is opt-in."""
    shown = "the model's dtype" if default is None else default
    parser.add_argument(
        "--ssm-dtype",
        default=default,
        metavar="{" + ",".join(SSM_DTYPE_CHOICES) + "}",
        help=f"SSM state dtype (default: {shown}); auto = the model family's default as "
        "vLLM and SGLang ship it (fp32 for Nemotron-H and the Mamba2 hybrids, "
        "bf16 for Jamba; table in docs/design-memory.md)",
    )


def ssm_dtype_choice(choice: str) -> str:
    """The ``ssm_dtype`` for `avmp.models.resolve_model`: a dtype name, or ``auto``.

    Raises:
        UserError: not one of the choices (one line).
    """
    try:
        name = ssm_dtype_name(choice)
    except ValueError as error:
        raise UserError(str(error)) from None
    return "auto" if name is None else name


def add_feasibility_option(parser: argparse.ArgumentParser) -> None:
    """``--ignore-feasibility``: simulate even what the GPU profile could not hold."""
    parser.add_argument(
        "--ignore-feasibility",
        action="store_true",
        help="simulate even when weights + cache + activations exceed the GPU profile's "
        "memory (default: refuse, one line)",
    )


def add_static_options_option(parser: Any) -> None:
    """``--static-options LIST``: SGLang's static split as it ships (off by default)."""
    parser.add_argument(
        "--static-options",
        default="",
        metavar="LIST",
        help="the static layout as SGLang ships it, comma-separated: "
        f"{', '.join(STATIC_SHIPPED_OPTIONS)} (default: none, as the published figures)",
    )


def static_options(text: str) -> tuple[str, ...]:
    """The names in ``--static-options``.

    Raises:
        UserError: a name that is not one of `STATIC_SHIPPED_OPTIONS` (one line).
    """
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in STATIC_SHIPPED_OPTIONS]
    if unknown:
        raise UserError(
            f"unknown static option {unknown[0]!r}; known: {', '.join(STATIC_SHIPPED_OPTIONS)}"
        )
    return names


def add_policy_options(parser: Any) -> None:
    """``--preemption``, ``--admission`` and ``--host-tier``: the policy every layout
    runs in the simulator (the ``*-shipped`` layouts keep their project's own)."""
    parser.add_argument(
        "--preemption",
        choices=("auto", "swap", "recompute"),
        default="auto",
        help="how a preempted request gives its memory back: auto (per victim, swap to the "
        "host tier or recompute, whichever costs less), swap, or recompute (vLLM v1's "
        "only mode) (default: auto)",
    )
    parser.add_argument(
        "--admission",
        choices=("reserve", "greedy", "sglang"),
        default="reserve",
        help="when a waiting request may start: reserve (only if the running requests' "
        "growth still fits beside it), greedy (whenever its first chunk fits: vLLM v1) or "
        "sglang (SGLang's decaying new-token ratio) (default: reserve)",
    )
    parser.add_argument(
        "--host-tier",
        metavar="SIZE",
        help="host memory for swapped-out requests, e.g. 64GiB; 0 for none "
        "(default: twice the cache budget, SGLang HiCache's ratio)",
    )


def policy_options(args: argparse.Namespace) -> dict[str, Any]:
    """`SimConfig`'s policy fields from the options (UserError, one line, on a bad size)."""
    return {
        "preemption": args.preemption,
        "admission": args.admission,
        "host_tier_bytes": host_tier_bytes(args.host_tier),
    }


def host_tier_bytes(text: str | None) -> int | None:
    """``--host-tier``: None when not given, 0 for ``0`` (no host tier: every preemption
    recomputes), else a size (UserError, one line, when it is not one)."""
    from avmp.cli import parse_size

    if text is None:
        return None
    return 0 if text.strip() == "0" else parse_size("--host-tier", text)


# -- the engine's options (avmp generate, avmp serve) ---------------------------------


def count_option(flag: str, text: str | None) -> int | None:
    """A count given as text on the command line (``--workers``, ``--max-requests``): a
    whole number >= 1, None when not given, else one line naming the flag."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{flag} must be a whole number >= 1, got {text!r}")
    return value


def add_engine_options(parser: Any) -> None:
    """What the engine is built from: memory, device, layout, batch limits, policies,
    and ``--random-weights --scale tiny`` for a zoo name."""
    parser.add_argument("--memory", default="12GiB", help="cache memory, e.g. 12GiB (default)")
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
        "--generation-config", default="auto", metavar="auto|vllm|PATH",
        help="the generation_config.json that sets the end-of-sequence ids and, for the "
             "server, the sampling defaults: auto (the checkpoint's; default), vllm (its "
             "ids only, neutral sampling defaults) or another directory or file",
    )  # fmt: skip
    parser.add_argument(
        "--random-weights", action="store_true", help="build a random model from a zoo config"
    )
    parser.add_argument("--scale", choices=("tiny",), default=None, help="with --random-weights")


def check_engine_options(args: argparse.Namespace) -> None:
    """One line (UserError) for the first bad engine option, before any work."""
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
    most_threads = 4 * (os.cpu_count() or 1)  # libgomp segfaults starting 10,000 threads
    if args.threads is not None and args.threads > most_threads:
        raise UserError(
            f"--threads must be at most {most_threads} (4 per CPU), got {args.threads}"
        )
    _check_generation_config(args.generation_config)


def _check_generation_config(choice: str) -> None:
    """One line for a ``--generation-config`` path that holds no readable file, before
    the weights load (``auto`` and ``vllm`` read the checkpoint's own when it is built)."""
    from avmp.engine.generation_config import AUTO, NEUTRAL, resolve_generation_config

    if choice in (AUTO, NEUTRAL):
        return
    try:
        resolve_generation_config(choice, None)
    except ValueError as error:
        raise UserError(f"--generation-config: {error}") from None


def engine_config(args: argparse.Namespace) -> Any:
    """The `EngineConfig` the options describe (validated: a bad value is a ValueError)."""
    from avmp.engine.engine import DEFAULT_CPU_THREADS, EngineConfig

    memory, chunk = parse_bytes(args.memory), parse_bytes(args.chunk)
    if memory < chunk:
        raise UserError(f"--memory {args.memory} must hold at least one --chunk ({args.chunk})")
    return EngineConfig(
        memory_bytes=memory,
        device=args.device,
        dtype=args.dtype,
        allocator=args.allocator,
        state_fraction=args.state_fraction,
        cpu_threads=DEFAULT_CPU_THREADS if args.threads is None else args.threads,
        block_size=args.block_size,
        chunk_bytes=chunk,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        ssm_dtype=_ssm_dtype(args.model, args.ssm_dtype),
        preemption=args.preemption,
        admission=args.admission,
        host_tier_bytes=host_tier_bytes(args.host_tier),
        generation_config=args.generation_config,
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


def model_and_tokenizer(args: argparse.Namespace, weights_seed: int) -> tuple[Any, Any]:
    """The model (a path, or a tiny random model whose weights come from
    ``weights_seed``) and a tokenizer for it, if any."""
    from avmp.engine.tiny import TINY_VOCAB, tiny_model
    from avmp.engine.tokenizer import MistralTokenizer, load_tokenizer
    from avmp.models.zoo import zoo_config, zoo_names

    path = Path(args.model).expanduser()  # as the zoo reads a model path
    if args.random_weights:
        if args.model.lower() not in zoo_names():
            raise UserError(f"--random-weights needs a zoo name{_not_zoo(args.model)}")
        model = tiny_model(zoo_config(args.model), seed=weights_seed)
        return model, MistralTokenizer()
    if not path.is_dir():
        hint = " (add --random-weights --scale tiny)" if args.model.lower() in zoo_names() else ""
        raise UserError(f"{args.model}: not a checkpoint directory{hint}")
    tokenizer = load_tokenizer(path)
    if tokenizer is None and _vocab_size(path) >= TINY_VOCAB:
        # a checkpoint without its tokenizer (one our tests write, or files left behind):
        # the demo tokenizer, said aloud, since a real model's text would not match it
        print(f"avmp {getattr(args, 'command', 'generate')}: note: {args.model} has no "
              "tokenizer files; text goes through mistral-common's demo tokenizer, not "
              "the model's own", file=sys.stderr)  # fmt: skip
        tokenizer = MistralTokenizer()
    return path, tokenizer


def _not_zoo(model: str) -> str:
    """Why ``model`` is no zoo name: a path to load without ``--random-weights``, or an
    unknown name (with the names it may mean)."""
    from avmp.models.zoo import resolve_model

    if Path(model).exists():
        return f"; to load {model}, leave out --random-weights --scale tiny"
    try:
        resolve_model(model)
    except ValueError as error:
        return f": {error}"
    return ""


def _vocab_size(path: Path) -> int:
    import json

    try:
        return int(json.loads((path / "config.json").read_text()).get("vocab_size", 0))
    except (OSError, ValueError):
        return 0  # the loader reports the broken config with a clear message
