"""Student -> teacher routing for generative students (kind ``extract`` / ``generate``) served from a GGUF file:
answer with the student when its answer looks sure and the input looks like the training data; send the rest
to the teacher. The encoder counterpart is ``distill.serve.router``.

Signals, all read from the one generation the service runs anyway (``distill.students.gguf_engine.GenResult``):

==========================  =================================================================================
``mean_logprob``            mean over the answer's tokens of log p(token | prefix), the *unconstrained* model's
                            probability of each chosen token: the length-normalised sequence log-likelihood, the
                            standard sequence-level confidence of an autoregressive model (Malinin & Gales 2021,
                            "Uncertainty Estimation in Autoregressive Structured Prediction", ICLR, arXiv
                            2002.07650). Higher = surer.
``min_logprob``             the least likely token of the answer: one unsure token (a slot value, a digit) can be
                            the whole error, and the mean hides it (Varshney et al. 2023, "A Stitch in Time Saves
                            Nine", arXiv 2307.03987, use the minimum token probability to catch hallucinations).
``invalid_unconstrained``   the answer the model would have given *without* the grammar is not a valid answer:
                            the grammar overrode the greedy token somewhere (``interventions > 0``), or the text
                            fails the task's parser/schema (``task.parse_answer``, as the labeller and ``distill
                            eval`` parse). The constrained answer is then valid JSON the model did not mean.
``ood``                     cosine distance from the input's embedding to its k-th nearest neighbour among the **train
                            split's** inputs (Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest
                            Neighbors", ICML, arXiv 2204.06507: L2-normalised features, k-th NN distance; their
                            ablation of the sampling ratio shows a random subset of the training set works almost as
                            well, hence ``max_reference``). Higher = less like anything the student was trained on.
                            The embedding (``ood_source``): ``text`` (default), a frozen sentence encoder's (packaged
                            all-MiniLM-L6-v2) embedding of the input text; ``hidden``, the prompt's mean final hidden
                            state in the engine — averaged over the long shared instructions it hardly tells topics
                            apart (bench/router.py measured 0.39 of BANKING77 questions routed for a SNIPS slot
                            student). The reference is saved as lm_router_knn.npy.
==========================  =================================================================================

The rule: route to the teacher when ``route_invalid and invalid_unconstrained``, or ``ood > ood_threshold``, or
``confidence < conf_threshold`` (confidence = mean_logprob or min_logprob). The reason reported is the first of
those that holds, in that order.

**Calibration** (``calibrate_lm``; validation split only, never test). ``ood_threshold`` keeps ``ood_keep`` of the
validation inputs (validation is in-distribution by construction; same convention as the encoder router). The
confidence threshold is then chosen for a target ``coverage`` c (the share the student answers), two ways:

- *plain*: the lowest threshold at which the student answers ceil(c*n) of the n validation inputs. On new inputs
  its coverage is about c on average, and below c about half the time.
- *guaranteed* (the one served when it exists): with s(x) = confidence, or -inf for an invalid answer, and the
  cuts at order statistics s_(j1) and ood_(j2) of the validation scores, the probability mass a new exchangeable
  input has below s_(j1) is stochastically at most U_(j1) ~ Beta(j1, n-j1+1), the j1-th smallest of n uniforms
  (equal for continuous scores); likewise P(ood > ood_(j2)) <= Beta(n-j2+1, j2). Because
  P(Beta(j, n-j+1) <= u) = P(Binomial(n, u) >= j), the 1-delta quantile is the one-sided Clopper-Pearson upper
  limit for j-1 of n. This is the calibration-conditional ("PAC") view of split conformal prediction (Vovk 2012,
  "Conditional validity of inductive conformal predictors", ACML; the Beta law of the coverage given the
  calibration set in Angelopoulos & Bates 2021, "A Gentle Introduction to Conformal Prediction", arXiv
  2107.07511). A union bound over the two cuts (delta/2 each) gives: with probability >= 1 - delta over the
  validation draw, the coverage on new exchangeable inputs is >= 1 - b_conf - b_ood >= c. j1 is the largest
  index for which that holds; it depends only on n, c, delta and ood_keep, never on the labels.
  With a small n no index qualifies (e.g. n=20, c=0.9: nothing); then the plain threshold is served and the
  config says so, with the n needed and the most that *can* be promised at this n.

"Right", for the coverage -> quality curve only (the thresholds never look at labels): the student's answer vs
the teacher's validation answer where the teacher labelled it (or a human correction), else vs gold. Quality is
field F1 (extract; micro over (field, value) pairs, as ``distill eval``) or SQuAD token F1 (generate).

Everything above ``calibrate_lm_project`` is numpy on arrays (unit-tested without a model); that function runs
the GGUF student over the train and validation inputs and saves lm_router.json + lm_router_knn.npy next to the
.gguf that is served: thresholds are engine-specific.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np

from distill.errors import DistillError
from distill.fsutil import write_atomic, write_text_atomic
# the finite-sample bounds are shared with the encoder router; re-exported here for callers and tests
from distill.serve.conformal import (  # noqa: F401
    _deltas, binom_sf, guarantee_index, min_n_for_guarantee, no_promise_note, ood_rank, order_stat_upper,
)
from distill.serve.router import _finite, _threshold_for, read_thresholds

if TYPE_CHECKING:
    from distill.students.gguf_engine import GenResult

LM_ROUTER_FILE = "lm_router.json"
LM_KNN_FILE = "lm_router_knn.npy"
ConfidenceKind = Literal["mean_logprob", "min_logprob"]
CURVE_LEVELS = tuple(round(0.5 + 0.05 * i, 2) for i in range(11))    # 0.50, 0.55, ..., 1.00
DEFAULT_MAX_REFERENCE = 2000


# ------------------------------------------------------------------------------------------------
# signals


def logprob_confidence(token_logprobs: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, min) of the answer's token log-probabilities; (None, None) for an empty answer."""
    lp = np.asarray(token_logprobs, dtype=np.float64)
    if lp.size == 0:
        return None, None
    return float(lp.mean()), float(lp.min())


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    x = np.atleast_2d(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_distance(queries: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Cosine distance 1 - cos(z, z_(k)) of each query to its k-th nearest reference embedding, [N].

    queries [N, D] (any scale), reference [M, D] L2-normalised. Sun et al. 2022 threshold -||z - z_(k)|| on
    normalised features; for unit vectors ||a - b||^2 = 2 (1 - cos), so this is the same ordering."""
    q = l2_normalise(queries)
    ref = np.asarray(reference, dtype=np.float32)
    if q.shape[1] != ref.shape[1]:
        raise DistillError(f"router: prompt embedding has {q.shape[1]} dims, the kNN reference {ref.shape[1]}",
                           hint="the served model is not the calibrated one: re-run `distill route calibrate`")
    k = max(1, min(int(k), len(ref)))
    sims = q @ ref.T                                            # [N, M]
    kth = np.partition(sims, len(ref) - k, axis=1)[:, len(ref) - k]   # k-th largest similarity
    return (1.0 - kth).astype(np.float64)


# ------------------------------------------------------------------------------------------------
# config and decisions


@dataclass
class LMRouterConfig:
    """How the LM router scores and where it cuts. Saved as lm_router.json next to the served .gguf."""

    kind: str = "extract"                                   # task kind: extract | generate
    schema: dict | None = None                              # extract: the task schema the answer must validate against
    confidence: ConfidenceKind = "mean_logprob"             # which log-prob signal is thresholded
    coverage: float = 0.9                                   # target share the student answers
    delta: float = 0.05                                     # the coverage promise holds with probability >= 1 - delta
    ood_keep: float = 0.95                                  # share of validation inputs the OOD cut keeps (1 = no cut)
    k: int = 10                                             # k of the k-th nearest neighbour (Sun et al. use 50-1000
                                                            #   on 50k-1.2M images; small train sets need a small k)
    ood_source: str = "text"                                # kNN on: "text" = a frozen sentence encoder's embedding
                                                            #   of the input; "hidden" = the prompt's mean final
                                                            #   hidden state in the engine (bench/router.py)
    embedder: str = "all-minilm-l6-v2"                      # ood_source "text": the frozen encoder
    route_invalid: bool = True                              # route answers invalid before the grammar constrained them
    conf_threshold: float = float("-inf")                   # served: student answers when confidence >= this ...
    ood_threshold: float = float("inf")                     # ... and ood <= this (and the answer was valid)
    threshold_rule: str = "plain"                           # which confidence cut is served: guaranteed | plain
    plain_conf_threshold: float | None = None               # meets the target on validation only
    guaranteed_conf_threshold: float | None = None          # None: no threshold can promise the target at this n
    guaranteed_coverage: float | None = None                # served: coverage >= this w.p. >= 1-delta (None: none)
    max_guaranteed_coverage: float | None = None            # the most any threshold can promise at this n
    n_for_guarantee: int | None = None                      # validation rows needed to promise `coverage`
    achieved_coverage: float | None = None                  # served rule, on the validation split
    plain_coverage: float | None = None                     # plain rule, on the validation split
    n_validation: int = 0
    n_reference: int = 0                                    # train prompts in lm_router_knn.npy
    right: str = ""                                         # what "right" meant for the curve
    n_vs_teacher: int = 0                                   # validation rows scored vs the teacher's answer ...
    n_vs_gold: int = 0                                      # ... vs gold (no teacher answer) ...
    metric: str = "field_f1"                                # field_f1 (extract) | token_f1 (generate)
    signals: list[str] = field(default_factory=list)        # the signals that route, in reason order
    curve: list[dict[str, Any]] = field(default_factory=list)
    max_tokens: int = 0                                     # answer tokens at calibration (serve the same)
    model: dict[str, Any] = field(default_factory=dict)     # the .gguf calibrated (name, size, mtime)
    notes: list[str] = field(default_factory=list)
    created_at: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.coverage <= 1.0:
            raise DistillError(f"router coverage must be in (0, 1], got {self.coverage}",
                               hint="e.g. --coverage 0.9 lets the student answer 90% of requests")
        if not 0.0 < self.delta < 1.0:
            raise DistillError(f"router delta must be in (0, 1), got {self.delta}")
        if not 0.0 < self.ood_keep <= 1.0:
            raise DistillError(f"router ood_keep must be in (0, 1], got {self.ood_keep}")
        if self.k < 1:
            raise DistillError(f"router k must be >= 1, got {self.k}")
        if self.confidence not in ("mean_logprob", "min_logprob"):
            raise DistillError(f"router confidence {self.confidence!r} is not one of mean_logprob, min_logprob")
        if self.kind not in ("extract", "generate"):
            raise DistillError(f"the LM router routes extract/generate students, not '{self.kind}'")
        if self.ood_source not in ("text", "hidden"):
            raise DistillError(f"router ood_source {self.ood_source!r} is not one of text, hidden")

    def metric_name(self) -> str:
        return "field_f1" if self.kind == "extract" else "token_f1"

    def to_json(self) -> str:
        return json.dumps(_finite(asdict(self)), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, where: str = LM_ROUTER_FILE) -> "LMRouterConfig":
        d = read_thresholds(cls, text, where)
        d.setdefault("ood_source", "hidden")      # files written before the text source existed used hidden states
        return cls(**d)


@dataclass
class LMDecision:
    routed_to: Literal["student", "teacher"]
    reason: str        # confident | low_confidence | ood | invalid_unconstrained | pass_through
    signals: dict[str, float | bool | None]     # mean_logprob, min_logprob, invalid_unconstrained, ood


class _SpecView:
    """What ``task.parse_answer`` reads of a ProjectSpec for extract/generate: the served folder has no project."""

    def __init__(self, kind: str, schema: dict | None):
        self.kind, self.json_schema = kind, schema


def answer_valid(kind: str, schema: dict | None, text: str) -> bool:
    """The text parses as the labeller and ``distill eval`` parse a teacher reply (extract: JSON valid against
    the schema; generate: non-empty)."""
    from distill.task import ParseError, parse_answer

    try:
        parse_answer(_SpecView(kind, schema), text)   # type: ignore[arg-type]
    except ParseError:
        return False
    return True


def result_signals(result: "GenResult", kind: str | None, schema: dict | None, reference: np.ndarray | None,
                   k: int, embedding: np.ndarray | None = None) -> dict[str, float | bool | None]:
    """The four signals of one generation (module docstring). ``kind`` None: validity from the engine's
    interventions only; ``reference`` None: no OOD score; ``embedding``: the input's embedding for the kNN
    (default: the engine's prompt hidden state, ``result.embedding``)."""
    mean_lp, min_lp = logprob_confidence(result.token_logprobs)
    invalid = bool(result.interventions > 0) or (kind is not None and not answer_valid(kind, schema, result.text))
    ood = None
    emb = result.embedding if embedding is None else embedding
    if reference is not None and emb is not None:
        ood = float(knn_distance(emb, reference, k)[0])
    return {"mean_logprob": mean_lp, "min_logprob": min_lp, "invalid_unconstrained": invalid, "ood": ood}


class LMRouter:
    """Decides, per generated answer, whether the student's answer is served or the request goes to the teacher.

    ``LMRouter.pass_through()`` (no calibration) serves every answer and still reports the log-prob signals."""

    def __init__(self, config: LMRouterConfig | None, reference: np.ndarray | None = None,
                 embed: Callable[[Sequence[str]], np.ndarray] | None = None):
        self.config = config
        self.reference = None if reference is None else np.asarray(reference, dtype=np.float32)
        self._embed = embed
        if config is not None and math.isfinite(config.ood_threshold) and self.reference is None:
            raise DistillError("the LM router has an OOD threshold but no reference embeddings",
                               hint=f"re-run `distill route calibrate`; it writes {LM_KNN_FILE} beside "
                                    f"{LM_ROUTER_FILE}")

    @classmethod
    def pass_through(cls) -> "LMRouter":
        return cls(None)

    @property
    def calibrated(self) -> bool:
        return self.config is not None

    @property
    def _ood_on(self) -> bool:
        return self.config is not None and self.reference is not None and math.isfinite(self.config.ood_threshold)

    @property
    def needs_embedding(self) -> bool:
        """True when requests must be generated with ``want_embedding=True`` (the hidden-state OOD signal reads it)."""
        return self._ood_on and self.config.ood_source == "hidden"

    @property
    def needs_text(self) -> bool:
        """True when ``decide`` needs the input text (the text OOD signal embeds it with a frozen encoder)."""
        return self._ood_on and self.config.ood_source == "text"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._embed is None:
            from distill.fewshot import Embedder

            self._embed = Embedder(self.config.embedder)
        return self._embed(list(texts))

    def signals(self, result: "GenResult", text: str | None = None) -> dict[str, float | bool | None]:
        cfg = self.config
        if cfg is None:     # pass-through: no schema and no reference, only what the engine itself reports
            return result_signals(result, None, None, None, 1)
        if self.needs_embedding and result.embedding is None:
            raise DistillError("the LM router needs the prompt embedding of every request",
                               hint="generate with want_embedding=True when router.needs_embedding")
        if self.needs_text:
            if text is None:
                raise DistillError("the LM router's OOD signal embeds the input text: pass it to decide() / signals()")
            return result_signals(result, cfg.kind, cfg.schema, self.reference, cfg.k, embedding=self.embed([text]))
        return result_signals(result, cfg.kind, cfg.schema, self.reference if self.needs_embedding else None, cfg.k)

    def decide(self, result: "GenResult", text: str | None = None) -> LMDecision:
        sig = self.signals(result, text)
        cfg = self.config
        if cfg is None:
            return LMDecision("student", "pass_through", sig)
        conf = sig[cfg.confidence]
        conf = float("-inf") if conf is None else float(conf)     # no answer tokens: least confident
        if cfg.route_invalid and sig["invalid_unconstrained"]:
            reason = "invalid_unconstrained"
        elif sig["ood"] is not None and sig["ood"] > cfg.ood_threshold:
            reason = "ood"
        elif conf < cfg.conf_threshold:
            reason = "low_confidence"
        else:
            reason = "confident"
        return LMDecision("student" if reason == "confident" else "teacher", reason, sig)

    # -- persistence: lm_router.json (+ the kNN reference as .npy) next to the .gguf ------------------------
    def save(self, folder: str | Path) -> Path:
        if self.config is None:
            raise DistillError("a pass-through router has nothing to save")
        folder = Path(folder)
        # the reference first, the JSON last: a lm_router.json on disk always has its reference beside it
        if self.reference is not None:
            ref = self.reference.astype(np.float16)      # unit vectors: float16 keeps cosines to ~1e-3, half the disk

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:               # a file object: np.save(path) would append '.npy'
                    np.save(f, ref)
            write_atomic(folder / LM_KNN_FILE, write)
        return write_text_atomic(folder / LM_ROUTER_FILE, self.config.to_json())

    @classmethod
    def load(cls, folder: str | Path) -> "LMRouter":
        folder = Path(folder)
        f = folder / LM_ROUTER_FILE
        if not f.exists():
            raise DistillError(f"{f}: no LM router calibration next to the model",
                               hint="run `distill route calibrate PROJECT --coverage 0.9` first")
        cfg = LMRouterConfig.from_json(f.read_text(encoding="utf-8"), where=str(f))
        # the router belongs to the .gguf it was calibrated on: another file (a re-export, another quantisation)
        # beside it would be routed with thresholds that are not its own
        gguf = cfg.model.get("gguf_file")
        if gguf:
            g = folder / gguf
            if not g.is_file() or g.stat().st_size != cfg.model.get("bytes"):
                raise DistillError(f"{f}: calibrated on {gguf} ({cfg.model.get('bytes')} bytes), which is not the "
                                   f"file beside it now" + ("" if g.is_file() else " (missing)"),
                                   hint="re-run `distill route calibrate PROJECT` for the GGUF export you serve")
        knn = folder / LM_KNN_FILE
        ref = np.load(knn).astype(np.float32) if knn.exists() else None
        return cls(cfg, ref)


# ------------------------------------------------------------------------------------------------
# calibration (pure: arrays in, config out)


def _quality(kind: str, scores: dict[str, np.ndarray] | None, idx: np.ndarray) -> float | None:
    """Micro field F1 (extract) or mean token F1 (generate) over rows ``idx`` of row_scores-shaped arrays."""
    if scores is None or len(idx) == 0:
        return None
    if kind == "extract":
        den = float(scores["n_pred"][idx].sum() + scores["n_ref"][idx].sum())
        return 2.0 * float(scores["tp"][idx].sum()) / den if den else None
    return float(scores["tok_f1"][idx].mean())


def _system_scores(student: dict[str, np.ndarray], teacher: dict[str, np.ndarray], covered: np.ndarray
                   ) -> dict[str, np.ndarray]:
    """Per-row scores of the routed system: the student's where it answers, the teacher's where routed."""
    return {k: np.where(covered, student[k], teacher[k]) for k in student}


def calibrate_lm(mean_logprob: Sequence[float | None], min_logprob: Sequence[float | None],
                 invalid: Sequence[bool], ood: Sequence[float] | None = None, *, coverage: float = 0.9,
                 confidence: ConfidenceKind = "mean_logprob", route_invalid: bool | None = None,
                 ood_keep: float = 0.95, delta: float = 0.05, guarantee: bool = True, kind: str = "extract",
                 student_scores: dict[str, np.ndarray] | None = None,
                 teacher_scores: dict[str, np.ndarray] | None = None, has_reference: Sequence[bool] | None = None,
                 has_teacher: Sequence[bool] | None = None, levels: Sequence[float] = CURVE_LEVELS,
                 settings: LMRouterConfig | None = None) -> LMRouterConfig:
    """Fit the LM router's thresholds on n validation answers.

    Inputs (one entry per validation row):
      mean_logprob, min_logprob  the answer's token log-prob mean/min (None: empty answer = least confident)
      invalid                    the unconstrained answer was invalid (interventions > 0 or fails the schema)
      ood                        kNN distance to the train prompts (None: no OOD cut)
      route_invalid              None = on only if the target coverage stays reachable on validation with it
      student_scores             ``evaluate.lm.row_scores`` of the student's answers vs the reference ("right")
      has_reference              rows that have a reference (teacher answer or gold); the curve scores only these
      teacher_scores, has_teacher the teacher's answers vs the same reference, and where it answered: the routed
                                 system (teacher answers what is routed) is scored on the rows it answered

    The thresholds depend on the signals and ``coverage``/``delta``/``ood_keep`` only, never on the labels.
    Returns the config with both confidence cuts (plain, guaranteed), the one served, and the coverage ->
    quality curve at ``levels`` (plain cut per level, the same OOD/validity cuts)."""
    base = settings or LMRouterConfig()
    cfg = LMRouterConfig(**{**asdict(base), "coverage": coverage, "confidence": confidence, "ood_keep": ood_keep,
                            "delta": delta, "kind": kind})      # re-validates
    lps = mean_logprob if confidence == "mean_logprob" else min_logprob
    conf = np.array([float("-inf") if v is None or not math.isfinite(float(v)) else float(v) for v in lps])
    inv = np.asarray(invalid, dtype=bool)
    n = len(conf)
    if n == 0:
        raise DistillError("router calibration needs validation inputs, found none",
                           hint="import inputs with a validation share (splits.validation in distill.yaml)")
    if len(inv) != n or (ood is not None and len(ood) != n):
        raise DistillError(f"router: signal arrays of different lengths ({n}, {len(inv)}, {len(ood or [])})")
    k_target = math.ceil(coverage * n - 1e-9)

    # 1. the OOD cut: keep ood_keep of validation (a fixed rank, so the bound below applies)
    ood_cut = ood is not None and ood_keep < 1.0
    o = np.asarray(ood, dtype=np.float64) if ood is not None else np.zeros(n)
    j2 = ood_rank(n, ood_keep) if ood_cut else n
    cfg.ood_threshold = float(np.sort(o)[j2 - 1]) if ood_cut else float("inf")
    in_dist = o <= cfg.ood_threshold

    # 2. route invalid answers? by default only when the target stays reachable on validation
    if route_invalid is None:
        route_invalid = bool((in_dist & ~inv).sum() >= k_target)
        if not route_invalid:
            cfg.notes.append(f"invalid-before-constraints answers are NOT routed: {int(inv.sum())} of {n} validation "
                             f"answers were, and routing them would leave the student under {coverage:.0%}")
    cfg.route_invalid = route_invalid
    dropped = inv if route_invalid else np.zeros(n, dtype=bool)
    passing = in_dist & ~dropped
    cfg.signals = (["invalid_unconstrained"] if route_invalid else []) + (["ood"] if ood_cut else []) + [confidence]

    # 3a. plain cut: meets the target on validation
    t_plain = _threshold_for(conf, passing, k_target)
    cfg.plain_conf_threshold = t_plain
    cfg.plain_coverage = float((passing & (conf >= t_plain)).mean())
    if t_plain == float("-inf"):
        cfg.notes.append(f"coverage {coverage:.0%} is not reachable on validation: the validity/OOD cuts already "
                         f"route {int((~passing).sum())} of {n}; the student answers every other input")

    # 3b. guaranteed cut (module docstring): s = confidence, -inf where the answer is routed as invalid
    d1, d2 = _deltas(delta, ood_cut)
    b_ood = order_stat_upper(n - j2 + 1, n, d2) if ood_cut else 0.0
    s_sorted = np.sort(np.where(dropped, float("-inf"), conf))
    j1 = guarantee_index(n, coverage, d1, b_ood)
    t_guar = float(s_sorted[j1 - 1]) if j1 >= 1 and math.isfinite(s_sorted[j1 - 1]) else None
    cfg.guaranteed_conf_threshold = t_guar
    cfg.max_guaranteed_coverage = (1.0 - order_stat_upper(1, n, d1) - b_ood) if math.isfinite(s_sorted[0]) else None
    cfg.n_for_guarantee = min_n_for_guarantee(coverage, delta, ood_keep if ood_cut else None)
    if guarantee and t_guar is not None:
        cfg.threshold_rule, cfg.conf_threshold = "guaranteed", t_guar
        cfg.guaranteed_coverage = 1.0 - order_stat_upper(j1, n, d1) - b_ood
    else:
        cfg.threshold_rule, cfg.conf_threshold = "plain", t_plain
        cfg.guaranteed_coverage = None
        if guarantee:
            why = ("an invalid or empty answer sits at the cut" if j1 >= 1 else
                   f"n={n} validation rows are too few (needs about {cfg.n_for_guarantee})"
                   if cfg.n_for_guarantee else "the OOD cut alone may route too much")
            cfg.notes.append(no_promise_note(coverage, delta, why, n, cfg.max_guaranteed_coverage))
    cfg.achieved_coverage = float((passing & (conf >= cfg.conf_threshold)).mean())
    cfg.n_validation = n

    # 4. the coverage -> quality curve (plain cut per level)
    has_ref = np.ones(n, bool) if has_reference is None else np.asarray(has_reference, bool)
    has_t = np.zeros(n, bool) if has_teacher is None or teacher_scores is None else np.asarray(has_teacher, bool)
    cfg.curve = []
    for lev in sorted(set(levels) | {coverage}):
        t = _threshold_for(conf, passing, math.ceil(lev * n - 1e-9))
        covered = passing & (conf >= t)
        pt: dict[str, Any] = {
            "target": float(lev), "coverage": float(covered.mean()), "threshold": t,
            "answered": int(covered.sum()), "teacher_share": float(1.0 - covered.mean()),
            f"student_{cfg.metric_name()}": _quality(kind, student_scores, np.flatnonzero(covered & has_ref)),
        }
        if has_t.any() and student_scores is not None:
            sys_scores = _system_scores(student_scores, teacher_scores, covered)   # type: ignore[arg-type]
            pt[f"system_{cfg.metric_name()}"] = _quality(kind, sys_scores, np.flatnonzero(has_t))
        cfg.curve.append(_finite(pt))
    cfg.metric = cfg.metric_name()
    return cfg


# ------------------------------------------------------------------------------------------------
# the project-level step `distill route calibrate` runs for extract/generate projects


def gguf_folder(project, model_path: str | Path | None = None) -> Path:
    """The GGUF folder that is served: ``model_path`` when it is one, else the GGUF export of the serving model
    (or of the pinned training run)."""
    from distill.students.causal_lm import STUDENT_FILE

    ref = project.serving_model(model_path)
    if (ref.path / STUDENT_FILE).is_file() and any(ref.path.glob("*.gguf")):
        return ref.path
    from distill.export.gguf import gguf_export_for

    # a pinned merged export stands for the training run it was merged from
    run_id = ref.record.get("model_run_id") if ref.kind == "export_lm" else None
    folder = gguf_export_for(project, run_id or ref.run_id)
    if folder is None:
        raise DistillError(f"{project.root}: model {ref.run_id} has no GGUF export; the LM router calibrates the "
                           "engine that serves it (thresholds are engine-specific)",
                           hint=f"run `distill export {project.root} --format gguf` first, or pin a GGUF folder "
                                "with --model")
    return folder


def _hashed_subset(rows: list, m: int) -> list:
    """A fixed pseudo-random subset of ``m`` rows (by hashed id): the same rows on every run."""
    import hashlib

    if len(rows) <= m:
        return rows
    return sorted(rows, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())[:m]


def _run_all(student, make_requests, rows: list, say, what: str) -> list:
    """Submit everything at once (the engine batches continuously), collect in order; None for an input that
    does not fit the context."""
    from distill.students.gguf_engine import ContextLengthError

    futures = []
    for r in rows:
        try:
            futures.append(student.engine.submit(make_requests(r)))
        except ContextLengthError:
            futures.append(None)
    out = []
    for i, f in enumerate(futures, start=1):
        out.append(None if f is None else f.result())
        if i % 50 == 0 or i == len(futures):
            say(f"route calibrate: {what} {i}/{len(futures)}")
    return out


def calibrate_lm_project(project_dir: str | Path, *, model_path: str | Path | None = None, coverage: float = 0.9,
                         confidence: ConfidenceKind = "mean_logprob", ood_keep: float = 0.95,
                         route_invalid: bool | None = None, delta: float = 0.05, guarantee: bool = True,
                         teacher: str | None = None, k: int = 10, max_tokens: int | None = None,
                         max_reference: int = DEFAULT_MAX_REFERENCE, n_ctx: int = 2048, n_threads: int | None = None,
                         max_batch: int = 4, progress: bool = True, ood_source: str = "text",
                         embedder: str = "all-minilm-l6-v2") -> LMRouterConfig:
    """Fit the LM router of an extract/generate project and save it next to the served .gguf.

    1. The served GGUF folder (``gguf_folder``) and the validation + train inputs (all of them: the thresholds
       are about traffic, not label quality, so filtered-out rows count too; test is never read).
    2. Reference embeddings: the engine prefills up to ``max_reference`` train prompts (max_tokens=0,
       want_embedding=True); L2-normalised, they become lm_router_knn.npy.
    3. The student answers every validation input as the service would: greedy, at most ``max_tokens``
       tokens (default: the teacher's ``max_tokens``, the service's default cap), constrained by the task schema
       (extract), with the prompt embedding. Inputs longer than ``n_ctx`` are left out (the service refuses them).
    4. Signals -> ``calibrate_lm`` (thresholds from coverage only; the curve scores the student vs the
       teacher's validation answer where there is one, else vs gold).
    5. lm_router.json + lm_router_knn.npy into the GGUF folder. Returns the config (with its curve)."""
    from distill.dataset import rows
    from distill.evaluate.common import say as _say
    from distill.evaluate.lm import row_scores
    from distill.project import Project
    from distill.students.gguf_engine import GenRequest, GGUFStudent
    from distill.task import ParseError, parse_answer, render_messages

    say = _say if progress else (lambda *a: None)
    if k < 1 or max_reference < 1:
        raise DistillError(f"--k and max_reference must be >= 1, got {k} and {max_reference}")
    project = Project.open(project_dir)
    try:
        spec = project.spec
        if spec.kind not in ("extract", "generate"):
            raise DistillError(f"calibrate_lm_project routes extract/generate students; this project is '{spec.kind}'",
                               hint="classify projects are calibrated by distill.serve.router.calibrate_project")
        tspec = spec.get_teacher(teacher)
        tname = tspec.name
        # the service caps answers at the teacher's max_tokens by default: calibrate what is served
        max_tokens = max_tokens or tspec.max_tokens
        if max_tokens < 1:
            raise DistillError(f"--max-tokens must be >= 1, got {max_tokens}")
        folder = gguf_folder(project, model_path)
        schema = spec.json_schema if spec.kind == "extract" else None
        # only_kept=False: validation rows without a teacher answer (e.g. SNIPS) are real traffic too
        data = rows(project, tname, splits=("train", "validation"), only_kept=False)
        val = [r for r in data if r.split == "validation"]
        train = _hashed_subset([r for r in data if r.split == "train"], max_reference)
        if not val:
            raise DistillError(f"{project.root}: the validation split is empty; the router is calibrated on it",
                               hint="import more inputs (splits.validation in distill.yaml sets the share)")
        notes: list[str] = []
        use_ood = ood_keep < 1.0
        if use_ood and not train:
            notes.append("no train inputs: the OOD signal is off (it measures distance to the train prompts)")
            use_ood = False

        def msgs(r) -> list[dict]:
            return render_messages(spec, r.text, r.segment, r.meta)

        say(f"route calibrate: {folder} ({len(val)} validation inputs, {len(train) if use_ood else 0} train "
            f"prompts for the OOD reference, at most {max_tokens} answer tokens)")
        text_ood = use_ood and ood_source == "text"
        if text_ood:
            from distill.fewshot import Embedder

            embed = Embedder(embedder)
        student = GGUFStudent(folder, n_ctx_per_seq=n_ctx, n_threads=n_threads, max_batch=max_batch)
        try:
            ref = None
            if text_ood:
                # a frozen sentence encoder's embeddings of the train inputs (bench/router.py: the engine's
                # prompt hidden state, averaged over the long shared instructions, hardly tells topics apart)
                ref = l2_normalise(embed([r.text for r in train]))
            elif use_ood:
                emb = _run_all(student, lambda r: GenRequest(student.prompt_tokens(msgs(r)), 0, want_embedding=True),
                               train, say, "train embeddings")
                emb = [e.embedding for e in emb if e is not None]
                if emb:
                    ref = l2_normalise(np.stack(emb))
                else:
                    notes.append("no train prompt fits the engine's context: the OOD signal is off")
                    use_ood = False
            results = _run_all(student, lambda r: student.request(msgs(r), max_tokens, schema=schema,
                                                                  want_embedding=use_ood and not text_ood),
                               val, say, "validation answers")
            gguf_file = student.gguf_file
        finally:
            student.close()

        # inputs too long for the engine's context: the service refuses them (400), so they are not traffic to route
        skipped = sum(res is None for res in results)
        if skipped:
            notes.append(f"{skipped} validation inputs do not fit the engine's context ({n_ctx} tokens) and were "
                         "left out")
            val = [r for r, res in zip(val, results) if res is not None]
            results = [res for res in results if res is not None]
            if not val:
                raise DistillError("no validation input fits the engine's context", hint="raise --n-ctx")
        # signals, exactly as the served router computes them
        k = min(k, len(ref)) if ref is not None else k
        settings = LMRouterConfig(kind=spec.kind, schema=schema, k=k, max_tokens=max_tokens, notes=notes,
                                  ood_source=ood_source, embedder=embedder)
        if text_ood:
            val_emb = embed([r.text for r in val])
            sig = [result_signals(res, spec.kind, schema, ref, k, embedding=e) for res, e in zip(results, val_emb)]
        else:
            sig = [result_signals(res, spec.kind, schema, ref, k) for res in results]

        # "right": the teacher's validation answer (or a human correction), else gold
        refs = [r.answer if r.answer is not None else r.gold for r in val]
        has_ref = np.array([x is not None for x in refs])
        has_teacher = np.array([r.answer is not None for r in val])
        answers = []
        for res in results:
            try:
                answers.append(parse_answer(spec, res.text))
            except ParseError:
                answers.append(None)
        idx = np.flatnonzero(has_ref)
        student_scores = teacher_scores = None
        if len(idx):
            part = row_scores(spec.kind, spec, [answers[i] for i in idx], [refs[i] for i in idx])
            student_scores = {key: np.zeros(len(val)) for key in part}
            for key, v in part.items():
                student_scores[key][idx] = v
            tpart = row_scores(spec.kind, spec, [refs[i] if has_teacher[i] else None for i in idx],
                               [refs[i] for i in idx])
            teacher_scores = {key: np.zeros(len(val)) for key in tpart}
            for key, v in tpart.items():
                teacher_scores[key][idx] = v
        n_t, n_g = int(has_teacher.sum()), int((has_ref & ~has_teacher).sum())
        if n_t and not n_g:
            right = f"vs teacher '{tname}' (its validation answers)"
        elif n_g and not n_t:
            right = "vs gold (validation has no teacher answers)"
        elif n_t:
            right = f"vs teacher '{tname}' where it answered ({n_t} rows), else vs gold ({n_g} rows)"
        else:
            right = "nothing: validation has neither teacher answers nor gold, so the curve has no quality column"
        if not n_t:
            notes.append(f"validation has no answers from teacher '{tname}': the curve is "
                         + ("vs gold" if n_g else "coverage only")
                         + " and there is no routed-system column (the thresholds never depend on labels)")
        if len(val) < 50:
            notes.append(f"only {len(val)} validation rows: the thresholds and the curve are noisy; import more "
                         "validation inputs (they need no labels)")

        cfg = calibrate_lm([s["mean_logprob"] for s in sig], [s["min_logprob"] for s in sig],
                           [s["invalid_unconstrained"] for s in sig],
                           [s["ood"] for s in sig] if use_ood else None, coverage=coverage, confidence=confidence,
                           route_invalid=route_invalid, ood_keep=ood_keep if use_ood else 1.0, delta=delta,
                           guarantee=guarantee, kind=spec.kind, student_scores=student_scores,
                           teacher_scores=teacher_scores if n_t else None, has_reference=has_ref,
                           has_teacher=has_teacher, settings=settings)
        st = gguf_file.stat()
        cfg.right, cfg.n_vs_teacher, cfg.n_vs_gold = right, n_t, n_g
        cfg.n_reference = 0 if ref is None else len(ref)
        cfg.model = {"folder": str(folder), "gguf_file": gguf_file.name, "bytes": st.st_size, "mtime": st.st_mtime}
        cfg.created_at = time.time()
        # next to the .gguf actually served: the thresholds belong to this engine and quantisation
        LMRouter(cfg, ref).save(folder)
        return cfg
    finally:
        project.close()
