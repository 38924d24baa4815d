"""Pure metric functions for ``distill eval``. No store, no models: arrays in, numbers out.

Conventions shared by every function here:
- Labels are any hashable values (usually label strings). A prediction of ``None`` means "the system gave
  no answer" (e.g. the teacher failed): it is never equal to a gold label, so it counts as wrong. It is
  never silently dropped.
- Functions that resample take a ``statistic(idx) -> float`` closure over row indices, so one bootstrap
  serves accuracy, macro-F1 and ratios such as retention alike (the ratio is recomputed on each resample,
  not divided after the fact).
- ``nan`` means "undefined on this data" (e.g. macro-F1 of zero rows); callers turn it into ``None`` for JSON.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from typing import Any, Callable, Hashable, Sequence

import numpy as np

# ------------------------------------------------------------------------------------------------
# Point metrics


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable | None]) -> float:
    """Share of rows where ``y_pred[i] == y_true[i]``.

    Inputs: two equal-length sequences; ``None`` predictions count as wrong. Returns ``nan`` on zero rows.
    """
    _same_length(y_true, y_pred)
    if len(y_true) == 0:
        return math.nan
    return float(np.mean([p is not None and p == t for t, p in zip(y_true, y_pred)]))


def agreement(a: Sequence[Hashable | None], b: Sequence[Hashable | None]) -> float:
    """Share of rows where two systems give the same answer (e.g. student vs teacher).

    Same formula as ``accuracy`` but neither side is ground truth; a ``None`` on either side is a
    disagreement (a missing answer cannot agree with anything). Returns ``nan`` on zero rows.
    """
    _same_length(a, b)
    if len(a) == 0:
        return math.nan
    return float(np.mean([x is not None and y is not None and x == y for x, y in zip(a, b)]))


def encode(values: Sequence[Hashable | None], classes: Sequence[Hashable]) -> np.ndarray:
    """Integer codes of ``values`` in ``classes``; ``None`` (no answer) becomes -1. Unknown values raise."""
    index = {c: i for i, c in enumerate(classes)}
    return np.array([-1 if v is None else index[v] for v in values], dtype=np.int64)


def macro_f1_codes(t: np.ndarray, p: np.ndarray, n_classes: int) -> float:
    """Macro-F1 on integer codes (the fast path the bootstrap uses; see ``macro_f1``).

    ``t`` are gold codes in [0, n_classes); ``p`` predicted codes, -1 = no answer. A class enters the average
    when it occurs in ``t`` or ``p`` (scikit-learn's default label set); -1 is not a class, so a missing
    answer is a false negative of the gold class and nobody's false positive.
    """
    if len(t) == 0:
        return math.nan
    # Three bincounts instead of a confusion matrix: this runs ~10^5 times per evaluation (bootstrap).
    tp = np.bincount(t[p == t], minlength=n_classes)
    support = np.bincount(t, minlength=n_classes)                 # gold count per class = TP + FN
    predicted = np.bincount(p[p >= 0], minlength=n_classes)       # predicted count per class = TP + FP
    denom = support + predicted                                   # 2TP + FP + FN
    present = denom > 0
    return float((2 * tp[present] / denom[present]).sum() / present.sum())


def macro_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable | None]) -> float:
    """Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN).

    Inputs: gold labels and predictions (``None`` = no answer, counted as a false negative). The classes
    averaged are those that occur in gold or predictions, as ``sklearn.metrics.f1_score(average="macro")``
    does; the unit tests check equality with scikit-learn. Reference: Sokolova & Lapalme 2009, "A systematic
    analysis of performance measures for classification tasks". Returns ``nan`` on zero rows.
    """
    _same_length(y_true, y_pred)
    classes = sorted({*y_true, *(p for p in y_pred if p is not None)}, key=str)
    return macro_f1_codes(encode(y_true, classes), encode(y_pred, classes), len(classes))


def retention(student_value: float, teacher_value: float) -> float:
    """student metric / teacher metric, both measured against gold on the same rows.

    1.0 means the student kept all of the teacher's quality; above 1 is possible (the student beat its
    teacher). ``nan`` when the teacher scores 0 (the ratio is undefined).
    """
    if teacher_value == 0 or math.isnan(teacher_value) or math.isnan(student_value):
        return math.nan
    return student_value / teacher_value


# ------------------------------------------------------------------------------------------------
# Uncertainty


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, *, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval (Efron & Tibshirani 1993, "An Introduction to the
    Bootstrap", ch. 13).

    ``statistic(idx)`` computes the metric on the rows ``idx`` (an int array of length ``n`` drawn with
    replacement). Returns the (1-level)/2 and (1+level)/2 percentiles of ``resamples`` draws. Resamples
    where the statistic is undefined (``nan``, e.g. a ratio whose denominator is 0) are left out; if all
    are, returns (nan, nan). Seeded, so the same data gives the same interval.
    """
    if resamples < 1000:
        # Fewer draws make the 2.5% tail rest on a couple of dozen samples: the interval gets noisy.
        raise ValueError("bootstrap_ci needs resamples >= 1000 for a stable 95% interval")
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    # One draw at a time: a (resamples × n) matrix would need 8 GB for a 1M-row test set.
    vals = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(resamples)], dtype=float)
    vals = vals[~np.isnan(vals)]
    if len(vals) == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(vals, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return (float(lo), float(hi))


# ------------------------------------------------------------------------------------------------
# Calibration


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> list[dict]:
    """Equal-width confidence bins B_m = ((m-1)/M, m/M] as in Guo et al. 2017 (arXiv 1706.04599, §2);
    confidence 0 goes into the first bin.

    Inputs: the system's probability of its own prediction per row, and whether that prediction was right.
    Returns one dict per bin: ``lo``, ``hi``, ``count``, ``confidence`` (mean, or None when empty) and
    ``accuracy`` (share correct, or None when empty). Plotting accuracy against confidence gives the
    reliability diagram; a perfectly calibrated system lies on the diagonal.
    """
    conf = np.asarray(confidence, dtype=float)
    corr = np.asarray(correct, dtype=float)
    if conf.shape != corr.shape:
        raise ValueError(f"confidence has {conf.shape[0]} rows but correct has {corr.shape[0]}")
    # searchsorted(side="left") - 1 maps (0, 1/M] -> 0, ..., ((M-1)/M, 1] -> M-1 (right-closed bins as in
    # the paper) without the float trap of ceil(0.7 * 10) == 8; clip puts confidence 0 into bin 0.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    bins = []
    for m in range(n_bins):
        sel = idx == m
        cnt = int(sel.sum())
        bins.append({
            "lo": m / n_bins,
            "hi": (m + 1) / n_bins,
            "count": cnt,
            "confidence": float(conf[sel].mean()) if cnt else None,
            "accuracy": float(corr[sel].mean()) if cnt else None,
        })
    return bins


def ece(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float:
    """Expected calibration error, Guo et al. 2017 (arXiv 1706.04599) Eq. (3):
    ECE = Σ_m |B_m|/n · |acc(B_m) − conf(B_m)| over equal-width bins (see ``reliability_bins``).

    0 is perfectly calibrated; ``nan`` on zero rows.
    """
    bins = reliability_bins(confidence, correct, n_bins)
    n = sum(b["count"] for b in bins)
    if n == 0:
        return math.nan
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


# ------------------------------------------------------------------------------------------------
# Errors and segments


def confused_pairs(y_true: Sequence[Hashable], y_pred: Sequence[Hashable | None], top: int = 10) -> list[dict]:
    """The most frequent (true, predicted) pairs among the errors, most frequent first.

    Returns dicts ``{"true", "pred", "count", "rows"}`` where ``rows`` are the indices of those errors (so
    the caller can show example texts). ``pred`` is None for "no answer". Ties are ordered by label text so
    the output is deterministic.
    """
    _same_length(y_true, y_pred)
    rows: dict[tuple, list[int]] = {}
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        if p is None or p != t:
            rows.setdefault((t, p), []).append(i)
    order = sorted(rows.items(), key=lambda kv: (-len(kv[1]), str(kv[0][0]), str(kv[0][1])))
    return [{"true": t, "pred": p, "count": len(ix), "rows": ix} for (t, p), ix in order[:top]]


def per_segment(segments: Sequence[Hashable | None], statistic: Callable[[np.ndarray], float], *,
                min_size: int, resamples: int = 1000, seed: int = 0) -> list[dict]:
    """The metric on each segment's rows, with a bootstrap CI per segment.

    ``statistic(idx)`` computes the metric on the rows ``idx`` (indices into ``segments``). Every segment is
    reported; ``gated`` is False for segments with fewer than ``min_size`` rows (too small to judge: a
    10-row segment's CI is about ±0.3 wide), so ``worst_segment`` ignores them. ``None`` segments are
    reported as "(none)". Sorted by segment name.
    """
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(segments):
        groups.setdefault("(none)" if s is None else str(s), []).append(i)
    out = []
    for name in sorted(groups):
        idx = np.array(groups[name], dtype=np.int64)
        value = statistic(idx)
        lo, hi = bootstrap_ci(lambda r, idx=idx: statistic(idx[r]), len(idx), resamples=resamples, seed=seed)
        out.append({"segment": name, "n": len(idx), "value": value, "ci": [lo, hi], "gated": len(idx) >= min_size})
    return out


def worst_segment(breakdown: list[dict]) -> dict | None:
    """The gated segment (``gated`` True, defined value) with the lowest value; None if there is none.
    Ties go to the first by name."""
    cands = [b for b in breakdown if b["gated"] and not _isnan(b["value"])]
    return min(cands, key=lambda b: b["value"]) if cands else None


# ------------------------------------------------------------------------------------------------
# Latency


def latency_percentiles(seconds: Sequence[float], percentiles: Sequence[float] = (50, 95)) -> dict[str, Any]:
    """``{"n", "mean_s", "p50_s", "p95_s", ...}`` of per-request latencies in seconds.

    Percentiles use linear interpolation between order statistics (``numpy.percentile``'s default, type 7
    in Hyndman & Fan 1996). Values are None when there are no samples.
    """
    x = np.asarray(seconds, dtype=float)
    out: dict[str, Any] = {"n": int(len(x)), "mean_s": float(x.mean()) if len(x) else None}
    for q in percentiles:
        out[f"p{q:g}_s"] = float(np.percentile(x, q)) if len(x) else None
    return out


# ------------------------------------------------------------------------------------------------


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)} rows")


