"""fastcyclic.training (fastcyclic.train and friends): the loop learns, checkpoints resume bit for bit (also
after SIGKILL), bad configs are refused before anything runs, and the CLI works end to end."""
import contextlib
import copy
import dataclasses
import errno
import functools
import io
import json
import math
import os
import pkgutil
import signal
import struct
import subprocess
import sys
import threading
import time
import types
import warnings
import zipfile

import numpy as np
import pytest
import torch

from fastcyclic import data, training
from fastcyclic.cli import main as cli_main
from fastcyclic.training import (TrainConfig, Trainer, TrainingDiverged, TrainResult, load_checkpoint, report,
                                 settling_step, train, validate)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# small and quick: P = 23 groks within a few hundred full-batch steps
TINY = dict(p=23, d=32, hidden=64, steps=60, eval_every=20, geometry_every=20, checkpoint_every=20,
            progress=False, device=DEVICE)


def params(trainer_or_result):
    trainer = getattr(trainer_or_result, "trainer", trainer_or_result)
    return {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item()}"


def test_tiny_run_fits_the_train_set():
    result = train(TrainConfig(**dict(TINY, steps=300, weight_decay_warmup=100, eval_every=100,
                                      geometry_every=100)), figures=False)
    assert result.final["train_acc"] == 1.0
    assert result.final["step"] == 300
    assert result.geometry is not None and result.geometry.K == 23
    assert [r["step"] for r in result.history] == [0, 100, 200, 300]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] / 10


def test_run_directory_contents(tmp_path):
    out = tmp_path / "run"
    result = train(TrainConfig(**TINY, out_dir=str(out)))
    assert json.loads((out / "config.json").read_text())["p"] == 23
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 20, 40, 60]
    assert {"train_loss", "test_loss", "train_acc", "test_acc", "rho2_W", "rho2_E", "steps_per_s"} <= lines[-1].keys()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["geometry"]["verdict"] in ("cyclic", "multi-frequency", "etf-like", "unstructured")
    for name in ("circles", "fourier", "curves", "geometry"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 60
    assert result.paths["checkpoint"] == str(out / "checkpoint.pt")


def test_a_large_p_trains_on_the_hashed_split(monkeypatch):
    """Above data.ENUMERATE_LIMIT pairs (P > 2048) the trainer samples hashed pairs, never the list of P² pairs;
    full batch is refused there.  (P = 23 made to take that path: P = 2053 takes 20 s.)"""
    monkeypatch.setattr(training, "ModularAddition", functools.partial(data.ModularAddition, enumerate_limit=0))
    with pytest.raises(ValueError, match=r"batch_size=None \(full batch\) needs the enumerated split, but P=23 has "
                                         r"529 pairs; set batch_size"):
        Trainer(TrainConfig(**TINY))
    result = train(TrainConfig(**dict(TINY, batch_size=64, steps=300, eval_every=100, geometry_every=100)),
                   figures=False)
    assert not result.trainer.data.enumerated and [r["step"] for r in result.history] == [0, 100, 200, 300]
    assert result.final["train_acc"] > 0.5  # it learns from the sampled batches


def test_the_progress_bar_shows_the_step_loss_accuracies_rho2_and_speed(capsys):
    """Every other test trains with progress=False: the bar's code ran in none of them."""
    train(TrainConfig(**dict(TINY, steps=20, eval_every=10, geometry_every=10, progress=True)), figures=False)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "P=23" in last and "20/20" in last, last
    for field in ("loss=", "train=", "test=", "rho2_W=", "rho2_E=", "it/s="):
        assert field in last, (field, last)


@pytest.mark.skipif(DEVICE != "cpu", reason="flushing denormals is set for CPU runs")
def test_a_cpu_trainer_flushes_denormals():
    """Denormal floats are ~10x slower on x86 (DESIGN.md): building a CPU trainer turns flushing on."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0
    Trainer(TrainConfig(**TINY))
    assert (torch.tensor([1e-39]) * 1.0).item() == 0.0


def test_the_hashed_split_refuses_a_batch_it_cannot_draw(monkeypatch, tmp_path):
    """Above ENUMERATE_LIMIT the batch was checked against nothing: a batch larger than the train set ran (each
    step drawing 9e7 candidates at P = 4099, train_fraction 1e-4, batch 8192), and one needing 9e8 candidates
    per step would run out of memory at its first step.  Both are refused before anything is written."""
    monkeypatch.setattr(training, "ModularAddition", functools.partial(data.ModularAddition, enumerate_limit=0))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"batch_size=300 is larger than the train set \(about 264 pairs\)"):
        Trainer(TrainConfig(**dict(TINY, batch_size=300, out_dir=str(out))))  # 529 pairs at 0.5
    monkeypatch.setattr(data, "MAX_BATCH_DRAW", 500)  # batch 64 at 0.5 draws 392 candidates, at 0.3 653
    Trainer(TrainConfig(**dict(TINY, batch_size=64)))
    with pytest.raises(ValueError, match=r"batch_size=64 at train_fraction=0.3 draws 653 candidate pairs per "
                                         r"batch \(more than 500"):
        Trainer(TrainConfig(**dict(TINY, batch_size=64, train_fraction=0.3, out_dir=str(out))))
    assert not out.exists()


# bit-for-bit resumption is promised in deterministic mode (the CPU is always deterministic)
EXACT = dict(TINY, deterministic=DEVICE == "cuda")


def test_resume_continues_bit_for_bit(tmp_path):
    straight = train(TrainConfig(**EXACT), figures=False)
    out = str(tmp_path / "run")
    train(TrainConfig(**dict(EXACT, steps=40, out_dir=out)), figures=False)
    resumed = train(TrainConfig(**dict(EXACT, out_dir=out)), resume=True, figures=False)
    assert_bitwise_equal(params(resumed), params(straight))
    assert [r["step"] for r in resumed.history] == [0, 20, 40, 60]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 20, 40, 60]


def test_resume_between_evaluations_keeps_the_history_exact(tmp_path):
    """Stopped after an evaluation, resumed from the checkpoint before it (step 30, between evaluations): the
    next record's mean training loss spans the resume point, so every record equals the uninterrupted run's."""
    config = dict(EXACT, checkpoint_every=15)
    straight = train(TrainConfig(**config), figures=False)
    out = str(tmp_path / "run")

    def stop(trainer, record):
        if record["step"] == 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**dict(config, out_dir=out)), callbacks=[stop], figures=False)
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 30
    resumed = train(TrainConfig(**dict(config, out_dir=out)), resume=True, figures=False)

    def untimed(history):
        return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in history]
    assert untimed(resumed.history) == untimed(straight.history)


def test_a_callback_stops_the_run_and_a_resume_continues_it(tmp_path):
    """trainer.should_stop, set by a callback at step 20 (between checkpoints every 15 steps): the run ends
    there with its checkpoint, summary and figures at step 20; resumed, it ends where an unstopped run does."""
    config = dict(EXACT, checkpoint_every=15)
    straight = train(TrainConfig(**config), figures=False)
    out = tmp_path / "run"
    seen = []

    def stop_at_20(trainer, record):
        seen.append(record["step"])
        trainer.should_stop = record["step"] == 20

    stopped = train(TrainConfig(**dict(config, out_dir=str(out))), callbacks=[stop_at_20])
    assert seen == [0, 20] and stopped.stopped_early
    assert stopped.final["step"] == 20 and "rho2_W" in stopped.final
    assert [r["step"] for r in stopped.history] == [0, 20]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["stopped_early"] is True
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 20
    assert (out / "figures" / "circles.png").exists()
    resumed = train(TrainConfig(**dict(config, out_dir=str(out))), resume=True, figures=False)
    assert not resumed.stopped_early and resumed.final["step"] == 60
    assert not json.loads((out / "summary.json").read_text())["stopped_early"]
    assert_bitwise_equal(params(resumed), params(straight))
    assert not straight.stopped_early


def test_a_callback_can_stop_a_run_before_its_first_step(tmp_path):
    def stop(trainer, record):
        trainer.should_stop = True

    result = train(TrainConfig(**dict(TINY, out_dir=str(tmp_path / "run"))), callbacks=[stop], figures=False)
    assert result.stopped_early and result.final["step"] == 0 and result.trainer.step_count == 0
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["step"] == 0


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU threads; CUDA is bitwise with deterministic=True")
def test_cpu_runs_are_bitwise_repeatable_on_several_threads():
    """The previous default model (d = 64) at P = 97 on 2 threads: the embedding's gradient (3763 rows into 97)
    once came from racing index_put_ accumulations, and two identical runs differed in the last bits.  (With
    today's d = 2 the backward is too small to be split across threads: the race could not show.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [train(TrainConfig(d=64, hidden=256, train_fraction=0.4, steps=10, eval_every=10, geometry_every=10,
                                  progress=False, device="cpu"), figures=False) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert_bitwise_equal(params(run), params(runs[0]))


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU threads")
def test_a_resume_on_another_number_of_cpu_threads_warns(tmp_path):
    """A CPU matmul's sums depend on the thread count: a resume on another one is not bit for bit, and says so."""
    out = str(tmp_path / "run")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(TrainConfig(**dict(TINY, steps=20, out_dir=out)), figures=False)
        torch.set_num_threads(1)
        with pytest.warns(UserWarning, match=r"resuming on 1 CPU threads a run checkpointed on 2: .*"
                                             r"torch.set_num_threads\(2\)"):
            train(TrainConfig(**dict(TINY, steps=40, out_dir=out)), resume=True, figures=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same number: no warning
            train(TrainConfig(**dict(TINY, steps=60, out_dir=out)), resume=True, figures=False)
    finally:
        torch.set_num_threads(threads)


def test_sampled_batches_resume_bit_for_bit(tmp_path):
    config = dict(EXACT, batch_size=64)
    straight = train(TrainConfig(**config), figures=False)
    out = str(tmp_path / "run")
    train(TrainConfig(**dict(config, steps=20, out_dir=out)), figures=False)
    resumed = train(TrainConfig(**dict(config, out_dir=out)), resume=True, figures=False)
    assert_bitwise_equal(params(resumed), params(straight))


@pytest.mark.skipif(DEVICE != "cpu", reason="the subprocess runs the CPU path")
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    out = tmp_path / "killed"
    args = ["--p", "23", "--d", "32", "--hidden", "64", "--steps", "3000", "--eval-every", "20",
            "--geometry-every", "1000", "--checkpoint-every", "20", "--no-progress", "--no-figures",
            "--out-dir", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "fastcyclic.cli", "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoint.pt").exists():
            time.sleep(0.05)
        time.sleep(0.3)  # let it run past the checkpoint, into the middle of later steps
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = load_checkpoint(str(out / "checkpoint.pt"))["step"]
    assert 20 <= killed_at < 3000
    steps = killed_at + 40
    config = dict(p=23, d=32, hidden=64, eval_every=20, geometry_every=1000, checkpoint_every=20, progress=False,
                  device="cpu")
    resumed = train(TrainConfig(**dict(config, steps=steps, out_dir=str(out))), resume=True, figures=False)
    straight = train(TrainConfig(**dict(config, steps=steps)), figures=False)
    assert_bitwise_equal(params(resumed), params(straight))


def test_resume_refuses_a_different_config_and_a_corrupt_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**dict(TINY, steps=20, out_dir=str(out))), figures=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="cannot resume with a different config.*weight_decay"):
        train(TrainConfig(**dict(TINY, weight_decay=0.5, out_dir=str(out))), resume=True)
    (out / "checkpoint.pt").write_bytes(before["checkpoint.pt"][:100])
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        train(TrainConfig(**dict(TINY, out_dir=str(out))), resume=True)
    # a flipped bit in a tensor still unpickles: the zip records' CRC-32s catch it
    damaged = bytearray(before["checkpoint.pt"])
    with zipfile.ZipFile(io.BytesIO(before["checkpoint.pt"])) as archive:
        record = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 64)
    name_length, extra_length = struct.unpack_from("<HH", damaged, record.header_offset + 26)  # local header
    damaged[record.header_offset + 30 + name_length + extra_length + 10] ^= 0x10
    (out / "checkpoint.pt").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="Bad CRC-32"):
        train(TrainConfig(**dict(TINY, out_dir=str(out))), resume=True)
    # readable, but not this run's (written on another device, or by other code): a ValueError, not a traceback
    state = torch.load(io.BytesIO(before["checkpoint.pt"]), weights_only=False)
    state["batch_generator"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="does not fit this run"):
        train(TrainConfig(**dict(TINY, out_dir=str(out))), resume=True)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after.keys() == before.keys()
    for name in before:
        if name != "checkpoint.pt":
            assert after[name] == before[name], f"{name} was overwritten"


