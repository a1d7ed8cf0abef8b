"""Embedding + classifier models for (a + b) mod P, with the classifier applied by the fused loss.

    embed-sum:  h = act(E[a] + E[b])                (d wide)
    embed-mlp:  h = act(U [E[a]; E[b]])             (m wide)
    factorised: h_out = V h, so W is K x d and lives in E's space (else h_out = h)
    logits:     z = h_out W^T (+ bias), never materialised in training: the loss goes through
                fastcyclic.linear_cross_entropy

The parameters are plain ``nn.Parameter``s (``embedding``, ``U``, ``readout``, ``weight``, ``bias``) so
that W and E can be taken out and analysed as matrices.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcyclic.data import check_pair_tokens, is_integer

MODELS = ("embed-sum", "embed-mlp")
ACTIVATIONS = ("relu", "square", "gelu")


def _check_int(name: str, value, minimum: int) -> int:
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class CyclicModel(nn.Module):
    """Embedding + (optional MLP) + linear classifier over K = p classes.

    Args:
        p: number of tokens and of classes (>= 2).
        d: embedding width (>= 1).
        model: "embed-sum" or "embed-mlp".
        hidden: width m of the embed-mlp hidden layer (default 4 * d); must be None for embed-sum.
        activation: "relu", "square" (x^2) or "gelu".
        bias: give the classifier a bias (initialised to zero).
        factorised: add a readout V (d x d for embed-sum, d x m for embed-mlp) so that W is K x d.
        init_scale: multiplies every initial standard deviation (>= 0).
        dtype: floating dtype of the parameters.
        device: where the parameters live.
        generator: a torch.Generator for the initialisation; None uses torch's global RNG.

    Initialisation (normal, zero mean): E with std ``init_scale`` (so E[a] + E[b] has O(1) entries);
    U, V and W with std ``init_scale / sqrt(fan_in)`` (pre-activations and logits start O(1)); bias 0.
    The numbers are drawn on the generator's device (the CPU by default) in float32 and then moved, so
    the same generator seed gives the same initial model on every device and in every dtype (up to
    rounding).
    """

    def __init__(self, p: int, d: int, *, model: str = "embed-sum", hidden: Optional[int] = None,
                 activation: str = "relu", bias: bool = False, factorised: bool = False, init_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device, None] = None,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        p, d = _check_int("p", p, 2), _check_int("d", d, 1)
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if model == "embed-sum" and hidden is not None:
            raise ValueError(f"hidden={hidden!r} is only meaningful for model='embed-mlp' (embed-sum is d wide)")
        if model == "embed-mlp":
            hidden = 4 * d if hidden is None else hidden
            hidden = _check_int("hidden", hidden, 1)
        if isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real) \
                or not 0.0 <= float(init_scale) < math.inf:  # NumPy numbers welcome (np.logspace sweeps)
            raise ValueError(f"init_scale must be finite and >= 0, got {init_scale!r}")
        init_scale = float(init_scale)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.p, self.d, self.model, self.activation = p, d, model, activation
        self.hidden = hidden
        self.factorised = bool(factorised)
        width = d if model == "embed-sum" else hidden  # the width of h
        self.out_dim = d if factorised else width  # the width of h_out, which meets W

        def init(shape: tuple[int, ...], std: float) -> nn.Parameter:
            where = generator.device if generator is not None else torch.device("cpu")
            x = torch.randn(shape, generator=generator, device=where, dtype=torch.float32) * std
            return nn.Parameter(x.to(device=device, dtype=dtype))

        # draw order E, U, V, W: fixed, so a seed always gives the same parameters
        self.embedding = init((p, d), init_scale)
        self.U = init((hidden, 2 * d), init_scale / math.sqrt(2 * d)) if model == "embed-mlp" else None
        self.readout = init((d, width), init_scale / math.sqrt(width)) if factorised else None
        self.weight = init((p, self.out_dim), init_scale / math.sqrt(self.out_dim))
        self.bias = nn.Parameter(torch.zeros(p, device=device, dtype=dtype)) if bias else None

    def extra_repr(self) -> str:
        hidden = f", hidden={self.hidden}" if self.model == "embed-mlp" else ""
        return (f"p={self.p}, d={self.d}, model={self.model!r}{hidden}, activation={self.activation!r}, "
                f"bias={self.bias is not None}, factorised={self.factorised}")

    # ---- views for geometry ----

    @property
    def W(self) -> Tensor:
        """The classifier weight (K x out_dim), detached."""
        return self.weight.detach()

    @property
    def E(self) -> Tensor:
        """The token embedding (P x d), detached."""
        return self.embedding.detach()

    # ---- computation ----

    def _act(self, x: Tensor) -> Tensor:
        if self.activation == "relu":
            return F.relu(x)
        if self.activation == "square":
            return x * x
        return F.gelu(x)

    def _rows(self, tokens: Tensor) -> Tensor:
        """E[tokens].  On CPU through F.embedding, whose backward sums each row's gradients in a fixed order:
        indexing's backward (index_put_ with accumulate) adds them from racing threads, so two runs on 2 threads
        differed in the last bits (one thread gives the same bits either way).  On CUDA, indexing: its atomic
        adds are what deterministic=True replaces, and it is known to capture in a CUDA graph."""
        if tokens.device.type == "cpu":
            return F.embedding(tokens, self.embedding)
        return self.embedding[tokens]

    def features(self, a: Tensor, b: Tensor) -> Tensor:
        """h_out (N x out_dim): the vector that meets W, after the readout V when factorised.  a, b: integer
        tensors whose shapes broadcast, values in [0, p) (not checked: that would sync the device)."""
        check_pair_tokens(a, b)  # float tokens, or shapes that do not broadcast, fail deep inside torch
        a, b = torch.broadcast_tensors(a, b)  # (views) embed-mlp concatenates the two embeddings
        ea, eb = self._rows(a), self._rows(b)
        if self.model == "embed-sum":
            h = self._act(ea + eb)
        else:
            h = self._act(F.linear(torch.cat([ea, eb], dim=-1), self.U))
        return F.linear(h, self.readout) if self.factorised else h

    def forward(self, a: Tensor, b: Tensor, target: Optional[Tensor] = None, **ce_kwargs) -> Tensor:
        """The loss ``linear_cross_entropy(h_out, W, target, bias=bias, **ce_kwargs)`` when target is
        given (reduction "mean" unless ce_kwargs says otherwise); else h_out."""
        h = self.features(a, b)
        if target is None:
            return h
        from fastcyclic.linear_ce import linear_cross_entropy  # defines the Triton kernels on first use

        return linear_cross_entropy(h, self.weight, target, bias=self.bias, **ce_kwargs)

    def stats(self, a: Tensor, b: Tensor, target: Tensor, **ce_kwargs) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row (loss, lse, argmax) without logits; accuracy is ``(argmax == target).float().mean()``."""
        from fastcyclic.linear_ce import linear_cross_entropy_stats

        return linear_cross_entropy_stats(self.features(a, b), self.weight, target, bias=self.bias, **ce_kwargs)

    def logits(self, a: Tensor, b: Tensor) -> Tensor:
        """The full N x K logits, eagerly: for small P, tests and analysis only."""
        return F.linear(self.features(a, b), self.weight, self.bias)
