"""The uvicorn server under the application, with its limits for a hostile network.

uvicorn and starlette give most of them: `limit_concurrency` (503 past that many
connections and requests, answered here in one-line JSON), `timeout_keep_alive`,
h11's cap on a request head, `TrustedHostMiddleware` (a Host allow-list, so that a
DNS-rebinding page cannot reach a server on loopback). uvicorn has no deadline for a
request head, so `HeadTimeoutProtocol` adds one: a connection that has not sent a
whole head within `head_seconds` of opening (or of its last answer) is closed. Bodies
have their own deadline in `trainer.serving.transport.read_body`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any

import uvicorn
from starlette.middleware.trustedhost import TrustedHostMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

from trainer.errors import UserError

# The Host names of loopback; starlette keeps an IPv6 literal's brackets ("[::1]:8080").
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# Largest request head h11 buffers (uvicorn's default, said here so it stays bounded).
MAX_HEAD_BYTES = 16 * 1024
# Seconds a client is asked to wait while the model loads or past the connection limit.
RETRY_AFTER_SECONDS = 5
_HOST_ALLOWED = "trainer.host_allowed"


async def _answer(send, status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
                  ) -> None:
    """One-line JSON answer, as every refusal of this server is."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class Loading:
    """The application while the model loads: 503 with Retry-After to every request
    (the health route included, so a load balancer waits), then the loaded one.

    The server listens from the start, so a health check during a long load (a big
    model from a bucket, XLA compiling every batch size) reads "not ready" rather
    than "connection refused".
    """

    def __init__(self) -> None:
        self.app: Any = None

    async def __call__(self, scope, receive, send) -> None:
        if self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await _answer(send, 503, "the model is still loading; retry shortly",
                          [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())])


