"""The epochs-of-steps loop around the compiled train step, and how it stops.

Stopping is one decision for the whole job. SIGTERM (sent before a preemption or VM
maintenance, often to one worker only), a first Ctrl-C and `--train_minutes` are
turned into a flag and a clock reading that every worker hands to one small
all-reduce at the points where the loop reads the step outputs back (every few
steps, at checkpoints and at epoch ends; the same steps on every worker). All
workers read the same sum, so all save one resume checkpoint at the same step and
leave together; the chief's clock is the job's clock, and it is kept in the
checkpoint (`progress["elapsed"]`), so a resumed job continues it.

Early stopping (`--early_stopping_patience`) is decided the same way: the chief
counts the validations since its best checkpoint last improved, that count goes
through the same all-reduce to every worker and into the checkpoint
(`progress["stale"]`), and every worker stops at the same epoch's end once it
reaches the patience. A rerun restores the count and does not train further.

A stop at an epoch's last step saves first, then validates and reports the epoch,
then saves again. The first save keeps the epoch's training sums
(`progress["pending"]`), so a job killed in between validates that epoch first when
it resumes, rather than skip its validation, metrics line and best-checkpoint chance.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import checkpoints
from trainer.config import Config
from trainer.errors import StoppedError, UserError
from trainer.models import metrics
from trainer.training.distribution import Agreement
from trainer.training.optimization import WeightAverage
from trainer.training.reporting import Reporter

# Steps dispatched before their outputs are read back (and the stop is agreed).
READBACK_STEPS = 10


class PreemptedError(StoppedError):
    """SIGTERM or Ctrl-C arrived; a resume checkpoint was saved and uploads were flushed."""


class TrainingDivergedError(UserError):
    """The loss became NaN or infinite."""


class StopSignal:
    """Turns SIGTERM (sent before preemption) and a first Ctrl-C into a flag.

    The loop hands the flag to the next agreement, so the job stops within
    READBACK_STEPS steps on every worker. A second Ctrl-C interrupts at once, as usual.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
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
        logging.warning("%s received: the job saves a resume checkpoint within %d steps%s",
                        name, READBACK_STEPS,
                        " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
        self.received = name

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class Loop:
    """Runs epochs of steps, with the checkpoints, stops and reports between them.

    `elapsed` is the job's agreed elapsed seconds, set at every agreement (every
    READBACK_STEPS steps or sooner) and mirrored into `progress["elapsed"]` (kept in
    the checkpoint) and, with --train_minutes, into `time_progress`, the fraction of
    the budget used, which the learning-rate schedule reads (`optimization.BudgetSchedule`).
    """

    def __init__(self, cfg: Config, steps_per_epoch: int, chars_per_step: float,
                 resume: checkpoints.ResumeCheckpoints, best: checkpoints.BestExporter,
                 reporter: Reporter, progress: dict[str, tf.Variable], step_fn, evaluate,
                 model: keras.Model, optimizer: keras.optimizers.Optimizer,
                 agreement: Agreement, time_progress: tf.Variable | None = None,
                 average: WeightAverage | None = None):
        self.cfg, self.steps_per_epoch, self.chars_per_step = cfg, steps_per_epoch, chars_per_step
        self.resume, self.best, self.reporter, self.progress = resume, best, reporter, progress
        self.step_fn, self.evaluate = step_fn, evaluate
        self.model, self.optimizer, self.agreement = model, optimizer, agreement
        self.time_progress = time_progress
        # Evaluation, the best checkpoint and the sample use the averaged weights.
        self.averaged = average.applied if average else contextlib.nullcontext
        self.elapsed = float(progress["elapsed"].numpy())
        self.stop_by: str | None = None
        self.total_steps = 0  # Set by `run`.
        self.clock_ran_out = False  # At the last epoch's end, as its validation saw it.
        self.stale = int(progress["stale"].numpy())
        self._time_logged = False

    def out_of_time(self) -> bool:
        """True once the agreed job clock passed --train_minutes."""
        limit = self.cfg.train_minutes
        return bool(limit) and self.elapsed > 60 * limit

    def stopped_early(self) -> bool:
        """True once the agreed count of validations without improvement reached the
        patience (--early_stopping_patience; never when it is 0)."""
        patience = self.cfg.early_stopping_patience
        return bool(patience) and self.stale >= patience

    def agree(self, stop: StopSignal) -> None:
        """One collective: any worker's signal, and the chief's clock and count of
        validations without improvement, for every worker."""
        chief = self.agreement.place.is_chief
        sums = self.agreement.sum([stop.received == "SIGTERM", stop.received == "SIGINT",
                                   self.agreement.elapsed() if chief else 0.0,
                                   self.stale if chief else 0])
        self.elapsed = float(sums[2])
        self.progress["elapsed"].assign(self.elapsed)
        self.stale = int(sums[3])
        self.progress["stale"].assign(self.stale)
        if self.time_progress is not None and self.cfg.train_minutes:
            self.time_progress.assign(min(1.0, self.elapsed / (60 * self.cfg.train_minutes)))
        self.stop_by = "SIGTERM" if sums[0] else ("SIGINT" if sums[1] else None)

    def _log_time_limit(self, step: int) -> None:
        if self._time_logged:
            return  # Seen at an epoch's last step, and again once its validation is done.
        self._time_logged = True
        logging.info("--train_minutes=%g reached at step %d (%.0f s into the job)",
                     self.cfg.train_minutes, step, self.elapsed)

    def _stop(self, stop: StopSignal, step: int, epoch: int) -> None:
        if self.resume.saved_step != step:
            self.resume.save(step, epoch)
        where = "" if stop.received else " (sent to another worker)"
        raise PreemptedError(f"stopped by {self.stop_by}{where} at step {step}; rerun the same "
                             "command to resume", self.stop_by or "SIGTERM")

    def run(self, step: int, total_steps: int) -> dict[str, Any]:
        """Trains from `step` to `total_steps` (or the time limit); returns the last summary."""
        summary: dict[str, Any] = {}
        self.total_steps = total_steps
        with StopSignal() as stop:
            self.agree(stop)
            summary = self._pending_epoch(step, stop)
            while step < total_steps:
                if self.stop_by:
                    self._stop(stop, step, step // self.steps_per_epoch)
                if self.stopped_early():
                    if summary:  # Decided at this run's last epoch end.
                        logging.info("early stopping: %d validation(s) without an improvement "
                                     "of %s (best %.4f); the job stops at step %d",
                                     self.stale, self.cfg.monitor, self.best.best, step)
                    else:
                        logging.warning("the job stopped early (%d validations without an "
                                        "improvement of %s, --early_stopping_patience=%d); "
                                        "raise the patience to train further", self.stale,
                                        self.cfg.monitor, self.cfg.early_stopping_patience)
                    break
                # At an epoch's end the clock that decided its validation decides here
                # too: a clock that ran out while the epoch was reported (sampling, the
                # metrics) ends the job within the next READBACK_STEPS steps, at an
                # epoch end that is validated, not at this one, which was not.
                if self.clock_ran_out if summary else self.out_of_time():
                    if summary:  # Reached at an epoch's end.
                        self._log_time_limit(step)
                    else:
                        logging.warning("the job already used its --train_minutes=%g (%.0f s); "
                                        "raise it to train longer", self.cfg.train_minutes,
                                        self.elapsed)
                    break
                epoch = step // self.steps_per_epoch
                step, totals, rate = self._epoch(step, epoch, stop)
                summary = self._end_epoch(epoch, step, totals, rate, stop)
        return summary

    def _pending_epoch(self, step: int, stop: StopSignal) -> dict[str, Any]:
        """Validates and reports an epoch that a stop saved before its validation (and
        that was killed before the save after it); {} when there is none."""
        pending = self.progress["pending"].numpy()
        if not pending[2] or step % self.steps_per_epoch:
            return {}
        epoch = step // self.steps_per_epoch - 1
        logging.info("epoch %d was saved before its validation: validating it now", epoch + 1)
        return self._end_epoch(epoch, step, pending[:4], float(pending[4]), stop)

    def _end_epoch(self, epoch: int, step: int, totals: np.ndarray, rate: float,
                   stop: StopSignal) -> dict[str, Any]:
        """Validation, the best checkpoint, the report and the resume checkpoint at the
        end of `epoch` (0-based); returns the epoch's summary."""
        epoch_metrics = metrics(totals)
        epoch_metrics["chars_per_sec"] = rate
        epoch_metrics["chars_trained"] = int(step * self.chars_per_step)
        with self.averaged():
            if self._validates(epoch, step):
                epoch_metrics.update({f"val_{k}": v for k, v in self.evaluate().items()})
            # The clock after evaluation, for the rate logged with this epoch (the
            # budget schedule's); agreed again below, after sampling.
            self.agree(stop)
            epoch_metrics["elapsed_sec"] = self.agreement.elapsed()
            improved = False
            if self.cfg.monitor in epoch_metrics:
                improved = self.best.maybe_export(self.model, epoch + 1, step,
                                                  epoch_metrics[self.cfg.monitor])
                # The chief's count is the job's: the next agreement hands it on.
                self.stale = 0 if improved else self.stale + 1
            self.progress["best"].assign(self.best.best)
            self.reporter.epoch_end(epoch + 1, step, epoch_metrics, improved,
                                    self.best.best, self.optimizer)
        # Agreed after evaluation and sampling, which take time: the checkpoint
        # keeps that clock, and a signal that came meanwhile stops the job here.
        self.agree(stop)
        self.progress["pending"].assign(np.zeros(5))
        self.resume.save(step, epoch + 1)
        return {"epoch": epoch + 1, "step": step, **epoch_metrics, "best": self.best.best}

    def _validates(self, epoch: int, step: int) -> bool:
        """Whether `epoch` (0-based, ended at `step`) is validated: every
        --validation_freq epochs and the job's last one, by its step cap or the agreed
        clock (so every worker decides alike)."""
        self.clock_ran_out = self.out_of_time()
        return ((epoch + 1) % self.cfg.validation_freq == 0 or step >= self.total_steps
                or self.clock_ran_out)

    def _epoch(self, step: int, epoch: int, stop: StopSignal
               ) -> tuple[int, np.ndarray, float]:
        """Trains to the end of `epoch` (or a stop); returns the step reached, the loss
        sums and the chars trained per second."""
        cfg, per_epoch = self.cfg, self.steps_per_epoch
        first, start = step, time.time()
        bar = keras.utils.Progbar(per_epoch, verbose=1 if sys.stdout.isatty() else 2,
                                  stateful_metrics=["loss", "accuracy", "nats_per_char", "bpc"])
        bar.update(step - epoch * per_epoch)
        totals = np.zeros(4)
        pending: list[tf.Tensor] = []  # Read back every few steps, so steps can queue up.
        while step < (epoch + 1) * per_epoch:
            pending.append(self.step_fn())
            step += 1
            due = bool(cfg.checkpoint_every_steps) and step % cfg.checkpoint_every_steps == 0
            # The same steps on every worker: nothing local (a signal, a clock) decides them.
            if not (len(pending) >= READBACK_STEPS or due or step % per_epoch == 0):
                continue
            totals += np.sum([p.numpy() for p in pending], axis=0)
            pending = []
            if not np.isfinite(totals[0]):
                raise TrainingDivergedError(f"loss became {totals[0]} at step {step}; lower "
                                            "--learning_rate or set --clipnorm")
            bar.update(step - epoch * per_epoch, list(metrics(totals).items()))
            self.progress["step"].assign(step)
            self.agree(stop)
            if self.stop_by and step % per_epoch == 0:
                # The epoch's last step: saved now, then `run` validates and reports the
                # epoch before it stops. The save keeps the epoch's sums: if the job is
                # killed before the save after validation, the resume validates first.
                self.progress["pending"].assign([*totals, self._rate(step - first, start)])
                self.resume.save(step, epoch)
                break
            if self.stop_by:
                self._stop(stop, step, epoch)
            if self.out_of_time():
                self._log_time_limit(step)
                break
            if due and step % per_epoch:
                self.resume.save(step, epoch)
        return step, totals, self._rate(step - first, start)

    def _rate(self, steps: int, start: float) -> float:
        return steps * self.chars_per_step / max(time.time() - start, 1e-9)
