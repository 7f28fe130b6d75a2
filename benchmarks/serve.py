"""``avmp bench serve`` against the avmp server, per model geometry and cache layout, and
the served throughput at saturation beside ``Engine.generate`` on the same requests.

For each model (random weights with a zoo config's geometry: full size on the GPU, or
the tiny widths of `avmp.engine.tiny` with ``--scale tiny``) and each layout (avmp,
static, unified), a server process is started on a free port: this script's
``--worker`` mode, which builds the engine as ``avmp serve`` does (the same engine
options, `avmp.serve.app.create_app` over an `EngineLoop`, `avmp.serve.server.run`),
differing only where ``avmp serve`` cannot follow yet: it builds full-size random
weights (``avmp serve --random-weights`` is tiny-only). Before serving, the worker warms
the engine up and runs ``Engine.generate`` once on the benchmark's requests (all at once,
``ignore_eos``): its output tokens per second are the reference. Then the load
generator (`avmp.bench.loadgen`) sends the same ShareGPT requests at each rate, from
light to saturated (``inf``: all at once), and the server is stopped with SIGTERM.

The ratio reported is served output tokens/s at ``inf`` over ``Engine.generate``'s.
One JSON file holds every run (each run's rates in ``avmp bench serve``'s result shape,
raw request timings included); markdown tables are printed from it.

Usage (on the device machine; about 7 minutes on one H200 with the defaults)::

    python3 -m benchmarks.serve --out $OUT/serve.json
    python3 -m benchmarks.serve --markdown $OUT/serve.json
    python3 -m benchmarks.serve --smoke --out /tmp/serve.json   # CPU, tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from avmp.bench import loadgen
from avmp.bench.serve_report import markdown_table
from benchmarks.common import read_result, repo_path, write_result

DEFAULT_MODELS = ("granite-4.0-h-micro", "nemotron-h-8b")
LAYOUTS = ("avmp", "static", "unified")
DEFAULT_RATES = "8,32,inf"
STARTUP_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0
SMOKE = {
    "scale": "tiny",
    "device": "cpu",
    "models": ["granite-4.0-h-micro"],
    "num_prompts": 4,
    "rates": "20,inf",
    "memory": "256MiB",
    "max_output_tokens": 6,
    "max_prompt_tokens": 64,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker_args(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results file (JSON; .json.gz: compressed)")
    parser.add_argument("--markdown", type=Path, help="print the tables of a results file")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--memory", default="16GiB", help="cache budget of each server")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--num-prompts", type=int, default=100, help="ShareGPT requests per rate")
    parser.add_argument(
        "--trace", type=Path,
        help="take the requests' lengths from this trace file instead (token-id prompts of "
             "exactly those lengths, e.g. benchmarks/traces/sharegpt_vllm_600.jsonl, ShareGPT "
             "under vLLM's rules; no dataset package needed)",
    )  # fmt: skip
    parser.add_argument("--rates", default=DEFAULT_RATES, help="requests/s, light to saturated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-output-tokens", type=int, help="clip max_tokens (smoke runs)")
    parser.add_argument("--max-prompt-tokens", type=int, help="keep shorter prompts (smoke)")
    parser.add_argument("--rate-bound-s", type=float, default=120.0, help="each rate's bound")
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no run after")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, 4 requests")
    args = parser.parse_args(argv)
    args.worker = False
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


# -- requests -----------------------------------------------------------------------------


def benchmark_requests(args: argparse.Namespace) -> list[loadgen.BenchRequest]:
    """ShareGPT under vLLM's rules (or ``--trace``'s lengths); ``--max-prompt-tokens``
    keeps the first shorter ones (from a larger sample), ``--max-output-tokens`` clips the
    outputs (smoke runs)."""
    wanted = args.num_prompts
    sample = wanted if args.max_prompt_tokens is None else 20 * wanted
    if args.trace is not None:
        built = loadgen.trace_requests(args.trace, sample, args.seed)
    else:
        built = loadgen.sharegpt_requests(sample, args.seed)
    if args.max_prompt_tokens is not None:
        built = [r for r in built if r.prompt_tokens <= args.max_prompt_tokens]
    if args.max_output_tokens is not None:
        built = [
            loadgen.BenchRequest(
                r.prompt, r.prompt_tokens, min(r.max_tokens, args.max_output_tokens)
            )
            for r in built
        ]
    if len(built) < wanted:
        raise ValueError(f"only {len(built)} ShareGPT requests pass the filters, {wanted} wanted")
    return built[:wanted]


# -- one server ---------------------------------------------------------------------------


def _worker_command(
    args: argparse.Namespace, model: str, layout: str, port: int, requests: Path, gen: Path
) -> list[str]:
    command = [
        sys.executable, "-m", "benchmarks.serve", "--worker", model,
        "--allocator", layout, "--port", str(port),
        "--device", args.device, "--memory", args.memory,
        "--max-num-seqs", str(args.max_num_seqs),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--requests", str(requests), "--generate-out", str(gen),
    ]  # fmt: skip
    return command + (["--scale", "tiny"] if args.scale == "tiny" else [])


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until ``GET /health`` answers 200.

    Raises:
        RuntimeError: the process ended, or the timeout passed.
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not healthy within {timeout_s:g} s")


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL if it has not ended within `STOP_TIMEOUT_S`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def run_one(
    args: argparse.Namespace, model: str, layout: str, requests: list[loadgen.BenchRequest]
) -> dict[str, Any]:
    """Start a server for (model, layout), load it at every rate, stop it."""
    with tempfile.TemporaryDirectory(prefix="avmp-serve-bench-") as tmp:
        requests_path, gen_path, log_path = (Path(tmp) / n for n in ("req.json", "gen.json", "log"))
        requests_path.write_text(json.dumps([[r.prompt, r.max_tokens] for r in requests]))
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        command = _worker_command(args, model, layout, port, requests_path, gen_path)
        started = time.monotonic()
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            run: dict[str, Any] = {"model": model, "layout": layout, "url": url}
            try:
                wait_healthy(url, process, STARTUP_TIMEOUT_S)
                run["startup_s"] = time.monotonic() - started
                run["generate"] = json.loads(gen_path.read_text())
                run["results"] = load_rates(args, url, model, requests)
            except (RuntimeError, OSError, ValueError) as error:
                run["error"] = f"{error}; server log ends: {_tail(log_path)}"
            finally:
                run["exit_code"] = stop(process)
    return run


def load_rates(
    args: argparse.Namespace, url: str, model: str, requests: list[loadgen.BenchRequest]
) -> list[dict[str, Any]]:
    """One warm-up request, then every rate in order on the same requests."""
    entries = []
    for rate in _rates(args.rates):
        config = loadgen.LoadConfig(
            url, model, request_rate=rate, seed=args.seed, max_duration_s=args.rate_bound_s
        )
        if not entries:
            loadgen.warm_up(requests[:1], config)
        records, duration = loadgen.run_load(requests, config)
        entries.append(loadgen.rate_result(config, records, duration, (50, 90, 99), None))
    return entries


def _rates(text: str) -> list[float]:
    return [float(t) for t in text.split(",")]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:]) if text else "(empty)"


# -- the worker: one engine, generate once, then serve -------------------------------------


def _worker_args(argv: list[str]) -> argparse.Namespace:
    from avmp.cli.options import add_engine_options

    parser = argparse.ArgumentParser(prog="benchmarks.serve --worker")
    parser.add_argument("model")
    add_engine_options(parser)  # exactly avmp serve's engine options
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", type=Path, required=True)
    parser.add_argument("--generate-out", type=Path, required=True)
    parser.set_defaults(worker=True)
    return parser.parse_args(argv)


def worker(args: argparse.Namespace) -> int:
    """Build the engine, time ``Engine.generate`` on the requests, then serve until SIGTERM."""
    from avmp.cli.options import engine_config
    from avmp.engine.engine import Engine
    from avmp.engine.loop import EngineLoop
    from avmp.engine.tokenizer import MistralTokenizer
    from avmp.serve.app import ServeConfig, create_app
    from avmp.serve.server import bind
    from avmp.serve.server import run as run_server

    sock = bind("127.0.0.1", args.port)
    engine = Engine(_random_model(args), engine_config(args), MistralTokenizer())
    engine.warmup()
    args.generate_out.write_text(json.dumps(generate_reference(engine, args.requests)))
    app = create_app(
        EngineLoop(engine, max_waiting=4096), engine.tokenizer, ServeConfig(args.model)
    )
    run_server(app, sock, shutdown_timeout_s=5.0, log_level="warning")
    return 0


def _random_model(args: argparse.Namespace) -> Any:
    """Random weights with the zoo config's geometry: tiny widths (``--scale tiny``), or
    full size on the device."""
    from avmp.models.zoo import zoo_config

    if args.scale == "tiny":
        from avmp.engine.tiny import tiny_model

        return tiny_model(zoo_config(args.model), seed=0)
    import torch

    from benchmarks.engine import build_model, transformers_config

    return build_model(transformers_config(args.model), torch.device(args.device))


def generate_reference(engine: Any, requests_path: Path) -> dict[str, Any]:
    """``Engine.generate`` on the benchmark's requests, all at once, ``ignore_eos``; run
    twice and the second timed, since the first compiles the kernel variants and captures
    the graphs of its shapes (the server is timed after it, so it starts warm)."""
    pairs = json.loads(requests_path.read_text())
    prompts, limits = [p for p, _ in pairs], [m for _, m in pairs]
    engine.generate(prompts, max_tokens=limits, ignore_eos=True)
    outputs = engine.generate(prompts, max_tokens=limits, ignore_eos=True)
    stats = engine.stats
    output_tokens = sum(len(o.token_ids) for o in outputs)
    return {
        "num_requests": len(pairs),
        "elapsed_s": stats.elapsed_s,
        "output_tokens": output_tokens,
        "prompt_tokens": stats.num_prompt_tokens,
        "output_token_throughput": output_tokens / stats.elapsed_s,
        "num_preemptions": stats.num_preemptions,
    }


# -- tables -------------------------------------------------------------------------------


def latency_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per model, rate and layout: TTFT and TPOT percentiles and throughput."""
    headers = ["model", "rate", "layout", "done", "out tok/s", "TTFT p50 ms", "TTFT p99 ms",
               "TPOT p50 ms", "TPOT p99 ms"]  # fmt: skip
    rows = []
    for run in runs:
        for entry in run.get("results", []):
            s = entry["summary"]
            rows.append([
                run["model"], entry["request_rate"], run["layout"],
                f"{s['completed']}/{s['completed'] + s['failed']}",
                _fmt(s["output_token_throughput"], 0),
                _fmt(s["ttft_ms"]["p50"]), _fmt(s["ttft_ms"]["p99"]),
                _fmt(s["tpot_ms"]["p50"]), _fmt(s["tpot_ms"]["p99"]),
            ])  # fmt: skip
    rows.sort(key=lambda r: (r[0], _rate_order(r[1]), LAYOUTS.index(r[2])))
    return headers, rows


