"""Training: config, model builder, optimizer, training loop, GradCache, distributed wrapping, checkpoints."""
