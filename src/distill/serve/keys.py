"""API keys for the service: created once, shown once, stored only as a salted hash.

A key looks like ``dk_<id>_<secret>``: ``id`` (8 hex chars) finds the row without scanning, ``secret``
(32 random bytes, URL-safe base64) is what proves possession. The store keeps ``salt`` (16 random bytes)
and ``sha256(salt || secret)``; the raw key is returned by ``create_key`` and never written anywhere.
Why a plain salted sha256 and not a slow password hash (bcrypt/scrypt): the secret is 256 random bits, so
brute force is out of reach without key stretching, and every request verifies a key, so verification
must take microseconds. Comparison is ``hmac.compare_digest`` (constant time); an unknown id still costs
one hash, so response time does not reveal which ids exist.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from distill.errors import DistillError
from distill.store import Store

PREFIX = "dk"
_KEY_RE = re.compile(r"^dk_([0-9a-f]{8})_([A-Za-z0-9_\-]{20,100})$")
_DUMMY_SALT = secrets.token_bytes(16)


@dataclass
class KeyInfo:
    id: str
    name: str
    created_at: float
    revoked_at: float | None


def _digest(salt: bytes, secret: str) -> str:
    return hashlib.sha256(salt + secret.encode()).hexdigest()


def create_key(store: Store, name: str) -> tuple[str, str]:
    """A new key for ``name`` (who or what uses it). Returns (key_id, raw_key); show raw_key to the user
    once — it cannot be recovered later, only revoked and replaced."""
    name = name.strip()
    if not name:
        raise DistillError("an API key needs a name (who uses it)", hint="e.g. `distill keys create PROJECT --name web`")
    key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    with store.tx() as c:
        c.execute("INSERT INTO api_keys(id, name, salt, hash, created_at) VALUES(?,?,?,?,?)",
                  (key_id, name, salt.hex(), _digest(salt, secret), time.time()))
    return key_id, f"{PREFIX}_{key_id}_{secret}"


def revoke_key(store: Store, key_id_or_name: str) -> list[str]:
    """Revoke by key id or by name (all live keys with that name). Returns the revoked ids."""
    rows = store.q("SELECT id FROM api_keys WHERE (id=? OR name=?) AND revoked_at IS NULL",
                   (key_id_or_name, key_id_or_name))
    if not rows:
        raise DistillError(f"no live API key with id or name '{key_id_or_name}'",
                           hint="list them with `distill keys list PROJECT`")
    ids = [r["id"] for r in rows]
    with store.tx() as c:
        c.executemany("UPDATE api_keys SET revoked_at=? WHERE id=?", [(time.time(), i) for i in ids])
    return ids


def list_keys(store: Store) -> list[KeyInfo]:
    return [KeyInfo(r["id"], r["name"], r["created_at"], r["revoked_at"])
            for r in store.q("SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY created_at")]


def verify_key(store: Store, raw: str | None) -> str | None:
    """The key id when ``raw`` is a live key, else None.

    Read-only (one SELECT by primary key): the service calls it on its event loop for every request, and in
    WAL mode a reader never waits for another process's write lock. Deliberately no cache of verified keys,
    so a revoked key stops working at the next request."""
    m = _KEY_RE.match(raw or "")
    key_id, secret = (m.group(1), m.group(2)) if m else ("", raw or "")
    row = store.q("SELECT salt, hash, revoked_at FROM api_keys WHERE id=?", (key_id,)) if m else []
    if not row:
        # same work as a real check, so timing does not tell an unknown id from a wrong secret
        hmac.compare_digest(_digest(_DUMMY_SALT, secret), "0" * 64)
        return None
    r = row[0]
    ok = hmac.compare_digest(_digest(bytes.fromhex(r["salt"]), secret), r["hash"])
    return key_id if ok and r["revoked_at"] is None else None


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