@pytest.mark.parametrize("changes,match", [
    (dict(p=1), r"p must be an integer in \[3, 2\^31\], got 1"),
    (dict(p=2), r"p must be an integer in \[3, 2\^31\], got 2"),  # trains, but a circle or simplex needs 3 classes
    (dict(p=2**40), r"p must be an integer in \[3, 2\^31\], got 1099511627776"),
    (dict(d=0), "d must be an integer >= 1, got 0"),
    (dict(train_fraction=1.0), r"train_fraction must be in \(0, 1\), got 1.0"),
    (dict(train_fraction=0.0), "train_fraction"),
    (dict(batch_size=100000), "batch_size=100000 is larger than the train set"),
    (dict(model="transformer"), "model must be one of"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(optimizer="lion"), "optimizer must be one of"),
    (dict(weight_decay_mode="coupled"), "weight_decay_mode must be one of"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(weight_decay=-1.0), "weight_decay must be a finite number >= 0"),
    (dict(steps=-5), "steps must be an integer >= 0"),
    (dict(betas=(0.9, 1.5)), "betas must be two numbers"),
    (dict(lr=float("inf")), "lr must be a finite number >= 0, got inf"),
    (dict(lr="0.01"), "lr must be a finite number >= 0, got '0.01'"),  # wrong types are named, not a TypeError
    (dict(optimizer="sgdw", momentum=-1.0), r"momentum must be a number in \[0, 1\), got -1.0"),
    (dict(optimizer="sgdw", momentum=1.0), r"momentum must be a number in \[0, 1\), got 1.0"),  # (it diverged)
    (dict(init_scale=float("nan")), "init_scale"),
    (dict(device=None), "device must be"),
    (dict(seed=2**64), r"seed must be an integer in \[-2\^63, 2\^63 - 2\]"),
    (dict(bias="yes"), "bias='yes'"),
    (dict(backend="triton", device="cpu"), "TRITON_INTERPRET=1") if os.environ.get("TRITON_INTERPRET") != "1"
    else (dict(backend="flash"), "backend must be"),
])
def test_bad_configs_are_refused_before_training(changes, match, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(**dict(TINY, out_dir=str(out), **changes)))
    assert not out.exists() or not any(p.name != "never" for p in out.iterdir())


@pytest.mark.parametrize("changes, match", [
    (dict(device="cuda", dtype="bfloat16"), r"compute capability 8.0 or newer .* Tesla T4 is 7.5"),
    (dict(device="cuda:1"), r"device='cuda:1' but this machine has 1 CUDA device"),
    (dict(device="cudax"), r"device must be 'auto', 'cpu' or 'cuda\[:n\]', got 'cudax'"),  # was torch's RuntimeError
])
def test_a_cuda_device_that_cannot_run_the_config_is_refused(changes, match, monkeypatch, tmp_path):
    """Checked against a pretend sm_75 GPU (Triton's bf16 dots need sm_80): refused before anything is written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(**dict(TINY, out_dir=str(out), **changes)))
    assert not out.exists()
    validate(TrainConfig(**dict(TINY, device="cuda", dtype="bfloat16", backend="torch")))  # torch's bf16


def test_numpy_scalars_in_a_config_become_python_numbers(tmp_path):
    """Grids built with numpy (np.arange, np.logspace) hand over numpy scalars; config.json must still be JSON."""
    config = TrainConfig(**dict(TINY, p=np.int64(23), weight_decay=np.float32(0.01), betas=(np.float32(0.9), 0.98),
                                bias=np.bool_(False), steps=np.int64(2), out_dir=str(tmp_path / "run")))
    assert (type(config.p), type(config.weight_decay), type(config.betas[0]), type(config.bias)) == (
        int, float, float, bool)
    train(config, figures=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["p"] == 23


def test_an_int_in_a_float_field_is_the_same_config_as_the_float():
    """lr=1 and lr=1.0 are one run (a sweep's run id hashes the config; the CLI gives floats); an int too large
    for a float is refused by name, not an OverflowError."""
    config = TrainConfig(**dict(TINY, lr=1, weight_decay=0, init_scale=2, train_fraction=np.float64(0.5),
                                betas=[0, 0.5], momentum=0))
    assert config == TrainConfig(**dict(TINY, lr=1.0, weight_decay=0.0, init_scale=2.0, train_fraction=0.5,
                                        betas=(0.0, 0.5), momentum=0.0))
    assert all(type(v) is float for v in (config.lr, config.weight_decay, config.init_scale, *config.betas))
    assert type(TrainConfig(**dict(TINY, steps=3)).steps) is int  # int fields stay ints
    for name, huge in (("lr", 10 ** 400), ("betas", (10 ** 400, 0.9))):
        with pytest.raises(ValueError, match=f"{name} must be"):
            validate(TrainConfig(**dict(TINY, **{name: huge})))


def test_a_fresh_run_replaces_the_run_its_directory_held(tmp_path):
    """Stopped at any moment, a fresh run into an old run's directory leaves nothing of the old run that a
    resume could pick up (its checkpoint), nor results that look like the new run's (summary, figures)."""
    out = tmp_path / "run"
    train(TrainConfig(**dict(TINY, steps=20, out_dir=out)))  # a pathlib.Path is accepted
    assert {"checkpoint.pt", "summary.json"} <= {p.name for p in out.iterdir()} and any((out / "figures").iterdir())

    def stop(trainer, record):
        raise KeyboardInterrupt  # as if killed at the first evaluation

    changed = dict(TINY, lr=0.01, out_dir=str(out))
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**changed), callbacks=[stop])
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "figures"}
    assert not any((out / "figures").iterdir())
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01
    assert train(TrainConfig(**changed), resume=True, figures=False).final["step"] == TINY["steps"]


@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA the flags change the step")
def test_resume_on_cpu_ignores_the_cuda_only_flags(tmp_path):
    out = tmp_path / "run"
    config = dict(TINY, steps=40, out_dir=str(out))
    reference = train(TrainConfig(**config), figures=False)
    train(TrainConfig(**dict(config, steps=20)), figures=False)
    resumed = train(TrainConfig(**dict(config, cuda_graph=False, fused_update=False)), resume=True, figures=False)
    assert all(torch.equal(v, params(reference)[k]) for k, v in params(resumed).items())


