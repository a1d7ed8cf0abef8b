"""Compile the Triton kernels for an H100/H200 (sm_90) on any machine, GPU or not, and report each
configuration's shared memory, registers, spill stack and the instructions of its main loop.

    python -m fastcyclic.bench.sm90 [--quick]     (TRITON_INTERPRET must not be set)
    python -m fastcyclic.bench.sm90 --cache [DIR]  (the same figures for every kernel in triton's cache)

The linear cross-entropy kernels (forward, both backwards, the fused-update dW kernel) are compiled
from launches captured from their real launchers with CPU tensors, with the JIT's own
specialization of the arguments, so the code is what a GPU would run for those arguments (the
variants checked: see ``linear_ce_launches``); the optimizer kernels (only
pointers and floats) from a signature.  Exits 1 when a configuration does not compile or needs more
shared memory than an sm_90 block may have, so CPU-only CI catches what the interpreter cannot
(code generation, shared-memory overflow).  Uses triton's bundled ptxas and cuobjdump; registers and
stack are reported when cuobjdump runs.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

SHARED_LIMIT = 227 << 10  # bytes of shared memory an sm_90 block may use
# pointer arguments that are not the input dtype, and float scalar arguments
POINTERS = {"y_ptr": "*i64", "class_ptr": "*i32", "terms_ptr": "*fp32", "lr_ptr": "*fp32", "weight_decay_ptr": "*fp32",
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


def cubin_usage(cubin: bytes) -> str:
    """'REG:n STACK:n SPILLS:n (n in loops) LOOP:n' of a cubin, from triton's bundled cuobjdump ('' where it
    cannot run).  SPILLS counts the local-memory loads and stores (LDL/STL) in the code, and those
    between a backward branch and its target: a spill inside the main loop costs every iteration,
    one in the epilogue once per program.  LOOP: see sass_summary."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            usage, sass = (subprocess.run([tool, flag, f.name], capture_output=True, text=True, timeout=60).stdout
                           for flag in ("-res-usage", "-sass"))
        except (OSError, subprocess.SubprocessError):
            return ""
    fields = [w for line in usage.splitlines() if "REG:" in line for w in line.split() if w[:4] in ("REG:", "STAC")]
    return " ".join(fields[:2] + [sass_summary(sass)])


def sass_summary(sass: str) -> str:
    """'SPILLS:n (m in loops) LOOP:k' from cuobjdump -sass text (instructions are '/*addr*/ OPCODE ... ;'):
    the local-memory loads and stores, and the instructions of the longest loop, the main loop's cost per
    iteration in issue slots (a static count: the ALU work per tile, not a time)."""
    instructions = [(int(address, 16), text) for address, text in
                    re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(target, 16), address) for address, text in instructions
             for target in re.findall(r"\bBRA\b.*?0x([0-9a-f]+)\s*$", text) if int(target, 16) < address]
    spills = [address for address, text in instructions if re.search(r"\b(LDL|STL)\b", text)]
    in_loops = sum(any(start <= address <= end for start, end in loops) for address in spills)
    longest = max((sum(start <= address <= end for address, _ in instructions) for start, end in loops), default=0)
    return f"SPILLS:{len(spills)} ({in_loops} in loops) LOOP:{longest}"


def resource_usage(kernel) -> str:
    """``cubin_usage`` of a compiled kernel."""
    return cubin_usage(kernel.asm["cubin"])


