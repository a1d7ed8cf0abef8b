"""Eager PyTorch references: what every fused implementation is checked against.

``reference_loss`` materialises the N x K logits; use it only at test and benchmark sizes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_loss(h, w, target, bias=None, *, reduction="mean", ignore_index=-100,
                   label_smoothing=0.0, z_loss=0.0, dtype=torch.float64):
    """The loss computed by eager PyTorch with logits in ``dtype`` (float64: the exact reference).
    Returns (loss, lse) with lse of every row (ignored rows too)."""
    logits = h.to(dtype) @ w.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return loss_from_logits(logits, target, reduction=reduction, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, z_loss=z_loss)


def eager_loss(h, w, target, bias=None, *, reduction="mean", ignore_index=-100,
               label_smoothing=0.0, z_loss=0.0):
    """What a user writes without a fused kernel: the matmul in the input dtype, then a float
    upcast of the logits (``F.cross_entropy(h @ W.T)``).  The yardstick for the tolerance rule."""
    logits = h @ w.T
    if bias is not None:
        logits = logits + bias
    return loss_from_logits(logits.float(), target, reduction=reduction, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, z_loss=z_loss)


def loss_from_logits(logits, target, *, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0):
    """The loss (and every row's lse) from materialised logits, in their dtype."""
    rows = F.cross_entropy(logits, target, reduction="none", ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(logits, dim=1)
    valid = target != ignore_index
    if z_loss:
        rows = rows + z_loss * torch.where(valid, lse * lse, 0)
    if reduction == "none":
        return rows, lse
    if reduction == "sum":
        return rows.sum(), lse
    return rows.sum() / valid.sum(), lse