def saturation_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per model and layout: served output tok/s at ``inf`` over ``Engine.generate``'s."""
    headers = ["model", "layout", "served tok/s (inf)", "generate tok/s", "served/generate"]
    rows = []
    for run in runs:
        served = next((e for e in run.get("results", []) if e["request_rate"] == "inf"), None)
        if served is None or "generate" not in run:
            rows.append([run["model"], run["layout"], "n/a", "n/a", run.get("error", "n/a")])
            continue
        ours = served["summary"]["output_token_throughput"]
        reference = run["generate"]["output_token_throughput"]
        rows.append([run["model"], run["layout"], _fmt(ours, 0), _fmt(reference, 0),
                     f"{ours / reference:.2f}"])  # fmt: skip
    return headers, rows


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _rate_order(label: str) -> float:
    return math.inf if label == "inf" else float(label)


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    settings = result["settings"]
    source = (
        "ShareGPT requests per rate (vLLM rules"
        if not settings.get("trace")
        else f"requests per rate (lengths of {settings['trace']}, token-id prompts"
    )
    lines = [
        f"{settings['num_prompts']} {source}, seed "
        f"{settings['seed']}), {settings['scale']} random weights on {settings['device']}, "
        f"cache {settings['memory']}, at most {settings['max_num_seqs']} running",
        "",
        markdown_table(latency_rows(runs)),
        "",
        markdown_table(saturation_rows(runs)),
    ]
    skipped = result.get("skipped", [])
    if skipped:
        lines += ["", f"skipped (time budget): {', '.join(skipped)}"]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.markdown:
        print(markdown(read_result(args.markdown)))
        return 0
    requests = benchmark_requests(args)
    started = time.monotonic()
    runs, skipped = [], []
    for model in args.models:
        for layout in args.layouts:
            if time.monotonic() - started > args.budget_s:
                skipped.append(f"{model} {layout}")
                continue
            runs.append(run_one(args, model, layout, requests))
            print(f"{model} {layout}: {runs[-1].get('error', 'done')}", flush=True)
    result = {"settings": _settings(args), "runs": runs, "skipped": skipped,
              "elapsed_s": time.monotonic() - started}  # fmt: skip
    if args.out:
        write_result(args.out, result)  # .json.gz: compressed
    print(markdown(result))
    return 0 if all("error" not in run for run in runs) else 1


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("models", "layouts", "scale", "device", "memory", "max_num_seqs",
            "max_num_batched_tokens", "num_prompts", "rates", "seed", "max_output_tokens",
            "max_prompt_tokens", "rate_bound_s")  # fmt: skip
    trace = None if args.trace is None else repo_path(args.trace)
    return {key: getattr(args, key) for key in keys} | {
        "cpu_count": os.cpu_count(),
        "trace": trace,
    }


if __name__ == "__main__":
    sys.exit(main())
