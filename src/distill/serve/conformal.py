"""Finite-sample coverage bounds for routers (split conformal, calibration-conditional).

A router answers with the student when its scores pass cuts set at order statistics of n validation scores. For
exchangeable inputs, the mass a new input has below the j-th smallest of n scores is stochastically at most
U_(j) ~ Beta(j, n-j+1) (equal for continuous scores). Its 1-delta quantile is the one-sided Clopper-Pearson
upper limit for j-1 of n, so a cut there promises, with probability >= 1-delta over the validation draw, that at
most that mass is routed (Vovk 2012, "Conditional validity of inductive conformal predictors", ACML; the Beta
law in Angelopoulos & Bates 2021, "A Gentle Introduction to Conformal Prediction", arXiv 2107.07511). Two cuts
(confidence and OOD) are combined with a union bound, delta/2 each.

Used by both routers: ``distill.serve.router`` (encoder students) and ``distill.serve.lm_router`` (LM students).
"""

from __future__ import annotations

import functools
import math

import numpy as np




def binom_sf(n: int, u: float) -> np.ndarray:
    """S[j] = P(Binomial(n, u) >= j) for j = 0 .. n+1 (S[0] = 1, S[n+1] = 0)."""
    if u <= 0.0:
        s = np.zeros(n + 2)
        s[0] = 1.0
        return s
    if u >= 1.0:
        s = np.ones(n + 2)
        s[n + 1] = 0.0
        return s
    lg = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])    # log i!
    i = np.arange(n + 1)
    pmf = np.exp(lg[n] - lg - lg[::-1] + i * math.log(u) + (n - i) * math.log1p(-u))
    return np.clip(np.concatenate([np.cumsum(pmf[::-1])[::-1], [0.0]]), 0.0, 1.0)


@functools.lru_cache(maxsize=4096)       # pure; a simulation or a curve asks the same (j, n, delta) again
def order_stat_upper(j: int, n: int, delta: float) -> float:
    """The 1-delta quantile of Beta(j, n-j+1), the law of the j-th smallest of n uniforms: with probability
    >= 1-delta, a cut at the j-th smallest of n exchangeable scores leaves at most this mass below it. Equal to
    the one-sided Clopper-Pearson upper limit for j-1 successes in n trials. j <= 0 -> 0, j > n -> 1."""
    if j <= 0:
        return 0.0
    if j > n:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):                       # bisection: P(Bin(n, u) >= j) grows with u
        mid = (lo + hi) / 2
        if binom_sf(n, mid)[j] >= 1.0 - delta:
            hi = mid
        else:
            lo = mid
    return hi


def ood_rank(n: int, ood_keep: float) -> int:
    """1-based rank of the OOD cut among n validation scores: keeps at least ``ood_keep`` of them."""
    return min(n, max(1, math.ceil(ood_keep * n - 1e-9)))


def guarantee_index(n: int, coverage: float, delta: float, ood_bound: float) -> int:
    """The largest j in 1..n with order_stat_upper(j, n, delta) <= 1 - coverage - ood_bound, else 0 (none)."""
    budget = 1.0 - coverage - ood_bound
    if budget <= 0 or n == 0:
        return 0
    s = binom_sf(n, budget)
    return int((s[1:n + 1] >= 1.0 - delta - 1e-12).sum())     # S is decreasing in j


def _deltas(delta: float, ood_cut: bool) -> tuple[float, float]:
    """Union bound: delta split between the confidence cut and the OOD cut (all to confidence without one)."""
    return (delta / 2, delta / 2) if ood_cut else (delta, 0.0)


@functools.lru_cache(maxsize=256)
def min_n_for_guarantee(coverage: float, delta: float, ood_keep: float | None, limit: int = 100_000) -> int | None:
    """The smallest validation size at which any threshold can promise ``coverage`` with 1-delta (None if
    none up to ``limit``). At that n the promise needs the cut at the validation minimum."""
    ood_cut = ood_keep is not None and ood_keep < 1.0
    d1, d2 = _deltas(delta, ood_cut)

    def ok(n: int) -> bool:
        b2 = order_stat_upper(n - ood_rank(n, ood_keep) + 1, n, d2) if ood_cut else 0.0
        return 1.0 - (1.0 - d1 ** (1.0 / n)) - b2 >= coverage      # j = 1: Beta(1, n) quantile in closed form

    lo, hi = 1, 1
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while lo < hi:                            # ok() is monotone in n up to the ceil() in ood_rank: near enough
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return hi


def no_promise_note(coverage: float, delta: float, why: str, n: int, most: float | None) -> str:
    """What a router says when no cut can promise ``coverage`` with 1-delta and the plain cut is served instead."""
    return (f"no threshold can promise coverage >= {coverage:.0%} with probability {1 - delta:.0%}: {why}. "
            f"Served: the plain threshold, which meets the target on these {n} validation rows only (on new "
            "inputs its coverage falls below the target about half the time)"
            + (f"; the most that can be promised at this n is coverage >= {most:.1%}" if most and most > 0 else ""))
