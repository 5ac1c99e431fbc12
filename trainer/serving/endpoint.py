"""Where the server listens and which routes it answers, after Vertex AI's environment.

A Vertex AI endpoint runs the serving container with AIP_HTTP_PORT, AIP_HEALTH_ROUTE,
AIP_PREDICT_ROUTE and, for a model uploaded with an artifact URI, AIP_STORAGE_URI (a
gs:// copy of it); the flags win over them, and defaults fill the rest.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from trainer.errors import UserError

# The server's own routes, beside the health and predict routes: at the root, and under
# each OpenAI prefix (trainer.serving.routes, completions and tokenize register them).
TOKENIZER_ROUTES = ("/tokenize", "/detokenize")
ROOT_ROUTES = ("/", "/info", "/metrics", "/stream", "/openapi.json", *TOKENIZER_ROUTES)
PREFIXED_ROUTES = ("/completions", "/models", "/chat/completions", *TOKENIZER_ROUTES)


def own_routes(prefixes: Sequence[str]) -> set[str]:
    """Every path the server answers besides the health and predict routes.

    Args:
      prefixes: where OpenAI's routes go, e.g. ("/v1", "/openai/v1").

    Returns:
      The paths.
    """
    return {*ROOT_ROUTES, *(p + r for p in prefixes for r in PREFIXED_ROUTES)}


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where the server listens and what it serves, after Vertex AI's environment."""

    model_dir: str
    port: int
    health_route: str
    predict_route: str

    def check_routes(self, prefixes: Sequence[str]) -> Endpoint:
        """Refuses health and predict routes that would hide each other or the server's own.

        Args:
          prefixes: where OpenAI's routes go.

        Returns:
          self.

        Raises:
          UserError: naming the route and where it came from.
        """
        if self.health_route == self.predict_route:
            raise UserError(f"AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE are both "
                            f"{self.health_route}: they must differ")
        taken = own_routes(prefixes)
        for name, path in (("AIP_HEALTH_ROUTE", self.health_route),
                           ("AIP_PREDICT_ROUTE", self.predict_route)):
            if path in taken:
                raise UserError(f"{name} is {path}, one of the server's own routes; choose "
                                "another path")
        return self


def vertex_endpoint(model_dir: str | None, port: int | None,
                    environ: dict[str, str] | None = None) -> Endpoint:
    """Fills what the flags left open from Vertex AI's AIP_* variables, then defaults.

    Vertex AI sets AIP_HTTP_PORT, AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE and, for a
    model uploaded with an artifact URI, AIP_STORAGE_URI (a gs:// copy of it).

    Raises:
      UserError: without a model folder from either, or with a bad port.
    """
    env = os.environ if environ is None else environ
    model_dir = model_dir or env.get("AIP_STORAGE_URI")
    if not model_dir:
        raise UserError("no model: pass --model_dir (a job directory or an exported "
                        "SavedModel) or set AIP_STORAGE_URI")
    raw_port = port if port is not None else env.get("AIP_HTTP_PORT", "8080")
    try:
        port = int(raw_port)
    except ValueError as err:
        raise UserError(f"AIP_HTTP_PORT must be a port number, got {raw_port!r}") from err
    if not 0 <= port < 65536:
        raise UserError(f"the port must be in [0, 65535], got {port}")

    def route(name: str, default: str) -> str:
        value = env.get(name) or default
        return value if value.startswith("/") else "/" + value

    return Endpoint(model_dir, port, route("AIP_HEALTH_ROUTE", "/health"),
                    route("AIP_PREDICT_ROUTE", "/predict"))
