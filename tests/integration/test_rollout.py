"""Safe rollouts end to end: a real uvicorn server (in a thread) with a promoted tiny student and a candidate, the
fake OpenAI server as the teacher, concurrent clients that keep sending while the candidate is judged, rolled back,
promoted or swapped in from the store.

The students are tiny random BERTs whose classifier head is planted: weights zero, a bias that makes them answer
one label whatever the text. The fake teacher answers the label a text names ("I feel positive ..." -> positive),
so a student planted on 'positive' agrees with it on every such text and one planted on 'negative' never does."""

import asyncio
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_openai_server import make_project, start_server  # noqa: E402
from test_serve import Server  # noqa: E402
from tiny_models import tiny_bert_folder  # noqa: E402

from distill import runs  # noqa: E402
from distill.project import Project  # noqa: E402
from distill.serve.app import ServeConfig, create_app  # noqa: E402
from distill.serve.keys import create_key  # noqa: E402
from distill.serve.rollout import RolloutConfig, read_state  # noqa: E402

LABELS = ("positive", "negative", "neutral")


def planted(tmp: Path, project: Project, run_id: str, label: str) -> None:
    """A trained-looking run whose student always answers ``label``."""
    import torch

    from distill.students.classifier import ClassifierStudent

    torch.manual_seed(0)
    student = ClassifierStudent.create(str(tiny_bert_folder(tmp / f"base-{run_id}")), list(LABELS), device="cpu")
    head = student.model.classifier
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([8.0 if lab == label else 0.0 for lab in LABELS]))
    d = student.save(tmp / "proj" / "models" / run_id / "final")
    project.record_run(run_id, "train", "done", d, {})


@pytest.fixture()
def world(tmp_path):
    fake = start_server(tmp_path, labels=LABELS)
    os.environ["FAKE_KEY"] = "fake-key-for-tests"
    project = make_project(tmp_path / "proj", 0, fake.base_url, labels=LABELS)
    planted(tmp_path, project, "r1", "positive")        # promoted: agrees with the teacher on 'positive' texts
    planted(tmp_path, project, "good", "positive")      # a candidate as good as the promoted model
    planted(tmp_path, project, "bad", "negative")       # a candidate that is always wrong on them
    project.promote("r1", "test fixture")
    _, key = create_key(project.store, "tests")
    project.close()
    yield {"root": tmp_path / "proj", "fake": fake, "h": {"Authorization": f"Bearer {key}"}}
    fake.stop()


def texts(n: int, start: int = 0) -> list[str]:
    return [f"I feel positive about order {i}" for i in range(start, start + n)]


async def hammer(url: str, h: dict, stop: asyncio.Event, clients: int = 4) -> list[tuple[int, str | None]]:
    """``clients`` connections sending one text per request until ``stop``; returns (status, served_by) of each."""
    out: list[tuple[int, str | None]] = []

    async def one(c: int) -> None:
        i = 0
        async with httpx.AsyncClient(timeout=30) as client:
            while not stop.is_set():
                try:
                    r = await client.post(url + "/v1/classify", headers=h, json={"texts": texts(1, 10_000 * c + i)})
                    out.append((r.status_code, r.json()["results"][0]["served_by"] if r.status_code == 200 else None))
                except httpx.HTTPError as e:          # a dropped connection counts as a failure
                    out.append((599, type(e).__name__))
                i += 1

    await asyncio.gather(*(one(c) for c in range(clients)))
    return out


def stored(world) -> tuple[dict | None, str | None]:
    p = Project.open(world["root"])
    try:
        return read_state(p.store), p.store.get_meta(runs.SERVING_KEY)
    finally:
        p.close()


