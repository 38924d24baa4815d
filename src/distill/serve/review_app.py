"""`distill review PROJECT`: the web page where people check and correct the teacher's labels.

One server-rendered page and a little plain JavaScript (no build step, nothing fetched from the internet): pick a
queue (``1``-``5``), see one item at a time -- the input, the teacher's answer with its distribution, the serving
student's answer, gold if any, the rationale, why it is in the queue -- and accept (``a``), correct (``c``: a label
picker with search, ``Enter`` takes the first match; extract: a JSON editor checked against the schema,
``Ctrl+Enter`` saves), skip (``s``), flag as out of scope (``o``) or undo the last decision (``u``). Everything is stored by
``distill.review`` (decisions with reviewer, time and queue; corrections that override the teacher; leases so two
reviewers never get the same item).

Access: loopback by default; an API key as for `distill serve` (``distill keys create``), entered once on the page
and kept in an HttpOnly, SameSite=Strict cookie; every write also needs the ``X-Distill-Review`` header, which a
page from another site cannot send (no CSRF). ``--no-auth`` only on loopback.
"""

from __future__ import annotations

import html
import json
import logging
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict

from distill import review
from distill.errors import DistillError
from distill.project import SPEC_FILE, Project
from distill.serve import keys as keys_mod

log = logging.getLogger("distill.review")
COOKIE = "distill_review_key"
HEADER = "x-distill-review"


class NextIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queue: str
    reviewer: str


class DecideIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item: str
    queue: str
    reviewer: str
    action: str
    answer: Any = None
    note: str | None = None


class UndoIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reviewer: str


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str


