"""The task spec: validation errors name the field, prompts render deterministically, answers parse."""


import pytest

from distill.errors import DistillError
from distill.project import Project
from distill.task import (
    ParseError,
    ProjectSpec,
    cache_key,
    load_spec,
    parse_answer,
    render_messages,

    split_rationale,
)


def classify_spec(**kw) -> ProjectSpec:
    base = {"name": "t", "kind": "classify", "labels": ["card_arrival", "lost_card", {"name": "refund", "description": "money back"}]}
    base.update(kw)
    return ProjectSpec.model_validate(base)


EXTRACT = {
    "name": "x",
    "kind": "extract",
    "schema": {"type": "object", "properties": {"intent": {"type": "string"}}, "required": ["intent"]},
}


@pytest.mark.parametrize("kind", ["classify", "extract", "generate"])
def test_scaffold_is_a_valid_spec(tmp_path, kind):
    p = Project.init(tmp_path / "proj", kind)
    assert p.spec.kind == kind
    assert (tmp_path / "proj" / "distill.yaml").read_text().startswith("# distill project spec")


def test_unknown_key_names_the_field(tmp_path):
    f = tmp_path / "distill.yaml"
    f.write_text("name: a\nkind: classify\nlabels: [x, y]\nquality:\n  overal: 0.9\n")
    with pytest.raises(DistillError) as e:
        load_spec(f)
    assert "quality.overal" in str(e.value) and "unknown setting" in str(e.value)


def test_out_of_range_threshold_names_the_field(tmp_path):
    f = tmp_path / "distill.yaml"
    f.write_text("name: a\nkind: classify\nlabels: [x, y]\nquality:\n  overall: 1.5\n")
    with pytest.raises(DistillError) as e:
        load_spec(f)
    assert "quality.overall" in str(e.value)


def test_invalid_yaml_names_the_line(tmp_path):
    f = tmp_path / "distill.yaml"
    f.write_text("name: a\nkind: classify\nlabels: [x, y\n")
    with pytest.raises(DistillError) as e:
        load_spec(f)
    assert "line" in str(e.value) and "invalid YAML" in str(e.value)


def test_classify_needs_labels_and_unique_teachers():
    with pytest.raises(ValueError, match="at least two labels"):
        ProjectSpec.model_validate({"name": "a", "kind": "classify", "labels": ["only"]})
    with pytest.raises(ValueError, match="unique"):
        classify_spec(teachers=[{"name": "t", "kind": "replay", "path": "a"}, {"name": "t", "kind": "replay", "path": "b"}])


def test_extract_rejects_invalid_schema():
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        ProjectSpec.model_validate({**EXTRACT, "schema": {"type": "no-such-type"}})


def test_template_syntax_error_is_caught_at_load():
    with pytest.raises(ValueError, match="prompt template error"):
        classify_spec(prompt={"user": "{{ text "})


def test_unknown_template_variable_is_a_clear_error():
    spec = classify_spec(prompt={"user": "{{ txt }}"})
    with pytest.raises(DistillError, match="unknown variable"):
        render_messages(spec, "hi")


def test_render_lists_labels_and_is_deterministic():
    spec = classify_spec()
    m1 = render_messages(spec, "where is my card?", segment="app")
    m2 = render_messages(spec, "where is my card?", segment="app")
    assert m1 == m2
    assert "- refund: money back" in m1[0]["content"]
    assert m1[-1] == {"role": "user", "content": "where is my card?"}


def test_cache_key_changes_with_teacher_prompt_and_attempt():
    spec = classify_spec()
    msgs = render_messages(spec, "a")
    ident = {"model": "m", "temperature": 0}
    k = cache_key(ident, msgs)
    assert k == cache_key(dict(ident), [dict(m) for m in msgs])
    assert k != cache_key({"model": "m2", "temperature": 0}, msgs)
    assert k != cache_key(ident, render_messages(spec, "b"))
    assert k != cache_key(ident, msgs, attempt=1)


def test_teacher_identity_excludes_secrets_and_limits():
    spec = classify_spec(teachers=[{"name": "api", "kind": "openai", "base_url": "http://x/v1", "model": "m",
                                    "api_key_env": "KEY", "rpm": 10}])
    ident = spec.get_teacher("api").identity()
    assert "api_key_env" not in ident and "rpm" not in ident and ident["model"] == "m"


