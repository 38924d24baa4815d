"""LocalTeacher on tiny random causal LMs built in-process (no downloads, a few seconds on CPU).

The tokenizer is byte-level BPE with no merges (one token per byte) plus ChatML special tokens and a
ChatML chat template, so the code paths match the packaged Qwen/SmolLM2 models."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from distill.errors import DistillError
from distill.task import TeacherSpec
from distill.teachers.base import TeacherRequest
from distill.teachers.local import LocalTeacher

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LABELS = ["PlayMusic", "GetWeather", "BookRestaurant", "RateBook"]


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
