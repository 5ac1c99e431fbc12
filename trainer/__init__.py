"""Character-level LSTM text generation: streaming input, distributed training, fast sampling."""

__version__ = "0.1.0"
