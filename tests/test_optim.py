"""fastcyclic.optim against torch.optim and eager references written out here, for both backends.

On CPU the "triton" backend runs the real multi-tensor kernels under TRITON_INTERPRET=1.  fp32
results must agree with torch.optim to fp32 rounding over many steps; bf16 parameters (fp32 state)
to one bf16 ulp.
"""
import copy
import functools
import gc
import pickle
import re
import subprocess
import sys
import warnings
import weakref

import numpy as np
import pytest
import torch

from fastcyclic import linear_cross_entropy
from fastcyclic.bench.sm90 import allow_tf32
from fastcyclic.kernels import optim as kernels
from fastcyclic.optim import SGDW, AdamW, _fused_update_tile, fused_update, fused_update_fits

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["triton", "torch"]
STEPS = 12
SIZES = [(1,), (17,), (5, 3), (1 << 20) + 3]
FP32 = dict(rtol=2e-6, atol=2e-6)


def make_params(gen, sizes, dtype=torch.float32):
    return [torch.randn(*(s if isinstance(s, tuple) else (s,)), generator=gen).to(DEVICE, dtype) for s in sizes]


def clones(params):
    return [p.clone().requires_grad_() for p in params]


def run_pair(gen, ours, theirs, sizes=SIZES, steps=STEPS, dtype=torch.float32, grad_scale=1.0):
    """Step two optimizers on identical parameters and gradients; return both parameter lists."""
    start = make_params(gen, sizes, dtype)
    a, b = clones(start), clones(start)
    step_alike(gen, a, b, ours(a), theirs(b), steps, grad_scale)
    return a, b


def step_alike(gen, a, b, opt_a, opt_b, steps, grad_scale=1.0):
    """`steps` steps of two optimizers whose parameter lists a and b get the same fresh gradients."""
    for _ in range(steps):
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape, generator=gen).to(DEVICE, pa.dtype) * grad_scale
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()


def step_through(params, opt, grads):
    """One step of opt per entry of grads, a list of gradients for params."""
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def assert_params_close(a, b, *, outliers_per_tensor=0, **tol):
    """Elementwise within tolerance, except for one in 100,000 (at least one): where a gradient entry is within
    rounding of zero, Adam's m / sqrt(v) (about +-1 whatever |g| is) turns a last-bit difference into a
    visible one, and 12 steps of 2^20 elements meet such entries by chance.  The whole tensor must
    still agree to 1e-5 in norm (or rtol, if looser), which a wrong rule (missed decay, ...) breaks.
    outliers_per_tensor: more elements allowed outside (low-precision parameters, see there)."""
    tol = tol or FP32
    for pa, pb in zip(a, b):
        pa, pb = pa.detach().double(), pb.detach().double()
        outside = ~torch.isclose(pa, pb, rtol=tol["rtol"], atol=tol["atol"])
        assert int(outside.sum()) <= -(-pa.numel() // 100_000) + outliers_per_tensor, \
            f"{int(outside.sum())} of {pa.numel()} differ, up to {(pa - pb).abs().max().item():.3g}"
        bound = max(1e-5, tol["rtol"]) * pb.norm() + tol["atol"]
        assert (pa - pb).norm() <= bound, f"norm of the difference {(pa - pb).norm():.3g}"


# --------------------------------------------------------------------------------------------
# against torch.optim
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, torch_make", [
    (lambda ps: AdamW(ps, lr=0.1, backend="torch"), lambda ps: torch.optim.AdamW(ps, lr=0.1)),
    (lambda ps: SGDW(ps, lr=0.1, momentum=0.9, weight_decay_mode="l2", backend="torch"),
     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
], ids=["adamw", "sgdw"])
def test_state_dict_hooks_see_and_change_what_torch_optims_do(make, torch_make):
    """torch runs the hooks inside its state_dict / load_state_dict, before this class's part: a load pre-hook's
    returned dict was not the one loaded, state a load post-hook replaced was overwritten, and a state_dict
    post-hook did not see (or could not drop) nonfinite_steps and decoupled_weight_decay."""
    def loaded(make_opt):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 3))
        opt = make_opt([p])
        p.grad = torch.ones(3)
        opt.step()
        saved = copy.deepcopy(opt.state_dict())
        fresh = make_opt([p])
        key = next(k for k in saved["state"][0] if k != "step")  # exp_avg, momentum_buffer

        def pre(optimizer, state_dict):
            state_dict = copy.deepcopy(state_dict)
            state_dict["state"][0][key].fill_(2.0)
            return state_dict

        def post(optimizer):
            optimizer.state[p][key] = optimizer.state[p][key] * 3  # replaced, not changed in place

        fresh.register_load_state_dict_pre_hook(pre)
        fresh.register_load_state_dict_post_hook(post)
        fresh.load_state_dict(saved)
        seen = []
        fresh.register_state_dict_post_hook(
            lambda optimizer, state_dict: seen.append(set(state_dict) | set(state_dict["param_groups"][0])))
        fresh.state_dict()
        return fresh.state[p][key], seen[0]

    ours, ours_keys = loaded(make)
    theirs, _ = loaded(torch_make)
    assert torch.equal(ours, theirs) and torch.equal(ours, torch.full((3,), 6.0))
    assert "nonfinite_steps" in ours_keys
    assert ("decoupled_weight_decay" in ours_keys) == isinstance(make([torch.nn.Parameter(torch.ones(1))]), AdamW)


def test_a_refused_load_runs_no_post_hook_and_keeps_the_skipped_step_count():
    """(torch's load_state_dict calls __setstate__, which reset the count to 0 before the refusal)"""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = AdamW([p], lr=0.1, skip_nonfinite=True)
    opt.load_state_dict({**opt.state_dict(), "nonfinite_steps": 5})
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["lr"] = -1.0
    calls = []
    opt.register_load_state_dict_post_hook(lambda optimizer: calls.append(1))
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(saved)
    assert not calls and opt.nonfinite_steps == 5


def test_duplicate_and_complex_parameters_are_refused_at_construction():
    """torch.optim warns about a parameter listed twice and steps it twice (its step count too: the numbers
    differed from torch's); a complex one failed at the first step."""
    p = torch.nn.Parameter(torch.ones(3))
    for make in (lambda ps: AdamW(ps, lr=0.1), lambda ps: SGDW(ps, lr=0.1)):
        with pytest.raises(ValueError, match="holds the same parameter twice"):
            make([p, p])
        opt = make([p])
        with pytest.raises(ValueError, match="holds the same parameter twice"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))] * 2})
        with pytest.raises(TypeError, match="floating point, got torch.complex64"):
            make([torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))])
        with pytest.raises(TypeError, match="sets will change between runs"):  # torch's own checks still run
            opt.add_param_group({"params": {torch.nn.Parameter(torch.ones(2))}})
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [lambda ps, backend: AdamW(ps, lr=0.1, backend=backend),
                                  lambda ps, backend: SGDW(ps, lr=0.1, momentum=0.9, backend=backend)],
                         ids=["adamw", "sgdw"])
def test_a_graph_that_saved_a_parameter_before_the_step_refuses_to_backpropagate(backend, make):
    """torch.optim's in-place update bumps each parameter's version, so a backward through a graph that saved
    the old values is an error; Triton's stores bump nothing, and that backward ran on the new values."""
    p = torch.nn.Parameter(torch.ones(5, device=DEVICE))
    opt = make([p], backend)
    p.grad = torch.ones_like(p)
    loss = (p * p).sum()  # saves p
    version = p._version
    opt.step()
    assert p._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_copy_or_pickle_keeps_the_skipped_step_count():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=0.1, skip_nonfinite=True)
    p.grad = torch.full((3,), float("nan"))
    opt.step()
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert copied.nonfinite_steps == 1
        assert repr(copied).endswith("weight_decay_mode: decoupled\nskip_nonfinite: True\n)")  # (not a group key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_optimizer_contract_closure_hooks_and_a_scheduler(backend, gen):
    """torch.optim's contract: step(closure) re-evaluates the loss with gradients on and returns it, step hooks
    run around the step, and an LR scheduler's lr reaches the kernels: as torch's AdamW, step for step."""
    start = make_params(gen, [(17,)])[0]
    x = torch.randn(17, generator=gen).to(DEVICE)
    losses, calls = {}, []
    for name, make in (("ours", lambda ps: AdamW(ps, lr=0.1, weight_decay=0.1, backend=backend)),
                       ("torch", lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1))):
        p = start.clone().requires_grad_()
        opt = make([p])
        if name == "ours":
            opt.register_step_pre_hook(lambda *_: calls.append("pre"))
            opt.register_step_post_hook(lambda *_: calls.append("post"))
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

        def closure():
            opt.zero_grad()
            loss = ((p - x) ** 2).sum()
            loss.backward()
            return loss

        losses[name] = []
        for _ in range(3):
            losses[name].append(opt.step(closure).item())
            scheduler.step()  # lr 0.1, 0.05, 0.025
        losses[name + " end"] = p.detach().clone()
    assert calls == ["pre", "post"] * 3
    assert losses["ours"] == pytest.approx(losses["torch"], rel=1e-6)
    torch.testing.assert_close(losses["ours end"], losses["torch end"], **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_adamw(backend, weight_decay, gen):
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    a, b = run_pair(gen, lambda p: AdamW(p, **kw, backend=backend), lambda p: torch.optim.AdamW(p, **kw))
    assert_params_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_l2_matches_torch_adam(backend, gen):
    kw = dict(lr=1e-2, weight_decay=0.3)
    a, b = run_pair(gen, lambda p: AdamW(p, **kw, weight_decay_mode="l2", backend=backend),
                    lambda p: torch.optim.Adam(p, **kw))
    assert_params_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.2])
def test_sgdw_without_momentum_matches_torch_sgd(backend, weight_decay, gen):
    a, b = run_pair(gen, lambda p: SGDW(p, lr=0.05, weight_decay=weight_decay, backend=backend),
                    lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=weight_decay))
    assert_params_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum,dampening,nesterov", [(0.9, 0.0, False), (0.9, 0.0, True), (0.5, 0.3, False)])
def test_sgd_l2_matches_torch_sgd_with_momentum(backend, momentum, dampening, nesterov, gen):
    kw = dict(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=0.2)
    a, b = run_pair(gen, lambda p: SGDW(p, **kw, weight_decay_mode="l2", backend=backend),
                    lambda p: torch.optim.SGD(p, **kw))
    assert_params_close(a, b)


