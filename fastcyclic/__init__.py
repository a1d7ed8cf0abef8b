"""fastcyclic: fused Triton kernels and tooling for training modular arithmetic at very many classes."""
from fastcyclic.linear_ce import LinearCrossEntropy, linear_cross_entropy, linear_cross_entropy_stats

__version__ = "0.1.0"
__all__ = ["LinearCrossEntropy", "linear_cross_entropy", "linear_cross_entropy_stats", "__version__"]
