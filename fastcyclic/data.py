"""Modular-addition data: pairs (a, b) in Z/P x Z/P labelled c = (a + b) mod P.

The train/test split is decided per pair by a 32-bit hash of (a, b, seed): a pair is a train pair iff
``pair_hash(a, b, key) < threshold`` with ``threshold = round(train_fraction * 2**32)``.  Membership is
therefore disjoint and reproducible by construction, costs nothing to store, and gives the same answer
on every device, which is what lets large P avoid materialising the P^2 pairs:

- P^2 <= enumerate_limit: every pair is hashed once and the train pairs are kept on the device
  (exact ``n_train``; ``full_batch()`` is the whole train set).
- otherwise: batches are drawn by rejection sampling on the device (``sample_train``: fixed shapes, no
  host sync, capturable in a CUDA graph), and the evaluation sets are fixed samples drawn on the CPU
  from a seeded generator.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
# the largest P for which the pair index a * P + b (used to deduplicate samples) fits in int64
MAX_P = 1 << 31
# all P^2 pairs are listed (and full batches possible) up to this many: 2^22 pairs, P <= 2048
ENUMERATE_LIMIT = 1 << 22

# MurmurHash3's 32-bit finaliser (fmix32): a well-studied bijection of [0, 2^32) with full avalanche
_FMIX_C1 = 0x85EBCA6B
_FMIX_C2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9
# sample_train draws enough candidates that a batch falls short with probability <= 2^-64; see
# ModularAddition.num_candidates
_TAIL_BITS = 64
# the candidates one hashed batch may draw, on any device: two int64 tokens, a hash and a running count each, 4 GiB
# at 2^27 before the hash's temporaries (batch 8192 at train_fraction 1e-5 would draw 9e8 every step)
MAX_BATCH_DRAW = 1 << 27
# rejection sampling of the evaluation sets on the CPU (~0.4 us per candidate on one core): candidates per round,
# and in total. A side holding a small fraction of the pairs gets fewer than test_sample pairs, as many as
# _EVAL_DRAWS candidates are expected to hold but at least _EVAL_MIN_PAIRS, so that finding them takes seconds
# (65536 train pairs at train_fraction 1e-4 would take 6.5e8 draws, minutes), under a minute where the floor
# applies (train_fraction below 6.1e-5: up to 2^27 draws); a side too rare to give _EVAL_MIN_PAIRS in half of
# _EVAL_BUDGET draws is refused up front.
_EVAL_CHUNK = 1 << 22
_EVAL_DRAWS = 1 << 24
_EVAL_MIN_PAIRS = 1024
_EVAL_BUDGET = 1 << 28
# streams of the seeded CPU generators (distinct so the two evaluation sets are independent draws)
_STREAM_TEST, _STREAM_TRAIN = 1, 2

Pairs = tuple[Tensor, Tensor, Tensor]


def is_integer(value) -> bool:
    """A Python or NumPy integer (a sweep over np.arange gives np.int64), never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# The hash: exact 32-bit arithmetic in int64 tensors, never overflowing
# --------------------------------------------------------------------------------------------


def check_pair_tokens(a, b) -> None:
    """a and b are integer tensors of token ids whose shapes broadcast (a[:, None] and a[None, :] give the
    table of all pairs).  Their values, which must lie in [0, p), are not checked: reading them would sync the
    device in every step."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of token ids, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(f"a and b must have shapes that broadcast (one pair per entry), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}") from None


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2^32`` for x in [0, 2^32) and a constant c < 2^32, without int64 overflow.

    x * c can reach 2^64, so x is split into 16-bit halves: x_lo * c < 2^48, and only the low 16 bits
    of x_hi * c (< 2^48) survive the shift by 16.  Every intermediate stays below 2^49."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & MASK32


def _fmix32(x: Tensor) -> Tensor:
    """MurmurHash3's finaliser on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _FMIX_C1)
    x = x ^ (x >> 13)
    x = _mul32(x, _FMIX_C2)
    return x ^ (x >> 16)


