"""Fused linear + cross-entropy in Triton: the N x K logits never exist in memory.

Shapes: h (N, D), w (K, D), optional bias (K,), target (N,).  z = h @ w.T + bias.

Three kernels, each one a program that *owns* an output tile and loops over the other axis, so
every output is written once, in a fixed order, with no atomics (bitwise deterministic):

* ``_forward_kernel``   owns a block of rows, loops over classes: online max / sum-exp (the LSE),
                        the target logit, optionally the row sum of logits (label smoothing) and the
                        argmax.  The class axis can be split across programs; the per-split
                        partials (O(splits * N)) are merged on the host.
* ``_backward_dw_kernel`` owns a block of classes (dW and dbias rows), loops over rows: recomputes
                        the logits tile, forms g = d loss / d z, accumulates dW += g^T h in fp32.
* ``_backward_dh_kernel`` owns a block of rows (dh), loops over classes: recomputes the logits tile,
                        forms g, accumulates dh += g w in fp32.

The gradient of the logits is
    g[n, k] = p_coef[n] * softmax(z)[n, k] - t_coef[n] * ((1 - eps) * [k == y_n] + eps / K)
with per-row coefficients computed on the host from the upstream gradients (see
``fastcyclic.linear_ce``), so reductions, ignore_index, z-loss and gradients flowing into the LSE
all reach the kernels as two vectors.  Nothing is filtered or approximated.

``dh_mode="atomic"`` makes the dW kernel also add its g @ w contribution to an fp32 dh buffer with
atomics (one fewer logits recompute, but order-dependent sums); it exists to be measured.

Under ``TRITON_INTERPRET=1`` (CPU) the kernels upcast to fp32 before ``tl.dot``: the interpreter's
bf16 dot is silently wrong.  All pointer offsets are int64, so N*D and K*D may exceed 2^31.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# triton.jit reads the variable when the kernels below are defined, so this is fixed at import
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, idx0, idx1, stride0, stride1, size0, size1, UPCAST: tl.constexpr):
    """A masked (len(idx0), len(idx1)) tile of a strided 2-D tensor; out-of-range reads give 0."""
    offsets = idx0.to(tl.int64)[:, None] * stride0 + idx1.to(tl.int64)[None, :] * stride1
    mask = (idx0[:, None] < size0) & (idx1[None, :] < size1)
    tile = tl.load(ptr + offsets, mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, N, K, D, stride_hn, stride_hd, stride_wk, stride_wd,
                 BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """z[rows, cols] = h[rows] @ w[cols].T in fp32, looping over D in BLOCK_D chunks."""
    z = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        h = _load_tile(h_ptr, rows, d, stride_hn, stride_hd, N, D, UPCAST)
        w_t = _load_tile(w_ptr, d, cols, stride_wd, stride_wk, D, K, UPCAST)
        z = tl.dot(h, w_t, z, input_precision=PRECISION)
    return z


@triton.jit
def _logit_grad(z, lse, p_coef, t_coef, target_pm1, target, cols, keep, uniform):
    """g = p_coef * softmax(z) - t_coef * ((1 - eps) * onehot + eps / K), rows on axis 0.

    In the target column p_y - 1 cancels when predictions are confident (p_y = 1 - 1e-7 after
    grokking), so there it is rebuilt from target_pm1 = expm1(z_y - lse), computed accurately from
    the forward's loss:  g_y = p_coef * target_pm1 + (p_coef - t_coef * (1 - eps + eps / K))."""
    p = tl.exp2((z - lse[:, None]) * 1.4426950408889634)
    onehot = cols[None, :] == target[:, None]
    g_target = p_coef * target_pm1 + (p_coef - t_coef * (keep + uniform))
    return tl.where(onehot, g_target[:, None], p_coef[:, None] * p - t_coef[:, None] * uniform)


