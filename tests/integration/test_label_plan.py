"""The incremental plan (``labeling.Plan``): a re-run over an unchanged project renders no prompt, anything that
changes prompts or keys renders (and labels) again, and a label some other writer replaced is never trusted."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_openai_server import make_project, start_server  # noqa: E402

from distill import labeling  # noqa: E402
from distill.labeling import label, plan  # noqa: E402
from distill.project import Project  # noqa: E402


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")


@pytest.fixture
def server(tmp_path):
    h = start_server(tmp_path)
    yield h
    h.stop()


@pytest.fixture
def rendered(monkeypatch):
    """How many inputs' prompts the labeller rendered (the probe of the fingerprint included)."""
    count = []
    real = labeling.teacher_prompts

    def counting(project, rows, **kw):
        count.append(len(rows))
        return real(project, rows, **kw)

    monkeypatch.setattr(labeling, "teacher_prompts", counting)
    return count


def test_rerun_over_an_unchanged_project_renders_nothing(tmp_path, server, rendered):
    p = make_project(tmp_path / "p", 40, server.base_url)
    assert label(p, progress=False).ok == 40
    rendered.clear()
    r = label(p, progress=False)
    assert (r.calls, r.already_labelled, r.ok, r.total) == (0, 40, 0, 40)
    assert sum(rendered) == 1                    # the fingerprint's probe only
    pl = plan(p)
    assert (pl.total, pl.already_labelled, list(pl.pages())) == (40, 40, [])
    # a new input is the only work, and the only prompt rendered besides the probe
    with p.store.tx() as c:
        c.execute("INSERT INTO examples(id, text, norm, split, created_at) VALUES('zz', 'a late one', 'a late one', "
                  "'train', 9e9)")
    rendered.clear()
    r = label(p, progress=False)
    assert (r.calls, r.already_labelled, r.ok) == (1, 40, 1) and sum(rendered) == 2


def test_new_sampling_parameters_label_everything_again(tmp_path, server):
    p = make_project(tmp_path / "p", 12, server.base_url)
    label(p, progress=False)
    yaml = p.root / "distill.yaml"
    yaml.write_text(yaml.read_text().replace("    max_retries: 4\n", "    max_retries: 4\n    temperature: 0.7\n"))
    r = label(Project.open(p.root), progress=False)
    assert (r.calls, r.already_labelled, r.ok) == (12, 0, 12)


def test_labels_written_by_others_are_checked_by_rendering(tmp_path, server, rendered):
    p = make_project(tmp_path / "p", 10, server.base_url)
    label(p, progress=False)
    # before label_plans existed (or after another writer): no fingerprint row -> rendered, found current, kept
    with p.store.tx() as c:
        c.execute("DELETE FROM label_plans WHERE example_id IN ('ex00001', 'ex00002')")
    rendered.clear()
    r = label(p, progress=False)
    assert (r.calls, r.already_labelled) == (0, 10) and sum(rendered) == 1 + 2
    rendered.clear()
    assert label(p, progress=False).already_labelled == 10 and sum(rendered) == 1
    # a label replaced by another writer (another key): its fingerprint row does not vouch for it any more
    with p.store.tx() as c:
        # another first character (a key that already starts with 'f' would otherwise stay the same: 1 run in 16)
        c.execute("""UPDATE labels SET call_key = CASE WHEN substr(call_key, 1, 1) = 'f' THEN 'e' ELSE 'f' END
                     || substr(call_key, 2) WHERE example_id = 'ex00003'""")
    r = label(p, progress=False)
    assert (r.already_labelled, r.ok, r.calls, r.cache_hits) == (9, 1, 0, 1)     # its real key is in the cache


def test_plan_pages_and_limit(tmp_path, server, monkeypatch):
    monkeypatch.setattr(labeling, "PLAN_PAGE", 7)
    p = make_project(tmp_path / "p", 30, server.base_url)
    label(p, limit=10, progress=False)
    pl = plan(p)
    pages = list(pl.pages())
    assert (pl.total, pl.already_labelled) == (30, 10) and [len(x) for x in pages] == [7, 7, 6]
    assert [i.id for x in pages for i in x] == sorted(f"ex{i:05d}" for i in range(10, 30))
    assert sum(len(x) for x in plan(p, limit=9).pages()) == 9
    assert [i.id for x in plan(p, ids=["ex00003", "ex00012", "nope"]).pages() for i in x] == ["ex00012"]
    only_train, only_test = plan(p, splits=["train"]), plan(p, splits=["test", "validation"])     # the split filter
    assert (only_train.total, only_train.already_labelled, sum(len(x) for x in only_train.pages())) == (30, 10, 20)
    assert (only_test.total, list(only_test.pages())) == (0, [])
    r = label(p, limit=15, progress=False)
    assert (r.ok, r.already_labelled) == (15, 10)


def test_cache_keys_are_cache_key_for_every_attempt():
    from distill.task import cache_key, cache_keys

    identity = {"name": "api", "model": "m", "temperature": 0.0, "n": 1, "members": [], "ñ": {"b": 1, "a": [1.5, None]}}
    for messages in ([], [{"role": "user", "content": "héllo \\u2028 \"quoted\" \n"}],
                     [{"role": "system", "content": "x"}, {"content": "y", "role": "user", "z": {"k": True}}]):
        assert cache_keys(identity, messages, 3) == [cache_key(identity, messages, a) for a in range(3)]
