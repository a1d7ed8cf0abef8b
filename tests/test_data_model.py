"""Data split (fastcyclic.data) and model (fastcyclic.model): properties, references, a tiny training run."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcyclic.data import _STREAM_TEST, MAX_P, ModularAddition, _first_distinct, _fmix32_int, pair_hash, seed_key
from fastcyclic.model import CyclicModel


def _keys(a, b, p):
    return set((a * p + b).tolist())


def _all_pairs(p):
    a = torch.arange(p).repeat_interleave(p)
    return a, torch.arange(p).repeat(p)


# --------------------------------------------------------------------------------------------
# The hash
# --------------------------------------------------------------------------------------------


def _pair_hash_int(a: int, b: int, key: int) -> int:
    """Reference in Python's unbounded ints, masked to 32 bits."""
    return _fmix32_int(_fmix32_int(a ^ key) ^ b)


def test_hash_matches_unbounded_reference_at_the_extremes(gen):
    # inputs near 2^32 are where a naive int64 product x * 0x85EBCA6B would overflow
    edge = torch.tensor([0, 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1])
    rand = torch.randint(0, 2**32, (200,), generator=gen)
    a = torch.cat([edge.repeat_interleave(len(edge)), rand])
    b = torch.cat([edge.repeat(len(edge)), rand.flip(0)])
    key = seed_key(12345)
    got = pair_hash(a, b, key)
    want = torch.tensor([_pair_hash_int(x, y, key) for x, y in zip(a.tolist(), b.tolist())])
    assert torch.equal(got, want)
    assert int(got.min()) >= 0 and int(got.max()) < 2**32


def test_hash_accepts_int32_inputs_without_overflow():
    a = torch.tensor([2**31 - 1, 12345], dtype=torch.int32)
    assert torch.equal(pair_hash(a, a, 7), pair_hash(a.long(), a.long(), 7))


def test_seed_key_uses_all_64_bits_and_streams_differ():
    keys = {seed_key(0), seed_key(1), seed_key(1 << 32), seed_key(1 << 63), seed_key(0, 1), seed_key(0, 2)}
    assert len(keys) == 6


# --------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------


def test_enumerated_split_is_a_partition_and_full_batch_is_the_train_set():
    p = 37
    ds = ModularAddition(p, 0.3, seed=5)
    assert ds.enumerated and ds.n_train + ds.n_test == p * p
    a, b, c = ds.full_batch()
    assert a.dtype == b.dtype == c.dtype == torch.int64
    train = _keys(a, b, p)
    ta, tb, tc = ds.test_pairs()
    test = _keys(ta, tb, p)
    assert len(train) == ds.n_train == len(a) and len(test) == ds.n_test == len(ta)
    assert not train & test and len(train | test) == p * p
    # the train set is exactly the hash's members
    aa, bb = _all_pairs(p)
    assert train == _keys(aa[ds.is_train(aa, bb)], bb[ds.is_train(aa, bb)], p)
    assert torch.equal(c, (a + b) % p) and torch.equal(tc, (ta + tb) % p)
    # small enough: train_eval_pairs is the whole train set
    assert _keys(*ds.train_eval_pairs()[:2], p) == train


def test_split_is_reproducible_and_seed_dependent():
    one, two, other = (ModularAddition(53, 0.4, seed=s) for s in (3, 3, 4))
    for x, y in zip(one.full_batch() + one.test_pairs(), two.full_batch() + two.test_pairs()):
        assert torch.equal(x, y)
    assert _keys(*one.full_batch()[:2], 53) != _keys(*other.full_batch()[:2], 53)


@pytest.mark.parametrize("fraction", [0.05, 0.4, 0.9])
def test_realised_fraction_is_close_to_train_fraction(fraction):
    p = 211  # 44521 pairs: the binomial standard deviation of the fraction is <= 0.0024
    ds = ModularAddition(p, fraction, seed=11)
    sigma = math.sqrt(fraction * (1 - fraction) / p**2)
    assert abs(ds.n_train / p**2 - fraction) < 5 * sigma


def test_rows_and_classes_are_split_evenly():
    # no structure: every a, and every label c, gets about alpha of its p pairs
    p, fraction = 257, 0.5
    a, b, c = ModularAddition(p, fraction, seed=2).full_batch()
    for values in (a, c):
        counts = torch.bincount(values, minlength=p).double()
        assert abs(counts.mean() / p - fraction) < 0.01
        assert counts.std() / p < 2 * math.sqrt(fraction * (1 - fraction) / p)


