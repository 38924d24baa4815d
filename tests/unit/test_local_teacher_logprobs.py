"""A local teacher's recorded token log-probabilities (extract/generate) on a tiny in-process Llama:
they equal a direct forward pass, survive the cache and a replay recording, and train a sparse_topk student.

The tiny random model would never stop on its own, so its end-of-turn row in the output layer is set to
1.2x the row of a token it writes often: it then ends most answers after a few tokens, as a chat model
does."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from pathlib import Path

import pytest
import torch

from distill.losses.sparse_topk import sparse_targets_for_completion, teacher_text
from distill.task import TeacherSpec, cache_key
from distill.teachers.base import TeacherRequest
from distill.teachers.local import LocalTeacher

SYSTEM = "Reverse the word."
WORDS = ["cat", "house", "sun", "garden", "ox", "river"]
EOT = 3   # "<|im_end|>" in tiny_lm's tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)     # tiny matrices; the machine is shared
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, folder): a tiny Llama that stops, also saved as an HF folder (a student base)."""
    from tiny_lm import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=1)
    # "o", one of the tokens it writes most, lends its output row (x1.2) to end-of-turn: 5 of the 6 answers
    # then stop after 3-11 characters, none is empty
    with torch.no_grad():
        model.lm_head.weight[EOT] = 1.2 * model.lm_head.weight[tok.convert_tokens_to_ids("o")]
    folder = tmp_path_factory.mktemp("tiny_teacher")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


def _spec(**kw) -> TeacherSpec:
    return TeacherSpec(**{"name": "tiny", "kind": "local", "path": "unused", "max_tokens": 12, **kw})


