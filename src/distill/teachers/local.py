"""A teacher that runs an open causal LM in this process (CPU, or a GPU when there is one).

classify: the model does not generate. Every label is scored as the assistant's whole answer: the
log-probability of the label's tokens followed by the chat template's end-of-turn token, summed over
those tokens, given the rendered chat prompt. ``label_probs`` is the softmax of these summed
log-probabilities over the label set: the model's *normalised preference among the label strings*, not
a calibrated probability that the label is right (that is measured later, by ``distill eval``).
Summed log-probs slightly beat length-normalised ones on SNIPS/BANKING77 (see MODELS.md).

Why scoring instead of sampling: one forward pass over the prompt plus a short batch over the labels is
far cheaper on CPU than generating text, and the answer is always a valid label.

Speed, without changing the numbers (tested against a naive per-label forward):
- the prompt is run once; its KV cache is copied and repeated for the batch of label continuations
  (``DynamicCache.batch_repeat_interleave``), which are right-padded so padding never precedes a real
  token;
- the long shared prefix (system prompt with the label list) is the same for every input of a task, so
  its KV cache is kept across inputs: the prefix is the longest common token prefix of the previous and
  the current prompt.

extract / generate: greedy ``generate`` with ``max_new_tokens = spec.max_tokens``.

The model is loaded lazily on the first ``ask`` and runs in a worker thread (``asyncio.to_thread``) so the
labeller's event loop keeps going; a lock makes calls run one at a time, because two concurrent forwards
on two CPU cores are slower than two sequential ones and would need two copies of the cache.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.teachers.base import TeacherReply, TeacherRequest
from distill.task import TeacherSpec

# Prefixes shorter than this are not worth caching (the bookkeeping costs more than the recompute).
_MIN_PREFIX_TOKENS = 8
# Turn-end markers of common chat templates, used as extra stop tokens for generation.
_EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


class LocalTeacher:
    def __init__(self, spec: TeacherSpec, project: Any = None, *, model: Any = None, tokenizer: Any = None):
        """``project`` (a ``distill.project.Project``) anchors a relative ``path``. ``model``/``tokenizer``
        may be passed in directly (tests, or reusing a loaded model); otherwise ``spec.path`` (or
        ``spec.model``) is loaded with ``distill.models.load_causal_lm`` on the first call."""
        if spec.kind != "local":
            raise DistillError(f"teacher '{spec.name}' has kind '{spec.kind}', not 'local'")
        self.spec = spec
        self.project = project
        self.model = model
        self.tokenizer = tokenizer
        self.resolved = None          # distill.models.ResolvedModel once loaded from a name/path
        self._lock = threading.Lock()
        self._prefix_ids: tuple[int, ...] = ()
        self._prefix_cache = None     # KV cache of self._prefix_ids
        self._last_ids: tuple[int, ...] = ()

    # -- loading ------------------------------------------------------------------------------------
    def _model_ref(self) -> str:
        ref = self.spec.path or self.spec.model
        if not ref:
            raise DistillError(f"teacher '{self.spec.name}': kind 'local' needs `path:` (a packaged model "
                               "name, an HF folder or a .gguf file)",
                               hint="e.g. path: qwen2.5-coder-1.5b-instruct")
        root = getattr(self.project, "root", None)
        if root is not None and not Path(ref).is_absolute() and (Path(root) / ref).exists():
            return str(Path(root) / ref)
        return ref

    def _ensure_loaded(self) -> None:
        if self.model is not None:
            return
        from distill.models import load_causal_lm, resolve_model

        ref = self._model_ref()
        self.resolved = resolve_model(ref)
        self.model, self.tokenizer = load_causal_lm(ref, device=self.spec.device, dtype=self.spec.dtype)

    def provenance(self) -> dict[str, Any]:
        """Where the weights came from (after the first call or ``load()``)."""
        return self.resolved.provenance() if self.resolved is not None else {"model": "in-process object"}

    def load(self) -> None:
        with self._lock:
            self._ensure_loaded()

    # -- the Teacher protocol -------------------------------------------------------------------------
    async def ask(self, req: TeacherRequest) -> TeacherReply:
        return await asyncio.to_thread(self._ask_sync, req)

    async def aclose(self) -> None:
        self._prefix_cache = None

    def _ask_sync(self, req: TeacherRequest) -> TeacherReply:
        with self._lock:
            self._ensure_loaded()
            t0 = time.perf_counter()
            if req.kind == "classify":
                if not req.labels:
                    raise DistillError(f"teacher '{self.spec.name}': a classify request came without labels")
                reply = self._classify(req.messages, req.labels)
            else:
                reply = self._generate(req.messages)
            reply.latency_s = time.perf_counter() - t0
            return reply

    # -- prompt and continuations ----------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model: a plain transcript ending where the answer starts
            text = "\n\n".join(m["content"] for m in messages) + "\nAnswer:"
        return tok(text, add_special_tokens=False)["input_ids"]

    def continuation_ids(self, messages: list[dict[str, str]], label: str) -> list[int]:
        """The tokens of ``label`` as the assistant's complete answer, including the end-of-turn token.

        Taken from the chat template itself (prompt with the answer minus prompt without), so whatever
        the template writes between the answer and the end of the turn is scored too; trailing whitespace
        after the end-of-turn token is not part of the answer."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(messages + [{"role": "assistant", "content": label}], tokenize=False)
            if full.startswith(prompt):
                cont = full[len(prompt):].rstrip()
                return tok(cont, add_special_tokens=False)["input_ids"]
        eos = tok.eos_token or ""
        return tok((" " if not getattr(tok, "chat_template", None) else "") + label + eos,
                   add_special_tokens=False)["input_ids"]

    # -- classify ------------------------------------------------------------------------------------
    def score_labels(self, messages: list[dict[str, str]], labels: list[str]) -> dict[str, float]:
        """Summed log-probability of each label (+ end-of-turn) as the answer. The fast path."""
        import torch

        ids = self.prompt_ids(messages)
        conts = [self.continuation_ids(messages, lab) for lab in labels]
        dev = self.model.device
        with torch.inference_mode():
            cache, last_logits = self._prompt_cache(ids)
            k = len(labels)
            width = max(len(c) for c in conts)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            batch = torch.full((k, width), pad, dtype=torch.long)
            mask = torch.zeros((k, len(ids) + width), dtype=torch.long)
            mask[:, : len(ids)] = 1
            for i, c in enumerate(conts):
                batch[i, : len(c)] = torch.tensor(c)
                mask[i, len(ids): len(ids) + len(c)] = 1
            cache.batch_repeat_interleave(k)   # in place: `cache` is already this call's own copy
            pos = torch.arange(len(ids), len(ids) + width).unsqueeze(0).expand(k, -1)
            out = self.model(input_ids=batch.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                             cache=cache, use_cache=True)
            # logits predicting continuation token t: the prompt's last position for t=0, else output t-1
            logits = torch.cat([last_logits.expand(k, 1, -1), out.logits[:, :-1, :]], dim=1).float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.to(dev).unsqueeze(-1)).squeeze(-1)
            scores = {}
            for i, (lab, c) in enumerate(zip(labels, conts)):
                scores[lab] = float(logp[i, : len(c)].sum())
        return scores

    def _prompt_cache(self, ids: list[int]):
        """A fresh KV cache of the whole prompt and the logits at its last position, reusing the cached
        shared prefix when the prompt starts with it."""
        import torch

        dev = self.model.device
        ids_t = tuple(ids)
        if not (self._prefix_ids and len(self._prefix_ids) < len(ids) and ids_t[: len(self._prefix_ids)] == self._prefix_ids):
            # Learn the shared prefix from the previous prompt: for one task that is the system prompt
            # (label list) plus the user-turn header. Keep at least one token to run below.
            n = 0
            for a, b in zip(self._last_ids, ids_t[:-1]):
                if a != b:
                    break
                n += 1
            if n >= _MIN_PREFIX_TOKENS:
                pre = self.model(input_ids=torch.tensor([ids[:n]], device=dev), use_cache=True)
                self._prefix_ids, self._prefix_cache = ids_t[:n], pre.cache
            else:
                self._prefix_ids, self._prefix_cache = (), None
        self._last_ids = ids_t
        start = len(self._prefix_ids)
        cache = copy.deepcopy(self._prefix_cache) if self._prefix_cache is not None else None
        rest = torch.tensor([ids[start:]], device=dev)
        pos = torch.arange(start, len(ids), device=dev).unsqueeze(0)
        out = self.model(input_ids=rest, attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=dev),
                         position_ids=pos, cache=cache, use_cache=True)
        return out.cache, out.logits[:, -1:, :]

    def score_labels_naive(self, messages: list[dict[str, str]], labels: list[str]) -> dict[str, float]:
        """The reference: one full forward per label, no cache. Used by tests to prove the fast path."""
        import torch

        ids = self.prompt_ids(messages)
        scores = {}
        with torch.inference_mode():
            for lab in labels:
                c = self.continuation_ids(messages, lab)
                full = torch.tensor([ids + c], device=self.model.device)
                logits = self.model(input_ids=full).logits[0].float()
                logp = torch.log_softmax(logits[len(ids) - 1: -1], dim=-1)
                scores[lab] = float(logp.gather(-1, full[0, len(ids):].unsqueeze(-1)).sum())
        return scores

    def _classify(self, messages: list[dict[str, str]], labels: list[str]) -> TeacherReply:
        import math

        scores = self.score_labels(messages, labels)
        top = max(scores.values())
        z = sum(math.exp(s - top) for s in scores.values())
        probs = {lab: math.exp(s - top) / z for lab, s in scores.items()}
        best = max(labels, key=lambda lab: scores[lab])   # ties: the first label in spec order
        return TeacherReply(
            texts=[best], label_probs=probs, tokens_in=len(self.prompt_ids(messages)), tokens_out=0,
            raw={"scores": scores, "method": "summed label log-prob + end-of-turn, softmax over labels"},
        )

    # -- extract / generate ------------------------------------------------------------------------------
    def _stop_ids(self) -> list[int]:
        tok = self.tokenizer
        stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        vocab = tok.get_vocab()
        stop |= {vocab[t] for t in _EOT_TOKENS if t in vocab}
        return sorted(stop)

    def _generate(self, messages: list[dict[str, str]]) -> TeacherReply:
        import torch

        ids = self.prompt_ids(messages)
        inp = torch.tensor([ids], device=self.model.device)
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=self.spec.max_tokens,
                do_sample=False, eos_token_id=self._stop_ids() or None,
                pad_token_id=pad if pad is not None else (self._stop_ids() or [0])[0],
            )
        new = out[0, len(ids):].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return TeacherReply(texts=[text.strip()], tokens_in=len(ids), tokens_out=len(new),
                            raw={"text": text, "method": "greedy generate"})
