"""Caltech-UCSD Birds (placeholder; filled in by the transfer-learning work)."""
