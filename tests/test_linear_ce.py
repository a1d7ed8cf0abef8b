"""fastcyclic.linear_cross_entropy against a float64 eager reference, for both backends.

Tolerance rule (from CCE): the fused result's error against float64 must be no worse than eager
PyTorch's own error in the same input dtype (``F.cross_entropy((h @ W.T).float())``), plus a small
slack.  The loss error is a relative Frobenius norm; a gradient's error is the norm of its difference
from float64 over the norm of the sum of the absolute terms it adds up (|g| @ |W| for dh, with
g = dloss/dlogits), the scale rounding errors are bounded by, so that cancellation in a tiny problem
(N = D = 1, two nearly equal class weights) does not turn one rounding into a failure.  On CPU the
"triton" backend runs the real kernels under TRITON_INTERPRET=1 (see conftest.py); on a GPU the same
tests run natively.
"""
import contextlib
import dataclasses
import math

import pytest
import torch

from fastcyclic import LinearCrossEntropy, linear_cross_entropy, linear_cross_entropy_stats
from fastcyclic.kernels import linear_ce as triton_impl
from fastcyclic.kernels.linear_ce import LCEConfig, TileConfig, with_splits
from fastcyclic.kernels.reference import eager_loss, loss_from_logits, reference_loss
from fastcyclic.linear_ce import tuning

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# one ulp of the output dtype (the interpreter truncates fp32 -> bf16/fp16 stores); fp32 allows for
# a different summation order: 10x the largest excess over eager seen in 500 checks (1.9e-7, on CPU)
SLACK = {torch.float32: 2e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# Tiles smaller than the problem in every axis: several row/class blocks, a D loop (non-resident
# operands), several D slices, ragged edges everywhere.
SMALL_TILES = LCEConfig(
    forward=TileConfig(16, 32, 16, 16),
    backward_dw=TileConfig(32, 16, 16, 32),
    backward_dh=TileConfig(16, 32, 16, 32),
)
# The "gemm" backward: g written for blocks of 64 classes by a tile smaller than the problem in every
# axis (a D loop, several row and class tiles, a ragged last block), dW and dh by matrix products.
GEMM_BACKWARD = dataclasses.replace(SMALL_TILES, backward="gemm", backward_grad=TileConfig(16, 32, 16, 16),
                                    grad_chunk=64)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_problem(gen, n, d, k, dtype=torch.float32, *, scale=1.0, bias=True, ignore_frac=0.0,
                 ignore_index=-100):
    """Logits z = h @ w.T + b of standard deviation ~scale; a fraction of rows ignored."""
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(k, d, generator=gen) * (scale / max(d, 1) ** 0.5)
    b = torch.randn(k, generator=gen) * 0.5 * scale if bias else None
    y = torch.randint(0, k, (n,), generator=gen)
    if ignore_frac:
        y[torch.rand(n, generator=gen) < ignore_frac] = ignore_index
    cast = lambda t: t.to(DEVICE, dtype) if t is not None else None  # noqa: E731
    return cast(h), cast(w), y.to(DEVICE), cast(b)


def rel_err(x, ref, scale=None):
    """||x - ref|| / ||scale|| (scale defaults to ref), in float64 on x's device, 2^24 elements at a time (a
    float64 copy of a K x D > 2^31 gradient would take 17 GB)."""
    x, ref = x.detach().reshape(-1), ref.detach().reshape(-1)
    scale = ref if scale is None else scale.detach().reshape(-1)
    step = 1 << 24

    def pieces(t):
        return (t[i:i + step].to(x.device, torch.float64) for i in range(0, t.numel(), step))

    if not all(torch.isfinite(piece).all() for piece in pieces(x)):
        return math.inf
    diff = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(pieces(x), pieces(ref))))
    return diff / max(math.sqrt(sum(float(piece.square().sum()) for piece in pieces(scale))), 1e-30)


def term_scales(h, w, y, b, grad_out, *, reduction="mean", **opts):
    """Float64 |g| @ |W|, |g|^T @ |h| and the column sums of |g|, g = grad_out * dloss/dlogits: what the
    dh, dW and dbias sums add up in absolute value (see the module docstring)."""
    h, w = h.detach().double(), w.detach().double()
    logits = h @ w.T + (b.detach().double() if b is not None else 0.0)
    logits.requires_grad_()
    loss = loss_from_logits(logits, y, reduction=reduction, **opts)[0]
    g = torch.autograd.grad(loss, logits, grad_out.to(loss.device))[0].abs()
    return [g @ w.abs(), g.T @ h.abs(), g.sum(0)]


def assert_argmax_agrees(argmax, logits64):
    """Exact agreement with the float64 argmax on every row whose top two logits are further apart than
    fp32 rounding of the logits can move them (a near-tie may go either way)."""
    top2 = logits64.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(argmax[clear].cpu(), logits64.argmax(dim=1)[clear].cpu())


def _grad_out(gen, reduction, n):
    if reduction == "none":
        return torch.randn(n, generator=gen, dtype=torch.float64)
    return torch.rand((), generator=gen, dtype=torch.float64) + 0.5


def _loss_and_grads(fn, h, w, y, b, grad_out, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in (h, w, b)]
    loss = fn(leaves[0], leaves[1], y, leaves[2])
    loss.backward(grad_out.to(loss.device, loss.dtype))
    return [loss] + [t.grad if t is not None else None for t in leaves]


def check(backend, gen, h, w, y, b=None, *, reduction="mean", recompute_slack=0.0, **opts):
    """Loss, every gradient and every row's lse vs float64, within eager's own error + slack (+ recompute_slack
    for the gradients).  Returns the errors."""
    grad_out = _grad_out(gen, reduction, h.shape[0])
    ours = _loss_and_grads(lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, reduction=reduction,
                                                                   backend=backend, **opts), h, w, y, b, grad_out)
    ref_fn = lambda h, w, y, b: reference_loss(h, w, y, b, reduction=reduction, **opts)[0]  # noqa: E731
    ref = _loss_and_grads(ref_fn, h, w, y, b, grad_out, dtype=torch.float64)
    eager = _loss_and_grads(lambda h, w, y, b: eager_loss(h, w, y, b, reduction=reduction, **opts)[0],
                            h, w, y, b, grad_out)
    scales = [ref[0]] + term_scales(h, w, y, b, grad_out, reduction=reduction, **opts)
    errors = {}
    for name, o, r, e, scale in zip(("loss", "dh", "dw", "db"), ours, ref, eager, scales):
        if r is None:
            continue
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        err, eager_err = rel_err(o, r, scale), rel_err(e, r, scale)
        assert err <= eager_err + SLACK[h.dtype] + (recompute_slack if name != "loss" else 0.0), \
            f"{name}: error {err:.3g} vs float64, eager {h.dtype} has {eager_err:.3g}"
        errors[name] = err
    # every row's lse (linear_cross_entropy_stats), held to the same rule
    _, lse, _ = linear_cross_entropy_stats(h, w, y, bias=b, backend=backend, **opts)
    ref_lse, eager_lse = (loss(h, w, y, b, reduction="none", **opts)[1] for loss in (reference_loss, eager_loss))
    err, eager_err = rel_err(lse, ref_lse), rel_err(eager_lse, ref_lse)
    assert err <= eager_err + SLACK[h.dtype], f"lse: error {err:.3g} vs float64, eager {h.dtype} has {eager_err:.3g}"
    errors["lse"] = err
    return errors


