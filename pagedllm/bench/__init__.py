"""Benchmarks: standard workloads, ``bench throughput | latency | serve | plot``, and HF transformers baselines.

Nothing here is imported by the engine; the engine is measured only through its public surface (``LLM`` offline,
an OpenAI-compatible HTTP server online).
"""
