"""The Batch API of the fake OpenAI server (tests/fake_openai_server.py): ``/v1/files`` and ``/v1/batches``.

    start_server(tmp_path, batch_polls=2, batch_faults="error@0:1-3,badlabel@0:4,expire@1", stall="create:after")

Files: upload (multipart, purpose=batch), list (?purpose, ?after, ?limit; newest first), content.
Batches: create (input_file_id, endpoint, completion_window, metadata), get, list (newest first, ?after, ?limit),
cancel. Like OpenAI's documentation, the fake does not promise to honour an Idempotency-Key on create: every create
makes a new batch, so a client that resends a create after a kill pays twice (what the kill -9 tests check).

A batch is ``validating`` when created, ``in_progress`` from its first GET, and ends at its ``batch_polls``-th GET
once ``batch_seconds`` have passed since it was created. Then every line is answered with the chat-completions
logic of the server (``make_completion``), charged once and logged as one line
``{"path": "batch_line", "batch": id, "line": i, "key": custom_id, "charged": true, "tokens_in": .., ...}``;
the output file holds the answers, the error file the lines that failed. Every HTTP request is logged too
(``"path"``: upload, list_files, content, create, get, list_batches, cancel; never charged).

Batch faults (``--batch-faults``, comma-separated; B = the B-th batch created, from 0; I-J = its line indexes):
  error@B:I-J     those lines go to the error file (code server_error) and are not charged
  badlabel@B:I-J  those lines are answered 'banana' (charged: a real answer that does not parse)
  expire@B        batch B expires: its first half is answered (charged), the rest goes to the error file with
                  code batch_expired (what OpenAI does)
  cancel@B        batch B is cancelled (as from the dashboard) before it answers anything: no files
  fail@B          batch B fails validation: status failed with errors, no files, nothing charged

Stall (``--stall STEP[@N]:before|after``, fires once): the N-th (from 0) request of STEP is logged with
``"stalled": true`` and never answered - ``before``: without acting on it; ``after``: once acted on (the file
stored, the batch created). A test kills the client then: the request went out, its answer never came back.
"""

import asyncio
import json
import re
import time
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from typing import Any, Callable

STEPS = ("upload", "list_files", "content", "create", "get", "list_batches", "cancel")
FINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class BatchFault:
    kind: str
    batch: int
    first: int = 0
    last: int = 10**9


def parse_batch_faults(text: str | None) -> list[BatchFault]:
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        m = re.fullmatch(r"(error|badlabel)@(\d+):(\d+)(?:-(\d+))?", part) or re.fullmatch(
            r"(expire|cancel|fail)@(\d+)", part)
        if not m:
            raise SystemExit(f"bad batch fault {part!r}; use error@B:I-J, badlabel@B:I-J, expire@B, cancel@B, fail@B")
        if m.re.groups == 4:
            first = int(m.group(3))
            out.append(BatchFault(m.group(1), int(m.group(2)), first, int(m.group(4) or first)))
        else:
            out.append(BatchFault(m.group(1), int(m.group(2))))
    return out


