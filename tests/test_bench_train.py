"""The `fastcyclic bench train` suite on CPU: records, files, correctness detection (refusals of bad input:
test_bench_all.py)."""
import argparse
import csv
import json
import math

import pytest
import torch

from fastcyclic.bench import measure, train
from fastcyclic.cli import main

# full batch at P = 31 (about 384 train pairs <= 512), sampled from the enumerated split at P = 61,
# hashed split (P^2 > 2^22) and the plain loop's pool at P = 2053
TINY = ["--device", "cpu", "--quick", "--shapes", "31x8", "61x8", "2053x8", "--batch-size", "512"]
# one torch thread: on a small shared machine two OpenMP threads wait on each other (conftest.py)
pytestmark = [pytest.mark.portable, pytest.mark.usefixtures("one_thread")]


def run(argv):
    """What `fastcyclic bench train ARGV` does."""
    return main(["bench", "train", *argv])


def load(out):
    return json.loads((out / "train.json").read_text())


def test_quick_cpu_run_writes_complete_records(tmp_path, capsys):
    out = tmp_path / "res"
    assert run(TINY + ["--dtype", "fp32", "bf16", "--out", str(out)]) == 0
    results = load(out)
    assert results["suite"] == "train" and results["machine"]["torch"]
    assert results["ceilings"]["copy"]["status"] == "ok" and results["ceilings"]["gemm_float32"]["tflops_per_s"] > 0
    records = results["records"]
    # --quick on CPU leaves torch.compile out (it compiles for tens of seconds on a small CPU)
    assert [(r["case"], r["dtype"], r["method"]) for r in records] == [
        (case, dtype, method) for dtype in ("float32", "bfloat16") for case in ("P=31 d=8", "P=61 d=8", "P=2053 d=8")
        for method in ("fastcyclic", "eager")]
    for r in records:
        assert set(measure.COMMON_FIELDS) <= set(r)
        assert r["status"] == "ok", r
        assert r["bench"] == "train" and r["device"] == "cpu"
        assert r["correct"] is True and r["err"] <= r["tolerance"] == train.TOLERANCE[getattr(torch, r["dtype"])]
        assert r["err"] == max(r["err_E"], r["err_W"])
        assert 0 < r["q25_ms"] <= r["median_ms"] <= r["q75_ms"]
        assert r["steps_per_s"] == pytest.approx(1e3 / r["median_ms"])
        assert r["rate_unit"] == "TFLOP/s" and r["ceiling"] == "gemm_float32" and r["frac_ceiling"] > 0
        assert r["flops"] == 6 * r["batch"] * r["d"] * r["P"]
        assert r["state_gib"] == 2 * 2 * r["P"] * r["d"] * 4 / 2**30  # fp32 exp_avg, exp_avg_sq of E and W
        assert r["telemetry"].startswith("unavailable")
        assert r["target"] is None  # the targets are the H200's
        assert r["notes"]
    by = {(r["P"], r["dtype"], r["method"]): r for r in records}
    assert by[(31, "float32", "fastcyclic")]["full_batch"] is True
    assert by[(61, "float32", "eager")]["full_batch"] is False and by[(61, "float32", "eager")]["batch"] == 512
    assert "autocast" in by[(61, "bfloat16", "eager")]["notes"]
    assert "fused=True" in by[(61, "float32", "eager")]["notes"]  # what the issue names, on CPU too
    assert by[(61, "float32", "fastcyclic")]["speedup_vs_eager"] > 0

    assert results["complete"] is True  # a run stopped early leaves its per-case files marked False
    assert (out / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in records:  # CPU: no graph, no fused update; memory as the steady growth
        assert r["cuda_graph"] is False and r["fused_update"] is False
        assert r["peak_extra_gib"] == r["steady_peak_extra_gib"]
    rows = list(csv.DictReader((out / "train.csv").open()))
    assert len(rows) == len(records)
    assert {"case", "method", "median_ms", "frac_ceiling", "peak_extra_gib", "err", "correct",
            "steps_per_s"} <= set(rows[0])
    assert not list(out.glob("*.tmp"))
    table = capsys.readouterr().out
    assert "P=2053 d=8" in table and "fastcyclic" in table


def test_targets_and_anchors_are_those_of_the_issue():
    assert train._lookup(train.TARGETS, 113, 128, "float32") == {"median_ms": 0.35}
    assert train._lookup(train.TARGETS, 65521, 256, "bfloat16") == {"median_ms": 4.1, "peak_extra_gib": 0.6}
    assert train._lookup(train.TARGETS, 65521, 256, "float32") is None
    anchor = train._lookup(train.ANCHORS, 65521, 256, "bfloat16")
    assert anchor["compile"] == {"median_ms": 6.16, "peak_extra_gib": 1.94}


class NoDecay(train.FastcyclicRunner):  # forgets the weight decay: off by CHECK_STEPS lr wd |X|
    def __init__(self, spec):
        super().__init__(spec)
        self.trainer.config.weight_decay = 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="--interpret is the CPU path")
