"""The benchmark harness at its edges: memory and time accounting, limits and bounds at exactly their values,
the record schema against its documentation, the failure paths of each suite.  (Each test was written against a
mutant of bench/*.py that the suites' own tests let live.)"""
import argparse
import json

import pytest
import torch

from fastcyclic.bench import measure
from fastcyclic.cli import main

pytestmark = [pytest.mark.portable, pytest.mark.usefixtures("one_thread")]


def test_cuda_peak_memory_is_the_peak_over_what_was_allocated_before(monkeypatch):
    """On CUDA: max_memory_allocated after fn minus memory_allocated before it (the inputs are not fn's)."""
    allocated = {"now": 1000, "peak": 1000}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: allocated["peak"])

    def fn():  # 640 bytes at its peak, 100 of them still held when it returns
        allocated.update(peak=1640, now=1100)

    assert measure.peak_extra_bytes(fn, torch.device("cuda")) == 640


def test_the_documented_record_schema_is_common_fields():
    """measure's docstring names the fields every record carries; COMMON_FIELDS (and so every suite's CSV header)
    holds exactly those, in that order."""
    import re

    text = measure.__doc__.split("suites add their own):", 1)[1]
    while "(" in text:  # the parenthesised remarks, innermost first
        text = re.sub(r"\([^()]*\)", "", text)
    documented = tuple(name.strip() for name in text.replace("\n", " ").strip().rstrip(".").split(","))
    assert documented == measure.COMMON_FIELDS
    assert measure.CSV_COMMON == tuple(f for f in documented if f != "telemetry")


def test_a_speedup_equal_to_its_bound_meets_it():
    """"Not slower than eager" (speedup_vs_eager >= 1.0): exactly 1.0 meets it."""
    assert measure.meets({"speedup_vs_eager": 1.0}, {"speedup_vs_eager": 1.0}) is True
    assert measure.meets({"memory_vs_eager": 0.1}, {"memory_vs_eager": 0.1}) is True


def test_a_budget_not_yet_spent_lets_cases_run():
    """--budget-s S: out of time only once S seconds have passed, never before."""
    try:
        measure.set_budget(3600.0)
        assert not measure.out_of_time()
        measure.set_budget(1e-9)
        import time

        time.sleep(0.01)
        assert measure.out_of_time()
    finally:
        measure.set_budget(None)
    assert not measure.out_of_time()