@pytest.mark.parametrize("raw,want", [
    ("card_arrival", "card_arrival"),
    ("  Card arrival.\n", "card_arrival"),
    ('"lost_card"', "lost_card"),
    ('{"label": "refund"}', "refund"),
    ("REFUND", "refund"),
])
def test_parse_classify(raw, want):
    assert parse_answer(classify_spec(), raw) == want


@pytest.mark.parametrize("raw,reason", [("", "empty"), ("   ", "empty"), (None, "empty"), ("pizza", "label_not_in_set")])
def test_parse_classify_failures_have_reasons(raw, reason):
    with pytest.raises(ParseError) as e:
        parse_answer(classify_spec(), raw)
    assert e.value.reason == reason


def test_parse_extract():
    spec = ProjectSpec.model_validate(EXTRACT)
    assert parse_answer(spec, '```json\n{"intent": "x"}\n```') == {"intent": "x"}
    assert parse_answer(spec, 'Sure: {"intent": "y"} hope this helps') == {"intent": "y"}
    with pytest.raises(ParseError) as e:
        parse_answer(spec, '{"intent": ')
    assert e.value.reason == "bad_json"
    with pytest.raises(ParseError) as e:
        parse_answer(spec, '{"other": 1}')
    assert e.value.reason == "schema_violation" and "intent" in e.value.detail


def test_split_rationale():
    assert split_rationale("Rationale: it mentions a card.\nAnswer: lost_card") == ("it mentions a card.", "lost_card")
    assert split_rationale("lost_card") == (None, "lost_card")


def test_deterministic_teachers_are_not_reasked_and_local_dtype_is_part_of_identity():
    from distill.task import TeacherSpec

    api = TeacherSpec(name="a", kind="openai", model="m", base_url="http://x", max_parse_retries=3)
    local = TeacherSpec(name="l", kind="local", path="p", max_parse_retries=3)
    replay = TeacherSpec(name="r", kind="replay", path="x.jsonl")
    assert (api.parse_retries, local.parse_retries, replay.parse_retries) == (3, 0, 0)
    bf16 = TeacherSpec(name="l", kind="local", path="p", dtype="bfloat16")
    assert local.identity() != bf16.identity() and bf16.identity()["dtype"] == "bfloat16"
    assert "dtype" not in api.identity()


# ------------------------------------------------------------------------------------------------ student:


CLASSIFY_YAML = "name: a\nkind: classify\nlabels: [x, y]\n"
GENERATE_YAML = "name: a\nkind: generate\n"


@pytest.mark.parametrize("head,kind", [(CLASSIFY_YAML, "classify"), (GENERATE_YAML, "generate")])
def test_unknown_student_key_fails_at_load_with_its_path(tmp_path, head, kind):
    f = tmp_path / "distill.yaml"
    f.write_text(head + "student:\n  epochs: 2\n  learnig_rate: 0.001\n")
    with pytest.raises(DistillError) as e:
        load_spec(f)
    msg, n = str(e.value), head.count("\n")          # the student: block starts on line n + 1
    assert f"field `student.learnig_rate` (line {n + 3})" in msg and "unknown setting" in msg
    assert f"valid for kind {kind}:" in msg and "learning_rate" in msg
    # a value out of range or of the wrong type is refused at load too, in the config's own words
    f.write_text(head + "student:\n  learning_rate: -1\n  epochs: four\n")
    with pytest.raises(DistillError) as e:
        load_spec(f)
    assert f"field `student.learning_rate` (line {n + 2}): must be > 0 (got -1)" in str(e.value)
    assert f"field `student.epochs` (line {n + 3}): expected int, got 'four'" in str(e.value)
    # a setting of the other kind's student is unknown here
    other = "lora_rank: 8" if kind == "classify" else "signal: soft"
    f.write_text(head + f"student:\n  {other}\n")
    with pytest.raises(DistillError, match=f"student.{other.split(':')[0]}"):
        load_spec(f)


