"""Batching concurrent requests into shared sampling calls on one model.

Batching is continuous: one worker thread owns the model (a
`trainer.serving.backends.Backend`) and holds every row being generated. A
request that arrives while it is idle waits a short window (`window_ms`) for
others to join it; one that arrives while rows are running joins them at the
next block boundary. Each call draws `block` tokens for all rows at once, and
every row keeps its own seed, step count and settings
(`trainer.sampling.next_char`), so its text is the same as if it had run alone.
A row's ids are decoded by the model's tokenizer (`trainer.sampling.tokens.OutputText`),
and the row leaves the batch as soon as its text holds the characters it asked for
(with a word or bpe model, at the end of the token that reaches them).

Under XLA every batch size compiles separately, so the rows are padded up to
the next power of two (at most log2(max_batch) + 1 programs, compiled when
first needed or in `warm_up`).

The worker also scores finished rows for OpenAI's `logprobs` (`score`), between
blocks, so the model has one user at a time.

Admission is bounded: `reserve` refuses (`OverloadedError`, HTTP 429) a request whose
rows or characters would take the rows and characters waiting or running past
`max_rows` / `max_chars`, so a backlog never grows without bound and a refused
client learns at once instead of waiting behind it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from trainer.errors import UserError
from trainer.sampling.next_char import Rule, Settings, row_arrays
from trainer.sampling.sampler import STREAM_BLOCK, encode_prompt
from trainer.sampling.tokens import OutputText
from trainer.serving.backends import Backend
from trainer.serving.request import Instance, RequestError
from trainer.serving.scoring_jobs import ScoringJobs


@dataclasses.dataclass
class _Row:
    """One prompt being continued, and where its text goes."""

    ids: np.ndarray
    instance: Instance
    emit: Callable[[str | None, BaseException | None], None]
    # The row's text so far, counted in characters.
    output: OutputText
    # Gives the row's share of the admission budget back, once.
    release: Callable[[], None] = lambda: None
    # Tokens drawn so far (the step index of the row's next draw).
    done: int = 0
    # Set by the client's side (a client that went away); the row then leaves.
    cancelled: bool = False

    def send(self, text: str | None, error: BaseException | None = None) -> None:
        if text is None:
            self.end()
        try:
            self.emit(text, error)
        except RuntimeError:  # The receiving event loop is closed: nobody is listening.
            self.cancelled = True

    def end(self) -> None:
        release, self.release = self.release, lambda: None
        release()


@dataclasses.dataclass(frozen=True)
class Stats:
    """What the batcher has done and holds, at one moment (`Batcher.stats`)."""

    # Rows admitted and not yet ended, and the characters they asked for.
    rows_admitted: int
    chars_admitted: int
    # Rows in the running batch.
    rows_running: int
    # Sampling calls, and how many calls ran with each number of rows.
    calls: int
    rows_per_call: dict[int, int]
    # Tokens kept for rows, characters of text sent to them, tokens scored for logprobs.
    tokens: int
    chars: int
    scored: int


class UnavailableError(RuntimeError):
    """The server cannot take this request now (HTTP 503, or 429 for `OverloadedError`)."""


class OverloadedError(UnavailableError):
    """The admission budget is spent: HTTP 429 with Retry-After."""


def _concat(parts: Sequence[Any]) -> Any:
    return tf.concat(list(parts), axis=0)


def _take(tensor: Any, index: np.ndarray) -> Any:
    return tf.gather(tensor, tf.constant(index, tf.int32))


class Batcher:
    """Runs every request's rows on one worker thread, in shared sampling calls.

    Args:
      backend: the model.
      max_batch: most rows in one call; 1 turns batching off (requests run one
        after another).
      window_ms: how long an idle worker waits for more requests before it starts.
      block: tokens per call; new requests join, and streams receive text, per block.
      max_rows: most rows admitted (waiting or running) at once; 0: no bound.
      max_chars: most characters admitted rows may still owe at once; 0: no bound.
    """

    def __init__(self, backend: Backend, max_batch: int = 32, window_ms: float = 5.0,
                 block: int = STREAM_BLOCK, max_rows: int = 0, max_chars: int = 0):
        self.backend, self.max_batch, self.window, self.block = (
            backend, max(1, max_batch), window_ms / 1000.0, block)
        self.max_rows, self.max_chars = max_rows, max_chars
        self._admitted = [0, 0]  # Rows, chars; under _lock (event loop and worker).
        self._lock = threading.Lock()
        # Rows to start; None only wakes the worker for `_scoring`.
        self._pending: queue.Queue[_Row | None] = queue.Queue()
        self._scoring = ScoringJobs()
        self._stop = threading.Event()
        self.calls = 0  # Sampling calls made.
        # Calls by their number of rows (bounded: at most max_batch keys).
        self.rows_per_call: collections.Counter[int] = collections.Counter()
        # Tokens kept for rows, characters sent to them; rows running.
        self._tokens = self._chars = self._running = 0
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (it ends only on `close` or a bug)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def stats(self) -> Stats:
        """A snapshot of the counters, for /metrics (read from any thread)."""
        with self._lock:
            rows, chars = self._admitted
            sizes = dict(self.rows_per_call)
        return Stats(rows, chars, self._running, self.calls, sizes, self._tokens, self._chars,
                     self._scoring.scored)

    @property
    def saturated(self) -> bool:
        """Whether the admission budget is spent (new requests get 429)."""
        rows, chars = self._admitted
        return bool(self.max_rows and rows >= self.max_rows
                    or self.max_chars and chars >= self.max_chars)

    def reserve(self, instances: Sequence[Instance]) -> list[Callable[[], None]]:
        """Admits a request's rows, all or none, before they are submitted.

        A request alone is always admitted, however large: the limits on one
        request (`Limits`) bound it.

        Args:
          instances: the request's rows.

        Returns:
          One release per row, for `submit`.

        Raises:
          OverloadedError: when the rows would pass `max_rows` or `max_chars`.
        """
        rows, chars = len(instances), sum(i.length for i in instances)
        with self._lock:
            held_rows, held_chars = self._admitted
            if held_rows and (self.max_rows and held_rows + rows > self.max_rows
                              or self.max_chars and held_chars + chars > self.max_chars):
                raise OverloadedError(f"the server is busy ({held_rows} rows, {held_chars} chars "
                                 "queued or running); retry later")
            self._admitted = [held_rows + rows, held_chars + chars]
        return [functools.partial(self._release, i.length) for i in instances]

    def _release(self, chars: int) -> None:
        with self._lock:
            self._admitted = [self._admitted[0] - 1, self._admitted[1] - chars]

    def encode(self, instance: Instance) -> np.ndarray:
        """The ids of a request's prompt, for `submit`.

        Args:
          instance: the checked request.

        Returns:
          The prompt's ids (`EncodedPrompt.ids`).

        Raises:
          RequestError: for unknown chars with oov="error".
        """
        try:
            return encode_prompt(self.backend.tokenizer, instance.prompt, instance.oov,
                                 hint='send "oov": "skip" to drop them').ids
        except UserError as err:  # The server answers RequestErrors with HTTP 400.
            raise RequestError(str(err)) from err

    def submit(self, ids: np.ndarray, instance: Instance,
               emit: Callable[[str | None, BaseException | None], None],
               release: Callable[[], None] = lambda: None) -> _Row:
        """Queues one row; `emit(text, None)` per block, then `emit(None, None)` (or an error).

        Args:
          ids: the prompt's ids, from `encode`.
          instance: the request's length, seed and settings.
          emit: called on the worker thread with each block's text, or an error.
          release: from `reserve`, called once when the row ends or leaves.

        Returns:
          The row; setting its `cancelled` drops it at the next block.
        """
        row = _Row(ids, instance, emit, OutputText(self.backend.tokenizer, instance.length),
                   release)
        if self._stop.is_set():
            row.send(None, UnavailableError("the server is shutting down"))
        elif instance.length == 0:
            row.send(None)
        else:
            self._pending.put(row)
        return row

    def score(self, rows: Sequence[np.ndarray]) -> concurrent.futures.Future:
        """Scores id rows (`Backend.score`) on the worker thread, before its next block.

        The model has one user at a time, so scoring shares the machine with sampling
        as the rows do; callers hold their rows' admission until the scores arrive.

        Args:
          rows: id arrays.

        Returns:
          A future of one `Scores` per row (or the error).
        """
        return self._queue_scoring(lambda: self._scoring.put(rows))

    def score_from(self, row: np.ndarray, states: np.ndarray | None
                   ) -> concurrent.futures.Future:
        """`score` of one row that continues a text (`Backend.score_from`): a future of
        (Scores, states), or of None where the model cannot."""
        return self._queue_scoring(lambda: self._scoring.put_from(row, states))

    def _queue_scoring(self, put: Callable[[], concurrent.futures.Future]
                       ) -> concurrent.futures.Future:
        stopping = UnavailableError("the server is shutting down")
        if self._stop.is_set():
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_exception(stopping)
            return future
        future = put()
        self._pending.put(None)
        if not self._thread.is_alive():  # Closed meanwhile: nobody would answer.
            self._scoring.fail(stopping)
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stops the worker; rows still running end with an error.

        Args:
          timeout: seconds to wait for the worker's current call to end.
        """
        self._stop.set()
        self._thread.join(timeout)

    def warm_up(self, settings: Sequence[Settings] = (Settings(),)) -> None:
        """Compiles the calls for every padded batch size (and each rule) before serving.

        Args:
          settings: one per rule to compile (`Rule.for_rows` of each).
        """
        sizes = sorted({self._padded(n) for n in range(1, self.max_batch + 1)})
        prompt = encode_prompt(self.backend.tokenizer, "", "skip").ids
        for rule_settings in settings:
            for size in sizes:
                logits, states = self.backend.begin([prompt] * size)
                self.backend.advance(logits, states, self.block, np.zeros(size, np.int32),
                                     np.arange(size, dtype=np.int64),
                                     row_arrays([rule_settings] * size),
                                     Rule.for_rows([rule_settings]))

    def _padded(self, n: int) -> int:
        if not self.backend.pad_batches:
            return n
        return min(1 << (n - 1).bit_length(), max(self.max_batch, n))

    def _run(self) -> None:
        rows: list[_Row] = []
        logits = states = None
        while not self._stop.is_set():
            self._scoring.run(self.backend)
            if not rows:
                try:
                    first = self._pending.get(timeout=0.1)
                except queue.Empty:
                    continue
                if first is None:
                    continue  # Scores to compute.
                # The batching window: let concurrent requests arrive and share the call.
                time.sleep(self.window)
                new = [first]
            else:
                new = []
            while len(rows) + len(new) < self.max_batch:
                try:
                    row = self._pending.get_nowait()
                except queue.Empty:
                    break
                if row is not None:
                    new.append(row)
            for row in new:  # Clients that left while their rows waited.
                if row.cancelled:
                    row.end()
            new = [row for row in new if not row.cancelled]
            if not rows and not new:
                continue
            try:
                if new:
                    new_logits, new_states = self.backend.begin([r.ids for r in new])
                    if rows:
                        logits = _concat([logits, new_logits])
                        states = tuple(_concat(p) for p in zip(states, new_states))
                    else:
                        logits, states = new_logits, tuple(new_states)
                    rows += new
                self._running = len(rows)
                rows, logits, states = self._step(rows, logits, states)
            except Exception as err:  # noqa: BLE001 - a failed call ends its rows, not the server.
                for row in rows + new:
                    row.send(None, err)
                rows, logits, states = [], None, None
                self._running = 0
        stopping = UnavailableError("the server is shutting down")
        for row in rows:
            row.send(None, stopping)
        while not self._pending.empty():
            row = self._pending.get_nowait()
            if row is not None:
                row.send(None, stopping)
        self._scoring.fail(stopping)

    def _step(self, rows: list[_Row], logits: Any, states: tuple) -> tuple[list[_Row], Any, tuple]:
        """One call of `block` tokens for every row; returns the rows still running."""
        n = len(rows)
        size = self._padded(n)
        settings = [r.instance.settings for r in rows]
        step0 = np.array([r.done for r in rows], np.int32)
        seeds = np.array([r.instance.seed for r in rows], np.int64)
        run_logits, run_states = logits, states
        if size > n:  # Padding rows: copies of row 0, whose output is dropped.
            pad = np.zeros(size - n, np.int32)
            index = np.concatenate([np.arange(n, dtype=np.int32), pad])
            run_logits, run_states = _take(logits, index), tuple(_take(s, index) for s in states)
            settings += [settings[0]] * (size - n)
            step0, seeds = np.concatenate([step0, step0[pad]]), np.concatenate([seeds, seeds[pad]])
        ids, new_logits, new_states = self.backend.advance(
            run_logits, run_states, self.block, step0, seeds, row_arrays(settings),
            Rule.for_rows(settings))
        self.calls += 1
        with self._lock:  # Copied by `stats` on another thread.
            self.rows_per_call[n] += 1
        keep = []
        for i, row in enumerate(rows):
            row.done += self.block
            tokens = row.output.tokens
            text = row.output.feed(ids[i])
            self._tokens += row.output.tokens - tokens
            if text:
                self._chars += len(text)
                row.send(text)
            if row.output.done or row.cancelled:
                self._running -= 1  # Before the client hears that its row ended.
            if row.output.done:
                row.send(None)
            elif row.cancelled:
                row.end()
            else:
                keep.append(i)
        if len(keep) == size:
            return rows, new_logits, new_states
        index = np.array(keep, np.int32)
        return ([rows[i] for i in keep], _take(new_logits, index),
                tuple(_take(s, index) for s in new_states))
