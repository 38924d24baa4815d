"""`bench/retention_intents.py --smoke` end to end (8 intents per dataset, 1 epoch, the packaged MiniLM):
it writes one JSON with the common bench envelope, the retention ratios and the four issue targets. Checks
the shape and that the numbers are consistent with each other, not their quality (a 1-epoch smoke run)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.runinfo import BENCH_KEYS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_retention_intents_smoke(tmp_path):
    out = tmp_path / "retention_intents.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "retention_intents.py"), "--smoke", "--out", str(out),
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())

    assert set(BENCH_KEYS) <= set(doc) and doc["bench"] == "retention_intents" and doc["smoke"] is True
    assert "stand-in" in doc["results"]["teacher"]["stand_in_for"] + doc["results"]["teacher"]["caveat"]
    for name in ("banking77", "clinc150"):
        res = doc["results"][name]
        assert res["data"]["intents"] == 8
        systems = res["test"]["systems"]
        assert systems["teacher"]["accuracy_vs_gold"]["value"] == 1.0      # the gold stand-in is perfect
        student = systems["student"]
        # teacher accuracy is 1, so retention is the student's accuracy, CI included
        assert student["retention"]["value"] == pytest.approx(student["accuracy_vs_gold"]["value"])
        lo, hi = student["retention"]["ci"]
        assert 0.0 <= lo <= student["retention"]["value"] <= hi <= 1.0
        assert res["gold_trained_student"]["run_id"] == res["student"]["run_id"]   # trained once, reported twice
        assert {s["segment"] for s in student["segments"]} <= (
            {"short", "medium", "long"} if name == "banking77" else set(res["test"]["segment_counts"]))
        assert sum(s["n"] for s in student["segments"]) == res["test"]["n"]
        assert doc["ratios"][f"{name}_retention_overall"] == student["retention"]["value"]
        worst = student["worst_segment"]
        if worst is not None:
            assert doc["ratios"][f"{name}_retention_worst_segment"] == worst["retention"]["value"]
            assert worst["retention"]["value"] == min(s["retention"]["value"] for s in student["segments"] if s["gated"])
        acc_b = systems["tfidf_baseline"]["accuracy_vs_gold"]["value"]
        assert doc["ratios"][f"{name}_student_vs_tfidf_accuracy"] == pytest.approx(
            student["accuracy_vs_gold"]["value"] / acc_b)

    names = [t["name"] for t in doc["targets"]]
    assert names[0] == "BANKING77 retention overall" and names[2] == "CLINC150 retention overall"
    for t in doc["targets"]:
        assert t["target"] in (">= 0.99", ">= 0.95")
        assert t["met"] == (None if t["measured"] is None else t["measured"] >= float(t["target"][3:]))
