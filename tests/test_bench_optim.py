"""The `fastcyclic bench optim` suite on CPU: records, files, correctness detection (refusals of bad input:
test_bench_all.py)."""
import argparse
import csv
import json
import re

import pytest
import torch

from fastcyclic.bench import optim
from fastcyclic.cli import main

STEP_METHODS = ["fastcyclic_adamw", "torch_adamw_foreach", "torch_adamw_fused", "fastcyclic_sgdw",
                "torch_sgd_foreach", "torch_sgd_fused"]


# one torch thread: on a small shared machine two OpenMP threads wait on each other (conftest.py)
pytestmark = [pytest.mark.portable, pytest.mark.usefixtures("one_thread")]


def run(argv):
    """What `fastcyclic bench optim ARGV` does."""
    return main(["bench", "optim", *argv])


def records_by_method(out):
    return {r["method"]: r for r in json.loads((out / "optim.json").read_text())["records"]}


def test_quick_cpu_run_writes_complete_records(tmp_path, capsys):
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--sizes", "70000", "--ce-shape", "64x16x301", "--out", str(out)]) == 0
    results = json.loads((out / "optim.json").read_text())
    assert results["machine"]["torch"] and results["machine"]["nvml"]  # "unavailable: ..." without a GPU
    records = {r["method"]: r for r in results["records"]}
    assert set(records) == {"copy", *STEP_METHODS, "ce+step", "ce+fused_update"}

    copy = records["copy"]
    assert copy["kind"] == "ceiling" and copy["status"] == "ok" and copy["gbps"] > 0
    for name in STEP_METHODS:
        r = records[name]
        if name.endswith("_fused") and r["status"] == "unavailable":
            continue  # a torch without the fused CPU kernel: reported, not crashed
        assert r["status"] == "ok", r
        assert r["numel"] == 70000 and r["tensors"] == 8 and r["dtype"] == "float32"
        assert r["bytes_per_param"] == (28.0 if r["optimizer"] == "adamw" else 20.0)
        assert r["gbps"] > 0 and r["frac_copy"] > 0
        assert 0 < r["q25_ms"] <= r["median_ms"] <= r["q75_ms"]
        if name in optim.REFERENCE.values():  # compared with itself: 0 by construction, not a verdict
            assert r["correct"] is None and r["rel_diff"] == 0 and r["notes"] == "the reference itself: not judged"
        else:
            assert r["correct"] is True and r["rel_diff"] <= 1e-5
    for name in ("fastcyclic_adamw", "fastcyclic_sgdw"):
        assert records[name]["backend"] == "torch"

    plain, fused = records["ce+step"], records["ce+fused_update"]
    assert plain["status"] == fused["status"] == "ok"
    assert (fused["N"], fused["D"], fused["K"]) == (64, 16, 301)
    assert fused["correct"] is True and fused["rel_diff"] <= 1e-4
    # ce+step is the reference: it printed the fused update's difference and "ok"
    assert plain["correct"] is None and plain["rel_diff"] == 0 and plain["notes"] == optim.REFERENCE_NOTE
    assert fused["saving_pct"] == pytest.approx(100 * (1 - fused["median_ms"] / plain["median_ms"]))

    rows = list(csv.DictReader((out / "optim.csv").open()))
    assert [row["method"] for row in rows] == [r["method"] for r in results["records"]]
    assert {"gbps", "frac_copy", "rel_diff", "correct", "saving_pct"} <= set(rows[0])
    assert not list(out.glob("*.tmp"))
    table = capsys.readouterr().out
    assert "fastcyclic_adamw" in table and "ce+fused_update" in table
    for name in ("torch_adamw_foreach", "ce+step"):
        assert [line.endswith("(the reference)") for line in table.splitlines() if f" {name} " in line] == [True], name


def test_bf16_counts_the_state_each_optimizer_keeps(tmp_path):
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--dtype", "bf16", "--sizes", "5000", "--methods", "fastcyclic_adamw",
                "torch_adamw_foreach", "fastcyclic_sgdw", "--out", str(out)]) == 0
    records = records_by_method(out)
    # fastcyclic keeps fp32 state for bf16 parameters, torch keeps bf16 state
    assert records["fastcyclic_adamw"]["bytes_per_param"] == 22.0
    assert records["torch_adamw_foreach"]["bytes_per_param"] == 14.0
    assert records["fastcyclic_sgdw"]["bytes_per_param"] == 14.0
    for name in ("fastcyclic_adamw", "fastcyclic_sgdw"):
        assert records[name]["correct"] is True and records[name]["reference"].endswith("[fp32]")
    # torch's bf16 state is another rule: its distance is reported, never a verdict
    theirs = records["torch_adamw_foreach"]
    assert theirs["correct"] is None and theirs["ulp_diff"] is not None and "not judged" in theirs["notes"]
    assert "ce+step" not in records


