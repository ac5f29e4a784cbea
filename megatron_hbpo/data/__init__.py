"""Prompt datasets: the project's schema, readers for jsonl / json / parquet, and row validation."""
