"""`fastcyclic bench ce --tune` on CPU: every candidate tile of every kernel launches (under the interpreter) and
the fastest of each is picked.  On a GPU triton.testing.do_bench times them; here a stand-in runs each once and
reports a made-up time, so the selection logic is what is checked."""
import itertools

import pytest
import torch

from fastcyclic.bench import tune
from fastcyclic.kernels.linear_ce import LCEConfig

pytestmark = pytest.mark.portable


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path; a GPU runs the real tuning")
def test_every_candidate_launches_and_the_fastest_wins(monkeypatch):
    import triton.testing

    made_up = itertools.count(start=7, step=-1)  # each later candidate "runs faster" until the times go negative

    def one_run(fn, **_):
        fn()
        return abs(next(made_up)) + 0.5

    monkeypatch.setattr(triton.testing, "do_bench", one_run)
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(20, 16, generator=gen), torch.randn(40, 16, generator=gen)
    y = torch.randint(0, 40, (20,), generator=gen)
    config, timings = tune.tune_shape(h, w, y, log=lambda *a: None)
    assert isinstance(config, LCEConfig) and config.backward == "recompute"
    assert set(timings) == set(tune.KERNELS)
    for kernel, entries in timings.items():
        assert all("ms" in e for e in entries), [e.get("error") for e in entries]
        fastest = min(entries, key=lambda e: e["ms"])["tile"]
        assert getattr(config, kernel).__dict__ == fastest, kernel
