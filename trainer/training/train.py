"""Training, in named stages: one custom loop for every tf.distribute strategy.

Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy, so the step is a
`tf.function` around `strategy.run` with a GradientTape (trainer/training/steps.py),
used by the one-device, mirrored and multi-worker strategies alike. `train` runs
the stages in order:

  1. settle the config: precision for this machine, what to monitor;
  2. the data (trainer/training/data_plan.py): the corpus scan (split among workers),
     the vocabulary and tokenizer, the regions, and how many steps a pass, an epoch and
     the validation take;
  3. the model and the optimizer, built under the strategy;
  4. checkpoints and reporting: resume, the best checkpoint, the job's agreement;
  5. the loop (trainer/training/loop.py), then flushing uploads and the export.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from trainer import checkpoints, models, storage
from trainer.config import Config, incompatibilities
from trainer.data import lane_pipeline, tokenization, window_pipeline
from trainer.errors import UserError
from trainer.training import distribution, evaluation, init_from, optimization, precision, steps
from trainer.training.data_plan import DataPlan, plan_data
from trainer.training.distribution import Placement
from trainer.training.loop import Loop, PreemptedError
from trainer.training.reporting import Reporter


def train(cfg: Config) -> dict[str, Any]:
    """Trains per `cfg`, resuming from the job directory when it holds a run.

    Every worker of a multi-worker job resumes from the chief's checkpoint, and all
    of them stop at the same step (see trainer/training/loop.py).

    Returns:
      A summary: best value, last epoch's metrics, steps, chars trained ({} when the
      job directory already holds the whole run).

    Raises:
      UserError: bad data, an incompatible job directory, a diverged loss, a cluster
        that cannot work, another worker that stopped or failed.
      PreemptedError: SIGTERM or Ctrl-C arrived (on any worker); a resume checkpoint
        was saved.
    """
    cfg = distribution.set_threads(cfg)
    strategy, place = distribution.make_strategy(cfg)
    try:
        cfg = settle_config(cfg, place)
        job = checkpoints.JobDir(cfg.job_dir, cfg.local_dir, writer=place.is_chief)
        check_job_dir(cfg, job)
        base = init_from.load_base(cfg, job)
        plan = plan_data(cfg, job, strategy, place, base)
        job.write("config.json", init_from.config_json(cfg, job, base, plan.chars))
        job.write("vocab.json", plan.chars.to_json())
        if plan.tokenizer is not plan.chars:
            job.write(tokenization.FILE, plan.tokenizer.to_json())
        trainable = build_trainable(cfg, strategy, plan)
        summary, best_pointer = run_loop(cfg, job, strategy, place, plan, trainable, base)
    except distribution.PEER_ERRORS as err:
        lost = distribution.lost_worker(err, place)
        if lost is None:
            raise
        raise lost from err
    if place.is_chief and cfg.model_dir and best_pointer:
        export_best(cfg, best_pointer)
    return summary


# Stage 1: the config.

def settle_config(cfg: Config, place: Placement) -> Config:
    """Resolves --precision for this machine and what to monitor; logs the whole config."""
    cfg = precision.settle(cfg)
    if cfg.monitor.startswith("val_") and not (cfg.val_data or cfg.val_fraction):
        logging.warning("no validation data (--val_data or --val_fraction): monitoring loss")
        cfg = cfg.replace(monitor="loss")
    logging.info("config:\n%s", cfg.to_json())
    logging.info("batch %d per replica x %d replica(s) = global batch %d",
                 cfg.batch_size, place.replicas, cfg.batch_size * place.replicas)
    return cfg


def check_job_dir(cfg: Config, job: checkpoints.JobDir) -> None:
    """Refuses a job directory that holds a run of another model."""
    saved = job.read("config.json")
    if saved is None:
        return
    problems = incompatibilities(Config.from_dict(json.loads(saved)).to_dict(), cfg)
    if problems:
        raise UserError(f"{cfg.job_dir} holds a run with an incompatible config ("
                        f"{'; '.join(problems)}); use another --job_dir")
    check_monitor(cfg, job.read(checkpoints.BEST))


def check_monitor(cfg: Config, pointer: str | None) -> None:
    """Refuses to resume a job whose best weights were chosen by another measure: the
    new one (say the training loss, when the validation flags were left out) would
    replace them with weights that may be worse by the measure that chose them."""
    try:
        kept = json.loads(pointer) if pointer else {}
    except ValueError:
        return  # A corrupt pointer is reported where it is read.
    old = kept.get("monitor") if isinstance(kept, dict) else None
    if not isinstance(old, str) or old == cfg.monitor:
        return
    why = (" (no validation data: --val_data or --val_fraction)"
           if cfg.monitor == "loss" and old.startswith("val_") else "")
    raise UserError(f"{cfg.job_dir}'s best weights were chosen by {old}, this run would "
                    f"choose by {cfg.monitor}{why}: resume with the validation data and "
                    f"--monitor={old} it had, or train into another --job_dir")


# Stage 3: the model and the optimizer.

@dataclasses.dataclass(frozen=True)
class Trainable:
    """What the strategy holds and the resume checkpoint keeps."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    time_progress: tf.Variable          # Elapsed share of --train_minutes (the schedule's).
    progress: dict[str, tf.Variable]    # step, best, elapsed (the agreed clock), stale, pending.
    average: optimization.WeightAverage | None