def test_interpret_runs_the_trainer_on_its_triton_backend(tmp_path):
    """On CPU the suite timed the trainer on its torch backend only: --interpret checks the Triton one (fused
    cross-entropy and AdamW kernels) against the float64 loop, as ce and optim do theirs."""
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--interpret", "--quick", "--shapes", "13x8", "--methods", "fastcyclic", "eager",
                "--out", str(out)]) == 0
    r = {r["method"]: r for r in load(out)["records"]}
    assert r["fastcyclic"]["correct"] and r["fastcyclic"]["notes"].startswith(
        "fastcyclic.training.Trainer: backend triton (loss and AdamW)"), r["fastcyclic"]
    assert run(["--device", "cpu", "--interpret", "--shapes", "1031x64"]) == 2  # 8192 x 64 x 1031 > 2^24


def test_a_wrong_trainer_is_reported_as_failing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(train.METHODS, "fastcyclic", NoDecay)
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--shapes", "31x8", "--out", str(out)]) == 1
    r = {r["method"]: r for r in load(out)["records"]}
    assert r["fastcyclic"]["status"] == "ok" and r["fastcyclic"]["correct"] is False
    assert r["fastcyclic"]["err"] > 10 * r["fastcyclic"]["tolerance"]
    assert r["eager"]["correct"] is True
    captured = capsys.readouterr()
    assert "WRONG" in captured.out and "FAILED" in captured.err


def test_a_wrong_trainer_in_bf16_is_reported_as_failing(tmp_path, monkeypatch):
    """bf16's tolerance (2e-3) leaves a forgotten weight decay (1e-2 of |X| after CHECK_STEPS) outside."""
    monkeypatch.setitem(train.METHODS, "fastcyclic", NoDecay)
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--shapes", "31x8", "--dtype", "bf16", "--methods", "fastcyclic",
                "--out", str(out)]) == 1
    r = load(out)["records"][0]
    assert r["status"] == "ok" and r["correct"] is False and r["err"] > r["tolerance"]


def small_spec(dtype=torch.float32):
    cpu = torch.device("cpu")
    data, batch_size, rows, E0, W0 = train.make_problem(31, 8, cpu, 512)
    return train.Spec(31, 8, dtype, cpu, batch_size, rows, data, E0, W0)


def test_the_plain_loops_run_the_trainers_adamw():
    """The eager loop and the float64 reference use the trainer's AdamW settings (a beta2 of torch's default 0.999
    moves X by less than the check's tolerance, so only this catches it), decoupled, and the reference is float64."""
    spec = small_spec()
    fastcyclic = train.FastcyclicRunner(spec)
    fastcyclic.step()  # the trainer writes the (scheduled) weight decay into its group at a step
    ours = fastcyclic.trainer.optimizer.param_groups[0]
    for runner in (train.PlainRunner(spec), train.PlainRunner(spec, reference=True)):
        group = runner.optimizer.param_groups[0]
        assert (group["lr"], group["betas"], group["eps"]) == (ours["lr"], ours["betas"], ours["eps"])
        assert group["weight_decay"] == float(ours["weight_decay"]) == train.WEIGHT_DECAY
        assert isinstance(runner.optimizer, torch.optim.AdamW) and ours["weight_decay_mode"] == "decoupled"
    assert all(x.dtype == torch.float64 for x in train.PlainRunner(spec, reference=True).params())
    assert all(x.dtype == torch.float64 for x in train.reference_params(spec))


