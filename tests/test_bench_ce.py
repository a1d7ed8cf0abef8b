"""The `fastcyclic bench ce` command on CPU: records and files (refusals of bad input: test_bench_all.py)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from fastcyclic.cli import main

pytestmark = pytest.mark.portable


def test_quick_cpu_run_writes_complete_records(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["bench", "ce", "--device", "cpu", "--shapes", "48x16x301", "--methods", "fastcyclic", "eager",
               "torch_lce", "--quick", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "ce.json").read_text())
    assert results["machine"]["torch"] and results["machine"]["nvml"]  # "unavailable: ..." without a GPU
    records = {r["method"]: r for r in results["records"]}
    assert set(records) == {"fastcyclic", "eager", "torch_lce"}
    for name in ("fastcyclic", "eager"):
        r = records[name]
        assert r["status"] == "ok" and r["correct"] is True
        assert (r["N"], r["D"], r["K"]) == (48, 16, 301)
        assert r["median_ms"] > 0 and r["q25_ms"] <= r["median_ms"] <= r["q75_ms"]
        assert max(r["err_loss"], r["err_dh"], r["err_dw"]) < 1e-5
    assert records["torch_lce"]["status"] in ("ok", "unavailable")
    assert (out / "ce.csv").read_text().count("\n") == 4
    assert "48x16x301" in capsys.readouterr().out
    assert not list(out.glob("*.tmp"))


def test_records_carry_the_common_schema_and_a_figure(tmp_path):
    from fastcyclic.bench import measure

    out = tmp_path / "res"
    assert main(["bench", "ce", "--device", "cpu", "--shapes", "48x16x301", "64x16x515", "--methods", "fastcyclic",
                 "eager", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "ce.json").read_text())
    assert results["suite"] == "ce" and results["ceilings"]["gemm_float32"]["status"] == "ok"
    for r in results["records"]:
        assert set(measure.COMMON_FIELDS) <= set(r)
        assert r["case"] == f"{r['N']}x{r['D']}x{r['K']}" and r["kind"] == "case"
        assert r["rate"] == r["tflops_per_s"] and r["rate_unit"] == "TFLOP/s" and r["ceiling"] == "gemm_float32"
        assert r["err"] == max(r["err_dh"], r["err_dw"]) and r["tolerance"] == 1e-5  # err: the gradients'
        assert r["loss_tolerance"] == 1e-5 and r["err_loss"] <= r["loss_tolerance"]
        assert r["notes"] and r["telemetry"].startswith("unavailable")
    fastcyclic = [r for r in results["records"] if r["method"] == "fastcyclic"]
    assert all(r["speedup_vs_eager"] > 0 for r in fastcyclic)
    assert (out / "ce.png").read_bytes()[:4] == b"\x89PNG"


def run_with_one_method_changed(monkeypatch, tmp_path, method, change, dtype="fp32"):
    """(exit code, records by method) of `bench ce` on 48x16x301, fastcyclic and eager, with `method`'s function
    replaced by change(its function)."""
    from fastcyclic.bench import ce

    real = ce.make_method

    def make_method(name, device, interpret):
        fn, notes = real(name, device, interpret)
        return (change(fn) if name == method else fn), notes

    monkeypatch.setattr(ce, "make_method", make_method)
    out = tmp_path / "res"
    code = main(["bench", "ce", "--device", "cpu", "--shapes", "48x16x301", "--methods", "fastcyclic", "eager",
                 "--dtype", dtype, "--quick", "--out", str(out)])
    return code, {r["method"]: r for r in json.loads((out / "ce.json").read_text())["records"]}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_wrong_loss_is_reported_as_failing(dtype, tmp_path, monkeypatch, capsys):
    """A loss off by 1e-3 relatively fails in bf16 too: fp32 accumulation gives ~1e-7 whatever the inputs, so the
    loss has its own tolerance, not the bf16 gradients' rounding."""
    # a kernel that scales the loss (and so every gradient) by 1.001
    code, records = run_with_one_method_changed(monkeypatch, tmp_path, "fastcyclic",
                                                lambda fn: (lambda h, w, y: fn(h, w, y) * 1.001), dtype)
    assert code == 1
    assert records["fastcyclic"]["correct"] is False and records["fastcyclic"]["err_loss"] > 5e-4
    assert records["eager"]["correct"] is True
    captured = capsys.readouterr()
    assert "WRONG" in captured.out and "FAILED" in captured.err