def test_enumerated_and_hashed_paths_agree():
    p = 61
    small = ModularAddition(p, 0.4, seed=9)
    big = ModularAddition(p, 0.4, seed=9, enumerate_limit=p * p - 1, test_sample=500)
    assert small.enumerated and not big.enumerated
    a, b = _all_pairs(p)
    assert torch.equal(small.is_train(a, b), big.is_train(a, b))
    assert abs(big.n_train - small.n_train) < 5 * math.sqrt(p * p * 0.24)
    assert big.n_train + big.n_test == p * p


def test_the_hashed_train_count_is_the_expectation_rounded():
    """hash_fraction · P² = 2938880.6998 at P = 2049, 70 %: truncating it gave 2938880."""
    p = 2049
    ds = ModularAddition(p, 0.7, seed=0, enumerate_limit=p * p - 1, test_sample=50)
    assert ds.n_train == round(ds.hash_fraction * p * p) == 2938881 and ds.n_train + ds.n_test == p * p


def test_hashed_sample_train_gives_train_pairs_with_labels(gen):
    p = 4099  # P^2 > the default enumerate_limit
    ds = ModularAddition(p, 0.3, seed=1, test_sample=1000)
    assert not ds.enumerated
    with pytest.raises(RuntimeError, match="sample_train"):
        ds.full_batch()
    for batch in (1, 7, 4096):
        a, b, c = ds.sample_train(batch, generator=gen)
        assert a.shape == b.shape == c.shape == (batch,) and a.dtype == torch.int64
        assert bool(ds.is_train(a, b).all())
        assert torch.equal(c, (a + b) % p)
        assert int(a.min()) >= 0 and int(a.max()) < p and int(b.min()) >= 0 and int(b.max()) < p
    # 4096 uniform draws (with replacement) over ~5M train pairs: the repeats are ~Poisson with mean
    # 4096^2 / (2 n_train) ~ 1.7, so more than 15 (P < 1e-10) means the draws are not uniform
    assert 4096 - len(_keys(a, b, p)) <= 15
    assert abs(a.double().mean().item() / (p - 1) - 0.5) < 0.03


