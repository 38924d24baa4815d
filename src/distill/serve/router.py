"""Student -> teacher routing for classify students: answer with the student when it is confident and the input
looks like its training data; send everything else to the teacher.

Two scores per input:

- **confidence** (higher = surer), one of
  - ``max_prob``: p(top1)
  - ``margin``:   p(top1) - p(top2)
  - ``entropy``:  1 - H(p) / log(L)   (normalised so 1 = one-hot, 0 = uniform)
- **ood_score** (higher = more out-of-distribution), one of
  - ``mahalanobis`` (default): sum over the student's hidden layers l of min_c (z_l - mu_lc)^T P_l (z_l - mu_lc),
    z_l the attention-masked mean of layer l's hidden states, class means mu_lc and one shared ("tied") precision
    P_l per layer fitted on the train split's features and the teacher's labels (Lee et al. 2018, "A Simple Unified
    Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", arXiv 1807.03888, Eq. 2 and the
    feature ensemble of their Sec. 2; no input pre-processing). Lee et al. weight the layers with a regression
    fitted on OOD validation samples, which a user does not have: we sum with equal weights (under the tied-Gaussian
    model every layer's score is ~chi^2 with D degrees of freedom, and D is the same for every layer). Why several
    layers: fine-tuning collapses the *last* layer onto the label set, so an input from another domain lands
    confidently inside a class there; the lower layers keep the topic. The features come from the one forward pass
    the student runs anyway (``logits_and_layers``): no second model.
  - ``knn``: cosine distance to the k-th nearest train input in the embedding of a *frozen* pretrained sentence
    encoder (Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML, arXiv 2204.06507:
    L2-normalised features, k-th NN distance), which keeps the topic information fine-tuning discards. Costs a
    second encoder pass per request; the search is exact inner product in faiss (``IndexFlatIP``).
  - ``energy``: E(x) = -T * logsumexp(f(x) / T) over the logits (Liu et al. 2020, "Energy-based Out-of-distribution
    Detection", arXiv 2010.03759, Eq. 1): reads the same collapsed last layer, so it misses far-away inputs.
  - ``combined``: max of the Mahalanobis and kNN scores, each standardised by the median and IQR of its scores on
    the train split (so the thresholds, set on validation, keep their finite-sample promise: nothing about the
    combination is fitted on the validation rows that set the cuts).
  - ``none``.
  Measured per signal and across datasets in ``bench/router.py`` (bench/results/router.json).

**Calibration** (``calibrate``; the validation split, never test). Validation rows whose gold label is not one of
the task's labels are *out-of-scope examples*: they never set a threshold (the coverage target is about in-domain
traffic), they only measure the OOD recall printed with the curve. On the in-domain rows: the OOD cut keeps
``ood_keep`` of them, then the confidence cut is set for a target ``coverage`` c two ways, as the LM router does
(``distill.serve.conformal``):

- *plain*: the lowest threshold at which the student answers ceil(c*n) validation inputs; on new inputs its
  coverage is c on average and below c about half the time;
- *guaranteed* (served when it exists): a cut at an order statistic chosen so that, with probability >= 1-delta
  over the validation draw, the coverage on new exchangeable in-domain inputs is >= c (split conformal,
  calibration-conditional). With an OOD cut, a seeded 30% of validation sets the OOD cut and the other 70% the
  confidence cut on the joint score (confidence where the OOD cut keeps the input, -inf where it does not), so the
  promise covers both cuts at once without a union bound.

Nothing can be promised about inputs unlike the validation split: the OOD recall is a measurement, on the
out-of-scope rows validation has (if any), never a guarantee. ``calibrate`` says so in ``notes``.

A router file belongs to the model it was calibrated on: ``Router.save`` records a fingerprint of the weight files
beside it, ``Router.load`` refuses a router.json whose model changed (or that predates fingerprints).

Everything above ``calibrate_project`` is numpy on arrays (unit-tested without a model).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from distill.errors import DistillError
from distill.fsutil import write_atomic, write_text_atomic
from distill.serve.conformal import (
    guarantee_index, min_n_for_guarantee, no_promise_note, ood_rank, order_stat_upper,
)

ConfidenceKind = Literal["max_prob", "margin", "entropy"]
OodKind = Literal["mahalanobis", "knn", "energy", "combined", "none"]
OOD_KINDS = ("mahalanobis", "knn", "energy", "combined", "none")
ROUTER_FILE = "router.json"
STATS_FILE = "router_stats.npz"
WEIGHT_GLOBS = ("model*.onnx", "*.safetensors", "pytorch_model*.bin")
DEFAULT_EMBEDDER = "all-minilm-l6-v2"
OOD_SPLIT = 0.3          # share of in-domain validation rows that set the OOD cut (the rest set the guaranteed cut)

# features for the OOD scores: {"layers": [N, layers + 1, D] per-layer means, "frozen": [N, E] frozen embeddings};
# a bare [N, D] array is the last layer's features (what older callers pass)
Features = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------------
# scores


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def confidence(probs: np.ndarray, kind: ConfidenceKind = "max_prob") -> np.ndarray:
    """probs [N, L] -> [N], higher = more confident."""
    probs = np.asarray(probs, dtype=np.float64)
    if kind == "max_prob":
        return probs.max(-1)
    if kind == "margin":
        top2 = np.sort(probs, -1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    if kind == "entropy":
        p = np.clip(probs, 1e-12, 1.0)
        h = -(p * np.log(p)).sum(-1)
        return 1.0 - h / math.log(probs.shape[-1])
    raise ValueError(f"unknown confidence kind {kind!r}")


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """E(x) = -T logsumexp(f(x)/T), [N]. Lower for in-distribution inputs (Liu et al. 2020, Eq. 1)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    m = z.max(-1)
    return -temperature * (m + np.log(np.exp(z - m[:, None]).sum(-1)))


