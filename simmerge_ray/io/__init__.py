"""Checkpoint reading, streaming safetensors writing, atomic output folders."""
