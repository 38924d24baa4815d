"""A real vLLM server (the CPU build, `scripts/setup.sh --vllm` puts it in .venv-vllm) as a distill teacher.

The model is a tiny random Llama (hidden 256, head_dim 64: vLLM's CPU attention has no kernel for smaller heads)
built here and served from a temp folder, so nothing is downloaded. What it proves on the real engine:
- `structured: vllm` constrains a model that otherwise writes noise to the label set: every input labelled on
  the first call, none re-asked; unconstrained, every answer is malformed and re-asked (paid again);
- `label_scoring: prompt_logprobs` gives the same distribution as distill's local teacher computes on the same
  weights in-process (teachers/local.py), i.e. vLLM's prompt log-probabilities are read the right way round.
About 60-90 s, most of it vLLM's start-up."""

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "unit"))
from fake_openai_server import make_project  # noqa: E402

from distill.labeling import label  # noqa: E402

VLLM_PY = Path(os.environ.get("DISTILL_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
LABELS = ("positive", "negative", "neutral")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    if not VLLM_PY.exists():
        msg = f"no vLLM CPU build at {VLLM_PY}: run `bash scripts/setup.sh --vllm`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from tiny_lm import tiny_llama, tiny_tokenizer

    folder = tmp_path_factory.mktemp("vllm") / "tiny"
    tok = tiny_tokenizer()
    tiny_llama(vocab_size=len(tok), hidden=256).save_pretrained(folder)
    tok.save_pretrained(folder)
    port = _free_port()
    log = open(folder.parent / "vllm.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                          "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "512",
                          "--host", "127.0.0.1", "--port", str(port)],
                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            break
        except OSError:
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                pytest.fail("vLLM did not start:\n" + (folder.parent / "vllm.log").read_text()[-3000:])
            time.sleep(1)
    yield {"url": url, "folder": folder}
    os.killpg(p.pid, 15)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)


def teacher(url: str, **extra: str) -> str:
    more = "".join(f"\n    {k}: {v}" for k, v in extra.items())
    return f"""
  - name: api
    kind: openai
    base_url: {url}
    model: tiny
    max_tokens: 16
    max_retries: 1
    concurrency: 4
    price: {{input_per_1m: 0.0, output_per_1m: 0.0}}
    terms: {{outputs_may_train_models: true}}{more}
"""


def test_structured_choice_and_prompt_logprob_scoring_on_real_vllm(tmp_path, vllm_server):
    url = vllm_server["url"]
    # unconstrained, a random model writes noise: each input is asked 1 + max_parse_retries times, then fails
    p = make_project(tmp_path / "off", 4, url, labels=LABELS, teacher_yaml=teacher(url))
    r = label(p, progress=False)
    assert r.ok == 0 and r.calls == 4 * 3 and set(r.failed_by_reason) == {"label_not_in_set"}
    p.close()

    p = make_project(tmp_path / "on", 6, url, labels=LABELS,
                     teacher_yaml=teacher(url, structured="vllm", label_scoring="prompt_logprobs"))
    r = label(p, progress=False)
    assert r.ok == 6 and r.calls == 6 and not r.failed_by_reason
    rows = p.store.q("""SELECT l.answer, l.probs, c.request FROM labels l JOIN teacher_calls c ON c.key = l.call_key""")
    assert len(rows) == 6

    # the same weights in-process: distill's local teacher scores every label (label + end-of-turn)
    from distill.task import TeacherSpec
    from distill.teachers.local import LocalTeacher

    local = LocalTeacher(TeacherSpec(name="local", kind="local", path=str(vllm_server["folder"]), dtype="float32",
                                     device="cpu"))
    local._ensure_loaded()
    for row in rows:
        assert json.loads(row["answer"]) in LABELS
        got = json.loads(row["probs"])
        scores = local.score_labels(json.loads(row["request"])["messages"], list(LABELS))   # summed log-probs
        top = max(scores.values())
        z = sum(math.exp(v - top) for v in scores.values())
        want = {lab: math.exp(v - top) / z for lab, v in scores.items()}
        assert set(got) == set(LABELS)
        for lab in LABELS:
            assert got[lab] == pytest.approx(want[lab], abs=0.02), (got, want)
    p.close()