def build_trainable(cfg: Config, strategy: tf.distribute.Strategy, plan: DataPlan
                    ) -> Trainable:
    """Builds the model, optimizer and progress variables under the strategy."""
    keras.mixed_precision.set_dtype_policy(cfg.precision)
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        # elapsed: the job's agreed seconds so far (the chief's clock), set by the loop;
        # stale: validations since the last improvement (--early_stopping_patience);
        progress = {"step": tf.Variable(0, dtype=tf.int64, trainable=False),
                    "best": tf.Variable(math.inf, dtype=tf.float64, trainable=False),
                    "elapsed": tf.Variable(0.0, dtype=tf.float64, trainable=False),
                    "stale": tf.Variable(0, dtype=tf.int64, trainable=False),
                    # An epoch saved before its validation: [loss sum, correct, tokens,
                    # chars, chars/s] of its training (`loop.Loop`); zeros otherwise.
                    "pending": tf.Variable(tf.zeros(5, tf.float64), trainable=False)}
        model = models.build_model(cfg, plan.tokenizer.size)
        optimizer, time_progress = optimization.build_optimizer(cfg, plan.total_steps)
        optimizer.build(model.trainable_variables)
    keras.mixed_precision.set_dtype_policy("float32")
    average = (optimization.WeightAverage(strategy, model, cfg.ema_momentum)
               if cfg.ema_momentum else None)
    for lstm in models.lstm_layers(model):
        if not models.cudnn_eligible(lstm):
            logging.warning("%s is not eligible for the cuDNN kernel", lstm.name)
    return Trainable(model, optimizer, time_progress, progress, average)


# Stage 4: checkpoints and reporting, then stage 5: the loop.

