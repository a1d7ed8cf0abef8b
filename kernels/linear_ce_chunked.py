"""The same fused linear + cross-entropy in plain PyTorch, for CPUs (and float64).

Same interface as ``kernels.linear_ce.forward`` / ``backward``.  The logits are computed one
(row chunk x class chunk) block at a time with an online max / sum-exp, so memory is
O(chunk_rows * chunk_classes) and never N x K.  The backward recomputes each block.  Arithmetic is
fp32 for fp32/fp16/bf16 inputs (float64 for float64 inputs); dW accumulates in that precision and is
cast once at the end.
"""
from __future__ import annotations

import math

import torch

# ~4M logits per block (16 MiB in fp32): large enough for efficient GEMMs, small next to N x K
BLOCK_ELEMENTS = 1 << 22
CHUNK_ROWS = 1024


def _chunks(n: int, k: int, chunk_rows: int | None, chunk_classes: int | None) -> tuple[int, int]:
    rows = max(1, min(n, chunk_rows or CHUNK_ROWS))
    classes = max(1, min(k, chunk_classes or BLOCK_ELEMENTS // rows))
    return rows, classes


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits_block(h_rows, w, bias, k0, k1):
    z = h_rows @ w[k0:k1].to(h_rows.dtype).T
    if bias is not None:
        z += bias[k0:k1].to(z.dtype)
    return z


def forward(h, w, bias, target, *, want_logit_sum=False, want_argmax=False,
            chunk_rows=None, chunk_classes=None):
    """Per row: (max logit M, rest, target logit z_y, logit sum or None, argmax or None), where rest
    is the sum of exp(z - M) over all classes but the target; see kernels.linear_ce._forward_kernel
    for why the target is kept out."""
    n, _ = h.shape
    k = w.shape[0]
    acc = _compute_dtype(h.dtype)
    rows, classes = _chunks(n, k, chunk_rows, chunk_classes)
    row_max = torch.empty(n, dtype=acc, device=h.device)
    row_rest = torch.empty(n, dtype=acc, device=h.device)
    target_logit = torch.zeros(n, dtype=acc, device=h.device)
    logit_sum = torch.zeros(n, dtype=acc, device=h.device) if want_logit_sum else None
    argmax = torch.zeros(n, dtype=torch.int64, device=h.device) if want_argmax else None
    exp_floor, masked = _exp_floor(acc), _masked_classes(bias)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h_rows = h[r0:r1].to(acc)
        y = target[r0:r1]
        running_max = torch.full((r1 - r0,), float("-inf"), dtype=acc, device=h.device)
        rest = torch.zeros(r1 - r0, dtype=acc, device=h.device)
        for k0 in range(0, k, classes):
            k1 = min(k, k0 + classes)
            z = _logits_block(h_rows, w, bias, k0, k1)
            in_block = (y >= k0) & (y < k1)
            local_target = torch.where(in_block, y - k0, 0)[:, None]
            target_logit[r0:r1] += torch.where(in_block, z.gather(1, local_target).squeeze(1), 0)
            if want_logit_sum:
                logit_sum[r0:r1] += z.sum(dim=1)
            tile_max, tile_arg = z.max(dim=1)
            if want_argmax:
                argmax[r0:r1] = torch.where(tile_max > running_max, tile_arg + k0, argmax[r0:r1])
            # same merge as the Triton kernel (the target left out of the sum); z is overwritten
            new_max = torch.maximum(running_max, tile_max)
            # all -inf so far (classes masked by a -inf bias): shift by 0, as -inf - -inf is NaN
            shift = torch.where(new_max == float("-inf"), 0.0, new_max)
            e = _exp_clamped(z.sub_(shift[:, None]), exp_floor, masked, k0, k1)
            e.scatter_(1, local_target, torch.where(in_block[:, None], 0.0, e.gather(1, local_target)))
            rest = rest * torch.exp(running_max - shift) + e.sum(dim=1)
            running_max = new_max
        row_max[r0:r1] = running_max
        row_rest[r0:r1] = rest
    return row_max, row_rest, target_logit, logit_sum, argmax


# exp(x) for x below log(smallest normal float) (-87.3 in float32) is not a normal float.  Torch's CPU exp
# takes a path 15-50x slower there (at the boundary itself too: 12.5 ms against 0.2 ms for 365k values),
# and the denormals it returns slow every matmul they enter (unless flush-denormal is on): the arguments
# are clamped one above it, so such a term counts as e times the smallest normal (3.2e-38 in float32)
# instead of less (a trained model's confident rows: 4-8x faster forward + backward; +13 % on random
# logits, for the clamp's pass).  Classes masked by a -inf bias stay exactly 0.
def _exp_floor(dtype: torch.dtype) -> float:
    """The least argument exp gets: one above log(smallest normal float)."""
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _masked_classes(bias):
    """The classes a -inf bias masks (a bool vector; no host sync to ask whether there are any), or None."""
    return None if bias is None else torch.isneginf(bias)


def _exp_clamped(x, cut, masked, k0: int, k1: int):
    """exp(max(x, cut)) in place (cut: a number, or a column broadcast over x's rows), 0 in the masked classes
    among k0..k1."""
    x.clamp_(min=cut).exp_()
    return x if masked is None else x.masked_fill_(masked[k0:k1], 0.0)


def backward(h, w, bias, target, lse_parts, p_coef, t_coef, g_target, label_smoothing, *,
             need_dh=True, need_dw=True, need_db=True, chunk_rows=None, chunk_classes=None):
    """As kernels.linear_ce.backward, and like it, float32 inputs form z - lse as (z - max) - log_sum."""
    n, d = h.shape
    k = w.shape[0]
    acc = _compute_dtype(h.dtype)
    exact = h.dtype == torch.float32  # the rule of kernels.linear_ce.exact_shift
    rows, classes = _chunks(n, k, chunk_rows, chunk_classes)
    uniform = label_smoothing / k
    exp_floor, masked = _exp_floor(acc), _masked_classes(bias)
    dh = torch.zeros(n, d, dtype=acc, device=h.device) if need_dh else None
    dw = torch.zeros(k, d, dtype=acc, device=h.device) if need_dw else None
    db = torch.zeros(k, dtype=acc, device=h.device) if bias is not None and need_db else None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h_rows = h[r0:r1].to(acc)
        y = target[r0:r1]
        row_max, log_sum = (part[r0:r1].to(acc)[:, None] for part in lse_parts)
        shift = row_max if exact else row_max + log_sum
        p_rows = p_coef[r0:r1].to(acc)[:, None]
        t_rows = t_coef[r0:r1].to(acc)
        g_target_rows = g_target[r0:r1].to(acc)
        # p_coef * exp(cut) >= the smallest normal float (cut >= exp_floor; p_coef 0 gives g = 0)
        cut_rows = (exp_floor - p_rows.abs().clamp_min(1e-30).log()).clamp_min(exp_floor)
        for k0 in range(0, k, classes):
            k1 = min(k, k0 + classes)
            # g = p_coef * softmax - t_coef * ((1 - eps) * onehot + eps / K), built in place
            g = _logits_block(h_rows, w, bias, k0, k1)
            g.sub_(shift)
            if exact:
                g.sub_(log_sum)
            g = _exp_clamped(g, cut_rows, masked, k0, k1).mul_(p_rows)
            if uniform:
                g.sub_((t_rows * uniform)[:, None])
            in_block = ((y >= k0) & (y < k1)).nonzero().squeeze(1)
            g[in_block, y[in_block] - k0] = g_target_rows[in_block]
            if need_dh:
                dh[r0:r1] += g @ w[k0:k1].to(acc)
            if need_dw:
                dw[k0:k1] += g.T @ h_rows
            if db is not None:
                db[k0:k1] += g.sum(dim=0)
    return (
        dh.to(h.dtype) if need_dh else None,
        dw.to(w.dtype) if need_dw else None,
        db.to(bias.dtype) if db is not None else None,
    )