# --------------------------------------------------------------------------------------------
# correctness on random problems
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,k", [(1, 1, 2), (7, 17, 97), (67, 48, 1031)])
def test_random_problems(backend, dtype, n, d, k, gen):
    h, w, y, b = make_problem(gen, n, d, k, dtype, ignore_frac=0.2)
    check(backend, gen, h, w, y, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-2),
    dict(label_smoothing=0.3, z_loss=1e-3, ignore_index=5),
], ids=["plain", "smoothing", "zloss", "all"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_options(backend, reduction, options, bias, gen):
    h, w, y, b = make_problem(gen, 33, 24, 211, scale=3.0, bias=bias, ignore_frac=0.25,
                              ignore_index=options.get("ignore_index", -100))
    check(backend, gen, h, w, y, b, reduction=reduction, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("d", [40, 64], ids=["ragged-d", "even-d"])
def test_triton_tile_paths(dtype, splits, d, gen):
    """Small tiles: D loops (masked and unmasked), several D slices, split loops merged on the host."""
    h, w, y, b = make_problem(gen, 37, d, 100, dtype, scale=2.0, ignore_frac=0.1)
    with tuning(config=with_splits(SMALL_TILES, splits)):
        check("triton", gen, h, w, y, b, label_smoothing=0.05, z_loss=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,k", [(1, 1, 2), (7, 17, 97), (67, 48, 1031)])
def test_gemm_backward_random_problems(dtype, n, d, k, gen):
    h, w, y, b = make_problem(gen, n, d, k, dtype, ignore_frac=0.2)
    # g is stored in the input dtype before the products, as eager's backward rounds it too, but the
    # interpreter's 16-bit store truncates (up to one ulp, not half): one more rounding's slack
    with tuning(config=GEMM_BACKWARD):
        check("triton", gen, h, w, y, b, recompute_slack=SLACK[dtype])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", [dict(label_smoothing=0.3, z_loss=1e-3, ignore_index=5), dict()],
                         ids=["all", "plain"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gemm_backward_options(reduction, options, bias, gen):
    h, w, y, b = make_problem(gen, 33, 24, 211, scale=3.0, bias=bias, ignore_frac=0.25,
                              ignore_index=options.get("ignore_index", -100))
    with tuning(config=GEMM_BACKWARD):
        check("triton", gen, h, w, y, b, reduction=reduction, **options)


@pytest.mark.parametrize("config", [None, GEMM_BACKWARD], ids=["recompute", "gemm"])
@pytest.mark.parametrize("wanted", ["h", "weight", "bias"])
def test_one_gradient_at_a_time(wanted, config, gen):
    """Only the gradients asked for are computed, and each equals the one from the full backward.
    (Asking for dbias alone once failed: the two missing gradients were one shared empty tensor.)"""
    h, w, y, b = make_problem(gen, 20, 16, 150, scale=2.0)
    full = _loss_and_grads(lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, backend="triton"),
                           h, w, y, b, torch.tensor(1.0))
    leaves = {name: t.detach().requires_grad_(name == wanted) for name, t in (("h", h), ("weight", w), ("bias", b))}
    with tuning(config=config):
        loss = linear_cross_entropy(leaves["h"], leaves["weight"], y, bias=leaves["bias"], backend="triton")
        (grad,) = torch.autograd.grad(loss, leaves[wanted])
    reference = full[1 + ["h", "weight", "bias"].index(wanted)]
    assert rel_err(grad, reference) < 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gemm_backward_no_rows_or_all_ignored(reduction, gen):
    for n, ignore_frac in ((0, 0.0), (9, 1.0)):
        h, w, y, b = make_problem(gen, n, 8, 50, ignore_frac=ignore_frac)
        with tuning(config=GEMM_BACKWARD):
            _, dh, dw, db = _loss_and_grads(
                lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, reduction=reduction, backend="triton"),
                h, w, y, b, torch.tensor(1.0))
        if reduction == "sum":  # a mean over no rows is NaN, like PyTorch; a sum is 0 with zero gradients
            assert dh.abs().sum() == 0 and dw.abs().sum() == 0 and db.abs().sum() == 0
        assert dh.shape == h.shape and dw.shape == w.shape and db.shape == b.shape


def test_gemm_backward_dbias_sums_unrounded_g(gen):
    """fp16, mean over 2048 rows: the entries of g are ~1/(N K) ~ 2e-6, subnormal in fp16, so a dbias summed
    from the fp16 g (as the gemm backward once did) was off by 2.5e-2; from the fp32 g it is as good as
    the recompute backward's (2e-4)."""
    n, d, k = 2048, 16, 300
    h = torch.randn(n, d, generator=gen)
    w, b = torch.randn(k, d, generator=gen) * 1e-3, torch.randn(k, generator=gen) * 1e-3
    y = torch.randint(0, k, (n,), generator=gen)
    b64 = b.double().requires_grad_()
    torch.nn.functional.cross_entropy(h.double() @ w.double().T + b64, y).backward()
    h16, w16, b16 = (t.to(DEVICE, torch.float16) for t in (h, w, b))
    b16.requires_grad_()
    config = dataclasses.replace(triton_impl.default_config(n, d, k, torch.float16, h16.device), backward="gemm")
    with tuning(config=config):
        linear_cross_entropy(h16, w16, y.to(DEVICE), bias=b16, backend="triton").backward()
    assert rel_err(b16.grad, b64.grad) < 1e-3


def test_gemm_backward_is_bitwise_repeatable(gen):
    h, w, y, b = make_problem(gen, 40, 32, 300, torch.bfloat16, ignore_frac=0.1)
    grad_out = _grad_out(gen, "mean", 40)
    with tuning(config=GEMM_BACKWARD):
        runs = [_loss_and_grads(lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, backend="triton",
                                                                        deterministic=True), h, w, y, b, grad_out)
                for _ in range(2)]
    for first, *others in zip(*runs):
        assert all(torch.equal(first, other) for other in others)


@pytest.mark.parametrize("dtype,d", [(torch.float32, 100), (torch.float32, 300), (torch.bfloat16, 256),
                                     (torch.bfloat16, 600)], ids=str)
@pytest.mark.parametrize("backward", ["recompute", "gemm"])
def test_gpu_default_tiles(dtype, d, backward, gen):
    """The tiles default_config picks for a GPU (exact-fp32 FMA tiles, resident and sliced D for
    16-bit inputs): on CPU, under the interpreter, the arithmetic of the configurations a GPU runs."""
    n, k = 45, 150
    h, w, y, b = make_problem(gen, n, d, k, dtype, ignore_frac=0.1)
    config = dataclasses.replace(triton_impl.default_config(n, d, k, dtype, torch.device("cuda")), backward=backward)
    with tuning(config=config):
        check("triton", gen, h, w, y, b, label_smoothing=0.1)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 100, 300])
@pytest.mark.parametrize("backward", ["recompute", "gemm"])
def test_cuda_fp32_far_logits_with_the_default_tiles(d, backward, gen):
    """The exact-fp32 GPU tiles step D by 32 in the forward and take a backward slice in one dot: the backward's
    z - max is exact only if the two dots give the same bits, as an in-order FMA chain does however D is
    chunked (under the interpreter, whose numpy matmuls do not, such tiles lose eager's accuracy at |z| ~ 1e3)."""
    n, k = 45, 150
    h, w, y, b = make_problem(gen, n, d, k, torch.float32, scale=300.0)
    config = dataclasses.replace(triton_impl.default_config(n, d, k, torch.float32, DEVICE), backward=backward)
    with tuning(config=config):
        check("triton", gen, h, w, y, b)


@pytest.mark.parametrize("fields, match", [
    (dict(block_owner=48), "block_owner must be a power of two >= 16, got 48"),  # tl.arange failed in the kernel
    (dict(block_loop=0), "block_loop must be a power of two >= 16, got 0"),  # a ZeroDivisionError
    (dict(block_d=8), "block_d must be a power of two >= 16, got 8"),  # ran under the interpreter, not on a GPU
    (dict(num_warps=3), "num_warps must be a power of two, got 3"),
    (dict(splits=0), "splits must be None or an integer >= 1, got 0"),
    (dict(num_warps=0), "num_warps must be a power of two, got 0"),
    (dict(splits=True), "splits must be None or an integer >= 1, got True"),
    (dict(num_stages=0), "num_stages must be an integer >= 1, got 0"),  # these were taken and failed in the compiler
])
def test_tile_configs_are_checked(fields, match):
    with pytest.raises(ValueError, match=match):
        TileConfig(**{**dict(block_owner=16, block_loop=16, block_d=16, block_ds=16), **fields})


