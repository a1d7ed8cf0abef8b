"""The `fastcyclic bench geometry` suite on CPU: records, files, correctness detection (refusals of bad input:
test_bench_all.py)."""
import csv
import dataclasses
import json

import pytest
import torch

from fastcyclic.bench import geometry, measure
from fastcyclic.cli import main


# one torch thread: on a small shared machine two OpenMP threads wait on each other (conftest.py)
pytestmark = [pytest.mark.portable, pytest.mark.usefixtures("one_thread")]


def run(argv):
    """What `fastcyclic bench geometry ARGV` does."""
    return main(["bench", "geometry", *argv])


def load(out):
    return json.loads((out / "geometry.json").read_text())


def test_planted_layout_is_what_the_summary_should_find():
    W, E = geometry.planted(257, 16)
    assert W.dtype == E.dtype == torch.float64 and W.shape == E.shape == (257, 16)
    assert bool((W != 0).all())
    s = geometry.reference_summary(W, E)
    assert geometry.planted_found(s) == []
    assert s.locking > 0.99  # one shared plane


def test_quick_cpu_run_writes_complete_records(tmp_path, capsys):
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--shapes", "257x16", "1031x8", "--out", str(out)]) == 0
    results = load(out)
    assert results["suite"] == "geometry" and results["ceilings"]["copy"]["status"] == "ok"
    records = results["records"]
    assert [r["case"] for r in records] == ["K=257 d=16", "K=1031 d=8"]
    for r in records:
        assert set(measure.COMMON_FIELDS) <= set(r)
        assert r["status"] == "ok" and r["method"] == "summarize" and r["dtype"] == "float32"
        assert r["correct"] is True and r["err"] <= geometry.TOLERANCE
        assert r["mismatched"] is None and r["missed"] is None
        assert r["verdict"] == "cyclic" and r["omega_W"] == geometry.OMEGA
        assert r["bytes"] == 2 * r["K"] * r["d"] * 4
        assert r["rate_unit"] == "GB/s" and r["ceiling"] == "copy" and r["frac_ceiling"] > 0
        assert 0 < r["q25_ms"] <= r["median_ms"] <= r["q75_ms"]
        assert r["frac_of_100_train_steps"] is None  # CUDA only, unless a step time is given
        assert r["telemetry"].startswith("unavailable")
    rows = list(csv.DictReader((out / "geometry.csv").open()))
    assert [row["case"] for row in rows] == ["K=257 d=16", "K=1031 d=8"]
    assert not list(out.glob("*.tmp"))
    assert "K=1031 d=8" in capsys.readouterr().out


def test_given_train_step_gives_the_fraction_of_100_steps(tmp_path):
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--shapes", "257x16", "--train-step-ms", "5.0", "--out", str(out)]) == 0
    r = load(out)["records"][0]
    assert r["train_step_ms"] == 5.0
    assert r["frac_of_100_train_steps"] == pytest.approx(r["median_ms"] / 500.0)
    assert r["target"] is None  # the 2 % target is for K = 65521, d = 256


@pytest.mark.parametrize("how", ["rho2", "rho2 by 3e-5", "omega", "dim_count"])
def test_a_wrong_summary_is_reported_as_failing(how, tmp_path, monkeypatch, capsys):
    """Off in a float field by more than TOLERANCE (3x it too), in the planted frequency, or in a count that the
    planted check does not read (found by the comparison with the float64 summary alone)."""
    real = geometry.summarize

    def wrong(W, E):
        s = real(W, E)
        if how.startswith("rho2"):
            return dataclasses.replace(s, rho2_W=s.rho2_W * (0.999 if how == "rho2" else 1 - 3e-5))
        if how == "dim_count":
            return dataclasses.replace(s, dim_count_W=s.dim_count_W + 1)
        return dataclasses.replace(s, omega_W=s.omega_W + 1, shared_omega=False)

    monkeypatch.setattr(geometry, "summarize", wrong)
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--shapes", "257x16", "--out", str(out)]) == 1
    r = load(out)["records"][0]
    assert r["status"] == "ok" and r["correct"] is False
    if how.startswith("rho2"):
        assert r["err"] > geometry.TOLERANCE
    elif how == "dim_count":
        assert r["mismatched"] == ["dim_count_W"] and r["missed"] is None and r["err"] <= geometry.TOLERANCE
    else:
        assert "omega_W" in r["mismatched"] and r["missed"]
    captured = capsys.readouterr()
    assert "WRONG" in captured.out and "FAILED" in captured.err


@pytest.mark.cuda
def test_quick_cuda_run(tmp_path):
    out = tmp_path / "res"
    assert run(["--device", "cuda", "--quick", "--shapes", "8191x64", "--train-step-ms", "4.0", "--out", str(out)]) == 0
    r = load(out)["records"][0]
    assert r["status"] == "ok" and r["correct"] is True and r["device"] == "cuda"
    assert r["frac_of_100_train_steps"] == pytest.approx(r["median_ms"] / 400.0)
    assert set(r["telemetry"]) == {"before", "after"}


