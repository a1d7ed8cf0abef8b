"""Fused linear + cross-entropy in Triton: the N x K logits never exist in memory.

Shapes: h (N, D), w (K, D), optional bias (K,), target (N,).  z = h @ w.T + bias.

Three kernels, each one a program that *owns* an output tile and loops over the other axis, so
every output is written once, in a fixed order, with no atomics (bitwise deterministic):

* ``_forward_kernel``     owns a block of rows, loops over classes: online max and sum-exp, the
                          target logit, optionally the row sum of logits (label smoothing) and the
                          argmax.  The class axis can be split across programs; the per-split
                          partials (O(splits * N)) are merged by PyTorch ops on the device.
* ``_backward_dw_kernel`` owns a block of classes (dW and dbias rows), loops over rows: recomputes
                          the logits tile (transposed, as FlashAttention's dK/dV kernel does, so
                          g^T feeds the tensor cores straight from registers), accumulates dW += g^T h.
                          Its epilogue either stores dW or applies the optimizer step to those w
                          rows (``ClassifierUpdate``: the update fused into the backward).
* ``_backward_dh_kernel`` owns a block of rows (dh), loops over classes: recomputes the logits tile,
                          accumulates dh += g w.
* ``_logit_grad_kernel``  the other backward (``LCEConfig.backward = "gemm"``): writes g for one
                          block of classes at a time, and cuBLAS computes dW and dh from it.

The gradient of the logits is
    g[n, k] = p_coef[n] * softmax(z)[n, k] - t_coef[n] * ((1 - eps) * [k == y_n] + eps / K)
with per-row coefficients computed beforehand by PyTorch ops on the device from the upstream
gradients (see ``fastcyclic.linear_ce``), so reductions, ignore_index, z-loss and gradients flowing
into the LSE all reach the kernels as per-row vectors.  Nothing is filtered or approximated.  (An option that
accumulated dh with atomics from the dW kernel, saving one logits recompute, measured 1.8-3.5x
slower on an H200 and was removed: bench/results/2026-11-28-h200/run1.)

Under ``TRITON_INTERPRET=1`` (CPU) the kernels upcast to fp32 before ``tl.dot``: the interpreter's
bf16 dot is silently wrong.  All pointer offsets are int64, so N*D and K*D may exceed 2^31.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from fastcyclic.kernels.optim import adam_constants, adamw_math, on_device, round_for_store, sgdw_math

# triton.jit reads the variable when the kernels below are defined, so this is fixed at import
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why the Triton interpreter of this version cannot run these kernels, or None.  The kernels loop over
    ranges that start at a multiple of a tl.program_id; the interpreters of triton 3.5 and 3.6 turn such a bound into
    an int with int() of a one-element numpy array, which numpy 2.4 refuses (triton 3.7 squeezes it first)."""
    def major_minor(version):
        match = re.match(r"(\d+)\.(\d+)", version)
        return (int(match[1]), int(match[2])) if match else None
    triton_mm, numpy_mm = major_minor(triton_version), major_minor(numpy_version)
    if triton_mm is None or numpy_mm is None or triton_mm >= (3, 7) or numpy_mm < (2, 4):
        return None
    return (f"the Triton {triton_version} interpreter (TRITON_INTERPRET=1) cannot run fastcyclic's cross-entropy "
            f"kernels with numpy {numpy_version}: it fails on their loop bounds (fixed in triton 3.7). "
            f"Install 'triton>=3.7' or 'numpy<2.4', or use backend='torch' on CPU")


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, idx0, idx1, stride0, stride1, size0, size1,
               MASK0: tl.constexpr, MASK1: tl.constexpr, INTERPRET: tl.constexpr):
    """A (len(idx0), len(idx1)) tile of a strided 2-D tensor; out-of-range reads give 0.  An axis
    known to be in range is not masked, so loads along the contiguous axis stay 16 bytes wide.  Under the
    interpreter (INTERPRET, as in every kernel here) the tile is upcast to fp32: its bf16 dot is wrong."""
    offsets = idx0.to(tl.int64)[:, None] * stride0 + idx1.to(tl.int64)[None, :] * stride1
    if MASK0 and MASK1:
        tile = tl.load(ptr + offsets, mask=(idx0[:, None] < size0) & (idx1[None, :] < size1), other=0.0)
    elif MASK0:
        tile = tl.load(ptr + offsets, mask=idx0[:, None] < size0, other=0.0)
    elif MASK1:
        tile = tl.load(ptr + offsets, mask=idx1[None, :] < size1, other=0.0)
    else:
        tile = tl.load(ptr + offsets)
    if INTERPRET:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _logits(a_ptr, b_ptr, a_idx, b_idx, A, B, D, stride_a0, stride_a1, stride_b0, stride_b1,
            EVEN_D: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """a[a_idx] @ b[b_idx].T in fp32, looping over D in BLOCK_D chunks (h and w, either way round)."""
    acc = tl.zeros((a_idx.shape[0], b_idx.shape[0]), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        a = _load_tile(a_ptr, a_idx, d, stride_a0, stride_a1, A, D, True, not EVEN_D, INTERPRET)
        b_t = _load_tile(b_ptr, d, b_idx, stride_b1, stride_b0, D, B, not EVEN_D, True, INTERPRET)
        acc = tl.dot(a, b_t, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _load_target(y_ptr, rows, stride_y, mask, K):
    """int64 targets as int32 class indices; outside [0, K) (ignore_index, or any value with
    validate=False) they become -1, which matches no class (narrowing 2^32 first would alias class 0)."""
    target = tl.load(y_ptr + rows.to(tl.int64) * stride_y, mask=mask, other=-1)
    return tl.where((target >= 0) & (target < K), target, -1).to(tl.int32)


@triton.jit
def _logit_grad(z, shift, log_sum, p_coef, t_uniform, g_target, onehot, EXACT_SHIFT: tl.constexpr):
    """g = p_coef * softmax(z) - t_uniform off the target, g_target on it (all already broadcast).

    softmax(z) = exp(z - lse).  With EXACT_SHIFT (fp32 inputs) lse comes as the row max (shift) and
    log_sum = lse - max, and z - max - log_sum is formed as eager's log_softmax forms it: z - max is exact
    near the max, while lse rounded to fp32 as a whole is off by up to ulp(lse) / 2, 5e-4 at |z| ~ 1e4 (2-5x
    eager's gradient error there).  16-bit inputs take shift = lse: their g is rounded to 16 bits before
    the dot, far coarser, and the subtraction is saved.  (z - lse) is formed before scaling by log2(e):
    pre-scaling would round lse to ulp(lse).  g_target comes in precomputed, free of the cancellation of
    p_y - 1 for confident rows (see fastcyclic.linear_ce)."""
    x = z - shift
    if EXACT_SHIFT:
        x = x - log_sum
    p = tl.exp2(x * 1.4426950408889634)
    return tl.where(onehot, g_target, p_coef * p - t_uniform)


# --------------------------------------------------------------------------------------------
# Forward: max, sum-exp without the max, target logit, (row sum of logits), (argmax)
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "K", "cols_per_split"])
def _forward_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr,
    max_ptr, rest_ptr, target_logit_ptr, logit_sum_ptr, argmax_ptr,
    N, K, D,
    stride_hn, stride_hd, stride_wk, stride_wd, stride_b, stride_y,
    cols_per_split,
    HAS_BIAS: tl.constexpr, WANT_LOGIT_SUM: tl.constexpr, WANT_ARGMAX: tl.constexpr,
    RESIDENT: tl.constexpr, EVEN_D: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per row: the max logit m, the target logit z_y and rest = sum of exp(z - m) over every class
    but the target, so lse = m + log(rest + exp(z_y - m)).  Keeping the target out of the sum keeps
    -log p_y = (m - z_y) + log1p(rest + expm1(z_y - m)) -- the loss of a confident row, ~1e-7 after
    grokking, where z_y = m -- accurate to fp32 relative precision instead of to ulp(1)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    target = _load_target(y_ptr, rows, stride_y, row_mask, K)

    if RESIDENT:  # the whole (BLOCK_N, D) row block is loaded once and reused for every class tile
        h_rows = _load_tile(h_ptr, rows, tl.arange(0, BLOCK_D), stride_hn, stride_hd, N, D,
                            True, not EVEN_D, INTERPRET)

    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    rest = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    logit_sum = tl.zeros((BLOCK_N,), tl.float32)
    argmax = tl.zeros((BLOCK_N,), tl.int32)

    k_start = split * cols_per_split
    k_end = tl.minimum(K, k_start + cols_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if RESIDENT:
            w_t = _load_tile(w_ptr, tl.arange(0, BLOCK_D), cols, stride_wd, stride_wk, D, K,
                             not EVEN_D, True, INTERPRET)
            z = tl.dot(h_rows, w_t, input_precision=PRECISION)
        else:
            z = _logits(h_ptr, w_ptr, rows, cols, N, K, D, stride_hn, stride_hd, stride_wk, stride_wd,
                        EVEN_D, BLOCK_D, INTERPRET, PRECISION)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols.to(tl.int64) * stride_b, mask=cols < K, other=0.0).to(tl.float32)[None, :]
        # a target >= K (possible with validate=False) must not pick a padding column
        is_target = cols[None, :] == target[:, None]
        if not EVEN_K:
            z = tl.where((cols < K)[None, :], z, float("-inf"))
            is_target = is_target & (cols < K)[None, :]

        tile_max = tl.max(z, axis=1)
        new_max = tl.maximum(running_max, tile_max)
        # rows whose logits so far are all -inf (classes masked by a -inf bias) shift by 0, not by
        # -inf: -inf - -inf would make rest NaN for good
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        e = tl.exp2((z - shift[:, None]) * 1.4426950408889634)
        rest = rest * tl.exp2((running_max - shift) * 1.4426950408889634) \
            + tl.sum(tl.where(is_target, 0.0, e), axis=1)
        # from the same tile arithmetic as the max: m - z_y is exactly 0 when the target is predicted
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        if WANT_ARGMAX:  # first index of the maximum, like torch.argmax
            tile_arg = tl.min(tl.where(z == tile_max[:, None], cols[None, :], K), axis=1)
            argmax = tl.where(tile_max > running_max, tile_arg, argmax)
        if WANT_LOGIT_SUM:
            if EVEN_K:
                logit_sum += tl.sum(z, axis=1)
            else:
                logit_sum += tl.sum(tl.where((cols < K)[None, :], z, 0.0), axis=1)
        running_max = new_max

    out = split.to(tl.int64) * N + rows
    tl.store(max_ptr + out, running_max, mask=row_mask)
    tl.store(rest_ptr + out, rest, mask=row_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=row_mask)
    if WANT_LOGIT_SUM:
        tl.store(logit_sum_ptr + out, logit_sum, mask=row_mask)
    if WANT_ARGMAX:
        tl.store(argmax_ptr + out, argmax.to(tl.int64), mask=row_mask)


# --------------------------------------------------------------------------------------------
# Backward.  Per-row data, built once per backward by ``_row_data``: a (5, R) fp32 tensor of terms -- the
# shift and log_sum of _logit_grad, p_coef, t_coef * eps / K, and g on the target column -- and an int32
# vector of target classes (-1 for an ignored or out-of-range target, so no class matches it).  R is N rounded
# up to a whole number of row blocks, and the padding rows hold shift = +inf, zeros and class -1, so the
# kernels read these vectors without masks or int64 comparisons (the dW kernel reads them for every logits
# tile).  Their g is 0 for finite logits, but a padding row reads h as 0 and 0 * inf is NaN: an infinite
# weight entry would put NaN into dW and dbias where eager's are finite, so the dW kernel (EVEN_N) and the
# dbias sums of _logit_grad_kernel zero g past N.
# Columns past K: their dW / dbias rows are not stored, and their w rows read as 0, but the dh kernel
# still zeroes their g (EVEN_K): z = 0 there, and exp(0 - lse) overflows to inf when every logit of a
# row is below -88 (a large negative bias), so inf * 0 would make dh NaN.
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_terms(terms_ptr, class_ptr, rows, R, EXACT_SHIFT: tl.constexpr):
    """shift, log_sum (0 unless EXACT_SHIFT), p_coef, t_uniform, g_target and the target class of ``rows``
    (all < R: no mask needed)."""
    row_stride = tl.cast(R, tl.int64)  # 4 R passes 2^31 at N ~ 5e8
    shift = tl.load(terms_ptr + rows)
    if EXACT_SHIFT:
        log_sum = tl.load(terms_ptr + row_stride + rows)
    else:
        log_sum = tl.zeros_like(shift)
    p_coef = tl.load(terms_ptr + 2 * row_stride + rows)
    t_uniform = tl.load(terms_ptr + 3 * row_stride + rows)
    g_target = tl.load(terms_ptr + 4 * row_stride + rows)
    return shift, log_sum, p_coef, t_uniform, g_target, tl.load(class_ptr + rows)


@triton.jit(do_not_specialize=["N", "K", "rows_per_split"])
def _backward_dw_kernel(
    h_ptr, w_ptr, b_ptr, class_ptr, terms_ptr,
    dw_ptr, db_ptr,
    lr_ptr, weight_decay_ptr, step_ptr, state0_ptr, state1_ptr,
    hyper0, hyper1, hyper2, hyper3, hyper4, hyper5,
    N, K, D, R,
    stride_hn, stride_hd, stride_wk, stride_wd, stride_b,
    stride_dw_split, stride_dwk, stride_dwd, stride_db_split,
    rows_per_split,
    HAS_BIAS: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, EXACT_SHIFT: tl.constexpr,
    RESIDENT: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr, INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr, UPDATE: tl.constexpr, DECOUPLED: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
):
    """One program owns dW[cols, dcols] (and dbias[cols]); logits are held transposed (classes on
    axis 0, rows on axis 1).

    UPDATE = 0 stores dW.  UPDATE = 1 (AdamW: hyper = kernels.optim.adam_constants) or 2 (SGDW:
    hyper = momentum, dampening, ...) applies the optimizer step to w[cols, dcols] instead, with the fp32 dW
    still in registers: dW never touches memory.  The launcher then gives every program all of D
    (one program per class block), so no program reads w rows another one is rewriting.
    WANT_DW = False (UPDATE = 0, a frozen weight): dbias alone, no dW product, and one program per class
    block, since the logits need all of D whatever the slice."""
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    dcols = pid_d * BLOCK_DS + tl.arange(0, BLOCK_DS)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols.to(tl.int64) * stride_b, mask=cols < K, other=0.0).to(tl.float32)
    if RESIDENT:  # this program's w rows cover all of D: load them once, for every logits tile
        w_rows = _load_tile(w_ptr, cols, dcols, stride_wk, stride_wd, K, D, True, not EVEN_DS, INTERPRET)

    dw = tl.zeros((BLOCK_K, BLOCK_DS), tl.float32)
    db = tl.zeros((BLOCK_K,), tl.float32)
    n_start = split * rows_per_split
    n_end = tl.minimum(N, n_start + rows_per_split)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        if RESIDENT or WANT_DW:
            h_slice = _load_tile(h_ptr, rows, dcols, stride_hn, stride_hd, N, D, True, not EVEN_DS, INTERPRET)
        if RESIDENT:
            z_t = tl.dot(w_rows, tl.trans(h_slice), input_precision=PRECISION)
        else:
            z_t = _logits(w_ptr, h_ptr, cols, rows, K, N, D, stride_wk, stride_wd, stride_hn, stride_hd,
                          EVEN_D, BLOCK_D, INTERPRET, PRECISION)
        if HAS_BIAS:
            z_t += bias[:, None]
        shift, log_sum, p_coef, t_uniform, g_target, target = _row_terms(terms_ptr, class_ptr, rows, R,
                                                                         EXACT_SHIFT)
        g_t = _logit_grad(z_t, shift[None, :], log_sum[None, :], p_coef[None, :], t_uniform[None, :],
                          g_target[None, :], cols[:, None] == target[None, :], EXACT_SHIFT)
        if not EVEN_N:
            g_t = tl.where((rows < N)[None, :], g_t, 0.0)
        # bf16/fp16 operands for the tensor cores, fp32 accumulation
        if WANT_DW:
            dw = tl.dot(g_t.to(h_slice.dtype), h_slice, dw, input_precision=PRECISION)
        if WANT_DB:
            db += tl.sum(g_t, axis=1)

    tile_mask = (cols < K)[:, None] & (dcols < D)[None, :]
    if UPDATE == 0:
        if WANT_DW:
            out = dw_ptr + split.to(tl.int64) * stride_dw_split \
                + cols.to(tl.int64)[:, None] * stride_dwk + dcols.to(tl.int64)[None, :] * stride_dwd
            tl.store(out, round_for_store(dw, dw_ptr.dtype.element_ty, INTERPRET), mask=tile_mask)
    else:
        w_tile = w_ptr + cols.to(tl.int64)[:, None] * stride_wk + dcols.to(tl.int64)[None, :] * stride_wd
        state_offsets = cols.to(tl.int64)[:, None] * D + dcols.to(tl.int64)[None, :]  # contiguous fp32
        p = tl.load(w_tile, mask=tile_mask, other=0.0).to(tl.float32)
        lr = tl.load(lr_ptr)
        weight_decay = tl.load(weight_decay_ptr)
        if UPDATE == 1:
            m = tl.load(state0_ptr + state_offsets, mask=tile_mask, other=0.0)
            v = tl.load(state1_ptr + state_offsets, mask=tile_mask, other=0.0)
            p, m, v = adamw_math(p, dw, m, v, lr, weight_decay, tl.load(step_ptr),
                                 hyper0, hyper1, hyper2, hyper3, hyper4, hyper5, DECOUPLED)
            tl.store(state0_ptr + state_offsets, m, mask=tile_mask)
            tl.store(state1_ptr + state_offsets, v, mask=tile_mask)
        else:
            buf = dw
            if HAS_MOMENTUM and not FIRST_STEP:
                buf = tl.load(state0_ptr + state_offsets, mask=tile_mask, other=0.0)
            p, buf = sgdw_math(p, dw, buf, lr, weight_decay, hyper0, hyper1,
                               DECOUPLED, HAS_MOMENTUM, FIRST_STEP, NESTEROV)
            if HAS_MOMENTUM:
                tl.store(state0_ptr + state_offsets, buf, mask=tile_mask)
        tl.store(w_tile, round_for_store(p, w_ptr.dtype.element_ty, INTERPRET), mask=tile_mask)
    if WANT_DB:
        if pid_d == 0:
            tl.store(db_ptr + split.to(tl.int64) * stride_db_split + cols,
                     round_for_store(db, db_ptr.dtype.element_ty, INTERPRET), mask=cols < K)


