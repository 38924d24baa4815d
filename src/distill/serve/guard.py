"""What a request must get past before any endpoint or validator sees it: deadlines for slow clients, the
API key, and the body's size, type and JSON shape. Each refusal is a 4xx in the service's error shape
(OpenAI's, plus ``hint`` and ``param``), never a 500 and never a traceback.

Two layers, outermost first:

- ``DeadlineH11Protocol`` (the HTTP connection): a request's headers must arrive within ``header_timeout_s``
  of the connection opening or of the previous response; otherwise 408 (or a plain close when nothing of
  the next request arrived) and the connection is closed. uvicorn (0.54) has no header or body timeout, only
  ``timeout_keep_alive``, which every received byte resets: a client sending one byte a second held a
  connection, and its worker slot, forever.
- ``RequestGuard`` (ASGI middleware), in this order:
  1. 401 without a valid key on every path except ``open_paths`` (``/healthz``): nothing about the body, the
     schema (``/openapi.json``) or which paths exist is said to a client without a key;
  2. 413 for bodies over ``max_body_bytes`` (from Content-Length before reading, or while reading);
  3. 408 when the body has not fully arrived ``body_timeout_s`` after the headers;
  4. 415 unless the Content-Type is JSON (a missing one is read as JSON);
  5. 400 unless the body is UTF-8 JSON within explicit limits: nesting at most ``MAX_JSON_DEPTH`` levels,
     numbers at most ``MAX_NUMBER_CHARS`` characters and finite, no NaN/Infinity, and no string (or key) with
     a lone surrogate (``"\\ud800"`` is legal JSON escape syntax but not text: SQLite, tokenizers and
     ``str.encode`` all fail on it). The message names where (``texts[0]``, ``messages[1].content``).
  The body is then replayed to the app unchanged, so FastAPI's own parsing and pydantic validation (422,
  naming the field) run on input that cannot crash them.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from uvicorn.protocols.http.h11_impl import H11Protocol

from distill.serve.keys import bearer

MAX_JSON_DEPTH = 32          # deepest nesting of objects/arrays a request body may have (ours need 4)
MAX_NUMBER_CHARS = 40        # longest number literal; Python's int() refuses > 4300 digits with a ValueError
_BODY_METHODS = {"POST", "PUT", "PATCH"}


def error_body(status: int, message: str, hint: str | None = None, type_: str = "invalid_request_error",
               param: str | None = None) -> dict:
    """OpenAI's error shape (so the openai client surfaces ``message``), plus ``hint`` (what to do)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status, "hint": hint}}


async def send_error(send, status: int, message: str, hint: str | None = None, type_: str = "invalid_request_error",
                     param: str | None = None, *, close: bool = False, headers: Iterable[tuple[bytes, bytes]] = ()):
    body = json.dumps(error_body(status, message, hint, type_, param)).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    if close:       # uvicorn closes the connection after a response that says so
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------------
# JSON with limits


