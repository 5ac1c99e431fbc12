"""The custom training loop under every tf.distribute strategy: stages, loop, steps,
optimizer, distribution, evaluation, reporting, the cloud environment."""