def test_sample_train_is_reproducible_with_a_generator():
    ds = ModularAddition(3001, 0.5, seed=1, test_sample=100)
    x = ds.sample_train(64, generator=torch.Generator().manual_seed(4))
    y = ds.sample_train(64, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_sample_train_shortfall_is_filled_with_the_fallback_train_pair(gen, monkeypatch):
    ds = ModularAddition(3001, 0.5, seed=1, test_sample=100)
    assert bool(ds.is_train(*map(torch.tensor, ds.fallback_pair)))
    monkeypatch.setattr(ds, "num_candidates", lambda batch: 8)  # force a shortfall: 8 candidates for 64
    a, b, c = ds.sample_train(64, generator=gen)
    assert a.shape == (64,) and bool(ds.is_train(a, b).all()) and torch.equal(c, (a + b) % 3001)
    fallback = (a == ds.fallback_pair[0]) & (b == ds.fallback_pair[1])
    assert int(fallback.sum()) >= 64 - 8


def test_num_candidates_bound():
    ds = ModularAddition(3001, 0.4, seed=0, test_sample=100)
    for batch in (1, 100, 8192):
        m = ds.num_candidates(batch)
        mu, b = m * ds.hash_fraction, batch
        assert (mu - b) ** 2 / (2 * mu) >= 64 * math.log(2) - 1e-9  # Chernoff exponent >= 64 bits
    assert ds.num_candidates(8192) < 1.15 * 8192 / 0.4


def test_enumerated_sample_train_draws_from_the_train_set(gen):
    ds = ModularAddition(23, 0.5, seed=0)
    train = _keys(*ds.full_batch()[:2], 23)
    a, b, c = ds.sample_train(5000, generator=gen)
    assert a.shape == (5000,) and _keys(a, b, 23) == train  # 5000 draws of ~265 cover them all
    assert torch.equal(c, (a + b) % 23)


def test_enumerate_limit_is_inclusive():
    """P^2 == enumerate_limit still enumerates (the documented P^2 <= enumerate_limit), one less samples."""
    p = 29
    assert ModularAddition(p, 0.5, seed=0, enumerate_limit=p * p).enumerated
    assert not ModularAddition(p, 0.5, seed=0, enumerate_limit=p * p - 1, test_sample=50).enumerated


def test_hashed_sample_train_reaches_every_a_and_b(gen):
    """Hashed batches draw a and b from all of [0, P): both ends of the range occur, for a and for b."""
    p = 31
    ds = ModularAddition(p, 0.5, seed=3, enumerate_limit=0, test_sample=50)
    a, b, _ = ds.sample_train(4000, generator=gen)  # P(a value is missing) < 31 * (1 - 1/31)^4000 ~ 1e-55
    assert set(a.tolist()) == set(range(p)) and set(b.tolist()) == set(range(p))


@pytest.mark.parametrize("enumerate_limit", [1 << 22, 0])
def test_eval_samples_are_fixed_distinct_and_on_the_right_side(enumerate_limit):
    p, n = 307, 2000  # 94249 pairs: both sides hold more than n, so both are samples
    ds = ModularAddition(p, 0.4, seed=21, enumerate_limit=enumerate_limit, test_sample=n)
    again = ModularAddition(p, 0.4, seed=21, enumerate_limit=enumerate_limit, test_sample=n)
    for pairs, pairs_again, member in ((ds.test_pairs(), again.test_pairs(), False),
                                       (ds.train_eval_pairs(), again.train_eval_pairs(), True)):
        a, b, c = pairs
        assert a.shape == (n,) and len(_keys(a, b, p)) == n  # no duplicates
        assert bool((ds.is_train(a, b) == member).all())
        assert torch.equal(c, (a + b) % p)
        assert all(torch.equal(x, y) for x, y in zip(pairs, pairs_again))
        # a uniform sample, not the smallest indices
        assert abs(a.double().mean().item() / (p - 1) - 0.5) < 0.05


def test_hashed_eval_sample_is_capped_when_a_side_is_tiny():
    p = 2053  # P^2 = 4.2M > 2^22, with ~420 test pairs expected at alpha = 0.9999
    ds = ModularAddition(p, 0.9999, seed=0, test_sample=65536)
    a, b, _ = ds.test_pairs()
    assert 0 < len(a) <= ds.n_test // 2 + 1 and len(_keys(a, b, p)) == len(a)
    assert not bool(ds.is_train(a, b).any())


def test_a_rare_side_gets_what_its_draws_are_expected_to_find(monkeypatch):
    """At train_fraction 1e-4 and P = 65521, 65536 train pairs took 2^28 draws (166 s) and then failed: a rare
    side gets max(_EVAL_MIN_PAIRS, fraction * _EVAL_DRAWS) pairs (both made small here for speed)."""
    import fastcyclic.data as data

    monkeypatch.setattr(data, "_EVAL_DRAWS", 1 << 16)
    monkeypatch.setattr(data, "_EVAL_MIN_PAIRS", 16)
    ds = ModularAddition(4099, 0.01, seed=0, test_sample=1000)  # 168k train pairs; 2^16 draws find ~655
    a, b, _ = ds.train_eval_pairs()
    assert len(a) == int(ds.hash_fraction * (1 << 16)) and len(_keys(a, b, 4099)) == len(a)
    assert bool(ds.is_train(a, b).all())
    assert len(ds.test_pairs()[0]) == 1000  # the common side keeps test_sample
    ds = ModularAddition(4099, 1e-4, seed=0, test_sample=1000)  # 2^16 draws expect 6.5: the floor of 16 holds
    assert len(ds.train_eval_pairs()[0]) == 16


@pytest.mark.parametrize("fraction, side", [(5e-6, "train"), (1 - 1e-6, "test")])
def test_a_side_too_rare_to_sample_is_refused_up_front(fraction, side):
    """Refused before drawing (the message comes from that check), with the usable range: the draws took minutes
    and then failed."""
    with pytest.raises(ValueError, match=f"{side} pairs are a .* share of the pairs, too rare to sample 1024 .* "
                                         "choose a train_fraction between 7.6e-06 and 1 - 7.6e-06"):
        ModularAddition(65521, fraction, seed=0)


def test_first_distinct_keeps_draw_order():
    assert _first_distinct(torch.tensor([5, 3, 5, 1, 3, 9])).tolist() == [5, 3, 1, 9]


@pytest.mark.parametrize("kwargs, match", [
    (dict(p=1, train_fraction=0.5), "p must"),
    (dict(p=MAX_P + 1, train_fraction=0.5), "p must"),
    (dict(p=7.0, train_fraction=0.5), "p must"),
    (dict(p=7, train_fraction=0.0), "train_fraction"),
    (dict(p=7, train_fraction=1.0), "train_fraction"),
    (dict(p=7, train_fraction=float("nan")), "train_fraction"),
    (dict(p=7, train_fraction=1e-12), "32-bit"),
    (dict(p=2, train_fraction=1e-9), "no train pairs"),
    # hashed (P^2 > enumerate_limit) with no test pair expected: refused at once (it drew 2^28 pairs first, 74 s)
    (dict(p=3000, train_fraction=1 - 1e-9), "leaves 0.0084 expected test pairs"),
    (dict(p=7, train_fraction=0.5, test_sample=0), "test_sample"),
    (dict(p=7, train_fraction=0.5, enumerate_limit=-1), "enumerate_limit must be an integer >= 0, got -1"),
    (dict(p=7, train_fraction=0.5, enumerate_limit="x"), "enumerate_limit must be an integer >= 0, got 'x'"),
    (dict(p=True, train_fraction=0.5), "p must"),
    (dict(p=np.bool_(True), train_fraction=0.5), "p must"),
    (dict(p=7, train_fraction="0.5"), "train_fraction must be a number"),  # float("0.5") took it
    (dict(p=7, train_fraction=True), "train_fraction must be a number"),
])
def test_bad_data_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModularAddition(seed=0, **kwargs)


@pytest.mark.parametrize("seed", [1.9, "1", True])
def test_a_seed_that_is_not_an_integer_is_refused(seed):
    """int(1.9) gave seed 1's split without a word."""
    with pytest.raises(ValueError, match="seed must be an integer"):
        ModularAddition(7, 0.5, seed=seed)


def test_numpy_integers_are_integers():
    """A sweep written with np.arange hands over np.int64: accepted, and stored as Python ints."""
    ds = ModularAddition(np.int64(7), 0.5, seed=0, test_sample=np.int32(5))
    assert type(ds.p) is int and type(ds.test_sample) is int
    assert ds.sample_train(np.int64(4))[0].shape == (4,)
    model = CyclicModel(np.int64(7), np.uint8(4), model="embed-mlp", hidden=np.int16(8))
    assert (type(model.p), type(model.d), type(model.hidden)) == (int, int, int)
    # and NumPy floats and ints are numbers (init_scale=np.float32(0.5) was refused as not finite)
    for scale in (np.float32(0.5), np.int64(1)):
        ours, plain = (CyclicModel(7, 4, init_scale=s, generator=torch.Generator().manual_seed(0)) for s in
                       (scale, float(scale)))
        assert torch.equal(ours.W, plain.W) and torch.equal(ours.E, plain.E)


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        ModularAddition(7, 0.5, seed=0).sample_train(0)


@pytest.mark.cuda
def test_cuda_hash_and_graph_capturable_sampling():
    p = 65521
    cpu = ModularAddition(p, 0.4, seed=3, test_sample=1000)
    ds = ModularAddition(p, 0.4, seed=3, device="cuda", test_sample=1000)
    # same split and same evaluation sets on both devices
    a = torch.randint(0, p, (1 << 20,))
    b = torch.randint(0, p, (1 << 20,))
    assert torch.equal(pair_hash(a, b, ds.key), pair_hash(a.cuda(), b.cuda(), ds.key).cpu())
    assert all(torch.equal(x, y.cpu()) for x, y in zip(cpu.test_pairs(), ds.test_pairs()))
    # no host sync, and capturable
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        ds.sample_train(8192, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ds.sample_train(8192)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ds.sample_train(8192)
    graph.replay()
    first = [t.clone() for t in out]
    graph.replay()
    assert not torch.equal(first[0], out[0])  # fresh randomness on each replay
    for a, b, c in (first, out):
        assert bool(ds.is_train(a, b).all()) and torch.equal(c, (a + b) % p)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

COMBOS = list(itertools.product(["embed-sum", "embed-mlp"], [False, True], [False, True]))


def _model(model, factorised, bias, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    if model == "embed-mlp":
        kw.setdefault("hidden", 12)
    return CyclicModel(11, 5, model=model, factorised=factorised, bias=bias, **kw)


def _eager_features(m, a, b):
    act = {"relu": torch.relu, "square": lambda x: x**2, "gelu": F.gelu}[m.activation]
    E = m.embedding
    if m.model == "embed-sum":
        h = act(E[a] + E[b])
    else:
        d = m.d
        h = act(E[a] @ m.U[:, :d].T + E[b] @ m.U[:, d:].T)
    return h @ m.readout.T if m.factorised else h


@pytest.mark.parametrize("model, factorised, bias", COMBOS)
def test_shapes(model, factorised, bias):
    m = _model(model, factorised, bias)
    width = 5 if model == "embed-sum" else 12
    out_dim = 5 if factorised else width
    assert m.E.shape == (11, 5) and m.W.shape == (11, out_dim) and m.out_dim == out_dim
    assert (m.U is None) == (model == "embed-sum")
    assert m.U is None or m.U.shape == (12, 10)
    assert (m.readout is None) != factorised
    assert m.readout is None or m.readout.shape == (5, width)
    assert (m.bias is None) != bias
    a = torch.tensor([0, 3, 10])
    assert m(a, a).shape == (3, out_dim) and m.logits(a, a).shape == (3, 11)
    assert m(a, a, (a + a) % 11).shape == ()
    assert not m.W.requires_grad and not m.E.requires_grad


@pytest.mark.parametrize("activation", ["relu", "square", "gelu"])
@pytest.mark.parametrize("model, factorised, bias", COMBOS)
def test_features_and_loss_match_eager_float64(model, factorised, bias, activation, gen):
    m = _model(model, factorised, bias, activation=activation, dtype=torch.float64)
    if bias:
        with torch.no_grad():
            m.bias.normal_(generator=gen)
    a, b = torch.randint(0, 11, (40,), generator=gen), torch.randint(0, 11, (40,), generator=gen)
    y = (a + b) % 11
    h = _eager_features(m, a, b)
    torch.testing.assert_close(m.features(a, b), h, rtol=1e-12, atol=1e-12)
    z = h @ m.weight.T + (m.bias if bias else 0)
    torch.testing.assert_close(m(a, b, y, backend="torch"), F.cross_entropy(z, y), rtol=1e-10, atol=1e-12)
    loss, lse, argmax = m.stats(a, b, y, backend="torch")
    torch.testing.assert_close(loss, F.cross_entropy(z, y, reduction="none"), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(z, 1), rtol=1e-10, atol=1e-12)
    assert torch.equal(argmax, z.argmax(1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float32_loss_is_close_to_float64(backend, gen):
    m = _model("embed-mlp", True, True, activation="square")
    with torch.no_grad():
        m.bias.normal_(generator=gen)
    a, b = torch.randint(0, 11, (16,), generator=gen), torch.randint(0, 11, (16,), generator=gen)
    y = (a + b) % 11
    ref = m.double()
    z = F.linear(_eager_features(ref, a, b), ref.weight, ref.bias)
    want = F.cross_entropy(z, y)
    # the Triton kernels take CUDA tensors where there is a GPU (the interpreter's CPU tensors otherwise)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    got = m.float().to(device)(a.to(device), b.to(device), y.to(device), backend=backend).cpu()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model, factorised, bias", COMBOS)
def test_gradient_reaches_every_parameter(model, factorised, bias, gen):
    m = _model(model, factorised, bias, activation="gelu")
    a, b = torch.randint(0, 11, (32,), generator=gen), torch.randint(0, 11, (32,), generator=gen)
    m(a, b, (a + b) % 11, backend="torch").backward()
    names = {name for name, _ in m.named_parameters()}
    optional = {"U": model == "embed-mlp", "readout": factorised, "bias": bias}
    expected = {"embedding", "weight"} | {name for name, present in optional.items() if present}
    assert names == expected
    for name, param in m.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name


def test_initialisation_is_reproducible_and_scaled():
    def make(seed, **kw):
        return CyclicModel(101, 64, model="embed-mlp", hidden=256, factorised=True,
                           generator=torch.Generator().manual_seed(seed), **kw)

    one, two, other = make(1), make(1), make(2)
    assert all(torch.equal(x, y) for x, y in zip(one.parameters(), two.parameters()))
    assert not torch.equal(one.embedding, other.embedding)
    assert abs(one.E.std().item() - 1.0) < 0.05
    assert abs(one.U.std().item() * math.sqrt(128) - 1.0) < 0.05
    assert abs(one.readout.std().item() * math.sqrt(256) - 1.0) < 0.05
    assert abs(one.W.std().item() * math.sqrt(64) - 1.0) < 0.05
    scaled = make(1, init_scale=0.5, dtype=torch.float64)
    assert scaled.W.dtype == torch.float64
    torch.testing.assert_close(scaled.W, 0.5 * one.W.double())


@pytest.mark.parametrize("kwargs, match", [
    (dict(p=1, d=4), "p must"),
    (dict(p=7, d=0), "d must"),
    (dict(p=7.5, d=4), "p must"),
    (dict(p=7, d=4, model="mlp"), "model must"),
    (dict(p=7, d=4, activation="tanh"), "activation must"),
    (dict(p=7, d=4, model="embed-mlp", hidden=0), "hidden must"),
    (dict(p=7, d=4, hidden=8), "hidden=8"),
    (dict(p=7, d=4, init_scale=-1.0), "init_scale"),
    (dict(p=7, d=4, init_scale=float("inf")), "init_scale"),
    (dict(p=7, d=4, init_scale=True), "init_scale"),
    (dict(p=7, d=4, dtype=torch.int64), "dtype"),
])
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CyclicModel(**kwargs)


@pytest.mark.parametrize("a,b,error,match", [
    (torch.tensor([1, 2]), torch.tensor([0, 1, 2]), ValueError,
     r"a and b must have shapes that broadcast .* got \(2,\) and \(3,\)"),
    (torch.tensor([1.0]), torch.tensor([0]), TypeError, "a must be an integer tensor of token ids, got torch.float32"),
    ([1], torch.tensor([0]), TypeError, "a must be an integer tensor .* got list"),
], ids=["two-lengths", "float", "list"])
def test_token_tensors_of_another_shape_or_dtype_are_refused(a, b, error, match):
    """Float tokens gave a label of 5.5; lengths that do not broadcast failed deep inside torch."""
    for call in (CyclicModel(7, 4).features, ModularAddition(7, 0.5, 0).label, ModularAddition(7, 0.5, 0).is_train):
        with pytest.raises(error, match=match):
            call(a, b)


def test_token_tensors_that_broadcast_give_the_table_of_pairs():
    p = 7
    a = torch.arange(p)
    data, model = ModularAddition(p, 0.5, 0), CyclicModel(p, 4)
    assert torch.equal(data.label(a[:, None], a[None, :]), (a[:, None] + a[None, :]) % p)
    assert data.is_train(a[:, None], a[None, :]).shape == (p, p)
    assert torch.equal(model.features(a, torch.tensor(3)), model.features(a, torch.full((p,), 3)))
    mlp = CyclicModel(p, 4, model="embed-mlp")
    table = mlp.features(a[:, None], a[None, :])
    assert table.shape == (p, p, mlp.features(a, a).shape[1])
    torch.testing.assert_close(table[2, 5], mlp.features(a[2:3], a[5:6])[0])  # (another matmul shape: rounding)


@pytest.mark.parametrize("model", ["embed-sum", "embed-mlp"])
def test_tiny_full_batch_run_fits_the_train_set(model):
    torch.manual_seed(0)
    ds = ModularAddition(7, 0.6, seed=0)
    m = CyclicModel(7, 16, model=model, activation="relu", generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    a, b, c = ds.full_batch()
    for step in range(400):
        opt.zero_grad()
        m(a, b, c, backend="torch").backward()
        opt.step()
        _, _, argmax = m.stats(a, b, c, backend="torch")
        if bool((argmax == c).all()):
            break
    assert bool((argmax == c).all()), f"train accuracy {(argmax == c).double().mean().item():.3f} after 400 steps"


def test_bias_starts_at_zero_and_enters_the_logits(gen):
    """The classifier bias is initialised to 0, and logits() adds it (the eager analysis path)."""
    m = _model("embed-sum", False, True, dtype=torch.float64)
    assert torch.equal(m.bias, torch.zeros(11, dtype=torch.float64))
    with torch.no_grad():
        m.bias.normal_(generator=gen)
    a, b = torch.randint(0, 11, (8,), generator=gen), torch.randint(0, 11, (8,), generator=gen)
    torch.testing.assert_close(m.logits(a, b), m.features(a, b) @ m.weight.T + m.bias, rtol=1e-12, atol=1e-12)


def test_membership_is_strictly_below_the_threshold():
    """A pair whose hash equals the threshold is a test pair: membership is hash < threshold, so the exact
    membership probability is threshold / 2^32 (hash_fraction)."""
    p, seed = 11, 4
    key = seed_key(seed)
    a, b = torch.tensor([3]), torch.tensor([5])
    h = int(pair_hash(a, b, key))
    ds = ModularAddition(p, h / 2**32, seed=seed)  # threshold = round(h / 2^32 · 2^32) = h, exactly
    assert ds.threshold == h
    assert not bool(ds.is_train(a, b))
    assert int(pair_hash(a, b, key)) < ModularAddition(p, (h + 1) / 2**32, seed=seed).threshold


def test_hashed_eval_samples_reach_every_a_and_b():
    p = 61  # 930 pairs a side: P(some a or b missing from a uniform sample) ~ 1e-5 (the sample is fixed by the seed)
    ds = ModularAddition(p, 0.5, seed=3, enumerate_limit=0, test_sample=2000)
    for a, b, _ in (ds.test_pairs(), ds.train_eval_pairs()):
        assert len(a) == 930
        assert set(a.tolist()) == set(range(p)) and set(b.tolist()) == set(range(p))


def test_eval_sets_are_drawn_from_their_own_streams():
    """The two evaluation samples use distinct streams of the seed (module constants), so they are independent
    draws: the test sample is what stream _STREAM_TEST alone gives."""
    p, n, seed = 307, 2000, 21
    ds = ModularAddition(p, 0.4, seed=seed, test_sample=n)  # enumerated
    aa = torch.arange(p).repeat_interleave(p)
    bb = torch.arange(p).repeat(p)
    test_index = (aa * p + bb)[~ds.is_train(aa, bb)]
    gen = torch.Generator().manual_seed(seed_key(seed, _STREAM_TEST))
    pick = torch.randperm(test_index.numel(), generator=gen)[:n]
    expected = test_index[pick.sort().values]
    ta, tb, _ = ds.test_pairs()
    assert torch.equal(ta * p + tb, expected)
    # hashed: the test sample is stream _STREAM_TEST's draw, not a by-product of the train sample's draws
    hashed = ModularAddition(p, 0.4, seed=seed, test_sample=n, enumerate_limit=0)
    drawn = hashed._pairs(hashed._sample_distinct(False, _STREAM_TEST))
    assert all(torch.equal(x, y) for x, y in zip(hashed.test_pairs(), drawn))


def test_initialisation_draw_order_is_e_u_v_w():
    """The documented draw order (E, U, V, W from one generator): a seed's parameters are fixed across versions."""
    gen = torch.Generator().manual_seed(7)
    E = torch.randn((13, 4), generator=gen)
    U = torch.randn((16, 8), generator=gen) * (1.0 / math.sqrt(8))
    V = torch.randn((4, 16), generator=gen) * (1.0 / math.sqrt(16))
    W = torch.randn((13, 4), generator=gen) * (1.0 / math.sqrt(4))
    m = CyclicModel(13, 4, model="embed-mlp", hidden=16, factorised=True, generator=torch.Generator().manual_seed(7))
    for got, want in ((m.embedding, E), (m.U, U), (m.readout, V), (m.weight, W)):
        assert torch.equal(got.detach(), want)


def test_a_batch_of_exactly_the_train_set_is_allowed():
    """check_batch_size refuses more pairs than the train set, not as many (the sweep's own check had that bug)."""
    for ds in (ModularAddition(31, 0.5, 0), ModularAddition(2053, 0.1, 0, test_sample=1024)):
        ds.check_batch_size(ds.n_train)
        with pytest.raises(ValueError, match="larger than the train set"):
            ds.check_batch_size(ds.n_train + 1)
