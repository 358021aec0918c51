"""The training loop (engine) and the work done around it (callbacks)."""