@dataclass
class Mahalanobis:
    """Class means [C, D] and the shared precision matrix [D, D] of one layer (Lee et al. 2018, Eq. 1)."""

    means: np.ndarray
    precision: np.ndarray

    def __post_init__(self) -> None:
        self.means = np.asarray(self.means, dtype=np.float64)
        self.precision = np.asarray(self.precision, dtype=np.float64)
        self._mp = self.means @ self.precision                       # [C, D], constant per model
        self._mm = (self._mp * self.means).sum(1)                    # [C]

    def score(self, feats: np.ndarray) -> np.ndarray:
        """min_c (z - mu_c)^T P (z - mu_c), [N]. Higher = farther from every class."""
        # Expanded as z'Pz - 2 z'P mu_c + mu_c'P mu_c: O(N*D^2 + N*C*D) instead of the O(N*C*D^2) of the
        # direct form, which is ~1e11 operations for 5,500 inputs x 150 classes x 384 dims (CLINC150).
        z = np.asarray(feats, dtype=np.float64)
        zp = z @ self.precision                                     # [N, D]
        m = (zp * z).sum(1)[:, None] - 2 * z @ self._mp.T + self._mm[None, :]
        return np.maximum(m, 0.0).min(-1)                           # clamp round-off below 0


def fit_mahalanobis(feats: np.ndarray, label_idx: Sequence[int], n_classes: int, shrinkage: float = 1e-3
                    ) -> Mahalanobis:
    """Class-conditional means and a tied covariance from train features. ``shrinkage`` (a multiple of the
    mean variance added to the diagonal) keeps Sigma invertible when there are fewer examples than
    feature dimensions, which is the normal case for a few hundred examples and 384-d features."""
    z = np.asarray(feats, dtype=np.float64)
    y = np.asarray(label_idx)
    d = z.shape[1]
    means = np.zeros((n_classes, d))
    centred = []
    for c in range(n_classes):
        zc = z[y == c]
        if len(zc) == 0:
            # a class absent from train: put its mean far away so it never wins the min
            means[c] = np.full(d, 1e6)
            continue
        means[c] = zc.mean(0)
        centred.append(zc - means[c])
    if not centred:
        raise DistillError("Mahalanobis needs train examples with labels the student knows, found none")
    x = np.concatenate(centred)
    cov = x.T @ x / max(len(x), 1)
    cov += np.eye(d) * shrinkage * max(float(np.trace(cov)) / d, 1e-12)
    # rounded to float32 here, not at save time: router_stats.npz stores float32 (half the disk), and the
    # thresholds must be set with exactly the statistics that serving loads
    return Mahalanobis(means=means, precision=np.linalg.pinv(cov).astype(np.float32))


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class KnnIndex:
    """The k-th nearest neighbour cosine distance to a reference set (Sun et al. 2022), exact, in faiss.

    faiss (``IndexFlatIP``: exact inner product, BLAS) instead of a Python loop or a dense numpy product: at batch
    1 against a few thousand references it takes well under a millisecond and it keeps that as the reference set
    grows (switch to ``IndexHNSWFlat`` past ~1M references)."""

    def __init__(self, reference: np.ndarray):
        import faiss

        self.reference = l2_normalise(reference)
        self.index = faiss.IndexFlatIP(self.reference.shape[1])
        self.index.add(self.reference)

    def distance(self, queries: np.ndarray, k: int, skip_self: bool = False) -> np.ndarray:
        """1 - cos(z, z_(k)), [N]. ``skip_self``: the queries are the reference itself (its own match is dropped)."""
        q = l2_normalise(queries)
        if q.shape[1] != self.reference.shape[1]:
            raise DistillError(f"router: embedding has {q.shape[1]} dims, the kNN reference {self.reference.shape[1]}",
                               hint="the embedder changed since calibration: re-run `distill route calibrate`")
        kk = max(1, min(int(k) + int(skip_self), len(self.reference)))
        sims, _ = self.index.search(np.ascontiguousarray(q), kk)
        return (1.0 - sims[:, kk - 1]).astype(np.float64)


# ------------------------------------------------------------------------------------------------
# config


def read_thresholds(cls, text: str, where: str) -> dict[str, Any]:
    """The fields of a router config dataclass ``cls`` from its JSON (router.json / lm_router.json): unknown
    keys refused, and a null threshold read back as "no cut" (JSON has no infinities)."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise DistillError(f"{where}: not valid JSON (line {e.lineno}): {e.msg}",
                           hint="re-create it with `distill route calibrate PROJECT`") from None
    unknown = sorted(set(d) - set(cls.__dataclass_fields__))
    if unknown:
        raise DistillError(f"{where}: unknown keys {unknown}", hint="re-create it with `distill route calibrate`")
    if d.get("conf_threshold") is None:
        d["conf_threshold"] = float("-inf")
    if d.get("ood_threshold") is None:
        d["ood_threshold"] = float("inf")
    return d


def _finite(x: Any) -> Any:
    """inf/nan -> None, recursively (JSON has neither)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


