"""Options that several subcommands share, defined once so they read and fail alike."""

from __future__ import annotations

import argparse
from typing import Any

from avmp.cli import UserError
from avmp.memory.registry import STATIC_SHIPPED_OPTIONS
from avmp.models.dtypes import SSM_DTYPE_CHOICES, ssm_dtype_name


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
