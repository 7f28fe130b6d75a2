"""Running the app under uvicorn, and stopping it cleanly.

On SIGTERM or SIGINT uvicorn stops accepting connections and waits for those open. At
the same moment the app drains its engine (`avmp.serve.app`): requests in flight may
finish for ``shutdown_timeout_s``, then the engine aborts them, so each client still
gets a whole answer (finish reason ``abort``) and its connection closes. uvicorn's own
grace period, a little longer, only backs that up: past it, uvicorn cancels what is
left. The app's lifespan shutdown then frees the engine's memory. A second Ctrl-C
aborts what is left at once, and the shutdown goes on as before; a third is uvicorn's
force quit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType
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


# uvicorn's grace period beyond the engine's: time for the aborted answers to be sent
BACKSTOP_S = 5.0


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the engine while uvicorn waits for the connections;
    ``abort`` ends every request at once."""

    def __init__(
        self, config: uvicorn.Config, drain: Callable[[], None], abort: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._abort = abort
        self._aborted = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's force quit (a second Ctrl-C) would stop waiting for the answers and
        # skip the lifespan's end while the drain still ran to its deadline: the process
        # lingered, then cancelled the handlers mid-answer (tracebacks). Aborting the
        # requests instead ends every answer at once, and the shutdown goes on cleanly; a
        # third is uvicorn's force quit, for a client that does not read its answer.
        if self.should_exit and sig == signal.SIGINT and not self._aborted:
            self._aborted = True
            threading.Thread(target=self._abort, name="avmp-abort", daemon=True).start()
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        draining = asyncio.create_task(asyncio.to_thread(self._drain))
        try:
            await super().shutdown(sockets)
        finally:
            await draining


def make_server(app: Any, shutdown_timeout_s: float, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for an app of `avmp.serve.app.create_app`."""
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(shutdown_timeout_s + BACKSTOP_S),
        access_log=log_level == "debug",
    )
    state = app.state
    return _DrainingServer(config, lambda: state.drain_engine(False), state.abort_engine)


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
