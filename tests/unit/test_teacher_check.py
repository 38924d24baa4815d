"""`distill teacher check` on tiny offline projects with replay teachers: a teacher worse than the majority answer
is called out (and `distill label` then warns), a good one is distillable, the sample is stratified, deterministic
and never touches the test split, the check's calls are the ones `distill label` reuses, and bad input fails
clearly."""

from __future__ import annotations

import json
import random
import time

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.errors import DistillError
from distill.project import Project
from distill.task import render_messages
from distill.teacher_check import FAIL_MESSAGE, check, gold_sample, label_warning, verdict
from distill.teachers.replay import ReplayTeacher, write_recording

SPEC = """name: tickets
kind: classify
description: Topic of a support ticket.
labels: [billing, bug, praise]
teachers:
  - name: good
    kind: replay
    path: good.jsonl
    model: big-api-model
    price: {input_per_1m: 1.0, output_per_1m: 4.0}
    terms: {outputs_may_train_models: true}
  - name: bad
    kind: replay
    path: bad.jsonl
    model: small-local-model
    terms: {outputs_may_train_models: true}
teacher: bad
"""
# imbalanced, as in the report that led to the check: 80% billing. The texts carry no topic words, so a
# bag-of-words model cannot learn the task from them and only a teacher that knows the answers beats it.
GOLD = ["billing"] * 64 + ["bug"] * 12 + ["praise"] * 4
N_TEST = 20
WORDS = ["account", "today", "again", "please", "order", "the", "my", "help", "thanks", "when", "why", "card"]
GOOD_S, BAD_S = 0.5, 2.0      # recorded latency per call (what the ledger keeps)
GOOD_USD = (100 * 1.0 + 2 * 4.0) / 1e6


def build(tmp_path, gold=True):
    """A classify project: 80 train/validation inputs with gold, 20 test inputs whose gold must never be read
    (it is a label no teacher or baseline could produce), and two replay recordings covering every input."""
    p = Project.init(tmp_path / "p", "classify", spec_text=SPEC)
    rng = random.Random(0)
    rows = []
    for i, g in enumerate(GOLD):
        rows.append((f"t{i:03d}", f"ticket {i} " + " ".join(rng.sample(WORDS, 4)), g,
                     "validation" if i % 5 == 0 else "train"))
    rows += [(f"x{i:03d}", f"test ticket {i} " + " ".join(rng.sample(WORDS, 4)), "LEAKED", "test")
             for i in range(N_TEST)]
    with p.store.tx() as c:
        for rid, text, g, split in rows:
            c.execute("INSERT INTO examples(id, text, norm, gold, split, created_at) VALUES(?,?,?,?,?,?)",
                      (rid, text, text.lower(), json.dumps(g) if gold else None, split, time.time()))
    good, bad = [], []
    for k, (rid, text, g, split) in enumerate(rows):
        msgs = render_messages(p.spec, text)
        right = g if g != "LEAKED" else "bug"
        good.append((msgs, {"texts": [right], "tokens_in": 100, "tokens_out": 2, "latency_s": GOOD_S}))
        # the bad teacher answers 'praise' to most inputs: far below the constant 'billing'
        bad.append((msgs, {"texts": [right if k % 4 == 0 else "praise"], "tokens_in": 100, "tokens_out": 2,
                           "latency_s": BAD_S}))
    write_recording(p.root / "good.jsonl", {"teacher": "good", "command": "test"}, good)
    write_recording(p.root / "bad.jsonl", {"teacher": "bad", "command": "test"}, bad)
    return p, {rid: text for rid, text, _, _ in rows}


