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
    pyproject's package-dir maps into an install. A checkout imported by path (``python -m`` or ``-c`` in its
    root puts this directory first on sys.path) takes them from beside it, not from what is installed: a wheel's,
    another checkout's editable install, or nothing (then the import failed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):  # installed: site-packages holds the layout
        return
    for name in ("kernels", "bench"):
        init, full = os.path.join(root, name, "__init__.py"), f"{__name__}.{name}"
        found = importlib.util.find_spec(full)
        if not os.path.isfile(init) or (found is not None and found.origin and os.path.samefile(found.origin, init)):
            continue  # (this checkout's editable install finds them itself)
        spec = importlib.util.spec_from_file_location(full, init, submodule_search_locations=[os.path.dirname(init)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[full]
            raise
        setattr(sys.modules[__name__], name, module)  # as an import of a submodule does


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
