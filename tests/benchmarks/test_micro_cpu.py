"""pytest-benchmark micro-benchmarks of the CPU paths: the torch backend of the fused cross-entropy,
the torch backend of AdamW, and the geometry summary.

Kept out of the default run (setup.cfg: addopts -m "not benchmark"); run them with

    pytest -m benchmark tests/benchmarks

(add --benchmark-autosave or --benchmark-json=FILE to keep the numbers).  Each also checks its result,
so a fast wrong answer does not pass.
"""
import math

import pytest
import torch

pytestmark = [pytest.mark.benchmark, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["random-logits", "confident-logits"])
def test_ce_torch_backend_forward_backward(benchmark, scale):
    """Logits of standard deviation 1, and of 30 (a trained model): there most exp arguments are below -87,
    where torch's CPU exp takes a path 15-50x slower (this case ran 4x slower in all until the backend
    clamped them there)."""
    from fastcyclic import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    n, d, k = 512, 64, 8192
    h = (scale * torch.randn(n, d, generator=g)).requires_grad_()
    w = (torch.randn(k, d, generator=g) / math.sqrt(d)).requires_grad_()
    y = torch.randint(0, k, (n,), generator=g)

    def step():
        loss = linear_cross_entropy(h, w, y, backend="torch", validate=False)
        return loss, torch.autograd.grad(loss, (h, w))

    loss, (dh, dw) = benchmark(step)
    w64 = w.detach().double().requires_grad_()
    logits = h.detach().double() @ w64.T
    below = float((logits - logits.max(1, keepdim=True).values < -87).double().mean())
    assert below > 0.5 if scale > 1 else below == 0  # the slow range, or none of it
    ref = torch.nn.functional.cross_entropy(logits, y)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    (dw_ref,) = torch.autograd.grad(ref, [w64])
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-4, atol=1e-4 * float(dw_ref.abs().max()))
    assert dh.shape == h.shape


def test_adamw_torch_backend_step(benchmark):
    from fastcyclic.optim import AdamW

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=g).requires_grad_() for n in (2**20, 2**14, 257)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt = AdamW(params, lr=1e-3, weight_decay=0.1, backend="torch")
    start = params[0].detach().clone()
    benchmark(opt.step)
    assert torch.isfinite(params[0]).all() and not torch.equal(params[0].detach(), start)


def test_geometry_summarize_k8191_d64(benchmark):
    from fastcyclic import geometry
    from fastcyclic.bench.geometry import OMEGA, planted

    W, E = (x.float() for x in planted(8191, 64))
    s = benchmark(geometry.summarize, W, E)
    assert s.verdict == "cyclic" and s.omega_W == OMEGA
