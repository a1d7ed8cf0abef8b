"""Tile tuning for the fused linear cross-entropy (``fastcyclic bench ce --tune``, CUDA only).

Each kernel (forward, dW, dh, and the "gemm" backward's g kernel) is timed on its own over its
candidate tiles, on the problem's real shapes; the fastest of each make the tuned configuration.
The winners measured on an H200 are what ``kernels.linear_ce.default_config`` returns
(bench/results/ has the runs).
"""
from __future__ import annotations

import dataclasses

import torch

from fastcyclic.bench import measure
from fastcyclic.kernels import linear_ce as kernels
from fastcyclic.kernels.linear_ce import LCEConfig, TileConfig

KERNELS = ("forward", "backward_dw", "backward_dh", "backward_grad")


def candidates(d: int) -> dict[str, list[TileConfig]]:
    """(block_owner, block_loop, num_warps, num_stages) grids; all of D resident up to 256, and for
    larger D both a resident D (one logits recompute, big accumulators) and 256-wide slices."""
    dp = max(16, 1 << (d - 1).bit_length())
    if dp <= 256:
        fwd = [TileConfig(o, lp, dp, dp, num_warps=wp, num_stages=st) for o, lp, wp, st in (
            (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4),
            (256, 64, 8, 2), (64, 256, 8, 2), (128, 128, 4, 2))]
        bwd = [TileConfig(o, lp, dp, dp, num_warps=wp, num_stages=st) for o, lp, wp, st in (
            (128, 64, 8, 2), (128, 32, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2),
            (64, 32, 4, 3), (128, 64, 4, 2), (64, 64, 8, 2))]
    else:
        fwd = [TileConfig(o, lp, bd, bd, num_warps=wp, num_stages=st) for o, lp, bd, wp, st in (
            (128, 128, 64, 8, 3), (128, 128, 128, 8, 2), (128, 64, 128, 8, 3), (64, 128, 64, 4, 3),
            (64, 64, dp, 8, 2), (64, 128, dp, 8, 2))]
        bwd = [TileConfig(o, lp, 64, ds, num_warps=wp, num_stages=st) for o, lp, ds, wp, st in (
            (64, 32, dp, 8, 2), (64, 64, dp, 8, 2), (64, 32, dp, 4, 2), (128, 64, 256, 8, 2),
            (128, 32, 256, 8, 3), (64, 64, 256, 4, 3))]
    # the "gemm" backward's g kernel: a GEMM tile with the softmax gradient as its epilogue
    grad = [TileConfig(o, lp, bd, bd, num_warps=wp, num_stages=st) for o, lp, bd, wp, st in (
        (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3))]
    return {"forward": fwd, "backward_dw": bwd, "backward_dh": bwd, "backward_grad": grad}


def tune_shape(h, w, y, *, rep_ms: float = 60.0, log=print) -> tuple[LCEConfig, dict]:
    """Time every candidate of every kernel on (h, w, y); returns the tuned config and the timings."""
    import triton.testing

    n, d = h.shape
    k = w.shape[0]
    from fastcyclic.linear_ce import _linear_ce, _logit_grad_terms

    base = kernels.default_config(n, d, k, h.dtype, h.device)
    # the backward's inputs for the mean loss, as the loss's own backward forms them
    _, _, _, saved = _linear_ce(h, w, None, y, -100, 0.0, 0.0, "triton", False, False)
    p_coef, t_coef, g_target = _logit_grad_terms(torch.full((n,), 1.0 / n, device=h.device), None, y, saved, -100,
                                                 0.0, 0.0, k)

    def launch(kernel: str, tile: TileConfig):
        config = dataclasses.replace(base, **{kernel: tile})
        if kernel == "forward":
            return lambda: kernels.forward(h, w, None, y, config=config)
        if kernel == "backward_grad":  # the whole "gemm" backward (its cuBLAS products do not depend on the tile)
            config = dataclasses.replace(config, backward="gemm")
        need_dh, need_dw = kernel != "backward_dw", kernel != "backward_dh"
        return lambda: kernels.backward(h, w, None, y, saved[1:], p_coef, t_coef, g_target, 0.0, config=config,
                                        need_dh=need_dh, need_dw=need_dw)

    timings, best = {}, {}
    for kernel, tiles in candidates(d).items():
        timings[kernel] = []
        for tile in tiles:
            entry = {"tile": dataclasses.asdict(tile)}
            try:
                fn = launch(kernel, tile)
                fn()
                entry["ms"] = triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")
            except Exception as exc:  # e.g. a tile that needs more shared memory than the GPU has
                entry["error"] = measure.error_text(exc)
            timings[kernel].append(entry)
            result = f"{entry['ms']:.3f} ms" if "ms" in entry else entry["error"]
            log(f"  {n}x{d}x{k} {kernel:<12} {tile.block_owner:>4} {tile.block_loop:>4} "
                f"d{tile.block_d}/{tile.block_ds} w{tile.num_warps} s{tile.num_stages}: {result}")
        ok = [e for e in timings[kernel] if "ms" in e]
        best[kernel] = TileConfig(**min(ok, key=lambda e: e["ms"])["tile"]) if ok else getattr(base, kernel)
    return LCEConfig(**best), timings
