"""The request table of `simmerge plan-batch`: its rows as dicts, read on the driver.

Parquet is typed by column; JSON rows are parsed one at a time, so a row of an odd type, or a
line that is not JSON, is that row's error (the batch goes on) rather than a whole-table error
from a columnar reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from simmerge_ray.errors import ConfigError

UNREADABLE = "__unreadable__"  # the key of a request row that could not be parsed (its message)


def read_requests(path: str) -> list[dict]:
    """The rows of a parquet file or folder, a .jsonl file of JSON lines, or a .json file of JSON
    lines or of one array; a JSON row that cannot be read is {UNREADABLE: message}."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: request table not found")
    if p.suffix not in (".jsonl", ".json"):
        try:
            return pq.read_table(p).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise ConfigError(f"{path}: not a readable request table ({str(e).splitlines()[0]})") from None
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable request table ({e})") from None
    if p.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        return [r if isinstance(r, dict) else {UNREADABLE: f"{path}: item {i}: expected a JSON object, got "
                                               f"{type(r).__name__}"} for i, r in enumerate(rows)]
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = {UNREADABLE: f"{path}: line {i}: not valid JSON ({e.msg}, column {e.colno})"}
        if not isinstance(row, dict):
            row = {UNREADABLE: f"{path}: line {i}: expected a JSON object, got {type(row).__name__}"}
        out.append(row)
    return out
