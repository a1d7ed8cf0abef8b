"""Weight-decay optimizers: :class:`AdamW` and :class:`SGDW`, each with decoupled or L2 decay.

Both follow ``torch.optim.Optimizer``'s contract (param groups, ``zero_grad``, ``state_dict`` /
``load_state_dict``, step hooks) and its state layout, so an AdamW state dict loads into
``torch.optim.AdamW`` and back.  Its groups carry torch's ``decoupled_weight_decay`` flag too, so
``torch.optim.Adam`` continues it with the same rule (``torch.optim.AdamW`` always decouples), and a
param group's flag picks the rule here.  What they add:

* ``weight_decay_mode``: "decoupled" (default; the decay acts on the parameter, not through the
  moments: torch.optim.AdamW, SGDW) or "l2" (wd * p joins the gradient, the penalty wd/2 * |p|^2 in
  the loss: torch.optim.Adam(weight_decay=wd), torch.optim.SGD(weight_decay=wd)).  The theory's
  surrogate is the explicit penalty.
* backend "triton": one launch updates every tensor of a param group of one dtype (``kernels.optim``), fp32 math
  and fp32 state for bf16/fp16 parameters; backend "torch": the same math in PyTorch ops (CPU, and
  the reference the kernels are tested against); "auto": triton for CUDA parameters (torch without triton).
* Steps are CUDA-graph capturable: the step counts live on the device and lr / weight_decay may be
  0-dim device tensors (update them in place between replays; a float is read when it changes).
* ``skip_nonfinite=True``: a step whose gradients hold NaN or Inf is skipped on the device (no host
  sync) and counted in ``nonfinite_steps`` (kept in the state dict).  The default propagates NaN/Inf
  into the parameters, as torch.optim does.  (One trace remains: SGDW's first momentum step, skipped,
  leaves a zero buffer, so the next step starts it at (1 - dampening) * g instead of g; no trace when
  dampening is 0.)
* The classifier's update can run inside the fused cross-entropy backward: :func:`fused_update`.

The decoupled SGDW rule with momentum (torch's SGD couples the decay into the gradient):
    buf = momentum * buf + (1 - dampening) * g          (buf = g on the first step)
    d   = g + momentum * buf if nesterov else buf
    p   = p * (1 - lr * wd) - lr * d
With momentum 0 this is torch.optim.SGD(weight_decay=wd) up to rounding.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
import weakref
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastcyclic.kernels import BACKENDS, TRITON_INSTALLED, auto_backend, require_triton

WEIGHT_DECAY_MODES = ("decoupled", "l2")


def _state_dtype(p: Tensor) -> torch.dtype:
    """The dtype of optimizer state and of the update's arithmetic: float64 for float64 parameters, else fp32."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _number(value) -> float:
    return float(value.detach().cpu()) if isinstance(value, Tensor) else float(value)


def _check_real(name: str, value) -> None:
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        return  # torch.optim takes tensor betas; float() reads them
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")


def _check_common(lr, weight_decay, weight_decay_mode, backend) -> None:
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (Tensor, numbers.Real)):
            raise TypeError(f"{name} must be a number or a one-element tensor, got {value!r}")
        if isinstance(value, Tensor) and value.numel() != 1:
            raise ValueError(f"a tensor {name} must hold one value, got shape {tuple(value.shape)}")
        number = _number(value)  # (one read: a CUDA tensor's syncs)
        if not number >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {number}")
        if not math.isfinite(number):
            raise ValueError(f"{name} must be finite, got {number}")
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        require_triton()  # at construction, as linear_cross_entropy does at its call, not at the first step


