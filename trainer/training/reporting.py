"""What a person watching the run sees: epoch log lines, TensorBoard, metrics, samples.

Only the chief reports. TensorBoard events are written to a local folder and,
for a gs:// log directory, uploaded after every epoch through `storage`.
"""

from __future__ import annotations

import json
import os
import shutil

import keras
import tensorflow as tf
from absl import logging

from trainer import checkpoints, storage, uploads
from trainer.config import Config
from trainer.data.excerpt import read_tokens
from trainer.data.index import Region
from trainer.data.tokenization import Tokenizer
from trainer.training import cloud
from trainer.training.distribution import Placement


class Reporter:
    """Epoch-end reporting for the chief; a no-op on other workers."""

    def __init__(self, cfg: Config, job: checkpoints.JobDir, place: Placement,
                 tokenizer: Tokenizer, model: keras.Model, val_regions: list[Region]):
        self.cfg, self.job, self.active, self.closed = cfg, job, place.is_chief, False
        self.tokenizer, self.model = tokenizer, model
        if not self.active:
            return
        self.log_dir = cfg.tensorboard_dir or job.remote_path("logs")
        self.local_logs = (self.log_dir if not storage.is_gcs(self.log_dir)
                           else job.local_path("logs-staging/"))
        self.uploader = uploads.Uploader(name="tensorboard-uploader") if storage.is_gcs(
            self.log_dir) else None
        if self.uploader:
            # Staged events of an earlier run (uploaded then, or of a job directory
            # deleted since) must not be uploaded again into this run's logs.
            shutil.rmtree(self.local_logs, ignore_errors=True)
        self.writer = tf.summary.create_file_writer(self.local_logs)
        job.fetch("metrics.jsonl")
        self.tuning = cloud.MetricReporter()
        self.prime = self._prime(val_regions)
        self.sampler = None

    def _prime(self, regions: list[Region]) -> str:
        """The start of the validation text (`seq_length` tokens), or a newline without
        validation data."""
        if not regions or not self.cfg.sample_length:
            return "\n"
        return read_tokens(regions[0], 0, self.cfg.seq_length, self.cfg.lowercase,
                           self.tokenizer)

    def sample(self) -> str:
        """A sample from the current weights (empty when --sample_length=0): at least
        --sample_length characters, to the end of the token that reaches them."""
        if not self.cfg.sample_length:
            return ""
        from trainer.sampling.sampler import Sampler, Settings  # Late: sampling is optional.

        if self.sampler is None:
            self.sampler = Sampler(self.model, self.tokenizer)
        # The prime is validation text, which may hold chars the training text lacks.
        return self.sampler.generate([self.prime], self.cfg.sample_length,
                                     Settings(temperature=self.cfg.sample_temperature),
                                     self.cfg.seed, oov="skip")[0]

    def epoch_end(self, epoch: int, step: int, metrics: dict[str, float], improved: bool,
                  best: float, optimizer: keras.optimizers.Optimizer) -> None:
        """Logs, records and publishes one epoch's metrics.

        Args:
          improved: whether this epoch's monitored value became the best (and was saved).
          best: the best monitored value so far, this epoch's included.
        """
        if not self.active:
            return
        cfg = self.cfg
        lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        parts = [f"{k} {v:.4f}" for k, v in metrics.items()
                 if k not in ("chars_per_sec", "elapsed_sec")]
        value = metrics.get(cfg.monitor)
        logging.info("epoch %d/%d step %d: %s | %.0f chars/s | lr %.2e | best %s %.4f%s",
                     epoch, cfg.epochs, step, ", ".join(parts), metrics["chars_per_sec"], lr,
                     cfg.monitor, best, " (this epoch, saved)" if improved
                     else " (not validated this epoch, --validation_freq)" if value is None
                     else f" (not improved, kept; this epoch {value:.4f})")
        text = self.sample()
        if text:
            logging.info("sample after epoch %d:\n%s%s", epoch, self.prime, text)
        with self.writer.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(name, value)
            tf.summary.scalar("learning_rate", lr)
            if text:
                tf.summary.text("sample", f"```\n{self.prime}{text}\n```")
        self.writer.flush()
        record = {"epoch": epoch, "step": step, "learning_rate": lr, "improved": improved,
                  **metrics}
        with open(self.job.local_path("metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.job.publish("metrics.jsonl")
        if value is not None:
            self.tuning.report(cfg.monitor, value, step)
        self._sync_logs()

    def _sync_logs(self) -> None:
        if self.uploader is None:
            return
        for root, _, names in os.walk(self.local_logs):
            for name in names:
                local = os.path.join(root, name)
                rel = os.path.relpath(local, self.local_logs).replace(os.sep, "/")
                self.uploader.submit(local, storage.join(self.log_dir, rel))

    def close(self, timeout: float) -> None:
        """Flushes TensorBoard events and waits up to `timeout` s for their upload."""
        if not self.active or self.closed:
            return
        self.closed = True
        self.writer.close()
        self._sync_logs()
        if self.uploader:
            left = self.uploader.close(timeout)
            for local, remote in left:
                logging.error("TensorBoard file not uploaded: %s -> %s", local, remote)
