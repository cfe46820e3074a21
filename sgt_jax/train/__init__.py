"""Training: losses, optimizer recipe, the pure train step, checkpoints, metrics, the loop."""
