"""Measurement primitives shared by the benchmarks: timing, peak memory, machine facts, ceilings,
telemetry, the common record schema and atomic result files; and what every suite's command line,
table rows and exit code share (``add_device_arguments``, ``setup_device``, ``not_ok_row``, ...).

CUDA: ``triton.testing.do_bench`` (CUDA events, warm-up, the L2 cache flushed before every
repetition so inputs that fit in cache do not flatter), medians and quartiles; peak memory from
``torch.cuda.max_memory_allocated`` relative to what was allocated before the call.
CPU: ``time.perf_counter`` medians, a 32 MiB buffer written before every repetition (untimed) so the
inputs start outside the per-core caches (a shared L3 larger than that may still hold them; both sides
of a comparison get the same treatment); peak memory as the growth of the process's peak RSS (Linux
VmHWM, reset through /proc/self/clear_refs after returning freed memory with malloc_trim).

Ceilings (``ceilings``), measured once per process and device and shared by every suite of a run:
the copy bandwidth (``dst.copy_(src)`` of a tensor far beyond every cache, 2 x its bytes moved) and
the GEMM rate (bf16 and fp32 on CUDA, fp32 on CPU; 2*M*N*K FLOPs).  Every record states the
ceiling it is compared with and the fraction it reaches.

Record schema (``COMMON_FIELDS``, present in every record of every suite; suites add their own):
  bench, kind, case, method, dtype, device, status ("ok", "failed", "oom", "unavailable", "skipped"),
  median_ms, q25_ms, q75_ms, rate, rate_unit ("TFLOP/s" or "GB/s"), ceiling, ceiling_rate,
  frac_ceiling, peak_extra_gib, err, tolerance, correct (None: no check), reference, target, notes,
  error, telemetry (CUDA: NVML before and after the case; else "unavailable: ..."; None for a case
  skipped for lack of time, which ran nothing).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import ctypes
import gc
import importlib
import io
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from fastcyclic.kernels import TRITON_INSTALLED  # (the package only: triton itself is not imported)

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


CPU_FLUSH_BYTES = 32 << 20
_cpu_flush = None  # the buffer time_ms writes between CPU repetitions, made on first use


def time_ms(fn, device: torch.device, *, min_reps: int = 5, budget_ms: float = 300.0) -> dict:
    """Median and quartiles (ms) of fn(), already warmed up by the caller."""
    if device.type == "cuda":
        import triton.testing

        q25, median, q75 = triton.testing.do_bench(fn, warmup=25, rep=budget_ms, quantiles=[0.25, 0.5, 0.75])
        return {"median_ms": median, "q25_ms": q25, "q75_ms": q75}
    global _cpu_flush
    if _cpu_flush is None:
        _cpu_flush = torch.empty(CPU_FLUSH_BYTES // 4, dtype=torch.float32)
    times = []
    while len(times) < min(min_reps, 50) or (sum(times) < budget_ms and len(times) < 50):
        _cpu_flush.fill_(len(times))  # evict fn's inputs from L1/L2, as do_bench flushes the GPU's L2
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
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
    facts = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__ if TRITON_INSTALLED else "not installed",
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


_NVML = {"ready": False}


def _nvml_shutdown() -> None:
    try:
        import pynvml

        pynvml.nvmlShutdown()
    except Exception:
        pass


def gpu_telemetry() -> dict | str:
    """Driver, clocks, power and temperature from NVML, or "unavailable: why" (no library, no driver,
    no GPU).  NVML is initialised once per process (shut down at exit)."""
    try:
        import pynvml
    except ImportError:
        return "unavailable: nvidia-ml-py not installed"
    try:
        if not _NVML["ready"]:
            pynvml.nvmlInit()
            _NVML["ready"] = True
            atexit.register(_nvml_shutdown)
        handle = _nvml_handle(pynvml)
        name = pynvml.nvmlDeviceGetName(handle)
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        }
    except pynvml.NVMLError as exc:
        return f"unavailable: {exc}"
    except Exception as exc:  # telemetry must never stop a benchmark
        return f"unavailable: {type(exc).__name__}: {exc}"


def _nvml_handle(pynvml):
    """NVML's handle of torch's current CUDA device, found by UUID: NVML numbers every GPU of the machine,
    torch only the visible ones (CUDA_VISIBLE_DEVICES); by index where the UUID is not available."""
    index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None) if torch.cuda.is_available() else None
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def telemetry(device: torch.device) -> dict | str:
    """NVML telemetry on a CUDA run; on a CPU run the record says why there is none."""
    if device.type != "cuda":
        return "unavailable: not a CUDA run"
    return gpu_telemetry()


def attach_telemetry(record: dict, device: torch.device, before) -> dict:
    """record["telemetry"] = {"before": before, "after": now} on CUDA, "unavailable: ..." elsewhere."""
    after = telemetry(device)
    record["telemetry"] = {"before": before, "after": after} if device.type == "cuda" else after
    return record


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------------------------
# bad input: refused before anything runs or is written
# --------------------------------------------------------------------------------------------


class BenchInputError(ValueError):
    """A command line the benchmark refuses (exit code 2, nothing written)."""


class Unavailable(Exception):
    """A method that cannot run here (not installed, not supported by this torch or device): recorded as
    "unavailable", not as a failure."""


def finite_max(values) -> float:
    """The largest value, or inf if any is NaN or infinite: max() keeps a finite first value over a later NaN
    (NaN > x is False), so an error in the second tensor would go unseen."""
    values = list(values)
    return max(values) if all(math.isfinite(v) for v in values) else math.inf


def parse_dims(text: str, form: str, example: str) -> tuple[int, ...]:
    """The sizes of a shape written as ``form`` (e.g. "NxDxK"), separated by x or commas; an
    argparse.ArgumentTypeError naming the form otherwise."""
    try:
        dims = tuple(int(part) for part in text.lower().replace(",", "x").split("x"))
    except ValueError:
        dims = ()
    if len(dims) != len(form.split("x")):
        raise argparse.ArgumentTypeError(f"shape must look like {form} (e.g. {example}), got {text!r}")
    if any(n >= 2**31 for n in dims):  # (so that products of two sizes fit int64 offsets; the callers check the least)
        raise argparse.ArgumentTypeError(f"every size in {form} must be below 2^31, got {text!r}")
    return dims


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when available), "cpu" or "cuda"; "cuda" without CUDA is a BenchInputError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchInputError("--device cuda but CUDA is not available on this machine")
    if name not in ("auto", "cpu", "cuda"):
        raise BenchInputError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def add_threads_argument(parser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's; 1 is steadier on a busy shared machine)")


def apply_threads(args) -> None:
    """Refuse --threads < 1; else set torch's CPU thread count (before machine facts are read)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise BenchInputError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a dtype the device cannot compute in (bf16: torch emulates it on sm_7x, Triton's dots need sm_80)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(False):
        raise BenchInputError(f"this GPU ({torch.cuda.get_device_name(device)}) does not support bfloat16; "
                              "use --dtype fp32 (or fp16, where the suite offers it)")


