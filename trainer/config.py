"""The training configuration: one dataclass, one source of defaults.

Every field has a one-line comment; `trainer/task.py` turns each field into a
flag with the same name and that comment as its help text, so the defaults live
here and nowhere else. Presets in `configs/*.flags` override a few of them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from trainer.errors import UserError

OBJECTIVES = ("sequence", "last")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
LR_SCHEDULES = ("cosine", "constant")
MONITORS = ("val_loss", "val_carried_loss", "loss")

# Fields that fix the shape or meaning of the weights: a job directory written with
# other values cannot be resumed or extended with these.
MODEL_FIELDS = ("embedding_dim", "rnn_units", "num_layers", "lowercase", "objective", "seq_length")


@dataclasses.dataclass
class Config:
    """Everything one training run needs. Library code reads this, never flags."""

    # --- data ---
    # Comma-separated file patterns of training text shards, local or gs://.
    train_data: str = ""
    # Comma-separated patterns of held-out validation shards (optional).
    val_data: str = ""
    # Without --val_data: hold out this tail fraction of every shard for validation.
    val_fraction: float = 0.0
    # Lowercase all text before building the vocabulary, as the 2017 tutorial did.
    lowercase: bool = False
    # Characters the model reads per window.
    seq_length: int = 100
    # Chars between window starts; 0 = seq_length for 'sequence', 1 for 'last'.
    window_shift: int = 0
    # 'sequence' predicts the next char at every position; 'last' only after the window.
    objective: str = "sequence"
    # Steps per epoch; 0 = one full pass over the training windows.
    steps_per_epoch: int = 0
    # Validation batches per evaluation; 0 = all validation windows.
    val_steps: int = 0
    # Train on contiguous lanes of the text with each LSTM layer's state carried from
    # step to step (truncated backpropagation), instead of shuffled zero-state windows.
    carry_state: bool = False
    # With --carry_state: every pass after the first starts the lanes at a new offset of
    # the text (drawn from --seed), so chunk boundaries and zero-state starts move.
    rotate_lanes: bool = True
    # With --carry_state: at each step every lane's state is zeroed with this probability
    # (drawn from --seed), so the model also learns to read from a zero state, as a prompt
    # and windowed validation do. 0 zeroes it only when the lanes start over.
    state_reset_prob: float = 0.0
    # Pieces read at once; each batch mixes windows from this many pieces of the corpus.
    shard_cycle: int = 8
    # Files are cut into pieces of about this many MB, each read by one range read
    # (windows across a cut are dropped: about one per piece).
    piece_mb: float = 2.0
    # Seed for shuffling, initialisation and per-epoch samples.
    seed: int = 42

    # --- model ---
    # Size of the learned character embedding.
    embedding_dim: int = 64
    # Units in each LSTM layer.
    rnn_units: int = 512
    # Number of stacked LSTM layers.
    num_layers: int = 2
    # Dropout between layers (never recurrent dropout, which would disable cuDNN).
    dropout: float = 0.2

    # --- optimisation ---
    # Windows per replica per step; the global batch is this times the replica count.
    batch_size: int = 256
    # Passes over the data (or blocks of --steps_per_epoch steps).
    epochs: int = 20
    # Peak Adam learning rate.
    learning_rate: float = 2e-3
    # Adam's decay rates of its first and second moment estimates (Keras's beta_1, beta_2).
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    # 'cosine' decays to min_lr_ratio * learning_rate after warmup; 'constant' keeps it.
    lr_schedule: str = "cosine"
    # Linear warmup steps before the peak learning rate.
    warmup_steps: int = 100
    # Final learning rate of the cosine schedule, as a fraction of the peak.
    min_lr_ratio: float = 0.1
    # Validate, keep (best checkpoints, per-epoch samples) and export an exponential moving
    # average of the weights with this momentum (Polyak averaging; it averages every step
    # while fewer than 1 / (1 - momentum) were taken); training goes on from the raw weights,
    # and resume checkpoints keep both. 0 = the weights as trained.
    ema_momentum: float = 0.0
    # Clip the global batch's gradient to this global norm (alike for any number of
    # replicas); 0 disables clipping.
    clipnorm: float = 1.0
    # Stop training after this many minutes of the whole job (the chief's clock, continued
    # when a job resumes; all workers stop at one step); 0 = no limit. The learning-rate
    # schedule then also follows the clock: its progress is the larger of step and
    # elapsed-time progress, so a slow machine still ends decayed.
    train_minutes: float = 0.0

    # --- hardware ---
    # Distribution: auto picks multi_worker from TF_CONFIG, mirrored for >1 GPU, else one device.
    strategy: str = "auto"
    # Numeric precision of layers; the output logits stay float32 in every mode.
    precision: str = "float32"
    # Compile each replica's forward and backward pass with XLA. CPU only: XLA cannot
    # compile the cuDNN LSTM kernel that GPUs run (and it was slower on the CPUs measured).
    jit_compile: bool = False
    # Split the CPU into this many logical devices (try mirrored training without GPUs).
    logical_cpus: int = 0

    # --- output ---
    # Where checkpoints, config.json, vocab.json, metrics and logs go (local or gs://).
    job_dir: str = ""
    # Metric that picks the best checkpoint: val_loss (zero-state windows), val_carried_loss
    # (state carried through the validation text); both fall back to loss without validation.
    monitor: str = "val_loss"
    # Save a resume checkpoint every N steps as well as every epoch; 0 = per epoch only.
    checkpoint_every_steps: int = 500
    # Resume checkpoints kept; older ones are deleted.
    keep_checkpoints: int = 2
    # TensorBoard directory; empty = <job_dir>/logs (or $AIP_TENSORBOARD_LOG_DIR).
    tensorboard_dir: str = ""
    # Where the best model is exported at the end (config, vocab, weights); empty = none,
    # or $AIP_MODEL_DIR.
    model_dir: str = ""
    # Local staging folder for a gs:// job_dir; empty = a folder under the system temp dir.
    local_dir: str = ""
    # Seconds to wait at the end for background uploads before reporting failures.
    upload_timeout: float = 600.0
    # Chars of sample text generated after each epoch (log and TensorBoard); 0 = none.
    sample_length: int = 200
    # Sampling temperature of the per-epoch sample.
    sample_temperature: float = 0.8

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
        positive = ("seq_length", "batch_size", "epochs", "embedding_dim", "rnn_units",
                    "num_layers", "shard_cycle", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        non_negative = ("window_shift", "steps_per_epoch", "val_steps", "warmup_steps",
                        "clipnorm", "train_minutes", "checkpoint_every_steps",
                        "sample_length", "upload_timeout", "logical_cpus")
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
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.sample_temperature <= 0:
            raise UserError(f"--sample_temperature must be positive, got {self.sample_temperature}")
        choices = {"objective": OBJECTIVES, "strategy": STRATEGIES, "precision": PRECISIONS,
                   "lr_schedule": LR_SCHEDULES, "monitor": MONITORS}
        for name, allowed in choices.items():
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
    """Maps each field name to the comment above it in this file (the flag help)."""
    import inspect

    helps, pending = {}, []
    for line in inspect.getsource(Config).splitlines():
        field = re.match(r"    (\w+): [\w\[\], ]+ = ", line)
        if line.startswith("    # ") and not line.startswith("    # ---"):
            pending.append(line[6:])
        elif field:
            helps[field.group(1)] = " ".join(pending)
            pending = []
        else:
            pending = []
    return helps


def incompatibilities(old: dict[str, Any], new: Config) -> list[str]:
    """Names the model fields where a saved config differs from `new`."""
    return [f"{k}: job directory has {old[k]!r}, this run asks for {getattr(new, k)!r}"
            for k in MODEL_FIELDS if k in old and old[k] != getattr(new, k)]
