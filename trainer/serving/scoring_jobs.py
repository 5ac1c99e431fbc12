"""Scoring requests waiting for the batcher's worker, the model's one user (`Batcher.score`).

A completion that asks for `logprobs` hands its rows' ids here once they are drawn; the
worker runs every waiting job between two sampling blocks and answers each through its
future. The scores are counted before the future is answered, so /metrics never lags
behind an answer a client already has.
"""

from __future__ import annotations

import concurrent.futures
import queue
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


class ScoringJobs:
    """A queue of (rows, future) for the worker thread.

    Attributes:
      scored: tokens scored so far (positions after each row's first id).
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[list[np.ndarray], concurrent.futures.Future]] = (
            queue.Queue())
        self.scored = 0

    def put(self, rows: Sequence[np.ndarray]) -> concurrent.futures.Future:
        """Queues rows to score; returns the future of their `Scores`."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((list(rows), future))
        return future

    def run(self, backend: Any) -> None:
        """On the worker: scores every waiting job with `backend.score` (skips cancelled ones;
        an error goes to its job's future)."""
        for rows, future in self._take():
            try:
                scores = backend.score(rows)
            except Exception as err:  # noqa: BLE001 - the request hears of it.
                future.set_exception(err)
                continue
            self.scored += sum(max(0, len(r) - 1) for r in rows)
            future.set_result(scores)

    def fail(self, err: BaseException) -> None:
        """Ends every waiting job with `err` (the worker is stopping)."""
        for _, future in self._take():
            future.set_exception(err)

    def _take(self) -> Iterator[tuple[list[np.ndarray], concurrent.futures.Future]]:
        while True:
            try:
                rows, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                yield rows, future