@dataclass
class RouterConfig:
    """How the router scores and where it cuts. Saved as router.json next to the model."""

    labels: list[str] = field(default_factory=list)       # in logit order
    confidence: ConfidenceKind = "max_prob"                # which confidence score to threshold
    ood: OodKind = "mahalanobis"                           # which OOD score to threshold
    layers: list[int] | None = None                        # mahalanobis: hidden-state indices (None: every layer
                                                           #   after the embedding layer); [-1] = last layer only
    k: int = 10                                            # knn: the k of the k-th nearest neighbour
    embedder: str = DEFAULT_EMBEDDER                       # knn: the frozen sentence encoder (packaged name/folder)
    temperature: float = 1.0                               # energy temperature T (the paper uses 1)
    coverage: float = 0.9                                  # target share of in-domain requests the student answers
    ood_keep: float = 0.95                                 # share of in-domain validation inputs the OOD cut keeps
    delta: float = 0.05                                    # the coverage promise holds with probability >= 1-delta
    guarantee: bool = True                                 # serve the guaranteed cut when validation is big enough
    conf_threshold: float = float("-inf")                  # student answers when confidence >= this ...
    ood_threshold: float = float("inf")                    # ... and ood_score <= this
    threshold_rule: str = "plain"                          # which confidence cut is served: guaranteed | plain
    plain_conf_threshold: float | None = None              # meets the target on validation only
    guaranteed_conf_threshold: float | None = None         # None: no cut can promise the target at this n
    guaranteed_coverage: float | None = None               # served: coverage >= this w.p. >= 1-delta (None: none)
    max_guaranteed_coverage: float | None = None           # the most any cut can promise at this n
    n_for_guarantee: int | None = None                     # in-domain validation rows needed to promise `coverage`
    achieved_coverage: float | None = None                 # served cuts, on in-domain validation
    plain_coverage: float | None = None                    # plain cut, on in-domain validation
    n_validation: int = 0                                  # in-domain validation rows that set the cuts
    n_oos_validation: int = 0                              # out-of-scope validation rows (gold not a label)
    oos_recall_validation: float | None = None             # share of those the served cuts route
    n_reference: int = 0                                   # train rows the OOD statistics were fitted on
    curve: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] | None = None                    # fingerprint of the weights beside router.json
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 <= self.coverage <= 1.0:
            raise DistillError(f"router coverage must be in [0, 1], got {self.coverage}",
                               hint="e.g. --coverage 0.9 lets the student answer 90% of requests")
        if not 0.0 < self.ood_keep <= 1.0:
            raise DistillError(f"router ood_keep must be in (0, 1], got {self.ood_keep}")
        if not 0.0 < self.delta < 1.0:
            raise DistillError(f"router delta must be in (0, 1), got {self.delta}")
        if self.temperature <= 0:
            raise DistillError(f"router temperature must be > 0, got {self.temperature}")
        if self.k < 1:
            raise DistillError(f"router k must be >= 1, got {self.k}")
        if self.confidence not in ("max_prob", "margin", "entropy"):
            raise DistillError(f"router confidence {self.confidence!r} is not one of max_prob, margin, entropy")
        if self.ood not in OOD_KINDS:
            raise DistillError(f"router ood {self.ood!r} is not one of {', '.join(OOD_KINDS)}")

    @property
    def needs_layers(self) -> bool:
        return self.ood in ("mahalanobis", "combined")

    @property
    def needs_frozen(self) -> bool:
        return self.ood in ("knn", "combined")

    def to_json(self) -> str:
        return json.dumps(_finite(asdict(self)), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, where: str = "router.json") -> "RouterConfig":
        return cls(**read_thresholds(cls, text, where))


# ------------------------------------------------------------------------------------------------
# OOD statistics (fitted on the train split) and scoring


