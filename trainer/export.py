"""Exports a trained job directory: a SavedModel (the default), a web page, or ONNX.

    python -m trainer.export --job_dir=runs/shakespeare --export_dir=runs/shakespeare/export/1
    python -m trainer.export --format=web --job_dir=runs/shakespeare --export_dir=runs/web
    python -m trainer.export --format=onnx --job_dir=runs/shakespeare --export_dir=runs/onnx

--format=web writes a static folder whose index.html generates text in the
browser with no server (trainer/sampling/web_export.py); --format=onnx writes a
single-step ONNX model and the vocabulary (trainer/sampling/onnx_export.py); for a
word or bpe job both also carry its tokenizer.json and what the ids mean.
Either wants an empty or missing --export_dir, or --overwrite. The rest of this
describes the SavedModel.

The SavedModel carries the tokenizer and the whole sampling loop, so a server
needs nothing else. TF Serving expects a numbered version folder (the `/1` above);
Vertex AI takes the folder itself as the model's artifact URI. Signatures of a
char model (the default tokenizer):

  serving_default(prompts: string[batch], length: int32 scalar,
                  temperature: float32 scalar) -> {"generated": string[batch]}
  generate_seeded(the same, and seed: int64 scalar) -> the same, reproducibly
                  (row i uses seed + i, as `Sampler` does for one int seed)
  begin(prompts) -> {"logits", "states"}     the two steps `trainer.serve` streams
  advance(logits, states, n, steps, seeds,    with: every setting per row, the
          temperature, top_k, top_p)          LSTM state packed into one tensor
      -> {"ids": int32[batch, n], "logits", "states"}
  score(ids: int32[batch, time])             the model's log-probability of each id
      -> {"logprobs": float32[batch, time-1], after the ids before it (rows right-
          "top_ids": int32[batch, time-1, 5],  padded; any pad id), and the 5 likeliest
          "top_logprobs": float32[...]}        ids at each position: OpenAI's logprobs
  score_from(ids, states: float32[batch,     the same for rows that continue a text
             width])                         (rows of one length): states are the
      -> {the same, and "states"}            layers' (h, c) side by side after the ids
                                             before the row (zeros to start), and come
                                             back after all but its last id, where the
                                             next piece starts (a stream's logprobs)

Beside the graph, assets.extra/ (TF Serving's folder for extra files) holds
vocab.json and model.json (the job's config, tokenizer kind and best checkpoint), and
for a word or bpe model tokenizer.json, which `trainer.serve` reads to encode
prompts, decode the ids and describe the model.

For example, through TF Serving's REST API (scalars need the columnar form):
  {"signature_name": "serving_default",
   "inputs": {"prompts": ["ROMEO:"], "length": 200, "temperature": 0.8}}

Inside the graph prompts are decoded as UTF-8 (bad bytes become U+FFFD) and
normalised like the training text; characters the vocabulary lacks are skipped
(a server has no one to ask); an empty prompt starts after a newline. The
generated text excludes the prompt. `length` is clipped to [0, --max_length];
a temperature of 0 or less gives greedy output.

A word or bpe model's graph cannot split text, so its signatures take and give ids
(int32) and `length` counts tokens, not characters:

  serving_default(ids: int32[batch, time], length, temperature)
      -> {"generated_ids": int32[batch, length]}
  generate_seeded(the same, and seed)         the same, reproducibly
  begin(ids) -> {"logits", "states"};  advance, score and score_from as above

A bpe graph never draws an id whose bytes cannot continue a row's text as valid UTF-8
(trainer/sampling/utf8.py), so the ids it gives decode without U+FFFD; its `states`
end with one more column, each row's UTF-8 state, carried like the rest.

Rows of `ids` are padded with 0 (never a prompt's id; an all-0 row starts after a
newline). A client of TF Serving encodes and decodes with assets.extra/tokenizer.json
itself: for bpe, the ids are those of the `tokenizers` library plus one
(`Tokenizer.from_file(...).encode(text).ids`, each + 1; decode each id - 1, id 0 never
comes out); for word, id 1 is `<unk>` (decodes to nothing), ids 2.. are the
characters of vocab.json in its order, then the "words" of tokenizer.json in order,
the text split by the word rule recorded there (a word outside the list is `<unk>`
then its characters). Normalise prompts as the training text was (`\\r\\n` -> `\\n`,
lowercased if vocab.json says so). `trainer.serve` does all of this for you, and
counts its `max_tokens`/length in characters again.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from trainer import cli

FORMATS = ["saved_model", "web", "onnx"]


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this entrypoint's flags on `flag_values`."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("job_dir", None, "Job directory written by trainer.task (local or "
                        "gs://) whose best weights are exported.", **fv)
    flags.DEFINE_enum("format", "saved_model", FORMATS, "saved_model: for TF Serving and "
                      "Vertex AI; web: a static page that runs the model in the browser; "
                      "onnx: one model step for any ONNX runtime.", **fv)
    flags.DEFINE_string("export_dir", None, "Folder (local or gs://) to write to; for TF "
                        "Serving, a numbered version folder such as .../1.", **fv)
    flags.DEFINE_string("checkpoint", None, "Weights file to export instead of the best one: "
                        "a file name inside --job_dir or a full path.", **fv)
    flags.DEFINE_integer("max_length", 10_000, "Largest number of characters (tokens, for a "
                         "word or bpe model) one request to the SavedModel may generate; "
                         "longer requests are cut to it.",
                         lower_bound=0, **fv)
    flags.DEFINE_boolean("overwrite", False, "Replace what --export_dir already holds.", **fv)
    flags.mark_flags_as_required(["job_dir", "export_dir"], flag_values)


def run(fv: flags.FlagValues) -> None:
    """Loads the job directory and exports it as the parsed flags `fv` ask."""
    # Imported here: --help should not wait for TensorFlow.
    from trainer import job_loader, storage
    from trainer.config import public_config
    from trainer.data.vocabulary import Vocabulary
    from trainer.errors import UserError
    from trainer.sampling import onnx_export, saved_model, web_export

    if "://" not in fv.export_dir and os.path.isfile(fv.export_dir):
        raise UserError(f"--export_dir={fv.export_dir} is a file; give a folder (new or empty)")
    if _inside(fv.job_dir, fv.export_dir):
        raise UserError(f"--export_dir={fv.export_dir} holds the job directory "
                        f"{fv.job_dir}; export to a folder outside it")
    held = storage.listdir(fv.export_dir) if fv.format != "saved_model" else []
    if held and not fv.overwrite:
        raise UserError(f"{fv.export_dir} is not empty; pass --overwrite to replace what it "
                        "holds, or choose a new folder")

    cfg, tokenizer, model, pointer = job_loader.load_job(fv.job_dir, fv.checkpoint)
    info = {"job_dir": fv.job_dir, "checkpoint": fv.checkpoint or pointer.get("weights"),
            "best": {k: pointer[k] for k in ("epoch", "step", "monitor", "value") if k in pointer},
            "config": json.loads(cfg.to_json())}
    if fv.format == "saved_model":
        vocab_json = None
        if tokenizer.kind != "char":  # The job's characters, as recorded.
            vocab_json = storage.read_text(storage.join(fv.job_dir, "vocab.json"))
        saved_model.export(model, tokenizer, fv.export_dir, fv.max_length, fv.overwrite, info,
                           vocab_json)
    else:
        # What the folder held goes only once the new files are written (step_model.write_folder).
        name = fv.job_dir.rstrip("/").rsplit("/", 1)[-1]
        writer = web_export if fv.format == "web" else onnx_export
        # A word or bpe job's characters (vocab.json) travel beside its tokenizer.
        chars = tokenizer if cfg.tokenizer == "char" else Vocabulary.load(
            storage.join(fv.job_dir, "vocab.json"))
        # A page or an ONNX folder is published: it names no file or bucket path.
        published = {**{k: v for k, v in info.items() if k != "job_dir"}, "name": name,
                     "config": public_config(info["config"]),
                     "checkpoint": str(info["checkpoint"] or "").rstrip("/").rsplit("/", 1)[-1]}
        writer.export(model, tokenizer, fv.export_dir, published, chars)
    print(f"exported {fv.format} to {fv.export_dir}", file=sys.stderr)


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it (local paths made absolute)."""
    def norm(p: str) -> str:
        return p.rstrip("/") if "://" in p else os.path.abspath(p)

    path, folder = norm(path), norm(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")


if __name__ == "__main__":
    cli.main(define_flags, run)
