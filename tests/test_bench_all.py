"""`fastcyclic bench all` and what every suite shares: the record schema, ceilings, telemetry, atomic
files, refusals of bad input, and the pytest-benchmark micro-benchmarks kept out of the default run."""
import argparse
import configparser
import csv
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcyclic.bench import all_suites, ce, geometry, measure, optim, train
from fastcyclic.cli import main

ROOT = Path(__file__).resolve().parents[1]
# one torch thread: on a small shared machine two OpenMP threads wait on each other (conftest.py)
pytestmark = [pytest.mark.portable, pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def tiny(monkeypatch):
    """Every suite's --quick defaults shrunk to a second's worth of work, and fresh (small) ceilings."""
    monkeypatch.setitem(ce.QUICK_SHAPES, "cpu", ((48, 16, 301),))
    monkeypatch.setitem(optim.QUICK_SIZES, "cpu", (3000,))
    monkeypatch.setitem(optim.CE_SHAPE, "quick", (48, 16, 301))
    monkeypatch.setitem(train.QUICK_SHAPES, "cpu", ((31, 8),))
    monkeypatch.setitem(geometry.QUICK_SHAPES, "cpu", ((257, 16),))
    monkeypatch.setitem(measure.COPY_NUMEL, "quick", 2**18)
    monkeypatch.setitem(measure.GEMM_SIZE, "quick", 128)
    monkeypatch.setattr(measure, "_CEILINGS", {})


def test_quick_cpu_run_of_every_suite_into_one_directory(tiny, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["bench", "all", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "all.json").read_text())
    assert summary["complete"] is True and summary["requested"] == ["ce", "optim", "train", "geometry"]
    assert [s["suite"] for s in summary["suites"]] == ["ce", "optim", "train", "geometry"]
    for s in summary["suites"]:
        assert s["rc"] == 0 and s["status"] == "ok" and s["seconds"] > 0 and s["records"]["ok"] >= 1, s
    ceilings = summary["ceilings"]
    assert ceilings["copy"]["numel"] == 2**18 and ceilings["gemm_float32"]["m"] == 128

    for name in all_suites.SUITES:
        results = json.loads((out / name / f"{name}.json").read_text())
        assert results["suite"] == name and results["complete"] is True
        assert (out / name / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # time and memory vs K
        assert results["ceilings"] == ceilings  # measured once, shared by every suite
        for r in results["records"]:
            assert list(r)[:len(measure.COMMON_FIELDS)] == list(measure.COMMON_FIELDS), (name, r)
            assert r["bench"] == name and r["device"] == "cpu"
            assert r["telemetry"].startswith("unavailable")
            if r["status"] == "ok":
                assert r["median_ms"] > 0 and r["rate"] > 0 and r["rate_unit"] in ("TFLOP/s", "GB/s")
                assert r["ceiling"] and r["frac_ceiling"] == pytest.approx(r["rate"] / r["ceiling_rate"])
                if r.get("kind") != "ceiling":
                    assert r["err"] is not None and r["tolerance"] is not None
                    # (optim's torch reference is compared with itself: not judged)
                    assert r["correct"] is True or r["notes"] == "the reference itself: not judged", r
        header = next(csv.reader((out / name / f"{name}.csv").open()))
        assert header[:len(measure.CSV_COMMON)] == list(measure.CSV_COMMON)
        assert not list((out / name).glob("*.tmp"))
    printed = capsys.readouterr().out
    for name in all_suites.SUITES:
        assert f"==== fastcyclic bench {name} ====" in printed
    assert "summary" in printed


def test_a_crashing_suite_is_recorded_and_the_run_goes_on(tiny, tmp_path, monkeypatch):
    def crash(args, **kwargs):
        raise RuntimeError("optim suite exploded")

    monkeypatch.setattr(optim, "run_suite", crash)
    out = tmp_path / "res"
    assert main(["bench", "all", "--device", "cpu", "--quick", "--suites", "optim", "geometry",
                 "--out", str(out)]) == 1
    suites = {s["suite"]: s for s in json.loads((out / "all.json").read_text())["suites"]}
    assert suites["optim"]["status"] == "crashed" and "exploded" in suites["optim"]["error"]
    assert suites["geometry"]["status"] == "ok"
    assert (out / "geometry" / "geometry.json").exists() and not (out / "optim").exists()


def test_an_interrupted_run_says_where_it_stopped(tiny, tmp_path, monkeypatch, capsys):
    """Ctrl-C, or SIGTERM from an outer time limit (gpu_check.sh's timeout): all.json names the suite that was
    running and is not complete; the suite's own files hold its finished cases, marked incomplete."""
    def interrupted_after_one_case(args, **kwargs):
        train.write_results(args.out, {"cpu": "x"}, [{"method": "eager", "status": "ok"}], complete=False)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_suite", interrupted_after_one_case)
    out = tmp_path / "res"
    assert main(["bench", "all", "--device", "cpu", "--quick", "--suites", "geometry", "train", "optim",
                 "--out", str(out)]) == 130
    summary = json.loads((out / "all.json").read_text())
    assert summary["complete"] is False and summary["requested"] == ["geometry", "train", "optim"]
    assert [(s["suite"], s["status"]) for s in summary["suites"]] == [("geometry", "ok"), ("train", "interrupted")]
    assert json.loads((out / "train" / "train.json").read_text())["complete"] is False
    assert "fastcyclic bench all: interrupted" in capsys.readouterr().err


def test_a_suite_folder_that_is_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    """It was found when that suite started: after the ceilings, with all.json already written (exit 1)."""
    out = tmp_path / "res"
    out.mkdir()
    (out / "geometry").write_text("mine")
    assert main(["bench", "all", "--device", "cpu", "--quick", "--suites", "train", "geometry", "--out",
                 str(out)]) == 2
    assert f"--out {str(out / 'geometry')!r} is a file" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["geometry"]


def test_budget_spent_records_every_case_as_skipped(tiny, tmp_path):
    """Nothing of ours was run, so nothing was checked: exit 3 (incomplete), where it was 0 and every suite "ok"."""
    out = tmp_path / "res"
    assert main(["bench", "all", "--device", "cpu", "--quick", "--budget-s", "1e-9", "--out", str(out)]) == \
        measure.INCOMPLETE == 3
    assert not measure.out_of_time()  # the budget ends with the command
    suites = json.loads((out / "all.json").read_text())["suites"]
    assert [(e["suite"], e["status"], e["rc"]) for e in suites] == [
        (name, "incomplete (time budget)", 3) for name in all_suites.SUITES]
    for name in all_suites.SUITES:  # optim's steps and its CE + update cases too
        records = json.loads((out / name / f"{name}.json").read_text())["records"]
        cases = [r for r in records if r["method"] != "copy"]  # (optim's record of its ceiling, measured first)
        assert cases and {r["status"] for r in cases if r["status"] != "unavailable"} == {"skipped"}
        # a baseline that cannot run here says so still (liger and cce need CUDA)
        assert {r["method"] for r in records if r["status"] == "unavailable"} <= {"liger", "cce", "torch_lce"}


@pytest.mark.parametrize("figures, met", [
    (dict(median_ms=2.0, peak_extra_gib=0.5), True), (dict(median_ms=2.0, peak_extra_gib=0.6), True),
    (dict(median_ms=2.01, peak_extra_gib=0.5), False), (dict(median_ms=2.0, peak_extra_gib=None), None),
    (dict(median_ms=2.0), None), (dict(median_ms=2.0, peak_extra_gib=0.5, speedup_vs_eager=0.99), False)])
def test_a_target_is_met_at_its_bounds_and_not_judged_without_a_figure(figures, met):
    """Speedups at least, the rest at most; a figure not measured gives no verdict (bench train read it as met
    when its check was written inline)."""
    bounds = dict(median_ms=2.0, peak_extra_gib=0.6)
    if "speedup_vs_eager" in figures:
        bounds["speedup_vs_eager"] = 1.0
    assert measure.meets(figures, bounds) is met


@pytest.mark.parametrize("suite", ["ce", "optim", "train", "geometry"])
def test_a_suite_stopped_before_any_case_replaces_an_earlier_runs_files(suite, tmp_path, monkeypatch):
    """Stopped while measuring the ceilings, a suite left an earlier run's files in --out, "complete": true."""
    out = tmp_path / "res"
    out.mkdir()
    for ext in ("json", "csv", "png"):
        (out / f"{suite}.{ext}").write_text('{"complete": true, "records": [{"method": "earlier"}]}')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(measure, "print_ceilings", interrupted)
    assert main(["bench", suite, "--device", "cpu", "--quick", "--out", str(out)]) == 130
    results = json.loads((out / f"{suite}.json").read_text())
    assert results["complete"] is False and results["records"] == []
    assert "earlier" not in (out / f"{suite}.csv").read_text() and not (out / f"{suite}.png").exists()


def test_missing_optional_baselines_are_reported_not_crashed(tmp_path, monkeypatch):
    """liger-kernel and cut-cross-entropy (the optional `bench` extra): absent, or on CPU, a record says why."""
    monkeypatch.setattr(ce, "_installed", lambda module: False)
    out = tmp_path / "res"
    assert main(["bench", "ce", "--device", "cpu", "--shapes", "48x16x301", "--methods", "liger", "cce", "eager",
                 "--quick", "--out", str(out)]) == 0
    records = {r["method"]: r for r in json.loads((out / "ce.json").read_text())["records"]}
    for name, dist in (("liger", "liger-kernel"), ("cce", "cut-cross-entropy")):
        assert records[name]["status"] == "unavailable"
        # (the hint names the package: fastcyclic itself is not on the package index, so 'fastcyclic[bench]' fails)
        assert records[name]["error"].startswith(f"not installed: {dist} (pip install {dist};")
    assert records["eager"]["status"] == "ok"


def test_installed_baselines_say_they_need_cuda_on_cpu(monkeypatch):
    monkeypatch.setattr(ce, "_installed", lambda module: True)
    for name in ("liger", "cce"):
        with pytest.raises(ce.Unavailable, match="CUDA only"):
            ce.make_method(name, torch.device("cpu"), False)


def test_pyproject_bench_extra_lists_the_optional_baselines():
    text = (ROOT / "pyproject.toml").read_text()
    line = next(line for line in text.splitlines() if line.startswith("bench = "))
    assert "liger-kernel" in line and "cut-cross-entropy" in line and "nvidia-ml-py" in line


def test_record_schema_helpers():
    r = measure.complete({"method": "x", "custom": 1})
    assert list(r)[:len(measure.COMMON_FIELDS)] == list(measure.COMMON_FIELDS) and r["custom"] == 1
    measure.set_rate(r, 2.0, "GB/s", ("copy", 8.0))
    assert (r["rate"], r["rate_unit"], r["ceiling"], r["ceiling_rate"]) == (2.0, "GB/s", "copy", 8.0)
    assert r["frac_ceiling"] == 0.25
    measure.set_rate(r, 2.0, "GB/s", (None, None))
    assert r["frac_ceiling"] is None
    assert measure.gemm_ceiling({"gemm_float32": {"status": "ok", "tflops_per_s": 3.0}}, torch.bfloat16) == \
        ("gemm_float32", 3.0)
    assert measure.telemetry(torch.device("cpu")) == "unavailable: not a CUDA run"


def test_cpu_timing_writes_the_flush_buffer_before_every_repetition():
    flush_writes = []

    def fn():  # sees the value the buffer was last filled with: a new one every repetition
        flush_writes.append(float(measure._cpu_flush[-1]))

    timing = measure.time_ms(fn, torch.device("cpu"), min_reps=7, budget_ms=0.0)
    assert flush_writes == list(range(7)) and measure._cpu_flush.numel() * 4 == measure.CPU_FLUSH_BYTES
    assert timing["q25_ms"] <= timing["median_ms"] <= timing["q75_ms"]


def test_bench_all_passes_dtype_to_the_suites_that_take_one():
    for name in all_suites.SUITES:
        _, ns = all_suites.suite_args(name, "cpu", True, None, dtype="bf16")
        assert ns.dtype == ({"ce": "bf16", "optim": "bf16", "train": ["bf16"]}.get(name) or "fp32"), name


def test_result_files_are_replaced_whole(tmp_path):
    out = tmp_path / "res"
    records = [measure.complete({"bench": "x", "method": "m", "status": "ok", "target": {"median_ms": 1.0},
                                 "err": float("inf")})]
    paths = measure.write_suite(out, "x", {"torch": torch.__version__}, records, csv_fields=("extra",))
    assert [p.name for p in paths] == ["x.json", "x.csv"]
    data = json.loads((out / "x.json").read_text())  # inf is written as "inf": strict JSON
    assert data["records"][0]["err"] == "inf"
    row = next(csv.DictReader((out / "x.csv").open()))
    assert json.loads(row["target"]) == {"median_ms": 1.0} and "telemetry" not in row
    assert not list(out.glob("*.tmp"))


def test_a_dtype_the_gpu_cannot_compute_in_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "old GPU")
    with pytest.raises(measure.BenchInputError, match="does not support bfloat16"):
        measure.check_dtype(torch.device("cuda"), torch.bfloat16)
    measure.check_dtype(torch.device("cuda"), torch.float32)
    measure.check_dtype(torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("argv", [["bench"], ["bench", "nope"]])
def test_unknown_subcommands_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


# each suite's arguments that argparse refuses
MALFORMED = {
    "ce": [["--shapes", "8x16"], ["--shapes", "8x16x10x4"], ["--shapes", "0x16x10"], ["--shapes", "8x0x10"],
           ["--shapes", "8x16x0"], ["--dtype", "fp8"],
           ["--shapes", "99999999999999999999x1x1"]],  # was recorded as a failed case, exit 0
    "optim": [["--sizes", "-5"], ["--sizes", "0"], ["--sizes", "2^x"], ["--sizes", "2^-3"],
              ["--sizes", "1^-2"],  # 1.0, a float: a negative exponent is refused whatever the base
              ["--dtype", "fp8"],
              ["--methods", "nope"], ["--ce-shape", "8x16"],
              ["--sizes", "2^20000"],  # crashed the suite formatting a 6000-digit number
              ["--sizes", "2^70"]],  # failed in randn after the ceilings were measured
    "train": [["--shapes", "113"], ["--shapes", "2x8"], ["--shapes", "axb"], ["--shapes", "113x0"],
              ["--dtype", "fp16"], ["--methods", "nope"], ["--batch-size", "many"]],
    "geometry": [["--shapes", "8191"],
                 ["--shapes", "8x64"],  # fewer rows than the planted frequency needs
                 ["--shapes", "8191x1"],  # no plane for the circle
                 ["--shapes", "8191xk"], ["--shapes", "1x2x3"],
                 ["--dtype", "bf16"],   # too coarse to measure in: summarize would upcast it
                 ["--train-step-ms", "fast"]],
    "all": [["--suites", "nope"], ["--budget-s", "soon"], ["--dtype", "fp16"]],
}
# and those of the options every suite shares (measure.add_device_arguments)
MALFORMED_SHARED = [["--device", "tpu"], ["--threads", "many"]]


@pytest.mark.parametrize("suite, argv", [pytest.param(suite, argv, id=f"{suite} {' '.join(argv)}")
                                         for suite, cases in MALFORMED.items() for argv in cases + MALFORMED_SHARED])
def test_malformed_arguments_exit_2_and_write_nothing(suite, argv, tmp_path, capsys):
    out = tmp_path / "res"
    with pytest.raises(SystemExit) as exc:
        main(["bench", suite, *argv, "--out", str(out)])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not out.exists()


# arguments a suite refuses after parsing, and what the refusal names
FINITE_BUDGET = "--budget-s must be a finite number of seconds > 0"
REFUSED = [("train", ["--device", "cpu", "--batch-size", "0"], "--batch-size"),
           ("geometry", ["--device", "cpu", "--train-step-ms", "-1"], "--train-step-ms"),
           ("geometry", ["--device", "cpu", "--train-step-ms", "inf"], "--train-step-ms"),
           ("geometry", ["--device", "cpu", "--train-step-ms", "0"], "--train-step-ms"),
           ("all", ["--device", "cpu", "--budget-s", "0"], "--budget-s"),
           ("all", ["--device", "cpu", "--budget-s", "nan"], f"{FINITE_BUDGET}, got nan"),
           ("all", ["--device", "cpu", "--budget-s", "-1"], f"{FINITE_BUDGET}, got -1"),
           ("all", ["--device", "cpu", "--budget-s", "inf"], f"{FINITE_BUDGET}, got inf"),
           ("geometry", ["--device", "cpu", "--train-step-ms", "nan"], "--train-step-ms"),
           ("ce", ["--device", "cpu", "--tune", "--shapes", "48x16x301", "--methods", "eager", "--quick"],
            "--tune needs CUDA"),
           ("ce", ["--device", "cpu", "--interpret", "--shapes", "64x64x1024", "4096x64x65536"],
            "N*D*K must be <= 2^28 (e.g. 512x64x8192), got 4096x64x65536"),
           ("optim", ["--device", "cpu", "--interpret", "--sizes", "2^25"], "--sizes must be <= 2^22, got 33554432"),
           ("optim", ["--device", "cpu", "--interpret", "--ce-shape", "8192x256x65536"],
            "--ce-shape N*D*K must be <= 2^28, got 8192x256x65536")]
REFUSED += [(suite, ["--device", "cpu", "--threads", "0"], "--threads") for suite in all_suites.SUITES + ("all",)]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("suite, argv, message", [
    *(pytest.param(suite, argv, message, id=f"{suite} {' '.join(argv)}") for suite, argv, message in REFUSED),
    *(pytest.param(suite, ["--device", "cuda"], "CUDA is not available", id=f"{suite} --device cuda", marks=NO_CUDA)
      for suite in all_suites.SUITES + ("all",))])
def test_refusals_after_parsing_exit_2_and_write_nothing(suite, argv, message, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["bench", suite, *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("suite", all_suites.SUITES + ("all",))
def test_an_out_that_cannot_be_a_directory_is_refused_before_anything_runs(suite, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere" / "dir")  # passed the check, then failed after the measurements
    for out, message in ((blocker, "is a file, not a directory"), (blocker / "res", "cannot be created"),
                         (dangling, "cannot be created"), (dangling / "sub", "cannot be created")):
        assert main(["bench", suite, "--device", "cpu", "--quick", "--out", str(out)]) == 2
        printed = capsys.readouterr()
        assert message in printed.err and "ceilings" not in printed.out  # nothing was measured
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file"] and blocker.read_text() == "mine"


@pytest.mark.parametrize("suite", all_suites.SUITES + ("all",))
def test_a_results_file_name_taken_by_a_directory_is_refused_before_anything_runs(suite, tmp_path, capsys):
    """It failed with IsADirectoryError after every case had run."""
    out = tmp_path / "res"
    taken = out / ("all.json" if suite == "all" else f"{suite}.csv")
    taken.mkdir(parents=True)
    assert main(["bench", suite, "--device", "cpu", "--quick", "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert f"holds a directory {taken.name!r}" in printed.err and "ceilings" not in printed.out
    if suite == "all":  # and a suite's own folder
        taken.rmdir()
        (out / "geometry" / "geometry.png").mkdir(parents=True)
        assert main(["bench", "all", "--device", "cpu", "--quick", "--out", str(out)]) == 2
        assert "holds a directory 'geometry.png'" in capsys.readouterr().err
    assert not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.parametrize("suite", all_suites.SUITES + ("all",))
def test_an_out_another_bench_is_writing_to_is_refused(suite, tmp_path, capsys):
    """Two benches on one --out rewrote each other's JSON and CSV after every case (and removed the figure): the
    later one's results were lost, or its JSON and CSV came from different runs.  The second is refused now."""
    from fastcyclic.files import exclusive_lock

    out = tmp_path / "res"
    out.mkdir()
    (out / "ce.json").write_text("the other run's")
    with exclusive_lock(str(out), "held by the test"):  # as the other process's take_out_dir holds it
        assert main(["bench", suite, "--device", "cpu", "--quick", "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert f"another fastcyclic bench is writing to --out {str(out)!r}" in printed.err
    assert "ceilings" not in printed.out  # nothing was measured
    assert [p.name for p in out.iterdir()] == ["ce.json"] and (out / "ce.json").read_text() == "the other run's"


@pytest.mark.parametrize("suite", all_suites.SUITES + ("all",))
def test_an_empty_out_is_refused(suite, tmp_path, monkeypatch, capsys):
    """Path("") is the current directory: the results were written there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["bench", suite, "--device", "cpu", "--quick", "--out", ""])
    assert exc.value.code == 2 and "must name a directory (use . for this one), got ''" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suite", ["ce", "optim", "train", "geometry", "all"])
def test_every_subcommand_has_help(suite, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", suite, "--help"])
    assert exc.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_python_dash_m_fastcyclic_is_the_command():
    proc = subprocess.run([sys.executable, "-m", "fastcyclic", "bench", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: fastcyclic bench"), proc.stderr


def test_a_checkout_finds_its_kernels_and_bench_without_an_install():
    """In the repository root with nothing installed (python -S: no site-packages, so no editable install), as
    ahead of an installed wheel (python -m puts the checkout's fastcyclic/ first), fastcyclic.kernels and
    fastcyclic.bench are the top-level kernels/ and bench/: they were "No module named 'fastcyclic.kernels'"."""
    code = "import fastcyclic.kernels, fastcyclic.bench as b; print(fastcyclic.kernels.__file__); print(b.__file__)"
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(ROOT / "kernels" / "__init__.py"), str(ROOT / "bench" / "__init__.py")]


def test_a_second_checkout_runs_its_own_kernels(tmp_path):
    """A second checkout (a clone, a git worktree) imported by path runs its own kernels/ and bench/, not those
    of the checkout pip installed in editable mode (its finder maps fastcyclic.kernels there): its tests ran the
    other tree's kernels."""
    for name in ("fastcyclic", "kernels", "bench"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    code = "import fastcyclic.kernels.reference as r, fastcyclic.bench as b; print(r.__file__); print(b.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(tmp_path / "kernels" / "reference.py"),
                                        str(tmp_path / "bench" / "__init__.py")]


def test_micro_benchmarks_are_kept_out_of_the_default_run():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert '-m "not benchmark"' in config["tool:pytest"]["addopts"]
    files = sorted((ROOT / "tests" / "benchmarks").glob("test_*.py"))
    assert files
    for path in files:
        assert "pytestmark = [pytest.mark.benchmark" in path.read_text()


def test_cpu_timing_reports_median_and_quartiles_of_the_repetitions(monkeypatch):
    """time_ms on CPU: the median and the 25/75 % quantiles of the repetitions, not their mean."""
    durations = iter([1.0, 2.0, 3.0, 4.0, 100.0])  # ms, one per repetition
    clock = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])

    def fn():
        clock[0] += next(durations) / 1e3

    timing = measure.time_ms(fn, torch.device("cpu"), min_reps=5, budget_ms=0.0)
    assert timing == pytest.approx(dict(median_ms=3.0, q25_ms=1.5, q75_ms=52.0))


def test_cpu_timing_repeats_until_the_budget_up_to_50_times(monkeypatch):
    """Repetitions continue past min_reps until budget_ms is spent, and stop at 50."""
    clock = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
    calls = []

    def fn():
        calls.append(1)
        clock[0] += 1e-3  # 1 ms each

    measure.time_ms(fn, torch.device("cpu"), min_reps=5, budget_ms=20.0)
    assert len(calls) == 20
    calls.clear()
    measure.time_ms(fn, torch.device("cpu"), min_reps=5, budget_ms=1e6)
    assert len(calls) == 50


def test_write_atomic_replaces_the_file_rather_than_rewriting_it(tmp_path):
    """A reader that opened the old result file reads it whole: the new one arrives by rename, not in place."""
    path = tmp_path / "x.json"
    path.write_bytes(b"old " * 1000)
    with open(path, "rb") as reader:
        assert measure.write_atomic(path, "new") == path
        assert reader.read() == b"old " * 1000
    assert path.read_text() == "new" and not list(tmp_path.glob("*.tmp"))


def test_write_atomic_through_a_new_folder_and_dot_dot(tmp_path, monkeypatch):
    """"new/../x.png": abspath collapsed the "..", so new/ was never made and the rename through it failed."""
    from fastcyclic.files import write_atomic

    monkeypatch.chdir(tmp_path)
    assert write_atomic("new/../x.png", lambda f: f.write(b"png")) == "new/../x.png"
    assert (tmp_path / "x.png").read_bytes() == b"png" and not list(tmp_path.rglob("*.tmp"))


def test_write_atomic_syncs_the_whole_file_then_the_folder_after_the_rename(tmp_path, monkeypatch):
    """The data is on disk before the rename and the rename before the return (a crash leaves the old file or the
    new one, whole), from a temporary file in the target's own folder (os.replace cannot cross filesystems); the
    folder's descriptor is closed again."""
    from fastcyclic import files

    path = tmp_path / "x.json"
    path.write_bytes(b"old")
    synced, real_fsync = [], files.os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        kind, size = ("folder", None) if stat.S_ISDIR(st.st_mode) else ("file", st.st_size)
        synced.append((kind, size, path.read_bytes()))  # what is synced, and what a reader of path sees then
        real_fsync(fd)

    def write(f):
        temporaries = [p.name for p in tmp_path.iterdir() if p.name != "x.json"]
        assert len(temporaries) == 1 and temporaries[0].startswith(files.TEMP_PREFIX), temporaries
        f.write(b"new data")

    monkeypatch.setattr(files.os, "fsync", fsync)
    open_before = len(os.listdir("/proc/self/fd"))
    files.write_atomic(str(path), write)
    assert synced == [("file", len(b"new data"), b"old"), ("folder", None, b"new data")]
    assert len(os.listdir("/proc/self/fd")) == open_before
    # results are for reading: not mkstemp's owner-only mode
    assert path.stat().st_mode & 0o777 == 0o644 and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.parametrize("error", [ValueError("bad figure"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(error, tmp_path):
    """Also on Ctrl-C (a KeyboardInterrupt is no Exception) the temporary file goes and the error goes on."""
    from fastcyclic.files import write_atomic

    path = tmp_path / "x.json"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half")
        raise error

    with pytest.raises(type(error)):
        write_atomic(str(path), half_then_fail)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_remove_temporaries_removes_only_write_atomics_files(tmp_path):
    from fastcyclic.files import TEMP_PREFIX, TEMP_SUFFIX, remove_temporaries

    names = [f"{TEMP_PREFIX}killed{TEMP_SUFFIX}", "notes.tmp", f"{TEMP_PREFIX}mine.txt", "metrics.jsonl"]
    for name in names:
        (tmp_path / name).write_text("x")
    remove_temporaries(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


@pytest.mark.parametrize("errno_", ["ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "EIO"])
def test_write_errors_are_named_in_one_line(errno_):
    import errno

    from fastcyclic.files import write_error_text

    code = getattr(errno, errno_)
    text = os.strerror(code)
    assert write_error_text(OSError(code, text, "/out/x.json")) == f"cannot write '/out/x.json': {text}"
    assert write_error_text(OSError(code, text)) == f"cannot write: {text}"
    assert write_error_text(OSError(errno.ENOENT, "No such file or directory", "/x")) is None  # a bug: traceback
    assert write_error_text(ValueError("not an OSError")) is None


def test_a_write_error_a_writer_wraps_is_raised_naming_the_file(tmp_path):
    """torch.save's zip writer turns a full disk into RuntimeError("... unexpected pos ..."), and f.write's own
    OSError names no file: write_atomic raises the OSError with the path, and leaves no temporary file."""
    import errno

    from fastcyclic.files import write_atomic, write_error_text

    def like_torch_save(f):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64384 vs 64276")

    path = str(tmp_path / "checkpoint.pt")
    with pytest.raises(OSError) as caught:
        write_atomic(path, like_torch_save)
    assert write_error_text(caught.value) == f"cannot write {path!r}: {os.strerror(errno.ENOSPC)}"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its own type and traceback
        write_atomic(path, lambda f: (_ for _ in ()).throw(RuntimeError("a bug")))

    def interrupted_while_full(f):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C stays Ctrl-C (exit 130, not "cannot write")
        write_atomic(path, interrupted_while_full)


def test_all_passes_interpret_to_the_suites_with_triton_kernels():
    for name in all_suites.SUITES:
        _, ns = all_suites.suite_args(name, "cpu", True, None, interpret=True)
        assert getattr(ns, "interpret", False) == (name in ("ce", "optim", "train")), name


def test_write_json_ends_with_a_newline(tmp_path):
    from fastcyclic.files import write_json

    path = write_json(str(tmp_path / "x.json"), {"a": [1, 2]})
    assert open(path).read() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'


def test_cpu_peak_memory_counts_bytes():
    """peak_extra_bytes on CPU: the growth of the peak RSS in bytes (/proc gives KiB)."""
    size = 64 << 20

    def fn():
        torch.ones(size // 4)  # 64 MiB, touched

    peak = measure.peak_extra_bytes(fn, torch.device("cpu"))
    if peak is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert 0.75 * size <= peak < 8 * size


def test_ceilings_prefer_the_inputs_dtype_and_skip_failed_measurements():
    """gemm_ceiling takes the rate in the inputs' dtype first; a failed measurement is never a ceiling."""
    ok = {"gemm_bfloat16": {"status": "ok", "tflops_per_s": 9.0}, "gemm_float32": {"status": "ok", "tflops_per_s": 3.0}}
    assert measure.gemm_ceiling(ok, torch.float32) == ("gemm_float32", 3.0)
    assert measure.gemm_ceiling(ok, torch.bfloat16) == ("gemm_bfloat16", 9.0)
    assert measure.gemm_ceiling(dict(ok, gemm_bfloat16={"status": "oom"}), torch.bfloat16) == ("gemm_float32", 3.0)
    assert measure.copy_ceiling({"copy": {"status": "failed", "gbps": 5.0}}) == (None, None)
    assert measure.copy_ceiling({"copy": {"status": "ok", "gbps": 5.0}}) == ("copy", 5.0)


def test_quick_and_full_ceilings_are_cached_apart(monkeypatch):
    """A --quick measurement (small copy and GEMM) is not reused for a full-size run in the same process."""
    monkeypatch.setattr(measure, "_CEILINGS", {})
    monkeypatch.setattr(measure, "measure_copy", lambda device, numel, quick: {"status": "ok", "numel": numel})
    monkeypatch.setattr(measure, "measure_gemm", lambda device, dtype, size, quick: {"status": "ok", "m": size})
    cpu = torch.device("cpu")
    assert measure.ceilings(cpu, quick=True)["copy"]["numel"] == measure.COPY_NUMEL["quick"]
    full = measure.ceilings(cpu, quick=False)
    assert full["copy"]["numel"] == measure.COPY_NUMEL["cpu"] and full["gemm_float32"]["m"] == measure.GEMM_SIZE["cpu"]


def test_csv_cells_of_lists_are_json():
    """A list field (geometry's mismatched) is a JSON cell in the CSV, as dicts are."""
    text = measure.csv_text([{"method": "m", "mismatched": ["omega_W", "verdict"]}], ("method", "mismatched"))
    row = next(csv.DictReader(text.splitlines()))
    assert json.loads(row["mismatched"]) == ["omega_W", "verdict"]


def test_the_geometry_suite_is_given_the_fastest_fastcyclic_step_at_its_case():
    """_train_step: fastcyclic's fastest ok record at geometry.TRAIN_CASE, not another shape, method or a failure."""
    p, d = geometry.TRAIN_CASE

    def rec(method, status, ms, dtype, case=(p, d)):
        return dict(method=method, status=status, median_ms=ms, dtype=dtype, batch=512, P=case[0], d=case[1])

    records = [rec("fastcyclic", "ok", 5.0, "float32"), rec("fastcyclic", "ok", 3.0, "bfloat16"),
               rec("fastcyclic", "failed", 1.0, "bfloat16"), rec("fastcyclic", "ok", 0.5, "float32", (113, 128)),
               rec("eager", "ok", 0.2, "bfloat16")]
    ms, source = all_suites._train_step(records)
    assert ms == 3.0 and "bfloat16" in source and f"P={p} d={d}" in source
    assert all_suites._train_step(records[2:]) == (None, "")


def test_a_refusing_or_failing_suite_is_recorded_by_its_exit_code(tiny, tmp_path, monkeypatch):
    """Each suite's status follows its exit code (1: fastcyclic wrong or failed, 2: refused); either fails the run."""
    monkeypatch.setattr(optim, "run_suite", lambda args, **kwargs: (2, []))
    monkeypatch.setattr(geometry, "run_suite",
                        lambda args, **kwargs: (1, [{"status": "ok", "correct": False}, {"status": "oom"}]))
    out = tmp_path / "res"
    assert main(["bench", "all", "--device", "cpu", "--quick", "--suites", "optim", "geometry",
                 "--out", str(out)]) == 1
    summary = json.loads((out / "all.json").read_text())
    assert summary["complete"] is True
    suites = {s["suite"]: s for s in summary["suites"]}
    assert (suites["optim"]["rc"], suites["optim"]["status"]) == (2, "refused")
    assert (suites["geometry"]["rc"], suites["geometry"]["status"]) == (1, "fastcyclic wrong or failed")
    assert suites["geometry"]["records"] == {"ok": 1, "oom": 1, "wrong": 1}


def test_the_summary_counts_as_wrong_only_a_verdict_of_wrong():
    """A record not judged (correct None: torch's bf16 optimizers, a baseline without a reference) is not wrong."""
    records = [{"status": "ok", "correct": None}, {"status": "ok", "correct": True}, {"status": "ok", "correct": False},
               {"status": "failed", "correct": False}]
    assert all_suites._count(records) == {"ok": 3, "failed": 1, "wrong": 1}


def test_a_suite_named_twice_runs_once(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(geometry, "run_suite", lambda args, **kwargs: (calls.append(1), (0, []))[1])
    assert main(["bench", "all", "--device", "cpu", "--quick", "--suites", "geometry", "geometry",
                 "--out", str(tmp_path / "res")]) == 0
    assert len(calls) == 1
    assert [s["suite"] for s in json.loads((tmp_path / "res" / "all.json").read_text())["suites"]] == ["geometry"]


def test_on_cuda_the_geometry_suite_is_given_the_step_the_train_suite_measured(monkeypatch):
    """bench all on a GPU: geometry compares the summary with the trainer step of this run's train suite (not one
    it measures again).  The GPU is faked: only the hand-over between the suites is under test."""
    p, d = geometry.TRAIN_CASE
    monkeypatch.setattr(measure, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(measure, "check_dtype", lambda device, dtype: None)
    monkeypatch.setattr(measure, "machine_facts", lambda device: {"cpu": "x", "torch": "t", "triton": "t"})
    monkeypatch.setattr(measure, "print_ceilings", lambda device, quick: {})
    monkeypatch.setattr(measure, "release", lambda device: None)
    measured = dict(method="fastcyclic", status="ok", median_ms=4.0, dtype="bfloat16", batch=8192, P=p, d=d)
    monkeypatch.setattr(train, "run_suite", lambda args, **kwargs: (0, [measured]))
    given = {}

    def geometry_suite(args, **kwargs):
        given.update(kwargs, train_step_ms=args.train_step_ms)
        return 0, []

    monkeypatch.setattr(geometry, "run_suite", geometry_suite)
    assert main(["bench", "all", "--device", "cuda", "--suites", "train", "geometry"]) == 0
    assert given["train_step_ms"] == 4.0 and "fastcyclic bench train in this run" in given["step_source"]


def test_machine_facts_give_the_threads_torch_computes_with():
    """cpu_threads is torch's thread count (--threads), not the machine's core count."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            facts = measure.machine_facts(torch.device("cpu"))
            assert facts["cpu_threads"] == threads and facts["device"] == "cpu"
    finally:
        torch.set_num_threads(before)


def test_cpu_peak_memory_is_the_peak_rss_growth_over_the_rss_before_in_bytes(monkeypatch):
    """(VmHWM after fn - VmRSS before fn) KiB * 1024: outputs still alive after fn must not shrink it."""
    status = {"VmRSS": 1000, "VmHWM": 1000}

    def fn():  # 64 KiB at its peak, 10 KiB of it still held when it returns
        status.update(VmHWM=1064, VmRSS=1010)

    monkeypatch.setattr(measure, "_proc_status_kib", lambda field: status[field])
    peak = measure.peak_extra_bytes(fn, torch.device("cpu"))
    if peak is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert peak == 64 * 1024


def test_ceiling_rates_count_bytes_and_flops_per_median_time(monkeypatch):
    """copy: 2 x the bytes (read and written) in GB/s = 1e9 B/s; GEMM: 2 size^3 FLOPs in TFLOP/s."""
    monkeypatch.setattr(measure, "time_ms", lambda fn, device, **kw: dict(median_ms=2.0, q25_ms=1.0, q75_ms=3.0))
    copy = measure.measure_copy(torch.device("cpu"), 1000, quick=True)
    assert copy["status"] == "ok" and copy["bytes"] == 2 * 1000 * 4
    assert copy["gbps"] == pytest.approx(8000 / 2e-3 / 1e9)
    gemm = measure.measure_gemm(torch.device("cpu"), torch.float32, 16, quick=True)
    assert gemm["status"] == "ok" and gemm["flops"] == 2 * 16**3
    assert gemm["tflops_per_s"] == pytest.approx(2 * 16**3 / 2e-3 / 1e12)


def test_json_keeps_the_sign_of_infinity_and_the_extra_sections(tmp_path):
    """-inf is written "-inf" (not "inf"); a suite's extra sections (ce's tuning) reach NAME.json."""
    assert measure._json_safe({"a": [float("-inf"), float("nan")], "b": (float("inf"), 1.0)}) == \
        {"a": ["-inf", None], "b": ["inf", 1.0]}
    measure.write_suite(tmp_path, "x", {}, [], extra={"tuning": [{"N": 8}]})
    assert json.loads((tmp_path / "x.json").read_text())["tuning"] == [{"N": 8}]


def test_telemetry_on_cuda_keeps_before_and_after(monkeypatch):
    """A CUDA record holds NVML's readings from before and after its case; a CPU record only says why there are none."""
    monkeypatch.setattr(measure, "telemetry", lambda device: "after")
    record = measure.attach_telemetry({}, torch.device("cuda"), "before")
    assert record["telemetry"] == {"before": "before", "after": "after"}
    assert measure.attach_telemetry({}, torch.device("cpu"), "before")["telemetry"] == "after"


def test_error_text_is_the_type_and_the_first_line_cut_to_300_characters():
    assert measure.error_text(RuntimeError("x" * 400 + "\nsecond line")) == "RuntimeError: " + "x" * 300
    assert measure.error_text(ValueError()) == "ValueError: "


def test_interpret_is_refused_on_cuda(monkeypatch, tmp_path, capsys):
    """--interpret runs the Triton kernels on CPU: with CUDA chosen it is refused before anything runs."""
    monkeypatch.setattr(measure, "resolve_device", lambda name: torch.device("cuda"))
    out = tmp_path / "res"
    assert main(["bench", "ce", "--device", "cuda", "--interpret", "--out", str(out)]) == 2
    assert "--interpret runs the Triton kernels on CPU" in capsys.readouterr().err and not out.exists()


def test_a_shape_of_the_wrong_length_is_refused_naming_its_form():
    """Not argparse's "invalid value" from unpacking the sizes: the message says what a shape looks like."""
    for text in ("8x16", "8x16x10x4", "8xy16"):
        with pytest.raises(argparse.ArgumentTypeError, match="shape must look like NxDxK"):
            measure.parse_dims(text, "NxDxK", "8192x256x65536")
    assert measure.parse_dims("8,16X10", "NxDxK", "") == (8, 16, 10)


def test_bench_figures_label_the_measured_sizes_and_values(monkeypatch):
    """The x axis showed powers of two near the sizes (P = 113 read as 2^7), the log and symlog y axes only their
    decades, the memory axis went below 0, and a point at the top edge was cut in half."""
    from matplotlib.figure import Figure

    figures = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or real_savefig(fig, *a, **k))
    records = [dict(status="ok", method=m, K=k, median_ms=t, peak_extra_gib=g)
               for m, k, t, g in (("fastcyclic", 113, 7.7, 0.004), ("fastcyclic", 257, 12.0, 0.006),
                                  ("eager", 113, 3.2, 0.011), ("eager", 257, 10.2, 0.187))]
    assert measure.plot_vs(records, "K", "K", "ms")[:4] == b"\x89PNG"
    ax_t, ax_m = figures[0].axes
    for ax in (ax_t, ax_m):
        assert [t.get_text() for t in ax.get_xticklabels()] == ["113", "257"]
    low, high = ax_t.get_ylim()
    assert [t for t in ax_t.get_yticks() if low <= t <= high] == [5.0, 10.0]
    low, high = ax_m.get_ylim()
    assert low == 0 and high > 0.187 * 1.5
    assert [t for t in ax_m.get_yticks() if low <= t <= high][:3] == [0.0, 0.001, 0.002]


def test_bench_all_refuses_a_suite_folder_another_bench_is_writing_to_before_measuring(tmp_path, capsys):
    """`bench ce --out X/ce` running: `bench all --out X` measured the ceilings, then refused its ce suite."""
    from fastcyclic.files import exclusive_lock

    out = tmp_path / "res"
    (out / "ce").mkdir(parents=True)
    with exclusive_lock(str(out / "ce"), "held by the test"):
        assert main(["bench", "all", "--suites", "ce", "--device", "cpu", "--quick", "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert "another fastcyclic bench is writing to --out" in printed.err and "ceilings" not in printed.out
    assert not (out / "all.json").exists()