def test_resume_accepts_choices_that_change_nothing(tmp_path):
    """"auto" and what it resolves to, hidden None and 4 d, and fields the run ignores (hidden of embed-sum,
    momentum of adamw, betas of sgdw, deterministic on CPU) were refused as "a different config"."""
    def run_then_resume(first, then):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        base = dict(TINY, steps=40, out_dir=str(out))
        reference = train(TrainConfig(**dict(base, **first)), figures=False)
        train(TrainConfig(**dict(base, **first, steps=20)), figures=False)
        resumed = train(TrainConfig(**dict(base, **then)), resume=True, figures=False)
        assert all(torch.equal(v, params(reference)[k]) for k, v in params(resumed).items())

    backend = "triton" if DEVICE == "cuda" else "torch"
    run_then_resume(dict(backend="auto"), dict(backend=backend))
    run_then_resume(dict(model="embed-mlp", d=8, hidden=None), dict(model="embed-mlp", d=8, hidden=32))
    run_then_resume(dict(model="embed-sum", hidden=64), dict(model="embed-sum", hidden=7))
    run_then_resume(dict(momentum=0.9), dict(momentum=0.5))  # adamw
    run_then_resume(dict(optimizer="sgdw", lr=0.05), dict(optimizer="sgdw", lr=0.05, betas=(0.5, 0.5)))
    if DEVICE == "cpu":
        run_then_resume(dict(deterministic=False), dict(deterministic=True))
    # what does change the run is still refused, with the resolved values named
    with pytest.raises(ValueError, match="momentum: checkpoint 0.9 vs now 0.5"):
        train(TrainConfig(**dict(TINY, optimizer="sgdw", lr=0.05, momentum=0.5, out_dir=str(tmp_path / "run4"))),
              resume=True)
    other = "torch" if DEVICE == "cuda" else "triton"
    with pytest.raises(ValueError, match=f"backend: checkpoint {backend!r} vs now {other!r}"):
        train(TrainConfig(**dict(TINY, backend=other, out_dir=str(tmp_path / "run0"))), resume=True)


def test_resume_without_an_out_dir_is_refused():
    """There is nothing to resume from: resume=True without out_dir must not quietly start a fresh run."""
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        train(TrainConfig(**dict(TINY, out_dir=None)), resume=True, figures=False)


def test_resume_of_a_finished_run_without_a_checkpoint_is_refused(tmp_path):
    """With checkpoint_every=0 there is nothing to continue from: resume=True started again from step 0 and
    replaced the finished run's results."""
    out = tmp_path / "run"
    config = dict(TINY, steps=20, checkpoint_every=0, out_dir=str(out))
    train(TrainConfig(**config), figures=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "summary.json" in before and "checkpoint.pt" not in before
    with pytest.raises(ValueError, match="holds a finished run but no checkpoint.pt"):
        train(TrainConfig(**dict(config, steps=40)), resume=True, figures=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_resume_with_checkpoint_every_0_ends_with_a_checkpoint_at_its_last_step(tmp_path):
    """Resumed with checkpoint_every=0, the run left the checkpoint it started from beside its finished summary:
    a second --resume (a requeued job) trained again from that step, and rewrote metrics.jsonl back to it."""
    out = tmp_path / "run"
    config = dict(TINY, steps=20, checkpoint_every=20, out_dir=str(out))
    train(TrainConfig(**config), figures=False)
    later = dict(config, steps=40, checkpoint_every=0)
    first = train(TrainConfig(**later), resume=True, figures=False)
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 40
    metrics = (out / "metrics.jsonl").read_text()
    again = train(TrainConfig(**later), resume=True, figures=False)  # nothing left to train
    assert again.final == first.final and (out / "metrics.jsonl").read_text() == metrics


def test_resume_without_figures_removes_the_earlier_figures(tmp_path):
    out = tmp_path / "run"
    config = dict(TINY, steps=20, out_dir=str(out))
    train(TrainConfig(**config))
    assert len(list((out / "figures").glob("*.png"))) == 4
    train(TrainConfig(**dict(config, steps=40)), resume=True, figures=False)
    assert not list((out / "figures").glob("*.png"))  # they showed step 20 beside a summary of step 40
    assert (out / "checkpoint.pt").exists() and json.loads((out / "summary.json").read_text())["steps"] == 40


def test_numpy_values_in_the_config_or_a_record_still_checkpoint_and_resume(tmp_path):
    """np.array betas, or a callback adding NumPy numbers to its record: the checkpoint could not be loaded
    (weights_only=True refuses NumPy objects) and an np.float32 crashed metrics.jsonl."""
    out = tmp_path / "run"
    config = dict(TINY, steps=20, out_dir=str(out))

    def add_numbers(trainer, record):
        record.update(w_norm=np.float32(1.5), count=np.int64(3), mean=torch.tensor(0.25),
                      norm=torch.tensor(2.0).numpy())  # a 0-d ndarray, not an np.generic

    train(TrainConfig(**dict(config, betas=np.array([0.9, 0.98]))), callbacks=[add_numbers], figures=False)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["w_norm"], first["count"], first["mean"], first["norm"]) == (1.5, 3, 0.25, 2.0)
    resumed = train(TrainConfig(**dict(config, steps=40)), resume=True, figures=False)
    assert resumed.history[0]["w_norm"] == 1.5 and resumed.config.betas == (0.9, 0.98)


@pytest.mark.parametrize("value", [np.zeros(2), torch.ones(2), object()], ids=["ndarray", "tensor", "object"])
def test_a_callback_storing_what_a_record_cannot_hold_is_refused_naming_it(value, tmp_path):
    """It failed writing metrics.jsonl without naming the key, or, step by step, left a checkpoint that would not
    load ("corrupt or unreadable")."""
    trainer = Trainer(TrainConfig(**TINY), callbacks=[lambda t, record: record.update(weights=value)])
    with pytest.raises(TypeError, match="a callback stored 'weights' = .* at step 0: records hold numbers"):
        trainer.evaluate()
    assert trainer.history == []  # the refused record is not kept
    trainer.callbacks.clear()
    trainer.evaluate()
    trainer.save_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert training.load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 0


def test_a_run_owns_its_config(tmp_path):
    """A loop reusing one config object (config.weight_decay = wd; train(config)) changed the results already
    returned and the finished trainers' next steps; a NumPy value assigned after construction reached the
    checkpoint, which then could not be loaded."""
    config = TrainConfig(**dict(TINY, steps=4, weight_decay_warmup=0, out_dir=str(tmp_path / "run")))
    results = []
    for wd in (0.0, 0.5):
        config.weight_decay = wd
        results.append(train(config, figures=False))
    assert [r.config.weight_decay for r in results] == [0.0, 0.5]
    assert results[0].trainer.config.weight_decay == 0.0
    config.lr, config.steps = np.array([config.lr])[0], 8  # the same lr, as an np.float64
    resumed = train(config, resume=True, figures=False)
    assert type(resumed.config.lr) is float and resumed.history[-1]["step"] == 8


def test_a_run_of_zero_steps_can_be_resumed(tmp_path):
    config = dict(TINY, checkpoint_every=5, out_dir=str(tmp_path / "run"))
    train(TrainConfig(**dict(config, steps=0)), figures=False)
    resumed = train(TrainConfig(**dict(config, steps=10)), resume=True, figures=False)
    straight = train(TrainConfig(**dict(config, steps=10, out_dir=None)), figures=False)
    assert_bitwise_equal(params(resumed), params(straight))


def test_the_global_rng_is_left_alone(tmp_path):
    """Every draw has its own generator; restoring a checkpoint's global RNG state overwrote the caller's."""
    out = tmp_path / "run"
    train(TrainConfig(**dict(TINY, steps=4, out_dir=str(out))), figures=False)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    trainer = Trainer(TrainConfig(**dict(TINY, steps=8, out_dir=str(out))))
    trainer.load_state_dict(load_checkpoint(str(out / "checkpoint.pt")))
    assert torch.equal(torch.rand(1), expected)


def test_a_resumed_run_reports_its_whole_time(tmp_path):
    out = tmp_path / "run"
    first = train(TrainConfig(**dict(TINY, steps=20, out_dir=str(out))), figures=False)
    saved = load_checkpoint(str(out / "checkpoint.pt"))["seconds"]  # at the last checkpoint, before the summary
    resumed = train(TrainConfig(**dict(TINY, steps=20, out_dir=str(out))), resume=True, figures=False)
    # it counted only the resumed part (~0 s here: nothing left to train)
    assert resumed.seconds > saved > 0.5 * first.seconds
    assert json.loads((out / "summary.json").read_text())["seconds"] == resumed.seconds


def test_resume_past_the_requested_steps_is_refused(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**dict(TINY, steps=40, out_dir=str(out))), figures=False)
    before = (out / "config.json").read_bytes()
    with pytest.raises(ValueError, match="at step 40, past steps=20"):
        train(TrainConfig(**dict(TINY, steps=20, out_dir=str(out))), resume=True)
    assert (out / "config.json").read_bytes() == before


def _stopped_at_then_resumed_at_14(out, stop_at, **intervals):
    """A run of 40 steps with a checkpoint every 7, stopped at the evaluation of step stop_at (so its last
    checkpoint is at 14), then resumed with steps=14: nothing left to train."""
    config = dict(TINY, steps=40, checkpoint_every=7, out_dir=str(out), **intervals)

    def stop(trainer, record):
        if record["step"] == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**config), callbacks=[stop], figures=False)
    return train(TrainConfig(**dict(config, steps=14)), resume=True, figures=False)


def test_resume_at_the_checkpoint_step_reports_that_step(tmp_path):
    """Its final record and summary describe step 14, not the step-10 evaluation before it."""
    out = tmp_path / "run"
    result = _stopped_at_then_resumed_at_14(out, 20, eval_every=10, geometry_every=10)
    summary = json.loads((out / "summary.json").read_text())
    assert result.final["step"] == summary["final"]["step"] == summary["steps"] == 14
    assert "rho2_W" in result.final and json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 14


def test_resume_at_the_checkpoint_step_completes_its_record(tmp_path):
    """The checkpoint's step held an evaluation without geometry (neither a geometry step nor the end then): the
    final record gets it, as a run's final record always has, and metrics.jsonl keeps one line per step."""
    out = tmp_path / "run"
    result = _stopped_at_then_resumed_at_14(out, 21, eval_every=7, geometry_every=10)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 7, 10, 14] and "rho2_W" in lines[-1] and "rho2_W" in result.final


def test_geometry_every_that_is_not_a_multiple_of_eval_every():
    result = train(TrainConfig(**dict(TINY, steps=60, eval_every=20, geometry_every=15)), figures=False)
    assert [r["step"] for r in result.history if "rho2_W" in r] == [0, 15, 30, 45, 60]
    assert [r["step"] for r in result.history] == [0, 15, 20, 30, 40, 45, 60]


