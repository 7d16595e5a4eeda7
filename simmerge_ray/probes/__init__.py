"""Probe sets: unlabeled prompts per task, read from jsonl/parquet/text and tokenised."""
