"""Measurement primitives shared by the benchmarks: timing, peak memory, machine facts.

CUDA: ``triton.testing.do_bench`` (CUDA events, warm-up, the L2 cache flushed before every
repetition so inputs that fit in cache do not flatter), medians and quartiles; peak memory from
``torch.cuda.max_memory_allocated`` relative to what was allocated before the call.
CPU: ``time.perf_counter`` medians; peak memory as the growth of the process's peak RSS (Linux
VmHWM, reset through /proc/self/clear_refs after returning freed memory with malloc_trim).
"""
from __future__ import annotations

import ctypes
import gc
import platform
import statistics
import time

import torch


def time_ms(fn, device: torch.device, *, min_reps: int = 5, budget_ms: float = 300.0) -> dict:
    """Median and quartiles (ms) of fn(), already warmed up by the caller."""
    if device.type == "cuda":
        import triton.testing

        q25, median, q75 = triton.testing.do_bench(fn, warmup=25, rep=budget_ms, quantiles=[0.25, 0.5, 0.75])
        return {"median_ms": median, "q25_ms": q25, "q75_ms": q75}
    times = []
    deadline = time.perf_counter() + budget_ms / 1e3
    while len(times) < min_reps or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        if len(times) >= 50:
            break
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return {"median_ms": statistics.median(times), "q25_ms": q[0], "q75_ms": q[2]}


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak memory fn() allocates beyond what exists before it (its outputs included while alive).
    None where the platform gives no way to measure it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    base = _proc_status_kib("VmRSS")
    fn()
    peak = _proc_status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return (peak - base) * 1024


def machine_facts(device: torch.device) -> dict:
    """Versions and hardware, written at the top of every result file."""
    import triton

    facts = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, sm_count=props.multi_processor_count, cuda=torch.version.cuda,
                     gpu_memory_gib=round(props.total_memory / 2**30, 1))
    facts["nvml"] = gpu_telemetry()
    return facts


def gpu_telemetry() -> dict | str:
    """Driver, clocks, power and temperature from NVML, or "unavailable" (no driver, no GPU)."""
    try:
        import pynvml
    except ImportError:
        return "unavailable: nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device() if torch.cuda.is_available() else 0)
            name = pynvml.nvmlDeviceGetName(handle)
            return {
                "name": name.decode() if isinstance(name, bytes) else name,
                "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
                "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
                "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            }
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        return f"unavailable: {exc}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