@dataclass
class OodStats:
    """What the OOD score is measured against, fitted on the train split: one Mahalanobis per scored layer, the kNN
    reference (frozen embeddings of train inputs), and the combined score's per-signal (median, IQR) on train."""

    layers: list[int] = field(default_factory=list)
    maha: list[Mahalanobis] = field(default_factory=list)
    reference: np.ndarray | None = None
    scale: dict[str, tuple[float, float]] = field(default_factory=dict)
    _knn: KnnIndex | None = None

    def stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Precisions [K, D, D], P mu [K, C, D] and mu' P mu [K, C] of the scored layers, built once."""
        # float32: at batch 1 the scoring reads every precision matrix once (six 384x384 layers: 3.5 MB in float32,
        # 7 MB in float64, more than a typical L2 cache) and is bound by memory, not arithmetic
        if getattr(self, "_stacked", None) is None:
            self._stacked = (np.stack([m.precision for m in self.maha]).astype(np.float32),
                             np.stack([m._mp for m in self.maha]).astype(np.float32),
                             np.stack([m._mm for m in self.maha]).astype(np.float64))
        return self._stacked

    def knn(self) -> KnnIndex:
        if self._knn is None:
            if self.reference is None:
                raise DistillError("the kNN OOD score needs reference embeddings, none were fitted",
                                   hint="re-run `distill route calibrate`")
            self._knn = KnnIndex(self.reference)
        return self._knn

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {"layers": np.asarray(self.layers, dtype=np.int64)}
        if self.maha:
            arrays["means"] = np.stack([m.means for m in self.maha])
            arrays["precision"] = np.stack([m.precision for m in self.maha]).astype(np.float32)
        if self.reference is not None:
            arrays["reference"] = self.reference.astype(np.float16)   # unit vectors: cosines to ~1e-3, half the disk
        for name, (a, b) in self.scale.items():
            arrays[f"scale_{name}"] = np.asarray([a, b], dtype=np.float64)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:             # a file object: np.savez(path) would append '.npz'
                np.savez(f, **arrays)
        write_atomic(path, write)

    @classmethod
    def load(cls, path: Path) -> "OodStats":
        with np.load(path) as f:
            maha = [Mahalanobis(m, p) for m, p in zip(f["means"], f["precision"])] if "means" in f else []
            return cls(layers=[int(x) for x in f["layers"]], maha=maha,
                       reference=f["reference"].astype(np.float32) if "reference" in f else None,
                       scale={k.removeprefix("scale_"): (float(f[k][0]), float(f[k][1]))
                              for k in f.files if k.startswith("scale_")})


def layer_features(feats: np.ndarray | Features | None, layers: list[int]) -> list[np.ndarray]:
    """[N, D] features of each of ``layers`` from the per-layer features (or a bare last-layer array)."""
    if feats is None:
        raise DistillError("the Mahalanobis OOD score needs the student's features")
    arr = feats.get("layers") if isinstance(feats, dict) else feats
    if arr is None:
        raise DistillError("the Mahalanobis OOD score needs the student's per-layer features")
    arr = np.asarray(arr)
    if arr.ndim == 2:
        if layers != [-1]:
            raise DistillError(f"router scores layers {layers} but got last-layer features only",
                               hint="feed `logits_and_layers` output, or calibrate with layers=[-1]")
        return [arr]
    return [arr[:, i] for i in layers]


def frozen_features(feats: np.ndarray | Features | None) -> np.ndarray:
    arr = feats.get("frozen") if isinstance(feats, dict) else None
    if arr is None:
        raise DistillError("the kNN OOD score needs the frozen encoder's embeddings of the inputs")
    return np.asarray(arr)


def _robust_scale(x: np.ndarray) -> tuple[float, float]:
    q1, med, q3 = np.quantile(x, [0.25, 0.5, 0.75])
    return float(med), float(max(q3 - q1, 1e-12))


def ood_scores(cfg: RouterConfig, logits: np.ndarray | None, feats: np.ndarray | Features | None,
               stats: OodStats | None) -> np.ndarray:
    """[N] OOD scores, higher = less like the train split; NaN when ``cfg.ood == 'none'``."""
    kind = cfg.ood
    if kind == "energy":
        if logits is None:
            raise DistillError("the energy OOD score needs the student's logits, not probabilities")
        return energy(logits, cfg.temperature)
    if kind in ("mahalanobis", "knn", "combined") and stats is None:
        raise DistillError(f"the {kind} OOD score needs statistics fitted on the train split",
                           hint=f"re-run `distill route calibrate`; it writes {STATS_FILE} beside {ROUTER_FILE}")
    if kind == "mahalanobis":
        return _maha(stats, feats)
    if kind == "knn":
        return stats.knn().distance(frozen_features(feats), cfg.k)
    if kind == "combined":
        parts = []
        for name, s in (("mahalanobis", _maha(stats, feats)),
                        ("knn", stats.knn().distance(frozen_features(feats), cfg.k))):
            med, iqr = stats.scale[name]
            parts.append((s - med) / iqr)
        return np.maximum(*parts)
    n = 0 if logits is None else len(logits)
    return np.full(n, np.nan)


def _maha(stats: OodStats, feats) -> np.ndarray:
    """Sum over the scored layers of each layer's Mahalanobis score, in one batched matmul over the layers (what
    keeps six layers' scoring well under a millisecond at batch 1)."""
    zs = layer_features(feats, stats.layers)
    p, mp, mm = stats.stacked()
    z = np.stack(zs).astype(np.float32)                                 # [K, N, D]
    zp = np.matmul(z, p)                                                # [K, N, D]
    # the products in float32, the sums of the expansion in float64 (its terms are large and nearly cancel)
    quad = (zp.astype(np.float64) * z).sum(-1)                          # [K, N]
    cross = np.matmul(z, mp.transpose(0, 2, 1)).astype(np.float64)      # [K, N, C]
    m = quad[..., None] - 2 * cross + mm[:, None, :]
    return np.maximum(m, 0.0).min(-1).sum(0)


def label_indices(labels_teacher: Sequence[Any], labels: list[str]) -> np.ndarray:
    idx = {lab: i for i, lab in enumerate(labels)}
    out = []
    for y in labels_teacher:
        if isinstance(y, (int, np.integer)):
            out.append(int(y))
        elif y in idx:
            out.append(idx[y])
        else:
            # a teacher label the student does not know can never be answered right by the student
            out.append(-1)
    return np.asarray(out)