class HostAllowList:
    """starlette's `TrustedHostMiddleware`, whose refusal of a foreign Host is answered in
    one-line JSON like every other refusal here (it answers in plain text itself)."""

    def __init__(self, app: Any, allowed_hosts: Sequence[str]):
        self.app = app
        self.checker = TrustedHostMiddleware(self._allowed, allowed_hosts=list(allowed_hosts))

    async def _allowed(self, scope, receive, send) -> None:
        scope[_HOST_ALLOWED] = True
        await self.app(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.checker(scope, receive, send)
            return
        refused = False

        async def guarded(message) -> None:
            nonlocal refused
            if scope.get(_HOST_ALLOWED):
                await send(message)
            elif not refused:  # The checker's plain-text answer is replaced, then dropped.
                refused = True
                await _answer(send, 400, "this server does not answer for that Host header "
                                         "(see --allowed_hosts)")

        await self.checker(scope, receive, guarded)


def default_host(environ: dict[str, str]) -> str:
    """Where to listen without --host.

    Args:
      environ: the environment.

    Returns:
      Loopback, except under Vertex AI (AIP_HTTP_PORT set), whose proxy needs 0.0.0.0.
    """
    return "0.0.0.0" if environ.get("AIP_HTTP_PORT") else "127.0.0.1"


def default_allowed_hosts(host: str) -> list[str]:
    """The Host headers answered without --allowed_hosts.

    Args:
      host: the address listened on.

    Returns:
      Loopback names for a loopback server, else any Host (a proxy or Vertex AI fronts it).
    """
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return list(LOOPBACK_NAMES) if loopback else ["*"]


async def _over_limit(scope, receive, send) -> None:
    """The answer past --max_connections: one-line JSON 503, and the connection closes."""
    logging.getLogger("uvicorn.error").warning("Exceeded concurrency limit.")
    await _answer(send, 503, "too many connections and requests at once; retry shortly",
                  [(b"retry-after", str(RETRY_AFTER_SECONDS).encode()), (b"connection", b"close")])


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that send no whole request head in time,
    and answering past `limit_concurrency` in one-line JSON like every other refusal here.

    uvicorn's own check (connections or running requests at the limit when a request
    arrives: plain-text 503) is kept as it counts, with `_over_limit` as the answer.
    """

    head_seconds = 10.0

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._app, self._limit = self.app, self.limit_concurrency
        self.limit_concurrency = None  # Checked in handle_events below instead.

    def handle_events(self) -> None:  # noqa: D102
        over = self._limit is not None and (len(self.connections) >= self._limit
                                            or len(self.tasks) >= self._limit)
        self.app = _over_limit if over else self._app  # Read when a request arrives.
        super().handle_events()

    def connection_made(self, transport: asyncio.Transport) -> None:  # noqa: D102
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:  # noqa: D102
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        # A new request replaces self.cycle; the same (finished) cycle, or still none,
        # means no whole head arrived.
        waiting = self.cycle
        previous = getattr(self, "_head_timer", None)
        if previous is not None:
            previous.cancel()

        def expire() -> None:
            if self.cycle is waiting and (waiting is None or waiting.response_complete):
                self.transport.close()

        self._head_timer = self.loop.call_later(self.head_seconds, expire)


@dataclasses.dataclass(frozen=True)
class Network:
    """How the server meets the network (the serve door's flags).

    Attributes:
      host: the address to listen on.
      port: the port.
      allowed_hosts: Host headers answered; None: `default_allowed_hosts(host)`.
      max_connections: connections and requests at once; past it, 503.
      keep_alive_seconds: how long an idle kept-alive connection stays open.
      head_seconds: how long a connection may take to send a request head.
      shutdown_seconds: on SIGTERM, how long running requests may take to finish.
    """

    host: str
    port: int
    allowed_hosts: Sequence[str] | None = None
    max_connections: int = 100
    keep_alive_seconds: int = 5
    head_seconds: float = 10.0
    shutdown_seconds: int = 10


def config(app: Any, network: Network) -> uvicorn.Config:
    """uvicorn's configuration for `app` behind `network`'s Host check and limits.

    Args:
      app: the ASGI application.
      network: the address and the limits.

    Returns:
      The configuration (`uvicorn.Server(config).run()` serves it).
    """
    allowed = list(network.allowed_hosts or default_allowed_hosts(network.host))
    protocol = type("Protocol", (HeadTimeoutProtocol,), {"head_seconds": network.head_seconds})
    return uvicorn.Config(HostAllowList(app, allowed), host=network.host,
                          port=network.port, log_level="warning", http=protocol,
                          limit_concurrency=network.max_connections,
                          timeout_keep_alive=network.keep_alive_seconds,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                          timeout_graceful_shutdown=network.shutdown_seconds)


def serve(app: Any, network: Network, load: Any = None) -> None:
    """Runs `app` until SIGTERM/SIGINT, within `network`'s limits.

    Args:
      app: the ASGI application, or a `Loading` whose application `load` provides.
      network: the address and the limits.
      load: with a `Loading` app: a function that loads the model and returns the
        application; it runs in a thread while the server answers 503. If it raises,
        the server stops and the error is raised here.
    """
    server = uvicorn.Server(config(app, network))
    sock = listen(network)
    failure: list[BaseException] = []
    if load is not None:
        def loader() -> None:
            try:
                app.app = load()
            except BaseException as err:  # noqa: BLE001 - raised again in the caller.
                failure.append(err)
                server.should_exit = True

        threading.Thread(target=loader, name="load-model", daemon=True).start()
    with sock:
        server.run(sockets=[sock])
    if failure:
        raise failure[0]


def listen(network: Network) -> socket.socket:
    """A socket bound to `network`'s address, for uvicorn to serve on; a port in use or an
    address this machine lacks is one UserError line rather than uvicorn's log and exit."""
    family = socket.AF_INET6 if ":" in network.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((network.host, network.port))
    except OSError as err:
        sock.close()
        where = f"[{network.host}]" if family == socket.AF_INET6 else network.host
        raise UserError(f"cannot listen on {where}:{network.port}: "
                        f"{err.strerror or err}; choose another --port or --host") from err
    return sock
