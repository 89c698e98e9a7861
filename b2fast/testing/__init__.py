"""Helpers for tests and examples: tiny random-weight models built from configs, no downloads."""
