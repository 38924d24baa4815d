"""API keys: shown once, stored as salted hashes, verified in constant time, revocable. Each store test runs on SQLite
and on PostgreSQL (``backend``), where serve replicas on several machines share the keys."""

import pytest

from distill.errors import DistillError
from distill.serve.keys import bearer, create_key, list_keys, revoke_key, verify_key
from distill.store import Store


@pytest.fixture
def store(tmp_path, backend):
    s = Store(tmp_path / "distill.db")
    yield s
    s.close()


def test_create_verify_and_raw_key_never_stored(store, tmp_path):
    key_id, raw = create_key(store, "web")
    assert raw.startswith(f"dk_{key_id}_")
    assert verify_key(store, raw) == key_id
    secret = raw.split("_", 2)[2]
    # neither the key nor its secret part is anywhere in the database file or the WAL (PostgreSQL: in any column)
    if store.shared:
        stored = " ".join(str(v) for r in store.q("SELECT * FROM api_keys") for v in r)
        assert raw not in stored and secret not in stored
    else:
        store.conn.execute("PRAGMA wal_checkpoint(FULL)")
        for f in tmp_path.rglob("*"):        # the store, its WAL, the crash markers in .distill-open/
            if not f.is_file():
                continue
            blob = f.read_bytes()
            assert raw.encode() not in blob and secret.encode() not in blob
    row = store.q("SELECT * FROM api_keys WHERE id=?", (key_id,))[0]
    assert len(row["hash"]) == 64 and row["hash"] != secret


def test_same_secret_different_salt_gives_different_hashes(store):
    create_key(store, "a")
    create_key(store, "b")
    salts = [r["salt"] for r in store.q("SELECT salt FROM api_keys")]
    assert len(set(salts)) == 2


def test_wrong_malformed_and_missing_keys_are_rejected(store):
    key_id, raw = create_key(store, "web")
    assert verify_key(store, raw[:-1] + ("A" if raw[-1] != "A" else "B")) is None
    assert verify_key(store, f"dk_{key_id}_") is None
    assert verify_key(store, "dk_00000000_" + "x" * 43) is None      # unknown id
    assert verify_key(store, "not a key") is None
    assert verify_key(store, None) is None
    assert verify_key(store, "") is None


def test_revoke_by_id_and_by_name(store):
    id1, raw1 = create_key(store, "web")
    id2, raw2 = create_key(store, "batch")
    id3, raw3 = create_key(store, "batch")
    assert revoke_key(store, id1) == [id1]
    assert verify_key(store, raw1) is None and verify_key(store, raw2) == id2
    assert sorted(revoke_key(store, "batch")) == sorted([id2, id3])
    assert verify_key(store, raw3) is None
    assert all(k.revoked_at is not None for k in list_keys(store))
    with pytest.raises(DistillError, match="no live API key"):
        revoke_key(store, "batch")


def test_empty_name_is_refused(store):
    with pytest.raises(DistillError, match="needs a name"):
        create_key(store, "  ")


def test_bearer_header_parsing():
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer   abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer("Bearer ") is None
    assert bearer(None) is None