def compile_static(fn):
    """torch.compile(fn) specialised to the shapes it meets (dynamic=False), as a user compiling one
    model would get; the recompile limit is raised because every case of a run recompiles the same
    function (otherwise Dynamo would switch to dynamic shapes after the first case, or give up)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    return torch.compile(fn, dynamic=False)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# the CPU allocator's RuntimeError, after "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
_CPU_OUT_OF_MEMORY = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")


def error_text(exc: BaseException) -> str:
    """The exception's type and first line, short enough for a table and a CSV cell; the CPU allocator's
    out-of-memory error as the size it asked for (its first 80 characters are an assertion's location)."""
    cpu_request = _CPU_OUT_OF_MEMORY.search(str(exc))
    if cpu_request:
        return f"{type(exc).__name__}: out of memory: tried to allocate {int(cpu_request[1]) / 2**30:.4g} GiB"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


FAILED = ("failed", "oom")  # statuses of a case that did not run through (our method's fail the suite)


def error_fields(exc: BaseException, context: str = "") -> dict:
    """status ("oom" or "failed") and error (context, then error_text) of a case that exc stopped."""
    out_of_memory = isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or bool(_CPU_OUT_OF_MEMORY.search(str(exc)))
    return {"status": "oom" if out_of_memory else "failed", "error": context + error_text(exc)}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# time budget (``fastcyclic bench all --budget-s``): cases past it are recorded as skipped
# --------------------------------------------------------------------------------------------

_DEADLINE = {"t": None}


def set_budget(seconds: float | None) -> None:
    _DEADLINE["t"] = None if seconds is None else time.monotonic() + seconds


def out_of_time() -> bool:
    return _DEADLINE["t"] is not None and time.monotonic() > _DEADLINE["t"]


SKIPPED = "time budget exhausted (--budget-s): not run"


# --------------------------------------------------------------------------------------------
# ceilings
# --------------------------------------------------------------------------------------------

# fp32 elements: 1 GiB on a GPU, 64 MiB on a CPU, beyond the caches (on this 2-core VM a 16 MiB --quick copy
# measured 29 GB/s against 13.7 at 64 MiB: it sat in L3; 32 MiB measured as 64 MiB does)
COPY_NUMEL = {"cuda": 2**28, "cpu": 2**24, "quick": 2**23}
GEMM_SIZE = {"cuda": 8192, "cpu": 1024, "quick": 512}
_CEILINGS: dict = {}


def measure_copy(device: torch.device, numel: int, *, quick: bool) -> dict:
    """Bandwidth of dst.copy_(src), which reads and writes every byte once (GB/s = 1e9 B/s)."""
    record = dict(method="copy", numel=numel, dtype="float32", device=device.type)
    try:
        src = torch.randn(numel, device=device)
        dst = torch.empty_like(src)
        copy = dst.copy_
        copy(src)  # warm-up, and the first touch of dst's pages
        record.update(time_ms(lambda: copy(src), device, budget_ms=100.0 if quick else 300.0))
        record.update(status="ok", bytes=2 * src.nbytes)
        record["gbps"] = record["bytes"] / (record["median_ms"] * 1e6)
    except Exception as exc:
        record.update(error_fields(exc))
    return record


def measure_gemm(device: torch.device, dtype: torch.dtype, size: int, *, quick: bool) -> dict:
    """Rate of a square size^3 matmul in dtype (TFLOP/s = 2 size^3 / time)."""
    tf32 = None
    if device.type == "cuda" and TRITON_INSTALLED:
        from fastcyclic.kernels.linear_ce import tf32_allowed  # (triton: imported here on a GPU only)

        tf32 = tf32_allowed()
    record = dict(method="gemm", m=size, n=size, k=size, dtype=dtype_name(dtype), device=device.type,
                  allow_tf32=tf32)
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(size, size, generator=g).to(device, dtype)
        b = torch.randn(size, size, generator=g).to(device, dtype)
        out = torch.empty(size, size, device=device, dtype=dtype)
        torch.matmul(a, b, out=out)  # warm-up (library heuristics, first touch)
        record.update(time_ms(lambda: torch.matmul(a, b, out=out), device, budget_ms=100.0 if quick else 300.0))
        record.update(status="ok", flops=2 * size**3)
        record["tflops_per_s"] = record["flops"] / (record["median_ms"] * 1e9)
    except Exception as exc:
        record.update(error_fields(exc))
    return record


def ceilings(device: torch.device, *, quick: bool = False) -> dict:
    """{"copy": record, "gemm_bfloat16": record (CUDA), "gemm_float32": record}, measured on first use
    and cached for the process, so all suites of one run share one measurement."""
    key = (str(device), quick)
    if key not in _CEILINGS:
        # on a GPU the full sizes take milliseconds, and a --quick copy would fit in the L2 cache
        size = "quick" if quick and device.type != "cuda" else device.type
        result = {"copy": measure_copy(device, COPY_NUMEL[size], quick=quick)}
        release(device)
        dtypes = (torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.float32,)
        for dtype in dtypes:
            if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(False):
                continue
            result[f"gemm_{dtype_name(dtype)}"] = measure_gemm(device, dtype, GEMM_SIZE[size], quick=quick)
            release(device)
        _CEILINGS[key] = result
    return _CEILINGS[key]


def copy_ceiling(ceil: dict | None) -> tuple[str | None, float | None]:
    """("copy", GB/s) or (None, None) when it could not be measured."""
    rec = (ceil or {}).get("copy")
    if rec and rec.get("status") == "ok":
        return "copy", rec["gbps"]
    return None, None


def gemm_ceiling(ceil: dict | None, dtype: torch.dtype) -> tuple[str | None, float | None]:
    """The GEMM rate measured in dtype, else the bf16 one, else the fp32 one: (name, TFLOP/s)."""
    ceil = ceil or {}
    for name in (f"gemm_{dtype_name(dtype)}", "gemm_bfloat16", "gemm_float32"):
        rec = ceil.get(name)
        if rec and rec.get("status") == "ok":
            return name, rec["tflops_per_s"]
    return None, None


def format_ceilings(ceil: dict) -> str:
    parts = []
    for name, rec in ceil.items():
        if rec.get("status") != "ok":
            parts.append(f"{name}: {rec.get('status')} ({rec.get('error', '')[:60]})")
        elif name == "copy":
            parts.append(f"copy {rec['gbps']:.1f} GB/s")
        else:
            parts.append(f"{name} {rec['tflops_per_s']:.2f} TFLOP/s ({rec['m']}^3)")
    return "ceilings: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------
# the common record schema and the result files
# --------------------------------------------------------------------------------------------

COMMON_FIELDS = ("bench", "kind", "case", "method", "dtype", "device", "status", "median_ms", "q25_ms", "q75_ms",
                 "rate", "rate_unit", "ceiling", "ceiling_rate", "frac_ceiling", "peak_extra_gib", "err",
                 "tolerance", "correct", "reference", "target", "notes", "error", "telemetry")
CSV_COMMON = tuple(f for f in COMMON_FIELDS if f != "telemetry")


def set_rate(record: dict, rate: float | None, unit: str, ceiling: tuple[str | None, float | None]) -> dict:
    """rate, rate_unit, ceiling, ceiling_rate and frac_ceiling = rate / ceiling_rate."""
    name, value = ceiling
    record.update(rate=rate, rate_unit=unit, ceiling=name, ceiling_rate=value)
    record["frac_ceiling"] = rate / value if (rate is not None and value) else None
    return record


def complete(record: dict) -> dict:
    """Every COMMON_FIELDS key present (None where it does not apply); the common ones first."""
    ordered = {k: record.get(k) for k in COMMON_FIELDS}
    ordered.update((k, v) for k, v in record.items() if k not in ordered)
    record.clear()
    record.update(ordered)
    return record


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def take_out_dir(out) -> contextlib.ExitStack:
    """Lock --out (a directory, made here) for this run; the caller releases it with ``with``.  Without it, two
    benches writing to one --out at once left each other's JSON, CSV and figure mixed, or the later one's results
    replaced by the other's partial ones.  The last check of a command line: a refusal leaves nothing behind."""
    from fastcyclic.files import exclusive_lock

    held = contextlib.ExitStack()
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        try:
            held.enter_context(exclusive_lock(os.fspath(out), f"another fastcyclic bench is writing to --out "
                                                              f"{os.fspath(out)!r}"))
        except ValueError as e:
            raise BenchInputError(str(e)) from None
    return held


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write data so that a reader never sees half a file (``fastcyclic.files.write_bytes``)."""
    from fastcyclic.files import write_bytes

    write_bytes(os.fspath(path), data.encode() if isinstance(data, str) else data)
    return Path(path)


def csv_text(records: list[dict], fields) -> str:
    """CSV of records over fields; dicts and lists become JSON text."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow({k: json.dumps(_json_safe(v)) if isinstance(v, (dict, list, tuple)) else v
                         for k, v in r.items() if k in fields})
    return buffer.getvalue()


