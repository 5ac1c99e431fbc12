#!/usr/bin/env bash
# GPU check: one prepared script for a lent GPU machine (a few minutes, no network).
#
#   bash bench/gpu_check.sh [CORPUS]        # from the repository root
#
# Assumes: the repository root is the working directory and a Python with this
# package's requirements (TensorFlow with CUDA, keras, absl, numpy) is on PATH
# as $PYTHON (default: .venv/bin/python if present, else python3). The machine
# has no network: if TensorFlow is missing, install it from wheels carried with
# the working tree first, e.g.
#   python3 -m pip install --no-index --find-links=wheels/ -e .
# Writes every figure to $OUT (the device tool's output folder) or, without it,
# to bench/results/gpu/:
#   1. cudnn.json      whether the LSTM step runs the cuDNN kernel: CudnnRNN ops
#                      in the compiled training step's graph, and its speed
#                      against the same model with use_cudnn=False;
#   2. train_*.json    training chars/s of the job (--preset=gpu's model) in
#                      float32, mixed_float16 and mixed_bfloat16;
#   3. generate.json   generation chars/s (bench/generate.py, when present);
#   4. quality.json    only with CORPUS and QUALITY_MINUTES>0: bench/quality.py
#                      with --presets=gpu (the run that goes below 1.4697).
# Knobs (env): STEPS (steps per timed epoch, default 50), QUALITY_MINUTES (0),
# PRESET (the model timed in step 2, default gpu), SMOKE=1 (tiny sizes, to try the
# script itself on a CPU in about a minute).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/gpu}"
mkdir -p "$OUT_DIR"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
STEPS="${STEPS:-50}"
PRESET="${PRESET:-gpu}"
SMOKE="${SMOKE:-0}"
if [ "$SMOKE" = 1 ]; then PRESET=tiny; STEPS=3; fi
CORPUS="${1:-}"
QUALITY_MINUTES="${QUALITY_MINUTES:-0}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" TF_CPP_MIN_LOG_LEVEL=2
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - started ))s] $*" >&2; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/nvidia_smi.csv" 2>&1 \
  || log "nvidia-smi not available"
if ! "$PYTHON" -c "import tensorflow" 2>/dev/null; then
  echo "error: $PYTHON cannot import TensorFlow; install it first (see above)" >&2
  exit 1
fi
"$PYTHON" -c "import tensorflow as tf; print(tf.__version__, tf.config.list_physical_devices('GPU'), tf.sysconfig.get_build_info().get('cudnn_version'))" \
  > "$OUT_DIR/tf_devices.txt" 2>&1
log "TensorFlow: $(tail -1 "$OUT_DIR/tf_devices.txt")"

# A synthetic corpus: speed does not depend on the text.
"$PYTHON" -c "import bench; bench.write_corpus('$WORK/corpus', 20_000_000)"

log "1. cuDNN kernel: graph ops and timing against use_cudnn=False"
"$PYTHON" - "$OUT_DIR/cudnn.json" "$SMOKE" <<'EOF'
import json, sys, time
import keras, tensorflow as tf
from trainer import models
from trainer.config import Config

cfg = Config(num_layers=2, rnn_units=512, dropout=0.2, batch_size=256, seq_length=100)
repeats = 20
if sys.argv[2] == "1":
    cfg, repeats = cfg.replace(rnn_units=32, batch_size=8, seq_length=20), 2
x = tf.random.uniform([cfg.batch_size, cfg.seq_length], 1, 98, tf.int32)
result = {"gpus": [d.name for d in tf.config.list_physical_devices("GPU")]}
for use_cudnn in ("auto", False):
    keras.backend.clear_session()
    model = models.build_model(cfg, 98)
    for layer in models.lstm_layers(model):
        layer.use_cudnn = use_cudnn  # Read when the step is traced.
    opt = keras.optimizers.Adam(1e-3)

    @tf.function(autograph=False)  # Plain ops; this source is stdin, which AutoGraph can't read.
    def step(x):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                x, logits, from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    graph = step.get_concrete_function(x).graph.as_graph_def()
    ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    step(x).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        loss = step(x)
    loss.numpy()
    seconds = (time.perf_counter() - start) / repeats
    result[f"use_cudnn={use_cudnn}"] = {
        "cudnn_ops": sorted(o for o in ops if "Cudnn" in o),
        "step_sec": seconds, "chars_per_sec": cfg.batch_size * cfg.seq_length / seconds}
auto, off = result["use_cudnn=auto"], result["use_cudnn=False"]
result["cudnn_kernel_used"] = bool(auto["cudnn_ops"])
result["speedup_vs_no_cudnn"] = off["step_sec"] / auto["step_sec"]
json.dump(result, open(sys.argv[1], "w"), indent=1)
print(json.dumps(result, indent=1))
EOF

log "2. training chars/s of the job per precision (--preset=$PRESET, $STEPS steps/epoch)"
for precision in float32 mixed_float16 mixed_bfloat16; do
  job="$WORK/job-$precision"
  "$PYTHON" -m trainer.task --preset="$PRESET" --train_data="$WORK/corpus/*.txt" --job_dir="$job" \
    --steps_per_epoch="$STEPS" --epochs=3 --train_minutes=0 --sample_length=0 \
    --precision="$precision" > "$OUT_DIR/train_$precision.log" 2>&1
  "$PYTHON" - "$job/metrics.jsonl" "$precision" "$OUT_DIR/train_$precision.json" <<'EOF'
import json, statistics, sys
try:
    epochs = [json.loads(line) for line in open(sys.argv[1])]
except OSError as err:
    epochs, error = [], str(err)
out = {"precision": sys.argv[2], "epochs_chars_per_sec": [e["chars_per_sec"] for e in epochs]}
if len(epochs) > 1:
    out["chars_per_sec"] = statistics.median(out["epochs_chars_per_sec"][1:])  # First traces.
else:
    out["error"] = "no metrics; see the log"
json.dump(out, open(sys.argv[3], "w"), indent=1)
print(json.dumps(out))
EOF
done

if [ -f bench/generate.py ]; then
  log "3. generation chars/s"
  if [ "$SMOKE" = 1 ]; then gen_flags=(--length=16 --streams=2 --tutorial_chars=2 --repeats=1)
  else gen_flags=(); fi
  "$PYTHON" -m bench.generate --out="$OUT_DIR/generate.json" "${gen_flags[@]}" > "$OUT_DIR/generate.md" \
    2> "$OUT_DIR/generate.log" || log "bench.generate failed: see $OUT_DIR/generate.log"
  cat "$OUT_DIR/generate.md"
fi

if [ -n "$CORPUS" ] && [ "$QUALITY_MINUTES" != "0" ]; then
  log "4. quality: --presets=gpu for $QUALITY_MINUTES minutes on $CORPUS"
  "$PYTHON" -m bench.quality --corpus="$CORPUS" --presets=gpu --minutes="$QUALITY_MINUTES" \
    --out="$OUT_DIR/quality.json" --plot="$OUT_DIR/quality.png" 2> "$OUT_DIR/quality.log"
fi
log "done; figures in $OUT_DIR"
