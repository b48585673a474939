"""The PRISM engine: position-wise partitioned Transformers with Segment Means.

No asyncio, MQTT or zeroconf here: plain functions and classes over torch and
`transformers` modules, used by the daemon, the profiler and the benchmarks.
"""
