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
- one forward pass per input scores every label: the rest of the prompt and the label continuations,
  laid out as a token trie (shared leading tokens computed once, no padding), go in one row with a custom
  4D attention mask (see ``score_labels``);
- the long shared prefix (system prompt with the label list) is the same for every input of a task, so
  its KV cache is kept across inputs: the prefix is the longest common token prefix of the previous and
  the current prompt.

extract / generate: greedy ``generate`` with ``max_new_tokens = spec.max_tokens``, starting from the same
cached shared prefix.

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
        """Summed log-probability of each label (+ end-of-turn) as the answer. The fast path.

        One forward pass scores all labels: the rest of the prompt (after the cached shared prefix) is
        followed, in the same row, by the label continuations laid out as a token trie (labels that share
        leading tokens, like SearchCreativeWork / SearchScreeningEvent, share those positions). A custom
        4D attention mask lets each trie node see the whole prompt and only its own ancestors, and each
        node's position id is its depth after the prompt, so every label is scored exactly as if it had
        been appended alone to the prompt (tested against ``score_labels_naive``)."""
        import torch

        ids = self.prompt_ids(messages)
        conts = [self.continuation_ids(messages, lab) for lab in labels]
        # trie: node = (token, parent node or -1, depth); paths[i] = the node ids of label i's tokens
        node_of: dict[tuple[int, int], int] = {}
        nodes: list[tuple[int, int, int]] = []
        paths = []
        for c in conts:
            parent, path = -1, []
            for depth, t in enumerate(c):
                if (parent, t) not in node_of:
                    node_of[(parent, t)] = len(nodes)
                    nodes.append((t, parent, depth))
                parent = node_of[(parent, t)]
                path.append(parent)
            paths.append(path)
        dev = self.model.device
        with torch.inference_mode():
            n_pre, cache = self._prefix_for(ids)
            rest = ids[n_pre:]
            r, m = len(rest), len(nodes)
            seq = rest + [t for t, _, _ in nodes]
            pos = list(range(n_pre, n_pre + r)) + [n_pre + r + d for _, _, d in nodes]
            allowed = torch.zeros((r + m, n_pre + r + m), dtype=torch.bool)
            allowed[:, :n_pre] = True
            allowed[:r, n_pre:n_pre + r] = torch.ones((r, r), dtype=torch.bool).tril()
            allowed[r:, n_pre:n_pre + r] = True
            for j, (_, parent, _) in enumerate(nodes):
                allowed[r + j, n_pre + r + j] = True
                while parent >= 0:   # ancestors
                    allowed[r + j, n_pre + r + parent] = True
                    parent = nodes[parent][1]
            dtype = self.model.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            out = self.model(input_ids=torch.tensor([seq], device=dev), attention_mask=mask[None, None].to(dev),
                             position_ids=torch.tensor([pos], device=dev), cache=cache, use_cache=cache is not None)
            logp = torch.log_softmax(out.logits[0].float(), dim=-1)
            scores = {}
            for lab, c, path in zip(labels, conts, paths):
                # token k is predicted at the prompt's last row (k = 0) or at the row of token k-1's node
                rows = [r - 1] + [r + node for node in path[:-1]]
                scores[lab] = float(sum(logp[row, t] for row, t in zip(rows, c)))
        return scores

    def _prefix_for(self, ids: list[int]):
        """(length, a private copy of its KV cache) of the cached shared prefix of ``ids``; (0, None) when
        there is none. The prefix is learned as the longest common token prefix of the previous prompt and
        this one: for one task that is the system prompt (with the label list) plus the user-turn header."""
        import torch

        ids_t = tuple(ids)
        hit = self._prefix_ids and len(self._prefix_ids) < len(ids) and ids_t[: len(self._prefix_ids)] == self._prefix_ids
        if not hit:
            n = 0
            for a, b in zip(self._last_ids, ids_t[:-1]):   # keep >= 1 token to score after the prefix
                if a != b:
                    break
                n += 1
            if n >= _MIN_PREFIX_TOKENS:
                pre = self.model(input_ids=torch.tensor([ids[:n]], device=self.model.device), use_cache=True)
                self._prefix_ids, self._prefix_cache = ids_t[:n], pre.cache
            else:
                self._prefix_ids, self._prefix_cache = (), None
        self._last_ids = ids_t
        if self._prefix_cache is None:
            return 0, None
        # the forward pass appends to the cache it is given, so it gets a copy
        return len(self._prefix_ids), copy.deepcopy(self._prefix_cache)

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
        from distill.models import stop_token_ids

        return stop_token_ids(self.tokenizer)

    def _generate(self, messages: list[dict[str, str]]) -> TeacherReply:
        import torch

        ids = self.prompt_ids(messages)
        inp = torch.tensor([ids], device=self.model.device)
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            # The shared system prompt's KV cache is reused (a private copy): generate() only runs the
            # tokens after it. Same greedy tokens as without it (tested); prefill drops from the whole
            # prompt (~550 tokens for the SNIPS slots schema) to the user turn.
            _, cache = self._prefix_for(ids)
            out = self.model.generate(
                input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=self.spec.max_tokens,
                do_sample=False, eos_token_id=self._stop_ids() or None,
                pad_token_id=pad if pad is not None else (self._stop_ids() or [0])[0],
                **({"cache": cache} if cache is not None else {}),
            )
        new = out[0, len(ids):].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return TeacherReply(texts=[text.strip()], tokens_in=len(ids), tokens_out=len(new),
                            raw={"text": text, "method": "greedy generate"})
