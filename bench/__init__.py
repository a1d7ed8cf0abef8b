"""Benchmark harness (installed as ``fastcyclic.bench``)."""