def parse_stall(text: str | None) -> tuple[str, int, str] | None:
    if not text:
        return None
    m = re.fullmatch(r"(\w+)(?:@(\d+))?:(before|after)", text)
    if not m or m.group(1) not in STEPS:
        raise SystemExit(f"bad stall {text!r}; use STEP[@N]:before|after with STEP in {STEPS}")
    return m.group(1), int(m.group(2) or 0), m.group(3)


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body (the stdlib parser: no python-multipart needed)."""
    msg = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in msg.iter_parts()}


def add_batch_routes(app, *, answer: Callable[[dict, bool], dict], write_log: Callable[..., None],
                     next_idx: Callable[[], int], api_key: str | None, polls: int = 1, seconds: float = 0.0,
                     faults: str = "", stall: str = "") -> None:
    """Add the Batch API endpoints to the FastAPI ``app``. ``answer(body, bad_label)`` is the chat completion
    for one request body (the server's own logic)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    rules = parse_batch_faults(faults)
    stall_at = parse_stall(stall)
    GONE = Response(status_code=499)            # the answer to a stalled request, which nobody reads
    files: dict[str, dict[str, Any]] = {}       # id -> public object + "content" (insertion order = age)
    batches: dict[str, dict[str, Any]] = {}     # id -> public object
    private: dict[str, dict[str, Any]] = {}     # id -> {"polls", "t0", "index"}
    seen = {s: 0 for s in STEPS}
    fired = {"done": False}

    def log(idx: int, step: str, status: int, **extra: Any) -> None:
        write_log(**{"idx": idx, "key": None, "path": step, "status": status, "fault": None, "charged": False,
                     "replayed": False, "tokens_in": 0, "tokens_out": 0, **extra})

    def err(status: int, msg: str) -> Response:
        return JSONResponse({"error": {"message": msg, "type": "fake"}}, status_code=status)

    async def begin(request: Request, step: str) -> tuple[int, int, Response | None]:
        idx, n = next_idx(), seen[step]
        seen[step] += 1
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            log(idx, step, 401, fault="auth")
            return idx, n, err(401, "Incorrect API key provided")
        if await maybe_stall(request, step, n, "before", idx):
            return idx, n, GONE
        return idx, n, None

    async def maybe_stall(request: Request, step: str, n: int, when: str, idx: int) -> bool:
        """True when this request was stalled until its client went away (nobody reads the answer)."""
        if stall_at != (step, n, when) or fired["done"]:
            return False
        fired["done"] = True
        log(idx, step, 0, stalled=True)
        # the client is killed meanwhile; returning once it is gone lets the server stop without waiting
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        return True

    def new_file(name: str, purpose: str, content: bytes) -> dict[str, Any]:
        fid = f"file-{len(files):05d}"
        files[fid] = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                      "filename": name, "purpose": purpose, "status": "processed", "content": content}
        return files[fid]

    def public(obj: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in obj.items() if k != "content"}

    def page(objs: list[dict[str, Any]], request: Request) -> dict[str, Any]:
        objs = list(reversed(objs))          # newest first
        after = request.query_params.get("after")
        if after:
            ids = [o["id"] for o in objs]
            objs = objs[ids.index(after) + 1:] if after in ids else []
        limit = int(request.query_params.get("limit") or 20)
        return {"object": "list", "data": [public(o) for o in objs[:limit]], "has_more": len(objs) > limit}

    @app.post("/v1/files")
    async def upload(request: Request) -> Response:
        idx, n, refused = await begin(request, "upload")
        if refused:
            return refused
        form = _multipart(request.headers.get("content-type", ""), await request.body())
        purpose = (form.get("purpose") or (None, b""))[1].decode()
        name, content = form.get("file") or (None, None)
        if purpose != "batch" or content is None:
            log(idx, "upload", 400)
            return err(400, "need a file and purpose=batch")
        f = new_file(name or "upload.jsonl", purpose, content)
        if await maybe_stall(request, "upload", n, "after", idx):
            return GONE
        log(idx, "upload", 200, file=f["id"], filename=f["filename"])
        return JSONResponse(public(f))

    @app.get("/v1/files")
    async def list_files(request: Request) -> Response:
        idx, n, refused = await begin(request, "list_files")
        if refused:
            return refused
        purpose = request.query_params.get("purpose")
        out = page([f for f in files.values() if purpose in (None, f["purpose"])], request)
        log(idx, "list_files", 200)
        return JSONResponse(out)

    @app.get("/v1/files/{fid}/content")
    async def content(fid: str, request: Request) -> Response:
        idx, n, refused = await begin(request, "content")
        if refused:
            return refused
        if fid not in files:
            log(idx, "content", 404)
            return err(404, f"no file {fid}")
        if await maybe_stall(request, "content", n, "after", idx):
            return GONE
        log(idx, "content", 200, file=fid)
        return Response(files[fid]["content"], media_type="application/jsonl")

    @app.post("/v1/batches")
    async def create(request: Request) -> Response:
        idx, n, refused = await begin(request, "create")
        if refused:
            return refused
        body = await request.json()
        fid = body.get("input_file_id")
        if fid not in files or body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            log(idx, "create", 400)
            return err(400, "need an uploaded input_file_id, endpoint /v1/chat/completions, completion_window 24h")
        lines = [x for x in files[fid]["content"].decode().splitlines() if x.strip()]
        bid = f"batch_{len(batches):05d}"
        batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                        "input_file_id": fid, "completion_window": "24h", "status": "validating",
                        "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                        "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                        "metadata": body.get("metadata") or {}}
        private[bid] = {"polls": 0, "t0": time.monotonic(), "index": len(private)}
        if await maybe_stall(request, "create", n, "after", idx):
            return GONE
        log(idx, "create", 200, batch=bid)
        return JSONResponse(batches[bid])

    @app.get("/v1/batches/{bid}")
    async def get(bid: str, request: Request) -> Response:
        idx, n, refused = await begin(request, "get")
        if refused:
            return refused
        if bid not in batches:
            log(idx, "get", 404)
            return err(404, f"no batch {bid}")
        b, p = batches[bid], private[bid]
        p["polls"] += 1
        if b["status"] not in FINAL:
            if p["polls"] >= polls and time.monotonic() - p["t0"] >= seconds:
                finish(bid)
            else:
                b["status"] = "in_progress"
        if await maybe_stall(request, "get", n, "after", idx):
            return GONE
        log(idx, "get", 200, batch=bid, batch_status=b["status"])
        return JSONResponse(b)

    @app.get("/v1/batches")
    async def list_batches(request: Request) -> Response:
        idx, n, refused = await begin(request, "list_batches")
        if refused:
            return refused
        log(idx, "list_batches", 200)
        return JSONResponse(page(list(batches.values()), request))

    @app.post("/v1/batches/{bid}/cancel")
    async def cancel(bid: str, request: Request) -> Response:
        idx, n, refused = await begin(request, "cancel")
        if refused:
            return refused
        if bid not in batches:
            log(idx, "cancel", 404)
            return err(404, f"no batch {bid}")
        if batches[bid]["status"] not in FINAL:
            batches[bid]["status"] = "cancelled"
        log(idx, "cancel", 200, batch=bid)
        return JSONResponse(batches[bid])

    def finish(bid: str) -> None:
        """Answer the batch's lines now (faults applied), charge each answer once, write the result files."""
        b = batches[bid]
        index = private[bid]["index"]
        mine = [r for r in rules if r.batch == index]
        ends = {r.kind for r in mine} & {"expire", "cancel", "fail"}
        if "fail" in ends:
            b.update(status="failed", errors={"object": "list", "data": [
                {"code": "invalid_request", "message": "injected validation failure", "line": None}]})
            return
        if "cancel" in ends:
            b["status"] = "cancelled"
            return
        lines = [json.loads(x) for x in files[b["input_file_id"]]["content"].decode().splitlines() if x.strip()]
        answered_upto = len(lines) // 2 if "expire" in ends else len(lines)
        out, errors = [], []
        for i, line in enumerate(lines):
            cid = line.get("custom_id")
            kinds = {r.kind for r in mine if r.first <= i <= r.last}
            if i >= answered_upto or "error" in kinds:
                code = "batch_expired" if i >= answered_upto else "server_error"
                errors.append({"id": f"batch_req_{bid}_{i}", "custom_id": cid, "response": None,
                               "error": {"code": code, "message": f"injected {code}"}})
                continue
            comp = answer(line.get("body") or {}, "badlabel" in kinds)
            tin, tout = comp["usage"]["prompt_tokens"], comp["usage"]["completion_tokens"]
            write_log(idx=None, key=cid, path="batch_line", batch=bid, line=i, status=200,
                      fault="badlabel" if "badlabel" in kinds else None, charged=True, replayed=False,
                      tokens_in=tin, tokens_out=tout)
            out.append({"id": f"batch_req_{bid}_{i}", "custom_id": cid, "error": None,
                        "response": {"status_code": 200, "request_id": f"req_{bid}_{i}", "body": comp}})

        def jsonl(rows: list[dict]) -> bytes:
            return "".join(json.dumps(r) + "\n" for r in rows).encode()

        if out:
            b["output_file_id"] = new_file(f"{bid}_output.jsonl", "batch_output", jsonl(out))["id"]
        if errors:
            b["error_file_id"] = new_file(f"{bid}_error.jsonl", "batch_output", jsonl(errors))["id"]
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(errors)}
        b["status"] = "expired" if "expire" in ends else "completed"