class _WeightDecayOptimizer(torch.optim.Optimizer):
    """What AdamW and SGDW share: group checks, device scalars, buckets, non-finite skipping and a
    state dict whose state stays fp32."""

    _STATE_KEYS: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, skip_nonfinite: bool):
        self.skip_nonfinite = bool(skip_nonfinite)
        self._scalars: dict = {}  # (group index, device) -> fp32 device tensor [lr, weight_decay]
        self._tables: dict = {}  # bucket -> kernels.optim.TensorTable
        self._nonfinite_steps: dict = {}  # device -> 0-dim count
        # id(weight) -> weakref to its FusedUpdate handle, see fused_update().  Weak: the handle holds this optimizer,
        # and a strong reference back would make a cycle that only the cyclic GC frees (every parameter and all
        # optimizer state with it: GPU memory that a sweep worker's or a notebook's next runs do not get back)
        self._fused_weights: dict = {}
        self._checked: dict = {}  # group index -> the float hyperparameters last checked (check_values)
        super().__init__(params, defaults)

    # -- param groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        with warnings.catch_warnings():  # refused below
            warnings.filterwarnings("ignore", message=".*duplicate parameters")
            super().add_param_group(param_group)
        try:
            params = self.param_groups[-1]["params"]
            if len({id(p) for p in params}) != len(params):  # torch.optim warns, and steps it twice
                raise ValueError("a parameter group holds the same parameter twice")
            for p in params:
                _check_floating(p)  # (complex ones failed at the first step)
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()  # a refused group must not stay (its params would be stepped)
            raise

    def _check_group(self, group: dict, *, scheduled: bool = False) -> None:
        _check_unsupported(group)
        _check_common(group["lr"], group["weight_decay"], group["weight_decay_mode"], group["backend"])

    def check_values(self, index: int) -> None:
        """Check group ``index`` again before an update uses it: a scheduler, or a user, may have written any
        value into it since.  Only the float values are read, and only when they changed: a tensor value (a
        device scalar, e.g. the trainer's weight decay) would sync the device, so a valid stand-in takes its
        place in the check."""
        group = self.param_groups[index]
        values = _hyper_snapshot(group)
        if self._checked.get(index) == values:
            return
        on_device = {k: _STAND_IN[k] for k in group if k != "params" and k not in values and k in _STAND_IN}
        try:
            # (the group itself when it can be: AdamW's check takes a torch-style decoupled_weight_decay flag out)
            self._check_group({**group, **on_device} if on_device else group, scheduled=True)
        except (TypeError, ValueError) as e:
            raise type(e)(f"param_groups[{index}], as the update found it: {e}") from None
        self._checked[index] = values

    def __repr__(self) -> str:  # torch's lists the groups; skip_nonfinite is the optimizer's own
        return super().__repr__()[:-1] + f"skip_nonfinite: {self.skip_nonfinite}\n)"

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "skip_nonfinite": self.skip_nonfinite,
                "nonfinite_steps": self.nonfinite_steps}  # (reading it syncs)

    def __setstate__(self, state: dict) -> None:
        # (torch's load_state_dict calls this too, without the count: that one is load_state_dict's to set)
        nonfinite_steps = state.pop("nonfinite_steps", None)
        super().__setstate__(state)
        # caches of device scalars and launch tables are rebuilt (a copy or an unpickled optimizer)
        self.__dict__.setdefault("skip_nonfinite", False)
        for name in ("_scalars", "_tables", "_nonfinite_steps", "_fused_weights", "_checked"):
            self.__dict__.setdefault(name, {})
        if nonfinite_steps is not None:
            self._set_nonfinite_steps(nonfinite_steps)
        for group in self.param_groups:
            if "weight_decay_mode" not in group:  # a torch.optim state dict: which rule did it use?
                group["weight_decay_mode"] = self._torch_weight_decay_mode(group)
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _torch_weight_decay_mode(self, group: dict) -> str:
        return self.defaults["weight_decay_mode"]

    @contextlib.contextmanager
    def _hooks_held(self, *tables: str):
        """The named hook tables emptied for the call inside, and handed to the caller to run: torch.optim runs
        them inside its state_dict and load_state_dict, before the part this class adds, which a hook must see
        (a post-hook's new state would be overwritten, a pre-hook's returned dict not read)."""
        held = {name: getattr(self, name) for name in tables}
        try:
            for name in tables:
                setattr(self, name, OrderedDict())
            yield held
        finally:
            for name, table in held.items():
                setattr(self, name, table)

    def state_dict(self) -> dict:
        """torch.optim's state dict, plus ``nonfinite_steps`` (reading it syncs) so that a resumed run
        keeps counting skipped steps; torch.optim's load_state_dict ignores the extra key."""
        with self._hooks_held("_optimizer_state_dict_post_hooks") as held:
            state_dict = self._extend_state_dict({**super().state_dict(), "nonfinite_steps": self.nonfinite_steps})
        for hook in held["_optimizer_state_dict_post_hooks"].values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _extend_state_dict(self, state_dict: dict) -> dict:
        """What a subclass adds to the state dict, before the post-hooks see it."""
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this class or of the matching torch.optim class.  torch casts state
        to the parameter's dtype; here state stays fp32 (bf16 moments lose the update), and the step
        count moves to the parameter's device (graph-capturable).  The skipped-step count is the
        dict's (0 for a torch.optim dict).  The load hooks run as on torch.optim: the pre-hooks first
        (a dict one returns is the one loaded), the post-hooks once everything is loaded and checked."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        nonfinite_steps = state_dict.get("nonfinite_steps", 0)
        if isinstance(nonfinite_steps, bool) or not isinstance(nonfinite_steps, numbers.Integral) \
                or nonfinite_steps < 0:
            raise ValueError(f"state_dict['nonfinite_steps'] must be an integer >= 0, got {nonfinite_steps!r}")
        for group in state_dict["param_groups"]:
            _check_unsupported(group)
        before = self.param_groups, self.state  # load_state_dict builds new ones: these stay as they were
        with self._hooks_held("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks") as held:
            super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        try:
            for group in self.param_groups:
                # what the constructor refuses (lr < 0, an unknown mode, ...), less what a scheduler may set
                self._check_group(group, scheduled=True)
            for position, (saved_id, p) in enumerate(zip(saved_ids, params)):
                # a moment of another shape would fail the step halfway, after earlier tensors had moved
                for key in self._STATE_KEYS:
                    saved = state_dict["state"].get(saved_id, {}).get(key)
                    if saved is not None and tuple(saved.shape) != tuple(p.shape):
                        raise ValueError(f"state_dict's {key} of parameter {position} has shape "
                                         f"{tuple(saved.shape)}, but the parameter has shape {tuple(p.shape)}")
        except Exception:
            self.param_groups, self.state = before
            raise
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            dtype = _state_dtype(p)
            for key in self._STATE_KEYS:
                if saved.get(key) is not None:
                    state[key] = saved[key].detach().to(device=p.device, dtype=dtype).clone()
            if "step" in saved:
                state["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).to(p.device).clone()
        self._tables.clear()
        self._set_nonfinite_steps(nonfinite_steps)
        for hook in held["_optimizer_load_state_dict_post_hooks"].values():
            hook(self)

    def _set_nonfinite_steps(self, count: int) -> None:
        self._nonfinite_steps.clear()
        params = [p for group in self.param_groups for p in group["params"]]
        if count and params:  # counted on one device: the property sums over devices
            self._nonfinite_steps[params[0].device] = torch.tensor(float(count), device=params[0].device)

    # -- per-step helpers -----------------------------------------------------------------------
    def _backend(self, group: dict, device: torch.device) -> str:
        backend = group["backend"]
        if backend == "auto":
            return auto_backend(device)
        if backend == "triton":
            require_triton()
            from fastcyclic.kernels import optim as kernels
            if device.type != "cuda" and not kernels.INTERPRETER:
                raise ValueError(f"backend='triton' needs CUDA parameters (got {device}), or TRITON_INTERPRET=1 "
                                 "set before fastcyclic is imported")
        return backend

    def _device_scalars(self, index: int, group: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        """lr and weight_decay as fp32 device scalars.  Tensors are copied on the device (capturable);
        floats are written only when they change, and never inside a CUDA graph capture: a write recorded
        there would put the value of the capture back at every replay (refresh_scalars writes them)."""
        entry = self._scalars.get((index, device))
        capturing = _capturing()
        if entry is None:
            if capturing:  # its first fill (and the state of a first step) would be replayed too
                raise RuntimeError(_FIRST_STEP_IN_CAPTURE)
            entry = self._scalars[(index, device)] = [torch.full((2,), float("nan"), device=device), [None, None]]
        self._write_scalars(entry, group, tensors=True, floats=not capturing)
        return entry[0][0], entry[0][1]

    @staticmethod
    def _write_scalars(entry: list, group: dict, *, tensors: bool, floats: bool = True) -> None:
        buffer, host = entry
        for slot, key in enumerate(("lr", "weight_decay")):
            value = group[key]
            if isinstance(value, Tensor):
                if tensors:
                    buffer[slot].copy_(value.reshape(()))
                    host[slot] = None  # the buffer no longer holds the last float
            elif floats and host[slot] != float(value):
                buffer[slot].fill_(float(value))
                host[slot] = float(value)

    def refresh_scalars(self) -> None:
        """Write float lr / weight_decay values changed since the last step() into the device scalars the
        kernels read.  Call it before replaying a captured CUDA graph: the replay does not run step()'s
        Python, so it would not see a new float lr (tensor values are copied inside the graph itself)."""
        for (index, _), entry in self._scalars.items():
            self._write_scalars(entry, self.param_groups[index], tensors=False)

    def _grads_with_params(self, group: dict) -> list[tuple[Tensor, Tensor]]:
        pairs = []
        for p in group["params"]:
            if p.grad is None:
                continue  # no gradient (unused, or updated inside the fused cross-entropy backward)
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                   f"(parameter of shape {tuple(p.shape)})")
            pairs.append((p, p.grad))
        return pairs

    def _skip_flags(self) -> dict:
        """device -> 0-dim fp32 1.0 if any gradient on that device holds NaN/Inf (no host sync)."""
        if not self.skip_nonfinite:
            return {}
        grads: dict = {}
        for group in self.param_groups:
            for _, g in self._grads_with_params(group):
                if g.numel():  # the inf-norm of an empty tensor is an error
                    grads.setdefault(g.device, []).append(g)
        flags = {}
        for device, gs in grads.items():
            # max |g| is NaN or Inf exactly when some element is (one foreach launch, no big temporaries)
            norms = torch.stack(torch._foreach_norm(gs, float("inf"))).float()
            flags[device] = (~norms.isfinite().all()).float()
            count = self._nonfinite_steps.setdefault(device, torch.zeros((), device=device))
            count.add_(flags[device])
        return flags

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped because of NaN/Inf gradients (``skip_nonfinite=True``); reading it syncs."""
        return int(sum(int(c.item()) for c in self._nonfinite_steps.values()))

    @staticmethod
    def _advance(steps: list[Tensor], skip: Optional[Tensor]) -> None:
        torch._foreach_add_(steps, 1.0 - skip if skip is not None else 1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for handle in self._fused_handles():
            handle._before_step()
        # every refusal (sparse or complex gradients, non-contiguous tensors for backend="triton") comes
        # from this first pass, before any parameter, moment or step count moves
        launches = []
        for index, group in enumerate(self.param_groups):
            self.check_values(index)
            buckets: dict = {}
            for p, g in self._grads_with_params(group):
                _check_floating(p)
                buckets.setdefault((p.device, p.dtype, g.dtype) + self._bucket_extra(p), []).append((p, g))
            for key, pairs in buckets.items():
                backend = self._backend(group, key[0])
                if backend == "triton" and group["backend"] == "auto" and not all(
                        p.is_contiguous() and g.is_contiguous() for p, g in pairs):
                    backend = "torch"  # e.g. channels_last weights: the kernels take contiguous tensors only
                if key[1] == torch.float64:
                    backend = "torch"
                if backend == "triton":
                    for p, g in pairs:
                        _check_contiguous(p)
                        _check_contiguous(g)
                launches.append((index, group, key, pairs, backend))
        skips = self._skip_flags()
        for index, group, key, pairs, backend in launches:
            if backend == "triton":
                for p, _ in pairs:
                    self._contiguous_state(p)
                lr, weight_decay = self._device_scalars(index, group, key[0])
            else:  # PyTorch ops take floats or tensors as they are, like torch.optim
                lr, weight_decay = _scalar(group["lr"]), _scalar(group["weight_decay"])
            self._update(index, key, group, pairs, lr, weight_decay, backend, skips.get(key[0]))
            if backend == "triton":
                # Triton's stores bump no version counter: a graph that saved a parameter before the step would
                # backpropagate through its new values silently (torch.optim's in-place ops make it an error)
                for p, _ in pairs:
                    torch.autograd.graph.increment_version(p)
        for handle in self._fused_handles():
            handle._after_step()
        return loss

    def _bucket_extra(self, p: Tensor) -> tuple:
        return ()

    def _fused_handles(self) -> list:
        """The live fused_update handles (see _fused_weights)."""
        return [h for h in (ref() for ref in self._fused_weights.values()) if h is not None]

    def _contiguous_state(self, p: Tensor) -> None:
        """The kernels index the state as they index p (contiguous).  State laid out otherwise (made by the torch
        ops while p was channels_last, or loaded so) is copied to a contiguous layout first."""
        state = self.state.get(p, {})
        for key in self._STATE_KEYS:
            if state.get(key) is not None and not state[key].is_contiguous():
                state[key] = state[key].contiguous()

    def _update(self, index, key, group, pairs, lr, weight_decay, backend, skip) -> None:
        raise NotImplementedError

    def _classifier_update(self, weight: Tensor, group: dict, lr: Tensor, weight_decay: Tensor):
        """The ``kernels.linear_ce.ClassifierUpdate`` that applies this optimizer's step to ``weight`` inside the
        Triton dW kernel (fused_update), its state made and the step counted as ``_update`` would."""
        raise NotImplementedError

    def _table(self, index: int, key: tuple):
        from fastcyclic.kernels import optim as kernels
        return self._tables.setdefault((index,) + key, kernels.TensorTable())


def _scalar(value):
    return value.reshape(()) if isinstance(value, Tensor) else value


_UNSUPPORTED = ("maximize", "amsgrad", "differentiable")


def _check_unsupported(group: dict) -> None:
    """torch.optim options these optimizers do not implement: refused, not ignored (a param group or a
    torch state dict may carry them)."""
    for key in _UNSUPPORTED:
        if group.get(key):
            raise ValueError(f"{key}=True is not supported by fastcyclic's optimizers")


def _check_floating(p: Tensor) -> None:
    if p.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"parameters must be floating point, got {p.dtype}")


# --------------------------------------------------------------------------------------------
# AdamW
# --------------------------------------------------------------------------------------------


def _mode_of_flag(decoupled_weight_decay) -> str:
    return "decoupled" if decoupled_weight_decay else "l2"


def _take_decoupled_flag(group: dict, where: str) -> None:
    """torch's decoupled_weight_decay read into weight_decay_mode (which it sets where missing) and removed;
    ValueError where the two disagree."""
    mode = _mode_of_flag(group.pop("decoupled_weight_decay"))
    if group.setdefault("weight_decay_mode", mode) != mode:
        raise ValueError(f"{where}'s decoupled_weight_decay={mode == 'decoupled'} contradicts its "
                         f"weight_decay_mode={group['weight_decay_mode']!r}")


def _compute_view(t: Tensor) -> tuple[Tensor, torch.dtype]:
    """t itself when it already has the compute dtype (updated in place), else an fp32 copy."""
    compute = _state_dtype(t)
    return (t if t.dtype == compute else t.to(compute)), compute


def _with_l2(grad: Tensor, param: Tensor, weight_decay) -> Tensor:
    """grad + wd * param, left out at wd = 0 as torch does: 0 * inf would turn an infinite parameter into NaN.
    A tensor wd is tested on the device (no host sync: the step stays capturable)."""
    if isinstance(weight_decay, Tensor):
        return torch.where(weight_decay != 0, grad + weight_decay * param, grad)
    return grad + weight_decay * param if weight_decay != 0 else grad


def adamw_reference_(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr, weight_decay,
                     beta1: float, beta2: float, eps: float, decoupled: bool, skip: Optional[Tensor] = None) -> None:
    """One Adam step in PyTorch ops, in place, written as torch.optim's single-tensor Adam (fp32 math
    for low-precision parameters); ``step`` already counts this step.  The torch backend, and the
    reference the kernels are tested against."""
    before = (p.clone(), exp_avg.clone(), exp_avg_sq.clone()) if skip is not None else None
    param, compute = _compute_view(p)
    grad = g.to(compute)
    if decoupled:
        param.mul_(1.0 - lr * weight_decay)
    else:
        grad = _with_l2(grad, param, weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    t = step.double()
    step_size = (lr / (1.0 - beta1 ** t)).to(compute)
    bias_correction2_sqrt = (1.0 - beta2 ** t).sqrt().to(compute)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.sub_(exp_avg.div(denom).mul_(step_size))
    if param is not p:
        p.copy_(param)
    if before is not None:  # a skipped step puts everything back
        keep = skip > 0
        for tensor, old in zip((p, exp_avg, exp_avg_sq), before):
            tensor.copy_(torch.where(keep, old, tensor))


class AdamW(_WeightDecayOptimizer):
    """Adam with decoupled weight decay (``weight_decay_mode="decoupled"``, = torch.optim.AdamW) or
    with the L2 penalty in the gradient (``"l2"``, = torch.optim.Adam(weight_decay=...)).

    State per parameter, as torch's: ``step`` (fp32 0-dim, on the parameter's device),
    ``exp_avg`` and ``exp_avg_sq`` (fp32 for every parameter dtype but float64, which keeps float64)."""

    _STATE_KEYS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 weight_decay_mode: str = "decoupled", backend: str = "auto", skip_nonfinite: bool = False):
        _check_common(lr, weight_decay, weight_decay_mode, backend)
        _check_betas(betas)
        _check_eps(eps)
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=float(eps), weight_decay=weight_decay,
                        weight_decay_mode=weight_decay_mode, backend=backend)
        super().__init__(params, defaults, skip_nonfinite)

    # torch.optim.Adam and AdamW name their rule with a flag, decoupled_weight_decay: a param group or a state
    # dict may carry it.  It is read as weight_decay_mode (refused where the two disagree) and not kept in
    # the groups (it would go stale when the mode changes); state_dict() writes it, so that torch keeps the rule.
    def add_param_group(self, param_group: dict) -> None:
        if "decoupled_weight_decay" in param_group:  # before the defaults fill in weight_decay_mode
            param_group = dict(param_group)
            _take_decoupled_flag(param_group, "a param group")
        super().add_param_group(param_group)

    def _check_group(self, group: dict, *, scheduled: bool = False) -> None:
        if "decoupled_weight_decay" in group:
            _take_decoupled_flag(group, "the state dict")
        super()._check_group(group)
        _check_betas(group["betas"])
        _check_eps(group["eps"])

    def _torch_weight_decay_mode(self, group: dict) -> str:
        if "decoupled_weight_decay" in group:
            return _mode_of_flag(group["decoupled_weight_decay"])
        return super()._torch_weight_decay_mode(group)

    def _extend_state_dict(self, state_dict: dict) -> dict:
        for group in state_dict["param_groups"]:  # torch.optim.AdamW's flag, for a dict loaded there
            group["decoupled_weight_decay"] = group["weight_decay_mode"] == "decoupled"
        return state_dict

    def _init_state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            _check_floating(p)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state_dtype = _state_dtype(p)
            state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
        return state

    def _update(self, index, key, group, pairs, lr, weight_decay, backend, skip) -> None:
        beta1, beta2 = group["betas"]
        decoupled = group["weight_decay_mode"] == "decoupled"
        if _capturing() and any(not self.state[p] for p, _ in pairs):  # (no gradient in the warm-up)
            raise RuntimeError(_FIRST_STEP_IN_CAPTURE)
        states = [self._init_state(p) for p, _ in pairs]
        self._advance([s["step"] for s in states], skip)
        if backend == "torch":
            for (p, g), s in zip(pairs, states):
                adamw_reference_(p, g, s["exp_avg"], s["exp_avg_sq"], s["step"], lr, weight_decay, beta1, beta2,
                                 group["eps"], decoupled, skip)
            return
        from fastcyclic.kernels import optim as kernels
        rows = [(p, g, s["exp_avg"], s["exp_avg_sq"], s["step"]) for (p, g), s in zip(pairs, states)]
        kernels.adamw_step(self._table(index, key), rows, lr, weight_decay, beta1, beta2, group["eps"],
                           decoupled, skip)

    def _classifier_update(self, weight, group, lr, weight_decay):
        from fastcyclic.kernels import linear_ce as kernels
        if _capturing() and weight not in self.state:  # zeros made in a capture: reset at every replay
            raise RuntimeError(_FIRST_STEP_IN_CAPTURE)
        state = self._init_state(weight)
        self._advance([state["step"]], None)
        return kernels.ClassifierUpdate("adamw", lr, weight_decay, state["step"], state["exp_avg"],
                                        state["exp_avg_sq"], (*group["betas"], group["eps"]),
                                        group["weight_decay_mode"] == "decoupled")


def _check_betas(betas) -> None:
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__iter__"):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    betas = tuple(betas)  # numpy arrays and 1-D tensors too, as torch.optim takes them
    if len(betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {tuple(betas)}")
    for b in betas:
        _check_real("each of betas", b)
    if not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {tuple(betas)}")


def _check_eps(eps) -> None:
    _check_real("eps", eps)
    if not 0.0 < float(eps) < math.inf:
        raise ValueError(f"eps must be finite and > 0, got {eps}")


def _check_contiguous(t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"backend='triton' updates contiguous tensors only, got one of shape {tuple(t.shape)} "
                         f"and strides {t.stride()}; use backend='torch' for it")


# --------------------------------------------------------------------------------------------
# SGDW
# --------------------------------------------------------------------------------------------


def sgdw_reference_(p: Tensor, g: Tensor, momentum_buffer: Optional[Tensor], lr, weight_decay, momentum: float,
                    dampening: float, nesterov: bool, decoupled: bool, first_step: bool,
                    skip: Optional[Tensor] = None) -> None:
    """One SGD step in PyTorch ops (the rule is in the module docstring), in place."""
    before = (p.clone(), None if momentum_buffer is None else momentum_buffer.clone()) if skip is not None else None
    param, compute = _compute_view(p)
    grad = g.to(compute)
    if not decoupled:
        grad = _with_l2(grad, param, weight_decay)
    if momentum != 0:
        if first_step:
            momentum_buffer.copy_(grad)
        else:
            momentum_buffer.mul_(momentum).add_(grad, alpha=1.0 - dampening)
        grad = grad + momentum * momentum_buffer if nesterov else momentum_buffer
    if decoupled:
        param.mul_(1.0 - lr * weight_decay)
    param.sub_(grad * lr)
    if param is not p:
        p.copy_(param)
    if before is not None:  # (a skipped first step leaves the zero buffer, as the kernel does)
        keep = skip > 0
        for tensor, old in zip((p, momentum_buffer), before):
            if tensor is not None:
                tensor.copy_(torch.where(keep, old, tensor))


class SGDW(_WeightDecayOptimizer):
    """SGD with decoupled weight decay (default) or the L2 penalty (``"l2"``, = torch.optim.SGD);
    the decoupled rule with momentum is in the module docstring.  State, as torch's: ``momentum_buffer`` (fp32;
    float64 for float64 parameters) when momentum != 0.  With momentum, the first step (buf = g) runs a kernel
    variant of its own: capture a CUDA graph after two warm-up steps, so both are compiled."""

    _STATE_KEYS = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, *,
                 weight_decay_mode: str = "decoupled", backend: str = "auto", skip_nonfinite: bool = False):
        _check_common(lr, weight_decay, weight_decay_mode, backend)
        _check_momentum(momentum, dampening, nesterov)
        defaults = dict(lr=lr, momentum=float(momentum), dampening=float(dampening), nesterov=bool(nesterov),
                        weight_decay=weight_decay, weight_decay_mode=weight_decay_mode, backend=backend)
        super().__init__(params, defaults, skip_nonfinite)

    def _check_group(self, group: dict, *, scheduled: bool = False) -> None:
        super()._check_group(group)
        # a scheduler may cycle momentum down to 0 under nesterov (OneCycleLR, CyclicLR): plain SGD, as in torch
        _check_momentum(group["momentum"], group["dampening"], group["nesterov"], zero_momentum_ok=scheduled)

    def _torch_weight_decay_mode(self, group: dict) -> str:
        return "l2"  # torch.optim.SGD's weight decay joins the gradient

    def _bucket_extra(self, p: Tensor) -> tuple:
        # the first step sets buf = g; tensors on their first step go in a launch of their own
        # (a buffer saved as None, as torch 1.x SGD saved it at momentum 0, is a first step too, as in torch)
        return (self.state.get(p, {}).get("momentum_buffer") is None,)

    def _update(self, index, key, group, pairs, lr, weight_decay, backend, skip) -> None:
        momentum = group["momentum"]
        first_step = key[-1]
        if first_step and momentum != 0 and _capturing():  # (no gradient in the warm-up)
            raise RuntimeError(_FIRST_STEP_IN_CAPTURE)
        buffers = [None] * len(pairs)
        if momentum != 0:
            for i, (p, _) in enumerate(pairs):
                state = self.state[p]
                if first_step:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=_state_dtype(p))
                buffers[i] = state["momentum_buffer"]
        decoupled = group["weight_decay_mode"] == "decoupled"
        args = (momentum, group["dampening"], group["nesterov"], decoupled)
        if backend == "torch":
            for (p, g), buf in zip(pairs, buffers):
                sgdw_reference_(p, g, buf, lr, weight_decay, *args, first_step, skip)
            return
        from fastcyclic.kernels import optim as kernels
        rows = [(p, g, buf, None, None) for (p, g), buf in zip(pairs, buffers)]
        # one table for the first and later steps (the buffers keep their addresses), so a CUDA graph captured
        # after the first step finds it; the first step's kernel is a variant of its own, so warm up with two
        # steps before capturing
        kernels.sgdw_step(self._table(index, key[:-1]), rows, lr, weight_decay, *args, first_step, skip)

    def _classifier_update(self, weight, group, lr, weight_decay):
        from fastcyclic.kernels import linear_ce as kernels
        state = self.state[weight]
        first_step = group["momentum"] != 0 and state.get("momentum_buffer") is None
        if first_step and _capturing():  # buf = g and the zeros would be replayed as a first step every time
            raise RuntimeError(_FIRST_STEP_IN_CAPTURE)
        if first_step:
            state["momentum_buffer"] = torch.zeros_like(weight, dtype=_state_dtype(weight))
        return kernels.ClassifierUpdate("sgdw", lr, weight_decay, None, state.get("momentum_buffer"), None,
                                        (group["momentum"], group["dampening"]),
                                        group["weight_decay_mode"] == "decoupled", first_step=first_step,
                                        nesterov=group["nesterov"])


def _check_momentum(momentum, dampening, nesterov, *, zero_momentum_ok: bool = False) -> None:
    if not isinstance(nesterov, (bool, np.bool_)):
        # torch.optim.SGD(params, lr, momentum, dampening, weight_decay) put positionally into SGDW lands the
        # weight decay here: it turned Nesterov on and left the decay at 0, silently
        raise TypeError(f"nesterov must be True or False, got {nesterov!r} (SGDW's order is lr, momentum, "
                        "dampening, nesterov, weight_decay; torch.optim.SGD puts weight_decay before nesterov)")
    _check_real("momentum", momentum)
    _check_real("dampening", dampening)
    if not 0.0 <= float(momentum) < math.inf:
        raise ValueError(f"momentum must be finite and >= 0, got {momentum}")
    if not 0.0 <= float(dampening) <= 1.0:
        raise ValueError(f"dampening must be in [0, 1], got {dampening}")
    if nesterov and ((float(momentum) <= 0.0 and not (zero_momentum_ok and float(momentum) == 0.0))
                     or float(dampening) != 0.0):
        raise ValueError(f"nesterov needs momentum > 0 and dampening 0, got momentum={momentum}, "
                         f"dampening={dampening}")


# --------------------------------------------------------------------------------------------
# The classifier's update fused into the cross-entropy backward
# --------------------------------------------------------------------------------------------


class FusedUpdate:
    """Applies ``optimizer``'s step for the classifier ``weight`` inside the backward of
    ``fastcyclic.linear_cross_entropy(h, weight, target, fused_update=handle)``: the dW kernel
    updates weight (and its optimizer state) tile by tile, so dW is never written to memory.
    ``optimizer.step()`` then updates every other parameter (weight has no .grad and is skipped).

    How it stays equal to "backward, then optimizer.step()":
    * The update waits for weight's gradient hook, which autograd runs once every use of weight in
      the graph has reported.  If any other use sent a gradient (tied weights, a regulariser), the
      hook raises before anything is updated: that gradient cannot join a dW that never exists.  Two
      fused losses on one weight in one graph are refused the same way.
    * The hook only queues the update: it runs when the whole backward has succeeded, so nodes that
      still read weight (a detached copy) see it as it was, and a failed backward updates nothing.
      A backward that does not reach weight (``backward(inputs=...)``, ``autograd.grad`` w.r.t.
      other tensors) gives it no gradient and no update; ``autograd.grad`` w.r.t. weight is refused.
    * A second fused backward before ``optimizer.step()`` (gradient accumulation across
      micro-batches), or a weight that already holds a .grad, raises before any kernel runs.
    * The update reads the group's lr, weight decay, betas, ... when the backward runs: a float
      among them changed before ``optimizer.step()`` makes the step refuse, before anything moves
      (a tensor lr changed in place in that window is not seen: change it before the forward).
    * The bias, if any, gets its gradient as usual (set in the same hook) and is stepped by
      ``optimizer.step()`` with its own group's settings.  It must be the parameter itself: a bias
      computed from it (scaled, cast) is refused at the forward, as its gradient could not reach it.
    Gradient clipping by global norm cannot be honoured (the update happens before the norm is
    known); ``max_grad_norm`` and ``grad_accumulation_steps`` are accepted only to refuse them
    clearly, as a configuration error, and ``skip_nonfinite`` optimizers are refused likewise.
    What it cannot see, and the caller must not do: ``clip_grad_norm_`` over the model (weight has
    no .grad, so it is neither in the norm nor clipped), loss scaling with unscaled gradients
    (GradScaler), data parallelism (DDP, FSDP: each process would update weight with its own gradient; it warns
    under torch.distributed with more than one process, and ``optimizer.step()`` refuses a .grad that DDP wrote
    after the update, as DDP does by default, not with find_unused_parameters or static_graph), and the same
    weight in a second optimizer.  Under torch.compile the fused loss and its update run eagerly, a graph break.
    Create it with :func:`fused_update`; the optimizer holds it weakly (keep the handle while you use it)."""

    def __init__(self, optimizer: _WeightDecayOptimizer, weight: Tensor):
        from fastcyclic.linear_ce import keep_fused_update_out_of_compile  # (linear_ce imports this module)

        keep_fused_update_out_of_compile()  # first: a failure here must not leave the hook and registration behind
        self.optimizer = optimizer
        self.weight = weight
        self.group_index = next(i for i, g in enumerate(optimizer.param_groups)
                                if any(p is weight for p in g["params"]))
        self._pending = None  # what the dW pass needs, from the loss's backward to weight's hook
        self._pending_task = None  # the autograd graph task that deferred it
        self._hyper: dict = {}  # the group's float hyper-parameters the last update used
        self._stepped = True  # False between a fused update and the next optimizer.step()
        self._warned_distributed = False
        # the hook holds the handle weakly: the weight outlives an optimizer dropped for a new one (a new phase),
        # and a strong reference would keep that optimizer, and all its state, alive with it
        self._hook = weight.register_hook(_call_if_alive(weakref.ref(self)))
        registry, key, hook = optimizer._fused_weights, id(weight), self._hook

        def forget(ref):  # a dropped handle: unregistered, and no dead hook is left on the weight
            if registry.get(key) is ref:
                del registry[key]
            hook.remove()
        optimizer._fused_weights[key] = weakref.ref(self, forget)

    def remove(self) -> None:
        """Stop fusing: weight gets ordinary gradients again."""
        self._hook.remove()
        self.optimizer._fused_weights.pop(id(self.weight), None)

    # called by linear_cross_entropy before anything is launched
    def check_forward(self, weight: Tensor) -> None:
        if weight is not self.weight:
            raise ValueError("fused_update was created for another weight tensor")
        ref = self.optimizer._fused_weights.get(id(weight))
        if ref is None or ref() is not self:
            raise ValueError("this fused_update handle was removed")
        if self.optimizer.skip_nonfinite:
            raise ValueError("the fused update cannot skip a step for non-finite gradients it has not seen yet "
                             "(optimizer.skip_nonfinite was set to True)")
        self.optimizer.check_values(self.group_index)  # the backward updates the weight with these values
        self._check_can_update()
        if not self._warned_distributed and _multi_process():
            self._warned_distributed = True
            warnings.warn("fused_update under torch.distributed (world size > 1): the classifier is updated with "
                          "this process's own gradient, which no all-reduce (DDP, FSDP) sees. In data-parallel "
                          "training the processes' classifiers would drift apart: do not use fused_update there "
                          "(processes that each train their own model are fine)", RuntimeWarning, stacklevel=5)

    def _check_can_update(self) -> None:
        if not self._stepped:
            raise RuntimeError(
                "the classifier was already updated by a fused backward since the last optimizer.step(): "
                "gradient accumulation across micro-batches cannot be fused; call optimizer.step() after "
                "every backward, or do not use fused_update")
        if self.weight.grad is not None:
            raise RuntimeError(
                "the classifier weight already holds a gradient (accumulated, or from another loss): the fused "
                "update would ignore it; call optimizer.zero_grad(set_to_none=True) first")

    # called by the loss's backward before it unpacks its saved tensors: two fused forwards, then two
    # backwards, would otherwise meet torch's in-place version error for the weight the first one updated
    def check_backward(self) -> None:
        if not self._stepped:
            self._check_can_update()

    # called by the loss's backward (kernels.* tensors and coefficients), then by autograd's hook
    def defer(self, pending: dict) -> None:
        self._check_can_update()
        task = torch._C._current_graph_task_id()
        if self._pending is not None and self._pending_task == task:  # (an older one: a backward that failed)
            self._pending = None
            raise RuntimeError(
                "the classifier weight is used by more than one fused cross-entropy in this graph (two "
                "linear_cross_entropy calls with the same fused_update handle): only one dW can be fused; "
                "nothing was updated. Concatenate the rows into one call, or do not use fused_update")
        self._pending, self._pending_task = pending, task

        def check_hook_ran():  # queued now, so it runs at the end of this backward, before the hook's update
            # autograd never called weight's hook, so nothing would update the classifier (torch 2.9 did so when
            # saved-tensor hooks packed the weight, which the fused loss no longer saves)
            if self._pending is pending:
                self._pending = None
                raise RuntimeError(
                    f"the classifier weight's fused update did not run: autograd (torch {torch.__version__}) never "
                    "called the weight's gradient hook, which runs it. Nothing was updated; do not use fused_update "
                    "here")
        torch.autograd.Variable._execution_engine.queue_callback(check_hook_ran)

    def _on_weight_gradient(self, grad: Optional[Tensor]) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            if grad is not None and not self._stepped:
                raise RuntimeError("the classifier weight received a gradient after its fused update")
            return  # a backward without the fused loss: an ordinary gradient
        if grad is not None:
            raise RuntimeError(
                "the classifier weight is also used elsewhere in the graph (tied weights, a penalty, another "
                "loss): its gradient from there cannot be fused into the cross-entropy's update; nothing was "
                "updated. Use the ordinary path (no fused_update) for this model")
        self._check_can_update()

        def run():  # at the end of the backward: nodes that still read weight (e.g. through a detached
            # copy) see it as it was, and a backward that fails later updates nothing
            self._check_can_update()
            self.optimizer.check_values(self.group_index)  # (a value written after the forward)
            self._hyper = _hyper_snapshot(self.optimizer.param_groups[self.group_index])
            with torch.no_grad():
                self._apply(**pending)
            self._stepped = False
        torch.autograd.Variable._execution_engine.queue_callback(run)

    def _before_step(self) -> None:
        # a loss whose backward did not reach the weight (backward(inputs=...), autograd.grad w.r.t. other
        # tensors, an aborted backward): no gradient, so no update, as in the unfused path
        self._pending = None
        if not self._stepped and self.weight.grad is not None:
            # written past the gradient hook, after the fused update: DDP's reducer (it copies the all-reduced
            # bucket, zeros for a weight that sent none, into .grad), FSDP, a hand-written all-reduce
            raise RuntimeError(
                "the classifier weight holds a .grad written after its fused update (by DDP's or FSDP's gradient "
                "all-reduce, or by hand): step() would update it a second time, and each process has already "
                "updated it with its local gradient only. fused_update cannot be combined with data-parallel "
                "gradient synchronisation; do not use fused_update here")
        if not self._stepped:
            group = self.optimizer.param_groups[self.group_index]
            now = _hyper_snapshot(group)
            if now != self._hyper:
                changed = ", ".join(f"{k}={self._hyper.get(k)!r} -> {now.get(k)!r}"
                                    for k in sorted(set(now) | set(self._hyper)) if now.get(k) != self._hyper.get(k))
                raise RuntimeError(
                    f"the classifier's param group changed between the fused backward and optimizer.step() "
                    f"({changed}): the fused update already used the old values. Restore them and call step() "
                    f"(nothing has moved since); change such values before the forward or after step(), or do not "
                    f"use fused_update")

    def _after_step(self) -> None:
        self._stepped = True

    def _apply(self, h, weight, bias, target, lse_parts, p_coef, t_coef, g_target, label_smoothing, backend,
               torch_grads, config) -> None:
        optimizer, group = self.optimizer, self.optimizer.param_groups[self.group_index]
        if backend == "torch":
            # the chunked PyTorch backend already computed dW (O(K x D) on the CPU path): step on it
            dw, db = torch_grads
            key = (weight.device, weight.dtype, dw.dtype) + optimizer._bucket_extra(weight)
            optimizer._update(self.group_index, key, group, [(weight, dw)], group["lr"], group["weight_decay"],
                              "torch", None)
        else:
            from fastcyclic.kernels import linear_ce as kernels
            optimizer._contiguous_state(weight)
            lr, weight_decay = optimizer._device_scalars(self.group_index, group, weight.device)
            update = optimizer._classifier_update(weight, group, lr, weight_decay)
            _, _, db = kernels.backward(h, weight, bias, target, lse_parts, p_coef, t_coef, g_target, label_smoothing,
                                        need_dh=False, need_dw=False, need_db=bias is not None and bias.requires_grad,
                                        update=update, config=config)
        torch.autograd.graph.increment_version(weight)  # stale saved copies of weight now fail loudly
        if bias is not None and bias.requires_grad and db is not None:
            if bias.grad is None:
                bias.grad = db.detach()
            else:  # in place: a captured CUDA graph and the optimizer's tables hold its address
                bias.grad.add_(db)


def _call_if_alive(handle_ref):
    """A gradient hook that passes W's gradient to the handle while the handle exists."""
    def hook(grad):
        handle = handle_ref()
        return handle._on_weight_gradient(grad) if handle is not None else None
    return hook


