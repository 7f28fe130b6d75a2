"""``avmp serve`` on the command line: bad options are one line and exit 2; SIGTERM
lets a short request finish, ends a long one as ``abort``, and exits 0; a second Ctrl-C
aborts at once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from avmp.cli import main

pytest.importorskip("fastapi")
pytest.importorskip("mistral_common")

ZOO = ["granite-4.0-h-tiny", "--random-weights", "--scale", "tiny"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "70000"], "--port"),
        (["--max-waiting", "0"], "--max-waiting"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
        (["--default-max-tokens", "0"], "--default-max-tokens"),
        (["--api-key", ""], "--api-key"),
        (["--memory", "lots"], "--memory"),
        (["--max-model-len", "0"], "max_model_len"),
    ],
)
def test_bad_options_are_one_line(capsys, args, message):
    assert main(["serve", *ZOO, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_bad_model_and_a_port_in_use_are_one_line(capsys, tmp_path):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", *ZOO, "--port", port]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err


def _stream(url: str, max_tokens: int, out: dict) -> None:
    body = {"model": "tiny", "prompt": "w1 w2 w3", "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, "stream": True}  # fmt: skip
    events = []
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                out.setdefault("first", time.monotonic())
    out["events"] = events


def _start(checkpoints: dict, shutdown_timeout_s: float) -> tuple[subprocess.Popen, str]:
    """``avmp serve`` on the chat checkpoint in a process, and its API's URL."""
    # Ctrl-C as in a terminal: a job started in the background by a script (CI) inherits
    # SIGINT ignored, and uvicorn hands it back to that after its shutdown
    main = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from avmp.cli import main; sys.exit(main())")  # fmt: skip
    command = [sys.executable, "-c", main,
               "serve", str(checkpoints["chat"]), "--memory", "64MiB", "--port", "0",
               "--served-model-name", "tiny", "--shutdown-timeout", str(shutdown_timeout_s),
               "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)  # fmt: skip
    banner = server.stdout.readline()  # printed once the server is about to listen
    if "avmp serve: tiny on http://127.0.0.1:" not in banner:
        server.kill()
        raise AssertionError(server.communicate()[1])
    return server, banner.split(" on ")[1].split()[0]


def test_sigterm_finishes_or_aborts_in_flight_requests_and_exits_0(checkpoints):
    server, url = _start(checkpoints, 4)
    try:
        short, long = {}, {}
        threads = [threading.Thread(target=_stream, args=(url, n, out))
                   for n, out in ((4, short), (100000, long))]  # fmt: skip
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while not ("first" in short and "first" in long) and time.monotonic() < deadline:
            time.sleep(0.02)
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, server.stderr.read()
        for thread in threads:
            thread.join(60)
    finally:
        server.kill()
        server.communicate()
    for out, reason in ((short, "length"), (long, "abort")):
        assert out["events"][-1] == "[DONE]"
        assert json.loads(out["events"][-2])["choices"][0]["finish_reason"] == reason


def test_a_second_ctrl_c_aborts_in_flight_requests_at_once(checkpoints):
    server, url = _start(checkpoints, 60)  # a grace period the test never waits for
    try:
        out: dict = {}
        thread = threading.Thread(target=_stream, args=(url, 100000, out))
        thread.start()
        deadline = time.monotonic() + 60
        while "first" not in out and time.monotonic() < deadline:
            time.sleep(0.02)
        server.send_signal(signal.SIGINT)  # drains: the stream could go on for 60 s
        time.sleep(0.5)
        server.send_signal(signal.SIGINT)  # uvicorn's "CTRL+C to force quit"
        start = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):  # asserted below
            server.wait(20)
        took = time.monotonic() - start
        thread.join(30)
    finally:
        server.kill()
        _, err = server.communicate()
    assert took < 10, err
    assert "Traceback" not in err, err
    assert server.returncode == 130 and err.strip().endswith("avmp serve: interrupted"), err
    assert out["events"][-1] == "[DONE]"
    assert json.loads(out["events"][-2])["choices"][0]["finish_reason"] == "abort"
