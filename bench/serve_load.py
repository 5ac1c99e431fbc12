"""Benchmark: `trainer.serve` under load, with batching on and off.

    python -m bench.serve_load [--job_dir=runs/shakespeare] [--out=bench/results/serve_load.json]

Starts the real server (a subprocess on a loopback port) once with batching
(--max_batch=32, 5 ms window) and once without (--max_batch=1), and for 1, 8
and 32 concurrent clients sends 200-char completion requests to /predict, each
client one request after another, each request with its own seed. Reports
requests/s over the whole level and p50/p99 latency per request.

Then overload: requests arrive on their own schedule (open loop, evenly spaced)
at --overload_factor (2) times the capacity measured above (the best batching-on
level's requests/s) for --overload_seconds, once with admission control on
(--max_queue_rows=--overload_queue_rows: past it, 429) and once off (no bound).
Reports the share refused and p50/p99 latency of the admitted requests.

Without --job_dir the model has the shape `make train` gave when
bench/results/serve_load.json was measured (1 x LSTM(256), embedding 64; the cpu
preset is 2 x 256 since 2026-12-03) over the Shakespeare corpus's 65 characters,
with random weights: serving speed does not depend on the weights. It needs no
corpus. A level that cannot be measured (the server does not start, a request
fails) stops the benchmark with one `error:` line and exit status 1, and no
result is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
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

    return {"clients": clients, "requests": len(latencies), "errors": errors[:3],
            "seconds": seconds, "requests_per_sec": len(latencies) / seconds,
            "chars_per_sec": len(latencies) * length / seconds,
            "p50_ms": 1000 * _quantile(latencies, 0.50),
            "p99_ms": 1000 * _quantile(latencies, 0.99)}


@contextlib.contextmanager
def _serving(job_dir: str, *flags_: str) -> Iterator[str]:
    """The server on a loopback port with `flags_`, once it answers; yields its base URL."""
    port = _free_port()
    args = [sys.executable, "-m", "trainer.serve", f"--model_dir={job_dir}", f"--port={port}",
            "--host=127.0.0.1", "--batch_window_ms=5", *flags_]
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
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def serve_and_measure(job_dir: str, batching: bool, levels: list[int], length: int,
                      min_requests: int) -> list[dict[str, Any]]:
    """Starts the server with or without batching and measures every level."""
    with _serving(job_dir, f"--max_batch={max(levels) if batching else 1}") as base:
        load_level(f"{base}/predict", 2, 2, length)  # Warm the HTTP path too.
        rows = []
        for clients in levels:
            each = max(2, -(-min_requests // clients))
            row = load_level(f"{base}/predict", clients, each, length)
            row["batching"] = "on" if batching else "off"
            rows.append(_checked(row, row["requests"] != clients * each,
                                 f"batching {row['batching']}, {clients} clients",
                                 f"{row['requests']} of {clients * each} requests answered",
                                 f"{row['requests_per_sec']:.1f} req/s"))
        return rows


def _checked(row: dict[str, Any], short: bool, label: str, answered: str,
             figure: str) -> dict[str, Any]:
    """`row` once printed; BenchError if it is `short` or has errors."""
    if row["errors"] or short:
        raise bench.BenchError(f"{label}: {answered}; first error: "
                               f"{(row['errors'] or ['none'])[0]}")
    print(f"{label}: {figure}", file=sys.stderr, flush=True)
    return row


def open_loop(url: str, rate: float, seconds: float, length: int) -> dict[str, Any]:
    """Requests sent every 1/`rate` s for `seconds`, whatever came back; statuses and latency."""
    count = max(1, round(rate * seconds))
    outcomes: list[tuple[int | str, float]] = []
    lock = threading.Lock()

    def send(index: int) -> None:
        body = {"instances": [{"prompt": PROMPT, "length": length, "seed": index}]}
        start = time.perf_counter()
        try:
            _post(url, body)
            status: int | str = 200
        except urllib.error.HTTPError as err:
            status = err.code
        except Exception as err:  # noqa: BLE001 - counted and reported, not fatal.
            status = f"{type(err).__name__}: {err}"
        with lock:
            outcomes.append((status, time.perf_counter() - start))

    threads = []
    start = time.perf_counter()
    for index in range(count):
        time.sleep(max(0.0, start + index / rate - time.perf_counter()))
        thread = threading.Thread(target=send, args=(index,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    admitted = sorted(t for status, t in outcomes if status == 200)
    refused = sum(status in (429, 503) for status, _ in outcomes)
    return {"offered_per_sec": rate, "requests": count, "admitted": len(admitted),
            "refused_share": refused / count,
            "share_429": sum(status == 429 for status, _ in outcomes) / count,
            "share_503": sum(status == 503 for status, _ in outcomes) / count,
            "errors": [s for s, _ in outcomes if s not in (200, 429, 503)][:3],
            "p50_ms": 1000 * _quantile(admitted, 0.50), "p99_ms": 1000 * _quantile(admitted, 0.99)}


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def overload(job_dir: str, max_batch: int, capacity: float, length: int) -> list[dict[str, Any]]:
    """Open-loop load at --overload_factor x `capacity`, admission control on and off.

    On: the server's defaults (--max_connections=100) with --max_queue_rows set to
    --overload_queue_rows; off: neither bound.
    """
    rows = []
    for admission in (True, False):
        queue = FLAGS.overload_queue_rows if admission else 0
        # Off: no queue bound and no connection limit (uvicorn's 503s are admission too).
        connections = [] if admission else ["--max_connections=1000000"]
        with _serving(job_dir, f"--max_batch={max_batch}", f"--max_queue_rows={queue}",
                      "--max_queue_chars=0", *connections) as base:
            load_level(f"{base}/predict", 2, 2, length)
            row = open_loop(f"{base}/predict", FLAGS.overload_factor * capacity,
                            FLAGS.overload_seconds, length)
        row.update(admission="on" if admission else "off", queue_rows=queue)
        rows.append(_checked(row, not row["admitted"], f"overload, admission {row['admission']}",
                             f"{row['admitted']} admitted",
                             f"{row['refused_share']:.0%} refused, p99 {row['p99_ms']:.0f} ms"))
    return rows


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """Every figure the result must hold, by name."""
    out = {}
    for r in result["rows"]:
        level = f"batching {r['batching']}, {r['clients']} clients"
        out.update({f"{level} req/s": r["requests_per_sec"], f"{level} p50 ms": r["p50_ms"],
                    f"{level} p99 ms": r["p99_ms"]})
    for r in result["overload"]:
        out.update({f"overload, admission {r['admission']} p50 ms": r["p50_ms"],
                    f"overload, admission {r['admission']} p99 ms": r["p99_ms"]})
    return out


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table, with its setup above it."""
    rows = [(r["batching"], r["clients"], r["requests"], r["requests_per_sec"],
             r["chars_per_sec"], r["p50_ms"], r["p99_ms"]) for r in result["rows"]]
    head = (f"serve_load benchmark, {result['model']}, {result['length']}-char completions; "
            f"{result['machine']['cpu']} ({result['machine']['cores']} cores), "
            f"load {result['machine'].get('load')}\n\n")
    over = [(r["admission"], r["queue_rows"] or "none", f"{r['offered_per_sec']:.1f}",
             r["requests"], f"{100 * r['refused_share']:.0f}%", f"{100 * r['share_429']:.0f}%",
             f"{100 * r['share_503']:.0f}%", r["p50_ms"], r["p99_ms"])
            for r in result["overload"]]
    return (head + bench.table(("batching", "clients", "requests", "req/s", "chars/s",
                                "p50 ms", "p99 ms"), rows)
            + f"\nOverload: {result['overload_factor']:g} x capacity for "
              f"{result['overload_seconds']:g} s, batching on; latency of admitted requests\n\n"
            + bench.table(("admission", "queue rows", "offered req/s", "requests", "refused",
                           "429", "503", "p50 ms", "p99 ms"), over))