# --------------------------------------------------------------------------------------------
# Forward: LSE, target logit, (row sum of logits), (argmax)
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "K", "D", "cols_per_split"])
def _forward_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr,
    max_ptr, rest_ptr, target_logit_ptr, logit_sum_ptr, argmax_ptr,
    N, K, D,
    stride_hn, stride_hd, stride_wk, stride_wd, stride_b, stride_y,
    cols_per_split,
    HAS_BIAS: tl.constexpr, WANT_LOGIT_SUM: tl.constexpr, WANT_ARGMAX: tl.constexpr,
    H_RESIDENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per row: the max logit m and rest = sum of exp(z - m) over every class but one maximal one,
    so lse = m + log1p(rest).  Keeping the leading 1 out of the sum keeps log1p(rest) -- the loss of
    a confident row, ~1e-7 after grokking -- accurate to fp32 relative precision."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    target = tl.load(y_ptr + rows.to(tl.int64) * stride_y, mask=row_mask, other=-1)

    if H_RESIDENT:  # the whole (BLOCK_N, D) row block is loaded once and reused for every class tile
        h_rows = _load_tile(h_ptr, rows, tl.arange(0, BLOCK_D), stride_hn, stride_hd, N, D, UPCAST)

    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    rest = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    logit_sum = tl.zeros((BLOCK_N,), tl.float32)
    argmax = tl.zeros((BLOCK_N,), tl.int64)

    k_start = split * cols_per_split
    k_end = tl.minimum(K, k_start + cols_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        if H_RESIDENT:
            w_t = _load_tile(w_ptr, tl.arange(0, BLOCK_D), cols, stride_wd, stride_wk, D, K, UPCAST)
            z = tl.dot(h_rows, w_t, input_precision=PRECISION)
        else:
            z = _logits_tile(h_ptr, w_ptr, rows, cols, N, K, D, stride_hn, stride_hd, stride_wk,
                             stride_wd, BLOCK_D, UPCAST, PRECISION)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols.to(tl.int64) * stride_b, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_mask[None, :], z, float("-inf"))

        # the tile on its own: max t, and sum of exp(z - t) without one of its maxima
        tile_max = tl.max(z, axis=1)
        is_max = z == tile_max[:, None]
        e = tl.exp2((z - tile_max[:, None]) * 1.4426950408889634)
        tile_rest = tl.sum(tl.where(is_max, 0.0, e), axis=1) + (tl.sum(is_max.to(tl.float32), axis=1) - 1.0)
        # merge: a strictly larger tile max takes over (the old max joins the rest); else the whole
        # tile, its max included, joins the rest
        scale = tl.exp2(-tl.abs(running_max - tile_max) * 1.4426950408889634)
        rest = tl.where(tile_max > running_max, (rest + 1.0) * scale + tile_rest, rest + (tile_rest + 1.0) * scale)
        if WANT_ARGMAX:  # first index of the maximum, like torch.argmax
            tile_arg = tl.min(tl.where(is_max, cols[None, :], K), axis=1).to(tl.int64)
            argmax = tl.where(tile_max > running_max, tile_arg, argmax)
        running_max = tl.maximum(running_max, tile_max)
        # the target logit comes from the same tile arithmetic as the max, so (max - z_y) is exactly
        # 0 when the target is predicted
        target_logit += tl.sum(tl.where((cols[None, :] == target[:, None]) & col_mask[None, :], z, 0.0), axis=1)
        if WANT_LOGIT_SUM:
            logit_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)

    out = split.to(tl.int64) * N + rows
    tl.store(max_ptr + out, running_max, mask=row_mask)
    tl.store(rest_ptr + out, rest, mask=row_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=row_mask)
    if WANT_LOGIT_SUM:
        tl.store(logit_sum_ptr + out, logit_sum, mask=row_mask)
    if WANT_ARGMAX:
        tl.store(argmax_ptr + out, argmax, mask=row_mask)


