"""Fused linear + cross-entropy: ``loss = CE(h @ weight.T + bias, target)`` without the logits.

Public entry points: :func:`linear_cross_entropy`, :func:`linear_cross_entropy_stats` and the
:class:`LinearCrossEntropy` module.  Both backends ("triton": ``fastcyclic.kernels.linear_ce``;
"torch": ``fastcyclic.kernels.linear_ce_chunked``) compute per-row LSE and target logit; this module
turns them into losses, reductions and gradients.  The two halves are registered as
``torch.library`` custom ops so ``torch.compile`` treats them as single nodes.

Per row n (non-ignored), with eps = label_smoothing and z = h @ weight.T + bias:
    loss_n = lse_n - (1 - eps) * z[n, y_n] - eps * mean_k z[n, k] + z_loss * lse_n**2
which is ``F.cross_entropy(z, y, label_smoothing=eps)`` plus PaLM's z-loss.
"""
from __future__ import annotations

import contextlib
import numbers
import operator
from typing import Optional

import torch
from torch import Tensor, nn

from fastcyclic.kernels import BACKENDS, TRITON_INSTALLED, auto_backend, require_triton
from fastcyclic.kernels import linear_ce_chunked as torch_impl
from fastcyclic.optim import FusedUpdate

if TRITON_INSTALLED:  # Linux; elsewhere only the torch backend runs
    from fastcyclic.kernels import linear_ce as triton_impl
else:
    triton_impl = None

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels take (float64: torch backend)

REDUCTIONS = ("mean", "sum", "none")

# Overrides for tests and benchmarks: a kernels.linear_ce.LCEConfig for "triton", chunk sizes for
# "torch".  Set through ``tuning()``; never needed for normal use.
_tuning: dict = {}


@contextlib.contextmanager
def tuning(*, config: Optional[triton_impl.LCEConfig] = None, chunk_rows: Optional[int] = None,
           chunk_classes: Optional[int] = None):
    """Temporarily force the Triton tile configuration or the torch backend's chunk sizes, for the kernels
    launched inside the block (call the backward there too)."""
    saved = dict(_tuning)
    _tuning.update(config=config, chunk_rows=chunk_rows, chunk_classes=chunk_classes)
    try:
        yield
    finally:
        _tuning.clear()
        _tuning.update(saved)


def _backend_kwargs(backend: str) -> dict:
    if backend == "triton":
        return {"config": _tuning.get("config")}
    return {"chunk_rows": _tuning.get("chunk_rows"), "chunk_classes": _tuning.get("chunk_classes")}


def _impl(backend: str):
    return triton_impl if backend == "triton" else torch_impl


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Input checks: all before anything is launched
# --------------------------------------------------------------------------------------------


def _check_options(reduction, label_smoothing, z_loss, backend, deterministic, validate) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not 0.0 <= float(z_loss) < float("inf"):
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, value in (("deterministic", deterministic), ("validate", validate)):
        if not isinstance(value, bool):  # validate=None would silently switch the target check off
            raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_ignore_index(ignore_index) -> int:
    # isinstance first: torch.compile passes an int argument as a SymInt, and cannot trace hasattr on one
    if isinstance(ignore_index, bool) or not (isinstance(ignore_index, int) or hasattr(ignore_index, "__index__")):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    index = operator.index(ignore_index)
    if not -2 ** 63 <= index < 2 ** 63:  # it is compared with int64 targets
        raise ValueError(f"ignore_index must fit in int64, got {index}")
    return index


