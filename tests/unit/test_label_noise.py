"""filters.suspect_labels: confident learning finds planted label noise without gold."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from test_filters import make_project, put_label

from distill.data.importer import import_file
from distill.dataset import rows
from distill.errors import DistillError
from distill.filters import run_filters
from distill.label_noise import find_suspects
from distill.task import SuspectSpec, load_spec

VOCAB = {
    "positive": "great wonderful excellent loved fantastic superb delightful brilliant".split(),
    "negative": "terrible awful hated horrible dreadful broken useless disappointing".split(),
    "neutral": "okay average ordinary mediocre adequate standard typical middling".split(),
}
FILLER = "the it was this product really quite service and".split()


def synthetic(n_per_class: int = 50, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for lab, words in VOCAB.items():
        for i in range(n_per_class):
            toks = rng.sample(words, 3) + rng.sample(FILLER, 3)
            rng.shuffle(toks)
            out.append((f"{' '.join(toks)} {i}", lab))
    return out


def plant(data: list[tuple[str, str]], share: float, seed: int = 1) -> tuple[list[str], set[int]]:
    """Teacher labels with ``share`` of them flipped to another class; returns (given, flipped indices)."""
    rng = random.Random(seed)
    flipped = set(rng.sample(range(len(data)), int(share * len(data))))
    labels = list(VOCAB)
    given = [rng.choice([x for x in labels if x != lab]) if i in flipped else lab for i, (_, lab) in enumerate(data)]
    return given, flipped


def test_find_suspects_recovers_planted_flips_and_ranks_them_first():
    data = synthetic()
    given, flipped = plant(data, 0.1)
    found = find_suspects([t for t, _ in data], given, [None] * len(data), list(VOCAB),
                          SuspectSpec(features="tfidf", folds=5))
    flagged = {s.index for s in found}
    recall = len(flagged & flipped) / len(flipped)
    precision = len(flagged & flipped) / max(len(flagged), 1)
    assert recall >= 0.9 and precision >= 0.8, (recall, precision)
    # the review order puts planted rows first: the first len(flipped)//2 flags are all planted
    assert all(s.index in flipped for s in found[: len(flipped) // 2])
    assert [s.rank for s in found] == list(range(1, len(found) + 1))
    # the suggested label of a flagged flip is the true one
    truth = {i: lab for i, (_, lab) in enumerate(data)}
    assert sum(s.likely == truth[s.index] for s in found if s.index in flipped) >= 0.9 * len(flagged & flipped)


def test_teacher_distribution_is_combined():
    """A row the cheap model doubts but the teacher is certain of is not flagged when the teacher's weight
    is high; with the cheap model alone it is."""
    data = synthetic()
    given, flipped = plant(data, 0.1)
    i = min(flipped)
    certain = [None] * len(data)
    certain[i] = {given[i]: 1.0}
    alone = find_suspects([t for t, _ in data], given, certain, list(VOCAB),
                          SuspectSpec(features="tfidf", teacher_weight=0.0))
    trusted = find_suspects([t for t, _ in data], given, certain, list(VOCAB),
                            SuspectSpec(features="tfidf", teacher_weight=0.9))
    assert i in {s.index for s in alone}
    assert i not in {s.index for s in trusted}


def labelled_project(tmp_path: Path, n_per_class: int, with_test: bool, action: str = "drop"):
    """A project whose teacher labels are ``synthetic`` data with 10% planted flips, and no gold column at all
    (the filter must work from the teacher's labels alone); every 10th row is test when ``with_test``."""
    data = synthetic(n_per_class)
    given, flipped = plant(data, 0.1)
    p = make_project(tmp_path, {"suspect_labels": {"features": "tfidf", "action": action},
                                "drop_disagree_with_gold": False})
    with open(tmp_path / "f.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "split"])
        w.writerows([f"r{i:03d}", text, "test" if with_test and i % 10 == 0 else "train"]
                    for i, (text, _) in enumerate(data))
    import_file(p, tmp_path / "f.csv", id="id", split="split")
    for i in range(len(data)):
        put_label(p, f"r{i:03d}", given[i])
    return p, data, flipped


def test_filter_run_drops_planted_rows_without_gold_and_never_corrections(tmp_path: Path):
    p, data, flipped = labelled_project(tmp_path, 40, with_test=True)
    corrected = sorted(i for i in flipped if i % 10)[0]   # a human fixed this one: never flagged
    with p.store.tx() as c:
        c.execute("INSERT INTO corrections(example_id, answer, source, created_at) VALUES(?, ?, 'test', 0)",
                  (f"r{corrected:03d}", json.dumps(data[corrected][1])))
    rep = run_filters(p)
    reasons = {r["example_id"]: r["reason"] for r in p.store.q(
        "SELECT example_id, reason FROM filter_decisions WHERE run_id = ?", (rep.run_id,))}
    planted_train = {f"r{i:03d}" for i in flipped if i % 10 and i != corrected}
    dropped = {k for k, v in reasons.items() if v == "suspect_label"}
    assert len(dropped & planted_train) >= 0.9 * len(planted_train)
    assert len(dropped - planted_train) <= 2
    assert reasons[f"r{corrected:03d}"] == "corrected"
    assert not any(k.endswith("0") and int(k[1:]) % 10 == 0 for k in reasons)   # test rows are never filtered
    assert rep.dropped_by_reason.get("suspect_label") == len(dropped)
    # the review list: ranked, one per drop, with the text, the teacher's label and the likely one
    assert [s["rank"] for s in rep.suspects] == sorted(s["rank"] for s in rep.suspects)
    assert {s["id"] for s in rep.suspects} == dropped
    kept = {r.id for r in rows(p, "rec", ("train",))}
    assert not kept & dropped and f"r{corrected:03d}" in kept


def test_relabel_keeps_planted_rows_on_their_true_label_without_gold(tmp_path: Path):
    """action relabel: a flagged row is kept and trains on the likely label; the others keep the teacher's."""
    from distill.filters import list_suspects
    from distill.review import queue_order

    p, data, flipped = labelled_project(tmp_path, 40, with_test=True, action="relabel")
    rep = run_filters(p)
    assert "suspect_label" not in rep.dropped_by_reason and rep.relabelled == len(rep.suspects) > 0
    assert p.store.one("SELECT COUNT(*) FROM filter_relabels WHERE run_id = ?", (rep.run_id,)) == rep.relabelled
    got = {r.id: r for r in rows(p, "rec", ("train",))}
    relabelled = {k for k, r in got.items() if r.source == "relabelled"}
    assert relabelled == {s["id"] for s in rep.suspects}
    planted_train = {f"r{i:03d}" for i in flipped if i % 10}
    caught = relabelled & planted_train
    assert len(caught) >= 0.9 * len(planted_train)
    truth = {f"r{i:03d}": lab for i, (_, lab) in enumerate(data)}
    assert sum(got[k].answer == truth[k] for k in caught) >= 0.9 * len(caught)
    assert all(r.source == "teacher" for k, r in got.items() if k not in relabelled)
    assert all(r.source == "teacher" for r in rows(p, "rec", ("test",)))    # test rows are never relabelled
    # the review list and the review queue: every flag, most suspect first, marked as relabelled
    listed = list_suspects(p)
    assert {d["id"] for d in listed} == relabelled and {d["action"] for d in listed} == {"relabelled"}
    order = [int(why.split("rank ")[1].split(",")[0]) for _, why in queue_order(p, "suspect")]
    assert order == sorted(order) == list(range(1, len(relabelled) + 1))
    # status and the report's data funnel say how many rows train on the filter's label
    from distill.report.html import data_funnel
    from distill.status import status

    assert status(p)["filter"]["rec"]["relabelled"] == rep.relabelled
    step = next(s for s in data_funnel(p, "rec", {}) if "relabelled" in s["step"])
    assert step["delta"] == 0 and step["note"].startswith(f"{rep.relabelled} ")


def test_spec_shorthand_and_kind_check(tmp_path: Path):
    def load_spec_text(text: str):
        (tmp_path / "distill.yaml").write_text(text)
        return load_spec(tmp_path / "distill.yaml")

    base = ("name: t\nkind: {kind}\n{extra}filters:\n  suspect_labels: true\nteachers: [{{name: r, kind: replay, "
            "path: r.jsonl}}]\n")
    spec = load_spec_text(base.format(kind="classify", extra="labels: [a, b]\n"))
    assert spec.filters.suspect_labels == SuspectSpec()
    with pytest.raises(DistillError, match="suspect_labels"):
        load_spec_text(base.format(kind="extract", extra="schema: {type: object}\n"))


def test_cli_prints_the_review_list(tmp_path: Path):
    from typer.testing import CliRunner

    from distill.cli import app

    p, data, flipped = labelled_project(tmp_path, 30, with_test=False)
    p.close()
    res = CliRunner().invoke(app, ["filter", str(p.root)])
    assert res.exit_code == 0, res.output
    assert "suspect labels" in res.output and "likely" in res.output
    res = CliRunner().invoke(app, ["status", str(p.root), "--json", "--suspects"])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.output)["suspect_labels"]
    assert listed and {d["id"] for d in listed} <= {f"r{i:03d}" for i in range(len(data))}
    assert sum(int(d["id"][1:]) in flipped for d in listed) >= 0.8 * len(listed)
