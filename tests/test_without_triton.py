"""pyproject.toml installs triton on Linux only: on macOS fastcyclic must run its PyTorch
backends, and refuse backend="triton" by name.  Each check runs in a subprocess in which importing
triton fails (sys.modules["triton"] = None, as when it is not installed)."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.portable

WITHOUT_TRITON = "import sys\nsys.modules['triton'] = None\n"


def run_without_triton(code: str, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", WITHOUT_TRITON + code, *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_the_torch_backends_run_and_the_kernels_are_never_imported():
    done = run_without_triton("""
import torch
import torch.nn.functional as F
import fastcyclic
from fastcyclic import kernels, optim

assert not kernels.TRITON_INSTALLED
gen = torch.Generator().manual_seed(0)
h, w = torch.randn(7, 5, generator=gen, requires_grad=True), torch.randn(11, 5, generator=gen)
y = torch.randint(0, 11, (7,), generator=gen)
loss = fastcyclic.linear_cross_entropy(h, w, y)  # backend "auto"
torch.testing.assert_close(loss, F.cross_entropy(h @ w.T, y))
loss.backward()
w.grad = torch.ones_like(w)
for call in (lambda: fastcyclic.linear_cross_entropy(h, w, y, backend="triton"),
             lambda: optim.AdamW([w], backend="triton"), lambda: optim.SGDW([w], lr=0.1, backend="triton"),
             lambda: optim.AdamW([w]).add_param_group({"params": [h], "backend": "triton"})):
    try:
        call()
    except ValueError as error:
        assert "backend='triton' needs the triton package, which is not installed" in str(error), error
    else:
        raise AssertionError("backend='triton' was not refused")
opt = optim.AdamW([h], lr=0.1)
before = h.detach().clone()
opt.step()
assert not torch.equal(h, before)
result = fastcyclic.train(fastcyclic.TrainConfig(p=7, d=4, hidden=8, steps=4, eval_every=2, device="cpu",
                                                 out_dir=None, progress=False))
assert result.history, result
assert not any(name.startswith("fastcyclic.kernels.") and name != "fastcyclic.kernels.linear_ce_chunked"
               for name in sys.modules), sorted(name for name in sys.modules if "kernels" in name)
print("ok")
""")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_the_cli_says_what_is_missing():
    done = run_without_triton("from fastcyclic.cli import main\nsys.exit(main(sys.argv[1:]))",
                              "train", "--backend", "triton", "--out-dir", "none")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "backend='triton' needs the triton package, which is not installed" in done.stderr
    done = run_without_triton("from fastcyclic.cli import main\nsys.exit(main(sys.argv[1:]))",
                              "bench", "ce", "--interpret", "--quick", "--device", "cpu")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the triton package is not installed" in done.stdout + done.stderr
