"""The output of a merge not run yet, as a Checkpoint: what a dry run of merges that read each
other plans a later merge on (merge/estimate.py)."""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simmerge_ray.errors import CheckpointError
from simmerge_ray.io.checkpoint import Checkpoint, folder_tokenizer_json
from simmerge_ray.io.safetensors_format import TensorEntry


@dataclass
class PendingCheckpoint(Checkpoint):
    """The output of a merge not run yet, as Checkpoint.open will index it once written: its
    entries (names, dtypes, shapes, byte ranges) and config.json, from the merge's plan. A dry
    run of merges that read each other plans a later merge on it; `tokenizer` is what a merge
    reading it loads as its tokenizer: a built one, the folder it is copied from, or None."""

    tokenizer: Any = field(repr=False, default=None)

    @property
    def is_folder(self) -> bool:
        return True  # written as a folder, with the config.json and tokenizer of its config source

    def tokenizer_json(self) -> bytes | None:
        """The tokenizer.json the merge will write (what a later merge's id check reads): the
        folder's it copies, or the built tokenizer's; None without one."""
        tok = self.tokenizer
        if isinstance(tok, (str, Path)):
            return folder_tokenizer_json(Path(tok))
        backend = getattr(tok, "backend_tokenizer", None)  # a fast tokenizer; None for none
        return None if backend is None else backend.to_str().encode()

    def tokenizer_source(self) -> Any:
        """The tokenizer the merge will write (a built one, the folder it copies, or None)."""
        return self.tokenizer

    def read_into(self, name: str, start: int, count: int, view: memoryview) -> None:
        raise CheckpointError(f"{self.path}: not written yet (a merge still to run): {name!r} cannot be read")

    def _map(self, entry: TensorEntry) -> mmap.mmap:
        raise CheckpointError(f"{self.path}: not written yet (a merge still to run): {entry.name!r} cannot be read")
