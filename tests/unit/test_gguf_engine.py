"""GGUFEngine / GGUFStudent on the packaged SmolLM2-135M-Instruct GGUF (Q4_1, 93 MB).

Assertions are about behaviour, never exact floats or exact model text, so they hold on any x86 CPU.
One engine serves the whole module. It runs 1 thread: on a busy 2-core machine the spinning OpenMP barriers
make 2 threads several times slower than 1 (see the gguf_engine module docstring).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time

import jsonschema
import numpy as np
import pytest

from distill.errors import DistillError

pytest.importorskip("llama_cpp")

from distill.students.gguf_engine import (
    ContextLengthError,
    GenRequest,
    GenResult,
    GGUFEngine,
    GGUFStudent,
    TokenEvent,
    enforceable,
    find_gguf,
    schema_grammar,
)

pytestmark = pytest.mark.slow

# Slots are named and their strings bounded, so the grammar's language is finite and every answer ends within
# max_tokens. With open slots ({"additionalProperties": {"type": "string"}}) the untuned model may repeat a key
# until max_tokens ("history": "Rome's", "history": ...), which is invalid JSON with finish_reason "length".
SLOT = {"type": "string", "maxLength": 16}
SCHEMA = {
    "type": "object",
    "properties": {"intent": {"enum": ["a", "b"]},
                   "slots": {"type": "object", "properties": {"day": SLOT, "people": SLOT}, "additionalProperties": False}},
    "required": ["intent", "slots"],
    "additionalProperties": False,
}
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three colors.", "Explain gravity in one sentence."]


@pytest.fixture(scope="module")
def gguf():
    from distill.models import resolve_model

    return resolve_model("smollm2-135m-instruct").gguf


@pytest.fixture(scope="module")
def student_dir(gguf, tmp_path_factory):
    """A student folder as the GGUF export writes it: tokenizer files, distill_student.json, the .gguf."""
    from transformers import AutoTokenizer

    from distill.models import converted_dir, resolve_model

    folder = tmp_path_factory.mktemp("gguf_student")
    # Reading the tokenizer out of the GGUF takes ~9 s on a busy machine; the HF folder that
    # load_causal_lm caches for this GGUF has the same tokenizer and loads in <1 s.
    cached = converted_dir(resolve_model("smollm2-135m-instruct"))
    if (cached / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(cached)
    else:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(folder)
    (folder / "distill_student.json").write_text(json.dumps({"prompt": "short", "input_prefix": ""}))
    (folder / gguf.name).symlink_to(gguf)
    return folder


@pytest.fixture(scope="module")
def student(student_dir):
    s = GGUFStudent(student_dir, n_ctx_per_seq=512, max_batch=4, n_threads=1)
    yield s
    s.close()


@pytest.fixture(scope="module")
def engine(student):
    return student.engine


def chat(student, text: str) -> list[int]:
    return student.prompt_tokens([{"role": "user", "content": text}])


def test_greedy_unconstrained(student, engine):
    r = engine.generate(GenRequest(chat(student, QUESTIONS[0]), 24))
    assert isinstance(r, GenResult)
    assert r.finish_reason in ("stop", "length") and 0 < r.completion_tokens <= 24
    assert r.completion_tokens == len(r.tokens) == len(r.token_logprobs)
    assert all(lp <= 0 and math.isfinite(lp) for lp in r.token_logprobs)
    assert r.interventions == 0 and r.embedding is None and r.text.strip()
    assert r.prompt_tokens == len(chat(student, QUESTIONS[0]))
    assert not set(r.tokens) & set(engine.eog_ids())          # the end token ends the answer, is not part of it
    assert r.finish_reason == "length" or r.stop_token in engine.eog_ids()
    assert r.seconds >= r.queue_seconds >= 0
    assert engine.size_bytes() == student.size_bytes() > 50_000_000


def test_batched_equals_sequential(student, engine):
    reqs = [GenRequest(chat(student, q), 32) for q in QUESTIONS]
    one_by_one = [engine.generate(r) for r in reqs]
    steps = engine.stats()["steps"]
    batched = [f.result(timeout=120) for f in [engine.submit(r) for r in reqs]]
    # The four streams really shared decode steps (continuous batching).
    assert engine.stats()["steps"] - steps < sum(r.completion_tokens for r in batched)
    # Batched and single-row matmuls may round differently on some CPUs, which can flip a near-tie late in a
    # stream; on this machine all four are identical. Allow one stream to diverge, never the first token.
    same = sum(a.tokens == b.tokens for a, b in zip(one_by_one, batched))
    assert same >= 3, [(a.text, b.text) for a, b in zip(one_by_one, batched)]
    assert all(a.tokens[:1] == b.tokens[:1] for a, b in zip(one_by_one, batched))


def test_schema_constrained(student, engine):
    prompts = ["Tell me about the history of Rome.", "Book a table for two at 8pm.", QUESTIONS[1]]
    results = [f.result(timeout=120) for f in
               [engine.submit(student.request([{"role": "user", "content": p}], 160, schema=SCHEMA)) for p in prompts]]
    for r in results:
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), SCHEMA)
        assert all(lp <= 0 for lp in r.token_logprobs)
    # An untuned model asked in prose does not answer in this JSON: the grammar must have steered it.
    assert any(r.interventions > 0 for r in results)


def test_property_names_enum_becomes_optional_properties():
    # llama.cpp's converter ignores propertyNames; the rewrite says the same thing in keywords it enforces
    slots = {"type": "object", "propertyNames": {"enum": ["city", "artist"]}, "additionalProperties": {"type": "string"}}
    s = {"type": "object", "properties": {"intent": {"enum": ["a"]}, "slots": slots}, "required": ["intent", "slots"]}
    out = enforceable(s)
    assert out["properties"]["slots"] == {"type": "object", "additionalProperties": False,
                                          "properties": {"city": {"type": "string"}, "artist": {"type": "string"}}}
    assert out["properties"]["intent"] == {"enum": ["a"]} and out["required"] == ["intent", "slots"]
    assert s["properties"]["slots"]["propertyNames"]          # the caller's schema is not modified
    # equivalent on examples: each document is valid under both or under neither
    for doc in ({"intent": "a", "slots": {}}, {"intent": "a", "slots": {"city": "x"}},
                {"intent": "a", "slots": {"town": "x"}}, {"intent": "a", "slots": {"city": 5}}):
        ok = [jsonschema.Draft202012Validator(x).is_valid(doc) for x in (s, out)]
        assert ok[0] == ok[1], doc
    assert enforceable({"propertyNames": {"pattern": "^a"}}) == {"propertyNames": {"pattern": "^a"}}   # left alone


def test_property_names_are_enforced_by_the_grammar(student, engine):
    schema = {"type": "object", "properties": {"slots": {
        "type": "object", "propertyNames": {"enum": ["colour", "size"]},
        "additionalProperties": {"type": "string", "maxLength": 12}}}, "required": ["slots"],
        "additionalProperties": False}
    prompts = ["List every attribute of a red car as JSON.", "Describe a big house in JSON with many fields."]
    for f in [engine.submit(student.request([{"role": "user", "content": p}], 120, schema=schema)) for p in prompts]:
        r = f.result(timeout=120)
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), schema)


def test_json_object_and_grammar_cache():
    g = schema_grammar(None, json_object=True)
    assert "root" in g and schema_grammar(None, json_object=True) is g
    assert schema_grammar(SCHEMA) is schema_grammar(json.loads(json.dumps(SCHEMA)))


@pytest.mark.parametrize("bad", [{"type": "foo"}, {"type": 5}, {"enum": []},
                                 {"properties": {"a": {"$ref": "#/$defs/missing"}}}, ["not", "a", "schema"]])
def test_bad_schema(bad):
    with pytest.raises(DistillError) as e:
        schema_grammar(bad)
    assert e.value.hint


def test_bad_grammar_fails_on_submit(student, engine):
    with pytest.raises(DistillError, match="grammar"):
        engine.submit(GenRequest(chat(student, "hi"), 4, grammar='root ::= "unterminated'))


def test_streaming_utf8(student, engine):
    async def stream(req):
        events = [e async for e in engine.astream(req)]
        assert isinstance(events[-1], GenResult) and all(isinstance(e, TokenEvent) for e in events[:-1])
        return events[:-1], events[-1]

    forced = 'root ::= "Héllo 😀🌍 ça va, naïve café — 日本語"'   # multi-byte characters split across byte tokens
    reqs = [GenRequest(chat(student, "Greet me with emojis 😀 and French accents: café, crème brûlée."), 40),
            GenRequest(chat(student, "hi"), 60, grammar=forced)]
    for events, result in [asyncio.run(stream(r)) for r in reqs]:
        assert "".join(e.text for e in events) == result.text
        assert len(events) == result.completion_tokens
        assert all("\ufffd" not in e.text for e in events)   # never half a character
        assert [e.token for e in events] == result.tokens
        assert [e.logprob for e in events] == result.token_logprobs
    assert result.text == "Héllo 😀🌍 ça va, naïve café — 日本語"


def test_context_length(student, engine, gguf):
    long = engine.tokenize("word " * 600)
    with pytest.raises(ContextLengthError, match=rf"\b{len(long)}\b.*\b512\b"):
        engine.submit(GenRequest(long, 8))
    # A prompt that fits but leaves little room stops at the slot's end with "length" (a small engine: a
    # 500-token prefill costs seconds on a busy machine).
    with GGUFEngine(gguf, n_ctx_per_seq=64, max_batch=2, n_threads=1) as small:
        with pytest.raises(ContextLengthError):
            small.submit(GenRequest(long[:64], 1))
        r = small.generate(GenRequest(long[:60], 50))
        assert r.finish_reason == "length" and r.prompt_tokens + r.completion_tokens == 64


def test_embedding(student, engine):
    def embed(text):
        r = engine.generate(GenRequest(engine.tokenize(text), 0, want_embedding=True))
        assert r.completion_tokens == 0 and r.finish_reason == "length" and r.text == ""
        return r.embedding

    a, b = embed("The cat sat on the mat."), embed("Quarterly revenue grew by twelve percent " * 6)   # > EMBED_CHUNK: several prefill chunks
    assert a.shape == b.shape == (engine.n_embd,) == (576,)   # SmolLM2-135M hidden size
    assert a.dtype == np.float32 and np.isfinite(a).all() and np.isfinite(b).all()
    assert not np.allclose(a, b)
    np.testing.assert_allclose(embed("The cat sat on the mat."), a, rtol=1e-4, atol=1e-4)
    # Prefilling with embeddings on leaves generation as it is.
    p = chat(student, QUESTIONS[2])
    with_emb, plain = engine.generate(GenRequest(p, 8, want_embedding=True)), engine.generate(GenRequest(p, 8))
    assert with_emb.embedding is not None and with_emb.tokens == plain.tokens


def test_sampling_with_seed(student, engine):
    p = chat(student, QUESTIONS[1])
    a, b = (engine.generate(GenRequest(p, 12, temperature=0.9, seed=7)) for _ in range(2))
    assert a.tokens == b.tokens and a.interventions == 0
    assert all(lp <= 0 for lp in a.token_logprobs)


def test_cancel_frees_the_slot(student, engine):
    p = chat(student, "Write a very long story about a dragon.")
    seen = []
    futs = [engine.submit(GenRequest(p, 400), on_token=seen.append) for _ in range(engine.max_batch + 1)]
    while len(seen) < 3:
        time.sleep(0.01)
    for f in futs:
        engine.cancel(f)
    assert all(f.cancelled() for f in futs)
    r = engine.generate(GenRequest(chat(student, "hi"), 4))   # would wait for 400-token streams if slots leaked
    assert r.completion_tokens > 0 and len(seen) < 100
    s = engine.stats()
    assert s["active"] == 0 and s["queued"] == 0 and s["requests_cancelled"] >= engine.max_batch + 1


def test_close_fails_pending(gguf):
    e = GGUFEngine(gguf, n_ctx_per_seq=256, max_batch=2, n_threads=1)
    p = e.tokenize("<|im_start|>user\nTell me a long story.<|im_end|>\n<|im_start|>assistant\n")
    futs = [e.submit(GenRequest(p, 200)) for _ in range(5)]
    time.sleep(0.2)
    e.close()
    # none of the 200-token generations was waited for: every future failed with "closed"
    for f in futs:
        assert f.done()
        with pytest.raises(DistillError, match="closed"):
            f.result(timeout=0)
    with pytest.raises(DistillError, match="closed"):
        e.submit(GenRequest(p, 1))
    e.close()   # idempotent


def test_student_folder(student, student_dir, tmp_path):
    from distill.students.causal_lm import student_prompt

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    text = student_prompt(student.tokenizer, student.info, msgs)
    assert "Be brief." not in text                               # prompt: short keeps only the user turn
    assert student.prompt_tokens(msgs) == student.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert student.count_tokens("hello world") == 2
    assert find_gguf(student_dir) == student.gguf_file

    two = tmp_path / "two"
    shutil.copytree(student_dir, two, symlinks=True)
    (two / "other.gguf").symlink_to(student.gguf_file.resolve())
    with pytest.raises(DistillError, match="expected one .gguf"):
        find_gguf(two)
    (two / "distill_student.json").write_text(json.dumps({"prompt": "short", "gguf_file": "other.gguf"}))
    assert find_gguf(two).name == "other.gguf"
    (two / "distill_student.json").write_text(json.dumps({"prompt": "short", "gguf_file": "missing.gguf"}))
    with pytest.raises(DistillError, match="missing.gguf"):
        find_gguf(two)


def test_agenerate_and_a_failing_callback(student, engine):
    p = chat(student, QUESTIONS[0])

    def boom(event):
        raise RuntimeError("client callback broke")

    bad = engine.submit(GenRequest(p, 8), on_token=boom)
    good = asyncio.run(engine.agenerate(GenRequest(p, 4)))   # the other request is unaffected
    with pytest.raises(RuntimeError, match="client callback broke"):
        bad.result(timeout=60)
    assert good.completion_tokens == 4 and good.finish_reason == "length"
    assert engine.stats()["active"] == 0
