"""Job directory layout, resume checkpoints and the best checkpoint.

A job directory (local or gs://) holds:
  config.json, vocab.json     what generation needs besides the weights
  shards.json                 each file's fingerprint and pieces, so a resume reads
                              only the shards that changed
  weights-improvement-{epoch:02d}-{value:.4f}.weights.h5   best weights so far
  best.json                   pointer to the best weights, with sizes and md5s
  ckpt/ckpt-{step}.*          resume checkpoints (model, optimizer, progress)
  ckpt/latest.json            pointer to the resume checkpoints, newest first
  metrics.jsonl, logs/        per-epoch metrics and TensorBoard events

Everything is written to a local folder first (the job directory itself when
it is local) and, for gs://, uploaded in the background in submission order.
A pointer is submitted after the files it names, with its text as it was then,
so a reader that only follows pointers never sees a partial checkpoint.

Only the chief writes the job directory. Every worker resumes from it (all hold
the same variables): a local or NFS job directory is read in place, a gs:// one is
downloaded into the worker's staging folder. A non-chief worker still has to write
its own resume checkpoints (the strategy makes every worker call `write`); they go
to a private folder that keeps only the newest and is removed at exit.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from trainer import storage, uploads
from trainer.data import tokenization
from trainer.errors import UserError

BEST = "best.json"
LATEST = "ckpt/latest.json"
IMPROVEMENTS_KEPT = 3


def weights_name(epoch: int, value: float) -> str:
    """The seed's ModelCheckpoint pattern, in Keras 3's required suffix."""
    return f"weights-improvement-{epoch:02d}-{value:.4f}.weights.h5"


def file_record(local_path: str) -> dict[str, Any]:
    return {"size": os.path.getsize(local_path), "md5": storage.md5_file(local_path)}


class JobDir:
    """A job directory, staged through a local folder and published in order.

    Args:
      path: the job directory, local or gs://.
      local_dir: staging folder for a gs:// job directory; default under the temp dir.
      writer: False on non-chief workers; they stage into a private scratch folder
        (removed by `close` or at exit) and publish nothing.
    """

    def __init__(self, path: str, local_dir: str = "", writer: bool = True):
        self.path = path.rstrip("/")
        self.writer = writer
        self.remote = storage.is_gcs(self.path)
        if not writer:
            self.local = tempfile.mkdtemp(prefix="char-lstm-worker-")
            # Also after SIGTERM or an error: sys.exit runs atexit; only SIGKILL leaves it.
            atexit.register(shutil.rmtree, self.local, ignore_errors=True)
        elif self.remote:
            digest = hashlib.sha1(self.path.encode()).hexdigest()[:12]
            self.local = local_dir or os.path.join(tempfile.gettempdir(), "char-lstm", digest)
        else:
            self.local = self.path
        os.makedirs(self.local, exist_ok=True)
        self.uploader = (uploads.Uploader(name="job-dir-uploader") if self.remote and writer
                         else None)

    def remote_path(self, name: str) -> str:
        return storage.join(self.path, name)

    def local_path(self, name: str) -> str:
        path = os.path.join(self.local, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def source_path(self, name: str) -> str:
        """Where this process reads the job directory's `name` from local disk.

        The job directory itself when it is local (shared by every worker), else the
        staging folder that a gs:// file is downloaded into.
        """
        return self.local_path(name) if self.remote else os.path.join(self.path, name)

    def publish(self, name: str, on_done=None) -> None:
        """Queues the staged file `name` for upload (after everything queued before)."""
        if self.uploader and self.writer:
            self.uploader.submit(self.local_path(name), self.remote_path(name), on_done)
        elif on_done:
            on_done()

    def write(self, name: str, text: str, on_done=None) -> None:
        """Writes a small file atomically, staged and published.

        The upload carries `text` itself, not the staged file as it is when its turn
        comes: a pointer rewritten while uploads lag behind (a bucket out of reach)
        must not reach the bucket before the files its newer version names.
        """
        if not self.writer:
            return
        storage.write_text(self.local_path(name), text)
        if self.uploader:
            self.uploader.submit_bytes(self.remote_path(name), text.encode("utf-8"), on_done,
                                       local=self.local_path(name))
        elif on_done:
            on_done()

    def fetch(self, name: str) -> None:
        """Makes the staged `name` the gs:// job directory's copy, or absent with it.

        Files the job appends to (metrics.jsonl) must continue the bucket's copy
        when a job resumes, not replace it, and the bucket is the job's truth: the
        staged copy may be stale (another machine ran the job since) or left by a run
        whose job directory was deleted since.
        """
        if not (self.remote and self.writer):
            return
        try:
            storage.copy_file(self.remote_path(name), self.local_path(name))
        except FileNotFoundError:
            try:
                os.remove(self.local_path(name))
            except FileNotFoundError:
                pass

    def read(self, name: str) -> str | None:
        """Reads a file from the job directory itself; None when it is absent."""
        try:
            return storage.read_text(self.remote_path(name))
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        for path in {self.local_path(name), self.remote_path(name)}:
            try:
                storage.delete(path)
            except Exception as err:  # A stale file left behind is harmless.
                logging.warning("could not delete %s: %s", path, err)

    def flush(self, timeout: float | None) -> list[tuple[str, str]]:
        """Waits for queued uploads; returns those still not done."""
        return self.uploader.flush(timeout) if self.uploader else []

    def close(self, timeout: float | None) -> list[tuple[str, str]]:
        left = self.uploader.close(timeout) if self.uploader else []
        if not self.writer:
            shutil.rmtree(self.local, ignore_errors=True)
        return left


class ResumeCheckpoints:
    """Resume checkpoints of a tf.train.Checkpoint, with a pointer and fallback."""

    def __init__(self, job: JobDir, checkpoint: tf.train.Checkpoint, keep: int):
        self.job, self.checkpoint, self.keep = job, checkpoint, keep
        self.entries: list[dict[str, Any]] = []
        self.saved_step: int | None = None  # The step this process saved or restored last.

    def save(self, step: int, epoch: int) -> None:
        """Writes ckpt-{step}; every worker must call this (it may use collectives).

        A second save at the same step (a stop at an epoch's last step saves before
        the epoch's validation and again after it) goes to ckpt-{step}-2, ...: files
        that latest.json lists are never written over.
        """
        prefix, taken = f"ckpt/ckpt-{step}", {e["prefix"] for e in self.entries}
        copy = 1
        while self.job.writer and prefix in taken:
            copy += 1
            prefix = f"ckpt/ckpt-{step}-{copy}"
        base = os.path.basename(prefix) + "."
        self.checkpoint.write(self.job.local_path(prefix))
        self.saved_step = step
        if not self.job.writer:
            # Nobody reads these (every worker resumes from the chief's): keep the newest.
            for path in glob.glob(os.path.join(self.job.local, "ckpt", "ckpt-*")):
                if not os.path.basename(path).startswith(base):
                    os.remove(path)
            return
        folder = os.path.dirname(self.job.local_path(prefix))
        names = sorted(f"ckpt/{n}" for n in os.listdir(folder) if n.startswith(base))
        entry = {"prefix": prefix, "step": step, "epoch": epoch, "time": time.time(),
                 "files": {n: file_record(self.job.local_path(n)) for n in names}}
        for name in names:
            self.job.publish(name)
        old = [e for e in self.entries if e["prefix"] != prefix]
        self.entries = ([entry] + old)[:self.keep]
        dropped = [n for e in old[self.keep - 1:] for n in e["files"]]
        self.job.write(LATEST, json.dumps({"checkpoints": self.entries}, indent=1),
                       on_done=lambda: [self.job.delete(n) for n in dropped])

    def restore(self) -> dict[str, Any] | None:
        """Restores the newest intact checkpoint; None when the job has none.

        A checkpoint whose files are missing, of the wrong size or checksum, or
        that TensorFlow cannot read is skipped with a warning, and the one before
        it is tried. If none is usable the job stops rather than start over and
        later overwrite the run's best checkpoint with a worse one.
        """
        text = self.job.read(LATEST)
        if text is None:
            return None
        try:
            self.entries = json.loads(text)["checkpoints"]
        except (ValueError, KeyError) as err:
            raise UserError(f"{self.job.remote_path(LATEST)} is corrupt ({err}); delete the "
                            "ckpt folder to start the run over") from err
        for entry in self.entries:
            problem = self._fetch(entry)
            if problem is None:
                try:
                    self.checkpoint.read(self.job.source_path(entry["prefix"])).expect_partial()
                    self.saved_step = entry["step"]
                    return entry
                except (tf.errors.OpError, ValueError, AssertionError) as err:
                    problem = f"unreadable: {str(err).splitlines()[0]}"
            logging.warning("resume checkpoint %s skipped (%s); trying an older one",
                            entry["prefix"], problem)
        raise UserError(f"no intact resume checkpoint in {self.job.remote_path('ckpt')}; "
                        "delete that folder to start the run over")

    def _fetch(self, entry: dict[str, Any]) -> str | None:
        """Makes the checkpoint's files present and verified locally; returns a problem."""
        for name, record in entry["files"].items():
            local = self.job.source_path(name)
            if self.job.remote and not matches(local, record):
                try:
                    storage.copy_file(self.job.remote_path(name), local)
                except FileNotFoundError:
                    return f"{name} is missing"
            if not os.path.exists(local):
                return f"{name} is missing"
            if not matches(local, record):
                return f"{name} does not match its recorded size and checksum"
        return None


def matches(local: str, record: dict[str, Any]) -> bool:
    return (os.path.exists(local) and os.path.getsize(local) == record["size"]
            and storage.md5_file(local) == record["md5"])


class BestExporter:
    """Keeps the best weights by a monitored value; never replaces a better best."""

    def __init__(self, job: JobDir, monitor: str, best: float = float("inf")):
        self.job, self.monitor = job, monitor
        pointer = job.read(BEST)
        self.pointer = json.loads(pointer) if pointer else None
        if self.pointer and self.pointer.get("monitor") == monitor:
            best = min(best, float(self.pointer["value"]))
        self.best = best

    def maybe_export(self, model: keras.Model, epoch: int, step: int, value: float) -> bool:
        """Saves weights and moves the pointer if `value` beats the best; chief only."""
        if not value < self.best:
            return False
        self.best = value
        if not self.job.writer:
            return True
        name = weights_name(epoch, value)
        model.save_weights(self.job.local_path(name))
        self.job.publish(name)
        files = {n: file_record(self.job.local_path(n))
                 for n in (name, "config.json", "vocab.json", tokenization.FILE)
                 if n == name or os.path.exists(self.job.local_path(n))}
        history = ([name] + (self.pointer or {}).get("history", []))
        stale = [n for n in history[IMPROVEMENTS_KEPT:] if n != name]
        self.pointer = {"epoch": epoch, "step": step, "monitor": self.monitor, "value": value,
                        "weights": name, "files": files, "history": history[:IMPROVEMENTS_KEPT],
                        "time": time.time()}
        self.job.write(BEST, json.dumps(self.pointer, indent=1),
                       on_done=lambda: [self.job.delete(n) for n in stale])
        return True
