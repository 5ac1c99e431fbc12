"""The training loop: one custom loop for every tf.distribute strategy.

Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy, so the step is a
`tf.function` around `strategy.run` with a GradientTape, used by the one-device,
mirrored and multi-worker strategies alike. Around it: resume checkpoints
(every epoch, every N steps and on SIGTERM), the best checkpoint by the
monitored loss, TensorBoard, a sample per epoch, and background uploads.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import checkpoints, distribution, evaluation, input_pipeline, models, steps, storage
from trainer.config import Config, incompatibilities
from trainer.errors import UserError
from trainer.reporting import Reporter
from trainer.vocabulary import SCAN_RECORD, Vocabulary, recorded_shards, scan, scan_record


class PreemptedError(Exception):
    """SIGTERM or Ctrl-C arrived; a resume checkpoint was saved and uploads were flushed."""

    def __init__(self, message: str, signal_name: str = "SIGTERM"):
        super().__init__(message)
        self.signal_name = signal_name


class TrainingDivergedError(UserError):
    """The loss became NaN or infinite."""


class _StopSignal:
    """Turns SIGTERM (sent before preemption) and a first Ctrl-C into a flag polled per step.

    A second Ctrl-C interrupts at once, as usual.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        try:
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # Not the main thread: leave signals alone.
            pass
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logging.warning("%s received: saving a resume checkpoint at the next step boundary%s",
                        name, " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
        self.received = name

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _prepare_data(cfg: Config, job: checkpoints.JobDir):
    """Scans the shards, and loads or builds the vocabulary.

    A resumed job (vocab.json present) reads again only the shards whose fingerprint
    changed since the scan recorded in shards.json; a restart on a large bucket corpus
    then costs one metadata request per shard instead of a full read.
    """
    saved = job.read("vocab.json")
    known = recorded_shards(job.read(SCAN_RECORD), cfg.lowercase) if saved else {}
    train_scan = scan(storage.expand_patterns(cfg.train_data), cfg.lowercase, "training", known)
    val_scan = (scan(storage.expand_patterns(cfg.val_data), cfg.lowercase, "validation", known)
                if cfg.val_data else None)
    scans = [train_scan] + ([val_scan] if val_scan else [])
    reused, total = sum(s.reused for s in scans), sum(len(s.shards) for s in scans)
    gone = set(known) - {shard.path for s in scans for shard in s.shards}
    if reused:
        logging.info("%d of %d shard(s) unchanged since the last scan (%s): not read again",
                     reused, total, SCAN_RECORD)
    if known and (reused < total or gone):
        logging.warning("%d shard(s) changed, appeared or disappeared since the last scan; the "
                        "data order of this resumed run differs from an unbroken one",
                        total - reused + len(gone))
    if reused < total or gone:
        job.write(SCAN_RECORD, scan_record(scans, cfg.lowercase))
    vocab = (Vocabulary.from_json(saved) if saved
             else Vocabulary.from_counts(train_scan.counts, cfg.lowercase))
    train_regions, val_regions = input_pipeline.make_regions(train_scan, val_scan, cfg)
    return vocab, train_regions, val_regions, train_scan.total_chars


def _check_jit_compile(cfg: Config) -> None:
    """--jit_compile cannot work where the LSTMs run the cuDNN kernel: say so up front."""
    if cfg.jit_compile and tf.config.list_logical_devices("GPU"):
        raise UserError("--jit_compile does not work on a GPU: XLA has no kernel for the cuDNN "
                        "LSTM (CudnnRNNV3), which is the fast path there; drop --jit_compile")


def _check_job_dir(cfg: Config, job: checkpoints.JobDir) -> None:
    saved = job.read("config.json")
    if saved is None:
        return
    problems = incompatibilities(Config.from_dict(json.loads(saved)).to_dict(), cfg)
    if problems:
        raise UserError(f"{cfg.job_dir} holds a run with an incompatible config ("
                        f"{'; '.join(problems)}); use another --job_dir")


def train(cfg: Config) -> dict[str, Any]:
    """Trains per `cfg`, resuming from the job directory when it holds a run.

    Returns:
      A summary: best value, last epoch's metrics, steps, chars trained.

    Raises:
      UserError: bad data, an incompatible job directory, a diverged loss.
      PreemptedError: SIGTERM arrived; a resume checkpoint was saved.
    """
    strategy, place = distribution.make_strategy(cfg)
    _check_jit_compile(cfg)
    global_batch = cfg.batch_size * place.replicas
    if cfg.monitor.startswith("val_") and not (cfg.val_data or cfg.val_fraction):
        logging.warning("no validation data (--val_data or --val_fraction): monitoring loss")
        cfg = cfg.replace(monitor="loss")
    logging.info("config:\n%s", cfg.to_json())
    logging.info("batch %d per replica x %d replica(s) = global batch %d",
                 cfg.batch_size, place.replicas, global_batch)
    job = checkpoints.JobDir(cfg.job_dir, cfg.local_dir, writer=place.is_chief)
    _check_job_dir(cfg, job)
    vocab, train_regions, val_regions, train_chars = _prepare_data(cfg, job)
    sharding = input_pipeline.Sharding(place.worker, place.num_workers)
    pass_steps = (input_pipeline.lane_steps(train_regions, cfg.seq_length, cfg.batch_size
                                            * place.replicas_per_worker, sharding)
                  if cfg.carry_state else input_pipeline.steps_per_pass(
        train_regions, cfg.window, cfg.shift, cfg.batch_size, place.replicas_per_worker, sharding))
    if pass_steps < 1 and cfg.carry_state:
        raise UserError(f"the training data is too short for {global_batch} lanes of more "
                        f"than {cfg.seq_length} chars each (--carry_state)")
    if pass_steps < 1:
        raise UserError(f"the training data holds fewer windows than one global batch of "
                        f"{global_batch} (seq_length {cfg.seq_length}, shift {cfg.shift})")
    steps_per_epoch = cfg.steps_per_epoch or pass_steps
    val_steps, val_batch, val_lanes, val_lane_steps = 0, cfg.batch_size, 0, 0
    if val_regions:
        # A validation set smaller than one batch is still used, in smaller batches.
        fewest = min(input_pipeline.windows_per_worker(val_regions, cfg.window, cfg.seq_length,
                                                       sharding))
        val_batch = max(1, min(cfg.batch_size, fewest // place.replicas_per_worker))
        val_steps = input_pipeline.steps_per_pass(
            val_regions, cfg.window, cfg.seq_length, val_batch, place.replicas_per_worker,
            sharding)
        if val_steps < 1:
            raise UserError(f"the validation data holds fewer windows of {cfg.window} chars "
                            f"than there are replicas ({place.replicas})")
        val_steps = min(val_steps, cfg.val_steps or val_steps)
        val_lanes, val_lane_steps = _lanes_for(val_regions, cfg, val_batch, place, sharding)
    total_steps = cfg.epochs * steps_per_epoch
    reading = (f"{cfg.batch_size * place.replicas_per_worker} contiguous lanes per worker, "
               "state carried" if cfg.carry_state else
               f"windows of {cfg.window} chars every {cfg.shift} chars ('{cfg.objective}')")
    logging.info("vocabulary: %d ids; training text: %d chars in %d region(s); %s; %d "
                 "steps/epoch; %d validation steps (windowed), %d carried over %d lanes",
                 vocab.size, train_chars, len(train_regions), reading, steps_per_epoch,
                 val_steps, val_lane_steps, val_lanes * place.replicas)
    job.write("config.json", cfg.to_json())
    job.write("vocab.json", vocab.to_json())

    keras.mixed_precision.set_dtype_policy(cfg.precision)
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        model = models.build_model(cfg, vocab.size)
        optimizer, time_progress = steps.optimizer(cfg, total_steps)
        optimizer.build(model.trainable_variables)
        # elapsed: seconds of training so far, over every run of this job (the budget's clock).
        progress = {"step": tf.Variable(0, dtype=tf.int64, trainable=False),
                    "best": tf.Variable(math.inf, dtype=tf.float64, trainable=False),
                    "elapsed": tf.Variable(0.0, dtype=tf.float64, trainable=False)}
    keras.mixed_precision.set_dtype_policy("float32")
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, **progress)
    resume = checkpoints.ResumeCheckpoints(job, ckpt, cfg.keep_checkpoints)
    restored = resume.restore()
    step = int(progress["step"].numpy())
    if restored:
        logging.info("resumed from %s at step %d (epoch %d)", restored["prefix"], step,
                     step // steps_per_epoch + 1)
    best = checkpoints.BestExporter(job, cfg.monitor, float(progress["best"].numpy()))
    for lstm in models.lstm_layers(model):
        if not models.cudnn_eligible(lstm):
            logging.warning("%s is not eligible for the cuDNN kernel", lstm.name)

    def dataset_fn(regions, shift, steps, shuffle, start, repeat, batch=cfg.batch_size):
        return lambda ctx: input_pipeline.dataset(
            regions, vocab, cfg, batch_size=batch, shift=shift, steps=steps,
            replicas_per_worker=place.replicas_per_worker, sharding=sharding, shuffle=shuffle,
            start_step=start, repeat=repeat)

    def lanes_fn(regions, steps, start, repeat, batch=cfg.batch_size):
        return lambda ctx: input_pipeline.lanes_dataset(
            regions, vocab, cfg, batch_size=batch, steps=steps,
            replicas_per_worker=place.replicas_per_worker, sharding=sharding, start_step=start,
            repeat=repeat)

    train_step = steps.train_step(cfg, strategy, model, optimizer, global_batch)
    if cfg.carry_state:
        train_iter = iter(strategy.distribute_datasets_from_function(
            lanes_fn(train_regions, pass_steps, step, True)))
        step_fn = steps.CarriedSteps(train_step, train_iter, strategy, model, cfg.batch_size)
    else:
        train_iter = iter(strategy.distribute_datasets_from_function(
            dataset_fn(train_regions, cfg.shift, pass_steps, True, step, True)))
        step_fn = lambda: train_step(train_iter)  # noqa: E731
    reporter = Reporter(cfg, job, place, vocab, model, val_regions)
    evaluator = evaluation.Evaluator(strategy, model, cfg.objective)
    evaluate = (lambda: _evaluate(evaluator, dataset_fn(
        val_regions, cfg.seq_length, val_steps, False, 0, False, val_batch),
        val_lanes and lanes_fn(val_regions, val_lane_steps, 0, False, val_lanes), val_lanes)
                ) if val_steps else dict
    loop = _Loop(cfg, steps_per_epoch, global_batch * cfg.seq_length, resume, best, reporter,
                 progress, step_fn, evaluate, model, optimizer, time_progress)
    if step >= total_steps:
        logging.warning("the job directory already holds all %d epochs; raise --epochs to train "
                        "longer", cfg.epochs)
    try:
        summary = loop.run(step, total_steps)
    except BaseException as err:
        # Keep what was already written: flush it (briefly after a signal), then re-raise.
        timeout = (min(cfg.upload_timeout, 30.0) if isinstance(err, PreemptedError)
                   else cfg.upload_timeout)
        reporter.close(timeout)
        for local, remote in job.close(timeout):
            logging.error("not uploaded: %s -> %s (the local copy is kept)", local, remote)
        raise
    reporter.close(cfg.upload_timeout)
    left = job.close(cfg.upload_timeout)
    if left:
        raise UserError("these files could not be uploaded; their local copies are kept: " +
                        ", ".join(f"{local} -> {remote}" for local, remote in left))
    if place.is_chief and cfg.model_dir and best.pointer:
        _export_model(cfg, best.pointer)
    return summary


class _Loop:
    """Runs epochs of steps, with the checkpoints, stops and reports between them."""

    def __init__(self, cfg: Config, steps_per_epoch: int, chars_per_step: int,
                 resume: checkpoints.ResumeCheckpoints, best: checkpoints.BestExporter,
                 reporter: Reporter, progress: dict[str, tf.Variable], step_fn, evaluate,
                 model: keras.Model, optimizer: keras.optimizers.Optimizer,
                 time_progress: tf.Variable | None = None):
        self.cfg, self.steps_per_epoch, self.chars_per_step = cfg, steps_per_epoch, chars_per_step
        self.resume, self.best, self.reporter, self.progress = resume, best, reporter, progress
        self.step_fn, self.evaluate = step_fn, evaluate
        self.model, self.optimizer = model, optimizer
        self.started = time.time()
        self.time_progress = time_progress
        self.elapsed_before = float(progress["elapsed"].numpy()) if "elapsed" in progress else 0.0

    def job_elapsed(self) -> float:
        """Seconds this job has trained, earlier runs included, by this process's clock."""
        return self.elapsed_before + time.time() - self.started

    def note_time(self) -> None:
        """Records the job's elapsed time and the schedule's time progress (at readbacks)."""
        elapsed = self.job_elapsed()
        if "elapsed" in self.progress:
            self.progress["elapsed"].assign(elapsed)
        if self.time_progress is not None and self.cfg.train_minutes:
            self.time_progress.assign(min(1.0, elapsed / (60 * self.cfg.train_minutes)))

    def out_of_time(self) -> bool:
        limit = self.cfg.train_minutes
        return bool(limit) and time.time() - self.started > 60 * limit

    def run(self, step: int, total_steps: int) -> dict[str, Any]:
        """Trains from `step` to `total_steps` (or the time limit); returns the last summary."""
        summary: dict[str, Any] = {}
        self.note_time()
        with _StopSignal() as stop:
            while step < total_steps and not (summary and self.out_of_time()):
                epoch = step // self.steps_per_epoch
                first, epoch_start = step, time.time()
                step, totals = self._epoch(step, epoch, stop)
                metrics = evaluation.metrics(totals)
                metrics["chars_per_sec"] = ((step - first) * self.chars_per_step
                                            / max(time.time() - epoch_start, 1e-9))
                metrics.update({f"val_{k}": v for k, v in self.evaluate().items()})
                self.note_time()  # The checkpoint's clock includes the evaluation.
                metrics["elapsed_sec"] = time.time() - self.started
                improved = self.best.maybe_export(self.model, epoch + 1, step,
                                                  metrics[self.cfg.monitor])
                self.progress["best"].assign(self.best.best)
                self.reporter.epoch_end(epoch + 1, step, metrics, improved, self.optimizer)
                self.resume.save(step, epoch + 1)
                summary = {"epoch": epoch + 1, "step": step, **metrics, "best": self.best.best,
                           "chars_trained": step * self.chars_per_step}
        return summary

    def _epoch(self, step: int, epoch: int, stop: _StopSignal) -> tuple[int, np.ndarray]:
        """Trains to the end of `epoch` (or a stop); returns the step reached and loss sums."""
        cfg, per_epoch = self.cfg, self.steps_per_epoch
        bar = keras.utils.Progbar(per_epoch, verbose=1 if sys.stdout.isatty() else 2,
                                  stateful_metrics=["loss", "accuracy", "bpc"])
        bar.update(step - epoch * per_epoch)
        totals = np.zeros(3)
        pending: list[tf.Tensor] = []  # Read back every few steps, so steps can queue up.
        while step < (epoch + 1) * per_epoch:
            pending.append(self.step_fn())
            step += 1
            due = bool(cfg.checkpoint_every_steps) and step % cfg.checkpoint_every_steps == 0
            out_of_time = self.out_of_time()
            if len(pending) >= 10 or due or stop.received or out_of_time or step % per_epoch == 0:
                totals += np.sum([p.numpy() for p in pending], axis=0)
                pending = []
                self.note_time()
                if not np.isfinite(totals[0]):
                    raise TrainingDivergedError(f"loss became {totals[0]} at step {step}; lower "
                                                "--learning_rate or set --clipnorm")
                bar.update(step - epoch * per_epoch, list(evaluation.metrics(totals).items()))
            self.progress["step"].assign(step)
            if stop.received:
                self.resume.save(step, epoch)
                raise PreemptedError(f"stopped by {stop.received} at step {step}; rerun the "
                                     "same command to resume", stop.received)
            if out_of_time:
                logging.info("--train_minutes=%g reached at step %d", cfg.train_minutes, step)
                break
            if due and step % per_epoch:
                self.resume.save(step, epoch)
        return step, totals


def _lanes_for(regions, cfg: Config, batch: int, place, sharding) -> tuple[int, int]:
    """(lanes per replica, steps) for carried validation: up to `batch` lanes, fewer
    when the text is too short for one step of that many; (0, 0) when none fits."""
    while batch:
        count = input_pipeline.lane_steps(regions, cfg.seq_length,
                                          batch * place.replicas_per_worker, sharding)
        if count:
            return batch, min(count, cfg.val_steps or count)
        batch //= 2
    return 0, 0


def _evaluate(evaluator: evaluation.Evaluator, windows_fn, lanes_fn, lanes: int
              ) -> dict[str, float]:
    """Windowed metrics (loss, ...) and carried ones (carried_loss, ...), without prefix."""
    metrics = evaluation.metrics(evaluator.windowed(windows_fn))
    if lanes_fn:
        carried = evaluation.metrics(evaluator.carried(lanes_fn, lanes))
        metrics.update({f"carried_{k}": v for k, v in carried.items()})
    return metrics


def _export_model(cfg: Config, pointer: dict[str, Any]) -> None:
    """Copies what generation needs into --model_dir (Vertex AI's $AIP_MODEL_DIR)."""
    for name in pointer["files"]:
        storage.copy_file(storage.join(cfg.job_dir, name), storage.join(cfg.model_dir, name))
    storage.write_text(storage.join(cfg.model_dir, checkpoints.BEST),
                       json.dumps(pointer, indent=1))
    logging.info("exported the best model to %s", cfg.model_dir)
