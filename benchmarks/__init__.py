"""Benchmarks and measurement scripts: run from the repository root as `python -m benchmarks.<name>`.

They print a table and write JSON; speed targets live here, never in the unit tests.
"""