def test_lce_configs_and_default_config_check_their_arguments():
    """A dict for a tile, a fractional grad_chunk, a negative n or a device name were taken, and failed at the
    first call with an AttributeError (or ran: grad_chunk=2.5)."""
    with pytest.raises(TypeError, match="LCEConfig.forward must be a TileConfig, got {}"):
        dataclasses.replace(SMALL_TILES, forward={})
    with pytest.raises(ValueError, match="grad_chunk must be None or a positive number of classes, got 2.5"):
        dataclasses.replace(SMALL_TILES, grad_chunk=2.5)
    with pytest.raises(ValueError, match="n must be an integer >= 0, got -1"):
        triton_impl.default_config(-1, 8, 97, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16, got torch.int64"):
        triton_impl.default_config(4, 8, 97, torch.int64, DEVICE)
    assert triton_impl.default_config(4, 8, 97, torch.float32, "cpu") == \
        triton_impl.default_config(4, 8, 97, torch.float32, torch.device("cpu"))


def test_gemm_backward_block_size():
    """Blocks of g hold GRAD_CHUNK_BYTES (a whole number of class tiles, at least one, at most K and
    at most 65535 tiles)."""
    config = dataclasses.replace(SMALL_TILES, backward="gemm")
    tile = config.backward_grad.block_loop
    assert triton_impl.grad_chunk(config, 8192, 131072, torch.bfloat16) == triton_impl.GRAD_CHUNK_BYTES // (8192 * 2)
    assert triton_impl.grad_chunk(config, 1 << 30, 1000, torch.float32) == tile
    assert triton_impl.grad_chunk(config, 1, 1000, torch.float32) == -(-1000 // tile) * tile
    fixed = dataclasses.replace(config, grad_chunk=3 * tile - 1)
    assert triton_impl.grad_chunk(fixed, 5, 1000, torch.float32) == 2 * tile
    # the class tiles of a block are the launch grid's second axis, which CUDA caps at 65535
    huge_k = 1 << 40
    assert triton_impl.grad_chunk(config, 1, huge_k, torch.float32) == triton_impl.MAX_GRID_Y * tile
    assert triton_impl.grad_chunk(dataclasses.replace(config, grad_chunk=huge_k), 5, huge_k,
                                  torch.float32) == triton_impl.MAX_GRID_Y * tile
    with pytest.raises(ValueError, match="'fused'"):
        dataclasses.replace(config, backward="fused")
    with pytest.raises(ValueError, match="grad_chunk.*0"):
        dataclasses.replace(config, grad_chunk=0)


@pytest.mark.parametrize("k, splits", [(64, None), (256, None), (320, None), (512, None), (768, None), (256, 3)])
def test_triton_class_count_a_multiple_of_the_tile(k, splits, gen):
    """K a multiple of the class tile: the kernels drop the class mask (EVEN_K).  64 and 320 are multiples of
    the forward's loop block but not of its owner block; at 768 (3 blocks of 256 in 2 class splits) and with 3
    splits of 8 blocks of 32, the last split is shorter than the others and must stop at K (logits near 0: a
    padding column would add about e^-max to every row's sum)."""
    h, w, y, b = make_problem(gen, 40, 24, k, ignore_frac=0.1)
    with tuning(config=None if splits is None else with_splits(SMALL_TILES, splits)):
        check("triton", gen, h, w, y, b, label_smoothing=0.1, z_loss=1e-3)
    rows, lse, argmax = linear_cross_entropy_stats(h, w, y, bias=b, backend="triton")
    logits = h.double() @ w.double().T + b.double()
    assert rel_err(lse, logits.logsumexp(dim=1)) < 1e-6
    assert_argmax_agrees(argmax, logits)


def test_torch_backend_small_chunks(gen):
    h, w, y, b = make_problem(gen, 23, 9, 50, ignore_frac=0.2)
    with tuning(chunk_rows=5, chunk_classes=7):
        check("torch", gen, h, w, y, b, label_smoothing=0.1, z_loss=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend, gen):
    h, w, y, b = make_problem(gen, 40, 24, 150, ignore_frac=0.1)
    h_strided = torch.zeros(40, 48, device=DEVICE).copy_(torch.repeat_interleave(h, 2, dim=1))[:, ::2]
    w_colmajor = w.T.contiguous().T
    b_strided = torch.stack([b, b], dim=1)[:, 0]
    y_strided = torch.stack([y, y], dim=1)[:, 1]
    assert not (h_strided.is_contiguous() or w_colmajor.is_contiguous() or b_strided.is_contiguous())
    check(backend, gen, h_strided, w_colmajor, y_strided, b_strided)
    if backend == "triton":  # and the "gemm" backward
        with tuning(config=GEMM_BACKWARD):
            check(backend, gen, h_strided, w_colmajor, y_strided, b_strided)


# Every kernel loops over D (D = 32 > every block_d and block_ds) in whole chunks (EVEN_D): the row operand of
# the logits dot is masked along its rows only.
LOOPED_EVEN_D = LCEConfig(forward=TileConfig(32, 16, 16, 16), backward_dw=TileConfig(32, 16, 16, 16),
                          backward_dh=TileConfig(32, 16, 16, 16))


def test_no_read_past_the_last_row_of_h_or_w(gen):
    """h and W as the first rows of larger buffers whose next row is NaN, N and K ragged in the tiles: a row mask
    of `<=` instead of `<` (kernels.linear_ce._load_tile) reads that row into the dW kernel's logits (NaN dW
    and dbias); zero padding, as in test_noncontiguous_inputs, hides it."""
    n, d, k = 20, 32, 40
    h, w, y, b = make_problem(gen, n, d, k, ignore_frac=0.1)
    grad_out = torch.tensor(1.0, dtype=torch.float64)
    h_buffer = torch.cat([h, torch.full((1, d), float("nan"), device=DEVICE)])
    w_buffer = torch.cat([w, torch.full((1, d), float("nan"), device=DEVICE)])
    fn = lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, backend="triton")  # noqa: E731
    with tuning(config=LOOPED_EVEN_D):  # (_loss_and_grads keeps the leaves views of the buffers)
        padded = _loss_and_grads(fn, h_buffer[:n], w_buffer[:k], y, b, grad_out)
        alone = _loss_and_grads(fn, h, w, y, b, grad_out)
    for name, ours, expected in zip(("loss", "dh", "dw", "db"), padded, alone):
        assert torch.isfinite(ours).all(), f"{name} is not finite"
        assert torch.equal(ours, expected), name


# --------------------------------------------------------------------------------------------
# hard cases
# --------------------------------------------------------------------------------------------


def hard_case_backend(name, h, w):
    """(backend, context) for a hard-case test: "triton-gemm" is the triton backend with its default tiles and
    the "gemm" backward, in blocks of 512 classes."""
    if name != "triton-gemm":
        return name, contextlib.nullcontext()
    config = triton_impl.default_config(h.shape[0], h.shape[1], w.shape[0], h.dtype, h.device)
    return "triton", tuning(config=dataclasses.replace(config, backward="gemm", grad_chunk=512))


@pytest.mark.parametrize("backend,k", [("triton", 16411), ("triton-gemm", 16411), ("torch", 65521)])
def test_near_uniform_logits_large_k(backend, k, gen):
    """Every class gets ~1/K of the probability mass: no gradient may be dropped."""
    h, w, y, b = make_problem(gen, 24, 16, k, scale=1e-3)
    backend, context = hard_case_backend(backend, h, w)
    with context:
        errors = check(backend, gen, h, w, y, b)
    loss = linear_cross_entropy(h, w, y, bias=b, backend=backend)
    assert abs(loss.item() - math.log(k)) < 1e-2
    assert errors["dw"] < 1e-4


@pytest.mark.parametrize("backend", BACKENDS + ["triton-gemm"])
def test_the_target_gradient_of_a_confident_row_is_exact_where_eagers_is_zero(backend, gen):
    """p_y = 1 - 1.1e-7: in fp32, lse = z_y + 1.1e-7 rounds to z_y and eager's p_y - 1 is 0, every time.
    Ours is expm1(-nll) with nll from log1p: the bias gradient at the target holds it to fp32 precision."""
    n, d, k = 16, 8, 8
    h = torch.randn(n, d, generator=gen).to(DEVICE)
    w = (torch.randn(k, d, generator=gen) * 1e-3).to(DEVICE)
    b = torch.zeros(k, device=DEVICE)
    b[0] = 18.0  # 7 e^-18 = 1.07e-7 of the mass off the target
    y = torch.zeros(n, dtype=torch.long, device=DEVICE)
    ref_b = b.double().requires_grad_()
    reference_loss(h.double(), w.double(), y, bias=ref_b)[0].backward()
    backend, context = hard_case_backend(backend, h, w)
    b.requires_grad_()
    with context:
        linear_cross_entropy(h, w, y, bias=b, backend=backend).backward()
    assert abs(ref_b.grad[0].item() + 1.07e-7) < 0.01e-7
    assert rel_err(b.grad[0:1], ref_b.grad[0:1]) < 1e-4
    eager_b = b.detach().clone().requires_grad_()
    eager_loss(h, w, y, bias=eager_b)[0].backward()
    assert eager_b.grad[0].item() == 0.0  # what the case is for


@pytest.mark.parametrize("backend", BACKENDS + ["triton-gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_confident_logits(backend, dtype, gen):
    """p_y > 0.999 (after grokking): loss ~ 1e-7 and p_y - 1 must not cancel."""
    n, d, k = 32, 48, 97
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(k, d, generator=gen) * 0.01
    y = torch.randperm(k, generator=gen)[:n]
    w[y] = 4.5 * h / h.norm(dim=1, keepdim=True)  # z[n, y_n] = 4.5 |h_n| ~ 31, others ~ N(0, 20)
    h, w, y = h.to(DEVICE, dtype), w.to(DEVICE, dtype), y.to(DEVICE)
    ref_rows, ref_lse = reference_loss(h, w, y, reduction="none")
    p_target = torch.exp(-ref_rows)
    assert p_target.min() > 0.999
    backend, context = hard_case_backend(backend, h, w)
    with context:
        check(backend, gen, h, w, y)
    rows = linear_cross_entropy(h, w, y, reduction="none", backend=backend)
    # the per-row loss itself is accurate to fp32 relative precision, not to ulp(lse) ~ 2e-6
    assert rel_err(rows, ref_rows) < 1e-4


def test_tf32_chosen_through_pytorchs_newer_setting(gen):
    """torch.backends.cuda.matmul.fp32_precision = "tf32" (or torch.backends.fp32_precision): reading the legacy
    allow_tf32 flag raises once the newer setting chose TF32, and every float32 call failed."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has only the legacy TF32 flag")
    h, w, y, _ = make_problem(gen, 8, 16, 40)
    expected = torch.nn.functional.cross_entropy(h.double() @ w.double().T, y)
    try:
        for setting, tf32 in (("tf32", True), ("ieee", False)):
            matmul.fp32_precision = setting
            assert triton_impl.tf32_allowed() is tf32
            loss = linear_cross_entropy(h, w, y, backend="triton")
            assert abs(float(loss) - float(expected)) <= 1e-2 * abs(float(expected))
    finally:
        matmul.fp32_precision = "none"
    assert triton_impl.tf32_allowed() is bool(matmul.allow_tf32)


@pytest.mark.parametrize("variant,share", [("triton", 0.9), ("triton-gemm", 0.6)])
def test_bf16_gradients_are_rounded_to_nearest(variant, share, gen):
    """Under the interpreter a float32 -> bf16 conversion truncates: dh, dW and dbias (and the gemm backward's g)
    were stored truncated, about half of them one ulp off the float64 gradient rounded to bf16.  (On a GPU the
    conversion rounds; round_for_store changes nothing there.)  share: what must match; the fp32 sums differ from
    float64 near a rounding boundary now and then, and the gemm backward's dh and dW come from g rounded to bf16,
    as eager's do (~0.7 match); truncated, ~0.45 did."""
    h, w, y, b = make_problem(gen, 48, 32, 200, torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in (h, w, b)]
    backend, context = hard_case_backend(variant, h, w)
    with context:
        linear_cross_entropy(*leaves[:2], y, bias=leaves[2], backend=backend, reduction="sum").backward()
    exact = [t.detach().double().requires_grad_() for t in (h, w, b)]
    torch.nn.functional.cross_entropy(exact[0] @ exact[1].T + exact[2], y, reduction="sum").backward()
    for ours, ref in zip(leaves, exact):
        assert (ours.grad == ref.grad.to(torch.bfloat16)).float().mean() > share


@pytest.mark.parametrize("backend", BACKENDS + ["triton-gemm"])
def test_extreme_logits(backend, gen):
    """|z| ~ 1e4: the online max keeps exp in range, and the gradients are as accurate as eager's."""
    h, w, y, b = make_problem(gen, 20, 16, 300, scale=1e4)  # bias ~ 5e3: exp overflows where unmasked
    backend, context = hard_case_backend(backend, h, w)
    with context:
        errors = check(backend, gen, h, w, y, b)
    assert all(math.isfinite(e) for e in errors.values())


@pytest.mark.parametrize("backend", BACKENDS + ["triton-gemm"])
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_logits_far_from_zero_keep_eager_accuracy(backend, offset, gen):
    """Every logit near +offset, spread over a few units (so many classes share the softmax): lse rounded to
    fp32 as a whole is off by up to ulp(offset) / 2 (5e-4 at 1e4), which moved the backward's z - lse, and p
    with it, by 2-5x eager's gradient error.  The backward forms (z - max) - log_sum instead, as eager does."""
    h, w, y, b = make_problem(gen, 64, 32, 64)
    b = b + offset
    backend, context = hard_case_backend(backend, h, w)
    with context:
        check(backend, gen, h, w, y, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_most_logits_hundreds_below_the_max(backend, reduction, gen):
    """A trained model's rows: most z - lse far below -87, where exp underflows (the torch backend clamps
    exp's argument there, per row for the gradient's p_coef, since its CPU exp takes a path 15-50x slower
    below and the denormals slow the matmuls); with ignored rows (p_coef 0) and negative p_coef ("none")."""
    h, w, y, b = make_problem(gen, 40, 16, 300, scale=60.0, ignore_frac=0.2)
    logits = h.double() @ w.double().T + b.double()
    below = logits - torch.logsumexp(logits, dim=1, keepdim=True) < -87
    assert float(below.double().mean()) > 0.5
    backend, context = hard_case_backend(backend, h, w)
    with context:
        errors = check(backend, gen, h, w, y, b, reduction=reduction)
    assert all(math.isfinite(e) for e in errors.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction, gen):
    h, w, _, b = make_problem(gen, 9, 8, 31)
    y = torch.full((9,), -100, device=DEVICE)
    loss, dh, dw, db = _loss_and_grads(
        lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, reduction=reduction, backend=backend),
        h, w, y, b, _grad_out(gen, reduction, 9))
    expected = torch.nn.functional.cross_entropy(torch.zeros(9, 31), torch.full((9,), -100), reduction=reduction)
    assert torch.equal(loss.cpu().isnan(), expected.isnan())
    if reduction != "mean":
        assert torch.all(loss == 0)
    for g in (dh, dw, db):
        assert torch.all(g == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, reduction):
    """N = 0 behaves like PyTorch: mean is NaN, sum is 0, gradients are zero."""
    h = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(13, 8, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = linear_cross_entropy(h, w, y, reduction=reduction, backend=backend)
    expected = torch.nn.functional.cross_entropy(torch.zeros(0, 13), torch.zeros(0, dtype=torch.long),
                                                 reduction=reduction)
    assert loss.shape == expected.shape
    assert torch.equal(loss.detach().cpu().isnan(), expected.isnan())
    loss.sum().backward()
    assert h.grad.shape == (0, 8) and torch.all(w.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_features(backend, gen):
    """D = 0 behaves like PyTorch: every logit is the bias; h and W get empty gradients, the bias its own."""
    h = torch.zeros(9, 0, device=DEVICE, requires_grad=True)
    w = torch.zeros(13, 0, device=DEVICE, requires_grad=True)
    b = torch.randn(13, generator=gen).to(DEVICE).requires_grad_()
    y = torch.randint(0, 13, (9,), generator=gen).to(DEVICE)
    loss = linear_cross_entropy(h, w, y, bias=b, backend=backend)
    b_ref = b.detach().double().requires_grad_()
    expected = torch.nn.functional.cross_entropy(b_ref.expand(9, 13), y)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    loss.backward()
    assert h.grad.shape == (9, 0) and w.grad.shape == (13, 0)
    torch.testing.assert_close(b.grad.double(), b_ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS + ["triton-split"])
def test_classes_masked_by_a_minus_inf_bias(backend, gen):
    """Classes masked with a -inf bias (padding, disallowed classes) add nothing, as in logsumexp, even when
    they fill whole tiles, chunks and splits: the online max is then still -inf, and shifting by it gave
    -inf - -inf = NaN for good.  Masked here: the first two class tiles of every row and the last split."""
    h, w, _, b = make_problem(gen, 9, 16, 130)
    masked = torch.zeros(130, dtype=torch.bool, device=DEVICE)
    masked[:64] = masked[100:] = True
    b = b.masked_fill(masked, float("-inf"))
    y = torch.randint(64, 100, (9,), generator=gen).to(DEVICE)
    y[0] = -100
    if backend == "torch":
        context = tuning(chunk_classes=32)
    else:  # SMALL_TILES: 32-class tiles; 3 splits of 64, 64 and 2 classes
        context = tuning(config=with_splits(SMALL_TILES, 3 if backend == "triton-split" else None))
        backend = "triton"
    w_leaf, b_leaf = w.clone().requires_grad_(), b.clone().requires_grad_()
    with context:
        errors = check(backend, gen, h, w, y, b, z_loss=1e-3)
        rows, lse, argmax = linear_cross_entropy_stats(h, w, y, bias=b, backend=backend)
        linear_cross_entropy(h, w_leaf, y, bias=b_leaf, backend=backend, z_loss=1e-3).backward()
    assert all(math.isfinite(e) for e in errors.values())
    logits64 = h.double() @ w.double().T + b.double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits64, dim=1), rtol=1e-5, atol=0)
    assert torch.equal(argmax.cpu(), logits64.argmax(dim=1).cpu())
    # nothing flows to a masked class: its W rows and bias get exactly zero gradient
    assert not w_leaf.grad[masked].any() and not b_leaf.grad[masked].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_masked_target_with_label_smoothing_is_inf_like_f_cross_entropy(backend):
    """A target on a -inf class: the loss is inf, as in F.cross_entropy; with label smoothing it was NaN (the
    smoothing term took z_y - mean z = -inf - -inf)."""
    h, w = torch.ones(2, 2, device=DEVICE), torch.ones(3, 2, device=DEVICE)
    b = torch.tensor([0.0, float("-inf"), 0.0], device=DEVICE)
    y = torch.tensor([1, 0], device=DEVICE)
    for eps in (0.0, 0.1):
        ours = linear_cross_entropy(h, w, y, bias=b, label_smoothing=eps, backend=backend, reduction="none")
        eager = torch.nn.functional.cross_entropy(h @ w.T + b, y, label_smoothing=eps, reduction="none")
        assert torch.equal(ours.isinf(), eager.isinf()) and ours[0] == float("inf")
        torch.testing.assert_close(ours[1], eager[1])


@pytest.mark.parametrize("backend", BACKENDS + ["triton-gemm"])
def test_all_logits_below_minus_88(backend, gen):
    """lse < -88.7: exp(0 - lse) overflows fp32, so a tile's padding columns (K = 20 is not a multiple of the
    tile) must not reach dh as g = inf times a zero w row (NaN)."""
    h, w, y, _ = make_problem(gen, 9, 16, 20)
    b = torch.full((20,), -100.0, device=DEVICE)
    y[0] = -100
    context = contextlib.nullcontext()
    if backend == "triton":
        context = tuning(config=SMALL_TILES)
    backend, hard = hard_case_backend(backend, h, w)
    with context, hard:
        errors = check(backend, gen, h, w, y, b, label_smoothing=0.1)
    assert all(math.isfinite(e) for e in errors.values())


def _grads_with_eager(backend, h, w, y, b, grad_out, **opts):
    """(ours, eager float64): each a list [loss, dh, dW, dbias] of a reduction="none" loss weighted by grad_out."""
    results = []
    for fn, dtype in ((lambda *a: linear_cross_entropy(*a[:3], bias=a[3], backend=backend, reduction="none",
                                                       **opts), None),
                      (lambda *a: torch.nn.functional.cross_entropy(a[0] @ a[1].T + a[3], a[2], reduction="none",
                                                                    **opts), torch.float64)):
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (h, w, b)]
        loss = fn(leaves[0], leaves[1], y, leaves[2])
        (loss * grad_out.to(loss.dtype)).sum().backward()
        results.append([loss.detach().cpu()] + [t.grad.cpu() for t in leaves])
    return results


@pytest.mark.parametrize("backend", BACKENDS + ["triton-gemm"])
def test_an_infinite_weight_whose_logits_are_all_minus_inf(backend, gen):
    """A class whose logit is -inf in every row (an infinite weight entry, here w[5, 0] = -inf with h[:, 0] > 0)
    gets zero dW and dbias, and every other dW and dbias entry is finite, as in eager (dh[:, 0] takes
    0 * -inf: NaN in eager, NaN or -inf here).  The triton kernels' padding rows past N read h as 0, and 0 * -inf = NaN
    reached dW[5] and dbias[5] until g was zeroed there (N = 12 is not a multiple of the row tiles)."""
    h, w, y, b = make_problem(gen, 12, 8, 40)
    h[:, 0] = h[:, 0].abs() + 0.1
    w[5] = 0.0
    w[5, 0] = float("-inf")
    y[y == 5] = 6
    context = tuning(config=SMALL_TILES) if backend == "triton" else contextlib.nullcontext()
    backend, hard = hard_case_backend(backend, h, w)
    with context, hard:
        ours, eager = _grads_with_eager(backend, h, w, y, b, torch.ones(12))
    for name, mine, theirs in zip(("loss", "dh", "dW", "dbias"), ours, eager):
        finite = theirs.isfinite()
        assert name == "dh" or finite.all()
        assert torch.equal(mine.isfinite(), finite), name
        torch.testing.assert_close(mine.double()[finite], theirs[finite], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS + ["triton-gemm"])
def test_an_infinite_upstream_gradient_gives_eagers_infinities(backend, gen):
    """An inf upstream gradient on one row (reduction="none", no label smoothing) makes dW and dbias +-inf, as in
    eager, not NaN: the label-smoothing term t_coef * eps / K was inf * 0 = NaN in the triton kernels.  (In the
    row's target class eager's log-softmax backward forms -inf + inf = NaN; that class is left out.)  The other
    rows' dh stays finite."""
    h, w, y, b = make_problem(gen, 9, 8, 37)
    grad_out = torch.ones(9)
    grad_out[4] = float("inf")
    context = tuning(config=SMALL_TILES) if backend == "triton" else contextlib.nullcontext()
    backend, hard = hard_case_backend(backend, h, w)
    with context, hard:
        ours, eager = _grads_with_eager(backend, h, w, y, b, grad_out)
    _, dh, dw, db = ours
    _, dh64, dw64, db64 = eager
    others = torch.arange(37) != y[4].item()
    assert dw64[others].isinf().all() and db64[others].isinf().all()  # the case is what it says
    assert torch.equal(dw[others].double(), dw64[others]) and torch.equal(db[others].double(), db64[others])
    rest = torch.arange(9) != 4
    assert torch.isfinite(dh[rest]).all()
    torch.testing.assert_close(dh[rest].double(), dh64[rest], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_the_matmul_operands_like_linear(backend, gen):
    """Under torch.autocast an fp32 classifier meets the autocast dtype's h (as from an autocast layer): both are
    cast to that dtype, as F.linear casts them, and the result is exactly the call with bf16 inputs, the backward
    included (run outside the region, as usual).  Outside autocast the mismatch is still an error."""
    h, w, y, b = make_problem(gen, 7, 24, 97)
    grad_out = _grad_out(gen, "mean", 7)
    leaves = [t.detach().requires_grad_() for t in (h, w, b)]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(leaves[0].bfloat16(), leaves[1], y, bias=leaves[2], backend=backend)
    loss.backward(grad_out.to(loss.dtype))
    expected = _loss_and_grads(lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, backend=backend),
                               h, w, y, b, grad_out, dtype=torch.bfloat16)
    assert loss.dtype == torch.float32 and torch.equal(loss, expected[0])
    for leaf, grad in zip(leaves, expected[1:]):
        assert leaf.grad.dtype == torch.float32 and torch.equal(leaf.grad, grad.float())
    with pytest.raises(TypeError, match="dtype mismatch: h is torch.bfloat16 but weight is torch.float32"):
        linear_cross_entropy(h.bfloat16(), w, y, backend=backend)


def test_forward_mode_ad_is_refused_not_zero(gen):
    """A custom op without a jvp formula would drop the tangent and return 0: refused instead."""
    h, w, y, _ = make_problem(gen, 5, 8, 11)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda x: linear_cross_entropy(x, w, y, backend="torch"), (h,), (torch.ones_like(h),))


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "grad_of_vmap"])
def test_torch_func_reverse_mode_is_refused_in_our_words(transform, gen):
    """torch's own error spoke of an autograd.Function's setup_context, which the caller never wrote."""
    h, w, y, _ = make_problem(gen, 5, 8, 11)
    loss = lambda x: linear_cross_entropy(x, w, y, backend="torch")  # noqa: E731
    batched = lambda x: torch.func.vmap(loss)(x[None]).sum()  # noqa: E731  (grad of a vmap wraps h twice)
    run = dict(grad=lambda: torch.func.grad(loss)(h), vjp=lambda: torch.func.vjp(loss, h),
               jacrev=lambda: torch.func.jacrev(loss)(h), grad_of_vmap=lambda: torch.func.grad(batched)(h))[transform]
    with pytest.raises(NotImplementedError, match="does not run under torch.func's grad, vjp, jacrev"):
        run()


