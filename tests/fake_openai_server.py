"""A fake OpenAI-compatible teacher with fault injection, for tests and benchmarks. Loopback only.

    python tests/fake_openai_server.py --port 8999 --log /tmp/server.jsonl --labels pos,neg,neu \\
        --faults "429:0.05,reset@3,truncated@10-12,seed=1" --rpm 600

From Python (tests, bench): ``h = start_server(tmp_path, labels=[...], faults="...")`` -> ``h.base_url``,
``h.log_lines()``, ``h.stop()``. The server runs in a subprocess so that tests can kill -9 the *client*
without touching it, and so that it behaves like a real socket peer (resets, truncated bodies).

Answers are deterministic: a classify answer is the first label whose name occurs as a word in the last
user message, else a label picked by a hash of that message. ``usage`` counts ~4 characters per token.
With ``logprobs`` the answer is split into 3-character tokens; the first token gets p=0.9 when the label
was named in the text (0.6 otherwise) and its ``top_logprobs`` share the rest among the other labels'
first tokens.

Faults (``--faults``, comma-separated, first match wins): ``KIND@I`` or ``KIND@I-J`` applies to the
I-th (..J-th) request the server receives (0-based), ``KIND:P`` to each request with probability P
drawn from ``seed=S`` and the request index (so a run is reproducible). KINDs:
  429 (with Retry-After: --retry-after), 429n (no Retry-After), 500, 502, 503, 504, 400, 401,
  reset (close the socket without answering), garbage (200 with a non-JSON body),
  badschema (200, JSON without choices), empty (200, choices: []), huge (200, a ~6 MB body)
  -> none of these is charged;
  slow (answer after --slow-s seconds), truncated (the body is cut in half in transit),
  badlabel (the answer is 'banana', outside any label set)
  -> these are real answers: charged once and stored for idempotent replay.

Idempotency: the first successful answer for an ``Idempotency-Key`` is stored and charged; a later
request with the same key gets the stored answer back, logged ``replayed`` and not charged (what
providers that honour the header do). Requests with the same key are served one at a time.

``--rpm N`` enforces a server-side limit (token bucket, N/60 per second, 2 s burst): beyond it -> 429
with Retry-After. ``--api-key K`` -> 401 unless ``Authorization: Bearer K``.

Every request is logged as one JSON line, fsync'd before the response is sent: t, idx, key, status,
fault, charged, replayed, tokens_in, tokens_out.

The Batch API (``/v1/files``, ``/v1/batches``; ``--batch-polls``, ``--batch-seconds``, ``--batch-faults``,
``--stall``) lives in fake_openai_batches.py; each batch line it answers is logged and charged like a request.
"""

# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations at runtime
import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAULT_KINDS = {"429", "429n", "500", "502", "503", "504", "400", "401", "reset", "garbage", "badschema", "empty",
               "huge", "slow", "truncated", "badlabel"}


@dataclass
class FaultRule:
    kind: str
    first: int | None = None
    last: int | None = None
    p: float | None = None


@dataclass
class Faults:
    rules: list[FaultRule] = field(default_factory=list)
    seed: int = 0

    def pick(self, idx: int) -> str | None:
        for r in self.rules:
            if r.p is not None:
                if random.Random(f"{self.seed}:{idx}:{r.kind}").random() < r.p:
                    return r.kind
            elif r.first <= idx <= r.last:
                return r.kind
        return None


def parse_faults(text: str | None) -> Faults:
    f = Faults()
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        if part.startswith("seed="):
            f.seed = int(part[5:])
            continue
        m = re.fullmatch(r"(\w+)@(\d+)(?:-(\d+))?", part) or re.fullmatch(r"(\w+):([0-9.]+)", part)
        if not m or m.group(1) not in FAULT_KINDS:
            raise SystemExit(f"bad fault {part!r}; kinds: {sorted(FAULT_KINDS)}")
        if "@" in part:
            first = int(m.group(2))
            f.rules.append(FaultRule(m.group(1), first, int(m.group(3) or first)))
        else:
            f.rules.append(FaultRule(m.group(1), p=float(m.group(2))))
    return f


def _h(s: str) -> int:
    return int(hashlib.sha256(s.encode()).hexdigest()[:12], 16)