@pytest.mark.parametrize("dtype, decay_kept", [("fp32", 0.0), ("bf16", 0.0), ("fp32", 0.99)])
def test_a_wrong_optimizer_is_reported_as_failing(dtype, decay_kept, tmp_path, monkeypatch, capsys):
    """In bf16 too: its rounding at |p| ~ 4 is as large as a step, so bf16 methods are judged in ulps against the
    fp32 rule rounded to bf16 after every step, where the right rule lands on the same bf16 numbers.  In fp32 a
    weight decay 1 % off (3e-5) fails as well as one forgotten (3e-3)."""
    from fastcyclic.optim import AdamW

    def wrong_decay(params, device, interpret):  # off by lr * (1 - decay_kept) * wd * p per step
        return AdamW(params, lr=optim.LR, weight_decay=optim.WEIGHT_DECAY * decay_kept, backend="torch")

    monkeypatch.setitem(optim.STEP_METHODS, "fastcyclic_adamw", ("adamw", wrong_decay, False))
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--dtype", dtype, "--sizes", "3000", "--methods", "fastcyclic_adamw",
                "--out", str(out)]) == 1
    r = records_by_method(out)["fastcyclic_adamw"]
    assert r["status"] == "ok" and r["correct"] is False
    assert r["rel_diff"] > optim.TOLERANCE[torch.float32] if dtype == "fp32" else r["ulp_diff"] > optim.ULP_TOLERANCE
    assert r["err"] == r["rel_diff" if dtype == "fp32" else "ulp_diff"]  # the judged error, in its units
    captured = capsys.readouterr()
    assert "WRONG" in captured.out and "FAILED" in captured.err


def run_with_a_shrinking_fused_update(tmp_path, monkeypatch, shrink: float, expected_exit: int) -> dict:
    """The ce+fused_update record when the fused update also multiplies W by (1 - shrink) each step."""
    from fastcyclic.optim import FusedUpdate

    real = FusedUpdate._apply

    def shrinking(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.weight.mul_(1 - shrink)

    monkeypatch.setattr(FusedUpdate, "_apply", shrinking)
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--methods", "ce_update", "--ce-shape", "64x16x301",
                "--out", str(out)]) == expected_exit
    return records_by_method(out)["ce+fused_update"]


def test_a_wrong_fused_update_is_reported_as_failing(tmp_path, monkeypatch):
    """The ce+fused_update check: a fused update that also shrinks W by 1e-3 a step ends 3e-3 off ce+step."""
    r = run_with_a_shrinking_fused_update(tmp_path, monkeypatch, 1e-3, expected_exit=1)
    assert r["status"] == "ok" and r["correct"] is False and r["rel_diff"] > 10 * r["tolerance"]


def test_a_fused_update_that_forgets_the_decay_is_reported_as_failing_in_bf16(tmp_path, monkeypatch):
    """CE_WEIGHT_DECAY is large enough that a fused update without the decay ends 3e-2 of |W| off ce+step, outside
    bf16's 1e-2 (at WEIGHT_DECAY it would end 3.5e-3 off, inside)."""
    from fastcyclic.optim import FusedUpdate

    real = FusedUpdate._apply

    def without_decay(self, *args, **kwargs):
        group = self.optimizer.param_groups[self.group_index]
        decay, group["weight_decay"] = group["weight_decay"], 0.0
        try:
            real(self, *args, **kwargs)
        finally:
            group["weight_decay"] = decay  # as it was: step() refuses a group changed since the fused update

    monkeypatch.setattr(FusedUpdate, "_apply", without_decay)
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--dtype", "bf16", "--methods", "ce_update", "--ce-shape", "64x16x301",
                "--out", str(out)]) == 1
    r = records_by_method(out)["ce+fused_update"]
    assert r["status"] == "ok" and r["correct"] is False and r["rel_diff"] > r["tolerance"] == 1e-2


