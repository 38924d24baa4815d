"""Sparse KD from an API's ``top_logprobs``: forward KL over the teacher's top-k tokens plus an "other" bucket.

API teachers (OpenAI-compatible ``logprobs: true, top_logprobs: k``, k <= 20) return, for each token of
their answer, the log-probabilities of their k most likely tokens — never the full distribution. The
loss is the word-level KD of Kim & Rush 2016 (arXiv 1606.07947, forward KL to the teacher's next-token
distribution) restricted to what the API shows; offline toolkits such as arcee-ai/DistillKit store top-k
teacher logits for the same reason (size), and expose the same choice of what to do with the missing mass.

The missing mass is handled explicitly rather than renormalised away. At each position we compare two
(k+1)-way distributions:

    teacher: p_T(v_1), ..., p_T(v_k),  p_T(other) = max(0, 1 - sum_i p_T(v_i))
    student: p_S(v_1), ..., p_S(v_k),  p_S(other) = sum of p_S over every token not in {v_i}

    loss = sum_i p_T(v_i) log(p_T(v_i) / p_S(v_i)) + p_T(other) log(p_T(other) / p_S(other))

This is the forward KL between the two distributions coarsened to k+1 outcomes, so it is >= 0, equals 0
when the student matches the teacher, and with k = the whole vocabulary it *is* the full forward KL
(tested). Renormalising the top-k to sum to 1 instead would tell the student that the teacher was more
certain than it was. When rounded API log-probs sum to slightly more than 1, they are scaled down to 1.
When the top-k leaves the student no "other" token at all (k = the whole vocabulary), the "other" term is
dropped and the top-k renormalised: p_T(other) is then float rounding (or mass on strings the student
cannot write), and multiplied by log p_S(other) = log 0 it would dominate the loss; renormalised, k = V
stays exactly the full forward KL. Two slots with the same student id are one outcome and their
probabilities are added.
No temperature: the API's log-probs are at the teacher's sampling temperature and the missing tail cannot
be re-tempered.

Inputs (aligned like every loss here, see ``distill.losses.sequence``):

============== ============ =================================================================
student_logits [B, T, V]    student logits, logits[:, t] scored against the targets at t
target_ids     [B, T, K]    student token ids of the teacher's top-k; -1 = empty slot
target_logprobs[B, T, K]    the teacher's log-probabilities of those tokens (ignored at -1)
labels         [B, T]       -100 where no loss is taken (prompt, padding)
============== ============ =================================================================

Teacher tokens are *strings*. ``sparse_targets_for_completion`` maps them to student ids: a string that is
exactly one student token (encode gives one id and decoding it gives the string back) is kept; any other
string's probability is moved into "other" and counted in ``SparseStats.unmapped``. Entries that land on
the same student id (an API listing one string twice, or two strings for one student token) keep their
summed probability (logsumexp of the log-probs), not just the first one's. Teacher positions are
matched to student positions by character offset in the answer text; a teacher position that does not
start where a student token starts is skipped and counted (``unaligned``). Student completion positions
with no teacher distribution (the end-of-turn token of an API teacher, skipped positions) get the hard label
as a 1-token target with log-prob 0, i.e. plain cross-entropy, so the student still learns to stop.

A local teacher (``distill.teachers.local``) records the same shape plus token ``id``s, and one more entry
at the end, marked ``"special": true, "stop": true``: its end-of-turn token with its distribution. It is
not text (nor are other ``"special"`` entries, which cannot be placed and count as unaligned); it is
placed at the student's first token after the text (the student's end-of-turn), and the teacher's
end-of-turn string maps to that student token whatever the student's tokenizer calls it, so the student
learns *how sure* the teacher was to stop, not just that it stopped. Its other alternatives map by string
as everywhere else. The ids are provenance (and exact for a same-tokenizer student); the mapping uses
the strings, which work for any student tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from distill.losses.sequence import IGNORE, Reduction, check_reduction, reduce_selected

# Finite stand-in for -inf when masking tokens out of a logsumexp: a true -inf gives NaN gradients when
# every token is masked (k = whole vocabulary), a large finite value gives exp(...) = 0 and finite grads.
_MASKED = -1e30


def sparse_topk_kd_loss(student_logits: torch.Tensor, target_ids: torch.Tensor, target_logprobs: torch.Tensor,
                        labels: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """(k+1)-way forward KL from the teacher's top-k log-probs. Shapes in the module docstring."""
    check_reduction(reduction)
    # Select the scored positions before any arithmetic (not ``loss * mask``): a NaN/inf logit or target
    # at a masked position then reaches neither the loss nor the gradient.
    keep = (labels != IGNORE) & (target_ids >= 0).any(-1)                      # [B, T]
    log_s = torch.log_softmax(student_logits[keep].float(), dim=-1)            # [N, V]
    valid = target_ids[keep] >= 0                                              # [N, K]
    ids = target_ids[keep].clamp(min=0)
    log_s_k = log_s.gather(-1, ids)                                            # [N, K]
    zeros = torch.zeros_like(log_s_k)
    p_t_k = torch.where(valid, target_logprobs[keep].float().exp(), zeros)

    # Two slots holding the same student id are one outcome: the later slot's mass joins the first, so the
    # KL compares p_T(v) = sum of both with p_S(v) once (K <= 21, the [N, K, K] comparison is cheap).
    same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)) & valid.unsqueeze(-1) & valid.unsqueeze(-2)   # [N, K, K]
    earlier = torch.ones(same.shape[-2:], dtype=torch.bool, device=same.device).tril(-1)   # j < i
    first = valid & ~(same & earlier).any(-1)
    p_t_k = torch.where(first, torch.where(same, p_t_k.unsqueeze(-2), 0.0).sum(-1), zeros)

    # log p_S(other) = logsumexp of the student's log-probs over every token *not* among the top-k. The
    # clamp keeps it finite when the student's logits are -inf there (a logsumexp of -inf has NaN grads).
    hit = torch.zeros_like(log_s).scatter_add(-1, ids, valid.to(log_s.dtype))
    log_s_other = torch.logsumexp(log_s.masked_fill(hit > 0, _MASKED).clamp(min=_MASKED), dim=-1)  # [N]
    # The student has no "other" outcome when the top-k covers its whole vocabulary (or the rest has
    # probability 0). Then p_T(other) can only be float rounding (1 - sum p_T is ~6e-8, not 0, on some
    # CPUs) or mass on strings the student cannot write, and p_T(other) * log p_S(other) would be
    # ~6e-8 * 1e30. The term is selected away and the teacher's top-k renormalised to 1 instead, which is
    # exactly the full forward KL and does not depend on how 1 - sum p_T happened to round.
    no_other = log_s_other <= _MASKED / 2                                     # [N]

    total = p_t_k.sum(-1, keepdim=True)
    # rounded API log-probs may sum to a hair over 1; scale down, never up, unless "other" is impossible
    p_t_k = p_t_k / torch.where(no_other.unsqueeze(-1), total, total.clamp(min=1.0)).clamp(min=1e-30)
    p_t_other = (1.0 - p_t_k.sum(-1)).clamp(min=0.0)                           # [N]

    log_p_t_k = torch.log(p_t_k.clamp(min=1e-30))
    kept = torch.where(first, p_t_k * (log_p_t_k - log_s_k), zeros).sum(-1)
    other = torch.where(
        (p_t_other > 0) & ~no_other, p_t_other * (torch.log(p_t_other.clamp(min=1e-30)) - log_s_other),
        torch.zeros_like(p_t_other))
    return reduce_selected(kept + other, reduction)


