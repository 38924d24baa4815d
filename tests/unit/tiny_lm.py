"""Tiny causal LMs and tokenizers built in-process, so LM tests need no download and run in seconds.

The tokenizer is character-level (every printable ASCII character is one token) with ChatML special
tokens and a ChatML chat template, like SmolLM2's. The model is a 2-layer Llama with hidden size 32.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]   # 95 printable + "\n"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(chat: bool = True, extra_tokens: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Char-level tokenizer, ~100 tokens. ``extra_tokens`` appends multi-char words (a 'different' tokenizer)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS + list(extra_tokens or []))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if extra_tokens:
        # longest match first, then single characters
        alts = "|".join(re.escape(t) for t in sorted(extra_tokens, key=len, reverse=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{alts}|[\\s\\S]"), behavior="isolated")
    else:
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    if chat:
        fast.chat_template = CHATML
    return fast


def tiny_llama(vocab_size: int = 100, seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=3, bos_token_id=None,
                      # 0.02 (the default) gives a frozen output layer whose logits span < 1 nat: LoRA could
                      # then never fit anything. 0.3 makes the tiny model expressive enough to learn in steps.
                      initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


def save_tiny_base(folder: Path, seed: int = 0, chat: bool = True, vocab_pad: int = 0) -> Path:
    """A tiny model + tokenizer saved as an ordinary HF folder (usable as ``base_model``)."""
    tok = tiny_tokenizer(chat=chat)
    model = tiny_llama(vocab_size=len(tok) + vocab_pad, seed=seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
