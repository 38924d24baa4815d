"""Claims in ``teacher_claims`` (distill.teachers.ledger.claim): one payer per teacher call across serve workers,
serve replicas and labellers, on SQLite and on PostgreSQL (``backend``)."""

import json
import subprocess
import sys
import time

from distill.store import Store
from distill.teachers.ledger import claim, claim_owner, release, renew


def test_claim_taken_once_handed_back_taken_over_when_stale(tmp_path, backend):
    s = Store(tmp_path / "distill.db")
    try:
        assert claim(s, "k1", "a", 30) and claim(s, "k1", "a", 30)       # the holder may take it again
        assert not claim(s, "k1", "b", 30)                             # another owner may not, while it is young
        assert claim(s, "k1", "b", 0.0)                                # ... but takes over a stale one
        release(s, "k1", "a")                                          # a's release leaves b's claim alone
        assert s.one("SELECT owner FROM teacher_claims WHERE key='k1'") == "b"
        with s.tx() as c:                                              # once the call is recorded, nobody pays
            c.execute("INSERT INTO teacher_calls(key, teacher, model, request, status, created_at) "
                      "VALUES('k2', 't', 'm', '{}', 'ok', 0)")
        assert not claim(s, "k2", "a", 30)
        assert claim(s, "k3", "b", 30)
        with s.tx() as c:
            c.execute("UPDATE teacher_claims SET at=0 WHERE owner='b'")
        renew(s, "b")                                                  # the holder keeps its claims young
        assert min(r["at"] for r in s.q("SELECT at FROM teacher_claims")) > time.time() - 5
        release(s, None, "b")                                          # all of b's claims at once
        assert s.one("SELECT COUNT(*) FROM teacher_claims") == 0
    finally:
        s.close()


def test_a_dead_process_of_this_machine_loses_its_claims_at_once(tmp_path, backend):
    """A labeller killed mid-call and started again on the same machine need not wait for the ttl; a claim of another
    machine's process (whose liveness cannot be seen from here) waits for it."""
    s = Store(tmp_path / "distill.db")
    try:
        dead = subprocess.run([sys.executable, "-c", "from distill.teachers.ledger import claim_owner; "
                               "print(claim_owner('label'))"], capture_output=True, text=True, check=True).stdout.strip()
        elsewhere = "label:another-host:4026531836:1:abcd"
        assert claim(s, "k1", dead, 30) and claim(s, "k2", elsewhere, 30)
        me = claim_owner("label")
        assert claim(s, "k1", me, 30) and not claim(s, "k2", me, 30)
        assert claim(s, "k3", me, 30) and not claim(s, "k3", claim_owner("serve"), 30)   # a live one's claim holds
    finally:
        s.close()


_RACE = """
import json, sys
from distill.store import Store
from distill.teachers.ledger import claim
s = Store(sys.argv[1])
print(json.dumps([k for k in (f"key{i}" for i in range(int(sys.argv[2]))) if claim(s, k, sys.argv[3], 60)]))
s.close()
"""


def test_processes_racing_for_the_same_keys_win_each_once(tmp_path, backend):
    """4 processes claim the same 60 keys in the same order at once: every key has exactly one winner."""
    Store(tmp_path / "distill.db").close()
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path / "distill.db"), "60", f"p{i}"],
                              stdout=subprocess.PIPE, text=True) for i in range(4)]
    won = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    flat = [k for w in won for k in w]
    assert sorted(flat) == sorted(f"key{i}" for i in range(60))
