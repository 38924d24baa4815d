"""Sequence packing for the sft loss (``LMStudentConfig.packing``), on tiny in-process Llama and Qwen2 models.

Packing lays several prompt+answer sequences end to end in one row; position ids restart per sequence and
transformers then gives each sequence its own causal block. What must hold: every token gets the loss it
gets unpacked (float rounding aside: the matmuls have other shapes), so the gradient and the whole run are
the same; rows respect max_length; the record says how much padding packing saved; and a model whose
attention ignores packed position ids is refused instead of silently attending across sequences.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.losses.sequence import IGNORE
from distill.recipes.train_causal_lm import (
    LMExample,
    accumulate_gradients,
    check_packing,
    micro_batches,
    pack,
    packed_batch,
    padded_tokens,
    prepare,
    train_lm,
)
from distill.student_config import LMStudentConfig
from distill.students.causal_lm import add_lora, pad_batch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_lm import save_tiny_base, tiny_llama, tiny_tokenizer  # noqa: E402

WORDS = ["cat", "house", "sun", "garden", "ox", "river", "stone", "a", "paper", "light", "tree", "mountain",
         "bee", "cloud", "fish", "window"]


def examples(n: int = 16) -> list[LMExample]:
    # the reversed word 1-5 times: sequences of ~45-110 tokens, so a batch padded to its longest wastes a lot
    return [LMExample(id=f"e{i:02d}", messages=[{"role": "system", "content": "Reverse the word."},
                                                 {"role": "user", "content": w}], answer=(w[::-1] + " ") * (1 + i % 5))
            for i, w in enumerate(WORDS[:n])]


def cfg(base: str, **kw) -> LMStudentConfig:
    d = dict(base_model=base, lora_rank=4, lora_alpha=8, lora_dropout=0.0, learning_rate=3e-2, batch_size=4,
             grad_accum=2, max_steps=3, save_every=100, max_length=200, device="cpu", seed=0, loss="sft")
    return LMStudentConfig(**{**d, **kw})


def tiny_qwen2(vocab_size: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, initializer_range=0.3, pad_token_id=0,
                                        tie_word_embeddings=False)).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def items():
    tok = tiny_tokenizer()
    its, _ = prepare(examples(), tok, cfg("unused"))
    return its


def test_rows_hold_every_sequence_once_within_max_length(items):
    rows = pack(items, 200)
    assert sorted(id(it) for row in rows for it in row) == sorted(id(it) for it in items)
    lengths = [sum(len(it.main.input_ids) for it in row) for row in rows]
    assert max(lengths) <= 200 and len(rows) < len(items) / 2          # 2-3 sequences per row
    assert max(lengths) - min(lengths) < max(len(it.main.input_ids) for it in items)   # balanced rows
    assert pack(items, 200) == rows                                      # deterministic
    b = packed_batch(rows[:2], pad_id=0)
    for r, row in enumerate(rows[:2]):
        at = 0
        for it in row:
            n = len(it.main.input_ids)
            assert b["position_ids"][r, at: at + n].tolist() == list(range(n))   # restart per sequence
            assert b["labels"][r, at] == IGNORE                                    # never a cross-sequence target
            assert b["labels"][r, at + 1: at + n].tolist() == it.main.labels[1:]
            at += n
        assert (b["labels"][r, at:] == IGNORE).all()                               # padding
    # padding: packed rows compute fewer positions than one sequence per row, for the same sequences
    assert padded_tokens(micro_batches(items, 4, 200)) < padded_tokens(micro_batches(items, 4))


def _per_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    lab = labels[:, 1:]
    return F.cross_entropy(logits[:, :-1][lab != IGNORE].float(), lab[lab != IGNORE], reduction="none")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_loss_and_gradient_equal_unpacked(items, arch):
    """Token by token, the loss of each completion token is the same packed as in its own padded row; so
    are the step's loss and the LoRA gradients (accumulate_gradients with and without packing)."""
    tok = tiny_tokenizer()
    base = tiny_llama(vocab_size=len(tok)) if arch == "llama" else tiny_qwen2(len(tok))
    base.config.use_cache = False
    rows = pack(items, 200)
    with torch.no_grad():
        order = [it for row in rows for it in row]          # the packed order, to compare token for token
        ub = pad_batch([it.main for it in order], tok.pad_token_id)
        unpacked = _per_token_loss(base(input_ids=ub["input_ids"], attention_mask=ub["attention_mask"]).logits,
                                   ub["labels"])
        pb = packed_batch(rows, tok.pad_token_id)
        packed = _per_token_loss(base(input_ids=pb["input_ids"], position_ids=pb["position_ids"]).logits,
                                 pb["labels"])
    assert unpacked.shape == packed.shape and unpacked.numel() > 100
    torch.testing.assert_close(packed, unpacked, rtol=1e-4, atol=1e-5)

    out = {}
    for packing in (False, True):
        torch.manual_seed(0)
        model = add_lora(tiny_llama(vocab_size=len(tok)) if arch == "llama" else tiny_qwen2(len(tok)),
                         4, 8, 0.0, "all-linear")
        model.config.use_cache = False
        with torch.no_grad():      # non-zero B, so that gradients reach A as well
            for k, p in model.named_parameters():
                if "lora_B" in k:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(k)))
        loss = accumulate_gradients(model, items, cfg("unused", packing=packing), tok.pad_token_id,
                                    "cpu")
        out[packing] = loss, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    (l0, g0), (l1, g1) = out[False], out[True]
    assert l1 == pytest.approx(l0, rel=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6 * float(g0[k].abs().max()))


