"""Policy: the performance map, the profiler and the per-request choice (DESIGN.md §4)."""