def test_double_backward_is_refused_in_our_words(gen):
    h, w, y, _ = make_problem(gen, 5, 8, 11)
    h.requires_grad_()
    (dh,) = torch.autograd.grad(linear_cross_entropy(h, w, y, backend="torch"), h, create_graph=True)
    with pytest.raises(NotImplementedError, match="no second derivative"):
        torch.autograd.grad(dh.sum(), h)


def test_vmap_gives_the_per_batch_losses(gen):
    """vmap works (through torch's batching fallback, one call per batch entry), and gives each entry's loss."""
    h, w = torch.randn(3, 5, 8, generator=gen).to(DEVICE), torch.randn(11, 8, generator=gen).to(DEVICE)
    y = torch.randint(0, 11, (3, 5), generator=gen).to(DEVICE)
    ours = torch.func.vmap(lambda a, b: linear_cross_entropy(a, w, b, backend="torch"))(h, y)
    eager = torch.stack([torch.nn.functional.cross_entropy(h[i].double() @ w.double().T, y[i]) for i in range(3)])
    torch.testing.assert_close(ours.double(), eager, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# stats, determinism, module, compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_lse_argmax_and_lse_gradient(backend, gen):
    h, w, y, b = make_problem(gen, 45, 20, 260, scale=2.0, ignore_frac=0.2)
    w[7] = w[200]  # a duplicated class: ties resolve to the first index, like torch.argmax
    b[7] = b[200]
    logits = h.double() @ w.double().T + b.double()
    rows, lse, argmax = linear_cross_entropy_stats(h, w, y, bias=b, backend=backend)
    ref_rows, ref_lse = reference_loss(h, w, y, b, reduction="none")
    assert rel_err(rows, ref_rows) < 1e-5 and rel_err(lse, ref_lse) < 1e-6
    assert_argmax_agrees(argmax, logits)
    # gradients through both outputs: d/d(h,w,b) of sum(rows * a) + sum(lse * c)
    a, c = torch.randn(45, generator=gen).to(DEVICE), torch.randn(45, generator=gen).to(DEVICE)

    def objective(fn):
        leaves = [t.detach().clone().double().requires_grad_() if fn is reference_loss else
                  t.detach().clone().requires_grad_() for t in (h, w, b)]
        if fn is reference_loss:
            r, l_ = reference_loss(leaves[0], leaves[1], y, leaves[2], reduction="none")
        else:
            r, l_, _ = fn(leaves[0], leaves[1], y, bias=leaves[2], backend=backend)
        ((r * a.to(r.dtype)).sum() + (l_ * c.to(l_.dtype)).sum()).backward()
        return [t.grad for t in leaves]

    for ours, ref in zip(objective(linear_cross_entropy_stats), objective(reference_loss)):
        assert rel_err(ours, ref) < 1e-5


def test_argmax_ties_pick_first_index():
    h = torch.ones(3, 4, device=DEVICE)
    w = torch.zeros(300, 4, device=DEVICE)
    w[[5, 17, 290]] = 1.0  # three equal maxima, two of them in other tiles
    # the torch backend in chunks of 7 classes too: its merge across chunks must keep the first maximum (`>`,
    # not `>=`); with the default chunk all 300 classes are one chunk
    for backend, context in [(b, tuning()) for b in BACKENDS] + [("torch", tuning(chunk_classes=7))]:
        with context:
            _, _, argmax = linear_cross_entropy_stats(h, w, torch.zeros(3, dtype=torch.long, device=DEVICE),
                                                      backend=backend)
        assert argmax.tolist() == [5, 5, 5], backend


@pytest.mark.parametrize("backend, splits, dtype", [
    ("triton", None, torch.bfloat16), ("triton", 3, torch.bfloat16), ("triton", 3, torch.float32),
    ("torch", None, torch.bfloat16)])
def test_deterministic_mode_is_bitwise_repeatable(backend, splits, dtype, gen):
    """Three runs, bitwise alike; in float32 too, where no final bf16 rounding hides the order of a sum."""
    h, w, y, b = make_problem(gen, 70, 32, 400, dtype, ignore_frac=0.1)
    grad_out = _grad_out(gen, "mean", 70)
    runs = []
    with tuning(config=None if splits is None else with_splits(SMALL_TILES, splits)):
        for _ in range(3):
            runs.append(_loss_and_grads(
                lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, backend=backend, deterministic=True),
                h, w, y, b, grad_out))
    for first, *others in zip(*runs):
        assert all(torch.equal(first, other) for other in others)


