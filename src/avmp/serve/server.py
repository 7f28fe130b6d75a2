"""Running the app under uvicorn, and stopping it cleanly.

On SIGTERM or SIGINT uvicorn stops accepting connections and lets the requests in
flight finish for up to ``shutdown_timeout_s``; then it cancels them (which aborts their
engine requests) and runs the app's lifespan shutdown, which stops the engine loop and
releases its memory (`avmp.serve.app.create_app`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), bound here so that a
    port in use is one clear OSError rather than uvicorn's exit.

    Raises:
        OSError: the address cannot be bound (in use, not this machine's, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(
    app: Any, shutdown_timeout_s: float = 30.0, log_level: str = "info"
) -> uvicorn.Server:
    """A uvicorn server for ``app``, its graceful period ``shutdown_timeout_s``."""
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(shutdown_timeout_s),
        access_log=log_level == "debug",
    )
    return uvicorn.Server(config)


def run(app: Any, sock: socket.socket, shutdown_timeout_s: float, log_level: str) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT, then shut down gracefully."""
    server = make_server(app, shutdown_timeout_s, log_level)
    with _sigterm_ends_cleanly():
        server.run(sockets=[sock])


@contextlib.contextmanager
def _sigterm_ends_cleanly() -> Iterator[None]:
    """After its graceful shutdown uvicorn raises the signal it caught again, for the
    handler that was there before it; for SIGTERM that would kill the process with the
    shutdown already done. A handler that ignores it lets ``avmp serve`` exit 0."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
