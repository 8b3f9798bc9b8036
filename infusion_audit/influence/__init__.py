"""Influence engine: per-example gradients, IHVP backends (exact, ekfac), scores, input-gradients."""
