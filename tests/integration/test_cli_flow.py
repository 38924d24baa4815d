"""The README's user flow through the real `distill` CLI (subprocesses, as a user runs it), against the
loopback OpenAI-compatible server: init → import → label → status → filter → export → correct.
Also: bad input gets exit code 2 and a message naming the file and line, and nothing stored is lost."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fake_openai_server import start_server

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets"


def distill(*args, env=None, check=True):
    r = subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"distill {' '.join(map(str, args))} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture()
def server(tmp_path):
    h = start_server(tmp_path, labels=["positive", "negative", "neutral"])
    yield h
    h.stop()


def write_spec(proj: Path, base_url: str) -> None:
    spec = (ASSETS / "classify_spec.yaml").read_text().split("teachers:")[0]
    spec += f"""teachers:
  - name: api
    kind: openai
    base_url: {base_url}
    model: fake-1
    api_key_env: FAKE_KEY
    price: {{input_per_1m: 1.0, output_per_1m: 2.0}}
    terms: {{url: https://example.org/terms, outputs_may_train_models: true}}
teacher: api
"""
    (proj / "distill.yaml").write_text(spec)


def test_user_flow(tmp_path, server):
    proj = tmp_path / "my-intents"
    r = distill("init", proj, "--kind", "classify")
    assert (proj / "distill.yaml").exists() and "created" in r.stdout
    write_spec(proj, server.base_url)

    r = distill("import", proj, ASSETS / "reviews.csv", "--text", "text", "--label", "label", "--id", "id")
    status = json.loads(distill("status", proj, "--json").stdout)
    n = status["examples"]["total"]
    assert n == 60

    # no key in the environment -> a clear error naming the variable, nothing lost
    r = distill("label", proj, "--no-progress", check=False, env={"FAKE_KEY": ""})
    assert r.returncode == 2 and "FAKE_KEY" in r.stderr

    r = distill("label", proj, "--no-progress", env={"FAKE_KEY": "sk-test-123"})
    assert "60 ok" in r.stdout
    calls = sum(1 for line in server.log_lines() if line.get("charged"))
    assert calls == 60
    # re-running pays nothing
    distill("label", proj, "--no-progress", env={"FAKE_KEY": "sk-test-123"})
    assert sum(1 for line in server.log_lines() if line.get("charged")) == 60

    r = distill("filter", proj)
    assert "kept" in r.stdout

    out = tmp_path / "train.parquet"
    distill("export", proj, "--format", "parquet", "--out", out)
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert 0 < len(ds) < 60 and set(ds["split"]) <= {"train", "validation"}
    prov = json.loads(Path(str(out) + ".provenance.json").read_text())
    assert "sk-test-123" not in json.dumps(prov)

    # a human correction overrides the teacher
    first = ds[0]
    other = next(lab for lab in ("positive", "negative", "neutral") if lab != first["label"])
    fixes = tmp_path / "fixes.csv"
    fixes.write_text(f"id,label\n{first['id']},{other}\n")
    distill("correct", proj, fixes)
    distill("export", proj, "--format", "jsonl", "--out", tmp_path / "t.jsonl")
    rows = {json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()}
    assert rows[first["id"]]["label"] == other and rows[first["id"]]["source"] == "correction"

    # the planted key never reaches the store
    assert b"sk-test-123" not in (proj / "distill.db").read_bytes()


def test_bad_inputs_exit_2_and_lose_nothing(tmp_path):
    proj = tmp_path / "p"
    distill("init", proj, "--kind", "classify")
    shutil.copy(ASSETS / "classify_spec.yaml", proj / "distill.yaml")
    distill("import", proj, ASSETS / "reviews.csv", "--label", "label", "--id", "id")
    before = (proj / "distill.db").stat().st_size

    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\nfine,positive\n\xff\xfe broken,negative\n")
    r = distill("import", proj, bad, "--label", "label", check=False)
    assert r.returncode == 2 and "bad.csv" in r.stderr and "line" in r.stderr

    missing = tmp_path / "cols.csv"
    missing.write_text("body,label\nhello,positive\n")
    r = distill("import", proj, missing, "--label", "label", check=False)
    assert r.returncode == 2 and "text" in r.stderr

    unknown = tmp_path / "unknown.csv"
    unknown.write_text("text,label\nhello there,ecstatic\n")
    r = distill("import", proj, unknown, "--label", "label", check=False)
    assert r.returncode == 2 and "ecstatic" in r.stderr

    (proj / "distill.yaml").write_text((proj / "distill.yaml").read_text() + "\nbogus_key: 1\n")
    r = distill("status", proj, check=False)
    assert r.returncode == 2 and "bogus_key" in r.stderr
    (proj / "distill.yaml").write_text((ASSETS / "classify_spec.yaml").read_text())

    status = json.loads(distill("status", proj, "--json").stdout)
    n = status["examples"]["total"]
    assert n == 60 and (proj / "distill.db").stat().st_size >= before