def test_a_fused_update_within_the_tolerance_of_w_passes(tmp_path, monkeypatch):
    """The ce_update verdict is |W_fused - W_step| / |W_step| <= 1e-4 (fp32), not the difference over the distance W
    moved (update_rel_diff, recorded): shrinking W by 2e-5 a step ends ~6e-5 of |W| off, ~5x that of the update."""
    r = run_with_a_shrinking_fused_update(tmp_path, monkeypatch, 2e-5, expected_exit=0)
    assert r["correct"] is True and r["rel_diff"] <= r["tolerance"] < r["update_rel_diff"]


def test_a_refused_or_failing_method_gets_a_record_and_the_run_goes_on(tmp_path, monkeypatch):
    def refuses(params, device, interpret):
        raise RuntimeError("fused=True is not supported here")

    def breaks(params, device, interpret):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(optim.STEP_METHODS, "torch_adamw_fused", ("adamw", refuses, True))
    monkeypatch.setitem(optim.STEP_METHODS, "fastcyclic_sgdw", ("sgd", breaks, False))
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--sizes", "3000", "--methods", "torch_adamw_fused",
                "fastcyclic_sgdw", "torch_sgd_foreach", "--out", str(out)]) == 1  # fastcyclic failed
    records = records_by_method(out)
    assert records["torch_adamw_fused"]["status"] == "unavailable"
    assert "not supported" in records["torch_adamw_fused"]["error"]
    assert records["fastcyclic_sgdw"]["status"] == "failed" and "exploded" in records["fastcyclic_sgdw"]["error"]
    assert records["torch_sgd_foreach"]["status"] == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="--interpret is the CPU path")
def test_interpret_runs_the_triton_kernels(tmp_path):
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--interpret", "--sizes", "70000", "--methods", "fastcyclic_adamw",
                "fastcyclic_sgdw", "--out", str(out)]) == 0
    for r in records_by_method(out).values():
        if r["kind"] == "step":
            assert r["backend"] == "triton" and r["status"] == "ok" and r["correct"] is True


@pytest.mark.parametrize("total", [1, 17, 4096, 2**16, 70000, 2**25])
def test_split_sizes_is_model_like_and_sums_to_the_total(total):
    sizes = optim.split_sizes(total)
    assert sum(sizes) == total and min(sizes) >= 1
    assert sizes[0] == max(sizes)


def test_the_check_flips_and_halves_the_gradients_and_rounds_after_every_step(monkeypatch):
    """stepped(): CHECK_STEPS steps, the gradients times -0.5 between them (so the moments see sign changes), and with
    round_to the parameters rounded to it after every step.  SGD at lr 1 makes each step exactly p -= g."""
    def plain_sgd(params, device, interpret):
        return torch.optim.SGD(params, lr=1.0)

    monkeypatch.setitem(optim.STEP_METHODS, "plain_sgd", ("sgd", plain_sgd, False))
    cpu = torch.device("cpu")
    start, grads = optim.make_params(3000, torch.float32, cpu)
    for round_to in (None, torch.bfloat16):
        _, params = optim.stepped("plain_sgd", start, grads, cpu, False, round_to=round_to)
        for p, s, g in zip(params, start, grads):
            expected = s
            for i in range(optim.CHECK_STEPS):
                expected = expected - g * (-0.5) ** i
                expected = expected if round_to is None else expected.to(round_to).float()
            assert torch.equal(p.detach(), expected)


def test_errors_read_every_tensor_against_the_largest_reference_value():
    """max_diff: max|p - ref| over all tensors (the small ones too) and that over max|ref|; max_ulps: elementwise in
    units of the dtype's eps times |ref|; a NaN is an infinite error."""
    ref = [torch.tensor([4.0, -2.0]), torch.tensor([1.0])]
    assert optim.max_diff([torch.tensor([4.0, -2.0]), torch.tensor([1.5])], ref) == (0.5, 0.125)
    eps = torch.finfo(torch.bfloat16).eps
    bf16_ref = [r.bfloat16() for r in ref]
    off = [torch.tensor([4.0, -2.0 - 2 * eps * 2]).bfloat16(), torch.tensor([1.0 + eps]).bfloat16()]  # 2 ulps, 1 ulp
    assert optim.max_ulps(off, bf16_ref, torch.bfloat16) == 2.0
    assert optim.max_ulps([torch.tensor([float("nan")]).bfloat16()], [torch.ones(1).bfloat16()], torch.bfloat16) \
        == float("inf")