def test_packing_setting_sft_only_and_out_of_old_run_ids():
    c = cfg("m")
    assert "packing" not in c.identity()                          # default: old run ids unchanged
    assert cfg("m", packing=True).identity()["packing"] is True
    for loss in ("kd_forward", "jsd", "sparse_topk", "step_by_step"):
        with pytest.raises(DistillError, match="packing is for loss: sft only") as e:
            LMStudentConfig.from_dict({"loss": loss, "packing": True, "teacher_model": "t"})
        assert "student.packing" in e.value.message


def test_packing_run_trains_like_unpacked_and_records_padding_saved(tmp_path):
    base = str(save_tiny_base(tmp_path / "base", seed=0))
    plain = train_lm(examples(), cfg(base), tmp_path / "plain", log=None)
    packed = train_lm(examples(), cfg(base, packing=True), tmp_path / "packed", log=None)
    for a, b in zip(plain["history"], packed["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and a["tokens"] == b["tokens"]
    pad = packed["padding"]
    assert pad["padded_tokens_per_step"] < pad["padded_tokens_per_step_without_packing"]
    assert 0 <= pad["padding_fraction"] < pad["padding_fraction_without_packing"] < 1
    assert pad["computed_positions_saved"] > 0
    # the unpacked run computes exactly what the packed one reports as "without packing"
    assert plain["padding"]["padded_tokens_per_step"] == pad["padded_tokens_per_step_without_packing"]
    print(f"\npacking, tiny run: {pad['padded_tokens_per_step_without_packing']:.0f} -> "
          f"{pad['padded_tokens_per_step']:.0f} positions/step, padding {pad['padding_fraction_without_packing']:.2f} "
          f"-> {pad['padding_fraction']:.2f}")


class _IgnoresPositions(torch.nn.Module):
    """A model whose attention does not honour packed position ids (as one that builds its own mask)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids=None, **kw):
        return self.model(input_ids=input_ids, **kw)


def test_a_model_that_attends_across_packed_sequences_is_refused(items):
    model = tiny_llama(vocab_size=len(tiny_tokenizer()))
    check_packing(model, items, "cpu")                            # transformers' Llama: fine
    with pytest.raises(DistillError, match="packing does not work") as e:
        check_packing(_IgnoresPositions(model), items, "cpu")
    assert "packing: false" in e.value.hint
