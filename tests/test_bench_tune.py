"""`fastcyclic bench ce --tune` on CPU: every candidate tile of every kernel launches (under the interpreter) and
the fastest of each is picked.  On a GPU triton.testing.do_bench times them; here a stand-in runs each once and
reports a made-up time, so the selection logic is what is checked."""
import itertools

import pytest
import torch

from fastcyclic.bench import tune
from fastcyclic.kernels.linear_ce import LCEConfig

pytestmark = pytest.mark.portable


def tiny_problem():
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(20, 16, generator=gen), torch.randn(40, 16, generator=gen)
    return h, w, torch.randint(0, 40, (20,), generator=gen)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path; a GPU runs the real tuning")
def test_every_candidate_launches_and_the_fastest_wins(monkeypatch):
    """Each candidate is timed on its own kernel with its own tile: dW and dh alone, the g kernel in the "gemm"
    backward."""
    import triton.testing

    from fastcyclic.kernels import linear_ce as kernels

    made_up = itertools.count(start=7, step=-1)  # each later candidate "runs faster" until the times go negative
    launches, timed = [], []  # (kernel function, its keyword arguments) of each call; those of each timed run

    def spy(name):
        real = getattr(kernels, name)

        def launched(*args, **kwargs):
            launches.append((name, kwargs))
            return real(*args, **kwargs)
        return launched

    for name in ("forward", "backward"):
        monkeypatch.setattr(kernels, name, spy(name))

    def one_run(fn, **_):
        launches.clear()
        fn()
        timed.append(list(launches))
        return abs(next(made_up)) + 0.5

    monkeypatch.setattr(triton.testing, "do_bench", one_run)
    config, timings = tune.tune_shape(*tiny_problem(), log=lambda *a: None)
    assert isinstance(config, LCEConfig) and config.backward == "recompute"
    assert set(timings) == set(tune.KERNELS)
    for kernel, entries in timings.items():
        assert all("ms" in e for e in entries), [e.get("error") for e in entries]
        fastest = min(entries, key=lambda e: e["ms"])["tile"]
        assert getattr(config, kernel).__dict__ == fastest, kernel

    expected = [(kernel, tile) for kernel, tiles in tune.candidates(16).items() for tile in tiles]
    assert len(timed) == len(expected)
    for calls, (kernel, tile) in zip(timed, expected):
        [(name, kwargs)] = calls
        assert getattr(kwargs["config"], kernel) == tile, kernel
        if kernel == "forward":
            assert name == "forward"
        else:
            assert name == "backward" and kwargs["config"].backward == ("gemm" if kernel == "backward_grad" else
                                                                        "recompute")
            assert (kwargs["need_dh"], kwargs["need_dw"]) == (kernel != "backward_dw", kernel != "backward_dh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path; a GPU runs the real tuning")
def test_failed_tiles_are_passed_over_and_a_kernel_without_any_keeps_its_default(monkeypatch):
    """A tile that fails (e.g. more shared memory than the GPU has) is recorded with its error and never picked; a
    kernel none of whose tiles ran keeps default_config's tile, not another kernel's."""
    import triton.testing

    from fastcyclic.kernels.linear_ce import default_config

    two_each = {kernel: tiles[:2] for kernel, tiles in tune.candidates(16).items()}
    monkeypatch.setattr(tune, "candidates", lambda d: two_each)
    timed = itertools.count()

    def first_fails(fn, **_):  # forward: the first tile fails; backward_dw: both fail; else 1.0 ms, then 2.0 ms
        i = next(timed)
        if i in (0, 2, 3):
            raise RuntimeError("out of shared memory")
        return 1.0 + i % 2

    monkeypatch.setattr(triton.testing, "do_bench", first_fails)
    h, w, y = tiny_problem()
    config, timings = tune.tune_shape(h, w, y, log=lambda *a: None)
    assert [("ms" in e, "error" in e) for e in timings["forward"]] == [(False, True), (True, False)]
    assert config.forward == two_each["forward"][1] and config.backward_dh == two_each["backward_dh"][0]
    assert config.backward_dw == default_config(20, 16, 40, h.dtype, h.device).backward_dw


@pytest.mark.parametrize("d, resident", [(1, 16), (16, 16), (17, 32), (100, 128), (256, 256), (257, 512), (1000, 1024)])
def test_candidates_keep_all_of_d_resident_up_to_256(d, resident):
    """D up to 256 (rounded up to a power of 2, at least 16) is held whole in every forward and backward tile; above
    it some candidates hold it whole and others slice it."""
    tiles = tune.candidates(d)
    widths = {(t.block_d, t.block_ds) for kernel in ("forward", "backward_dw", "backward_dh") for t in tiles[kernel]}
    if d <= 256:
        assert widths == {(resident, resident)}
    else:
        assert (resident, resident) in widths and any(block_d < resident for block_d, _ in widths)
