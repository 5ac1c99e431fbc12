"""Text files -> (x, y) batches: the piece index, the scan, the vocabulary, the window and
lane pipelines."""