def write_suite(out: Path, name: str, machine: dict, records: list[dict], *, ceil: dict | None = None,
                csv_fields=(), extra: dict | None = None, complete: bool = True) -> list[Path]:
    """NAME.json ({"suite", "complete", "machine", "ceilings", "records", ...extra}) and NAME.csv (the common
    fields, then csv_fields), each written atomically.  complete=False: the files a run rewrites after each case,
    so that one stopped early keeps what it measured and says it stopped early."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(list(CSV_COMMON) + list(csv_fields)))
    results = {"suite": name, "complete": complete, "machine": machine, "ceilings": ceil or {}, "records": records}
    results.update(extra or {})
    return [write_atomic(out / f"{name}.json", json.dumps(_json_safe(results), indent=1)),
            write_atomic(out / f"{name}.csv", csv_text(records, fields))]


def fail(message: str) -> int:
    """Print a refusal to stderr; the exit code of bad input."""
    print(f"error: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------------------------
# what every suite's command line, table and exit code share
# --------------------------------------------------------------------------------------------


def _and_list(items) -> str:
    """"a", "a and b", "a, b and c"."""
    items = [str(item) for item in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def add_device_arguments(parser) -> None:
    """--device (auto, cpu or cuda) and --threads."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_threads_argument(parser)


def add_quick_argument(parser, what: str) -> None:
    """--quick, a self-check on small what (shapes, sizes, cases) with short timing."""
    parser.add_argument("--quick", action="store_true", help=f"small {what} and short timing: a self-check")