def choose_label(labels: list[str], text: str, salt: str = "") -> tuple[str, bool]:
    low = text.lower()
    if not salt:
        for lab in labels:
            if re.search(rf"\b{re.escape(lab.lower())}\b", low):
                return lab, True
    return labels[_h(salt + text) % len(labels)], False


def tokens_of(text: str) -> list[str]:
    return [text[i:i + 3] for i in range(0, len(text), 3)] or [""]


def constraint(body: dict[str, Any]) -> tuple[str, Any] | None:
    """What a structured-output request constrains the answer to, in any dialect distill sends (OpenAI
    ``response_format`` json_schema, vLLM ``structured_outputs`` choice/json, older vLLM ``guided_choice`` /
    ``guided_json``): ('choice', [labels]) or ('json', schema). A constrained answer is never malformed, so the
    ``badlabel`` fault (a model going off the label set) cannot happen under one."""
    so = body.get("structured_outputs") or {}
    if so.get("choice") or body.get("guided_choice"):
        return "choice", list(so.get("choice") or body["guided_choice"])
    if so.get("json") or body.get("guided_json"):
        return "json", so.get("json") or body["guided_json"]
    rf = body.get("response_format") or {}
    if rf.get("type") == "json_schema":
        return "json", rf["json_schema"]["schema"]
    return None


def fill_schema(schema: dict[str, Any], user: str, labels: list[str]) -> Any:
    """A value valid against a (simple) JSON schema: enums get the label the text names (or the first value),
    strings a snippet of the input, numbers 0, objects their required properties."""
    if "enum" in schema:
        return choose_label(list(schema["enum"]), user)[0]
    t = schema.get("type")
    if t == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {k: fill_schema(props[k], user, labels) for k in (schema.get("required") or list(props)) if k in props}
    if t == "array":
        return []
    if t in ("number", "integer"):
        return 0
    if t == "boolean":
        return False
    return "fake reasoning" if not user else user[:20]


def score_prompt(body: dict[str, Any], labels: list[str]) -> list[Any]:
    """vLLM-style ``prompt_logprobs`` for a request that ends with the assistant's answer
    (``continue_final_message``): one entry per prompt token (3-character pieces of each message; ids are hashes),
    the first None; the answer's first token gets log 0.9 when it starts the label the user's text names, else
    log(0.1 / (labels - 1)), later answer tokens log 0.99, every other prompt token -1."""
    msgs = body.get("messages") or []
    user = next((m.get("content", "") for m in reversed(msgs) if m.get("role") == "user"), "")
    chosen, _ = choose_label(labels, user) if labels else ("", False)
    answer = msgs[-1].get("content", "") if msgs and msgs[-1].get("role") == "assistant" else ""
    out: list[Any] = []
    for m in msgs:
        last = m is msgs[-1] and m.get("role") == "assistant"
        for j, t in enumerate(tokens_of(f"<{m.get('role')}>") + tokens_of(m.get("content") or "")):
            if last and j >= len(tokens_of(f"<{m.get('role')}>")):
                k = j - len(tokens_of(f"<{m.get('role')}>"))
                lp = (math.log(0.9) if answer == chosen else math.log(0.1 / max(1, len(labels) - 1))) if k == 0 \
                    else math.log(0.99)
            else:
                lp = -1.0
            out.append({str(_h(f"{t}")): {"logprob": lp, "rank": 1, "decoded_token": t}})
    return [None] + out[1:]


