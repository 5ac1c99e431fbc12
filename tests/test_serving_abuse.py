"""trainer.serve against careless and hostile clients: each case gets a status and a
one-line body, the server stays healthy, memory stays bounded, and the log gets one
line per client that left, never a traceback. One in-process server, with timeouts
of about a second so that the slow-client cases take about that long."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import LiveServer, make_job_dir, request

from trainer.serving import backends, batcher, completions, logprobs
from trainer.serving.server import Loading, default_allowed_hosts, default_host
from trainer.serving.transport import Timing

SECONDS = 1.0  # The test server's head and body timeouts.


class Flaky(backends.Backend):
    """A backend that can be slowed down or made to fail, around a real one."""

    def __init__(self, inner: backends.Backend):
        """Wraps `inner`."""
        self.inner, self.tokenizer, self.info = inner, inner.tokenizer, inner.info
        self.pad_batches = inner.pad_batches
        self.delay, self.fail = 0.0, None

    def begin(self, prompts):
        return self.inner.begin(prompts)

    def advance(self, *args):
        if self.fail is not None:
            raise self.fail
        time.sleep(self.delay)
        return self.inner.advance(*args)

    def score(self, rows):
        if self.fail is not None:
            raise self.fail
        time.sleep(self.delay)
        return self.inner.score(rows)


class Lines(logging.Handler):
    """Keeps the server's log records."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("abuse")
    make_job_dir(str(work / "job"), str(work / "staging"))
    backend = Flaky(backends.load_backend(str(work / "job")))
    running = LiveServer(batcher.Batcher(backend, max_batch=8, window_ms=5, block=16,
                                         max_rows=8, max_chars=2400),
                         network={"head_seconds": SECONDS, "keep_alive_seconds": 1,
                                  "max_connections": 40},
                         timing=Timing(body_seconds=SECONDS, deadline_seconds=1.0))
    running.backend = backend
    yield running
    running.close()


@pytest.fixture
def log():
    lines = Lines()
    names = ("trainer.serve", "uvicorn", "uvicorn.error")
    for name in names:
        logging.getLogger(name).addHandler(lines)
    yield lines.records
    for name in names:
        logging.getLogger(name).removeHandler(lines)


def _raw(port: int, data: bytes, close: bool = False) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    if close:
        sock.close()
    return sock