# ------------------------------------------------------------------------------------------------
# From stored API logprobs (strings) to student-id targets


@dataclass
class SparseStats:
    """How much of the teacher's signal survived the mapping; logged in the training record."""

    positions: int = 0        # teacher positions seen
    unaligned: int = 0        # teacher positions not starting at a student token boundary (skipped)
    entries: int = 0          # teacher top-k entries seen (incl. the chosen token)
    unmapped: int = 0         # entries whose string is not exactly one student token (mass -> "other")
    hard_positions: int = 0   # student completion positions trained with the hard label only
    unmapped_examples: list[str] = field(default_factory=list)   # a few strings, for the log

    def add(self, other: "SparseStats") -> None:
        for k in ("positions", "unaligned", "entries", "unmapped", "hard_positions"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.unmapped_examples = (self.unmapped_examples + other.unmapped_examples)[:10]

    def as_dict(self) -> dict[str, Any]:
        return {"positions": self.positions, "unaligned": self.unaligned, "entries": self.entries,
                "unmapped": self.unmapped, "hard_positions": self.hard_positions,
                "unmapped_examples": self.unmapped_examples}


def teacher_text(logprobs: list[dict]) -> str:
    """The teacher's answer text, exactly as its tokens spell it. Entries marked ``"special": true`` (a local
    teacher's end-of-turn token) are not text."""
    return "".join(str(t.get("token", "")) for t in logprobs if not t.get("special"))


def _single_token_id(tokenizer, s: str, memo: dict[str, int | None]) -> int | None:
    if s not in memo:
        ids = tokenizer.encode(s, add_special_tokens=False)
        # "\ufffd": part of a multi-byte character shown as the replacement character, not that character
        memo[s] = ids[0] if len(ids) == 1 and tokenizer.decode(ids) == s and "\ufffd" not in s else None
    return memo[s]


def _logsumexp(xs: list[float]) -> float:
    """log(sum(exp(x))): the log of the summed probability of entries that are one student token."""
    if len(xs) == 1:
        return xs[0]
    m = max(xs)
    if m == -math.inf:
        return m
    return m + math.log(sum(math.exp(x - m) for x in xs))


def sparse_targets_for_completion(
    logprobs: list[dict], completion_ids: list[int], completion_offsets: list[int], tokenizer, k_max: int = 21,
    memo: dict[str, int | None] | None = None,
) -> tuple[list[list[int]], list[list[float]], SparseStats]:
    """Per student completion token: (student ids, teacher log-probs) of the teacher's top-k there.

    ``logprobs``: the stored per-token list ``[{token, logprob, top_logprobs: [{token, logprob}]}]``.
    ``completion_ids``/``completion_offsets``: the student's tokens of the completion text (which must start
    with ``teacher_text(logprobs)``) and each token's start character. Returns two lists of length
    ``len(completion_ids)`` and the counts. ``k_max`` caps the entries kept per position (20 + the chosen
    token)."""
    memo = {} if memo is None else memo
    stats = SparseStats()
    start_to_pos = {off: j for j, off in enumerate(completion_offsets)}
    # per student position: student id -> log-probs of every teacher entry mapping to it (insertion order =
    # API order); summed at the end, so duplicates keep their total mass
    merged: list[dict[int, list[float]]] = [{} for _ in completion_ids]
    offset = 0
    for n, entry in enumerate(logprobs):
        tok = str(entry.get("token", ""))
        stats.positions += 1
        special = bool(entry.get("special"))
        # A special entry is not text: the local teacher's end-of-turn ("stop", the last entry) sits where
        # the student's own end-of-turn token starts; any other special token cannot be placed. An empty
        # token (the first bytes of a multi-byte character) starts where the next token starts: not placeable.
        stop = special and bool(entry.get("stop")) and n == len(logprobs) - 1
        j = start_to_pos.get(offset) if (tok and not special) or stop else None
        if not special:
            offset += len(tok)
        if j is None:
            stats.unaligned += 1
            continue
        alts = list(entry.get("top_logprobs") or [])
        # The sampled token is not always among the alternatives (temperature > 0); it carries mass too.
        if all(str(a.get("token")) != tok for a in alts):
            alts.append({"token": tok, "logprob": entry.get("logprob")})
        for a in alts:
            if a.get("logprob") is None:
                continue
            stats.entries += 1
            # the teacher's end-of-turn is the student's end-of-turn, whatever each tokenizer calls it
            sid = (completion_ids[j] if stop and str(a["token"]) == tok
                   else _single_token_id(tokenizer, str(a["token"]), memo))
            if sid is None:
                stats.unmapped += 1
                if len(stats.unmapped_examples) < 10:
                    stats.unmapped_examples.append(str(a["token"]))
                continue
            if sid not in merged[j]:
                if len(merged[j]) >= k_max:
                    continue
                merged[j][sid] = []
            merged[j][sid].append(float(a["logprob"]))
    ids_out = [list(m) for m in merged]
    lp_out = [[_logsumexp(lps) for lps in m.values()] for m in merged]
    for j, tid in enumerate(completion_ids):
        if not ids_out[j]:
            # No teacher distribution here (e.g. the end-of-turn token): learn the hard label, KL to one-hot = CE.
            ids_out[j], lp_out[j] = [tid], [0.0]
            stats.hard_positions += 1
    return ids_out, lp_out, stats


def pad_sparse_targets(per_example: list[tuple[list[list[int]], list[list[float]]]], seq_len: int,
                       starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-example completion targets into [B, seq_len, K] tensors placed at the *label* positions
    (``starts[b]`` = index of the first completion token in example b); empty slots get id -1."""
    k = max((len(ids) for ids_list, _ in per_example for ids in ids_list), default=1)
    out_ids = torch.full((len(per_example), seq_len, k), -1, dtype=torch.long)
    out_lp = torch.zeros((len(per_example), seq_len, k), dtype=torch.float32)
    for b, ((ids_list, lp_list), s) in enumerate(zip(per_example, starts)):
        for j, (ids, lps) in enumerate(zip(ids_list, lp_list)):
            if s + j >= seq_len:
                break
            out_ids[b, s + j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            out_lp[b, s + j, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
    return out_ids, out_lp