def test_a_trainer_that_starts_elsewhere_is_refused():
    """The comparison needs one start: the trainer's initial parameters must be the plain loop's E0 and W0."""
    spec = small_spec()
    spec.E0 = spec.E0 * 1.01
    with pytest.raises(RuntimeError, match="initial parameters differ"):
        train.FastcyclicRunner(spec)


class WrongE(train.FastcyclicRunner):  # W right, E off by 1 %: the check must read both layers
    def params(self):
        E, W = super().params()
        return E * 1.01, W


def test_a_trainer_wrong_only_in_E_is_reported_as_failing(tmp_path, monkeypatch):
    monkeypatch.setitem(train.METHODS, "fastcyclic", WrongE)
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--shapes", "31x8", "--methods", "fastcyclic", "--out", str(out)]) == 1
    r = {r["method"]: r for r in load(out)["records"]}["fastcyclic"]
    assert r["correct"] is False and r["err_W"] <= r["tolerance"] < r["err_E"]


def test_our_trainer_out_of_memory_fails_the_suite(tmp_path, monkeypatch):
    def out_of_memory(spec):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setitem(train.METHODS, "fastcyclic", out_of_memory)
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--shapes", "31x8", "--out", str(out)]) == 1  # was 0
    r = {r["method"]: r for r in load(out)["records"]}
    assert r["fastcyclic"]["status"] == "oom" and r["eager"]["status"] == "ok"


def test_a_failing_baseline_gets_a_record_and_the_run_goes_on(tmp_path, monkeypatch):
    def breaks(spec):
        raise RuntimeError("the plain loop exploded")

    monkeypatch.setitem(train.METHODS, "eager", breaks)
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--shapes", "31x8", "--out", str(out)]) == 0  # ours is fine
    r = {r["method"]: r for r in load(out)["records"]}
    assert r["eager"]["status"] == "failed" and "exploded" in r["eager"]["error"]
    assert r["fastcyclic"]["status"] == "ok"


def test_budget_exhausted_records_skipped_cases(tmp_path):
    out = tmp_path / "res"
    measure.set_budget(-1.0)
    try:
        assert run(["--device", "cpu", "--quick", "--shapes", "31x8", "--out", str(out)]) == measure.INCOMPLETE
    finally:
        measure.set_budget(None)
    assert {r["status"] for r in load(out)["records"]} == {"skipped"}


@pytest.mark.parametrize("text, value", [("113x128", (113, 128)), ("65521X256", (65521, 256)),
                                         ("8191,128", (8191, 128))])
def test_parse_shape(text, value):
    assert train.parse_shape(text) == value


@pytest.mark.parametrize("text", ["113", "113x128x2", "axb", "113x", "2x128"])
def test_parse_shape_refuses_with_the_form(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"PxD|P >= 3"):
        train.parse_shape(text)


@pytest.mark.cuda
def test_quick_cuda_run_checks_the_captured_trainer(tmp_path):
    """On a GPU: the CUDA-graph trainer (its batches sampled inside the graph, fp32 with the update fused
    into the CE backward, bf16) agrees with the float64 loop, and every record carries NVML telemetry."""
    out = tmp_path / "res"
    assert run(["--device", "cuda", "--quick", "--shapes", "31x8", "2053x64", "--batch-size", "512",
                "--methods", "fastcyclic", "eager", "--dtype", "fp32", "bf16", "--out", str(out)]) == 0
    records = load(out)["records"]
    assert len(records) == 8
    for r in records:
        assert r["status"] == "ok" and r["correct"] is True, r
        assert set(r["telemetry"]) == {"before", "after"}
        assert r["peak_extra_gib"] is not None and r["peak_extra_gib"] >= 0
    ours = [r for r in records if r["method"] == "fastcyclic"]
    assert all(r["cuda_graph"] is True for r in ours)  # from Trainer.graph_captured ("no CUDA graph" held the words)
    assert all(r["fused_update"] is True for r in ours if r["dtype"] == "float32")
    assert all(r["cuda_graph"] is False and r["peak_extra_gib"] == r["steady_peak_extra_gib"]
               for r in records if r["method"] == "eager")


