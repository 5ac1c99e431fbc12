"""Tests for trainer.export: the SavedModel loads in a fresh process and samples like Sampler."""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from serve_helpers import LiveServer, request, same_logprobs, streamed_logprobs
from test_sampling_scoring import same_scores, scored_in_pieces
from training_jobs import token_job

from trainer import checkpoints, export, models, storage
from trainer.config import Config
from trainer.data.vocabulary import Vocabulary
from trainer.errors import UserError
from trainer.sampling import sampler as sampler_module
from trainer.sampling import saved_model
from trainer.sampling.sampler import Sampler, Settings, encode_prompt, pad_prompts
from trainer.serving import backends, batcher
from trainer.serving.request import Instance

VOCAB = Vocabulary(list("\n .,abcdefghijklmnopqrstuvwxyz"))
PROMPTS = ["the quick", "", "Über ab\r\ncd", "a"]

# Runs in a fresh interpreter that never imports the trainer: the SavedModel alone.
_LOAD_AND_CALL = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    serve, seeded = loaded.signatures["serving_default"], loaded.signatures["generate_seeded"]
    prompts = tf.constant(json.loads(sys.argv[2]))
    def call(fn, length, temperature, **seed):
        out = fn(prompts=prompts, length=tf.constant(length, tf.int32),
                 temperature=tf.constant(temperature, tf.float32), **seed)
        return [s.decode("utf-8") for s in out["generated"].numpy()]
    print(json.dumps({
        "inputs": sorted(serve.structured_input_signature[1]),
        "outputs": sorted(serve.structured_outputs),
        "served": call(serve, 40, 0.8),
        "seeded": call(seeded, 40, 0.8, seed=tf.constant(5, tf.int64)),
        "greedy": call(serve, 30, 0.0),
        "empty": call(serve, 0, 0.8),
    }))
""")


def _job_dir(path: str, staging: str, seed: int = 1) -> keras.Model:
    """A job directory written by the training job's own checkpoint writer."""
    cfg = Config(embedding_dim=8, rnn_units=16, num_layers=2, train_data="x", job_dir=path)
    keras.utils.set_random_seed(seed)
    model = models.build_model(cfg, VOCAB.size)
    # Peaked, context-dependent distributions, as a trained model's are.
    model.set_weights([w * 5.0 for w in model.get_weights()])
    job = checkpoints.JobDir(path, local_dir=staging)
    job.write("config.json", cfg.to_json())
    job.write("vocab.json", VOCAB.to_json())
    assert checkpoints.BestExporter(job, "val_loss").maybe_export(model, 1, 10, 2.0)
    assert job.close(timeout=60) == []
    return model


def _run_export(*args: str) -> None:
    values = flags.FlagValues()
    export.define_flags(values)
    values(["export", *args])
    export.run(values)


