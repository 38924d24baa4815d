"""`distill teacher check`: is a teacher worth distilling? Measure it on gold inputs before labelling everything.

    distill teacher check PROJECT [--teacher A --teacher B ...] [--sample 200] [--seed 0] [--json]

Why: a teacher that scores below answering the most frequent label every time (a small local model on an
imbalanced task does) used to be found out by the last step, the quality gate of `distill eval`, after every
input had been labelled and a student trained. A few hundred gold inputs say so first, for a few hundred calls
that the full `distill label` then answers from its cache.

The recipe, top to bottom (``check``):

1. The gold sample (``gold_sample``): train/validation inputs with a reference answer - a human correction, else
   the imported gold (as the few-shot gold pool, ``fewshot.gold_pool``) - minus inputs that near-duplicate a test
   input. Never the test split: its inputs are not sent to any teacher and its gold is not read (that split is
   `distill eval`'s). Stratified by the reference answer: each answer gets its proportional share of N (largest
   remainders; at least one row each when N allows); within an answer, rows are taken in the order of
   sha256(seed, id), a seeded shuffle of the id-sorted rows that needs no random generator, so the sample is
   the same on every run, machine and Python version.
2. Each candidate labels the sample through ``labeling.label(ids=...)``: the project lock, the terms check, the
   cache, the ledger and ``--budget`` work exactly as in `distill label`, and the calls are the very ones `distill
   label` makes for those inputs (so it makes no new call for them later).
3. Scores against the reference with seeded bootstrap 95% CIs (``evaluate.common.metric``, the resamples and
   seed of `distill eval`): classify accuracy, macro-F1, per-class precision/recall/support; extract exact match
   and field F1 (``evaluate.lm.row_scores``/``statistics``) and per-field scores (``evaluate.lm.per_field``). An
   input the teacher failed on, or never answered, counts as wrong (as in `distill eval`).
4. Trivial baselines on the same inputs: the majority answer (the sample's most frequent reference answer,
   given to every input; ties go to the first by name) and, for classify, TF-IDF + logistic regression
   (``evaluate.classify.baseline_pipeline``) cross-validated on the sample: stratified k-fold with k = min(5, the
   smallest class that has >= 2 rows), each input predicted by the model of the fold that held it out. A class
   with a single row is never in a training fold; a fold whose training rows have a single class predicts it.
5. Cost and time per input from the ledger rows of the sample's calls (every attempt, parse failures included):
   the *recorded* latency, since a cache hit takes 0 s now but the call it replays took its time. The projection
   multiplies them by the inputs the teacher has no ok label for yet (labels made under an older prompt or model
   are not counted: `distill relabel --dry-run` counts those); time is one call at a time.
6. The verdict (``verdict``, rule below), the best candidate (``best``), one ``teacher_checks`` row per candidate
   (what `distill label` warns from) and ``reports/teacher_check.json``.

The verdict. Two metrics (classify: accuracy and macro-F1; extract: exact match and field F1); for each baseline
b and metric m, Δ = teacher - b on the sample, with a *paired* bootstrap 95% CI (both systems on the same
resamples: they answer the same inputs, so two intervals can overlap while the difference is clearly positive):

- ``no_better_than_baseline`` - "teacher no better than a trivial baseline: fix the prompt or choose another
  teacher": Δ ≤ 0 against the majority answer on either metric (a constant answer makes no more errors, or tells
  the classes apart as well: on an imbalanced task accuracy catches the first, macro-F1 the second), or Δ ≤ 0
  against TF-IDF + LR on both metrics (a bag-of-words model fit on these few gold rows is at least as good);
- ``not_clearly_better``: not the above, but some Δ's CI reaches 0 or below (this sample cannot tell the teacher
  from a baseline: a larger --sample narrows the intervals);
- ``distillable``: every Δ's CI lies above 0.

Best of several candidates: quality first - the best verdict; among those, the highest primary metric (the
gate's, ``quality.metric``, when it is one of the two, else macro-F1 / field F1); then cost - a cheaper candidate
(USD per input, then seconds per input) whose primary metric is not clearly worse than that top one (the paired
Δ's CI reaches 0) is preferred, the cheapest of them. No candidate is best when all are no better than a baseline.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from distill import metrics as M
from distill.dataset import correction_join
from distill.errors import DistillError
from distill.evaluate import common as C
from distill.evaluate import lm as LM
from distill.evaluate.classify import baseline_pipeline
from distill.fsutil import write_json_atomic
from distill.labeling import label as run_label
from distill.project import Project
from distill.task import ProjectSpec, TeacherSpec, answer_key, cache_key

DEFAULT_SAMPLE = 200
MAX_FOLDS = 5
SMALL_SAMPLE = 30      # below this many gold inputs every interval is too wide to say much: a note says so
REPORT_FILE = "teacher_check.json"
FAIL_MESSAGE = "teacher no better than a trivial baseline: fix the prompt or choose another teacher"
VERDICT_RANK = {"distillable": 0, "not_clearly_better": 1, "no_better_than_baseline": 2}
METRICS = {"classify": ("accuracy", "macro_f1"), "extract": ("exact_match", "field_f1")}
NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "exact_match": "exact match", "field_f1": "field F1"}
BASELINE_NAMES = {"majority": "majority answer", "tfidf_lr": "TF-IDF + LR"}

Stat = Callable[[np.ndarray], float]


@dataclass
class Sample:
    """The gold sample: parallel lists sorted by id."""

    ids: list[str]
    texts: list[str]
    refs: list[Any]               # the reference answer (correction, else gold)
    splits: list[str]
    sources: list[str]            # 'correction' | 'gold'
    available: int                # train/validation inputs with a reference answer
    requested: int
    seed: int

    @property
    def ids_hash(self) -> str:
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()[:16]


# -- the recipe --------------------------------------------------------------------------------------


def check(project: Project, teachers: Iterable[str] | None = None, *, sample: int = DEFAULT_SAMPLE, seed: int = 0,
          budget: float | None = None, accept_terms: bool = False, progress: bool = True,
          say: Callable[[str], None] = lambda m: None) -> dict:
    """Check each of ``teachers`` (default: the spec's ``teacher:``) on one stratified gold sample; see the module
    docstring. Returns the result written to ``reports/teacher_check.json``. DistillError when the task has no
    gold metric, there is no gold, a teacher is unknown or a labelling run stops early (budget, Ctrl-C)."""
    spec = project.spec
    if spec.kind == "generate":
        raise DistillError("`distill teacher check` needs answers it can compare with gold; kind 'generate' "
                           "(free text) has no such metric here",
                           hint="read a sample of the teacher's answers yourself, or judge it after `distill eval` "
                                "with quality.judge: true")
    if sample < 1:
        raise DistillError(f"--sample must be >= 1, got {sample}")
    names = list(dict.fromkeys(teachers or [spec.get_teacher(None).name]))
    tspecs = [spec.get_teacher(n) for n in names]          # an unknown name fails here, before anything is paid
    s = gold_sample(project, sample, seed)
    notes = _sample_notes(s)
    say(f"teacher check: {len(s.ids)} gold inputs ({_counts_text(Counter(s.splits))}), "
        f"candidates: {', '.join(names)}")

    # 1-2. every candidate labels the same sample through the labeller (cache, ledger, budget, lock)
    for t in tspecs:
        rep = run_label(project, t.name, budget=budget, splits=("train", "validation"), ids=s.ids,
                        accept_terms=accept_terms, progress=progress)
        say(rep.message())
        if rep.stopped == "interrupted":
            raise KeyboardInterrupt       # the CLI says: committed work is kept, re-run to resume
        if rep.stopped:
            raise DistillError(f"teacher '{t.name}': labelling the sample stopped early ({rep.stopped}): "
                               f"{rep.message()}",
                               hint="re-run the check: the answers paid for so far are cached and reused")

    # 3-4. the reference, the baselines and each candidate on the same rows
    kind = spec.kind
    ref = _References(spec, s)
    baselines = {"majority": _majority(spec, s)}
    if kind == "classify":
        baselines["tfidf_lr"] = _tfidf_oof(s, seed)
    for b in baselines.values():
        if b.get("available", True):
            b["stats"] = ref.stats(b.pop("pred"))
            b["metrics"] = {m: C.metric(b["stats"][m], ref.n) for m in METRICS[kind]}
    candidates = [_candidate(project, t, s, ref, baselines) for t in tspecs]

    # 6. verdict, best, store, report
    for c in candidates:
        c["verdict"], c["message"] = verdict(c, baselines, kind)
    best = choose_best(candidates, ref, _primary_metric(spec))
    result = {
        "version": 1, "task": spec.name, "kind": kind, "created_at": time.time(),
        "sample": {"n": len(s.ids), "requested": s.requested, "available": s.available, "seed": seed,
                   "ids_hash": s.ids_hash, "by_split": dict(Counter(s.splits)),
                   "by_source": dict(Counter(s.sources)), "by_answer": ref.counts, "ids": s.ids},
        "baselines": {k: {kk: vv for kk, vv in b.items() if kk != "stats"} for k, b in baselines.items()},
        "candidates": [{k: v for k, v in c.items() if not k.startswith("_")} for c in candidates],
        "best": best, "primary_metric": _primary_metric(spec), "notes": notes,
        "rule": ("no_better_than_baseline: teacher <= the majority answer on either metric, or <= TF-IDF + LR on "
                 "both; not_clearly_better: otherwise, when a paired bootstrap 95% CI of teacher - baseline "
                 "reaches 0; distillable: every such CI above 0"),
    }
    result = C.jsonable(result)
    _store(project, result, candidates)
    out = project.reports_dir / REPORT_FILE
    result["json_path"] = str(out)
    write_json_atomic(out, result)
    return result


# -- 1. the sample -----------------------------------------------------------------------------------


def gold_sample(project: Project, n: int, seed: int) -> Sample:
    """A stratified, deterministic sample of ``n`` train/validation inputs with a reference answer (module
    docstring, step 1). Reads no row of the test split."""
    spec = project.spec
    rows = project.store.q(
        f"""SELECT e.id, e.text, e.split, e.gold, c.answer AS corrected FROM examples e
           {correction_join(project, feedback=False)}
           WHERE e.split IN ('train', 'validation') AND e.id NOT IN (SELECT example_id FROM contamination)
             AND (e.gold IS NOT NULL OR c.answer IS NOT NULL)
           ORDER BY e.id""")
    if not rows:
        root = project.root
        raise DistillError(
            f"{root}: no train/validation input has a gold answer, so there is nothing to check a teacher against",
            hint=f"import inputs with their answers (`distill import {root} data.csv --label COLUMN`) or answer a "
                 f"few hundred by hand (`distill correct {root} answers.csv`); the test split's gold is never used "
                 "here (it is kept for `distill eval`)")
    strata: dict[str, list] = {}
    for r in rows:
        answer = json.loads(r["corrected"] if r["corrected"] is not None else r["gold"])
        strata.setdefault(answer_key(spec, answer), []).append((r, answer))
    take = _allocate({k: len(v) for k, v in strata.items()}, n)

    def order(item) -> str:
        return hashlib.sha256(f"{seed}\0{item[0]['id']}".encode()).hexdigest()

    chosen = []
    for k in sorted(strata):
        chosen += sorted(strata[k], key=order)[: take[k]]
    chosen.sort(key=lambda item: item[0]["id"])
    return Sample(ids=[r["id"] for r, _ in chosen], texts=[r["text"] for r, _ in chosen],
                  refs=[a for _, a in chosen], splits=[r["split"] for r, _ in chosen],
                  sources=["correction" if r["corrected"] is not None else "gold" for r, _ in chosen],
                  available=len(rows), requested=n, seed=seed)


def _allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """``n`` rows over strata in proportion to their sizes (largest remainders; ties by name), at least one per
    stratum when ``n`` is at least the number of strata. All rows when ``n`` covers them."""
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    quota = {k: n * v / total for k, v in sizes.items()}
    least = 1 if n >= len(sizes) else 0
    alloc = {k: min(sizes[k], max(least, math.floor(q))) for k, q in quota.items()}
    names = sorted(sizes)
    while sum(alloc.values()) > n:       # the minimum of one pushed the total over: take from the most over quota
        k = max((k for k in names if alloc[k] > least), key=lambda k: alloc[k] - quota[k])
        alloc[k] -= 1
    while sum(alloc.values()) < n:       # hand out the rest by largest remainder
        k = max((k for k in names if alloc[k] < sizes[k]), key=lambda k: quota[k] - alloc[k])
        alloc[k] += 1
    return alloc


def _sample_notes(s: Sample) -> list[str]:
    notes = []
    if s.available < s.requested:
        notes.append(f"only {s.available} train/validation inputs have a gold answer: all of them are used "
                     f"(--sample {s.requested} asked for more)")
    if len({json.dumps(r, sort_keys=True) for r in s.refs}) == 1:
        notes.append("every gold answer in the sample is the same: no teacher can beat the majority answer on it; "
                     "add gold inputs of the other answers")
    if len(s.ids) < SMALL_SAMPLE:
        notes.append(f"{len(s.ids)} gold inputs: the intervals are wide; a few hundred say much more")
    notes.append("the test split is not used: none of its inputs is sent and none of its gold answers is read")
    return notes


# -- 3-4. scores ---------------------------------------------------------------------------------------


class _References:
    """The sample's reference answers and how any system's answers are scored against them."""

    def __init__(self, spec: ProjectSpec, s: Sample):
        self.spec, self.kind, self.n = spec, spec.kind, len(s.ids)
        self.refs = s.refs
        if self.kind == "classify":
            gold = [str(r) for r in s.refs]
            # a gold label outside the spec's set stays its own class (as in `distill eval`)
            self.classes = list(spec.label_names) + sorted({g for g in gold if g not in spec.label_names})
            self.gold = M.encode(gold, self.classes)
            self.counts = M.counts(gold)
        else:
            self.counts = M.counts([answer_key(spec, r) for r in s.refs])

    def codes(self, pred: list) -> np.ndarray:
        return M.encode([None if p is None else str(p) for p in pred], self.classes)

    def stats(self, pred: list) -> dict[str, Stat]:
        """Metric name -> statistic(row indices) of ``pred`` (None = no answer, wrong)."""
        if self.kind == "classify":
            g, p, k = self.gold, self.codes(pred), len(self.classes)
            right = (p == g).astype(float)
            return {"accuracy": lambda i: float(right[i].mean()) if len(i) else math.nan,
                    "macro_f1": lambda i: M.macro_f1_codes(g[i], p[i], k)}
        st = LM.statistics("extract", LM.row_scores("extract", self.spec, pred, self.refs), "gold")
        return {"exact_match": st["accuracy"], "field_f1": st["field_f1"]}

    def per_class(self, pred: list) -> list[dict]:
        """classify: precision/recall (bootstrap CIs), support and predicted count per class; extract: per field
        (``evaluate.lm.per_field``)."""
        if self.kind != "classify":
            return LM.per_field(pred, self.refs)
        g, p = self.gold, self.codes(pred)
        out = []
        for c, name in enumerate(self.classes):
            is_g, is_p = (g == c).astype(float), (p == c).astype(float)
            if not is_g.any() and not is_p.any():
                continue
            tp = is_g * is_p

            def ratio(den: np.ndarray, tp=tp) -> Stat:
                return lambda i: float(tp[i].sum() / den[i].sum()) if den[i].sum() else math.nan

            out.append({"label": name, "support": int(is_g.sum()), "predicted": int(is_p.sum()),
                        "precision": C.metric(ratio(is_p), self.n), "recall": C.metric(ratio(is_g), self.n)})
        return out


def _majority(spec: ProjectSpec, s: Sample) -> dict:
    """The sample's most frequent reference answer, given to every input (ties: the first by name)."""
    keys = Counter(answer_key(spec, r) for r in s.refs)
    top = min(keys, key=lambda k: (-keys[k], k))
    answer = next(r for r in s.refs if answer_key(spec, r) == top)
    return {"available": True, "answer": answer, "pred": [answer] * len(s.refs),
            "description": "the sample's most frequent gold answer, given to every input"}


def _tfidf_oof(s: Sample, seed: int) -> dict:
    """TF-IDF + logistic regression, stratified k-fold on the sample, out-of-fold predictions (module docstring)."""
    from sklearn.model_selection import StratifiedKFold

    y = [str(r) for r in s.refs]
    sizes = Counter(y)
    multi = [v for v in sizes.values() if v >= 2]
    if len(sizes) < 2 or not multi:
        return {"available": False,
                "reason": f"needs two gold classes in the sample, one with 2+ rows; it has {dict(sizes)}"}
    k = min(MAX_FOLDS, min(multi))
    pred: list[Any] = [None] * len(y)
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "the least populated class has only 1 member": expected with rare classes, said in the docstring
        warnings.simplefilter("ignore", UserWarning)
        for train, held in folds.split(np.zeros(len(y)), y):
            ys = [y[i] for i in train]
            if len(set(ys)) < 2:
                out = [ys[0]] * len(held)
            else:
                model = baseline_pipeline().fit([s.texts[i] for i in train], ys)
                out = [str(p) for p in model.predict([s.texts[i] for i in held])]
            for i, p in zip(held, out):
                pred[i] = p
    return {"available": True, "pred": pred, "folds": k,
            "description": f"TF-IDF (1-2 grams) + logistic regression, {k}-fold stratified cross-validation on "
                           "the sample (out-of-fold predictions)"}


def _candidate(project: Project, tspec: TeacherSpec, s: Sample, ref: _References, baselines: dict) -> dict:
    """One teacher's answers on the sample, scored; its cost and time from the ledger; the projection."""
    kind = ref.kind
    answers, missing = _teacher_answers(project, tspec.name, s.ids)
    stats = ref.stats(answers)
    out: dict[str, Any] = {
        "teacher": tspec.name, "teacher_kind": tspec.kind, "model": tspec.model or tspec.path or "",
        "fingerprint": fingerprint(project.spec, tspec), "n": ref.n, "answered": ref.n - sum(missing.values()),
        "no_answer": missing,
        "metrics": {m: C.metric(stats[m], ref.n) for m in METRICS[kind]},
        ("per_class" if kind == "classify" else "per_field"): ref.per_class(answers),
        "vs_baselines": {},
        "_stats": stats,       # kept out of the JSON; choose_best compares candidates on the same resamples
    }
    for name, b in baselines.items():
        if b.get("available", True):
            out["vs_baselines"][name] = {
                m: C.metric(lambda i, m=m: stats[m](i) - b["stats"][m](i), ref.n) for m in METRICS[kind]}
    out.update(_ledger(project, tspec, s.ids))
    remaining = int(project.store.one(
        "SELECT COUNT(*) FROM examples e WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.example_id = e.id "
        "AND l.teacher = ? AND l.status = 'ok')", (tspec.name,)))
    usd, sec = out["usd_per_input"], out["seconds_per_input"]
    out["projection"] = {
        "inputs": remaining, "usd": None if usd is None else remaining * usd,
        "seconds": None if sec is None else remaining * sec,
        "basis": "inputs (all splits) without an ok label from this teacher x the sample's ledger figures per "
                 "input; seconds at one call at a time"}
    return out


def _teacher_answers(project: Project, teacher: str, ids: list[str]) -> tuple[list[Any], dict[str, int]]:
    """The teacher's own label per input (None when failed or missing) and the count of each reason for None."""
    labels = {}
    for chunk in _chunks(ids):
        for r in project.store.q(f"SELECT example_id, status, answer, reason FROM labels WHERE teacher = ? AND "
                                 f"example_id IN ({','.join('?' * len(chunk))})", (teacher, *chunk)):
            labels[r["example_id"]] = r
    answers, missing = [], Counter()
    for i in ids:
        r = labels.get(i)
        if r is not None and r["status"] == "ok":
            answers.append(json.loads(r["answer"]))
            continue
        answers.append(None)
        missing["unlabelled" if r is None else (r["reason"] or "failed")] += 1
    return answers, dict(missing)


def _ledger(project: Project, tspec: TeacherSpec, ids: list[str]) -> dict:
    """USD and recorded seconds per input of the sample's calls (every attempt; an ensemble: all members)."""
    spec, store = project.spec, project.store
    members = [spec.get_teacher(m) for m in tspec.members] if tspec.kind == "ensemble" else [tspec]
    cost: dict[str, float] = {}
    secs: dict[str, float] = {}
    calls = 0
    for m in members:
        identity = m.identity()
        for chunk in _chunks(ids):
            rows = store.q(f"""SELECT l.example_id, tc.request FROM labels l
                               JOIN teacher_calls tc ON tc.key = l.call_key
                               WHERE l.teacher = ? AND l.example_id IN ({','.join('?' * len(chunk))})""",
                           (m.name, *chunk))
            for r in rows:
                # every attempt of one input asked the same messages: its keys are those of attempts 0..retries
                messages = json.loads(r["request"])["messages"]
                keys = [cache_key(identity, messages, a) for a in range(m.parse_retries + 1)]
                got = store.q(f"SELECT cost, latency_s FROM teacher_calls WHERE key IN ({','.join('?' * len(keys))})",
                              tuple(keys))
                cost[r["example_id"]] = cost.get(r["example_id"], 0.0) + sum(float(g["cost"]) for g in got)
                secs[r["example_id"]] = secs.get(r["example_id"], 0.0) + sum(float(g["latency_s"]) for g in got)
                calls += len(got)
    n = len(cost)
    return {"calls": calls, "inputs_with_calls": n,
            "usd_per_input": sum(cost.values()) / n if n else None,
            "seconds_per_input": sum(secs.values()) / n if n else None,
            "ledger_basis": "the ledger rows (cost, recorded latency) of the sample's calls, per input that has any"}


def _chunks(ids: list[str], size: int = 500) -> Iterable[list[str]]:
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


# -- 6. verdict, best, store ---------------------------------------------------------------------------


def verdict(c: dict, baselines: dict, kind: str) -> tuple[str, str]:
    """(verdict, one sentence with the numbers) for candidate ``c``: the rule in the module docstring."""
    verdict_, text = _verdict(c, baselines, kind)
    if c["no_answer"]:
        text += (f" ({sum(c['no_answer'].values())} of {c['n']} inputs got no answer and count as wrong: "
                 + ", ".join(f"{k} {v}" for k, v in sorted(c["no_answer"].items())) + ")")
    return verdict_, text


def _verdict(c: dict, baselines: dict, kind: str) -> tuple[str, str]:
    fail, unclear = [], []
    for name, diffs in c["vs_baselines"].items():
        b = baselines[name]
        below = [m for m, d in diffs.items() if _le0(d["value"])]
        said = {m: f"{NAMES[m]} {C.fmt(c['metrics'][m]['value'])} vs {BASELINE_NAMES[name]} "
                   f"{C.fmt(b['metrics'][m]['value'])}" for m in diffs}
        # the teacher must beat a constant answer on both metrics; it fails against a fitted model only when
        # that model is at least as good on both (worse on one metric only is "not clearly better")
        if (name == "majority" and below) or (name != "majority" and len(below) == len(diffs)):
            fail += [said[m] for m in below]
        for m, d in diffs.items():
            if _le0(d["ci"][0]):
                unclear.append(f"{said[m]}, difference {C.fmt(d['value'])} [{C.fmt(d['ci'][0])}, "
                               f"{C.fmt(d['ci'][1])}]")
    if fail:
        return "no_better_than_baseline", f"{FAIL_MESSAGE} ({'; '.join(fail)})"
    if unclear:
        return "not_clearly_better", ("teacher not clearly better than a trivial baseline on this sample ("
                                      + "; ".join(unclear) + "): a larger --sample narrows the intervals, or "
                                      "improve the prompt")
    m0 = METRICS[kind][0]
    return "distillable", (f"distillable: clearly better than every trivial baseline ({NAMES[m0]} "
                           f"{C.fmt(c['metrics'][m0]['value'])} vs the majority answer "
                           f"{C.fmt(baselines['majority']['metrics'][m0]['value'])})")


def _le0(x: Any) -> bool:
    """At or below 0, or undefined (an undefined difference proves nothing in the teacher's favour)."""
    return _value(x) <= 0


def _value(x: Any) -> float:
    return -math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _primary_metric(spec: ProjectSpec) -> str:
    """The gate's metric when it is one the check measures, else macro-F1 (classify) / field F1 (extract)."""
    q = spec.quality.metric
    if spec.kind == "classify":
        return q if q in ("accuracy", "macro_f1") else ("accuracy" if q == "exact_match" else "macro_f1")
    return "exact_match" if q in ("accuracy", "exact_match") else "field_f1"


def choose_best(candidates: list[dict], ref: _References, metric: str) -> dict | None:
    """Quality first, then cost (module docstring). None when every candidate is no better than a baseline."""
    ok = [c for c in candidates if c["verdict"] != "no_better_than_baseline"]
    if not ok:
        return None
    rank = min(VERDICT_RANK[c["verdict"]] for c in ok)
    tier = [c for c in ok if VERDICT_RANK[c["verdict"]] == rank]
    top = max(tier, key=lambda c: _value(c["metrics"][metric]["value"]))

    def cost(c: dict) -> tuple[float, float]:
        return (c["usd_per_input"] if c["usd_per_input"] is not None else math.inf,
                c["seconds_per_input"] if c["seconds_per_input"] is not None else math.inf)

    close = [top]
    for c in tier:
        if c is top:
            continue
        d = C.metric(lambda i, c=c: top["_stats"][metric](i) - c["_stats"][metric](i), ref.n)
        if d["ci"][0] is None or d["ci"][0] <= 0:
            close.append(c)
    pick = min(close, key=lambda c: (cost(c), close.index(c)))
    if len(candidates) == 1:
        why = "the only candidate"
    elif len(tier) == 1:
        why = f"the only candidate with the verdict {pick['verdict']}"
    elif pick is top:
        why = (f"highest {NAMES[metric]} ({C.fmt(top['metrics'][metric]['value'])}) of the candidates with the "
               f"verdict {pick['verdict']}")
    else:
        why = (f"not clearly worse on {NAMES[metric]} than '{top['teacher']}' "
               f"({C.fmt(pick['metrics'][metric]['value'])} vs {C.fmt(top['metrics'][metric]['value'])}) and cheaper")
    return {"teacher": pick["teacher"], "verdict": pick["verdict"], "why": why}


def fingerprint(spec: ProjectSpec, tspec: TeacherSpec) -> str:
    """What the teacher's answers depend on: its identity (an ensemble's members too), the prompt and the task.
    A check made under another fingerprint says nothing certain about the teacher as configured now."""
    members = [spec.get_teacher(m).identity() for m in tspec.members] if tspec.kind == "ensemble" else []
    blob = json.dumps({"teacher": tspec.identity(), "members": members, "kind": spec.kind,
                       "prompt": spec.prompt.model_dump(mode="json"), "description": spec.description,
                       "labels": [lab.model_dump(mode="json") for lab in spec.labels], "schema": spec.json_schema},
                      sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _store(project: Project, result: dict, candidates: list[dict]) -> None:
    """One ``teacher_checks`` row per candidate: its verdict, a one-line summary and the result for it."""
    shared = {k: v for k, v in result.items() if k != "candidates"}
    with project.store.tx() as c:
        for cand, row in zip(candidates, result["candidates"]):
            c.execute("INSERT INTO teacher_checks(teacher, created_at, sample_ids_hash, fingerprint, verdict, summary, "
                      "result) VALUES(?,?,?,?,?,?,?)",
                      (cand["teacher"], result["created_at"], result["sample"]["ids_hash"], cand["fingerprint"],
                       cand["verdict"], summary(row, result),
                       json.dumps({**shared, "candidate": row}, ensure_ascii=False, allow_nan=False)))


def summary(c: dict, result: dict) -> str:
    """One line a person can act on: the verdict sentence and where it was measured."""
    return f"{c['message']}; on {c['n']} gold inputs (train/validation, seed {result['sample']['seed']})"


# -- what `distill label` says before it spends ----------------------------------------------------------


def latest_check(project: Project, teacher: str) -> Any:
    rows = project.store.q("SELECT * FROM teacher_checks WHERE teacher = ? ORDER BY created_at DESC, id DESC LIMIT 1",
                           (teacher,))
    return rows[0] if rows else None


def label_warning(project: Project, teacher: str | None) -> str | None:
    """A warning for `distill label` when ``teacher``'s latest check was not ``distillable``; None otherwise
    (also when it was never checked)."""
    tspec = project.spec.get_teacher(teacher)
    row = latest_check(project, tspec.name)
    if row is None or row["verdict"] == "distillable":
        return None
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created_at"]))
    again = f"`distill teacher check {project.root} --teacher {tspec.name}`"
    if row["fingerprint"] != fingerprint(project.spec, tspec):
        tail = f"The prompt or the teacher's settings changed since: re-run {again} to see whether that helped."
    else:
        tail = (f"Labelling every input with it may pay for labels no student can learn from; after a change, "
                f"check again with {again}.")
    return f"teacher '{tspec.name}' did not pass its latest check ({when}): {row['summary']}. {tail}"


# -- the text the CLI prints -------------------------------------------------------------------------


def render(result: dict) -> str:
    """The check as text: the sample, a table of baselines and candidates, per-class scores, verdicts, best."""
    kind = result["kind"]
    m1, m2 = METRICS[kind]
    s = result["sample"]
    lines = [f"teacher check of '{result['task']}' on {s['n']} gold inputs ({_counts_text(s['by_split'])}; "
             f"stratified by gold answer, seed {s['seed']}, sample {s['ids_hash']})",
             "gold answers in the sample: " + _counts_text(s["by_answer"], 8)]
    for note in result["notes"]:
        lines.append(f"note: {note}")
    rows = [("", NAMES[m1], NAMES[m2], "s/input", "USD/input")]
    for name, b in result["baselines"].items():
        if not b.get("available"):
            rows.append((BASELINE_NAMES[name], "n/a", "n/a", "", ""))
            continue
        what = BASELINE_NAMES[name] + (f" ({_short(b['answer'])})" if name == "majority" else
                                       f" ({b['folds']}-fold)")
        rows.append((what, _ci(b["metrics"][m1]), _ci(b["metrics"][m2]), "", ""))
    for c in result["candidates"]:
        rows.append((f"teacher '{c['teacher']}'", _ci(c["metrics"][m1]), _ci(c["metrics"][m2]),
                     _num(c["seconds_per_input"], 3), _num(c["usd_per_input"], 6)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    for name, b in result["baselines"].items():
        if not b.get("available"):
            lines.append(f"{BASELINE_NAMES[name]}: not available: {b.get('reason')}")
    for c in result["candidates"]:
        lines.append("")
        lines.append(f"teacher '{c['teacher']}' ({c['teacher_kind']}: {c['model']}): {c['answered']} of {c['n']} "
                     "answered" + (f", no answer counted as wrong: {c['no_answer']}" if c["no_answer"] else ""))
        if kind == "classify":
            w = min(max([5] + [len(pc["label"]) for pc in c["per_class"]]), 40)   # names up to 40 chars in full
            lines.append(f"  {'class':<{w}} {'precision':<22} {'recall':<22} support  predicted")
            for pc in c["per_class"]:
                lines.append(f"  {pc['label'][:w]:<{w}} {_ci(pc['precision']):<22} {_ci(pc['recall']):<22} "
                             f"{pc['support']:<8} {pc['predicted']}")
        else:
            lines.append(f"  {'field':<20} {'precision':<10} {'recall':<10} {'F1':<10} support")
            for pf in c["per_field"][:12]:
                lines.append(f"  {pf['field'][:20]:<20} {C.fmt(pf['precision']):<10} {C.fmt(pf['recall']):<10} "
                             f"{C.fmt(pf['f1']):<10} {pf['support']}")
        lines.append(f"  verdict: {c['message']}")
        p = c["projection"]
        if p["usd"] is None:
            lines.append(f"  projected: {p['inputs']} inputs not labelled by '{c['teacher']}' yet; no ledger figures "
                         "to project from (no call of the sample was recorded)")
        else:
            lines.append(f"  projected for the {p['inputs']} inputs not labelled by '{c['teacher']}' yet: "
                         f"${p['usd']:.4f}, {_duration(p['seconds'])} of teacher time "
                         f"({_num(c['seconds_per_input'], 3)} s and ${_num(c['usd_per_input'], 6)} per input, "
                         "one call at a time)")
    lines.append("")
    b = result["best"]
    if b is None:
        lines.append("best: none - no candidate is better than a trivial baseline")
    else:
        lines.append(f"best: '{b['teacher']}' ({b['verdict']}): {b['why']}")
    if result.get("json_path"):
        lines.append(f"wrote {result['json_path']}")
    return "\n".join(lines)


def _ci(v: dict) -> str:
    lo, hi = v["ci"]
    return f"{C.fmt(v['value'])} [{C.fmt(lo)}, {C.fmt(hi)}]"


def _num(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _short(answer: Any) -> str:
    t = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False, sort_keys=True)
    return t if len(t) <= 40 else t[:39] + "…"


def _counts_text(counts: dict, top: int | None = None) -> str:
    items = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    more = len(items) - top if top is not None and len(items) > top else 0
    text = ", ".join(f"{_short(k)} {v}" for k, v in items[:top])
    return text + (f", … {more} more" if more else "")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
