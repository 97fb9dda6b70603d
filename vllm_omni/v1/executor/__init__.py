"""Executors of non-vLLM stage engines."""