def test_a_loaded_state_starts_clean():
    """Rolling a diverged trainer back to a good state (deep-copied, as torch state dicts hold references) lets it
    evaluate and step again, and its records describe the loaded state only."""
    trainer = Trainer(TrainConfig(**dict(TINY, weight_decay=0.02, weight_decay_warmup=40)))
    for _ in range(5):
        trainer.step()
    good = copy.deepcopy(trainer.state_dict())
    with torch.no_grad():
        trainer.model.weight.fill_(float("nan"))
    for _ in range(3):
        trainer.step()
    with pytest.raises(TrainingDiverged, match="at step 6"):
        trainer.evaluate()
    trainer.load_state_dict(good)
    record = trainer.evaluate()
    assert record["step"] == 5 and math.isfinite(record["train_loss"]) and math.isfinite(record["test_loss"])
    assert record["weight_decay"] == pytest.approx(5 / 40 * 0.02)
    assert [r["step"] for r in trainer.history] == [5]
    trainer.step()
    assert trainer.evaluate()["step"] == 6


def test_weight_decay_ramp_reports_what_the_last_step_used():
    """Step n of the warm-up uses λ · n / warmup (the first step already a nonzero λ), and evaluate reports it."""
    trainer = Trainer(TrainConfig(**dict(TINY, weight_decay=0.02, weight_decay_warmup=40)))
    assert trainer.evaluate()["weight_decay"] == 0.0  # no step yet
    for _ in range(5):
        trainer.step()
    assert trainer.evaluate()["weight_decay"] == pytest.approx(5 / 40 * 0.02)


def test_evaluation_in_chunks_sums_every_chunk():
    """The evaluated loss and accuracy are over all pairs, whatever the chunk size (each chunk adds to the sum)."""
    trainer = Trainer(TrainConfig(**TINY))
    for _ in range(20):
        trainer.step()
    pairs = trainer.data.train_eval_pairs()
    n = pairs[0].shape[0]
    assert n > 7 and n % 7  # several chunks, the last one short
    loss, acc = trainer._loss_and_accuracy(pairs, chunk=n)
    chunked_loss, chunked_acc = trainer._loss_and_accuracy(pairs, chunk=7)
    assert chunked_loss == pytest.approx(loss, rel=1e-6) and chunked_acc == acc


def test_embed_mlp_reports_no_locking_even_when_its_widths_match():
    """embed-mlp's W reads the hidden layer, not E's space: locking is undefined however wide the layer is."""
    assert Trainer(TrainConfig(**dict(TINY, d=16, hidden=16))).summarize_geometry().locking is None
    assert Trainer(TrainConfig(**dict(TINY, d=16, hidden=16, factorised=True))).summarize_geometry().locking is not None


def test_unwritable_out_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="is not writable"):
        Trainer(TrainConfig(**dict(TINY, out_dir=str(blocker / "run"))))


@pytest.mark.parametrize("callbacks,match", [
    ([1], "each callback must be a function .* got 1"), (5, "callbacks must be a list of functions .* got 5"),
    (print, "callbacks must be a list")])
def test_callbacks_that_are_not_functions_are_refused_before_anything_is_written(tmp_path, callbacks, match):
    """[1] failed at the first evaluation, after config.json and metrics.jsonl were written."""
    with pytest.raises(TypeError, match=match):
        train(TrainConfig(**dict(TINY, out_dir=str(tmp_path / "run"))), callbacks=callbacks)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("state", [{"config": [1]}, [], {"config": {}, "model": {}}])
def test_a_state_dict_that_is_not_a_trainers_is_named(state):
    with pytest.raises(ValueError, match="not a Trainer state dict"):
        Trainer(TrainConfig(**TINY)).load_state_dict(state)


def test_an_out_dir_that_is_a_file_is_named_so(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="out_dir .*file' is a file, not a directory"):
        Trainer(TrainConfig(**dict(TINY, out_dir=str(tmp_path / "file"))))
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("files", [{"checkpoint.pt": "mine", "summary.json": "{}", "config.json": "keep"},
                                   {"notes.txt": "mine"}, {"sweep.json": "{}"}],
                         ids=["run-file-names", "other-file", "a-sweep"])
def test_a_directory_that_holds_no_run_is_not_written_into(tmp_path, files):
    """A fresh run removes the checkpoint, summary and figures of the run its directory held: in a folder of
    someone else's files, it deleted them (and put a run beside a sweep)."""
    out = tmp_path / "theirs"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    why = "; its checkpoint.pt cannot be read" if "checkpoint.pt" in files else ""
    with pytest.raises(ValueError, match=f"is not empty .* and holds no fastcyclic run .*{why}"):
        train(TrainConfig(**dict(TINY, steps=20, out_dir=str(out))), figures=False)
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_a_directory_with_hidden_files_or_a_trainers_own_checkpoint_is_written_into(tmp_path):
    """A .gitkeep is no one's run; nor is a checkpoint that Trainer.save_checkpoint wrote without train() (the
    research loop), which train(resume=True) continues."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".gitkeep").write_text("")
    assert train(TrainConfig(**dict(TINY, steps=20, out_dir=str(hidden))), figures=False).final["step"] == 20
    out = tmp_path / "research"
    trainer = Trainer(TrainConfig(**dict(TINY, steps=40, out_dir=str(out))))
    for _ in range(20):
        trainer.step()
    trainer.save_checkpoint(str(out / "checkpoint.pt"))
    assert train(TrainConfig(**dict(TINY, steps=40, out_dir=str(out))), resume=True, figures=False).final["step"] == 40


def test_a_directory_where_the_run_writes_a_file_is_refused_before_anything_is_removed(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**dict(TINY, steps=20, out_dir=str(out))), figures=False)
    (out / "summary.json").write_text("the old summary")
    (out / "checkpoint.pt").unlink()
    (out / "checkpoint.pt").mkdir()
    with pytest.raises(ValueError, match="checkpoint.pt' is a directory"):
        train(TrainConfig(**dict(TINY, steps=20, out_dir=str(out))), figures=False)
    assert (out / "summary.json").read_text() == "the old summary"


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    config = dict(TINY, steps=200, optimizer="sgdw", momentum=0.0, weight_decay=0.0, checkpoint_every=10,
                  eval_every=10, out_dir=str(out))

    def explode(trainer, record):  # from step 30 on, the learning rate is absurd: the loss overflows
        if record["step"] == 30:
            trainer.optimizer.param_groups[0]["lr"] = 1e30

    with pytest.raises(TrainingDiverged, match=r"NaN/Inf at step \d+"):
        train(TrainConfig(**config), callbacks=[explode], figures=False)
    good = load_checkpoint(str(out / "checkpoint.pt"))
    assert good["step"] >= 30
    assert all(torch.isfinite(v).all() for v in good["model"].values())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == good["step"] and all(r["train_loss"] == r["train_loss"] for r in lines)


def test_parameters_that_overflow_under_a_finite_loss_are_never_checkpointed(tmp_path):
    """The loss of step 1 is finite; the update it drives (lr 1e38) is not: the run stops before writing it."""
    out = tmp_path / "run"
    config = dict(TINY, lr=1e38, checkpoint_every=1, out_dir=str(out))
    with pytest.raises(TrainingDiverged, match="parameters became NaN/Inf by step 1.*checkpoint .* are kept"):
        train(TrainConfig(**config), figures=False)
    assert not (out / "checkpoint.pt").exists()
    # a run that writes nothing (a sweep's) does not claim to keep anything
    with pytest.raises(TrainingDiverged, match=r"NaN/Inf .*; nothing was written \(out_dir=None\)"):
        train(TrainConfig(**dict(config, out_dir=None)), figures=False)


def test_a_checkpoint_saved_without_crc32s_resumes(tmp_path):
    """torch.serialization.set_crc32_options(False) (a user's global choice) saves records with CRC 0."""
    torch.serialization.set_crc32_options(False)
    try:
        out = tmp_path / "run"
        train(TrainConfig(**dict(TINY, steps=20, out_dir=str(out))), figures=False)
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(out / "checkpoint.pt") as archive:
        assert all(r.CRC == 0 for r in archive.infolist() if r.file_size)
    assert train(TrainConfig(**dict(TINY, steps=40, out_dir=str(out))), resume=True, figures=False).final["step"] == 40


def test_overflowing_gradients_stop_the_run_though_the_loss_stays_finite(tmp_path):
    """lr 1e6: from step 2 the gradients overflow Adam's second moment to inf, which freezes the weights while
    the loss stays finite (~1e33); such a state is not a result, and it is never checkpointed."""
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"optimizer state became NaN/Inf by step \d+") as stopped:
        train(TrainConfig(**dict(TINY, lr=1e6, checkpoint_every=1, out_dir=str(out))), figures=False)
    if DEVICE == "cpu":
        assert "by step 2" in str(stopped.value)
    if (out / "checkpoint.pt").exists():  # the last good state, from before the overflow
        state = load_checkpoint(str(out / "checkpoint.pt"))["optimizer"]["state"]
        assert all(torch.isfinite(v).all() for s in state.values() for v in s.values() if torch.is_tensor(v))


def test_resume_removes_what_a_killed_write_left(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**dict(TINY, steps=20, out_dir=str(out))), figures=False)
    (out / ".tmp-killed.tmp").write_bytes(b"half a checkpoint")
    (out / "figures").mkdir()
    (out / "figures" / ".tmp-killed.tmp").write_bytes(b"half a figure")
    train(TrainConfig(**dict(TINY, steps=40, out_dir=str(out))), resume=True, figures=False)
    assert not list(out.glob("**/.tmp-*"))
    # and a fresh run into the folder (reproduce's showcase after a kill) as well
    (out / "figures" / ".tmp-killed.tmp").write_bytes(b"half a figure")
    train(TrainConfig(**dict(TINY, steps=20, out_dir=str(out))), figures=False)
    assert not list(out.glob("**/.tmp-*"))