class EagerSGDW:
    """The decoupled SGDW rule written out (fastcyclic.optim's docstring), in float64."""

    def __init__(self, params, lr, momentum, dampening, nesterov, weight_decay):
        self.params, self.lr, self.mu, self.damp, self.nesterov, self.wd = params, lr, momentum, dampening, \
            nesterov, weight_decay
        self.buffers = [None] * len(params)

    @torch.no_grad()
    def step(self):
        for i, p in enumerate(self.params):
            g = p.grad.double()
            buf = g.clone() if self.buffers[i] is None else self.mu * self.buffers[i] + (1 - self.damp) * g
            self.buffers[i] = buf
            direction = g + self.mu * buf if self.nesterov else buf
            p.copy_(p.double() * (1 - self.lr * self.wd) - self.lr * direction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_decoupled_sgdw_with_momentum_matches_eager_rule(backend, nesterov, gen):
    kw = dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=nesterov, weight_decay=0.3)
    a, b = run_pair(gen, lambda p: SGDW(p, **kw, backend=backend), lambda p: EagerSGDW(p, **kw))
    assert_params_close(a, b, rtol=1e-5, atol=1e-5)
    # and it is not torch's coupled rule
    c, _ = run_pair(torch.Generator().manual_seed(0), lambda p: SGDW(p, **kw, backend=backend),
                    lambda p: torch.optim.SGD(p, **kw), sizes=[(50,)])
    d, _ = run_pair(torch.Generator().manual_seed(0), lambda p: torch.optim.SGD(p, **kw),
                    lambda p: torch.optim.SGD(p, **kw), sizes=[(50,)])
    assert (c[0] - d[0]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# low precision, groups, dtypes
# --------------------------------------------------------------------------------------------


class EagerAdamWMasterFp32:
    """AdamW on bf16/fp16 parameters with fp32 state and fp32 math, rounded to the parameter's
    dtype after every step (what the kernels promise)."""

    def __init__(self, params, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.wd, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.v = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v):
            g, x = p.grad.float(), p.float() * (1 - self.lr * self.wd)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2 ** self.t)).sqrt() + self.eps
            p.copy_(x - self.lr / (1 - b1 ** self.t) * m / denom)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state(backend, dtype, gen):
    kw = dict(lr=1e-2, weight_decay=0.1)
    a, b = run_pair(gen, lambda p: AdamW(p, **kw, backend=backend), lambda p: EagerAdamWMasterFp32(p, **kw),
                    sizes=[(17,), (300, 7)], dtype=dtype)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    # The kernel and the reference do the fp32 math in other orders; where an fp32 result lies within its
    # last bit of a bf16/fp16 rounding boundary the two round apart, and that element then drifts by a
    # few ulps over the 12 steps (seen: 1 of 2100 elements in ~1 % of runs).  A wrong rule moves every
    # element, so a couple of such elements per tensor are allowed.
    assert_params_close(a, b, rtol=ulp, atol=1e-3 * ulp, outliers_per_tensor=2)
    assert all(p.dtype == dtype for p in a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_params_round_ties_to_even(backend):
    """fp32 results exactly halfway between two bf16 values round to the even one, as torch and the GPU's
    conversion do: 1 + 2^-8 to 1 (not up, as round-half-up gives) and 1 + 3 * 2^-8 to 1 + 2^-6 (not down, as
    the interpreter's truncating store gives)."""
    p = torch.ones(2, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    p.grad = torch.tensor([-2.0 ** -8, -3 * 2.0 ** -8], dtype=torch.bfloat16, device=DEVICE)  # exact in bf16
    q.grad = p.grad.clone()
    SGDW([p], lr=1.0, backend=backend).step()
    torch.optim.SGD([q], lr=1.0).step()
    assert p.detach().float().tolist() == [1.0, 1.0 + 2.0 ** -6] == q.detach().float().tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_with_their_own_lr_and_decay_and_mixed_dtypes(backend, gen):
    w32 = torch.randn(33, 5, generator=gen).to(DEVICE)
    w16 = torch.randn(40, generator=gen).to(DEVICE, torch.bfloat16)
    bias = torch.randn(33, generator=gen).to(DEVICE)
    ours = [t.clone().requires_grad_() for t in (w32, w16, bias)]
    theirs = [t.clone().requires_grad_() for t in (w32, w16, bias)]
    groups = lambda ps: [{"params": ps[:2], "lr": 2e-2, "weight_decay": 0.5},  # noqa: E731
                         {"params": ps[2:], "weight_decay": 0.0}]
    opt_a = AdamW(groups(ours), lr=1e-2, backend=backend)
    opt_b = EagerAdamWMasterFp32(theirs[:2], lr=2e-2, weight_decay=0.5)
    opt_c = torch.optim.AdamW(theirs[2:], lr=1e-2, weight_decay=0.0)
    for _ in range(STEPS):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen).to(DEVICE)
            p.grad, q.grad = g.to(p.dtype), g.to(p.dtype)
        opt_a.step()
        opt_b.step()
        opt_c.step()
    torch.testing.assert_close(ours[0].detach(), theirs[0].detach(), **FP32)
    # bf16: a rounding tie can leave one element an ulp of its start apart (see the test above)
    assert_params_close(ours[1:2], theirs[1:2], rtol=2 ** -7, atol=1e-3 * 2 ** -7, outliers_per_tensor=2)
    torch.testing.assert_close(ours[2].detach(), theirs[2].detach(), **FP32)


@pytest.mark.parametrize("make", [
    lambda ps: (AdamW(ps, lr=1e-2, weight_decay=0.1, backend="triton"), torch.optim.AdamW),
    lambda ps: (SGDW(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, weight_decay_mode="l2", backend="triton"),
                lambda qs, **kw: torch.optim.SGD(qs, lr=1e-2, momentum=0.9, weight_decay=0.1)),
], ids=["adamw", "sgdw"])
def test_unaligned_views_take_the_unaligned_kernel(make, gen):
    """Parameters and gradients that are views at odd offsets into one buffer (not 16-byte aligned): the
    kernels must not assume 16-byte accesses there.  A block wholly inside a tensor and a ragged tail."""
    sizes = (70001, 17)  # the interpreter's block is 65536 elements
    values = torch.randn(sum(sizes) + 1, generator=gen).to(DEVICE)
    buffer = torch.zeros(sum(sizes) + 1, device=DEVICE)
    ours = [buffer[1:1 + sizes[0]], buffer[1 + sizes[0]:]]
    assert all(p.data_ptr() % 16 for p in ours)
    for p, v in zip(ours, (values[1:1 + sizes[0]], values[1 + sizes[0]:])):
        p.copy_(v)
        p.requires_grad_()
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt, reference_class = make(ours)
    reference = reference_class(theirs, lr=1e-2, weight_decay=0.1)
    grads = torch.zeros(sum(sizes) + 1, device=DEVICE)
    for _ in range(3):
        grads.copy_(torch.randn(grads.shape, generator=gen).to(DEVICE))
        for p, q, g in zip(ours, theirs, (grads[1:1 + sizes[0]], grads[1 + sizes[0]:])):
            p.grad, q.grad = g, g.clone()
        opt.step()
        reference.step()
    assert not any(table.aligned for table in opt._tables.values())
    assert_params_close(ours, theirs)
    fresh = [q.detach().clone().requires_grad_() for q in theirs]  # fresh allocations are aligned
    opt, _ = make(fresh)
    for p in fresh:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(table.aligned for table in opt._tables.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_skipped(backend, gen):
    a, b = make_params(gen, [(7,), (9,)])
    a, b = a.requires_grad_(), b.requires_grad_()
    b_before = b.detach().clone()
    opt = AdamW([a, b], lr=0.1, backend=backend)
    a.grad = torch.ones_like(a)
    opt.step()
    assert torch.equal(b.detach(), b_before) and not opt.state[b]
    assert int(opt.state[a]["step"]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_keeps_no_gradient_alive(backend, gen):
    """After zero_grad(set_to_none=True) the gradients are freed (the launch tables hold addresses only),
    so an eager loop does not carry two sets of gradients at its peak."""
    params = [p.requires_grad_() for p in make_params(gen, [(7, 3), (17,)])]
    opt = AdamW(params, lr=0.1, backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    grads = [weakref.ref(p.grad) for p in params]
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(grad() is None for grad in grads)


def test_sparse_gradients_are_refused():
    p = torch.zeros(4, 3, requires_grad=True)
    p.grad = torch.eye(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        AdamW([p], backend="torch").step()


def test_tensor_lr_and_weight_decay_follow_in_place_updates(gen):
    """lr and weight decay as 0-dim tensors (what a CUDA graph needs) behave like floats."""
    lr, wd = torch.tensor(1e-2, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    start = make_params(gen, [(100,)])
    a, b = clones(start), clones(start)
    opt_a = AdamW(a, lr=lr, weight_decay=wd)
    opt_b = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.0)
    for step in range(STEPS):
        g = torch.randn(100, generator=gen).to(DEVICE)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        lr.fill_(1e-2 / (1 + step))  # a schedule and a decay warm-up, set in place
        wd.fill_(0.1 * min(1.0, step / 5))
        opt_b.param_groups[0].update(lr=1e-2 / (1 + step), weight_decay=0.1 * min(1.0, step / 5))
        opt_a.step()
        opt_b.step()
    assert_params_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float_lr_after_a_tensor_lr_is_written(backend, gen):
    """lr 0.01, then a tensor 0.5, then 0.01 again: the device copy must not keep 0.5 because the float
    equals the one it saw two steps ago."""
    start = make_params(gen, [(17,)])
    a, b = clones(start), clones(start)
    opt_a, opt_b = AdamW(a, lr=0.01, backend=backend), torch.optim.AdamW(b, lr=0.01)
    for lr in (0.01, 0.5, 0.01, 0.01):
        opt_a.param_groups[0]["lr"] = torch.tensor(lr, device=DEVICE) if lr == 0.5 else lr
        opt_b.param_groups[0]["lr"] = lr
        g = torch.randn(17, generator=gen).to(DEVICE)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert_params_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_one_element_tensor_lr_steps_a_0_dim_param(backend, gen):
    p = torch.randn((), generator=gen).to(DEVICE).requires_grad_()
    q = p.detach().clone().requires_grad_()
    opt_p = AdamW([p], lr=torch.tensor([0.01], device=DEVICE), weight_decay=torch.tensor([0.1]), backend=backend)
    opt_q = AdamW([q], lr=0.01, weight_decay=0.1, backend=backend)
    for _ in range(3):
        p.grad = q.grad = torch.randn((), generator=gen).to(DEVICE)
        opt_p.step()
        opt_q.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("option", ["maximize", "amsgrad"])
def test_torch_options_we_do_not_implement_are_refused_not_ignored(option):
    """They reach the optimizer through a param group or a torch state dict, not only as keywords."""
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=f"{option}=True is not supported"):
        AdamW([{"params": [p], option: True}])
    opt = AdamW([p])
    with pytest.raises(ValueError, match=f"{option}=True is not supported"):
        opt.load_state_dict(torch.optim.AdamW([p], **{option: True}).state_dict())
    assert option not in opt.param_groups[0]


def test_a_refused_param_group_is_not_kept():
    opt = AdamW([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [lambda p, b: SGDW(p, lr=0.1, backend=b), lambda p, b: AdamW(p, backend=b)],
                         ids=["sgdw", "adamw"])
def test_complex_params_are_refused(make, backend):
    p = torch.ones(3, dtype=torch.complex64, device=DEVICE, requires_grad=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="parameters must be floating point, got torch.complex64"):
        make([p], backend).step()
    assert torch.equal(p, torch.ones_like(p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_nonfinite_with_an_empty_param(backend, gen):
    params = clones(make_params(gen, [(0,), (5,)]))
    opt = AdamW(params, backend=backend, skip_nonfinite=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.nonfinite_steps == 0 and float(opt.state[params[1]]["step"]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_steps_like_the_original(backend, how, gen):
    """torch.optim's optimizers survive copy.deepcopy and pickling; ours keep their options and rebuild their
    caches of device scalars and launch tables."""
    params = clones(make_params(gen, [(7,)]))
    opt = SGDW(params, lr=0.1, momentum=0.9, weight_decay=0.01, backend=backend, skip_nonfinite=True)
    params[0].grad = torch.randn(7, generator=gen).to(DEVICE)
    opt.step()
    if how == "deepcopy":
        twin_opt = copy.deepcopy(opt)
        twin = twin_opt.param_groups[0]["params"]
    else:
        twin_opt = pickle.loads(pickle.dumps(opt))
        twin = twin_opt.param_groups[0]["params"]
    assert twin_opt.skip_nonfinite and twin[0] is not params[0]
    g = torch.randn(7, generator=gen).to(DEVICE)
    params[0].grad, twin[0].grad = g.clone(), g.clone()
    opt.step()
    twin_opt.step()
    assert torch.equal(params[0], twin[0])


def test_auto_backend_steps_non_contiguous_params_with_torch_ops(monkeypatch, gen):
    """On CUDA "auto" picks the kernels, which take contiguous tensors only: a channels_last conv weight goes
    through the torch ops instead of raising.  (Made to pick the kernels here as on CUDA.)"""
    monkeypatch.setattr(AdamW, "_backend", lambda self, group, device: "triton")
    start = torch.randn(4, 3, 2, 2, generator=gen).to(DEVICE).to(memory_format=torch.channels_last)
    a, b = start.clone().requires_grad_(), start.clone().requires_grad_()
    assert not a.is_contiguous()
    opt_a, opt_b = AdamW([a], lr=0.01, weight_decay=0.1), torch.optim.AdamW([b], lr=0.01, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(start.shape, generator=gen).to(DEVICE)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert_params_close([a], [b])


def test_state_made_channels_last_is_read_right_once_the_weight_is_contiguous(monkeypatch, gen):
    """State created by the torch ops for a channels_last weight keeps that layout; once the model is made
    contiguous the kernels take the weight, and read the state as if it were laid out like it (0.2 off torch
    after two steps).  Loading such a state dict did the same."""
    monkeypatch.setattr(AdamW, "_backend", lambda self, group, device: "triton")
    start = torch.randn(4, 3, 2, 2, generator=gen).to(DEVICE).to(memory_format=torch.channels_last)
    a, b = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt_a, opt_b = AdamW([a], lr=0.1), torch.optim.AdamW([b], lr=0.1)
    grads = [torch.randn(start.shape, generator=gen).to(DEVICE) for _ in range(5)]
    for i, g in enumerate(grads):
        if i == 3:  # model.to(memory_format=torch.contiguous_format)
            a.data, b.data = a.data.contiguous(), b.data.contiguous()
            loaded = AdamW([a], lr=0.1)
            loaded.load_state_dict(opt_b.state_dict())  # torch's state, still channels_last
            assert not opt_a.state[a]["exp_avg"].is_contiguous()
        a.grad, b.grad = g.clone(), g.clone()
        (opt_a if i < 3 else loaded).step()
        opt_b.step()
    assert_params_close([a], [b])


# --------------------------------------------------------------------------------------------
# state_dict interchange with torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_adamw_state_dict_is_interchangeable_with_torch(backend, direction, gen):
    kw = dict(lr=1e-2, weight_decay=0.1)
    make_ours = lambda p: AdamW(p, **kw, backend=backend)  # noqa: E731
    make_torch = lambda p: torch.optim.AdamW(p, **kw)  # noqa: E731
    first, second = (make_ours, make_torch) if direction == "ours_to_torch" else (make_torch, make_ours)
    start = make_params(gen, [(17,), (4, 6)])
    grads = [[torch.randn(p.shape, generator=gen).to(DEVICE) for p in start] for _ in range(10)]

    straight = clones(start)
    opt = first(straight)
    step_through(straight, opt, grads)
    switched = clones(start)
    opt = first(switched)
    step_through(switched, opt, grads[:5])
    resumed = second(switched)
    resumed.load_state_dict(opt.state_dict())
    step_through(switched, resumed, grads[5:])
    assert_params_close(switched, straight)


def test_state_dict_keeps_fp32_state_for_bf16_params(gen):
    p = torch.randn(10, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    opt = AdamW([p], backend="torch")
    p.grad = torch.ones_like(p)
    opt.step()
    again = AdamW([p], backend="torch")
    again.load_state_dict(opt.state_dict())
    assert again.state[p]["exp_avg"].dtype == torch.float32
    assert again.state[p]["step"].device == p.device and float(again.state[p]["step"]) == 1
    assert again.param_groups[0]["weight_decay_mode"] == "decoupled"


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_sgd_state_dict_loads_as_l2_mode_and_continues(backend, gen):
    """torch.optim.SGD's weight decay is L2: its state dict continues in SGDW as SGD would, whatever mode
    the SGDW was built with."""
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
    start = make_params(gen, [(17,)])
    ours, theirs = clones(start), clones(start)
    torch_opt = torch.optim.SGD(ours, **kw)
    for _ in range(3):
        ours[0].grad = torch.randn(17, generator=gen).to(DEVICE)
        torch_opt.step()
    with torch.no_grad():
        theirs[0].copy_(ours[0])
    same = torch.optim.SGD(theirs, **kw)
    same.load_state_dict(torch_opt.state_dict())
    opt = SGDW(ours, lr=1.0, backend=backend)  # mode "decoupled" by default; the state dict says l2
    opt.load_state_dict(torch_opt.state_dict())
    assert opt.param_groups[0]["weight_decay_mode"] == "l2"
    step_alike(gen, ours, theirs, opt, same, 5)
    assert_params_close(ours, theirs)


@pytest.mark.parametrize("optimizer", ["adamw", "sgdw"])
def test_float64_state_survives_a_state_dict_round_trip(optimizer, gen):
    """load_state_dict cast every state to float32: float64 AdamW then raised at its next step, and SGDW's
    momentum went on in float32 (3e-8 off an uninterrupted run)."""
    make = (lambda p: AdamW(p, lr=1e-2, weight_decay=0.1)) if optimizer == "adamw" else \
        (lambda p: SGDW(p, lr=0.1, momentum=0.9, weight_decay=0.1))
    start = [torch.randn(9, generator=gen, dtype=torch.float64).to(DEVICE)]
    grads = [torch.randn(9, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(6)]
    straight, resumed = clones(start), clones(start)
    opt, first = make(straight), make(resumed)
    for i, g in enumerate(grads):
        if i == 3:
            second = make(resumed)
            second.load_state_dict(first.state_dict())
            first = second
        straight[0].grad, resumed[0].grad = g.clone(), g.clone()
        opt.step()
        first.step()
    assert all(v.dtype == torch.float64 for k, v in first.state[resumed[0]].items() if k != "step")
    assert torch.equal(resumed[0], straight[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_momentum_buffer_saved_as_none_is_a_first_step(backend, gen):
    """torch 1.x SGD saved momentum_buffer=None at momentum 0; loaded into SGDW with momentum it crashed
    (torch ops) or read address 0 (kernels).  torch's SGD starts the buffer, as SGDW now does."""
    start = make_params(gen, [(6,)])
    ours, theirs = clones(start), clones(start)
    saved = {"state": {0: {"momentum_buffer": None}},
             "param_groups": [dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                                   maximize=False, foreach=None, differentiable=False, fused=None, params=[0])]}
    opt, reference = SGDW(ours, lr=0.1, momentum=0.9, backend=backend), torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    opt.load_state_dict(copy.deepcopy(saved))
    reference.load_state_dict(copy.deepcopy(saved))
    step_alike(gen, ours, theirs, opt, reference, 3)
    assert_params_close(ours, theirs)


def test_sgdw_refuses_torch_sgds_positional_order():
    """SGD(params, lr, momentum, dampening, weight_decay) typed as SGDW put 5e-4 in nesterov: Nesterov on,
    weight decay 0, silently."""
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(TypeError, match="nesterov must be True or False, got 0.0005.*weight_decay before nesterov"):
        SGDW(p, 0.1, 0.9, 0, 5e-4)
    assert SGDW(p, 0.1, 0.9, 0, np.bool_(True)).param_groups[0]["nesterov"] is True


def test_torch_adam_state_dict_loads_as_l2_mode(gen):
    p = torch.randn(10, generator=gen).requires_grad_()
    opt = AdamW([p], backend="torch")
    opt.load_state_dict(torch.optim.Adam([p], weight_decay=0.1).state_dict())
    assert opt.param_groups[0]["weight_decay_mode"] == "l2"


@pytest.mark.parametrize("mode", ["l2", "decoupled"])
def test_torch_adam_continues_our_state_dict_with_its_rule(mode, gen):
    """torch.optim.Adam reads the rule from a group's decoupled_weight_decay (default False, L2): our dict
    names it, so Adam continues a decoupled run decoupled, and ours reads the rule back.  (torch.optim.AdamW
    sets the flag to True on load: it decays decoupled whatever the dict says.)"""
    kw = dict(lr=1e-2, weight_decay=0.3)
    start = make_params(gen, [(17,), (4, 6)])
    grads = [[torch.randn(p.shape, generator=gen).to(DEVICE) for p in start] for _ in range(6)]

    straight = clones(start)
    step_through(straight, AdamW(straight, **kw, weight_decay_mode=mode, backend="torch"), grads)
    switched = clones(start)
    opt = AdamW(switched, **kw, weight_decay_mode=mode, backend="torch")
    step_through(switched, opt, grads[:2])
    theirs = torch.optim.Adam(switched, **kw)
    theirs.load_state_dict(opt.state_dict())
    step_through(switched, theirs, grads[2:4])
    ours = AdamW(switched, **kw, weight_decay_mode="l2" if mode == "decoupled" else "decoupled", backend="torch")
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["weight_decay_mode"] == mode
    assert "decoupled_weight_decay" not in ours.param_groups[0]  # it would go stale when the mode changes
    step_through(switched, ours, grads[4:])
    assert_params_close(switched, straight)


def test_a_param_groups_decoupled_weight_decay_flag_picks_the_rule(gen):
    """torch.optim's name for the rule in a param group is honoured, not ignored."""
    a, b = run_pair(gen, lambda p: AdamW([{"params": p, "decoupled_weight_decay": False}], lr=1e-2,
                                         weight_decay=0.3, backend="torch"),
                    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.3), sizes=[(17,)], steps=4)
    assert_params_close(a, b)
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="decoupled_weight_decay=True contradicts its weight_decay_mode='l2'"):
        AdamW([{"params": [p], "decoupled_weight_decay": True, "weight_decay_mode": "l2"}])
    opt = AdamW([p], backend="torch")
    saved = opt.state_dict()
    saved["param_groups"][0]["weight_decay_mode"] = "l2"  # and decoupled_weight_decay stays True
    with pytest.raises(ValueError, match="decoupled_weight_decay=True contradicts"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["weight_decay_mode"] == "decoupled"


# --------------------------------------------------------------------------------------------
# non-finite gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gradient_propagates_by_default_like_torch(backend, gen):
    start = make_params(gen, [(8,)])
    a, b = clones(start), clones(start)
    opt_a, opt_b = AdamW(a, backend=backend), torch.optim.AdamW(b)
    g = torch.randn(8, generator=gen).to(DEVICE)
    g[3] = float("nan")
    a[0].grad, b[0].grad = g.clone(), g.clone()
    opt_a.step()
    opt_b.step()
    assert torch.equal(a[0].isnan(), b[0].isnan()) and a[0].isnan().sum() == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero", [0.0, "tensor"])
@pytest.mark.parametrize("ours,theirs", [
    (lambda ps, b, wd: AdamW(ps, weight_decay=wd, weight_decay_mode="l2", backend=b),
     lambda ps: torch.optim.Adam(ps, weight_decay=0.0)),
    (lambda ps, b, wd: SGDW(ps, lr=0.1, momentum=0.9, weight_decay=wd, weight_decay_mode="l2", backend=b),
     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.0)),
], ids=["adam", "sgd"])
def test_an_l2_decay_of_zero_leaves_an_infinite_param_infinite_like_torch(ours, theirs, zero, backend, gen):
    """torch adds wd * p only when wd != 0: with wd = 0, 0 * inf would turn an infinite entry into NaN."""
    zero = torch.tensor(0.0, device=DEVICE) if zero == "tensor" else zero
    start = make_params(gen, [(8,)])
    start[0][2] = float("inf")
    a, b = clones(start), clones(start)
    step_alike(gen, a, b, ours(a, backend, zero), theirs(b), steps=2)
    assert a[0][2].item() == b[0][2].item() == float("inf")
    finite = torch.arange(8, device=DEVICE) != 2
    assert_params_close([a[0][finite]], [b[0][finite]])


def test_a_float_lr_changed_before_a_capture_is_not_recorded_in_it(gen, monkeypatch):
    """A float lr changed (a scheduler) right before the step a CUDA graph captures: its write was recorded in the
    graph, so every replay put that value back after refresh_scalars() had written the current one.  Inside a
    capture float values are not written (simulated here: _capturing patched); refresh_scalars() writes them."""
    from fastcyclic import optim

    params = clones(make_params(gen, [(8,)]))
    opt = AdamW(params, lr=1e-3, backend="triton")
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    opt.param_groups[0]["lr"] = 5e-4
    monkeypatch.setattr(optim, "_capturing", lambda: True)
    lr_buffer, _ = opt._device_scalars(0, opt.param_groups[0], params[0].device)
    assert lr_buffer.item() == pytest.approx(1e-3)  # nothing written (recorded) inside the capture
    monkeypatch.setattr(optim, "_capturing", lambda: False)
    opt.refresh_scalars()  # before each replay
    assert lr_buffer.item() == pytest.approx(5e-4)


def test_a_first_step_cannot_be_captured(gen, monkeypatch):
    """A capture of a first step would record the creation of its state and scalars: every replay would reset them."""
    from fastcyclic import optim

    params = clones(make_params(gen, [(8,)]))
    opt = AdamW(params, lr=1e-3, backend="triton")
    params[0].grad = torch.ones_like(params[0])
    monkeypatch.setattr(optim, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="needs a warm-up step first"):
        opt.step()
    # a parameter without a gradient in the warm-up gets its first step in the capture
    for make in (lambda ps: AdamW(ps, lr=1e-3, backend="triton"),
                 lambda ps: SGDW(ps, lr=1e-3, momentum=0.9, backend="triton")):
        params = clones(make_params(gen, [(8,), (5,)]))
        opt = make(params)
        monkeypatch.setattr(optim, "_capturing", lambda: False)
        params[0].grad = torch.ones_like(params[0])
        opt.step()
        opt.step()  # SGDW: past its own first step
        params[1].grad = torch.ones_like(params[1])
        monkeypatch.setattr(optim, "_capturing", lambda: True)
        with pytest.raises(RuntimeError, match="needs a warm-up step first"):
            opt.step()
    w, opt, handle, x, y = _fused_setup(gen)
    with pytest.raises(RuntimeError, match="needs a warm-up step first"):
        linear_cross_entropy(x, w, y, backend="triton", fused_update=handle).backward()
    # SGDW with momentum: its group has stepped (another parameter warmed up), the fused weight has no buffer yet
    w = torch.randn(7, 4, generator=gen).to(DEVICE).requires_grad_()
    other = torch.zeros(3, device=DEVICE, requires_grad=True)
    opt = SGDW([w, other], lr=0.1, momentum=0.9, backend="triton")
    handle = fused_update(opt, w)
    monkeypatch.setattr(optim, "_capturing", lambda: False)
    other.grad = torch.ones_like(other)
    opt.step()
    monkeypatch.setattr(optim, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="needs a warm-up step first"):
        linear_cross_entropy(x, w, y, backend="triton", fused_update=handle).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_huge_gradients_step_like_torch(backend, gen):
    """|g| ~ 1e20: g * g alone overflows fp32 (above 1.8e19), torch's ((1 - beta2) g) g does not; an inf second
    moment would freeze the parameter for good."""
    start = make_params(gen, [(8,)])
    a, b = clones(start), clones(start)
    opt_a, opt_b = AdamW(a, lr=0.1, backend=backend), torch.optim.AdamW(b, lr=0.1)
    g = torch.randn(8, generator=gen).to(DEVICE) * 1e20
    a[0].grad, b[0].grad = g.clone(), g.clone()
    opt_a.step()
    opt_b.step()
    assert torch.isfinite(opt_a.state[a[0]]["exp_avg_sq"]).all()
    torch.testing.assert_close(a[0], b[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["adamw", "sgdw"])
def test_skip_nonfinite_skips_the_whole_step_and_counts_it(backend, optimizer, gen):
    """A step with an Inf in any gradient changes no parameter or state; the run continues as if
    that step had not been taken."""
    make = (lambda p: AdamW(p, lr=0.1, backend=backend, skip_nonfinite=True)) if optimizer == "adamw" else \
        (lambda p: SGDW(p, lr=0.1, momentum=0.9, backend=backend, skip_nonfinite=True))
    make_ref = (lambda p: torch.optim.AdamW(p, lr=0.1)) if optimizer == "adamw" else \
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    start = make_params(gen, [(8,), (3, 3)])
    a, b = clones(start), clones(start)
    opt_a, opt_b = make(a), make_ref(b)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in start]
        if step in (0, 3):
            bad = [g.clone() for g in grads]
            bad[1].view(-1)[4] = float("inf")
            for p, g in zip(a, bad):
                p.grad = g
            opt_a.step()
        for pa, pb, g in zip(a, b, grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert opt_a.nonfinite_steps == 2
    assert_params_close(a, b)


def test_the_skipped_step_count_survives_a_state_dict_round_trip(gen):
    """A resumed run keeps counting; a torch.optim dict (no count) starts it at 0; a bad count is refused
    before anything moves."""
    p = torch.randn(8, generator=gen).to(DEVICE).requires_grad_()
    opt = AdamW([p], lr=0.1, skip_nonfinite=True)
    for bad in (True, False, True):
        p.grad = torch.full_like(p, float("nan") if bad else 1.0)
        opt.step()
    saved = opt.state_dict()
    assert saved["nonfinite_steps"] == 2
    resumed = AdamW([p], lr=0.1, skip_nonfinite=True)
    resumed.load_state_dict(saved)
    p.grad = torch.full_like(p, float("inf"))
    resumed.step()
    assert resumed.nonfinite_steps == 3
    torch.optim.AdamW([p], lr=0.1).load_state_dict(saved)  # torch ignores the extra key
    resumed.load_state_dict(torch.optim.AdamW([p], lr=0.1).state_dict())
    assert resumed.nonfinite_steps == 0
    before = {k: v.clone() for k, v in opt.state[p].items()}
    for value in (-1, 1.5, "2", True):
        with pytest.raises(ValueError, match=r"nonfinite_steps.*must be an integer >= 0, got " +
                           re.escape(repr(value))):
            opt.load_state_dict({**saved, "nonfinite_steps": value})
        assert opt.nonfinite_steps == 2
        assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda p: AdamW(p, lr=-1.0), "lr must be >= 0, got -1.0"),
    (lambda p: AdamW(p, betas=(0.9, 1.0)), r"betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"),
    (lambda p: AdamW(p, betas=(-0.1, 0.9)), "betas must be"),
    (lambda p: AdamW(p, eps=0.0), "eps must be finite and > 0, got 0.0"),
    (lambda p: AdamW(p, weight_decay=-0.01), "weight_decay must be >= 0, got -0.01"),
    (lambda p: AdamW(p, weight_decay_mode="coupled"), "weight_decay_mode must be one of"),
    (lambda p: AdamW(p, backend="cuda"), "backend must be one of"),
    (lambda p: AdamW(p, lr=float("nan")), "lr must be >= 0, got nan"),
    (lambda p: SGDW(p, lr=-0.1), "lr must be >= 0"),
    (lambda p: SGDW(p, lr=0.1, momentum=-0.5), "momentum must be finite and >= 0, got -0.5"),
    (lambda p: SGDW(p, lr=0.1, nesterov=True), "nesterov needs momentum > 0"),
    (lambda p: SGDW(p, lr=0.1, weight_decay_mode="L2"), "weight_decay_mode must be one of"),
    (lambda p: AdamW([{"params": p, "lr": -3.0}]), "lr must be >= 0, got -3.0"),
])
def test_bad_hyperparameters_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.zeros(3, requires_grad=True)])


@pytest.mark.parametrize("kwargs", [dict(lr="0.1"), dict(weight_decay="0.01"), dict(lr=True)])
def test_hyperparameters_of_the_wrong_type_raise_at_construction(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(TypeError, match=f"{name} must be a number or a one-element tensor"):
        AdamW([torch.zeros(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("make,match", [
    (lambda p: AdamW(p, eps=None), "eps must be a number, got None"),
    (lambda p: AdamW(p, eps="1e-8"), "eps must be a number, got '1e-8'"),
    (lambda p: AdamW(p, betas=0.9), r"betas must be a pair \(beta1, beta2\), got 0.9"),
    (lambda p: AdamW(p, betas=(0.9, None)), "each of betas must be a number, got None"),
    (lambda p: SGDW(p, lr=0.1, momentum=None), "momentum must be a number, got None"),
    (lambda p: SGDW(p, lr=0.1, dampening="0"), "dampening must be a number, got '0'"),
])
def test_other_hyperparameters_of_the_wrong_type_name_the_value(make, match):
    with pytest.raises(TypeError, match=match):
        make([torch.zeros(3, requires_grad=True)])


def test_betas_as_an_array_or_a_tensor_are_taken_as_torch_takes_them():
    for betas in (np.array([0.9, 0.99]), torch.tensor([0.5, 0.75]), [0.9, 0.99]):
        opt = AdamW([torch.zeros(3, requires_grad=True)], betas=betas)
        assert opt.param_groups[0]["betas"] == tuple(float(b) for b in betas)


def test_a_state_dict_with_bad_hyperparameters_is_refused_and_nothing_changes():
    p = torch.zeros(3, requires_grad=True)
    opt = AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    for change, match in ((dict(lr=-1.0), "lr must be >= 0"), (dict(weight_decay_mode="bogus"), "weight_decay_mode"),
                          (dict(eps=0.0), "eps must be finite and > 0")):
        saved = copy.deepcopy(opt.state_dict())  # state_dict() shares the live state's dicts
        saved["param_groups"][0].update(change)
        saved["state"][0]["exp_avg"] = torch.full((3,), 7.0)
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(saved)
        assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["weight_decay_mode"] == "decoupled"
        assert opt.param_groups[0]["params"][0] is p and float(opt.state[p]["exp_avg"][0]) != 7.0


@pytest.mark.parametrize("make,change,match", [
    (lambda ps: AdamW(ps, lr=0.1), dict(betas=(0.9, 1.0)), r"betas must be two numbers in \[0, 1\)"),
    (lambda ps: SGDW(ps, lr=0.1, momentum=0.9), dict(momentum=-1.0), "momentum must be finite and >= 0, got -1.0"),
    (lambda ps: SGDW(ps, lr=0.1, momentum=0.9), dict(dampening=2.0), r"dampening must be in \[0, 1\], got 2.0"),
    (lambda ps: SGDW(ps, lr=0.1, momentum=0.9), dict(nesterov=True, dampening=0.5), "nesterov needs"),
], ids=["adamw-betas", "sgdw-momentum", "sgdw-dampening", "sgdw-nesterov"])
def test_a_state_dict_with_bad_betas_or_momentum_is_refused(make, change, match):
    p = torch.zeros(3, requires_grad=True)
    opt = make([p])
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0].update(change)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    assert all(opt.param_groups[0][k] == v for k, v in make([p]).param_groups[0].items() if k != "params")


@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1), lambda ps: SGDW(ps, lr=0.1, momentum=0.9)],
                         ids=["adamw", "sgdw"])
@pytest.mark.parametrize("bad", ["complex", "sparse"])
def test_a_refusal_in_a_later_group_leaves_every_group_unstepped(make, bad):
    """Every check runs before anything moves: a retry must not step the first group twice."""
    good = torch.ones(3, device=DEVICE, requires_grad=True)
    other = torch.ones(4, 3, device=DEVICE, requires_grad=True)
    opt = make([{"params": [good]}, {"params": [other]}])
    if bad == "complex":  # (made so after construction, which refuses it)
        other.data = other.data.to(torch.complex64)
        other.grad = torch.ones_like(other)
    else:
        other.grad = torch.eye(4, 3, device=DEVICE).to_sparse()
    good.grad = torch.ones_like(good)
    with pytest.raises((TypeError, RuntimeError), match="floating point|sparse"):
        opt.step()
    assert torch.equal(good.detach(), torch.ones(3, device=DEVICE)) and not opt.state


@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1, backend="triton"),
                                  lambda ps: SGDW(ps, lr=0.1, momentum=0.9, dampening=0.5, backend="triton")],
                         ids=["adamw", "sgdw"])
def test_a_non_contiguous_param_refused_by_triton_leaves_no_state(make, gen):
    """The refusal comes before the step count or the momentum buffer exists, so switching to backend='torch' as
    the message says then takes torch's first step."""
    start = torch.randn(4, 6, generator=gen).to(DEVICE)
    p = start.clone().t().requires_grad_()
    p.grad = torch.randn(6, 4, generator=gen).to(DEVICE)
    opt = make([p])
    with pytest.raises(ValueError, match="contiguous tensors only.*strides"):
        opt.step()
    assert not opt.state and torch.equal(p.detach(), start.t())
    opt.param_groups[0]["backend"] = "torch"
    opt.step()
    q = start.clone().t().requires_grad_()
    q.grad = p.grad.clone()
    reference = (torch.optim.AdamW([q], lr=0.1) if isinstance(opt, AdamW) else
                 torch.optim.SGD([q], lr=0.1, momentum=0.9, dampening=0.5))
    reference.step()
    torch.testing.assert_close(p.detach(), q.detach())


# --------------------------------------------------------------------------------------------
# the update fused into the cross-entropy backward
# --------------------------------------------------------------------------------------------


def _classifier_problem(gen, dtype=torch.float32, n=37, d=20, k=53):
    w = (torch.randn(k, d, generator=gen) / d ** 0.5).to(DEVICE, dtype)
    b = (torch.randn(k, generator=gen) * 0.1).to(DEVICE, dtype)
    u = (torch.randn(d, d, generator=gen) / d ** 0.5).to(DEVICE, dtype)
    batches = [(torch.randn(n, d, generator=gen).to(DEVICE, dtype), torch.randint(0, k, (n,), generator=gen)
                .to(DEVICE)) for _ in range(STEPS)]  # the issue's >= 10 steps
    return (w, b, u), batches


def _train(start, batches, make_opt, backend, fused, bias=True, reduction="mean", **loss_options):
    w, b, u = (t.clone().requires_grad_() for t in start)
    opt = make_opt([w, b, u] if bias else [w, u])
    handle = fused_update(opt, w) if fused else None
    for x, y in batches:
        loss = linear_cross_entropy(torch.tanh(x @ u), w, y, bias=b if bias else None, backend=backend,
                                    reduction=reduction, fused_update=handle, **loss_options)
        loss.backward()
        assert w.grad is None if fused else w.grad is not None
        opt.step()
        opt.zero_grad()
    return w.detach(), b.detach(), u.detach(), opt


OPTIMIZERS = {
    "adamw": lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adam-l2": lambda ps: AdamW([{"params": ps[:1]}, {"params": ps[1:], "weight_decay": 0.0}], lr=1e-2,
                                weight_decay=0.5, weight_decay_mode="l2"),
    "sgdw-momentum": lambda ps: SGDW(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    # dampening != 0: the first step must set buf = g, not damp it (the fused kernel's FIRST_STEP flag)
    "sgdw-dampening": lambda ps: SGDW(ps, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1),
    "sgd-l2-nesterov": lambda ps: SGDW(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1,
                                       weight_decay_mode="l2"),
    "sgdw-plain": lambda ps: SGDW(ps, lr=0.1, weight_decay=0.1),
}


@pytest.mark.parametrize("optimizer", ["sgdw-momentum", "sgd-l2-nesterov"])
def test_fused_update_wide_fp32_tile(optimizer, gen):
    """fp32 D > 256 takes the fused tile with 32 h rows per step (64 spilled registers in the N loop) and
    masked D (300 of 512).  SGD: Adam would magnify rounding-level dW differences into +-lr steps."""
    assert _fused_update_tile(300, torch.float32, torch.device(DEVICE)).block_loop == 32
    start, batches = _classifier_problem(gen, n=40, d=300, k=45)
    two_step = _train(start, batches, OPTIMIZERS[optimizer], "triton", fused=False)
    fused = _train(start, batches, OPTIMIZERS[optimizer], "triton", fused=True)
    for a, b in zip(fused[:3], two_step[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_fused_update_equals_backward_then_step(backend, optimizer, gen):
    start, batches = _classifier_problem(gen)
    two_step = _train(start, batches, OPTIMIZERS[optimizer], backend, fused=False)
    fused = _train(start, batches, OPTIMIZERS[optimizer], backend, fused=True)
    for a, b in zip(fused[:3], two_step[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (fused[0] - start[0]).abs().max() > 1e-2  # the classifier did move
    # the optimizer state matches too (step counts, moments / momentum buffers)
    w_state = fused[3].state.get(fused[3].param_groups[0]["params"][0], {})
    w_state_ref = two_step[3].state.get(two_step[3].param_groups[0]["params"][0], {})
    assert w_state.keys() == w_state_ref.keys()
    for key in w_state:
        torch.testing.assert_close(w_state[key].float(), w_state_ref[key].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["adamw", "sgdw-momentum"])
def test_fused_update_takes_the_loss_options(backend, optimizer, gen):
    """Label smoothing, z-loss and ignore_index change dW: the fused update must form the same dW as the
    backward (h = tanh(x @ u) has a nonzero mean, so the smoothing term, which scales with the sum of h, shows)."""
    start, batches = _classifier_problem(gen)
    batches = [(x, torch.where(torch.arange(len(y), device=y.device) % 4 == 0, 5, y)) for x, y in batches]
    options = dict(label_smoothing=0.2, z_loss=1e-3, ignore_index=5)
    two_step = _train(start, batches, OPTIMIZERS[optimizer], backend, fused=False, **options)
    fused = _train(start, batches, OPTIMIZERS[optimizer], backend, fused=True, **options)
    plain = _train(start, batches, OPTIMIZERS[optimizer], backend, fused=False)
    assert (two_step[0] - plain[0]).abs().max() > 1e-3  # the options do change the classifier
    for a, b in zip(fused[:3], two_step[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_update_takes_the_tuned_tiles(gen, monkeypatch):
    """tuning(config=...) reached dh but not the fused dW pass (run at the end of the backward), which took the
    default tiles: a tuned or tested tile never ran there."""
    from fastcyclic.kernels import linear_ce as kernels
    from fastcyclic.linear_ce import tuning

    tile = kernels.TileConfig(32, 16, 16, 32)
    config = kernels.LCEConfig(forward=tile, backward_dw=tile, backward_dh=tile)
    seen, real = [], kernels.backward

    def backward(*args, **kwargs):
        seen.append((kwargs.get("update") is not None, kwargs.get("config")))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "backward", backward)
    w, opt, handle, x, y = _fused_setup(gen)
    with tuning(config=config):
        linear_cross_entropy(x, w, y, backend="triton", fused_update=handle).backward()
    assert seen == [(False, config), (True, config)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["adamw", "sgdw-momentum"])
@pytest.mark.parametrize("saving", ["checkpoint", "checkpoint-reentrant", "copy-hooks"])
def test_fused_update_under_saved_tensor_hooks(backend, optimizer, saving, gen):
    """Saved-tensor hooks (torch.utils.checkpoint, save_on_cpu, offloading) hand the backward another tensor
    object than the parameter, or a copy: the update, the optimizer state and the bias gradient must still land
    on the parameters themselves.  The reentrant checkpoint runs the fused backward in a nested backward."""
    from torch.utils.checkpoint import checkpoint

    start, batches = _classifier_problem(gen)
    two_step = _train(start, batches, OPTIMIZERS[optimizer], backend, fused=False)
    w, b, u = (t.clone().requires_grad_() for t in start)
    opt = OPTIMIZERS[optimizer]([w, b, u])
    handle = fused_update(opt, w)
    for x, y in batches:
        def loss_of(feat):
            return linear_cross_entropy(feat, w, y, bias=b, backend=backend, fused_update=handle)
        feat = torch.tanh(x @ u)
        if saving.startswith("checkpoint"):
            loss = checkpoint(loss_of, feat, use_reentrant=saving == "checkpoint-reentrant")
        else:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                loss = loss_of(feat)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for a, ref in zip((w, b, u), two_step[:3]):
        torch.testing.assert_close(a.detach(), ref, rtol=1e-5, atol=1e-6)
    assert len(opt.state) == 3  # no state keyed by stray tensors
    opt.state_dict()  # every state key is a parameter


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["adamw", "sgdw-dampening"])
def test_fused_update_on_an_empty_batch_still_steps(backend, optimizer, gen):
    """N = 0 with reduction="sum": dW is zero but the step still applies (weight decay, the step count, the
    momentum buffer), as backward-then-step does; a launcher that skipped the dW kernel for no rows left W as it
    was."""
    start, batches = _classifier_problem(gen, n=0)
    two_step = _train(start, batches, OPTIMIZERS[optimizer], backend, fused=False, reduction="sum")
    fused = _train(start, batches, OPTIMIZERS[optimizer], backend, fused=True, reduction="sum")
    for a, b in zip(fused[:3], two_step[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (fused[0] - start[0]).abs().max() > 1e-3  # the classifier did move (weight decay)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_update_keeps_the_bias_gradient_in_place(backend, gen):
    """With gradients kept between steps (zero_grad(set_to_none=False), as a captured CUDA graph needs), the fused
    backward adds dbias into the existing bias.grad: its address holds (the optimizer's tables and a captured
    graph point at it), and the steps equal the two-step path."""
    start, batches = _classifier_problem(gen)
    two_step = _train(start, batches, OPTIMIZERS["adamw"], backend, fused=False)
    w, b, u = (t.clone().requires_grad_() for t in start)
    opt = OPTIMIZERS["adamw"]([w, b, u])
    handle = fused_update(opt, w)
    addresses = set()
    for x, y in batches:
        linear_cross_entropy(torch.tanh(x @ u), w, y, bias=b, backend=backend, fused_update=handle).backward()
        addresses.add(b.grad.data_ptr())
        opt.step()
        opt.zero_grad(set_to_none=False)
    assert len(addresses) == 1
    for a, r in zip((w, b, u), two_step[:3]):
        torch.testing.assert_close(a.detach(), r, rtol=1e-5, atol=1e-6)


def test_sgdw_first_and_later_steps_share_one_table(gen):
    """SGDW's first step (buf = g) is a launch of its own, but its tensor table is the later steps' table: a CUDA
    graph captured after the first step finds the table it needs and uploads nothing."""
    params = [p.requires_grad_() for p in make_params(gen, [(17,), (5, 3)])]
    opt = SGDW(params, lr=0.1, momentum=0.9, backend="triton")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        opt.step()
    assert len(opt._tables) == 1


def test_refresh_scalars_writes_a_changed_float_lr(gen):
    """A captured graph replays without step()'s Python: refresh_scalars() carries a new float lr to the device."""
    params = [p.requires_grad_() for p in make_params(gen, [(17,)])]
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, backend="triton")
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    (buffer, _), = opt._scalars.values()
    opt.param_groups[0]["lr"] = 0.5
    assert buffer[0].item() == pytest.approx(1e-2)
    opt.refresh_scalars()
    assert buffer[0].item() == 0.5 and buffer[1].item() == pytest.approx(0.1)


def test_fused_update_bf16_matches_two_step_within_rounding(gen):
    """bf16: the fused path steps on the fp32 dW, the two-step path on dW rounded to bf16."""
    start, batches = _classifier_problem(gen, torch.bfloat16)
    two_step = _train(start, batches, OPTIMIZERS["adamw"], "triton", fused=False, bias=False)
    fused = _train(start, batches, OPTIMIZERS["adamw"], "triton", fused=True, bias=False)
    change = (two_step[0].float() - start[0].float()).norm()
    assert (fused[0].float() - two_step[0].float()).norm() < 0.05 * change


def _fused_setup(gen):
    w = torch.randn(7, 4, generator=gen).to(DEVICE).requires_grad_()
    opt = AdamW([w], lr=0.1)
    x, y = torch.randn(8, 4, generator=gen).to(DEVICE), torch.randint(0, 7, (8,), generator=gen).to(DEVICE)
    return w, opt, fused_update(opt, w), x, y


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_update_refuses_a_weight_changed_in_place_after_the_forward(backend, gen):
    """The fused loss does not save W (see _FusedUpdateLinearCE.forward) but checks its version as torch would:
    a W changed in place between forward and backward fails the backward, and nothing is updated."""
    w, opt, handle, x, y = _fused_setup(gen)
    loss = linear_cross_entropy(x, w, y, backend=backend, fused_update=handle)
    with torch.no_grad():
        w.mul_(2.0)
    changed = w.detach().clone()
    with pytest.raises(RuntimeError, match="modified by an inplace operation: the classifier weight"):
        loss.backward()
    opt.step()
    assert torch.equal(w.detach(), changed) and not opt.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_weight_hook_that_never_runs_fails_the_backward(backend, gen):
    """torch 2.8 and 2.9 never called the weight's gradient hook once saved-tensor hooks had packed W, and the
    classifier was silently left unstepped under torch.utils.checkpoint.  The loss no longer saves W, and a hook
    that never runs fails the backward (here the hook is removed)."""
    w, opt, handle, x, y = _fused_setup(gen)
    before = w.detach().clone()
    handle._hook.remove()
    with pytest.raises(RuntimeError, match="fused update did not run.*Nothing was updated"):
        linear_cross_entropy(x, w, y, backend=backend, fused_update=handle).backward()
    opt.step()
    assert torch.equal(w.detach(), before) and not opt.state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["penalty", "tied", "accumulation", "two_forwards_then_two_backwards",
                                  "grad_present"])
def test_fused_update_refuses_what_it_cannot_honour(case, backend, gen):
    """Each refusal on both backends: the Triton one runs the dW kernel from W's gradient hook, other code."""
    w, opt, handle, x, y = _fused_setup(gen)
    loss_of = functools.partial(linear_cross_entropy, backend=backend, fused_update=handle)
    before = w.detach().clone()
    if case == "penalty":  # another use of W: refused in W's gradient hook, before any update
        with pytest.raises(RuntimeError, match="also used elsewhere in the graph.*nothing was updated"):
            (loss_of(x, w, y) + (w ** 2).sum()).backward()
    elif case == "tied":
        with pytest.raises(RuntimeError, match="also used elsewhere"):
            loss_of(torch.tanh(x + w[0]), w, y).backward()
    elif case == "accumulation":  # the first micro-batch steps; the second is refused before any kernel
        loss_of(x, w, y).backward()
        before = w.detach().clone()
        with pytest.raises(RuntimeError, match="gradient accumulation across micro-batches cannot be fused"):
            loss_of(x, w, y)
    elif case == "two_forwards_then_two_backwards":  # our message, not torch's in-place version error
        first, second = (loss_of(x, w, y) for _ in range(2))
        first.backward()
        before = w.detach().clone()
        with pytest.raises(RuntimeError, match="gradient accumulation across micro-batches cannot be fused"):
            second.backward()
    else:
        w.grad = torch.zeros_like(w)
        with pytest.raises(RuntimeError, match="already holds a gradient"):
            loss_of(x, w, y)
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_update_refuses_a_computed_bias(backend, gen):
    """The fused backward writes bias.grad itself: a bias computed from the parameter (scaled, cast) would never
    pass its gradient on."""
    w, opt, handle, x, y = _fused_setup(gen)
    b = torch.zeros(7, device=DEVICE, requires_grad=True)
    opt.add_param_group({"params": [b]})
    before = w.detach().clone()
    with pytest.raises(ValueError, match="bias as the parameter itself .* MulBackward0"):
        linear_cross_entropy(x, w, y, bias=b * 2.0, backend=backend, fused_update=handle)
    assert torch.equal(w.detach(), before) and b.grad is None


def test_fused_update_refuses_bad_configurations(gen):
    w = torch.randn(7, 4, generator=gen).requires_grad_()
    opt = AdamW([w])
    with pytest.raises(ValueError, match="grad_accumulation_steps=4"):
        fused_update(opt, w, grad_accumulation_steps=4)
    with pytest.raises(ValueError, match="max_grad_norm=1.0"):
        fused_update(opt, w, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="skip_nonfinite"):
        fused_update(AdamW([w], skip_nonfinite=True), w)
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        fused_update(AdamW([torch.zeros(2, requires_grad=True)]), w)
    with pytest.raises(ValueError, match="contiguous"):
        wt = torch.randn(4, 7).T.requires_grad_()
        fused_update(AdamW([wt]), wt)
    with pytest.raises(TypeError, match="AdamW or SGDW"):
        fused_update(torch.optim.AdamW([w]), w)


def test_fused_update_fits_says_which_widths_the_cuda_tile_takes():
    # only the tile sizing is asked, so this runs without a GPU; the trainer falls back on it
    cuda = torch.device("cuda")
    for dtype, widest in ((torch.float32, 1024), (torch.bfloat16, 2048), (torch.float16, 2048)):
        assert fused_update_fits(1, dtype, cuda) and fused_update_fits(widest, dtype, cuda)
        assert not fused_update_fits(widest + 1, dtype, cuda)
    assert fused_update_fits(1 << 14, torch.float32, "cpu")
    with pytest.raises(ValueError, match="does not fit D=1025"):
        _fused_update_tile(1025, torch.float32, cuda)
    # TF32 dots keep a second, transposed copy of the h slice in shared memory (the sm_90 check's switch: torch's
    # flag object is not an ordinary attribute holder, and monkeypatch's undo fails on it with some pytest versions)
    with allow_tf32():
        assert fused_update_fits(512, torch.float32, cuda) and not fused_update_fits(513, torch.float32, cuda)
        assert fused_update_fits(2048, torch.bfloat16, cuda)


def test_fused_update_is_inert_without_grad_mode(gen):
    """Evaluation with the training call's arguments: no grad mode (also under autocast, where a fusing call is
    refused) leaves the handle unused."""
    w, opt, handle, x, y = _fused_setup(gen)
    before = w.detach().clone()
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, y, fused_update=handle)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            autocast_loss = linear_cross_entropy(x, w, y, fused_update=handle)
    torch.testing.assert_close(loss, linear_cross_entropy(x, w.detach(), y))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        torch.testing.assert_close(autocast_loss, linear_cross_entropy(x, w.detach(), y))
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_update_refuses_two_fused_losses_on_one_weight(backend, gen):
    w, opt, handle, x, y = _fused_setup(gen)
    before = w.detach().clone()
    loss = linear_cross_entropy(x[:4], w, y[:4], backend=backend, fused_update=handle) + \
        linear_cross_entropy(x[4:], w, y[4:], backend=backend, fused_update=handle)
    with pytest.raises(RuntimeError, match="more than one fused cross-entropy"):
        loss.backward()
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_update_backward_that_does_not_reach_the_weight(backend, gen):
    w, opt, handle, x, y = _fused_setup(gen)
    u = torch.eye(4, device=DEVICE).requires_grad_()
    opt.add_param_group({"params": [u]})
    before = w.detach().clone()
    torch.autograd.grad(linear_cross_entropy(x @ u, w, y, backend=backend, fused_update=handle), [u])
    linear_cross_entropy(x @ u, w, y, backend=backend, fused_update=handle).backward(inputs=[u])
    opt.step()  # W got no gradient: not stepped, as without fused_update
    assert torch.equal(w.detach(), before) and w not in opt.state
    with pytest.raises(RuntimeError, match="autograd.grad w.r.t. the classifier weight"):
        torch.autograd.grad(linear_cross_entropy(x, w, y, backend=backend, fused_update=handle), [w])
    assert torch.equal(w.detach(), before)


class _FailingBackward(torch.autograd.Function):
    """Identity whose backward raises: a backward that fails after the classifier's gradient hook has run."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward failed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_update_waits_for_the_end_of_backward(backend, gen):
    """The update runs once the whole backward has succeeded: a node that still reads W (through a detached copy)
    sees it as it was, as without fused_update, and a backward that fails updates nothing and blocks nothing."""
    w, opt, handle, x, y = _fused_setup(gen)
    w_plain = w.detach().clone().requires_grad_()
    opt_plain = AdamW([w_plain], lr=opt.param_groups[0]["lr"], backend=backend)
    for weight, fused, optimizer in ((w, handle, opt), (w_plain, None, opt_plain)):
        xr = x.clone().requires_grad_()
        loss = linear_cross_entropy(xr, weight, y, backend=backend, fused_update=fused) + (xr @ weight.detach().T).sum()
        loss.backward()
        optimizer.step()
    torch.testing.assert_close(w.detach(), w_plain.detach(), rtol=1e-5, atol=1e-6)
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="backward failed"):
        linear_cross_entropy(_FailingBackward.apply(xr), w, y, backend=backend, fused_update=handle).backward()
    assert torch.equal(w.detach(), before)
    linear_cross_entropy(x, w, y, backend=backend, fused_update=handle).backward()  # not refused
    opt.step()
    assert not torch.equal(w.detach(), before)


def test_fused_update_refuses_hyper_parameters_changed_before_step(gen):
    """The update used the group's lr when the backward ran: a change before step() would reach the other
    parameters only, so step() refuses before anything moves.  skip_nonfinite turned on later is refused too."""
    w, opt, handle, x, y = _fused_setup(gen)
    linear_cross_entropy(x, w, y, fused_update=handle).backward()
    updated = w.detach().clone()
    opt.param_groups[0]["lr"] = 0.5
    with pytest.raises(RuntimeError, match=r"changed between the fused backward and optimizer.step\(\) \(lr=0.1 -> "
                                           r"0.5\).*Restore them and call step\(\)"):
        opt.step()
    assert torch.equal(w.detach(), updated)
    opt.param_groups[0]["lr"] = 0.1  # the way out the message names
    opt.step()
    assert torch.equal(w.detach(), updated)  # W moved in the backward, once
    linear_cross_entropy(x, w, y, fused_update=handle).backward()  # and fusing goes on
    assert not torch.equal(w.detach(), updated)
    w2, opt2, handle2, x, y = _fused_setup(gen)
    opt2.skip_nonfinite = True
    with pytest.raises(ValueError, match="skip_nonfinite"):
        linear_cross_entropy(x, w2, y, fused_update=handle2)


# --------------------------------------------------------------------------------------------
# the fused update: group betas and eps, refusals, saved copies of W, a failed backward
# --------------------------------------------------------------------------------------------


def test_fused_update_uses_the_groups_betas_and_eps(gen):
    """The fused AdamW epilogue takes the group's betas and eps, not the defaults."""
    start, batches = _classifier_problem(gen, n=16, d=8, k=24)
    make = lambda ps: AdamW(ps, lr=1e-2, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.1)  # noqa: E731
    two_step = _train(start, batches, make, "triton", fused=False)
    fused = _train(start, batches, make, "triton", fused=True)
    for a, b in zip(fused[:3], two_step[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key,value", [("weight_decay", 0.3), ("betas", (0.5, 0.9)), ("eps", 1e-3)])
def test_fused_update_refuses_any_hyper_parameter_changed_before_step(key, value, gen):
    """Not only lr: any float hyper-parameter changed between the fused backward and step() is refused."""
    w, opt, handle, x, y = _fused_setup(gen)
    linear_cross_entropy(x, w, y, fused_update=handle).backward()
    updated = w.detach().clone()
    opt.param_groups[0][key] = value
    with pytest.raises(RuntimeError, match="changed between the fused backward and optimizer.step"):
        opt.step()
    assert torch.equal(w.detach(), updated)


def test_fused_update_refuses_a_later_gradient_before_step(gen):
    """An ordinary gradient reaching W after its fused update, before step(), is refused (it would step W twice)."""
    w, opt, handle, x, y = _fused_setup(gen)
    linear_cross_entropy(x, w, y, fused_update=handle).backward()
    with pytest.raises(RuntimeError, match="received a gradient after its fused update"):
        (w ** 2).sum().backward()


def test_fused_update_invalidates_saved_copies_of_the_weight(gen):
    """The fused kernel bumps W's version: a graph that saved W (a detached alias) fails loudly afterwards."""
    w, opt, handle, x, y = _fused_setup(gen)
    xr = x.clone().requires_grad_()
    other = (xr @ w.detach().T).sum()  # saves W for xr's gradient
    linear_cross_entropy(x, w, y, backend="triton", fused_update=handle).backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_update_bias_gradient_when_the_weight_is_not_reached(backend, gen):
    """autograd.grad w.r.t. the bias alone (W not reached) gives the ordinary dbias and leaves W alone."""
    w, opt, handle, x, y = _fused_setup(gen)
    b = torch.randn(7, generator=gen).to(DEVICE).requires_grad_()
    opt.add_param_group({"params": [b]})
    before = w.detach().clone()
    (grad,) = torch.autograd.grad(linear_cross_entropy(x, w, y, bias=b, backend=backend, fused_update=handle), [b])
    (expected,) = torch.autograd.grad(linear_cross_entropy(x, w.detach(), y, bias=b, backend=backend), [b])
    torch.testing.assert_close(grad, expected)
    assert torch.equal(w.detach(), before) and w.grad is None


def test_fused_update_forgets_a_deferred_update_at_step(gen):
    """An update deferred by a backward that then failed is dropped at step(): a later plain gradient of W is kept."""
    w, opt, handle, x, y = _fused_setup(gen)
    before = w.detach().clone()
    loss = _FailingBackward.apply(w).sum() + linear_cross_entropy(x, w, y, fused_update=handle)
    with pytest.raises(RuntimeError, match="backward failed"):
        loss.backward()  # (the fused loss's node runs first: it was recorded last)
    assert torch.equal(w.detach(), before)
    opt.step()
    (w ** 2).sum().backward()
    assert torch.equal(w.grad, 2 * w.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_optimizer_replaced_with_its_fused_update_is_freed(backend, gen):
    """W's gradient hook held the handle, and the handle its optimizer: a new optimizer for a new phase left
    the old one, with all its state (2x the classifier for Adam), alive as long as W."""
    (w, _, u), batches = _classifier_problem(gen)
    w.requires_grad_()

    def phase(opt, handle):
        x, y = batches[0]
        linear_cross_entropy(x, w, y, backend=backend, fused_update=handle).backward()
        opt.step()

    opt = AdamW([w], lr=1e-2, backend=backend)
    handle = fused_update(opt, w)
    phase(opt, handle)
    old = weakref.ref(opt)
    opt = AdamW([w], lr=1e-3, backend=backend)
    handle = fused_update(opt, w)
    gc.collect()
    assert old() is None
    before = w.detach().clone()
    phase(opt, handle)  # the new handle updates W; the old one's hook is gone with it
    assert w.grad is None and not torch.equal(w, before)


# --------------------------------------------------------------------------------------------
# CUDA only: torch's fused AdamW and CUDA graph capture
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_adamw_matches_torch_fused_at_size(gen):
    kw = dict(lr=1e-3, weight_decay=0.01)
    a, b = run_pair(gen, lambda p: AdamW(p, **kw), lambda p: torch.optim.AdamW(p, **kw, fused=True),
                    sizes=[((1 << 24) + 5,), (4097, 129)], steps=5)
    assert_params_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer", ["adamw", "sgdw-momentum"])
def test_cuda_graph_replay_equals_eager_steps(optimizer, gen):
    """Step count, lr and weight decay live on the device: a captured step replays correctly."""
    start = make_params(gen, [(1000,), (33, 17)])
    grads = [[torch.randn(p.shape, generator=gen).to(DEVICE) for p in start] for _ in range(8)]
    lr = torch.tensor(1e-2, device=DEVICE)
    make = (lambda p: AdamW(p, lr=lr, weight_decay=0.1)) if optimizer == "adamw" else \
        (lambda p: SGDW(p, lr=lr, momentum=0.9, weight_decay=0.1))
    eager, graphed = clones(start), clones(start)
    opt_e, opt_g = make(eager), make(graphed)
    lr_e = lr.clone()
    opt_e.param_groups[0]["lr"] = lr_e
    for p, g in zip(eager, grads[0]):
        p.grad = g.clone()
    for p, g in zip(graphed, grads[0]):
        p.grad = g.clone()
    # warm-up outside the graph: state and tables exist, and every kernel variant the captured step
    # launches is compiled (SGDW's first step has a variant of its own, so it warms up twice)
    warmup = 1 if optimizer == "adamw" else 2
    for _ in range(warmup):
        opt_e.step()
        opt_g.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for i, gs in enumerate(grads[warmup:]):
        lr_e.fill_(1e-2 / (2 + i))
        lr.fill_(1e-2 / (2 + i))
        for p, q, g in zip(eager, graphed, gs):
            p.grad.copy_(g)
            q.grad.copy_(g)
        opt_e.step()
        graph.replay()
    torch.cuda.synchronize()
    assert_params_close(graphed, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
def test_cuda_graph_with_float_lrs_changed_before_and_after_capture(gen):
    """Float lrs (a scheduler's) changed before the capture and between replays: refresh_scalars() before each
    replay gives the eager steps (the change just before the capture was recorded in the graph and put back)."""
    start = make_params(gen, [(1000,), (33, 17)])
    grads = [[torch.randn(p.shape, generator=gen).to(DEVICE) for p in start] for _ in range(6)]
    eager, graphed = clones(start), clones(start)
    opt_e, opt_g = AdamW(eager, lr=1e-2, weight_decay=0.1), AdamW(graphed, lr=1e-2, weight_decay=0.1)
    for params in (eager, graphed):
        for p, g in zip(params, grads[0]):
            p.grad = g.clone()
    opt_e.step()
    opt_g.step()  # the warm-up
    opt_g.param_groups[0]["lr"] = 5e-3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for i, gs in enumerate(grads[1:]):
        for opt in (opt_e, opt_g):
            opt.param_groups[0]["lr"] = 1e-3 / (1 + i)
        for p, q, g in zip(eager, graphed, gs):
            p.grad.copy_(g)
            q.grad.copy_(g)
        opt_e.step()
        opt_g.refresh_scalars()
        graph.replay()
    torch.cuda.synchronize()
    assert_params_close(graphed, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d", [150, pytest.param(1100, marks=pytest.mark.skipif(
    DEVICE.type == "cuda", reason="the interpreter's case: no shared-memory limit, so D > 1024 fits there")),
    pytest.param(1024, marks=pytest.mark.cuda)])
def test_fused_update_wide_rows(d, gen):
    """D beyond one default tile (128 on CPU): the fused dW kernel takes all of D per program (under the
    interpreter any D: fused_update_fits says "always" on CPU)."""
    n, k = (517, 4099) if DEVICE.type == "cuda" else (37, 53)
    start, batches = _classifier_problem(gen, n=n, d=d, k=k)
    # eps 1e-3: Adam's step g / (|g| + eps) turns the rounding of a gradient near eps into a step of up to lr, and a
    # W of 58300 entries has some (with eps 1e-8 one seed in many differed by 3e-4 of the norm at the first step)
    adamw = lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1, eps=1e-3)  # noqa: E731
    two_step = _train(start, batches, adamw, "triton", fused=False)
    fused = _train(start, batches, adamw, "triton", fused=True)
    for a, b in zip(fused[:3], two_step[:3]):
        assert (a - b).norm() <= 1e-4 * b.norm()


def _cuda_generator(gen):
    """A CUDA generator seeded from the test's CPU one: large inputs drawn on the device, still reproducible."""
    return torch.Generator(DEVICE).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))


def _ends(t, count):
    """The first and last `count` entries along dim 0 (copies, so the big tensor can be freed)."""
    return torch.cat([t[:count], t[-count:]]).clone()


@pytest.mark.cuda
@pytest.mark.xdist_group("large-gpu")
@pytest.mark.parametrize("optimizer", ["adamw", "sgdw-momentum"])
def test_cuda_multi_tensor_update_past_2_31_elements(optimizer, gen):
    """int64 offsets in the multi-tensor kernels: one fp32 parameter of 2^31 + 1000 elements (four 8.6 GB
    buffers), beside a small one, against the torch backend on copies of its two ends.  The update is
    elementwise, so the ends' result depends on the ends alone; the last block is a masked one."""
    cuda_gen = _cuda_generator(gen)
    big = torch.randn(2**31 + 1000, device=DEVICE, generator=cuda_gen).requires_grad_()
    small = torch.randn(17, device=DEVICE, generator=cuda_gen).requires_grad_()
    ends = [_ends(big.detach(), 4099).requires_grad_(), small.detach().clone().requires_grad_()]
    ours, reference = OPTIMIZERS[optimizer]([big, small]), OPTIMIZERS[optimizer](ends)
    for group in reference.param_groups:
        group["backend"] = "torch"
    for _ in range(3):
        big.grad = torch.randn(big.shape, device=DEVICE, generator=cuda_gen)
        small.grad = torch.randn(small.shape, device=DEVICE, generator=cuda_gen)
        ends[0].grad, ends[1].grad = _ends(big.grad, 4099), small.grad.clone()
        ours.step()
        reference.step()
    assert_params_close([_ends(big.detach(), 4099), small], ends, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.xdist_group("large-gpu")
def test_cuda_fused_update_with_k_times_d_past_2_31(gen):
    """The fused epilogue's int64 offsets into W and its fp32 state: K*D > 2^31 (fp32 W, 8.6 GB), SGDW with
    momentum fused into the backward against backward-then-step, compared on the first and last rows'
    updates, with targets at the far end of W so the last rows get gradient."""
    n, d, k = 64, 257, (2**31) // 257 + 1000
    assert k * d > 2**31
    seed = int(torch.randint(2**62, (1,), generator=gen))
    batches = []
    for _ in range(2):
        y = torch.randint(0, k, (n,), generator=gen)
        y[:6] = torch.tensor([k - 1, k - 2, k - 3, 0, 1, k // 2])
        batches.append((torch.randn(n, d, generator=gen).to(DEVICE), y.to(DEVICE)))
    updates = []
    for fused in (False, True):
        w = (torch.randn(k, d, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed)) * 0.05)
        start = _ends(w, 8)
        w.requires_grad_()
        opt = OPTIMIZERS["sgdw-momentum"]([w])
        handle = fused_update(opt, w) if fused else None
        for x, y in batches:
            linear_cross_entropy(x, w, y, backend="triton", fused_update=handle).backward()
            opt.step()
            opt.zero_grad()
        updates.append(_ends(w.detach(), 8) - start)
        del w, opt, handle
        torch.cuda.empty_cache()
    two_step, fused = updates
    for rows in (slice(0, 8), slice(8, 16)):
        assert (fused[rows] - two_step[rows]).norm() <= 1e-4 * two_step[rows].norm()


# --------------------------------------------------------------------------------------------
# cases found by mutation testing: each fails if the rule named in its comment is broken
# --------------------------------------------------------------------------------------------


def _pair(gen, n, dtype=torch.float32):
    """A start tensor of n elements and two trainable copies of it."""
    (start,) = make_params(gen, [(n,)], dtype)
    (a,), (b,) = clones([start]), clones([start])
    return start, a, b


# ln(0) passed as 0 instead of -1e30 (beta^t taken as 1: 0/0 bias correction)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.9, 0.0)])
def test_adamw_with_a_zero_beta_matches_torch(backend, betas, gen):
    kw = dict(lr=1e-2, betas=betas, weight_decay=0.1)
    start, a, b = _pair(gen, 33)
    step_alike(gen, [a], [b], AdamW([a], **kw, backend=backend), torch.optim.AdamW([b], **kw), 3)
    torch.testing.assert_close(a.detach() - start, b.detach() - start, rtol=1e-4, atol=1e-7)


# 1 - beta2^t computed as 1 - exp(t ln beta2) in fp32 (cancellation)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_bias_correction_is_accurate_for_beta2_near_one(backend, gen):
    """beta2 = 0.99999: 1 - exp(ln beta2) in fp32 is 3e-3 off, the step 1.5e-3 off; the series is exact."""
    kw = dict(lr=1.0, betas=(0.9, 0.99999), weight_decay=0.0)
    start, a, b = _pair(gen, 64)
    step_alike(gen, [a], [b], AdamW([a], **kw, backend=backend), torch.optim.AdamW([b], **kw), 2)
    torch.testing.assert_close(a.detach() - start, b.detach() - start, rtol=2e-5, atol=1e-6)


# a block wholly inside the tensor when it is one element short (start + BLOCK - 1 <= numel)
def test_a_tensor_one_short_of_a_block_is_not_written_past_its_end():
    n = kernels.BLOCK - 1
    buffer = torch.zeros(n + 1, device=DEVICE)  # the parameter, then one element that is not
    grads = torch.ones(n + 1, device=DEVICE)
    p = buffer[:n].requires_grad_()
    p.grad = grads[:n]
    SGDW([p], lr=0.1, backend="triton").step()
    assert float(buffer[n]) == 0.0
    assert torch.equal(p.detach(), torch.full((n,), -0.1, device=DEVICE))


# only parameter addresses checked for 16-byte alignment
@pytest.mark.parametrize("make", [lambda ps: SGDW(ps, lr=0.1, momentum=0.9, backend="triton"),
                                  lambda ps: AdamW(ps, lr=0.1, backend="triton")], ids=["sgdw", "adamw"])
def test_an_unaligned_gradient_alone_takes_the_unaligned_kernel(make, gen):
    p = torch.randn(33, generator=gen).to(DEVICE).requires_grad_()
    grads = torch.randn(34, generator=gen).to(DEVICE)
    p.grad = grads[1:]
    assert p.data_ptr() % 16 == 0 and p.grad.data_ptr() % 16
    opt = make([p])
    opt.step()
    assert not any(table.aligned for table in opt._tables.values())


# the table rebuilt (a host-to-device upload) during a CUDA graph capture
def test_the_launch_table_refuses_to_rebuild_during_a_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    p = torch.zeros(3)
    with pytest.raises(RuntimeError, match="changed address during CUDA graph capture"):
        kernels.TensorTable().update([(p, p, None, None, None)], torch.device("cuda"))


# the table key without the element counts
def test_a_parameter_that_shrinks_in_place_gets_a_new_table():
    storage, grads = torch.zeros(20, device=DEVICE), torch.ones(20, device=DEVICE)
    p = torch.nn.Parameter(storage[:20])
    p.grad = grads[:20]
    opt = SGDW([p], lr=0.1, backend="triton")
    opt.step()
    p.grad = None
    p.data = storage[:5]  # same address, fewer elements
    p.grad = grads[:5]
    opt.step()
    assert torch.allclose(storage[:5], torch.tensor(-0.2)) and torch.allclose(storage[5:], torch.tensor(-0.1))


# NaN weight decay, a many-element tensor lr
@pytest.mark.parametrize("make,match", [
    (lambda p: AdamW(p, weight_decay=float("nan")), "weight_decay must be >= 0, got nan"),
    (lambda p: SGDW(p, lr=0.1, weight_decay=float("nan")), "weight_decay must be >= 0, got nan"),
    (lambda p: AdamW(p, lr=torch.tensor([0.1, 0.2])), r"a tensor lr must hold one value, got shape \(2,\)"),
    (lambda p: AdamW(p, weight_decay=torch.zeros(2)), r"a tensor weight_decay must hold one value"),
    (lambda p: SGDW(p, lr=0.1, momentum=0.9, dampening=1.5), r"dampening must be in \[0, 1\], got 1.5"),
    (lambda p: SGDW(p, lr=0.1, momentum=0.9, dampening=-0.5), r"dampening must be in \[0, 1\], got -0.5"),
    # a param group's own values are checked as the constructor's are
    (lambda p: AdamW([{"params": p, "betas": (0.9, 1.0)}]), r"betas must be two numbers in \[0, 1\)"),
    (lambda p: SGDW([{"params": p, "momentum": -1.0}], lr=0.1), "momentum must be finite and >= 0, got -1.0"),
    (lambda p: SGDW([{"params": p, "nesterov": True}], lr=0.1), "nesterov needs momentum > 0"),
    (lambda p: SGDW(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
     "nesterov needs momentum > 0 and dampening 0"),
    (lambda p: AdamW(p, betas=(0.9, 0.99, 0.5)), r"betas must be two numbers in \[0, 1\), got \(0.9, 0.99, 0.5\)"),
    (lambda p: AdamW([{"params": p, "differentiable": True}]), "differentiable=True is not supported"),
])
def test_more_bad_hyperparameters_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.zeros(3, requires_grad=True)])


@pytest.mark.parametrize("make,match", [
    (lambda p: AdamW(p, lr=float("inf")), "lr must be finite, got inf"),
    (lambda p: SGDW(p, lr=float("inf")), "lr must be finite, got inf"),
    (lambda p: AdamW(p, weight_decay=float("inf")), "weight_decay must be finite, got inf"),
    (lambda p: AdamW(p, eps=float("inf")), "eps must be finite and > 0, got inf"),
    (lambda p: SGDW(p, lr=0.1, momentum=float("inf")), "momentum must be finite and >= 0, got inf"),
])
def test_infinite_hyperparameters_are_refused(make, match):
    """An infinite lr, decay or momentum turns the parameters into inf or NaN at the first steps."""
    with pytest.raises(ValueError, match=match):
        make([torch.zeros(3, requires_grad=True)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,change,match", [
    (lambda ps, b: AdamW(ps, lr=0.1, backend=b), dict(lr=-1.0), "lr must be >= 0, got -1.0"),
    (lambda ps, b: AdamW(ps, lr=0.1, backend=b), dict(betas=(0.9, 1.5)), r"betas must be two numbers in \[0, 1\)"),
    (lambda ps, b: SGDW(ps, lr=0.1, momentum=0.9, backend=b), dict(momentum=float("nan")), "momentum must be"),
], ids=["adamw-lr", "adamw-betas", "sgdw-momentum"])
def test_a_value_written_into_a_group_is_checked_at_the_step(backend, make, change, match):
    """Schedulers and users write group["lr"] directly; a bad value is refused before anything moves (it
    moved the parameter uphill, or made it NaN)."""
    p = torch.ones(3, device=DEVICE, requires_grad=True)
    opt = make([p], backend)
    p.grad = torch.ones(3, device=DEVICE)
    opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    opt.param_groups[0].update(change)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert torch.equal(p.detach(), before[0]) and all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_value_written_into_the_classifiers_group_is_checked_before_the_fused_backward(backend, gen):
    """The fused update steps W inside the backward: an lr of inf moved W there, and step() then refused the rest."""
    W = torch.randn(7, 4, device=DEVICE, generator=gen).requires_grad_()
    E = torch.randn(10, 4, device=DEVICE, generator=gen).requires_grad_()
    opt = AdamW([W, E], lr=1e-2, backend=backend)
    handle = fused_update(opt, W)
    tokens, target = torch.randint(0, 10, (5,), device=DEVICE), torch.randint(0, 7, (5,), device=DEVICE)
    linear_cross_entropy(E[tokens], W, target, backend=backend, fused_update=handle).backward()
    opt.step()
    opt.zero_grad()
    before = W.detach().clone(), E.detach().clone()
    opt.param_groups[0]["lr"] = float("inf")
    with pytest.raises(ValueError, match=r"param_groups\[0\], as the update found it: lr must be finite, got inf"):
        linear_cross_entropy(E[tokens], W, target, backend=backend, fused_update=handle).backward()
    assert torch.equal(W.detach(), before[0]) and torch.equal(E.detach(), before[1])
    # written between the forward and the backward: the update reads the values in the backward
    opt.param_groups[0]["lr"] = 1e-2
    opt.zero_grad()
    loss = linear_cross_entropy(E[tokens], W, target, backend=backend, fused_update=handle)
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"param_groups\[0\], as the update found it: betas must be two numbers"):
        loss.backward()
    assert torch.equal(W.detach(), before[0])


@pytest.mark.parametrize("change, match", [
    (lambda g: g.update(lr=float("inf")), "lr must be finite, got inf"),      # beside a tensor weight decay
    (lambda g: g["betas"].__setitem__(0, 1.5), r"betas must be two numbers in \[0, 1\), got \(1.5, 0.999\)"),
], ids=["tensor-decay-beside", "list-betas-in-place"])
def test_the_check_at_the_step_reads_every_float_value(change, match):
    """A group holding a tensor (the trainer's weight decay) was not checked at all, and a list betas changed in
    place compared equal to the snapshot of it that had been checked."""
    p = torch.ones(3, device=DEVICE, requires_grad=True)
    opt = AdamW([{"params": [p], "betas": [0.9, 0.999], "weight_decay": torch.tensor(0.1, device=DEVICE)}], lr=0.1)
    p.grad = torch.ones(3, device=DEVICE)
    opt.step()
    change(opt.param_groups[0])
    with pytest.raises(ValueError, match=match):
        opt.step()


def test_only_a_zero_momentum_is_let_through_under_nesterov_after_construction():
    """A scheduler may bring momentum to 0 (and a state dict saved then resumes); dampening stays refused."""
    p = torch.ones(3, device=DEVICE, requires_grad=True)
    opt = SGDW([p], lr=0.1, momentum=0.9, nesterov=True)
    p.grad = torch.ones(3, device=DEVICE)
    opt.param_groups[0]["momentum"] = 0.0
    opt.step()
    SGDW([torch.ones(3, device=DEVICE, requires_grad=True)], lr=0.1, momentum=0.9,
         nesterov=True).load_state_dict(opt.state_dict())
    opt.param_groups[0].update(momentum=0.9, dampening=0.5)
    with pytest.raises(ValueError, match="nesterov needs momentum > 0 and dampening 0"):
        opt.step()
    opt.param_groups[0].update(dampening=0.0, nesterov="yes")
    with pytest.raises(TypeError, match="nesterov must be True or False, got 'yes'"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nesterov_with_momentum_cycled_to_zero_steps_like_torch(backend):
    """OneCycleLR(base_momentum=0) or CyclicLR bring momentum to 0 mid-run: plain SGD in torch, refused here."""
    ours, theirs = (torch.ones(3, device=DEVICE, requires_grad=True) for _ in range(2))
    opts = (SGDW([ours], lr=0.1, momentum=0.9, nesterov=True, backend=backend),
            torch.optim.SGD([theirs], lr=0.1, momentum=0.9, nesterov=True))
    for momentum in (0.9, 0.0, 0.5):
        for opt, p in zip(opts, (ours, theirs)):
            opt.param_groups[0]["momentum"] = momentum
            p.grad = torch.full((3,), 0.5, device=DEVICE)
            opt.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="nesterov needs momentum > 0"):
        SGDW([ours], lr=0.1, momentum=0.0, nesterov=True)  # at construction it is still a contradiction


@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1), lambda ps: SGDW(ps, lr=0.1, momentum=0.9)],
                         ids=["adamw", "sgdw"])
def test_a_state_dict_whose_moments_do_not_fit_the_parameters_is_refused(make):
    """A moment of another shape failed the step halfway: the first tensors had moved, the rest had not."""
    ps = [torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)]
    opt = make(ps)
    for p in ps:
        p.grad = torch.ones(3)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    key = "exp_avg" if isinstance(opt, AdamW) else "momentum_buffer"
    saved["state"][1][key] = torch.ones(7)
    fresh = [torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)]
    other = make(fresh)
    with pytest.raises(ValueError, match=rf"{key} of parameter 1 has shape \(7,\), but the parameter has shape \(3,\)"):
        other.load_state_dict(saved)
    assert not other.state and other.param_groups[0]["params"] == fresh


