"""`distill review` in a real headless Chromium (Playwright for Python, launched on the system browser that
`.ci/run` installs; no browser download): sign in with an API key, review with the keyboard only, correct a label
through the picker, undo, see the decision in the store, in `distill status` and in the next training set; two
reviewers at once never get the same item. A screenshot of each view is saved under tests/artifacts/review/.
Skipped only on a developer machine without /usr/bin/chromium; in CI (env CI set) it must run."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_filters import ASSETS, make_project, put_label  # noqa: E402

from distill.data.importer import import_file  # noqa: E402
from distill.dataset import rows  # noqa: E402
from distill.project import Project  # noqa: E402
from distill.serve.keys import create_key  # noqa: E402
from distill.serve.review_app import create_review_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "review"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"),
                                reason="no /usr/bin/chromium on this machine (CI installs it)")


@pytest.fixture()
def served(tmp_path):
    import socket

    import uvicorn

    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", label="label")
    ids = [r["id"] for r in p.store.q("SELECT id FROM examples WHERE split != 'test' ORDER BY id")]
    for i, ex in enumerate(ids):
        top = 0.5 + 0.5 * (i + 1) / (len(ids) + 1)
        put_label(p, ex, "positive", probs={"positive": top, "negative": 1 - top, "neutral": 0.0}, confidence=top)
    _, key = create_key(p.store, "reviewers")
    root = p.root
    p.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_review_app(root), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}/", "key": key, "root": root, "ids": ids}
    server.should_exit = True
    t.join(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def sign_in(page, served, name: str) -> None:
    page.goto(served["url"])
    page.wait_for_selector("#login", state="visible")          # no key yet: the page asks for one
    page.fill("#key", served["key"])
    page.click("#loginbtn")
    page.fill("#reviewer", name)
    page.press("#reviewer", "Enter")
    page.wait_for_selector("#text")


def shown_id(page) -> str:
    return page.inner_text(".why").split("·")[-1].strip()


def moved_on(page, before: str) -> None:
    """Wait until the page shows another item than ``before`` (or says the queue is done)."""
    page.wait_for_function("(b) => !document.querySelector('#text') || "
                           "!document.querySelector('.why').textContent.endsWith(b)", arg=before)


def accept(page, n: int) -> list[str]:
    """Press ``a`` on ``n`` items in turn; the ids accepted."""
    ids = []
    for _ in range(n):
        ids.append(shown_id(page))
        page.keyboard.press("a")
        moved_on(page, ids[-1])
    return ids


def two_reviewers(browser, served):
    """Two browser contexts (separate cookies and storage), signed in as ann and bob."""
    ctx_a, ctx_b = browser.new_context(), browser.new_context()
    a, b = ctx_a.new_page(), ctx_b.new_page()
    sign_in(a, served, "ann")
    sign_in(b, served, "bob")
    return ctx_a, ctx_b, a, b


def decisions(served) -> list[dict]:
    p = Project.open(served["root"])
    try:
        return [dict(r) for r in p.store.q("SELECT * FROM review_decisions ORDER BY id")]
    finally:
        p.close()


def test_review_with_the_keyboard_correct_undo_and_see_it_downstream(served, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    sign_in(page, served, "ann")
    page.screenshot(path=str(ARTIFACTS / "item.png"))
    first = shown_id(page)
    # no filter run, so no suspect queue: the page opens the first queue with items left, smallest margin first
    assert first == served["ids"][0]
    page.keyboard.press("a")                                     # accept
    moved_on(page, first)
    assert page.inner_text("#status").startswith("saved: accept")
    second = shown_id(page)
    assert second != first
    page.keyboard.press("c")                                     # correct: the picker opens with the search focused
    page.keyboard.type("neg")
    page.screenshot(path=str(ARTIFACTS / "picker.png"))
    page.keyboard.press("Enter")                                 # the first match: negative
    moved_on(page, second)
    assert "negative" in page.inner_text("#status")
    d = decisions(served)
    assert [(x["action"], json.loads(x["answer"]), x["reviewer"]) for x in d] == \
        [("accept", "positive", "ann"), ("correct", "negative", "ann")]
    p = Project.open(served["root"])
    try:
        r = {x.id: x for x in rows(p, "rec")}                   # the next training set reads the correction
        assert r[second].answer == "negative" and r[second].source == "correction"
        from distill.status import status

        assert status(p)["corrections"] == 2                   # the accept is one too (a confirmed label)
    finally:
        p.close()
    # the page says what the next `distill iterate` round will train on that the last one did not
    page.wait_for_function("document.getElementById('stats').textContent.includes('2 fixes (2 review)')")
    assert "next distill iterate round: 2 fixes (2 review) not yet trained on" in page.inner_text("#stats")
    third = shown_id(page)
    page.keyboard.press("u")                                     # undo the correction
    moved_on(page, third)
    assert page.inner_text("#status").startswith("undone: correct")
    assert shown_id(page) == second                              # the item is back
    assert [x["undone_at"] is not None for x in decisions(served)] == [False, True]
    # keyboard-only pace: accept the next 20 items
    t0 = time.perf_counter()
    accept(page, 20)
    per_min = 20 / (time.perf_counter() - t0) * 60
    print(f"keyboard-only review: {per_min:.0f} items/minute (the page and the store, no human thinking time)")
    page.screenshot(path=str(ARTIFACTS / "after.png"))
    assert len([x for x in decisions(served) if x["undone_at"] is None]) == 21
    page.close()


def test_two_reviewers_at_once_never_get_the_same_item(served, browser):
    ctx_a, ctx_b, a, b = two_reviewers(browser, served)
    seen_a, seen_b = [], []
    for _ in range(5):
        seen_a.append(shown_id(a))
        seen_b.append(shown_id(b))
        assert seen_a[-1] != seen_b[-1]
        for page, seen in ((a, seen_a), (b, seen_b)):
            page.keyboard.press("a")
            moved_on(page, seen[-1])
    assert not set(seen_a) & set(seen_b)
    d = decisions(served)
    assert len(d) == 10 and len({x["item"] for x in d}) == 10          # ten items, each decided once
    b.screenshot(path=str(ARTIFACTS / "second-reviewer.png"))
    ctx_a.close()
    ctx_b.close()


def test_the_audit_queue_asks_a_second_reviewer_and_shows_their_agreement(served, browser):
    ctx_a, ctx_b, a, b = two_reviewers(browser, served)
    # the audit queue asks a second person about each item: bob gets the ones ann decided, and the page shows
    # how far the two agree
    a.keyboard.press("5")                                       # queues by number: 5 = audit
    a.wait_for_selector("#queues button.on[data-q=audit]")
    audited = accept(a, 3)
    b.click("#queues button[data-q=audit]")                     # ... or by mouse
    b.wait_for_selector("#queues button.on[data-q=audit]")
    assert accept(b, 3) == audited
    b.wait_for_function("document.getElementById('stats').textContent.includes('of 3 double-reviewed')")
    assert "reviewers agree on 100% of 3 double-reviewed (Cohen's κ 1.00)" in b.inner_text("#stats")
    b.screenshot(path=str(ARTIFACTS / "audit-agreement.png"))
    ctx_a.close()
    ctx_b.close()


def test_a_write_without_the_review_header_or_key_is_refused(served):
    import httpx

    r = httpx.post(served["url"] + "api/next", json={"queue": "audit", "reviewer": "x"})
    assert r.status_code == 403                                  # no X-Distill-Review header: not from the page
    r = httpx.post(served["url"] + "api/next", json={"queue": "audit", "reviewer": "x"}, headers={"X-Distill-Review": "1"})
    assert r.status_code == 401                                  # no key
    assert not decisions(served)


def test_extract_answers_are_edited_as_json_and_schema_invalid_ones_are_refused(tmp_path, browser):
    import shutil
    import socket

    import uvicorn
    import yaml

    from distill.project import SPEC_FILE

    root = tmp_path / "orders"
    root.mkdir()
    shutil.copy(ASSETS / "recording.jsonl", root)
    (root / SPEC_FILE).write_text((ASSETS / "extract_spec.yaml").read_text())
    p = Project.open(root)
    import_file(p, ASSETS / "orders.jsonl", label="gold")
    for r in p.store.q("SELECT id, gold FROM examples WHERE split != 'test'"):
        put_label(p, r["id"], json.loads(r["gold"]))
    p.close()
    assert yaml.safe_load((root / SPEC_FILE).read_text())["kind"] == "extract"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_review_app(root, require_key=False), host="127.0.0.1", port=port,
                                           log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.05)
    try:
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(f"http://127.0.0.1:{port}/")
        page.fill("#reviewer", "ann")
        page.press("#reviewer", "Enter")
        page.wait_for_selector("#text")
        first = shown_id(page)
        page.keyboard.press("c")                                 # the editor opens with the teacher's JSON
        assert json.loads(page.input_value("#answer"))["intent"] in ("buy", "cancel", "ask")
        page.fill("#answer", '{"intent": "return", "item": "scarf"}')      # not in the schema's enum
        page.keyboard.press("Control+Enter")
        page.wait_for_function("document.getElementById('status').textContent.includes('not valid')")
        assert page.eval_on_selector("#status", "e => e.className") == "err"
        msg = page.inner_text("#status")
        assert "schema_violation" in msg and "intent" in msg, msg
        page.screenshot(path=str(ARTIFACTS / "extract-invalid.png"))
        assert shown_id(page) == first                           # nothing saved, still on the same item
        page.fill("#answer", '{"intent": "cancel", "item": "scarf"}')
        page.keyboard.press("Control+Enter")
        moved_on(page, first)
        p = Project.open(root)
        try:
            c = p.store.q("SELECT answer FROM corrections WHERE example_id=?", (first,))
            assert json.loads(c[0]["answer"]) == {"intent": "cancel", "item": "scarf"}
            assert len(p.store.q("SELECT 1 FROM review_decisions")) == 1
        finally:
            p.close()
        page.close()
    finally:
        server.should_exit = True
        t.join(10)