def test_module_matches_function(gen):
    h, w, y, b = make_problem(gen, 10, 8, 40, ignore_frac=0.2)
    module = LinearCrossEntropy(reduction="sum", label_smoothing=0.1, z_loss=1e-3, backend="torch")
    assert "label_smoothing=0.1" in repr(module)
    expected = linear_cross_entropy(h, w, y, bias=b, reduction="sum", label_smoothing=0.1, z_loss=1e-3,
                                    backend="torch")
    assert torch.equal(module(h, w, y, b), expected)


def test_module_options_are_attributes_a_caller_can_change(gen):
    """As on nn.CrossEntropyLoss: ``module.reduction = "none"`` takes effect (it was kept in a dict and ignored)."""
    h, w, y, b = make_problem(gen, 10, 8, 40)
    module = LinearCrossEntropy(backend="torch")
    assert module.ignore_index == -100 and module.reduction == "mean"
    module.reduction, module.ignore_index = "none", int(y[0])
    assert torch.equal(module(h, w, y, b), linear_cross_entropy(h, w, y, bias=b, reduction="none",
                                                                ignore_index=int(y[0]), backend="torch"))
    assert "reduction='none'" in repr(module) and module.options["ignore_index"] == int(y[0])
    module.label_smoothing = 2.0
    with pytest.raises(ValueError, match="label_smoothing"):
        module(h, w, y, b)


@pytest.mark.parametrize("validate", [True, False])
def test_meta_tensors_give_shapes_as_f_cross_entropy_does(validate):
    """Shape inference on the meta device (deferred initialisation): it crashed asking autocast about "meta"."""
    h = torch.empty(8, 4, device="meta", requires_grad=True)
    w = torch.empty(16, 4, device="meta", requires_grad=True)
    y = torch.empty(8, dtype=torch.int64, device="meta")
    for reduction, shape in (("mean", ()), ("none", (8,))):
        loss = linear_cross_entropy(h, w, y, reduction=reduction, validate=validate)
        assert loss.device.type == "meta" and loss.shape == shape and loss.dtype == torch.float32
    loss.sum().backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape and w.grad.device.type == "meta"


@pytest.mark.parametrize("options,error,match", [
    (dict(label_smoothing=2.0), ValueError, "label_smoothing"), (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(ignore_index=3.5), TypeError, "ignore_index"), (dict(reduction="avg"), ValueError, "reduction"),
    (dict(validate=0), TypeError, "validate must be True or False")])
def test_module_checks_its_options_when_built(options, error, match):
    with pytest.raises(error, match=match):
        LinearCrossEntropy(**options)