# a first step creates state (and SGDW's sets buf = g): captured, every replay would do it again
_FIRST_STEP_IN_CAPTURE = ("a CUDA graph capture of an optimizer step needs a warm-up step first, outside the capture "
                          "(e.g. on a side stream), in which every parameter gets a gradient: a first step creates "
                          "the optimizer state")


def _multi_process() -> bool:
    """Whether torch.distributed runs a process group of more than one process."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _capturing() -> bool:
    """Whether a CUDA graph capture is under way on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _hyper_snapshot(group: dict) -> dict:
    """The group's host hyperparameters, frozen (betas as a tuple: a list changed in place must compare unequal).
    Tensor values are left out: a tensor lr changed in place is read on the device (no host sync here)."""
    def frozen(v):
        return tuple(v.tolist()) if isinstance(v, np.ndarray) else tuple(v) if isinstance(v, (list, tuple)) else v

    def holds_tensor(v):
        return isinstance(v, Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(x, Tensor) for x in v))
    return {k: frozen(v) for k, v in group.items() if k != "params" and not holds_tensor(v)}


# valid values that stand in for tensor hyperparameters when a group is checked again (check_values)
_STAND_IN = dict(lr=0.0, weight_decay=0.0, eps=1.0, betas=(0.0, 0.0), momentum=1.0, dampening=0.0)


