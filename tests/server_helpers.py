"""A real uvicorn server for a test: an ASGI app on a free port of 127.0.0.1, in a daemon thread.

`lorafit serve` and `lorafit ui` are both FastAPI apps on uvicorn; their tests drive them through
real HTTP clients, so they share this one way to start and stop the server.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import uvicorn

START_SECONDS = 30  # how long to wait for uvicorn to report that it has started


def start_server(app, *, backlog: int = 64, stop_seconds: float = 10,
                 **config) -> tuple[str, Callable[[], None]]:
    """Start `app` and wait until uvicorn has started; returns its "http://127.0.0.1:<port>" and a
    stop function. `config` goes to `uvicorn.Config` (log_level="warning" unless given)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and handed to uvicorn: no race for a "free" port
    sock.listen(backlog)
    server = uvicorn.Server(uvicorn.Config(app, **{"log_level": "warning", **config}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + START_SECONDS
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=stop_seconds)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


@contextlib.contextmanager
def running_app(app, **options) -> Iterator[str]:
    """`start_server` as a context manager: yields the address and stops the server on the way out."""
    url, stop = start_server(app, **options)
    try:
        yield url
    finally:
        stop()