def test_a_run_stopped_mid_shape_keeps_the_cases_it_finished(tmp_path, monkeypatch):
    from fastcyclic.bench import ce

    real, calls = ce.run_case, []

    def stopped_at_the_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ce, "run_case", stopped_at_the_second)
    out = tmp_path / "res"
    out.mkdir()
    (out / "ce.png").write_bytes(b"an earlier run's figure")
    assert main(["bench", "ce", "--device", "cpu", "--shapes", "48x16x301", "--methods", "fastcyclic", "eager",
                 "--quick", "--out", str(out)]) == 130
    results = json.loads((out / "ce.json").read_text())
    assert results["complete"] is False and [r["method"] for r in results["records"]] == ["fastcyclic"]
    assert "speedup_vs_liger" in (out / "ce.csv").read_text().splitlines()[0]
    # the figure is drawn once, when the run completes (~0.3 s each, out of the time budget), and none from an
    # earlier run is left beside the new files
    assert not (out / "ce.png").exists()


def test_a_run_stopped_before_its_first_case_leaves_no_earlier_results(tmp_path, monkeypatch, capsys):
    """An --out holding a finished run: stopped before its first case ended, the new run left those files, marked
    complete, as if they were its own."""
    from fastcyclic.bench import ce

    out = tmp_path / "res"
    assert main(["bench", "ce", "--device", "cpu", "--shapes", "48x16x301", "--methods", "eager", "--quick",
                 "--out", str(out)]) == 0
    assert json.loads((out / "ce.json").read_text())["complete"] is True and (out / "ce.png").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ce, "run_case", interrupted)
    assert main(["bench", "ce", "--device", "cpu", "--shapes", "64x16x515", "--methods", "eager", "--quick",
                 "--out", str(out)]) == 130
    results = json.loads((out / "ce.json").read_text())
    assert results["complete"] is False and results["records"] == [] and not (out / "ce.png").exists()
    assert (out / "ce.csv").read_text().count("\n") == 1  # the header only
    capsys.readouterr()
    assert main(["bench", "ce", "--device", "cpu", "--shapes", "64x16x515", "--methods", "eager", "--quick"]) == 130
    assert "nothing was written (no --out)" in capsys.readouterr().err


def test_repeated_shapes_and_methods_are_measured_once(tmp_path):
    out = tmp_path / "res"
    assert main(["bench", "ce", "--device", "cpu", "--shapes", "48x16x301", "48x16x301", "--methods", "eager",
                 "fastcyclic", "eager", "--quick", "--out", str(out)]) == 0
    records = json.loads((out / "ce.json").read_text())["records"]
    assert [r["method"] for r in records] == ["eager", "fastcyclic"]
    assert "loss_tolerance" in (out / "ce.csv").read_text().splitlines()[0].split(",")  # the loss's own tolerance


def test_a_baseline_not_installed_says_so_when_the_budget_is_spent(tmp_path, monkeypatch):
    """With the time budget spent, a missing baseline was recorded as "skipped", hiding that it is missing."""
    from fastcyclic.bench import ce, measure

    def missing(name, device, interpret):
        raise ce.Unavailable("liger-kernel is not installed")

    monkeypatch.setattr(ce, "make_method", missing)
    monkeypatch.setattr(measure, "out_of_time", lambda: True)
    monkeypatch.setattr(ce.measure, "out_of_time", lambda: True)
    records, _ = ce.run([(48, 16, 301)], torch.float32, torch.device("cpu"), ["liger"], quick=True, log=lambda *a: 0)
    assert [(r["method"], r["status"]) for r in records] == [("liger", "unavailable")]
    assert records[0]["notes"] == "not run: liger-kernel is not installed"  # (it was None)


