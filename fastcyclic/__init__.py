"""fastcyclic: fused Triton kernels and tooling for training modular arithmetic at very many classes.

Modules: ``fastcyclic.training`` (TrainConfig, Trainer, train), ``fastcyclic.optim`` (AdamW, SGDW,
fused_update), ``fastcyclic.geometry`` (summarize, ...), ``fastcyclic.plots``.  No submodule may share a
name with a public function below: once imported, it would replace the function as the package's
attribute (the trainer's module is ``training`` so that ``fastcyclic.train`` stays the function).

The public names below are imported on first use (PEP 562): importing the package must not yet define the
Triton kernels, so that ``fastcyclic bench --interpret`` can set TRITON_INTERPRET=1 first.
"""
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "linear_cross_entropy": "fastcyclic.linear_ce",
    "linear_cross_entropy_stats": "fastcyclic.linear_ce",
    "LinearCrossEntropy": "fastcyclic.linear_ce",
    "TrainConfig": "fastcyclic.training",
    "TrainResult": "fastcyclic.training",
    "Trainer": "fastcyclic.training",
    "train": "fastcyclic.training",
    "CyclicModel": "fastcyclic.model",
    "ModularAddition": "fastcyclic.data",
}
__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fastcyclic' has no attribute {name!r}")


def __dir__():
    return __all__
