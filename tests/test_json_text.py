"""Strict JSON for the files people read with other tools (report.json)."""

from __future__ import annotations

import json

import pytest

from simmerge_ray.io.json_text import json_text


def _strict(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_are_written_as_null_and_the_rest_as_is() -> None:
    value = {"mean": float("nan"), "by_task": {"code": 0.25, "math": float("inf")},
             "rows": [1, -float("inf"), (2.5, float("nan"))], "name": "NaN", "n": 3, "ok": True, "none": None}
    assert _strict(json_text(value)) == {"mean": None, "by_task": {"code": 0.25, "math": None},
                                         "rows": [1, None, [2.5, None]], "name": "NaN", "n": 3, "ok": True,
                                         "none": None}
    with pytest.raises(ValueError, match="NaN is not JSON"):
        _strict(json.dumps(value))  # what report.json held where a group was empty