def _head(path: str, length: int, kind: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed `sock` within `seconds`, and what it sent before."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
        return True, got
    except TimeoutError:
        return False, got
    finally:
        sock.close()


def _one_line_error(status: int, body: bytes) -> dict | str:
    assert b"\n" not in body.strip() and len(body) < 600, body[:200]
    return json.loads(body)["error"]


BIG = "9" * 400
CASES = [
    ("/predict", b'{"instances": ["a"]}', {"Content-Type": "text/plain"}, 415, "JSON"),
    ("/v1/completions", b'{"prompt": "a"}', {"Content-Type": "text/plain"}, 415, "JSON"),
    ("/predict", f'{{"instances": [{{"length": {BIG}}}]}}'.encode(), {}, 400, "length must"),
    ("/predict", f'{{"instances": [{{"seed": {BIG}}}]}}'.encode(), {}, 400, "seed must"),
    ("/stream", f'{{"seed": -{BIG}}}'.encode(), {}, 400, "seed must"),
    ("/v1/completions", f'{{"max_tokens": {BIG}}}'.encode(), {}, 400, "max_tokens"),
    ("/v1/completions", f'{{"seed": {BIG}}}'.encode(), {}, 400, "seed must"),
    ("/predict", b"[" * 9_000 + b"]" * 9_000, {}, 400, "too deeply"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 9_000 + b"]" * 9_000 + b"}", {}, 400,
     "too deeply"),
    ("/predict", json.dumps({"instances": [{"x" * 15_000: 1}]}).encode(), {}, 400,
     "unknown field"),
    ("/v1/completions", b'{"prompt": [1, 2, 3]}', {}, 400, "token ids"),
    ("/v1/completions", b'{"prompt": "a", "n": 9}', {}, 400, "over the limit of 8"),
]


@pytest.mark.parametrize("path,body,headers,status,message", CASES)
def test_bad_requests_get_a_4xx_with_one_line(server, path, body, headers, status, message):
    got, answer = request(server.url(path), body, headers=headers)
    error = _one_line_error(got, answer)
    assert got == status
    assert message in (error["message"] if isinstance(error, dict) else error)
    assert request(server.url("/health"))[0] == 200


def test_foreign_host_is_refused_and_info_names_no_paths(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n")
        answer = _closed_within(sock, 3)[1]
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"content-type: application/json" in head.lower()
    assert "--allowed_hosts" in _one_line_error(400, body)
    info = json.loads(request(server.url("/info"))[1])
    assert "path" not in info and "/" not in str(info.get("checkpoint"))
    assert not any(str(v).startswith(("/", "gs://")) for v in info.values())


def test_loopback_host_names_are_answered_ipv6_included(server):
    for host in (b"localhost", b"127.0.0.1", b"[::1]", f"[::1]:{server.port}".encode()):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: " + host
                         + b"\r\nConnection: close\r\n\r\n")
            answer = _closed_within(sock, 3)[1]
        assert answer.startswith(b"HTTP/1.1 200 "), (host, answer[:200])


def test_the_page_has_a_content_security_policy(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        head = _closed_within(sock, 10)[1].split(b"\r\n\r\n")[0].decode().lower()
    assert "frame-ancestors 'none'" in head and "x-content-type-options: nosniff" in head
    assert "script-src 'sha256-" in head and "unsafe-inline" not in head


def test_idle_slow_and_stalled_connections_are_closed_and_memory_stays_bounded(server):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    idle = _raw(server.port, b"")
    slow = _raw(server.port, b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    stalled = [_raw(server.port, _head("/predict", 19_000) + b" " * 15_000)
               for _ in range(25)]
    dribble = threading.Thread(target=lambda: [slow.send(b"X") or time.sleep(0.2)
                                               for _ in range(4)])
    dribble.start()
    start = time.monotonic()
    assert _closed_within(idle, 3 * SECONDS)[0]
    answers = [_closed_within(s, 3 * SECONDS) for s in stalled]
    dribble.join()
    assert _closed_within(slow, 3 * SECONDS)[0]
    assert time.monotonic() - start < 4 * SECONDS
    assert all(closed and b" 408 " in got.split(b"\r\n")[0] for closed, got in answers)
    # ru_maxrss is in KiB: 25 bodies of 15 KB cost far less than 30 MB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 30_000
    assert request(server.url("/health"))[0] == 200


def test_connections_past_the_limit_get_503(server):
    held = [_raw(server.port, b"") for _ in range(40)]
    try:
        code, body = request(server.url("/health"))
        assert code == 503
        assert "too many connections" in _one_line_error(503, body)
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert request(server.url("/health"))[0] == 200


def test_a_full_queue_answers_429_with_retry_after_and_health_503(server):
    releases = server.batcher.reserve([batcher.Instance(length=300)] * 8)
    try:
        code, body = request(server.url("/predict"), {"instances": ["a"]})
        assert code == 429 and "busy" in _one_line_error(code, body)
        code, body = request(server.url("/v1/completions"), {"prompt": "a"})
        assert code == 429 and _one_line_error(code, body)["type"] == "rate_limit_error"
        assert request(server.url("/health"))[0] == 503
    finally:
        for release in releases:
            release()
    assert request(server.url("/health"))[0] == 200


def test_logprobs_keep_their_rows_admitted_until_scored_and_a_failed_score_is_one_line(
        server):
    asked = {"prompt": "the cat", "max_tokens": 0, "echo": True, "logprobs": 1, "n": 8}
    # The same rows scored once first, outside any request, so that tracing the scoring
    # graph does not count against the server's deadline of a second.
    tokenizer = server.backend.tokenizer
    server.backend.inner.score(logprobs.rows(tokenizer, [tokenizer.encode("the cat")] * 8,
                                             [[]] * 8))
    answers = []
    server.backend.delay = 0.4
    try:
        scoring = threading.Thread(target=lambda: answers.append(
            request(server.url("/v1/completions"), asked)))
        scoring.start()
        deadline = time.monotonic() + 5
        while not server.batcher.saturated:  # 8 rows of max_tokens 0: ended, not released.
            assert time.monotonic() < deadline and scoring.is_alive()
            time.sleep(0.01)
        code, body = request(server.url("/v1/completions"), {"prompt": "a"})
        assert code == 429 and _one_line_error(code, body)["type"] == "rate_limit_error"
        scoring.join(10)
    finally:
        server.backend.delay = 0.0
    code, body = answers[0]
    assert code == 200 and len(json.loads(body)["choices"]) == 8
    assert not server.batcher.saturated and server.batcher._admitted == [0, 0]
    server.backend.fail = RuntimeError("scoring broke")
    try:
        code, body = request(server.url("/v1/completions"), asked)
    finally:
        server.backend.fail = None
    assert code >= 500 and _one_line_error(code, body)["type"] == "server_error"
    assert server.batcher._admitted == [0, 0] and request(server.url("/health"))[0] == 200


def _left(server) -> dict[str, float]:
    """/metrics' count of clients that left, by route."""
    body = request(server.url("/metrics"))[1].decode()
    counts = {"/predict": 0.0, "/v1/completions": 0.0}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if (sample.name == "char_lstm_requests_total"
                    and sample.labels["status"] == "499" and sample.labels["route"] in counts):
                counts[sample.labels["route"]] = sample.value
    return counts


def test_rows_of_a_client_that_leaves_stop_and_it_is_one_log_line(server, log):
    before = _left(server)
    server.backend.delay = 0.05
    try:
        body = json.dumps({"instances": [{"prompt": "a", "length": 300}] * 4}).encode()
        calls = server.batcher.calls
        sock = _raw(server.port, _head("/predict", len(body)) + body)
        time.sleep(0.3)
        sock.close()
        deadline = time.monotonic() + 5
        while server.batcher.saturated or server.batcher._admitted[0]:
            assert time.monotonic() < deadline, "the rows kept running"
            time.sleep(0.05)
        assert server.batcher.calls - calls < 15  # 300 chars take 19 calls.
        for _ in range(20):  # Clients that hang up mid-body.
            _raw(server.port, _head("/v1/completions", 500) + b'{"prompt": "', close=True)
        deadline = time.monotonic() + 10  # A busy machine takes a while to notice them all.
        while sum("left" in r.getMessage() for r in log) < 21 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # Room for any line too many.
    finally:
        server.backend.delay = 0.0
    messages = [r.getMessage() for r in log]
    assert sum("left" in m for m in messages) == 21, messages
    # /metrics counts them as clients that left (499), not as answered 400s.
    after = _left(server)
    assert (after["/predict"] - before["/predict"],
            after["/v1/completions"] - before["/v1/completions"]) == (1, 20)
    assert not any(r.exc_info or "Traceback" in r.getMessage() for r in log)
    assert request(server.url("/health"))[0] == 200


def test_a_request_past_its_deadline_gets_503(server):
    server.backend.delay = 0.2
    try:
        start = time.monotonic()
        code, body = request(server.url("/predict"), {"instances": [{"length": 300}]})
        assert code == 503 and "deadline" in _one_line_error(code, body)
        assert time.monotonic() - start < 3.5
        code, body = request(server.url("/stream"), {"length": 300})
        assert code == 200 and body.decode().split("\n\n")[-2].startswith("event: error")
        assert "deadline" in body.decode().split("\n\n")[-2]
    finally:
        server.backend.delay = 0.0


def test_a_failure_inside_is_500_without_its_text_also_mid_stream(server):
    server.backend.fail = ValueError("secret /etc/passwd")
    try:
        code, body = request(server.url("/predict"), {"instances": ["a"]})
        assert code == 500 and "secret" not in _one_line_error(code, body)
        code, body = request(server.url("/v1/completions"), {"prompt": "a", "stream": True})
        frames = [f for f in body.decode().split("\n\n") if f]
        assert code == 200 and frames[-1] == "data: [DONE]"
        error = json.loads(frames[-2][len("data: "):])["error"]
        assert "secret" not in error["message"] and error["type"] == "server_error"
    finally:
        server.backend.fail = None
    assert request(server.url("/health"))[0] == 200


def test_defaults_bind_loopback_outside_vertex_and_check_hosts_there():
    assert default_host({}) == "127.0.0.1"
    assert default_host({"AIP_HTTP_PORT": "8080"}) == "0.0.0.0"
    assert default_allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "[::1]"]
    assert default_allowed_hosts("::1") == default_allowed_hosts("localhost")
    assert default_allowed_hosts("0.0.0.0") == ["*"]
    assert completions.prefixes("/openai/v1/") == ("/v1", "/openai/v1")
    assert completions.prefixes("") == ("/v1",)


def test_while_the_model_loads_every_request_gets_503_with_retry_after():
    loading = Loading()

    def call(path: str) -> list[dict]:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": "GET", "path": path, "headers": []}
        asyncio.run(loading(scope, receive, send))
        return sent

    for path in ("/health", "/predict", "/v1/completions"):
        start, body = call(path)
        assert start["status"] == 503 and (b"retry-after", b"5") in start["headers"]
        assert "loading" in _one_line_error(503, body["body"])

    async def loaded(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    loading.app = loaded  # What serve() hands over once the model is ready.
    assert call("/health")[0]["status"] == 200
