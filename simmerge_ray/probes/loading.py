"""Read a probe file into a list of prompt strings.

Three formats, chosen by suffix: `.jsonl` (one JSON object per line with a text field),
`.parquet` (a string column), anything else plain text with one probe per line. Blank lines are
skipped. Bytes are decoded line by line so a bad byte is reported with its line number.
"""

from __future__ import annotations

import json
from pathlib import Path

from simmerge_ray.probes.errors import ProbeError

TEXT_FIELD = "text"


def load_probe_texts(path: str | Path, *, text_field: str = TEXT_FIELD) -> list[str]:
    """All probes of a file, in file order; raises ProbeError naming the file (and line)."""
    path = Path(path)
    if path.is_dir():  # was "probe file not found", for a folder that is there
        raise ProbeError(f"{path}: a folder, not a probe file")
    if not path.is_file():
        raise ProbeError(f"{path}: probe file not found")
    if path.suffix == ".parquet":
        texts = _read_parquet(path, text_field)
    else:
        texts = _read_lines(path, jsonl=path.suffix == ".jsonl", text_field=text_field)
    if not texts:
        raise ProbeError(f"{path}: probe file holds no probes")
    return texts


def _read_lines(path: Path, *, jsonl: bool, text_field: str) -> list[str]:
    texts: list[str] = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProbeError(
                f"{path}: line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            ) from None
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProbeError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise ProbeError(f"{path}: line {lineno}: expected an object with a string field {text_field!r}")
        if obj[text_field].strip():
            texts.append(obj[text_field])
    return texts


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import polars as pl

    try:
        frame = pl.read_parquet(path, columns=[text_field])
    except pl.exceptions.ColumnNotFoundError:
        raise ProbeError(f"{path}: no column {text_field!r}") from None
    except Exception as e:  # polars/arrow raise several types for corrupt or non-UTF-8 files
        raise ProbeError(f"{path}: cannot read parquet ({e})") from None
    column = frame.get_column(text_field)
    if column.dtype != pl.String:
        raise ProbeError(f"{path}: column {text_field!r} has type {column.dtype}, expected strings")
    return [t for t in column.to_list() if t is not None and t.strip()]