def test_a_summary_wrong_in_the_reference_too_fails_on_the_planted_circle(tmp_path, monkeypatch):
    """The float64 reference is the same summarize: a bug in both (E's rho2 too low) is caught by the planted check."""
    from fastcyclic import geometry as fc_geometry

    real = fc_geometry.summarize
    monkeypatch.setattr(fc_geometry, "summarize", lambda W, E: dataclasses.replace(real(W, E), rho2_E=0.5))
    out = tmp_path / "res"
    assert run(["--device", "cpu", "--quick", "--shapes", "257x16", "--out", str(out)]) == 1
    r = load(out)["records"][0]
    assert r["status"] == "ok" and r["err"] <= geometry.TOLERANCE and r["mismatched"] is None
    assert r["correct"] is False and any("rho2" in m for m in r["missed"])


def test_compare_counts_a_non_finite_field_against_a_finite_reference():
    """A summary field that comes back inf or nan where the reference is finite (or finite where the reference is
    not) is an infinite difference."""
    s = geometry.reference_summary(*geometry.planted(257, 16))
    assert geometry.compare(s, s) == (0.0, [])
    assert geometry.compare(dataclasses.replace(s, rho2_W=float("inf")), s)[0] == float("inf")
    assert geometry.compare(dataclasses.replace(s, rho2_W=float("nan")), s)[0] == float("inf")
    assert geometry.compare(s, dataclasses.replace(s, rho2_W=float("inf")))[0] == float("inf")  # and the other way


def test_compare_is_relative_to_the_reference_and_exact_elsewhere():
    """Float fields: |mine - ref| / max(1, |ref|); every other field (int, bool, str, tuple) must be equal."""
    s = geometry.reference_summary(*geometry.planted(257, 16))
    assert geometry.compare(dataclasses.replace(s, rho2_W=s.rho2_W + 0.5), s)[0] == pytest.approx(0.5)
    assert geometry.compare(dataclasses.replace(s, gap_error_W=4.0), dataclasses.replace(s, gap_error_W=2.0))[0] \
        == pytest.approx(1.0)
    changed = dataclasses.replace(s, shared_omega=not s.shared_omega, verdict_E="etf-like", top_freqs_W=(1,))
    assert geometry.compare(changed, s) == (0.0, ["verdict_E", "top_freqs_W", "shared_omega"])


@pytest.mark.parametrize("field, value", [("verdict", "etf-like"), ("verdict_E", "multi-frequency"),
                                          ("omega_W", geometry.OMEGA + 1), ("omega_E", geometry.OMEGA - 1),
                                          ("shared_omega", False), ("rho2_W", 0.98), ("rho2_E", 0.98)])
def test_the_planted_check_reads_both_layers(field, value):
    """planted_found: both verdicts cyclic, both omegas the planted one and shared, both rho2 >= 0.99."""
    s = geometry.reference_summary(*geometry.planted(257, 16))
    assert geometry.planted_found(s) == []
    assert geometry.planted_found(dataclasses.replace(s, **{field: value}))


def test_the_reference_summarizes_the_float64_planted_layout(monkeypatch):
    """The reference reads the planted float64 W and E, not their copies rounded to the benchmark dtype."""
    seen = []
    real = geometry.reference_summary

    def spy(W, E):
        seen.append((W, E))
        return real(W, E)

    monkeypatch.setattr(geometry, "reference_summary", spy)
    (record,) = geometry.run([(257, 16)], torch.float32, torch.device("cpu"), quick=True, log=lambda row: None)
    assert record["status"] == "ok" and len(seen) == 1
    for given, planted in zip(seen[0], geometry.planted(257, 16)):
        assert given.dtype == torch.float64 and torch.equal(given, planted)


def test_the_target_is_a_share_strictly_below_two_percent(tmp_path, monkeypatch):
    """A summary taking exactly 2 % of 100 trainer steps does not meet "< 2 %"."""
    monkeypatch.setattr(geometry, "TRAIN_CASE", (257, 16))
    monkeypatch.setattr(measure, "time_ms", lambda *args, **kwargs: dict(median_ms=2.0, q25_ms=2.0, q75_ms=2.0))
    assert run(["--device", "cpu", "--quick", "--shapes", "257x16", "--train-step-ms", "1",
                "--out", str(tmp_path)]) == 0
    r = load(tmp_path)["records"][0]
    assert r["frac_of_100_train_steps"] == geometry.TARGET_FRAC == 0.02 and r["meets_target"] is False


def test_the_target_is_judged_at_the_train_case(tmp_path, monkeypatch):
    """At TRAIN_CASE the record carries the 2 % target and whether 100 trainer steps' share stays under it."""
    monkeypatch.setattr(geometry, "TRAIN_CASE", (257, 16))
    for step_ms, met in (("1e6", True), ("1e-6", False)):
        out = tmp_path / step_ms
        assert run(["--device", "cpu", "--quick", "--shapes", "257x16", "--train-step-ms", step_ms,
                    "--out", str(out)]) == 0
        r = load(out)["records"][0]
        assert r["target"] == {"frac_of_100_train_steps": geometry.TARGET_FRAC} and r["meets_target"] is met