def make_completion(body: dict[str, Any], labels: list[str], bad_label: bool) -> dict[str, Any]:
    msgs = body.get("messages") or []
    user = next((m.get("content", "") for m in reversed(msgs) if m.get("role") == "user"), "")
    n = int(body.get("n") or 1)
    choices, out_tokens = [], 0
    con = constraint(body)
    for i in range(n):
        if con is not None and con[0] == "choice":
            text, named = choose_label(con[1], user)
        elif con is not None:
            text, named = json.dumps(fill_schema(con[1], user, labels)), False
        elif bad_label:
            text, named = "banana", False
        elif labels:
            text, named = choose_label(labels, user)
            if i > 0 and _h(f"{i}:{user}") % 4 == 0:      # about 1 sample in 4 disagrees
                text, named = choose_label(labels, user, salt=f"s{i}")
        else:
            text, named = f"echo: {user[:60]}", False
        toks = tokens_of(text)
        out_tokens += len(toks)
        choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop", "logprobs": None}
        if body.get("logprobs"):
            k = int(body.get("top_logprobs") or 0)
            p0 = 0.9 if named else 0.6
            others = [tokens_of(lab)[0] for lab in labels if lab != text][: max(0, k - 1)]
            content = []
            for j, t in enumerate(toks):
                lp = math.log(p0) if j == 0 else math.log(0.99)
                top = [{"token": t, "logprob": lp, "bytes": list(t.encode())}]
                if j == 0:
                    top += [{"token": o, "logprob": math.log((1 - p0) / max(1, len(others))), "bytes": list(o.encode())}
                            for o in others]
                content.append({"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": top[:k]})
            choice["logprobs"] = {"content": content}
        choices.append(choice)
    prompt_tokens = sum(len(m.get("content") or "") // 4 + 4 for m in msgs)
    out = {
        "id": "chatcmpl-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16],
        "object": "chat.completion", "created": int(time.time()), "model": body.get("model", "fake"),
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": out_tokens,
                  "total_tokens": prompt_tokens + out_tokens},
    }
    if body.get("prompt_logprobs") is not None:
        out["prompt_logprobs"] = score_prompt(body, labels)
    return out


