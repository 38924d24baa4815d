"""Which teacher labels are probably wrong, without gold: confident learning on out-of-fold probabilities.

A user distilling real traffic has no gold to catch the teacher's mistakes, and the teacher's own
confidence barely separates its right answers from its wrong ones (a small teacher is confidently wrong).
Confident learning (Northcutt, Jiang and Chuang 2021, "Confident Learning: Estimating Uncertainty in Dataset
Labels", JAIR 70, arXiv 1911.00068) estimates the joint distribution of given and true labels from
*out-of-sample* predicted probabilities and flags the examples whose given label is least likely under it.
We use the reference implementation (``cleanlab.filter.find_label_issues``) and add only what is ours:

1. features for a cheap model: TF-IDF word + character n-grams and the packaged all-MiniLM-L6-v2's
   mean-pooled sentence embeddings, side by side (default ``both``), or either alone;
2. out-of-fold probabilities: k-fold logistic regression trained on the *teacher's* labels, so no example's
   probability comes from a model that saw its own label;
3. combined with the teacher's own label distribution by a log-linear opinion pool (Genest and Zidek 1986),
   p ∝ cheap^(1-w) · teacher^w with ``w = teacher_weight``: the cheap model knows what the rest of the data
   says about similar inputs, the teacher knows the input. A linear mixture lets a teacher that is 0.99 sure
   of every answer (small LLM teachers are) veto every flag; the geometric pool only tilts the odds;
4. the flag rule is cleanlab's ``filter_by`` (``method``). We default to ``predicted_neq_given`` (flag when the
   pooled argmax differs from the given label), not cleanlab's default ``prune_by_noise_rate``: on the SNIPS
   demo the teacher's errors are systematic (whole sub-intents mislabelled the same way), the confident joint
   then estimates only 8-18 issues among its 75 real errors, while argmax-disagreement recovers ~half of them
   at 0.75-0.8 precision (bench/filters.py measures it; the gold used to choose the default is train/validation
   gold of the demo, never test);
5. the flags ranked by the cleanlab self-confidence of the given label (lowest first): the order a reviewer
   should read them in (``distill filter`` prints the first ones; ``filter_decisions.detail`` holds each rank);
6. what a flag does (``action``, in distill/filters.py): ``drop`` the label, or ``relabel`` the row with the
   pooled argmax (``Suspect.likely``), trained one-hot. Relabelling is the label-correction half of learning with
   noisy labels (cleanlab suggests the same label; cf. Reed et al. 2015's "bootstrapping" targets, arXiv
   1412.6596): where the flag is right, the row becomes a correct example on exactly the boundary the teacher
   gets wrong, instead of a missing one; where it is wrong, a right label becomes wrong. On the demo the
   suggestion is the gold label for most real errors flagged and (by construction) never for a false flag.
   ``drop`` stays the default: measured (bench/filters.py), relabelling trained no better student on the demo
   (30 labels fixed, 6 broken; 0.940 vs dropping's 0.942, 3 seeds) and barely cut the wrong labels on CLINC150
   with a fine-tuned mpnet teacher (277 fixed, 250 broken, where dropping removes 375 wrong and 250 right).

Corrected rows (human labels) train the cheap model with their correction and are never flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.errors import DistillError
from distill.task import SuspectSpec


@dataclass
class Suspect:
    index: int            # position in the input lists
    rank: int             # 1 = look at this first
    given: str            # the teacher's label
    likely: str           # the label the combined probabilities favour
    self_confidence: float   # combined p(given label)


def features(texts: list[str], spec: SuspectSpec) -> np.ndarray:
    """[N, D] inputs of the cheap model (sparse when TF-IDF is in them)."""
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    parts = []
    if spec.features in ("tfidf", "both"):
        parts.append(TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True).fit_transform(texts))
        parts.append(TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2,
                                     sublinear_tf=True).fit_transform(texts))
    if spec.features in ("embeddings", "both"):
        from distill.fewshot import Embedder

        parts.append(csr_matrix(Embedder(spec.embedder)(texts)))
    return hstack(parts).tocsr()


def out_of_fold_probs(x, y: np.ndarray, n_classes: int, spec: SuspectSpec) -> np.ndarray:
    """[N, n_classes] probabilities for each row from a logistic regression that never saw that row.
    Stratified k-fold when every class has k rows, else plain shuffled k-fold (a class missing from a fold's
    training part gets probability 0 there)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(y, minlength=n_classes)
    k = min(spec.folds, len(y))
    if k < 2:
        raise DistillError(f"suspect_labels needs at least 2 labelled rows, got {len(y)}")
    present = counts[counts > 0]
    splitter = (StratifiedKFold(k, shuffle=True, random_state=spec.seed) if present.min() >= k
                else KFold(k, shuffle=True, random_state=spec.seed))
    out = np.zeros((len(y), n_classes))
    for train_idx, held_idx in splitter.split(np.zeros(len(y)), y):
        classes = np.unique(y[train_idx])
        if len(classes) == 1:           # a degenerate fold: the one class it knows
            out[held_idx, classes[0]] = 1.0
            continue
        clf = LogisticRegression(C=spec.c, max_iter=2000)
        clf.fit(x[train_idx], y[train_idx])
        out[np.ix_(held_idx, clf.classes_)] = clf.predict_proba(x[held_idx])
    return out


def find_suspects(texts: list[str], given: list[str], teacher_probs: list[dict[str, float] | None],
                  labels: list[str], spec: SuspectSpec, flaggable: list[bool] | None = None) -> list[Suspect]:
    """The rows whose given label confident learning calls an issue, ranked (most suspect first).

    ``given[i]`` is the label the student would train on (the teacher's, or a human correction);
    ``teacher_probs[i]`` the teacher's distribution over ``labels`` (None when it gave none: that row then
    uses the cheap model's probabilities alone); ``flaggable[i]`` False for rows never to flag (corrections).
    """
    from cleanlab.filter import find_label_issues

    n = len(texts)
    if not (len(given) == len(teacher_probs) == n) or (flaggable is not None and len(flaggable) != n):
        raise ValueError("texts, given, teacher_probs and flaggable must have one entry per row")
    if n == 0:
        return []
    # cleanlab wants every column to be a class some row is labelled with: keep only the classes in use
    used = sorted({g for g in given}, key=labels.index)
    col = {lab: i for i, lab in enumerate(used)}
    if len(used) < 2:
        return []
    y = np.array([col[g] for g in given])
    oof = out_of_fold_probs(features(texts, spec), y, len(used), spec)
    log_p = np.log(np.clip(oof, 1e-9, 1.0))
    w = spec.teacher_weight
    for i, tp in enumerate(teacher_probs):
        if w > 0 and tp:
            t = np.array([max(float(tp.get(lab, 0.0)), 0.0) for lab in used])
            if t.sum() > 0:
                log_p[i] = (1 - w) * log_p[i] + w * np.log(np.clip(t / t.sum(), 1e-9, 1.0))
    probs = np.exp(log_p - log_p.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    ranked = find_label_issues(labels=y, pred_probs=probs, filter_by=spec.method,
                               return_indices_ranked_by="self_confidence")
    out = []
    for idx in ranked:
        idx = int(idx)
        if flaggable is not None and not flaggable[idx]:
            continue
        out.append(Suspect(index=idx, rank=len(out) + 1, given=given[idx], likely=used[int(probs[idx].argmax())],
                           self_confidence=float(probs[idx, y[idx]])))
    return out
