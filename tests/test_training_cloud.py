"""Tests for trainer/cloud.py: Google Cloud conventions, without TensorFlow or a cloud."""

from __future__ import annotations

import json
import sys
import types

import pytest

from trainer.config import Config
from trainer.errors import UserError
from trainer.training import cloud


def _env(cluster: dict | None = None, task: dict | None = None, **extra) -> dict[str, str]:
    config = dict(extra)
    if cluster is not None:
        config["cluster"] = cluster
    if task is not None:
        config["task"] = task
    return {"TF_CONFIG": json.dumps(config)}


# The shapes the services really send (addresses shortened).
SINGLE_MASTER = _env({"master": ["m-0:2222"]}, {"type": "master", "index": 0},
                     environment="cloud", job={"scale_tier": "BASIC_GPU"})
LEGACY_CLUSTER = {"master": ["m-0:2222"], "worker": ["w-0:2222", "w-1:2222"]}
VERTEX_CLUSTER = {"chief": ["c-0:2222"], "worker": ["w-0:2222", "w-1:2222", "w-2:2222"],
                  "evaluator": ["e-0:2222"]}


@pytest.mark.parametrize("argv, expected", [
    (["task", "--job-dir=gs://b/run"], ["task", "--job_dir=gs://b/run"]),
    (["task", "--job-dir", "gs://b/run", "--epochs=2"], ["task", "--job_dir=gs://b/run",
                                                         "--epochs=2"]),
    (["task", "--epochs=2", "--job-dir"], ["task", "--epochs=2", "--job_dir"]),
    (["task", "--prime=--job-dir x"], ["task", "--prime=--job-dir x"]),
    (["task", "--", "--job-dir", "x"], ["task", "--", "--job-dir", "x"]),
    (["task", "--job-dir=a=b"], ["task", "--job_dir=a=b"]),
])
def test_normalize_argv(argv, expected):
    original = list(argv)
    assert cloud.normalize_argv(argv) == expected
    assert argv == original


def test_apply_environment_fills_only_empty_fields():
    environ = {"AIP_CHECKPOINT_DIR": "gs://b/out/checkpoints/",
               "AIP_TENSORBOARD_LOG_DIR": "gs://b/out/logs/",
               "AIP_MODEL_DIR": "gs://b/out/model/"}
    cfg = cloud.apply_environment(Config(), environ)
    assert (cfg.job_dir, cfg.tensorboard_dir, cfg.model_dir) == (
        "gs://b/out/checkpoints/", "gs://b/out/logs/", "gs://b/out/model/")

    mine = Config(job_dir="runs/x", tensorboard_dir="", model_dir="export/")
    cfg = cloud.apply_environment(mine, environ)
    assert (cfg.job_dir, cfg.tensorboard_dir, cfg.model_dir) == (
        "runs/x", "gs://b/out/logs/", "export/")
    assert mine.tensorboard_dir == ""  # The input is not modified.

    assert cloud.apply_environment(mine, {"AIP_MODEL_DIR": ""}) is mine
    assert cloud.apply_environment(mine, {}) is mine


def test_tuning_trials_get_their_own_folders():
    legacy_trial = _env(LEGACY_CLUSTER, {"type": "master", "index": 0, "trial": "3"})
    cfg = cloud.apply_environment(Config(job_dir="gs://b/job/", model_dir="gs://b/m"),
                                     legacy_trial)
    assert (cfg.job_dir, cfg.tensorboard_dir, cfg.model_dir) == (
        "gs://b/job/trial-3", "", "gs://b/m/trial-3")
    assert cloud.apply_environment(cfg, legacy_trial) == cfg  # Applying twice is harmless.

    # Vertex AI: the AIP_* folders are per trial already and are used as they are.
    vertex_trial = {"CLOUD_ML_TRIAL_ID": "7", "AIP_CHECKPOINT_DIR": "gs://b/out/7/checkpoints/"}
    assert cloud.trial_id(vertex_trial) == "7"
    assert cloud.apply_environment(Config(), vertex_trial).job_dir == "gs://b/out/7/checkpoints/"
    assert cloud.apply_environment(Config(job_dir="runs/x"), vertex_trial).job_dir == (
        "runs/x/trial-7")
    assert cloud.trial_id(SINGLE_MASTER) == ""


def test_without_tf_config_one_chief():
    assert cloud.tf_config({}) is None
    assert cloud.tf_config({"TF_CONFIG": "  "}) is None
    assert cloud.num_workers({}) == 1
    assert cloud.is_chief({})