def run_loop(cfg: Config, job: checkpoints.JobDir, strategy: tf.distribute.Strategy,
             place: Placement, plan: DataPlan, trainable: Trainable,
             base: init_from.Base | None = None
             ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Resumes (or starts from `base`'s weights), runs the loop to the end (or a stop),
    and flushes what was written.

    Returns:
      (the loop's summary, the best checkpoint's pointer or None).
    """
    # A checkpoint written without averages restores none: their count stays 0, and the
    # first step starts them over from the weights.
    average = trainable.average
    ckpt = tf.train.Checkpoint(model=trainable.model, optimizer=trainable.optimizer,
                               **trainable.progress,
                               **({"weight_average": average} if average else {}))
    resume = checkpoints.ResumeCheckpoints(job, ckpt, cfg.keep_checkpoints)
    restored = resume.restore()
    if base and not restored:
        init_from.load_weights(trainable.model, base, plan.chars)
    step = int(trainable.progress["step"].numpy())
    if restored:
        logging.info("resumed from %s at step %d (epoch %d)", restored["prefix"], step,
                     step // plan.steps_per_epoch + 1)
    # The first collective after the setup: a worker that failed in it has exited by now.
    agreement = distribution.Agreement(strategy, place,
                                       float(trainable.progress["elapsed"].numpy()))
    agreement.check_same("resume step", step)
    best = checkpoints.BestExporter(job, cfg.monitor, float(trainable.progress["best"].numpy()))
    reporter = Reporter(cfg, job, place, plan.tokenizer, trainable.model, plan.val_regions)
    inputs = _Inputs(cfg, strategy, place, plan)
    train_iter, step_fn = inputs.train_steps(trainable, step)
    # Chars a step reads: its tokens times the training text's chars per token.
    chars_per_step = (cfg.batch_size * place.replicas * cfg.seq_length * plan.train_chars
                      / max(plan.train_tokens, 1))
    loop = Loop(cfg, plan.steps_per_epoch, chars_per_step,
                resume, best, reporter, trainable.progress, step_fn,
                inputs.validation(trainable.model), trainable.model, trainable.optimizer,
                agreement, trainable.time_progress, average)
    if step >= plan.total_steps:
        logging.warning("the job directory already holds all %d epochs; raise --epochs to train "
                        "longer", cfg.epochs)
    try:
        summary = loop.run(step, plan.total_steps)
    except BaseException as err:
        # Keep what was already written: flush it (briefly after a signal), then re-raise.
        timeout = (min(cfg.upload_timeout, 30.0) if isinstance(err, PreemptedError)
                   else cfg.upload_timeout)
        reporter.close(timeout)
        for local, remote in job.close(timeout):
            logging.error("not uploaded: %s -> %s (the local copy is kept)", local, remote)
        raise
    finally:
        # Stop the input pipeline now: left to the interpreter's exit, its threads wait for
        # the GIL in a numpy_function while exit's garbage collection waits for them.
        train_iter = step_fn = loop = inputs = None  # noqa: F841 - closures read these cells.
        gc.collect()
    reporter.close(cfg.upload_timeout)
    left = job.close(cfg.upload_timeout)
    if left:
        raise UserError("these files could not be uploaded; their local copies are kept: " +
                        ", ".join(f"{local} -> {remote}" for local, remote in left))
    return summary, best.pointer


class _Inputs:
    """The distributed datasets of the job: training windows or lanes, and validation."""

    def __init__(self, cfg: Config, strategy: tf.distribute.Strategy, place: Placement,
                 plan: DataPlan):
        self.cfg, self.strategy, self.place, self.plan = cfg, strategy, place, plan

    def _windows(self, regions, shift, steps, shuffle, start, repeat, batch):
        cfg, place, plan = self.cfg, self.place, self.plan
        return lambda ctx: window_pipeline.dataset(
            regions, plan.tokenizer, cfg, batch_size=batch, shift=shift, steps=steps,
            replicas_per_worker=place.replicas_per_worker, sharding=plan.sharding,
            shuffle=shuffle, start_step=start, repeat=repeat)

    def _lanes(self, regions, steps, start, repeat, batch):
        cfg, place, plan = self.cfg, self.place, self.plan
        return lambda ctx: lane_pipeline.lanes_dataset(
            regions, plan.tokenizer, cfg, batch_size=batch, steps=steps,
            replicas_per_worker=place.replicas_per_worker, sharding=plan.sharding,
            start_step=start, repeat=repeat, rotate=repeat and cfg.rotate_lanes,
            reset_prob=cfg.state_reset_prob if repeat else 0.0)

    def train_steps(self, trainable: Trainable, step: int):
        """(the training iterator, a function running one step) from `step` on."""
        cfg, plan, strategy = self.cfg, self.plan, self.strategy
        parts = distribution.batch_parts(cfg, training=True), distribution.batch_parts(cfg)
        if max(parts) > 1:
            logging.info("each batch's rows run in parts side by side, one op per core: %d "
                         "in training, %d in validation", *parts)
        train_step = steps.train_step(cfg, strategy, trainable.model, trainable.optimizer,
                                      cfg.batch_size * self.place.replicas, trainable.average,
                                      tokenization.chars_table(plan.tokenizer), parts[0])
        if cfg.carry_state:
            train_iter = iter(strategy.distribute_datasets_from_function(
                self._lanes(plan.train_regions, plan.pass_steps, step, True, cfg.batch_size)))
            return train_iter, steps.CarriedSteps(train_step, train_iter, strategy,
                                                  trainable.model, cfg.batch_size)
        train_iter = iter(strategy.distribute_datasets_from_function(self._windows(
            plan.train_regions, cfg.shift, plan.pass_steps, True, step, True, cfg.batch_size)))
        return train_iter, lambda: train_step(train_iter)

    def validation(self, model: keras.Model):
        """A function giving the validation metrics (windowed, and carried as carried_*)."""
        cfg, plan = self.cfg, self.plan
        if not plan.val_steps:
            return dict
        evaluator = evaluation.Evaluator(self.strategy, model, cfg.objective,
                                         token_chars=tokenization.chars_table(plan.tokenizer),
                                         parts=distribution.batch_parts(cfg))
        windows = self._windows(plan.val_regions, cfg.seq_length, plan.val_steps, False, 0,
                                False, plan.val_batch)
        lanes = plan.val_lanes and self._lanes(plan.val_regions, plan.val_lane_steps, 0, False,
                                               plan.val_lanes)

        def evaluate() -> dict[str, float]:
            metrics = models.metrics(evaluator.windowed(windows))
            if lanes:
                carried = models.metrics(evaluator.carried(lanes, plan.val_lanes))
                metrics.update({f"carried_{k}": v for k, v in carried.items()})
            return metrics

        return evaluate


def export_best(cfg: Config, pointer: dict[str, Any]) -> None:
    """Copies what generation needs into --model_dir (Vertex AI's $AIP_MODEL_DIR)."""
    for name in pointer["files"]:
        storage.copy_file(storage.join(cfg.job_dir, name), storage.join(cfg.model_dir, name))
    storage.write_text(storage.join(cfg.model_dir, checkpoints.BEST),
                       json.dumps(pointer, indent=1))
    logging.info("exported the best model to %s", cfg.model_dir)
