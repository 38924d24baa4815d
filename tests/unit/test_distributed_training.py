"""Data-parallel training on 2 gloo processes (CPU, loopback) against 1 process, for both recipes.

Same global batch => the same per-step losses and final weights as one process, within float tolerance;
only rank 0 writes; kill -9 of a 2-process run + resume on 2 processes = the uninterrupted 2-process run.

Why tolerances and not equality: 2 processes compute the same sums in another order. The causal LM's step
loss is a sum of token losses (float32) that each process sums over its half, and the two halves are then
added; padding differs too (a forward pass pads to its longest sequence, and each process has other
sequences). That moves each loss by a few float32 ulps (~1e-7 relative); 4 AdamW steps at lr 3e-2 carry
it into the weights at ~1e-6 (measured here: 5e-7 and 3e-6). The bounds below (loss 1e-5 relative,
weights 1e-4 absolute on weights of size ~0.1-1) leave 10-100x room for another CPU's kernels, and are far
below what a real mistake does: dividing by one process's completion tokens instead of the whole step's
doubles every step loss, and resuming rank 1 from rank 0's RNG state fails the resume test (both tried).

Processes are started the way a launcher starts them (RANK / WORLD_SIZE / MASTER_ADDR=127.0.0.1 /
MASTER_PORT in the environment): `train_lm` ranks directly as subprocesses (so the test can SIGKILL them),
whole projects through `distill train --processes 2` (torchrun underneath). Rank 1 runs under a Python
audit hook that records every file-system write it makes under the run's folder: there must be none.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.recipes.train_causal_lm import LMExample, train_lm
from distill.student_config import EncoderStudentConfig, LMStudentConfig

UNIT = Path(__file__).resolve().parent
SRC = UNIT.parents[1] / "src"
sys.path.insert(0, str(UNIT))
from tiny_models import tiny_bert_folder, tiny_classify_project  # noqa: E402

WORDS = ["cat", "house", "sun", "garden", "ox", "river", "stone", "a", "paper", "light", "tree", "mountain", "bee"]


def lm_examples() -> list[LMExample]:
    """13 word-reversal examples: with 8 per step, the second step of each epoch has 5 (shares of 2 and 3)."""
    return [LMExample(id=f"e{i:02d}", messages=[{"role": "system", "content": "Reverse the word."},
                                                 {"role": "user", "content": w}], answer=w[::-1])
            for i, w in enumerate(WORDS)]


def lm_config(base: Path, **kw) -> LMStudentConfig:
    # batch 8 x accumulation 1: one process runs one forward of 8, each of 2 processes one of 4 (or 2 and 3)
    d = dict(base_model=str(base), lora_rank=4, lora_alpha=8, lora_dropout=0.0, learning_rate=3e-2, batch_size=8,
             max_steps=4, save_every=100, max_length=64, device="cpu", seed=0)
    return LMStudentConfig(**{**d, **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)    # tiny matrices; and the 2 children need the 2 cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm_base(tmp_path_factory) -> Path:
    from tiny_lm import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("tiny_lm"), seed=0, vocab_pad=28)


# ------------------------------------------------------------------------------------------------ processes

# sitecustomize of the children, active in rank > 0 only: records each write (open for writing, mkdir of a
# new folder, rename/replace, remove, rmtree, mkdtemp) under WATCH_WRITES, minus paths containing
# WATCH_IGNORE; printed at exit. torch.save and safetensors open their files in C++/Rust, unseen; but the
# recipes write those only into a folder they make first with tempfile.mkdtemp, which is seen.
WATCH = """
import atexit, json, os, sys
if int(os.environ.get("RANK", "0")) > 0 and os.environ.get("WATCH_WRITES"):
    _root = os.path.realpath(os.environ["WATCH_WRITES"])
    _ignore = [p for p in os.environ.get("WATCH_IGNORE", "").split(",") if p]
    _seen = []

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            writing = (mode is not None and any(c in mode for c in "wax+")) or \\
                bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
        elif event == "os.mkdir":
            path, writing = args[0], not os.path.exists(args[0])
        elif event in ("os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "tempfile.mkdtemp", "os.truncate"):
            path, writing = args[0], True
        else:
            return
        if writing and not isinstance(path, int):
            p = os.path.realpath(os.fsdecode(path))
            if (p == _root or p.startswith(_root + os.sep)) and not any(i in p for i in _ignore):
                _seen.append([event, p])

    sys.addaudithook(_hook)
    atexit.register(lambda: print("WRITES " + json.dumps(_seen), flush=True))
"""

# One rank of a train_lm run. argv[1]: JSON {base, out, config, sleep}. Prints the digest of its trainable
# weights after the last step, so the test can check that every rank holds the same model.
LM_WORKER = """
import hashlib, json, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, {unit!r})
from test_distributed_training import lm_examples
from distill.recipes.train_causal_lm import train_lm
from distill.student_config import LMStudentConfig

a = json.loads(sys.argv[1])
cfg = LMStudentConfig(**a["config"])

