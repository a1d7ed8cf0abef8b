"""Weight-decay optimizer updates in Triton: AdamW / Adam+L2 and SGDW / SGD+L2.

One launch updates many tensors.  A table on the device holds, per tensor, the addresses of the
parameter, its gradient, its state (fp32 whatever the parameter's dtype) and its step counter, and
a second table maps every program to (tensor, first element): programs never straddle tensors, so
the update is one elementwise pass, memory-bound (AdamW moves 28 bytes per fp32 parameter).

lr and weight decay are read from device scalars and the step count from device tensors, so a step
can be replayed by a CUDA graph with new values and no host sync.  The per-element math lives in
``adamw_math`` and ``sgdw_math``, shared with the classifier update fused into the cross-entropy
backward (``kernels.linear_ce``).  Eager references: ``fastcyclic.optim`` (backend "torch").

Under ``TRITON_INTERPRET=1`` a float32 -> bfloat16 store truncates; the interpreter path rounds to
nearest-even by hand first, so CPU tests see the GPU's rounding.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
# elements per program: a large block makes the interpreter fast; on the GPU 4096 fp32 elements are
# 16 per thread of 8 warps, four 16-byte loads per tensor (sixteen in flight for AdamW's p, g, m, v)
BLOCK = 1 << 16 if INTERPRETER else 4096
NUM_WARPS = 8

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUPPORTED_DTYPES = tuple(_TRITON_DTYPES)


# --------------------------------------------------------------------------------------------
# Per-element math (fp32 in, fp32 out), as torch.optim writes it
# --------------------------------------------------------------------------------------------


@triton.jit
def _one_minus_power(step, log_beta):
    """1 - beta**step = -expm1(step * ln beta), without the cancellation of 1 - exp(x) in fp32 (at
    beta2 = 0.999, step 1 that loses 5 digits): Taylor series for |x| < 1/2, else 1 - exp(x)."""
    x = step * log_beta
    series = x * (1.0 + x / 2 * (1.0 + x / 3 * (1.0 + x / 4 * (1.0 + x / 5 * (1.0 + x / 6 * (
        1.0 + x / 7 * (1.0 + x / 8)))))))
    return tl.where(x > -0.5, -series, 1.0 - tl.exp(x))


@triton.jit
def _with_l2(g, p, weight_decay):
    """g + wd * p, left out at wd = 0 as torch does: 0 * inf would turn an infinite parameter into NaN."""
    return tl.where(weight_decay != 0.0, g + weight_decay * p, g)


@triton.jit
def adamw_math(p, g, m, v, lr, weight_decay, step,
               beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, eps, DECOUPLED: tl.constexpr):
    """One Adam step.  DECOUPLED: p *= 1 - lr * wd before the step (torch.optim.AdamW); otherwise
    wd * p joins the gradient (torch.optim.Adam(weight_decay=wd), the L2 penalty).  1 - beta and
    ln(beta) come from the host in float64 (``adam_constants``): 1 - 0.999 in fp32 is off by 1e-5."""
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    else:
        g = _with_l2(g, p, weight_decay)
    m = m + one_minus_beta1 * (g - m)  # lerp, like torch
    v = v * beta2 + (one_minus_beta2 * g) * g  # torch's addcmul order: g * g alone overflows fp32 at |g| > 1.8e19
    bias_correction1 = _one_minus_power(step, log_beta1)
    bias_correction2_sqrt = tl.sqrt_rn(_one_minus_power(step, log_beta2))
    # correctly rounded sqrt and division, as torch's CUDA kernels: on a GPU tl.sqrt and `/` compile
    # to approximations (sqrt.approx, div.full: up to 2 ulp); the update is memory-bound either way
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - tl.math.div_rn(lr, bias_correction1) * tl.math.div_rn(m, denom)
    return p, m, v


def adam_constants(beta1: float, beta2: float, eps: float) -> tuple[float, ...]:
    """The scalar arguments of ``adamw_math`` after the step: (beta2, 1 - beta1, 1 - beta2,
    ln beta1, ln beta2, eps), computed in float64.  ln 0 is passed as -1e30 (beta**step = 0)."""
    log = lambda beta: math.log(beta) if beta > 0 else -1e30  # noqa: E731
    return (float(beta2), 1.0 - float(beta1), 1.0 - float(beta2), log(float(beta1)), log(float(beta2)), float(eps))


@triton.jit
def sgdw_math(p, g, buf, lr, weight_decay, momentum, dampening,
              DECOUPLED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr,
              NESTEROV: tl.constexpr):
    """One SGD step.  L2 (DECOUPLED=False) is torch.optim.SGD(weight_decay=wd) exactly: wd * p joins
    the gradient before the momentum buffer.  Decoupled (SGDW): the momentum buffer sees the plain
    gradient and p *= 1 - lr * wd is applied beside the step, p = p * (1 - lr*wd) - lr * d; with
    momentum 0 the two agree, as torch.optim.SGD.  The first step sets buf = g, like torch."""
    if not DECOUPLED:
        g = _with_l2(g, p, weight_decay)
    if HAS_MOMENTUM:
        if FIRST_STEP:
            buf = g
        else:
            buf = momentum * buf + (1.0 - dampening) * g
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    p = p - lr * g
    return p, buf


@triton.jit
def round_for_store(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) ready to be stored as DTYPE: under the interpreter, bfloat16 is rounded to
    nearest-even here because the interpreter's own conversion truncates."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


# --------------------------------------------------------------------------------------------
# Multi-tensor kernels.  Table rows: [param, grad, state0, state1, step] addresses (int64).
# --------------------------------------------------------------------------------------------


@triton.jit
def _locate(table_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, BLOCK: tl.constexpr):
    """This program's tensor (its table row), the element offsets it updates, their mask, and whether
    the block lies wholly inside the tensor (then no mask is needed, and loads can be 16 bytes wide)."""
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor_ptr + pid).to(tl.int64)
    start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    numel = tl.load(numel_ptr + tensor)
    return table_ptr + tensor * 5, offsets, offsets < numel, start + BLOCK <= numel


@triton.jit
def _address(row, slot, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address in slot `slot` of a table row, as a pointer to DTYPE.  ALIGNED (checked on the host:
    every address of the launch is a multiple of 16 bytes) lets the compiler use 16-byte accesses."""
    ptr = tl.load(row + slot).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load(ptr, offsets, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + offsets, mask=mask)
    else:
        x = tl.load(ptr + offsets)
    return x


