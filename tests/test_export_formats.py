"""trainer.export --format=web and --format=onnx: both step like the Keras model.

One tiny model (2 x LSTM(16)) is exported once in each format for the module;
the page runs in one headless Chromium session (Debian's chromium and
chromium-driver; the page tests skip without them), opened from a file:// URL.
Probabilities are compared with the Keras model run over the whole text, and
greedy (and seeded) text with `Sampler`, which `trainer.generate` prints. A
web export to the storage emulator checks the objects' content types.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from serve_helpers import ROOT, VOCAB, make_job_dir

from trainer import config, export
from trainer.errors import UserError
from trainer.sampling import onnx_export, step_model
from trainer.sampling.sampler import Sampler, Settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
PROMPT = "the quick brown fox"
# 200 carried steps over a fixed text.
TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, "
        "and Juliet is the sun.\nArise, fair sun, and kill the envious moon, who is "
        "already sick and pale with grief! ") * 2
TEXT = TEXT[:200]
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="Debian's chromium and chromium-driver are not "
    "installed (apt-get install -y chromium chromium-driver)")


def _run_export(*args: str) -> None:
    values = flags.FlagValues()
    export.define_flags(values)
    values(["export", *args])
    export.run(values)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, job_dir, web folder, onnx folder), exported once for the module."""
    tmp = tmp_path_factory.mktemp("formats")
    job_dir = str(tmp / "job")
    model = make_job_dir(job_dir, str(tmp / "staging"))
    for fmt in ("web", "onnx"):
        _run_export(f"--format={fmt}", f"--job_dir={job_dir}", f"--export_dir={tmp / fmt}")
    return model, job_dir, tmp / "web", tmp / "onnx"


@pytest.fixture(scope="module")
def page(exported):
    """The exported page in headless Chromium, opened from disk; one session for the module."""
    if not (CHROMIUM and DRIVER):
        pytest.skip("no chromium")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options,
                               service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        browser.set_page_load_timeout(60)
        browser.get((exported[2] / "index.html").as_uri())
        yield browser
    finally:
        browser.quit()


def keras_probabilities(model, text: str) -> np.ndarray:
    """The next-char probabilities after each char of `text`, as `Sampler` draws from them."""
    logits = np.array(model(VOCAB.encode(text).astype(np.int32)[None]), np.float64)[0]
    logits[:, 0] = -np.inf  # The out-of-vocabulary id is never drawn.
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_onnx_steps_like_the_keras_model(exported):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extra")
    model, _, _, onnx_dir = exported
    assert sorted(os.listdir(onnx_dir)) == ["model.json", "model.onnx", "vocab.json"]
    described = json.loads((onnx_dir / "model.json").read_text())
    assert described["inputs"] == ["ids", "h0", "c0", "h1", "c1"]
    assert described["outputs"] == ["logits", "h0_out", "c0_out", "h1_out", "c1_out"]
    assert described["checked_relative_difference"] < 1e-4
    session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == described["inputs"]
    assert [o.name for o in session.get_outputs()] == described["outputs"]

    state = {}

    def step(i: int) -> np.ndarray:
        """One carried step under onnxruntime; the masked logits of the next char."""
        # None: every output, in the graph's (the documented) order.
        logits, *after = session.run(None, {"ids": np.array([i], np.int32), **state})
        state.update(zip(described["inputs"][1:], after, strict=True))
        logits[:, 0] = -np.inf
        return logits[0].astype(np.float64)

    def reset() -> None:
        state.update({n: np.zeros((1, 16), np.float32) for n in described["inputs"][1:]})

    reset()
    logits = np.array([step(i) for i in VOCAB.encode(TEXT)])
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, keras_probabilities(model, TEXT), rtol=0, atol=1e-4)

    # Greedy: feed the prompt, then each argmax, carrying the state.
    reset()
    for i in VOCAB.encode(PROMPT):
        logits = step(i)
    drawn = []
    for _ in range(200):
        drawn.append(int(np.argmax(logits)))
        logits = step(drawn[-1])
    greedy = Sampler(model, VOCAB).generate([PROMPT], 200, Settings(greedy=True))[0]
    assert VOCAB.decode(drawn) == greedy


@needs_chromium
def test_page_steps_like_the_keras_model_and_samples_like_the_sampler(exported, page):
    model = exported[0]
    ids = VOCAB.encode(TEXT).astype(int).tolist()
    # All 200 carried steps in one call.
    probs = np.array(page.execute_script(
        "return window.charModel.probabilities(arguments[0])", ids))
    assert probs.shape == (200, VOCAB.size)
    np.testing.assert_allclose(probs, keras_probabilities(model, TEXT), rtol=0, atol=1e-4)
    sampler = Sampler(model, VOCAB)
    generate = "return window.charModel.generate(arguments[0], arguments[1], arguments[2])"
    greedy = page.execute_script(generate, PROMPT, 200, {"temperature": 0})
    assert greedy == sampler.generate([PROMPT], 200, Settings(greedy=True))[0]
    # The page draws from the same counter-based uniform numbers as next_char.py; on this
    # model the texts are equal (they could part only at a float32 rounding tie).
    for temperature, top_k, top_p in ((0.9, 0, 1.0), (1.2, 5, 0.9)):
        options = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": 7}
        assert page.execute_script(generate, PROMPT, 150, options) == sampler.generate(
            [PROMPT], 150, Settings(temperature, top_k, top_p), seed=7)[0]


