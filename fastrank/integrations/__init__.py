"""Adapters for other metric-learning libraries (optional dependencies)."""
