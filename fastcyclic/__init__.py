"""fastcyclic: fused Triton kernels and tooling for training modular arithmetic at very many classes.

Modules: ``fastcyclic.training`` (TrainConfig, Trainer, train), ``fastcyclic.optim`` (AdamW, SGDW,
fused_update), ``fastcyclic.geometry`` (summarize, ...), ``fastcyclic.plots``.  No submodule may share a
name with a public function below: once imported, it would replace the function as the package's
attribute (the trainer's module is ``training`` so that ``fastcyclic.train`` stays the function).

The public names below are imported on first use (PEP 562): importing the package must not yet define the
Triton kernels, so that ``fastcyclic bench --interpret`` can set TRITON_INTERPRET=1 first.
"""
import importlib
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _load_checkout_subpackages():
    """fastcyclic.kernels and fastcyclic.bench are the repository's top-level kernels/ and bench/, which
    pyproject's package-dir maps into an install (editable or not). Imported from a checkout that is not what is
    installed (``python -m`` or ``-c`` in the repository root put this directory first on sys.path, ahead of an
    installed wheel, or nothing is installed), this package finds them beside it instead."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("kernels", "bench"):
        init = os.path.join(root, name, "__init__.py")
        if importlib.util.find_spec(f"{__name__}.{name}") is None and os.path.isfile(init):
            spec = importlib.util.spec_from_file_location(f"{__name__}.{name}", init,
                                                          submodule_search_locations=[os.path.dirname(init)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)


_load_checkout_subpackages()

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
