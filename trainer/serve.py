"""Serves a trained model over HTTP: Vertex AI's contract, OpenAI's completions API, a page.

    python -m trainer.serve --model_dir=runs/shakespeare            # a job directory
    python -m trainer.serve --model_dir=gs://bucket/models/char/1   # or an exported SavedModel

Then open http://localhost:8080/, POST {"instances": [{"prompt": "ROMEO:"}]} to /predict,
or point any OpenAI client at http://localhost:8080/v1 (max_tokens counts characters).
A word or bpe model's prompts and text go through the tokenizer its folder holds; its
text ends at the first token that reaches the length asked for.
Loopback unless --host says otherwise; under Vertex AI the AIP_* variables give the port,
routes and model (trainer/serving/endpoint.py). SIGTERM drains and exits 0. The parts:
trainer/serving/ (routes, completions, batcher, backends, server).
"""

from __future__ import annotations

import os
import signal

from absl import flags

from trainer import cli
from trainer.errors import UserError


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this entrypoint's flags on `flag_values`."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("model_dir", None, "A job directory of trainer.task or a SavedModel "
                        "of trainer.export, local or gs://; default: $AIP_STORAGE_URI.", **fv)
    flags.DEFINE_string("checkpoint", None, "For a job directory: a weights file to serve "
                        "instead of the best one.", **fv)
    flags.DEFINE_string("host", None, "Address to listen on; default: 127.0.0.1, or 0.0.0.0 "
                        "where AIP_HTTP_PORT is set (Vertex AI).", **fv)
    flags.DEFINE_list("allowed_hosts", None, "Host headers answered (400 otherwise), e.g. "
                      "'example.com,*.example.com'; default: localhost,127.0.0.1 on loopback, "
                      "any elsewhere.", **fv)
    flags.DEFINE_integer("max_connections", 100, "Connections and requests at once; past "
                         "them, 503.", lower_bound=1, **fv)
    flags.DEFINE_integer("keep_alive_seconds", 5, "How long an idle connection stays open.",
                         lower_bound=1, **fv)
    flags.DEFINE_float("head_seconds", 10, "How long a client may take to send a request's "
                       "headers.", lower_bound=0.1, **fv)
    flags.DEFINE_float("body_seconds", 30, "How long a client may take to send a body (408).",
                       lower_bound=0.1, **fv)
    flags.DEFINE_float("deadline_seconds", 300, "Most seconds from a request's body to its "
                       "last character (503 after it); 0: none.", lower_bound=0, **fv)
    flags.DEFINE_integer("max_queue_rows", 256, "Most rows waiting or running; past them, "
                         "429 with Retry-After. 0: no bound.", lower_bound=0, **fv)
    flags.DEFINE_integer("max_queue_chars", 100_000, "Most characters waiting or running "
                         "rows may still owe; past them, 429. 0: no bound.", lower_bound=0,
                         **fv)
    flags.DEFINE_float("load_seconds", 300, "Most seconds to load the model (a bucket that "
                       "fails is otherwise retried for minutes); 0: no bound.", lower_bound=0,
                       **fv)
    flags.DEFINE_string("openai_prefix", "/openai/v1", "A second prefix for the OpenAI "
                        "routes, beside /v1 (KServe's); empty: /v1 only.", **fv)
    flags.DEFINE_integer("port", None, "Port to listen on; default: $AIP_HTTP_PORT, else 8080.",
                         lower_bound=0, upper_bound=65535, **fv)
    flags.DEFINE_integer("max_batch", 32, "Most rows (instances) in one sampling call; 1 "
                         "turns batching off.", lower_bound=1, **fv)
    flags.DEFINE_float("batch_window_ms", 5.0, "How long an idle server waits for concurrent "
                       "requests to share its first call.", lower_bound=0, **fv)
    flags.DEFINE_integer("block", 64, "Tokens (a char model's characters) per sampling "
                         "call: streams receive text, and waiting requests join, per block.",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("max_length", 2000, "Most characters one instance may ask for.",
                         lower_bound=0, **fv)
    flags.DEFINE_integer("max_instances", 64, "Most instances in one request.", lower_bound=1,
                         **fv)
    flags.DEFINE_boolean("jit_compile", True, "Compile the sampling loop with XLA (job "
                         "directories; a SavedModel runs its own graph).", **fv)
    flags.DEFINE_boolean("warm_up", True, "Compile every batch size before listening, so "
                         "the first requests do not wait for it.", **fv)
    flags.DEFINE_integer("shutdown_seconds", 10, "On SIGTERM, how long running requests may "
                         "take to finish.", lower_bound=0, **fv)
    flags.DEFINE_integer("seed", None, "Seeds the seeds drawn for instances without one "
                         "(for tests); default: fresh randomness.", lower_bound=0, **fv)


def run(fv: flags.FlagValues) -> None:
    """Loads the model and serves it until SIGTERM/SIGINT."""
    try:  # Imported here so that --help never waits for the server stack.
        from trainer.serving import completions, routes, server
    except ImportError as err:
        raise UserError(f"the server needs FastAPI and uvicorn ({err}): pip install "
                        "'char-lstm-trainer[serve]'") from err
    from trainer.serving import backends
    from trainer.serving.batcher import Batcher
    from trainer.serving.endpoint import vertex_endpoint
    from trainer.serving.request import Limits
    from trainer.serving.transport import Timing

    endpoint = vertex_endpoint(fv.model_dir, fv.port).check_routes(
        completions.prefixes(fv.openai_prefix))
    network = server.Network(fv.host or server.default_host(os.environ), endpoint.port,
                             fv.allowed_hosts, fv.max_connections, fv.keep_alive_seconds,
                             fv.head_seconds, fv.shutdown_seconds)
    batchers: list[Batcher] = []

    def load():  # In a thread, while every request gets 503 (server.Loading).
        backend = backends.load_within(fv.load_seconds, endpoint.model_dir, fv.checkpoint,
                                       fv.jit_compile)
        batchers.append(Batcher(backend, fv.max_batch, fv.batch_window_ms, fv.block,
                                fv.max_queue_rows, fv.max_queue_chars))
        if fv.warm_up:
            cli.say(f"compiling for batches of up to {fv.max_batch} rows")
            batchers[0].warm_up()
        cli.say(f"ready: serving {backend.info['name']}")
        limits = Limits(max_length=fv.max_length, max_instances=fv.max_instances)
        return routes.create_app(batchers[0], limits,
                                 endpoint.health_route, endpoint.predict_route, fv.seed,
                                 Timing(fv.body_seconds, fv.deadline_seconds),
                                 completions.prefixes(fv.openai_prefix))

    cli.say(f"loading {endpoint.model_dir}; listening on http://{network.host}:"
            f"{endpoint.port}/ (health {endpoint.health_route}, predict "
            f"{endpoint.predict_route}: 503 until the model is ready)")
    stops: list[str] = []
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again
    # under the handlers it found: these note it, so the process exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stops.append(signal.Signals(number).name))
    try:
        server.serve(server.Loading(), network, load)
    finally:
        for batcher in batchers:
            batcher.close()
    cli.say(f"stopped ({', '.join(stops) or 'server exited'})")


if __name__ == "__main__":
    cli.main(define_flags, run)
