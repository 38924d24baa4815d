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
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())

    assert set(BENCH_KEYS) <= set(doc) and doc["bench"] == "retention_intents" and doc["smoke"] is True
    for name in ("banking77", "clinc150"):
        res = doc["results"][name]
        assert res["data"]["intents"] == 8
        # the teacher's own gold rows never enter the students' project; the gold filter is off
        assert set(res["data"]["rows_by_role"]) == {"traffic", "validation", "test"}
        assert "disagrees_with_gold" not in res["teacher"]["filter"]["dropped_by_reason"]
        assert res["teacher"]["recording"] == f"examples/{name}/teacher_mpnet.jsonl.gz"
        # three students from the same rows, one per training signal: three different runs
        assert {s["signal"] for s in res["students"].values()} == {"mix", "hard", "gold"}
        assert len({s["run_id"] for s in res["students"].values()}) == 3
        systems = res["test"]["systems"]
        assert set(systems) == {"distilled", "hard", "gold_trained", "tfidf_baseline", "teacher"}
        teacher_acc = systems["teacher"]["accuracy_vs_gold"]["value"]
        for sys_name in ("distilled", "hard", "gold_trained", "tfidf_baseline"):
            s = systems[sys_name]
            if teacher_acc > 0:
                assert s["retention"]["value"] == pytest.approx(s["accuracy_vs_gold"]["value"] / teacher_acc)
            lo, hi = s["accuracy_vs_gold"]["ci"]
            assert 0.0 <= lo <= s["accuracy_vs_gold"]["value"] <= hi <= 1.0
            assert sum(seg["n"] for seg in s["segments"]) == res["test"]["n"]
        student = systems["distilled"]
        assert doc["ratios"][f"{name}_retention_real_teacher_overall"] == student["retention"]["value"]
        worst = student["worst_segment"]
        if worst is not None:
            assert doc["ratios"][f"{name}_retention_real_teacher_worst_segment"] == worst["retention"]["value"]
            assert worst["retention"]["value"] == min(s["retention"]["value"] for s in student["segments"] if s["gated"])

    names = [t["name"] for t in doc["targets"]]
    assert names[0] == "BANKING77 retention_real_teacher overall" and names[2] == "CLINC150 retention_real_teacher overall"
    for t in doc["targets"]:
        assert t["target"] in (">= 1", ">= 0.95")
        assert t["met"] == (None if t["measured"] is None else t["measured"] >= float(t["target"][3:]))