def fit_ood(cfg: RouterConfig, train_labels: Sequence[Any], train_layers: np.ndarray | None = None,
            train_frozen: np.ndarray | None = None) -> OodStats:
    """The OOD statistics of ``cfg.ood`` from the train split: Mahalanobis per layer on the student's features and
    the teacher's labels, the kNN reference, and (combined) each score's median/IQR on train (kNN leave-one-out:
    a train input's own match is skipped)."""
    stats = OodStats()
    if cfg.ood in ("energy", "none"):
        return stats
    if cfg.needs_layers:
        if train_layers is None:
            raise DistillError("Mahalanobis needs the student's features of the train split")
        train_layers = np.asarray(train_layers)
        n_layers = 1 if train_layers.ndim == 2 else train_layers.shape[1]
        stats.layers = list(cfg.layers) if cfg.layers is not None else (
            [-1] if train_layers.ndim == 2 else list(range(1, n_layers)))
        y = label_indices(train_labels, cfg.labels)
        stats.maha = [fit_mahalanobis(z, y, len(cfg.labels)) for z in layer_features(train_layers, stats.layers)]
    if cfg.needs_frozen:
        if train_frozen is None or len(train_frozen) == 0:
            raise DistillError("the kNN OOD score needs frozen embeddings of the train split")
        # float16, as router_stats.npz stores it: the thresholds are set with exactly what serving loads
        stats.reference = l2_normalise(train_frozen).astype(np.float16).astype(np.float32)
    if cfg.ood == "combined":
        stats.scale["mahalanobis"] = _robust_scale(_maha(stats, {"layers": train_layers}))
        stats.scale["knn"] = _robust_scale(stats.knn().distance(train_frozen, cfg.k, skip_self=True))
    return stats


# ------------------------------------------------------------------------------------------------
# decisions


@dataclass
class RouterDecision:
    label: str
    probs: dict[str, float]
    confidence: float
    ood_score: float | None
    routed_to: Literal["student", "teacher"]
    reason: str            # 'confident' | 'low_confidence' | 'ood' (when both, 'ood') | 'router_error'


def fingerprint(folder: str | Path) -> dict[str, Any]:
    """Name, size and sha256 of the weight files in ``folder``: which model a router.json was calibrated on."""
    folder = Path(folder)
    files = {}
    for pattern in WEIGHT_GLOBS:
        for f in sorted(folder.glob(pattern)):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            files[f.name] = {"bytes": f.stat().st_size, "sha256": h.hexdigest()}
    return {"files": files}


