"""Serving over HTTP: routes, request parsing, the batcher, the model backends, the page."""