def _check_inputs(h, weight, target, bias, reduction, label_smoothing, z_loss, backend, deterministic,
                  validate) -> str:
    """Shape, dtype, device and option checks (no device sync).  Returns the concrete backend."""
    for name, t in (("h", h), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("h", h), ("weight", weight), ("target", target), ("bias", bias)):
        if isinstance(t, Tensor) and t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if h.dim() != 2:
        raise ValueError(f"h must be 2-D (N, D), got shape {tuple(h.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (K, D), got shape {tuple(weight.shape)}")
    if target.dim() != 1 or target.shape[0] != h.shape[0]:
        raise ValueError(f"target must be 1-D of length N={h.shape[0]}, got shape {tuple(target.shape)}")
    if h.shape[1] != weight.shape[1]:
        raise ValueError(f"D mismatch: h has D={h.shape[1]} but weight has D={weight.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight has K=0 classes; cross-entropy needs at least one class")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be 1-D of length K={weight.shape[0]}, got shape {tuple(bias.shape)}")
    if not h.dtype.is_floating_point or h.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"h must be float32, float16, bfloat16 or float64, got {h.dtype}")
    if weight.dtype != h.dtype:
        raise TypeError(f"dtype mismatch: h is {h.dtype} but weight is {weight.dtype}")
    if bias is not None and bias.dtype != h.dtype:
        raise TypeError(f"dtype mismatch: h is {h.dtype} but bias is {bias.dtype}")
    if target.dtype not in (torch.int64, torch.int32, torch.uint8):  # (F.cross_entropy takes uint8 too)
        raise TypeError(f"target must hold class indices (int64, int32 or uint8), got {target.dtype}")
    if not torch.compiler.is_compiling() and any(
            torch.autograd.forward_ad.unpack_dual(t).tangent is not None
            for t in (h, weight) + ((bias,) if bias is not None else ())):
        # a torch.library custom op without a jvp formula would silently drop the tangent (a zero jvp)
        raise NotImplementedError("linear_cross_entropy has no forward-mode AD (jvp) formula; "
                                  "use reverse mode (backward, torch.autograd.grad)")
    if not torch.compiler.is_compiling() and any(
            _grad_tracked_by_torch_func(t) for t in (h, weight) + ((bias,) if bias is not None else ())):
        # torch's own message speaks of an autograd.Function's setup_context, which no user wrote
        raise NotImplementedError("linear_cross_entropy does not run under torch.func's grad, vjp, jacrev or "
                                  "hessian; use torch.autograd (backward(), torch.autograd.grad)")
    devices = {t.device for t in (h, weight, target) + ((bias,) if bias is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    _check_options(reduction, label_smoothing, z_loss, backend, deterministic, validate)
    if backend == "auto":
        backend = auto_backend(h.device) if h.dtype != torch.float64 else "torch"
    if backend == "triton":
        require_triton()
        if not (h.is_cuda or triton_impl.INTERPRETER):
            raise ValueError(f"backend='triton' needs CUDA tensors (got {h.device}), or TRITON_INTERPRET=1 "
                             "set before fastcyclic is imported to run the kernels on CPU")
        if h.dtype not in FLOAT_DTYPES:
            raise TypeError(f"backend='triton' supports float32, float16 and bfloat16, got {h.dtype}; "
                            "use backend='torch' for float64")
        if h.shape[1] == 0:  # no features: every logit is the bias (or 0), as torch computes it; no kernel tile fits
            backend = "torch"
    return backend


def _check_targets(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Every target in [0, K) or equal to ignore_index.  Costs one device sync."""
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"target[{row}] = {int(target[row])} is outside [0, {num_classes}) and is not "
                         f"ignore_index={ignore_index}")


# --------------------------------------------------------------------------------------------
# The custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcyclic::linear_ce", mutates_args=())
def _linear_ce(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
               label_smoothing: float, z_loss: float, backend: str, want_argmax: bool,
               validate: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, argmax, saved); argmax is empty unless asked for; saved, for the backward, is
    (3, N): nll = lse - z_y, the row max and log_sum = lse - max (lse is the sum of the last two, which
    the backward needs unrounded: see kernels.linear_ce._logit_grad)."""
    num_classes = weight.shape[0]
    if validate:
        _check_targets(target, num_classes, ignore_index)
    # autocast must not reach the chunked backend's matmuls: the forward would take bf16 logits while
    # the backward (usually run outside the autocast region) recomputes them in fp32
    with torch.autocast(h.device.type, enabled=False):
        row_max, rest, target_logit, logit_sum, argmax = _impl(backend).forward(
            h, weight, bias, target, want_logit_sum=label_smoothing > 0, want_argmax=want_argmax,
            **_backend_kwargs(backend))
    # rest sums exp(z - max) over all classes but the target: -log p_y = (max - z_y) + log1p(rest +
    # expm1(z_y - max)) keeps the ~1e-7 loss of a confident row accurate (there z_y == max exactly,
    # while lse - z_y would cancel to ulp(lse) ~ 2e-6)
    has_target = (target >= 0) & (target < num_classes)
    # a row whose logits are all -inf (every class masked): exp(shift) = 0, so lse = -inf as in logsumexp, not NaN
    shift = torch.where(has_target & (row_max > float("-inf")), target_logit - row_max, float("-inf"))
    nll = (row_max - target_logit) + torch.log1p(rest + torch.expm1(shift))
    log_sum = torch.log(rest + torch.exp(shift))
    lse = row_max + log_sum
    # a +inf logit: lse is +inf, as in torch.logsumexp (exp(z - max) took inf - inf = NaN; the loss stays NaN, as
    # F.cross_entropy's does)
    lse = torch.where(row_max == float("inf"), row_max, lse)
    loss = nll
    if label_smoothing > 0:  # (1 - eps) nll + eps (lse - mean z): a masked (-inf) target gives inf, as in F.ce
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - logit_sum / num_classes)
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    loss = torch.where(target != ignore_index, loss, 0.0)
    dtype = _result_dtype(h.dtype)
    argmax = argmax if want_argmax else torch.empty(0, dtype=torch.int64, device=h.device)
    return loss.to(dtype), lse.to(dtype), argmax, torch.stack([nll, row_max, log_sum]).to(dtype)


@_linear_ce.register_fake
def _(h, weight, bias, target, ignore_index, label_smoothing, z_loss, backend, want_argmax, validate):
    n = h.shape[0]
    dtype = _result_dtype(h.dtype)
    return (h.new_empty(n, dtype=dtype), h.new_empty(n, dtype=dtype),
            h.new_empty(n if want_argmax else 0, dtype=torch.int64), h.new_empty(3, n, dtype=dtype))


@torch.library.custom_op("fastcyclic::linear_ce_backward", mutates_args=())
def _linear_ce_backward(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, lse_parts: Tensor,
                        p_coef: Tensor, t_coef: Tensor, g_target: Tensor, label_smoothing: float,
                        backend: str, need_dh: bool, need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dh, dweight, dbias); a gradient not asked for (or a missing bias) is an empty tensor.  lse_parts: the
    row max and log_sum of the forward's saved tensor."""
    with torch.autocast(h.device.type, enabled=False):
        dh, dw, db = _impl(backend).backward(
            h, weight, bias, target, lse_parts.contiguous(), p_coef.contiguous(), t_coef.contiguous(),
            g_target.contiguous(), label_smoothing, need_dh=need_dh, need_dw=need_dw, need_db=need_db,
            **_backend_kwargs(backend))
    # a fresh empty tensor for each missing gradient: a custom op's outputs may not alias each other
    return (dh if dh is not None else h.new_empty(0), dw if dw is not None else h.new_empty(0),
            db if db is not None else h.new_empty(0))


@_linear_ce_backward.register_fake
def _(h, weight, bias, target, lse_parts, p_coef, t_coef, g_target, label_smoothing, backend, need_dh, need_dw,
      need_db):
    return (h.new_empty(h.shape if need_dh else (0,)), weight.new_empty(weight.shape if need_dw else (0,)),
            bias.new_empty(bias.shape) if bias is not None and need_db else h.new_empty(0))


def _setup_context(ctx, inputs, output):
    h, weight, bias, target, ignore_index, label_smoothing, z_loss, backend, _, _ = inputs
    ctx.save_for_backward(h, weight, bias, target, output[3])
    ctx.options = (ignore_index, label_smoothing, z_loss, backend)


def _logit_grad_terms(grad_loss, grad_lse, target, saved, ignore_index, label_smoothing, z_loss, num_classes):
    """Per-row (p_coef, t_coef, g_target) of g = dL/dz = p_coef * softmax(z) - t_coef * ((1-eps) onehot + eps/K),
    with g_target its value in the target column; saved is the forward's (nll, row max, log_sum)."""
    nll, lse = saved[0], saved[1] + saved[2]  # the lse the forward returned
    # d loss_n / d z = t_coef_n * (softmax(z) * (1 + 2 z_loss lse_n) - (1-eps) onehot - eps/K)
    # and d lse_n / d z = softmax(z): both fold into g = p_coef * softmax - t_coef * (...)
    valid = target != ignore_index
    t_coef = torch.where(valid, grad_loss, 0.0) if grad_loss is not None else torch.zeros_like(lse)
    p_coef = t_coef * (1.0 + 2.0 * z_loss * lse) if z_loss > 0 else t_coef
    if grad_lse is not None:
        p_coef = p_coef + grad_lse
    # g in the target column, p_coef * p_y - t_coef * (1 - eps + eps/K), written without the
    # cancellation of p_y - 1 for confident rows: p_y - 1 = expm1(-nll), with nll accurate
    keep_target = 1.0 - label_smoothing + label_smoothing / num_classes
    g_target = p_coef * torch.expm1(-nll) + (p_coef - t_coef * keep_target)
    return p_coef.to(lse.dtype), t_coef.to(lse.dtype), g_target.to(lse.dtype)


def _backward(ctx, grad_loss, grad_lse, _grad_argmax, _grad_saved):
    h, weight, bias, target, saved = ctx.saved_tensors
    ignore_index, label_smoothing, z_loss, backend = ctx.options
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    if not (need_dh or need_dw or need_db):
        return (None,) * 10
    p_coef, t_coef, g_target = _logit_grad_terms(grad_loss, grad_lse, target, saved, ignore_index,
                                                 label_smoothing, z_loss, weight.shape[0])
    # (a frozen weight and bias: no dW kernel at all, which dbias alone would launch)
    dh, dw, db = _linear_ce_backward(h, weight, bias, target, saved[1:], p_coef, t_coef, g_target, label_smoothing,
                                     backend, need_dh, need_dw, need_db)
    return (dh if need_dh else None, dw if need_dw else None, db if need_db else None) + (None,) * 7


torch.library.register_autograd("fastcyclic::linear_ce", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("linear_cross_entropy has no second derivative (double backward, create_graph=True "
                              "through its gradients): its backward is a fused kernel without a formula of its own")


# without this, torch's own message: "no autograd formula was registered" for fastcyclic.linear_ce_backward
torch.library.register_autograd("fastcyclic::linear_ce_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


class _FusedUpdateLinearCE(torch.autograd.Function):
    """The per-row loss whose backward hands the classifier's step to a ``fastcyclic.optim.FusedUpdate``:
    it returns dh (and no dW); the weight's gradient hook then runs the dW kernel with the optimizer
    update in its epilogue, once autograd has shown that no other use of the weight sent a gradient."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, ignore_index, label_smoothing, z_loss, backend, validate, handle):
        loss, _, _, saved = _linear_ce(h, weight, bias, target, ignore_index, label_smoothing, z_loss, backend,
                                       False, validate)
        # weight is not saved, its version is checked by hand: torch 2.5-2.9 (not 2.10) never call a leaf's gradient
        # hook, which runs the update, when saved-tensor hooks (checkpoint, save_on_cpu) packed that leaf
        ctx.save_for_backward(h, bias, target, saved)
        ctx.weight_version = weight._version
        ctx.options = (ignore_index, label_smoothing, z_loss, backend, handle)
        ctx.bias_param = bias  # a leaf (checked by the caller): the tensor whose .grad the hook sets
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _fused_update_backward(ctx, grad_loss)


def _fused_update_backward(ctx, grad_loss):
    ignore_index, label_smoothing, z_loss, backend, handle = ctx.options
    handle.check_backward()
    h, bias, target, saved = ctx.saved_tensors
    # the parameters themselves, not the unpacked saved tensors: saved-tensor hooks (checkpoint, save_on_cpu,
    # offloading) hand back another tensor object, or a copy, and the update, the optimizer's state (keyed by
    # the parameter) and bias.grad must land on the parameters (the unpacking above checks bias's version)
    weight, bias = handle.weight, ctx.bias_param
    if weight._version != ctx.weight_version:  # what torch's check of a saved weight would say
        raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an "
                           f"inplace operation: the classifier weight {tuple(weight.shape)} is at version "
                           f"{weight._version}; the fused cross-entropy's forward used version "
                           f"{ctx.weight_version}")
    p_coef, t_coef, g_target = _logit_grad_terms(grad_loss, None, target, saved, ignore_index,
                                                 label_smoothing, z_loss, weight.shape[0])
    lse_parts = saved[1:]
    need_dh = ctx.needs_input_grad[0]
    try:  # False: this backward does not reach weight (backward(inputs=...), autograd.grad w.r.t. h)
        reaches_weight = torch._C._will_engine_execute_node(torch.autograd.graph.get_gradient_edge(weight).node)
    except RuntimeError:  # torch: "... we are currently running autograd.grad()", with weight among its inputs
        raise RuntimeError("torch.autograd.grad w.r.t. the classifier weight of a fused_update loss: its gradient "
                           "is never formed (the update is fused into .backward()); call the loss without "
                           "fused_update for this") from None
    if not reaches_weight:  # the ordinary gradients of h and bias; no update (weight gets no gradient)
        dh, _, db = _linear_ce_backward(h, weight, bias, target, lse_parts, p_coef, t_coef, g_target,
                                        label_smoothing, backend, need_dh, False, ctx.needs_input_grad[2])
        return (dh if need_dh else None, None, db if ctx.needs_input_grad[2] else None) + (None,) * 7
    if backend == "triton":  # dh now, from the weight as it is; dW and the update in the hook
        dh, _, _ = triton_impl.backward(h, weight, bias, target, lse_parts, p_coef, t_coef, g_target,
                                        label_smoothing, need_dh=need_dh, need_dw=False, need_db=False,
                                        **_backend_kwargs(backend))
        torch_grads = None
    else:  # the chunked backend makes dh, dW and dbias in one pass; the hook steps on dW
        with torch.autocast(h.device.type, enabled=False):  # as in _linear_ce_backward
            dh, dw, db = torch_impl.backward(h, weight, bias, target, lse_parts, p_coef, t_coef, g_target,
                                             label_smoothing, need_dh=need_dh, need_dw=True,
                                             **_backend_kwargs(backend))
        torch_grads = (dw, db)
    handle.defer(dict(h=h, weight=weight, bias=bias, target=target, lse_parts=lse_parts, p_coef=p_coef,
                      t_coef=t_coef, g_target=g_target, label_smoothing=label_smoothing, backend=backend,
                      torch_grads=torch_grads, config=_backend_kwargs("triton")["config"]))
    return (dh if need_dh else None,) + (None,) * 9


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


# torch 2.11's dynamo cannot trace torch.amp.is_autocast_available (a graph break, an error under fullgraph=True):
# the common device types are asked once, here, and a compiled call on them never reaches it
_AUTOCAST_DEVICE_TYPES = frozenset(t for t in ("cpu", "cuda") if torch.amp.is_autocast_available(t))


def _autocast_enabled(h) -> bool:
    """Whether torch.autocast is on for h's device (never for a device autocast does not know, e.g. "meta")."""
    if not isinstance(h, Tensor):
        return False
    device_type = h.device.type
    available = device_type in _AUTOCAST_DEVICE_TYPES or torch.amp.is_autocast_available(device_type)
    return available and torch.is_autocast_enabled(device_type)


def _autocast(h, weight, bias):
    """Under torch.autocast, the operands of the matmul in the autocast dtype, as F.linear takes them (float64
    stays float64, as autocast leaves it); the logits still accumulate, and the loss is computed, in fp32."""
    if not _autocast_enabled(h):
        return h, weight, bias
    dtype = torch.get_autocast_dtype(h.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, Tensor) and t.dtype in FLOAT_DTYPES else t
    return cast(h), cast(weight), cast(bias)


def _grad_tracked_by_torch_func(t: Tensor) -> bool:
    """Whether t is wrapped by a torch.func reverse-mode transform (grad, vjp, jacrev), at any level (vmap nested
    inside one wraps it again).  (Private torch functions: where they are missing, torch raises its own error a
    step later.)"""
    functorch = getattr(torch._C, "_functorch", None)
    needed = ("is_functorch_wrapped_tensor", "is_gradtrackingtensor", "get_unwrapped")
    if functorch is None or not all(hasattr(functorch, name) for name in needed):
        return False
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_gradtrackingtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _prepare(h, weight, target, bias, reduction, ignore_index, label_smoothing, z_loss, backend, deterministic,
             validate):
    backend = _check_inputs(h, weight, target, bias, reduction, label_smoothing, z_loss, backend, deterministic,
                            validate)
    return backend, target.long(), _check_ignore_index(ignore_index)


def _fused_forward(h, weight, bias, target, options, validate, handle):
    handle.check_forward(weight)
    return _FusedUpdateLinearCE.apply(h, weight, bias, target, *options, validate, handle)


def keep_fused_update_out_of_compile() -> None:
    """Make torch.compile run the fused update eagerly, a graph break (``fullgraph=True`` refuses it, saying why).
    The update reads and bumps the weight's version counter and steps the optimizer from a hook: traced by dynamo,
    weight._version is an unbacked symbol, and the version check misfired in a compiled training step's second
    backward ("at version 2 ... used version 2"), or fullgraph=True failed on a data-dependent guard.  Called by
    fused_update(), which every fused loss needs: torch.compiler.disable imports dynamo (~1.5 s), which a plain
    ``import fastcyclic`` should not pay."""
    global _fused_forward, _fused_update_backward
    if getattr(_fused_forward, "_fastcyclic_eager", False):
        return
    reason = ("fastcyclic's fused_update runs outside torch.compile (a graph break); call the loss without "
              "fused_update for fullgraph=True")
    _fused_forward = torch.compiler.disable(_fused_forward, reason=reason)
    _fused_update_backward = torch.compiler.disable(_fused_update_backward, reason=reason)
    _fused_forward._fastcyclic_eager = True


def linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                         reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                         z_loss: float = 0.0, backend: str = "auto", deterministic: bool = False,
                         validate: bool = True, fused_update=None) -> Tensor:
    """Cross-entropy of ``h @ weight.T + bias`` against ``target`` without materialising the logits.

    Args:
        h: (N, D) features; float32, float16, bfloat16 (float64 with backend="torch").
        weight: (K, D) classifier, same dtype as h.  target: (N,) int64 (or int32, uint8) class indices.
        bias: optional (K,) bias, same dtype.
        reduction: "mean" (over non-ignored rows; NaN when there are none, like PyTorch), "sum", "none".
        ignore_index: rows with this target contribute neither loss nor gradient.
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.
        z_loss: adds z_loss * lse**2 per non-ignored row (PaLM).
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked PyTorch), or
            "auto" (triton on CUDA, torch otherwise, and when triton is not installed).
        deterministic: bitwise-reproducible results.  Both backends always are (every output tile
            has one owner, no atomics); the flag is accepted so callers can state the requirement.
        validate: check that targets are in [0, K) or ignore_index (one device sync).  Turn it off
            in loops that generate their own labels or run under CUDA graphs; an out-of-range target
            then contributes lse (its target logit is taken as 0) and never reads out of bounds.
        fused_update: a ``fastcyclic.optim.fused_update(optimizer, weight)`` handle: backward then
            applies the optimizer's step to ``weight`` tile by tile instead of producing its
            gradient (``optimizer.step()`` still updates everything else).  Without grad mode, or
            when weight does not require grad, it is ignored.

    Under ``torch.autocast``, h, weight and bias are cast to the autocast dtype first, as ``F.linear`` would
    cast them (a bf16 h from an autocast layer meets an fp32 weight); gradients flow back through the cast.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or (N,) for reduction="none".
    """
    fusing = (fused_update is not None and torch.is_grad_enabled() and isinstance(weight, Tensor)
              and weight.requires_grad)  # otherwise the handle is ignored (see fused_update above)
    if fusing and _autocast_enabled(h):
        raise ValueError("fused_update cannot run under torch.autocast: it updates the weight itself, not the "
                         "autocast copy the logits would use; call the loss outside the autocast region")
    h, weight, bias = _autocast(h, weight, bias)
    backend, target, ignore_index = _prepare(h, weight, target, bias, reduction, ignore_index, label_smoothing,
                                             z_loss, backend, deterministic, validate)
    options = (int(ignore_index), float(label_smoothing), float(z_loss), backend)
    if fused_update is not None and not isinstance(fused_update, FusedUpdate):
        raise TypeError(f"fused_update must be a handle from fastcyclic.optim.fused_update(optimizer, weight), "
                        f"got {type(fused_update).__name__}")
    if fusing:
        if bias is not None and bias.requires_grad and not bias.is_leaf:
            raise ValueError(f"fused_update needs the bias as the parameter itself (a leaf tensor), got one computed "
                             f"by {type(bias.grad_fn).__name__}: the fused backward writes bias.grad directly, so "
                             "its gradient would not reach the parameter. Pass the parameter, or do not use "
                             "fused_update")
        loss_rows = _fused_forward(h, weight, bias, target, options, validate, fused_update)
    else:
        loss_rows, _, _, _ = _linear_ce(h, weight, bias, target, *options, False, validate)
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / (target != ignore_index).sum()


def linear_cross_entropy_stats(h: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                               ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                               backend: str = "auto", deterministic: bool = False,
                               validate: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss, lse, argmax)`` in one pass, still without logits.

    ``loss`` is ``linear_cross_entropy(..., reduction="none")``; ``lse`` is the log-sum-exp of
    every row's logits (ignored rows too); ``argmax`` is the predicted class (first maximum), so
    accuracy is ``(argmax == target).float().mean()``.  ``loss`` and ``lse`` are differentiable.  (A row whose
    logits hold NaN has NaN loss and lse; its argmax is then unspecified, where torch.argmax gives the NaN.)"""
    h, weight, bias = _autocast(h, weight, bias)
    backend, target, ignore_index = _prepare(h, weight, target, bias, "none", ignore_index, label_smoothing,
                                             z_loss, backend, deterministic, validate)
    loss_rows, lse, argmax, _ = _linear_ce(h, weight, bias, target, int(ignore_index), float(label_smoothing),
                                           float(z_loss), backend, True, validate)
    return loss_rows, lse, argmax


class LinearCrossEntropy(nn.Module):
    """``nn.Module`` form of :func:`linear_cross_entropy`, holding its options (like
    ``nn.CrossEntropyLoss``).  Call it as ``module(h, weight, target, bias=None)``."""

    OPTIONS = ("reduction", "ignore_index", "label_smoothing", "z_loss", "backend", "deterministic", "validate")

    def __init__(self, *, reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, backend: str = "auto", deterministic: bool = False,
                 validate: bool = True):
        super().__init__()
        _check_options(reduction, label_smoothing, z_loss, backend, deterministic, validate)
        _check_ignore_index(ignore_index)
        # plain attributes, as nn.CrossEntropyLoss has them: ``module.reduction = "none"`` takes effect (a bad
        # value is refused at the next call)
        self.reduction, self.ignore_index, self.label_smoothing = reduction, ignore_index, label_smoothing
        self.z_loss, self.backend, self.deterministic, self.validate = z_loss, backend, deterministic, validate

    @property
    def options(self) -> dict:
        """The keyword arguments each call passes to :func:`linear_cross_entropy`."""
        return {name: getattr(self, name) for name in self.OPTIONS}

    def forward(self, h: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(h, weight, target, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
