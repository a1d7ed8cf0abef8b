"""The new GPU kernels compile for an H100/H200 (sm_90) and fit its shared memory, checked on any
machine: the interpreter runs the kernels' arithmetic on CPU but never generates GPU code."""
import os
import subprocess
import sys


def test_optimizer_and_fused_update_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fastcyclic.bench.sm90", "--quick"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) >= 6 and all(line.startswith("ok") for line in lines), done.stdout
    assert any("fused adamw dW float32 D=1024" in line for line in lines)
