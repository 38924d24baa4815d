"""``distill eval`` for generative students (kind ``extract`` or ``generate``): student vs its untuned base vs
the teacher on the locked test split, with the same JSON shape and quality gate as ``distill.evaluate``.

The recipe, top to bottom (``evaluate_lm``):

1. Load the student (the latest ``train_lm`` run unless a folder is given; an adapter folder or a merged
   one) and the test split. Test rows are never filtered (``dataset.rows``).
2. Three systems answer every test row, from the prompt the teacher saw (``task.render_messages``):
   - **student**: greedy generation, parsed with ``task.parse_answer`` exactly as a teacher reply is;
   - **base**: the same base model *without* the trained adapter, same prompt and parser. It answers the
     question "did distillation help at all?" (for an adapter, the adapter is switched off in place, so
     the base costs no second copy of the weights);
   - **teacher**: its stored answer (``labels``). Failed or missing answers count as wrong vs gold;
   - **majority**: the most common answer of the kept train rows (``common.majority_answer``), for every
     input — free to compute, scored by the same code; a teacher that does not beat it is the problem
     (``common.verdict``).
3. Each system is scored vs **gold** (where the row has one) and vs the **teacher** (where it answered),
   with seeded percentile-bootstrap 95% CIs, per segment (only when some test row has a segment), and for
   ``extract`` per field.
4. Latency and tokens/s per request (batch 1) for student and base on this machine; the teacher's
   latency and cost come from the labelling ledger.
5. The gate (``spec.quality``), the verdict and the filters that read gold, as for classify; the JSON is
   written atomically to ``reports/eval-<run>.json`` and registered as an ``eval`` run, so ``distill report``
   and the CLI's gate work unchanged.

Metric names (kept identical to the classify evaluation, so the report's tables read them):

==================  ==========================================================================================
``accuracy``        vs gold: share of rows whose whole answer equals the reference (exact match of the
                    canonical answer, ``task.answer_key``: sorted-key JSON for extract, stripped text for
                    generate). A missing/invalid answer is wrong.
``agreement``       the same exact match, vs the teacher's answer.
``field_f1``        extract: micro-F1 over (field path, value) pairs: P = TP / predicted pairs, R = TP / reference
``field_precision`` pairs, F1 = 2 TP / (predicted + reference pairs), summed over all rows before dividing (micro,
``field_recall``    as the CoNLL/SNIPS slot-filling F1; Tjong Kim Sang & De Meulder 2003). Nested keys are joined
                    with '.', list items share the path 'key[]' (a multiset), null values are absent fields.
                    An answer that fails the schema has no pairs (a consumer would reject it).
``normalised_match`` generate: exact match after SQuAD normalisation (lowercase, no punctuation, no articles,
                    collapsed whitespace; Rajpurkar et al. 2016, arXiv 1606.05250).
``token_f1``        generate: SQuAD token-overlap F1, averaged over rows.
``json_valid``      extract, per system (no reference needed): the output contains a JSON object.
``schema_valid``    extract: the output parses *and* validates against ``schema:`` (``task.parse_answer``).
==================  ==========================================================================================

``judge``           generate with ``quality.judge: true``: the teacher grades student and base answers 1-5
                    against the reference (``distill.judge``); mean grade with a bootstrap CI.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from distill.evaluate import common as C
from distill import metrics as M
from distill.errors import DistillError
from distill.project import Project
from distill.runinfo import git_sha
from distill.runs import to_store_path
from distill.task import ParseError, answer_key, parse_answer, render_messages

from distill.metrics import DEFAULT_MAX_NEW_TOKENS, field_pairs, normalise_text, pair_counts, token_f1  # noqa: E402,F401
TOP_ERRORS = 10
EXAMPLES_PER_ERROR = 3


# ------------------------------------------------------------------------------------------------
# Pure metrics (unit-tested against hand-computed values)


def micro_prf(tp: int, n_pred: int, n_ref: int) -> dict[str, float]:
    """Micro precision, recall and F1 from summed counts; ``nan`` where a denominator is 0."""
    nan = float("nan")
    return {"precision": tp / n_pred if n_pred else nan, "recall": tp / n_ref if n_ref else nan,
            "f1": 2 * tp / (n_pred + n_ref) if n_pred + n_ref else nan}


def per_field(preds: Sequence[Any], refs: Sequence[Any]) -> list[dict]:
    """Precision / recall / F1 / support of each field path over all rows (support = reference pairs),
    sorted by support, largest first. Shows *which* fields a student gets wrong."""
    tp: Counter = Counter()
    np_: Counter = Counter()
    nr: Counter = Counter()
    for p, r in zip(preds, refs):
        pp, rr = field_pairs(p), field_pairs(r)
        for (path, _), k in (pp & rr).items():
            tp[path] += k
        for (path, _), k in pp.items():
            np_[path] += k
        for (path, _), k in rr.items():
            nr[path] += k
    out = [{"field": f, **micro_prf(tp[f], np_[f], nr[f]), "support": nr[f], "predicted": np_[f]}
           for f in set(np_) | set(nr)]
    return sorted(out, key=lambda d: (-d["support"], d["field"]))


def row_scores(kind: str, spec, preds: Sequence[Any], refs: Sequence[Any]) -> dict[str, np.ndarray]:
    """Per-row numbers that every statistic (and every bootstrap resample) is summed from.

    extract: ``exact`` (0/1), ``tp``, ``n_pred``, ``n_ref``; generate: ``exact``, ``norm`` (0/1), ``tok_f1``.
    ``preds[i] is None`` means no valid answer."""
    exact = np.array([p is not None and answer_key(spec, p) == answer_key(spec, r) if kind == "extract"
                      else p is not None and str(p).strip() == str(r).strip() for p, r in zip(preds, refs)], float)
    if kind == "extract":
        c = np.array([pair_counts(p, r) for p, r in zip(preds, refs)], dtype=float).reshape(-1, 3)
        return {"exact": exact, "tp": c[:, 0], "n_pred": c[:, 1], "n_ref": c[:, 2]}
    return {"exact": exact,
            "norm": np.array([p is not None and normalise_text(str(p)) == normalise_text(str(r))
                              for p, r in zip(preds, refs)], float),
            "tok_f1": np.array([token_f1(None if p is None else str(p), str(r)) for p, r in zip(preds, refs)], float)}


def statistics(kind: str, s: dict[str, np.ndarray], against: str) -> dict[str, Callable[[np.ndarray], float]]:
    """Metric name -> statistic(idx) over the rows ``idx`` (see the table in the module docstring)."""
    nan = float("nan")

    def mean(a: np.ndarray) -> Callable[[np.ndarray], float]:
        return lambda i: float(a[i].mean()) if len(i) else nan

    def ratio(num: np.ndarray, den: np.ndarray, k: float = 1.0) -> Callable[[np.ndarray], float]:
        def f(i: np.ndarray) -> float:
            d = float(den[i].sum())
            return k * float(num[i].sum()) / d if d else nan
        return f

    out = {"accuracy" if against == "gold" else "agreement": mean(s["exact"])}
    if kind == "extract":
        both = s["n_pred"] + s["n_ref"]
        out.update({"field_f1": ratio(s["tp"], both, 2.0), "field_precision": ratio(s["tp"], s["n_pred"]),
                    "field_recall": ratio(s["tp"], s["n_ref"])})
    else:
        out.update({"normalised_match": mean(s["norm"]), "token_f1": mean(s["tok_f1"])})
    return out


# ------------------------------------------------------------------------------------------------
# The recipe


def evaluate_lm(project: Project, *, model_path: str | None = None, teacher: str | None = None,
                max_new_tokens: int | None = None, limit: int | None = None, device: str = "auto",
                cpu_threads: int | None = None, cpu_hour_usd: float = 0.10, base: bool = True,
                progress: bool = True) -> dict:
    """Evaluate a generative student on the locked test split and return the result dict (also written to
    ``reports/eval-<run>.json``). ``limit`` scores a fixed pseudo-random subset of that many test rows (the
    same rows every time) — generation is slow on a CPU; ``base=False`` skips the untuned base model."""
    spec = project.spec
    say = C.say if progress else (lambda *a: None)
    if spec.kind not in ("extract", "generate"):
        raise DistillError(f"evaluate_lm evaluates extract/generate projects; this one is '{spec.kind}'",
                           hint="classify projects are evaluated by distill.evaluate.evaluate")
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[spec.kind]
    if max_new_tokens < 1:
        raise DistillError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if limit is not None and limit < 1:
        raise DistillError(f"--limit must be >= 1, got {limit}")
    if cpu_hour_usd < 0:
        raise DistillError(f"--cpu-hour-usd must be >= 0, got {cpu_hour_usd}")

    # 1. model run, teacher, test split -------------------------------------------------------------
    run_id, path, record = _resolve_run(project, model_path)
    tname = teacher or C.record_teacher(record) or spec.get_teacher(None).name
    tspec = spec.get_teacher(tname)
    notes: list[str] = []
    test = C.test_table(project, tname, notes, limit=limit)
    n = test["n"]
    say(f"eval: {n} test rows ({test['n_gold']} with gold), teacher '{tname}', model {run_id}")

    import torch

    from distill.students.predictor import GenerativePredictor, GGUFPredictor, is_gguf_export

    gguf = is_gguf_export(path)
    if gguf:
        # the quantized export through the serving engine, the task's schema enforced as `distill serve` does
        pred = GGUFPredictor(path, schema=spec.json_schema if spec.kind == "extract" else None,
                             n_threads=cpu_threads)
        notes.append("model: the GGUF export, answered by llama.cpp as `distill serve` answers"
                     + (" (the task's JSON schema enforced by the grammar)" if spec.kind == "extract" else ""))
        dev = pred.device
    else:
        pred = GenerativePredictor(path, device=device, cpu_threads=cpu_threads)
        dev = str(pred.model.device)
    info, is_adapter = pred.info, pred.is_adapter
    messages = [render_messages(spec, t, s, m) for t, s, m in zip(test["texts"], test["segments"], test["metas"])]

    # 2. three systems answer ------------------------------------------------------------------------
    say(f"eval: student generates ({n} rows, at most {max_new_tokens} new tokens each)")
    s_out = _generate_all(pred, messages, max_new_tokens, say, "student")
    outputs = {"student": s_out}
    base_reason = None
    if base and gguf:
        base = False
        base_reason = "not run for a GGUF export (the untuned base is compared in the eval of the trained run)"
    if base:
        say("eval: base model (no adapter) generates")
        # the untuned model gets the teacher's full prompt (its best chance), no task prefix
        base_info = {**info, "input_prefix": "", "prompt": "teacher"}
        if is_adapter:
            with pred.model.disable_adapter():
                outputs["base"] = _generate_all(pred, messages, max_new_tokens, say, "base", info=base_info)
        else:
            try:
                from distill.students.causal_lm import load_base

                b_model, b_tok = load_base(info["base_model"], device=device)
            except (DistillError, OSError, KeyError) as e:
                base_reason = f"the base model {info.get('base_model')!r} could not be loaded: {e}"
            else:
                outputs["base"] = _generate_all(pred, messages, max_new_tokens, say, "base", info=base_info,
                                                model=b_model.eval(), tokenizer=b_tok)
                del b_model
    else:
        base_reason = base_reason or "skipped (base=False)"

    # 3. scores ---------------------------------------------------------------------------------------
    say("eval: scoring with bootstrap CIs")
    min_seg = spec.quality.min_segment_size
    gate_key = _gate_key(spec.quality, spec.kind)
    parsed = {name: _parse_outputs(spec, o["texts"]) for name, o in outputs.items()}
    systems: dict[str, dict] = {}
    for name in outputs:
        systems[name] = _score_system(spec, name, parsed[name]["answers"], parsed[name]["validity"], test, min_seg,
                                      gate_key)
    systems["teacher"] = _score_system(spec, "teacher", test["teacher_pred"], test["teacher_validity"], test,
                                       min_seg, gate_key)
    if "base" not in systems:
        systems["base"] = {"available": False, "reason": base_reason}
    maj = C.majority_answer(project, tname, key=lambda a: answer_key(spec, a))
    if maj is not None:
        systems["majority"] = C.majority_row(_score_system(spec, "majority", [maj["answer"]] * n, None, test, min_seg,
                                                           gate_key), maj)
    else:
        systems["majority"] = {"available": False, "reason": "no kept train answers"}
    cfg = record.get("config") if isinstance(record.get("config"), dict) else {}
    systems["student"]["description"] = (f"distilled student ({cfg.get('loss', '?')} on "
                                         f"{info.get('base_model')}, {'LoRA adapter' if is_adapter else 'merged or full model'})")
    if systems["base"].get("available", True):
        systems["base"]["description"] = f"the untuned base model {info.get('base_model')} with the teacher's prompt"
    systems["teacher"]["description"] = f"teacher '{tname}' ({tspec.kind}: {tspec.model or tspec.path or ''})"
    for name in ("student", "base"):
        if systems[name].get("available", True) and test["n_gold"]:
            systems[name]["retention"] = _retention(spec, parsed[name]["answers"], test)

    errors = _errors(spec, parsed["student"]["answers"], parsed["student"]["reasons"], test)
    samples = [{"id": test["ids"][i], "text": C.cut(test["texts"][i]), "gold": test["gold"][i],
                "teacher": test["teacher_pred"][i],
                **{name: C.cut(outputs[name]["texts"][i]) for name in outputs}} for i in range(min(n, 5))]

    if spec.kind == "generate" and spec.quality.judge:
        _judge_systems(project, spec, tspec, systems, outputs, test, say, notes)

    # 4. latency and cost -----------------------------------------------------------------------------
    latency: dict[str, Any] = {name: _latency(o) for name, o in outputs.items()}
    latency["student"]["size_bytes"] = pred.size_bytes()
    latency["teacher"] = C.teacher_ledger(project, tname)
    cost = C.cost_per_1m(latency, tspec.price.per_hour, cpu_hour_usd)
    if maj is not None:
        cost["majority"] = {"per_1m_usd": 0.0, "basis": "a constant answer: no model to run"}

    # 5. gate, headline, lineage ----------------------------------------------------------------------
    gate = _gate(spec.quality, spec.kind, systems["student"], segmented=test["segmented"])
    filters = C.filters_used(project, tname, record)
    second = ("field_f1", "field F1") if spec.kind == "extract" else ("normalised_match", "normalised match")
    verdict = C.verdict(systems, filters, [("accuracy", "exact match"), second], "untuned base")
    headline = _headline(systems, retention=not verdict["teacher_problem"])
    tq = _teacher_sentence(spec.kind, tname, systems["teacher"], test)
    result = {
        "model_run_id": run_id, "model_path": to_store_path(project.root, path), "teacher": tname, "task": spec.name, "kind": spec.kind,
        "created_at": time.time(),
        "test": {k: test[k] for k in ("n", "n_total", "n_gold", "teacher_failed", "teacher_unlabelled",
                                      "teacher_failed_reasons", "segmented", "segment_counts", "hash")},
        "systems": systems, "headline": headline, "teacher_quality": tq, "confusions": errors,
        "samples": samples, "latency": latency, "cost": cost,
        "generation": {"max_new_tokens": max_new_tokens, "batch_size": 1, "device": dev,
                       "decoding": "greedy" + (", schema-constrained (llama.cpp grammar)" if gguf and spec.kind == "extract" else ""),
                       "engine": "llama.cpp (GGUF export)" if gguf else "transformers",
                       "torch_threads": torch.get_num_threads()},
        "lineage": {
            "model_run_id": run_id, "model_path": to_store_path(project.root, path), "training_record": record, "student": info,
            "teacher": {"name": tname, **tspec.identity(), "terms": tspec.terms.model_dump()},
            "filters": spec.filters.model_dump(), "filter_run": C.latest_filter_run(project, tname),
            "test_hash": test["hash"], "code_git_sha": git_sha(),
        },
        "gate": gate, "verdict": verdict, "filters_used": filters,
        "notes": notes + _standing_notes(spec.kind, test),
        "json_path": None, "version": 1,
    }
    if gguf:
        pred.close()
    result = C.jsonable(result)
    C.write_result(project, run_id, result, tname)
    out = result["json_path"]
    say(f"eval: {tq}")
    for line in verdict["headline"]:
        say(f"eval: {line}")
    say(f"eval: wrote {out}")
    return result


# ------------------------------------------------------------------------------------------------
# 1. inputs


def _resolve_run(project: Project, model_path: str | None) -> tuple[str, Path, dict]:
    """(run id, student folder, training record): the pinned folder (a training run's, a merged export's
    — evaluated as '<run>-merged' with the run's record as lineage — or any student folder), else the
    latest finished ``train_lm`` run."""
    from distill import runs

    if model_path is None and project.latest_model() is None:
        raise DistillError(f"{project.root}: no trained generative student to evaluate",
                           hint="run `distill train` first, or pass --model FOLDER")
    ref = project.model(pinned=model_path)
    if ref.kind == "pinned":
        export = runs.run_for_path(project.store, project.root, ref.path, kinds=("export_lm",))
        if export is not None:
            rid = export.record.get("model_run_id")
            src = runs.get_run(project.store, rid) if rid else None
            fmt = export.record.get("format") or "hf-merged"
            tag = "merged" if fmt == "hf-merged" else f"{fmt}-{str(export.record.get('quantization', '')).lower()}".rstrip("-")
            return f"{rid}-{tag}", ref.path, json.loads(src["record"]) if src else {}
    return ref.run_id, ref.path, ref.record


# ------------------------------------------------------------------------------------------------
# 2. generation


def _generate_all(pred, messages: list[list[dict]], max_new_tokens: int, say, name: str, **kw) -> dict[str, list]:
    """Greedy answers, one request at a time (what one API call to a served model costs), timed per request.
    One untimed warm-up request first: the first call pays for lazy initialisation. ``kw`` goes to
    ``GenerativePredictor.answer`` (another prompt mode, or the separately loaded base model)."""
    pred.answer([{"role": "user", "content": "hi"}], 2, **kw)   # short: a full request costs seconds on CPU
    texts, secs, t_in, t_out = [], [], [], []
    for i, msgs in enumerate(messages, start=1):
        g = pred.answer(msgs, max_new_tokens, **kw)
        secs.append(g.seconds)
        texts.append(g.text)
        t_in.append(g.prompt_tokens)
        t_out.append(g.completion_tokens)
        if i % 10 == 0 or i == len(messages):
            say(f"eval: {name} {i}/{len(messages)}  {sum(t_out) / sum(secs):.1f} new tokens/s")
    return {"texts": texts, "seconds": secs, "tokens_in": t_in, "tokens_out": t_out}


def _parse_outputs(spec, texts: list[str]) -> dict:
    """Parse every output as the labeller parses a teacher reply. extract: record JSON and schema validity."""
    answers, reasons, json_ok, schema_ok = [], [], [], []
    for t in texts:
        try:
            a = parse_answer(spec, t)
        except ParseError as e:
            answers.append(None)
            reasons.append(e.reason)
            json_ok.append(1.0 if e.reason == "schema_violation" else 0.0)
            schema_ok.append(0.0)
        else:
            answers.append(a)
            reasons.append(None)
            json_ok.append(1.0)
            schema_ok.append(1.0)
    validity = {"json_valid": np.array(json_ok), "schema_valid": np.array(schema_ok)} if spec.kind == "extract" else None
    return {"answers": answers, "reasons": reasons, "validity": validity}


# ------------------------------------------------------------------------------------------------
# 3. scores


def _segment_metrics(kind: str, against: str, gate_key: str | None) -> list[str]:
    """Per-segment CIs cost 1000 resamples each, so only the headline metrics get them."""
    ms = ["accuracy" if against == "gold" else "agreement", "field_f1" if kind == "extract" else "normalised_match"]
    if gate_key and gate_key not in ms and gate_key in ("field_f1", "accuracy", "agreement"):
        ms.append(gate_key)
    return ms


def _score_system(spec, name: str, answers: list, validity: dict | None, test: dict, min_seg: int,
                  gate_key: str | None) -> dict:
    """vs gold, vs teacher, validity, per segment and per field for one system's parsed answers."""
    kind, n = spec.kind, test["n"]
    out: dict[str, Any] = {"available": True, "n": n, "no_answer": sum(a is None for a in answers)}
    if validity is not None:
        out["validity"] = {k: C.metric(lambda i, v=v: float(v[i].mean()) if len(i) else float("nan"), n)
                           for k, v in validity.items()}
    segs: dict[str, dict] = {}
    for against, refs in (("gold", test["gold"]), ("teacher", test["teacher_pred"])):
        idx = [i for i, r in enumerate(refs) if r is not None]
        if (name == "teacher" and against == "teacher") or not idx:
            out[f"vs_{against}"] = None
            continue
        sc = row_scores(kind, spec, [answers[i] for i in idx], [refs[i] for i in idx])
        st = statistics(kind, sc, against)
        out[f"vs_{against}"] = {m: C.metric(f, len(idx)) for m, f in st.items()}
        seg_of = [test["segments"][i] for i in idx]
        # no test row has a segment: no per-segment scores (and no "(none)" pseudo-segment)
        for m in (_segment_metrics(kind, against, gate_key) if test["segmented"] else ()):
            if m not in st:
                continue
            for b in M.per_segment(seg_of, st[m], min_size=min_seg, resamples=C.RESAMPLES, seed=C.SEED):
                segs.setdefault(b["segment"], {"segment": b["segment"]})[f"{m}_vs_{against}"] = b
        if kind == "extract" and "per_field" not in out:   # vs gold when there is gold, else vs the teacher
            out["per_field"] = {"against": against,
                                "fields": per_field([answers[i] for i in idx], [refs[i] for i in idx])}
    for s in segs.values():
        s["n"] = sum(1 for x in test["segments"] if ("(none)" if x is None else str(x)) == s["segment"])
    out["segments"] = [segs[k] for k in sorted(segs)]
    return out


def _judge_systems(project, spec, tspec, systems: dict, outputs: dict, test: dict, say, notes: list) -> None:
    """``quality.judge``: the teacher grades student and base answers 1-5 against the gold answer (else its
    own); mean grade with a bootstrap CI under ``systems[name]["judge"]``. The teacher is not graded: it
    would be judging its own answers (self-preference, see distill.judge)."""
    from distill.judge import judge

    refs = [g if g is not None else t for g, t in zip(test["gold"], test["teacher_pred"])]
    refs = [None if r is None else str(r) for r in refs]
    for name in ("student", "base"):
        if name not in outputs:
            continue
        say(f"eval: the teacher grades {name} answers (judge)")
        r = judge(project, tspec, test["texts"], outputs[name]["texts"], refs)
        g = np.array([np.nan if x is None else float(x) for x in r["grades"]])
        ok = ~np.isnan(g)
        systems[name]["judge"] = {
            "mean_grade": C.metric(lambda i: float(np.nanmean(g[i])) if ok[i].any() else float("nan"), len(g)),
            "graded": int(ok.sum()), "ungraded": int((~ok).sum()), "histogram": {k: int((g == k).sum()) for k in range(1, 6)},
            "new_calls": r["new_calls"], "cached_calls": r["cached"], "errors": r["errors"], "spend": r["spend"],
            "judge": tspec.name}
        if r["errors"]:
            notes.append(f"judge: {r['errors']} of {len(g)} {name} grades failed (teacher '{tspec.name}' did not "
                         "answer; a replay teacher has no recorded grades)")


def _retention(spec, answers: list, test: dict) -> dict:
    """system metric / teacher metric on the gold rows, the ratio recomputed on each (paired) resample."""
    idx = [i for i, g in enumerate(test["gold"]) if g is not None]
    refs = [test["gold"][i] for i in idx]
    s = statistics(spec.kind, row_scores(spec.kind, spec, [answers[i] for i in idx], refs), "gold")
    t = statistics(spec.kind, row_scores(spec.kind, spec, [test["teacher_pred"][i] for i in idx], refs), "gold")
    names = ["accuracy", "field_f1"] if spec.kind == "extract" else ["accuracy", "normalised_match"]
    return {m: C.metric(lambda i, m=m: M.retention(s[m](i), t[m](i)), len(idx)) for m in names}


def _errors(spec, answers: list, reasons: list, test: dict) -> dict:
    """Where the student goes wrong, in the report's confusion shape ({true, pred, count, examples}).

    extract: grouped by (field path, kind of error): 'missing', 'wrong value', 'extra', or the parse failure
    of the whole answer. generate: the most frequent (reference, answer) pairs."""
    against = "gold" if test["n_gold"] else "teacher"
    refs = test["gold"] if against == "gold" else test["teacher_pred"]
    idx = [i for i, r in enumerate(refs) if r is not None]
    groups: dict[tuple[str, str], list[int]] = {}
    n_err = 0
    for i in idx:
        a, r = answers[i], refs[i]
        if a is not None and answer_key(spec, a) == answer_key(spec, r):
            continue
        n_err += 1
        if a is None:
            groups.setdefault(("(whole answer)", reasons[i] or "no answer"), []).append(i)
            continue
        if spec.kind != "extract":
            groups.setdefault((C.cut(str(r)), C.cut(str(a))), []).append(i)
            continue
        pa, ra = _flat(a), _flat(r)
        for f in sorted(set(pa) | set(ra)):
            if f not in pa:
                groups.setdefault((f, "missing"), []).append(i)
            elif f not in ra:
                groups.setdefault((f, "extra"), []).append(i)
            elif pa[f] != ra[f]:
                groups.setdefault((f, "wrong value"), []).append(i)
    order = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:TOP_ERRORS]
    pairs = [{"true": t, "pred": p, "count": len(ix),
              "examples": [{"id": test["ids"][i], "text": C.cut(test["texts"][i]), "segment": test["segments"][i],
                            "teacher": _short(test["teacher_pred"][i]), "reference": _short(refs[i]),
                            "student": _short(answers[i])} for i in ix[:EXAMPLES_PER_ERROR]]}
             for (t, p), ix in order]
    return {"system": "student", "against": against, "n": len(idx), "n_errors": n_err, "pairs": pairs,
            "grouping": "field path / kind of error" if spec.kind == "extract" else "reference / answer"}