def test_relative_error_against_an_exactly_zero_reference_is_absolute():
    """At K = 1 every softmax is 1 and dW is exactly 0: dividing by ||0|| clamped to 1e-30 made rounding noise
    (1e-8) an error of 1e22."""
    from fastcyclic.bench.ce import rel_err

    assert rel_err(torch.tensor([3e-8, 4e-8]), torch.zeros(2, dtype=torch.float64)) == pytest.approx(5e-8)
    assert rel_err(torch.tensor([1.1]), torch.ones(1, dtype=torch.float64)) == pytest.approx(0.1)


def test_torch_lce_accumulates_in_float32():
    """With acc_policy="accurate" alone torch accumulates in the input dtype (bf16: loss 1.2e-2 off, WRONG)."""
    from fastcyclic.bench import ce

    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        pytest.skip(f"torch {torch.__version__} has no F.linear_cross_entropy")
    _, notes = ce.make_method("torch_lce", torch.device("cpu"), False)
    assert "acc_dtype=torch.float32" in notes
    records, _ = ce.run([(48, 16, 301)], torch.bfloat16, torch.device("cpu"), ["torch_lce"], quick=True,
                        log=lambda *a: 0)
    assert records[0]["status"] == "ok" and records[0]["correct"], records[0]


def test_the_reference_in_row_chunks_equals_one_chunk():
    """The float64 reference sums dW over row chunks (the CPU default shape takes 8): a chunk must not replace
    the others' sum."""
    from fastcyclic.bench import ce

    h, w, y = ce.make_inputs(50, 8, 301, torch.float32, torch.device("cpu"))
    whole = ce.reference(h, w, y)
    chunked = ce.reference(h, w, y, chunk_bytes=8 * 301 * 7)  # 7 rows a chunk
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_a_weight_off_by_4e_5_fails_in_fp32(tmp_path, monkeypatch):
    """Exact fp32 sits near 3e-7 (eager too): a kernel reading W 4e-5 too large must not pass."""
    import fastcyclic
    from fastcyclic.bench import ce

    real = fastcyclic.linear_cross_entropy
    monkeypatch.setattr(fastcyclic, "linear_cross_entropy", lambda h, w, y, **kw: real(h, w * 1.00004, y, **kw))
    out = tmp_path / "res"
    assert main(["bench", "ce", "--device", "cpu", "--shapes", "256x32x1001", "--methods", "fastcyclic", "eager",
                 "--quick", "--out", str(out)]) == 1
    records = {r["method"]: r for r in json.loads((out / "ce.json").read_text())["records"]}
    assert records["fastcyclic"]["correct"] is False and records["eager"]["correct"] is True
    assert records["eager"]["err_dw"] < ce.TOLERANCE[torch.float32] / 10 < records["fastcyclic"]["err_dw"]


def test_the_reference_is_not_the_backend_it_judges(tmp_path, monkeypatch):
    """On CPU the measured method is the torch backend: a bug in it (dh 5 % too large) must not also be in the
    float64 reference, or it would pass and eager would look wrong."""
    from fastcyclic import linear_ce

    real = linear_ce.torch_impl.backward

    def backward(*args, **kwargs):
        dh, dw, db = real(*args, **kwargs)
        return (dh * 1.05 if dh is not None else None), dw, db

    monkeypatch.setattr(linear_ce.torch_impl, "backward", backward)
    out = tmp_path / "res"
    assert main(["bench", "ce", "--device", "cpu", "--shapes", "48x16x301", "--methods", "fastcyclic", "eager",
                 "--quick", "--out", str(out)]) == 1
    records = {r["method"]: r for r in json.loads((out / "ce.json").read_text())["records"]}
    assert records["fastcyclic"]["correct"] is False and records["fastcyclic"]["err_dh"] > 1e-2
    assert records["eager"]["correct"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="--interpret is the CPU path")
