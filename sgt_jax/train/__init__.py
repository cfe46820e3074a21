"""Training: the pure train step (it reduces the per-token losses the model returns, models/bagel.py),
optimizer recipe, checkpoints, metrics, the loop."""