@pytest.fixture
def asked(monkeypatch):
    """Every input text a replay teacher is asked about (the user template is the bare text)."""
    seen: list[str] = []
    ask = ReplayTeacher.ask

    async def counting(self, req):
        seen.append(req.messages[-1]["content"])
        return await ask(self, req)

    monkeypatch.setattr(ReplayTeacher, "ask", counting)
    return seen


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_teacher_worse_than_the_majority_answer_is_called_out_and_label_warns(tmp_path, asked):
    p, _ = build(tmp_path)
    r = cli("teacher", "check", p.root, "--teacher", "bad", "--sample", 60)
    assert r.exit_code == 3, r.output                    # no candidate beats a trivial baseline
    assert FAIL_MESSAGE in r.output
    res = json.loads((p.root / "reports" / "teacher_check.json").read_text())
    bad = res["candidates"][0]
    assert bad["verdict"] == "no_better_than_baseline" and res["best"] is None
    acc, maj = bad["metrics"]["accuracy"]["value"], res["baselines"]["majority"]["metrics"]["accuracy"]["value"]
    assert res["baselines"]["majority"]["answer"] == "billing"
    assert maj == pytest.approx(0.8, abs=0.02) and acc < maj - 0.3
    assert bad["vs_baselines"]["majority"]["accuracy"]["ci"][1] < 0    # clearly worse, not just unlucky
    # per class: 'praise' is predicted for most inputs, so its precision is low and billing's recall is low
    pc = {c["label"]: c for c in bad["per_class"]}
    assert pc["praise"]["predicted"] > 30 and pc["praise"]["precision"]["value"] < 0.2
    assert pc["billing"]["recall"]["value"] < 0.4 and pc["billing"]["support"] == 48
    # stored for `distill label`, which warns before it spends (and still labels)
    row = p.store.q("SELECT * FROM teacher_checks WHERE teacher='bad'")[0]
    assert row["verdict"] == "no_better_than_baseline" and FAIL_MESSAGE in row["summary"]
    r = cli("label", p.root, "--no-progress")
    assert r.exit_code == 0, r.output
    warning = " ".join(r.output.split())           # rich may wrap the long line
    assert "warning:" in warning and "did not pass its latest check" in warning and FAIL_MESSAGE in warning
    assert f"accuracy {acc:.3f} vs majority answer {maj:.3f}" in warning
    assert p.store.one("SELECT COUNT(*) FROM labels WHERE teacher='bad' AND status='ok'") == len(GOLD) + N_TEST
    # after the prompt changed, the warning says the check is about the old one
    spec_file = p.root / "distill.yaml"
    spec_file.write_text(spec_file.read_text().replace("Topic of a support ticket.", "The topic of one ticket."))
    assert "changed since" in label_warning(Project.open(p.root), None)


