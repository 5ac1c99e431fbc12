"""Shared pytest fixtures: a local Cloud Storage emulator and the no-real-cloud guard.

Fixtures:
    gcs_emulator (session): a `gcp-storage-emulator` subprocess on a free
        127.0.0.1 port with a tmp data dir. While it runs, os.environ holds
        STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT, so subprocesses started by
        tests talk to it too. `gcs_emulator.stop()` / `.start()` simulate an
        outage: start() comes back on the same port with the stored objects.
    gcs_bucket (function): a factory; `gcs_bucket()` or `gcs_bucket("name")`
        creates a fresh bucket and returns "gs://<name>".

The autouse `_require_emulator` fixture sets TRAINER_REQUIRE_EMULATOR=1 for the
whole session, so trainer.storage refuses to build a client for anything but
an emulator on 127.0.0.1/localhost: no test can reach real Google Cloud.

Emulator quirks worth knowing: it does not paginate listings and may not
enforce ifGenerationMatch preconditions.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import pytest

from trainer import storage

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "storage_emulator.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """A gcp-storage-emulator subprocess that can be stopped and restarted in place."""

    def __init__(self, data_dir: str, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or _free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._log_path = os.path.join(data_dir, "emulator.log")

    def start(self, timeout: float = 20.0) -> None:
        """Starts the emulator (again) on the same port and data dir; waits until it answers."""
        if self._proc is not None:
            return
        # Disk mode (no --in-memory): objects persist in data_dir across stop()/start().
        # Through tests/storage_emulator.py: every file the emulator writes is replaced whole.
        cmd = [sys.executable, str(LAUNCHER), "-d", self.data_dir]
        cmd += ["start", "--host", "127.0.0.1", "--port", str(self.port), "-q"]
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(self._log_path, errors="replace") as f:
                    raise RuntimeError(f"storage emulator did not start:\n{f.read()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stops the emulator; the port then refuses connections until start().

        Its files are replaced whole (tests/storage_emulator.py), so a stop leaves its
        metadata file (`.meta`) readable. Should it ever be left truncated all the same,
        the last complete copy read before the stop is put back, so that start() can
        read it.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        before = self._complete_meta()
        proc.send_signal(signal.SIGINT)  # The emulator shuts down cleanly on Ctrl-C.
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if before is not None and self._complete_meta(attempts=1) is None:
            with open(self._meta_path, "wb") as f:
                f.write(before)

    @property
    def _meta_path(self) -> str:
        return os.path.join(self.data_dir, ".cloudstorage", ".meta")

    def _complete_meta(self, attempts: int = 20) -> bytes | None:
        """The metadata file's bytes when they parse as JSON (retrying while a write is
        under way); None when there is none or it never parses."""
        for _ in range(attempts):
            try:
                with open(self._meta_path, "rb") as f:
                    raw = f.read()
                json.loads(raw)
                return raw
            except FileNotFoundError:
                return None
            except ValueError:
                time.sleep(0.05)
        return None

    def answers(self) -> bool:
        """Returns True if the emulator serves HTTP requests right now."""
        try:
            with urllib.request.urlopen(f"{self.host}/storage/v1/b?project=test", timeout=1):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def create_bucket(self, name: str) -> str:
        """Creates a bucket through the JSON API and returns "gs://<name>"."""
        req = urllib.request.Request(
            f"{self.host}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10):
            pass
        return f"gs://{name}"


@pytest.fixture(autouse=True, scope="session")
def _require_emulator() -> Iterator[None]:
    """Makes trainer.storage refuse any client that is not a local emulator."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAINER_REQUIRE_EMULATOR", "1")
        yield


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """A running storage emulator; STORAGE_EMULATOR_HOST points at it for the session."""
    emulator = Emulator(str(tmp_path_factory.mktemp("gcs_emulator")))
    emulator.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", emulator.host)
        storage.reset_client()
        try:
            yield emulator
        finally:
            emulator.stop()
            storage.reset_client()


@pytest.fixture
def gcs_bucket(gcs_emulator: Emulator) -> Callable[[str | None], str]:
    """Returns a factory that creates a fresh bucket and returns its "gs://name"."""
    # An earlier test may have left the emulator stopped; every test starts with it up.
    gcs_emulator.start()

    def make(name: str | None = None) -> str:
        return gcs_emulator.create_bucket(name or f"test-{uuid.uuid4().hex[:12]}")

    return make


# The tiny corpus of the training tests (the data of training_jobs.tiny).
SENTENCES = ["the cat sat on the mat. ", "a dog ran in the fog. ", "we see the sea. ",
             "to be or not to be. "]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        text = "".join(SENTENCES[(i + j) % 4] for j in range(250))
        (folder / f"part-{i}.txt").write_text(text)
    return str(folder / "*.txt")