def test_interpret_times_both_backward_strategies(tmp_path):
    out = tmp_path / "res"
    assert main(["bench", "ce", "--device", "cpu", "--interpret", "--quick", "--shapes", "40x16x300",
                 "--methods", "fastcyclic", "--out", str(out)]) == 0
    records = {r["method"]: r for r in json.loads((out / "ce.json").read_text())["records"]}
    assert set(records) == {"fastcyclic", "fastcyclic[gemm-backward]"}
    assert records["fastcyclic"]["config"] is None
    assert records["fastcyclic[gemm-backward]"]["config"]["backward"] == "gemm"
    for r in records.values():
        assert r["status"] == "ok" and r["correct"] is True and "backend='triton'" in r["notes"]
    assert "LCEConfig(backward='gemm')" in records["fastcyclic[gemm-backward]"]["notes"]  # (it was fastcyclic's)


def test_interpret_sets_triton_interpret_before_the_suite_runs(monkeypatch):
    """--interpret is TRITON_INTERPRET=1 for the run (here conftest.py has set it already: removed for the test)."""
    from fastcyclic.bench import ce

    seen = []
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ce, "main", lambda args: seen.append(os.environ.get("TRITON_INTERPRET")) or 0)
    assert main(["bench", "ce", "--device", "cpu", "--quick"]) == 0
    assert main(["bench", "ce", "--device", "cpu", "--quick", "--interpret"]) == 0
    assert seen == [None, "1"]


def test_speedups_are_the_baseline_median_over_fastcyclics_per_shape():
    """speedup_vs_X = X's median / fastcyclic's, per case, against baselines only, from records that ran."""
    from fastcyclic.bench import ce

    records = [dict(case="a", method="fastcyclic", status="ok", median_ms=2.0),
               dict(case="a", method="fastcyclic[gemm-backward]", status="ok", median_ms=4.0),
               dict(case="a", method="eager", status="ok", median_ms=6.0),
               dict(case="a", method="compile", status="failed", median_ms=None),
               dict(case="b", method="fastcyclic", status="ok", median_ms=1.0),
               dict(case="b", method="eager", status="ok", median_ms=5.0)]
    ce._speedups(records)
    a, gemm, eager, _, b, _ = records
    assert a["speedup_vs_eager"] == 3.0 and gemm["speedup_vs_eager"] == 1.5 and b["speedup_vs_eager"] == 5.0
    assert "speedup_vs_fastcyclic[gemm-backward]" not in a and "speedup_vs_compile" not in a
    assert not any(k.startswith("speedup") for k in eager)


def test_memory_ratios_and_the_issues_targets_are_judged_per_shape():
    """memory_vs_X = fastcyclic's peak extra memory / X's; meets_target holds every bound of the issue's target (time
    and memory at most, speedup at least), judged only once every figure is known."""
    from fastcyclic.bench import ce

    cpu = ce.target(4096, 64, 65536, torch.float32, torch.device("cpu"))
    assert cpu == {"memory_vs_eager": 0.10, "speedup_vs_eager": 1.0}
    gpu = {"median_ms": 2.2, "memory_vs_eager": 0.01}
    assert ce.target(8192, 256, 65536, torch.bfloat16, torch.device("cuda")) == gpu
    assert ce.target(8192, 256, 65536, torch.float32, torch.device("cuda")) is None
    records = [dict(case="a", method="fastcyclic", status="ok", median_ms=2.0, peak_extra_gib=0.1, target=cpu),
               dict(case="a", method="eager", status="ok", median_ms=6.0, peak_extra_gib=3.0),
               dict(case="b", method="fastcyclic", status="ok", median_ms=3.0, peak_extra_gib=0.1, target=cpu),
               dict(case="b", method="eager", status="ok", median_ms=2.0, peak_extra_gib=3.0),
               dict(case="c", method="fastcyclic", status="ok", median_ms=2.0, peak_extra_gib=None, target=gpu),
               dict(case="c", method="eager", status="ok", median_ms=5.0, peak_extra_gib=1.0)]
    ce._speedups(records)
    a, _, b, _, c, _ = records
    assert a["memory_vs_eager"] == pytest.approx(1 / 30) and a["meets_target"] is True
    assert b["memory_vs_eager"] == pytest.approx(1 / 30) and b["meets_target"] is False  # slower than eager
    assert "memory_vs_eager" not in c and "meets_target" not in c  # no memory figure: not judged
    a["meets_target"], b["median_ms"] = False, 1.0  # a stale verdict, and b now faster: judged again
    ce._speedups(records)
    assert a["meets_target"] is True and b["meets_target"] is True
    assert "target {'memory_vs_eager': 0.1, 'speedup_vs_eager': 1.0}: met" in ce.format_row(
        dict(a, N=4096, D=64, K=65536, tflops_per_s=1.0, err_loss=0.0, err_dh=0.0, err_dw=0.0, correct=True))