def _out_dir(text: str) -> Path:
    from fastcyclic.sweep import directory_name  # (Path("") is the current directory)

    return Path(directory_name(text))


def add_out_argument(parser, files, *, also: tuple = ()) -> None:
    """--out DIR, its help naming the files written there (and `also`, other things written there); setup_device
    checks that none of the files is a directory."""
    parser.add_argument("--out", type=_out_dir, default=None,
                        help=f"directory for {_and_list(tuple(files) + tuple(also))} (without it, nothing is written; "
                             "one bench at a time)")
    parser.set_defaults(out_files=tuple(files))


def setup_device(args) -> torch.device:
    """The device --device names, with --threads applied, --interpret (where offered) refused on CUDA,
    and --out (where given) checked to be a writable directory."""
    device = resolve_device(args.device)
    apply_threads(args)
    if getattr(args, "interpret", False) and device.type == "cuda":
        raise BenchInputError("--interpret runs the Triton kernels on CPU; use it with --device cpu")
    if getattr(args, "interpret", False) and not TRITON_INSTALLED:
        raise BenchInputError("--interpret runs the Triton kernels, but the triton package is not installed "
                              "(pip installs it with fastcyclic on Linux only)")
    check_out_dir(getattr(args, "out", None), getattr(args, "out_files", ()))
    return device