def create_review_app(project_dir: str | Path, *, require_key: bool = True, lease_s: float = review.LEASE_S) -> FastAPI:
    root = Path(project_dir)
    probe = Project.open(root)          # fail at startup on a bad project, not at the first request
    spec = probe.spec
    probe.close()
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        # the serving student's answers for the disagreement queue, in the background: the page works meanwhile
        def predict() -> None:
            p = Project.open(root)
            try:
                state["neighbours"] = review.Neighbours(p)
                n = review.predict_students(p)
                if n:
                    log.info("review: the serving student answered %d inputs (disagreement queue)", n)
            except Exception:   # noqa: BLE001 - the other queues work without it
                log.exception("review: could not run the serving student; the disagreement queue stays empty")
            finally:
                p.close()

        threading.Thread(target=predict, name="distill-review-student", daemon=True).start()
        yield

    app = FastAPI(title=f"distill review: {spec.name}", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    state: dict[str, Any] = {}

    local = threading.local()

    def project() -> Project:
        # one project (store connection) per thread of FastAPI's pool (sync endpoints; a sqlite connection belongs
        # to its thread), opened once — opening checks the store's integrity, which grows with its size — and
        # again when distill.yaml changes (e.g. `feedback.use`, a label added)
        mtime = (root / SPEC_FILE).stat().st_mtime_ns
        p = getattr(local, "project", None)
        if p is None or local.mtime != mtime:
            if p is not None:
                p.close()
            p = local.project = Project.open(root)
            local.mtime = mtime
        return p

    def authorised(request: Request, p: Project) -> bool:
        if not require_key:
            return True
        raw = request.cookies.get(COOKIE) or keys_mod.bearer(request.headers.get("authorization"))
        return keys_mod.verify_key(p.store, raw) is not None

    def guarded(request: Request, write: bool, fn):
        if write and request.headers.get(HEADER) != "1":
            return JSONResponse({"error": "missing the X-Distill-Review header"}, status_code=403)
        p = project()
        try:
            if not authorised(request, p):
                return JSONResponse({"error": "an API key is needed", "hint": "`distill keys create PROJECT`"},
                                    status_code=401)
            return JSONResponse(fn(p))
        except DistillError as e:
            return JSONResponse({"error": e.message, "hint": e.hint}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(_PAGE.replace("__TITLE__", html.escape(spec.name))
                            .replace("__LABELS__", json.dumps(list(spec.label_names)))
                            .replace("__QUEUES__", json.dumps(list(review.QUEUES)))
                            .replace("__AUTH__", "true" if require_key else "false")
                            .replace("__KIND__", json.dumps(spec.kind)))

    @app.post("/api/login")
    def login(body: LoginIn, request: Request):
        if request.headers.get(HEADER) != "1":
            return JSONResponse({"error": "missing the X-Distill-Review header"}, status_code=403)
        ok = keys_mod.verify_key(project().store, body.key.strip()) is not None
        if not ok:
            return JSONResponse({"error": "not a live API key of this project"}, status_code=401)
        r = JSONResponse({"ok": True})
        r.set_cookie(COOKIE, body.key.strip(), httponly=True, samesite="strict")
        return r

    @app.get("/api/stats")
    def stats(request: Request):
        return guarded(request, False, review.stats)

    @app.post("/api/next")
    def next_(body: NextIn, request: Request):
        def go(p):
            it = review.next_item(p, body.queue, body.reviewer, lease_s=lease_s)
            if it is not None and state.get("neighbours") is not None:
                it.neighbours = state["neighbours"].nearest(it.text, exclude=it.example_id)
            return {"item": None if it is None else it.__dict__}
        return guarded(request, True, go)

    @app.post("/api/decide")
    def decide(body: DecideIn, request: Request):
        def go(p):
            # committed before this returns: the page shows "saved" only for a stored decision
            did = review.decide(p, body.item, body.queue, body.reviewer, body.action, body.answer, body.note)
            return {"decision": did}
        return guarded(request, True, go)

    @app.post("/api/undo")
    def undo(body: UndoIn, request: Request):
        return guarded(request, True, lambda p: {"undone": review.undo(p, body.reviewer)})

    return app


def serve_review(project_dir: str | Path, host: str = "127.0.0.1", port: int = 8010, *, require_key: bool = True,
                 log_level: str = "warning") -> None:
    import uvicorn

    if not require_key and host not in ("127.0.0.1", "localhost", "::1"):
        raise DistillError(f"refusing to serve the review page without API keys on {host}",
                           hint="drop --no-auth, or bind 127.0.0.1")
    app = create_review_app(project_dir, require_key=require_key)
    print(f"distill review: http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>review: __TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:18px;align-items:center;flex-wrap:wrap}
 header h1{font-size:17px;margin:0} header input{padding:4px 6px}
 main{max-width:900px;margin:18px auto;padding:0 14px}
 .queues button{margin-right:6px;padding:6px 10px;border:1px solid #c8ccd4;background:#fff;border-radius:6px;cursor:pointer}
 .queues button.on{background:#2f6fde;color:#fff;border-color:#2f6fde}
 .card{background:#fff;border:1px solid #dde0e6;border-radius:8px;padding:16px 18px;margin-top:14px}
 .text{font-size:19px;margin:6px 0 12px;white-space:pre-wrap}
 .why{color:#6a7282;font-size:13px}
 .bar{display:flex;align-items:center;gap:8px;font-size:13px;margin:2px 0}
 .bar span.b{display:inline-block;height:10px;background:#2f6fde;border-radius:3px}
 .keys button{margin:10px 8px 0 0;padding:7px 12px;border-radius:6px;border:1px solid #c8ccd4;background:#fff;cursor:pointer}
 kbd{background:#eef0f4;border:1px solid #c8ccd4;border-radius:3px;padding:0 4px;font-size:12px;color:#1d2330}
 #picker{display:none;margin-top:10px} #picker input{width:100%;padding:6px;font-size:15px}
 #picker li{list-style:none;padding:3px 6px;cursor:pointer} #picker li.first{background:#e6eefc}
 #status{margin-top:10px;color:#1f7a3a;min-height:1.2em} #status.err{color:#b3261e}
 #stats{font-size:13px;color:#4a5262;margin-top:8px}
 table{border-collapse:collapse;font-size:13px} td,th{padding:2px 8px;text-align:left}
</style></head><body>
<header><h1>distill review: __TITLE__</h1>
 <label>reviewer <input id="reviewer" placeholder="your name" autocomplete="name"></label>
 <span id="login" style="display:none"><input id="key" placeholder="API key" size="30"> <button id="loginbtn">sign in</button></span>
</header>
<main>
 <div class="queues" id="queues"></div>
 <div id="stats"></div>
 <div class="card" id="card"><div class="why">choose a queue</div></div>
 <div id="status"></div>
</main>
<script>
const LABELS = __LABELS__, QUEUES = __QUEUES__, AUTH = __AUTH__, KIND = __KIND__;
const show = (a) => a == null ? "(no answer)" : (typeof a === "string" ? a : JSON.stringify(a));
let queue = QUEUES[0], item = null, picking = false;
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;","'":"&#39;"}[c]));
$("reviewer").value = localStorage.getItem("distill-reviewer") || "";
// the name: saved and applied on change (leaving the field, or Enter, which leaves it)
$("reviewer").addEventListener("change", () => { localStorage.setItem("distill-reviewer", $("reviewer").value.trim()); load(); });
async function api(path, body) {
  const r = await fetch(path, body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json",
    "X-Distill-Review": "1"}, body: JSON.stringify(body)});
  const j = await r.json();
  if (r.status === 401) { $("login").style.display = "inline"; }
  if (!r.ok) throw new Error(j.error + (j.hint ? " (" + j.hint + ")" : ""));
  return j;
}
function say(msg, err) { $("status").textContent = msg; $("status").className = err ? "err" : ""; }
function reviewer() { const r = $("reviewer").value.trim(); if (!r) { say("enter your name first", true); $("reviewer").focus(); } return r; }
let chosen = false;     // a queue was picked (by the reviewer, or the first with items left)
async function stats() {
  try {
    const s = await api("/api/stats");
    $("queues").innerHTML = QUEUES.map((q, i) => `<button data-q="${q}" class="${q === queue ? "on" : ""}"><kbd>${i + 1}</kbd> ${q.replace("_", " ")}
      <b>${s.queues[q].left}</b>/${s.queues[q].total}</button>`).join("");
    document.querySelectorAll("#queues button").forEach((b) => b.onclick = () => { queue = b.dataset.q; chosen = true; load(); });
    const a = s.audit;
    const g = s.agreement, worst = Object.entries(s.per_label).filter(([k, v]) => v.reviewed >= 5)
      .sort((x, y) => y[1].error_rate - x[1].error_rate).slice(0, 3);
    $("stats").innerHTML = (a.reviewed ? `teacher accuracy on the audit sample: <b>${(100 * a.accuracy).toFixed(1)}%</b>
      [${(100 * a.ci95[0]).toFixed(1)}, ${(100 * a.ci95[1]).toFixed(1)}] over ${a.reviewed} reviewed` : "audit: nothing reviewed yet")
      + (g.items ? ` · reviewers agree on ${(100 * g.observed).toFixed(0)}% of ${g.items} double-reviewed (Cohen's κ ${g.cohen_kappa.toFixed(2)})` : "")
      + (worst.length ? ` · most corrected teacher labels: ${worst.map(([k, v]) => `${esc(k)} ${(100 * v.error_rate).toFixed(0)}%`).join(", ")}` : "")
      + roundsLine(s.rounds);
  } catch (e) { say(e.message, true); }
}
function roundsLine(r) {
  const kinds = (o) => Object.entries(o).map(([k, v]) => `${v} ${k}`).join(", ");
  const n = r.next, parts = [];
  if (n.new) parts.push(`${n.new} fixes (${kinds(n.by_kind)})`);
  if (n.queue_reviewed) parts.push(`${n.queue_reviewed} reviewed serving inputs`);
  if (n.queue_feedback) parts.push(`${n.queue_feedback} client feedback answers`);
  let out = `<br>next <code>distill iterate</code> round: ${parts.length ? parts.join(" + ") + " not yet trained on" : "nothing new from review"}`;
  const l = r.last;
  if (l && l.new) {
    const e = l.effect;
    out += ` · round ${l.round} trained on ${l.new} new fixes, ${l.changed_teacher_label} changing the teacher's answer`
      + (e ? `; its new model answers ${e.new_model_follows}/${e.n} of those inputs as fixed`
           + (e.old_model_follows !== null ? ` (the model before: ${e.old_model_follows}/${e.n})` : "") : "")
      + (l.promoted ? " and was promoted" : " and was not promoted");
  }
  return out;
}
function render() {
  const c = $("card");
  if (!item) { c.innerHTML = `<div class="why">queue “${esc(queue)}” is done</div>`; return; }
  const probs = item.probs ? Object.entries(item.probs).sort((a, b) => b[1] - a[1]).slice(0, 5).map(([k, v]) =>
    `<div class="bar"><span style="width:150px">${esc(k)}</span><span class="b" style="width:${Math.round(200 * v)}px"></span>${v.toFixed(3)}</div>`).join("") : "";
  c.innerHTML = `<div class="why">${esc(item.why)} · ${esc(item.split)} · ${esc(item.example_id)}</div>
    <div class="text" id="text">${esc(item.text)}</div>
    ${item.student_answer != null ? `<div>${item.kind === "queue" ? "served by the student" : "the serving student says"}: <b id="student">${esc(show(item.student_answer))}</b>${item.student_conf != null ? ` (${item.student_conf.toFixed(3)})` : ""}</div>` : ""}
    <div>${item.reason === "feedback" ? "the client says" : "teacher"}: <b id="teacher">${esc(show(item.teacher_answer))}</b>${item.gold != null ? ` · gold: <b>${esc(show(item.gold))}</b>` : ""}${item.correction != null ? ` · corrected: <b>${esc(show(item.correction))}</b>` : ""}</div>
    ${probs}${item.rationale ? `<div class="why">rationale: ${esc(item.rationale)}</div>` : ""}
    ${item.neighbours && item.neighbours.length ? `<div class="why" id="neighbours">already labelled, most alike: ${item.neighbours.map((n) =>
      `<br>“${esc(n.text)}” → <b>${esc(show(n.answer))}</b> (${esc(n.source)}, ${n.similarity})`).join("")}</div>` : ""}
    <div class="keys"><button id="b-accept"><kbd>a</kbd> accept</button><button id="b-correct"><kbd>c</kbd> correct</button>
    <button id="b-skip"><kbd>s</kbd> skip</button><button id="b-oos"><kbd>o</kbd> out of scope</button><button id="b-undo"><kbd>u</kbd> undo</button></div>
    <div id="picker"><input id="search" placeholder="type to filter labels, Enter takes the first"><ul id="matches"></ul></div>
    <div id="editor" style="display:none"><textarea id="answer" rows="8" style="width:100%;font:14px monospace"></textarea>
    <div class="why">Ctrl+Enter saves (checked against the task's schema), Escape closes</div></div>`;
  $("b-accept").onclick = () => act("accept"); $("b-correct").onclick = openPicker; $("b-skip").onclick = () => act("skip");
  $("b-oos").onclick = () => act("oos"); $("b-undo").onclick = undo;
}
function matches() {
  const q = $("search").value.toLowerCase();
  return LABELS.filter((l) => l.toLowerCase().includes(q));
}
function showMatches() {
  $("matches").innerHTML = matches().slice(0, 12).map((l, i) => `<li class="${i ? "" : "first"}" data-l="${esc(l)}">${esc(l)}</li>`).join("");
  document.querySelectorAll("#matches li").forEach((li) => li.onclick = () => act("correct", li.dataset.l));
}
function openPicker() {
  if (!item) return; picking = true;
  if (KIND !== "classify") {       // extract: the JSON object; generate: the text
    $("editor").style.display = "block";
    const a = item.correction ?? item.teacher_answer;
    $("answer").value = a == null ? "" : (typeof a === "string" ? a : JSON.stringify(a, null, 2));
    $("answer").focus(); return;
  }
  $("picker").style.display = "block"; $("search").value = "";
  showMatches(); $("search").focus(); $("search").oninput = showMatches; }
// One load at a time. A trigger that comes while one runs (Enter and the change event; a decision saved while the
// previous item's stats were still loading) asks for one more load after it, and waits for that one.
let inflight = null, again = false;
function load() {
  if (inflight) { again = true; return inflight; }
  inflight = (async () => {
    do {
      again = false;
      const r = reviewer(); if (!r) return;
      try {
        if (!chosen) {    // until the reviewer picks a queue, start on the first one with items left
          const s = await api("/api/stats");
          queue = QUEUES.find((q) => s.queues[q].left) || queue; chosen = true;
        }
        const it = (await api("/api/next", {queue, reviewer: r})).item;
        // the same item again while its picker or editor is open (a background reload): keep what is being typed
        if (!(picking && item && it && it.item === item.item)) { item = it; picking = false; render(); }
        await stats();
      }
      catch (e) { say(e.message, true); }
    } while (again);
  })().finally(() => { inflight = null; });
  return inflight;
}
async function act(action, answer) {
  const r = reviewer(); if (!r || !item) return;
  try {
    await api("/api/decide", {item: item.item, queue, reviewer: r, action, answer: answer ?? null});
    say(`saved: ${action}${answer ? " → " + show(answer) : ""}`); await load();
  } catch (e) { say(e.message, true); }
}
async function undo() {
  const r = reviewer(); if (!r) return;
  try { const u = (await api("/api/undo", {reviewer: r})).undone; say(u ? `undone: ${u.action}` : "nothing to undo"); await load(); }
  catch (e) { say(e.message, true); }
}
document.addEventListener("keydown", (e) => {
  if (e.target.id === "reviewer" || e.target.id === "key") {
    if (e.key === "Enter") {
      const changed = e.target.id === "reviewer" && e.target.value.trim() !== (localStorage.getItem("distill-reviewer") || "");
      e.target.blur();            // a changed name fires "change", which loads
      if (!changed && !item) load();
    }
    return;
  }
  if (picking) {
    if (e.key === "Escape") { picking = false; $("picker").style.display = "none"; $("editor").style.display = "none"; }
    else if (KIND !== "classify") { if (e.key === "Enter" && e.ctrlKey) { e.preventDefault(); act("correct", $("answer").value); } }
    else if (e.key === "Enter") { const m = matches(); if (m.length) act("correct", m[0]); }
    return;
  }
  const qi = "123456789".indexOf(e.key);     // 1..N: switch queue
  if (qi >= 0 && qi < QUEUES.length && !e.ctrlKey && !e.metaKey && !e.altKey) { queue = QUEUES[qi]; chosen = true; load(); return; }
  const k = {a: () => act("accept"), c: openPicker, s: () => act("skip"), o: () => act("oos"), u: undo}[e.key];
  if (k && !e.ctrlKey && !e.metaKey && !e.altKey) { e.preventDefault(); k(); }
});
$("loginbtn").onclick = async () => {
  try {
    await api("/api/login", {key: $("key").value}); $("login").style.display = "none"; say("");
    await inflight;   // a load that started before the cookie was set failed with 401: load again after it
    load();
  } catch (e) { say(e.message, true); }
};
stats(); if ($("reviewer").value) load();
</script></body></html>
"""
