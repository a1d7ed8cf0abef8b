"""Triton kernels (installed as ``fastcyclic.kernels``), each beside its PyTorch fallback and an
eager reference.

pyproject.toml installs triton on Linux only: elsewhere (macOS) fastcyclic runs its PyTorch backends,
and the kernel modules (``linear_ce``, ``optim``) are never imported."""
import importlib.util

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# what every backend= option takes: "auto" is auto_backend's choice
BACKENDS = ("auto", "triton", "torch")


def auto_backend(device) -> str:
    """What backend="auto" runs on a torch.device: the Triton kernels on CUDA, PyTorch ops elsewhere
    (and on CUDA when triton is not installed)."""
    return "triton" if device.type == "cuda" and TRITON_INSTALLED else "torch"


def require_triton() -> None:
    """ValueError for backend="triton" without the triton package, before anything imports it."""
    if not TRITON_INSTALLED:
        raise ValueError("backend='triton' needs the triton package, which is not installed (pip installs it "
                         "with fastcyclic on Linux only); use backend='torch' or 'auto'")
