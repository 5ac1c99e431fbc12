"""The training configuration: one dataclass, one source of defaults.

Every field is declared with `option(default, help, choices=...)`; `trainer/task.py`
turns each field into a flag with the same name, default, help text and choices,
so the defaults live here and nowhere else. Presets in `configs/*.flags` override
a few of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from trainer.errors import UserError

OBJECTIVES = ("sequence", "last")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")
LR_SCHEDULES = ("cosine", "linear", "constant")
MONITORS = ("val_loss", "val_carried_loss", "loss")
NEW_CHARS = ("add", "refuse")
TOKENIZERS = ("char", "word", "bpe")

# Fields that fix the shape or meaning of the weights: a job directory written with
# other values cannot be resumed or extended with these.
MODEL_FIELDS = ("embedding_dim", "rnn_units", "num_layers", "lowercase", "objective", "seq_length",
                "tokenizer", "max_vocab")


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A Config field: its default, its one line of flag help and, for enums, the choices."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class Config:
    """Everything one training run needs. Library code reads this, never flags."""

    # --- data ---
    train_data: str = option(
        "", "Comma-separated file patterns of training text shards, local or gs://.")
    val_data: str = option("", "Comma-separated patterns of held-out validation shards (optional).")
    val_fraction: float = option(
        0.0, "Without --val_data: hold out this tail fraction of every shard for validation.")
    lowercase: bool = option(
        False, "Lowercase all text before building the vocabulary, as the 2017 tutorial did.")
    tokenizer: str = option(
        "char", "What the model reads and writes: 'char' (one id per character), 'word' "
        "(words, punctuation and whitespace runs, --max_vocab of them; unknown words are "
        "spelled out), or 'bpe' (byte-level BPE subwords learned from the training text, "
        "--max_vocab of them). Losses are also reported per character of the text.",
        choices=TOKENIZERS)
    max_vocab: int = option(
        1024, "With --tokenizer=word or bpe: ids in the vocabulary, special ids included "
        "(word: every training character plus the most frequent words; bpe: the 256 bytes "
        "plus merges). Larger vocabularies need more text and a lower --learning_rate.")
    seq_length: int = option(100, "Tokens the model reads per window (characters for char).")
    window_shift: int = option(
        0, "Chars between window starts; 0 = seq_length for 'sequence', 1 for 'last'.")
    objective: str = option(
        "sequence", "'sequence' predicts the next char at every position; 'last' only after the "
        "window.",
        choices=OBJECTIVES)
    steps_per_epoch: int = option(
        0, "Steps per epoch; 0 = one full pass over the training windows.")
    val_steps: int = option(0, "Validation batches per evaluation; 0 = all validation windows.")
    validation_freq: int = option(
        1, "Validate every N epochs (Keras's validation_freq), and always after the job's last "
        "epoch (--epochs or --train_minutes); the epochs between report training metrics "
        "only and keep no best checkpoint when --monitor is a validation metric, and "
        "--early_stopping_patience counts validations.")
    carry_state: bool = option(
        False, "Train on contiguous lanes of the text with each LSTM layer's state carried from "
        "step to step (truncated backpropagation), instead of shuffled zero-state windows.")
    rotate_lanes: bool = option(
        True, "With --carry_state: every pass after the first starts the lanes at a new offset of "
        "the text (drawn from --seed), so chunk boundaries and zero-state starts move.")
    state_reset_prob: float = option(
        0.0, "With --carry_state: at each step every lane's state is zeroed with this probability "
        "(drawn from --seed), so the model also learns to read from a zero state, as a "
        "prompt and windowed validation do. 0 zeroes it only when the lanes start over.")
    shard_cycle: int = option(
        8, "Pieces read at once; each batch mixes windows from this many pieces of the corpus.")
    piece_mb: float = option(
        2.0, "Files are cut into pieces of about this many MB, each read by one range read "
        "(windows across a cut are dropped: about one per piece).")
    seed: int = option(42, "Seed for shuffling, initialisation and per-epoch samples.")
    init_from: str = option(
        "", "Start from the best weights of this job directory (local or gs://) and keep its "
        "vocabulary: fine-tuning. Its model fields must match this run's; the optimizer and "
        "schedule start fresh. A job that already holds checkpoints resumes from its own.")
    init_new_chars: str = option(
        "add", "With --init_from: characters of this training text that the base vocabulary "
        "lacks get new ids after the base's, with fresh embedding and output rows ('add'), "
        "or the job stops ('refuse').",
        choices=NEW_CHARS)

    # --- model ---
    embedding_dim: int = option(64, "Size of the learned character embedding.")
    embedding_init_std: float = option(
        0.0, "Draw the embedding's initial values from a normal distribution of this "
        "standard deviation (1.0: PyTorch's default); 0 = Keras's default, uniform in "
        "+-0.05, which can leave a deep LSTM at the unigram level for hundreds of steps.")
    rnn_units: int = option(512, "Units in each LSTM layer. In float32 on a CPU without "
                            "AVX-512, a power of two (256, 512) trains slowly: 248 or 504 "
                            "train more text a second (the job warns).")
    num_layers: int = option(2, "Number of stacked LSTM layers.")
    dropout: float = option(
        0.2, "Dropout between layers (never recurrent dropout, which would disable cuDNN).")

    # --- optimisation ---
    batch_size: int = option(
        256, "Windows per replica per step; the global batch is this times the replica count.")
    epochs: int = option(20, "Passes over the data (or blocks of --steps_per_epoch steps).")
    learning_rate: float = option(2e-3, "Peak Adam learning rate.")
    adam_beta1: float = option(
        0.9, "Adam's decay rate of its first moment estimate (Keras's beta_1).")
    adam_beta2: float = option(
        0.999, "Adam's decay rate of its second moment estimate (Keras's beta_2).")
    weight_decay: float = option(
        0.0, "Decoupled weight decay (AdamW's): each step shrinks the kernels and the "
        "embedding by learning_rate * weight_decay of themselves; biases are not decayed. "
        "0 = none.")
    lr_schedule: str = option(
        "cosine", "'cosine' decays to min_lr_ratio * learning_rate after warmup along a cosine, "
        "'linear' along a straight line; 'constant' keeps it.",
        choices=LR_SCHEDULES)
    warmup_steps: int = option(100, "Linear warmup steps before the peak learning rate.")
    min_lr_ratio: float = option(
        0.1, "Final learning rate of the cosine or linear schedule, as a fraction of the peak.")
    ema_momentum: float = option(
        0.0, "Validate, keep (best checkpoints, per-epoch samples) and export an exponential "
        "moving average of the weights with this momentum (Polyak averaging; it averages "
        "every step while fewer than 1 / (1 - momentum) were taken); training goes on from "
        "the raw weights, and resume checkpoints keep both. 0 = the weights as trained.")
    clipnorm: float = option(
        1.0, "Clip the global batch's gradient to this global norm (alike for any number of "
        "replicas); 0 disables clipping.")
    train_minutes: float = option(
        0.0, "Stop training after this many minutes of the whole job (the chief's clock, "
        "continued when a job resumes; all workers stop at one step); 0 = no limit. The "
        "learning-rate schedule then also follows the clock: its progress is the larger of "
        "step and elapsed-time progress, so a slow machine still ends decayed.")

    # --- hardware ---
    strategy: str = option(
        "auto", "Distribution: auto picks multi_worker from TF_CONFIG, mirrored for >1 GPU, else "
        "one device.",
        choices=STRATEGIES)
    precision: str = option(
        "float32", "Numeric precision of layers; the output logits stay float32 in every mode. "
        "auto: mixed_bfloat16 on a CPU with bfloat16 instructions (AVX512_BF16 or AMX) and "
        "no GPU, float32 elsewhere.",
        choices=PRECISIONS)
    jit_compile: bool = option(
        False, "Compile each replica's forward and backward pass with XLA. CPU only: XLA cannot "
        "compile the cuDNN LSTM kernel that GPUs run (and it was slower on the CPUs "
        "measured).")
    logical_cpus: int = option(
        0, "Split the CPU into this many logical devices (try mirrored training without GPUs).")
    intra_op_threads: int = option(
        -1, "Threads one op may split its work over (TensorFlow's intra-op pool). 0 = "
        "TensorFlow's choice (one per core); -1 = auto: 1 for LSTMs of at most 256 units on a "
        "machine with at most 2 usable CPUs and no GPU, where their small products run faster "
        "whole, side by side, than split (BENCHMARKS.md), else TensorFlow's choice. "
        "TF_NUM_INTRAOP_THREADS in the environment wins over auto.")
    inter_op_threads: int = option(
        -1, "Ops run at once (TensorFlow's inter-op pool). 0 = TensorFlow's choice; -1 = auto: "
        "2 where --intra_op_threads' auto picks 1, else TensorFlow's choice. "
        "TF_NUM_INTEROP_THREADS in the environment wins over auto.")

    # --- output ---
    job_dir: str = option(
        "", "Where checkpoints, config.json, vocab.json, metrics and logs go (local or gs://).")
    monitor: str = option(
        "val_loss", "Metric that picks the best checkpoint: val_loss (zero-state windows), "
        "val_carried_loss (state carried through the validation text); both fall back "
        "to loss without validation. A resumed job must keep the measure its best.json "
        "was chosen by.",
        choices=MONITORS)
    early_stopping_patience: int = option(
        0, "Stop the job after this many validations in a row without an improvement of "
        "--monitor; the stop is kept in the checkpoint, so a rerun does not train further. "
        "0 = never.")
    checkpoint_every_steps: int = option(
        500, "Save a resume checkpoint every N steps as well as every epoch; 0 = per epoch only.")
    keep_checkpoints: int = option(2, "Resume checkpoints kept; older ones are deleted.")
    tensorboard_dir: str = option(
        "", "TensorBoard directory; empty = <job_dir>/logs (or $AIP_TENSORBOARD_LOG_DIR).")
    model_dir: str = option(
        "", "Where the best model is exported at the end (config, vocab, weights); empty = none, "
        "or $AIP_MODEL_DIR.")
    local_dir: str = option(
        "", "Local staging folder for a gs:// job_dir; empty = a folder under the system temp "
        "dir.")
    upload_timeout: float = option(
        600.0, "Seconds to wait at the end for background uploads before reporting failures.")
    sample_length: int = option(
        200, "Chars of sample text generated after each epoch (log and TensorBoard); 0 = none.")
    sample_temperature: float = option(0.8, "Sampling temperature of the per-epoch sample.")

    # ------------------------------------------------------------------
    @property
    def shift(self) -> int:
        """The window stride actually used."""
        if self.window_shift:
            return self.window_shift
        return self.seq_length if self.objective == "sequence" else 1

    @property
    def piece_bytes(self) -> int:
        return int(self.piece_mb * 2**20)

    @property
    def window(self) -> int:
        """Chars per training example: the inputs plus the one after them."""
        return self.seq_length + 1

    def validate(self) -> Config:
        """Raises UserError naming the first bad value; returns self."""
        positive = ("seq_length", "max_vocab", "batch_size", "epochs", "embedding_dim", "rnn_units",
                    "num_layers", "shard_cycle", "keep_checkpoints", "validation_freq")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        non_negative = ("window_shift", "steps_per_epoch", "val_steps", "warmup_steps",
                        "clipnorm", "train_minutes", "checkpoint_every_steps",
                        "sample_length", "upload_timeout", "logical_cpus", "weight_decay",
                        "early_stopping_patience", "embedding_init_std")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.piece_bytes < 64:
            raise UserError(f"--piece_mb must be at least 64 bytes' worth, got {self.piece_mb}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.state_reset_prob < 1.0:
            raise UserError(f"--state_reset_prob must be in [0, 1), got {self.state_reset_prob}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise UserError(f"--ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("intra_op_threads", "inter_op_threads"):
            if getattr(self, name) < -1:
                raise UserError(f"--{name} must be -1 (auto), 0 (TensorFlow's choice) or a "
                                f"count of threads, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.sample_temperature <= 0:
            raise UserError(f"--sample_temperature must be positive, got {self.sample_temperature}")
        for name, allowed in field_choices().items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, name)!r}")
        if not self.train_data:
            raise UserError("--train_data is required (a file pattern such as data/*.txt)")
        if not self.job_dir:
            raise UserError("--job_dir is required (a local folder or gs://bucket/path)")
        if self.carry_state and self.objective != "sequence":
            raise UserError("--carry_state needs --objective=sequence")
        if self.val_data and self.val_fraction:
            raise UserError("give either --val_data or --val_fraction, not both")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Builds a Config from a dict, ignoring keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def field_help() -> dict[str, str]:
    """Maps each field name to its one line of help (the flag's help text)."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(Config)}


def field_choices() -> dict[str, tuple[str, ...]]:
    """Maps each enum field's name to the values it accepts."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(Config)
            if "choices" in f.metadata}


def incompatibilities(old: dict[str, Any], new: Config) -> list[str]:
    """Names the model fields where a saved config differs from `new`."""
    if old.get("tokenizer", "char") == "char" == new.tokenizer:
        old = {k: v for k, v in old.items() if k != "max_vocab"}  # Unused by chars.
    return [f"{k}: job directory has {old[k]!r}, this run asks for {getattr(new, k)!r}"
            for k in MODEL_FIELDS if k in old and old[k] != getattr(new, k)]


# The fields that name files or folders (local or gs://): what a served model or a
# published export tells of its config leaves them out (`public_config`).
PATH_FIELDS = ("train_data", "val_data", "init_from", "job_dir", "tensorboard_dir",
               "model_dir", "local_dir")


def public_config(values: dict[str, Any]) -> dict[str, Any]:
    """A config's dict (`Config.to_dict`, or as a job's config.json holds it) without the
    fields that name files or folders: a client or a page's reader has no use for them."""
    return {k: v for k, v in values.items() if k not in PATH_FIELDS}


def preset_path(name: str) -> str:
    """Finds configs/NAME.flags: in the working directory, the repo, or the installed package."""
    from importlib import resources

    candidates = [os.path.join("configs", f"{name}.flags"),
                  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", f"{name}.flags")]
    try:
        candidates.append(str(resources.files("trainer.configs") / f"{name}.flags"))
    except ModuleNotFoundError:
        pass
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise UserError(f"unknown preset {name!r}: no configs/{name}.flags")


def expand_presets(argv: list[str]) -> list[str]:
    """Rewrites --preset=NAME (or --preset NAME) into --flagfile=PATH in place."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--preset", "-preset") and i + 1 < len(argv):
            out.append(f"--flagfile={preset_path(argv[i + 1])}")
            i += 2
            continue
        if arg.startswith(("--preset=", "-preset=")):
            arg = f"--flagfile={preset_path(arg.split('=', 1)[1])}"
        out.append(arg)
        i += 1
    return out