def test_a_nan_in_any_tensor_is_an_infinite_error():
    """Python's max() keeps its first argument over a later NaN (NaN > x is False): a NaN in a tensor after the first
    gave an error of 0 and a pass."""
    ref = [torch.tensor([4.0, -2.0]), torch.tensor([1.0])]
    nan_in_the_last = [torch.tensor([4.0, -2.0]), torch.tensor([float("nan")])]
    assert optim.max_diff(nan_in_the_last, ref) == (float("inf"), float("inf"))
    assert optim.max_ulps([p.bfloat16() for p in nan_in_the_last], [r.bfloat16() for r in ref], torch.bfloat16) \
        == float("inf")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_optimizer_that_writes_nan_into_a_small_tensor_is_reported_as_failing(dtype, tmp_path, monkeypatch):
    from fastcyclic.optim import AdamW

    class NanInTheLast(AdamW):
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][-1].fill_(float("nan"))  # a bias-sized tensor, not the first

    def nan_in_the_last(params, device, interpret):
        return NanInTheLast(params, lr=optim.LR, weight_decay=optim.WEIGHT_DECAY, backend="torch")

    monkeypatch.setitem(optim.STEP_METHODS, "fastcyclic_adamw", ("adamw", nan_in_the_last, False))
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--dtype", dtype, "--sizes", "3000", "--methods", "fastcyclic_adamw",
                "--out", str(out)]) == 1  # was 0
    r = records_by_method(out)["fastcyclic_adamw"]
    assert r["status"] == "ok" and r["correct"] is False and r["err"] == "inf"  # strict JSON


@pytest.mark.parametrize("text, value", [("2^25", 2**25), ("2**10", 1024), ("33554432", 2**25), ("1", 1)])
def test_parse_size(text, value):
    assert optim.parse_size(text) == value


@pytest.mark.parametrize("text, message", [("2^70", "at most 2^40, got '2^70'"), ("3^40", "at most 2^40"),
                                           ("2^-1", "a positive integer or a power"), ("0", "must be positive")])
def test_parse_size_names_what_is_wrong(text, message):
    """2^70 was called "not a positive integer or a power": it is one, only too large."""
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        optim.parse_size(text)


def test_bandwidth_and_rates_follow_the_median(tmp_path):
    """GB/s = bytes a step moves over the median, frac_copy against the copy's; ce_update TFLOP/s = 6NDK/median."""
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--sizes", "3000", "--ce-shape", "48x16x301", "--methods",
                "fastcyclic_adamw", "ce_update", "--out", str(out)]) == 0
    records = records_by_method(out)
    r, copy = records["fastcyclic_adamw"], records["copy"]
    assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e6)) and r["bytes"] == 28 * 3000
    assert copy["bytes_per_param"] == 8.0  # an fp32 element read and written
    assert r["frac_copy"] == pytest.approx(r["gbps"] / copy["gbps"])
    for name in ("ce+step", "ce+fused_update"):
        ce = records[name]
        assert ce["rate"] == pytest.approx(6 * 48 * 16 * 301 / (ce["median_ms"] * 1e9)) and ce["rate_unit"] == "TFLOP/s"


def test_fastcyclic_without_a_reference_is_not_a_pass(tmp_path, monkeypatch):
    """The reference (torch foreach) failing left fastcyclic unchecked, and the suite exited 0."""
    def breaks(params, device, interpret):
        raise RuntimeError("reference exploded")

    monkeypatch.setitem(optim.STEP_METHODS, "torch_sgd_foreach", ("sgd", breaks, False))
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--sizes", "3000", "--methods", "fastcyclic_sgdw",
                "--out", str(out)]) == 1
    record = records_by_method(out)["fastcyclic_sgdw"]
    assert record["correct"] is None and "no reference: RuntimeError: reference exploded" in record["error"]


def test_our_optimizer_out_of_memory_fails_the_suite(tmp_path, monkeypatch):
    """A fastcyclic optimizer out of memory is recorded as "oom" and exits 1, as a failure does."""
    def out_of_memory(params, device, interpret):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setitem(optim.STEP_METHODS, "fastcyclic_sgdw", ("sgd", out_of_memory, False))
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--sizes", "3000", "--methods", "fastcyclic_sgdw", "torch_sgd_foreach",
                "--out", str(out)]) == 1
    records = records_by_method(out)
    assert records["fastcyclic_sgdw"]["status"] == "oom" and records["torch_sgd_foreach"]["status"] == "ok"