def _flat(answer: Any) -> dict[str, list[str]]:
    """field path -> sorted values, for naming what differs."""
    out: dict[str, list[str]] = {}
    for (path, value), k in field_pairs(answer).items():
        out.setdefault(path, []).extend([value] * k)
    return {p: sorted(v) for p, v in out.items()}


def _short(answer: Any) -> str | None:
    if answer is None:
        return None
    return C.cut(answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False))


# ------------------------------------------------------------------------------------------------
# 4. latency


def _latency(o: dict) -> dict:
    """Per-request latency percentiles and tokens/s of one system's timed generation pass (batch 1)."""
    total = sum(o["seconds"])
    n_out = sum(o["tokens_out"])
    return {"batch1": M.latency_percentiles(o["seconds"]),
            "throughput": {"batch_size": 1, "n": len(o["seconds"]), "seconds": total,
                           "texts_per_s": len(o["seconds"]) / total if total > 0 else None,
                           "tokens_per_s": n_out / total if total > 0 else None},
            "tokens": {"prompt_mean": float(np.mean(o["tokens_in"])), "new_mean": float(np.mean(o["tokens_out"])),
                       "new_total": int(n_out)}}


# ------------------------------------------------------------------------------------------------
# 5. gate and summary


def _gate_key(q, kind: str) -> str | None:
    """The metric the gate reads, or None when ``quality.metric`` does not apply to this kind."""
    against = "teacher" if q.metric == "agreement" else q.against
    if q.metric in ("accuracy", "exact_match", "agreement"):
        return "accuracy" if against == "gold" else "agreement"
    if q.metric == "field_f1" and kind == "extract":
        return "field_f1"
    return None


