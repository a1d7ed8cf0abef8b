"""The `fastcyclic bench ce` command on CPU: records and files (refusals of bad input: test_bench_all.py)."""
import json

import pytest
import torch

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
        assert r["err"] == max(r["err_loss"], r["err_dh"], r["err_dw"]) and r["tolerance"] == 1e-5
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


@pytest.mark.parametrize("error, status", [(RuntimeError("kernel exploded"), "failed"),
                                           (torch.OutOfMemoryError("CUDA out of memory"), "oom")])
def test_a_failing_fastcyclic_gets_a_record_and_fails_the_suite(error, status, tmp_path, monkeypatch):
    """fastcyclic raising (or out of memory) is recorded as failed (oom) and exits 1; the baselines still run."""
    def broken(fn):
        def raising(h, w, y):
            raise error
        return raising

    code, records = run_with_one_method_changed(monkeypatch, tmp_path, "fastcyclic", broken)
    assert code == 1
    assert records["fastcyclic"]["status"] == status and str(error) in records["fastcyclic"]["error"]
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
