"""The GPU kernels compile for an H100/H200 (sm_90) and fit its shared memory, checked on any machine: the
interpreter runs the kernels' arithmetic on CPU but never generates GPU code.  Each check runs in a subprocess
without TRITON_INTERPRET (the kernels must be defined for the GPU to be compiled)."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.portable


def without_interpreter(*argv, code=None, cache=None):
    """`python -m fastcyclic.bench.sm90 ARGV` (or `python -c CODE`) without the interpreter; the finished process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache is not None:
        env["TRITON_CACHE_DIR"] = str(cache)
    command = ["-c", code] if code is not None else ["-m", "fastcyclic.bench.sm90", *argv]
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_every_kernel_kind_compiles_for_sm90():
    lines = without_interpreter("--quick").stdout.splitlines()
    assert len(lines) >= 6 and all(line.startswith("ok") for line in lines), lines
    for kernel in ("forward bfloat16 D=256", "backward_dw bfloat16 D=256", "backward_dh float32 D=128",
                   "logit_grad bfloat16", "fused adamw dW float32 D=1024", "forward bfloat16 D=256 K=4097 bias",
                   "logit_grad bfloat16 D=256 K=4097 bias splits=2",
                   "backward_dw (dbias alone) bfloat16 D=256 K=4097 bias splits=2"):
        assert any(kernel in line for line in lines), (kernel, lines)
    # the fused update's N loop holds the dW tile in registers: no spills in it at these widths (fp32 D = 512
    # with 64 h rows per step spilled 158 local loads/stores per iteration)
    fused = [line for line in lines if line.split()[1] == "fused"]
    assert len(fused) >= 6 and all("(0 in loops)" in line for line in fused), fused


def test_spill_count_tells_loops_from_epilogue():
    from fastcyclic.bench.sm90 import sass_summary

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a0000017a02 */
        /*0010*/                   STL [R1+0x4], R2 ;                      /* 0x0000040201007387 */
        /*0020*/                   FFMA R4, R5, R6, R4 ;                   /* 0x0000000605047223 */
        /*0030*/                   LDL R7, [R1+0x4] ;                      /* 0x0000040001077983 */
        /*0040*/              @!P0 BRA 0x20 ;                              /* 0xfffffffc00088947 */
        /*0050*/                   STL.64 [R1+0x8], R8 ;                   /* 0x0000080801007387 */
        /*0060*/              @P1 BRA 0x80 ;                               /* 0x0000001000041947 */
        /*0070*/                   EXIT ;                                  /* 0x000000000000794d */
    """
    assert sass_summary(sass) == "SPILLS:3 (1 in loops) LOOP:3"


def test_the_check_compiles_what_a_launch_compiles():
    """The linear cross-entropy kernels are compiled from captured launches with the JIT's
    specialization: a unit stride becomes a constant, so the compiled kernel has no such argument."""
    out = without_interpreter(code=(
        "import torch; from fastcyclic.bench import sm90; "
        "launches = list(sm90.linear_ce_launches(64, torch.bfloat16)); "
        "name, fn, args, kwargs = launches[0]; k = sm90.compile_launch(fn, args, kwargs); "
        "print(name, len(launches), sorted(fn.arg_names[i[0]] for i in k.src.constants))")).stdout
    assert out.startswith("forward bfloat16 D=64") and " 4 " in out  # forward, dh, dW, g
    assert "stride_hd" in out and "stride_wd" in out, out


def test_cache_report_lists_what_was_compiled(tmp_path):
    """--cache reports the kernels in a triton cache (bench/gpu_check.sh runs it on the GPU's own), ours first: a
    report stopped by its time limit keeps them, whatever torch.compile (or anyone) compiled besides."""
    (tmp_path / "other.py").write_text(
        "import triton\n\n\n@triton.jit\ndef _a_kernel_of_someone_else(x_ptr):\n    x_ptr += 0\n")
    without_interpreter(cache=tmp_path / "cache", code=(
        f"import sys, torch\nsys.path.insert(0, {str(tmp_path)!r})\nimport other\nfrom fastcyclic.bench import sm90\n"
        "for _, fn, args, kwargs in sm90.linear_ce_launches(32, torch.bfloat16):\n"
        "    sm90.compile_launch(fn, args, kwargs)\n"
        "sm90.compile_sm90(other._a_kernel_of_someone_else, '*fp32', {}, 1)\n"))
    lines = without_interpreter("--cache", str(tmp_path / "cache")).stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["_backward_dh_kernel", "_backward_dw_kernel", "_forward_kernel",
                                                   "_logit_grad_kernel", "_a_kernel_of_someone_else"]
    assert all("KiB REG:" in line for line in lines), lines


def test_aligned_optimizer_kernel_uses_16_byte_accesses():
    """With ALIGNED (all addresses 16-byte aligned, checked on the host) the AdamW kernel's whole blocks load and
    store 16 bytes at a time; without it every access is 4 bytes wide."""
    out = without_interpreter(code=(
        "import re, triton.language as tl\nfrom fastcyclic.bench import sm90\n"
        "from fastcyclic.kernels import optim\nfor aligned in (True, False):\n"
        "    k = sm90.compile_sm90(optim._multi_tensor_adamw_kernel, '*fp32', dict(P_DTYPE=tl.float32, "
        "G_DTYPE=tl.float32, DECOUPLED=True, HAS_SKIP=False, ALIGNED=aligned, BLOCK=4096, INTERPRET=False), "
        "optim.NUM_WARPS)\n"
        "    print(aligned, len(re.findall(r'ld\\.global\\.v4', k.asm['ptx'])), "
        "len(re.findall(r'st\\.global\\.v4', k.asm['ptx'])))\n")).stdout
    counts = {line.split()[0]: tuple(map(int, line.split()[1:])) for line in out.splitlines()}
    assert counts["True"][0] >= 16 and counts["True"][1] >= 12, counts  # p, g, m, v: 4 x 16 B per thread each
    assert counts["False"] == (0, 0), counts