def build_app(*, labels: list[str], faults: Faults, log_path: Path, rpm: float | None = None,
              api_key: str | None = None, delay_s: float = 0.0, slow_s: float = 3.0, retry_after: float = 1.0,
              tpm: float | None = None, batch_polls: int = 1, batch_seconds: float = 0.0, batch_faults: str = "",
              stall: str = ""):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    app = FastAPI()
    state = {"idx": 0, "level": 0.0, "updated": time.monotonic()}
    capacity = max(2.0, (rpm or 0) / 60 * 2)
    state["level"] = capacity
    stored: dict[str, tuple[bytes, int, int]] = {}     # idempotency key -> (body, tokens_in, tokens_out)
    key_locks: dict[str, asyncio.Lock] = {}
    log = open(log_path, "a", encoding="utf-8")

    def write_log(**rec: Any) -> None:
        rec = {"t": time.time(), **rec}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        os.fsync(log.fileno())

    def rate_ok() -> float:
        """0 if a request may pass now, else seconds until it could."""
        if not rpm:
            return 0.0
        now = time.monotonic()
        state["level"] = min(capacity, state["level"] + (now - state["updated"]) * rpm / 60)
        state["updated"] = now
        if state["level"] >= 1:
            state["level"] -= 1
            return 0.0
        return (1 - state["level"]) / (rpm / 60)

    served: list[tuple[float, int]] = []     # (time, tokens) of charged answers: the TPM window

    def tokens_ok() -> float:
        """0 if the tokens charged in the last 60 s are under ``tpm``, else seconds until enough expire
        (a provider's TPM limit: a request is refused while the minute's usage is at the limit)."""
        if not tpm:
            return 0.0
        now = time.monotonic()
        while served and served[0][0] <= now - 60:
            served.pop(0)
        used = sum(n for _, n in served)
        if used < tpm:
            return 0.0
        for t, n in served:          # the earliest time the window drops under the limit
            used -= n
            if used < tpm:
                return t + 60 - now
        return 1.0

    def err(status: int, msg: str, headers: dict | None = None) -> Response:
        return JSONResponse({"error": {"message": msg, "type": "fake"}}, status_code=status, headers=headers)

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        idx = state["idx"]
        state["idx"] += 1
        key = request.headers.get("idempotency-key")
        base = {"idx": idx, "key": key, "charged": False, "replayed": False, "tokens_in": 0, "tokens_out": 0}
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            write_log(**base, status=401, fault="auth")
            return err(401, "Incorrect API key provided")
        wait = rate_ok()
        if wait > 0:
            write_log(**base, status=429, fault="rpm")
            return err(429, "Rate limit reached for requests", {"Retry-After": str(max(1, math.ceil(wait)))})
        wait = tokens_ok()
        if wait > 0:
            write_log(**base, status=429, fault="tpm")
            return err(429, "Rate limit reached for tokens per minute", {"Retry-After": str(max(1, math.ceil(wait)))})
        fault = faults.pick(idx)
        if fault in ("429", "429n"):
            write_log(**base, status=429, fault=fault)
            return err(429, "Rate limit reached (injected)",
                       {"Retry-After": f"{retry_after:g}"} if fault == "429" else None)
        if fault in ("500", "502", "503", "504", "400", "401"):
            write_log(**base, status=int(fault), fault=fault)
            return err(int(fault), f"injected {fault}")
        if fault == "reset":
            write_log(**base, status=0, fault=fault)
            request.scope["raw_send"].__self__.transport.abort()   # uvicorn h11 cycle: drop the connection
            return Response(status_code=500)
        if fault == "garbage":
            write_log(**base, status=200, fault=fault)
            return Response(b"\x00<html>upstream error</html>{{", media_type="application/json")
        if fault == "badschema":
            write_log(**base, status=200, fault=fault)
            return JSONResponse({"object": "chat.completion", "result": "no choices here"})
        if fault == "empty":
            write_log(**base, status=200, fault=fault)
            return JSONResponse({"object": "chat.completion", "choices": []})
        if fault == "huge":
            write_log(**base, status=200, fault=fault)
            return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 6_000_000}}]})
        body = await request.json()
        lock = key_locks.setdefault(key or f"nokey-{idx}", asyncio.Lock())
        async with lock:
            if key is not None and key in stored:
                data, tin, tout = stored[key]
                write_log(**{**base, "replayed": True, "tokens_in": tin, "tokens_out": tout}, status=200,
                          fault=fault)
            else:
                if delay_s:
                    await asyncio.sleep(delay_s)
                if fault == "slow":
                    await asyncio.sleep(slow_s)
                comp = make_completion(body, labels, bad_label=fault == "badlabel")
                data = json.dumps(comp).encode()
                tin, tout = comp["usage"]["prompt_tokens"], comp["usage"]["completion_tokens"]
                if key is not None:
                    stored[key] = (data, tin, tout)
                served.append((time.monotonic(), tin + tout))
                write_log(**{**base, "charged": True, "tokens_in": tin, "tokens_out": tout}, status=200,
                          fault=fault)
        if fault == "truncated":
            return Response(data[: len(data) // 2], media_type="application/json")
        return Response(data, media_type="application/json")

    # the Batch API (/v1/files, /v1/batches): its lines are answered by make_completion too (fake_openai_batches.py)
    from fake_openai_batches import add_batch_routes

    def next_idx() -> int:
        state["idx"] += 1
        return state["idx"] - 1

    add_batch_routes(app, answer=lambda body, bad: make_completion(body, labels, bad_label=bad), write_log=write_log,
                     next_idx=next_idx, api_key=api_key, polls=batch_polls, seconds=batch_seconds,
                     faults=batch_faults, stall=stall)

    async def outer(scope, receive, send):
        # keep uvicorn's own `send` so the 'reset' fault can reach the socket (starlette wraps `send`)
        if scope["type"] == "http":
            scope["raw_send"] = send
        await app(scope, receive, send)

    return outer


# -- running it ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--labels", default="positive,negative,neutral")
    ap.add_argument("--faults", default="")
    ap.add_argument("--rpm", type=float)
    ap.add_argument("--tpm", type=float, help="tokens per minute (prompt + completion of charged answers)")
    ap.add_argument("--api-key")
    ap.add_argument("--delay-s", type=float, default=0.0, help="latency added to every real answer")
    ap.add_argument("--slow-s", type=float, default=3.0, help="latency of the 'slow' fault")
    ap.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of the injected 429")
    ap.add_argument("--batch-polls", type=int, default=1, help="a batch ends at this GET of it (fake_openai_batches)")
    ap.add_argument("--batch-seconds", type=float, default=0.0, help="... and not before this many seconds")
    ap.add_argument("--batch-faults", default="", help="error@B:I-J, badlabel@B:I-J, expire@B, cancel@B, fail@B")
    ap.add_argument("--stall", default="", help="STEP[@N]:before|after - never answer that Batch API request")
    args = ap.parse_args(argv)
    import uvicorn

    app = build_app(labels=[x for x in args.labels.split(",") if x], faults=parse_faults(args.faults),
                    log_path=Path(args.log), rpm=args.rpm, api_key=args.api_key, delay_s=args.delay_s,
                    slow_s=args.slow_s, retry_after=args.retry_after, tpm=args.tpm, batch_polls=args.batch_polls,
                    batch_seconds=args.batch_seconds, batch_faults=args.batch_faults, stall=args.stall)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, http="h11")


@dataclass
class ServerHandle:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_lines(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path: Path, *, labels: list[str] | tuple[str, ...] = ("positive", "negative", "neutral"),
                 faults: str = "", rpm: float | None = None, api_key: str | None = None, delay_s: float = 0.0,
                 slow_s: float = 3.0, retry_after: float = 1.0, name: str = "server", port: int | None = None,
                 timeout_s: float = 20.0, tpm: float | None = None, batch_polls: int = 1, batch_seconds: float = 0.0,
                 batch_faults: str = "", stall: str = "") -> ServerHandle:
    """Start the server in a subprocess on a free loopback port (or ``port``, e.g. to bring a stopped server
    back at the same URL); return once /health answers."""
    log_path = Path(tmp_path) / f"{name}.jsonl"
    port = port or _free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--port", str(port), "--log", str(log_path),
           "--labels", ",".join(labels), "--faults", faults, "--delay-s", str(delay_s), "--slow-s", str(slow_s),
           "--retry-after", str(retry_after), "--batch-polls", str(batch_polls), "--batch-seconds",
           str(batch_seconds), "--batch-faults", batch_faults, "--stall", stall]
    if rpm:
        cmd += ["--rpm", str(rpm)]
    if tpm:
        cmd += ["--tpm", str(tpm)]
    if api_key:
        cmd += ["--api-key", api_key]
    err = open(Path(tmp_path) / f"{name}.stderr", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    handle = ServerHandle(proc, port, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake server exited: {(Path(tmp_path) / f'{name}.stderr').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return handle
        except OSError:
            time.sleep(0.1)
    handle.stop()
    raise RuntimeError(f"fake server did not become ready on port {port} within {timeout_s}s")


# -- a small project to label (the importer lives elsewhere; tests insert examples directly) ---------------


def make_project(root: Path, n: int, base_url: str, *, labels: tuple[str, ...] = ("positive", "negative", "neutral"),
                 split: str = "train", teacher_yaml: str | None = None, extra_yaml: str = "",
                 concurrency: int = 8, max_retries: int = 4, timeout_s: float = 10.0, rpm: float | None = None,
                 tpm: float | None = None):
    """A classify project with ``n`` examples in ``split`` and one openai teacher ``api`` pointing at
    ``base_url`` (key in $FAKE_KEY). About a third of the texts name their label, so answers vary."""
    from distill.project import Project

    teacher_yaml = teacher_yaml or f"""
  - name: api
    kind: openai
    base_url: {base_url}
    model: fake-1
    api_key_env: FAKE_KEY
    concurrency: {concurrency}
    max_retries: {max_retries}
    timeout_s: {timeout_s}
    rpm: {rpm if rpm else "null"}
    tpm: {tpm if tpm else "null"}
    price: {{input_per_1m: 1.0, output_per_1m: 2.0}}
    terms: {{outputs_may_train_models: true}}
"""
    spec = f"""name: t
kind: classify
description: Sentiment of a customer message.
labels: [{", ".join(labels)}]
teachers:{teacher_yaml}{extra_yaml}"""
    project = Project.init(root, "classify", spec_text=spec)
    now = time.time()
    with project.store.tx() as c:
        for i in range(n):
            text = f"message number {i}: " + (f"I feel {labels[i % len(labels)]} about it" if i % 3 == 0
                                                else f"order {i * 7919 % 1000} arrived on day {i % 28}")
            c.execute("INSERT INTO examples(id, text, norm, split, created_at) VALUES(?,?,?,?,?)",
                      (f"ex{i:05d}", text, text.lower(), split, now))
    return project


if __name__ == "__main__":
    main()
