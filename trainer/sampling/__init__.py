"""Generating text with carried LSTM state: the sampler, the per-row next-character
choice, and the SavedModel module that carries both."""
