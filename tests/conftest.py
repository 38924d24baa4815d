"""Shared test setup. Tests never use the network beyond loopback: hub access is switched off here so an
accidental `from_pretrained("some/hub-id")` fails fast instead of hanging."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- the store on PostgreSQL (distill.store_pg) -------------------------------------------------------------------
# `backend` runs a test on both stores; `pg_url` gives a test a schema of its own on a throwaway server
# (tests/pg_server.py: started once per session) or on $DISTILL_TEST_PG_URL. In CI (CI=1/true) a server that cannot
# start fails the tests that need it; elsewhere they are skipped with the reason.
# DISTILL_TEST_BACKEND=postgres runs every test (its function-scoped part) on PostgreSQL, e.g. to try a module:
#   DISTILL_TEST_BACKEND=postgres .venv/bin/python -m pytest -q tests/unit/test_review.py

import uuid  # noqa: E402
from urllib.parse import quote  # noqa: E402

import pytest  # noqa: E402


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def pg_server_url():
    try:
        import psycopg  # noqa: F401
    except ImportError:
        msg = "the PostgreSQL store tests need the psycopg driver: pip install -e '.[dev]' (or '.[postgres]')"
        if _in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    url = os.environ.get("DISTILL_TEST_PG_URL")
    if url:
        yield url
        return
    from pg_server import start_server

    try:
        srv = start_server()
    except RuntimeError as e:
        msg = f"the PostgreSQL store tests need a server and none could be started: {e}"
        if _in_ci():
            pytest.fail(msg + "\n(.ci/run installs the Debian package postgresql; or set DISTILL_TEST_PG_URL)",
                        pytrace=False)
        pytest.skip(msg[:300] + " (apt-get install postgresql, or set DISTILL_TEST_PG_URL)")
    yield srv.url
    srv.stop()


def pg_schema_url(server_url: str, schema: str) -> str:
    """``server_url`` with ``schema`` as its search_path (how a user names a project's schema explicitly)."""
    return server_url + ("&" if "?" in server_url else "?") + "options=" + quote(f"-csearch_path={schema}")


@pytest.fixture
def pg_url(pg_server_url):
    """A PostgreSQL URL whose schema is this test's own (dropped afterwards)."""
    import psycopg

    schema = "t_" + uuid.uuid4().hex[:12]
    yield pg_schema_url(pg_server_url, schema)
    with psycopg.connect(pg_server_url, autocommit=True) as c:
        c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, monkeypatch):
    """Run the test once per store: 'postgres' sets DISTILL_DB_URL (a schema of the test's own), so every Store the
    test opens, and every subprocess it starts, uses PostgreSQL."""
    if request.param == "postgres":
        monkeypatch.setenv("DISTILL_DB_URL", request.getfixturevalue("pg_url"))
    else:
        monkeypatch.delenv("DISTILL_DB_URL", raising=False)
    return request.param


@pytest.fixture(autouse=True)
def _store_backend_from_env(request, monkeypatch):
    if os.environ.get("DISTILL_TEST_BACKEND") == "postgres" and "backend" not in request.fixturenames:
        monkeypatch.setenv("DISTILL_DB_URL", request.getfixturevalue("pg_url"))