@triton.jit(do_not_specialize=["N", "K", "cols_per_split"])
def _backward_dh_kernel(
    h_ptr, w_ptr, b_ptr, class_ptr, terms_ptr,
    dh_ptr,
    N, K, D, R,
    stride_hn, stride_hd, stride_wk, stride_wd, stride_b,
    stride_dh_split, stride_dhn, stride_dhd,
    cols_per_split,
    HAS_BIAS: tl.constexpr, EXACT_SHIFT: tl.constexpr, RESIDENT: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_DS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr,
    EVEN_K: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program owns dh[rows, dcols]."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dcols = pid_d * BLOCK_DS + tl.arange(0, BLOCK_DS)
    shift, log_sum, p_coef, t_uniform, g_target, target = _row_terms(terms_ptr, class_ptr, rows, R, EXACT_SHIFT)
    if RESIDENT:
        h_rows = _load_tile(h_ptr, rows, dcols, stride_hn, stride_hd, N, D, True, not EVEN_DS, INTERPRET)

    dh = tl.zeros((BLOCK_N, BLOCK_DS), tl.float32)
    k_start = split * cols_per_split
    k_end = tl.minimum(K, k_start + cols_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w_slice = _load_tile(w_ptr, cols, dcols, stride_wk, stride_wd, K, D, True, not EVEN_DS, INTERPRET)
        if RESIDENT:
            z = tl.dot(h_rows, tl.trans(w_slice), input_precision=PRECISION)
        else:
            z = _logits(h_ptr, w_ptr, rows, cols, N, K, D, stride_hn, stride_hd, stride_wk, stride_wd,
                        EVEN_D, BLOCK_D, INTERPRET, PRECISION)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols.to(tl.int64) * stride_b, mask=cols < K, other=0.0).to(tl.float32)[None, :]
        g = _logit_grad(z, shift[:, None], log_sum[:, None], p_coef[:, None], t_uniform[:, None], g_target[:, None],
                        cols[None, :] == target[:, None], EXACT_SHIFT)
        if not EVEN_K:
            g = tl.where((cols < K)[None, :], g, 0.0)
        dh = tl.dot(g.to(w_slice.dtype), w_slice, dh, input_precision=PRECISION)

    out = dh_ptr + split.to(tl.int64) * stride_dh_split \
        + rows.to(tl.int64)[:, None] * stride_dhn + dcols.to(tl.int64)[None, :] * stride_dhd
    tl.store(out, round_for_store(dh, dh_ptr.dtype.element_ty, INTERPRET),
             mask=(rows < N)[:, None] & (dcols < D)[None, :])


@triton.jit(do_not_specialize=["N", "K", "k_start", "k_end"])
def _logit_grad_kernel(
    h_ptr, w_ptr, b_ptr, class_ptr, terms_ptr,
    g_ptr, db_ptr,
    N, K, D, R, k_start, k_end,
    stride_hn, stride_hd, stride_wk, stride_wd, stride_b, stride_gn, stride_db,
    HAS_BIAS: tl.constexpr, WANT_DB: tl.constexpr, EXACT_SHIFT: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    """For the "gemm" backward: g[rows, cols - k_start] for the classes [k_start, k_end), stored in
    h's dtype (what the tensor cores of the dW and dh GEMMs take).  A GEMM with the softmax
    gradient as its epilogue: one program per (rows, cols) tile, looping over D.  With WANT_DB it
    also stores the fp32 column sums of its tile (row block pid_n), summed afterwards into dbias:
    from g before rounding, which in fp16 would flush the ~1/(N K) entries of a mean to zero."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = k_start + pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    z = _logits(h_ptr, w_ptr, rows, cols, N, K, D, stride_hn, stride_hd, stride_wk, stride_wd,
                EVEN_D, BLOCK_D, INTERPRET, PRECISION)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols.to(tl.int64) * stride_b, mask=cols < K, other=0.0).to(tl.float32)[None, :]
    shift, log_sum, p_coef, t_uniform, g_target, target = _row_terms(terms_ptr, class_ptr, rows, R, EXACT_SHIFT)
    g = _logit_grad(z, shift[:, None], log_sum[:, None], p_coef[:, None], t_uniform[:, None], g_target[:, None],
                    cols[None, :] == target[:, None], EXACT_SHIFT)
    out = g_ptr + rows.to(tl.int64)[:, None] * stride_gn + (cols - k_start).to(tl.int64)[None, :]
    tl.store(out, round_for_store(g, g_ptr.dtype.element_ty, INTERPRET),
             mask=(rows < N)[:, None] & (cols < k_end)[None, :])
    if WANT_DB:  # rows past N are zeroed: see the note above _row_terms
        g = tl.where((rows < N)[:, None], g, 0.0)
        tl.store(db_ptr + pid_n.to(tl.int64) * stride_db + (cols - k_start), tl.sum(g, axis=0), mask=cols < k_end)


# --------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class TileConfig:
    """Tiles of one kernel.  ``block_owner`` is the block of the axis the program owns (rows for the
    forward and dh kernels, classes for dW), ``block_loop`` the block of the axis it loops over.
    ``block_d`` is the D chunk of the logits dot; ``block_ds`` the slice of D one backward program
    accumulates.  An operand covering all of D (forward: ``block_d >= D``; backward:
    ``block_ds >= D``) is "resident": loaded once per program, or reused for the logits; otherwise
    the logits loop over D, once per D slice.  ``splits`` divides the loop axis across programs
    (None: enough programs to fill the GPU)."""

    block_owner: int
    block_loop: int
    block_d: int
    block_ds: int
    num_warps: int = 4
    num_stages: int = 2
    splits: int | None = None

    def __post_init__(self):
        # tl.arange takes powers of two, tl.dot at least 16; _row_data pads rows to the largest block, a
        # multiple of every other one only because all are powers of two
        for name in ("block_owner", "block_loop", "block_d", "block_ds"):
            value = getattr(self, name)
            if not _positive_int(value) or value < 16 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {value!r}")
        if not _positive_int(self.num_warps) or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"TileConfig.num_warps must be a power of two, got {self.num_warps!r}")
        if not _positive_int(self.num_stages):
            raise ValueError(f"TileConfig.num_stages must be an integer >= 1, got {self.num_stages!r}")
        if self.splits is not None and not _positive_int(self.splits):
            raise ValueError(f"TileConfig.splits must be None or an integer >= 1, got {self.splits!r}")


@dataclass(frozen=True)
class LCEConfig:
    """Tiles of each kernel, and the backward's strategy.

    ``backward="recompute"`` (default): the dW and dh kernels, each recomputing the logits (five
    GEMMs' worth of tensor work per step, nothing N x K in memory).  ``backward="gemm"``: for one
    block of ``grad_chunk`` classes at a time, ``_logit_grad_kernel`` (tile ``backward_grad``)
    writes g (N x grad_chunk, in h's dtype) and cuBLAS computes dW[block] = g^T h and dh += g W[block]
    (fp32): four GEMMs' worth, the last two at cuBLAS's rate, for N x grad_chunk elements of memory.
    ``grad_chunk=None`` sizes the block to GRAD_CHUNK_BYTES.

    fp32 inputs: the backward forms z - max with the forward's max (see _logit_grad), so its logits must
    reproduce the forward's bit for bit.  On a GPU a dot accumulates over D in the same order however D is
    chunked; under the interpreter (numpy matmuls, whose summation order depends on the width) every kernel's
    dot must take D in chunks of one width: the forward's block_d, and each backward kernel's block_ds where it
    covers D (a resident operand), else its block_d.  default_config's CPU tiles do; with other widths fp32
    gradients at |z| ~ 1e3 lose eager's accuracy there, even when every kernel holds all of D."""

    forward: TileConfig
    backward_dw: TileConfig
    backward_dh: TileConfig
    backward: str = "recompute"
    backward_grad: TileConfig = TileConfig(128, 128, 64, 64, num_warps=8, num_stages=3)
    grad_chunk: int | None = None

    def __post_init__(self):
        for name in ("forward", "backward_dw", "backward_dh", "backward_grad"):
            if not isinstance(getattr(self, name), TileConfig):
                raise TypeError(f"LCEConfig.{name} must be a TileConfig, got {getattr(self, name)!r}")
        if self.backward not in ("recompute", "gemm"):
            raise ValueError(f"backward must be 'recompute' or 'gemm', got {self.backward!r}")
        if self.grad_chunk is not None and not _positive_int(self.grad_chunk):
            raise ValueError(f"grad_chunk must be None or a positive number of classes, got {self.grad_chunk!r}")


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(x), 1)))


def default_config(n: int, d: int, k: int, dtype: torch.dtype, device: torch.device) -> LCEConfig:
    """Tiles for a problem; only d, dtype and device decide them today (n and k are there for a rule
    that would).  Under the interpreter every (program x loop step) costs ~5 ms, so the tiles are as
    large as numpy handles comfortably.  On GPU they are the per-kernel winners of ``fastcyclic bench
    ce --tune`` on an H200 (bench/results/2026-11-28-h200/run3), chosen by the bytes of one row of h
    (fp32 with TF32 at D = 128 takes the tiles of bf16 at D = 256, and so on).
    Exact fp32 ("ieee": CUDA-core FMA dots) has tiles of its own, chosen by compiling for sm_90."""
    for name, value, low in (("n", n, 0), ("d", d, 0), ("k", k, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"default_config: {name} must be an integer >= {low}, got {value!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"default_config: dtype must be float32, float16 or bfloat16, got {dtype!r}")
    device = torch.device(device)
    dp = _pow2(d)
    if device.type != "cuda":
        bd = min(dp, 128)
        ds = dp if d <= 128 else 128
        return LCEConfig(TileConfig(64, 256, bd, bd), TileConfig(128, 64, bd, ds), TileConfig(64, 256, bd, ds),
                         backward_grad=TileConfig(64, 256, bd, bd))
    element_bytes = torch.tensor([], dtype=dtype).element_size()
    # the "gemm" backward's g kernel (not yet timed on a GPU): a 128 x 128 GEMM tile for 16-bit inputs;
    # fp32 operands take half the D step, to stay within shared memory at 3 stages
    grad_tile = TileConfig(128, 128, 64, 64, num_warps=8, num_stages=3) if element_bytes == 2 else \
        TileConfig(128, 64, 32, 32, num_warps=8, num_stages=3)
    if _precision(dtype) == "ieee":
        # An FMA dot holds its operands in registers: with a resident D >= 64 or 64-row blocks the
        # compiled kernels spilled 1-10 KiB per thread (python -m fastcyclic.bench.sm90); these tiles,
        # D in 32-wide steps and 32-class dW / 32-row dh blocks over 128-wide slices of D, spill
        # nothing from D = 32 to 1024.  Not yet timed on a GPU.
        backward = TileConfig(32, 64, 32, 128, num_warps=8, num_stages=2)
        return LCEConfig(forward=TileConfig(128, 64, 32, 32, num_warps=8, num_stages=2), backward_dw=backward,
                         backward_dh=backward, backward_grad=grad_tile)
    row_bytes = dp * element_bytes
    if row_bytes <= 512:  # all of D resident in every kernel (measured at D = 128 and 256, bf16)
        return LCEConfig(
            forward=TileConfig(128, 64, dp, dp, num_warps=8, num_stages=3),
            backward_dw=TileConfig(64, 128, dp, dp, num_warps=4, num_stages=2),
            backward_dh=TileConfig(128, 32, dp, dp, num_warps=8, num_stages=3) if row_bytes > 256 else
            TileConfig(64, 128, dp, dp, num_warps=4, num_stages=2),
            backward_grad=grad_tile,
        )
    # wider rows: the forward loops over D in 64-wide chunks; each backward program accumulates up
    # to 1 KiB of a row (D = 512 in bf16: one logits recompute; measured at D = 512, bf16).  The
    # fp32 forward keeps the smaller tile checked on the GPU (the bf16 one needs 2x the shared memory).
    forward = TileConfig(128, 128, 64, 64, num_warps=8, num_stages=3) if element_bytes == 2 else \
        TileConfig(64, 128, 64, 64, num_warps=4, num_stages=3)
    slice_width = min(dp, 1024 // element_bytes)
    return LCEConfig(
        forward=forward,
        backward_dw=TileConfig(64, 64, 64, slice_width, num_warps=8, num_stages=2),
        backward_dh=TileConfig(64, 64, 64, slice_width, num_warps=8, num_stages=2),
        backward_grad=grad_tile,
    )


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# fp32 partial results of a split loop (merged by PyTorch ops on the device) may take at most this much memory
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


def tf32_allowed() -> bool:
    """Whether PyTorch lets float32 matmuls use TF32: ``torch.backends.cuda.matmul.fp32_precision`` (set per matmul
    or through ``torch.backends.fp32_precision``), else the legacy ``allow_tf32`` flag.  Reading the legacy flag
    raises once the newer settings chose TF32, so it is read only when they say nothing."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    return precision == "tf32" if precision != "none" else bool(matmul.allow_tf32)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow PyTorch's own matmul setting, so the kernel is as exact as eager fp32
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def _common(h, d, tc, resident_width):
    return dict(INTERPRET=INTERPRETER, PRECISION=_precision(h.dtype), EVEN_D=d % tc.block_d == 0,
                RESIDENT=d <= resident_width, num_warps=tc.num_warps, num_stages=tc.num_stages)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _on_device_of_h(launcher):
    """Run a launcher with h's CUDA device current (see kernels.optim.on_device)."""
    @functools.wraps(launcher)
    def launch(h, *args, **kwargs):
        problem = INTERPRETER and interpreter_problem(triton.__version__, np.__version__)
        if problem:
            raise RuntimeError(problem)
        with on_device(h):
            return launcher(h, *args, **kwargs)
    return launch


@_on_device_of_h
def forward(h, w, bias, target, *, want_logit_sum=False, want_argmax=False, config=None):
    """Per row: (max logit M, rest, target logit z_y, sum of logits or None, argmax or None) as fp32
    / int64 vectors of length N, where rest = sum of exp(z - M) over all classes but the target."""
    n, d = h.shape
    k = w.shape[0]
    config = config or default_config(n, d, k, h.dtype, h.device)
    tc = config.forward
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
            EVEN_K=k % tc.block_loop == 0,
            BLOCK_N=tc.block_owner, BLOCK_K=tc.block_loop, BLOCK_D=tc.block_d,
            **_common(h, d, tc, tc.block_d),
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
    """Merge per-split (max, rest) pairs of shape (S, N) into one (max, rest) per row."""
    top = split_max.max(dim=0).values
    shift = torch.where(top == float("-inf"), 0.0, top)  # a split (or row) of only -inf logits adds 0
    return top, (split_rest * torch.exp(split_max - shift)).sum(dim=0)


@dataclass
class ClassifierUpdate:
    """An optimizer step the dW kernel applies to w in its epilogue instead of writing dW
    (``fastcyclic.optim.fused_update`` builds it).  lr, weight_decay and step are fp32 device
    scalars (step already counts this step); state0/state1 are contiguous fp32 (K, D) tensors:
    exp_avg/exp_avg_sq for "adamw", the momentum buffer (or None) for "sgdw".  hyper is
    (beta1, beta2, eps) or (momentum, dampening)."""

    kind: str
    lr: torch.Tensor
    weight_decay: torch.Tensor
    step: torch.Tensor | None
    state0: torch.Tensor | None
    state1: torch.Tensor | None
    hyper: tuple[float, ...]
    decoupled: bool
    first_step: bool = False
    nesterov: bool = False

    def kernel_args(self):
        placeholder = self.lr
        pointers = (self.lr, self.weight_decay, self.step if self.step is not None else placeholder,
                    self.state0 if self.state0 is not None else placeholder,
                    self.state1 if self.state1 is not None else placeholder)
        flags = dict(UPDATE=1 if self.kind == "adamw" else 2, DECOUPLED=self.decoupled,
                     HAS_MOMENTUM=self.kind == "sgdw" and self.state0 is not None, FIRST_STEP=self.first_step,
                     NESTEROV=self.nesterov)
        hyper = adam_constants(*self.hyper) if self.kind == "adamw" else tuple(self.hyper) + (0.0,) * 4
        return pointers + tuple(float(x) for x in hyper), flags


_NO_UPDATE = dict(UPDATE=0, DECOUPLED=False, HAS_MOMENTUM=False, FIRST_STEP=False, NESTEROV=False)

# shared memory one fused-update dW program may use by the estimate below: the H100/H200 limit is 227 KiB
# per block; compiled kernels took up to ~18 KiB more than the estimate (bench/sm90.py), and the rest of the
# 51 KiB margin is room for another triton version's staging
FUSED_SHARED_BUDGET = 176 << 10


def fused_update_tile(tc: TileConfig, d: int, dtype: torch.dtype, *, on_gpu: bool = True) -> TileConfig:
    """The dW tile for the fused update: one program per class block over all of D and one split, so
    it alone reads and rewrites its w rows.  Its (BLOCK_K, D) w rows and (BLOCK_N, D) h slices sit in
    shared memory, about (BLOCK_K + BLOCK_N) * D * element bytes, and with TF32 (fp32 tensor-core dots,
    which take no transposed operand) a second, transposed copy of the h slice: (BLOCK_K + 2 BLOCK_N) *
    D * 4 (compiled for sm_90 without a GPU: exact fp32, D = 1024 takes 129 KiB at 16 + 16 rows; TF32,
    D = 512 takes 290 KiB at 16 + 64 rows, 161 KiB at 16 + 32), so wide rows get short blocks.  The
    interpreter (on_gpu=False) has no shared memory, so there every D fits."""
    dp = _pow2(d)
    element_bytes = torch.tensor([], dtype=dtype).element_size()
    h_copies = 2 if dtype == torch.float32 and _precision(dtype) == "tf32" else 1
    # the epilogue holds dW, w, m and v tiles at once: 8 warps and at most 4096 / D class rows keep the
    # register spills of the AdamW epilogue small (sm_90, fp32: 6.5 KiB per thread at D = 128 x 64
    # rows, 0.6 KiB at D = 256 x 32; bench/sm90.py prints them)
    block_k = min(tc.block_owner, max(16, 4096 // dp))
    # exact fp32 (CUDA-core dots) at D > 256: with 64 h rows per step the N loop itself spills registers
    # (sm_90: 158-541 local loads/stores per iteration at D = 300-512), with 32 rows none at D = 288-512 a
    # multiple of 16, but 95 at D = 300 (16 rows: 9; kept at 32 until a GPU can time the two)
    block_n = min(tc.block_loop, 32 if dtype == torch.float32 and h_copies == 1 and dp >= 512 else 64)

    def shared_bytes(block_n):
        return (block_k + h_copies * block_n) * dp * element_bytes

    budget = FUSED_SHARED_BUDGET if on_gpu else float("inf")
    while block_n > 16 and shared_bytes(block_n) > budget:
        block_n //= 2
    if shared_bytes(block_n) > budget:
        raise ValueError(f"the fused optimizer update does not fit D={d} in {dtype}{' with TF32' * (h_copies > 1)} "
                         "(at most D=1024 in float32, 512 in float32 with TF32, 2048 in bfloat16/float16); use "
                         "the ordinary backward and optimizer.step()")
    return dataclasses.replace(tc, block_owner=block_k, block_loop=block_n, block_ds=dp, splits=1, num_warps=8)


def exact_shift(dtype: torch.dtype) -> bool:
    """Whether the backward forms z - lse as (z - max) - log_sum (fp32 inputs; see _logit_grad)."""
    return dtype == torch.float32


def _row_data(target, lse_parts, p_coef, t_uniform, g_target, k: int, config: LCEConfig, exact: bool):
    """The backward kernels' per-row data (see _row_terms): int32 classes (R,) and fp32 terms (5, R), R = N
    rounded up to the largest row block any backward kernel takes; the padding rows give g = 0 for finite logits
    (the kernels mask them where N is ragged: see the note above _row_terms)."""
    n = target.shape[0]
    block = max(config.backward_dw.block_loop, config.backward_dh.block_owner, config.backward_grad.block_owner)
    r = triton.cdiv(max(n, 1), block) * block
    classes = torch.full((r,), -1, dtype=torch.int32, device=target.device)
    classes[:n] = torch.where((target >= 0) & (target < k), target, -1)
    terms = torch.zeros(5, r, dtype=torch.float32, device=target.device)
    terms[0, n:] = float("inf")
    row_max, log_sum = lse_parts
    terms[0, :n] = row_max if exact else row_max + log_sum
    if exact:  # else row 1 stays 0, unread
        terms[1, :n] = log_sum
    for row, term in enumerate((p_coef, t_uniform, g_target), start=2):
        terms[row, :n] = term
    return classes, terms


@_on_device_of_h
def backward(h, w, bias, target, lse_parts, p_coef, t_coef, g_target, label_smoothing, *, config=None,
             need_dh=True, need_dw=True, need_db=True, update: ClassifierUpdate | None = None):
    """Gradients (dh, dw, dbias) for the logit gradient described in the module docstring.
    lse_parts is (2, N): each row's max logit and log_sum = lse - max, unrounded (lse = their sum);
    p_coef, t_coef and g_target (g in the target column) are fp32 (N,) vectors; gradients not
    asked for are returned as None (dbias also when need_db is False).  With ``update``, w is
    updated in place and dw is None; dh is computed first, from the old w."""
    n, d = h.shape
    k = w.shape[0]
    config = config or default_config(n, d, k, h.dtype, h.device)
    exact = exact_shift(h.dtype)
    # without smoothing the uniform term is 0 even where t_coef is infinite (an inf upstream gradient)
    t_uniform = t_coef * (label_smoothing / k) if label_smoothing else torch.zeros_like(t_coef)
    classes, terms = _row_data(target, lse_parts, p_coef, t_uniform, g_target, k, config, exact)
    if config.backward == "gemm" and update is None:
        return _backward_gemm(h, w, bias, classes, terms, config, need_dh, need_dw, need_db)
    b = bias if bias is not None else h
    args = (h, w, b, classes, terms)
    rows_and_strides = (n, k, d, terms.shape[1],
                        h.stride(0), h.stride(1), w.stride(0), w.stride(1), b.stride(0) if bias is not None else 0)
    dh = dw = db = None

    if need_dh:
        tc = config.backward_dh
        n_blocks, d_blocks = triton.cdiv(n, tc.block_owner), triton.cdiv(d, tc.block_ds)
        splits, cols_per_split = _split(n_blocks * d_blocks, k, tc.block_loop, tc.splits, h.device,
                                        partial_bytes=4 * n * d)
        dh_out = torch.empty(n, d, dtype=h.dtype, device=h.device) if splits == 1 else \
            torch.empty(splits, n, d, dtype=torch.float32, device=h.device)
        dh3 = dh_out if splits > 1 else dh_out.unsqueeze(0)
        if n > 0:
            _backward_dh_kernel[(n_blocks, d_blocks, splits)](
                *args, dh3,
                *rows_and_strides,
                dh3.stride(0), dh3.stride(1), dh3.stride(2),
                cols_per_split,
                HAS_BIAS=bias is not None, EXACT_SHIFT=exact, EVEN_DS=d % tc.block_ds == 0,
                EVEN_K=k % tc.block_loop == 0,
                BLOCK_N=tc.block_owner, BLOCK_K=tc.block_loop, BLOCK_D=tc.block_d, BLOCK_DS=tc.block_ds,
                **_common(h, d, tc, tc.block_ds),
            )
        dh = dh_out if splits == 1 else dh_out.sum(dim=0).to(h.dtype)

    need_db = bias is not None and need_db
    store_dw = need_dw and update is None
    form_dw = store_dw or update is not None  # dW to store, or to step on
    if form_dw or need_db:
        tc = config.backward_dw
        if update is not None:
            # the interpreter has no shared memory; a launch captured for a GPU compile (bench/sm90.py, CPU
            # tensors with the interpreter off) keeps the GPU's budget
            tc = fused_update_tile(tc, d, h.dtype, on_gpu=h.is_cuda or not INTERPRETER)
        # dbias alone (a frozen weight): one program per class block, whose logits cover all of D anyway
        k_blocks, d_blocks = triton.cdiv(k, tc.block_owner), (triton.cdiv(d, tc.block_ds) if form_dw else 1)
        # split over rows only when the class blocks alone cannot fill the GPU; partials are fp32
        splits, rows_per_split = _split(k_blocks * d_blocks, n, tc.block_loop, tc.splits, h.device,
                                        partial_bytes=4 * k * ((d if form_dw else 0) + 1))
        if not store_dw:
            dw3 = torch.empty(1, 0, 0, dtype=w.dtype, device=w.device)
        else:
            dw3 = torch.empty(1, k, d, dtype=w.dtype, device=w.device) if splits == 1 else \
                torch.empty(splits, k, d, dtype=torch.float32, device=w.device)
        db_out = None
        if need_db:
            db_out = torch.empty(k, dtype=bias.dtype, device=w.device) if splits == 1 else \
                torch.empty(splits, k, dtype=torch.float32, device=w.device)
        update_pointers, update_flags = update.kernel_args() if update is not None else \
            ((terms,) * 5 + (0.0,) * 6, _NO_UPDATE)
        if n > 0 or update is not None:  # (with no rows the update still applies weight decay)
            _backward_dw_kernel[(k_blocks, d_blocks, splits)](
                *args, dw3, db_out if db_out is not None else dw3,
                *update_pointers,
                *rows_and_strides,
                dw3.stride(0), dw3.stride(1), dw3.stride(2),
                db_out.stride(0) if (db_out is not None and splits > 1) else 0,
                rows_per_split,
                HAS_BIAS=bias is not None, WANT_DW=form_dw, WANT_DB=need_db, EXACT_SHIFT=exact,
                EVEN_DS=d % tc.block_ds == 0, EVEN_N=n % tc.block_loop == 0,
                BLOCK_K=tc.block_owner, BLOCK_N=tc.block_loop, BLOCK_D=tc.block_d, BLOCK_DS=tc.block_ds,
                **_common(h, d, tc, tc.block_ds), **update_flags,
            )
        else:
            dw3.zero_()
            if db_out is not None:
                db_out.zero_()
        if store_dw:
            dw = dw3[0] if splits == 1 else dw3.sum(dim=0).to(w.dtype)
        if need_db:
            db = db_out if splits == 1 else db_out.sum(dim=0).to(bias.dtype)

    return dh, (dw if need_dw else None), db


# the "gemm" backward's block of g (N x grad_chunk elements) takes at most about this much memory
GRAD_CHUNK_BYTES = 32 << 20
# CUDA launches allow at most this many programs on a grid's second and third axes
MAX_GRID_Y = 65535


def grad_chunk(config: LCEConfig, n: int, k: int, dtype: torch.dtype) -> int:
    """Classes per block of the "gemm" backward: config.grad_chunk, or as many as GRAD_CHUNK_BYTES
    holds; a multiple of the g kernel's class tile, at least one tile, at most K rounded up, and at
    most MAX_GRID_Y tiles (the class tiles are the launch grid's second axis)."""
    block = config.backward_grad.block_loop
    element_bytes = torch.tensor([], dtype=dtype).element_size()
    chunk = config.grad_chunk or GRAD_CHUNK_BYTES // max(1, n * element_bytes)
    return max(block, min(triton.cdiv(k, block) * block, chunk // block * block, MAX_GRID_Y * block))


def _mm_fp32(a, b):
    """a @ b with an fp32 result (fp32 accumulation) for fp32/fp16/bf16 operands."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)  # cuBLAS, fp32 accumulation and output (torch >= 2.8)
    return a.float() @ b.float()  # CPU (the interpreter's tests): upcast first


def _backward_gemm(h, w, bias, classes, terms, config, need_dh, need_dw, need_db):
    """The "gemm" backward (see LCEConfig): per block of classes, g from _logit_grad_kernel, then
    dW[block] = g^T h, complete (rounded once, like eager's), and dh += g W[block] in fp32, cast once
    at the end.  g is rounded to h's dtype for the products, exactly as the recompute kernels round it
    before their tensor-core dots; dbias is summed from the fp32 g, as the dW kernel does."""
    n, d = h.shape
    k = w.shape[0]
    need_db = bias is not None and need_db
    dh_acc = torch.zeros(n, d, dtype=torch.float32, device=h.device) if need_dh else None
    dw = torch.empty(k, d, dtype=w.dtype, device=w.device) if need_dw else None
    db = torch.empty(k, dtype=bias.dtype, device=w.device) if need_db else None
    if n == 0:
        for grad in (dw, db):
            if grad is not None:
                grad.zero_()
        return (dh_acc.to(h.dtype) if need_dh else None), dw, db
    tc = config.backward_grad
    chunk = grad_chunk(config, n, k, h.dtype)
    row_blocks = triton.cdiv(n, tc.block_owner)
    g = torch.empty(n, min(chunk, k), dtype=h.dtype, device=h.device)
    # dbias per row block, fp32 (row_blocks x chunk); summed in a fixed order, so deterministic
    db_rows = torch.empty(row_blocks, g.shape[1], dtype=torch.float32, device=h.device) if need_db else g
    b = bias if bias is not None else h
    for k0 in range(0, k, chunk):
        k1 = min(k, k0 + chunk)
        g_block = g[:, :k1 - k0]
        _logit_grad_kernel[(row_blocks, triton.cdiv(k1 - k0, tc.block_loop))](
            h, w, b, classes, terms, g_block, db_rows,
            n, k, d, terms.shape[1], k0, k1,
            h.stride(0), h.stride(1), w.stride(0), w.stride(1), b.stride(0) if bias is not None else 0,
            g_block.stride(0), db_rows.stride(0),
            HAS_BIAS=bias is not None, WANT_DB=need_db, EXACT_SHIFT=exact_shift(h.dtype), EVEN_D=d % tc.block_d == 0,
            BLOCK_N=tc.block_owner, BLOCK_K=tc.block_loop, BLOCK_D=tc.block_d,
            INTERPRET=INTERPRETER, PRECISION=_precision(h.dtype), num_warps=tc.num_warps, num_stages=tc.num_stages,
        )
        if need_dw:
            dw[k0:k1] = _mm_fp32(g_block.t(), h)
        if need_db:
            db[k0:k1] = db_rows[:, :k1 - k0].sum(dim=0).to(bias.dtype)
        if need_dh:
            dh_acc += _mm_fp32(g_block, w[k0:k1])
    return (dh_acc.to(h.dtype) if need_dh else None), dw, db


def with_splits(config: LCEConfig, splits: int | None) -> LCEConfig:
    """The same tiles with a fixed number of splits in every kernel (tests use it to reach the
    partial-merge paths on CPU, where the default is one split unless a kernel has a single owner block:
    then _split asks for two)."""
    return dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), splits=splits)
                                          for name in ("forward", "backward_dw", "backward_dh")})


__all__ = ["ClassifierUpdate", "fused_update_tile", "grad_chunk", "LCEConfig", "TileConfig", "default_config",
           "forward", "backward", "merge_splits", "with_splits", "INTERPRETER"]