@triton.jit
def _store(ptr, offsets, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offsets, x, mask=mask)
    else:
        tl.store(ptr + offsets, x)


@triton.jit
def _adamw_block(row, offsets, mask, lr, weight_decay,
                 beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, eps,
                 P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, DECOUPLED: tl.constexpr, ALIGNED: tl.constexpr,
                 MASKED: tl.constexpr, INTERPRET: tl.constexpr):
    p_ptr = _address(row, 0, P_DTYPE, ALIGNED)
    g_ptr = _address(row, 1, G_DTYPE, ALIGNED)
    m_ptr = _address(row, 2, tl.float32, ALIGNED)
    v_ptr = _address(row, 3, tl.float32, ALIGNED)
    step = tl.load(tl.load(row + 4).to(tl.pointer_type(tl.float32)))
    p = _load(p_ptr, offsets, mask, MASKED).to(tl.float32)
    g = _load(g_ptr, offsets, mask, MASKED).to(tl.float32)
    m = _load(m_ptr, offsets, mask, MASKED)
    v = _load(v_ptr, offsets, mask, MASKED)
    p, m, v = adamw_math(p, g, m, v, lr, weight_decay, step,
                         beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, eps, DECOUPLED)
    _store(p_ptr, offsets, round_for_store(p, P_DTYPE, INTERPRET), mask, MASKED)
    _store(m_ptr, offsets, m, mask, MASKED)
    _store(v_ptr, offsets, v, mask, MASKED)