def test_a_bad_candidate_is_rolled_back_on_its_own_and_no_request_fails(world):
    ro = RolloutConfig(candidate="bad", share=0.5, min_compared=30, teacher_check_rate=1.0)
    s = Server(create_app(world["root"], config=ServeConfig(poll_s=0.2), rollout=ro))
    try:
        async def main():
            stop = asyncio.Event()
            task = asyncio.ensure_future(hammer(s.url, world["h"], stop))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                st = httpx.get(s.url + "/v1/rollout", headers=world["h"]).json()
                if st["rollout"]["state"] != "running":
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)          # traffic keeps flowing after the verdict
            stop.set()
            return st, await task

        st, results = asyncio.run(main())
    finally:
        s.stop()
    r = st["rollout"]
    assert r["state"] == "rolled_back", r
    assert "disagreed with the teacher" in r["why"]
    # the evidence: on the same teacher-checked texts, the candidate was always wrong and the promoted model never
    assert r["teacher_checked"] >= 30 and r["candidate_teacher_disagreement"] == 1.0
    assert r["promoted_teacher_disagreement"] == 0.0
    assert all(code == 200 for code, _ in results), [x for x in results if x[0] != 200][:5]
    served = [who for _, who in results]
    assert "bad" in served                              # the canary did take traffic ...
    last_bad = max(i for i, who in enumerate(served) if who == "bad")
    assert served[last_bad + 1:] and set(served[last_bad + 1:]) == {"r1"}   # ... and none after the rollback
    state, serving = stored(world)
    assert state["candidate"] == "bad" and state["state"] == "rolled_back"     # every worker and a restart see it
    assert serving == "r1"


def test_a_good_candidate_is_promoted_and_swapped_in_under_load_without_a_failed_request(world):
    ro = RolloutConfig(candidate="good", share=0.3, min_compared=20, promote_after=20, teacher_check_rate=1.0)
    s = Server(create_app(world["root"], config=ServeConfig(poll_s=0.2), rollout=ro))
    try:
        async def main():
            stop = asyncio.Event()
            task = asyncio.ensure_future(hammer(s.url, world["h"], stop, clients=6))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and stored(world)[1] != "good":
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            stop.set()
            return await task

        results = asyncio.run(main())
        health = httpx.get(s.url + "/healthz", headers=world["h"]).json()
    finally:
        s.stop()
    state, serving = stored(world)
    assert serving == "good" and state["state"] == "promoted"
    assert health["model"] == "good"
    assert all(code == 200 for code, _ in results), [x for x in results if x[0] != 200][:5]
    served = [who for _, who in results]
    assert served[-1] == "good" and "r1" in served
    first_after = len(served) - served[::-1].index("r1")     # after the last r1 answer, only the new model answers
    assert set(served[first_after:]) == {"good"}


def test_a_model_promoted_elsewhere_is_hot_swapped_in_under_load(world):
    """`distill iterate` or `distill rollout promote` in another process changes the serving model: the running
    server follows within poll_s, and the requests in flight at that moment still succeed."""
    from typer.testing import CliRunner

    from distill.cli import app as cli

    s = Server(create_app(world["root"], config=ServeConfig(poll_s=0.2)))
    try:
        async def main():
            stop = asyncio.Event()
            task = asyncio.ensure_future(hammer(s.url, world["h"], stop, clients=6))
            await asyncio.sleep(1.0)
            res = await asyncio.to_thread(CliRunner().invoke, cli, ["rollout", "promote", str(world["root"]), "bad"])
            assert res.exit_code == 0, res.output
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if httpx.get(s.url + "/healthz", headers=world["h"]).json()["model"] == "bad":
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            stop.set()
            return await task

        results = asyncio.run(main())
    finally:
        s.stop()
    assert all(code == 200 for code, _ in results), [x for x in results if x[0] != 200][:5]
    served = [who for _, who in results]
    assert served[0] == "r1" and served[-1] == "bad"
    assert len(results) > 50


def test_a_candidate_must_be_another_run_of_the_project(world):
    from distill.errors import DistillError

    with pytest.raises(DistillError, match="already served"):
        create_app(world["root"], rollout=RolloutConfig(candidate="r1"))
    with pytest.raises(DistillError):
        create_app(world["root"], rollout=RolloutConfig(candidate="nope"))
