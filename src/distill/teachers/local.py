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
cached shared prefix. With ``logprobs: true`` (and ``top_logprobs: k``, 1..20, as for an API teacher; both
off by default, and both part of the teacher identity, so switching them on relabels) the reply carries,
per generated token, ``{token, id, logprob, top_logprobs: [{token, id, logprob}] * k}``: log-softmax of
the model's *raw* logits at that step over its whole output vocabulary (``output_logits``, not the
processed ``scores``), equal to a plain forward pass over prompt + answer (tested). The last entry is the
end-of-turn token that stopped the answer, marked ``"special": true, "stop": true`` (not text; see
``distill.losses.sparse_topk`` for how it becomes the target at the student's end-of-turn). Like the
answer, they are stored in the teacher-call cache and the labels, so a re-run pays nothing and a replay
recording (``distill.teachers.replay``) carries them. classify ignores both (it scores every label exactly).

Which KD for a student with the *same tokenizer* as this teacher (both are ``loss:`` values of the student):

- ``sparse_topk`` from recorded top-k logprobs: the teacher runs once, at ``distill label``; training
  reads k (<= 20) log-probs per answer token from the store and never loads the teacher. Cost: the
  recording (~20 entries per token in SQLite) and the tail beyond the top-k, which is one "other" bucket.
  Works for any student tokenizer whose tokens can be aligned to the teacher's text (a different family
  too). Pick it on a CPU or small GPU, or when you will train several students or several runs from one
  labelling.
- ``kd_forward`` / ``kd_reverse`` / ``jsd``: full-logit online KD. The teacher is held in memory during
  training (Qwen2.5-1.5B in fp32: ~6-9 GB here, next to the student and its optimizer) and runs one
  forward pass per training micro-batch, every epoch again (~2 x 1.5 GFLOP per token: as much as a 0.5B
  student's forward + backward, ~6 x 0.5, and several times a 135M student's). It sees the whole
  distribution at every position and, with ``on_policy``, scores answers the student writes itself,
  which a recording cannot. Needs exactly the same vocabulary. Pick it when memory allows and the last
  bit of quality matters, or for on-policy distillation.

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
        want_logprobs = self.spec.logprobs
        with torch.inference_mode():
            # The shared system prompt's KV cache is reused (a private copy): generate() only runs the
            # tokens after it. Same greedy tokens as without it (tested); prefill drops from the whole
            # prompt (~550 tokens for the SNIPS slots schema) to the user turn.
            _, cache = self._prefix_for(ids)
            out = self.model.generate(
                input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=self.spec.max_tokens,
                do_sample=False, eos_token_id=self._stop_ids() or None,
                pad_token_id=pad if pad is not None else (self._stop_ids() or [0])[0],
                # ``logits`` are the model's raw next-token logits; ``scores`` would be after the logits
                # processors (e.g. a repetition_penalty from the model's generation_config), i.e. not the
                # model's distribution
                return_dict_in_generate=True, output_logits=want_logprobs,
                **({"cache": cache} if cache is not None else {}),
            )
        new = out.sequences[0, len(ids):].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        logprobs = self.token_logprobs(ids, new, [step[0] for step in out.logits]) if want_logprobs else None
        return TeacherReply(texts=[text.strip()], logprobs=logprobs, tokens_in=len(ids), tokens_out=len(new),
                            raw={"text": text, "method": "greedy generate"})

    def token_logprobs(self, prompt_ids: list[int], new_ids: list[int], logits: list[Any]) -> list[dict[str, Any]]:
        """Per generated token: ``{token, id, logprob, top_logprobs: [{token, id, logprob}] * k}`` from the raw
        logits of each step (log-softmax over the model's whole output vocabulary), the shape an
        OpenAI-compatible API returns plus token ids. ``k = spec.top_logprobs`` (0: an empty list).

        ``token`` strings concatenate to the answer text exactly (cumulative decoding; a token that ends
        inside a multi-byte character gets "" and the token completing it the character), which is what
        ``distill.losses.sparse_topk`` aligns the student's tokens against. The end-of-turn token that stops
        the answer is recorded too, marked ``"special": true, "stop": true`` (any other special token, which
        the answer text leaves out too, gets only ``"special": true``): it is not part of the text, but its
        distribution (how sure the teacher was to stop there) is the target at the student's own
        end-of-turn position."""
        import torch

        tok, k = self.tokenizer, self.spec.top_logprobs
        dec = lambda xs: tok.decode(xs, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        # special = what ``decode(skip_special_tokens=True)`` leaves out of the answer text (``all_special_ids``
        # can miss tokens the Rust tokenizer marks special, e.g. ChatML markers added there)
        special = {t for t in set(new_ids) if dec([t]) and not tok.decode([t], skip_special_tokens=True)}
        stops = set(self._stop_ids())
        full = list(prompt_ids) + list(new_ids)
        out: list[dict[str, Any]] = []
        text_ids: list[int] = []    # the answer's non-special tokens so far
        done = ""                   # their text, as far as it is complete characters
        for i, (tid, step) in enumerate(zip(new_ids, logits)):
            logp = torch.log_softmax(step.float(), dim=-1)
            if tid in special:
                piece, is_special = dec([tid]), True
            else:
                text_ids.append(tid)
                cur = dec(text_ids)
                # "\ufffd" at the end: the token stopped inside a multi-byte character; the next one finishes it
                piece = "" if cur.endswith("\ufffd") and i + 1 < len(new_ids) else cur[len(done):]
                done += piece
                is_special = False
            entry: dict[str, Any] = {"token": piece, "id": tid, "logprob": float(logp[tid])}
            if is_special:
                entry["special"] = True
                if i + 1 == len(new_ids) and tid in stops:
                    entry["stop"] = True    # the end of turn (not a special token cut off by max_tokens)
            alts = []
            if k:
                # alternatives are spelt in context (the 4 tokens before), so a SentencePiece word-start
                # token keeps its leading space; the chosen token keeps its spelling from above
                ctx = full[max(0, len(prompt_ids) + i - 4): len(prompt_ids) + i]
                base = dec(ctx)
                vals, idx = torch.topk(logp, min(k, logp.shape[-1]))
                for lp, v in zip(vals.tolist(), idx.tolist()):
                    if v == tid:
                        s = piece
                    else:
                        both = dec(ctx + [v])
                        s = both[len(base):] if both.startswith(base) else dec([v])
                    alts.append({"token": s, "id": v, "logprob": float(lp)})
            entry["top_logprobs"] = alts
            out.append(entry)
        return out