# --------------------------------------------------------------------------------------------
# Backward, dW (and dbias): one program owns BLOCK_K classes x BLOCK_DS columns of dW
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "K", "D", "rows_per_split"])
def _backward_dw_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, p_coef_ptr, t_coef_ptr, pm1_ptr,
    dw_ptr, db_ptr, dh_ptr,
    N, K, D,
    stride_hn, stride_hd, stride_wk, stride_wd, stride_b, stride_y,
    stride_dw_split, stride_dwk, stride_dwd, stride_db_split, stride_dhn, stride_dhd,
    rows_per_split, keep, uniform,
    HAS_BIAS: tl.constexpr, ATOMIC_DH: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    dcols = pid_d * BLOCK_DS + tl.arange(0, BLOCK_DS)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols.to(tl.int64) * stride_b, mask=col_mask, other=0.0).to(tl.float32)
    # this program's slice of w: used for the logits when it covers all of D (RESIDENT), and for dh
    w_slice = _load_tile(w_ptr, cols, dcols, stride_wk, stride_wd, K, D, UPCAST)

    dw = tl.zeros((BLOCK_K, BLOCK_DS), tl.float32)
    db = tl.zeros((BLOCK_K,), tl.float32)
    n_start = split * rows_per_split
    n_end = tl.minimum(N, n_start + rows_per_split)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        h_slice = _load_tile(h_ptr, rows, dcols, stride_hn, stride_hd, N, D, UPCAST)
        if RESIDENT:
            z = tl.dot(h_slice, tl.trans(w_slice), input_precision=PRECISION)
        else:
            z = _logits_tile(h_ptr, w_ptr, rows, cols, N, K, D, stride_hn, stride_hd, stride_wk,
                             stride_wd, BLOCK_D, UPCAST, PRECISION)
        if HAS_BIAS:
            z += bias[None, :]
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        p_coef = tl.load(p_coef_ptr + rows, mask=row_mask, other=0.0)
        t_coef = tl.load(t_coef_ptr + rows, mask=row_mask, other=0.0)
        target_pm1 = tl.load(pm1_ptr + rows, mask=row_mask, other=0.0)
        target = tl.load(y_ptr + rows.to(tl.int64) * stride_y, mask=row_mask, other=-1)
        g = _logit_grad(z, lse, p_coef, t_coef, target_pm1, target, cols, keep, uniform)
        g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)

        g_in = g.to(h_slice.dtype)  # bf16/fp16 operands for the tensor cores, fp32 accumulation
        dw = tl.dot(tl.trans(g_in), h_slice, dw, input_precision=PRECISION)
        if HAS_BIAS:
            db += tl.sum(g, axis=0)
        if ATOMIC_DH:
            dh = tl.dot(g_in, w_slice, input_precision=PRECISION)
            dh_offsets = rows.to(tl.int64)[:, None] * stride_dhn + dcols.to(tl.int64)[None, :] * stride_dhd
            tl.atomic_add(dh_ptr + dh_offsets, dh, mask=row_mask[:, None] & (dcols[None, :] < D))

    out = dw_ptr + split.to(tl.int64) * stride_dw_split \
        + cols.to(tl.int64)[:, None] * stride_dwk + dcols.to(tl.int64)[None, :] * stride_dwd
    tl.store(out, dw.to(dw_ptr.dtype.element_ty), mask=col_mask[:, None] & (dcols[None, :] < D))
    if HAS_BIAS:
        if pid_d == 0:
            tl.store(db_ptr + split.to(tl.int64) * stride_db_split + cols, db.to(db_ptr.dtype.element_ty),
                     mask=col_mask)


