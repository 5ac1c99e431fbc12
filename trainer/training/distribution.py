"""Sizes TensorFlow's CPU thread pools, picks the tf.distribute strategy, says where this
process stands in it, makes the decisions every worker shares, and clips gradients across
its replicas as one device would."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import models
from trainer.config import Config
from trainer.errors import UserError
from trainer.training import cloud


@dataclasses.dataclass(frozen=True)
class Placement:
    """This process's place in the job."""

    num_workers: int
    worker: int
    is_chief: bool
    replicas: int

    @property
    def replicas_per_worker(self) -> int:
        return self.replicas // self.num_workers


# Up to this many usable CPUs (and no GPU), and for LSTMs up to this wide, auto threading
# runs each op on one thread and two ops at once: such products are small, and splitting
# each over both cores cost more than it gained; 512 units gained from the split
# (BENCHMARKS.md, *CPU threads*).
SMALL_MACHINE_CPUS = 2
SMALL_MODEL_UNITS = 256
THREAD_ENV = {"intra_op_threads": "TF_NUM_INTRAOP_THREADS",
              "inter_op_threads": "TF_NUM_INTEROP_THREADS"}


def usable_cpus(cgroup: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask (taskset, a cpuset), and no more than
    its cgroup's CPU quota allows (`docker run --cpus=2`), rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    return min(cpus, max(1, math.ceil(quota))) if quota else cpus


def _cgroup_quota(cgroup: str) -> float | None:
    """CPUs' worth of time per period the cgroup allows (v2 cpu.max, v1 cfs); None: no limit."""
    for quota_file, period_file in (("cpu.max", None),
                                    ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            with open(os.path.join(cgroup, quota_file), encoding="ascii") as f:
                fields = f.read().split()
            if period_file:
                with open(os.path.join(cgroup, period_file), encoding="ascii") as f:
                    fields.append(f.read().strip())
            quota, period = fields[0], fields[1]
            if quota in ("max", "-1"):
                return None
            return int(quota) / int(period)
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return None


def thread_counts(cfg: Config, cpus: int, gpu: bool,
                  environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """--intra_op_threads and --inter_op_threads with -1 (auto) resolved; 0 = TensorFlow's."""
    small = cpus <= SMALL_MACHINE_CPUS and not gpu and cfg.rnn_units <= SMALL_MODEL_UNITS
    auto = {"intra_op_threads": 1 if small else 0, "inter_op_threads": 2 if small else 0}
    counts = {}
    for name, env in THREAD_ENV.items():
        value = getattr(cfg, name)
        if value == -1:
            value = 0 if environ.get(env) else auto[name]
        counts[name] = value
    return counts


def batch_parts(cfg: Config, cpus: int | None = None, training: bool = False) -> int:
    """Into how many parts evaluation (and a float32 training step) cuts each replica's
    rows, whose passes then run side by side.

    With each op on one thread (what auto picks on a small CPU machine) one pass is a
    chain of small products that keeps one core busy: as many parts as ops run at once
    and CPUs are usable (`cpus`, default `usable_cpus()`), else 1. Evaluation gains
    whatever the precision; training only in float32 (1.35x the `quality` preset's
    chars/s capped at AVX2), since bfloat16's products lose more by being halved than
    the overlap wins (0.8-0.9x; BENCHMARKS.md, *CPU threads*).
    """
    if cfg.intra_op_threads != 1 or cfg.inter_op_threads < 2:
        return 1
    if training and cfg.precision != "float32":
        return 1
    return max(1, min(cfg.inter_op_threads, usable_cpus() if cpus is None else cpus))


def set_threads(cfg: Config) -> Config:
    """Sizes TensorFlow's thread pools per the config; returns it with auto resolved.

    Must run before TensorFlow starts its runtime (before the strategy); a process that
    already started it (a second job in one Python process) keeps its pools, with a warning.
    """
    gpu = bool(tf.config.list_physical_devices("GPU"))  # Physical: does not start the runtime.
    counts = thread_counts(cfg, usable_cpus(), gpu)
    intra, inter = counts["intra_op_threads"], counts["inter_op_threads"]
    threading = tf.config.threading
    now = (threading.get_intra_op_parallelism_threads(),
           threading.get_inter_op_parallelism_threads())
    if (intra, inter) != now:
        try:
            threading.set_intra_op_parallelism_threads(intra)
            threading.set_inter_op_parallelism_threads(inter)
        except RuntimeError:
            logging.warning("TensorFlow already started in this process: keeping its thread "
                            "pools (%d per op, %d ops at once; 0 = its choice)", *now)
            intra, inter = now
    logging.info("threads per op: %s; ops at once: %s", intra or "TensorFlow's choice",
                 inter or "TensorFlow's choice")
    return cfg.replace(intra_op_threads=intra, inter_op_threads=inter)


def make_strategy(cfg: Config) -> tuple[tf.distribute.Strategy, Placement]:
    """Creates the strategy `cfg.strategy` names ('auto' decides from the machine).

    auto: a TF_CONFIG cluster of more than one worker -> multi_worker; more than
    one GPU -> mirrored; otherwise one device.
    """
    cloud.check_cluster(cfg.strategy)
    if cfg.logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.logical_cpus)
        except RuntimeError as err:  # TF was initialised before this call.
            logging.warning("could not split the CPU into logical devices: %s", err)
    # Physical, not logical, devices: listing logical ones starts the TF runtime, and
    # MultiWorkerMirroredStrategy must be created before that.
    name = cfg.strategy
    if name == "auto":
        if cloud.num_workers() > 1:
            name = "multi_worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "multi_worker":
        cloud.prepare_tf_config()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = strategy.cluster_resolver
        num_workers = max(1, cloud.num_workers())
        worker = _worker_index(resolver.task_type, resolver.task_id, num_workers)
        is_chief = cloud.is_chief()
    else:
        gpus = tf.config.list_logical_devices("GPU")
        if name == "mirrored":
            cpus = tf.config.list_logical_devices("CPU")
            devices = [d.name for d in gpus] or [d.name for d in cpus]
            strategy = tf.distribute.MirroredStrategy(devices)
        else:
            strategy = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
        num_workers, worker, is_chief = 1, 0, True
    placement = Placement(num_workers, worker, is_chief, strategy.num_replicas_in_sync)
    if cfg.batch_size < 1 or placement.replicas % num_workers:
        raise UserError(f"{placement.replicas} replicas cannot be split over {num_workers} workers")
    logging.info("strategy %s: %d replica(s) on %d worker(s); this is worker %d%s",
                 name, placement.replicas, num_workers, worker, " (chief)" if is_chief else "")
    return strategy, placement


def _worker_index(task_type: str | None, task_id: int | None, num_workers: int) -> int:
    """Index among chief + workers: the chief is 0, worker i is i (+1 with a chief)."""
    cluster = cloud.tf_config() or {}
    has_chief = bool(cluster.get("cluster", {}).get("chief"))
    if task_type in ("chief", "master"):
        return 0
    index = (task_id or 0) + (1 if has_chief else 0)
    if index >= num_workers:
        raise UserError(f"TF_CONFIG task {task_type}:{task_id} is outside the cluster")
    return index


class WorkerLostError(UserError):
    """Another worker of the job stopped or failed, so this one cannot go on."""


# What a collective raises when a peer process is gone (its heartbeats stopped).
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
               tf.errors.DeadlineExceededError)


def lost_worker(err: BaseException, place: Placement) -> WorkerLostError | None:
    """The one-line error for a collective that failed because a peer went away, else None."""
    if place.num_workers < 2 or not isinstance(err, PEER_ERRORS):
        return None
    detail = next((line.strip() for line in str(err).splitlines()
                   if "unhealthy" in line or "aborted" in line.lower()), "")
    return WorkerLostError(
        f"another worker of this job stopped or failed ({type(err).__name__}"
        f"{': ' + detail[:160] if detail else ''}); see the other workers' logs, then rerun "
        "every worker's command to resume")


class Agreement:
    """Values every worker must see alike, summed over the workers at the same points.

    Each call is one small all-reduce (a few float64s) across the workers; every worker
    must make the same calls in the same order, as with any collective. On one worker
    it costs nothing and returns the values as they are.

    It also keeps the job's clock: `elapsed()` is the chief's seconds since the job
    began (continued from `start_elapsed` on resume), the one clock --train_minutes and
    a time-based schedule read, so that every worker agrees on it.
    """

    def __init__(self, strategy: tf.distribute.Strategy, place: Placement,
                 start_elapsed: float = 0.0):
        self.place = place
        self._start_elapsed, self._started = float(start_elapsed), time.monotonic()
        self._sum = None
        if place.num_workers > 1:
            share = 1.0 / place.replicas_per_worker  # Each worker's replicas add up to 1.

            @tf.function
            def summed(values):
                per_replica = strategy.run(lambda v: v * share, args=(values,))
                return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

            self._sum = summed

    def elapsed(self) -> float:
        """Seconds of the job so far by this process's clock (the chief's is the job's)."""
        return self._start_elapsed + time.monotonic() - self._started

    def sum(self, values: list[float]) -> np.ndarray:
        """The element-wise sum of `values` over the workers (a collective)."""
        local = np.asarray(values, np.float64)
        if self._sum is None:
            return local
        return self._sum(tf.constant(local)).numpy()

    def check_same(self, name: str, value: int) -> None:
        """Raises UserError unless every worker holds the same integer `value`."""
        n = self.place.num_workers
        total, squares = self.sum([value, float(value) ** 2])
        if n > 1 and (total != n * value or squares != n * float(value) ** 2):
            raise UserError(f"the workers disagree on the {name} (this one has {value}, the "
                            f"mean is {total / n:g}); they must share one --job_dir")


def clip_global_norm(grads: list, optimizer: keras.optimizers.Optimizer, clipnorm: float) -> list:
    """Clips the whole global batch's gradient to norm `clipnorm`, as one device would.

    Each replica holds its share of the gradient (the loss is divided by the global
    batch), and the optimizer sums the shares. Keras's `global_clipnorm` clips each
    share before that sum, which lets N replicas through at about N times the norm.
    Here the shares are summed first, the sum is clipped, and each replica hands the
    optimizer an equal 1/N of it, so any replica count trains like one device. This
    costs a second all-reduce of the gradients, only when there are several replicas.
    Under loss scaling the gradients are scaled, so the threshold is scaled too; an
    inf gradient comes out NaN and the LossScaleOptimizer skips that step as before.
    """
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context else 1
    # Dense gradients (the embedding's arrive as IndexedSlices): a char vocabulary is small.
    grads = [tf.convert_to_tensor(g) for g in grads]
    if replicas > 1:
        grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
    threshold = tf.constant(clipnorm, tf.float32)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        threshold = threshold * tf.cast(optimizer.dynamic_scale, tf.float32)
    grads, _ = tf.clip_by_global_norm(grads, threshold)
    if replicas > 1:
        grads = [g / replicas for g in grads]
    return grads


def sum_over_workers(strategy: tf.distribute.Strategy, place: Placement):
    """A function that sums a float64 numpy array over all workers (identity for one).

    Every worker must call it the same number of times with arrays of one shape: it is
    one all-reduce. Each worker's first replica carries the array; the others add zeros.
    """
    if place.num_workers == 1:
        return lambda values: values

    def combine(values):
        if not np.size(values):  # A collective over nothing crashes TensorFlow's CPU kernel.
            return values
        local = tf.constant(values, tf.float64)
        per_replica = strategy.experimental_distribute_values_from_function(
            lambda ctx: local if ctx.replica_id_in_sync_group % place.replicas_per_worker == 0
            else tf.zeros_like(local))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()

    return combine


def zero_states(strategy: tf.distribute.Strategy, model: keras.Model,
                            batch: int):
    """Zero states for every replica (a PerReplica value, or plain tensors on one device)."""
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: models.zero_states(model, batch))
