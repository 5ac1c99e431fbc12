"""The uvicorn server under the application, with its limits for a hostile network.

uvicorn and starlette give most of them: `limit_concurrency` (503 past that many
connections and requests), `timeout_keep_alive`, h11's cap on a request head,
`TrustedHostMiddleware` (a Host allow-list, so that a DNS-rebinding page cannot
reach a server on loopback). uvicorn has no deadline for a request head, so
`HeadTimeoutProtocol` adds one: a connection that has not sent a whole head
within `head_seconds` of opening (or of its last answer) is closed. Bodies have
their own deadline in `trainer.serving.transport.read_body`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Sequence
from typing import Any

import uvicorn
from starlette.middleware.trustedhost import TrustedHostMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_NAMES = ("localhost", "127.0.0.1")
# Largest request head h11 buffers (uvicorn's default, said here so it stays bounded).
MAX_HEAD_BYTES = 16 * 1024


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


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that send no whole request head in time."""

    head_seconds = 10.0

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
    return uvicorn.Config(TrustedHostMiddleware(app, allowed_hosts=allowed), host=network.host,
                          port=network.port, log_level="warning", http=protocol,
                          limit_concurrency=network.max_connections,
                          timeout_keep_alive=network.keep_alive_seconds,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                          timeout_graceful_shutdown=network.shutdown_seconds)


def serve(app: Any, network: Network) -> None:
    """Runs `app` until SIGTERM/SIGINT, within `network`'s limits.

    Args:
      app: the ASGI application.
      network: the address and the limits.
    """
    uvicorn.Server(config(app, network)).run()