def _isnan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def counts(values: Sequence[Hashable]) -> dict[str, int]:
    """Label histogram with string keys, largest first (for the report's class-balance line)."""
    return {str(k): v for k, v in Counter(values).most_common()}

# ------------------------------------------------------------------------------------------------
# Generated answers (extract / generate): what `distill eval`, `distill export --format gguf` (parity) and the
# LM router score answers with. Unit-tested against hand-computed values in tests/unit/test_evaluate_lm.py.

DEFAULT_MAX_NEW_TOKENS = {"extract": 128, "generate": 256}


def field_pairs(answer: Any) -> Counter:
    """The (field path, value) pairs of a JSON answer, as a multiset.

    ``{"intent": "X", "slots": {"city": "Paris"}}`` -> ``{("intent", '"X"'): 1, ("slots.city", '"Paris"'): 1}``.
    Values are compared as canonical JSON, so ``"5"`` and ``5`` differ and so do ``1`` and ``1.0`` — the same
    strictness as exact match. ``None`` (no answer) has no pairs."""
    out: Counter = Counter()

    def walk(x: Any, path: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, list):
            for v in x:
                walk(v, f"{path}[]")
        elif x is not None:           # a null field is an absent field
            out[(path or "(value)", json.dumps(x, ensure_ascii=False))] += 1

    walk(answer, "")
    return out


def pair_counts(pred: Any, ref: Any) -> tuple[int, int, int]:
    """(true positives, predicted pairs, reference pairs) of one row; TP counts a pair at most as often as it
    occurs on both sides (multiset intersection)."""
    p, r = field_pairs(pred), field_pairs(ref)
    return sum((p & r).values()), sum(p.values()), sum(r.values())


def field_f1(preds: Sequence[Any], refs: Sequence[Any]) -> float | None:
    """Micro field F1 over all rows: 2 TP / (predicted pairs + reference pairs); None when both are 0."""
    tp = n = 0
    for p, r in zip(preds, refs):
        t, a, b = pair_counts(p, r)
        tp, n = tp + t, n + a + b
    return 2 * tp / n if n else None


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalise_text(s: str) -> str:
    """SQuAD's answer normalisation (Rajpurkar et al. 2016): lowercase, drop punctuation and the articles
    a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def token_f1(pred: str | None, ref: str) -> float:
    """SQuAD token F1 between normalised texts (bag of words). No answer scores 0; two empty texts score 1."""
    if pred is None:
        return 0.0
    p, r = normalise_text(pred).split(), normalise_text(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)
