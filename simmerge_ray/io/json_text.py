"""JSON text that every reader takes: Python's json writes NaN and Infinity, which are not JSON
(jq, JavaScript, strict parsers refuse the whole file), so a value that is not finite, such as
the mean of an empty group, is written as null: not measured."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(value: Any) -> Any:
    """`value` with every float that is NaN or infinite replaced by None, in dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def json_text(value: Any, *, indent: int | None = 2) -> str:
    """Strict JSON of `value` (non-finite floats as null)."""
    return json.dumps(finite_or_null(value), indent=indent, allow_nan=False)
