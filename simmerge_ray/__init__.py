"""SimMerge on Ray: pick merge operators, subsets and orders from similarity signals, then merge."""

__version__ = "0.1.0"