def _gate(q, kind: str, student: dict, segmented: bool = True) -> dict:
    """Apply ``spec.quality`` to the student, as ``distill.evaluate`` does: point estimates decide; a CI
    reaching below the threshold is a warning."""
    against = "teacher" if q.metric == "agreement" else q.against
    key = _gate_key(q, kind)
    failures: list[str] = []
    warnings: list[str] = []
    if key is None:
        failures.append(f"quality.metric '{q.metric}' does not apply to kind '{kind}'; use exact_match"
                        + (" or field_f1" if kind == "extract" else "") + " in distill.yaml")
        return {"passed": False, "metric": q.metric, "against": against, "failures": failures, "warnings": warnings}
    return C.apply_gate(q, student, key, against, failures, warnings, noun="answers", segmented=segmented)


def _headline(systems: dict, retention: bool = True) -> dict:
    """The classify headline (vs gold, vs teacher, retention) plus the extract validity rates."""
    out = C.headline(systems, retention)
    for name, s in systems.items():
        if s.get("available") and s.get("validity"):
            for k, v in s["validity"].items():
                if not C.is_missing(v["value"]):
                    out.setdefault(name, {})[k] = {"value": v["value"], "ci": v["ci"]}
        j = (s.get("judge") or {}).get("mean_grade")
        if j and not C.is_missing(j["value"]):
            out.setdefault(name, {})["judge grade (1-5)"] = {"value": j["value"], "ci": j["ci"]}
    return out


