"""Student -> teacher routing: answer with the student when it is confident and the input looks like the
training data; send everything else to the teacher.

Two scores per input, both computed from one student forward pass:

- **confidence** (higher = surer), one of
  - ``max_prob``: p(top1)
  - ``margin``:   p(top1) - p(top2)
  - ``entropy``:  1 - H(p) / log(L)   (normalised so 1 = one-hot, 0 = uniform)
- **ood_score** (higher = more out-of-distribution), one of
  - ``energy``: E(x) = -T * logsumexp(f(x) / T) over the logits f(x) (Liu et al. 2020, "Energy-based
    Out-of-distribution Detection", arXiv 2010.03759, Eq. 1 with the sign kept: in-distribution inputs
    get *lower* energy). Needs logits, not probabilities: softmax throws away exactly the magnitude
    that the energy reads.
  - ``mahalanobis``: min over classes c of (z - mu_c)^T Sigma^-1 (z - mu_c) on the student's pooled
    features z, with class means mu_c and one shared ("tied") covariance Sigma fitted on the train split
    (Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", arXiv 1807.03888, Eq. 2; we use the last layer only and no input
    pre-processing).
  - ``none``.

``calibrate`` picks the thresholds on the validation split (never the test split): the OOD threshold keeps
``ood_keep`` of validation inputs (validation is in-distribution by construction, so this is the "TPR at
the threshold" convention of both papers), then the confidence threshold is the lowest that keeps the
student's share at ``coverage``. It also returns the coverage -> quality curve that shows what a
different target would cost.

Everything here is numpy; the only torch/onnx code is in ``calibrate_project`` at the bottom, which
feeds the model's outputs in.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from distill.errors import DistillError
from distill.fsutil import write_atomic, write_text_atomic

ConfidenceKind = Literal["max_prob", "margin", "entropy"]
OodKind = Literal["energy", "mahalanobis", "none"]
ROUTER_FILE = "router.json"
MAHA_FILE = "router_mahalanobis.npz"


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
    """Class means [C, D] and the shared precision matrix [D, D] (Lee et al. 2018, Eq. 1)."""

    means: np.ndarray
    precision: np.ndarray

    def score(self, feats: np.ndarray) -> np.ndarray:
        """min_c (z - mu_c)^T P (z - mu_c), [N]. Higher = farther from every class."""
        # Expanded as z'Pz - 2 z'P mu_c + mu_c'P mu_c: O(N*D^2 + N*C*D) instead of the O(N*C*D^2) of the
        # direct form, which is ~1e11 operations for 5,500 inputs x 150 classes x 384 dims (CLINC150).
        z = np.asarray(feats, dtype=np.float64)
        zp = z @ self.precision                                     # [N, D]
        mp = self.means @ self.precision                            # [C, D]
        m = (zp * z).sum(1)[:, None] - 2 * zp @ self.means.T + (mp * self.means).sum(1)[None, :]
        return np.maximum(m, 0.0).min(-1)                           # clamp round-off below 0

    def save(self, path: Path) -> None:
        # np.savez on a file object: np.savez(path) would append '.npz' to the temporary name
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, means=self.means, precision=self.precision)
        write_atomic(path, write)

    @classmethod
    def load(cls, path: Path) -> "Mahalanobis":
        with np.load(path) as f:
            return cls(means=f["means"], precision=f["precision"])


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
    x = np.concatenate(centred)
    cov = x.T @ x / max(len(x), 1)
    cov += np.eye(d) * shrinkage * max(float(np.trace(cov)) / d, 1e-12)
    return Mahalanobis(means=means, precision=np.linalg.pinv(cov))


# ------------------------------------------------------------------------------------------------
# config and decisions


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


@dataclass
class RouterConfig:
    """How the router scores and where it cuts. Saved as router.json next to the model."""

    labels: list[str] = field(default_factory=list)       # in logit order
    confidence: ConfidenceKind = "max_prob"                # which confidence score to threshold
    ood: OodKind = "energy"                                # which OOD score to threshold
    temperature: float = 1.0                               # energy temperature T (the paper uses 1)
    coverage: float = 0.9                                  # target share the student answers
    ood_keep: float = 0.99                                 # share of validation inputs the OOD cut keeps
    conf_threshold: float = float("-inf")                  # student answers when confidence >= this ...
    ood_threshold: float = float("inf")                    # ... and ood_score <= this
    achieved_coverage: float | None = None                 # on the validation split
    n_validation: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 <= self.coverage <= 1.0:
            raise DistillError(f"router coverage must be in [0, 1], got {self.coverage}",
                               hint="e.g. --coverage 0.9 lets the student answer 90% of requests")
        if not 0.0 < self.ood_keep <= 1.0:
            raise DistillError(f"router ood_keep must be in (0, 1], got {self.ood_keep}")
        if self.temperature <= 0:
            raise DistillError(f"router temperature must be > 0, got {self.temperature}")
        if self.confidence not in ("max_prob", "margin", "entropy"):
            raise DistillError(f"router confidence {self.confidence!r} is not one of max_prob, margin, entropy")
        if self.ood not in ("energy", "mahalanobis", "none"):
            raise DistillError(f"router ood {self.ood!r} is not one of energy, mahalanobis, none")

    def to_json(self) -> str:
        d = asdict(self)
        # JSON has no infinities; None means "no cut"
        for k in ("conf_threshold", "ood_threshold"):
            if not math.isfinite(d[k]):
                d[k] = None
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "router.json") -> "RouterConfig":
        return cls(**read_thresholds(cls, text, where))


@dataclass
class RouterDecision:
    label: str
    probs: dict[str, float]
    confidence: float
    ood_score: float | None
    routed_to: Literal["student", "teacher"]
    reason: str            # 'confident' | 'low_confidence' | 'ood' (when both, 'ood')


class Router:
    def __init__(self, config: RouterConfig, mahalanobis: Mahalanobis | None = None):
        if config.ood == "mahalanobis" and mahalanobis is None:
            raise DistillError("router uses ood: mahalanobis but no class means/covariance were given",
                               hint=f"re-run `distill route calibrate`; it writes {MAHA_FILE} next to router.json")
        self.config = config
        self.maha = mahalanobis

    def scores(self, logits: np.ndarray, feats: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probs, confidence, ood_score) for a batch; ood_score is NaN when ood == 'none'."""
        logits = np.asarray(logits, dtype=np.float64)
        probs = softmax(logits)
        conf = confidence(probs, self.config.confidence)
        ood = ood_scores(self.config, logits, feats, self.maha)
        return probs, conf, ood

    def decide(self, logits: np.ndarray, feats: np.ndarray | None = None) -> list[RouterDecision]:
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

    # -- persistence: router.json (+ the Mahalanobis stats as .npz) next to the model -------------------
    def save(self, model_dir: str | Path) -> Path:
        model_dir = Path(model_dir)
        f = model_dir / ROUTER_FILE
        # the statistics first, router.json last: a router.json on disk always has its statistics beside it
        if self.maha is not None:
            self.maha.save(model_dir / MAHA_FILE)
        return write_text_atomic(f, self.config.to_json())

    @classmethod
    def load(cls, model_dir: str | Path) -> "Router":
        model_dir = Path(model_dir)
        f = model_dir / ROUTER_FILE
        if not f.exists():
            raise DistillError(f"{f}: no router calibration next to the model",
                               hint="run `distill route calibrate PROJECT --coverage 0.9` first")
        cfg = RouterConfig.from_json(f.read_text(encoding="utf-8"), where=str(f))
        maha = Mahalanobis.load(model_dir / MAHA_FILE) if (model_dir / MAHA_FILE).exists() else None
        return cls(cfg, maha)


