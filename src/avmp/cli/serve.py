"""``avmp serve``: an OpenAI-compatible HTTP server over one engine.

avmp serve ./granite-checkpoint --memory 8GiB --port 8000
avmp serve granite-4.0-h-tiny --random-weights --scale tiny --device cpu --memory 1GiB
avmp serve ./nemotron-h-47b --device cuda --tensor-parallel 4 --memory 80GiB
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from avmp.cli import UserError
from avmp.cli.generate import (
    add_prefix_cache_option,
    add_tensor_parallel_option,
    follows_under_torchrun,
    prefixed_engine_config,
)
from avmp.cli.options import add_engine_options, check_engine_options, model_and_tokenizer
from avmp.serve.tools import TOOL_CALL_PARSERS

API_KEY_VARIABLE = "AVMP_API_KEY"


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a hybrid model over the OpenAI API (completions, chat, streaming, metrics)",
        description=(
            "Serve MODEL, a Hugging Face checkpoint directory or a zoo name with "
            "--random-weights --scale tiny, over HTTP: POST /v1/completions, "
            "/v1/chat/completions and /v1/responses (streamed or not), /tokenize and "
            "/detokenize, GET /v1/models, /health, /version and /metrics "
            "(Prometheus: requests, both pools' bytes, migrations, preemptions, prefix-cache "
            "hits and checkpoints, latencies). "
            "SIGTERM or Ctrl-C lets requests in flight finish for --shutdown-timeout "
            "seconds, then aborts them and frees the memory; a second Ctrl-C aborts "
            "them at once."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint directory or zoo name")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000; 0: any free one)")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_VARIABLE}, "
        "else none)",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="the model name clients send (default: MODEL)"
    )
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="requests waiting at most; more get HTTP 429 with Retry-After (256)",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="a chat request's max_tokens when it gives none, at most the room its prompt leaves "
        "in the context (256; completions: 16, as OpenAI)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds requests in flight may take to finish after SIGTERM or Ctrl-C (30)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + max_tokens at most per request; longer ones get HTTP 400 "
        "(default: what the memory can hold)",
    )
    parser.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default="auto",
        help="how a chat reply to a request with tools is read for tool calls: hermes "
        "(<tool_call>{...}</tool_call>: Qwen3, Granite-4.0, Falcon-H1), nemotron "
        "(<TOOLCALL>[...]</TOOLCALL>: Nemotron-H), jamba (<tool_calls>[...]</tool_calls>), "
        "none (the text as it is); auto: the one whose tag the chat template writes (auto)",
    )
    parser.add_argument(
        "--chat-template",
        metavar="FILE_OR_TEXT",
        default=None,
        help="a Jinja chat template (a file, or the template itself) in place of the "
        "checkpoint's, e.g. for a checkpoint without one (default: the checkpoint's)",
    )
    parser.add_argument(
        "--allowed-origins",
        metavar="ORIGINS",
        default=None,
        help="origins a browser may call the API from (CORS): a JSON list as vLLM takes "
        "it, or comma-separated; '*' for any (default: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the random weights' seed (0)")
    parser.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug"),
        default="info",
        help="uvicorn's log level (info; debug adds the access log)",
    )
    add_engine_options(parser)
    add_prefix_cache_option(parser)
    add_tensor_parallel_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from avmp.engine.engine import Engine, check_device_holds, resolve_host_tier_bytes
    from avmp.engine.loop import EngineLoop
    from avmp.engine.tp_step import is_torchrun_follower
    from avmp.serve.app import create_app
    from avmp.serve.chat import load_chat_encoder
    from avmp.serve.server import bind
    from avmp.serve.server import run as run_server

    serve_config = _check(args)
    template = _chat_template(args.chat_template)
    config = dataclasses.replace(prefixed_engine_config(args), max_model_len=args.max_model_len)
    check_device_holds(config.torch_device(), config.memory_bytes)  # before any loading
    resolve_host_tier_bytes(config)
    if is_torchrun_follower(config.tensor_parallel):  # the server runs on rank 0 alone
        follows_under_torchrun(model_and_tokenizer(args, weights_seed=args.seed)[0], config)
        return 0
    sock = bind(args.host, args.port)  # a port in use: one line, before the model loads
    model, tokenizer = model_and_tokenizer(args, weights_seed=args.seed)
    try:  # a template that cannot render is found before the weights load
        chat = load_chat_encoder(model if isinstance(model, Path) else None, tokenizer, template)
    except ValueError as error:
        raise UserError(f"--chat-template: {error}") from None
    engine = Engine(model, config, tokenizer)
    if engine.tokenizer is None:
        raise UserError(
            f"{args.model} has no tokenizer files, and avmp serve speaks text: add the "
            "checkpoint's tokenizer, or use a zoo name with --random-weights --scale tiny"
        )
    engine.warmup()
    generation = engine.generation_defaults
    if generation.sampling():  # vLLM says so too: the checkpoint's defaults are in force
        print(f"avmp serve: generation config {generation.describe()}", flush=True)
    serve_config = dataclasses.replace(serve_config, generation=generation)
    app = create_app(EngineLoop(engine, args.max_waiting), engine.tokenizer, serve_config, chat)
    host, port = sock.getsockname()[:2]
    print(
        f"avmp serve: {serve_config.model_name} on http://{_url_host(host)}:{port}/v1 "
        f"({engine.allocator.name} layout, {engine.device}"
        + ("" if chat else ", no chat template: /v1/chat/completions answers 400")
        + ")",
        flush=True,
    )
    run_server(app, sock, args.shutdown_timeout, args.log_level)
    return 0


def _check(args: argparse.Namespace) -> Any:
    """The server's own options (one line for the first bad one), as its config."""
    from avmp.serve.app import ServeConfig

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_waiting < 1:
        raise UserError(f"--max-waiting must be >= 1, got {args.max_waiting}")
    if not math.isfinite(args.shutdown_timeout) or args.shutdown_timeout < 0:
        raise UserError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    if args.default_max_tokens < 1:
        raise UserError(f"--default-max-tokens must be >= 1, got {args.default_max_tokens}")
    if args.api_key == "":
        raise UserError("--api-key must not be empty")
    check_engine_options(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_VARIABLE)
    try:
        return ServeConfig(
            model_name=args.served_model_name or args.model,
            api_key=api_key or None,  # an empty variable is no key
            default_max_tokens=args.default_max_tokens,
            shutdown_timeout_s=args.shutdown_timeout,
            tool_call_parser=args.tool_call_parser,
            allowed_origins=_origins(args.allowed_origins),
        )
    except ValueError as error:
        raise UserError(f"{error}") from None


def _chat_template(value: str | None) -> str | None:
    from avmp.serve.chat import read_chat_template

    if value is None:
        return None
    try:
        return read_chat_template(value)
    except (OSError, ValueError) as error:
        raise UserError(f"--chat-template: {error}") from None


def _origins(value: str | None) -> tuple[str, ...]:
    """``--allowed-origins``: a JSON list of strings (vLLM's form) or comma-separated."""
    if value is None:
        return ()
    if value.lstrip().startswith("["):
        try:
            origins = json.loads(value)
        except ValueError as error:
            raise UserError(f"--allowed-origins: not a JSON list: {error}") from None
        if not all(isinstance(o, str) for o in origins):
            raise UserError("--allowed-origins: a JSON list of strings, e.g. '[\"*\"]'")
        return tuple(origins)
    return tuple(o.strip() for o in value.split(",") if o.strip())


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
