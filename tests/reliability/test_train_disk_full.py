"""`distill train` under `ulimit -f` (RLIMIT_FSIZE): a checkpoint write fails part-way, as on a full disk.

CPython ignores SIGXFSZ at start-up, so a write past the limit fails with EFBIG instead of killing the
process; the child here also sets SIG_IGN itself so the test does not depend on that. What used to come out
depended on the file that hit the limit: torch's ``RuntimeError: unexpected pos`` or a ``SafetensorError``,
each a traceback with exit code 1. Now it is a DistillError (exit 2) naming the checkpoint that could not be
written and what to do; the half-written checkpoint is never resumed from, and a rerun without the limit
trains to the end.
"""

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_bert_folder, tiny_classify_project

from distill.project import Project

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


def make(root: Path, base: Path) -> Path:
    p = tiny_classify_project(root, n=40)
    p.close()
    (root / "distill.yaml").write_text((root / "distill.yaml").read_text() + (
        f"student: {{base: {base}, epochs: 2, learning_rate: 0.005, batch_size: 8, max_length: 16, "
        f"device: cpu, early_stopping_patience: 0}}\n"))
    return root


def train(root: Path, fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "distill.cli", "train", str(root), "--no-progress"], env=ENV,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit if fsize else None)


# 60 kB: the weights file (safetensors) fails; 150 kB: the weights fit and the optimizer state (torch.save) fails.
# The store (~130 kB) already exists and its new pages go to the -wal, which stays small.
@pytest.mark.parametrize("fsize", [60_000, 150_000])
def test_file_size_limit_during_train_is_a_clear_error_and_rerun_finishes(tmp_path, fsize):
    base = tiny_bert_folder(tmp_path / "bert")
    root = make(tmp_path / "p", base)

    r = train(root, fsize)
    assert r.returncode == 2, r.stderr[-3000:]
    msg = " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "cannot write the training checkpoint" in msg and "checkpoint-" in msg, msg
    assert "ulimit -f" in msg and "re-run" in msg, msg
    assert not list(root.glob("models/*/final")) and not list(root.glob("models/*/final.tmp"))
    # nothing half-written is left for a rerun to resume from
    for ckpt in root.glob("models/*/checkpoints/checkpoint-*"):
        assert (ckpt / "trainer_state.json").is_file(), f"half-written checkpoint left behind: {ckpt}"
    p = Project.open(root)
    assert p.store.latest_run("train") is None
    p.close()

    r = train(root)
    assert r.returncode == 0, r.stderr[-3000:]
    p = Project.open(root)
    try:
        row = p.store.latest_run("train")
        assert row is not None and p.model(run_id=row["id"]).path.name == "final"
    finally:
        p.close()