# --------------------------------------------------------------------------------------------
# Backward, dh: one program owns BLOCK_N rows x BLOCK_DS columns of dh
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "K", "D", "cols_per_split"])
def _backward_dh_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, p_coef_ptr, t_coef_ptr, pm1_ptr,
    dh_ptr,
    N, K, D,
    stride_hn, stride_hd, stride_wk, stride_wd, stride_b, stride_y,
    stride_dh_split, stride_dhn, stride_dhd,
    cols_per_split, keep, uniform,
    HAS_BIAS: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dcols = pid_d * BLOCK_DS + tl.arange(0, BLOCK_DS)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    p_coef = tl.load(p_coef_ptr + rows, mask=row_mask, other=0.0)
    t_coef = tl.load(t_coef_ptr + rows, mask=row_mask, other=0.0)
    target_pm1 = tl.load(pm1_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(y_ptr + rows.to(tl.int64) * stride_y, mask=row_mask, other=-1)
    if RESIDENT:
        h_rows = _load_tile(h_ptr, rows, dcols, stride_hn, stride_hd, N, D, UPCAST)

    dh = tl.zeros((BLOCK_N, BLOCK_DS), tl.float32)
    k_start = split * cols_per_split
    k_end = tl.minimum(K, k_start + cols_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        w_slice = _load_tile(w_ptr, cols, dcols, stride_wk, stride_wd, K, D, UPCAST)
        if RESIDENT:
            z = tl.dot(h_rows, tl.trans(w_slice), input_precision=PRECISION)
        else:
            z = _logits_tile(h_ptr, w_ptr, rows, cols, N, K, D, stride_hn, stride_hd, stride_wk,
                             stride_wd, BLOCK_D, UPCAST, PRECISION)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols.to(tl.int64) * stride_b, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        g = _logit_grad(z, lse, p_coef, t_coef, target_pm1, target, cols, keep, uniform)
        g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
        dh = tl.dot(g.to(w_slice.dtype), w_slice, dh, input_precision=PRECISION)

    out = dh_ptr + split.to(tl.int64) * stride_dh_split \
        + rows.to(tl.int64)[:, None] * stride_dhn + dcols.to(tl.int64)[None, :] * stride_dhd
    tl.store(out, dh.to(dh_ptr.dtype.element_ty), mask=row_mask[:, None] & (dcols[None, :] < D))


# --------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """Tiles of one kernel.  ``block_owner`` is the block of the axis the program owns (rows for the
    forward and dh kernels, classes for dW), ``block_loop`` the block of the axis it loops over.
    ``block_d`` is the D chunk of the logits dot; ``block_ds`` the slice of D one program
    accumulates (dW, dh).  When ``block_ds >= D`` the operand slice loaded for the gradient is reused
    for the logits ("resident"); otherwise the logits loop over D and each D slice recomputes them.
    ``splits`` divides the loop axis across programs (None: enough programs to fill the GPU)."""

    block_owner: int
    block_loop: int
    block_d: int
    block_ds: int
    num_warps: int = 4
    num_stages: int = 2
    splits: int | None = None


@dataclass(frozen=True)
class LCEConfig:
    forward: TileConfig
    backward_dw: TileConfig
    backward_dh: TileConfig
    dh_mode: str = "kernel"  # "kernel" (deterministic) or "atomic" (dh accumulated by the dW kernel)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(x), 1)))


def default_config(n: int, d: int, k: int, dtype: torch.dtype, device: torch.device) -> LCEConfig:
    """Tiles for a problem.  Under the interpreter every (program x loop step) costs ~5 ms, so the
    tiles are as large as numpy handles comfortably; on GPU they are the measured winners
    (bench/results/), with the whole of D resident up to 256."""
    if device.type != "cuda":
        bd = min(_pow2(d), 128)
        ds = _pow2(d) if d <= 128 else 128
        return LCEConfig(
            forward=TileConfig(64, 256, bd, bd),
            backward_dw=TileConfig(128, 64, bd, ds),
            backward_dh=TileConfig(64, 256, bd, ds),
        )
    small = dtype != torch.float32
    if d <= 128:
        return LCEConfig(
            forward=TileConfig(128, 128, _pow2(d), _pow2(d), num_warps=8, num_stages=3),
            backward_dw=TileConfig(128, 64, _pow2(d), _pow2(d), num_warps=8, num_stages=2),
            backward_dh=TileConfig(128, 64, _pow2(d), _pow2(d), num_warps=8, num_stages=2),
        )
    if d <= 256 and small:
        return LCEConfig(
            forward=TileConfig(128, 128, 256, 256, num_warps=8, num_stages=2),
            backward_dw=TileConfig(64, 64, 256, 256, num_warps=8, num_stages=2),
            backward_dh=TileConfig(64, 64, 256, 256, num_warps=8, num_stages=2),
        )
    return LCEConfig(
        forward=TileConfig(128, 128, 64, 64, num_warps=8, num_stages=3),
        backward_dw=TileConfig(128, 64, 64, 128, num_warps=8, num_stages=2),
        backward_dh=TileConfig(128, 64, 64, 128, num_warps=8, num_stages=2),
    )


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# fp32 partial results of a split loop (merged on the host) may take at most this much memory
PARTIAL_BUDGET_BYTES = 32 << 20


def _split(owner_blocks: int, loop_len: int, block_loop: int, splits: int | None, device: torch.device,
           partial_bytes: int) -> tuple[int, int]:
    """How many programs share the loop axis, and how long each one's (block-aligned) range is.
    By default enough for two waves of programs on the GPU, as far as the partials (partial_bytes
    per split) fit in PARTIAL_BUDGET_BYTES; every split gets at least one block."""
    loop_blocks = max(1, triton.cdiv(loop_len, block_loop))
    if splits is None:
        wanted = triton.cdiv(2 * _num_sms(device), max(owner_blocks, 1))
        splits = min(wanted, max(1, PARTIAL_BUDGET_BYTES // max(partial_bytes, 1)))
    splits = max(1, min(int(splits), loop_blocks))
    blocks_per_split = triton.cdiv(loop_blocks, splits)
    splits = triton.cdiv(loop_blocks, blocks_per_split)
    return splits, blocks_per_split * block_loop


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow PyTorch's own matmul setting, so the kernel is as exact as eager fp32
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def forward(h, w, bias, target, *, want_logit_sum=False, want_argmax=False, config=None):
    """Per row: (max logit M, rest, target logit, sum of logits or None, argmax or None) as fp32 /
    int64 vectors of length N, where rest = sum of exp(z - M) over all classes but one maximal one:
    lse = M + log1p(rest)."""
    n, d = h.shape
    k = w.shape[0]
    config = config or default_config(n, d, k, h.dtype, h.device)
    tc = config.forward
    resident = d <= tc.block_d
    splits, cols_per_split = _split(triton.cdiv(n, tc.block_owner), k, tc.block_loop, tc.splits, h.device,
                                    partial_bytes=5 * 4 * n)
    f32 = dict(dtype=torch.float32, device=h.device)
    running_max = torch.empty(splits, n, **f32)
    rest = torch.empty(splits, n, **f32)
    target_logit = torch.empty(splits, n, **f32)
    logit_sum = torch.empty(splits, n, **f32) if want_logit_sum else rest
    argmax = torch.empty(splits, n, dtype=torch.int64, device=h.device) if want_argmax else rest
    b = bias if bias is not None else h
    if n > 0:
        _forward_kernel[(triton.cdiv(n, tc.block_owner), splits)](
            h, w, b, target,
            running_max, rest, target_logit, logit_sum, argmax,
            n, k, d,
            h.stride(0), h.stride(1), w.stride(0), w.stride(1),
            b.stride(0) if bias is not None else 0, target.stride(0),
            cols_per_split,
            HAS_BIAS=bias is not None, WANT_LOGIT_SUM=want_logit_sum, WANT_ARGMAX=want_argmax,
            H_RESIDENT=resident,
            BLOCK_N=tc.block_owner, BLOCK_K=tc.block_loop, BLOCK_D=tc.block_d,
            UPCAST=INTERPRETER, PRECISION=_precision(h.dtype),
            num_warps=tc.num_warps, num_stages=tc.num_stages,
        )
    top, rest = merge_splits(running_max, rest)
    best_split = running_max.argmax(dim=0, keepdim=True)  # first split holding the max
    return (
        top,
        rest,
        target_logit.sum(dim=0),
        logit_sum.sum(dim=0) if want_logit_sum else None,
        argmax.gather(0, best_split).squeeze(0) if want_argmax else None,
    )


def merge_splits(split_max, split_rest):
    """Merge per-split (max, rest) pairs of shape (S, N) into one (max, rest) per row.  The split
    holding the first maximum keeps its rest; every other split joins with its own max included."""
    top, best = split_max.max(dim=0)
    joined = (split_rest + 1.0) * torch.exp(split_max - top)
    joined.scatter_(0, best[None], split_rest.gather(0, best[None]))
    return top, joined.sum(dim=0)


def backward(h, w, bias, target, lse, p_coef, t_coef, target_pm1, label_smoothing, *, config=None,
             deterministic=False, need_dh=True, need_dw=True):
    """Gradients (dh, dw, dbias) for the logit gradient described in the module docstring.
    lse, p_coef, t_coef and target_pm1 (= expm1(z_y - lse)) are contiguous fp32 (N,) vectors;
    gradients not asked for are returned as None."""
    n, d = h.shape
    k = w.shape[0]
    config = config or default_config(n, d, k, h.dtype, h.device)
    atomic_dh = need_dh and config.dh_mode == "atomic" and not deterministic
    keep, uniform = 1.0 - label_smoothing, label_smoothing / k
    common = dict(UPCAST=INTERPRETER, PRECISION=_precision(h.dtype))
    b = bias if bias is not None else h
    stride_b = b.stride(0) if bias is not None else 0
    dh = dw = db = None

    if need_dw or atomic_dh or (bias is not None):
        tc = config.backward_dw
        resident = d <= tc.block_ds
        k_blocks = triton.cdiv(k, tc.block_owner)
        d_blocks = triton.cdiv(d, tc.block_ds)
        # split over rows only when the class blocks alone cannot fill the GPU; partials are fp32
        splits, rows_per_split = _split(k_blocks * d_blocks, n, tc.block_loop, tc.splits, h.device,
                                        partial_bytes=4 * k * (d + 1))
        if atomic_dh:
            splits, rows_per_split = 1, max(n, 1)
        dw_out = torch.empty(k, d, dtype=w.dtype, device=w.device) if splits == 1 else \
            torch.empty(splits, k, d, dtype=torch.float32, device=w.device)
        db_out = None
        if bias is not None:
            db_out = torch.empty(k, dtype=bias.dtype, device=w.device) if splits == 1 else \
                torch.empty(splits, k, dtype=torch.float32, device=w.device)
        dh_acc = torch.zeros(n, d, dtype=torch.float32, device=h.device) if atomic_dh else None
        dw3 = dw_out if splits > 1 else dw_out.unsqueeze(0)
        dh_dummy = dh_acc if atomic_dh else dw3[0]
        if n > 0:
            _backward_dw_kernel[(k_blocks, d_blocks, splits)](
                h, w, b, target, lse, p_coef, t_coef, target_pm1,
                dw3, db_out if db_out is not None else dw3, dh_dummy,
                n, k, d,
                h.stride(0), h.stride(1), w.stride(0), w.stride(1), stride_b, target.stride(0),
                dw3.stride(0), dw3.stride(1), dw3.stride(2),
                db_out.stride(0) if (db_out is not None and splits > 1) else 0,
                dh_dummy.stride(0), dh_dummy.stride(1),
                rows_per_split, keep, uniform,
                HAS_BIAS=bias is not None, ATOMIC_DH=atomic_dh, RESIDENT=resident,
                BLOCK_K=tc.block_owner, BLOCK_N=tc.block_loop, BLOCK_D=tc.block_d, BLOCK_DS=tc.block_ds,
                num_warps=tc.num_warps, num_stages=tc.num_stages, **common,
            )
        else:
            dw3.zero_()
            if db_out is not None:
                db_out.zero_()
        dw = dw_out if splits == 1 else dw_out.sum(dim=0).to(w.dtype)
        if bias is not None:
            db = db_out if splits == 1 else db_out.sum(dim=0).to(bias.dtype)
        if atomic_dh:
            dh = dh_acc.to(h.dtype)

    if need_dh and not atomic_dh:
        tc = config.backward_dh
        resident = d <= tc.block_ds
        n_blocks = triton.cdiv(n, tc.block_owner)
        d_blocks = triton.cdiv(d, tc.block_ds)
        splits, cols_per_split = _split(n_blocks * d_blocks, k, tc.block_loop, tc.splits, h.device,
                                        partial_bytes=4 * n * d)
        dh_out = torch.empty(n, d, dtype=h.dtype, device=h.device) if splits == 1 else \
            torch.empty(splits, n, d, dtype=torch.float32, device=h.device)
        dh3 = dh_out if splits > 1 else dh_out.unsqueeze(0)
        if n > 0:
            _backward_dh_kernel[(n_blocks, d_blocks, splits)](
                h, w, b, target, lse, p_coef, t_coef, target_pm1,
                dh3,
                n, k, d,
                h.stride(0), h.stride(1), w.stride(0), w.stride(1), stride_b, target.stride(0),
                dh3.stride(0), dh3.stride(1), dh3.stride(2),
                cols_per_split, keep, uniform,
                HAS_BIAS=bias is not None, RESIDENT=resident,
                BLOCK_N=tc.block_owner, BLOCK_K=tc.block_loop, BLOCK_D=tc.block_d, BLOCK_DS=tc.block_ds,
                num_warps=tc.num_warps, num_stages=tc.num_stages, **common,
            )
        dh = dh_out if splits == 1 else dh_out.sum(dim=0).to(h.dtype)

    return dh, (dw if need_dw else None), db


def with_splits(config: LCEConfig, splits: int | None) -> LCEConfig:
    """The same tiles with a fixed number of splits in every kernel (tests use it to reach the
    partial-merge paths on CPU, where the default is one split)."""
    return LCEConfig(*(dataclasses.replace(t, splits=splits)
                       for t in (config.forward, config.backward_dw, config.backward_dh)),
                     dh_mode=config.dh_mode)


__all__ = ["LCEConfig", "TileConfig", "default_config", "forward", "backward", "with_splits",
           "SUPPORTED_DTYPES", "INTERPRETER"]
