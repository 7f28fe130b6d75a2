"""``avmp bench serve --url URL``: load a running OpenAI-compatible server (avmp, vLLM,
SGLang) as ``vllm bench serve`` does and report its latencies, throughput and goodput
per request rate (`avmp.bench.loadgen`; the report: `avmp.bench.serve_report`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from avmp.cli import UserError

SERVE_DEFAULT_PROMPTS = 1000  # vLLM's bench serve default for ShareGPT
SERVE_DEFAULT_CONVERSATIONS = 100  # under --multi-turn: conversations, of several turns each


def add_serve_parser(subcommands: Any) -> None:
    from avmp.bench.loadgen import DEFAULT_PERCENTILES, ENDPOINTS
    from avmp.bench.workloads import PRESETS
    from avmp.cli.replay import add_trace_format_options

    parser = subcommands.add_parser(
        "serve",
        help="load an OpenAI-compatible server and measure its latencies",
        description="Send streamed requests to an OpenAI-compatible server (avmp serve, vLLM, "
        "SGLang) at one or more request rates and report TTFT, TPOT, ITL and end-to-end "
        "latency percentiles, throughput and goodput per rate. Prompts: ShareGPT first turns "
        "as text with the reply's length as max_tokens (default), vLLM's random dataset "
        "(--random-input-len), or the lengths of a trace file or a workload preset, as "
        "token-id prompts of exactly that length. A trace can also set the timing "
        "(--request-rate trace). --multi-turn sends whole conversations instead, turn by "
        "turn, each with the server's earlier answers in its history.",
    )
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--endpoint",
        choices=tuple(ENDPOINTS),
        help="/v1/completions (default) or /v1/chat/completions (the default and only "
        "choice under --multi-turn)",
    )
    parser.add_argument("--model", help="model name sent (default: the first of /v1/models)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $OPENAI_API_KEY)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--trace",
        metavar="FILE",
        help="prompt/output lengths (and with --request-rate trace, arrival times) of a "
        "trace file: JSONL or a JSON array, a CSV or TSV whose header names them, Azure, "
        "BurstGPT or Mooncake, also .gz, .bz2 or .xz",
    )
    source.add_argument(
        "--workload", choices=tuple(PRESETS), help="prompt/output lengths of a workload preset"
    )
    add_trace_format_options(parser, "--trace-format")
    add_random_arguments(parser)
    parser.add_argument(
        "--sharegpt-output-len",
        type=int,
        metavar="N",
        help="ask for N tokens of each ShareGPT answer instead of the dataset answer's length "
        "(the same conversations are chosen)",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="NAME_OR_DIR",
        help="with --trace, --workload or --random-input-len: send text of each length under "
        "this tokenizer (a transformers tokenizer directory or model id) instead of token "
        "ids; a trace's prefix sharing is sent with token ids only",
    )
    add_multi_turn_arguments(parser)
    parser.add_argument(
        "--num-prompts",
        type=int,
        help=f"requests per rate (default: {SERVE_DEFAULT_PROMPTS} ShareGPT or random "
        "prompts, a whole trace, a preset's size); under --multi-turn, conversations per rate "
        f"(default {SERVE_DEFAULT_CONVERSATIONS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="requests and arrivals (default 0)")
    parser.add_argument(
        "--request-rate",
        default="inf",
        metavar="RATES",
        help="comma-separated requests/s (under --multi-turn: conversations started per "
        "second), one run each; inf sends all at once; trace sends each request at its "
        "--trace arrival time (default: inf)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        metavar="F",
        help="with --request-rate trace: arrival times multiplied by F (0.5: twice as fast, "
        "2: half as fast; default 1)",
    )
    parser.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the gaps: 1 Poisson (default), < 1 burstier",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        help="requests in flight at most (under --multi-turn: conversations under way)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="requests sent first and not counted (default 1)"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="one request's bound in seconds (default 600)",
    )
    parser.add_argument(
        "--max-duration",
        type=float,
        metavar="S",
        help="each rate's bound in seconds; unfinished requests count failed",
    )
    parser.add_argument(
        "--percentiles",
        default=",".join(f"{p:g}" for p in DEFAULT_PERCENTILES),
        help="comma-separated latency percentiles (default: 50,90,95,99)",
    )
    parser.add_argument(
        "--goodput",
        nargs="+",
        metavar="METRIC:MS",
        help="objectives of goodput, e.g. ttft:500 tpot:50 (e2e:MS too)",
    )
    parser.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send ignore_eos (outputs may end before max_tokens)",
    )
    parser.add_argument("--out", metavar="FILE.json", help="save every request's timings here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_serve, command_name="bench serve")  # errors: as argparse's


def add_random_arguments(parser: argparse.ArgumentParser) -> None:
    """vLLM's ``random`` dataset: its flags, names and defaults."""
    from avmp.bench.loadgen import DEFAULT_RANDOM_INPUT_LEN, DEFAULT_RANDOM_OUTPUT_LEN

    parser.add_argument(
        "--random-input-len",
        type=int,
        metavar="N",
        help="synthetic prompts of about N tokens (vLLM's random dataset; default "
        f"{DEFAULT_RANDOM_INPUT_LEN} when only --random-output-len is given)",
    )
    parser.add_argument(
        "--random-output-len",
        type=int,
        metavar="N",
        help=f"their outputs: max_tokens about N (default {DEFAULT_RANDOM_OUTPUT_LEN})",
    )
    parser.add_argument(
        "--random-range-ratio",
        type=float,
        metavar="R",
        help="lengths uniform on [N x (1 - R), N x (1 + R)], R in [0, 1) (default 0: exact)",
    )
    parser.add_argument(
        "--random-prefix-len",
        type=int,
        metavar="P",
        help="P tokens that every prompt opens with (a conversation's first message; default 0)",
    )


