"""Google Cloud training conventions: command line, environment, cluster, tuning metrics.

Vertex AI and the legacy AI Platform Training start the same container or package
with conventions of their own; this module turns them into plain `Config` values and
TensorFlow settings, so nothing else needs to know which service (if any) runs it:

- Legacy AI Platform passes `--job-dir`, which absl rejects for a flag named job_dir.
- Vertex AI names the output folders in `$AIP_CHECKPOINT_DIR`, `$AIP_TENSORBOARD_LOG_DIR`
  and `$AIP_MODEL_DIR` (all under the job's baseOutputDirectory).
- In a tuning job every trial gets the same command line; a --job_dir given there would
  be shared by trials running side by side, so it gets a `trial-<id>` sub-folder
  (Vertex AI's `$AIP_*` folders are per trial already).
- Both describe the cluster in `$TF_CONFIG`; legacy AI Platform calls the chief
  "master", which MultiWorkerMirroredStrategy does not accept, and sets TF_CONFIG even
  for a single machine (a cluster of one master), which is not a multi-worker job.
- Hyperparameter tuning reads metrics written by the `hypertune` module
  (PyPI: cloudml-hypertune), an optional dependency.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from trainer.config import Config
from trainer.errors import UserError

# Hyphenated flag names that the services pass -> the names the flags really have.
_LEGACY_FLAGS = {"--job-dir": "--job_dir"}
# Config field <- environment variable, used only when the field is empty.
ENVIRONMENT_DEFAULTS = {
    "job_dir": "AIP_CHECKPOINT_DIR",
    "tensorboard_dir": "AIP_TENSORBOARD_LOG_DIR",
    "model_dir": "AIP_MODEL_DIR",
}
# Task types that train (the evaluator and parameter servers do not hold a model replica).
_CHIEF_TYPES = ("chief", "master")
_TRAINING_TYPES = _CHIEF_TYPES + ("worker",)


def normalize_argv(argv: list[str]) -> list[str]:
    """Rewrites `--job-dir=X` and `--job-dir X` as `--job_dir=X`; leaves the rest alone.

    Args:
      argv: A full command line, program name first.

    Returns:
      A new list; arguments after a bare `--` are never touched.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.extend(argv[i:])
            break
        name, eq, value = arg.partition("=")
        if name in _LEGACY_FLAGS:
            if eq:
                out.append(f"{_LEGACY_FLAGS[name]}={value}")
            elif i + 1 < len(argv):
                out.append(f"{_LEGACY_FLAGS[name]}={argv[i + 1]}")
                i += 1
            else:
                out.append(_LEGACY_FLAGS[name])  # Let the flag parser report the missing value.
        else:
            out.append(arg)
        i += 1
    return out


def apply_environment(cfg: Config, environ: Mapping[str, str] = os.environ) -> Config:
    """Applies the services' conventions for output locations.

    Empty output fields are filled from the Vertex AI environment variables (empty
    variables count as unset); fields the user set are kept, except that in a tuning
    trial they get a `trial-<id>` sub-folder so parallel trials do not share one.

    Args:
      cfg: The configuration parsed from flags.
      environ: The process environment.

    Returns:
      A new Config (or `cfg` itself when nothing changed).
    """
    trial = trial_id(environ)
    changes = {}
    for field, var in ENVIRONMENT_DEFAULTS.items():
        value = getattr(cfg, field)
        if not value:
            if environ.get(var):
                changes[field] = environ[var]
        elif trial and not value.rstrip("/").endswith(f"/trial-{trial}"):
            changes[field] = f"{value.rstrip('/')}/trial-{trial}"
    return cfg.replace(**changes) if changes else cfg


def trial_id(environ: Mapping[str, str] = os.environ) -> str:
    """The hyperparameter tuning trial this process runs, or "" outside a tuning job.

    Legacy AI Platform puts it in TF_CONFIG's task; Vertex AI sets $CLOUD_ML_TRIAL_ID.
    """
    task = (tf_config(environ) or {}).get("task") or {}
    trial = task.get("trial") if isinstance(task, dict) else None
    return str(trial or environ.get("CLOUD_ML_TRIAL_ID") or "")