def test_a_good_teacher_is_distillable_and_best_of_two_and_label_does_not_warn(tmp_path, asked):
    p, _ = build(tmp_path)
    res = check(p, ["bad", "good"], sample=60, progress=False)
    by = {c["teacher"]: c for c in res["candidates"]}
    good = by["good"]
    assert good["verdict"] == "distillable", good["message"]
    assert good["metrics"]["accuracy"]["value"] == 1.0
    for diffs in good["vs_baselines"].values():      # clearly better than both baselines on both metrics
        assert all(d["ci"][0] > 0 for d in diffs.values())
    assert res["baselines"]["tfidf_lr"]["available"] and res["baselines"]["tfidf_lr"]["folds"] == 3
    assert by["bad"]["verdict"] == "no_better_than_baseline"
    assert res["best"]["teacher"] == "good"
    # seconds and USD per input come from the recorded calls; the projection covers the inputs left
    assert good["seconds_per_input"] == pytest.approx(GOOD_S) and by["bad"]["seconds_per_input"] == pytest.approx(BAD_S)
    assert good["usd_per_input"] == pytest.approx(GOOD_USD)
    left = len(GOLD) + N_TEST - 60
    assert good["projection"]["inputs"] == left
    assert good["projection"]["usd"] == pytest.approx(left * GOOD_USD)
    assert good["projection"]["seconds"] == pytest.approx(left * GOOD_S)
    # a second check pays nothing (all cache hits) and still measures the recorded latency, not 0 s
    n_calls = p.store.one("SELECT COUNT(*) FROM teacher_calls")
    again = check(p, ["good"], sample=60, progress=False)
    assert p.store.one("SELECT COUNT(*) FROM teacher_calls") == n_calls
    assert again["candidates"][0]["seconds_per_input"] == pytest.approx(GOOD_S)
    r = cli("teacher", "check", p.root, "--teacher", "good", "--sample", 60, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["best"]["teacher"] == "good"
    r = cli("label", p.root, "--teacher", "good", "--no-progress")
    assert r.exit_code == 0 and "did not pass" not in r.output


def test_the_sample_is_stratified_deterministic_and_never_touches_the_test_split(tmp_path, asked):
    p, texts = build(tmp_path)
    s = gold_sample(p, 40, seed=0)
    assert s.ids == gold_sample(p, 40, seed=0).ids                 # same sample every run
    assert s.ids != gold_sample(p, 40, seed=1).ids                 # the seed changes it
    assert s.ids == sorted(s.ids) and len(set(s.ids)) == 40
    assert {sp for sp in s.splits} <= {"train", "validation"}
    # proportional to the gold answers (64/12/4 of 80 -> 32/6/2 of 40), every class present
    assert sorted((s.refs.count(lab), lab) for lab in set(s.refs)) == [(2, "praise"), (6, "bug"), (32, "billing")]
    assert gold_sample(p, 1000, seed=0).ids == sorted(i for i in texts if i.startswith("t"))   # fewer: all of them

    res = check(p, ["good", "bad"], sample=40, progress=False)
    assert res["sample"]["ids"] == s.ids
    test_texts = {t for i, t in texts.items() if i.startswith("x")}
    assert asked and not test_texts & set(asked)                    # no test input was sent to a teacher
    assert sorted(asked) == sorted(texts[i] for i in s.ids for _ in (0, 1))   # each teacher asked the sample once
    assert p.store.one("SELECT COUNT(*) FROM labels WHERE example_id LIKE 'x%'") == 0
    # the test split's gold ('LEAKED', a label nothing else produces) is read nowhere
    assert "LEAKED" not in (p.root / "reports" / "teacher_check.json").read_text()
    assert all("LEAKED" not in r["result"] for r in p.store.q("SELECT result FROM teacher_checks"))


def test_label_after_the_check_makes_no_new_call_for_the_sampled_inputs(tmp_path, asked):
    p, texts = build(tmp_path)
    res = check(p, ["good"], sample=40, progress=False)
    sampled = {texts[i] for i in res["sample"]["ids"]}
    assert set(asked) == sampled
    asked.clear()
    r = cli("label", p.root, "--teacher", "good", "--no-progress")
    assert r.exit_code == 0, r.output
    assert not sampled & set(asked)                                  # answered from the check's calls
    assert len(asked) == len(texts) - 40                             # everything else, once
    assert "40 already labelled" in r.output
    assert p.store.one("SELECT COUNT(*) FROM teacher_calls WHERE teacher='good'") == len(texts)


def test_bad_input_fails_clearly(tmp_path, asked):
    p, _ = build(tmp_path, gold=False)
    r = cli("teacher", "check", p.root)
    assert r.exit_code == 2
    out = " ".join(r.output.split())
    assert "no train/validation input has a gold answer" in out and "--label" in out and "distill correct" in out
    p2, _ = build(tmp_path / "b")
    r = cli("teacher", "check", p2.root, "--teacher", "good", "--teacher", "nope")
    assert r.exit_code == 2 and "no teacher named 'nope'" in r.output
    assert not asked and p2.store.one("SELECT COUNT(*) FROM teacher_calls") == 0    # refused before any call
    with pytest.raises(DistillError, match="--sample"):
        check(p2, ["good"], sample=0)
    gen = Project.init(tmp_path / "g", "generate")
    with pytest.raises(DistillError, match="generate"):
        check(gen, None)


def _d(value, lo):
    return {"value": value, "ci": [lo, value + 0.1]}


@pytest.mark.parametrize("majority, tfidf, want", [
    # (accuracy Δ, its CI low), (macro-F1 Δ, its CI low) against each baseline
    ([(0.2, 0.1), (0.3, 0.2)], [(0.1, 0.05), (0.2, 0.1)], "distillable"),
    ([(-0.3, -0.4), (0.1, 0.02)], [(0.1, 0.05), (0.2, 0.1)], "no_better_than_baseline"),   # more errors than a constant
    ([(0.2, 0.1), (0.0, -0.1)], [(0.1, 0.05), (0.2, 0.1)], "no_better_than_baseline"),     # macro-F1 at a constant's
    ([(0.2, 0.1), (0.3, 0.2)], [(-0.01, -0.1), (-0.02, -0.1)], "no_better_than_baseline"),  # a bag of words is as good
    ([(0.2, 0.1), (0.3, 0.2)], [(-0.01, -0.1), (0.2, 0.1)], "not_clearly_better"),         # worse on one metric only
    ([(0.05, 0.0), (0.3, 0.2)], [(0.1, 0.05), (0.2, 0.1)], "not_clearly_better"),          # the CI reaches 0
])
def test_the_verdict_rule(majority, tfidf, want):
    ms = ("accuracy", "macro_f1")
    c = {"n": 100, "no_answer": {}, "metrics": {m: {"value": 0.5} for m in ms},
         "vs_baselines": {"majority": {m: _d(*x) for m, x in zip(ms, majority)},
                          "tfidf_lr": {m: _d(*x) for m, x in zip(ms, tfidf)}}}
    base = {"metrics": {m: {"value": 0.4} for m in ms}}
    got, text = verdict(c, {"majority": base, "tfidf_lr": base}, "classify")
    assert got == want
    assert (FAIL_MESSAGE in text) == (want == "no_better_than_baseline")


EXTRACT_SPEC = """name: orders
kind: extract
schema:
  type: object
  properties: {item: {type: string}, qty: {type: integer}}
  required: [item]
teachers:
  - name: rec
    kind: replay
    path: rec.jsonl
    terms: {outputs_may_train_models: true}
teacher: rec
"""


def test_extract_is_scored_by_exact_match_and_field_f1_against_the_most_common_answer(tmp_path):
    p = Project.init(tmp_path / "e", "extract", spec_text=EXTRACT_SPEC)
    golds = [{"item": "tea", "qty": 1}] * 6 + [{"item": f"thing{i}", "qty": i} for i in range(2, 8)]
    entries = []
    with p.store.tx() as c:
        for i, g in enumerate(golds):
            text = f"order {i}: {g['qty']} x {g['item']}"
            c.execute("INSERT INTO examples(id, text, norm, gold, split, created_at) VALUES(?,?,?,?,?,?)",
                      (f"o{i:02d}", text, text, json.dumps(g), "train", time.time()))
            answer = dict(g) if i % 3 else {"item": g["item"]}       # a third of the answers lose the quantity
            entries.append((render_messages(p.spec, text), json.dumps(answer)))
    write_recording(p.root / "rec.jsonl", {"teacher": "rec", "command": "test"}, entries)
    res = check(p, None, sample=50, progress=False)
    c = res["candidates"][0]
    assert res["sample"]["n"] == 12 and any("only 12" in n for n in res["notes"])
    assert res["baselines"]["majority"]["answer"] == {"item": "tea", "qty": 1}
    assert res["baselines"]["majority"]["metrics"]["exact_match"]["value"] == pytest.approx(0.5)
    assert c["metrics"]["exact_match"]["value"] == pytest.approx(8 / 12)
    # field F1: 24 gold pairs, 20 predicted, all right -> 2*20 / 44
    assert c["metrics"]["field_f1"]["value"] == pytest.approx(40 / 44)
    assert {f["field"] for f in c["per_field"]} == {"item", "qty"}
    assert "tfidf_lr" not in res["baselines"]
    assert c["verdict"] == "not_clearly_better"        # 8 vs 6 right of 12: the paired CI reaches far below 0
