"""The HTML report as a real browser renders it: headless Chromium loads the file (no network: the report
must be self-contained), and the rendered DOM must show the headline numbers and keep hostile input text
as text. Skipped only on a developer machine without /usr/bin/chromium; in CI (env CI set) it must run."""

import json
import os
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from distill.evaluate import evaluate
from distill.project import Project
from distill.report.html import write_report

CHROMIUM = Path("/usr/bin/chromium")
LABELS = ["neg", "pos"]
HOSTILE = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'

SPEC = """
name: chromium-report
kind: classify
labels: [neg, pos]
segment_field: channel
quality: {metric: accuracy, against: gold, overall: 0.9, worst_segment: 0.5, min_segment_size: 3}
teachers:
  - name: api
    kind: replay
    path: rec.jsonl
    model: teacher-model-x
teacher: api
"""


class FakeStudent:
    """Duck-typed ClassifierStudent: right on every row except those whose text contains 'miss'."""

    labels = LABELS

    def predict_proba(self, texts, batch_size=32):
        out = np.zeros((len(texts), 2))
        for k, t in enumerate(texts):
            gold = 1 if "good" in t else 0
            pred = 1 - gold if "miss" in t else gold
            out[k, pred], out[k, 1 - pred] = 0.7, 0.3
        return out

    def size_bytes(self):
        return 4_000_000


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/chromium is missing; CI must install it (apt-get install -y chromium)")
        pytest.skip("/usr/bin/chromium not installed (apt-get install -y chromium)")
    return str(CHROMIUM)


def _project(tmp: Path) -> Project:
    p = Project.init(tmp / "proj", "classify", SPEC)
    now = time.time()
    with p.store.tx() as c:
        for i in range(12):
            gold = LABELS[i % 2]
            word = "good" if gold == "pos" else "poor"
            miss = " miss" if i in (0, 3, 6) else ""
            text = f"{word} service {i}{miss}" + (f" {HOSTILE}" if i == 0 else "")
            c.execute("INSERT INTO examples(id,text,norm,gold,segment,split,created_at) VALUES(?,?,?,?,?,?,?)",
                      (f"x{i}", text, text.lower(), json.dumps(gold), "chat" if i < 6 else "mail", "test", now))
            c.execute("INSERT INTO labels(example_id,teacher,status,answer,confidence,created_at) VALUES(?,?,?,?,?,?)",
                      (f"x{i}", "api", "ok", json.dumps(gold), 0.95, now))
        for i in range(10):
            lab = LABELS[i % 2]
            text = f"{'good' if lab == 'pos' else 'poor'} train {i}"
            c.execute("INSERT INTO examples(id,text,norm,split,created_at) VALUES(?,?,?,?,?)",
                      (f"t{i}", text, text, "train", now))
            c.execute("INSERT INTO labels(example_id,teacher,status,answer,created_at) VALUES(?,?,?,?,?)",
                      (f"t{i}", "api", "ok", json.dumps(lab), now))
        c.execute("INSERT INTO teacher_calls(key,teacher,model,request,status,cost,latency_s,created_at) "
                  "VALUES('k','api','teacher-model-x','{}','ok',0.0004,0.8,?)", (now,))
    p.store.put_run("train-7", "train", "done", str(tmp / "m"), {"teacher": {"identity": {"name": "api"}},
                                                                  "data_sha256": "feedbeef"})
    return p


def _run(chromium: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'ud'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_report_renders_in_headless_chromium(chromium, tmp_path):
    p = _project(tmp_path)
    d = evaluate(p, student=FakeStudent(), latency_samples=10, progress=False).to_dict()
    html_path, _ = write_report(p, d)
    url = html_path.resolve().as_uri()

    dom = _run(chromium, tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    st = d["systems"]["student"]["vs_gold"]["accuracy"]
    assert st["value"] == pytest.approx(9 / 12)              # 3 planted misses out of 12
    assert f"{st['value']:.3f}" in page and f"[{st['ci'][0]:.3f}, {st['ci'][1]:.3f}]" in page
    assert "teacher api: accuracy 1.000" in page             # the teacher's own quality, stated up front
    assert "GATE FAILED" in page and "quality.overall = 0.9" in page  # 0.750 < 0.9
    assert "feedbeef" in page and "teacher-model-x" in page
    # The hostile input is shown as text: no injected element made it into the DOM, and the script never ran.
    assert "&lt;script&gt;document.title" in page and "<img src=\"x\"" not in page
    assert "pwned" not in page.split("</title>")[0]
    assert page.count("<svg") >= 4                            # segment bars, reliability, latency/cost bars

    shot = tmp_path / "report.png"
    r = _run(chromium, tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", url)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1200, 2400)
