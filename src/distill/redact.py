"""The one redaction: secrets out of everything distill prints, logs or stores.

Providers repeat the API key in error bodies, whole or masked with its tail kept (OpenAI's 401 says
``Incorrect API key provided: sk-proj-****...AbCd``), and the message of such a body travels into
exceptions, the CLI's stderr, the serve log and the store. So every message built from something a
teacher sent goes through ``redact`` before it is raised, printed, logged or stored.

- ``register(secret)``: remember a secret known to this process. ``distill.teachers.openai_compat``
  registers the API key the moment it reads it from the environment.
- ``redact(text, secrets=())``: ``text`` with each registered (and each given) secret replaced by
  ``[REDACTED]``, and also any run of its last 4+ characters (a masked key that keeps the tail) or of its
  first 8+ characters (one that keeps the head).

Values shorter than ``MIN_SECRET_CHARS`` are not treated as secrets: no real credential is that short, and
redacting a 1-character test key would garble every message. Imports nothing from distill, so any layer
may use it.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Iterable

MIN_SECRET_CHARS = 8
TAIL_CHARS = 4      # the shortest tail of a secret that is redacted where it appears on its own
HEAD_CHARS = 8      # the shortest head
MASK = "[REDACTED]"

_lock = threading.Lock()
_secrets: set[str] = set()


def register(secret: str | None) -> None:
    """Remember ``secret`` for this process; every later ``redact`` removes it. Short values are ignored."""
    if secret and len(secret) >= MIN_SECRET_CHARS:
        with _lock:
            _secrets.add(secret)


def registered() -> frozenset[str]:
    with _lock:
        return frozenset(_secrets)


@functools.lru_cache(maxsize=32)
def _pattern(secrets: frozenset[str]) -> re.Pattern[str] | None:
    parts = set()
    for s in secrets:
        parts.update(s[-k:] for k in range(TAIL_CHARS, len(s) + 1))
        parts.update(s[:k] for k in range(HEAD_CHARS, len(s) + 1))
    if not parts:
        return None
    # longest first, so the whole key is one [REDACTED] rather than a head, a mask and a tail
    return re.compile("|".join(re.escape(p) for p in sorted(parts, key=len, reverse=True)))


def redact(text: str | None, secrets: Iterable[str | None] = ()) -> str | None:
    """``text`` without the registered secrets and ``secrets`` (nor their 4+-character tails or
    8+-character heads). None stays None."""
    if not text:
        return text
    known = registered() | {s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}
    pattern = _pattern(known)
    return pattern.sub(MASK, text) if pattern is not None else text