def on_step(step, entry, model):
    if step == cfg.max_steps:
        h = hashlib.sha256()
        for k, p in sorted(model.named_parameters()):
            if p.requires_grad:
                h.update(p.detach().numpy().tobytes())
        print("DIGEST", h.hexdigest(), flush=True)
    time.sleep(a["sleep"])

train_lm(lm_examples(), cfg, a["out"], log=None, on_step=on_step)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(tmp: Path, watch: Path, ignore: str = "") -> dict[str, str]:
    (tmp / "sitecustomize.py").write_text(WATCH)      # imported by every Python started with this path
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp), str(SRC)]), OMP_NUM_THREADS="1",
                WATCH_WRITES=str(watch), WATCH_IGNORE=ignore, TOKENIZERS_PARALLELISM="false")


def start_ranks(script: Path, arg: str, env: dict[str, str], world: int = 2) -> list[subprocess.Popen]:
    """``world`` processes of ``script`` with the environment torchrun gives its workers (loopback only)."""
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, str(script), arg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                                 LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                                 MASTER_PORT=port))
            for r in range(world)]


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def _tagged(out: str, tag: str) -> str:
    return next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(tag + " "))


def run_lm_on_two(tmp: Path, out: Path, cfg: LMStudentConfig, sleep: float = 0.0) -> list[str]:
    script = tmp / "lm_worker.py"
    script.write_text(LM_WORKER.format(unit=str(UNIT)))
    arg = json.dumps({"config": cfg.model_dump(), "out": str(out), "sleep": sleep})
    return finish(start_ranks(script, arg, _child_env(tmp, out)))


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


# ------------------------------------------------------------------------------------------------ causal LM


def test_lm_two_processes_train_like_one(lm_base, tmp_path):
    """Same 13 examples, 8 per step, 4 steps: 2 x (4 | 2-3 examples) vs 1 x 8 (or 5)."""
    cfg = lm_config(lm_base)
    one = train_lm(lm_examples(), cfg, tmp_path / "one", log=None)

    t0 = time.perf_counter()
    outs = run_lm_on_two(tmp_path, tmp_path / "two", cfg)
    wall = time.perf_counter() - t0
    two = json.loads((tmp_path / "two" / "training_record.json").read_text())

    assert two["processes"] == 2 and one["processes"] == 1
    assert two["config"] == one["config"]                       # the number of processes is not a setting
    a, b = [h["loss"] for h in one["history"]], [h["loss"] for h in two["history"]]
    assert len(a) == len(b) == 4 and a[-1] < a[0]
    assert [h["tokens"] for h in one["history"]] == [h["tokens"] for h in two["history"]]  # the same examples
    loss_diff = max(abs(x - y) for x, y in zip(a, b))
    assert loss_diff <= 1e-5 * max(abs(x) for x in a), (a, b)
    wa, wb = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert wa.keys() == wb.keys()
    w_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    moved = max(float(wa[k].abs().max()) for k in wa if "lora_B" in k)     # B starts at 0
    assert w_diff <= 1e-4 < moved, (w_diff, moved)
    # every rank ends with the same weights (it applied the same summed gradient), and rank 1 wrote nothing
    assert _tagged(outs[0], "DIGEST") == _tagged(outs[1], "DIGEST")
    assert json.loads(_tagged(outs[1], "WRITES")) == []
    print(f"\n1 vs 2 processes: max |loss diff| {loss_diff:.2e}, max |weight diff| {w_diff:.2e}, "
          f"2-process run {wall:.1f} s")


def test_lm_two_processes_resume_after_kill_9_equals_uninterrupted(lm_base, tmp_path):
    """LoRA dropout on, so each rank's RNG stream must be saved (by rank 0) and restored (by each rank)."""
    cfg = lm_config(lm_base, max_steps=5, save_every=1, lora_dropout=0.1)
    run_lm_on_two(tmp_path, tmp_path / "full", cfg)

    out = tmp_path / "killed"
    script = tmp_path / "lm_worker.py"
    arg = json.dumps({"config": cfg.model_dump(), "out": str(out), "sleep": 0.4})
    procs = start_ranks(script, arg, _child_env(tmp_path, out))
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step-000002").exists():
            assert all(p.poll() is None for p in procs), "a rank ended before it could be killed"
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.communicate(timeout=30)
    assert not (out / "training_record.json").exists()          # it died before finishing

    run_lm_on_two(tmp_path, out, cfg)                 # the same command again: resumes
    full = json.loads((tmp_path / "full" / "training_record.json").read_text())
    resumed = json.loads((out / "training_record.json").read_text())
    assert resumed["resumed_from"] is not None and 2 <= resumed["resumed_from"] < 5
    a, b = [h["loss"] for h in full["history"]], [h["loss"] for h in resumed["history"]]
    assert len(b) == 5 and all(abs(x - y) < 1e-5 for x, y in zip(a, b)), (a, b)
    wa, wb = adapter(tmp_path / "full"), adapter(out)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


