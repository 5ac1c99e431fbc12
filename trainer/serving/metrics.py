"""Prometheus metrics at GET /metrics: what the server is doing, for a scraper to watch.

Every server has its own registry (`prometheus_client`); names start `char_lstm_`:

  char_lstm_requests_total{route, status}  answered requests, by route template
                                           (`other` for paths no route has) and HTTP
                                           status (`499`: the client left first)
  char_lstm_request_seconds{route}         histogram: from the request's arrival to
                                           the last byte of its answer (a stream's end)
  char_lstm_first_byte_seconds{route}      histogram: to the first byte of the answer's
                                           body (a stream's first event: its first text)
  char_lstm_rows_admitted                  rows admitted and not yet ended (waiting,
                                           running, or being scored for logprobs)
  char_lstm_chars_admitted                 the characters those rows asked for; with
                                           the rows, what --max_queue_rows and
                                           --max_queue_chars bound
  char_lstm_rows_running                   rows in the running batch
  char_lstm_sampling_calls_total           compiled sampling calls (one block each)
  char_lstm_batch_rows                     histogram: rows per sampling call
  char_lstm_tokens_generated_total         tokens kept for rows (the model's tokens)
  char_lstm_chars_generated_total          characters of text sent to rows
  char_lstm_scored_tokens_total            tokens scored for `logprobs`
  char_lstm_model_info{name, tokenizer, kind}   1, labelled with what is served
  process_*                                the server process's memory, CPU seconds,
                                           open files (prometheus_client's own)

The batcher's figures are read when /metrics is scraped (`BatcherCollector`), so its
worker thread does no metrics work; the request figures come from an ASGI middleware
(`RequestMetrics`) that sees every request the application answers (those the server
refuses before it, such as a foreign Host or the 503s while loading, are not counted).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from trainer.serving.batcher import Batcher

# Where the request-duration histogram's buckets end, in seconds.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The status recorded for a client that left before its answer.
CLIENT_GONE = "499"


class BatcherCollector(Collector):
    """The batcher's admission, batch and output figures, read at each scrape."""

    def __init__(self, batcher: Batcher, info: dict[str, Any]):
        """Reads `batcher`; `info` labels char_lstm_model_info (name, tokenizer, kind)."""
        self.batcher, self.info = batcher, info

    def collect(self) -> Iterator[Metric]:
        stats = self.batcher.stats()
        yield GaugeMetricFamily("char_lstm_rows_admitted", "Rows admitted and not yet ended.",
                                value=stats.rows_admitted)
        yield GaugeMetricFamily("char_lstm_chars_admitted",
                                "Characters the admitted rows asked for.",
                                value=stats.chars_admitted)
        yield GaugeMetricFamily("char_lstm_rows_running", "Rows in the running batch.",
                                value=stats.rows_running)
        yield CounterMetricFamily("char_lstm_sampling_calls", "Compiled sampling calls.",
                                  value=stats.calls)
        yield CounterMetricFamily("char_lstm_tokens_generated", "Tokens kept for rows.",
                                  value=stats.tokens)
        yield CounterMetricFamily("char_lstm_chars_generated",
                                  "Characters of text sent to rows.", value=stats.chars)
        yield CounterMetricFamily("char_lstm_scored_tokens", "Tokens scored for logprobs.",
                                  value=stats.scored)
        bounds = sorted({1 << i for i in range(self.batcher.max_batch.bit_length())}
                        | {self.batcher.max_batch})
        buckets, sizes = [], stats.rows_per_call
        for bound in bounds:
            cumulative = sum(n for rows, n in sizes.items() if rows <= bound)
            buckets.append((str(bound), cumulative))
        buckets.append(("+Inf", sum(sizes.values())))
        yield HistogramMetricFamily("char_lstm_batch_rows", "Rows per sampling call.",
                                    buckets=buckets,
                                    sum_value=sum(rows * n for rows, n in sizes.items()))
        model = GaugeMetricFamily("char_lstm_model_info", "The model served.",
                                  labels=["name", "tokenizer", "kind"])
        model.add_metric([str(self.info.get("name", "")), str(self.info.get("tokenizer", "")),
                          str(self.info.get("kind", ""))], 1)
        yield model


class RequestMetrics:
    """ASGI middleware counting answered requests and timing them to their last byte.

    Args:
      app: the application.
      registry: where the metrics are registered.
    """

    def __init__(self, app: Any, registry: CollectorRegistry):
        self.app = app
        self.requests = Counter("char_lstm_requests", "Answered requests.",
                                ["route", "status"], registry=registry)
        self.seconds = Histogram("char_lstm_request_seconds",
                                 "Seconds from a request's arrival to its answer's last byte.",
                                 ["route"], buckets=SECONDS_BUCKETS, registry=registry)
        self.first_byte = Histogram("char_lstm_first_byte_seconds",
                                    "Seconds from a request's arrival to its answer's first "
                                    "body byte.", ["route"], buckets=SECONDS_BUCKETS,
                                    registry=registry)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, first = time.perf_counter(), [CLIENT_GONE], []

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            elif message["type"] == "http.response.body" and message.get("body") and not first:
                first.append(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            # Answered 500 by the error handler outside this middleware, unless an
            # answer had started already (then the client sees a cut response).
            if status[0] == CLIENT_GONE:
                status[0] = "500"
            raise
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "other"
            if scope.get("state", {}).get("client_gone"):
                status[0] = CLIENT_GONE
            self.requests.labels(label, status[0]).inc()
            self.seconds.labels(label).observe(time.perf_counter() - start)
            if first:
                self.first_byte.labels(label).observe(first[0])