@triton.jit
def _multi_tensor_adamw_kernel(
    table_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, lr_ptr, weight_decay_ptr, skip_ptr,
    beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, eps,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, DECOUPLED: tl.constexpr, HAS_SKIP: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    if HAS_SKIP:  # a non-finite gradient somewhere: the whole step is skipped
        if tl.load(skip_ptr) != 0:
            return
    row, offsets, mask, whole = _locate(table_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, BLOCK)
    lr, weight_decay = tl.load(lr_ptr), tl.load(weight_decay_ptr)
    if whole:
        _adamw_block(row, offsets, mask, lr, weight_decay, beta2, one_minus_beta1, one_minus_beta2, log_beta1,
                     log_beta2, eps, P_DTYPE, G_DTYPE, DECOUPLED, ALIGNED, False, INTERPRET)
    else:
        _adamw_block(row, offsets, mask, lr, weight_decay, beta2, one_minus_beta1, one_minus_beta2, log_beta1,
                     log_beta2, eps, P_DTYPE, G_DTYPE, DECOUPLED, ALIGNED, True, INTERPRET)


@triton.jit
def _sgdw_block(row, offsets, mask, lr, weight_decay, momentum, dampening,
                P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, DECOUPLED: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
                ALIGNED: tl.constexpr, MASKED: tl.constexpr, INTERPRET: tl.constexpr):
    p_ptr = _address(row, 0, P_DTYPE, ALIGNED)
    g_ptr = _address(row, 1, G_DTYPE, ALIGNED)
    p = _load(p_ptr, offsets, mask, MASKED).to(tl.float32)
    g = _load(g_ptr, offsets, mask, MASKED).to(tl.float32)
    buf = g
    if HAS_MOMENTUM:
        buf_ptr = _address(row, 2, tl.float32, ALIGNED)
        if not FIRST_STEP:
            buf = _load(buf_ptr, offsets, mask, MASKED)
    p, buf = sgdw_math(p, g, buf, lr, weight_decay, momentum, dampening,
                       DECOUPLED, HAS_MOMENTUM, FIRST_STEP, NESTEROV)
    _store(p_ptr, offsets, round_for_store(p, P_DTYPE, INTERPRET), mask, MASKED)
    if HAS_MOMENTUM:
        _store(buf_ptr, offsets, buf, mask, MASKED)


@triton.jit
def _multi_tensor_sgdw_kernel(
    table_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, lr_ptr, weight_decay_ptr, skip_ptr,
    momentum, dampening,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, DECOUPLED: tl.constexpr, HAS_SKIP: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    row, offsets, mask, whole = _locate(table_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, BLOCK)
    lr, weight_decay = tl.load(lr_ptr), tl.load(weight_decay_ptr)
    if whole:
        _sgdw_block(row, offsets, mask, lr, weight_decay, momentum, dampening, P_DTYPE, G_DTYPE, DECOUPLED,
                    HAS_MOMENTUM, FIRST_STEP, NESTEROV, ALIGNED, False, INTERPRET)
    else:
        _sgdw_block(row, offsets, mask, lr, weight_decay, momentum, dampening, P_DTYPE, G_DTYPE, DECOUPLED,
                    HAS_MOMENTUM, FIRST_STEP, NESTEROV, ALIGNED, True, INTERPRET)


# --------------------------------------------------------------------------------------------
# Launch plans: the tables, built once per set of tensors and reused while their addresses hold
# --------------------------------------------------------------------------------------------


class TensorTable:
    """Device tables for one launch over ``rows`` = [(param, grad, state0, state1, step), ...]
    (None where a slot is unused).  Rebuilding uploads the tables (a host-to-device copy), which is
    not allowed while a CUDA graph is being captured: capture after a warm-up step, with gradients
    that stay allocated (``zero_grad(set_to_none=False)``), so the cached tables are reused."""

    def __init__(self):
        self.key = None

    def update(self, rows: list[tuple], device: torch.device) -> None:
        key = tuple((t.data_ptr() if t is not None else 0) for row in rows for t in row) + \
            tuple(row[0].numel() for row in rows)
        if key == self.key:
            return
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "the optimizer's tensors changed address during CUDA graph capture (new gradients or "
                "state?): run one step before capturing and keep gradients allocated "
                "(zero_grad(set_to_none=False))")
        addresses = torch.tensor(key[:5 * len(rows)], dtype=torch.int64).view(len(rows), 5)
        numels = torch.tensor([row[0].numel() for row in rows], dtype=torch.int64)
        blocks = [triton.cdiv(n, BLOCK) for n in numels.tolist()]
        block_tensor = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), torch.tensor(blocks))
        first_block = torch.tensor([0] + blocks[:-1]).cumsum(0)
        block_start = (torch.arange(sum(blocks)) - first_block.repeat_interleave(torch.tensor(blocks))) * BLOCK
        self.addresses = addresses.to(device)
        self.numels = numels.to(device)
        self.block_tensor = block_tensor.to(device)
        self.block_start = block_start.to(device)
        self.num_blocks = sum(blocks)
        # 16-byte accesses need every parameter, gradient and state address 16-byte aligned (a view into a
        # larger buffer may not be)
        self.aligned = all(key[5 * i + slot] % 16 == 0 for i in range(len(rows)) for slot in range(4))
        # Addresses only, no references: a table is used right after update() with the tensors it was
        # built from, and holding them would keep gradients alive past zero_grad(set_to_none=True).  (A
        # captured CUDA graph replays these addresses; its owner keeps the tensors, as for any capture.)
        self.key = key

    def args(self):
        return self.addresses, self.numels, self.block_tensor, self.block_start


