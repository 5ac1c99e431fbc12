"""The training loop: one custom loop for every tf.distribute strategy.

Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy, so the step is a
`tf.function` around `strategy.run` with a GradientTape, used by the one-device,
mirrored and multi-worker strategies alike. Around it: resume checkpoints
(every epoch, every N steps and on SIGTERM), the best checkpoint by the
monitored loss, TensorBoard, a sample per epoch, and background uploads. The
epochs-of-steps loop and the job-wide stop decision are in trainer/loop.py.
"""

from __future__ import annotations

import gc
import json
import math
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from trainer import checkpoints, models, storage
from trainer.config import Config, incompatibilities
from trainer.data import index, lane_pipeline, window_pipeline
from trainer.data.vocabulary import Vocabulary
from trainer.errors import UserError
from trainer.training import distribution, evaluation, optimization, steps
from trainer.training.loop import Loop, PreemptedError, TrainingDivergedError  # noqa: F401 - task, tests
from trainer.training.reporting import Reporter


def _prepare_data(cfg: Config, job: checkpoints.JobDir, strategy, place):
    """Scans the corpus (split across workers), and loads or builds the vocabulary.

    A resumed job (vocab.json present) reads again only the files whose fingerprint
    changed since the scan recorded in shards.json; a restart on a large bucket corpus
    then costs one metadata request per file instead of a full read.
    """
    saved = job.read("vocab.json")
    corpus = index.prepare(
        storage.expand_patterns(cfg.train_data),
        storage.expand_patterns(cfg.val_data) if cfg.val_data else [],
        lowercase=cfg.lowercase, piece_bytes=cfg.piece_bytes, read=job.read, write=job.write,
        reuse=saved is not None, worker=place.worker, num_workers=place.num_workers,
        combine=distribution.sum_over_workers(strategy, place))
    vocab = (Vocabulary.from_json(saved) if saved
             else Vocabulary.from_counts(corpus.counts, cfg.lowercase))
    train_regions, val_regions = index.make_regions(corpus, cfg.window, cfg.val_fraction)
    return vocab, train_regions, val_regions, sum(f.chars for f in corpus.split("train"))


def _check_jit_compile(cfg: Config) -> None:
    """--jit_compile cannot work where the LSTMs run the cuDNN kernel: say so up front."""
    if cfg.jit_compile and tf.config.list_logical_devices("GPU"):
        raise UserError("--jit_compile does not work on a GPU: XLA has no kernel for the cuDNN "
                        "LSTM (CudnnRNNV3), which is the fast path there; drop --jit_compile")


def _check_precision(cfg: Config) -> None:
    """mixed_bfloat16 cannot work where the LSTMs run the cuDNN kernel: say so up front."""
    if cfg.precision == "mixed_bfloat16" and tf.config.list_logical_devices("GPU"):
        raise UserError("--precision=mixed_bfloat16 does not work on a GPU: the cuDNN LSTM "
                        "kernel takes float16, float32 or float64 only; use "
                        "--precision=mixed_float16 there")