@pytest.mark.parametrize("head", [CLASSIFY_YAML, GENERATE_YAML])
def test_student_older_names_are_accepted_but_not_both(tmp_path, head):
    f = tmp_path / "distill.yaml"
    f.write_text(head + "student: {base: my-model, lr: 0.003}\n")
    spec = load_spec(f)
    cfg = spec.student_config()
    assert (cfg.base_model, cfg.learning_rate) == ("my-model", 0.003)
    assert spec.student == {"base": "my-model", "lr": 0.003}          # kept as written
    assert spec.student_config({"epochs": 3, "base": "other"}).base_model == "other"
    f.write_text(head + "student: {base: a, base_model: b}\n")
    with pytest.raises(DistillError, match="both `base` and `base_model`"):
        load_spec(f)
    with pytest.raises(DistillError, match="both `lr` and `learning_rate`"):
        spec.student_config({"lr": 1.0, "learning_rate": 2.0})


def test_both_student_configs_use_the_same_names():
    from distill.student_config import EncoderStudentConfig, LMStudentConfig, student_config_for

    shared = {"base_model", "learning_rate", "epochs", "batch_size", "max_length", "weight_decay", "temperature",
              "seed", "device", "keep_checkpoints"}
    assert shared <= set(EncoderStudentConfig.model_fields) and shared <= set(LMStudentConfig.model_fields)
    for name in shared:   # the same thing has the same type in both
        assert EncoderStudentConfig.model_fields[name].annotation == LMStudentConfig.model_fields[name].annotation
    assert type(student_config_for("classify", {})) is EncoderStudentConfig
    assert type(student_config_for("extract", {})) is LMStudentConfig
    # every field has a default and a help line
    for cls in (EncoderStudentConfig, LMStudentConfig):
        for name, f in cls.model_fields.items():
            assert not f.is_required() and f.description, name
    # the run id covers what changes the weights, not where or how verbosely it runs
    enc, lm = EncoderStudentConfig(), LMStudentConfig()
    assert "learning_rate" in enc.identity() and not {"device", "keep_checkpoints"} & set(enc.identity())
    assert "lora_rank" in lm.identity() and not {"device", "save_every", "cpu_threads"} & set(lm.identity())
    # gradient checkpointing trades memory for time (same weights up to rounding); the base's dtype and its
    # 4-bit quantisation change the weights: in the identity when set, left out at their defaults so runs
    # trained before these settings existed keep their ids
    assert "gradient_checkpointing" not in lm.identity() and not {"base_dtype", "quantize_base"} & set(lm.identity())
    lm16 = LMStudentConfig(base_dtype="bfloat16", quantize_base="4bit")
    assert lm16.identity()["base_dtype"] == "bfloat16" and lm16.identity()["quantize_base"] == "4bit"
    assert {k: v for k, v in lm16.identity().items() if k not in ("base_dtype", "quantize_base")} == lm.identity()


def test_train_help_lists_the_student_settings_of_both_kinds():
    from typer.testing import CliRunner

    from distill.cli import app

    r = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output
    for name in ("learning_rate", "signal", "early_stopping_patience", "lora_rank", "loss", "max_steps",
                 "keep_checkpoints", "gradient_checkpointing", "base_dtype", "quantize_base"):
        assert f" {name}: " in r.output, name
    assert "all-minilm-l6-v2" in r.output and "smollm2-135m-instruct" in r.output


def test_exponent_floats_read_as_numbers(tmp_path):
    """`learning_rate: 2e-5` is what people write; YAML 1.1 (PyYAML's default) reads it as a string, which the
    strict student config would refuse. distill.yaml is read with YAML 1.2's float rule."""
    from distill.task import load_spec, scaffold

    f = tmp_path / "distill.yaml"
    f.write_text(scaffold("t", "classify") + "\nstudent: {learning_rate: 2e-5, epochs: 3}\n", encoding="utf-8")
    cfg = load_spec(f).student_config()
    assert cfg.learning_rate == pytest.approx(2e-5) and cfg.epochs == 3
    f.write_text(scaffold("t", "classify") + "\nstudent: {learning_rate: '2e-5'}\n", encoding="utf-8")
    with pytest.raises(DistillError, match="learning_rate"):      # quoted text is still text
        load_spec(f)