class _Fixed:
    """A runner whose parameters are given: run_method's bookkeeping without training."""
    notes, cuda_graph, fused_update = "fixed", False, False

    def __init__(self, E, W):
        self.E, self.W = E, W

    def step(self):
        pass

    def timing_mode(self):
        pass

    def params(self):
        return self.E, self.W

    def state_bytes(self):
        return 0


def test_update_err_is_the_worse_layer_over_the_distance_the_reference_moved(monkeypatch):
    """update_err = max(|E - E_ref|, |W - W_ref|) / max(|E_ref - E0|, |W_ref - W0|): W's error counts too."""
    zeros, ones = torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.float64)
    monkeypatch.setitem(train.METHODS, "fixed", lambda spec: _Fixed(ones.float(), 1.5 * ones.float()))
    spec = train.Spec(5, 2, torch.float32, torch.device("cpu"), None, 4, None, zeros, zeros)
    r = train.run_method("fixed", spec, (ones, 2 * ones), quick=True)
    assert r["update_err"] == pytest.approx(0.5 * 8 ** 0.5 / (2 * 8 ** 0.5))
    assert (r["err_E"], r["err_W"]) == (0.0, pytest.approx(0.25)) and r["correct"] is False


def test_update_err_is_over_the_larger_distance_either_layer_moved(monkeypatch):
    """The denominator takes the larger of the two layers' distances: here E moved the more (the test above has W
    moving more, so a denominator of W's distance alone passed it)."""
    zeros, ones = torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.float64)
    monkeypatch.setitem(train.METHODS, "fixed", lambda spec: _Fixed(2 * ones.float(), 1.5 * ones.float()))
    spec = train.Spec(5, 2, torch.float32, torch.device("cpu"), None, 4, None, zeros, zeros)
    r = train.run_method("fixed", spec, (2 * ones, ones), quick=True)  # E moved by 2 * sqrt(8), W by sqrt(8)
    assert r["update_err"] == pytest.approx(0.5 * 8 ** 0.5 / (2 * 8 ** 0.5))


def test_a_nan_in_w_is_an_infinite_update_err(monkeypatch):
    """max() keeps E's finite distance over W's NaN: update_err read finite while W was NaN."""
    zeros, ones = torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.float64)
    nan_w = torch.full((4, 2), float("nan"))
    monkeypatch.setitem(train.METHODS, "nan_w", lambda spec: _Fixed(ones.float(), nan_w))
    spec = train.Spec(5, 2, torch.float32, torch.device("cpu"), None, 4, None, zeros, zeros)
    r = train.run_method("nan_w", spec, (ones, 2 * ones), quick=True)
    assert r["update_err"] == math.inf and r["err"] == math.inf and r["correct"] is False


def test_speedups_are_the_baseline_median_over_fastcyclics():
    """speedup_vs_X = X's median / fastcyclic's, per case and dtype."""
    records = [dict(case="P=31 d=8", dtype="float32", method="fastcyclic", status="ok", median_ms=2.0),
               dict(case="P=31 d=8", dtype="float32", method="eager", status="ok", median_ms=6.0),
               dict(case="P=31 d=8", dtype="bfloat16", method="fastcyclic", status="ok", median_ms=1.0),
               dict(case="P=31 d=8", dtype="bfloat16", method="eager", status="ok", median_ms=5.0)]
    train._speedups(records)
    assert records[0]["speedup_vs_eager"] == 3.0 and records[2]["speedup_vs_eager"] == 5.0


def test_the_rate_counts_six_rows_d_p_flops_per_median_step(tmp_path):
    """TFLOP/s = 6 * rows * d * P over the median time."""
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--shapes", "31x8", "--methods", "fastcyclic", "--out", str(out)]) == 0
    r = load(out)["records"][0]
    assert r["rate"] == pytest.approx(6 * r["batch"] * 8 * 31 / (r["median_ms"] * 1e9))
