"""Model-agnostic building blocks: config, devices, data, optimizers, checkpoints, logging."""
