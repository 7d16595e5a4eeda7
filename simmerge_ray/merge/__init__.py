"""Merging: operators (pure tensor math), mergekit-compatible configs, and the streaming executor."""
