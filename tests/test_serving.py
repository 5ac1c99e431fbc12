"""Tests for trainer.serve: the HTTP contract, batching, streaming, 400s, SIGTERM, SavedModels."""

from __future__ import annotations

import json
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import (
    ROOT,
    VOCAB,
    LiveServer,
    free_port,
    module_job,
    request,
    start_server,
    stop,
    wait_ready,
)

from trainer.config import PATH_FIELDS
from trainer.errors import UserError
from trainer.sampling import saved_model
from trainer.sampling.sampler import Sampler, Settings
from trainer.serving import backends, batcher, endpoint


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return module_job(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(job):
    backend = backends.load_backend(job[0])
    running = LiveServer(batcher.Batcher(backend, max_batch=8, window_ms=50, block=16))
    yield running
    running.close()


@pytest.fixture(scope="module")
def sampler(job):
    return Sampler(job[1], VOCAB)


def _predict(server, instances, **extra):
    status, body = request(server.url("/predict"), {"instances": instances, **extra})
    assert status == 200, body
    return json.loads(body)["predictions"]


def test_health_info_and_page(server):
    status, body = request(server.url("/health"))
    assert status == 200 and json.loads(body) == {"status": "ready", "model": "job"}
    info = json.loads(request(server.url("/info"))[1])
    assert info["best"] == {"epoch": 3, "step": 30, "monitor": "val_loss", "value": 1.8765}
    assert info["config"]["rnn_units"] == 16 and info["vocab_size"] == VOCAB.size
    # Nothing of where the job, its data or its exports live.
    assert not {"path", "job_dir"} & set(info) and not set(PATH_FIELDS) & set(info["config"])
    assert info["logprobs"] is True
    status, page = request(server.url("/"))
    assert status == 200 and b"<textarea" in page and b"/stream" in page


def test_predict_equals_the_sampler(server, sampler):
    instances = [{"prompt": "the cat", "length": 40, "seed": 3, "temperature": 0.9},
                 {"prompt": "", "length": 25, "seed": 4, "top_k": 3},
                 {"prompt": "ROMEO: ", "length": 30, "greedy": True}]
    out = _predict(server, instances)
    settings = [Settings(0.9), Settings(top_k=3), Settings(greedy=True)]
    for got, inst, s in zip(out, instances, settings):
        want = sampler.generate([inst["prompt"]], inst["length"], s, [got["seed"]])[0]
        assert got["text"] == want and len(got["text"]) == inst["length"]
    assert out[0]["seed"] == 3 and out[0]["temperature"] == 0.9 and out[2]["greedy"]
    # Vertex AI's "parameters" give defaults; a bare string is a prompt.
    (plain,) = _predict(server, ["the "], parameters={"length": 12, "seed": 8})
    assert [plain["text"]] == sampler.generate(["the "], 12, seed=8)


def test_stream_sends_blocks_that_add_up_to_the_prediction(server):
    status, body = request(server.url("/stream"), {"prompt": "a b", "length": 50, "seed": 9})
    assert status == 200
    events = [e for e in body.decode().split("\n\n") if e]
    data = [json.loads(e.split("data: ", 1)[1]) for e in events]
    assert events[-1].startswith("event: done") and data[-1]["seed"] == 9
    texts = [d["text"] for d in data[:-1]]
    assert len(texts) == 4  # 50 chars in blocks of 16.
    (predicted,) = _predict(server, [{"prompt": "a b", "length": 50, "seed": 9}])
    assert "".join(texts) == predicted["text"]


def test_concurrent_requests_share_calls_and_keep_their_text(server, sampler):
    # Different prompts, lengths, seeds and settings, sent at once: each comes back
    # as it would alone, and the calls held several rows.
    jobs = [({"prompt": p, "length": n, "seed": s, **extra}, st)
            for p, n, s, extra, st in [
                ("the ", 60, 1, {}, Settings()), ("a", 33, 2, {"top_p": 0.7}, Settings(top_p=0.7)),
                ("on the mat", 47, 3, {"temperature": 1.3}, Settings(1.3)),
                ("", 20, 4, {"greedy": True}, Settings(greedy=True)),
                ("zz", 60, 5, {"top_k": 4}, Settings(top_k=4)),
                ("the ", 60, 6, {}, Settings())]]
    before = server.batcher.stats().rows_per_call
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: _predict(server, [j[0]])[0]["text"], jobs))
    alone = [sampler.generate([j["prompt"]], j["length"], st, [j["seed"]])[0]
             for j, st in jobs]
    assert results == alone
    after = server.batcher.stats().rows_per_call
    assert any(after[n] > before.get(n, 0) for n in after if n > 1)  # Calls shared by rows.