def test_settling_step():
    def records(values, steps=None):
        return [{"step": s, "rho2_W": v} for s, v in zip(steps or range(0, 100 * len(values), 100), values)]

    assert settling_step(records([0.1, 0.3, 0.31, 0.32]), "rho2_W") == 100
    # still rising at the end: no step from which it stays near its end value, only the end itself (was: 300)
    assert settling_step(records([0.1, 0.3, 0.5, 0.7]), "rho2_W") is None
    # records in any order (they were read newest first: 0); a non-finite value is no evidence (was: 0)
    assert settling_step(records([0.3, 0.31, 0.1], steps=[200, 300, 100]), "rho2_W") == 200
    assert settling_step(records([0.1, 0.5, 0.52, float("nan")]), "rho2_W") == 100
    assert settling_step(records([0.5]), "rho2_W") is None and settling_step([], "rho2_W") is None
    # exactly `tolerance` from the end value is within it (0.75 and 1.0 are exact in binary)
    assert settling_step(records([0.1, 0.5, 0.75, 1.0]), "rho2_W", tolerance=0.25) == 200
    # the report orders a settled layer before one still moving
    final = dict(step=300, train_acc=1.0, test_acc=1.0, train_loss=0.1, test_loss=0.1)
    text = report(TrainResult(TrainConfig(p=97), final, None, settle_W=100, settle_E=None))
    assert "for W at step 100, for E not yet (still moving at the end) (W first)" in text, text
    # at width 2 rho2 is 1 by construction: the report names the layers where t and settling mean nothing
    assert "note: E has at most 2 columns" in text  # the default d = 2
    narrow = train(TrainConfig(p=13, model="embed-sum", hidden=None, d=2, steps=20, eval_every=10, geometry_every=10,
                               progress=False, device=DEVICE), figures=False)
    assert "note: W and E have at most 2 columns" in report(narrow)
    assert "at most 2 columns" not in report(dataclasses.replace(narrow, config=TrainConfig(d=8), geometry=None))


@pytest.mark.parametrize("train_acc", [0.01, 0.9])
def test_the_report_says_when_a_run_learned_nothing(train_acc):
    final = dict(step=100, train_acc=train_acc, test_acc=0.01, train_loss=4.5, test_loss=4.6)
    text = report(TrainResult(TrainConfig(p=97), final, None, t_W=60, t_E=70))
    assert ("at chance, so nothing was learned" in text) == (train_acc <= 2 / 97)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["train", "--p", "13", "--d", "16", "--hidden", "32", "--steps", "40", "--eval-every", "20",
                     "--no-progress", "--out-dir", str(out), "--device", DEVICE])
    printed = capsys.readouterr().out
    assert code == 0
    assert "accuracy: train" in printed and "geometry: W" in printed and "layer order" in printed
    assert (out / "summary.json").exists() and (out / "figures" / "circles.png").exists()
    code = cli_main(["train", "--p", "1", "--out-dir", str(tmp_path / "bad")])
    assert code == 2 and "p must be an integer in [3, 2^31]" in capsys.readouterr().err