def test_gradcheck_float64_torch_backend(gen):
    """The backward formulas (smoothing, z-loss, ignore, lse gradient) against finite differences."""
    h, w, y, b = make_problem(gen, 6, 5, 11, torch.float64, ignore_frac=0.3, scale=2.0)
    h, w, b = (t.requires_grad_() for t in (h, w, b))

    def f(h, w, b):
        rows, lse, _ = linear_cross_entropy_stats(h, w, y, bias=b, label_smoothing=0.2, z_loss=0.05,
                                                  backend="torch")
        return rows, lse

    with tuning(chunk_rows=4, chunk_classes=3):
        assert torch.autograd.gradcheck(f, (h, w, b))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_keeps_the_op_in_one_graph(compile_backend, gen):
    torch._dynamo.reset()
    h, w, y, b = make_problem(gen, 16, 8, 50)
    h.requires_grad_()
    backend = "triton" if DEVICE.type == "cuda" else "torch"

    def step(h, w, y, b):
        return linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1, backend=backend) * 2.0

    compiled = torch.compile(step, backend=compile_backend, fullgraph=True)
    # compile caches on disk do not key on a custom op's autograd formula: a graph cached by an
    # older checkout would replay the old backward, so this test compiles afresh
    with torch._inductor.config.patch(force_disable_caches=True):
        loss = compiled(h, w, y, b)
        (grad,) = torch.autograd.grad(loss, h)
    expected = step(h, w, y, b)
    (expected_grad,) = torch.autograd.grad(expected, h)
    assert torch.allclose(loss, expected) and torch.allclose(grad, expected_grad)


def test_torch_compile_with_ignore_index_as_an_argument(gen):
    """A pad id passed to the compiled function arrives as a SymInt (dynamic=True, or once it changes between
    calls): the ignore_index check could not be traced, and fullgraph=True failed."""
    torch._dynamo.reset()
    h, w, y, _ = make_problem(gen, 16, 8, 50)
    backend = "triton" if DEVICE.type == "cuda" else "torch"

    def loss(h, w, y, pad):
        return linear_cross_entropy(h, w, y, ignore_index=pad, backend=backend)

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=True)
    for pad in (int(y[0]), int(y[1]), -100):
        assert torch.allclose(compiled(h, w, y, pad), loss(h, w, y, pad))


# --------------------------------------------------------------------------------------------
# bad input: a clear exception naming the value, before any kernel launches
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    """Makes any backend launch fail the test."""
    from fastcyclic.kernels import linear_ce_chunked

    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched for bad input")

    for module in (triton_impl, linear_ce_chunked):
        monkeypatch.setattr(module, "forward", boom)
        monkeypatch.setattr(module, "backward", boom)


def _good():
    return (torch.randn(4, 3, device=DEVICE), torch.randn(5, 3, device=DEVICE),
            torch.tensor([0, 1, 4, 2], device=DEVICE))


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("mutate,error,match", [
    (lambda h, w, y: (h, w, torch.tensor([0, 1, 5, 2], device=DEVICE)), ValueError, r"target\[2\] = 5"),
    (lambda h, w, y: (h, w, torch.tensor([0, -3, 1, 2], device=DEVICE)), ValueError, r"target\[1\] = -3"),
    (lambda h, w, y: (h[0], w, y), ValueError, "h must be 2-D"),
    (lambda h, w, y: (h, w[0], y), ValueError, "weight must be 2-D"),
    (lambda h, w, y: (h, w, y[:3]), ValueError, "length N=4"),
    (lambda h, w, y: (h, w[:, :2], y), ValueError, "D mismatch: h has D=3 but weight has D=2"),
    (lambda h, w, y: (h, w[:0], y), ValueError, "K=0"),
    (lambda h, w, y: (h, w.half(), y), TypeError, "dtype mismatch"),
    (lambda h, w, y: (h, w, y.float()), TypeError, "class indices"),
    (lambda h, w, y: (h.int(), w.int(), y), TypeError, "must be float32"),
    (lambda h, w, y: ([[1.0]], w, y), TypeError, "h must be a torch.Tensor"),
    (lambda h, w, y: (h.to_sparse(), w, y), TypeError, "h must be a dense .* layout torch.sparse_coo"),
    (lambda h, w, y: (h, w.to_sparse(), y), TypeError, "weight must be a dense .* layout torch.sparse_coo"),
], ids=["target-high", "target-negative", "h-rank", "w-rank", "target-len", "d-mismatch", "k-zero",
        "dtype-mismatch", "float-target", "int-h", "not-tensor", "sparse-h", "sparse-w"])
def test_bad_input(backend, mutate, error, match, no_launch):
    h, w, y = mutate(*_good())
    with pytest.raises(error, match=match):
        linear_cross_entropy(h, w, y, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_and_uint8_targets_give_the_int64_result(backend, gen):
    """uint8 labels (K <= 256, often with ignore_index=255) are what F.cross_entropy also takes."""
    h, w, y, b = make_problem(gen, 13, 8, 37)
    y[::4] = 255
    expected = linear_cross_entropy(h, w, y, bias=b, ignore_index=255, backend=backend)
    for dtype in (torch.int32, torch.uint8):
        got = linear_cross_entropy(h, w, y.to(dtype), bias=b, ignore_index=255, backend=backend)
        assert torch.equal(got, expected), dtype


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\], got -0.1"),
    (dict(z_loss=-1.0), ValueError, "z_loss must be finite"),
    (dict(bias=torch.zeros(4)), ValueError, "bias must be 1-D of length K=5"),
    (dict(bias=torch.zeros(5, 1)), ValueError, r"bias must be 1-D of length K=5, got shape \(5, 1\)"),
    (dict(ignore_index=3.5), TypeError, "ignore_index must be an integer, got 3.5"),
    (dict(ignore_index=2 ** 63), ValueError, "ignore_index must fit in int64, got 9223372036854775808"),
    (dict(label_smoothing=None), TypeError, "label_smoothing must be a number, got None"),
    (dict(z_loss="0.1"), TypeError, "z_loss must be a number, got '0.1'"),
    (dict(fused_update=True), TypeError, "fused_update must be a handle .* got bool"),
    (dict(z_loss=float("inf")), ValueError, "z_loss must be finite and >= 0, got inf"),
    (dict(ignore_index=-2 ** 63 - 1), ValueError, "ignore_index must fit in int64"),
    (dict(ignore_index=True), TypeError, "ignore_index must be an integer, got True"),
    (dict(bias=torch.zeros(5, dtype=torch.float16)), TypeError,
     "dtype mismatch: h is torch.float32 but bias is torch.float16"),
    (dict(bias=torch.zeros(5, device="meta")), ValueError, "all tensors must be on one device"),
    (dict(validate=None), TypeError, "validate must be True or False, got None"),  # was: no target check
    (dict(deterministic="off"), TypeError, "deterministic must be True or False, got 'off'"),
])
def test_bad_options(kwargs, error, match, no_launch):
    h, w, y = _good()
    if "bias" in kwargs and kwargs["bias"].device.type != "meta":  # meta: the one other device a CPU has
        kwargs["bias"] = kwargs["bias"].to(DEVICE)
    with pytest.raises(error, match=match):
        linear_cross_entropy(h, w, y, **kwargs)


def test_float64_needs_the_torch_backend(no_launch):
    h, w, y = _good()
    with pytest.raises(TypeError, match="use backend='torch' for float64"):
        linear_cross_entropy(h.double(), w.double(), y, backend="triton")


def test_triton_without_cuda_or_interpreter_is_refused(monkeypatch, no_launch):
    if DEVICE.type == "cuda":
        pytest.skip("the refusal is for CPU tensors without the interpreter")
    monkeypatch.setattr(triton_impl, "INTERPRETER", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        linear_cross_entropy(*_good(), backend="triton")


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.1", "2.5.0.dev0", True), ("3.5.1", "3.0.0", True),
    ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.7.1+git1a2b3c", "2.4.0", False),
    ("4.0.0", "2.4.0", False),
])
def test_a_triton_before_3_7_interpreter_with_numpy_2_4_is_named(triton_version, numpy_version, refused):
    problem = triton_impl.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == refused
    if refused:
        assert triton_version in problem and numpy_version in problem and "numpy<2.4" in problem


