"""`distill iterate` end to end on a tiny project: fake OpenAI teacher on loopback, tiny random BERT student.

Behaviour checked: failure-queue texts become examples (test-hashed ones stay test and are never trained on),
each round trains a new run with lineage, a model that regresses is refused with the segment and the size of
the drop, a better one is promoted, and a round killed with -9 mid-training completes when re-run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distill.dataset import rows
from distill.iterate import SERVING_KEY, iterate
from distill.project import Project
from distill.serve import queue as fq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "unit"))
from fake_openai_server import start_server  # noqa: E402
from tiny_models import FILLER, tiny_bert_folder  # noqa: E402

GOOD = "lr: 0.003\n  epochs: 6"
BAD = "lr: 0.0000001\n  epochs: 1"


def spec_text(base_url: str, base: Path, student: str = GOOD) -> str:
    lr, epochs = (line.split(": ")[1] for line in student.split("\n  "))
    return textwrap.dedent(f"""\
        name: it
        kind: classify
        description: Is the customer happy?
        labels: [good, bad]
        segment_field: channel
        splits: {{validation: 0.2, test: 0.3}}
        quality: {{metric: accuracy, against: gold, overall: 0.8, worst_segment: 0.7, min_segment_size: 5}}
        teachers:
          - name: api
            kind: openai
            base_url: {base_url}
            model: fake-1
            api_key_env: FAKE_KEY
            max_retries: 1
            price: {{input_per_1m: 1.0, output_per_1m: 2.0}}
            terms: {{outputs_may_train_models: true}}
        teacher: api
        student:
          base: {base}
          learning_rate: {lr}
          epochs: {epochs}
          batch_size: 8
          max_length: 16
          device: cpu
          early_stopping_patience: 0
        """)


def texts(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(text, gold, channel): the label word is in the text, so the fake teacher (which answers the label
    named in the message) is right and a tiny BERT can learn it."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lab = "good" if i % 2 == 0 else "bad"
        words = rng.sample(FILLER, 3) + [lab, lab]
        rng.shuffle(words)
        out.append((" ".join(words) + f" {seed} {i}", lab, "web" if i % 4 < 2 else "app"))
    return out


def write_csv(path: Path, data: list[tuple[str, str, str]]) -> Path:
    path.write_text("text,gold,channel\n" + "".join(f"{t},{g},{c}\n" for t, g, c in data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    h = start_server(tmp_path_factory.mktemp("srv"), labels=("good", "bad"))
    os.environ["FAKE_KEY"] = "k"
    yield h
    h.stop()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny") / "bert")


def new_project(root: Path, server, base: Path) -> Project:
    from distill.data.importer import import_file

    project = Project.init(root, "classify", spec_text=spec_text(server.base_url, base))
    import_file(project, write_csv(root.parent / f"{root.name}-seed.csv", texts(120, seed=1)), label="gold")
    return project


def reopen(project: Project, student: str, server, base: Path) -> Project:
    (project.root / "distill.yaml").write_text(spec_text(server.base_url, base, student), encoding="utf-8")
    project.close()
    return Project.open(project.root)


def test_rounds_promote_refuse_promote(tmp_path, server, base):
    project = new_project(tmp_path / "p", server, base)
    queued = [t for t, _, _ in texts(30, seed=2)]
    for t in queued:
        fq.enqueue(project.store, t, "routed", student_answer="good", student_conf=0.4)

    # round 1: no serving model yet -> promoted if it passes the gate
    r1 = iterate(project, progress=False, latency_samples=5)
    assert r1.round == 1 and r1.queue_consumed == 30 and r1.queue_by_reason == {"routed": 30}
    assert r1.gate_passed and r1.promoted, r1.reasons
    assert project.store.get_meta(SERVING_KEY) == r1.run_id
    # queue texts are examples now; test-hashed ones are test and never among the training rows
    ex = {r["text"]: r["split"] for r in project.store.q("SELECT text, split FROM examples")}
    assert all(t in ex for t in queued)
    trained = {r.text for r in rows(project, "api", ("train", "validation"))}
    in_test = [t for t in queued if ex[t] == "test"]
    assert in_test and not (set(in_test) & trained)
    assert {t for t in queued if ex[t] == "train"} <= trained
    assert fq.list_entries(project.store, status="new") == []
    assert {e.round for e in fq.list_entries(project.store, status="consumed")} == {1}

    # round 2: a hopeless config (lr 1e-7, 1 epoch) on new traffic -> a new run, refused with the reason
    project = reopen(project, BAD, server, base)
    r2 = iterate(project, new_traffic=write_csv(tmp_path / "traffic2.csv", texts(20, seed=3)), progress=False,
                 latency_samples=5)
    assert r2.run_id != r1.run_id and r2.parent_run_id == r1.run_id
    assert not r2.promoted and r2.serving_model == r1.run_id
    text = " ".join(r2.reasons)
    assert "segment '" in text and "fell from" in text, text
    seg = [d for d in r2.comparison if d.segment != "(overall)" and d.gated]
    assert seg and all(d.delta is not None for d in seg) and min(d.delta for d in seg) < -0.02
    assert project.store.get_meta(SERVING_KEY) == r1.run_id
    # every default (serve, eval, export) takes the latest train run: that must still be the serving model
    assert project.store.latest_run("train")["id"] == r1.run_id
    refused = json.loads(project.store.q("SELECT record FROM runs WHERE id=?", (r2.run_id,))[0]["record"])
    assert refused["lineage"] == {**refused["lineage"], "round": 2, "parent_model": r1.run_id, "promoted": False,
                                  "teacher": "api"}
    assert refused["lineage"]["data_sha256"] == refused["data_sha256"]

    # round 3: the good config again, more data -> promoted over round 1's model
    project = reopen(project, GOOD, server, base)
    for t, _, _ in texts(10, seed=4):
        fq.enqueue(project.store, t, "shadow_disagreement")
    r3 = iterate(project, progress=False, latency_samples=5)
    assert r3.promoted, r3.reasons
    assert r3.parent_run_id == r1.run_id and project.store.get_meta(SERVING_KEY) == r3.run_id
    assert project.store.latest_run("train")["id"] == r3.run_id
    assert all(d.delta is None or d.delta >= -0.02 for d in r3.comparison)
    assert [r["id"] for r in project.store.q("SELECT id FROM runs WHERE kind='iterate' ORDER BY id")] == \
        ["iterate-1", "iterate-2", "iterate-3"]
    # a round with nothing new trains the same run: reported, nothing promoted or refused
    r4 = iterate(project, progress=False, latency_samples=5)
    assert r4.stopped == "no_data" and r4.serving_model == r3.run_id
    project.close()


def test_feedback_and_review_fixes_reach_the_next_round(tmp_path, server, base):
    """Client feedback and reviewer corrections made between rounds: the next round trains on them (feedback
    with the lower trust level), its record says which fixes are new since the previous round, by kind, and how
    the new and the serving model answer those inputs; a round after it reports no new fixes."""
    from distill import review

    project = new_project(tmp_path / "p", server, base)
    r1 = iterate(project, progress=False, latency_samples=5)
    assert r1.promoted and r1.fixes["new"] == 0 and r1.fixes["since"] == "the start"
    train = project.store.q("SELECT id, text, gold FROM examples WHERE split='train' ORDER BY id")
    flip = {"good": "bad", "bad": "good"}
    # a reviewer flips 6 training labels; clients send feedback on 4 other training inputs and 1 new text
    for r in train[:6]:
        review.decide(project, f"example:{r['id']}", "audit", "ann", "correct", flip[json.loads(r["gold"])])
    new_text, new_gold, _ = texts(1, seed=9)[0]
    for t, lab in [(r["text"], flip[json.loads(r["gold"])]) for r in train[6:10]] + [(new_text, flip[new_gold])]:
        fq.enqueue(project.store, t, "feedback", student_answer=lab, teacher_answer=lab)

    r2 = iterate(project, progress=False, latency_samples=5)
    new_split = project.store.one("SELECT split FROM examples WHERE text=?", (new_text,))
    n_fb = 4 + (new_split != "test")
    assert r2.feedback["stored"] == n_fb and r2.feedback["test"] == (new_split == "test")
    f = r2.fixes
    assert f["since"] == "round 1" and f["new"] == 6 + n_fb and f["by_kind"] == {"review": 6, "feedback": n_fb}
    assert f["changed_teacher_label"] == 6 + n_fb and len(f["items"]) == 6 + n_fb      # all flip the teacher
    e = f["effect"]
    assert e["n"] == 6 + n_fb and 0 <= e["new_model_follows"] <= e["n"] and 0 <= e["old_model_follows"] <= e["n"]
    assert {it["kind"] for it in f["items"]} == {"review", "feedback"}
    assert all(it["new_model"] in ("good", "bad") and it["old_model"] in ("good", "bad") for it in f["items"])
    assert "fixes new since round 1" in r2.message()
    trained = {r.id: (r.answer, r.source) for r in rows(project, "api", ("train", "validation"))}
    assert [trained[r["id"]] for r in train[:6]] == [(flip[json.loads(r["gold"])], "correction") for r in train[:6]]
    assert [trained[r["id"]] for r in train[6:10]] == [(flip[json.loads(r["gold"])], "feedback") for r in train[6:10]]
    rec = json.loads(project.store.q("SELECT record FROM runs WHERE id='iterate-2'")[0]["record"])
    assert len(rec["fixes"]["snapshot"]) == 6 + n_fb

    # what the review page says about rounds: the last one's fixes, and what the next will pick up
    got = review.rounds(project)
    assert got["last"]["round"] == 2 and got["last"]["new"] == 6 + n_fb and got["last"]["effect"] == e
    assert got["next"] == {"new": 0, "by_kind": {}, "queue_reviewed": 0, "queue_feedback": 0}
    review.decide(project, f"example:{train[6]['id']}", "audit", "bob", "correct", json.loads(train[6]["gold"]))
    fq.enqueue(project.store, "a new served text", "feedback", teacher_answer="good")
    assert review.rounds(project)["next"] == {"new": 1, "by_kind": {"review": 1}, "queue_reviewed": 0,
                                               "queue_feedback": 1}
    review.undo(project, "bob")

    r3 = iterate(project, progress=False, latency_samples=5)      # only the client's answer on the new text
    stored = r3.feedback["stored"]
    assert stored == (project.store.one("SELECT split FROM examples WHERE text='a new served text'") != "test")
    assert r3.fixes["new"] == stored and r3.fixes["since"] == "round 2" and r3.fixes["withdrawn"] == 0
    project.close()


def test_bad_inputs_are_distill_errors(tmp_path, server, base):
    from distill.errors import DistillError

    project = new_project(tmp_path / "p", server, base)
    with pytest.raises(DistillError, match="no such file"):
        iterate(project, new_traffic=tmp_path / "missing.csv", progress=False)
    with pytest.raises(DistillError, match="margin"):
        iterate(project, regression_margin=-1, progress=False)
    assert project.store.get_meta("iterate_open") is None   # nothing was opened
    project.close()


def test_kill9_mid_training_then_rerun_completes(tmp_path, server, base):
    project = new_project(tmp_path / "p", server, base)
    for t, _, _ in texts(20, seed=5):
        fq.enqueue(project.store, t, "routed")
    project.close()
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["FAKE_KEY"] = "k"
        from transformers import TrainerCallback
        import distill.recipes.train_classifier as tc
        from distill.project import Project
        from distill.iterate import iterate

        class Slow(TrainerCallback):   # give the parent time to kill us mid-training
            def on_step_end(self, args, state, control, **kw):
                import time; time.sleep(0.2)

        orig = tc.train
        tc.train = lambda *a, **k: orig(*a, **{{**k, "callbacks": [Slow()]}})
        iterate(Project.open({str(project.root)!r}), progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_dir = project.root / "models"
    deadline = time.monotonic() + 120
    # kill once an epoch checkpoint exists: labelling, filtering and one epoch of training are done
    while time.monotonic() < deadline and not list(ckpt_dir.glob("*/checkpoints/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    project = Project.open(project.root)
    assert project.store.get_meta("iterate_open") == "1"              # the round is open
    calls_before = project.store.one("SELECT COUNT(*) FROM teacher_calls")
    r = iterate(project, progress=False, latency_samples=5)
    assert r.round == 1 and r.resumed and r.promoted, r.reasons
    assert r.queue_consumed == 20                                      # the entries the killed run took
    assert project.store.one("SELECT COUNT(*) FROM teacher_calls") == calls_before   # nothing paid twice
    rec = json.loads(project.store.q("SELECT record FROM runs WHERE id=?", (r.run_id,))[0]["record"])
    assert rec["resumed_from"] is not None and rec["resumed_from"].startswith("checkpoint-")
    assert project.store.get_meta("iterate_open") is None and project.store.get_meta("iterate_round") == "1"
    project.close()
