"""Benchmark: `trainer.serve` under load, with batching on and off.

    python -m bench.serve_load [--job_dir=runs/shakespeare] [--out=bench/results/serve_load.json]

Starts the real server (a subprocess on a loopback port) once with batching
(--max_batch=32, 5 ms window) and once without (--max_batch=1), and for 1, 8
and 32 concurrent clients sends 200-char completion requests to /predict, each
client one request after another, each request with its own seed. Reports
requests/s over the whole level and p50/p99 latency per request.

Without --job_dir the model has the shape `make train` gave when
bench/results/serve_load.json was measured (1 x LSTM(256), embedding 64; the cpu
preset is 2 x 256 since 2026-12-03) over the Shakespeare corpus's 65 characters,
with random weights: serving speed does not depend on the weights. It needs no
corpus. A level that cannot be measured (the server does not start, a request
fails) stops the benchmark with one `error:` line and exit status 1, and no
result is written.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

from absl import flags

import bench

FLAGS = flags.FLAGS
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


def random_job_dir(path: str) -> str:
    """Writes a job directory with the 1 x 256 shape above and random weights."""
    import keras

    from trainer import checkpoints, models
    from trainer.config import Config
    from trainer.data.vocabulary import Vocabulary

    cfg = Config(num_layers=1, rnn_units=256, embedding_dim=64, dropout=0.0, train_data="-",
                 job_dir=path)
    vocab = Vocabulary(list(SHAKESPEARE_CHARS))
    keras.utils.set_random_seed(0)
    job = checkpoints.JobDir(path)
    job.write("config.json", cfg.to_json())
    job.write("vocab.json", vocab.to_json())
    # Recorded as a uniform guess's loss, ln(vocabulary size): no training happened.
    checkpoints.BestExporter(job, "val_loss").maybe_export(
        models.build_model(cfg, vocab.size), 0, 0, math.log(vocab.size))
    job.close(timeout=60)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def load_level(url: str, clients: int, requests_each: int, length: int) -> dict[str, Any]:
    """`clients` threads, each sending `requests_each` requests in turn; latencies and rate."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for k in range(requests_each):
            body = {"instances": [{"prompt": PROMPT, "length": length,
                                   "seed": index * 1000 + k}]}
            start = time.perf_counter()
            try:
                text = _post(url, body)["predictions"][0]["text"]
                ok = len(text) == length
            except Exception as err:  # noqa: BLE001 - counted and reported, not fatal.
                ok, text = False, f"{type(err).__name__}: {err}"
            with lock:
                (latencies if ok else errors).append(time.perf_counter() - start
                                                     if ok else text)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    latencies.sort()

    def quantile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return {"clients": clients, "requests": len(latencies), "errors": errors[:3],
            "seconds": seconds, "requests_per_sec": len(latencies) / seconds,
            "chars_per_sec": len(latencies) * length / seconds,
            "p50_ms": 1000 * quantile(0.50), "p99_ms": 1000 * quantile(0.99)}


def serve_and_measure(job_dir: str, batching: bool, levels: list[int], length: int,
                      min_requests: int) -> list[dict[str, Any]]:
    """Starts the server with or without batching and measures every level."""
    port = _free_port()
    args = [sys.executable, "-m", "trainer.serve", f"--model_dir={job_dir}", f"--port={port}",
            "--host=127.0.0.1", f"--max_batch={max(levels) if batching else 1}",
            "--batch_window_ms=5"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=sys.stderr,
                            start_new_session=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start (exit {proc.poll()})")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        load_level(f"{base}/predict", 2, 2, length)  # Warm the HTTP path too.
        rows = []
        for clients in levels:
            each = max(2, -(-min_requests // clients))
            row = load_level(f"{base}/predict", clients, each, length)
            row["batching"] = "on" if batching else "off"
            if row["errors"] or row["requests"] != clients * each:
                raise bench.BenchError(
                    f"batching {row['batching']}, {clients} clients: {row['requests']} of "
                    f"{clients * each} requests answered; first error: "
                    f"{(row['errors'] or ['none'])[0]}")
            rows.append(row)
            print(f"batching {row['batching']}, {clients} clients: "
                  f"{row['requests_per_sec']:.1f} req/s", file=sys.stderr, flush=True)
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """Every figure the result must hold, by name."""
    out = {}
    for r in result["rows"]:
        level = f"batching {r['batching']}, {r['clients']} clients"
        out.update({f"{level} req/s": r["requests_per_sec"], f"{level} p50 ms": r["p50_ms"],
                    f"{level} p99 ms": r["p99_ms"]})
    return out


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table, with its setup above it."""
    rows = [(r["batching"], r["clients"], r["requests"], r["requests_per_sec"],
             r["chars_per_sec"], r["p50_ms"], r["p99_ms"]) for r in result["rows"]]
    head = (f"serve_load benchmark, {result['model']}, {result['length']}-char completions; "
            f"{result['machine']['cpu']} ({result['machine']['cores']} cores), "
            f"load {result['machine'].get('load')}\n\n")
    return head + bench.table(("batching", "clients", "requests", "req/s", "chars/s",
                               "p50 ms", "p99 ms"), rows)


def define_flags() -> None:
    """Defines this benchmark's flags."""
    flags.DEFINE_string("job_dir", None, "Serve this job directory (or SavedModel); default: "
                        "random weights in the shape `make train` gives.")
    flags.DEFINE_string("out", "bench/results/serve_load.json", "Where to write the JSON.")
    flags.DEFINE_list("clients", ["1", "8", "32"], "Concurrent clients per level.")
    flags.DEFINE_integer("length", 200, "Chars per completion.", lower_bound=1)
    flags.DEFINE_integer("min_requests", 32, "Requests per level at least (2 per client at "
                         "least).", lower_bound=1)


def main(argv: list[str]) -> int:
    """Serves with and without batching, prints the table, writes the JSON."""
    del argv
    levels = [int(c) for c in FLAGS.clients]
    with tempfile.TemporaryDirectory() as tmp:
        job_dir = FLAGS.job_dir or random_job_dir(os.path.join(tmp, "job"))
        model = FLAGS.job_dir or "random weights, 1 x LSTM(256), embedding 64, 66 ids"
        rows = []
        for batching in (True, False):
            with bench.measuring(f"the server with batching {'on' if batching else 'off'}"):
                rows += serve_and_measure(job_dir, batching, levels, FLAGS.length,
                                          FLAGS.min_requests)
    result = {"benchmark": "serve_load", "model": model, "length": FLAGS.length,
              "machine": bench.machine(), "rows": rows}
    bench.require(figures(result))
    sys.stdout.write(markdown(result))
    bench.write_result(FLAGS.out, result)
    print(f"wrote {FLAGS.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    bench.run_main(main)