def test_an_interpreter_that_cannot_run_the_kernels_is_refused_before_a_launch(monkeypatch):
    """With triton 3.6 and numpy 2.4 the interpreter fails inside the first kernel with "only 0-dimensional
    arrays can be converted to Python scalars"; the launcher says why instead, and launches nothing.
    Compiled kernels (a GPU, where triton may be 3.6) are not refused."""
    monkeypatch.setattr(triton_impl.np, "__version__", "2.4.6")
    h, w, y = _good()
    if not triton_impl.INTERPRETER:
        assert torch.isfinite(linear_cross_entropy(h, w, y, backend="triton"))
        return
    monkeypatch.setattr(triton_impl.triton, "__version__", "3.6.0")
    launches = []
    monkeypatch.setattr(triton_impl, "_forward_kernel", launches)  # a launch would index it: a TypeError
    with pytest.raises(RuntimeError, match=r"Triton 3\.6\.0 interpreter .* numpy 2\.4\.6"):
        linear_cross_entropy(h, w, y, backend="triton")
    assert launches == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_call_leaves_things_usable_and_validate_false_is_safe(backend, gen):
    h, w, y = _good()
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w, torch.tensor([0, 9, 1, 2], device=DEVICE), backend=backend)
    good = linear_cross_entropy(h, w, y, backend=backend)
    assert torch.isfinite(good)
    # without validation an out-of-range target reads nothing out of bounds: its target logit is 0, also for
    # values that narrowing to 32 bits would turn into a class (2^32 + 1 -> 1)
    bad = torch.tensor([2**40, 9, 2**32 + 1, -7], device=DEVICE)
    rows = linear_cross_entropy(h, w, bad, reduction="none", backend=backend, validate=False)
    lse = torch.logsumexp(h.double() @ w.double().T, dim=1)
    torch.testing.assert_close(rows.double().cpu(), lse.cpu(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# more edge cases: stats options, autocast, the bias gradient alone, fully masked rows, splits past K
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_loss_takes_the_options(backend, gen):
    """linear_cross_entropy_stats passes label_smoothing, z_loss and ignore_index on to its loss rows."""
    opts = dict(label_smoothing=0.2, z_loss=1e-2, ignore_index=5)
    h, w, y, b = make_problem(gen, 20, 8, 40, scale=2.0, ignore_frac=0.3, ignore_index=5)
    rows, lse, _ = linear_cross_entropy_stats(h, w, y, bias=b, backend=backend, **opts)
    ref_rows, ref_lse = reference_loss(h, w, y, b, reduction="none", **opts)
    assert rel_err(rows, ref_rows) < 1e-5 and rel_err(lse, ref_lse) < 1e-6
    assert torch.equal(rows, linear_cross_entropy(h, w, y, bias=b, reduction="none", backend=backend, **opts))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_fp16_operands_and_the_stats_too(backend, gen):
    """Under bf16 autocast an fp16 h is cast too (as F.linear casts it), and the stats function casts like the loss."""
    h, w, y, b = make_problem(gen, 7, 16, 50)
    expected = linear_cross_entropy(h.half().bfloat16(), w.bfloat16(), y, bias=b.bfloat16(), backend=backend)
    expected_stats = linear_cross_entropy_stats(h.bfloat16(), w.bfloat16(), y, bias=b.bfloat16(), backend=backend)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h.half(), w, y, bias=b, backend=backend)
        stats = linear_cross_entropy_stats(h.bfloat16(), w, y, bias=b, backend=backend)
    assert torch.equal(loss, expected)
    for ours, ref in zip(stats, expected_stats):
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gradient_alone(backend, gen):
    """Only the bias requires grad (h and W frozen): on both backends dbias equals the full backward's."""
    h, w, y, b = make_problem(gen, 20, 16, 60, scale=2.0, ignore_frac=0.2)
    full = _loss_and_grads(lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, backend=backend),
                           h, w, y, b, torch.tensor(1.0))
    b_leaf = b.detach().requires_grad_()
    (grad,) = torch.autograd.grad(linear_cross_entropy(h, w, y, bias=b_leaf, backend=backend), b_leaf)
    assert rel_err(grad, full[3]) < 1e-6


@pytest.mark.parametrize("d", [16, 80])  # D in one slice (resident), and in three slices of 32
def test_bias_gradient_alone_forms_no_dw(d, gen, monkeypatch):
    """dbias alone (a frozen weight) from the dW kernel: one program per class block and row split, none per D
    slice, and no dW product (it ran the full dW pass and threw dW away); dbias still the full backward's."""
    h, w, y, b = make_problem(gen, 20, d, 60, scale=2.0, ignore_frac=0.2)
    real_kernel, launches = triton_impl._backward_dw_kernel, []

    class RecordedKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, kwargs["WANT_DW"]))
                return real_kernel[grid](*args, **kwargs)
            return launch

    with tuning(config=with_splits(SMALL_TILES, 2)):  # 2 class blocks of 32, rows in 2 splits
        full = _loss_and_grads(lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, backend="triton"),
                               h, w, y, b, torch.tensor(1.0))
        monkeypatch.setattr(triton_impl, "_backward_dw_kernel", RecordedKernel())
        b_leaf = b.detach().requires_grad_()
        (grad,) = torch.autograd.grad(linear_cross_entropy(h, w, y, bias=b_leaf, backend="triton"), b_leaf)
    assert launches == [((2, 1, 2), False)]
    assert rel_err(grad, full[3]) < 1e-6


def test_a_frozen_weight_and_bias_launch_no_dw_kernel(gen, monkeypatch):
    """Only h requires grad, beside a bias: dh alone is made.  A dbias not asked for launched the dW kernel, a
    second pass over every logits tile whose result was thrown away."""
    h, w, y, b = make_problem(gen, 20, 16, 60, scale=2.0, ignore_frac=0.2)
    full = _loss_and_grads(lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, backend="triton"),
                           h, w, y, b, torch.tensor(1.0))
    launches = []
    monkeypatch.setattr(triton_impl, "_backward_dw_kernel", launches)  # a launch would index it: a TypeError
    h_leaf = h.detach().requires_grad_()
    (grad,) = torch.autograd.grad(linear_cross_entropy(h_leaf, w, y, bias=b, backend="triton"), h_leaf)
    assert rel_err(grad, full[1]) < 1e-6 and launches == []


@pytest.mark.parametrize("backend", BACKENDS + ["triton-split"])
def test_every_class_masked_gives_lse_minus_inf(backend, gen):
    """Every class masked by a -inf bias: lse is -inf like torch.logsumexp, not NaN (the split merge shifts by 0)."""
    h, w, _, _ = make_problem(gen, 5, 8, 40, bias=False)
    b = torch.full((40,), float("-inf"), device=DEVICE)
    y = torch.tensor([-100, -100, 3, 0, 39], device=DEVICE)  # ignored rows, and rows whose target is masked too
    context = tuning(config=with_splits(SMALL_TILES, 2)) if backend == "triton-split" else contextlib.nullcontext()
    with context:
        rows, lse, _ = linear_cross_entropy_stats(h, w, y, bias=b, backend=backend.removesuffix("-split"))
    assert torch.all(lse == float("-inf"))
    assert torch.all(rows[:2] == 0) and torch.all(rows[2:].isnan())  # eager's loss is NaN there too


@pytest.mark.parametrize("backend", BACKENDS + ["triton-split"])
def test_a_plus_inf_logit_gives_lse_plus_inf(backend, gen):
    """A +inf logit (here a +inf bias entry) makes lse +inf, as torch.logsumexp does, not NaN; the loss is NaN
    there, as F.cross_entropy's is."""
    h, w, y, b = make_problem(gen, 5, 8, 40)
    b[17] = float("inf")
    context = tuning(config=with_splits(SMALL_TILES, 2)) if backend == "triton-split" else contextlib.nullcontext()
    with context:
        rows, lse, _ = linear_cross_entropy_stats(h, w, y, bias=b, backend=backend.removesuffix("-split"))
    logits = h.double() @ w.double().T + b.double()
    assert torch.equal(lse.double().cpu(), torch.logsumexp(logits, dim=1).cpu())  # all +inf
    eager = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.equal(rows.isnan().cpu(), eager.isnan().cpu())


def test_dh_split_past_the_last_class_with_all_logits_below_minus_88(gen):
    """A dh split running past K (K a multiple of the tile, lse < -88.7) stops at K: no inf g times zero w rows."""
    h, w, y, _ = make_problem(gen, 9, 16, 96, bias=False)
    b = torch.full((96,), -100.0, device=DEVICE)
    with tuning(config=with_splits(SMALL_TILES, 2)):  # dh class tiles of 32: splits of 64 and 32 (+32 past K)
        errors = check("triton", gen, h, w, y, b)
    assert all(math.isfinite(e) for e in errors.values())


def test_torch_backend_negative_row_coefficient_keeps_far_probabilities_tiny(gen):
    """The torch backend's per-row exp clamp uses |p_coef|: a negative one must not clamp far classes at exp(-17)."""
    n, d, k = 8, 16, 4096
    h = torch.randn(n, d, generator=gen).to(DEVICE)
    w = (torch.randn(k, d, generator=gen) + 1.0).to(DEVICE)
    b = torch.zeros(k, device=DEVICE)
    b[0] = 300.0  # every other class ~300 below the max
    y = torch.randint(1, k, (n,), generator=gen).to(DEVICE)
    grad_out = -torch.rand(n, generator=gen, dtype=torch.float64) - 0.5
    ours = _loss_and_grads(lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, reduction="none",
                                                                   backend="torch"), h, w, y, b, grad_out)
    ref = _loss_and_grads(lambda h, w, y, b: reference_loss(h, w, y, b, reduction="none")[0], h, w, y, b, grad_out,
                          dtype=torch.float64)
    assert rel_err(ours[1], ref[1]) < 1e-5


# --------------------------------------------------------------------------------------------
# GPU only: large shapes, N*K > 2^31, K*D > 2^31 (run by bench/gpu_check.sh)
# --------------------------------------------------------------------------------------------


# The large GPU tests share one xdist worker (bench/gpu_check.sh runs pytest --dist loadgroup) so
# that their memory does not stack up; their "gemm" backward variants share a second one, so the
# time limit of the GPU check holds.
LARGE_GROUP, GEMM_GROUP = pytest.mark.xdist_group("large-gpu"), pytest.mark.xdist_group("large-gpu-gemm")


@pytest.mark.cuda
@pytest.mark.parametrize("backward", [pytest.param("recompute", marks=LARGE_GROUP),
                                      pytest.param("gemm", marks=GEMM_GROUP)])
@pytest.mark.parametrize("n,d,k", [(8192, 256, 65536), (4099, 512, 32771)])
def test_cuda_large_shapes_bf16(n, d, k, backward, gen):
    h, w, y, b = make_problem(gen, n, d, k, torch.bfloat16, bias=False, ignore_frac=0.05)
    config = dataclasses.replace(triton_impl.default_config(n, d, k, h.dtype, h.device), backward=backward)
    with tuning(config=config):
        check("triton", gen, h, w, y, b, label_smoothing=0.1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,d", [(torch.float32, 128), (torch.float32, 256), (torch.float16, 512),
                                     (torch.bfloat16, 1024), (torch.bfloat16, 200)], ids=str)
def test_cuda_default_tiles_for_wide_rows(dtype, d, gen):
    """The GPU default tiles change with the bytes per row (resident D, 1 KiB slices, D loops); the
    "gemm" backward's g tile with the dtype."""
    h, w, y, b = make_problem(gen, 300, d, 1000, dtype, ignore_frac=0.1)
    check("triton", gen, h, w, y, b, label_smoothing=0.1)
    config = dataclasses.replace(triton_impl.default_config(300, d, 1000, dtype, h.device), backward="gemm",
                                 grad_chunk=384)
    with tuning(config=config):
        check("triton", gen, h, w, y, b, label_smoothing=0.1)