def ood_scores(cfg: RouterConfig, logits: np.ndarray | None, feats: np.ndarray | None,
               maha: Mahalanobis | None) -> np.ndarray:
    if cfg.ood == "energy":
        if logits is None:
            raise DistillError("the energy OOD score needs the student's logits, not probabilities")
        return energy(logits, cfg.temperature)
    if cfg.ood == "mahalanobis":
        if feats is None or maha is None:
            raise DistillError("the Mahalanobis OOD score needs student features and fitted class statistics")
        return maha.score(feats)
    n = 0 if logits is None else len(logits)
    return np.full(n, np.nan)


# ------------------------------------------------------------------------------------------------
# calibration


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


def calibrate(val_probs: np.ndarray | None, val_features: np.ndarray | None, val_labels_teacher: Sequence[Any],
              coverage: float = 0.9, *, val_logits: np.ndarray | None = None, labels: list[str] | None = None,
              settings: RouterConfig | None = None, mahalanobis: Mahalanobis | None = None,
              grid: Sequence[float] | None = None) -> RouterConfig:
    """Fit the router's thresholds on the validation split.

    Inputs (N validation examples, L labels, D feature dims):
      val_probs [N, L] or val_logits [N, L] (logits are needed for ood='energy'; probs are derived from them)
      val_features [N, D] (needed for ood='mahalanobis', with ``mahalanobis`` fitted on the train split)
      val_labels_teacher: N label names (or indices): the teacher's answers, which the system reproduces
      coverage: target share of requests the student answers

    Returns a RouterConfig with ``conf_threshold``, ``ood_threshold``, ``achieved_coverage`` and ``curve``:
    one point per coverage level in ``grid`` with the student's accuracy on the part it covers, the accuracy
    of the routed system (teacher answers the rest, so it is right by definition against teacher labels)
    and the teacher's share of requests (= the cost share relative to sending everything to the teacher).
    Against teacher labels the system accuracy and the teacher share can only fall as coverage grows.
    """
    base = settings or RouterConfig()
    cfg = RouterConfig(**{**asdict(base), "coverage": coverage})   # re-validates coverage
    if labels is not None:
        cfg.labels = list(labels)
    if val_logits is not None:
        val_logits = np.asarray(val_logits, dtype=np.float64)
        probs = softmax(val_logits)
    elif val_probs is not None:
        probs = np.asarray(val_probs, dtype=np.float64)
    else:
        raise DistillError("calibrate needs validation probabilities or logits")
    n, n_labels = probs.shape
    if not cfg.labels:
        cfg.labels = [str(i) for i in range(n_labels)]
    if len(cfg.labels) != n_labels:
        raise DistillError(f"router: {len(cfg.labels)} label names for {n_labels} model outputs")
    if len(val_labels_teacher) != n:
        raise DistillError(f"router: {len(val_labels_teacher)} teacher labels for {n} validation rows")
    if n == 0:
        raise DistillError("router calibration needs validation examples with teacher labels, found none",
                           hint="label the validation split first (`distill label PROJECT`)")
    if cfg.ood == "energy" and val_logits is None:
        raise DistillError("router ood='energy' needs val_logits (softmax probabilities lose the energy)",
                           hint="pass val_logits, or use ood='mahalanobis' / 'none'")

    y = label_indices(val_labels_teacher, cfg.labels)
    correct = probs.argmax(-1) == y
    conf = confidence(probs, cfg.confidence)
    ood = ood_scores(cfg, val_logits, val_features, mahalanobis)
    if cfg.ood == "none":
        passing = np.ones(n, dtype=bool)
        cfg.ood_threshold = float("inf")
    else:
        cfg.ood_threshold = float(np.quantile(ood, cfg.ood_keep, method="higher")) if cfg.ood_keep < 1 else float("inf")
        passing = ood <= cfg.ood_threshold

    k = math.ceil(coverage * n - 1e-9)
    cfg.conf_threshold = _threshold_for(conf, passing, k)
    cfg.achieved_coverage = _point(conf, passing, correct, cfg.conf_threshold)["coverage"]
    cfg.n_validation = n

    levels = sorted(set(grid if grid is not None else [round(x, 2) for x in np.arange(0.0, 1.0001, 0.05)]) | {coverage})
    cfg.curve = []
    for lev in levels:
        p = _point(conf, passing, correct, _threshold_for(conf, passing, math.ceil(lev * n - 1e-9)))
        p["target"] = float(lev)
        cfg.curve.append({k2: (None if isinstance(v, float) and not math.isfinite(v) else v) for k2, v in p.items()})
    return cfg


