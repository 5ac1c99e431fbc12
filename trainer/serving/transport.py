"""What every generation route shares: reading a body, feeding rows, waiting for them.

Both protocols (Vertex AI's in `routes`, OpenAI's in `openai`) read a JSON body
within a size and time limit, admit their rows through the batcher's budget,
and wait for the text while watching the client and the request's deadline: a
client that leaves, or a request past its deadline, stops its rows at the next
block instead of running to the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.requests import ClientDisconnect, Request

from trainer.errors import UserError
from trainer.serving.batcher import Batcher, OverloadedError, UnavailableError
from trainer.serving.request import Instance, RequestError

LOG = logging.getLogger("trainer.serve")
# Longest error text sent to a client; the log has the details.
MAX_MESSAGE = 300
# How often a waiting request checks that its client is still there.
POLL_SECONDS = 0.25


class ClientGoneError(Exception):
    """The client closed its connection: one log line, no answer, no traceback."""


class MediaTypeError(RequestError):
    """A POST whose body is not declared application/json: HTTP 415."""


class SlowBodyError(RequestError):
    """A body that did not arrive in time: HTTP 408."""


class DeadlineError(UnavailableError):
    """A request that ran past its deadline: HTTP 503."""


@dataclasses.dataclass(frozen=True)
class Timing:
    """How long a request may take.

    Attributes:
      body_seconds: to send its whole body.
      deadline_seconds: from its body to its last character; 0: no deadline.
    """

    body_seconds: float = 30.0
    deadline_seconds: float = 300.0


def public_message(err: BaseException) -> str:
    """What a client is told about `err`: our own messages, never internal exception text.

    Args:
      err: what went wrong.

    Returns:
      One line of at most MAX_MESSAGE chars (and an ellipsis).
    """
    if isinstance(err, (UserError, UnavailableError)):
        text = " ".join(str(err).split())
        return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."
    return "internal error (the server's log has the details)"


def status_of(err: BaseException) -> int:
    """The HTTP status that answers `err`.

    Args:
      err: what went wrong.

    Returns:
      415, 408, 400, 429, 503, or 500 for anything else.
    """
    for kind, status in ((MediaTypeError, 415), (SlowBodyError, 408), (RequestError, 400),
                         (OverloadedError, 429), (UnavailableError, 503)):
        if isinstance(err, kind):
            return status
    return 500


async def read_body(request: Request, limit: int, seconds: float) -> bytes:
    """The JSON body of a POST, within `limit` bytes and `seconds`.

    Args:
      request: the request.
      limit: most bytes.
      seconds: most seconds to receive it all.

    Returns:
      The body.

    Raises:
      MediaTypeError: the Content-Type is not application/json (a browser sends
        text/plain across origins without asking; JSON it must ask for).
      RequestError: the body passes `limit` bytes.
      SlowBodyError: the body took longer than `seconds`.
      ClientGoneError: the client left while sending it.
    """
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise MediaTypeError("the body must be JSON, sent with Content-Type: application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the body has {declared[:20]} bytes, over the limit of {limit}")
    body = bytearray()
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise RequestError(f"the body has over {limit} bytes, the limit")
    except TimeoutError as err:
        raise SlowBodyError(f"the body did not arrive within {seconds:g} s") from err
    except ClientDisconnect as err:
        raise ClientGoneError("the client left while sending its body") from err
    return bytes(body)


def admit(batcher: Batcher, instances: Sequence[Instance],
          emits: Sequence[Callable[[str | None, BaseException | None], None]],
          held: list[Callable[[], None]] | None = None) -> list[Any]:
    """Encodes, admits and submits rows (all checked before any runs).

    Args:
      batcher: runs the model.
      instances: the request's rows.
      emits: where each row's blocks go (`to_queue`).
      held: when given, the rows keep their share of the admission budget after they
        end: their releases are put here, and the caller calls each once (work that
        follows the rows, such as scoring them, stays under the budget too).

    Returns:
      The submitted rows (set `cancelled` to stop one).

    Raises:
      RequestError: a prompt the vocabulary cannot encode.
      OverloadedError: the batcher's budget is spent.
    """
    encoded = [batcher.encode(instance) for instance in instances]
    releases = batcher.reserve(instances)
    if held is not None:
        held += releases
        releases = [lambda: None] * len(releases)
    return [batcher.submit(ids, instance, emit, release)
            for ids, instance, emit, release in zip(encoded, instances, emits, releases)]


def to_queue(blocks: asyncio.Queue, tag: Any = None
             ) -> Callable[[str | None, BaseException | None], None]:
    """An `emit` for `Batcher.submit` that puts (tag, text, error) on `blocks` from any thread.

    Args:
      blocks: the queue, read on this event loop.
      tag: what tells the rows apart on a shared queue (OpenAI's choice index).

    Returns:
      The callable.
    """
    loop = asyncio.get_running_loop()
    return lambda text, err: loop.call_soon_threadsafe(blocks.put_nowait, (tag, text, err))


async def watch(request: Request, rows: Sequence[Any], work: Awaitable[Any],
                deadline_seconds: float) -> Any:
    """Awaits `work` while its client stays and its deadline holds; the rows stop otherwise.

    Args:
      request: whose client is watched.
      rows: the rows `work` waits for; cancelled on the way out, whatever happened.
      work: what produces the answer from the rows.
      deadline_seconds: most seconds; 0: none.

    Returns:
      What `work` returned.

    Raises:
      ClientGoneError: the client closed its connection.
      DeadlineError: past `deadline_seconds` (0: none).
    """
    task = asyncio.ensure_future(work)
    try:
        async with asyncio.timeout(deadline_seconds or None):
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_SECONDS)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise ClientGoneError("the client left before its text was ready")
    except TimeoutError as err:
        raise DeadlineError(f"the request ran past its deadline of {deadline_seconds:g} s"
                            ) from err
    finally:
        task.cancel()
        for row in rows:  # Finished rows ignore it; the others leave at their next block.
            row.cancelled = True