# only Inf, not NaN, detected by skip_nonfinite
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["adamw", "sgdw"])
def test_skip_nonfinite_skips_a_nan_gradient(backend, optimizer, gen):
    p = torch.randn(8, generator=gen).to(DEVICE).requires_grad_()
    before = p.detach().clone()
    opt = (AdamW([p], lr=0.1, backend=backend, skip_nonfinite=True) if optimizer == "adamw" else
           SGDW([p], lr=0.1, momentum=0.9, backend=backend, skip_nonfinite=True))
    p.grad = torch.randn(8, generator=gen).to(DEVICE)
    p.grad[2] = float("nan")
    opt.step()
    assert opt.nonfinite_steps == 1 and torch.equal(p.detach(), before)


# float64 parameters sent to the kernels with backend="triton"
@pytest.mark.parametrize("make,reference", [
    (lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1, backend="triton"),
     lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
    (lambda ps: SGDW(ps, lr=0.1, momentum=0.9, backend="triton"), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
], ids=["adamw", "sgdw"])
def test_float64_params_with_backend_triton_step_like_torch(make, reference, gen):
    start, a, b = _pair(gen, 9, torch.float64)
    step_alike(gen, [a], [b], make([a]), reference([b]), 3)
    torch.testing.assert_close(a, b)


# device scalars first created inside a capture (after load_state_dict, no warm-up): NaN lr at every replay
def test_a_captured_first_step_after_load_state_dict_is_refused(gen, monkeypatch):
    from fastcyclic import optim

    p = torch.randn(8, generator=gen).to(DEVICE).requires_grad_()
    opt = AdamW([p], lr=1e-2, backend="triton")
    p.grad = torch.ones_like(p)
    opt.step()
    loaded = AdamW([p], lr=1e-2, backend="triton")
    loaded.load_state_dict(opt.state_dict())
    before = p.detach().clone()
    monkeypatch.setattr(optim, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="needs a warm-up step first"):
        loaded.step()
    assert torch.equal(p.detach(), before)


# the fused backward's dbias replaces a bias gradient from another term instead of adding to it
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_update_adds_dbias_to_a_bias_gradient_from_elsewhere(backend, gen):
    w0 = torch.randn(7, 4, generator=gen).to(DEVICE)
    b0 = torch.randn(7, generator=gen).to(DEVICE)
    x, y = torch.randn(8, 4, generator=gen).to(DEVICE), torch.randint(0, 7, (8,), generator=gen).to(DEVICE)
    results = []
    for fused in (True, False):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        opt = SGDW([w, b], lr=0.1)
        handle = fused_update(opt, w) if fused else None
        (linear_cross_entropy(x, w, y, bias=b, backend=backend, fused_update=handle) + (b ** 2).sum()).backward()
        opt.step()
        results.append((w.detach(), b.detach()))
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


# a second handle for one weight
def test_a_second_fused_update_handle_for_one_weight_is_refused(gen):
    w = torch.randn(7, 4, generator=gen).to(DEVICE).requires_grad_()
    opt = AdamW([w])
    first = fused_update(opt, w)
    with pytest.raises(ValueError, match="already has a fused_update handle"):
        fused_update(opt, w)
    del first  # a handle dropped is gone (the optimizer holds it weakly): a new one may take its place
    fused_update(opt, w)


def test_a_dropped_optimizer_with_a_fused_update_handle_is_freed_without_the_cyclic_gc(gen):
    """The handle holds its optimizer; the optimizer must not hold the handle strongly back: such a cycle keeps
    every parameter and all optimizer state (GPU memory) alive until a full gc, many finished runs later."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        w = torch.randn(7, 4, generator=gen).to(DEVICE).requires_grad_()
        for _ in range(3):  # one weight through several optimizers (phases): no dead hooks pile up on it
            opt = AdamW([w], weight_decay=0.1)
            handle = fused_update(opt, w)
            linear_cross_entropy(torch.randn(5, 4, device=DEVICE), w,
                                 torch.arange(5, device=DEVICE), fused_update=handle).backward()
            opt.step()
            refs = weakref.ref(opt), weakref.ref(handle)
            del opt, handle
            assert all(r() is None for r in refs)
        assert not w._backward_hooks
    finally:
        gc.enable()


# "auto" must pick the kernels for CUDA parameters
def test_auto_backend_picks_the_kernels_for_cuda_parameters():
    opt = AdamW([torch.zeros(3, requires_grad=True)])
    assert opt._backend(opt.param_groups[0], torch.device("cuda")) == "triton"
    assert opt._backend(opt.param_groups[0], torch.device("cpu")) == "torch"


# SGDW's own hyper-parameters (and the decay mode) changed between the fused backward and step()
@pytest.mark.parametrize("key,value", [("momentum", 0.5), ("dampening", 0.5), ("nesterov", True),
                                       ("weight_decay_mode", "l2")])
def test_fused_sgdw_refuses_its_hyper_parameters_changed_before_step(key, value, gen):
    w = torch.randn(7, 4, generator=gen).to(DEVICE).requires_grad_()
    opt = SGDW([w], lr=0.1, momentum=0.9)
    handle = fused_update(opt, w)
    x, y = torch.randn(8, 4, generator=gen).to(DEVICE), torch.randint(0, 7, (8,), generator=gen).to(DEVICE)
    linear_cross_entropy(x, w, y, fused_update=handle).backward()
    opt.param_groups[0][key] = value
    with pytest.raises(RuntimeError, match=f"changed between the fused backward and optimizer.step.*{key}="):
        opt.step()


# an integer step count (torch 1.x state dicts) loaded as int64 and read by the kernel as fp32 bits
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_integer_step_in_a_state_dict_loads_as_fp32(backend, gen):
    start, a, b = _pair(gen, 17)
    opt_a, opt_b = AdamW([a], lr=1e-2, backend=backend), torch.optim.AdamW([b], lr=1e-2)
    step_alike(gen, [a], [b], opt_a, opt_b, 3)
    saved = copy.deepcopy(opt_b.state_dict())
    saved["state"][0]["step"] = 3  # as torch 1.x saved it
    opt_a = AdamW([a], lr=1e-2, backend=backend)
    opt_a.load_state_dict(saved)
    assert opt_a.state[a]["step"].dtype == torch.float32
    step_alike(gen, [a], [b], opt_a, opt_b, 2)
    torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


# remove() must stop fusing for good (hook gone, handle unregistered)
def test_a_removed_fused_update_handle_is_refused_and_the_weight_trains_normally(gen):
    w = torch.randn(7, 4, generator=gen).to(DEVICE).requires_grad_()
    opt = SGDW([w], lr=0.1)
    handle = fused_update(opt, w)
    x, y = torch.randn(8, 4, generator=gen).to(DEVICE), torch.randint(0, 7, (8,), generator=gen).to(DEVICE)
    linear_cross_entropy(x, w, y, fused_update=handle).backward()  # fused, then removed before step()
    handle.remove()
    opt.step()
    with pytest.raises(ValueError, match="this fused_update handle was removed"):
        linear_cross_entropy(x, w, y, fused_update=handle)
    before = w.detach().clone()
    linear_cross_entropy(x, w, y).backward()  # an ordinary gradient again
    assert w.grad is not None
    opt.step()
    assert not torch.equal(w.detach(), before)
    opt.zero_grad()
    fused_update(opt, w)  # and a new handle may be made


# the handle used with another weight
def test_a_fused_update_handle_is_refused_for_another_weight(gen):
    w = torch.randn(7, 4, generator=gen).to(DEVICE).requires_grad_()
    other = w.detach().clone().requires_grad_()
    handle = fused_update(AdamW([w, other]), w)
    x, y = torch.randn(8, 4, generator=gen).to(DEVICE), torch.randint(0, 7, (8,), generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="created for another weight"):
        linear_cross_entropy(x, other, y, fused_update=handle)


# a weight that is not 2-D
def test_fused_update_refuses_a_weight_that_is_not_2d():
    w = torch.zeros(7, requires_grad=True)
    with pytest.raises(ValueError, match="2-D leaf tensor"):
        fused_update(AdamW([w]), w)


def _compile_problem(backend):
    torch.manual_seed(0)
    x, y = torch.randn(6, 8), torch.randint(0, 5, (6,))
    weight, hidden = torch.nn.Parameter(torch.randn(5, 8)), torch.nn.Parameter(torch.randn(8, 8) * 0.3)
    opt = AdamW([weight, hidden], lr=0.1, weight_decay=0.1, backend=backend)
    return x, y, weight, hidden, opt


# (torch only: under TRITON_INTERPRET dynamo traces the interpreter's Python and fails on its uint64 pointers)
@pytest.mark.parametrize("backend", ["torch"])
def test_fused_update_inside_a_compiled_training_step(backend):
    """A torch.compile'd step (forward, backward, step) with fused_update: dynamo traced the fused backward, where
    its check of weight._version misfired on the second step ("at version 2 ... used version 2")."""
    params = []
    for fused in (False, True):
        torch._dynamo.reset()
        x, y, weight, hidden, opt = _compile_problem(backend)
        handle = fused_update(opt, weight) if fused else None

        @torch.compile(backend="aot_eager")
        def step():
            linear_cross_entropy(torch.tanh(x @ hidden), weight, y, fused_update=handle, backend=backend).backward()
            opt.step()
            opt.zero_grad()
        for _ in range(3):
            step()
        params.append((weight.detach().clone(), hidden.detach().clone()))
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_update_under_fullgraph_compile_names_the_reason():
    torch._dynamo.reset()
    x, y, weight, _, opt = _compile_problem("torch")
    handle = fused_update(opt, weight)
    loss = torch.compile(lambda x, y: linear_cross_entropy(x, weight, y, fused_update=handle), backend="eager",
                         fullgraph=True)
    with pytest.raises(Exception, match="fused_update runs outside torch.compile"):
        loss(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_update_refuses_a_gradient_written_after_the_update(backend):
    """DDP's reducer writes the all-reduced bucket (zeros for a weight that sent no gradient) into weight.grad past
    its hook: step() stepped the classifier a second time (AdamW's step count went 1, 3, 5), silently."""
    x, y, weight, hidden, opt = _compile_problem(backend)
    handle = fused_update(opt, weight)
    linear_cross_entropy(x @ hidden, weight, y, fused_update=handle, backend=backend).backward()
    weight.grad = torch.zeros_like(weight)  # as DDP's reducer does
    with pytest.raises(RuntimeError, match="written after its fused update"):
        opt.step()
    assert int(opt.state[weight]["step"]) == 1


def test_fused_update_warns_under_torch_distributed(monkeypatch):
    from fastcyclic import optim
    x, y, weight, hidden, opt = _compile_problem("torch")
    handle = fused_update(opt, weight)
    monkeypatch.setattr(optim, "_multi_process", lambda: True)
    with pytest.warns(RuntimeWarning, match="own gradient, which no all-reduce"):
        linear_cross_entropy(x @ hidden, weight, y, fused_update=handle).backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per handle
        linear_cross_entropy(x @ hidden, weight, y, fused_update=handle).backward()


def test_import_fastcyclic_does_not_import_dynamo():
    """torch.compiler.disable imports dynamo (~1.5 s): the fused update's entry points are wrapped when a handle
    is made, not when fastcyclic is imported (every CLI command and sweep worker would pay it)."""
    code = ("import sys, fastcyclic, fastcyclic.cli, fastcyclic.training, fastcyclic.linear_ce; "
            "assert 'torch._dynamo' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
