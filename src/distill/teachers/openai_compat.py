"""A teacher behind any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp server,
TGI, LiteLLM, ...).

Transport failures are this module's business (see teachers/base.py): 429, 500, 502, 503, 504, timeouts,
connection errors and unreadable bodies are retried with exponential backoff and *full jitter*
(delay ~ U(0, min(cap, base * 2^attempt)), "Exponential Backoff And Jitter", AWS Architecture Blog, 2015:
jitter spreads the retries of many clients so they do not hit the server again in lock-step). A
``Retry-After`` header on 429/503 overrides the backoff: the server knows when it will have capacity.

Crash safety: every request carries ``Idempotency-Key: <cache key>``. If the labeller is killed after the
provider charged a call but before the answer was committed, the re-run sends the same key and a provider
that honours the header returns the stored answer instead of charging again (tests/fake_openai_server.py
does; so do several gateways). With a provider that ignores it the worst case is paying once more for
the calls that were in flight - never for committed ones, which are answered from the cache.

The API key is read from the environment at construction and goes only into the Authorization header of
the httpx client. Providers repeat it in error bodies (whole, or masked with its tail kept), so it is
registered with ``distill.redact`` at once and every message built from a response goes through
``redact``: it is never part of an exception message, a log line or anything stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import os
import random
import time
from typing import Any, Awaitable, Callable

import httpx

from distill.errors import DistillError
from distill.ratelimit import Limiter, estimate_prompt_tokens
from distill.redact import redact, register
from distill.task import TeacherSpec
from distill.teachers.base import TeacherAuthError, TeacherReply, TeacherRequest, TeacherUnavailable

RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_BODY_BYTES = 5_000_000      # a chat answer is KBs; a bigger body is a broken server, not an answer
MAX_RETRY_AFTER_S = 300.0       # a Retry-After beyond this is treated as this (re-run later rather than hang)
SHARD_CONNECTIONS = 4           # connections per httpx client (see _Clients)


class _Transient(Exception):
    """One failed attempt that is worth retrying; ``reason`` ends up in the final error."""

    def __init__(self, reason: str, retry_after: float | None = None, refused: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.refused = refused      # an HTTP 429/5xx answer: the provider did not run the request


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` is either delta-seconds ("7", some providers send "0.5") or an HTTP date
    (RFC 9110 section 10.2.3). Returns seconds to wait (>= 0), or None when absent/unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        secs = float(value)
        return max(0.0, secs) if secs == secs else None    # NaN is not a delay
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]. ``attempt`` counts from 0."""
    rng = rng or random
    return rng.uniform(0.0, min(cap, base * (2 ** attempt)))


def _clip(text: str, n: int) -> str:
    # redacted before it is cut, so a key that straddles the cut is still found whole
    return redact(text[: n + 1000])[:n]


def _server_message(body: bytes) -> str:
    """The human part of an error body: OpenAI-style {"error": {"message": ...}} or the first 200 chars,
    redacted (a 401 body often repeats the key)."""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict):
            err = obj.get("error", obj.get("detail", obj))
            if isinstance(err, dict) and "message" in err:
                return _clip(str(err["message"]), 300)
            return _clip(str(err), 300)
    except (ValueError, RecursionError):   # not JSON, not UTF-8, >4300-digit ints, absurd nesting
        pass
    return _clip(body[:1200].decode("utf-8", "replace"), 200)


def _convert_logprobs(choice: dict[str, Any]) -> list[dict[str, Any]] | None:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("content"), list):
        return None
    out = []
    for t in lp["content"]:
        out.append({
            "token": t.get("token", ""),
            "logprob": float(t.get("logprob", 0.0)),
            "top_logprobs": [{"token": a.get("token", ""), "logprob": float(a.get("logprob", 0.0))}
                             for a in (t.get("top_logprobs") or [])],
        })
    return out