def _fmix32_int(x: int) -> int:
    """The same finaliser on a Python int (for seeds, on the host)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _FMIX_C1) & MASK32
    x ^= x >> 13
    x = (x * _FMIX_C2) & MASK32
    return x ^ (x >> 16)


def seed_key(seed: int, stream: int = 0) -> int:
    """A 32-bit key from a seed (taken mod 2^64) and a stream number; stream 0 keys the split."""
    seed &= (1 << 64) - 1
    key = _fmix32_int((seed & MASK32) ^ _GOLDEN)
    key = _fmix32_int(key ^ (seed >> 32))
    return _fmix32_int(key ^ _fmix32_int(stream + _GOLDEN)) if stream else key


def pair_hash(a: Tensor, b: Tensor, key: int) -> Tensor:
    """32-bit hash of the pairs (a, b) under ``key``, as int64 in [0, 2^32).

    ``fmix32(fmix32(key ^ a) ^ b)``: each round is a bijection with full avalanche, so for a fixed key
    the hash behaves like a random function of the pair.  Only &, ^, >>, + and products below 2^49 on
    int64: bit-identical on CPU and CUDA.  Requires 0 <= a, b < 2^32."""
    a = torch.as_tensor(a).to(torch.int64)
    b = torch.as_tensor(b, device=a.device).to(torch.int64)
    return _fmix32(_fmix32(a ^ (key & MASK32)) ^ b)


# --------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------


class ModularAddition:
    """Train/test split of (a + b) mod P by a hash of (a, b, seed), with device-side batch sampling.

    Args:
        p: the modulus, 2 <= p <= 2^31 (K = P classes).
        train_fraction: alpha in (0, 1), the probability that a pair is a train pair.
        seed: keys the split and the evaluation samples (any int; taken mod 2^64).
        device: where batches and evaluation sets live.
        enumerate_limit: enumerate all pairs when P^2 <= this.
        test_sample: size of the fixed evaluation samples (``test_pairs``, ``train_eval_pairs``): an
            enumerated side with more pairs than this is sampled; a hashed side always is, with
            min(test_sample, half its expected size, max(1024, its fraction of the pairs * 2^24)) pairs
            (the last bound bites only for a train_fraction within ~0.004 of 0 or 1: it keeps the
            search to ~2^24 random draws).

    Attributes: ``p``, ``train_fraction``, ``seed``, ``device``, ``enumerated``, ``threshold`` (the
    hash cut-off), ``hash_fraction`` (= threshold / 2^32, the exact membership probability),
    ``n_pairs`` (P^2), ``n_train`` and ``n_test`` (exact when enumerated, else the expectation
    ``round(hash_fraction * P^2)`` and its complement, since counting needs a pass over P^2 pairs).
    """

    def __init__(self, p: int, train_fraction: float, seed: int, device: Union[str, torch.device] = "cpu", *,
                 enumerate_limit: int = ENUMERATE_LIMIT, test_sample: int = 65536):
        if not is_integer(p) or not 2 <= p <= MAX_P:
            raise ValueError(f"p must be an integer in [2, 2^31], got {p!r}")
        if isinstance(train_fraction, bool) or not isinstance(train_fraction, numbers.Real) \
                or not 0.0 < float(train_fraction) < 1.0:  # NaN fails too
            raise ValueError(f"train_fraction must be a number in (0, 1), got {train_fraction!r}")
        if not is_integer(seed):  # int(1.9) would quietly give seed 1's split
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not is_integer(test_sample) or test_sample < 1:
            raise ValueError(f"test_sample must be a positive integer, got {test_sample!r}")
        if not is_integer(enumerate_limit) or enumerate_limit < 0:
            raise ValueError(f"enumerate_limit must be an integer >= 0, got {enumerate_limit!r}")
        p, test_sample = int(p), int(test_sample)
        self.p = p
        self.train_fraction = float(train_fraction)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.test_sample = test_sample
        self.key = seed_key(self.seed)
        self.threshold = round(self.train_fraction * 2**32)
        if not 1 <= self.threshold < 2**32:
            raise ValueError(f"train_fraction={train_fraction!r} is within 2^-33 of 0 or 1, which a 32-bit "
                             "hash cannot resolve")
        self.hash_fraction = hashed_split(p, self.train_fraction)[0]
        self.n_pairs = p * p
        self.enumerated = self.n_pairs <= enumerate_limit
        if self.enumerated:
            self._enumerate()
        else:
            self._sample_eval_sets()

    def __repr__(self) -> str:
        how = "enumerated" if self.enumerated else "hashed"
        return (f"ModularAddition(p={self.p}, train_fraction={self.train_fraction}, seed={self.seed}, "
                f"device={self.device}, {how}, n_train={self.n_train}, n_test={self.n_test})")

    # ---- membership and labels ----

    def is_train(self, a: Tensor, b: Tensor) -> Tensor:
        """Bool tensor: which pairs (a, b) are train pairs.  a, b must lie in [0, p) (not checked:
        a check would sync the host)."""
        check_pair_tokens(a, b)
        return pair_hash(a, b, self.key) < self.threshold

    def label(self, a: Tensor, b: Tensor) -> Tensor:
        """The class of each pair, (a + b) mod p (a, b in [0, p): not checked, as in is_train)."""
        check_pair_tokens(a, b)
        return (a + b) % self.p

    # ---- training batches ----

    def num_candidates(self, batch_size: int) -> int:
        """Candidates ``sample_train`` draws in the hashed case to fill ``batch_size`` train pairs
        (``candidates_for``)."""
        return candidates_for(batch_size, self.hash_fraction)

    def check_batch_size(self, batch_size: int) -> None:
        """ValueError for a batch ``sample_train`` cannot give: more pairs than the train set (in the hashed
        case, than its expected size), or more than MAX_BATCH_DRAW candidates to draw for it."""
        about = "" if self.enumerated else "about "
        if batch_size > self.n_train:
            raise ValueError(f"batch_size={batch_size} is larger than the train set ({about}{self.n_train} pairs)")
        if not self.enumerated and self.num_candidates(batch_size) > MAX_BATCH_DRAW:
            raise ValueError(f"batch_size={batch_size} at train_fraction={self.train_fraction:g} draws "
                             f"{self.num_candidates(batch_size):.3g} candidate pairs per batch (more than "
                             f"{MAX_BATCH_DRAW:.3g}, over 4 GiB); use a smaller batch or a larger train_fraction")

    def sample_train(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Pairs:
        """``batch_size`` train pairs (a, b, c), drawn uniformly with replacement, on ``self.device``.

        Fixed output shapes and no host synchronisation, so the call can be captured in a CUDA graph
        (the randomness is ``torch.randint`` with ``generator``, which must live on ``self.device``).

        Hashed case: draw ``num_candidates(batch_size)`` uniform pairs, and take the first
        ``batch_size`` train pairs among them (a uniform draw from all pairs, kept iff it is a train
        pair, is a uniform train pair).  With probability <= 2^-64 per call there are fewer than
        ``batch_size`` of them; the missing rows are then a fixed train pair found at construction, so
        a batch never holds a test pair."""
        if not is_integer(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)
        if self.enumerated:
            idx = torch.randint(0, self.n_train, (batch_size,), device=self.device, generator=generator)
            return self._train_a[idx], self._train_b[idx], self._train_c[idx]
        m = self.num_candidates(batch_size)
        a = torch.randint(0, self.p, (m,), device=self.device, generator=generator)
        b = torch.randint(0, self.p, (m,), device=self.device, generator=generator)
        # the j-th train candidate (j = 1..B) is the first index where the running count reaches j;
        # searchsorted finds it with fixed shapes (no nonzero(), no boolean indexing)
        count = torch.cumsum(self.is_train(a, b), dim=0)
        rank = torch.arange(1, batch_size + 1, device=self.device)
        idx = torch.searchsorted(count, rank)
        found = idx < m
        idx = idx.clamp_max(m - 1)
        fa, fb = self.fallback_pair
        a = torch.where(found, a[idx], fa)
        b = torch.where(found, b[idx], fb)
        return a, b, self.label(a, b)

    def full_batch(self) -> Pairs:
        """All train pairs (a, b, c) in lexicographic order; only when the pairs were enumerated."""
        if not self.enumerated:
            raise RuntimeError(f"full_batch() needs the enumerated split, but P^2 = {self.n_pairs} exceeds "
                               "enumerate_limit; sample batches with sample_train()")
        return self._train_a, self._train_b, self._train_c

    # ---- evaluation sets ----

    def test_pairs(self) -> Pairs:
        """The held-out pairs (a, b, c) to measure test accuracy on: when the pairs were enumerated, all of
        them if there are at most ``test_sample``, else a fixed sample of that many distinct ones; when hashed,
        a fixed sample of min(test_sample, half the expected test pairs) distinct ones.  The same on every
        device."""
        return self._test

    def train_eval_pairs(self) -> Pairs:
        """Train pairs (a, b, c) to measure train accuracy on, chosen like ``test_pairs``."""
        return self._train_eval

    # ---- construction ----

    def _enumerate(self) -> None:
        """Hash every pair once (on the CPU, a block of rows at a time) and keep the train pairs."""
        p = self.p
        rows = max(1, (1 << 20) // p)
        train, test = [], []
        for a0 in range(0, p, rows):
            a1 = min(p, a0 + rows)
            a = torch.arange(a0, a1).repeat_interleave(p)
            b = torch.arange(p).repeat(a1 - a0)
            index = a * p + b
            member = self.is_train(a, b)
            train.append(index[member])
            test.append(index[~member])
        train, test = torch.cat(train), torch.cat(test)
        if train.numel() == 0 or test.numel() == 0:
            side = "train" if train.numel() == 0 else "test"
            raise ValueError(f"p={p} with train_fraction={self.train_fraction} and seed={self.seed} leaves no "
                             f"{side} pairs among the {self.n_pairs}")
        self.n_train, self.n_test = train.numel(), test.numel()
        self.fallback_pair = (int(train[0]) // p, int(train[0]) % p)
        self._train_a, self._train_b, self._train_c = self._pairs(train)
        self._train_eval = self._pairs(self._subset(train, _STREAM_TRAIN))
        self._test = self._pairs(self._subset(test, _STREAM_TEST))

    def _subset(self, index: Tensor, stream: int) -> Tensor:
        """All of ``index`` if it has at most test_sample entries, else a fixed random subset."""
        if index.numel() <= self.test_sample:
            return index
        gen = torch.Generator().manual_seed(seed_key(self.seed, stream))
        pick = torch.randperm(index.numel(), generator=gen)[:self.test_sample]
        return index[pick.sort().values]

    def _sample_eval_sets(self) -> None:
        """Hashed case: fixed evaluation samples drawn on the CPU, and the fallback train pair."""
        self.n_train = hashed_split(self.p, self.train_fraction)[1]
        self.n_test = self.n_pairs - self.n_train
        train = self._sample_distinct(True, _STREAM_TRAIN)
        test = self._sample_distinct(False, _STREAM_TEST)
        # a known train pair for sample_train's (astronomically rare) shortfall
        self.fallback_pair = (int(train[0]) // self.p, int(train[0]) % self.p)
        self._train_eval = self._pairs(train)
        self._test = self._pairs(test)

    def _sample_distinct(self, want_train: bool, stream: int) -> Tensor:
        """Pair indices a * p + b of distinct pairs on one side of the split, sorted, drawn uniformly
        with a seeded CPU generator.

        Size: test_sample, capped at half the expected number of pairs on that side so that duplicate
        draws cannot stall the loop (the cap only bites when P^2 barely exceeds enumerate_limit and
        train_fraction is near 0 or 1), and at what _EVAL_DRAWS draws are expected to find (at least
        _EVAL_MIN_PAIRS) so that a rare side takes seconds (under a minute at the floor), not minutes."""
        fraction = self.hash_fraction if want_train else 1.0 - self.hash_fraction
        side_name = "train" if want_train else "test"
        if fraction * self.n_pairs < 1:  # drawing would spend the whole budget (minutes) to find nothing
            raise ValueError(f"train_fraction={self.train_fraction} leaves {fraction * self.n_pairs:.2g} expected "
                             f"{side_name} pairs of p^2 = {self.n_pairs}: choose a less extreme train_fraction")
        want = max(1, min(self.test_sample, int(fraction * self.n_pairs) // 2,
                          max(_EVAL_MIN_PAIRS, int(fraction * _EVAL_DRAWS))))
        if want / fraction > _EVAL_BUDGET / 2:  # refused now, not after minutes of drawing and likely failing
            rarest = 2 * _EVAL_MIN_PAIRS / _EVAL_BUDGET
            raise ValueError(f"train_fraction={self.train_fraction} at p={self.p}: {side_name} pairs are a "
                             f"{fraction:.2g} share of the pairs, too rare to sample {want} of them for the "
                             f"{side_name} accuracy (about {want / fraction:.2g} random draws); choose a "
                             f"train_fraction between {rarest:.2g} and 1 - {rarest:.2g}")
        gen = torch.Generator().manual_seed(seed_key(self.seed, stream))
        kept = torch.empty(0, dtype=torch.int64)
        drawn = 0
        while kept.numel() < want:
            if drawn >= _EVAL_BUDGET:
                raise ValueError(f"found only {kept.numel()} of {want} {side_name} pairs in {drawn} draws: "
                                 f"train_fraction={self.train_fraction} is too extreme for p={self.p}")
            chunk = min(_EVAL_CHUNK, math.ceil(1.5 * (want - kept.numel()) / fraction) + 1024)
            drawn += chunk
            a = torch.randint(0, self.p, (chunk,), generator=gen)
            b = torch.randint(0, self.p, (chunk,), generator=gen)
            side = self.is_train(a, b) == want_train
            kept = _first_distinct(torch.cat([kept, (a * self.p + b)[side]]))
        return kept[:want].sort().values

    def _pairs(self, index: Tensor) -> Pairs:
        """(a, b, c) on the device from pair indices a * p + b."""
        a, b = index // self.p, index % self.p
        return a.to(self.device), b.to(self.device), self.label(a, b).to(self.device)


def hashed_split(p: int, train_fraction: float) -> tuple[float, int]:
    """The hashed split's exact membership probability (its 32-bit threshold / 2^32) and expected train pairs
    (what ModularAddition takes as n_train there; checks made without building one use it too)."""
    fraction = round(train_fraction * 2**32) / 2**32
    return fraction, round(fraction * p * p)


def candidates_for(batch_size: int, fraction: float) -> int:
    """Uniform pairs to draw so that at least ``batch_size`` of them fall in a side holding ``fraction`` of all
    pairs, but with probability <= 2^-64.

    The number X of such pairs among M candidates is Binomial(M, alpha).  Chernoff's lower tail
    P(X <= (1 - delta) mu) <= exp(-delta^2 mu / 2), with mu = M alpha and (1 - delta) mu = B, is
    <= 2^-64 once (mu - B)^2 >= 128 ln 2 * mu, i.e. sqrt(mu) >= (s + sqrt(s^2 + 4B)) / 2 with
    s^2 = 128 ln 2.  For B = 8192 that is ~11 % more than B / alpha; for B = 1, ~91 / alpha."""
    s2 = 2 * _TAIL_BITS * math.log(2)
    root = (math.sqrt(s2) + math.sqrt(s2 + 4 * batch_size)) / 2
    return math.ceil(root * root / fraction)


def _first_distinct(values: Tensor) -> Tensor:
    """The distinct entries of ``values`` in order of first occurrence (so a prefix of the result is a
    uniform sample of distinct pairs; sorted unique values would favour small indices)."""
    unique, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((unique.numel(),), values.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(values.numel()), reduce="amin")
    return unique[first.argsort()]