@pytest.mark.parametrize("body,message", [
    ({"instances": [{"prompt": "ab#c"}]}, "lacks: '#'"),
    ({"instances": [{"prompt": "abc", "length": 301}]}, "length must be in"),
    ({"instances": [{"prompt": "abc", "temperature": "hot"}]}, "temperature must be a number"),
    ({"instances": [{"prompt": "abc", "top_p": 0}]}, "top_p must be in"),
    ({"instances": [{"prompt": "abc", "seed": -1}]}, "seed must be in"),
    ({"instances": [{"prompt": "abc", "length": 2.5}]}, "whole number"),
    ({"instances": [{"prompt": "abc", "colour": 1}]}, "unknown field 'colour'"),
    ({"instances": []}, "non-empty list"),
    ({"instances": ["a"] * 9}, "over the limit of 8"),
    ({"prompts": ["a"]}, ('"instances"', "unknown field 'prompts'")),
    (b'{"instances": [', "not valid JSON"),
    (b'{"instances": [{"temperature": NaN}]}', "temperature must be in"),
    (b"\xff\xfe", "not UTF-8"),
    (b" " * 20_001, "over the limit of 20000"),
])
def test_bad_requests_get_400_with_one_line(server, body, message):
    # /stream takes one instance, or {"instances": [one]}.
    for path, expected in zip(("/predict", "/stream"),
                              message if isinstance(message, tuple) else (message, message)):
        status, answer = request(server.url(path), body)
        assert status == 400, (path, answer)
        error = json.loads(answer)["error"]
        assert expected in error and "\n" not in error
    assert request(server.url("/health"))[0] == 200


def test_vertex_environment_names_the_port_routes_and_model():
    env = {"AIP_HTTP_PORT": "9001", "AIP_HEALTH_ROUTE": "/v1/health",
           "AIP_PREDICT_ROUTE": "v1/models/m:predict", "AIP_STORAGE_URI": "gs://b/model"}
    assert endpoint.vertex_endpoint(None, None, env) == endpoint.Endpoint(
        "gs://b/model", 9001, "/v1/health", "/v1/models/m:predict")
    assert endpoint.vertex_endpoint("runs/x", 7, {}) == endpoint.Endpoint(
        "runs/x", 7, "/health", "/predict")
    with pytest.raises(UserError, match="AIP_STORAGE_URI"):
        endpoint.vertex_endpoint(None, None, {})
    with pytest.raises(UserError, match="port number"):
        endpoint.vertex_endpoint("x", None, {"AIP_HTTP_PORT": "http"})