class _Clients:
    """``concurrency`` connections as several httpx clients of at most SHARD_CONNECTIONS each; a request goes to
    the client with the most free connections. Why: httpcore's pool looks at every one of its connections (and
    asks each socket whether it is readable) whenever a request starts or ends, so its cost per request grows with
    the pool -- at 16 connections it was a third of the labeller's CPU time, and what held its request rate down
    (measured against the loopback fake server, bench/scale.py)."""

    def __init__(self, concurrency: int, make: Callable[[int], httpx.AsyncClient]):
        sizes = [SHARD_CONNECTIONS] * (concurrency // SHARD_CONNECTIONS)
        sizes += [concurrency % SHARD_CONNECTIONS] if concurrency % SHARD_CONNECTIONS else []
        self.clients = [make(n) for n in sizes]
        self.free = list(sizes)

    @contextlib.asynccontextmanager
    async def stream(self, *args: Any, **kwargs: Any):
        i = max(range(len(self.clients)), key=self.free.__getitem__)
        self.free[i] -= 1
        try:
            async with self.clients[i].stream(*args, **kwargs) as response:
                yield response
        finally:
            self.free[i] += 1

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


class OpenAITeacher:
    def __init__(self, spec: TeacherSpec, project: Any = None, limiter: Limiter | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: random.Random | None = None,
                 backoff_base: float = 0.5, backoff_cap: float = 30.0,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.spec = spec
        self.limiter = limiter
        headers = {"Content-Type": "application/json"}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise DistillError(
                    f"teacher '{spec.name}': the environment variable ${spec.api_key_env} is not set",
                    hint=f"export {spec.api_key_env}=... (the key is read from the environment and never stored)",
                )
            register(key)       # from here on, distill.redact removes it from every message
            headers["Authorization"] = f"Bearer {key}"
        self.url = spec.base_url.rstrip("/") + "/chat/completions"
        self._client = _Clients(spec.concurrency, lambda n: httpx.AsyncClient(
            headers=headers, transport=transport,
            timeout=httpx.Timeout(spec.timeout_s, connect=min(10.0, spec.timeout_s)),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        ))
        self.task = getattr(project, "spec", None)     # the ProjectSpec: labels / schema for structured answers
        _check_structured(spec, self.task)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_body_bytes = max_body_bytes

    def body(self, req: TeacherRequest) -> dict[str, Any]:
        """The JSON we POST (also what the labeller stores as the request; it holds no secret)."""
        s = self.spec
        body: dict[str, Any] = {"model": s.model, "messages": req.messages, "temperature": s.temperature,
                                "max_tokens": s.max_tokens}
        if s.n > 1:
            body["n"] = s.n
        if s.logprobs:
            body["logprobs"] = True
            if s.top_logprobs:
                body["top_logprobs"] = s.top_logprobs
        if s.structured != "off" and self.task is not None:
            body.update(structured_params(s, self.task))
        return body

    def unwrap(self, reply: TeacherReply) -> None:
        """The answer texts as the labeller parses them (a structured rationale answer unwrapped). Also applied to
        Batch API lines (distill.teachers.batch), so a batch answer is stored as the online one would be."""
        if self.spec.structured != "off" and self.spec.rationale:
            reply.texts = [_unwrap_rationale(t) for t in reply.texts]

    async def aclose(self) -> None:
        await self._client.aclose()

    async def ask(self, req: TeacherRequest) -> TeacherReply:
        body = self.body(req)
        reply = await self._post(req.key, body, estimate_prompt_tokens(req.messages) + self.spec.max_tokens * self.spec.n)
        self.unwrap(reply)
        if self.spec.label_scoring == "prompt_logprobs" and self.task is not None and self.task.kind == "classify":
            await self._score_labels(req, reply)
        return reply

    async def _score_labels(self, req: TeacherRequest, reply: TeacherReply) -> None:
        """A full distribution over the labels from the model itself (vLLM): for each label, the prompt with the
        label as the assistant's finished answer, scored with ``prompt_logprobs``; a label's score is the sum of
        the log-probabilities of its tokens and the end-of-turn token (trailing whitespace tokens of the chat
        template dropped) after the prefix all labels share, and ``label_probs`` their softmax — the same rule
        as a local teacher (teachers/local.py), which the real-vLLM test checks on the same weights. Each scoring
        request is its own paid, retried, rate-limited call (its Idempotency-Key: the answer's key + label
        index); vLLM's prefix caching makes them cheap. The answer stays the generated one."""
        labels = list(self.task.label_names)
        t0 = time.monotonic()
        # the label as a finished assistant turn (its end-of-turn token scored too: "neg" must not win over
        # "negative" by being a prefix), nothing generated after it
        bodies = [{"model": self.spec.model, "messages": [*req.messages, {"role": "assistant", "content": lab}],
                   "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "add_generation_prompt": False,
                   "continue_final_message": False} for lab in labels]
        est = estimate_prompt_tokens(req.messages) + 8
        replies = await asyncio.gather(*[self._post(f"{req.key}:score:{i}", b, est) for i, b in enumerate(bodies)])
        seqs = []
        for lab, r in zip(labels, replies):
            seq = _prompt_token_logprobs(r.raw)
            if seq is None:
                raise TeacherUnavailable(
                    f"teacher '{self.spec.name}': label_scoring needs prompt_logprobs, and the server did not return "
                    f"them (label {lab!r})", hint="label_scoring: prompt_logprobs works with vLLM's OpenAI server; "
                    "set it to off for other servers")
            seqs.append(seq)
        shared = _common_prefix([[t for t, _, _ in q] for q in seqs])
        scores = {lab: sum(lp for _, lp, _ in q[shared:]) for lab, q in zip(labels, seqs)}
        top = max(scores.values())
        z = sum(math.exp(v - top) for v in scores.values())
        reply.label_probs = {lab: math.exp(v - top) / z for lab, v in scores.items()}
        reply.tokens_in += sum(r.tokens_in for r in replies)
        reply.tokens_out += sum(r.tokens_out for r in replies)
        reply.latency_s += time.monotonic() - t0
        reply.raw = {"answer": reply.raw, "label_logprobs": scores}

    async def _post(self, key: str, body: dict[str, Any], estimate: int) -> TeacherReply:
        """One request with retries, backoff and the limiter; raises TeacherUnavailable when they run out."""
        reason = "no attempt made"
        for attempt in range(self.spec.max_retries + 1):
            if self.limiter is not None:
                await self.limiter.acquire(estimate)
            t0 = time.monotonic()
            try:
                reply = await self._attempt(key, body)
            except _Transient as e:
                reason = e.reason
                if e.refused and self.limiter is not None:
                    # a refused request used no tokens: give its TPM estimate back (a timeout or a cut body
                    # may have been processed and billed, so those keep it)
                    self.limiter.settle(estimate, 0)
                if attempt == self.spec.max_retries:
                    break
                delay = e.retry_after if e.retry_after is not None else backoff_delay(
                    attempt, self.backoff_base, self.backoff_cap, self._rng)
                await self._sleep(min(delay, MAX_RETRY_AFTER_S))
                continue
            reply.latency_s = time.monotonic() - t0
            reply.retries = attempt
            if self.limiter is not None:
                self.limiter.settle(estimate, reply.tokens_in + reply.tokens_out)
            return reply
        raise TeacherUnavailable(
            redact(f"teacher '{self.spec.name}' at {self.url}: gave up after {self.spec.max_retries + 1} attempts; "
                   f"last error: {reason}"),
            hint="check that the server is up and not overloaded; re-run to continue (finished work is kept)",
        )

    async def _attempt(self, key: str, body: dict[str, Any]) -> TeacherReply:
        try:
            async with self._client.stream("POST", self.url, json=body, headers={"Idempotency-Key": key}) as r:
                chunks, size = [], 0
                declared = r.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
                    raise _Transient(f"response body of {int(declared)} bytes exceeds {self.max_body_bytes}")
                async for chunk in r.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise _Transient(f"response body exceeds {self.max_body_bytes} bytes")
                    chunks.append(chunk)
                raw_body = b"".join(chunks)
                status, headers = r.status_code, r.headers
        except httpx.TimeoutException as e:
            raise _Transient(f"timeout after {self.spec.timeout_s}s ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise _Transient(redact(f"connection error: {type(e).__name__}: {e}")) from None

        if status in (401, 403):
            raise TeacherAuthError(
                f"teacher '{self.spec.name}': the API rejected the key in ${self.spec.api_key_env} "
                f"(HTTP {status}: {_server_message(raw_body)})",
                hint=f"check the value of {self.spec.api_key_env} and that it may use model '{self.spec.model}'",
            )
        if status in RETRY_STATUS:
            ra = parse_retry_after(headers.get("retry-after")) if status in (429, 503) else None
            raise _Transient(f"HTTP {status}: {_server_message(raw_body)}", retry_after=ra, refused=True)
        if status >= 400:
            raise TeacherUnavailable(
                f"teacher '{self.spec.name}': HTTP {status} from {self.url}: {_server_message(raw_body)}",
                hint="the request was refused; check model name and parameters in distill.yaml",
            )
        try:
            data = json.loads(raw_body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _Transient(f"unreadable response body ({len(raw_body)} bytes): {e}") from None
        try:
            return reply_from_completion(data)
        except ValueError as e:
            raise _Transient(str(e)) from None


def reply_from_completion(data: Any) -> TeacherReply:
    """The ``TeacherReply`` of one chat completion body, online or a line of a Batch API output file
    (distill.teachers.batch), so both are read the same way. ValueError when it holds no answer."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ValueError("response has no choices")
    texts = []
    for c in choices:
        msg = c.get("message") if isinstance(c, dict) else None
        if not isinstance(msg, dict):
            raise ValueError("response choice has no message")
        texts.append(msg.get("content") or "")
    usage = data.get("usage") or {}
    return TeacherReply(
        texts=texts,
        logprobs=_convert_logprobs(choices[0]),
        tokens_in=int(usage.get("prompt_tokens") or 0),
        tokens_out=int(usage.get("completion_tokens") or 0),
        raw=data,
    )


# ------------------------------------------------------------------------------------------------
# structured answers (TeacherSpec.structured) and label scoring (TeacherSpec.label_scoring)


def _check_structured(spec: TeacherSpec, task: Any) -> None:
    if task is None or (spec.structured == "off" and spec.label_scoring == "off"):
        return
    if spec.structured != "off" and task.kind not in ("classify", "extract"):
        raise DistillError(f"teacher '{spec.name}': structured: {spec.structured} constrains classify and extract "
                           f"answers; this task is '{task.kind}' (free text)", hint="set structured: off")
    if spec.label_scoring != "off" and task.kind != "classify":
        raise DistillError(f"teacher '{spec.name}': label_scoring scores the labels of a classify task; this task is "
                           f"'{task.kind}'", hint="set label_scoring: off")


def answer_schema(spec: TeacherSpec, task: Any) -> dict[str, Any]:
    """The JSON schema the server constrains the answer to: classify ``{"label": one of the labels}``, extract the
    task's schema; with ``rationale`` both inside ``{"rationale": ..., "label" | "answer": ...}`` (the reasoning is
    written first, as in the unconstrained prompt)."""
    if task.kind == "classify":
        props: dict[str, Any] = {"label": {"type": "string", "enum": list(task.label_names)}}
    else:
        props = {"answer": task.json_schema or {"type": "object"}}
    if spec.rationale:
        props = {"rationale": {"type": "string"}, **props}
    if task.kind == "extract" and not spec.rationale:
        return task.json_schema or {"type": "object"}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _strict_ok(schema: Any) -> bool:
    """OpenAI's strict mode accepts only schemas whose every object lists all its properties as required and
    forbids others; anything else is sent with strict: false (the server still steers, but does not guarantee)."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            props = schema.get("properties", {})
            if schema.get("additionalProperties") is not False or set(schema.get("required", [])) != set(props):
                return False
        return all(_strict_ok(v) for v in schema.values())
    if isinstance(schema, list):
        return all(_strict_ok(v) for v in schema)
    return True


def structured_params(spec: TeacherSpec, task: Any) -> dict[str, Any]:
    """The request fields that constrain the answer, in the dialect ``spec.structured`` names."""
    schema = answer_schema(spec, task)
    choice = task.kind == "classify" and not spec.rationale       # the bare label: its first token carries logprobs
    if spec.structured == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "answer", "schema": schema, "strict": _strict_ok(schema)}}}
    if spec.structured == "vllm":
        return {"structured_outputs": {"choice": list(task.label_names)} if choice else {"json": schema}}
    if spec.structured == "vllm_guided":
        return {"guided_choice": list(task.label_names)} if choice else {"guided_json": schema}
    return {}


