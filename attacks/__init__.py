"""Attack plugins: each crafts a Poisoning from a scenario, a checkpoint, a behaviour and a budget."""
