"""The classify training recipe on a tiny random BERT (built in-process): behaviour, not numbers.

Loss falls, every trainable parameter changes, same seed -> same weights, a crash after an epoch
checkpoint + rerun -> the same weights as an uninterrupted run, finished runs are reused, and bad
configs / bad data give a DistillError that names the field."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback, set_seed

from distill.errors import DistillError
from distill.recipes.train_classifier import train, trained_model_path, training_examples
from distill.student_config import EncoderStudentConfig
from distill.students.classifier import ClassifierStudent

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_bert_folder, tiny_classify_project  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny") / "bert")


def tiny_config(base: Path, **kw) -> EncoderStudentConfig:
    # lr 5e-3 / batch 8: a random 2-layer BERT needs big steps to learn the toy task in 4 epochs
    d = dict(base_model=str(base), epochs=4, learning_rate=5e-3, batch_size=8, max_length=16, device="cpu",
             early_stopping_patience=0)
    return EncoderStudentConfig(**{**d, **kw})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in AutoModelForSequenceClassification.from_pretrained(path).state_dict().items()}


@pytest.fixture(scope="module")
def reference_run(base, tmp_path_factory):
    """One uninterrupted 4-epoch run, shared by the tests that compare against it."""
    project = tiny_classify_project(tmp_path_factory.mktemp("ref") / "proj")
    return project, train(project, config=tiny_config(base), progress=False)


def test_loss_falls_and_student_learns(reference_run):
    _, rep = reference_run
    epochs = rep.record["epochs"]
    assert len(epochs) == 4 and rep.record["epochs_run"] == 4
    assert epochs[-1]["loss"] < 0.8 * epochs[0]["loss"]
    assert epochs[-1]["eval_loss"] < 0.8 * epochs[0]["eval_loss"]
    student = ClassifierStudent.load(rep.path, device="cpu")
    assert student.labels == ["pos", "neg"]
    p = student.predict_proba(["good great love the order", "bad awful hate the order"])
    assert p[0].argmax() == 0 and p[1].argmax() == 1


def test_every_trainable_parameter_changes(reference_run, base):
    _, rep = reference_run
    set_seed(0)  # the recipe seeds with config.seed right before creating the student
    before = {k: v.detach().clone() for k, v in
              ClassifierStudent.create(str(base), ["pos", "neg"], device="cpu").model.state_dict().items()}
    after = weights(rep.path)
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []


def test_record_artefacts_and_store(reference_run):
    project, rep = reference_run
    rec = json.loads((rep.path / "training_record.json").read_text())
    assert rec["run_id"] == rep.run_id and rep.path == project.models_dir / rep.run_id / "final"
    assert rec["counts"]["train"] == 64 and rec["counts"]["validation"] == 16
    # every 5th row was stored without probs -> one-hot fallback, counted
    assert rec["counts"]["one_hot_fallback"] == 16
    assert len(rec["data_sha256"]) == 64
    assert rec["teacher"]["identity"]["name"] == "rec" and rec["teacher"]["replay"]["path"] == "recorded.jsonl"
    assert rec["train_samples_per_second"] > 0 and all(e["epoch_seconds"] > 0 for e in rec["epochs"])
    assert rec["versions"]["torch"] and rec["config"]["signal"] == "mix"
    # a plain HF folder: loads without distill
    AutoModelForSequenceClassification.from_pretrained(rep.path)
    assert AutoTokenizer.from_pretrained(rep.path).model_max_length == 16
    assert not (rep.path.parent / "checkpoints").exists()          # cleaned up after success
    row = project.store.latest_run("train")
    assert row["id"] == rep.run_id and row["status"] == "done"
    assert trained_model_path(project) == rep.path.resolve()


def test_finished_run_is_reused_not_retrained(reference_run, base):
    project, rep = reference_run
    mtime = (rep.path / "model.safetensors").stat().st_mtime_ns
    again = train(project, config=tiny_config(base), progress=False)
    assert again.reused and again.run_id == rep.run_id
    assert (rep.path / "model.safetensors").stat().st_mtime_ns == mtime


def test_same_seed_same_weights_other_seed_differs(reference_run, base, tmp_path):
    _, rep = reference_run
    twin = train(tiny_classify_project(tmp_path / "twin"), config=tiny_config(base), progress=False)
    assert twin.run_id == rep.run_id                                  # same config + data + teacher
    a, b = weights(rep.path), weights(twin.path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train(tiny_classify_project(tmp_path / "other"), config=tiny_config(base, seed=1), progress=False)
    assert other.run_id != rep.run_id
    c = weights(other.path)
    assert not all(torch.equal(a[k], c[k]) for k in a)


class CrashAfterEpoch(TrainerCallback):
    """Simulates kill -9 right after the epoch-k checkpoint is on disk."""

    def __init__(self, k: int):
        self.k = k

    def on_save(self, args, state, control, **kw):
        if round(state.epoch) == self.k:
            raise KeyboardInterrupt(f"simulated crash after epoch {self.k}")


def test_resume_after_crash_equals_uninterrupted(reference_run, base, tmp_path):
    _, rep = reference_run
    project = tiny_classify_project(tmp_path / "crash")
    with pytest.raises(KeyboardInterrupt):
        train(project, config=tiny_config(base), progress=False, callbacks=[CrashAfterEpoch(2)])
    run_dir = project.models_dir / rep.run_id
    assert (run_dir / "checkpoints").is_dir() and not (run_dir / "final").exists()
    assert project.store.latest_run("train") is None                 # nothing claims to be done
    # a torn checkpoint from a kill during the next save must be ignored, not resumed from
    torn = run_dir / "checkpoints" / "checkpoint-999"
    torn.mkdir()
    (torn / "trainer_state.json").write_text('{"trunc')
    resumed = train(project, config=tiny_config(base), progress=False)
    assert resumed.record["resumed_from"] == "checkpoint-16" and not torn.exists()
    assert [e["epoch"] for e in resumed.record["epochs"]] == [1, 2, 3, 4]
    a, b = weights(rep.path), weights(resumed.path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed.record["epochs"][-1]["eval_loss"] == pytest.approx(rep.record["epochs"][-1]["eval_loss"], rel=1e-5)


def test_crash_after_early_stop_is_finalised_not_trained_further(base, tmp_path):
    # agreement hits 1.0 by epoch 2 on the toy task, so patience 1 stops the run at epoch 3 of 6
    cfg = tiny_config(base, epochs=6, early_stopping_patience=1, early_stopping_metric="agreement")
    straight = train(tiny_classify_project(tmp_path / "straight"), config=cfg, progress=False)
    stop = straight.record["epochs_run"]
    assert stop < 6
    project = tiny_classify_project(tmp_path / "crashy")
    with pytest.raises(KeyboardInterrupt):
        train(project, config=cfg, progress=False, callbacks=[CrashAfterEpoch(stop)])
    resumed = train(project, config=cfg, progress=False)
    assert resumed.record["epochs_run"] == stop                        # no extra epochs after the restart
    assert resumed.record["best_checkpoint"] == straight.record["best_checkpoint"]
    a, b = weights(straight.path), weights(resumed.path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_training_then_rerun_finishes(base, tmp_path):
    """A real kill -9 in a subprocess while it trains; the rerun resumes and registers a finished run."""
    project = tiny_classify_project(tmp_path / "killed")
    cfg = tiny_config(base, epochs=6)
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        from distill.project import Project
        from distill.recipes.train_classifier import train
        from distill.student_config import EncoderStudentConfig
        train(Project.open({str(project.root)!r}), config=EncoderStudentConfig(**{cfg.model_dump()!r}), progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if list(project.models_dir.glob("*/checkpoints/checkpoint-*/trainer_state.json")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the child finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(project.models_dir.glob("*/final"))
    rep = train(project, config=cfg, progress=False)
    assert rep.record["resumed_from"] is not None and rep.record["epochs_run"] == 6
    assert project.store.latest_run("train")["id"] == rep.run_id


def test_gold_signal_and_missing_validation_split(base, tmp_path):
    project = tiny_classify_project(tmp_path / "noval", n=40, val_share=0.0)
    with project.store.tx() as c:  # half the rows lose their gold label
        c.execute("UPDATE examples SET gold=NULL WHERE CAST(substr(id, 3) AS INTEGER) % 2 = 1")
    cfg = tiny_config(base, signal="gold", epochs=1)
    train_ex, val_ex, counts = training_examples(project, "rec", cfg)
    assert counts["skipped"] == {"no_gold": 20} and counts["validation_carved"]
    assert len(val_ex) == 2 and len(train_ex) == 18
    assert not {e["id"] for e in val_ex} & {e["id"] for e in train_ex}
    assert training_examples(project, "rec", cfg)[1] == val_ex          # the carve is deterministic
    rep = train(project, config=cfg, progress=False)
    assert rep.record["counts"]["validation_carved"] and rep.record["counts"]["skipped"]["no_gold"] == 20


def test_corrections_become_one_hot(base, tmp_path):
    project = tiny_classify_project(tmp_path / "fix", n=20)
    with project.store.tx() as c:
        c.execute("INSERT INTO corrections(example_id, answer, source, created_at) VALUES('ex0011', '\"pos\"', 'test', 0)")
    train_ex, _, counts = training_examples(project, "rec", tiny_config(base))
    fixed = next(e for e in train_ex if e["id"] == "ex0011")
    assert fixed["label"] == 0 and fixed["soft"] == [1.0, 0.0] and counts["corrected_one_hot"] == 1


def test_filter_relabels_become_one_hot(base, tmp_path):
    """A row the suspect filter relabelled (filter_relabels) trains on that label, one-hot."""
    project = tiny_classify_project(tmp_path / "relabel", n=20)
    with project.store.tx() as c:
        c.execute("INSERT INTO filter_runs(id, teacher, config, kept, dropped, created_at) VALUES(1, 'rec', '{}', 0, 0, 0)")
        c.execute("INSERT INTO filter_decisions(run_id, example_id, kept, reason) "
                  "SELECT 1, id, 1, NULL FROM examples WHERE split != 'test'")
        c.execute("UPDATE filter_decisions SET reason = 'suspect_relabelled' WHERE example_id = 'ex0011'")
        teacher = json.loads(c.execute("SELECT answer FROM labels WHERE example_id = 'ex0011'").fetchone()[0])
        other = "neg" if teacher == "pos" else "pos"
        c.execute("INSERT INTO filter_relabels(run_id, example_id, answer) VALUES(1, 'ex0011', ?)", (json.dumps(other),))
    train_ex, _, counts = training_examples(project, "rec", tiny_config(base))
    fixed = next(e for e in train_ex if e["id"] == "ex0011")
    y = project.spec.label_names.index(other)
    assert fixed["label"] == y and fixed["soft"] == [1.0 if i == y else 0.0 for i in range(2)]
    assert counts["relabelled_one_hot"] == 1 and counts["corrected_one_hot"] == 0


def test_config_errors_name_the_field():
    with pytest.raises(DistillError, match="student.learnin_rate.*unknown") as e:
        EncoderStudentConfig.from_dict({"learnin_rate": 1e-4})
    assert "learning_rate" in e.value.hint
    with pytest.raises(DistillError, match="student.epochs.*expected int"):
        EncoderStudentConfig.from_dict({"epochs": "four"})
    with pytest.raises(DistillError, match="student.signal"):
        EncoderStudentConfig.from_dict({"signal": "distill"})
    with pytest.raises(DistillError, match="student.alpha"):
        EncoderStudentConfig.from_dict({"alpha": 1.5})
    with pytest.raises(DistillError, match=r"distill.yaml: field `student.learning_rate`: must be > 0 \(got -1\)"):
        EncoderStudentConfig.from_dict({"learning_rate": -1})
    with pytest.raises(DistillError, match="student.epochs.*expected int, got True"):
        EncoderStudentConfig.from_dict({"epochs": True})          # a bool is not an int here
    cfg = EncoderStudentConfig.from_dict({"learning_rate": 1, "max_train_examples": None, "signal": "soft"})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float) and cfg.signal == "soft"
    # the older names of distill.yaml files still load
    old = EncoderStudentConfig.from_dict({"base": "my-encoder", "lr": 3e-4})
    assert (old.base_model, old.learning_rate) == ("my-encoder", 3e-4)


def test_keep_checkpoints_keeps_the_newest(base, tmp_path):
    rep = train(tiny_classify_project(tmp_path / "keep"), config=tiny_config(base, epochs=3, keep_checkpoints=1),
                progress=False)
    left = sorted(p.name for p in (rep.path.parent / "checkpoints").iterdir())
    assert left == ["checkpoint-24"]                     # 3 epochs x 8 steps: only the last one is kept


def test_bad_projects_fail_clearly(base, tmp_path):
    from distill.project import Project

    empty = tiny_classify_project(tmp_path / "empty", n=0)
    with pytest.raises(DistillError, match="0 training and 0 validation"):
        train(empty, config=tiny_config(base), progress=False)
    gen = Project.init(tmp_path / "gen", "generate")
    with pytest.raises(DistillError, match="needs kind: classify"):
        train(gen, config=tiny_config(base), progress=False)
    with pytest.raises(DistillError, match="neither a packaged encoder"):
        ClassifierStudent.create(str(tmp_path / "nope"), ["a", "b"])


def test_predict_proba_and_embed_keep_input_order(base):
    student = ClassifierStudent.create(str(base), ["pos", "neg"], device="cpu", max_length=16)
    texts = ["good", "bad awful hate the slow broken order today again", "the order", "love it"]
    p = student.predict_proba(texts, batch_size=2)
    assert p.shape == (4, 2) and np.allclose(p.sum(1), 1.0, atol=1e-6)
    for i, t in enumerate(texts):  # one at a time (no batching, no sorting) gives the same rows
        np.testing.assert_allclose(student.predict_proba([t])[0], p[i], atol=1e-5)
        np.testing.assert_allclose(student.embed([t])[0], student.embed(texts, batch_size=3)[i], atol=1e-5)
    assert student.predict_proba([]).shape == (0, 2)


@pytest.mark.slow
def test_packaged_minilm_round_trip(tmp_path):
    student = ClassifierStudent.create("all-minilm-l6-v2", ["billing", "tech", "other"], device="cpu", max_length=64)
    assert 22_000_000 < student.model.num_parameters() < 23_500_000
    texts = ["my invoice is wrong", "the app crashes on start", "hello"]
    p = student.predict_proba(texts)
    e = student.embed(texts)
    assert p.shape == (3, 3) and e.shape == (3, 384)
    student.save(tmp_path / "s")
    again = ClassifierStudent.load(tmp_path / "s", device="cpu")
    np.testing.assert_allclose(again.predict_proba(texts), p, atol=1e-5)
    assert again.max_length == 64 and again.labels == ["billing", "tech", "other"]
    assert 85_000_000 < again.size_bytes() < 95_000_000
