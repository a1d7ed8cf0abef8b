import os
import random
import zlib

import pytest
import torch

# The same tests run the real Triton kernels natively on a GPU and under the interpreter on CPU.
# triton.jit reads the variable when a kernel is defined, so it is set before any kernel import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# cuBLAS reads its workspace setting once, at the process's first matmul: deterministic-mode tests
# (TrainConfig(deterministic=True)) need it set before any test has run a CUDA matmul
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# Fresh random inputs every run, reproducible on failure: FASTCYCLIC_TEST_SEED=<seed> pytest ...
# (set in the environment so that pytest-xdist workers share it)
os.environ.setdefault("FASTCYCLIC_TEST_SEED", str(random.randrange(2**31)))
SEED = int(os.environ["FASTCYCLIC_TEST_SEED"])


def pytest_report_header(config):
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (TRITON_INTERPRET=1)"
    return f"fastcyclic: test seed {SEED} (set FASTCYCLIC_TEST_SEED to repeat), device {device}"


@pytest.fixture(autouse=True)
def _restore_deterministic_mode():
    """TrainConfig(deterministic=True) turns torch's deterministic mode on for the process: off again after
    the test, so later tests in the same worker run as they would alone."""
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a small shared CPU two OpenMP threads wait on each other's time
    slices and a 0.1 ms op takes 50 ms (for tests that run benchmarks; their timings are not checked)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gen(request):
    """A CPU torch.Generator seeded from the session seed and the test's id."""
    return torch.Generator().manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()))


# On a GPU, after the GPU-only tests: the files whose CUDA paths had never run on one (the trainer's CUDA graphs,
# the optimizers), then the kernels' (natively compiled there, interpreted on CPU), then the rest
GPU_FILE_ORDER = ("test_train.py", "test_optim.py", "test_linear_ce.py")


def _gpu_order(item) -> tuple:
    name = item.path.name
    return "cuda" not in item.keywords, GPU_FILE_ORDER.index(name) if name in GPU_FILE_ORDER else len(GPU_FILE_ORDER)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        # the tests that only a GPU runs go first, so a time-limited GPU session (bench/gpu_check.sh) reaches
        # them before the rest, which CPU CI also runs (a stable sort: the same order in every xdist worker)
        items.sort(key=_gpu_order)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by bench/gpu_check.sh)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if exitstatus != 0:
        terminalreporter.write_line(f"fastcyclic: test seed {SEED}; repeat with FASTCYCLIC_TEST_SEED={SEED}")
