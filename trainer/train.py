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

from trainer import checkpoints, corpus_index, distribution, input_pipeline, models, storage
from trainer.config import Config, incompatibilities
from trainer.errors import UserError
from trainer.reporting import Reporter
from trainer.vocabulary import Vocabulary


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


def _prepare_data(cfg: Config, job: checkpoints.JobDir, strategy, place):
    """Scans the corpus (split across workers), and loads or builds the vocabulary.

    A resumed job (vocab.json present) reads again only the files whose fingerprint
    changed since the scan recorded in shards.json; a restart on a large bucket corpus
    then costs one metadata request per file instead of a full read.
    """
    saved = job.read("vocab.json")
    index = corpus_index.prepare(
        storage.expand_patterns(cfg.train_data),
        storage.expand_patterns(cfg.val_data) if cfg.val_data else [],
        lowercase=cfg.lowercase, piece_bytes=cfg.piece_bytes, read=job.read, write=job.write,
        reuse=saved is not None, worker=place.worker, num_workers=place.num_workers,
        combine=distribution.sum_over_workers(strategy, place))
    vocab = (Vocabulary.from_json(saved) if saved
             else Vocabulary.from_counts(index.counts, cfg.lowercase))
    train_regions, val_regions = corpus_index.make_regions(index, cfg.window, cfg.val_fraction)
    return vocab, train_regions, val_regions, sum(f.chars for f in index.split("train"))


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


