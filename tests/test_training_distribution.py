"""Multi-worker jobs as the shipped specs run them: real processes with TF_CONFIG on loopback.

Every worker gets the same command (the tiny preset with dropout 0.2, as every spec
trains with dropout) and one shared job dir, local or gs:// (the storage emulator).
Each test has its own timeout, and `LocalCluster` kills every worker's process group
when the test leaves it, failed or not.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf
from cluster import REPO, LocalCluster, job_args, latest_step, write_corpus

from trainer import storage
from trainer.config import Config
from trainer.errors import UserError
from trainer.training import distribution

TIMEOUT = 240  # Seconds any one cluster may take, on a loaded 2-core machine.


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


def _env(tmp_path) -> dict[str, str]:
    """A temp dir per test, so the workers' private folders can be seen (and must go)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return {"TMPDIR": str(tmp)}


def _private_folders(tmp_path) -> list[str]:
    return glob.glob(str(tmp_path / "tmp" / "char-lstm-worker-*"))


def _step(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match, text[-3000:]
    return int(match.group(1))


def _done(log: str) -> str:
    lines = [line for line in log.splitlines() if line.startswith("done:")]
    assert len(lines) == 1, log[-3000:]
    return lines[0].split(", chars_per_sec")[0]


def _run(args, tmp_path, name: str, **kwargs) -> tuple[list[int], list[str]]:
    with LocalCluster(args, str(tmp_path / name), env=_env(tmp_path), **kwargs) as cluster:
        codes = cluster.wait(TIMEOUT)
        return codes, [cluster.log(i) for i in range(cluster.workers)]


def test_sigterm_to_the_non_chief_stops_both_at_one_step_and_every_worker_resumes(
        corpus, tmp_path):
    job = str(tmp_path / "job")
    args = job_args(corpus, job, "--keep_checkpoints=2")
    private_checkpoints = set()
    with LocalCluster(args, str(tmp_path / "first"), env=_env(tmp_path)) as cluster:
        deadline = time.monotonic() + TIMEOUT
        while latest_step(job) < 20:
            assert None in cluster.poll(), cluster.log(0)[-3000:]
            assert time.monotonic() < deadline, cluster.log(0)[-3000:]
            for folder in _private_folders(tmp_path):  # At most --keep_checkpoints.
                names = glob.glob(os.path.join(folder, "ckpt", "ckpt-*.index"))
                assert len(names) <= 2
                private_checkpoints.update(os.path.basename(n) for n in names)
            time.sleep(0.05)
        sent = time.monotonic()
        cluster.signal(1, signal.SIGTERM)
        assert cluster.wait(TIMEOUT) == [143, 143]
        took = max(cluster.ended.values()) - sent
        logs = [cluster.log(0), cluster.log(1)]
    assert took < 30, logs[0][-2000:]
    stopped = [_step(r"stopped by SIGTERM[^\n]* at step (\d+)", log) for log in logs]
    assert "(sent to another worker)" in logs[0].split("stopped by SIGTERM")[-1].splitlines()[0]
    assert stopped[0] == stopped[1] == latest_step(job)  # One step, saved: nothing lost.
    assert private_checkpoints, "the non-chief wrote no checkpoint of its own"
    assert not _private_folders(tmp_path)  # Removed after SIGTERM too.

    codes, logs = _run(args, tmp_path, "rerun")
    assert codes == [0, 0], logs[1][-3000:]
    for log in logs:
        assert f"resumed from ckpt/ckpt-{stopped[0]} at step {stopped[0]}" in log
    assert _done(logs[0]) == _done(logs[1])
    with open(os.path.join(job, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]

    # A rerun of the finished job: nothing to do, and every worker says so with exit 0.
    finished = latest_step(job)
    codes, logs = _run(args, tmp_path, "finished")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for log in logs:
        assert f"at step {finished}" in log and "Traceback" not in log
    assert not _private_folders(tmp_path)


def test_staggered_start_with_train_minutes_stops_every_worker_at_one_step(corpus, tmp_path):
    job = str(tmp_path / "job")
    args = job_args(corpus, job, "--epochs=100", "--train_minutes=0.1")
    codes, logs = _run(args, tmp_path, "first", delays=[0, 5])
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    reached = [_step(r"--train_minutes=0.1 reached at step (\d+)", log) for log in logs]
    assert reached[0] == reached[1] == latest_step(job)
    assert [log.count("reached at step") for log in logs] == [1, 1]  # Said once.
    assert _done(logs[0]) == _done(logs[1])
    # The clock is the job's, kept in the checkpoint: the rerun finds the time used up.
    codes, logs = _run(args, tmp_path, "rerun")
    assert codes == [0, 0], logs[0][-3000:]
    for log in logs:
        assert f"resumed from ckpt/ckpt-{reached[0]} at step {reached[0]}" in log
        assert "already used its --train_minutes=0.1" in log


def test_every_worker_resumes_from_a_bucket(gcs_bucket, corpus, tmp_path):
    job = f"{gcs_bucket()}/runs/multi"
    args = job_args(corpus, job, "--epochs=1", "--checkpoint_every_steps=0")
    codes, logs = _run(args, tmp_path, "first")
    assert codes == [0, 0], logs[0][-3000:]
    step = json.loads(storage.read_text(f"{job}/ckpt/latest.json"))["checkpoints"][0]["step"]
    # New machines: the chief's staging folder is gone too, so both read the bucket.
    for path in glob.glob(str(tmp_path / "tmp" / "char-lstm" / "*")):
        subprocess.run(["rm", "-rf", path], check=True)
    codes, logs = _run([*args[:-2], "--epochs=2"], tmp_path, "rerun")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for log in logs:
        assert f"resumed from ckpt/ckpt-{step} at step {step}" in log
    assert _done(logs[0]) == _done(logs[1])
    assert not _private_folders(tmp_path)


def test_a_word_job_on_two_workers_picks_the_vocabulary_of_one(tmp_path):
    # Each worker's share is one file (a file goes whole to the worker whose share of the
    # bytes holds its first byte: a.txt is padded past half of all the bytes) of its own
    # 80 words, 10 times each; " both" is 6 times in each, so the job's most frequent
    # word, but outside either share's top 2 x max_vocab candidates: only the exact
    # exchange finds it.
    for name, letter, pad in (("a", "p", 600), ("b", "q", 1)):
        words = [f" {letter}{x}{y}" for x in "abcdefgh" for y in "abcdefghij"] * 10
        words += [" both"] * 6
        random.Random(letter).shuffle(words)
        (tmp_path / f"{name}.txt").write_text("".join(words) + "\n" * pad)
    (tmp_path / "val.txt").write_text(" both pab qab\n" * 20)
    args = ["--preset=tiny", f"--train_data={tmp_path}/[ab].txt",
            f"--val_data={tmp_path}/val.txt", "--tokenizer=word", "--max_vocab=34",
            "--epochs=1", "--steps_per_epoch=3", "--batch_size=4", "--rnn_units=16",
            "--sample_length=0"]
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", **_env(tmp_path)}
    env.pop("TF_CONFIG", None)
    one = subprocess.run([sys.executable, "-m", "trainer.task", *args,
                          f"--job_dir={tmp_path}/one"], cwd=REPO, env=env, timeout=TIMEOUT,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    codes, logs = _run([*args, f"--job_dir={tmp_path}/two"], tmp_path, "word")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    words = [json.loads((tmp_path / job / "tokenizer.json").read_text())["words"]
             for job in ("one", "two")]
    assert words[0] == words[1] and words[0][0] == " both"


def test_a_worker_that_fails_before_training_stops_the_job_with_one_line_each(corpus, tmp_path):
    job = str(tmp_path / "job")
    started = time.monotonic()
    codes, logs = _run(job_args(corpus, job), tmp_path, "first",
                       extra={1: [f"--train_data={tmp_path}/missing/*.txt"]})
    assert time.monotonic() - started < 120
    assert codes == [1, 1], logs[0][-3000:]
    for log, expected in zip(logs, ["another worker of this job stopped or failed",
                                    "matched no files"]):
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], log[-3000:]
        assert "Traceback" not in log
    assert not _private_folders(tmp_path)


def test_a_cluster_that_cannot_work_stops_before_training_with_one_line(corpus, tmp_path):
    # The other cases of a TF_CONFIG that cannot work: tests/test_training_cloud.py.
    tf_config = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                 "task": {"type": "worker", "index": 0}}
    env = {**os.environ, "TF_CONFIG": json.dumps(tf_config)}
    result = subprocess.run(
        [sys.executable, "-m", "trainer.task", *job_args(corpus, str(tmp_path / "job")),
         "--strategy=mirrored"], cwd=REPO, env={**env, "PYTHONPATH": REPO},
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--strategy=mirrored trains on one machine, but TF_CONFIG " \
        "describes a cluster of 2 workers" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "job")  # Nothing was written: it stopped up front.


def test_a_killed_peer_ends_the_survivor_with_one_line_and_no_traceback(corpus, tmp_path):
    # A worker that dies mid-training (SIGKILL: no chance to say so) must not leave the
    # other hanging, nor printing tracebacks from library teardown after its one line.
    job = str(tmp_path / "job")
    with LocalCluster(job_args(corpus, job, "--epochs=100"), str(tmp_path / "run"),
                      env=_env(tmp_path)) as cluster:
        deadline = time.monotonic() + TIMEOUT
        while latest_step(job) < 10:
            assert None in cluster.poll(), cluster.log(0)[-3000:]
            assert time.monotonic() < deadline, cluster.log(0)[-3000:]
            time.sleep(0.05)
        killed = time.monotonic()
        cluster.signal(1, signal.SIGKILL)
        codes = cluster.wait(TIMEOUT)
        took = cluster.ended[0] - killed
        log = cluster.log(0)
    assert codes[0] == 1 and took < 90, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another worker of this job stopped or failed" in errors[0], (
        log[-3000:])
    assert "Traceback" not in log and "Exception ignored" not in log, log[-3000:]


def test_a_lost_peer_becomes_one_line_only_in_a_multi_worker_job():
    err = tf.errors.UnavailableError(None, None, "Collective ops is aborted by: Error reported "
                                     "from /job:worker/task:1: The following tasks are unhealthy "
                                     "(stopped sending heartbeats):\n/job:worker/replica:0/task:1")
    lost = distribution.lost_worker(err, distribution.Placement(2, 0, True, 2))
    assert isinstance(lost, distribution.WorkerLostError) and "\n" not in str(lost)
    assert "another worker of this job stopped or failed" in str(lost)
    assert "unhealthy" in str(lost)
    assert distribution.lost_worker(err, distribution.Placement(1, 0, True, 2)) is None
    assert distribution.lost_worker(ValueError("x"), distribution.Placement(2, 0, True, 2)) is None


def test_early_stopping_is_one_decision_for_every_worker(corpus, tmp_path):
    # A rate too small to move a float32 weight: every validation after the first ties,
    # and the chief's count of them, agreed with the clock, stops both workers.
    job = str(tmp_path / "job")
    args = job_args(corpus, job, "--epochs=20", "--steps_per_epoch=2", "--val_steps=1",
                    "--learning_rate=1e-12", "--lr_schedule=constant",
                    "--early_stopping_patience=2")
    codes, logs = _run(args, tmp_path, "first")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    stopped = [_step(r"early stopping: 2 validation\(s\) without an improvement of val_loss "
                     r"\(best [0-9.]+\); the job stops at step (\d+)", log) for log in logs]
    assert stopped[0] == stopped[1] == latest_step(job) == 6
    assert _done(logs[0]) == _done(logs[1])
    with open(os.path.join(job, "metrics.jsonl")) as f:
        assert [json.loads(line)["improved"] for line in f] == [True, False, False]
    # The count came back with the chief's checkpoint: the same command trains no further.
    codes, logs = _run(args, tmp_path, "rerun")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for log in logs:
        assert "resumed from ckpt/ckpt-6 at step 6" in log and "the job stopped early" in log
    assert latest_step(job) == 6


# CPU threads: --intra_op_threads / --inter_op_threads, -1 (auto) by default.

def _threads(cpus: int, gpu: bool = False, environ: dict | None = None, **flags) -> tuple:
    cfg = Config(train_data="t.txt", job_dir="j", **{"rnn_units": 256, **flags}).validate()
    counts = distribution.thread_counts(cfg, cpus, gpu, environ or {})
    return counts["intra_op_threads"], counts["inter_op_threads"]


def test_auto_threads_run_ops_whole_and_two_at_once_only_on_a_small_cpu_machine():
    assert _threads(1) == _threads(2) == (1, 2)
    assert _threads(3) == _threads(64) == (0, 0)  # TensorFlow's choice.
    assert _threads(2, gpu=True) == (0, 0)
    assert _threads(2, rnn_units=512) == (0, 0)  # Products big enough to split.
    # TensorFlow's environment variables win over auto, each for its own pool.
    assert _threads(2, environ={"TF_NUM_INTRAOP_THREADS": "2"}) == (0, 2)
    assert _threads(2, environ={"TF_NUM_INTEROP_THREADS": "4"}) == (1, 0)
    # Numbers are taken as given, whatever the machine and the environment.
    assert _threads(2, intra_op_threads=4, inter_op_threads=0) == (4, 0)
    assert _threads(16, environ={"TF_NUM_INTRAOP_THREADS": "2"}, intra_op_threads=3) == (3, 0)
    with pytest.raises(UserError, match=r"^--inter_op_threads must be -1 \(auto\)"):
        Config(train_data="t.txt", job_dir="j", inter_op_threads=-2).validate()


def test_batch_parts_follow_the_ops_run_at_once_when_each_has_one_thread():
    def parts(cpus, **flags):
        cfg = Config(train_data="t.txt", job_dir="j", **flags).validate()
        return distribution.batch_parts(cfg, cpus)

    assert parts(2, intra_op_threads=1, inter_op_threads=2) == 2  # Auto on a small machine.
    assert parts(1, intra_op_threads=1, inter_op_threads=2) == 1  # One core: nothing to gain.
    assert parts(8, intra_op_threads=1, inter_op_threads=4) == 4
    assert parts(2, intra_op_threads=0, inter_op_threads=0) == 1  # TensorFlow's pools.
    assert parts(2, intra_op_threads=2, inter_op_threads=2) == 1  # Each op split already.
    assert parts(2, intra_op_threads=1, inter_op_threads=1) == 1
    # Training steps are cut only in float32.
    for precision, want in (("float32", 2), ("mixed_bfloat16", 1), ("mixed_float16", 1)):
        cfg = Config(train_data="t.txt", job_dir="j", intra_op_threads=1, inter_op_threads=2,
                     precision=precision).validate()
        assert distribution.batch_parts(cfg, 2, training=True) == want
        assert distribution.batch_parts(cfg, 2) == 2


def _one_cpu() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def test_usable_cpus_follow_the_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    v2, v1, none = tmp_path / "v2", tmp_path / "v1", tmp_path / "none"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # docker run --cpus=1.5
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert distribution.usable_cpus(str(v2)) == min(affinity, 2)
    assert distribution.usable_cpus(str(v1)) == 1
    assert distribution.usable_cpus(str(none)) == affinity
    (v2 / "cpu.max").write_text("max 100000\n")
    assert distribution.usable_cpus(str(v2)) == affinity


_POOLS = """
import collections, json, os, sys
from trainer.config import Config
from trainer.training import distribution
import tensorflow as tf
cfg = distribution.set_threads(Config(**json.loads(sys.argv[1])))
tf.function(lambda x: tf.matmul(x, x) + tf.matmul(x + 1.0, x))(tf.ones([64, 64]))
names = collections.Counter(open(f"/proc/self/task/{t}/comm").read().strip()
                            for t in os.listdir("/proc/self/task"))
print(json.dumps([cfg.intra_op_threads, cfg.inter_op_threads, names["tf_Compute"]]))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
@pytest.mark.parametrize("flags,env,expected", [
    ({"rnn_units": 256}, {}, [1, 2, 2]),                # auto on one CPU: 2 ops at once
    ({"rnn_units": 256, "inter_op_threads": 3}, {}, [1, 3, 3]),
    ({"rnn_units": 256}, {"TF_NUM_INTEROP_THREADS": "4"}, [1, 0, 4]),  # TF reads its variable
    ({"rnn_units": 512, "inter_op_threads": 3}, {}, [0, 3, 3]),
])
def test_the_thread_pools_tensorflow_starts_are_the_ones_asked_for(flags, env, expected):
    # On one CPU (the affinity mask) whatever this machine has, so auto is the small case;
    # TensorFlow names its inter-op pool's threads tf_Compute.
    done = subprocess.run([sys.executable, "-c", _POOLS, json.dumps(flags)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2",
                               **env},
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=_one_cpu)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
