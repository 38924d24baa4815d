"""`kill -9` of `distill train` (the CLI, a tiny BERT built in-process) at a seeded random moment after a
checkpoint exists: the rerun resumes from the last complete checkpoint, and its final model and metrics
equal those of an uninterrupted run.

tests/unit/test_train_classifier.py already has the in-process crash (weights equal to 1e-5) and a
subprocess SIGKILL whose rerun finishes; what this adds is the CLI path (lock, config from distill.yaml)
and the comparison of the killed-and-resumed run with an uninterrupted one.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_bert_folder, tiny_classify_project
from transformers import AutoModelForSequenceClassification

from distill.project import Project

REPO = Path(__file__).resolve().parents[2]
SEED = 5


def make(root: Path, base: Path) -> Path:
    p = tiny_classify_project(root, n=160)   # enough steps per epoch that the kill lands mid-run
    p.close()
    # lr 5e-3 / batch 8: the settings under which the tiny model learns the toy task (see test_train_classifier)
    (root / "distill.yaml").write_text((root / "distill.yaml").read_text() + (
        f"student: {{base: {base}, epochs: 6, learning_rate: 0.005, batch_size: 8, max_length: 16, "
        f"device: cpu, early_stopping_patience: 0}}\n"))
    return root


def train_cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "distill.cli", "train", str(root), "--no-progress"]


ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


def final_run(root: Path) -> dict:
    p = Project.open(root)
    try:
        row = p.store.latest_run("train")
        # runs store paths relative to the project folder: resolve through the project
        return {"path": str(p.model(run_id=row["id"]).path), "record": json.loads(row["record"])}
    finally:
        p.close()


def weights(path: str) -> dict:
    return AutoModelForSequenceClassification.from_pretrained(path).state_dict()


def test_kill9_train_resumes_and_matches_uninterrupted(tmp_path):
    base = tiny_bert_folder(tmp_path / "bert")
    straight, killed = make(tmp_path / "straight", base), make(tmp_path / "killed", base)
    r = subprocess.run(train_cmd(straight), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    rng = random.Random(SEED)
    proc = subprocess.Popen(train_cmd(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if list(killed.glob("models/*/checkpoints/checkpoint-*/trainer_state.json")):
                break
            time.sleep(0.02)
        # 6 epochs with no early stopping: after the first checkpoint, 5 epochs remain, so the kill lands
        # mid-run even on a fast, idle machine (with 3 epochs it sometimes landed after `final` was written)
        time.sleep(rng.uniform(0.0, 0.05))
        assert proc.poll() is None, "training finished before the kill; nothing was tested"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert not list(killed.glob("models/*/final")), "the killed run must not look finished"
    p = Project.open(killed)
    assert p.store.latest_run("train") is None
    p.close()

    r = subprocess.run(train_cmd(killed), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = final_run(straight), final_run(killed)
    assert b["record"]["resumed_from"] is not None and b["record"]["epochs_run"] == a["record"]["epochs_run"] == 6
    ea, eb = a["record"]["epochs"][-1], b["record"]["epochs"][-1]
    assert eb["eval_loss"] == pytest.approx(ea["eval_loss"], rel=1e-4)
    for k in ("agreement", "accuracy"):
        if k in ea:
            assert eb[k] == pytest.approx(ea[k], abs=1e-9)
    wa, wb = weights(a["path"]), weights(b["path"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    print(f"\nkill -9 train: resumed from {b['record']['resumed_from']}; final eval_loss "
          f"{ea['eval_loss']:.6f} (uninterrupted) vs {eb['eval_loss']:.6f} (killed + resumed)")