# ------------------------------------------------------------------------------------------------
# the project-level step `distill route calibrate` runs


def calibrate_project(project_dir: str | Path, *, model_path: str | Path | None = None, coverage: float = 0.9,
                      confidence_kind: ConfidenceKind = "max_prob", ood: OodKind = "energy",
                      ood_keep: float = 0.99, teacher: str | None = None, backend: str = "auto") -> RouterConfig:
    """Run the student over the validation split (and the train split, for Mahalanobis), fit the router
    and save router.json next to the model. Returns the fitted config (with its curve)."""
    from distill.dataset import rows
    from distill.project import Project
    from distill.students.predictor import load_predictor

    project = Project.open(project_dir)
    try:
        if project.spec.kind != "classify":
            raise DistillError(f"{project.root}: `route calibrate` supports classify students today "
                               f"(this project is '{project.spec.kind}')")
        # the model the service will answer with: the serving model, unless pinned
        pred = load_predictor(project.serving_model(model_path).path, backend=backend)
        tname = project.spec.get_teacher(teacher).name
        data = rows(project, tname, splits=("train", "validation"))
        val = [r for r in data if r.split == "validation" and r.answer is not None]
        train = [r for r in data if r.split == "train" and r.answer is not None]
        if not val:
            raise DistillError(f"{project.root}: no labelled validation examples for teacher '{tname}'",
                               hint="import more data or label the validation split, then re-run")
        logits, feats = pred.logits_and_embeddings([r.text for r in val])
        maha = None
        if ood == "mahalanobis":
            if not train:
                raise DistillError(f"{project.root}: Mahalanobis needs labelled train examples, found none")
            _, tf = pred.logits_and_embeddings([r.text for r in train])
            maha = fit_mahalanobis(tf, label_indices([r.answer for r in train], pred.labels), len(pred.labels))
        settings = RouterConfig(labels=list(pred.labels), confidence=confidence_kind, ood=ood, ood_keep=ood_keep)
        cfg = calibrate(None, feats, [r.answer for r in val], coverage, val_logits=logits, labels=list(pred.labels),
                        settings=settings, mahalanobis=maha)
        # next to the weights actually served (the ONNX export when there is one): thresholds are backend-specific
        Router(cfg, maha).save(pred.path)
        return cfg
    finally:
        project.close()