def test_cli_threads_are_set_for_the_run_and_put_back(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(training, "train", lambda *args, **kwargs: seen.append(torch.get_num_threads()) or 1 / 0)
    before = torch.get_num_threads()
    with pytest.raises(ZeroDivisionError):
        cli_main(["train", "--threads", "1", "--out-dir", "none"])
    assert seen == [1] and torch.get_num_threads() == before
    assert cli_main(["train", "--threads", "0", "--out-dir", str(tmp_path / "run")]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("error", [
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 17179869176 bytes."),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB"), MemoryError()])
def test_cli_out_of_memory_is_one_line_not_a_traceback(error, monkeypatch, tmp_path, capsys):
    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(training, "train", no_memory)
    assert cli_main(["train", "--p", "2147483647", "--batch-size", "8", "--out-dir", "none"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory with P=2147483647, d=2, hidden=16, batch_size=8" in err


@pytest.mark.skipif(DEVICE != "cpu", reason="the subprocess runs the CPU path")
def test_sigterm_stops_train_like_ctrl_c(tmp_path):
    """SIGTERM (kill, a job scheduler) ended the process at once: no message, and temporary files of a checkpoint
    or figure mid-write left behind.  It now stops like Ctrl-C: exit 130, the hint, nothing partial."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastcyclic.cli", "train", "--p", "23", "--steps", "100000",
                             "--checkpoint-every", "5", "--eval-every", "5", "--no-progress", "--no-figures",
                             "--out-dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoint.pt").exists():
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()
    assert "interrupted; rerun the same command with --resume" in err.decode()
    assert not list(out.rglob("*.tmp")) and load_checkpoint(str(out / "checkpoint.pt"))["step"] >= 5


def test_resuming_a_finished_run_without_figures_keeps_its_figures(tmp_path):
    """Nothing is retrained, so the figures of the finished run still describe it."""
    out = tmp_path / "run"
    config = TrainConfig(p=7, d=4, steps=4, eval_every=2, progress=False, out_dir=str(out))
    train(config)
    before = {p.name: p.read_bytes() for p in (out / "figures").iterdir()}
    train(config, resume=True, figures=False)
    assert before and {p.name: p.read_bytes() for p in (out / "figures").iterdir()} == before


def test_ctrl_c_during_a_checkpoint_write_is_handled_after_it():
    """torch.save's zip writer turned a KeyboardInterrupt inside it into 'unexpected pos' (a RuntimeError, exit 1).
    Masking the signals in the main thread was not enough: a process-directed signal then went to another thread
    (torch's workers, tqdm's monitor), and the main thread still raised inside the write."""
    from fastcyclic.training import _signals_held

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    written = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with _signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # a handler run inside the block would raise here
                written.append(True)
    finally:
        stop.set()
        other.join()
    assert written == [True]


def test_interrupt_hint_when_nothing_was_checkpointed(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    assert cli_main(["train", "--out-dir", "none"]) == 130
    assert "nothing was checkpointed" in capsys.readouterr().err


def test_two_runs_in_one_out_dir_are_refused(tmp_path):
    """The second of two concurrent runs into one out_dir is refused before it writes (metrics of two seeds
    interleaved, one run deleting the other's temporary checkpoint)."""
    out = str(tmp_path / "run")
    config = TrainConfig(p=7, d=4, steps=4, eval_every=2, progress=False, out_dir=out)
    inner = []

    def second_run(trainer, record):
        if not inner:
            with pytest.raises(ValueError, match="another run is writing to out_dir"):
                train(dataclasses.replace(config, seed=1), figures=False)
            inner.append(record["step"])

    train(config, callbacks=[second_run], figures=False)
    assert inner == [0]
    assert json.load(open(os.path.join(out, "config.json")))["seed"] == 0
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [0, 2, 4]
    train(dataclasses.replace(config, seed=1), figures=False)  # after the first one ended: fine


def test_a_filesystem_without_flock_runs_unlocked(tmp_path, monkeypatch):
    """Only "held by another process" refuses a run: a filesystem where flock fails otherwise (EBADF, ENOLCK on
    some network filesystems) would have refused every run as 'another run is writing'.  It warns: two runs in
    one out_dir there interleave their metrics unnoticed."""
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="No locks available; a filesystem without flock"):
        train(TrainConfig(p=7, d=4, steps=2, eval_every=2, progress=False, out_dir=str(tmp_path / "run")),
              figures=False)
    assert (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("errno_", [errno.ENOSPC, errno.EROFS])
def test_a_full_disk_is_one_line_and_no_partial_metrics_line(errno_, monkeypatch, tmp_path, capsys):
    """Disk full (or a read-only folder) mid-run: one line and exit 1, not a traceback, and metrics.jsonl keeps
    whole lines (a cut-off line was left before)."""
    out = tmp_path / "run"
    real_write, calls = os.write, []

    def write(fd, data):
        calls.append(1)
        if len(calls) == 3:  # the third metrics line: half of it, then the disk is full
            real_write(fd, bytes(data)[:10])
            raise OSError(errno_, os.strerror(errno_), str(out / "metrics.jsonl"))
        return real_write(fd, data)

    monkeypatch.setattr(training.os, "write", write)
    code = cli_main(["train", "--p", "7", "--d", "4", "--steps", "10", "--eval-every", "2", "--no-progress",
                     "--no-figures", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and f"cannot write '{out / 'metrics.jsonl'}'" in err
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["step"] in (0, 2) for line in lines)


def test_a_full_disk_inside_torch_save_is_one_line_and_keeps_the_last_checkpoint(monkeypatch, tmp_path, capsys):
    """torch.save's zip writer wraps the full disk's OSError in a RuntimeError ("unexpected pos"), which was
    printed as a 46-line traceback: it is the same one line as any full disk, and the last checkpoint loads."""
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64384 vs 64276")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(training.torch, "save", save)
    code = cli_main(["train", "--p", "7", "--d", "4", "--steps", "8", "--eval-every", "2", "--checkpoint-every",
                     "2", "--no-progress", "--no-figures", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert f"cannot write '{out / 'checkpoint.pt'}': {os.strerror(errno.ENOSPC)}" in err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_ctrl_c_while_the_cli_starts_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C in the first seconds (building the parser imports torch) gave a traceback and died by SIGINT."""
    from fastcyclic import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli_main(["train"]) == 130
    assert capsys.readouterr().err == "fastcyclic: interrupted\n"


def test_cli_version_names_what_it_runs_on(capsys):
    import triton

    import fastcyclic

    with pytest.raises(SystemExit) as stop:
        cli_main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"fastcyclic {fastcyclic.__version__}, torch {torch.__version__}, triton {triton.__version__}, "
        f"numpy {np.__version__}, Python {'.'.join(map(str, sys.version_info[:3]))}")


@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "-1e-3"], "lr must be a finite number >= 0, got -0.001"),
    (["train", "--weight-decay", "-.5"], "weight_decay must be a finite number >= 0, got -0.5"),
    (["sweep", "--p", "31", "--weight-decay", "-1e-3,1e-2"], "every λ must be > 0 (λ_crit is interpolated in "
                                                             "log λ), got -1e-3"),
    (["sweep", "--p", "31", "--weight-decay", "1e-3", "--seeds", "-1:3"], "seeds must be >= 0, got -1"),
    # (a negative size was told "in [0, 2^31)", a zero one "positive")
    (["bench", "ce", "--shapes", "-4x4x4"], "shape sizes must be positive, got '-4x4x4'"),
    (["bench", "geometry", "--shapes", "-16x4"], "shape needs K >= 15 and d >= 2, got '-16x4'"),
    (["bench", "train", "--shapes", "-31x8"], "shape needs P >= 3 and d >= 1, got '-31x8'"),
    (["bench", "ce", "--shapes", "4x4x2147483648"], "every size in NxDxK must be below 2^31, got '4x4x2147483648'"),
])
def test_cli_negative_numbers_reach_the_check_that_names_them(argv, message, tmp_path, capsys):
    """argparse took "-1e-3" for an option and said only "expected one argument"."""
    out = ["--out" if argv[0] in ("sweep", "bench") else "--out-dir", str(tmp_path / "x")]
    try:
        assert cli_main(argv + out) == 2
    except SystemExit as stop:  # argparse's own refusal (an option's type)
        assert stop.code == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_and_fused_update_match_the_plain_loop(dtype):
    config = dict(TINY, device="cuda", steps=50, dtype=dtype, batch_size=None)
    plain = train(TrainConfig(**dict(config, cuda_graph=False, fused_update=False)), figures=False)
    fast = train(TrainConfig(**config), figures=False)
    # what is compared: a captured graph, and in float32 the fused update (bf16 updates in AdamW.step)
    assert fast.trainer.graph_captured and not plain.trainer.graph_captured
    assert (fast.trainer.fused is not None) == (dtype == "float32") and plain.trainer.fused is None
    # the fused update steps on the fp32 dW (the plain loop too, here): equal up to rounding, which
    # Adam can amplify for near-zero gradient entries, so compare whole tensors
    for k, v in params(plain).items():
        assert (params(fast)[k] - v).norm() <= 1e-2 * v.norm(), k


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer, p", [("adamw", 23), ("sgdw", 23), ("adamw", 2053)])  # 2053: hashed split
def test_cuda_graph_replays_the_schedule_the_sampler_and_the_step_count(optimizer, p):
    """What the captured step must read from the device at every replay, made visible: sampled batches (the
    batch generator, registered with the graph), lambda's warm-up ramp (large lambda, ramp ending mid-run), the
    optimizer's step counts.  The same fused setting on both sides, so the runs differ by the graph alone; the
    replays make no host sync."""
    config = dict(TINY, device="cuda", steps=40, optimizer=optimizer, p=p, batch_size=64, bias=True,
                  weight_decay=0.5, weight_decay_warmup=15, lr=1e-2, eval_every=40, geometry_every=40)
    plain = Trainer(TrainConfig(**dict(config, cuda_graph=False)))
    fast = Trainer(TrainConfig(**config))
    for _ in range(3):  # past the capture
        plain.step(), fast.step()
    assert fast.graph_captured
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(config["steps"] - 3):
            plain.step(), fast.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(plain.batch_generator.get_state(), fast.batch_generator.get_state())
    assert float(plain._weight_decay) == float(fast._weight_decay) == 0.5
    for (name, a), b in zip(plain.model.named_parameters(), fast.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeGraph:
    """torch.cuda.CUDAGraph on the CPU: its "capture" runs the step and a replay runs it again (a captured run is
    a step ahead of a plain one), or, with trainer None, its capture raises: enough to see when step() captures."""

    def __init__(self, trainer=None):
        self.trainer = trainer

    def register_generator_state(self, generator):
        pass

    def replay(self):
        self.trainer._train_step()


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """Trainer's CUDA-graph path on the CPU, torch.cuda's stream and graph API faked; yields the list of graphs
    captured.  (What a replay computes is checked on a GPU: test_cuda_graph_replays_the_schedule_...)"""
    graphs = []

    @contextlib.contextmanager
    def graph(g):
        if g.trainer is None:
            raise RuntimeError("operation not permitted when stream is capturing")
        yield
        graphs.append(g)

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    real = Trainer._can_capture

    def can_capture(self):  # Trainer's own rule, as on CUDA with the triton backend
        return real(types.SimpleNamespace(config=self.config, device=torch.device("cuda"), backend="triton",
                                          step_count=self.step_count, _no_capture=self._no_capture))

    monkeypatch.setattr(Trainer, "_can_capture", can_capture)
    return graphs


@pytest.mark.portable  # host-side logic, on the CPU everywhere
def test_a_failed_capture_says_so_and_keeps_the_counts_right(fake_cuda_graphs, monkeypatch):
    """A capture that raised (an op torch cannot capture) left step_count one behind the device's step count
    and every later step() replaying the graph whose capture had failed, the error torch's alone.  Now it is a
    RuntimeError naming the error and cuda_graph=False, the warm-up step counted; a caller that goes on anyway
    steps eagerly (no second capture) and computes what a run without a graph computes."""
    attempts = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: attempts.append(1) or _FakeGraph(None))  # capture raises
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    config = dict(TINY, steps=6, batch_size=64, weight_decay=0.1, weight_decay_warmup=3, device="cpu")  # bitwise
    trainer = Trainer(TrainConfig(**config))
    with pytest.raises(RuntimeError, match="capturing the training step in a CUDA graph failed .RuntimeError: "
                                           "operation not permitted.*cuda_graph=False"):
        trainer.step()
    assert not trainer.graph_captured and trainer.step_count == int(trainer._step) == trainer._loss_steps == 1
    for _ in range(5):
        trainer.step()
    assert len(attempts) == 1 and trainer.step_count == int(trainer._step) == 6
    monkeypatch.setattr(Trainer, "_can_capture", lambda self: False)
    plain = Trainer(TrainConfig(**config))
    for _ in range(6):
        plain.step()
    for (name, a), b in zip(plain.model.named_parameters(), trainer.model.parameters()):
        assert torch.equal(a, b), name


_INVALIDATED_CAPTURE = """
import torch
from fastcyclic.training import Trainer, TrainConfig
config = dict(p=23, d=32, hidden=64, steps=6, batch_size=64, progress=False, device="cuda", eval_every=6,
              geometry_every=6, checkpoint_every=0)
trainer = Trainer(TrainConfig(**config))
assert trainer.fused is not None  # the classifier's update runs in the backward, before optimizer.step()
optimizer_step = trainer.optimizer.step
def syncing_in_capture(*args, **kwargs):  # after the fused update: its handle's bookkeeping must be undone
    if torch.cuda.is_current_stream_capturing():
        torch.cuda.current_stream().synchronize()  # not allowed while capturing: the driver invalidates it
    return optimizer_step(*args, **kwargs)
trainer.optimizer.step = syncing_in_capture
stream = torch.cuda.current_stream()
try:
    trainer.step()
except RuntimeError as e:
    assert "capturing the training step in a CUDA graph failed" in str(e) and "cuda_graph=False" in str(e), e
else:
    raise AssertionError("the capture did not fail")
assert not trainer.graph_captured and trainer.step_count == int(trainer._step) == 1
assert torch.cuda.current_stream() == stream
assert trainer.fused._pending is None and trainer.fused._stepped
print("ok")
"""


@pytest.mark.cuda
def test_a_capture_the_driver_invalidates_is_an_error_that_says_what_to_do():
    """A real capture failure (a sync inside the capture): capture_end raises, and torch.cuda.graph leaves its side
    stream current; the trainer restores the stream and says to run without a graph.  In a subprocess: torch <=
    2.11 also leaves the process's CUDA generators in capture mode, which would fail later tests."""
    done = subprocess.run([sys.executable, "-c", _INVALIDATED_CAPTURE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.portable  # host-side logic, on the CPU everywhere
def test_a_changed_host_hyperparameter_is_captured_again(fake_cuda_graphs, monkeypatch):
    """A graph bakes the optimizer's host values (betas, eps, momentum) into its launches; a float lr or
    weight decay is written to the device before each replay.  Changing a baked one must capture again (it
    was replayed with the old value: CPU and CUDA runs differed silently); a float lr must not."""
    trainer = Trainer(TrainConfig(**dict(TINY, steps=200, batch_size=64, bias=True, device="cpu")))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: _FakeGraph(trainer))
    decayed, bias = trainer.optimizer.param_groups

    def steps(n=training.MIN_REPLAYS + 1):  # past MIN_REPLAYS: changes this rare keep the graph on
        for _ in range(n):
            trainer.step()
        return len(fake_cuda_graphs)

    assert steps() == 1 and trainer.graph_captured
    decayed["lr"] = 0.5 * decayed["lr"]  # refresh_scalars writes these
    bias["weight_decay"] = 0.01
    assert steps() == 1
    changes = (dict(betas=(0.8, 0.98)), dict(eps=1e-6), dict(lr=torch.tensor(1e-3)),
               dict(lr=torch.tensor(1e-3)),  # another tensor: the graph read the old one
               dict(betas=np.array([0.85, 0.98])))  # an array, as the optimizer takes (== has no truth value)
    for captures, change in enumerate(changes, 2):
        decayed.update(change)
        assert steps() == captures, change
    decayed["lr"].fill_(2e-3)  # the same tensor, changed in place: the graph copies from it at every replay
    decayed["betas"] = (0.85, 0.98)  # equal values
    assert steps() == 6


@pytest.mark.portable  # host-side logic, on the CPU everywhere
def test_hyperparameters_changed_at_every_step_turn_the_graph_off(fake_cuda_graphs, monkeypatch):
    """OneCycleLR's cycle_momentum writes betas at every step: a capture every step (a warm-up step, a
    synchronize, a compilation) is slower than no graph.  After two graphs that lived a step each, the run goes
    on without one, with one warning."""
    trainer = Trainer(TrainConfig(**dict(TINY, steps=40, batch_size=64, device="cpu")))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: _FakeGraph(trainer))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(trainer.optimizer, max_lr=1e-2, total_steps=40)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(30):
            trainer.step()
            scheduler.step()
    said = [str(w.message) for w in seen if "CUDA-graph" in str(w.message)]
    assert len(fake_cuda_graphs) == 2 and not trainer.graph_captured and len(said) == 1, said
    assert trainer.step_count == 30  # (each fake capture also ran the step: _step is 32)


def test_fastcyclic_train_is_the_function_whatever_was_imported_first():
    """The README's `fastcyclic.TrainConfig(...)` then `fastcyclic.train(config)`: with the module named
    fastcyclic/train.py, importing it bound `fastcyclic.train` to the module and the call raised TypeError."""
    import fastcyclic
    import fastcyclic.training

    assert fastcyclic.TrainConfig is fastcyclic.training.TrainConfig
    assert fastcyclic.train is fastcyclic.training.train
    from fastcyclic import train as train_function
    assert train_function is fastcyclic.training.train
    submodules = {module.name for module in pkgutil.iter_modules(fastcyclic.__path__)}
    assert "training" in submodules and not submodules & set(fastcyclic.__all__)


def test_default_config_claims_at_a_smaller_p():
    """The README's claims for the default run (P = 97, ~35 s a seed), checked at P = 59 (~11 s a seed): it
    groks and W and E end rank-2 cyclic on one shared frequency, W reaching rho2 >= 0.9 before the test set
    is fitted.  At P = 59 seeds 0-2 all do on CPU; on a GPU rounding differs and so do the trajectories, so
    two of three must (at P = 47, 2 of 3 seeds did)."""
    outcomes = {}
    for seed in (0, 1, 2):
        result = train(TrainConfig(p=59, seed=seed, progress=False, device=DEVICE), figures=False)
        g = result.geometry
        fitted = next((r["step"] for r in result.history if r["test_acc"] >= 0.99), None)
        claims = (result.final["test_acc"] >= 0.99, g.verdict == g.verdict_E == "cyclic", g.shared_omega,
                  g.freq_count_W == 1 and g.rho2_W >= 0.9, result.t_W is not None and fitted is not None
                  and result.t_W < fitted)
        outcomes[seed] = (all(claims), result.final["test_acc"], g.verdict, g.verdict_E, g.omega_W, g.omega_E,
                          g.rho2_W, result.t_W, fitted)
    assert sum(outcome[0] for outcome in outcomes.values()) >= 2, outcomes


@pytest.mark.parametrize("changes", [dict(lr=0.01), dict(seed=1), dict(optimizer="sgdw"), dict(batch_size=64),
                                     dict(activation="relu"), dict(weight_decay_warmup=0), dict(bias=True)])
def test_load_state_dict_refuses_every_field_that_changes_a_step(changes):
    """Only RESUMABLE_CHANGES (and on CPU the CUDA-only flags) may differ from the checkpoint's config."""
    state = Trainer(TrainConfig(**TINY)).state_dict()
    field = next(iter(changes))
    with pytest.raises(ValueError, match=f"cannot resume with a different config.*{field}"):
        Trainer(TrainConfig(**dict(TINY, **changes))).load_state_dict(state)
    Trainer(TrainConfig(**dict(TINY, steps=99, eval_every=7, geometry_every=9, checkpoint_every=3,
                               progress=True))).load_state_dict(state)


def test_a_fresh_run_rewrites_metrics_and_a_resume_keeps_no_line_past_its_checkpoint(tmp_path):
    """metrics.jsonl holds the new run's records only, and after a resume one line per evaluated step."""
    out = tmp_path / "run"
    train(TrainConfig(**dict(TINY, steps=40, out_dir=str(out))), figures=False)
    train(TrainConfig(**dict(TINY, steps=20, lr=0.01, out_dir=str(out))), figures=False)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 20]

    def stop(trainer, record):
        if record["step"] == 40:
            raise KeyboardInterrupt

    config = dict(TINY, checkpoint_every=30, out_dir=str(out))
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**config), callbacks=[stop], figures=False)
    train(TrainConfig(**config), resume=True, figures=False)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 20, 40, 60]


def test_load_checkpoint_refuses_a_torch_file_that_is_not_a_training_checkpoint(tmp_path):
    """A readable torch.save of another dict (no format 1) is named as foreign, not loaded."""
    path = tmp_path / "other.pt"
    torch.save(dict(model={}, step=3), path)
    with pytest.raises(ValueError, match="not a fastcyclic training checkpoint"):
        load_checkpoint(str(path))
    # a missing path, or a folder, is said as such (it read "corrupt or unreadable (FileNotFoundError ...)")
    with pytest.raises(ValueError, match=r"other2.pt' does not exist$"):
        load_checkpoint(str(tmp_path / "other2.pt"))
    with pytest.raises(ValueError, match="is not a file$"):
        load_checkpoint(str(tmp_path))


def test_summary_json_holds_what_the_result_says(tmp_path, monkeypatch):
    """summary.json's t_W, t_E, settle_W, settle_E, steps and final are the result's (each under its own name)."""
    monkeypatch.setattr(training, "settling_step", lambda history, key: {"rho2_W": 20, "rho2_E": 40}[key])
    monkeypatch.setattr(training.geometry, "layer_order", lambda series: (0, 60))
    out = tmp_path / "run"
    result = train(TrainConfig(**dict(TINY, out_dir=str(out))), figures=False)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["t_W"], summary["t_E"], summary["settle_W"], summary["settle_E"]) == (0, 60, 20, 40)
    assert (result.t_W, result.t_E, result.settle_W, result.settle_E) == (0, 60, 20, 40)
    assert summary["steps"] == 60 and summary["final"] == result.final
    assert summary["geometry"] == json.loads(json.dumps(result.geometry.to_dict()))


def test_weight_decay_warmup_0_applies_the_full_lambda_from_the_first_step():
    """weight_decay_warmup=0: no ramp, the first step already uses the whole λ."""
    trainer = Trainer(TrainConfig(**dict(TINY, weight_decay=0.02, weight_decay_warmup=0)))
    trainer.step()
    assert trainer.evaluate()["weight_decay"] == pytest.approx(0.02)


def test_the_bias_is_never_weight_decayed():
    """The classifier bias sits in a group of its own with λ = 0, while every weight matrix gets λ."""
    trainer = Trainer(TrainConfig(**dict(TINY, bias=True, weight_decay=0.5, weight_decay_warmup=0)))
    trainer.step()
    groups = trainer.optimizer.param_groups
    bias_groups = [g for g in groups if any(p is trainer.model.bias for p in g["params"])]
    assert len(bias_groups) == 1 and float(bias_groups[0]["weight_decay"]) == 0.0
    others = [g for g in groups if g is not bias_groups[0]]
    assert all(float(g["weight_decay"]) == 0.5 for g in others)
    decayed = {id(p) for n, p in trainer.model.named_parameters() if n != "bias"}
    assert {id(p) for g in others for p in g["params"]} == decayed


def test_weight_decay_mode_reaches_the_optimizer():
    """weight_decay_mode is the optimizer's: Adam + L2 and AdamW take different steps from the same start."""
    weights = {}
    for mode in ("l2", "decoupled"):
        trainer = Trainer(TrainConfig(**dict(TINY, weight_decay=0.5, weight_decay_warmup=0, weight_decay_mode=mode)))
        assert {g["weight_decay_mode"] for g in trainer.optimizer.param_groups} == {mode}
        trainer.step()
        weights[mode] = trainer.model.W.clone()
    assert not torch.equal(weights["l2"], weights["decoupled"])


def test_the_last_step_is_checkpointed_when_steps_is_not_a_multiple_of_checkpoint_every(tmp_path):
    """steps=30 with checkpoint_every=20: the checkpoint holds step 30 (the end), not step 20."""
    out = tmp_path / "run"
    result = train(TrainConfig(**dict(TINY, steps=30, eval_every=10, geometry_every=10, out_dir=str(out))),
                   figures=False)
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["step"] == 30 and result.paths["checkpoint"] == str(out / "checkpoint.pt")
    assert_bitwise_equal(state["model"], params(result))


def test_cli_flags_reach_the_config(monkeypatch, tmp_path):
    """--out-dir's {p} and {seed}, 'none' for optional ints, --no-* flags, --resume and --no-figures reach train()."""
    seen = {}

    def fake_train(config, *, resume=False, figures=True, callbacks=None):
        seen.update(config=config, resume=resume, figures=figures)
        raise ValueError("stop here")

    monkeypatch.setattr(training, "train", fake_train)
    code = cli_main(["train", "--p", "31", "--seed", "5", "--out-dir", str(tmp_path / "p{p}-s{seed}"),
                     "--batch-size", "none", "--hidden", "none", "--weight-decay", "0.02", "--no-progress",
                     "--factorised", "--betas", "0.8", "0.9", "--resume", "--no-figures"])
    assert code == 2
    config = seen["config"]
    assert config.out_dir == str(tmp_path / "p31-s5") and (config.p, config.seed) == (31, 5)
    assert config.batch_size is None and config.hidden is None and config.betas == (0.8, 0.9)
    assert config.progress is False and config.factorised is True and config.weight_decay == 0.02
    assert seen["resume"] is True and seen["figures"] is False


def _config_the_cli_passes(monkeypatch, argv):
    """The TrainConfig that `fastcyclic train ARGV` hands to train() (which then stops)."""
    seen = []

    def fake_train(config, **kwargs):
        seen.append((config, torch.get_num_threads()))
        raise ValueError("stop here")

    monkeypatch.setattr(training, "train", fake_train)
    assert cli_main(["train", *argv]) == 2
    return seen[0]


def test_cli_defaults_and_spellings_of_none(monkeypatch):
    """No --out-dir: runs/p{P}-seed{SEED}, as the README says; "none" and "full" in any case are None; no --threads:
    torch's own thread count."""
    before = torch.get_num_threads()
    config, threads = _config_the_cli_passes(monkeypatch, ["--p", "31", "--seed", "2"])
    assert config.out_dir == "runs/p31-seed2" and threads == before
    config, _ = _config_the_cli_passes(monkeypatch, ["--batch-size", "FULL", "--hidden", "None", "--out-dir", "NONE"])
    assert config.batch_size is None and config.hidden is None and config.out_dir is None


@pytest.mark.parametrize("template", ["runs/{q}", "runs/{0}", "runs/{p", "runs/{p.x}", "runs/{seed[0]}"])
def test_cli_out_dir_with_other_braces_is_refused(template, capsys):
    assert cli_main(["train", "--out-dir", template]) == 2
    assert f"--out-dir {template!r}: only {{p}} and {{seed}} may appear in braces" in capsys.readouterr().err


def test_cli_exit_codes_of_a_diverged_run_and_of_an_error_that_is_not_memory(monkeypatch, capsys):
    """A NaN/Inf loss exits 3 (README); a RuntimeError that is not out of memory is a bug: its traceback stays."""
    def diverged(*args, **kwargs):
        raise TrainingDiverged("the loss is nan at step 7")

    monkeypatch.setattr(training, "train", diverged)
    assert cli_main(["train", "--out-dir", "none"]) == 3
    assert "fastcyclic train: the loss is nan at step 7" in capsys.readouterr().err

    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(training, "train", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        cli_main(["train", "--out-dir", "none"])


@pytest.mark.parametrize("options, hint", [
    (["--checkpoint-every", "0"], "nothing was checkpointed"),
    # stopped before its first checkpoint: the hint offered "--resume to continue from the last checkpoint"
    ([], "stopped before its first checkpoint: a rerun starts from step 0")])
def test_interrupt_hint_when_there_is_no_checkpoint(monkeypatch, capsys, tmp_path, options, hint):
    """An out_dir but no checkpoint in it: nothing to resume from, so no --resume hint."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    assert cli_main(["train", *options, "--out-dir", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert hint in err and "--resume" not in err


def test_help_shows_no_rest_backticks(capsys):
    for command in ("sweep", "reproduce"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        text = capsys.readouterr().out
        assert f"fastcyclic {command}" in text and "``" not in text, command


def test_evaluate_measures_each_split_on_its_own_pairs():
    trainer = Trainer(TrainConfig(**dict(TINY, train_fraction=0.3)))
    for _ in range(30):
        trainer.step()
    record = trainer.evaluate()
    assert (record["train_loss"], record["train_acc"]) == trainer._loss_and_accuracy(trainer.data.train_eval_pairs())
    assert (record["test_loss"], record["test_acc"]) == trainer._loss_and_accuracy(trainer.data.test_pairs())
    assert record["test_loss"] != record["train_loss"]


def test_batch_loss_is_the_mean_since_the_last_evaluation():
    """lr = 0: every full-batch step sees the same loss L, so each record's batch_loss is L, not a running sum."""
    trainer = Trainer(TrainConfig(**dict(TINY, lr=0.0)))
    for _ in range(3):
        trainer.step()
    first = trainer.evaluate()
    for _ in range(2):
        trainer.step()
    second = trainer.evaluate()
    assert first["batch_loss"] == pytest.approx(first["train_loss"], rel=1e-5)
    assert second["batch_loss"] == pytest.approx(first["batch_loss"], rel=1e-9)


def test_the_seed_changes_the_initialisation_and_batches_have_their_own_stream():
    one, other = (Trainer(TrainConfig(**dict(TINY, seed=s, batch_size=16))) for s in (0, 1))
    assert not torch.equal(one.model.E, other.model.E) and not torch.equal(one.model.W, other.model.W)
    # the batch sampler does not replay the initialisation's stream
    init = torch.Generator().manual_seed(0)
    assert not torch.equal(one.batch_generator.get_state(), init.get_state())


def test_geometry_record_fields_are_the_summary_fields():
    trainer = Trainer(TrainConfig(**dict(TINY, model="embed-sum", hidden=None)))
    for _ in range(10):
        trainer.step()
    record = trainer.evaluate(with_geometry=True)
    s = trainer.summarize_geometry()
    assert s.rho2_W != s.rho2_E
    for key in ("rho2_W", "rho2_E", "locking", "freq_count_W", "freq_count_E", "omega_W", "omega_E"):
        assert record[key] == getattr(s, key), key
    assert record["verdict"] == s.verdict


def test_the_final_checkpoint_holds_the_final_record(tmp_path):
    """steps=30, eval_every=20: the record of step 30 is in the checkpoint written at step 30, so a resume to more
    steps keeps it in metrics.jsonl."""
    out = tmp_path / "run"
    config = TrainConfig(**dict(TINY, steps=30, eval_every=20, geometry_every=20, checkpoint_every=20,
                                out_dir=str(out)))
    train(config, figures=False)
    assert [r["step"] for r in load_checkpoint(str(out / "checkpoint.pt"))["history"]] == [0, 20, 30]
    train(dataclasses.replace(config, steps=40), resume=True, figures=False)
    lines = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [0, 20, 30, 40]


def test_embed_sum_reports_locking():
    """embed-sum's W reads act(E[a] + E[b]), a vector of E's space: locking is defined."""
    assert Trainer(TrainConfig(**dict(TINY, model="embed-sum", hidden=None))).summarize_geometry().locking is not None


def test_the_report_counts_chance_accuracy_inclusively():
    final = dict(step=100, train_acc=2 / 97, test_acc=0.01, train_loss=4.5, test_loss=4.6)
    assert "at chance, so nothing was learned" in report(TrainResult(TrainConfig(p=97), final, None))


def test_layers_settling_at_the_same_step_are_reported_together():
    assert training.first_layer(100, 100) == "same"
    assert training.first_layer(100, 200) == "W" and training.first_layer(None, 5) == "E"
    final = dict(step=300, train_acc=1.0, test_acc=1.0, train_loss=0.1, test_loss=0.1)
    text = report(TrainResult(TrainConfig(p=97), final, None, settle_W=100, settle_E=100))
    assert "(together)" in text and "W first" not in text


def test_layer_order_counts_the_initial_record():
    """With 2 columns, rho2 is 1 from the start: t_W = t_E = 0 (the step-0 record counts)."""
    result = train(TrainConfig(**dict(TINY, model="embed-sum", hidden=None, d=2, steps=20, eval_every=10,
                                      geometry_every=10)), figures=False)
    assert result.history[0]["step"] == 0 and result.history[0]["rho2_E"] >= 0.9
    assert result.t_E == 0 and result.t_W == 0


def test_the_weight_decay_ramp_reaches_lambda_and_stays_there():
    trainer = Trainer(TrainConfig(**dict(TINY, weight_decay=0.5, weight_decay_warmup=4)))
    seen = []
    for _ in range(8):
        trainer.step()
        seen.append(trainer.evaluate()["weight_decay"])
    assert seen == pytest.approx([0.5 * min(step / 4, 1.0) for step in range(1, 9)])


def test_load_state_dict_refuses_a_change_to_any_field_that_is_not_resumable():
    """Every TrainConfig field outside RESUMABLE_CHANGES (and, on CPU, the CUDA-only flags) is compared on resume:
    the parametrized test above samples seven fields; this one covers all, and fails when a new field is added
    without saying here whether a resume may change it."""
    from fastcyclic.training import CPU_FREE, RESUMABLE_CHANGES

    base = dict(TINY, optimizer="adamw")
    other = dict(p=29, model="embed-sum", d=16, hidden=32, factorised=True, activation="relu", bias=True,
                 train_fraction=0.4, batch_size=64, optimizer="sgdw", lr=0.01, betas=(0.8, 0.98),
                 weight_decay=0.5, weight_decay_mode="decoupled", weight_decay_warmup=7, init_scale=0.25,
                 dtype="bfloat16", seed=1)
    exempt = set(RESUMABLE_CHANGES) | set(CPU_FREE) | {"device", "backend", "momentum"}  # momentum: adamw ignores it
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(other) == fields - exempt, "say whether a resume may change the new field"
    state = Trainer(TrainConfig(**base)).state_dict()
    for field, value in other.items():
        with pytest.raises(ValueError, match=f"cannot resume with a different config.*{field}"):
            Trainer(TrainConfig(**dict(base, **{field: value}))).load_state_dict(state)


def test_the_last_steps_evaluation_has_the_geometry_off_the_geometry_schedule(tmp_path):
    """The run's last step is always a geometry step ("the geometry when due"), not only after _finish: the callbacks
    see it there, the last checkpoint's history holds it, and Trainer.evaluate() at config.steps measures it."""
    seen = {}
    config = TrainConfig(**dict(TINY, steps=30, eval_every=10, geometry_every=20, checkpoint_every=10,
                                out_dir=str(tmp_path / "run")))
    train(config, callbacks=[lambda trainer, record: seen.update({record["step"]: "rho2_W" in record})],
          figures=False)
    assert seen == {0: True, 10: False, 20: True, 30: True}
    history = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["history"]
    assert [r["step"] for r in history if "rho2_W" in r] == [0, 20, 30]
    trainer = Trainer(TrainConfig(**dict(TINY, steps=3, geometry_every=100)))
    for _ in range(3):
        trainer.step()
    assert "rho2_W" in trainer.evaluate()


@pytest.mark.parametrize("betas", [(0.9, 1.0), (1.0, 0.999)])
def test_validate_refuses_a_beta_of_1(betas):
    """β = 1 is outside [0, 1) (Adam's bias correction 1 - β^t is 0): validate() says so itself, as the sweep's
    up-front check of a grid relies on, not only the optimizer once a run starts (sgdw's run never builds one)."""
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
        validate(TrainConfig(**dict(TINY, betas=betas)))
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
        validate(TrainConfig(**dict(TINY, optimizer="sgdw", betas=betas)))