def test_saved_model_loads_in_a_fresh_process_and_matches_the_sampler(tmp_path):
    job_dir, export_dir = str(tmp_path / "job"), str(tmp_path / "export" / "1")
    model = _job_dir(job_dir, str(tmp_path / "staging"))
    _run_export(f"--job_dir={job_dir}", f"--export_dir={export_dir}", "--max_length=35")
    result = subprocess.run([sys.executable, "-c", _LOAD_AND_CALL, export_dir,
                             json.dumps(PROMPTS)], capture_output=True, text=True, timeout=180,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["inputs"] == ["length", "prompts", "temperature"]
    assert out["outputs"] == ["generated"]
    # --max_length cuts the 40 chars asked for.
    assert [len(s) for s in out["served"]] == [35] * len(PROMPTS)
    assert out["empty"] == [""] * len(PROMPTS)
    sampler = Sampler(model, VOCAB)
    # In the graph unknown chars are skipped, as with oov="skip".
    assert out["seeded"] == sampler.generate(PROMPTS, 35, Settings(0.8), seed=5, oov="skip")
    assert out["greedy"] == sampler.generate(PROMPTS, 30, Settings(greedy=True), oov="skip")


def test_score_signature_gives_the_job_dirs_logprobs_and_an_older_export_is_refused(
        tmp_path, monkeypatch):
    job_dir, export_dir = str(tmp_path / "job"), str(tmp_path / "export" / "1")
    _job_dir(job_dir, str(tmp_path / "staging"))
    _run_export(f"--job_dir={job_dir}", f"--export_dir={export_dir}")
    rows = [VOCAB.encode(t) for t in ("the quick brown fox", "ab", "a", "")]
    want = backends.load_backend(job_dir, jit_compile=False).score(rows)
    got = backends.load_backend(export_dir).score(rows)
    for w, g in zip(want, got, strict=True):
        assert g.logprobs.shape == w.logprobs.shape
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
        np.testing.assert_array_equal(g.top_ids, w.top_ids)
        np.testing.assert_allclose(g.top_logprobs, w.top_logprobs, atol=1e-5)
    assert len(want[0].logprobs) == 18 and np.all(want[0].logprobs < 0)
    # `score_from`, piece by piece from carried states, gives the same.
    pieces = scored_in_pieces(backends.load_backend(export_dir).score_from, rows[0], (2, 9, 19))
    same_scores(pieces, want[0])
    # An export from before the `score` signature serves text, and answers a request
    # for logprobs with one line saying to export again.
    real_save = tf.saved_model.save

    def save_without(*names):
        def save(module, path, signatures):
            real_save(module, path, signatures={k: v for k, v in signatures.items()
                                                if k not in names})
        return save

    old_dir = str(tmp_path / "old" / "1")
    monkeypatch.setattr(tf.saved_model, "save", save_without("score", "score_from"))
    _run_export(f"--job_dir={job_dir}", f"--export_dir={old_dir}")
    monkeypatch.undo()
    running = LiveServer(batcher.Batcher(backends.load_backend(old_dir), window_ms=1))
    try:
        asked = {"prompt": "the", "max_tokens": 5, "seed": 1}
        status, body = request(running.url("/v1/completions"), asked)
        assert status == 200 and len(json.loads(body)["choices"][0]["text"]) == 5
        status, body = request(running.url("/v1/completions"), {**asked, "logprobs": 1})
        assert status == 400 and b"\n" not in body.strip()
        assert "exported without log-probabilities" in json.loads(body)["error"]["message"]
        assert json.loads(request(running.url("/info"))[1])["logprobs"] is False
    finally:
        running.close()
    # One from before `score_from` streams logprobs by scoring each chunk from the prompt.
    openai = pytest.importorskip("openai", reason="openai is in the test extra")
    older_dir = str(tmp_path / "older" / "1")
    monkeypatch.setattr(tf.saved_model, "save", save_without("score_from"))
    _run_export(f"--job_dir={job_dir}", f"--export_dir={older_dir}")
    monkeypatch.undo()
    older = backends.load_backend(older_dir)
    assert older.score_from(rows[0], None) is None
    running = LiveServer(batcher.Batcher(older, window_ms=1, block=8))
    try:
        client = openai.OpenAI(base_url=running.url("/v1"), api_key="EMPTY", max_retries=0)
        asked = {"model": "m", "prompt": "the", "max_tokens": 20, "seed": 2, "logprobs": 1}
        texts, (joined,) = streamed_logprobs(client, asked, 1)
        same_logprobs(joined, client.completions.create(**asked).choices[0].logprobs)
    finally:
        running.close()


def test_graph_prompt_encoding_equals_pad_prompts():
    lower = Vocabulary(list("\n abc"), lowercase=True)
    module = saved_model.CharGenerator(models.build_model(Config(rnn_units=8, embedding_dim=4,
                                                            num_layers=1), lower.size), lower)
    prompts = ["AbC", "", "xx a\r\nb", "ÀBÇ"]
    ids, mask = module._encode(tf.constant(prompts))
    want_ids, want_mask = pad_prompts(
        lower, [encode_prompt(lower, p, oov="skip").ids for p in prompts])
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_array_equal(mask.numpy(), want_mask)


def test_export_to_gcs_and_overwrite(gcs_bucket, tmp_path):
    bucket = gcs_bucket()
    job_dir, export_dir = f"{bucket}/job", f"{bucket}/models/char/1"
    model = _job_dir(job_dir, str(tmp_path / "staging"), seed=3)
    _run_export(f"--job_dir={job_dir}", f"--export_dir={export_dir}")
    assert storage.listdir(export_dir) == ["assets.extra", "fingerprint.pb", "saved_model.pb",
                                           "variables"]
    with pytest.raises(UserError, match="already holds a SavedModel"):
        _run_export(f"--job_dir={job_dir}", f"--export_dir={export_dir}")
    _run_export(f"--job_dir={job_dir}", f"--export_dir={export_dir}", "--overwrite")
    local = tmp_path / "downloaded"
    folders = ("variables", saved_model.EXTRA_DIR)
    for path in sum((storage.glob(f"{export_dir}/{p}*")
                     for p in ("", "variables/", f"{saved_model.EXTRA_DIR}/")), []):
        if not path.endswith(folders):
            storage.copy_file(path, str(local / path[len(export_dir) + 1:]))
    assert json.loads((local / saved_model.EXTRA_DIR / "model.json").read_text())["best"] == {
        "epoch": 1, "step": 10, "monitor": "val_loss", "value": 2.0}
    assert Vocabulary.load(str(local / saved_model.EXTRA_DIR / "vocab.json")).chars == VOCAB.chars
    seeded = tf.saved_model.load(str(local)).signatures["generate_seeded"]
    out = seeded(prompts=tf.constant(["the "]), length=tf.constant(20),
                 temperature=tf.constant(0.8), seed=tf.constant(9, tf.int64))
    assert [out["generated"].numpy()[0].decode()] == Sampler(model, VOCAB).generate(
        ["the "], 20, seed=9)


def test_an_overwrite_that_fails_leaves_the_saved_model_it_would_replace(tmp_path,
                                                                        monkeypatch):
    job_dir, export_dir = str(tmp_path / "job"), tmp_path / "export" / "1"
    _job_dir(job_dir, str(tmp_path / "staging"))
    _run_export(f"--job_dir={job_dir}", f"--export_dir={export_dir}")
    before = {p.relative_to(export_dir): p.read_bytes() for p in export_dir.rglob("*")
              if p.is_file()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the new model is being saved.

    with monkeypatch.context() as patched:
        patched.setattr(tf.saved_model, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _run_export(f"--job_dir={job_dir}", f"--export_dir={export_dir}", "--overwrite")
    after = {p.relative_to(export_dir): p.read_bytes() for p in export_dir.rglob("*")
             if p.is_file()}
    assert after == before
    # One that succeeds swaps the folder whole: nothing of the old one is left in it.
    (export_dir / "old-note.txt").write_text("x")
    _run_export(f"--job_dir={job_dir}", f"--export_dir={export_dir}", "--overwrite",
                "--max_length=50")
    assert sorted(os.listdir(export_dir)) == ["assets", "assets.extra", "fingerprint.pb",
                                             "saved_model.pb", "variables"]
    assert json.loads((export_dir / saved_model.EXTRA_DIR / "model.json").read_text())[
        "max_length"] == 50
    assert sorted(os.listdir(export_dir.parent)) == ["1"]  # No staged or old copy left.


def test_bpe_saved_model_carries_its_tokenizer_and_serves_the_job_dirs_text(tmp_path, caplog,
                                                                          monkeypatch):
    job_dir, export_dir = token_job(str(tmp_path), "bpe"), str(tmp_path / "export" / "1")
    _run_export(f"--job_dir={job_dir}", f"--export_dir={export_dir}")
    # An export from before the graph kept each row's UTF-8 state loads with a warning;
    # this version's does not.
    old_dir = str(tmp_path / "old" / "1")
    with monkeypatch.context() as patch:
        patch.setattr(sampler_module, "tables_of", lambda tokenizer: None)
        _run_export(f"--job_dir={job_dir}", f"--export_dir={old_dir}")
    with caplog.at_level(logging.WARNING):
        backends.load_backend(old_dir, jit_compile=False)
        assert "exported before bpe graphs kept each row's UTF-8 state" in caplog.text
        caplog.clear()
        backends.load_backend(export_dir, jit_compile=False)
        assert "exported before" not in caplog.text
    extra = os.path.join(export_dir, saved_model.EXTRA_DIR)
    assert sorted(os.listdir(extra)) == ["model.json", "tokenizer.json", "vocab.json"]
    prompt = "the café — 🙂"
    texts = []
    for path in (job_dir, export_dir):
        backend = backends.load_backend(path, jit_compile=False)
        running = batcher.Batcher(backend, max_batch=2, window_ms=1, block=8)
        instance = Instance(prompt, 50, Settings(greedy=True), 0, "error")
        blocks, parts = queue.Queue(), []
        running.submit(running.encode(instance), instance,
                       lambda *block, put=blocks.put: put(block))
        while (block := blocks.get(timeout=60)) != (None, None):
            assert block[1] is None, block[1]
            parts.append(block[0])
        running.close()
        texts.append("".join(parts))
    assert texts[0] == texts[1] and len(texts[0]) >= 50
    # The score signature of a bpe export: the job dir's figures.
    rows = [backend.tokenizer.encode(p) for p in (prompt, "the end")]
    scored = [backends.load_backend(path, jit_compile=False).score(rows)
              for path in (job_dir, export_dir)]
    for w, g in zip(*scored, strict=True):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
        np.testing.assert_array_equal(g.top_ids, w.top_ids)
    # Ids in, ids out: what a client of TF Serving decodes with tokenizer.json.
    tokenizer = backend.tokenizer
    loaded = tf.saved_model.load(export_dir)
    ids = tokenizer.encode(prompt).astype(np.int32)[None, :]
    out = loaded.signatures["generate_seeded"](
        ids=tf.constant(np.pad(ids, [(0, 0), (0, 3)])), length=tf.constant(12),
        temperature=tf.constant(0.0), seed=tf.constant(0, tf.int64))["generated_ids"].numpy()
    assert out.shape == (1, 12)
    assert texts[0].startswith(tokenizer.stream_decoder().feed(out[0].tolist()))