def test_routes_that_would_hide_the_servers_own_are_refused(server, job):
    from trainer.serving import completions, routes

    prefixes = completions.prefixes("/openai/v1")
    defaults = endpoint.vertex_endpoint("x", None, {})
    assert defaults.check_routes(prefixes) is defaults
    # The list is the app's: every route but health and predict is in it.
    app = routes.create_app(server.batcher, openai_prefixes=prefixes)
    paths = {r.path for r in app.routes} - {"/health", "/predict"}
    assert paths <= endpoint.own_routes(prefixes) and "/v1/tokenize" in paths
    for env, message in [
            ({"AIP_PREDICT_ROUTE": "/stream"}, "AIP_PREDICT_ROUTE is /stream, one of"),
            ({"AIP_HEALTH_ROUTE": "openai/v1/models"}, "AIP_HEALTH_ROUTE is /openai/v1/models"),
            ({"AIP_PREDICT_ROUTE": "/tokenize"}, "AIP_PREDICT_ROUTE is /tokenize"),
            ({"AIP_HEALTH_ROUTE": "/p", "AIP_PREDICT_ROUTE": "/p"}, "both /p: they must differ")]:
        with pytest.raises(UserError, match=message):
            endpoint.vertex_endpoint("x", None, env).check_routes(prefixes)
    # From the command line: one line and exit status 1, before any model is loaded.
    proc = start_server([], {"AIP_PREDICT_ROUTE": "/v1/completions", "AIP_STORAGE_URI": job[0],
                             "AIP_HTTP_PORT": str(free_port())})
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("error: AIP_PREDICT_ROUTE is /v1/completions, one "
                                            "of the server's own routes; choose another path")


def test_a_port_in_use_is_one_line_before_the_model_loads(job):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_server([f"--model_dir={job[0]}", f"--port={port}"])
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            stop(proc)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; choose another "
        "--port or --host")
    assert "loaded" not in err  # Refused before any model was read.


def test_saved_model_serves_the_same_text(job, tmp_path, gcs_bucket, sampler):
    _, vocab, model, _ = job[0], VOCAB, job[1], None
    bucket = gcs_bucket()
    export_dir = f"{bucket}/models/char/1"
    # Exported with --max_length=7: the server's blocks of 16 take three calls each, and
    # the text is the same as one call's.
    saved_model.export(model, vocab, export_dir, max_length=7, info={"best": {"value": 1.5}})
    backend = backends.load_backend(export_dir)
    assert backend.info["kind"] == "SavedModel" and backend.info["best"] == {"value": 1.5}
    running = LiveServer(batcher.Batcher(backend, max_batch=4, window_ms=50, block=16))
    try:
        instances = [{"prompt": "the cat", "length": 40, "seed": 3, "top_p": 0.8},
                     {"prompt": "xy", "length": 21, "seed": 5, "greedy": True}]
        with ThreadPoolExecutor(2) as pool:
            out = list(pool.map(lambda i: _predict(running, [i])[0]["text"], instances))
        assert out == [sampler.generate(["the cat"], 40, Settings(top_p=0.8), [3])[0],
                       sampler.generate(["xy"], 21, Settings(greedy=True), [5])[0]]
    finally:
        running.close()


def test_sigterm_stops_the_server_cleanly_under_vertex_environment(job):
    port = free_port()
    env = {"AIP_HTTP_PORT": str(port), "AIP_HEALTH_ROUTE": "/ping",
           "AIP_PREDICT_ROUTE": "/v1/predict", "AIP_STORAGE_URI": job[0]}
    proc = start_server(["--max_batch=2", "--block=8"], env)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/ping")
        status, body = request(f"http://127.0.0.1:{port}/v1/predict",
                               {"instances": [{"prompt": "the", "length": 10, "seed": 1}]})
        assert status == 200 and len(json.loads(body)["predictions"][0]["text"]) == 10
        # Vertex AI's routes keep the server's own error shape, under /v1/ as well.
        status, body = request(f"http://127.0.0.1:{port}/v1/predict", {"instances": "x"})
        assert status == 400 and isinstance(json.loads(body)["error"], str)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert "stopped (SIGTERM)" in err and "Traceback" not in err
    finally:
        stop(proc)


@pytest.mark.parametrize("module", ["trainer.serve", "trainer.generate", "trainer.export",
                                    "trainer.task"])
@pytest.mark.parametrize("flag", ["--help", "--helpshort"])
def test_help_exits_0(module, flag):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", module, flag], cwd=ROOT, text=True,
                            capture_output=True, timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--" in result.stdout + result.stderr and "Traceback" not in result.stderr
