"""Mixed precision under a budget: the target's config, the bytes model, per-layer
sensitivity and the allocation that turns them into exact per-layer overrides."""
