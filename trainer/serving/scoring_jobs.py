"""Scoring requests waiting for the batcher's worker, the model's one user (`Batcher.score`).

A completion that asks for `logprobs` hands its rows' ids here once they are drawn (a
stream, each chunk's ids with the states the chunk before ended in: `put_from`); the
worker runs every waiting job between two sampling blocks and answers each through its
future. The scores are counted before the future is answered, so /metrics never lags
behind an answer a client already has.
"""

from __future__ import annotations

import concurrent.futures
import queue
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

# A job: (backend -> its answer, the ids it scores (positions after each row's first id)).
Job = tuple[Callable[[Any], Any], int]


class ScoringJobs:
    """A queue of (job, future) for the worker thread.

    Attributes:
      scored: tokens scored so far (positions after each row's first id).
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Job, concurrent.futures.Future]] = queue.Queue()
        self.scored = 0

    def put(self, rows: Sequence[np.ndarray]) -> concurrent.futures.Future:
        """Queues rows to score; returns the future of their `Scores` (`Backend.score`)."""
        rows = list(rows)
        return self._put(lambda backend: backend.score(rows),
                         sum(max(0, len(r) - 1) for r in rows))

    def put_from(self, row: np.ndarray, states: np.ndarray | None
                 ) -> concurrent.futures.Future:
        """Queues one row that continues a text from `states`; returns the future of
        `Backend.score_from`'s answer ((Scores, states), or None where it cannot)."""
        return self._put(lambda backend: backend.score_from(row, states), max(0, len(row) - 1))

    def _put(self, work: Callable[[Any], Any], scored: int) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put(((work, scored), future))
        return future

    def run(self, backend: Any) -> None:
        """On the worker: runs every waiting job on `backend` (skips cancelled ones; an
        error goes to its job's future)."""
        for (work, scored), future in self._take():
            try:
                answer = work(backend)
            except Exception as err:  # noqa: BLE001 - the request hears of it.
                future.set_exception(err)
                continue
            self.scored += scored if answer is not None else 0
            future.set_result(answer)

    def fail(self, err: BaseException) -> None:
        """Ends every waiting job with `err` (the worker is stopping)."""
        for _, future in self._take():
            future.set_exception(err)

    def _take(self) -> Iterator[tuple[Job, concurrent.futures.Future]]:
        while True:
            try:
                job, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                yield job, future