def add_multi_turn_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--multi-turn",
        action="store_true",
        help="closed-loop conversations over /v1/chat/completions: each turn sent with the "
        "whole history (the server's own earlier answers) once the previous answer has "
        "ended; ShareGPT's conversations, or synthetic ones with --random-input-len, "
        "--num-turns and --tokenizer",
    )
    parser.add_argument(
        "--num-turns",
        type=int,
        metavar="N",
        help="with --multi-turn: turns per synthetic conversation; ShareGPT's are cut after N",
    )
    parser.add_argument(
        "--think-time",
        type=float,
        default=0.0,
        metavar="S",
        help="with --multi-turn: seconds between an answer's end and the next turn (default 0)",
    )


def parse_rates(text: str) -> list[float]:
    """``1,4,16,inf`` as request rates (requests/s > 0, or inf)."""
    import math

    rates = []
    for item in (t.strip() for t in text.split(",")):
        try:
            rate = float(item)
        except ValueError:
            rate = math.nan
        if not rate > 0:
            raise UserError(f"--request-rate: {item!r} is not a rate > 0 or inf")
        rates.append(rate)
    return rates


def parse_percentiles(text: str) -> tuple[float, ...]:
    """``50,90,99.9``: percentiles in (0, 100]."""
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"--percentiles: expected numbers such as 50,90,99, got {text!r}") from None
    if not all(0 < p <= 100 for p in values):
        raise UserError(f"--percentiles: each must be in (0, 100], got {text!r}")
    return values


def _check_serve_numbers(args: argparse.Namespace) -> None:
    def at_least(value: Any, low: float) -> bool:
        return value is None or value >= low

    checks = (
        (at_least(args.num_prompts, 1), "--num-prompts", ">= 1"),
        (args.warmup >= 0, "--warmup", ">= 0"),
        (at_least(args.max_concurrency, 1), "--max-concurrency", ">= 1"),
        (0 < args.request_timeout < float("inf"), "--request-timeout", "a positive number"),
        (
            args.max_duration is None or 0 < args.max_duration < float("inf"),
            "--max-duration",
            "a positive number",
        ),
        (0 < args.burstiness < float("inf"), "--burstiness", "a positive number"),
        (at_least(args.random_input_len, 0), "--random-input-len", ">= 0"),
        (at_least(args.random_output_len, 1), "--random-output-len", ">= 1"),
        (at_least(args.random_prefix_len, 0), "--random-prefix-len", ">= 0"),
        (
            args.random_range_ratio is None or 0 <= args.random_range_ratio < 1,
            "--random-range-ratio",
            "in [0, 1)",
        ),
        (at_least(args.sharegpt_output_len, 1), "--sharegpt-output-len", ">= 1"),
        (at_least(args.num_turns, 1), "--num-turns", ">= 1"),
        (0 <= args.think_time < float("inf"), "--think-time", ">= 0 seconds"),
    )
    for good, flag, wanted in checks:
        if not good:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise UserError(f"{flag} must be {wanted}, got {value}")


