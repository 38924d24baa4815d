"""A planted teacher API key must never leave the environment variable it lives in.

One project goes through the whole loop with the key in $FAKE_KEY - label, filter, export (JSONL + Parquet),
train (tiny BERT), eval + HTML report, status, keys, and `distill serve` answering requests that are routed
to the teacher (so the serving process really sends the key). The fake provider demands that exact key
(401 otherwise), which proves the key was used. Then every byte the run left behind is searched for it: the
store and its -wal/-shm, every file in the project (models, reports, exports, provenance), every stdout and
stderr, and the server log. The key must not appear, nor its last 12 characters (a "masked" key that shows a
tail is still a leak of entropy).
"""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
from fake_openai_server import make_project, start_server
from serving import LABELS, ServeProcess
from tiny_models import tiny_bert_folder

from distill.project import Project

REPO = Path(__file__).resolve().parents[2]


def test_planted_key_never_appears_anywhere(tmp_path):
    key = "sk-planted-" + secrets.token_hex(20)
    tail = key[-12:].encode()
    outputs: list[str] = []

    def distill(*args, ok=(0,)):
        r = subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src"), "FAKE_KEY": key}, timeout=300)
        outputs.extend([r.stdout, r.stderr])
        assert r.returncode in ok, (args, r.returncode, r.stderr[-3000:])
        return r

    server = start_server(tmp_path, labels=LABELS, api_key=key)
    base = tiny_bert_folder(tmp_path / "bert")
    serve = None
    try:
        student = (f"\nstudent: {{base: {base}, epochs: 1, batch_size: 8, max_length: 16, device: cpu, "
                   f"learning_rate: 0.005}}\nteacher: api\n")
        project = make_project(tmp_path / "p", 60, server.base_url, labels=LABELS, extra_yaml=student)
        with project.store.tx() as c:   # make_project puts everything in train; eval needs a test split
            c.execute("UPDATE examples SET split = CASE WHEN CAST(substr(id, 3) AS INTEGER) % 5 = 0 THEN 'test' "
                      "WHEN CAST(substr(id, 3) AS INTEGER) % 5 = 1 THEN 'validation' ELSE 'train' END")
        project.close()
        root = project.root

        distill("label", root, "--no-progress")
        assert sum(x["charged"] for x in server.log_lines()) == 60      # the provider accepted the key
        distill("filter", root)
        distill("export", root, "--format", "jsonl", "--out", root / "exports" / "train.jsonl")
        distill("export", root, "--format", "parquet", "--out", root / "exports" / "train.parquet")
        distill("train", root, "--no-progress")
        distill("eval", root, "--latency-samples", "3", ok=(0, 3))       # a 1-epoch student may fail the gate
        distill("report", root)
        distill("status", root, "--json")
        created = distill("keys", "create", root, "--name", "secrets-test")
        service_key = created.stdout.strip().splitlines()[-1].strip()

        # serve with a router that sends everything to the teacher: the serving process uses the key too
        p = Project.open(root)
        model_dir = p.latest_model().path
        p.close()
        from distill.serve.router import Router, RouterConfig

        Router(RouterConfig(labels=list(LABELS), ood="none", conf_threshold=1.01)).save(model_dir)
        before = sum(x["charged"] for x in server.log_lines())
        # pinned: a 1-epoch student may have failed its gate, and only a pinned model is served then
        serve = ServeProcess(root, args=("--model", model_dir), env={"FAKE_KEY": key}, log=tmp_path / "serve.log")
        h = {"Authorization": f"Bearer {service_key}"}
        r = httpx.post(serve.url + "/v1/classify", json={"texts": ["I feel negative about a brand new order"]},
                       headers=h, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["routed_to"] == "teacher", r.text
        r = httpx.post(serve.url + "/v1/chat/completions", headers=h, timeout=60,
                       json={"model": "t", "messages": [{"role": "user", "content": "another unseen neutral text"}]})
        assert r.status_code == 200, r.text
        outputs.append(r.text)
        outputs.append(httpx.get(serve.url + "/metrics", headers=h).text)
        assert sum(x["charged"] for x in server.log_lines()) == before + 2   # two paid calls from the server
        # while the server runs the store has its -wal and -shm: search them now, they vanish at the last close
        live = [f for f in root.glob("distill.db*")]
        assert any(f.name == "distill.db-wal" for f in live)
        wal_leaks = [str(f) for f in live if key.encode() in f.read_bytes() or tail in f.read_bytes()]
        assert wal_leaks == [], f"the planted key leaked into: {wal_leaks}"
        serve.stop()
        serve = None

        leaks = []
        files = [f for f in root.rglob("*") if f.is_file()] + [tmp_path / "serve.log"]
        assert any(f.name == "distill.db" for f in files) and any(f.suffix == ".html" for f in files)
        assert any(f.name.endswith(".provenance.json") for f in files)
        for f in files:
            data = f.read_bytes()
            if key.encode() in data or tail in data:
                leaks.append(str(f))
        for i, text in enumerate(outputs):
            if key in text or tail.decode() in text:
                leaks.append(f"output #{i}: {text[:200]!r}")
        assert leaks == [], f"the planted key leaked into: {leaks}"
        print(f"\nsecrets: searched {len(files)} files ({sum(f.stat().st_size for f in files)} bytes) and "
              f"{len(outputs)} outputs; checked names: {sorted({f.suffix or f.name for f in files})}")
    finally:
        if serve is not None:
            serve.kill()
        server.stop()
