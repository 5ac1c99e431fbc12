# Two images from one file, sharing every layer but the last:
#   train (the default, last stage): the entry point is the trainer; flags follow the image name.
#   serve: the entry point is the HTTP server (trainer.serve), for Vertex AI endpoints.
#   docker build -t char-lstm-trainer .
#   docker run --gpus all -v "$PWD/data:/data" -v "$PWD/runs:/runs" char-lstm-trainer \
#     --strategy=mirrored --train_data='/data/shakespeare/train/*.txt' \
#     --val_data='/data/shakespeare/val/*.txt' --job_dir=/runs/docker
#   docker run --gpus all -v "$PWD/runs:/runs" --entrypoint python char-lstm-trainer \
#     -m trainer.generate --job_dir=/runs/docker --length=500
#   docker build --target=serve -t char-lstm-server .
#   docker run -p 8080:8080 -v "$PWD/runs:/runs" char-lstm-server --model_dir=/runs/docker
# Cloud Build (cloudbuild.yaml) builds and pushes either for Vertex AI; see README.md.
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# Runtime dependencies first, in their own layer, so that a code change does not
# reinstall TensorFlow. The requirements are setup.py's install_requires (a test checks
# they agree), with the CUDA libraries as pip wheels through tensorflow's and-cuda extra,
# plus cloudml-hypertune (the `tune` extra) so tuning jobs receive their metric.
# Only TensorFlow is pinned, as in setup.py; it bounds the versions of the others.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir \
        "tensorflow[and-cuda]==2.21.*" \
        "tensorboard" \
        "numpy" \
        "google-cloud-storage" \
        "absl-py" \
        "tokenizers>=0.20,<1" \
        "cloudml-hypertune"

# The server's stack (setup.py's `serve` extra), a small layer of its own: changing it
# keeps the TensorFlow layer above.
# hadolint ignore=DL3059
RUN pip install --no-cache-dir \
        "fastapi>=0.115" \
        "uvicorn>=0.30" \
        "prometheus-client>=0.20"

# The package itself, installed like any sdist so the presets in configs/ are found
# as `trainer.configs`; its dependencies are already in place.
COPY setup.py pyproject.toml MANIFEST.in README.md /tmp/src/
COPY trainer/ /tmp/src/trainer/
COPY configs/ /tmp/src/configs/
RUN pip install --no-cache-dir --no-deps /tmp/src && rm -rf /tmp/src

# Run as an unprivileged user; job directories are gs:// paths or mounted volumes.
RUN useradd --create-home --uid 1000 trainer
USER 1000:1000
WORKDIR /home/trainer

# Vertex AI sets AIP_HTTP_PORT (8080 unless the model's containerSpec.ports says
# otherwise), AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE and AIP_STORAGE_URI; the server
# reads them, so the model needs no arguments there. Outside a container the server
# listens on loopback by default; here it must take connections from outside the
# container's network namespace, so the entry point says 0.0.0.0 itself.
FROM runtime AS serve
EXPOSE 8080
ENTRYPOINT ["python", "-m", "trainer.serve", "--host=0.0.0.0"]

FROM runtime AS train
ENTRYPOINT ["python", "-m", "trainer.task"]