class Router:
    """Scores a batch and decides per input. ``embed`` (texts -> frozen embeddings) is loaded from
    ``config.embedder`` when the OOD score needs it and none is given."""

    def __init__(self, config: RouterConfig, stats: OodStats | None = None,
                 embed: Callable[[Sequence[str]], np.ndarray] | None = None):
        if config.ood in ("mahalanobis", "knn", "combined") and stats is None:
            raise DistillError(f"router uses ood: {config.ood} but no train-split statistics were given",
                               hint=f"re-run `distill route calibrate`; it writes {STATS_FILE} next to router.json")
        self.config = config
        self.stats = stats
        self._embed = embed

    # -- features --------------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._embed is None:
            from distill.fewshot import Embedder

            self._embed = Embedder(self.config.embedder)
        return self._embed(list(texts))

    def student_features(self, pred, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, Any]:
        """The student's forward pass with what the OOD score reads: (logits, per-layer features or last-layer)."""
        if self.config.needs_layers:
            return pred.logits_and_layers(texts, batch_size)
        return pred.logits_and_embeddings(texts, batch_size)

    def features(self, student_feats: Any, texts: Sequence[str]) -> Features:
        """The student's features plus, for knn/combined, the frozen encoder's embeddings of ``texts``."""
        out: Features = {"layers": student_feats}
        if self.config.needs_frozen:
            out["frozen"] = self.embed(texts)
        return out

    # -- decisions -------------------------------------------------------------------------------------
    def scores(self, logits: np.ndarray, feats: np.ndarray | Features | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probs, confidence, ood_score) for a batch; ood_score is NaN when ood == 'none'."""
        logits = np.asarray(logits, dtype=np.float64)
        probs = softmax(logits)
        conf = confidence(probs, self.config.confidence)
        ood = ood_scores(self.config, logits, feats, self.stats)
        return probs, conf, ood

    def decide(self, logits: np.ndarray, feats: np.ndarray | Features | None = None) -> list[RouterDecision]:
        probs, conf, ood = self.scores(logits, feats)
        labels = self.config.labels
        out = []
        for p, c, o in zip(probs, conf, ood):
            is_ood = self.config.ood != "none" and bool(o > self.config.ood_threshold)
            low = bool(c < self.config.conf_threshold)
            reason = "ood" if is_ood else "low_confidence" if low else "confident"
            out.append(RouterDecision(
                label=labels[int(p.argmax())], probs={lab: float(x) for lab, x in zip(labels, p)},
                confidence=float(c), ood_score=None if np.isnan(o) else float(o),
                routed_to="student" if reason == "confident" else "teacher", reason=reason))
        return out

    def fallback(self, logits: np.ndarray) -> list[RouterDecision]:
        """When scoring fails: every input to the teacher (reason 'router_error'), the student's answer kept as the
        degraded reply if the teacher fails too. A broken router costs teacher calls, never a wrong 'confident'."""
        probs = softmax(np.asarray(logits, dtype=np.float64))
        labels = self.config.labels
        return [RouterDecision(label=labels[int(p.argmax())], probs={lab: float(x) for lab, x in zip(labels, p)},
                               confidence=float(p.max()), ood_score=None, routed_to="teacher", reason="router_error")
                for p in probs]

    # -- persistence: router.json (+ the statistics as .npz) next to the model --------------------------
    def save(self, model_dir: str | Path) -> Path:
        """Write router.json (stamped with the fingerprint of the weights in ``model_dir``) and its statistics."""
        model_dir = Path(model_dir)
        self.config.model = fingerprint(model_dir)
        # the statistics first, router.json last: a router.json on disk always has its statistics beside it
        if self.stats is not None:
            self.stats.save(model_dir / STATS_FILE)
        return write_text_atomic(model_dir / ROUTER_FILE, self.config.to_json())

    @classmethod
    def load(cls, model_dir: str | Path, embed: Callable[[Sequence[str]], np.ndarray] | None = None) -> "Router":
        """The router saved beside the model; refused when the weights there are not the ones it was calibrated on."""
        model_dir = Path(model_dir)
        f = model_dir / ROUTER_FILE
        if not f.exists():
            raise DistillError(f"{f}: no router calibration next to the model",
                               hint="run `distill route calibrate PROJECT --coverage 0.9` first")
        cfg = RouterConfig.from_json(f.read_text(encoding="utf-8"), where=str(f))
        if cfg.model is None:
            raise DistillError(f"{f}: this router was calibrated before routers recorded which model they belong to, "
                               "so nothing says it fits the weights beside it",
                               hint="re-run `distill route calibrate PROJECT` (thresholds are model-specific)")
        now = fingerprint(model_dir)
        if now != cfg.model:
            changed = sorted(set(now["files"]) ^ set(cfg.model.get("files", {}))
                             | {k for k in now["files"] if cfg.model.get("files", {}).get(k) not in (None, now["files"][k])})
            raise DistillError(f"{f}: calibrated on other weights than the model beside it (changed: "
                               f"{', '.join(changed) or 'weights'}); its thresholds do not apply to this model",
                               hint="re-run `distill route calibrate PROJECT` for the model you serve")
        stats_f = model_dir / STATS_FILE
        if cfg.ood in ("mahalanobis", "knn", "combined") and not stats_f.exists():
            raise DistillError(f"{f}: uses ood {cfg.ood} but {STATS_FILE} is missing beside it",
                               hint="re-run `distill route calibrate PROJECT`")
        stats = OodStats.load(stats_f) if stats_f.exists() else None
        return cls(cfg, stats, embed)


# ------------------------------------------------------------------------------------------------
# calibration (pure: arrays in, config out)


def _threshold_for(conf: np.ndarray, passing: np.ndarray, k: int) -> float:
    """The confidence cut that lets the ``k`` most confident OOD-passing items through (ties included)."""
    if k <= 0:
        return float("inf")
    c = np.sort(conf[passing])[::-1]
    if k > len(c):
        return float("-inf")
    return float(c[k - 1])


def _point(conf, passing, correct, t_conf) -> dict[str, float]:
    n = len(conf)
    covered = passing & (conf >= t_conf)
    cov = float(covered.mean()) if n else 0.0
    student_acc = float(correct[covered].mean()) if covered.any() else float("nan")
    # the teacher's answer is the reference, so every routed item counts as right
    system_acc = float((correct | ~covered).mean()) if n else float("nan")
    return {"coverage": cov, "student_accuracy": student_acc, "system_accuracy": system_acc,
            "teacher_share": 1.0 - cov, "threshold": t_conf}


def calibrate(val_probs: np.ndarray | None, val_features: np.ndarray | Features | None,
              val_labels_teacher: Sequence[Any], coverage: float = 0.9, *, val_logits: np.ndarray | None = None,
              labels: list[str] | None = None, settings: RouterConfig | None = None,
              stats: OodStats | None = None, oos: Sequence[bool] | None = None, grid: Sequence[float] | None = None) -> RouterConfig:
    """Fit the router's thresholds on the validation split.

    Inputs (N validation rows, L labels):
      val_probs [N, L] or val_logits [N, L] (logits are needed for ood='energy'; probs are derived from them)
      val_features: what the OOD score reads (``Features``, or a last-layer [N, D] array), with ``stats`` fitted
        on the train split (``fit_ood``)
      val_labels_teacher: N label names (or indices): the teacher's answers, which the system reproduces
      oos: N flags, True for out-of-scope rows (gold not a label): they set no threshold, they measure OOD recall
      coverage: target share of in-domain requests the student answers

    The thresholds depend on the scores, ``coverage``, ``delta`` and ``ood_keep`` only, never on the labels.
    Returns a RouterConfig with both confidence cuts (plain, guaranteed), the one served, and ``curve``: one point
    per coverage level in ``grid`` (plain cut per level, the same OOD cut) with the student's accuracy on the part it
    covers, the routed system's accuracy (the teacher answers the rest, right by definition against teacher labels),
    the teacher's share (= cost share vs sending everything to the teacher) and, with out-of-scope rows, the share
    of them routed."""
    base = settings or RouterConfig()
    cfg = RouterConfig(**{**asdict(base), "coverage": coverage, "notes": []})   # re-validates coverage
    if labels is not None:
        cfg.labels = list(labels)
    if val_logits is not None:
        val_logits = np.asarray(val_logits, dtype=np.float64)
        probs = softmax(val_logits)
    elif val_probs is not None:
        probs = np.asarray(val_probs, dtype=np.float64)
    else:
        raise DistillError("calibrate needs validation probabilities or logits")
    n_all, n_labels = probs.shape
    if not cfg.labels:
        cfg.labels = [str(i) for i in range(n_labels)]
    if len(cfg.labels) != n_labels:
        raise DistillError(f"router: {len(cfg.labels)} label names for {n_labels} model outputs")
    if len(val_labels_teacher) != n_all:
        raise DistillError(f"router: {len(val_labels_teacher)} teacher labels for {n_all} validation rows")
    if cfg.ood == "energy" and val_logits is None:
        raise DistillError("router ood='energy' needs val_logits (softmax probabilities lose the energy)",
                           hint="pass val_logits, or use ood='mahalanobis' / 'none'")
    is_oos = np.zeros(n_all, bool) if oos is None else np.asarray(oos, bool)
    ind = ~is_oos
    n = int(ind.sum())
    if n == 0:
        raise DistillError("router calibration needs in-domain validation examples with teacher labels, found none",
                           hint="label the validation split first (`distill label PROJECT`)")

    y = label_indices(val_labels_teacher, cfg.labels)
    conf_all = confidence(probs, cfg.confidence)
    ood_all = np.full(n_all, np.nan) if cfg.ood == "none" else ood_scores(cfg, val_logits, val_features, stats)
    conf, ood, correct = conf_all[ind], ood_all[ind], (probs.argmax(-1) == y)[ind]
    k_target = math.ceil(coverage * n - 1e-9)

    # 1. the OOD cut: keeps ood_keep of the in-domain rows of part A (a fixed rank). With an OOD cut, validation is
    #    split once, by a seeded permutation: part A (OOD_SPLIT of it) sets the OOD cut, part B the guaranteed
    #    confidence cut on the joint score s = confidence where the OOD cut keeps the input, else -inf. Given A, s is
    #    a fixed function and B's order statistics bound its coverage exactly: no union bound over two cuts, which
    #    would double-count the inputs both cuts route (they overlap a lot) and overshoot the target.
    ood_cut = cfg.ood != "none" and cfg.ood_keep < 1.0
    if ood_cut and n >= 2:
        perm = np.random.default_rng(0).permutation(n)
        n_a = min(n - 1, max(1, round(OOD_SPLIT * n)))
        part_a, part_b = perm[:n_a], perm[n_a:]
        cfg.ood_threshold = float(np.sort(ood[part_a])[ood_rank(n_a, cfg.ood_keep) - 1])
    else:
        part_b = np.arange(n)
        cfg.ood_threshold = float("inf")
        ood_cut = False
    passing = ood <= cfg.ood_threshold if ood_cut else np.ones(n, bool)

    # 2a. plain cut: meets the target on all in-domain validation rows
    t_plain = _threshold_for(conf, passing, k_target)
    cfg.plain_conf_threshold = t_plain
    cfg.plain_coverage = float((passing & (conf >= t_plain)).mean())
    if t_plain == float("-inf"):
        cfg.notes.append(f"coverage {coverage:.0%} is not reachable on validation: the OOD cut already routes "
                         f"{int((~passing).sum())} of {n}; raise ood_keep or lower the target")

    # 2b. guaranteed cut (distill.serve.conformal): the j1-th smallest joint score of part B
    n_b = len(part_b)
    s_b = np.sort(np.where(passing[part_b], conf[part_b], float("-inf")))
    j1 = guarantee_index(n_b, coverage, cfg.delta, 0.0)
    t_guar = float(s_b[j1 - 1]) if j1 >= 1 and math.isfinite(s_b[j1 - 1]) else None
    cfg.guaranteed_conf_threshold = t_guar
    first = int(np.isinf(s_b).sum()) + 1                   # the lowest rank a finite cut can sit at
    cfg.max_guaranteed_coverage = max(0.0, 1.0 - order_stat_upper(first, n_b, cfg.delta)) if first <= n_b else 0.0
    need = min_n_for_guarantee(min(coverage + (1.0 - cfg.ood_keep), 0.999999) if ood_cut else coverage,
                               cfg.delta, None)
    cfg.n_for_guarantee = None if need is None else (math.ceil(need / (1.0 - OOD_SPLIT)) if ood_cut else need)
    if cfg.guarantee and t_guar is not None:
        cfg.threshold_rule, cfg.conf_threshold = "guaranteed", t_guar
        cfg.guaranteed_coverage = 1.0 - order_stat_upper(j1, n_b, cfg.delta)
    else:
        cfg.threshold_rule, cfg.conf_threshold = "plain", t_plain
        cfg.guaranteed_coverage = None
        if cfg.guarantee:
            why = (f"the OOD cut routes {int(first - 1)} of the {n_b} rows that would set it"
                   if j1 >= 1 else f"n={n} in-domain validation rows are too few (needs about {cfg.n_for_guarantee})")
            cfg.notes.append(no_promise_note(coverage, cfg.delta, why, n, cfg.max_guaranteed_coverage))
    cfg.achieved_coverage = float((passing & (conf >= cfg.conf_threshold)).mean())
    cfg.n_validation = n

    # 3. out-of-scope rows: measured, never fitted
    cfg.n_oos_validation = int(is_oos.sum())
    if cfg.n_oos_validation:
        routed = (ood_all[is_oos] > cfg.ood_threshold) | (conf_all[is_oos] < cfg.conf_threshold) \
            if cfg.ood != "none" else conf_all[is_oos] < cfg.conf_threshold
        cfg.oos_recall_validation = float(routed.mean())
    else:
        cfg.oos_recall_validation = None
        cfg.notes.append(
            "validation has no out-of-scope examples (rows whose gold label is not one of the task's labels): the "
            f"coverage promise is about in-domain traffic; how much unfamiliar traffic the {cfg.ood} cut routes is "
            "not measured here and cannot be promised. Add labelled out-of-scope rows to validation to measure it, "
            "or see `distill bench router` for the cross-dataset figures")

    # 4. the coverage -> quality (and OOD recall) curve, plain cut per level
    levels = sorted(set(grid if grid is not None else [round(x, 2) for x in np.arange(0.5, 1.0001, 0.05)]) | {coverage})
    cfg.curve = []
    for lev in levels:
        t = _threshold_for(conf, passing, math.ceil(lev * n - 1e-9))
        p: dict[str, Any] = {"target": float(lev), **_point(conf, passing, correct, t)}
        if cfg.n_oos_validation:
            o_routed = conf_all[is_oos] < t
            if cfg.ood != "none":
                o_routed |= ood_all[is_oos] > cfg.ood_threshold
            p["oos_recall"] = float(o_routed.mean())
        cfg.curve.append(_finite(p))
    return cfg


# ------------------------------------------------------------------------------------------------
# the project-level step `distill route calibrate` runs


def calibrate_project(project_dir: str | Path, *, model_path: str | Path | None = None, coverage: float = 0.9,
                      confidence_kind: ConfidenceKind = "max_prob", ood: OodKind = "mahalanobis",
                      ood_keep: float = 0.95, delta: float = 0.05, guarantee: bool = True, k: int = 10,
                      embedder: str = DEFAULT_EMBEDDER, layers: list[int] | None = None,
                      teacher: str | None = None, backend: str = "auto") -> RouterConfig:
    """Run the student over the validation split (and the train split, for the OOD statistics), fit the router
    and save router.json + router_stats.npz next to the model. Returns the fitted config (with its curve).

    Train rows: every train input the teacher answered, filtered out or not (the OOD statistics describe the
    traffic the student was built for; a label the student does not know is left out of the class means).
    Validation rows: in-domain = the teacher answered one of the labels; out-of-scope = gold not a label."""
    from distill.dataset import rows
    from distill.project import Project
    from distill.students.predictor import load_predictor

    project = Project.open(project_dir)
    try:
        if project.spec.kind != "classify":
            raise DistillError(f"{project.root}: this router is for classify students (this project is "
                               f"'{project.spec.kind}'; its router is distill.serve.lm_router)")
        # the model the service will answer with: the serving model, unless pinned
        pred = load_predictor(project.serving_model(model_path).path, backend=backend)
        labels = list(pred.labels)
        tname = project.spec.get_teacher(teacher).name
        # every row, filtered out or not: the thresholds are about traffic, not label quality (test never read)
        data = rows(project, tname, splits=("train", "validation"), only_kept=False)
        known = set(labels)

        def out_of_scope(r) -> bool:
            return r.gold is not None and isinstance(r.gold, str) and r.gold not in known

        val = [r for r in data if r.split == "validation" and (r.answer in known or out_of_scope(r))]
        train = [r for r in data if r.split == "train" and r.answer in known]
        if not any(not out_of_scope(r) for r in val):
            raise DistillError(f"{project.root}: no labelled validation examples for teacher '{tname}'",
                               hint="import more data or label the validation split, then re-run")
        settings = RouterConfig(labels=labels, confidence=confidence_kind, ood=ood, ood_keep=ood_keep, delta=delta,
                                guarantee=guarantee, k=k, embedder=embedder, layers=layers)
        router = Router(settings, OodStats())       # statistics filled in below
        texts_val = [r.text for r in val]
        logits, s_val = router.student_features(pred, texts_val)
        feats_val = router.features(s_val, texts_val)
        stats = None
        if ood in ("mahalanobis", "knn", "combined"):
            if not train:
                raise DistillError(f"{project.root}: the {ood} OOD score needs labelled train examples, found none")
            texts_train = [r.text for r in train]
            train_layers = router.student_features(pred, texts_train)[1] if settings.needs_layers else None
            train_frozen = router.embed(texts_train) if settings.needs_frozen else None
            stats = fit_ood(settings, [r.answer for r in train], train_layers, train_frozen)
        is_oos = [out_of_scope(r) for r in val]
        cfg = calibrate(None, feats_val, [r.answer if not o else None for r, o in zip(val, is_oos)], coverage,
                        val_logits=logits, labels=labels, settings=settings, stats=stats, oos=is_oos)
        cfg.n_reference = len(train)
        # next to the weights actually served (the ONNX export when there is one): thresholds are backend-specific
        Router(cfg, stats).save(pred.path)
        return cfg
    finally:
        project.close()