def compile_launch(fn, args: tuple, kwargs: dict):
    """fn compiled for sm_90 exactly as a launch fn[grid](*args, **kwargs) would compile it: the JIT's
    own specialization (integers equal to 1 become constants, integers and pointers divisible by 16
    are marked so), which decides vectorised loads and software pipelining."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


@contextlib.contextmanager
def captured_launches():
    """Kernel launches are recorded as (fn, args, kwargs) instead of run: the launchers can then be
    called with CPU tensors of the real widths and dtypes."""
    from triton.runtime.jit import JITFunction

    launches = []
    real_run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = real_run


def _tile_text(kwargs: dict) -> str:
    blocks = "x".join(str(v) for k, v in kwargs.items() if k.startswith("BLOCK_"))
    return f"{blocks} w{kwargs.get('num_warps')} s{kwargs.get('num_stages')}"


def linear_ce_launches(d: int, dtype, *, update: str | None = None, config=None, ragged: bool = False,
                       short_rows: bool | None = None):
    """(label, fn, args, kwargs) of every kernel one forward + backward launches with the GPU's default
    tiles at width d (or ``config``; both backward strategies), or with ``update`` ("adamw"/"sgdw") the
    fused-update dW kernel.  Row and class counts only change unspecialised integers, so small ones do,
    except for what they switch: ``ragged`` takes K = 4097 (a class count no tile divides, as P is) with
    a bias, label smoothing and every loop split in two (the partial-sum variants a large GPU gets), and
    the dW kernel forming dbias alone (a frozen weight).  ``short_rows`` (default: ``ragged``) takes a row
    count no row tile divides (the dW kernel's row mask, EVEN_N, as a full batch of 0.4 P^2 pairs gets);
    otherwise N is a whole number of every row tile, as at the benchmark shapes."""
    import torch

    from fastcyclic.kernels import linear_ce

    config = config or linear_ce.default_config(8192, d, 65536, dtype, torch.device("cuda"))
    if ragged:
        config = linear_ce.with_splits(config, 2)
    short_rows = ragged if short_rows is None else short_rows
    row_tile = max(config.forward.block_owner, config.backward_dw.block_loop, config.backward_dh.block_owner,
                   config.backward_grad.block_owner)
    # ragged: the dW kernel loops over rows, two row blocks (the second one short with short_rows), so that it
    # does split in two
    n = 2 * config.backward_dw.block_loop if ragged else row_tile
    n -= 1 if short_rows else 0
    k = 4097 if ragged else 4096
    h, w = torch.zeros(n, d, dtype=dtype), torch.zeros(k, d, dtype=dtype)
    bias = torch.zeros(k, dtype=dtype) if ragged else None
    target, terms, lse_parts = torch.zeros(n, dtype=torch.int64), torch.zeros(n), torch.zeros(2, n)
    smoothing = 0.1 if ragged else 0.0
    with captured_launches() as launches:
        if update is None:
            linear_ce.forward(h, w, bias, target, want_logit_sum=ragged, want_argmax=ragged, config=config)
            linear_ce.backward(h, w, bias, target, lse_parts, terms, terms, terms, smoothing, config=config)
            linear_ce.backward(h, w, bias, target, lse_parts, terms, terms, terms, smoothing,
                               config=dataclasses.replace(config, backward="gemm"), need_dh=False)
            if ragged:  # a frozen weight with a bias: the dW kernel forms dbias alone
                linear_ce.backward(h, w, bias, target, lse_parts, terms, terms, terms, smoothing, config=config,
                                   need_dh=False, need_dw=False)
        else:
            scalar = torch.zeros(())
            state = [torch.zeros(k, d), torch.zeros(k, d) if update == "adamw" else None]
            step = linear_ce.ClassifierUpdate(update, scalar, scalar, scalar, *state,
                                              (0.9, 0.999, 1e-8) if update == "adamw" else (0.9, 0.0), True)
            linear_ce.backward(h, w, None, target, lse_parts, terms, terms, terms, 0.0, config=config,
                               need_dh=False, update=step)
    for fn, args, kwargs in launches:
        label = f"fused {update} dW" if update else fn.__name__.strip("_").replace("_kernel", "")
        if kwargs.get("WANT_DW") is False:
            label += " (dbias alone)"
        shape = f"D={d}" + (" K=4097 bias splits=2" if ragged else "") + (" N ragged" if short_rows else "")
        yield f"{label} {str(dtype)[6:]} {shape} tile {_tile_text(kwargs)}", fn, args, kwargs


def cases(full: bool = True):
    """(name, compile) for every configuration checked; without ``full`` one of each kind and the
    extreme widths (what CI compiles)."""
    import torch
    import triton.language as tl

    from fastcyclic.kernels import optim

    dtypes = ((tl.float32, tl.float32, "fp32"), (tl.bfloat16, tl.bfloat16, "bf16"),
              (tl.float16, tl.float32, "fp16/fp32 grad"))
    for p_dtype, g_dtype, name in dtypes if full else dtypes[1:2]:
        # pointers and floats only, all loaded through the address table: nothing to specialise
        for decoupled in (True, False) if full else (True,):
            constexprs = dict(P_DTYPE=p_dtype, G_DTYPE=g_dtype, DECOUPLED=decoupled, HAS_SKIP=True, ALIGNED=True,
                              BLOCK=4096, INTERPRET=False)
            yield (f"adamw {name} decoupled={decoupled}",
                   lambda c=constexprs: compile_sm90(optim._multi_tensor_adamw_kernel, "*fp32", c, optim.NUM_WARPS))
        constexprs = dict(P_DTYPE=p_dtype, G_DTYPE=g_dtype, DECOUPLED=True, HAS_SKIP=False, HAS_MOMENTUM=True,
                          FIRST_STEP=False, NESTEROV=True, ALIGNED=True, BLOCK=4096, INTERPRET=False)
        yield (f"sgdw {name} momentum nesterov",
               lambda c=constexprs: compile_sm90(optim._multi_tensor_sgdw_kernel, "*fp32", c, optim.NUM_WARPS))

    # forward and both backwards at the benchmark's widths
    widths = ((torch.bfloat16, (128, 256, 512, 1024)), (torch.float32, (128, 256)), (torch.float16, (512,)))
    for dtype, ds in widths if full else ((torch.bfloat16, (256,)), (torch.float32, (128,))):
        for d in ds:
            for ragged in (False, True) if full or dtype == torch.bfloat16 else (False,):
                # the full check also takes ragged K with whole row blocks (other dW code: 41 loop spills at
                # bf16 D = 256 with a bias, 2026-11-30)
                for short_rows in ((True, False) if ragged and full else (ragged,)):
                    for name, fn, args, kwargs in linear_ce_launches(d, dtype, ragged=ragged, short_rows=short_rows):
                        yield name, lambda fn=fn, args=args, kwargs=kwargs: compile_launch(fn, args, kwargs)
    # the fused update's dW tile, sized from D
    for dtype, ds in ((torch.float32, (128, 300, 512, 1024)), (torch.bfloat16, (256, 512, 1024, 2048))):
        for d in ds if full else (ds[0], ds[-2], ds[-1]):
            for update in ("adamw", "sgdw") if full else ("adamw",):
                # the trainer's full batch (0.4 P^2 pairs) is no whole number of row blocks: the full check
                # takes that too
                for short_rows in (False, True) if full else (False,):
                    for name, fn, args, kwargs in linear_ce_launches(d, dtype, update=update, short_rows=short_rows):
                        yield name, lambda fn=fn, args=args, kwargs=kwargs: compile_launch(fn, args, kwargs)
    # float32 with TF32 allowed (torch.backends.cuda.matmul.allow_tf32): tensor-core dots, whose tiles
    # keep a transposed copy of an operand in shared memory; the fused tile at its widest D (512)
    with allow_tf32():
        launches = [launch for d in ((128, 256, 512) if full else (512,))
                    for update in ((None, "adamw") if full else ("adamw",))
                    for launch in linear_ce_launches(d, torch.float32, update=update)]
    for name, fn, args, kwargs in launches:
        yield f"{name} (TF32)", lambda fn=fn, args=args, kwargs=kwargs: compile_launch(fn, args, kwargs)


@contextlib.contextmanager
def allow_tf32():
    """Launches captured inside take their float32 dots in TF32, as under the torch setting."""
    import torch

    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def cache_report(cache_dir: str):
    """One line per kernel compiled into triton's cache (what a GPU run really compiled, with its own
    triton), by name: name, warps, stages, shared memory, registers and spill stack.  A generator, so
    that a caller stopped by a time limit has printed the lines before (bench/gpu_check.sh writes it
    after the benchmarks)."""
    import json
    from pathlib import Path

    from triton.runtime.jit import KernelInterface  # a JITFunction, or under TRITON_INTERPRET an InterpretedFunction

    from fastcyclic.kernels import linear_ce, optim

    kernels = []
    for meta_path in Path(cache_dir).glob("*/*.json"):
        cubin = meta_path.with_suffix(".cubin")
        if meta_path.name.startswith("__grp__") or not cubin.exists():
            continue
        meta = json.loads(meta_path.read_text())
        kernels.append((meta.get("name", meta_path.stem), meta_path.parent.name, meta, cubin))
    # ours first (a report cut off by its time limit keeps them), then torch.compile's, each by name
    ours = {name for module in (linear_ce, optim) for name, value in vars(module).items()
            if isinstance(value, KernelInterface)}
    kernels.sort(key=lambda kernel: (kernel[0] not in ours,) + kernel[:2])
    # cuobjdump -sass takes ~0.3 s a kernel: run them on every core (a GPU run's cache holds a few hundred)
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        usages = pool.map(lambda kernel: cubin_usage(kernel[3].read_bytes()), kernels)
        for (name, key, meta, _), usage in zip(kernels, usages):
            yield (f"{name:<32} w{meta.get('num_warps')} s{meta.get('num_stages')} "
                   f"shared {meta.get('shared', 0) / 1024:5.0f} KiB {usage}  ({key[:12]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcyclic.bench.sm90", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one configuration of each kind and the extreme widths "
                        "(what CI compiles)")
    parser.add_argument("--cache", nargs="?", const="", metavar="DIR",
                        help="report the kernels in triton's cache (default: $TRITON_CACHE_DIR, else "
                             "~/.triton/cache) instead of compiling")
    args = parser.parse_args(argv)
    if args.cache is not None:  # report a cache instead of compiling
        cache = args.cache or os.environ.get(
            "TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))
        found = 0
        for found, line in enumerate(cache_report(cache), 1):
            print(line, flush=True)
        if not found:
            print(f"no compiled kernels in {cache}")
        return 0
    full = not args.quick
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the kernels must be defined for the GPU to be compiled", file=sys.stderr)
        return 2
    failures = 0
    for name, compile_case in cases(full):
        try:
            kernel = compile_case()
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