def test_single_master_is_not_multi_worker():
    assert cloud.num_workers(SINGLE_MASTER) == 1
    assert cloud.is_chief(SINGLE_MASTER)


@pytest.mark.parametrize("task, chief", [
    ({"type": "master", "index": 0}, True),
    ({"type": "worker", "index": 0}, False),
    ({"type": "worker", "index": 1}, False),
])
def test_legacy_cluster(task, chief):
    environ = _env(LEGACY_CLUSTER, task)
    assert cloud.num_workers(environ) == 3
    assert cloud.is_chief(environ) is chief


@pytest.mark.parametrize("task, chief", [
    ({"type": "chief", "index": 0}, True),
    ({"type": "worker", "index": 0}, False),
    ({"type": "evaluator", "index": 0}, False),
])
def test_vertex_cluster_does_not_count_the_evaluator(task, chief):
    environ = _env(VERTEX_CLUSTER, task)
    assert cloud.num_workers(environ) == 4
    assert cloud.is_chief(environ) is chief


@pytest.mark.parametrize("task, chief", [
    ({"type": "worker", "index": 0}, True),
    ({"type": "worker", "index": 1}, False),
    ({"type": "ps", "index": 0}, False),
])
def test_workers_only_cluster_worker_zero_is_chief(task, chief):
    environ = _env({"worker": ["w-0:1", "w-1:1"], "ps": ["p-0:1"]}, task)
    assert cloud.num_workers(environ) == 2
    assert cloud.is_chief(environ) is chief


def test_bad_tf_config_is_a_user_error():
    with pytest.raises(UserError, match="TF_CONFIG is not valid JSON"):
        cloud.num_workers({"TF_CONFIG": "{cluster"})
    with pytest.raises(UserError, match="JSON object"):
        cloud.tf_config({"TF_CONFIG": "[1]"})


def test_prepare_tf_config_renames_master_to_chief():
    environ = _env(LEGACY_CLUSTER, {"type": "master", "index": 0}, environment="cloud")
    cloud.prepare_tf_config(environ)
    config = json.loads(environ["TF_CONFIG"])
    assert config["cluster"] == {"chief": ["m-0:2222"], "worker": ["w-0:2222", "w-1:2222"]}
    assert config["task"] == {"type": "chief", "index": 0}
    assert config["environment"] == "cloud"
    assert cloud.num_workers(environ) == 3 and cloud.is_chief(environ)

    worker = _env(LEGACY_CLUSTER, {"type": "worker", "index": 1})
    cloud.prepare_tf_config(worker)
    config = json.loads(worker["TF_CONFIG"])
    assert "master" not in config["cluster"] and config["task"]["type"] == "worker"
    assert not cloud.is_chief(worker)


def test_prepare_tf_config_leaves_other_configs_alone():
    vertex = _env(VERTEX_CLUSTER, {"type": "chief", "index": 0})
    before = dict(vertex)
    cloud.prepare_tf_config(vertex)
    assert vertex == before
    empty: dict[str, str] = {}
    cloud.prepare_tf_config(empty)
    assert empty == {}


def test_prepare_tf_config_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", SINGLE_MASTER["TF_CONFIG"])
    cloud.prepare_tf_config()
    assert json.loads(cloud.os.environ["TF_CONFIG"])["task"]["type"] == "chief"


def test_metric_reporter_with_a_fake_hypertune(monkeypatch):
    calls = []

    class FakeHyperTune:
        def report_hyperparameter_tuning_metric(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setitem(sys.modules, "hypertune", types.SimpleNamespace(HyperTune=FakeHyperTune))
    reporter = cloud.MetricReporter()
    assert reporter.enabled
    reporter.report("val_loss", 1.25, 300)
    assert calls == [{"hyperparameter_metric_tag": "val_loss", "metric_value": 1.25,
                      "global_step": 300}]


def test_metric_reporter_never_raises(monkeypatch, caplog):
    class BrokenHyperTune:
        def __init__(self):
            raise PermissionError("/tmp/hypertune is read-only")

    monkeypatch.setitem(sys.modules, "hypertune", types.SimpleNamespace(HyperTune=BrokenHyperTune))
    reporter = cloud.MetricReporter()
    reporter.report("val_loss", 1.0, 1)
    reporter.report("val_loss", 0.5, 2)
    assert not reporter.enabled
    assert caplog.text.count("tuning metrics disabled") == 1


TWO_WORKERS = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}