def on_device(t: torch.Tensor):
    """Where to launch kernels on t's data: Triton launches on the current CUDA device, which need not hold t (a
    model on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dtypes(rows):
    return _TRITON_DTYPES[rows[0][0].dtype], _TRITON_DTYPES[rows[0][1].dtype]


def adamw_step(table: TensorTable, rows: list[tuple], lr: torch.Tensor, weight_decay: torch.Tensor,
               beta1: float, beta2: float, eps: float, decoupled: bool, skip: torch.Tensor | None) -> None:
    """Update every (param, grad, exp_avg, exp_avg_sq, step) row in one launch.  All params share a
    dtype, all grads share a dtype; lr and weight_decay are fp32 device scalars; the steps have
    already been incremented."""
    if not rows:
        return
    table.update(rows, rows[0][0].device)
    if table.num_blocks == 0:  # only empty tensors
        return
    p_dtype, g_dtype = _dtypes(rows)
    with on_device(lr):
        _multi_tensor_adamw_kernel[(table.num_blocks,)](
            *table.args(), lr, weight_decay, skip if skip is not None else lr,
            *adam_constants(beta1, beta2, eps),
            P_DTYPE=p_dtype, G_DTYPE=g_dtype, DECOUPLED=decoupled, HAS_SKIP=skip is not None,
            ALIGNED=table.aligned, BLOCK=BLOCK, INTERPRET=INTERPRETER, num_warps=NUM_WARPS,
        )


def sgdw_step(table: TensorTable, rows: list[tuple], lr: torch.Tensor, weight_decay: torch.Tensor,
              momentum: float, dampening: float, nesterov: bool, decoupled: bool, first_step: bool,
              skip: torch.Tensor | None) -> None:
    """Update every (param, grad, momentum_buffer or None, None, None) row in one launch."""
    if not rows:
        return
    table.update(rows, rows[0][0].device)
    if table.num_blocks == 0:
        return
    p_dtype, g_dtype = _dtypes(rows)
    with on_device(lr):
        _multi_tensor_sgdw_kernel[(table.num_blocks,)](
            *table.args(), lr, weight_decay, skip if skip is not None else lr,
            float(momentum), float(dampening),
            P_DTYPE=p_dtype, G_DTYPE=g_dtype, DECOUPLED=decoupled, HAS_SKIP=skip is not None,
            HAS_MOMENTUM=momentum != 0, FIRST_STEP=first_step, NESTEROV=nesterov,
            ALIGNED=table.aligned, BLOCK=BLOCK, INTERPRET=INTERPRETER, num_warps=NUM_WARPS,
        )


__all__ = ["adam_constants", "adamw_math", "sgdw_math", "round_for_store", "TensorTable", "adamw_step", "sgdw_step",
           "on_device", "SUPPORTED_DTYPES", "BLOCK"]
