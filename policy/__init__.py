"""Policy: the performance map, the profiler and the per-request choice (docs/design.md §4)."""