EXTRACT_SPEC = """
name: tiny-slots
kind: extract
schema:
  type: object
  properties: {{city: {{type: string}}}}
  required: [city]
teachers:
  - name: rec
    kind: replay
    path: rec.jsonl
teacher: rec
student: {{base_model: {base}, lora_rank: 4, lora_alpha: 8, lora_dropout: 0.0, learning_rate: 0.03, batch_size: 6,
           max_steps: 3, max_length: 96, prompt: short, device: cpu, cpu_threads: 1}}
"""


def extract_project(root: Path, base: Path):
    """An extract project with 11 labelled train rows (6 per step: shares of 3 | 2 and 3)."""
    from distill.project import Project

    proj = Project.init(root, "extract", EXTRACT_SPEC.format(base=base))
    with proj.store.tx() as c:
        for i, w in enumerate(WORDS[:11]):
            c.execute("INSERT INTO examples(id, text, norm, split, created_at) VALUES(?,?,?,?,?)",
                      (f"x{i:02d}", f"rain in {w}", f"rain in {w}", "train", 0.0))
            c.execute("INSERT INTO labels(example_id, teacher, status, answer, created_at) VALUES(?,?,?,?,?)",
                      (f"x{i:02d}", "rec", "ok", json.dumps({"city": w}), 0.0))
    return proj


def test_lm_project_two_processes_via_cli_train_like_one(lm_base, tmp_path):
    """`distill train PROJECT --processes 2` on an extract project: the run id, the step losses and the
    adapter of the in-process one-process run; rank 1 opened the store read-only and wrote no file."""
    from distill.project import Project
    from distill.recipes.lm_project import train_lm_project

    one = train_lm_project(extract_project(tmp_path / "one", lm_base), progress=False)
    proj = extract_project(tmp_path / "two", lm_base)
    proj.close()
    r = subprocess.run([sys.executable, "-m", "distill.cli", "train", str(proj.root), "--processes", "2"],
                       capture_output=True, text=True, timeout=300, env=_child_env(tmp_path, proj.root))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(_tagged(r.stdout, "WRITES")) == []           # printed by rank 1 only
    assert r.stdout.count(f"trained {one.run_id}") == 1            # the same run id; rank 0 alone reports
    rec = json.loads((proj.models_dir / one.run_id / "training_record.json").read_text())
    assert rec["processes"] == 2 and Project.open(proj.root).store.latest_run("train_lm")["id"] == one.run_id
    assert one.record["data"]["truncated"] == 0 and one.record["history"][0]["loss"] > 1.0
    for a, b in zip(one.record["history"], rec["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and a["tokens"] == b["tokens"]
    wa, wb = adapter(one.path.parent), adapter(proj.models_dir / one.run_id)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-4


# ------------------------------------------------------------------------------------------------ classifier


def test_classifier_two_processes_via_cli_train_like_one(tmp_path):
    """`distill train PROJECT --processes 2` (torchrun, gloo) against the recipe in this process: same run id,
    same epoch losses, same weights; rank 1 opened the store read-only and wrote no file of the project
    (except Trainer's own per-rank RNG file in its checkpoints, which are Trainer's)."""
    from transformers import AutoModelForSequenceClassification

    from distill.project import Project
    from distill.recipes.train_classifier import train

    base = tiny_bert_folder(tmp_path / "bert")
    conf = json.loads((base / "config.json").read_text())           # no dropout: the same maths on any rank
    conf.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (base / "config.json").write_text(json.dumps(conf))
    student = dict(base_model=str(base), epochs=2, learning_rate=5e-3, batch_size=8, max_length=16, device="cpu",
                   early_stopping_patience=0)
    one = train(tiny_classify_project(tmp_path / "one"), config=EncoderStudentConfig(**student), progress=False)

    proj = tiny_classify_project(tmp_path / "two")
    with open(proj.root / "distill.yaml", "a", encoding="utf-8") as f:
        f.write("student:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in student.items()))
    proj.close()
    r = subprocess.run([sys.executable, "-m", "distill.cli", "train", str(proj.root), "--processes", "2",
                        "--no-progress"], capture_output=True, text=True, timeout=300,
                       env=_child_env(tmp_path, proj.root, ignore=f"{os.sep}checkpoints"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(_tagged(r.stdout, "WRITES")) == []         # printed by rank 1 only
    final = proj.models_dir / one.run_id / "final"                 # the same run id
    two = json.loads((final / "training_record.json").read_text())
    assert two["processes"] == 2 and one.record["processes"] == 1
    assert Project.open(proj.root).store.latest_run("train")["id"] == one.run_id

    ea, eb = one.record["epochs"], two["epochs"]
    assert len(ea) == len(eb) == 2
    for x, y in zip(ea, eb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["eval_loss"] == pytest.approx(x["eval_loss"], rel=1e-5)
    wa = AutoModelForSequenceClassification.from_pretrained(one.path).state_dict()
    wb = AutoModelForSequenceClassification.from_pretrained(final).state_dict()
    w_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert w_diff <= 1e-4, w_diff
    print(f"\nclassifier 1 vs 2 processes: max |weight diff| {w_diff:.2e}")
