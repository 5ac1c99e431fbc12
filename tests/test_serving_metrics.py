"""GET /metrics: the server's Prometheus figures follow what it was asked and did."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import LiveServer, module_job, request

from trainer.serving import backends, batcher


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    job_dir, _ = module_job(tmp_path_factory.mktemp("metrics"))
    running = LiveServer(batcher.Batcher(backends.load_backend(job_dir), max_batch=8,
                                         window_ms=20, block=16))
    yield running
    running.close()


def _scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from /metrics."""
    code, body = request(server.url("/metrics"))
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def _requests(scraped, route: str, status: str) -> float:
    return scraped.get(("char_lstm_requests_total",
                        (("route", route), ("status", status))), 0.0)


def test_metrics_count_requests_rows_tokens_and_calls(server):
    before = _scrape(server)
    assert before[("char_lstm_model_info", (("kind", "job dir"), ("name", "job"),
                                            ("tokenizer", "char")))] == 1
    assert before[("char_lstm_rows_admitted", ())] == 0
    code, body = request(server.url("/predict"), {"instances": [
        {"prompt": "the ", "length": 40, "seed": 1}, {"prompt": "a", "length": 25}]})
    assert code == 200 and [len(p["text"]) for p in json.loads(body)["predictions"]] == [40, 25]
    assert request(server.url("/v1/completions"), {"prompt": 7})[0] == 400
    assert request(server.url("/no/such/route"))[0] == 404
    code, body = request(server.url("/v1/completions"), {
        "prompt": "the cat", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert code == 200
    code, body = request(server.url("/stream"), {"prompt": "to", "length": 50})
    assert code == 200 and body.count(b"event: done") == 1
    after = _scrape(server)

    def grew(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    for route, status in (("/predict", "200"), ("/v1/completions", "400"),
                          ("other", "404"), ("/v1/completions", "200"), ("/stream", "200")):
        assert _requests(after, route, status) - _requests(before, route, status) == 1, (
            route, status)
    assert grew("char_lstm_request_seconds_count", (("route", "/predict"),)) == 1
    assert grew("char_lstm_request_seconds_sum", (("route", "/predict"),)) > 0
    # A char model: one token per character; 40 + 25 + 50 characters were sent.
    assert grew("char_lstm_chars_generated_total") == 115
    assert grew("char_lstm_tokens_generated_total") == 115
    assert grew("char_lstm_scored_tokens_total") == 6  # "the cat" after its first char.
    calls = grew("char_lstm_sampling_calls_total")
    assert calls == grew("char_lstm_batch_rows_count") and calls >= 50 / 16
    assert grew("char_lstm_batch_rows_sum") > calls  # The two instances shared calls.
    assert after[("char_lstm_batch_rows_bucket", (("le", "+Inf"),))] == after[
        ("char_lstm_batch_rows_count", ())]
    # The stream's first event came before its end.
    stream = (("route", "/stream"),)
    assert grew("char_lstm_first_byte_seconds_count", stream) == 1
    assert 0 < grew("char_lstm_first_byte_seconds_sum", stream) < grew(
        "char_lstm_request_seconds_sum", stream)
    assert after[("process_resident_memory_bytes", ())] > 50e6  # TensorFlow is loaded.
    assert after[("char_lstm_rows_admitted", ())] == 0
    assert after[("char_lstm_rows_running", ())] == 0
    assert after[("char_lstm_chars_admitted", ())] == 0


def test_an_internal_error_counts_as_500_not_as_a_client_that_left(server, monkeypatch):
    from trainer.serving import tokenize

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(tokenize, "tokenize", broken)
    before = _scrape(server)
    code, body = request(server.url("/tokenize"), {"prompt": "the"})
    assert code == 500 and "a bug" not in body.decode()
    after = _scrape(server)
    assert _requests(after, "/tokenize", "500") - _requests(before, "/tokenize", "500") == 1
    assert _requests(after, "/tokenize", "499") == _requests(before, "/tokenize", "499")
