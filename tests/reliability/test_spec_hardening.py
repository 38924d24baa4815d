"""A hostile or careless distill.yaml: prompts that try to run code or blow up, YAML bombs, label sets that
silently mislabel. Each case fails loudly with a DistillError naming the field or line, quickly, and runs
nothing.

1. Prompt templates render in a sandbox (task.py): `{{ cycler.__init__.__globals__.os.popen(...) }}` once ran
   a shell command on `distill label` (and `serve` renders prompts for routed requests).
2. A 661-byte distill.yaml of nested aliases under `schema:` once took 42 s and 2.5 GB before a MemoryError.
3. `[Spam, spam]`, `[a, "a "]`, `["", b]` were accepted; "Spam" answers were stored as `spam`, and `a`/``""``
   could never be produced.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fake_openai_server import make_project

from distill.errors import DistillError
from distill.task import ProjectSpec, load_spec, parse_answer, render_messages

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}
PWNED = "pwned.txt"


def spec_yaml(user: str) -> str:
    # single-quoted YAML scalar: a quote inside doubles
    return "name: t\nkind: classify\nlabels: [a, b]\nprompt:\n  user: '" + user.replace("'", "''") + "'\n"


def write_spec(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "distill.yaml"
    f.write_text(text, encoding="utf-8")
    return f


# -- 1. templates -----------------------------------------------------------------------------------

# refused when the spec loads: nothing is rendered, so nothing can run
REFUSED_AT_LOAD = {
    "cycler_globals": "{{ cycler.__init__.__globals__.os.popen('id > " + PWNED + "').read() }}",
    "joiner_globals": "{{ joiner.__init__.__globals__['os'].system('id > " + PWNED + "') }}",
    "namespace_globals": "{{ namespace.__init__.__globals__.os.popen('id > " + PWNED + "').read() }}",
    "lipsum_globals": "{{ lipsum.__globals__['os'].popen('id > " + PWNED + "').read() }}",
    "mro": "{{ text.__class__.__mro__ }}",
    "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "label_object": "{{ labels[0].__class__.__init__.__globals__ }}",
    "item_dunder": "{{ text['__class__'] }}",
    "attr_filter": "{{ text|attr('__class__') }}",
    "map_attribute": "{{ labels|map(attribute='__class__')|list }}",
    "os_call": "{{ os.popen('id > " + PWNED + "').read() }}",
    "self_ref": "{{ self.__init__.__globals__ }}",
    "str_format_method": "{{ '{0.__class__.__init__.__globals__}'.format(text) }}",
    "percent_format": "{{ '%999999999s' % text }}",
    "format_filter": "{{ '%0999999999d'|format(1) }}",
    "center_filter": "{{ text|center(1000000000) }}",
    "huge_range": "{% for i in range(100000000) %}x{% endfor %}",
    "power": "{{ 9 ** 9 ** 9 }}",
    "set_doubling": "{% set a = text ~ text %}{% set b = a ~ a %}{{ b }}",
    "macro_recursion": "{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "include": "{% include '/etc/passwd' %}",
}

# pass the load-time check but are stopped while rendering (they depend on the input)
REFUSED_AT_RENDER = {
    "nested_loops": "{% for a in text %}{% for b in text %}{% for c in text %}x{% endfor %}{% endfor %}{% endfor %}",
    "repeat_string": "{{ text * 100000000 }}",
    "repeat_list": "{{ (text|list) * 100000000 }}",
    "concat_doubling": "".join("{% for v" + str(i + 1) + " in [v" + str(i) + " ~ v" + str(i) + "] %}" for i in range(12))
                       .replace("v0", "text") + "{{ v12|length }}" + "{% endfor %}" * 12,
    "join_amplify": "{{ (text|list)|join(text) }}",
    "add_doubling": "".join("{% for v" + str(i + 1) + " in [v" + str(i) + " + v" + str(i) + "] %}" for i in range(12))
                    .replace("v0", "text") + "{{ v12|length }}" + "{% endfor %}" * 12,
    "unknown_global": "{{ cycler }}",
}


@pytest.mark.parametrize("name", sorted(REFUSED_AT_LOAD))
def test_hostile_template_is_refused_at_load(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    f = write_spec(tmp_path, spec_yaml(REFUSED_AT_LOAD[name]))
    t0 = time.monotonic()
    with pytest.raises(DistillError) as e:
        load_spec(f)
    assert time.monotonic() - t0 < 2.0
    msg = str(e.value)
    assert "prompt.user" in msg and "(line 5)" in msg, msg
    assert not (tmp_path / PWNED).exists()


@pytest.mark.parametrize("name", sorted(REFUSED_AT_RENDER))
def test_hostile_template_is_stopped_at_render(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write_spec(tmp_path, spec_yaml(REFUSED_AT_RENDER[name])))
    t0 = time.monotonic()
    with pytest.raises(DistillError) as e:
        render_messages(spec, "x" * 20_000)
    assert time.monotonic() - t0 < 2.0, "the guard must stop it quickly"
    assert "prompt.user" in str(e.value), str(e.value)
    assert not (tmp_path / PWNED).exists()


def test_ordinary_templates_still_render():
    spec = ProjectSpec.model_validate({
        "name": "t", "kind": "classify", "labels": ["a", {"name": "b", "description": "the b one"}],
        "prompt": {"system": "{{ description|default('Classify.', true) }} Labels: {{ labels|map(attribute='name')|join(', ') }}"
                             "{% for l in labels %}\n{{ loop.index }}. {{ l.name|upper }}{% if l.description %}: "
                             "{{ l.description }}{% endif %}{% endfor %}",
                   "user": "[{{ segment or 'none' }}] {{ meta.channel|default('-') }} {{ text|trim ~ '!' }} "
                           "{{ '=' * 3 }} {{ (text|trim)[:3] }} {{ (labels|length) + 1 }}"}})
    msgs = render_messages(spec, "  hello world ", segment="web", meta={"channel": "email"})
    assert msgs[0]["content"] == "Classify. Labels: a, b\n1. A\n2. B: the b one"
    assert msgs[1]["content"] == "[web] email hello world! === hel 3"


def test_label_run_with_hostile_template_runs_nothing(tmp_path):
    """The reported path: `distill label` on a project with inputs whose prompt tries to run a shell command
    (labelling renders every input's prompt before it calls the teacher)."""
    teacher = textwrap.dedent("""\
        teachers:
          - name: api
            kind: openai
            base_url: http://127.0.0.1:9/v1
            api_key_env: FAKE_KEY
            max_retries: 0
            terms: {outputs_may_train_models: true}
        """)
    project = make_project(tmp_path / "p", 2, "http://127.0.0.1:9/v1", labels=("a", "b"))
    project.close()
    (tmp_path / "p" / "distill.yaml").write_text(spec_yaml(REFUSED_AT_LOAD["cycler_globals"]) + teacher)
    r = subprocess.run([sys.executable, "-m", "distill.cli", "label", str(tmp_path / "p"), "--no-progress"],
                       cwd=tmp_path, env={**ENV, "FAKE_KEY": "k"}, capture_output=True, text=True, timeout=120)
    assert not (tmp_path / PWNED).exists(), "the template ran a shell command"
    assert r.returncode == 2, r.stderr[-2000:]
    assert "prompt.user" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


# -- 2. YAML bombs ------------------------------------------------------------------------------------

# anyOf nested 8 deep, 9 aliases per level: the JSON-schema check walks 9**7 subschemas (more than a minute
# and gigabytes before the fix), from a file of under 600 bytes
BOMB = """name: bomb
kind: extract
schema:
  type: object
  $defs:
    a: &a {anyOf: [{type: string}, {type: string}, {type: string}, {type: string}, {type: string}, {type: string}]}
    b: &b {anyOf: [*a, *a, *a, *a, *a, *a, *a, *a, *a]}
    c: &c {anyOf: [*b, *b, *b, *b, *b, *b, *b, *b, *b]}
    d: &d {anyOf: [*c, *c, *c, *c, *c, *c, *c, *c, *c]}
    e: &e {anyOf: [*d, *d, *d, *d, *d, *d, *d, *d, *d]}
    f: &f {anyOf: [*e, *e, *e, *e, *e, *e, *e, *e, *e]}
    g: &g {anyOf: [*f, *f, *f, *f, *f, *f, *f, *f, *f]}
    h: &h {anyOf: [*g, *g, *g, *g, *g, *g, *g, *g, *g]}
  properties:
    x: *h
"""

# load_spec in a child with 1 GB of address space: an unfixed loader fails there with MemoryError (instead of
# taking the machine's memory), a fixed one answers at once with a DistillError
CHILD = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from distill.task import load_spec
t0 = time.monotonic()
try:
    load_spec(sys.argv[1])
    out = {"error": None}
except BaseException as e:
    out = {"error": type(e).__name__, "message": str(e)[:2000]}
out["seconds"] = time.monotonic() - t0
print(json.dumps(out))
"""


def load_in_child(path: Path) -> dict:
    # 30 s: a fixed loader answers in well under a second (the rest is Python start-up)
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=ENV, capture_output=True, text=True, timeout=30)
    assert r.stdout.strip(), r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_yaml_bomb_is_refused_fast_and_small(tmp_path):
    f = write_spec(tmp_path, BOMB)
    assert f.stat().st_size < 700
    out = load_in_child(f)
    assert out["error"] == "DistillError", out
    assert out["seconds"] < 2.0, out
    assert "line 7" in out["message"] and "alias" in out["message"], out


def test_small_alias_is_refused_with_its_line(tmp_path):
    f = write_spec(tmp_path, "name: t\nkind: classify\nlabels: &l [a, b]\ndescription: x\nsegment_field: *l\n")
    with pytest.raises(DistillError, match="line 5") as e:
        load_spec(f)
    assert "alias" in str(e.value) and str(f) in str(e.value)


def test_oversized_spec_is_refused(tmp_path):
    f = write_spec(tmp_path, "name: t\nkind: classify\nlabels: [a, b]\n" + "# padding\n" * 150_000)
    t0 = time.monotonic()
    with pytest.raises(DistillError, match="larger than") as e:
        load_spec(f)
    assert time.monotonic() - t0 < 2.0 and str(f) in str(e.value)


def test_deep_nesting_is_a_clear_error(tmp_path):
    f = write_spec(tmp_path, "name: t\nkind: extract\nschema: " + "[" * 50_000 + "\n")
    out = load_in_child(f)
    assert out["error"] == "DistillError" and out["seconds"] < 5.0, out


# -- 3. label names -----------------------------------------------------------------------------------

BAD_LABELS = [
    ("[Spam, spam]", 1, "same label as labels[0]"),
    ('[a, "a "]', 1, "whitespace"),
    ('["", b]', 0, "empty"),
    ('[ok, " ok"]', 1, "whitespace"),
    ("[card_arrival, Card Arrival]", 1, "same label as labels[0]"),   # the parser maps both answers to one
    ("[ｓｐａｍ, spam]", 1, "same label as labels[0]"),                    # fullwidth: equal after NFKC
    ('[x, y, "a\\nb"]', 2, "line break"),
    ('[x, "..."]', 1, "only characters the answer parser strips"),
]


@pytest.mark.parametrize("labels,index,why", BAD_LABELS)
def test_indistinguishable_or_unproducible_labels_are_refused(tmp_path, labels, index, why):
    f = write_spec(tmp_path, f"name: t\nkind: classify\ndescription: d\nlabels: {labels}\n")
    with pytest.raises(DistillError) as e:
        load_spec(f)
    msg = str(e.value)
    assert f"labels[{index}]" in msg and why in msg and "(line 4)" in msg, msg


def test_long_form_label_error_points_at_its_line(tmp_path):
    f = write_spec(tmp_path, "name: t\nkind: classify\nlabels:\n  - name: Spam\n  - name: ham\n  - name: SPAM\n")
    with pytest.raises(DistillError) as e:
        load_spec(f)
    assert "labels[2]" in str(e.value) and "(line 6)" in str(e.value), str(e.value)


def test_distinct_labels_are_kept_and_each_can_be_produced():
    spec = ProjectSpec.model_validate({"name": "t", "kind": "classify",
                                       "labels": ["Spam", "ham", "card_arrival", "card_lost", "état"]})
    for name in spec.label_names:
        assert parse_answer(spec, name.upper()) == name
    assert parse_answer(spec, "ＳＰＡＭ") == "Spam"      # fullwidth answer, NFKC-normalised like the labels