def _messages(word: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": word}]


def _forward_logprobs(model, prompt: list[int], new: list[int]) -> torch.Tensor:
    """The reference: log-softmax of one plain forward pass over prompt + answer, rows = answer positions."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + new])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(new)], dim=-1)


def test_recorded_logprobs_equal_a_direct_forward_pass(tiny):
    model, tok, _ = tiny
    k = 5
    t = LocalTeacher(_spec(logprobs=True, top_logprobs=k), None, model=model, tokenizer=tok)
    stopped = 0
    for w in WORDS:   # one after another: from the second on, generate() starts from the cached prefix
        reply = t._generate(_messages(w))
        lp = reply.logprobs
        assert lp is not None and len(lp) == reply.tokens_out >= 1
        prompt, new = t.prompt_ids(_messages(w)), [e["id"] for e in lp]
        ref = _forward_logprobs(model, prompt, new)
        for i, e in enumerate(lp):
            assert e["logprob"] == pytest.approx(float(ref[i, e["id"]]), abs=1e-4)
            alts = e["top_logprobs"]
            assert len(alts) == k
            vals, _ = torch.topk(ref[i], k)
            # the k best values, and each recorded id carries its own value in the forward pass (robust to
            # near-ties, which a KV-cached generation and a full forward may order differently)
            assert [a["logprob"] for a in alts] == pytest.approx(vals.tolist(), abs=1e-4)
            assert len({a["id"] for a in alts}) == k
            assert all(a["logprob"] == pytest.approx(float(ref[i, a["id"]]), abs=1e-4) for a in alts)
            assert all(a["logprob"] >= b["logprob"] for a, b in itertools.pairwise(alts))   # sorted, best first
            # greedy with no logits processor: the chosen token is the top alternative, with the same entry
            assert alts[0]["logprob"] == pytest.approx(e["logprob"], abs=1e-4)
            assert all(a["token"] == tok.decode([a["id"]]) for a in alts)   # char-level: one character each
        # the tokens spell the answer; the end-of-turn that stopped it is the last entry, marked, not text
        assert teacher_text(lp) == reply.raw["text"]
        if lp[-1]["id"] == EOT:
            stopped += 1
            assert lp[-1] == {**lp[-1], "token": "<|im_end|>", "special": True, "stop": True}
        # a random model also writes other special tokens mid-answer; they are marked and left out of the text
        for e in lp:
            assert bool(e.get("special")) == (tok.decode([e["id"]], skip_special_tokens=True) == "")
            assert "stop" not in e or e is lp[-1]
    assert stopped >= len(WORDS) // 2, "the tiny teacher should end most answers with its end-of-turn token"
    assert len(t._prefix_ids) >= 8    # the cached-prefix path was exercised


def test_off_by_default_k_zero_and_k_max(tiny):
    model, tok, _ = tiny
    msgs = _messages("garden")
    assert LocalTeacher(_spec(), None, model=model, tokenizer=tok)._generate(msgs).logprobs is None
    only = LocalTeacher(_spec(logprobs=True), None, model=model, tokenizer=tok)._generate(msgs).logprobs
    assert only and all(e["top_logprobs"] == [] for e in only)
    full = LocalTeacher(_spec(logprobs=True, top_logprobs=20), None, model=model, tokenizer=tok)._generate(msgs).logprobs
    assert all(len(e["top_logprobs"]) == 20 for e in full)
    assert [e["logprob"] for e in full] == pytest.approx([e["logprob"] for e in only], abs=1e-6)
    # classify scores labels exactly and records no token logprobs
    reply = asyncio.run(LocalTeacher(_spec(logprobs=True, top_logprobs=5), None, model=model, tokenizer=tok).ask(
        TeacherRequest(key="k", messages=msgs, kind="classify", labels=["nedrag", "garden"])))
    assert reply.logprobs is None and reply.label_probs is not None


def test_what_is_recorded_is_part_of_the_cache_key():
    msgs = _messages("ox")
    keys = {cache_key(_spec(**kw).identity(), msgs, 0)
            for kw in ({}, {"logprobs": True}, {"logprobs": True, "top_logprobs": 5},
                       {"logprobs": True, "top_logprobs": 20})}
    assert len(keys) == 4


def test_logprobs_survive_a_replay_recording(tiny, tmp_path):
    from distill.teachers.replay import ReplayTeacher, write_recording

    model, tok, _ = tiny
    t = LocalTeacher(_spec(logprobs=True, top_logprobs=3), None, model=model, tokenizer=tok)
    replies = {w: t._generate(_messages(w)) for w in WORDS[:2]}
    path = tmp_path / "rec.jsonl"
    write_recording(path, {"teacher": "tiny"}, [(_messages(w), r) for w, r in replies.items()])
    replay = ReplayTeacher(TeacherSpec(name="rep", kind="replay", path=str(path)))
    for w, r in replies.items():
        back = asyncio.run(replay.ask(TeacherRequest(key="k", messages=_messages(w), kind="generate")))
        assert back.logprobs == r.logprobs and back.texts == r.texts


# ------------------------------------------------------------------------------------------------ end to end


def _project(root: Path, folder: Path):
    from distill.project import Project

    spec = (f"name: rev\nkind: generate\ndescription: Reverse the word.\nprompt:\n  system: {SYSTEM}\n"
            f"teachers:\n  - name: tiny\n    kind: local\n    path: {folder}\n    max_tokens: 12\n"
            "    logprobs: true\n    top_logprobs: 5\n")
    proj = Project.init(root, "generate", spec_text=spec)
    with proj.store.tx() as c:
        for i, w in enumerate(WORDS):
            c.execute("INSERT INTO examples(id, text, norm, split, created_at) VALUES(?,?,?,?,?)",
                      (f"x{i}", w, w, "train", time.time()))
    return proj


def _label_rows(proj) -> dict[str, tuple]:
    rows = proj.store.q("SELECT example_id, status, answer, logprobs FROM labels WHERE teacher = 'tiny'")
    return {r["example_id"]: (r["status"], r["answer"], r["logprobs"]) for r in rows}


def test_label_cache_hit_then_sparse_topk_training(tiny, tmp_path):
    from distill.labeling import label_with
    from distill.recipes.train_causal_lm import train_lm
    from distill.student_config import LMStudentConfig

    model, tok, folder = tiny
    proj = _project(tmp_path / "p", folder)
    tspec = proj.spec.get_teacher("tiny")
    generated = []

    def teacher():
        t = LocalTeacher(tspec, proj, model=model, tokenizer=tok)
        real = t._generate
        t._generate = lambda msgs: generated.append(1) or real(msgs)
        return t

    first = label_with(proj, tspec, teacher(), splits=("train",))
    assert first.calls == len(WORDS) and len(generated) == len(WORDS)
    rows = _label_rows(proj)
    assert all(s == "ok" and json.loads(lp) for s, _, lp in rows.values())
    # the labels hold what the teacher returned: the recorded entries with their top-5
    assert all(len(e["top_logprobs"]) == 5 for _, _, lp in rows.values() for e in json.loads(lp))

    again = label_with(proj, tspec, teacher(), splits=("train",))      # current labels: nothing to do
    assert again.calls == 0 and len(generated) == len(WORDS)
    with proj.store.tx() as c:
        c.execute("DELETE FROM labels")                                  # from the teacher-call cache alone
    cached = label_with(proj, tspec, teacher(), splits=("train",))
    assert cached.calls == 0 and cached.cache_hits == len(WORDS) and len(generated) == len(WORDS)
    assert cached.spend == 0.0 and _label_rows(proj) == rows

    snap = {}
    cfg = LMStudentConfig(base_model=str(folder), loss="sparse_topk", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                          learning_rate=3e-2, batch_size=3, max_steps=2, save_every=100, max_length=64,
                          device="cpu", seed=0)
    rec = train_lm(proj, cfg, tmp_path / "p" / "models" / "lm", teacher="tiny", log=None,
                   on_start=lambda m: snap.setdefault("start", {k: v.detach().clone() for k, v in m.named_parameters()}),
                   on_step=lambda s, e, m: snap.update(end={k: v.detach().clone() for k, v in m.named_parameters()}))
    assert all(math.isfinite(h["loss"]) for h in rec["history"]) and len(rec["history"]) == 2
    lora = [k for k in snap["start"] if "lora_" in k]
    assert lora and all(not torch.equal(snap["start"][k], snap["end"][k]) for k in lora)
    # same tokenizer: every teacher entry lands on a student token, and every position but the special
    # tokens the random teacher wrote mid-answer (not text, so not placeable) on a student position
    sp = rec["data"]["sparse"]
    records = [json.loads(lp) for _, _, lp in rows.values()]
    mid_specials = sum(1 for lp in records for e in lp[:-1] if e.get("special"))
    assert sp["positions"] == sum(map(len, records)) and sp["unaligned"] == mid_specials and sp["unmapped"] == 0
    proj.close()


def test_end_of_turn_entry_targets_the_students_own_end_of_turn(tiny):
    """A student whose end-of-turn token is spelt differently still gets the teacher's stop distribution
    there; a multi-character student token is skipped like any unaligned position."""
    from distill.students.causal_lm import encode_example

    model, tok, _ = tiny
    t = LocalTeacher(_spec(logprobs=True, top_logprobs=4), None, model=model, tokenizer=tok)
    lp = next(r.logprobs for r in (t._generate(_messages(w)) for w in WORDS) if r.logprobs[-1]["id"] == EOT)
    enc = encode_example(tok, _messages("x"), teacher_text(lp), 256, want_offsets=True)
    comp = enc.input_ids[enc.completion_start:]
    ids, lps, st = sparse_targets_for_completion(lp, comp, enc.completion_offsets[: len(comp)], tok)
    eot_pos = len(teacher_text(lp))          # char-level: the student's token after the text
    assert comp[eot_pos] == EOT and ids[eot_pos][0] == EOT
    assert lps[eot_pos][0] == pytest.approx(lp[-1]["logprob"])
    assert st.unaligned == sum(1 for e in lp[:-1] if e.get("special"))     # mid-answer specials only
    assert st.hard_positions == 1                                           # the "\n" after end-of-turn
    # the same entries against a student calling its end-of-turn "<|eot|>": mapped to that token by position
    renamed = [dict(e) for e in lp]
    renamed[-1] = {**lp[-1], "token": "<|eot|>",
                   "top_logprobs": [dict(a, token="<|eot|>") if a["id"] == EOT else a for a in lp[-1]["top_logprobs"]]}
    ids2, lps2, _ = sparse_targets_for_completion(renamed, comp, enc.completion_offsets[: len(comp)], tok)
    assert ids2[eot_pos][0] == EOT and lps2[eot_pos] == pytest.approx(lps[eot_pos])
    # a special token cut off by max_tokens (no "stop") is not an end of turn: not placed, hard label there
    cut = [dict(e) for e in lp]
    cut[-1].pop("stop")
    ids3, lps3, st3 = sparse_targets_for_completion(cut, comp, enc.completion_offsets[: len(comp)], tok)
    assert (ids3[eot_pos], lps3[eot_pos]) == ([EOT], [0.0]) and st3.unaligned == st.unaligned + 1


def test_byte_level_tokens_spell_the_answer_even_inside_multibyte_characters():
    """Byte-level BPE (Qwen, SmolLM2): a random model writes stray UTF-8 bytes; the recorded strings still
    concatenate to the answer text, and the logprobs still equal the forward pass."""
    from test_local_teacher import _messages as messages
    from test_local_teacher import _model, _tokenizer

    tok = _tokenizer()
    model = _model("llama", len(tok))
    t = LocalTeacher(_spec(max_tokens=24, logprobs=True, top_logprobs=3), None, model=model, tokenizer=tok)
    partial = 0
    for text in ("play some jazz", "will it rain in Paris tomorrow?", "naïve café ☕"):
        reply = t._generate(messages(text))
        lp = reply.logprobs
        assert teacher_text(lp) == tok.decode([e["id"] for e in lp], skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)
        partial += sum(1 for e in lp if e["token"] == "")
        ref = _forward_logprobs(model, t.prompt_ids(messages(text)), [e["id"] for e in lp])
        assert [e["logprob"] for e in lp] == pytest.approx([float(ref[i, e["id"]]) for i, e in enumerate(lp)], abs=1e-4)
    assert partial > 0, "expected some tokens that end inside a multi-byte character"
