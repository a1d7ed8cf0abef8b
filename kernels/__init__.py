"""Triton kernels (installed as ``fastcyclic.kernels``), each beside its PyTorch fallback and an
eager reference."""