def _is_random(args: argparse.Namespace) -> bool:
    return args.random_input_len is not None or args.random_output_len is not None


def check_serve_sources(args: argparse.Namespace) -> None:
    """One line for flags that do not go together: the prompt sources, and what only
    one source or --multi-turn takes."""
    other = "--trace" if args.trace else "--workload" if args.workload else None
    if _is_random(args) and other:
        raise UserError(f"--random-input-len/--random-output-len make synthetic prompts: they "
                        f"cannot go with {other}")  # fmt: skip
    for flag, given in (("--random-range-ratio", args.random_range_ratio is not None),
                        ("--random-prefix-len", args.random_prefix_len is not None)):  # fmt: skip
        if given and not _is_random(args):
            raise UserError(f"{flag} goes with --random-input-len or --random-output-len")
    if args.sharegpt_output_len is not None and (other or _is_random(args)):
        raise UserError("--sharegpt-output-len goes with ShareGPT prompts (no --trace, "
                        "--workload or --random-input-len)")  # fmt: skip
    if args.tokenizer and not (other or _is_random(args)):
        raise UserError("--tokenizer goes with --trace, --workload or --random-input-len "
                        "(ShareGPT is text already)")  # fmt: skip
    if not args.multi_turn:
        for flag, given in (("--num-turns", args.num_turns is not None),
                            ("--think-time", args.think_time != 0.0)):  # fmt: skip
            if given:
                raise UserError(f"{flag} goes with --multi-turn")
        return
    if other:
        raise UserError(f"--multi-turn sends ShareGPT's conversations or synthetic ones "
                        f"(--random-input-len): it cannot go with {other}")  # fmt: skip
    if args.endpoint == "completions":
        raise UserError("--multi-turn sends each conversation's history as chat messages: "
                        "it needs --endpoint chat (its default)")  # fmt: skip
    if _is_random(args) and (args.num_turns is None or not args.tokenizer):
        raise UserError("--multi-turn with --random-input-len makes text messages of "
                        "--num-turns N turns: it needs --num-turns and --tokenizer")  # fmt: skip


def random_lengths(args: argparse.Namespace) -> Any:
    """The `RandomLengths` of the --random-* flags (vLLM's defaults for those not given)."""
    from avmp.bench.loadgen import RandomLengths

    given = {
        "input_len": args.random_input_len,
        "output_len": args.random_output_len,
        "range_ratio": args.random_range_ratio,
        "prefix_len": args.random_prefix_len,
    }
    return RandomLengths(**{k: v for k, v in given.items() if v is not None})


def serve_requests(args: argparse.Namespace) -> tuple[list[Any], str]:
    """The requests of one rate, and a name for where they come from."""
    from avmp.bench import loadgen

    tokenizer = loadgen.load_tokenizer(args.tokenizer) if args.tokenizer else None
    num = args.num_prompts or SERVE_DEFAULT_PROMPTS
    if args.trace:
        built, source = _trace_requests(args, tokenizer)
    elif args.workload:
        built = loadgen.preset_requests(args.workload, args.num_prompts, args.seed, tokenizer)
        source = f"workload {args.workload}"
    elif _is_random(args):
        lengths = random_lengths(args)
        built = loadgen.random_requests(lengths, num, args.seed, tokenizer)
        source = f"random ({lengths.describe()})"
    else:
        built = loadgen.sharegpt_requests(num, args.seed, output_len=args.sharegpt_output_len)
        source = "ShareGPT (vLLM rules)"
    if args.endpoint == "chat" and not isinstance(built[0].prompt, str):
        raise UserError("--endpoint chat needs text prompts: ShareGPT (no --trace, --workload "
                        "or --random-input-len) or --tokenizer")  # fmt: skip
    return built, source