def _unwrap_rationale(text: str) -> str:
    """``{"rationale": r, "label"|"answer": a}`` -> the 'Rationale: r / Answer: a' text the labeller parses
    (``task.split_rationale``); anything else is left for the parser to judge."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if not isinstance(obj, dict) or "rationale" not in obj or not ({"label", "answer"} & set(obj)):
        return text
    a = obj.get("label", obj.get("answer"))
    return f"Rationale: {obj['rationale']}\nAnswer: {a if isinstance(a, str) else json.dumps(a, ensure_ascii=False)}"


def _prompt_token_logprobs(raw: dict[str, Any]) -> list[tuple[str, float, str]] | None:
    """vLLM's ``prompt_logprobs`` (one entry per prompt token, the first None; each a {token_id: {logprob, rank,
    decoded_token}} dict holding the prompt's own token when 0 alternatives are asked for) -> [(token id, logprob,
    text)], without the whitespace-only tokens a chat template puts after the end-of-turn token."""
    pl = raw.get("prompt_logprobs") if isinstance(raw, dict) else None
    if not isinstance(pl, list):
        return None
    out = []
    for entry in pl:
        if not entry:
            out.append(("", 0.0, ""))
            continue
        tid, info = next(iter(entry.items()))
        info = info if isinstance(info, dict) else {"logprob": info}
        out.append((str(tid), float(info.get("logprob", 0.0)), str(info.get("decoded_token") or "")))
    while out and out[-1][2] and not out[-1][2].strip():
        out.pop()
    return out


def _common_prefix(seqs: list[list[str]]) -> int:
    n = min(len(q) for q in seqs)
    for i in range(n):
        if any(q[i] != seqs[0][i] for q in seqs[1:]):
            return i
    return n
