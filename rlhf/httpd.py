"""The HTTP layer of `rlhf serve` and `rlhf annotate serve`: uvicorn's h11 server, with every request bounded.

Why uvicorn/h11 and not waitress: waitress 3.0.2 copies and searches the whole unterminated chunk-size line again on
every socket read, in its single I/O thread, before any application code runs, so a few slow chunked uploads make
every other client wait; its body limit only caps how long that line may grow. h11 searches a line once and refuses
an incomplete line (request line, header, chunk size) over 16 KiB. `bench/slow_chunked.py` measures both: on 2 CPUs,
3 slow chunked uploads saturated waitress's I/O thread with a 4 MiB body limit (honest p95 3.9 → 22.3 ms, growing
to 85 ms with its default limit), and left uvicorn/h11 as it was (6.6 → 4.6 ms; bench/README.md has the run).

What every request goes through before the application sees it (`Guard`, in this order):
* the Host header: only loopback names when the server listens on loopback, so a web page that points its own DNS
  name at 127.0.0.1 (DNS rebinding) cannot talk to the server; any name otherwise, or the names configured;
* `admit`, a check on the headers alone (the API key of `rlhf serve`), before a byte of the body is read;
* the body: read whole before the application runs, at most `max_bytes` (413 at once when the declared
  Content-Length says more, 413 as soon as a chunked body passes it) and within `BODY_TIMEOUT_S` (408), so a huge or
  slow upload never reaches a worker thread.
A refusal closes the connection: the rest of the upload is never read. Connections: at most `max_connections` at
once (503 beyond); idle keep-alive connections close after 5 s.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Awaitable, Callable, Iterator

BODY_TIMEOUT_S = 60.0  # the whole body must arrive within this: a 4 MiB body at 100 kB/s takes 40 s
LOOPBACK_NAMES = ["localhost", "127.0.0.1", "[::1]"]
MAX_INCOMPLETE_LINE = 16 * 1024  # h11's bound on a request line, header block or chunk-size line not yet ended

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
# (status, message) → (body, content type): how an application wants its 408 and 413 answers written
ErrorBody = Callable[[int, str], tuple[bytes, str]]
# scope → None to go on, or (status, message) to refuse from the headers alone (an API key), before the body is read
Admit = Callable[[dict], "tuple[int, str] | None"]


def plain_error(status: int, message: str) -> tuple[bytes, str]:
    return message.encode("utf-8"), "text/plain; charset=utf-8"


def is_loopback(host: str) -> bool:
    """Whether a listening address or host name is this machine only (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, configured: str = "") -> list[str]:
    """The Host header names to accept: `configured` (comma-separated) if given, else the loopback names when the
    server listens on loopback, else any ('*')."""
    names = [name.strip().lower() for name in configured.split(",") if name.strip()]
    if names:
        return names
    return LOOPBACK_NAMES if is_loopback(bind_host) else ["*"]


def host_name(header: bytes) -> str:
    """The name in a Host header, lower case, without its port ('[::1]' keeps its brackets)."""
    value = header.decode("latin-1").strip().lower()
    if value.startswith("["):
        return value[: value.index("]") + 1] if "]" in value else value
    name, _, port = value.rpartition(":")
    return name if name and port.isdigit() else value


class Guard:
    """ASGI middleware: the Host check, `admit`, and the request body read whole (bounded in size and time) before
    the application runs (see the module's docstring).

    The application then sees one `http.request` message with the whole body and a Content-Length header (a chunked
    upload arrives as an ordinary one); later `receive()` calls pass through, so it still hears `http.disconnect`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, error: ErrorBody = plain_error, hosts: list[str] | None = None,
                 admit: Admit | None = None, timeout: float = BODY_TIMEOUT_S):
        self.app, self.max_bytes, self.error, self.admit, self.timeout = app, max_bytes, error, admit, timeout
        self.hosts = None if hosts is None or "*" in hosts else set(hosts)

    async def reject(self, send, status: int, message: str, headers: list | None = None) -> None:
        body, content_type = self.error(status, message)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *(headers or [])]})  # the upload is not read: close
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import anyio

        if self.hosts is not None:
            name = host_name(next((v for k, v in scope["headers"] if k == b"host"), b""))
            if name not in self.hosts:
                await self.reject(send, 400, f"this server does not answer for the host name '{name}'")
                return
        refused = self.admit(scope) if self.admit else None
        if refused:
            await self.reject(send, *refused)
            return
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"transfer-encoding")]
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        too_big = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        if declared is not None and int(declared) > self.max_bytes:  # h11 has checked that it is a number
            await self.reject(send, 413, too_big)
            return
        chunks, size = [], 0
        with anyio.move_on_after(self.timeout) as waited:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_bytes:
                    await self.reject(send, 413, too_big)
                    return
                if not message.get("more_body", False):
                    break
        if waited.cancelled_caught:
            await self.reject(send, 408, f"the request body did not arrive within {self.timeout:g} s")
            return
        body = b"".join(chunks)
        scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def protect(app: ASGIApp, bind_host: str, max_bytes: int, error: ErrorBody = plain_error, hosts: str = "",
            admit: Admit | None = None) -> ASGIApp:
    """`app` behind the Guard of a server listening on `bind_host` (`hosts`: the names configured, if any)."""
    return Guard(app, max_bytes, error, allowed_hosts(bind_host, hosts), admit)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 = any free port); OSError when the address is taken or not ours."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle's algorithm off only for sockets that say they are TCP, and a
    # response written in two pieces (head, body) would otherwise wait 40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """A bound socket and the uvicorn (h11) server that will answer on it."""

    def __init__(self, app: ASGIApp, host: str, port: int, max_connections: int = 100, **uvicorn_options: Any):
        import uvicorn

        self.socket = bind(host, port)
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(app, http="h11", loop="asyncio", lifespan="off", ws="none", interface="asgi3",
                                h11_max_incomplete_event_size=MAX_INCOMPLETE_LINE,
                                limit_concurrency=max_connections, timeout_keep_alive=5,
                                timeout_graceful_shutdown=5, proxy_headers=False, server_header=False,
                                access_log=False, log_config=None, **uvicorn_options)
        self.server = uvicorn.Server(config)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else "[::1]" if self.host == "::" else self.host
        return f"http://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{self.port}"

    def run(self) -> None:
        """Serve until Ctrl-C (SIGINT or SIGTERM in the main thread) or `stop()`; in-flight requests get 5 s."""
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def stop(self) -> None:
        self.server.should_exit = True


@contextmanager
def serving(app: ASGIApp, host: str = "127.0.0.1", port: int = 0, **options: Any) -> Iterator[Listener]:
    """`app` served from a background thread while the block runs (tests and benchmarks) → the Listener."""
    listener = Listener(app, host, port, **options)
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not listener.server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield listener
    finally:
        listener.stop()
        thread.join(timeout=10)
