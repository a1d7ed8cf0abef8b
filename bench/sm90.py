"""Compile the optimizer kernels and the fused-update dW kernel for an H100/H200 (sm_90) on any
machine, GPU or not, and report each configuration's shared memory, registers and spill stack.

    python -m fastcyclic.bench.sm90 [--quick]     (TRITON_INTERPRET must not be set)

Exits 1 when a configuration does not compile or needs more shared memory than an sm_90 block may
have, so CPU-only CI catches what the interpreter cannot (code generation, shared-memory overflow).
Uses triton's bundled ptxas and cuobjdump; registers and stack are reported when cuobjdump runs.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile

SHARED_LIMIT = 227 << 10  # bytes of shared memory an sm_90 block may use
# pointer arguments that are not the input dtype, and float scalar arguments
POINTERS = {"y_ptr": "*i64", "terms_ptr": "*fp32", "lr_ptr": "*fp32", "weight_decay_ptr": "*fp32",
            "step_ptr": "*fp32", "state0_ptr": "*fp32", "state1_ptr": "*fp32", "skip_ptr": "*fp32",
            "table_ptr": "*i64", "numel_ptr": "*i64", "block_tensor_ptr": "*i32", "block_start_ptr": "*i64"}
FLOATS = {"beta2", "one_minus_beta1", "one_minus_beta2", "log_beta1", "log_beta2", "eps", "momentum", "dampening",
          "hyper0", "hyper1", "hyper2", "hyper3", "hyper4", "hyper5"}


def compile_sm90(fn, data_ptr: str, constexprs: dict, num_warps: int, num_stages: int = 2):
    """fn compiled for sm_90 with every non-constexpr argument typed by its name."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTERS.get(name, data_ptr)
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(kernel) -> str:
    """'REG:n STACK:n' from cuobjdump -res-usage on the cubin ('' if cuobjdump is unavailable)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        try:
            text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    fields = [w for line in text.splitlines() if "REG:" in line for w in line.split() if w[:4] in ("REG:", "STAC")]
    return " ".join(fields[:2])


def cases(full: bool = True):
    """(name, fn, data pointer type, constexprs, num_warps) for every configuration checked; without
    ``full`` one of each kind and the extreme widths (what CI compiles)."""
    import torch
    import triton.language as tl

    from fastcyclic.kernels import linear_ce, optim

    dtypes = ((tl.float32, tl.float32, "fp32"), (tl.bfloat16, tl.bfloat16, "bf16"),
              (tl.float16, tl.float32, "fp16/fp32 grad"))
    for p_dtype, g_dtype, name in dtypes if full else dtypes[1:2]:
        for decoupled in (True, False) if full else (True,):
            yield (f"adamw {name} decoupled={decoupled}", optim._multi_tensor_adamw_kernel, "*fp32",
                   dict(P_DTYPE=p_dtype, G_DTYPE=g_dtype, DECOUPLED=decoupled, HAS_SKIP=True, BLOCK=4096,
                        INTERPRET=False), optim.NUM_WARPS)
        yield (f"sgdw {name} momentum nesterov", optim._multi_tensor_sgdw_kernel, "*fp32",
               dict(P_DTYPE=p_dtype, G_DTYPE=g_dtype, DECOUPLED=True, HAS_SKIP=False, HAS_MOMENTUM=True,
                    FIRST_STEP=False, NESTEROV=True, BLOCK=4096, INTERPRET=False), optim.NUM_WARPS)
    cuda = torch.device("cuda")
    for dtype, data_ptr, widths in ((torch.float32, "*fp32", (128, 300, 512, 1024)),
                                    (torch.bfloat16, "*bf16", (256, 512, 1024, 2048))):
        for d in widths if full else (widths[0], widths[-1]):
            tile = linear_ce.fused_update_tile(linear_ce.default_config(8192, d, 65536, dtype, cuda).backward_dw,
                                               d, dtype)
            for update in (1, 2) if full else (1,):
                constexprs = dict(
                    HAS_BIAS=True, WANT_DB=True, RESIDENT=d <= tile.block_ds, EVEN_D=d % tile.block_d == 0,
                    EVEN_DS=d % tile.block_ds == 0, BLOCK_K=tile.block_owner, BLOCK_N=tile.block_loop,
                    BLOCK_D=tile.block_d, BLOCK_DS=tile.block_ds, UPCAST=False,
                    PRECISION="ieee" if dtype == torch.float32 else "tf32", UPDATE=update, DECOUPLED=True,
                    HAS_MOMENTUM=update == 2, FIRST_STEP=False, NESTEROV=False)
                kind = "adamw" if update == 1 else "sgdw"
                yield (f"fused {kind} dW {str(dtype)[6:]} D={d} tile {dataclasses.astuple(tile)[:4]}",
                       linear_ce._backward_dw_kernel, data_ptr, constexprs, tile.num_warps)


def main(argv: list[str] | None = None) -> int:
    full = "--quick" not in (sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the kernels must be defined for the GPU to be compiled", file=sys.stderr)
        return 2
    failures = 0
    for name, fn, data_ptr, constexprs, num_warps in cases(full):
        try:
            kernel = compile_sm90(fn, data_ptr, constexprs, num_warps)
        except Exception as e:  # a code-generation error is the finding
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:300]}")
            continue
        shared = kernel.metadata.shared
        over = shared > SHARED_LIMIT
        failures += over
        print(f"{'OVER' if over else 'ok  '} {name}: shared {shared / 1024:.0f} KiB {resource_usage(kernel)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