def check_out_dir(out, files=()) -> None:
    """--out must be a directory, or creatable as one where it does not exist, and `files` (written there) must not
    be directories: refused before anything runs (the results are written only at the end of each case)."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BenchInputError(f"--out {str(out)!r} is a file, not a directory")
    for name in files:
        if (out / name).is_dir():
            raise BenchInputError(f"--out {str(out)!r} holds a directory {name!r}, where the results file of that name "
                                  "goes")
    existing = next(p for p in (out, *out.parents) if os.path.lexists(p))  # a broken link exists too
    if not existing.is_dir():
        raise BenchInputError(f"--out {str(out)!r} cannot be created: {str(existing)!r} is not a directory (a broken "
                              "or looping symbolic link?)")
    try:  # a directory made and removed again: the one test of writability that holds for root and /proc alike
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".fastcyclic-write-test-"))
    except OSError as e:
        raise BenchInputError(f"--out {str(out)!r} cannot be created: {str(existing)!r} is not a writable "
                              f"directory ({e.strerror})") from None


def machine_title(machine: dict, *, triton: bool = True) -> str:
    """The GPU (else the CPU), torch and triton versions, as a suite's first line names them."""
    return (f"{machine.get('gpu', machine['cpu'])}, torch {machine['torch']}"
            + (f", triton {machine['triton']}" if triton else ""))


def print_ceilings(device: torch.device, *, quick: bool) -> dict:
    """ceilings(device, quick=quick) (measured once per process), printed on one line."""
    ceil = ceilings(device, quick=quick)
    print(format_ceilings(ceil))
    return ceil


def or_na(value, spec: str) -> str:
    """value formatted with spec, or "n/a" where it is None."""
    return "n/a" if value is None else format(value, spec)


def not_ok_row(head: str, r: dict, width: int) -> str:
    """The table row of a record that did not run ok: head, status and the first width characters of its error."""
    return f"{head} {r['status']}: {(r.get('error') or '')[:width]}"


