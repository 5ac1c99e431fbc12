"""The web export: a static folder whose page generates text in the browser, with no server.

    python -m trainer.export --format=web --job_dir=runs/shakespeare --export_dir=runs/web

writes
  index.html    the page: the served page's prompt box and look
  charmodel.js  the runtime: the LSTM in plain JavaScript, the sampling, the form
  model.js      the weights and the vocabulary, as `window.CHAR_MODEL = {...};`
  vocab.json    the vocabulary, for tools other than the page
and for a word or bpe model also
  tokenizer.js    the page's tokenizer: prompts to ids, ids to text
  tokenizer.json  the job's tokenizer file, for tools other than the page

The weights travel in a script rather than a JSON file because Chromium refuses
fetch() of local files to a page opened from disk; a <script> tag may load a
file beside the page. The format of model.js and the step's math are described
at the top of charmodel.js (and the tokenizer's at the top of tokenizer.js). The
page's Content-Security-Policy lets it run its own scripts and its one inline style
block, and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
from importlib import resources
from typing import Any

import keras
import numpy as np

from trainer.data import tokenization
from trainer.data.vocabulary import OOV_ID, Vocabulary
from trainer.sampling import step_model, token_export
from trainer.serving import page

# Version 2 adds the tokenizer of a word or bpe model; a char model stays version 1.
FORMAT, VERSION, TOKENIZER_VERSION = "char-lstm-web", 1, 2
RUNTIME = "charmodel.js"
TOKENIZER_SCRIPT = "tokenizer.js"
TITLES = {"char": "Character-level LSTM", "word": "Word-level LSTM",
          "bpe": "Subword (byte-level BPE) LSTM"}
MODEL_SCRIPT = "model.js"

_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{policy}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>char-lstm</title>
<style>{style}</style>
</head>
<body>
<h1>{title}</h1>
<div id="model">loading the model...</div>
{form}{scripts}
</body>
</html>
"""


def content_security_policy() -> str:
    """The page's policy: its own script files and its inline style block, nothing more."""
    digest = base64.b64encode(hashlib.sha256(page.STYLE.encode()).digest()).decode()
    return ("default-src 'none'; script-src 'self'; "
            f"style-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'")


def _tensor(array: np.ndarray) -> dict[str, Any]:
    """An array as model.js stores it: its shape and base64 little-endian float32 values."""
    data = np.ascontiguousarray(array, "<f4").tobytes()
    return {"shape": list(array.shape), "data": base64.b64encode(data).decode("ascii")}


def model_spec(model: keras.Model, vocab: tokenization.Tokenizer,
               info: dict[str, Any] | None = None, chars: Vocabulary | None = None
               ) -> dict[str, Any]:
    """What model.js assigns to window.CHAR_MODEL (the format is in charmodel.js).

    Args:
      model: a trained model from `models.build_model`.
      vocab: its tokenizer (a `Vocabulary` for a char model).
      info: what the page shows about the model: name, config, best.
      chars: the job's characters (vocab.json); default: `vocab`'s own.

    Returns:
      A JSON-serialisable dict.
    """
    weights = step_model.step_weights(model)
    chars = token_export.chars_of(vocab, chars)
    tokenizer = token_export.web_spec(vocab)
    return {
        "format": FORMAT, "version": VERSION if tokenizer is None else TOKENIZER_VERSION,
        "vocab": {"chars": list(chars.chars), "lowercase": vocab.lowercase, "oov_id": OOV_ID},
        **({} if tokenizer is None else {"tokenizer": tokenizer}),
        "info": info or {},
        "embedding": _tensor(weights.embedding),
        "lstms": [{"kernel": _tensor(layer.kernel),
                   "recurrent_kernel": _tensor(layer.recurrent_kernel),
                   "bias": _tensor(layer.bias)} for layer in weights.lstms],
        "logits": {"kernel": _tensor(weights.logits_kernel),
                   "bias": _tensor(weights.logits_bias)},
    }


def index_html(kind: str = "char") -> str:
    """The page: the served page's style and form, the policy, and the scripts.

    Args:
      kind: the model's tokenizer kind; a word or bpe page also loads tokenizer.js.
    """
    scripts = [MODEL_SCRIPT] + ([] if kind == "char" else [TOKENIZER_SCRIPT]) + [RUNTIME]
    return _HTML.format(policy=content_security_policy(), style=page.STYLE, form=page.FORM,
                        title=TITLES[kind],
                        scripts="\n".join(f'<script src="{s}"></script>' for s in scripts))


def _script(name: str) -> str:
    return resources.files("trainer.sampling").joinpath("web", name).read_text("utf-8")


def export(model: keras.Model, vocab: tokenization.Tokenizer, export_dir: str,
           info: dict[str, Any] | None = None, chars: Vocabulary | None = None) -> str:
    """Writes the static folder (index.html, the runtime, model.js, vocab.json, and for
    a word or bpe model tokenizer.js and tokenizer.json).

    Args:
      model: the trained model whose weights model.js carries.
      vocab: the tokenizer the page encodes prompts with (a `Vocabulary` for chars).
      export_dir: where the folder goes (local or gs://); `trainer.export` empties it.
      info: what the page shows about the model (name, config, best).
      chars: the job's characters (its vocab.json); default: `vocab`'s own.

    Returns:
      `export_dir`.
    """
    kind = vocab.kind
    spec = json.dumps(model_spec(model, vocab, info, chars), separators=(",", ":"))
    files = {"index.html": index_html(kind), RUNTIME: _script(RUNTIME),
             MODEL_SCRIPT: f"window.CHAR_MODEL = {spec};\n",
             "vocab.json": token_export.chars_of(vocab, chars).to_json(),
             **token_export.files(vocab)}
    if kind != "char":
        files[TOKENIZER_SCRIPT] = _script(TOKENIZER_SCRIPT)
    step_model.write_folder(files, export_dir, last="index.html")
    return export_dir
