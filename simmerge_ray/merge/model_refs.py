"""Where a mergekit config names a model (mergekit's ModelReference fields: `model`, `base_model`,
`tokenizer_source`, a tokenizer's `source`; never inside `parameters`), and the checkpoint a
reference names: what the config parser, the multi-document loader and the resume keys share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

# An earlier merge's name is read there, and nowhere else; `tokenizer_source`/`source` may also be a keyword.
MODEL_KEYS = frozenset({"model", "base_model", "tokenizer_source", "source"})


def local_checkpoint(ref: str, root: Path | None) -> Path | None:
    """The checkpoint a config's model reference names: the path as given, else under `root`
    (the config file's folder); None when neither exists."""
    for cand in (Path(ref).expanduser(), (Path(root) / ref) if root else None):
        if cand is not None and cand.exists():
            return cand.resolve()
    return None


def model_refs(node: Any, at: str = "") -> list[tuple[str, str]]:
    """(field, value) of every string a config gives where a model goes ('models[0].model')."""
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            where = f"{at}.{k}" if at else str(k)
            if k in MODEL_KEYS and isinstance(v, str):
                out.append((where, v))
            elif k != "parameters":
                out.extend(model_refs(v, where))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(model_refs(v, f"{at}[{i}]"))
    return out


def substitute_refs(node: Any, replace: Callable[[str, str], Any]) -> Any:
    """The config with every model reference replaced by `replace(field, value)` (field: its key)."""
    if isinstance(node, dict):
        return {k: (replace(k, v) if k in MODEL_KEYS and isinstance(v, str)
                    else v if k == "parameters" else substitute_refs(v, replace)) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_refs(v, replace) for v in node]
    return node