def fused_update(optimizer: _WeightDecayOptimizer, weight: Tensor, *, grad_accumulation_steps: int = 1,
                 max_grad_norm: Optional[float] = None) -> FusedUpdate:
    """Fuse ``optimizer``'s update of the classifier ``weight`` into the cross-entropy backward; pass
    the handle as ``linear_cross_entropy(..., fused_update=handle)``.  See :class:`FusedUpdate`.

    Refused with ValueError: gradient accumulation (``grad_accumulation_steps > 1``), clipping by
    global norm (``max_grad_norm``), an optimizer with ``skip_nonfinite``, a weight that is not a
    contiguous 2-D leaf parameter of this optimizer, on CUDA a D whose dW tile does not fit
    in shared memory (D > 1024 in float32, > 512 in float32 with TF32 allowed, > 2048 in bfloat16)."""
    if not isinstance(optimizer, _WeightDecayOptimizer):
        raise TypeError(f"fused_update needs a fastcyclic.optim.AdamW or SGDW optimizer, got "
                        f"{type(optimizer).__name__}")
    if int(grad_accumulation_steps) != 1:
        raise ValueError(f"the fused update steps inside every backward, so it cannot accumulate gradients over "
                         f"micro-batches (grad_accumulation_steps={grad_accumulation_steps})")
    if max_grad_norm is not None:
        raise ValueError(f"the fused update steps before the global gradient norm is known, so it cannot clip by "
                         f"it (max_grad_norm={max_grad_norm})")
    if optimizer.skip_nonfinite:
        raise ValueError("the fused update cannot skip a step for non-finite gradients it has not seen yet "
                         "(optimizer has skip_nonfinite=True)")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_leaf or not weight.requires_grad:
        raise ValueError("the fused update needs the classifier weight as a 2-D leaf tensor that requires grad")
    if not weight.is_contiguous():
        raise ValueError(f"the fused update needs a contiguous weight, got strides {weight.stride()}")
    if not any(p is weight for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(f"the weight of shape {tuple(weight.shape)} is not a parameter of this optimizer")
    ref = optimizer._fused_weights.get(id(weight))
    if ref is not None and ref() is not None:
        raise ValueError("this weight already has a fused_update handle")
    if weight.is_cuda and TRITON_INSTALLED:  # the Triton path: the dW tile over all of D must fit in shared memory
        _fused_update_tile(weight.shape[1], weight.dtype, weight.device)
    return FusedUpdate(optimizer, weight)


def _fused_update_tile(d: int, dtype: torch.dtype, device: torch.device):
    """The fused update's dW tile on a CUDA device; ValueError naming D when it does not fit."""
    from fastcyclic.kernels import linear_ce as kernels

    config = kernels.default_config(1, d, 1, dtype, torch.device(device))
    return kernels.fused_update_tile(config.backward_dw, d, dtype)


def fused_update_fits(d: int, dtype: torch.dtype, device) -> bool:
    """Whether :func:`fused_update` can fuse the update of a (K, d) classifier of this dtype on this
    device: always on CPU; on CUDA its dW tile over all of D must fit in shared memory (D <= 1024 in
    float32, <= 512 in float32 with TF32 allowed, <= 2048 in bfloat16/float16).  For callers that fall
    back to ``optimizer.step()``."""
    if torch.device(device).type != "cuda" or not TRITON_INSTALLED:
        return True
    try:
        _fused_update_tile(d, dtype, device)
    except ValueError:
        return False
    return True


__all__ = ["AdamW", "SGDW", "FusedUpdate", "fused_update", "fused_update_fits", "adamw_reference_", "sgdw_reference_",
           "WEIGHT_DECAY_MODES"]
