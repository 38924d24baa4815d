"""`bench/scale.py --smoke` end to end (1K and 2K synthetic inputs, every stage in its own process, the loopback
fake server): one JSON with the common bench envelope, every stage's seconds and peak RSS at both sizes, and the
four volume targets. Checks the shape and that the stages agree with each other, not their speed."""

import json
import subprocess
import sys
from pathlib import Path

from distill.bench import check_result

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("import", "plan_fresh", "label", "plan_rerun")


def test_scale_smoke(tmp_path):
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert check_result(doc, "scale") == [] and doc["smoke"] is True
    sizes = doc["results"]["sizes"]
    assert list(sizes) == ["1000", "2000"]
    for n, res in sizes.items():
        for stage in STAGES:
            assert res[stage]["seconds"] > 0 and res[stage]["peak_rss_mb"] > 0, (n, stage)
        added = res["import"]["added"]
        assert res["import"]["rows_read"] == int(n) and 0 < added < int(n)      # the planted duplicates went
        assert (res["plan_fresh"]["total"], res["plan_fresh"]["todo"]) == (added, added)
        assert res["label"]["ok"] == res["label"]["calls"] == added
        assert (res["plan_rerun"]["already_labelled"], res["plan_rerun"]["todo"]) == (added, 0)
        assert res["label"]["server"]["charged"] == added and res["label"]["server"]["server_rate_limited"] == 0
    assert doc["ratios"]["rss_1m_over_rss_100k"] > 0 and doc["ratios"]["label_rate_over_limit"] > 0
    assert [t["target"] for t in doc["targets"]][2:] == ["<= 1.5", ">= 0.95"]