def serve_work(args: argparse.Namespace, num_rates: int) -> tuple[list[list[Any]], list[Any], str]:
    """What each rate sends (requests, or conversations under --multi-turn), the warm-up
    requests, and a name for where they come from.

    Every rate sends the same requests, and the warm-up repeats the first. Conversations
    are each rate's own and the warm-up sends the first turns of others: a server's
    prefix cache would otherwise hold first turns that a rate measures as unseen.
    """
    if not args.multi_turn:
        work, source = serve_requests(args)
        return [work] * num_rates, [work[i % len(work)] for i in range(args.warmup)], source
    num = args.num_prompts or SERVE_DEFAULT_CONVERSATIONS
    built, source = serve_conversations(args, num * num_rates + args.warmup)
    per_rate = [built[i * num : (i + 1) * num] for i in range(num_rates)]
    return per_rate, [c.first_turn() for c in built[num * num_rates :]], source


def serve_conversations(args: argparse.Namespace, num: int) -> tuple[list[Any], str]:
    """``num`` conversations (--multi-turn) and a name for where they come from."""
    from avmp.bench import loadgen

    if _is_random(args):
        lengths = random_lengths(args)
        tokenizer = loadgen.load_tokenizer(args.tokenizer)
        built = loadgen.synthetic_conversations(lengths, num, args.num_turns, args.seed, tokenizer)
        return built, f"synthetic conversations ({lengths.describe()} per turn)"
    built = loadgen.sharegpt_conversations(
        num, args.seed, max_turns=args.num_turns, output_len=args.sharegpt_output_len
    )
    return built, "ShareGPT conversations"


def _trace_requests(args: argparse.Namespace, tokenizer: Any) -> tuple[list[Any], str]:
    """The ``--trace`` file's requests, and what to call them: the file, and how it was
    read where its columns were found by name (`avmp.cli.replay.trace_read_as`)."""
    from avmp.bench import loadgen
    from avmp.bench.traces import read_trace_part
    from avmp.cli.replay import trace_read_as

    part = read_trace_part(args.trace, args.trace_format, time_unit=args.time_unit)
    if part.columns is not None and part.columns.arrival is None and trace_time_scale(args):
        raise UserError(
            f"{args.trace}: --request-rate trace sends each request at its arrival time, and "
            "this trace has none; give a rate, or add a column of times (arrival_s, timestamp)"
        )
    built = loadgen.spec_requests(part.requests[: args.num_prompts], args.seed, tokenizer)
    read_as = trace_read_as(part)
    return built, f"trace {args.trace}" + (f" ({read_as})" if read_as else "")


def trace_time_scale(args: argparse.Namespace) -> float | None:
    """The time scale of ``--request-rate trace`` (the trace's own timing), or None when
    the rates are numbers; one-line errors for what cannot go with it."""
    import math

    from avmp.bench.loadgen import TRACE_RATE

    items = [t.strip() for t in args.request_rate.split(",")]
    if TRACE_RATE not in items:
        if args.time_scale is not None:
            raise UserError("--time-scale goes with --request-rate trace")
        return None
    if len(items) > 1:
        raise UserError(
            "--request-rate trace replays the trace's own timing: it cannot be mixed with rates"
        )
    if not args.trace:
        raise UserError("--request-rate trace needs --trace FILE (its arrival times are sent)")
    if args.burstiness != 1.0:
        raise UserError("--burstiness shapes a rate's gaps: --request-rate trace has none")
    scale = 1.0 if args.time_scale is None else args.time_scale
    if not 0 < scale < math.inf:
        raise UserError(f"--time-scale must be a positive number, got {scale}")
    return scale


