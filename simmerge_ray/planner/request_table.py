"""The request table of `simmerge plan-batch`: its rows as dicts, read on the driver.

Parquet is typed by column; JSON rows are parsed one at a time, so a row of an odd type, or a
line that is not JSON, is that row's error (the batch goes on) rather than a whole-table error
from a columnar reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from simmerge_ray.errors import ConfigError, first_line

UNREADABLE = "__unreadable__"  # the key of a request row that could not be parsed (its message)


def read_requests(path: str) -> list[dict]:
    """The rows of a parquet file or folder, a .jsonl file of JSON lines, or a .json file of JSON
    lines, one array of objects or one object; a JSON row that cannot be read is
    {UNREADABLE: message}. A table without rows is an error (it would replace earlier results
    with none)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: request table not found")
    rows = _json_rows(p) if p.suffix in (".jsonl", ".json") else _parquet_rows(p)
    if not rows:
        raise ConfigError(f"{path}: the request table has no rows")
    return rows


def _parquet_rows(p: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError) as e:
        hint = "" if p.is_dir() or p.suffix == ".parquet" else "; request tables are .parquet, .jsonl or .json"
        raise ConfigError(f"{p}: not a readable request table ({first_line(e)}){hint}") from None


def _json_rows(p: Path) -> list[dict]:
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark some editors write: not content
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not a readable request table ({e})") from None
    if p.suffix == ".json" and text.lstrip()[:1] in ("[", "{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip()[:1] == "[":
                raise ConfigError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        else:  # one array of objects, or one (perhaps pretty-printed) object
            items = whole if isinstance(whole, list) else [whole]
            return [r if isinstance(r, dict) else {UNREADABLE: f"{p}: item {i}: expected a JSON object, got "
                                                   f"{type(r).__name__}"} for i, r in enumerate(items, start=1)]
    out = []
    # Lines end at \n only: JSON strings may hold U+2028 and friends, which str.splitlines breaks at.
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = {UNREADABLE: f"{p}: line {i}: not valid JSON ({e.msg}, column {e.colno})"}
        if not isinstance(row, dict):
            row = {UNREADABLE: f"{p}: line {i}: expected a JSON object, got {type(row).__name__}"}
        out.append(row)
    return out