def define_flags() -> None:
    """Defines this benchmark's flags."""
    flags.DEFINE_string("job_dir", None, "Serve this job directory (or SavedModel); default: "
                        "random weights in the shape `make train` gives.")
    flags.DEFINE_string("out", "bench/results/serve_load.json", "Where to write the JSON.")
    flags.DEFINE_list("clients", ["1", "8", "32"], "Concurrent clients per level.")
    flags.DEFINE_integer("length", 200, "Chars per completion.", lower_bound=1)
    flags.DEFINE_integer("min_requests", 32, "Requests per level at least (2 per client at "
                         "least).", lower_bound=1)
    flags.DEFINE_float("overload_factor", 2.0, "Overload: this many times the measured "
                       "capacity.", lower_bound=0.1)
    flags.DEFINE_float("overload_seconds", 10.0, "Overload: how long requests arrive.",
                       lower_bound=0.1)
    flags.DEFINE_integer("overload_queue_rows", 64, "Overload with admission on: the "
                         "server's --max_queue_rows.", lower_bound=1)


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
        capacity = max(r["requests_per_sec"] for r in rows if r["batching"] == "on")
        with bench.measuring("the server under overload"):
            over = overload(job_dir, max(levels), capacity, FLAGS.length)
    result = {"benchmark": "serve_load", "model": model, "length": FLAGS.length,
              "machine": bench.machine(), "rows": rows, "capacity_per_sec": capacity,
              "overload_factor": FLAGS.overload_factor,
              "overload_seconds": FLAGS.overload_seconds, "overload": over}
    bench.require(figures(result))
    sys.stdout.write(markdown(result))
    bench.write_result(FLAGS.out, result)
    print(f"wrote {FLAGS.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    bench.run_main(main)