def run_serve(args: argparse.Namespace) -> int:
    import math
    import sys

    from avmp.bench import loadgen

    time_scale = trace_time_scale(args)
    rates = parse_rates(args.request_rate) if time_scale is None else [math.inf]
    percentiles = parse_percentiles(args.percentiles)
    goodput = loadgen.parse_goodput(args.goodput) if args.goodput else None
    _check_serve_numbers(args)
    check_serve_sources(args)
    args.endpoint = args.endpoint or ("chat" if args.multi_turn else "completions")
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise UserError("avmp bench serve needs httpx: pip install 'avmp[serve]'") from None
    base_url = loadgen.normalize_url(args.url)
    model = args.model or loadgen.fetch_model(base_url, args.api_key)
    per_rate, warmup, source = serve_work(args, len(rates))
    configs = [_load_config(args, base_url, model, rate, time_scale) for rate in rates]
    loadgen.warm_up(warmup, configs[0])
    entries = [
        _run_rate(work, config, percentiles, goodput, args)
        for work, config in zip(per_rate, configs, strict=True)
    ]
    result = _serve_result(args, base_url, model, source, per_rate, percentiles, entries)
    if args.out:
        loadgen.save_result(args.out, result)
    from avmp.bench.serve_report import print_tables

    print_tables(result)
    if args.out:
        print(f"saved: {args.out} (avmp report {args.out} draws the latency distributions)")
    if not any(entry["summary"]["completed"] for entry in entries):
        print("avmp bench serve: no request completed", file=sys.stderr)
        return 1
    return 0


def _load_config(
    args: argparse.Namespace, base_url: str, model: str, rate: float, time_scale: float | None
) -> Any:
    from avmp.bench.loadgen import LoadConfig

    return LoadConfig(
        base_url=base_url,
        model=model,
        endpoint=args.endpoint,
        request_rate=rate,
        time_scale=time_scale,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        ignore_eos=not args.no_ignore_eos,
        request_timeout_s=args.request_timeout,
        max_duration_s=args.max_duration,
        seed=args.seed,
        api_key=args.api_key,
        think_time_s=args.think_time,
    )


def _run_rate(
    work: list[Any],
    config: Any,
    percentiles: tuple[float, ...],
    goodput: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Load the server at one rate with a progress bar (a step per request, or per turn
    of a conversation); that rate's result entry."""
    from rich.progress import Progress

    from avmp.bench.loadgen import load_label, rate_result, run_conversations, run_load

    total = sum(c.num_turns for c in work) if args.multi_turn else len(work)
    with Progress(transient=True, disable=args.no_progress) as bar:
        task = bar.add_task(f"rate {load_label(config)}", total=total)
        run = run_conversations if args.multi_turn else run_load
        records, duration = run(work, config, lambda: bar.advance(task))
    return rate_result(config, records, duration, percentiles, goodput)


def _serve_result(
    args: argparse.Namespace,
    base_url: str,
    model: str,
    source: str,
    per_rate: list[list[Any]],
    percentiles: tuple[float, ...],
    entries: list[dict[str, Any]],
) -> dict[str, Any]:
    """The saved result: how it was run (command, server, model, date) and each rate;
    ``num_prompts`` counts requests, or conversations under ``multi_turn`` (which gives
    each rate's turns)."""
    import sys
    from datetime import UTC, datetime

    from avmp.bench.loadgen import RESULT_SCHEMA

    argv = _redacted(sys.argv[1:]) if sys.argv[1:3] == ["bench", "serve"] else None
    return {
        "schema": RESULT_SCHEMA,
        "argv": ["avmp", *argv] if argv else None,
        "url": base_url,
        "model": model,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            "endpoint": args.endpoint,
            "dataset": source,
            "num_prompts": len(per_rate[0]),
            "multi_turn": {
                "turns": [sum(c.num_turns for c in work) for work in per_rate],
                "num_turns": args.num_turns,
                "think_time_s": args.think_time,
            }
            if args.multi_turn
            else None,
            "seed": args.seed,
            "warmup": args.warmup,
            "ignore_eos": not args.no_ignore_eos,
            "request_timeout_s": args.request_timeout,
            "max_duration_s": args.max_duration,
            "percentiles": list(percentiles),
            "goodput": args.goodput,
        },
        "results": entries,
    }


def _redacted(argv: list[str]) -> list[str]:
    """The command line with the API key's value hidden (results get shared)."""
    out = list(argv)
    for i, item in enumerate(out):
        if item == "--api-key" and i + 1 < len(out):
            out[i + 1] = "***"
        elif item.startswith("--api-key="):
            out[i] = "--api-key=***"
    return out
