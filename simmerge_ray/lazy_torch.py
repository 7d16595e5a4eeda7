"""`torch`, imported on first use.

Importing torch costs 3-4 s here. The merge path's modules (config, operators, checkpoint I/O,
the unit merger) name torch through this proxy, so `simmerge merge --help`, `--dry-run` and a
linear merge done by the C kernel start in a fraction of a second; any other method imports
torch on its first tensor operation. Type checkers see the real module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:

    class _Torch:
        """Forwards every attribute to the real torch module, importing it the first time."""

        __slots__ = ()

        def __getattr__(self, name: str) -> Any:
            import torch as real

            return getattr(real, name)

        def __repr__(self) -> str:
            return "<torch, imported on first use>"

    torch = _Torch()


__all__ = ["torch"]