class BadBody(Exception):
    def __init__(self, message: str, hint: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message, self.hint, self.param = message, hint, param


class _BadNumber:
    """Stands in for a number literal the parser refused, so the walk can say where it was."""

    def __init__(self, literal: str, why: str):
        self.literal, self.why = literal, why


def _parse_int(s: str):
    return int(s) if len(s) <= MAX_NUMBER_CHARS else _BadNumber(s, f"has {len(s)} characters; numbers may have at "
                                                                   f"most {MAX_NUMBER_CHARS}")


def _parse_float(s: str):
    if len(s) > MAX_NUMBER_CHARS:
        return _BadNumber(s, f"has {len(s)} characters; numbers may have at most {MAX_NUMBER_CHARS}")
    f = float(s)
    return f if math.isfinite(f) else _BadNumber(s, "is out of range (not a finite 64-bit float)")


def _parse_constant(s: str):
    return _BadNumber(s, "is not a JSON number (JSON has no NaN or Infinity)")


# a JSON string literal (escapes included), blanked out before looking at the structure
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
# what may need the slow path: a long number, a big exponent (1e999 is inf), an escaped UTF-16 surrogate
_SUSPECT_NUMBER = re.compile(rb"[-+0-9.eE]{%d,}|[eE][-+]?0*[0-9]{3,}" % (MAX_NUMBER_CHARS + 1))
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_depth(structure: bytes) -> None:
    """``structure``: the body with its strings blanked out."""
    # before json.loads: its C parser recurses once per level and raises RecursionError near 1000 levels.
    # numpy, because a 1 MB body of brackets would take a Python loop 0.3 s of the event loop's time.
    b = np.frombuffer(structure.translate(None, _NOT_BRACKET), dtype=np.uint8)
    if b.size > MAX_JSON_DEPTH and int(np.cumsum(np.where((b == ord("[")) | (b == ord("{")), 1, -1)).max()) > MAX_JSON_DEPTH:
        raise BadBody(f"the body nests objects/arrays deeper than {MAX_JSON_DEPTH} levels", "send a flatter JSON body")


class _Suspect(Exception):
    pass


def _suspect_constant(s: str):
    raise _Suspect(s)


def _where(path: list) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(body)"


def _has_lone_surrogate(s: str) -> bool:
    if s.isascii():
        return False
    try:
        s.encode("utf-8")      # json.loads already joined escaped pairs: what is left is a lone surrogate
    except UnicodeEncodeError:
        return True
    return False


def _walk(value: Any, path: list) -> None:
    if isinstance(value, str):
        if _has_lone_surrogate(value):
            raise BadBody(f"`{_where(path)}` contains a lone UTF-16 surrogate (e.g. \\ud800); strings must be "
                          f"valid Unicode text", "encode the text as UTF-8; escape only complete surrogate pairs",
                          _where(path))
    elif isinstance(value, _BadNumber):
        raise BadBody(f"`{_where(path)}`: the number {value.literal[:20]}{'...' if len(value.literal) > 20 else ''} "
                      f"{value.why}", "send numbers as ordinary JSON numbers", _where(path))
    elif isinstance(value, dict):
        for k, v in value.items():
            if _has_lone_surrogate(k):
                raise BadBody(f"a key in `{_where(path)}` contains a lone UTF-16 surrogate; strings must be "
                              f"valid Unicode text", None, _where(path))
            _walk(v, path + [k])
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _walk(v, path + [i])


def parse_json(raw: bytes) -> Any:
    """``raw`` as JSON within the limits above, or ``BadBody`` saying what is wrong and where.

    Fast path (nearly every request): one C-speed ``json.loads``. Only a body that may hold a long number, a
    huge exponent, NaN/Infinity or an escaped surrogate is parsed again with per-number hooks and walked, to
    name the field."""
    if not raw.strip():
        raise BadBody("the body is empty", "send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadBody(f"the body is not valid UTF-8 (byte {e.start})", "send JSON encoded as UTF-8") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:      # else it cannot nest deeper
        _check_depth(_STRING.sub(b'""', raw))
    try:
        # (a suspect inside a string, e.g. the text "1e999", only costs the slow path)
        if not (_SUSPECT_NUMBER.search(raw) or _SURROGATE_ESCAPE.search(raw)):
            try:
                return json.loads(text, parse_constant=_suspect_constant)
            except _Suspect:
                pass
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as e:
        raise BadBody(f"the body is not JSON: {e.msg} (line {e.lineno}, column {e.colno})", "send a JSON object") from None
    except RecursionError:        # cannot happen after _check_depth; kept so it could never be a 500
        raise BadBody(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    _walk(value, [])
    return value


# ------------------------------------------------------------------------------------------------
# the ASGI middleware


class RequestGuard:
    """ASGI middleware: key, then body size, deadline, type and JSON (see the module docstring).

    ``key_ok(raw_token_or_None) -> bool`` checks an API key; ``None`` serves without keys (``--no-auth``)."""

    def __init__(self, app, *, key_ok: Callable[[str | None], bool] | None, open_paths: Iterable[str] = ("/healthz",),
                 max_body_bytes: int = 1_000_000, body_timeout_s: float = 30.0):
        self.app = app
        self.key_ok = key_ok
        self.open_paths = set(open_paths)
        self.max_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        token = bearer((headers.get(b"authorization") or b"").decode("latin-1"))
        if self.key_ok is not None and scope["path"] not in self.open_paths and not self.key_ok(token):
            return await send_error(send, 401, "missing or invalid API key",
                                    "send `Authorization: Bearer <key>`; create a key with "
                                    "`distill keys create PROJECT --name NAME`", "authentication_error",
                                    headers=[(b"www-authenticate", b"Bearer")])
        if scope["method"] not in _BODY_METHODS:
            return await self.app(scope, receive, send)

        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_big(send)      # before reading a byte of it
        chunks, seen = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                return await send_error(send, 408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                        "send the whole body at once", "timeout", close=True)
            if msg["type"] == "http.disconnect":
                return                              # the client left: nobody to answer
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                return await self._too_big(send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        raw = b"".join(chunks)

        ctype = headers.get(b"content-type", b"application/json").decode("latin-1").split(";")[0].strip().lower()
        if not (ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))):
            return await send_error(send, 415, f"Content-Type is {ctype!r}; the service reads JSON only",
                                    "send `Content-Type: application/json` (curl: -H 'Content-Type: application/json')",
                                    param="Content-Type")
        try:
            parse_json(raw)
        except BadBody as e:
            return await send_error(send, 400, e.message, e.hint, param=e.param)

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()                  # after the body: wait for a disconnect, as before

        await self.app(scope, replay, send)

    async def _too_big(self, send):
        await send_error(send, 413, f"request body is larger than {self.max_bytes} bytes",
                         "send fewer or shorter texts per request")


# ------------------------------------------------------------------------------------------------
# the HTTP connection


def _raw_408(seconds: float) -> bytes:
    body = json.dumps(error_body(408, f"the request headers did not arrive within {seconds:g} s",
                                 "send the whole request at once", "timeout")).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class _CorkedTransport:
    """A transport whose writes made in one event-loop step go out in one ``send()``. uvicorn writes a response's
    head and its body with two ``transport.write`` calls, so two syscalls per response: on the demo student at 16
    connections those writes were a fifth of the event loop's time (py-spy). The buffer is flushed at the end of the
    step (``call_soon``) and before a close; everything else is the real transport's."""

    __slots__ = ("_t", "_loop", "_buf")

    def __init__(self, transport, loop):
        self._t, self._loop, self._buf = transport, loop, []

    def write(self, data) -> None:
        if not self._buf:
            self._loop.call_soon(self._flush)
        self._buf.append(bytes(data))

    def writelines(self, lines) -> None:
        for x in lines:
            self.write(x)

    def _flush(self) -> None:
        if self._buf:
            data = b"".join(self._buf) if len(self._buf) > 1 else self._buf[0]
            self._buf.clear()
            if not self._t.is_closing():
                self._t.write(data)

    def close(self) -> None:
        self._flush()
        self._t.close()

    def write_eof(self) -> None:
        self._flush()
        self._t.write_eof()

    def abort(self) -> None:
        self._buf.clear()
        self._t.abort()

    def get_write_buffer_size(self) -> int:
        return self._t.get_write_buffer_size() + sum(len(b) for b in self._buf)

    def __getattr__(self, name):
        return getattr(self._t, name)


class _HeaderDeadline:
    """A header deadline for uvicorn's HTTP protocols: between the connection opening (or the previous response)
    and the next request's complete headers at most ``header_timeout_s`` may pass. While the app handles a request
    the deadline is off (``RequestGuard`` times the body). The same deadline closes a connection that keeps
    trickling body bytes after its response went out. ``_partial()``: whether part of a next request arrived."""

    header_timeout_s = 10.0
    cork = True                 # _CorkedTransport: one send() per response (measured +2-5% requests/s)
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(_CorkedTransport(transport, self.loop) if self.cork else transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return              # a request is in the app; its response re-arms the timer
        if self._partial():
            self.transport.write(_raw_408(self.header_timeout_s))   # part of a request came: say why
        self.transport.close()


class DeadlineH11Protocol(_HeaderDeadline, H11Protocol):
    """uvicorn's h11 protocol (pure Python; used where httptools is not installed) with the header deadline."""

    def _partial(self) -> bool:
        return bool(self.conn.trailing_data[0])


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:         # httptools not installed: h11 only
    HttpToolsProtocol = None


if HttpToolsProtocol is not None:
    class DeadlineHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
        """uvicorn's httptools protocol (llhttp, in C) with the header deadline: the default. Measured on the demo
        student at 64 connections, h11 -> httptools took ~10% more requests/s (its parser and response writer
        were a fifth of the event loop's time)."""

        _got_bytes = False          # bytes arrived since the connection opened or the last response

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._got_bytes = True
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._got_bytes = False
            super().on_headers_complete()

        def _partial(self) -> bool:
            return self._got_bytes
else:   # pragma: no cover
    DeadlineHttpToolsProtocol = None


def _default_protocol() -> type:
    return DeadlineHttpToolsProtocol or DeadlineH11Protocol


class EnvDeadlineProtocol(_default_protocol()):
    """The protocol of ``serve --workers N`` processes (uvicorn imports it by name in each worker, so it cannot be
    made per app): the header deadline from ``DISTILL_HEADER_TIMEOUT_S``, set by ``serve``."""

    header_timeout_s = float(os.environ.get("DISTILL_HEADER_TIMEOUT_S", "10"))


def deadline_protocol(header_timeout_s: float, http: str = "auto") -> type:
    """uvicorn's HTTP protocol with this header deadline, for ``uvicorn.Config(http=...)``: httptools when installed
    (``http="auto"``), else h11; ``http="h11"`` forces h11."""
    if header_timeout_s <= 0:
        raise ValueError("header_timeout_s must be > 0")
    base = DeadlineH11Protocol if http == "h11" else _default_protocol()
    return type(base.__name__, (base,), {"header_timeout_s": float(header_timeout_s)})