def test_an_out_that_is_not_writable_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    """The writability probe's OSError (EACCES, EROFS, ...) is a refusal with exit 2, not a traceback; root passes
    chmod checks, so the probe is made to fail."""
    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(measure.tempfile, "mkdtemp", unwritable)
    out = tmp_path / "res"
    assert main(["bench", "geometry", "--device", "cpu", "--quick", "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert "is not a writable directory (Permission denied)" in printed.err and "ceilings" not in printed.out
    assert not out.exists()


def test_zero_is_printed_as_zero_not_as_not_measured():
    """A method that allocates nothing extra shows 0.000 GiB; n/a is for a figure that was not measured."""
    assert measure.or_na(0.0, ".3f") == "0.000" and measure.or_na(None, ".3f") == "n/a"


def test_a_size_of_2_to_the_31_is_refused():
    """"every size ... must be below 2^31": 2^31 itself is refused, 2^31 - 1 is taken."""
    with pytest.raises(argparse.ArgumentTypeError, match="below 2\\^31"):
        measure.parse_dims(f"{2**31}x1x1", "NxDxK", "")
    assert measure.parse_dims(f"{2**31 - 1}x1x1", "NxDxK", "") == (2**31 - 1, 1, 1)


def test_a_python_memory_error_is_out_of_memory():
    """MemoryError (a host allocation in Python or numpy) is "oom", as torch's OutOfMemoryError is."""
    assert measure.error_fields(MemoryError())["status"] == "oom"
    assert measure.error_fields(RuntimeError("kernel exploded"))["status"] == "failed"


def test_the_relative_error_is_over_the_largest_reference_value_in_any_tensor():
    """The largest |ref| may sit in a small tensor (a bias, a norm), not in the first, big one."""
    from fastcyclic.bench import optim

    ref = [torch.tensor([1.0, -0.5]), torch.tensor([4.0])]
    assert optim.max_diff([torch.tensor([1.5, -0.5]), torch.tensor([4.0])], ref) == (0.5, 0.125)


@pytest.mark.parametrize("text, value", [("2^40", 2**40), (str(2**40), 2**40)])
def test_parse_size_takes_2_to_the_40(text, value):
    """"size must be at most 2^40": 2^40 itself is taken."""
    from fastcyclic.bench import optim

    assert optim.parse_size(text) == value
    with pytest.raises(argparse.ArgumentTypeError, match="at most 2\\^40"):
        optim.parse_size(str(2**40 + 1))


def test_parse_size_refuses_a_zero_base():
    """0^0 is 1 in Python: a base below 1 is refused before the power is taken."""
    from fastcyclic.bench import optim

    with pytest.raises(argparse.ArgumentTypeError, match="a positive integer or a power"):
        optim.parse_size("0^0")


def test_optims_interpreter_size_limit_is_inclusive(monkeypatch):
    """--interpret refuses --sizes above 2^22, as its message says ("<="): 2^22 itself is run."""
    from fastcyclic.bench import optim

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    no_copy = dict(method="copy", numel=1, dtype="float32", device="cpu", status="failed", error="not measured")
    monkeypatch.setattr(measure, "print_ceilings", lambda device, quick: {"copy": no_copy})
    monkeypatch.setattr(optim, "run_steps", lambda *args, **kwargs: [])
    argv = ["bench", "optim", "--device", "cpu", "--interpret", "--methods", "fastcyclic_adamw", "--sizes"]
    assert main(argv + [str(2**22)]) == 0
    assert main(argv + [str(2**22 + 1)]) == 2


def test_in_bf16_torchs_foreach_record_is_not_called_the_reference(tmp_path):
    """In bf16 the reference is foreach on fp32 copies rounded to bf16; torch's own bf16 foreach run keeps bf16 state,
    and its notes say so (not "the reference itself")."""
    out = tmp_path / "res"
    assert main(["bench", "optim", "--device", "cpu", "--quick", "--dtype", "bf16", "--sizes", "3000", "--methods",
                 "torch_adamw_foreach", "--out", str(out)]) == 0
    (theirs,) = [r for r in json.loads((out / "optim.json").read_text())["records"] if r["kind"] == "step"]
    assert theirs["notes"].startswith("bf16 state") and theirs["correct"] is None


class _CapturedGraph:
    """A runner that allocates 3000 bytes of state and 5000 of graph pool at its first step, then nothing (a CUDA
    graph's replays); its parameters are the reference's."""
    notes, cuda_graph, fused_update = "graph", True, False

    def __init__(self, allocated, E, W):
        self.allocated, self.E, self.W, self.steps = allocated, E, W, 0

    def step(self):
        if self.steps == 0:
            self.allocated.update(now=self.allocated["now"] + 3000 + 5000)
            self.allocated["peak"] = max(self.allocated["peak"], self.allocated["now"])
        self.steps += 1

    def timing_mode(self):
        pass

    def params(self):
        return self.E, self.W

    def state_bytes(self):
        return 3000


def test_a_cuda_graphs_memory_is_the_captures_peak_less_the_optimizer_state(monkeypatch):
    """bench train on CUDA, a method replaying a graph: peak_extra_gib is the peak over the first steps (the capture
    allocates the graph's pool) minus what existed before and minus the optimizer state, not the steady step's 0."""
    from fastcyclic.bench import train

    allocated = {"now": 10_000, "peak": 10_000}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: allocated["peak"])
    monkeypatch.setattr(measure, "time_ms", lambda fn, device, **kw: dict(median_ms=1.0, q25_ms=1.0, q75_ms=1.0))
    monkeypatch.setattr(measure, "peak_extra_bytes", lambda fn, device: 0)
    ones = torch.ones(4, 2, dtype=torch.float64)
    monkeypatch.setitem(train.METHODS, "graph", lambda spec: _CapturedGraph(allocated, ones.float(), ones.float()))
    spec = train.Spec(5, 2, torch.float32, torch.device("cuda"), None, 4, None, torch.zeros(4, 2), torch.zeros(4, 2))
    r = train.run_method("graph", spec, (ones, ones), quick=True)
    assert r["first_steps_peak_extra_gib"] * 2**30 == 5000 and r["steady_peak_extra_gib"] == 0
    assert r["peak_extra_gib"] * 2**30 == 5000 and r["correct"] is True


def test_trains_interpreter_limit_counts_the_rows_a_step_can_have(monkeypatch):
    """A step has at most P^2 rows whatever --batch-size says: 61x64 (P^2 d P = 1.45e7 <= 2^24) is run under
    --interpret at the default batch of 8192."""
    from fastcyclic.bench import train

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(measure, "print_ceilings", lambda device, quick: {})
    monkeypatch.setattr(train, "run", lambda *args, **kwargs: [])
    assert main(["bench", "train", "--device", "cpu", "--interpret", "--shapes", "61x64"]) == 0
    assert main(["bench", "train", "--device", "cpu", "--interpret", "--shapes", "67x64"]) == 2


def test_a_summarize_that_raises_is_recorded_and_fails_the_suite(tmp_path, monkeypatch, capsys):
    from fastcyclic.bench import geometry

    def broken(W, E):
        raise RuntimeError("summary exploded")

    monkeypatch.setattr(geometry, "summarize", broken)
    out = tmp_path / "res"
    assert main(["bench", "geometry", "--device", "cpu", "--quick", "--shapes", "257x16", "--out", str(out)]) == 1
    (r,) = json.loads((out / "geometry.json").read_text())["records"]
    assert r["status"] == "failed" and "summary exploded" in r["error"]
    assert "FAILED" in capsys.readouterr().err


def test_geometrys_smallest_k_holds_the_planted_frequency_as_a_circle():
    """K = 2 * OMEGA is OMEGA at Nyquist, a line: the smallest shape is 2 * OMEGA + 1."""
    from fastcyclic.bench import geometry

    assert geometry.parse_shape(f"{2 * geometry.OMEGA + 1}x2") == (2 * geometry.OMEGA + 1, 2)
    with pytest.raises(argparse.ArgumentTypeError, match="K >= 15"):
        geometry.parse_shape(f"{2 * geometry.OMEGA}x2")