def _chunked_float64(h, w, y, reduction="sum"):
    """Float64 reference without an N x K tensor: the torch backend in float64 (itself checked
    against the materialised reference above).  Where eager cannot be afforded either, the fused
    result must be within 1e-2 (eager bf16's own error is ~4e-3 at the shapes above)."""
    leaves = [t.detach().double().requires_grad_() for t in (h, w)]
    loss = linear_cross_entropy(leaves[0], leaves[1], y, reduction=reduction, backend="torch")
    loss.backward()
    return loss, leaves[0].grad, leaves[1].grad


def _fused_sum(h, w, y):
    return _loss_and_grads(lambda h, w, y, b: linear_cross_entropy(h, w, y, reduction="sum"), h, w, y, None,
                           torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.xdist_group("large-gpu")
def test_cuda_k_2_18_bf16(gen):
    """(16384, 128, 262144): eager would need 48 GiB and a float64 reference with autograd ~100."""
    h, w, y, _ = make_problem(gen, 16384, 128, 262144, torch.bfloat16, bias=False)
    for o, r in zip(_fused_sum(h, w, y), _chunked_float64(h, w, y)):
        assert rel_err(o, r) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=LARGE_GROUP),
                                     pytest.param("triton-gemm", marks=GEMM_GROUP)])
def test_cuda_uniform_logits_at_k_2_18(backend, gen):
    h, w, y, b = make_problem(gen, 256, 64, 262144, torch.bfloat16, scale=1e-3)
    backend, context = hard_case_backend(backend, h, w)
    with context:
        errors = check(backend, gen, h, w, y, b)
    assert errors["dw"] < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=LARGE_GROUP),
                                     pytest.param("triton-gemm", marks=GEMM_GROUP)])
def test_cuda_n_times_k_over_2_31(backend, gen):
    """N*K > 2^31 (the issue's hard case): no tensor is N x K here, so what could overflow are program counts,
    split ranges and loop bounds (the "gemm" backward's g is N x its class block)."""
    n, d, k = 32768, 32, 65600  # N*K = 2.15e9 > 2^31
    assert n * k > 2**31
    h, w, y, _ = make_problem(gen, n, d, k, torch.bfloat16, bias=False)
    _, context = hard_case_backend(backend, h, w)
    with context:
        ours = _fused_sum(h, w, y)
    for o, r in zip(ours, _chunked_float64(h, w, y)):
        assert rel_err(o, r) < 1e-2


@pytest.mark.cuda
@pytest.mark.xdist_group("large-gpu")
def test_cuda_k_times_d_over_2_31(gen):
    n, d, k = 64, 257, (2**31) // 257 + 1000  # K*D > 2^31: int64 offsets into weight
    assert k * d > 2**31
    h = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16)
    w = (torch.randn(k, d, device=DEVICE, dtype=torch.bfloat16) * 0.05)
    y = torch.randint(0, k, (n,), device=DEVICE)
    y[:4] = torch.tensor([k - 1, k - 2, 0, k // 2], device=DEVICE)  # targets at the far end of weight
    ours = _fused_sum(h, w, y)
    for o, r in zip(ours, _chunked_float64(h, w, y)):
        assert rel_err(o, r) < 1e-2
    # the last rows of dW (beyond 2^31 elements) received their gradient
    assert ours[2][-2:].float().abs().sum() > 0


# check()'s fp32 slack (1e-5) is ~50x eager's own error: log2(e) cut to 1.4427 in the backward (10x eager's
# error) passed it.  This bounds the error by eager's own.
@pytest.mark.parametrize("config", ["default", "small-split", "gemm"])
def test_fp32_gradients_as_accurate_as_eager(config, gen):
    h, w, y, b = make_problem(gen, 33, 24, 211, scale=3.0, ignore_frac=0.25)
    grad_out = _grad_out(gen, "sum", 33)
    configs = {"default": None, "small-split": with_splits(SMALL_TILES, 3), "gemm": GEMM_BACKWARD}
    with tuning(config=configs[config]):
        ours = _loss_and_grads(lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, reduction="sum",
                                                                       backend="triton"), h, w, y, b, grad_out)
    ref = _loss_and_grads(lambda h, w, y, b: reference_loss(h, w, y, b, reduction="sum")[0], h, w, y, b, grad_out,
                          dtype=torch.float64)
    eager = _loss_and_grads(lambda h, w, y, b: eager_loss(h, w, y, b, reduction="sum")[0], h, w, y, b, grad_out)
    for name, o, r, e, scale in zip(("dh", "dw", "db"), ours[1:], ref[1:], eager[1:],
                                    term_scales(h, w, y, b, grad_out, reduction="sum")):
        err, eager_err = rel_err(o, r, scale), rel_err(e, r, scale)
        assert err <= 4 * eager_err + 1e-7, f"{name}: {err:.3g} vs eager {eager_err:.3g}"


# test_argmax_ties_pick_first_index puts its ties in different splits: this one ties across tiles of one split
@pytest.mark.parametrize("splits", [1, 3])
def test_argmax_ties_across_tiles_of_one_split_pick_first_index(splits):
    h = torch.ones(3, 4, device=DEVICE)
    w = torch.zeros(300, 4, device=DEVICE)
    w[[5, 17, 100, 290]] = 1.0  # tiles of 32 classes: 0, 0, 3, 9; with 3 splits of 128: 0, 0, 0, 2
    with tuning(config=with_splits(SMALL_TILES, splits)):
        _, _, argmax = linear_cross_entropy_stats(h, w, torch.zeros(3, dtype=torch.long, device=DEVICE),
                                                  backend="triton")
    assert argmax.tolist() == [5, 5, 5]


# label smoothing's mean-logit term: random logits have a mean near 0, where an error in it cannot show
@pytest.mark.parametrize("k", [256, 250], ids=["even-k", "ragged-k"])
def test_label_smoothing_with_logits_far_from_zero(k, gen):
    h, w, y, b = make_problem(gen, 40, 24, k, ignore_frac=0.1)
    b = b + 50.0
    rows, _, _ = linear_cross_entropy_stats(h, w, y, bias=b, label_smoothing=0.1, backend="triton")
    ref_rows, _ = reference_loss(h, w, y, b, reduction="none", label_smoothing=0.1)
    assert rel_err(rows, ref_rows) < 1e-5


# the dW kernel's row loop must stop at N: with splits, the last split's rows can run past the padded row data
def test_dw_split_past_the_padded_rows(gen):
    tile = TileConfig(16, 16, 16, 16)
    config = LCEConfig(tile, tile, tile, backward_grad=tile)  # R = N rounded up to 16 only
    h, w, y, b = make_problem(gen, 40, 16, 50, scale=2.0)  # 3 row blocks, 2 splits of 2 blocks: rows to 64 > R = 48
    grad_out = torch.tensor(1.0, dtype=torch.float64)
    fn = lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, backend="triton")  # noqa: E731
    with tuning(config=with_splits(config, 2)):
        split = _loss_and_grads(fn, h, w, y, b, grad_out)
    with tuning(config=with_splits(config, 1)):
        whole = _loss_and_grads(fn, h, w, y, b, grad_out)
    for name, s, o in zip(("loss", "dh", "dw", "db"), split, whole):
        assert rel_err(s, o) < 1e-6, name


# validate=False with an out-of-range target: the loss is lse, and so must the gradient be (the backward's int32
# classes must not narrow 2^40 to class 0)
@pytest.mark.parametrize("backend", BACKENDS + ["triton-gemm"])
def test_validate_false_out_of_range_target_gets_the_lse_gradient(backend, gen):
    h, w, _, b = make_problem(gen, 4, 8, 40)
    bad = torch.tensor([2**40, 40, 2**32 + 1, -7], device=DEVICE)  # 2^40 and 2^32 + 1 narrow to classes 0 and 1
    grad_out = torch.tensor(1.0, dtype=torch.float64)
    backend, context = hard_case_backend(backend, h, w)
    with context:
        ours = _loss_and_grads(lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, reduction="sum",
                                                                       backend=backend, validate=False),
                               h, w, bad, b, grad_out)
    ref = _loss_and_grads(lambda h, w, y, b: torch.logsumexp(h @ w.T + b, dim=1).sum(), h, w, bad, b, grad_out,
                          dtype=torch.float64)
    for name, o, r in zip(("loss", "dh", "dw", "db"), ours, ref):
        assert rel_err(o, r) < 1e-5, name


# exact fp32 dots unless PyTorch allows TF32 (the interpreter ignores the precision: checked on the choice)
def test_fp32_dot_precision_follows_pytorchs_tf32_setting(monkeypatch):
    for allowed, expected in ((False, "ieee"), (True, "tf32")):
        monkeypatch.setattr(triton_impl, "tf32_allowed", lambda: allowed)
        assert triton_impl._precision(torch.float32) == expected
        assert triton_impl._precision(torch.bfloat16) == "tf32"


# label_smoothing = 1.0 is in F.cross_entropy's range
@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_one_is_accepted(backend, gen):
    h, w, y, b = make_problem(gen, 10, 8, 40, ignore_frac=0.2)
    ours = linear_cross_entropy(h, w, y, bias=b, label_smoothing=1.0, backend=backend)
    expected = torch.nn.functional.cross_entropy(h.double() @ w.double().T + b.double(), y, label_smoothing=1.0)
    assert abs(float(ours) - float(expected)) < 1e-5 * abs(float(expected))


# the least int64 is a valid ignore_index
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_least_int64(backend, gen):
    h, w, y, b = make_problem(gen, 10, 8, 40)
    y[:3] = -2 ** 63
    loss = linear_cross_entropy(h, w, y, bias=b, ignore_index=-2 ** 63, backend=backend, reduction="sum")
    expected = linear_cross_entropy(h[3:], w, y[3:], bias=b, backend=backend, reduction="sum")
    assert torch.allclose(loss, expected)