@pytest.mark.parametrize("environ, strategy", [
    ({}, "auto"), ({}, "one_device"), ({}, "mirrored"),
    (_env(TWO_WORKERS, {"type": "worker", "index": 1}), "auto"),
    (_env(TWO_WORKERS, {"type": "worker", "index": 1}), "multi_worker"),
    (_env(VERTEX_CLUSTER, {"type": "chief", "index": 0}), "multi_worker"),
    (_env(LEGACY_CLUSTER, {"type": "master", "index": 0}), "auto"),
    (SINGLE_MASTER, "mirrored"), (SINGLE_MASTER, "multi_worker"),
    (_env(environment="cloud"), "auto"),  # No cluster at all: one machine.
])
def test_check_cluster_accepts_what_can_run(environ, strategy):
    cloud.check_cluster(strategy, environ)


@pytest.mark.parametrize("environ, strategy, message", [
    (_env(TWO_WORKERS), "auto", "cluster of 2 workers but no task"),
    (_env(TWO_WORKERS, {"type": "worker", "index": 2}), "auto",
     "index 2 is outside the cluster's 2 'worker'"),
    (_env(TWO_WORKERS, {"type": "worker", "index": -1}), "auto", "index -1 is outside"),
    (_env(TWO_WORKERS, {"type": "worker", "index": "1"}), "auto", "index '1' is outside"),
    (_env(TWO_WORKERS, {"type": "chief", "index": 0}), "auto",
     "task chief:0 is not in its cluster (no 'chief' entry among worker)"),
    (_env(TWO_WORKERS, {"type": "trainer", "index": 0}), "auto",
     "task type 'trainer' does not train"),
    (_env(VERTEX_CLUSTER, {"type": "evaluator", "index": 0}), "auto",
     "task type 'evaluator' does not train"),
    (_env(TWO_WORKERS, {"type": "worker", "index": 0}), "one_device",
     "--strategy=one_device trains on one machine, but TF_CONFIG describes a cluster of 2"),
    (_env(LEGACY_CLUSTER, {"type": "master", "index": 0}), "mirrored",
     "--strategy=mirrored trains on one machine, but TF_CONFIG describes a cluster of 3"),
    ({}, "multi_worker", "--strategy=multi_worker needs TF_CONFIG"),
    (_env({"worker": "127.0.0.1:1"}, {"type": "worker", "index": 0}), "auto",
     "cluster must map task types to lists"),
])
def test_check_cluster_names_what_cannot_work(environ, strategy, message):
    with pytest.raises(UserError) as raised:
        cloud.check_cluster(strategy, environ)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_cloud_environment_reaches_the_config(monkeypatch):
    from trainer.task import parse_flags

    monkeypatch.setenv("AIP_CHECKPOINT_DIR", "gs://b/out/checkpoints/")
    monkeypatch.setenv("AIP_TENSORBOARD_LOG_DIR", "gs://b/out/logs/")
    monkeypatch.setenv("AIP_MODEL_DIR", "gs://b/out/model/")
    cfg = parse_flags(["trainer.task", "--train_data=gs://b/t/*.txt"])
    assert (cfg.job_dir, cfg.tensorboard_dir, cfg.model_dir) == (
        "gs://b/out/checkpoints/", "gs://b/out/logs/", "gs://b/out/model/")
    cfg = parse_flags(["trainer.task", "--train_data=x", "--job-dir", "gs://b/mine"])
    assert cfg.job_dir == "gs://b/mine"

    # Legacy AI Platform's single-machine TF_CONFIG is not a cluster.
    single = _env({"master": ["m-0:2222"]}, {"type": "master", "index": 0})
    assert cloud.num_workers(single) == 1 and cloud.is_chief(single)
    cloud.prepare_tf_config(single)
    assert json.loads(single["TF_CONFIG"])["task"]["type"] == "chief"


def test_metric_reporter_writes_the_hypertune_file(tmp_path, monkeypatch):
    pytest.importorskip("hypertune", reason="cloudml-hypertune is in the test and tune extras")
    metric_file = tmp_path / "hypertune" / "output.metrics"
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(metric_file))
    reporter = cloud.MetricReporter()
    assert reporter.enabled
    reporter.report("val_loss", 1.75, 120)
    reporter.report("val_loss", 1.5, 240)
    lines = [json.loads(line) for line in metric_file.read_text().splitlines()]
    assert [(r["val_loss"], r["global_step"]) for r in lines] == [("1.75", "120"), ("1.5", "240")]


def test_metric_reporter_without_hypertune(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "hypertune", None)
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(tmp_path / "m" / "output.metrics"))
    reporter = cloud.MetricReporter()
    reporter.report("val_loss", 1.0, 1)
    assert not reporter.enabled and not (tmp_path / "m").exists()