def cpu_has_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 AVX512_BF16 or AMX-BF16 flags).

    Elsewhere oneDNN emulates bfloat16 and mixed_bfloat16 runs slower than float32.
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = {word for line in f if line.startswith("flags")
                     for word in line.split(":", 1)[-1].split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(cfg: Config, cpuinfo: str = "/proc/cpuinfo") -> Config:
    """Replaces --precision=auto with what this machine runs best (see Config.precision)."""
    if cfg.precision != "auto":
        return cfg
    if tf.config.list_logical_devices("GPU"):
        precision, why = "float32", "a GPU"
    elif cpu_has_bfloat16(cpuinfo):
        precision, why = "mixed_bfloat16", "CPU with bfloat16 instructions, no GPU"
    else:
        precision, why = "float32", "CPU without bfloat16 instructions"
    logging.info("--precision=auto: %s (%s)", precision, why)
    return cfg.replace(precision=precision)


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

    Every worker of a multi-worker job resumes from the chief's checkpoint, and all
    of them stop at the same step (see trainer/loop.py).

    Returns:
      A summary: best value, last epoch's metrics, steps, chars trained ({} when the
      job directory already holds the whole run).

    Raises:
      UserError: bad data, an incompatible job directory, a diverged loss, a cluster
        that cannot work, another worker that stopped or failed.
      PreemptedError: SIGTERM or Ctrl-C arrived (on any worker); a resume checkpoint
        was saved.
    """
    strategy, place = distribution.make_strategy(cfg)
    try:
        return _train(cfg, strategy, place)
    except distribution.PEER_ERRORS as err:
        lost = distribution.lost_worker(err, place)
        if lost is None:
            raise
        raise lost from err


def _train(cfg: Config, strategy: tf.distribute.Strategy,
           place: distribution.Placement) -> dict[str, Any]:
    _check_jit_compile(cfg)
    cfg = resolve_precision(cfg)
    _check_precision(cfg)
    global_batch = cfg.batch_size * place.replicas
    if cfg.monitor.startswith("val_") and not (cfg.val_data or cfg.val_fraction):
        logging.warning("no validation data (--val_data or --val_fraction): monitoring loss")
        cfg = cfg.replace(monitor="loss")
    logging.info("config:\n%s", cfg.to_json())
    logging.info("batch %d per replica x %d replica(s) = global batch %d",
                 cfg.batch_size, place.replicas, global_batch)
    job = checkpoints.JobDir(cfg.job_dir, cfg.local_dir, writer=place.is_chief)
    _check_job_dir(cfg, job)
    vocab, train_regions, val_regions, train_chars = _prepare_data(cfg, job, strategy, place)
    sharding = window_pipeline.Sharding(place.worker, place.num_workers)
    pass_steps = (lane_pipeline.lane_steps(train_regions, cfg.seq_length, cfg.batch_size
                                            * place.replicas_per_worker, sharding)
                  if cfg.carry_state else window_pipeline.steps_per_pass(
        train_regions, cfg.window, cfg.shift, cfg.batch_size, place.replicas_per_worker, sharding))
    if pass_steps < 1 and cfg.carry_state:
        raise UserError(f"the training data is too short for {global_batch} lanes of more "
                        f"than {cfg.seq_length} chars each (--carry_state)")
    if pass_steps < 1:
        raise UserError(f"the training data holds fewer windows than one global batch of "
                        f"{global_batch} (seq_length {cfg.seq_length}, shift {cfg.shift})")
    crossing, windows = window_pipeline.crossing_windows(train_regions, cfg.window, cfg.shift)
    logging.info("a pass trains on %d of %d windows: %d (%.3f%%) cross a piece boundary, %d do "
                 "not fill the last global batch", pass_steps * global_batch, windows + crossing,
                 crossing, 100 * crossing / max(windows + crossing, 1),
                 windows - pass_steps * global_batch)
    steps_per_epoch = cfg.steps_per_epoch or pass_steps
    val_steps, val_batch, val_lanes, val_lane_steps = 0, cfg.batch_size, 0, 0
    if val_regions:
        # Every validation window is scored once: each worker's share is padded with
        # invalid rows up to the largest share, in batches no larger than needed.
        most = max(window_pipeline.windows_per_worker(val_regions, cfg.window, cfg.seq_length,
                                                     place.num_workers))
        if most < 1:
            raise UserError(f"the validation data holds no window of {cfg.window} chars")
        val_batch = max(1, min(cfg.batch_size, -(-most // place.replicas_per_worker)))
        val_steps = -(-most // (val_batch * place.replicas_per_worker))
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
        # elapsed: the job's agreed seconds so far (the chief's clock), set by the loop.
        progress = {"step": tf.Variable(0, dtype=tf.int64, trainable=False),
                    "best": tf.Variable(math.inf, dtype=tf.float64, trainable=False),
                    "elapsed": tf.Variable(0.0, dtype=tf.float64, trainable=False)}
        model = models.build_model(cfg, vocab.size)
        optimizer, time_progress = optimization.build_optimizer(cfg, total_steps)
        optimizer.build(model.trainable_variables)
    keras.mixed_precision.set_dtype_policy("float32")
    average = (optimization.WeightAverage(strategy, model, cfg.ema_momentum) if cfg.ema_momentum
               else None)
    # A checkpoint written without averages restores none: their count stays 0, and the
    # first step starts them over from the weights.
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, **progress,
                               **({"weight_average": average} if average else {}))
    resume = checkpoints.ResumeCheckpoints(job, ckpt, cfg.keep_checkpoints)
    restored = resume.restore()
    step = int(progress["step"].numpy())
    if restored:
        logging.info("resumed from %s at step %d (epoch %d)", restored["prefix"], step,
                     step // steps_per_epoch + 1)
    # The first collective after the setup: a worker that failed in it has exited by now.
    agreement = distribution.Agreement(strategy, place, float(progress["elapsed"].numpy()))
    agreement.check_same("resume step", step)
    best = checkpoints.BestExporter(job, cfg.monitor, float(progress["best"].numpy()))
    for lstm in models.lstm_layers(model):
        if not models.cudnn_eligible(lstm):
            logging.warning("%s is not eligible for the cuDNN kernel", lstm.name)

    def dataset_fn(regions, shift, steps, shuffle, start, repeat, batch=cfg.batch_size):
        return lambda ctx: window_pipeline.dataset(
            regions, vocab, cfg, batch_size=batch, shift=shift, steps=steps,
            replicas_per_worker=place.replicas_per_worker, sharding=sharding, shuffle=shuffle,
            start_step=start, repeat=repeat)

    def lanes_fn(regions, steps, start, repeat, batch=cfg.batch_size):
        return lambda ctx: lane_pipeline.lanes_dataset(
            regions, vocab, cfg, batch_size=batch, steps=steps,
            replicas_per_worker=place.replicas_per_worker, sharding=sharding, start_step=start,
            repeat=repeat, rotate=repeat and cfg.rotate_lanes,
            reset_prob=cfg.state_reset_prob if repeat else 0.0)

    train_step = steps.train_step(cfg, strategy, model, optimizer, global_batch, average)
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
    loop = Loop(cfg, steps_per_epoch, global_batch * cfg.seq_length, resume, best, reporter,
                progress, step_fn, evaluate, model, optimizer, agreement, time_progress, average)
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
    finally:
        # Stop the input pipeline now: left to the interpreter's exit, its threads wait for
        # the GIL in a numpy_function while exit's garbage collection waits for them.
        train_iter = step_fn = loop = None  # noqa: F841 - the step closure reads this cell.
        gc.collect()
    reporter.close(cfg.upload_timeout)
    left = job.close(cfg.upload_timeout)
    if left:
        raise UserError("these files could not be uploaded; their local copies are kept: " +
                        ", ".join(f"{local} -> {remote}" for local, remote in left))
    if place.is_chief and cfg.model_dir and best.pointer:
        _export_model(cfg, best.pointer)
    return summary


def _lanes_for(regions, cfg: Config, batch: int, place, sharding) -> tuple[int, int]:
    """(lanes per replica, steps) for carried validation: up to `batch` lanes, fewer
    when the text is too short for one step of that many; (0, 0) when none fits."""
    while batch:
        count = lane_pipeline.lane_steps(regions, cfg.seq_length,
                                          batch * place.replicas_per_worker, sharding)
        if count:
            return batch, min(count, cfg.val_steps or count)
        batch //= 2
    return 0, 0


def _evaluate(evaluator: evaluation.Evaluator, windows_fn, lanes_fn, lanes: int
              ) -> dict[str, float]:
    """Windowed metrics (loss, ...) and carried ones (carried_loss, ...), without prefix."""
    metrics = models.metrics(evaluator.windowed(windows_fn))
    if lanes_fn:
        carried = models.metrics(evaluator.carried(lanes_fn, lanes))
        metrics.update({f"carried_{k}": v for k, v in carried.items()})
    return metrics


def _export_model(cfg: Config, pointer: dict[str, Any]) -> None:
    """Copies what generation needs into --model_dir (Vertex AI's $AIP_MODEL_DIR)."""
    for name in pointer["files"]:
        storage.copy_file(storage.join(cfg.job_dir, name), storage.join(cfg.model_dir, name))
    storage.write_text(storage.join(cfg.model_dir, checkpoints.BEST),
                       json.dumps(pointer, indent=1))
    logging.info("exported the best model to %s", cfg.model_dir)