def _optimizer(cfg: Config, total_steps: int) -> keras.optimizers.Optimizer:
    warmup = min(cfg.warmup_steps, max(0, total_steps - 1))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(1, total_steps - warmup),
        alpha=cfg.min_lr_ratio if cfg.lr_schedule == "cosine" else 1.0,
        warmup_target=cfg.learning_rate, warmup_steps=warmup)
    # No global_clipnorm here: Keras would clip each replica's share of the gradient
    # before summing them; `distribution.clip_global_norm` clips the summed gradient instead.
    optimizer = keras.optimizers.Adam(schedule)
    if cfg.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


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
    if cfg.monitor == "val_loss" and not (cfg.val_data or cfg.val_fraction):
        logging.warning("no validation data (--val_data or --val_fraction): monitoring loss")
        cfg = cfg.replace(monitor="loss")
    logging.info("config:\n%s", cfg.to_json())
    logging.info("batch %d per replica x %d replica(s) = global batch %d",
                 cfg.batch_size, place.replicas, global_batch)
    job = checkpoints.JobDir(cfg.job_dir, cfg.local_dir, writer=place.is_chief)
    _check_job_dir(cfg, job)
    vocab, train_regions, val_regions, train_chars = _prepare_data(cfg, job, strategy, place)
    sharding = input_pipeline.Sharding(place.worker, place.num_workers)
    pass_steps = input_pipeline.steps_per_pass(
        train_regions, cfg.window, cfg.shift, cfg.batch_size, place.replicas_per_worker, sharding)
    if pass_steps < 1:
        raise UserError(f"the training data holds fewer windows than one global batch of "
                        f"{global_batch} (seq_length {cfg.seq_length}, shift {cfg.shift})")
    crossing, windows = corpus_index.crossing_windows(train_regions, cfg.window, cfg.shift)
    logging.info("a pass trains on %d of %d windows: %d (%.3f%%) cross a piece boundary, %d do "
                 "not fill the last global batch", pass_steps * global_batch, windows + crossing,
                 crossing, 100 * crossing / max(windows + crossing, 1),
                 windows - pass_steps * global_batch)
    steps_per_epoch = cfg.steps_per_epoch or pass_steps
    val_steps, val_batch = 0, cfg.batch_size
    if val_regions:
        # Every validation window is scored once: each worker's share is padded with
        # invalid rows up to the largest share, in batches no larger than needed.
        most = max(input_pipeline.windows_per_worker(val_regions, cfg.window, cfg.seq_length,
                                                     place.num_workers))
        if most < 1:
            raise UserError(f"the validation data holds no window of {cfg.window} chars")
        val_batch = max(1, min(cfg.batch_size, -(-most // place.replicas_per_worker)))
        val_steps = -(-most // (val_batch * place.replicas_per_worker))
        val_steps = min(val_steps, cfg.val_steps or val_steps)
    total_steps = cfg.epochs * steps_per_epoch
    logging.info("vocabulary: %d ids; training text: %d chars in %d region(s); windows of %d "
                 "chars every %d chars ('%s' objective); %d steps/epoch, %d validation steps",
                 vocab.size, train_chars, len(train_regions), cfg.window, cfg.shift,
                 cfg.objective, steps_per_epoch, val_steps)
    job.write("config.json", cfg.to_json())
    job.write("vocab.json", vocab.to_json())

    keras.mixed_precision.set_dtype_policy(cfg.precision)
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        model = models.build_model(cfg, vocab.size)
        optimizer = _optimizer(cfg, total_steps)
        optimizer.build(model.trainable_variables)
        progress = {"step": tf.Variable(0, dtype=tf.int64, trainable=False),
                    "best": tf.Variable(math.inf, dtype=tf.float64, trainable=False)}
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

    train_iter = iter(strategy.distribute_datasets_from_function(
        dataset_fn(train_regions, cfg.shift, pass_steps, True, step, True)))
    train_step, eval_step = _steps(cfg, strategy, model, optimizer, global_batch)
    reporter = Reporter(cfg, job, place, vocab, model, val_regions)
    evaluate = (lambda: _evaluate(strategy, eval_step, dataset_fn(
        val_regions, cfg.seq_length, val_steps, False, 0, False, val_batch))) if val_steps else dict
    loop = _Loop(cfg, steps_per_epoch, global_batch * cfg.seq_length, resume, best, reporter,
                 progress, lambda: train_step(train_iter), evaluate, model, optimizer)
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
                 model: keras.Model, optimizer: keras.optimizers.Optimizer):
        self.cfg, self.steps_per_epoch, self.chars_per_step = cfg, steps_per_epoch, chars_per_step
        self.resume, self.best, self.reporter, self.progress = resume, best, reporter, progress
        self.step_fn, self.evaluate = step_fn, evaluate
        self.model, self.optimizer = model, optimizer
        self.started = time.time()

    def out_of_time(self) -> bool:
        limit = self.cfg.train_minutes
        return bool(limit) and time.time() - self.started > 60 * limit

    def run(self, step: int, total_steps: int) -> dict[str, Any]:
        """Trains from `step` to `total_steps` (or the time limit); returns the last summary."""
        summary: dict[str, Any] = {}
        with _StopSignal() as stop:
            while step < total_steps and not (summary and self.out_of_time()):
                epoch = step // self.steps_per_epoch
                first, epoch_start = step, time.time()
                step, totals = self._epoch(step, epoch, stop)
                metrics = _metrics(totals)
                metrics["chars_per_sec"] = ((step - first) * self.chars_per_step
                                            / max(time.time() - epoch_start, 1e-9))
                metrics.update({f"val_{k}": v for k, v in self.evaluate().items()})
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
                if not np.isfinite(totals[0]):
                    raise TrainingDivergedError(f"loss became {totals[0]} at step {step}; lower "
                                                "--learning_rate or set --clipnorm")
                bar.update(step - epoch * per_epoch, list(_metrics(totals).items()))
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


def _metrics(totals: np.ndarray) -> dict[str, float]:
    loss_sum, correct, count = totals
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "accuracy": correct / max(count, 1), "bpc": loss / math.log(2)}


def _steps(cfg: Config, strategy, model, optimizer, global_batch: int):
    """Builds the compiled train and eval steps; each returns [loss sum, correct, count]."""

    def forward(x, y, training):
        logits = model(x, training=training)
        if cfg.objective == "last":
            logits = logits[:, -1]
        # Padding rows of an evaluation (target -1, see input_pipeline) count as nothing.
        valid = tf.cast(y >= 0, tf.float32)
        y = tf.maximum(y, 0)
        losses = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True) * valid
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y), tf.float32)
        return losses, tf.stack([tf.reduce_sum(losses), tf.reduce_sum(correct * valid),
                                 tf.reduce_sum(valid)])

    def gradients(x, y):
        with tf.GradientTape() as tape:
            losses, sums = forward(x, y, True)
            per_window = tf.reshape(losses, [tf.shape(losses)[0], -1])
            loss = tf.nn.compute_average_loss(tf.reduce_mean(per_window, -1),
                                              global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss)
        return tape.gradient(scaled, model.trainable_variables), sums

    # XLA compiles the forward and backward pass of each replica. The iterator, the
    # gradients' all-reduce and the optimizer update stay outside it: XLA has no
    # kernels for iterator ops, and a compiled cluster cannot reach the variables of
    # other replicas' devices.
    replica_gradients = (tf.function(gradients, jit_compile=True) if cfg.jit_compile
                         else gradients)

    def replica_step(x, y):
        grads, sums = replica_gradients(x, y)
        if cfg.clipnorm:
            grads = distribution.clip_global_norm(grads, optimizer, cfg.clipnorm)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return sums

    @tf.function
    def train_step(iterator):
        x, y = next(iterator)
        sums = strategy.run(replica_step, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    @tf.function
    def eval_step(x, y):
        sums = strategy.run(lambda a, b: forward(a, b, False)[1], args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    return train_step, eval_step


def _evaluate(strategy, eval_step, dataset_fn) -> dict[str, float]:
    totals = np.zeros(3)
    for x, y in strategy.distribute_datasets_from_function(dataset_fn):
        totals += eval_step(x, y).numpy()
    return _metrics(totals)


def _export_model(cfg: Config, pointer: dict[str, Any]) -> None:
    """Copies what generation needs into --model_dir (Vertex AI's $AIP_MODEL_DIR)."""
    for name in pointer["files"]:
        storage.copy_file(storage.join(cfg.job_dir, name), storage.join(cfg.model_dir, name))
    storage.write_text(storage.join(cfg.model_dir, checkpoints.BEST),
                       json.dumps(pointer, indent=1))
    logging.info("exported the best model to %s", cfg.model_dir)
