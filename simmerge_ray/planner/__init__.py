"""Multi-way planning: plans, feature propagation through unbuilt merges, and plan search."""