def _teacher_sentence(kind: str, name: str, t: dict, test: dict) -> str:
    g = t.get("vs_gold")
    if not g:
        return (f"teacher {name}: quality vs gold unknown — the test split has no gold answers, so the student is "
                "only measured against the teacher")
    a = g["accuracy"]
    second = ("field_f1", "field F1") if kind == "extract" else ("normalised_match", "normalised match")
    b = g[second[0]]
    miss = test["teacher_failed"] + test["teacher_unlabelled"]
    return (f"teacher {name}: exact match {C.fmt(a['value'])} [{C.fmt(a['ci'][0])}, {C.fmt(a['ci'][1])}], {second[1]} "
            f"{C.fmt(b['value'])} [{C.fmt(b['ci'][0])}, {C.fmt(b['ci'][1])}] vs gold on n={a['n']}"
            + (f" ({miss} {'row' if miss == 1 else 'rows'} without a teacher answer counted as wrong)" if miss else ""))


def _standing_notes(kind: str, test: dict) -> list[str]:
    notes = [
        "all rows of the (possibly --limit-ed) locked test split are scored; nothing is filtered out",
        "accuracy (vs gold) and agreement (vs teacher) are exact match of the whole canonical answer",
        f"rows where the teacher failed ({test['teacher_failed']}) or never answered ({test['teacher_unlabelled']}) "
        "count as wrong for the teacher vs gold; agreement with the teacher is measured on the rows it answered",
        "student and base decode greedily, one request at a time; latency and tokens/s are measured on this machine",
        "CIs are seeded percentile-bootstrap 95% intervals over test rows (1000 resamples); retention is "
        "recomputed per resample",
    ]
    if kind == "extract":
        notes.append("field F1 is micro over (field path, value) pairs; an answer that fails the schema has no pairs")
    return notes