def plot_vs(records: list[dict], x: str, xlabel: str, time_label: str, title: str = "") -> bytes:
    """PNG: median time and peak extra memory against record[x], one line per method (and optimizer, and dtype
    where the records hold several), from the records that ran ok (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, LogLocator, NullLocator

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_t, ax_m = fig.subplots(1, 2)
    several_dtypes = len({r.get("dtype") for r in records}) > 1
    lines: dict = {}
    for r in records:
        if r.get("status") == "ok" and r.get(x) is not None and r.get("median_ms") is not None:
            label = " ".join(str(v) for v in (r.get("optimizer"), r["method"], several_dtypes and r.get("dtype")) if v)
            lines.setdefault(label, []).append(r)
    for i, (label, rows) in enumerate(lines.items()):
        rows.sort(key=lambda r: r[x])
        # one colour and marker per method in both panels (a method without memory figures must not shift them)
        style = dict(color=f"C{i % 10}", marker="os^vD"[i // 10 % 5], label=label)
        ax_t.plot([r[x] for r in rows], [r["median_ms"] for r in rows], **style)
        mem = [(r[x], r["peak_extra_gib"]) for r in rows if r.get("peak_extra_gib") is not None]
        if mem:
            ax_m.plot([m[0] for m in mem], [m[1] for m in mem], **style)
    xs = sorted({r[x] for rows in lines.values() for r in rows})
    for ax, label in ((ax_t, time_label), (ax_m, "peak extra memory (GiB)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        if lines:
            ax.set_xscale("log", base=2)
            if len(xs) <= 8:  # the measured sizes themselves, not powers of two near them (P = 113 read as 2^7)
                ax.set_xticks(xs, [str(v) for v in xs])
                ax.xaxis.set_minor_locator(NullLocator())
            if ax is ax_t:
                ax.set_yscale("log")
            else:  # linear near 0, where a method that allocates nothing extra sits
                ax.set_yscale("symlog", linthresh=1e-3)
                top = max([line.get_ydata().max() for line in ax.get_lines()] + [1e-3])
                ax.set_ylim(0, 1.6 * top)  # from 0 (it showed -10^-2 GiB), with room above the highest point
            # plain numbers at 1, 2, 5 x 10^k: a log axis labelled only its decades hid most values
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)) if ax is ax_t else
                                       FixedLocator([0.0] + [m * 10.0 ** e for e in range(-3, 4) for m in (1, 2, 5)]))
            ax.yaxis.set_major_formatter(lambda value, position: f"{value:g}")
            ax.yaxis.set_minor_locator(NullLocator())
            if ax is ax_t:
                ax.margins(y=0.12)  # headroom: a point on the top edge was cut in half
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no successful case", ha="center", va="center", transform=ax.transAxes)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_plot(out: Path, name: str, machine: dict, records: list[dict], x: str, xlabel: str,
               time_label: str, complete: bool = True) -> list[Path]:
    """[NAME.png] (plot_vs, written atomically), or [] with a warning: a figure must not cost the measurements.
    complete=False (the rewrite after each case): no figure (drawing one takes ~0.3 s, out of the run's time
    budget), and a figure of an earlier run in `out` is removed, so none disagrees with the new NAME.json."""
    if not complete:
        (Path(out) / f"{name}.png").unlink(missing_ok=True)
        return []
    dtypes = ", ".join(dict.fromkeys(r["dtype"] for r in records if r.get("dtype")))
    title = f"fastcyclic bench {name}: {machine.get('gpu', machine.get('cpu', ''))}" + (f", {dtypes}" if dtypes else "")
    try:
        return [write_atomic(Path(out) / f"{name}.png", plot_vs(records, x, xlabel, time_label, title))]
    except Exception as exc:
        print(f"warning: {name}.png not written: {error_text(exc)}", file=sys.stderr)
        return []


def suite_writer(name: str, csv_fields, plot: tuple[str, str, str]):
    """write_results(out, machine, records, ceil=None, complete=True) of a suite that writes NAME.json, NAME.csv
    and NAME.png (plot: write_plot's x, xlabel and time_label)."""
    def write_results(out: Path, machine: dict, records: list[dict], ceil: dict | None = None,
                      complete: bool = True) -> list[Path]:
        return (write_suite(out, name, machine, records, ceil=ceil, csv_fields=csv_fields, complete=complete)
                + write_plot(out, name, machine, records, *plot, complete=complete))

    write_results.__doc__ = f"{name}.json, {name}.csv and (complete) {name}.png, each written atomically."
    return write_results


def wrote(out: Path, files) -> str:
    """The line that names the files written under out."""
    return "wrote " + _and_list(Path(out) / f for f in files)


INCOMPLETE = 3  # the exit code of a suite that found nothing wrong but left some of our cases unrun (time budget)


def meets(record: dict, bounds: dict) -> Optional[bool]:
    """Whether a record's figures meet target bounds (speedups at least, the rest at most); None while one of
    them is unknown (not measured, or not yet: a verdict on part of a target would be no verdict).  A NaN
    figure is known and meets nothing."""
    if any(record.get(key) is None for key in bounds):
        return None
    return all(record[key] >= bound if key.startswith("speedup") else record[key] <= bound
               for key, bound in bounds.items())


def exit_status(wrong: list, failed: list, message: str, skipped: list = ()) -> int:
    """0; 1 after printing "FAILED: " + message ({wrong} and {failed}: the counts) to stderr; or INCOMPLETE when
    nothing failed but cases of our method were skipped: they were not checked, which is no pass."""
    if wrong or failed:
        print("FAILED: " + message.format(wrong=len(wrong), failed=len(failed)), file=sys.stderr)
        return 1
    if skipped:
        print(f"INCOMPLETE: {len(skipped)} case(s) of fastcyclic were not run (time budget), so not checked",
              file=sys.stderr)
        return INCOMPLETE
    return 0