def tf_config(environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """Returns the parsed `$TF_CONFIG`, or None when it is unset or empty.

    Raises:
      UserError: TF_CONFIG is not a JSON object.
    """
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise UserError(f"TF_CONFIG is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise UserError(f"TF_CONFIG must be a JSON object, got {type(value).__name__}")
    return value


def _cluster(environ: Mapping[str, str]) -> dict[str, list[str]]:
    config = tf_config(environ) or {}
    cluster = config.get("cluster") or {}
    return cluster if isinstance(cluster, dict) else {}


def num_workers(environ: Mapping[str, str] = os.environ) -> int:
    """Counts the machines that train (chief, master and worker tasks); 1 without TF_CONFIG.

    A cluster of a single master, as legacy AI Platform describes a one-machine job,
    counts as 1, so it is not mistaken for a multi-worker job.
    """
    cluster = _cluster(environ)
    return max(1, sum(len(cluster.get(kind) or []) for kind in _TRAINING_TYPES))


def is_chief(environ: Mapping[str, str] = os.environ) -> bool:
    """True on the machine that writes checkpoints, logs and the exported model.

    That is the chief (or master) task, or worker 0 when the cluster has no chief;
    every process is the chief when there is no TF_CONFIG or it names no task.
    """
    config = tf_config(environ)
    task = (config or {}).get("task") or {}
    kind = task.get("type")
    if not kind:
        return True
    if kind in _CHIEF_TYPES:
        return True
    cluster = _cluster(environ)
    has_chief = any(cluster.get(name) for name in _CHIEF_TYPES)
    return kind == "worker" and int(task.get("index", 0)) == 0 and not has_chief


def check_cluster(strategy: str, environ: Mapping[str, str] = os.environ) -> None:
    """Stops before any training when `$TF_CONFIG` cannot work for this process.

    Checks that the task is in its cluster (a known training type, an index inside
    it) and that `strategy` (the --strategy flag) agrees with the cluster: one machine's
    strategies with a cluster of several, or multi_worker without a cluster.

    Raises:
      UserError: naming the problem.
    """
    config = tf_config(environ)
    workers = num_workers(environ)
    if strategy in ("one_device", "mirrored") and workers > 1:
        raise UserError(f"--strategy={strategy} trains on one machine, but TF_CONFIG describes "
                        f"a cluster of {workers} workers; use --strategy=multi_worker (or auto)")
    if config is None:
        if strategy == "multi_worker":
            raise UserError("--strategy=multi_worker needs TF_CONFIG describing the cluster "
                            "and this process's task in it")
        return
    cluster = config.get("cluster")
    if cluster is None and "task" not in config:
        return  # Only other fields (environment, job): no cluster to join.
    if not isinstance(cluster, dict) or not all(
            isinstance(v, list) for v in cluster.values()):
        raise UserError("TF_CONFIG cluster must map task types to lists of addresses, "
                        f"got {json.dumps(cluster)[:200]}")
    task = config.get("task")
    if not isinstance(task, dict) or not task.get("type"):
        if workers > 1:
            raise UserError(f"TF_CONFIG describes a cluster of {workers} workers but no task "
                            "for this process (add \"task\": {\"type\": ..., \"index\": ...})")
        return
    kind, index = task["type"], task.get("index", 0)
    if kind not in _TRAINING_TYPES:
        raise UserError(f"TF_CONFIG task type {kind!r} does not train; this program runs as "
                        f"{', '.join(_TRAINING_TYPES)} only")
    addresses = cluster.get(kind) or []
    if not addresses:
        raise UserError(f"TF_CONFIG task {kind}:{index} is not in its cluster (no {kind!r} "
                        f"entry among {', '.join(sorted(cluster)) or 'none'})")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(addresses):
        raise UserError(f"TF_CONFIG task index {index!r} is outside the cluster's "
                        f"{len(addresses)} {kind!r} address(es)")


def prepare_tf_config(environ: MutableMapping[str, str] = os.environ) -> None:
    """Renames the legacy "master" task to "chief" in `$TF_CONFIG`, in place.

    Must run before TensorFlow reads TF_CONFIG, i.e. before the distribution strategy
    is created. Other fields (environment, job, trial) are kept as they are.
    """
    config = tf_config(environ)
    if not config:
        return
    cluster = config.get("cluster")
    task = config.get("task")
    changed = False
    if isinstance(cluster, dict) and "master" in cluster:
        masters = cluster.pop("master")
        cluster["chief"] = list(cluster.get("chief") or []) + list(masters or [])
        changed = True
    if isinstance(task, dict) and task.get("type") == "master":
        task["type"] = "chief"
        changed = True
    if changed:
        environ["TF_CONFIG"] = json.dumps(config)


class MetricReporter:
    """Reports a metric to a hyperparameter tuning service, when one is listening.

    Uses `hypertune` (PyPI: cloudml-hypertune) when it can be imported, which is how
    Vertex AI and AI Platform Training collect the metric named in the study spec;
    without it every call does nothing. Reporting never raises: a tuning metric that
    cannot be written is logged once and must not end a training run.
    """

    def __init__(self, module_name: str = "hypertune") -> None:
        self._module_name = module_name
        self._tuner: Any = None
        self._failed = False
        try:
            self._module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - an optional dependency may fail in any way.
            self._module = None

    @property
    def enabled(self) -> bool:
        """True when metrics go somewhere."""
        return self._module is not None and not self._failed

    def report(self, tag: str, value: float, step: int) -> None:
        """Reports `value` of the metric `tag` (e.g. "val_loss") after `step` steps."""
        if not self.enabled:
            return
        try:
            if self._tuner is None:
                self._tuner = self._module.HyperTune()
            self._tuner.report_hyperparameter_tuning_metric(
                hyperparameter_metric_tag=tag, metric_value=float(value), global_step=int(step))
        except Exception as e:  # noqa: BLE001 - see the class docstring.
            self._failed = True
            logging.warning("cannot report %s to %s, tuning metrics disabled: %s",
                            tag, self._module_name, e)