@needs_chromium
def test_page_generates_from_disk_through_its_prompt_box(exported, page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model, _, web_dir, _ = exported
    assert sorted(os.listdir(web_dir)) == ["charmodel.js", "index.html", "model.js",
                                           "vocab.json"]
    html = (web_dir / "index.html").read_text()
    assert "default-src 'none'; script-src 'self';" in html and "innerHTML" not in (
        web_dir / "charmodel.js").read_text()
    assert page.current_url.startswith("file://")
    assert "2 x LSTM(16)" in page.find_element(By.ID, "model").text
    wait = WebDriverWait(page, 60)

    def submit(prompt: str, **fields: str) -> str:
        box = page.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(prompt)
        for field, value in fields.items():
            element = page.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        page.find_element(By.ID, "generate").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith(("done", "error")))
        return page.find_element(By.ID, "status").text

    status = submit(PROMPT, length="120", seed="3", temperature="0.9")
    assert status.startswith("done: 120 chars") and "seed 3" in status, status
    shown = page.execute_script("return document.getElementById('text').textContent")
    assert shown == Sampler(model, VOCAB).generate([PROMPT], 120, Settings(0.9), seed=3)[0]

    # Markup in the prompt stays text; a char the model lacks gives one error line.
    status = submit("<b>x</b>")
    assert status.startswith("error") and "'<'" in status, status
    assert page.execute_script("return document.querySelector('#output b')") is None
    assert page.find_element(By.ID, "prompt-echo").text == "<b>x</b>"
    # Only the page's own files ran, and the policy blocked nothing.
    assert [e for e in page.get_log("browser") if e["level"] == "SEVERE"] == []


def test_bad_format_and_a_non_empty_export_dir_fail_in_one_line(exported, tmp_path,
                                                                monkeypatch):
    _, job_dir, web_dir, onnx_dir = exported
    result = subprocess.run(
        [sys.executable, "-m", "trainer.export", "--format=tflite", f"--job_dir={job_dir}",
         f"--export_dir={tmp_path}"], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: flag --format=tflite: value should be one of <saved_model|web|onnx> "
        "(see --helpshort)"]
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="is not empty; pass --overwrite"):
        _run_export("--format=onnx", f"--job_dir={job_dir}", f"--export_dir={tmp_path}")
    _run_export("--format=web", f"--job_dir={job_dir}", f"--export_dir={tmp_path}",
                "--overwrite")
    # --overwrite replaces an export's files only: what else the folder held stays.
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(web_dir) + ["keep.txt"])
    assert set(os.listdir(web_dir)) | set(os.listdir(onnx_dir)) <= set(step_model.EXPORT_FILES)
    # An overwrite that fails before its files are written leaves the old export whole.
    def fail(*args):
        raise UserError("the converted model does not match")

    with monkeypatch.context() as patched:
        patched.setattr(onnx_export, "check", fail)
        with pytest.raises(UserError, match="does not match"):
            _run_export("--format=onnx", f"--job_dir={job_dir}", f"--export_dir={tmp_path}",
                        "--overwrite")
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(web_dir) + ["keep.txt"])
    # One that succeeds replaces the page by the ONNX folder, keep.txt still kept.
    _run_export("--format=onnx", f"--job_dir={job_dir}", f"--export_dir={tmp_path}",
                "--overwrite")
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(onnx_dir) + ["keep.txt"])
    # Never into the job directory (its vocab.json, its checkpoints) or a folder above it.
    for folder in (job_dir, os.path.dirname(job_dir)):
        with pytest.raises(UserError, match="holds the job directory .*; export to a folder "
                           "outside it"):
            _run_export("--format=web", f"--job_dir={job_dir}", f"--export_dir={folder}",
                        "--overwrite")


def test_web_export_to_a_bucket_serves_as_a_website(exported, gcs_bucket):
    from trainer import gcs, storage

    _, job_dir, web_dir, _ = exported
    target = f"{gcs_bucket()}/site"
    _run_export("--format=web", f"--job_dir={job_dir}", f"--export_dir={target}")
    assert storage.listdir(target) == sorted(os.listdir(web_dir))
    # Uploaded as files, so each object has the type a bucket website must serve it with.
    types = {}
    for name in ("index.html", "model.js"):
        blob = gcs.parse(f"{target}/{name}").blob()
        blob.reload()
        types[name] = blob.content_type
    assert types["index.html"] == "text/html" and "javascript" in types["model.js"], types


def test_published_exports_name_no_file_or_bucket_path(exported, tmp_path):
    """A web page or ONNX folder goes to other people: its description keeps the model's
    name, settings and best checkpoint, not where the job and its data lived."""
    _, job_dir, web_dir, onnx_dir = exported
    weights = json.loads((Path(job_dir) / "best.json").read_text())["weights"]
    # A --checkpoint given as a path is named by its file name alone.
    _run_export("--format=onnx", f"--job_dir={job_dir}", f"--export_dir={tmp_path / 'x'}",
                f"--checkpoint={job_dir}/{weights}")
    for path in (onnx_dir / "model.json", web_dir / "model.js", tmp_path / "x" / "model.json"):
        text = path.read_text()
        assert job_dir not in text and '"job_dir"' not in text, path
        assert not [f for f in config.PATH_FIELDS if f'"{f}"' in text], path
        assert re.search(r'"rnn_units": ?16\b', text) and re.search(r'"name": ?"job"', text), path
        assert re.search(r'"checkpoint": ?"' + re.escape(weights) + '"', text), path


def test_serving_an_onnx_or_web_folder_says_what_it_is(exported):
    from trainer.serving import backends

    _, _, web_dir, onnx_dir = exported
    for folder, kind in ((onnx_dir, "an ONNX export"), (web_dir, "a web page")):
        with pytest.raises(UserError, match=f"holds {kind} .*serve its job directory or a "
                                            "SavedModel export"):
            backends.load_backend(str(folder))
