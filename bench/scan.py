"""The corpus scan's benchmarks, run by bench.input_pipeline: the previous scan method
for comparison, and the bytes each of 2 workers reads over the storage emulator."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import bench


def old_scan_mb_per_sec(pattern: str, limit_mb: int = 100) -> float:
    """The previous scan's counting (decode a whole shard, np.unique per 1M chars), MB/s."""
    import collections

    import numpy as np

    from trainer import storage
    from trainer.data import vocabulary

    start, done = time.perf_counter(), 0
    for path in storage.expand_patterns(pattern):
        data = storage.read_bytes(path)[:limit_mb * 1000 * 1000 - done]
        text, _ = vocabulary.decode(data)
        counts: collections.Counter = collections.Counter()
        for cps in vocabulary.code_points(text):
            values, freq = np.unique(cps, return_counts=True)
            counts.update(dict(zip(values.tolist(), freq.tolist(), strict=True)))
        done += len(data)
        if done >= limit_mb * 1000 * 1000:
            break
    return done / 1e6 / (time.perf_counter() - start)


def scan_split_over_emulator(folder: str, total_mb: int = 24) -> dict[str, Any]:
    """Bytes each of 2 workers reads when the scan is split, over the storage emulator.

    The two workers are threads here, joined by a barrier-and-sum in place of the
    job's all-reduce; the reads are the job's own (ranged downloads from the emulator).
    """
    import threading

    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
    from conftest import Emulator  # The tests' emulator harness, on a free loopback port.

    from trainer import gcs, storage
    from trainer.data import index

    emulator = Emulator(os.path.join(folder, "emulator"))
    os.makedirs(emulator.data_dir, exist_ok=True)
    emulator.start()
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.host
    storage.reset_client()
    try:
        gcs.client().create_bucket("scan-bench")
        local = bench.write_corpus(os.path.join(folder, "emu"), total_mb * 1000 * 1000 // 2,
                                   seed=4, one_file=True)
        local += bench.write_corpus(os.path.join(folder, "emu-shards"),
                                    total_mb * 1000 * 1000 // 2, seed=5)
        paths = []
        for i, path in enumerate(local):
            paths.append(f"gs://scan-bench/corpus/{i:03d}-{os.path.basename(path)}")
            storage.copy_file(path, paths[-1])
        barrier, rounds, out = threading.Barrier(2), {}, [None, None]

        def combine_for(worker):
            calls = [0]

            def combine(values):
                calls[0] += 1
                rounds.setdefault(calls[0], [None, None])[worker] = values
                barrier.wait(timeout=120)
                return np.sum(rounds[calls[0]], axis=0)
            return combine

        def run(worker):
            began = time.perf_counter()
            corpus = index.build(paths, [], lowercase=False, piece_bytes=4 << 20,
                                      worker=worker, num_workers=2,
                                      combine=combine_for(worker))
            out[worker] = {"bytes_read": corpus.bytes_read,
                           "seconds": time.perf_counter() - began}
        threads = [threading.Thread(target=run, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        total = sum(storage.size(p) for p in paths)
        return {"corpus_bytes": total, "files": len(paths), "workers": out,
                "largest_share": max(w["bytes_read"] for w in out) / total}
    finally:
        emulator.stop()
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
        storage.reset_client()
