"""Background uploads: copies staged files to their destination in submission order.

The training job writes checkpoints locally and hands them to an `Uploader`, so
training never waits on the network. It goes through `trainer.storage`, the one
module that touches storage.
"""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Callable

from absl import logging

from trainer import storage

_Item = collections.namedtuple("_Item", "local remote data on_done")


class Uploader:
    """Copies local files to a destination in a background thread, in submission order.

    Each item is retried forever with exponential backoff, so training goes on
    while a bucket is unreachable and uploads catch up when it returns. An item
    is never started before the previous one finished, so a pointer submitted
    after the files it names lands after them.
    """

    def __init__(self, max_backoff: float = 30.0, name: str = "uploader") -> None:
        self._max_backoff = max_backoff
        self._name = name
        self._items: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, local_path: str, remote_path: str, on_done: Callable[[], None] | None = None
    ) -> None:
        """Queues a copy; the local file is read when the item is processed."""
        self._put(_Item(local_path, remote_path, None, on_done))

    def submit_bytes(self, remote_path: str, data: bytes,
                     on_done: Callable[[], None] | None = None, local: str = "") -> None:
        """Queues writing `data` to `remote_path` (same queue as submit): what is
        written is `data` as it is now, whatever happens to it or to any file later.
        `local` names a local copy of it, for the list of what was left uncopied."""
        self._put(_Item(local or f"<{len(data)} bytes>", remote_path, bytes(data), on_done))

    def _put(self, item: _Item) -> None:
        with self._cond:
            if self._stop.is_set():
                raise RuntimeError(f"{self._name} is closed")
            self._items.append(item)
            self._cond.notify_all()

    def pending(self) -> int:
        """Returns the number of items not yet copied (including the one in flight)."""
        with self._cond:
            return len(self._items)

    def flush(self, timeout: float | None = None) -> list[tuple[str, str]]:
        """Waits until everything is copied or `timeout` seconds passed.

        Returns:
            The (local, remote) items not yet copied; [] means all done.
        """
        with self._cond:
            self._cond.wait_for(lambda: not self._items or self._stop.is_set(), timeout)
            return [(i.local, i.remote) for i in self._items]

    def close(self, timeout: float | None = None) -> list[tuple[str, str]]:
        """Flushes, then stops the thread. Returns the items left uncopied."""
        left = self.flush(timeout)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        # An item stuck in a slow network call must not hold up shutdown.
        self._thread.join(timeout=None if not left else 1.0)
        return left

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._stop.is_set())
                if self._stop.is_set():
                    return
                item = self._items[0]
            if not self._process(item):
                return
            with self._cond:
                self._items.popleft()
                self._cond.notify_all()
            if item.on_done is not None:
                try:
                    item.on_done()
                except Exception:  # noqa: BLE001 - a callback bug must not stop uploads.
                    logging.exception("%s: on_done for %s failed", self._name, item.remote)

    def _process(self, item: _Item) -> bool:
        """Copies one item, retrying until it succeeds (True) or close() (False)."""
        delay, attempt = 0.5, 0
        # A short library-level retry: our own loop keeps trying and logs each failure.
        retry_timeout = min(10.0, self._max_backoff)
        while not self._stop.is_set():
            attempt += 1
            try:
                if item.data is not None:
                    storage.write_bytes(item.remote, item.data, retry_timeout)
                else:
                    storage.copy_file(item.local, item.remote, retry_timeout)
                return True
            except Exception as e:  # noqa: BLE001 - any failure is retried.
                wait = min(self._max_backoff, delay * random.uniform(0.8, 1.2))
                logging.warning(
                    "%s: copying %s to %s failed (attempt %d), retrying in %.1fs: %s: %s",
                    self._name,
                    item.local,
                    item.remote,
                    attempt,
                    wait,
                    type(e).__name__,
                    e,
                )
                if self._stop.wait(wait):
                    break
                delay = min(self._max_backoff, delay * 2)
        return False