def test_the_log_ends_with_the_target_verdicts(monkeypatch, one_thread):
    """Our row prints before eager has run, so its verdict comes in a last block (it was never printed)."""
    from fastcyclic.bench import ce

    monkeypatch.setattr(ce, "CPU_TARGET_SHAPE", (48, 16, 301))
    lines = []
    records, _ = ce.run([(48, 16, 301)], torch.float32, torch.device("cpu"), ["fastcyclic", "eager"], quick=True,
                        log=lines.append)
    ours = records[0]
    assert ours["method"] == "fastcyclic" and "meets_target" in ours
    assert lines[-2:] == ["targets:", ce.format_row(ours)] and "target {'memory_vs_eager': 0.1" in lines[-1]


@pytest.mark.parametrize("error, status", [
    (RuntimeError("kernel exploded"), "failed"), (torch.OutOfMemoryError("CUDA out of memory"), "oom"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 40000000000000000 bytes. Error code 12 (Cannot allocate memory)"), "oom")])
def test_a_failing_fastcyclic_gets_a_record_and_fails_the_suite(error, status, tmp_path, monkeypatch):
    """fastcyclic raising (or out of memory) is recorded as failed (oom) and exits 1; the baselines still run."""
    def broken(fn):
        def raising(h, w, y):
            raise error
        return raising

    code, records = run_with_one_method_changed(monkeypatch, tmp_path, "fastcyclic", broken)
    assert code == 1
    shown = "out of memory: tried to allocate 3.725e+07 GiB" if "DefaultCPUAllocator" in str(error) else str(error)
    assert records["fastcyclic"]["status"] == status and shown in records["fastcyclic"]["error"]
    assert records["eager"]["status"] == "ok" and records["eager"]["correct"] is True


def test_a_wrong_baseline_is_reported_but_does_not_fail_the_suite(tmp_path, monkeypatch):
    """Only fastcyclic's correctness decides the exit code: a baseline off by 1e-3 is marked, not failed."""
    code, records = run_with_one_method_changed(monkeypatch, tmp_path, "eager",
                                                lambda fn: (lambda h, w, y: fn(h, w, y) * 1.001))
    assert code == 0
    assert records["eager"]["correct"] is False and records["fastcyclic"]["correct"] is True


def test_the_rate_counts_six_n_d_k_flops_per_median_step(tmp_path):
    """TFLOP/s = 6*N*D*K (forward and two backward GEMMs) over the median time."""
    out = tmp_path / "res"
    assert main(["bench", "ce", "--device", "cpu", "--shapes", "48x16x301", "--methods", "fastcyclic", "--quick",
                 "--out", str(out)]) == 0
    r = json.loads((out / "ce.json").read_text())["records"][0]
    assert r["flops"] == 6 * 48 * 16 * 301
    assert r["tflops_per_s"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e9))


def change_backward(monkeypatch, grad, change):
    """The torch backend's backward (what fastcyclic runs on CPU) with its dh or dW passed through change."""
    from fastcyclic import linear_ce

    real = linear_ce.torch_impl.backward

    def backward(*args, **kwargs):
        dh, dw, db = real(*args, **kwargs)
        if grad == "dh" and dh is not None:
            dh = change(dh)
        if grad == "dw" and dw is not None:
            dw = change(dw)
        return dh, dw, db

    monkeypatch.setattr(linear_ce.torch_impl, "backward", backward)


@pytest.mark.parametrize("grad", ["dh", "dw"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_gradient_off_by_3_percent_alone_fails(grad, dtype, tmp_path, monkeypatch):
    """Each gradient is judged on its own, in bf16 too (its tolerance 8e-3 sits above bf16's rounding, 1.7e-3)."""
    from fastcyclic.bench import ce

    change_backward(monkeypatch, grad, lambda g: g * 1.03)
    code, records = run_with_one_method_changed(monkeypatch, tmp_path, "fastcyclic", lambda fn: fn, dtype)
    assert code == 1
    wrong = records["fastcyclic"]
    assert wrong["correct"] is False and wrong["err"] == wrong[f"err_{grad}"] > 1e-2 and wrong["err_loss"] < 1e-5
    assert wrong["tolerance"] == ce.TOLERANCE[ce.DTYPES[dtype]]
    assert wrong["loss_tolerance"] == ce.LOSS_TOLERANCE[ce.DTYPES[dtype]]
    assert records["eager"]["correct"] is True


@pytest.mark.parametrize("grad", ["dh", "dw"])
def test_a_nan_gradient_fails_with_an_infinite_error(grad, tmp_path, monkeypatch):
    """NaN compares false with everything: as an error it could pass max() and the tolerance unseen."""
    change_backward(monkeypatch, grad, lambda g: g * float("nan"))
    code, records = run_with_one_method_changed(monkeypatch, tmp_path, "fastcyclic", lambda fn: fn)
    assert code == 1
    wrong = records["fastcyclic"]
    assert wrong["correct"] is False and wrong[f"err_{grad}"] == wrong["err"] == "inf"  # JSON's spelling


@pytest.mark.parametrize("dtype, off", [("fp32", 5e-5), ("bf16", 5e-4)])
def test_a_loss_off_with_right_gradients_fails(dtype, off, tmp_path, monkeypatch):
    """The loss has its own tolerance (fp32 1e-5, bf16 1e-4): a loss 5x past it fails though dh and dW are exact."""
    def off_loss(fn):
        def loss(h, w, y):
            value = fn(h, w, y)
            return value + off * value.detach()  # the value changes, the gradients do not
        return loss

    code, records = run_with_one_method_changed(monkeypatch, tmp_path, "fastcyclic", off_loss, dtype)
    assert code == 1
    wrong = records["fastcyclic"]
    assert wrong["correct"] is False and wrong["err_loss"] == pytest.approx(off, rel=0.2)
    # err and tolerance are the gradients' (in agreement), the loss's are err_loss and loss_tolerance: a reader of
    # the common fields alone saw err (the loss's 1e-3) below tolerance (the gradients' 8e-3) beside correct False
    assert wrong["err"] == max(wrong["err_dh"], wrong["err_dw"]) and wrong["err_loss"] > wrong["loss_tolerance"]


def test_the_reference_is_float64_cross_entropy():
    """The mean over rows of lse - z_y, and dh and dW from the softmax, to float64 precision (fp32: 1e-7 off)."""
    from fastcyclic.bench import ce

    h, w, y = ce.make_inputs(3, 4, 7, torch.float32, torch.device("cpu"))
    z = h.detach().double() @ w.detach().double().T
    p = torch.softmax(z, dim=1)
    expected_loss = (torch.logsumexp(z, dim=1) - z[torch.arange(3), y]).mean()
    g = (p - F.one_hot(y, 7).double()) / 3
    loss, dh, dw = ce.reference(h, w, y)
    assert loss.dtype == dh.dtype == dw.dtype == torch.float64
    torch.testing.assert_close(loss, expected_loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(dh, g @ w.detach().double(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dw, g.T @ h.detach().double(), rtol=1e-12, atol=1e-15)


def test_tf32_dots_are_judged_at_the_tf32_tolerance(monkeypatch):
    """fp32 on CUDA with TF32 allowed rounds the dots' inputs to 10 bits: TF32_TOLERANCE; other dtypes, or CPU, not."""
    from fastcyclic.bench import ce
    from fastcyclic.kernels import linear_ce as kernels

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for allowed in (True, False):
        monkeypatch.setattr(kernels, "tf32_allowed", lambda: allowed)
        assert ce.grad_tolerance(torch.float32, cuda) == (ce.TF32_TOLERANCE if allowed else 1e-5)
        assert ce.grad_tolerance(torch.bfloat16, cuda) == ce.TOLERANCE[torch.bfloat16]
        assert ce.grad_tolerance(torch.float32, cpu) == 1e-5


def test_peak_memory_is_recorded_in_gib(monkeypatch):
    from fastcyclic.bench import ce

    monkeypatch.setattr(ce.measure, "peak_extra_bytes", lambda fn, device: 3 * 2**30)
    records, _ = ce.run([(48, 16, 301)], torch.float32, torch.device("cpu"), ["eager"], quick=True, log=lambda *a: 0)
    assert records[0]["peak_extra_gib"] == 3.0


def fake_run_case(fn, h, w, y, ref, *, quick):
    """run_case's record without computing anything, noting the tile configuration in force."""
    from fastcyclic import linear_ce

    return dict(err_loss=0.0, err_dh=0.0, err_dw=0.0, loss_tolerance=1e-5, correct=True, median_ms=1.0, q25_ms=1.0,
                q75_ms=1.0, peak_extra_gib=0.0, config_in_force=linear_ce._tuning.get("config"))


@pytest.mark.parametrize("tuning_fails", [False, True])
def test_tuned_tiles_are_run_and_recorded(tuning_fails, monkeypatch):
    """--tune: fastcyclic runs with the default and the tuned tiles, and the gemm backward on the tuned ones; a tuning
    that fails is recorded and the default tiles are run."""
    import dataclasses

    from fastcyclic.bench import ce, tune
    from fastcyclic.kernels.linear_ce import default_config

    tuned = dataclasses.replace(default_config(48, 16, 301, torch.float32, torch.device("cpu")), grad_chunk=64)

    def tune_shape(h, w, y, log):
        if tuning_fails:
            raise RuntimeError("no tile fits")
        return tuned, {"forward": []}

    monkeypatch.setattr(tune, "tune_shape", tune_shape)
    monkeypatch.setattr(ce, "run_case", fake_run_case)
    records, tunings = ce.run([(48, 16, 301)], torch.float32, torch.device("cpu"), ["fastcyclic"], interpret=True,
                              tune=True, log=lambda *a: 0)
    gemm = dataclasses.replace(default_config(48, 16, 301, torch.float32, torch.device("cpu")), backward="gemm")
    if tuning_fails:
        assert tunings == [dict(N=48, D=16, K=301, dtype="float32", error="RuntimeError: no tile fits")]
        expected = {"fastcyclic": None, "fastcyclic[gemm-backward]": gemm}
    else:
        assert tunings == [dict(N=48, D=16, K=301, dtype="float32", tuned=dataclasses.asdict(tuned),
                                timings={"forward": []})]
        expected = {"fastcyclic[default]": None, "fastcyclic[tuned]": tuned,
                    "fastcyclic[gemm-backward]": dataclasses.replace(tuned, backward="gemm")}
    assert [r["method"] for r in records] == list(expected)
    for r in records:
        config = expected[r["method"]]
        assert r["status"] == "ok" and r["config_in_force"] == config
        assert r["config"] == (dataclasses.asdict(config) if config else None)


def test_ce_json_keeps_the_tuning(tmp_path):
    from fastcyclic.bench import ce

    ce.write_results(tmp_path, {"cpu": "x"}, [], tuning=[{"N": 48, "tuned": {"backward": "gemm"}}], complete=False)
    assert json.loads((tmp_path / "ce.json").read_text())["tuning"] == [{"N": 48, "tuned": {"backward": "gemm"}}]


@pytest.mark.parametrize("method, status, correct, code", [
    ("fastcyclic", "ok", True, 0), ("fastcyclic", "ok", False, 1), ("fastcyclic[gemm-backward]", "ok", False, 1),
    ("fastcyclic[tuned]", "oom", None, 1), ("fastcyclic", "failed", None, 1), ("fastcyclic", "skipped", None, 3),
    ("eager", "ok", False, 0), ("eager", "oom", None, 0), ("liger", "unavailable", None, 0),
    ("eager", "skipped", None, 0)])
def test_the_exit_code_is_fastcyclics_verdict(method, status, correct, code, monkeypatch, capsys):
    """1 when any fastcyclic variant is wrong, failed or out of memory; 3 (incomplete) when one was skipped by the
    time budget; a baseline's verdict never decides it."""
    from fastcyclic.bench import ce

    record = dict(method=method, status=status, correct=correct)
    monkeypatch.setattr(ce.measure, "print_ceilings", lambda device, quick: {})
    monkeypatch.setattr(ce, "run", lambda *args, **kwargs: ([record], []))
    assert main(["bench", "ce", "--device", "cpu", "--quick"]) == code
    err = capsys.readouterr().err
    assert ("FAILED" in err, "INCOMPLETE" in err) == (code == 1, code == 3)


def test_a_reference_out_of_memory_is_recorded_for_every_method(tmp_path, monkeypatch):
    from fastcyclic.bench import ce

    def reference(h, w, y):
        raise torch.OutOfMemoryError("no room for the float64 reference")

    monkeypatch.setattr(ce, "reference", reference)
    out = tmp_path / "res"
    assert main(["bench", "ce", "--device", "cpu", "--shapes", "48x16x301", "--methods", "fastcyclic", "eager",
                 "--quick", "--out", str(out)]) == 1
    records = json.loads((out / "ce.json").read_text())["records"]
    assert [(r["method"], r["status"]) for r in records] == [("fastcyclic", "oom"), ("eager", "oom")]
    assert all(r["error"].startswith("inputs/reference: OutOfMemoryError") for r in records)


def test_a_fastcyclic_that_cannot_be_set_up_fails_the_suite(tmp_path, monkeypatch):
    """A setup error is a failure, not "unavailable" (which only Unavailable, e.g. a baseline not installed, is)."""
    from fastcyclic.bench import ce

    real = ce.make_method

    def make_method(name, device, interpret):
        if name == "fastcyclic":
            raise ImportError("fastcyclic kernels failed to import")
        return real(name, device, interpret)

    monkeypatch.setattr(ce, "make_method", make_method)
    records, _ = ce.run([(48, 16, 301)], torch.float32, torch.device("cpu"), ["fastcyclic", "eager"], quick=True,
                        log=lambda *a: 0)
    assert [(r["method"], r["status"]) for r in records] == [("fastcyclic", "failed"), ("eager", "ok")]
    assert "failed to import" in records[0]["error"]


def test_the_budget_spent_between_methods_skips_the_rest(monkeypatch):
    from fastcyclic.bench import ce

    checks = iter([False, False, True, True])  # the shape's check, the first method's, the second's, ...
    monkeypatch.setattr(ce.measure, "out_of_time", lambda: next(checks))
    monkeypatch.setattr(ce, "run_case", fake_run_case)
    records, _ = ce.run([(48, 16, 301)], torch.float32, torch.device("cpu"), ["eager", "fastcyclic"], quick=True,
                        log=lambda *a: 0)
    assert [(r["method"], r["status"]) for r in records] == [("eager", "ok"), ("fastcyclic", "skipped")]


def test_the_interpreters_size_limit_is_inclusive(monkeypatch):
    """--interpret refuses N*D*K above 2^28, as its message says ("<="): 2^28 itself is run."""
    from fastcyclic.bench import ce

    monkeypatch.setattr(ce.measure, "print_ceilings", lambda device, quick: {})
    monkeypatch.setattr(ce, "run", lambda *args, **kwargs: ([], []))
    assert main(["bench", "ce", "--device", "cpu", "--interpret", "--shapes", "4096x64x1024"]) == 0
