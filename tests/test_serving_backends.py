"""Loading a model to serve from untrusted folders: object names that would escape the
download folder, pointers outside the job dir, malformed files, a dead bucket."""

from __future__ import annotations

import http.server
import json
import os
import tempfile
import threading
import time

import pytest
from serve_helpers import make_job_dir, start_server, stop

from trainer import storage
from trainer.errors import UserError
from trainer.serving import backends


def test_an_object_name_with_dots_is_refused_and_no_temp_folder_stays(tmp_path, monkeypatch):
    # A bucket listing with the object "models/1/../evil" (the emulator cannot hold one).
    tree = {"gs://b/models/1": ["..", "saved_model.pb"], "gs://b/models/1/..": ["evil"]}
    copied = []
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(storage, "exists", lambda path: path.endswith("saved_model.pb"))
    monkeypatch.setattr(storage, "listdir", lambda path: tree.get(path, []))
    monkeypatch.setattr(storage, "copy_file", lambda src, dst: copied.append(dst))
    with pytest.raises(UserError, match="outside the download folder"):
        backends.load_backend("gs://b/models/1")
    assert copied == [] and os.listdir(tmp_path) == []


def test_job_files_that_point_outside_or_are_malformed_give_one_line(tmp_path):
    job = tmp_path / "job"
    make_job_dir(str(job), str(tmp_path / "staging"))
    best = json.loads((job / "best.json").read_text())
    (job / "best.json").write_text(json.dumps({**best, "weights": "/etc/passwd"}))
    with pytest.raises(UserError, match="inside the job directory"):
        backends.load_backend(str(job))
    (job / "best.json").write_text(json.dumps(best))
    good = (job / "vocab.json").read_text()
    # Another job's vocabulary (one char fewer): named, not a Keras loading error.
    smaller = json.loads(good)
    smaller["chars"], smaller["counts"] = smaller["chars"][:-1], smaller["counts"][:-1]
    (job / "vocab.json").write_text(json.dumps(smaller))
    with pytest.raises(UserError, match=r"holds weights for \d+ ids, but the job's vocab.json "
                                        r"gives \d+: the files do not belong together"):
        backends.load_backend(str(job))
    (job / "vocab.json").write_text('{"chars": 5')
    with pytest.raises(UserError) as err:
        backends.load_backend(str(job))
    assert "\n" not in str(err.value)


class _Failing(http.server.BaseHTTPRequestHandler):
    """A bucket that answers every request with 503."""

    def _fail(self):
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = _fail  # noqa: N815 - the names http.server calls.

    def log_message(self, *args):
        pass


def test_a_dead_bucket_gives_one_line_within_the_bound():
    dead = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=dead.serve_forever, daemon=True).start()
    proc = None
    try:
        start = time.monotonic()
        proc = start_server(["--model_dir=gs://dead/model", "--load_seconds=2"],
                            {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{dead.server_port}"})
        _, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode != 0 and "Traceback" not in err, err[-2000:]
        assert "within 2 s" in lines[-1] or "Cloud Storage" in lines[-1], err[-2000:]
        assert time.monotonic() - start < 60
    finally:
        if proc is not None:
            stop(proc)  # Past the timeout: the server's whole group goes.
        dead.shutdown()
