"""Recipe: train a generative student (an open causal LM, LoRA by default) on a teacher's outputs.

    from distill.student_config import LMStudentConfig
    from distill.recipes.train_causal_lm import train_lm
    train_lm(Project.open("my-project"), LMStudentConfig(loss="sft", max_steps=200), "my-project/models/lm")

Reads top to bottom: examples -> tokens -> model (+ LoRA) -> loop (accumulate, step, log, checkpoint)
-> save adapter + record. The losses (one module each, with their papers) are:

==============  ==============================================  ==========================================
loss            what the teacher must provide                   module
==============  ==============================================  ==========================================
sft             its answer text (any teacher, any tokenizer)    distill.losses.sequence (Kim & Rush 2016)
kd_forward      a local teacher model with the same tokenizer   distill.losses.kl.forward_kl
kd_reverse      same                                            distill.losses.kl.reverse_kl
jsd             same (``beta``: 0 forward ... 1 reverse KL)     distill.losses.kl.generalized_jsd (GKD)
  + on_policy   same; a share of steps trains on answers the     ``student_samples`` below (GKD, on-policy)
                student samples itself
sparse_topk     stored ``top_logprobs`` (k <= 20; API or local) distill.losses.sparse_topk
step_by_step    a rationale with each answer                    distill.losses.rationale (Hsieh 2023)
==============  ==============================================  ==========================================

Why a plain PyTorch loop and not ``transformers.Trainer``: three things this recipe must guarantee are
simpler to see than to configure. (1) Gradient-accumulation invariance: every micro-batch loss is a *sum*
over tokens divided by the completion-token count of the whole optimizer step, so batch 8 x accumulation
1 and batch 1 x accumulation 8 give the same gradient (Trainer gets this right only when a custom
compute_loss handles ``num_items_in_batch`` itself). (2) Exact resume after ``kill -9``: the data order is
a pure function of (seed, epoch), and a checkpoint holds the trainable weights, optimizer, scheduler and
RNG state, written to a temporary folder and renamed into place, so a resumed run repeats the
uninterrupted one. (3) Teacher logits (local model or sparse API log-probs) enter the loss directly.
Memory knobs (``LMStudentConfig``): ``gradient_checkpointing`` (recompute activations in backward),
``base_dtype`` (bf16 frozen base on a GPU) and ``quantize_base: 4bit`` (QLoRA; CUDA + bitsandbytes only,
refused up front elsewhere). ``packing`` (sft) lays several examples end to end in each row: less padding.

Several processes (``distill train PROJECT --processes N``, torchrun, accelerate launch; ``distributed``):
each optimizer step is still the global ``step_indices`` batch; each process takes a disjoint share of it,
the completion-token count that divides the loss is summed over all shares first, and the gradients are
summed after accumulation -- so N processes x 1/N of the examples give the gradient of 1 process x all of
them, and the loss curve of one process up to float summation order. Only rank 0 writes (checkpoints, with
every rank's RNG state; the adapter; the record), and every rank resumes from that checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import SafetensorError

from distill.errors import DistillError, write_failed
from distill.fsutil import write_json_atomic
from distill.losses.kl import check_same_tokenizer, forward_kl, generalized_jsd, reverse_kl
from distill.losses.rationale import PREFIXES, step_by_step_loss
from distill.losses.sequence import IGNORE, next_token_view, sequence_kd_loss, shifted_labels
from distill.losses.sparse_topk import (
    SparseStats,
    pad_sparse_targets,
    sparse_targets_for_completion,
    sparse_topk_kd_loss,
    teacher_text,
)
from distill.recipes.distributed import Processes, join
from distill.student_config import LOGIT_LOSSES, LMStudentConfig, json_ready
from distill.students.causal_lm import (
    student_messages,
    Encoded,
    add_lora,
    check_quantize_base,
    encode_example,
    has_chat_template,
    load_base,
    pad_batch,
    prepare_for_training,
    resolve_base_dtype,
    write_student_info,
)

RECORD_FILE = "training_record.json"


# ``student:`` of an extract/generate project: every field with its default and why is in
# ``distill.student_config.LMStudentConfig`` (or ``distill train --help``).
LMTrainConfig = LMStudentConfig    # the name older code imports


@dataclass
class LMExample:
    """One training example: the prompt as chat messages and the target text."""

    id: str
    messages: list[dict[str, str]]   # system + user, as the teacher saw them (``task.render_messages``)
    answer: str                      # the teacher's answer as text
    rationale: str | None = None     # step_by_step's second task
    logprobs: list[dict] | None = None  # sparse_topk: per-token {token, logprob, top_logprobs}


def examples_from_rows(spec, rows: Sequence[Any]) -> list[LMExample]:
    """``dataset.Row``s -> examples, prompts rendered exactly as for the teacher (without rationale request)."""
    from distill.task import answer_text, render_messages

    out = []
    for r in rows:
        if r.answer is None:
            continue
        out.append(LMExample(id=r.id, messages=render_messages(spec, r.text, r.segment, r.meta),
                             answer=answer_text(spec.kind, r.answer), rationale=r.rationale, logprobs=r.logprobs))
    return out


def examples_from_project(project, teacher: str | None = None) -> list[LMExample]:
    """The kept, uncontaminated train rows of a project with the teacher's (or corrected) answers."""
    from distill.dataset import rows

    name = project.spec.get_teacher(teacher).name
    ex = examples_from_rows(project.spec, rows(project, name, splits=("train",)))
    if not ex:
        raise DistillError(f"{project.root}: no labelled training rows for teacher '{name}'",
                           hint="run `distill label` (and `distill filter`) first")
    return ex


def data_hash(examples: Sequence[LMExample]) -> str:
    blob = json.dumps([asdict(e) for e in sorted(examples, key=lambda e: e.id)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Examples -> tokens


@dataclass
class Prepared:
    main: Encoded                                      # the answer (with "[label] " prefix for step_by_step)
    rationale: Encoded | None = None                   # step_by_step only
    sparse: tuple[list[list[int]], list[list[float]]] | None = None   # sparse_topk only

    def tokens(self) -> int:
        return len(self.main.input_ids) + (len(self.rationale.input_ids) if self.rationale else 0)


def _with_prefix(messages: list[dict[str, str]], prefix: str) -> list[dict[str, str]]:
    return [dict(m, content=prefix + m["content"]) if m["role"] == "user" else m for m in messages]


def prepare(examples: Sequence[LMExample], tokenizer, cfg: LMStudentConfig) -> tuple[list[Prepared], dict[str, Any]]:
    """Tokenise every example once. Returns the items and counts for the training record."""
    items: list[Prepared] = []
    stats = SparseStats()
    memo: dict[str, int | None] = {}
    truncated = with_rationale = 0
    for ex in examples:
        ex = replace(ex, messages=student_messages(ex.messages, cfg.prompt))
        if cfg.loss == "step_by_step":
            main = encode_example(tokenizer, _with_prefix(ex.messages, PREFIXES["label"]), ex.answer, cfg.max_length)
            rat = None
            if ex.rationale:
                with_rationale += 1
                rat = encode_example(tokenizer, _with_prefix(ex.messages, PREFIXES["rationale"]), ex.rationale,
                                     cfg.max_length)
                truncated += rat.truncated
            items.append(Prepared(main, rat))
        elif cfg.loss == "sparse_topk":
            # Train on the teacher's text exactly as its tokens spell it, so the positions line up.
            text = teacher_text(ex.logprobs) if ex.logprobs else ex.answer
            main = encode_example(tokenizer, ex.messages, text, cfg.max_length, want_offsets=True)
            completion_ids = main.input_ids[main.completion_start:]
            ids, lps, st = sparse_targets_for_completion(ex.logprobs or [], completion_ids,
                                                         main.completion_offsets[: len(completion_ids)], tokenizer,
                                                         memo=memo)
            stats.add(st)
            items.append(Prepared(main, sparse=(ids, lps)))
        else:
            main = encode_example(tokenizer, ex.messages, ex.answer, cfg.max_length)
            items.append(Prepared(main))
        truncated += main.truncated
    info: dict[str, Any] = {"examples": len(items), "truncated": truncated}
    if cfg.loss == "step_by_step":
        if with_rationale == 0:
            raise DistillError("loss 'step_by_step' needs teacher rationales, and no training row has one",
                               hint="set `rationale: true` on the teacher and relabel, or use loss: sft")
        info["with_rationale"] = with_rationale
    if cfg.loss == "sparse_topk":
        if stats.positions == 0:
            raise DistillError("loss 'sparse_topk' needs stored teacher logprobs, and no training row has any",
                               hint="set `logprobs: true` and `top_logprobs: 5` (<= 20) on the teacher and relabel")
        info["sparse"] = stats.as_dict()
    return items, info


def completion_tokens(enc: Encoded) -> int:
    """Tokens that carry loss after the next-token shift (labels[1:] != -100)."""
    return sum(1 for x in enc.labels[1:] if x != IGNORE)


# ------------------------------------------------------------------------------------------------
# One optimizer step's worth of gradient


def accumulate_gradients(model, items: Sequence[Prepared], cfg: LMStudentConfig, pad_id: int, device: str,
                         teacher=None, autocast=nullcontext, procs: Processes = Processes()) -> float:
    """Forward + backward over ``items`` in micro-batches of ``cfg.batch_size`` (``micro_batches``), leaving the
    summed gradient in ``.grad``. Each micro-batch's token-summed loss is divided by the completion tokens of
    *all* items, so the result does not depend on how the items are split (the accumulation invariance).
    With several processes ``items`` is this process's share of the step, and the count is over every
    share. Returns the loss of the whole step (mean per completion token, summed over the processes)."""
    n_main, n_rat = procs.sum([sum(completion_tokens(it.main) for it in items),
                               sum(completion_tokens(it.rationale) for it in items if it.rationale)])
    n_main, n_rat = max(int(n_main), 1), max(int(n_rat), 1)
    total = 0.0
    for rows in micro_batches(items, cfg.batch_size, cfg.max_length if cfg.packing else None):
        with autocast():
            if cfg.packing:
                loss = packed_sft_loss(model, rows, pad_id, device, n_main)
            else:
                loss = micro_batch_loss(model, [row[0] for row in rows], cfg, pad_id, device, teacher, n_main, n_rat)
        loss.backward()
        total += float(loss.detach())
    return procs.sum([total])[0]


def _forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def micro_batch_loss(model, chunk: Sequence[Prepared], cfg: LMStudentConfig, pad_id: int, device: str, teacher,
                     n_main: int, n_rat: int) -> torch.Tensor:
    batch = {k: v.to(device) for k, v in pad_batch([it.main for it in chunk], pad_id).items()}
    full = _forward(model, batch)
    if cfg.loss == "sft":   # labels shifted instead of logits: no copy of the [B, T, V] logits
        return sequence_kd_loss(full, shifted_labels(batch["labels"]), reduction="sum") / n_main
    logits, labels = next_token_view(full, batch["labels"])
    if cfg.loss in LOGIT_LOSSES:
        with torch.no_grad():
            t_logits = _forward(teacher, batch)[:, :-1]
        if cfg.loss == "kd_forward":
            return forward_kl(logits, t_logits, labels, cfg.temperature, reduction="sum") / n_main
        if cfg.loss == "kd_reverse":
            return reverse_kl(logits, t_logits, labels, cfg.temperature, reduction="sum") / n_main
        return generalized_jsd(logits, t_logits, labels, cfg.beta, cfg.temperature, reduction="sum") / n_main
    if cfg.loss == "sparse_topk":
        t_ids, t_lps = pad_sparse_targets([it.sparse for it in chunk], batch["input_ids"].shape[1],
                                          [it.main.completion_start for it in chunk])
        # targets sit at label positions, so they shift exactly like the labels do
        return sparse_topk_kd_loss(logits, t_ids[:, 1:].to(device), t_lps[:, 1:].to(device), labels,
                                   reduction="sum") / n_main
    # step_by_step: the label task on this chunk, plus the rationale task for the rows that have one
    rats = [it.rationale for it in chunk if it.rationale is not None]
    r_logits = r_labels = None
    if rats:
        rb = {k: v.to(device) for k, v in pad_batch(rats, pad_id).items()}
        r_logits, r_labels = next_token_view(_forward(model, rb), rb["labels"])
    return step_by_step_loss(logits, labels, r_logits, r_labels, cfg.lambda_rationale,
                             label_tokens=n_main, rationale_tokens=n_rat)


def is_on_policy_step(step: int, cfg: LMStudentConfig) -> bool:
    """Whether optimizer step ``step`` trains on student-sampled answers: a pure function of (seed, step),
    so a resumed run makes the same choices."""
    return cfg.on_policy > 0 and random.Random(cfg.seed * 1_000_003 + step).random() < cfg.on_policy


@torch.no_grad()
def student_samples(model, items: Sequence[Prepared], tokenizer, step: int, cfg: LMStudentConfig,
                    device: str, rank: int = 0) -> list[Prepared]:
    """On-policy data (Agarwal et al. 2024, GKD, arXiv 2306.13649, sec. 3): for each item, the student samples
    its own answer to the same prompt (temperature 1, no top-k/top-p), at most as long as the teacher's
    answer plus a margin; the logit loss then makes the teacher grade every token the student would
    actually write, which fixes the train/inference mismatch of learning only from fixed sequences.
    Sampling runs under a forked RNG seeded by (seed, step): reproducible, it leaves the training RNG
    stream (dropout) untouched, so resume after a crash still repeats the uninterrupted run. With several
    processes, rank r > 0 samples its share from its own stream (seed, step, r); rank 0's is the one above.
    So on-policy steps are reproducible for a given number of processes, but not the same samples as one
    process draws (that would need every process to sample the whole step in order)."""
    from distill.models import stop_token_ids

    stop = stop_token_ids(tokenizer)
    # never sample the padding rows of an embedding matrix larger than the vocabulary (real models pad to
    # a multiple of 64/128): those ids mean nothing, and a teacher with a smaller matrix cannot score them
    n_vocab, n_rows = len(tokenizer), model.get_output_embeddings().weight.shape[0]
    padding_rows = list(range(n_vocab, n_rows)) or None
    was_training = model.training
    model.eval()
    out: list[Prepared] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1_000_003 + step + (rank << 40))
        for it in items:
            prompt = it.main.input_ids[: it.main.completion_start]
            budget = min(completion_tokens(it.main) + 16, max(1, cfg.max_length - len(prompt)))
            ids = torch.tensor([prompt], device=device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=budget, eos_token_id=stop or None,
                                 pad_token_id=tokenizer.pad_token_id, use_cache=True, suppress_tokens=padding_rows)
            new = gen[0, len(prompt):].tolist()
            enc = Encoded(input_ids=prompt + new, labels=[IGNORE] * len(prompt) + new, completion_start=len(prompt),
                          completion_text=tokenizer.decode(new), completion_offsets=[], truncated=False)
            out.append(Prepared(enc))
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------
# Forward passes, and packing (sft)


def micro_batches(items: Sequence[Prepared], batch_size: int,
                  pack_to: int | None = None) -> list[list[list[Prepared]]]:
    """The forward passes of one step: each a list of up to ``batch_size`` rows, each row the sequences laid
    end to end in it -- one sequence per row, or, with ``pack_to`` (packing), as many as fit in that many
    tokens (``pack``)."""
    rows = pack(items, pack_to) if pack_to else [[it] for it in items]
    return [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]


def pack(items: Sequence[Prepared], max_length: int) -> list[list[Prepared]]:
    """The step's sequences in as few rows of <= ``max_length`` tokens as they fit in, balanced so that the
    rows come out about equally long: a forward pass pads to its longest row, so first-fit's half-empty
    last row would be mostly padding. The fewest rows the tokens need; each sequence, longest first, into
    the row with the fewest tokens so far; one more row if that overfills one. Deterministic (ties keep the
    step's order); each sequence was already cut to ``max_length``, so one row per sequence always fits."""
    lengths = [len(it.main.input_ids) for it in items]
    order = sorted(range(len(items)), key=lambda i: -lengths[i])      # sorted() is stable
    n_rows = max(1, math.ceil(sum(lengths) / max_length))
    while True:
        rows: list[list[Prepared]] = [[] for _ in range(n_rows)]
        fill = [0] * n_rows
        for i in order:
            r = min(range(n_rows), key=fill.__getitem__)
            rows[r].append(items[i])
            fill[r] += lengths[i]
        if max(fill) <= max_length:
            return [row for row in rows if row]
        n_rows += 1


def padded_tokens(batches: list[list[list[Prepared]]]) -> int:
    """Token positions those forward passes compute, padding included: each pass is padded to its longest
    row (answer sequences only; step_by_step's rationale passes are not counted)."""
    return sum(len(rows) * max(sum(len(it.main.input_ids) for it in row) for row in rows) for rows in batches)


def packed_batch(rows: Sequence[Sequence[Prepared]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows as tensors ``input_ids``, ``labels``, ``position_ids`` [R, T], right-padded to the longest row.

    Position ids restart at 0 with every sequence, and there is no attention_mask: that is transformers'
    packed format (``masking_utils.find_packed_sequence_indices``, what TRL's ``padding_free`` sends): each
    sequence gets its own causal block (SDPA and eager build the block-diagonal mask, FlashAttention runs
    variable-length). The first label of every sequence is ignored, so no sequence is trained to predict the
    next one's first token (a prompt token, ignored anyway). Padding has label -100 and position 0."""
    t = max(sum(len(it.main.input_ids) for it in row) for row in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), t), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), t), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for it in row:
            e, n = it.main, len(it.main.input_ids)
            ids[b, at: at + n] = torch.tensor(e.input_ids)
            lab[b, at: at + n] = torch.tensor([IGNORE] + e.labels[1:])
            pos[b, at: at + n] = torch.arange(n)
            at += n
    return {"input_ids": ids, "labels": lab, "position_ids": pos}


def packed_sft_loss(model, rows: Sequence[Sequence[Prepared]], pad_id: int, device: str, n_main: int) -> torch.Tensor:
    """The sft loss of packed rows: the same token-summed cross-entropy as ``micro_batch_loss``, so packing
    changes which tensors are built, not the loss."""
    batch = {k: v.to(device) for k, v in packed_batch(rows, pad_id).items()}
    # use_cache=False: with a KV cache transformers does not look for packed sequences, and they would see
    # each other (the recipe turns the cache off anyway; said here because this forward depends on it)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return sequence_kd_loss(logits, shifted_labels(batch["labels"]), reduction="sum") / n_main


@torch.no_grad()
def check_packing(model, items: Sequence[Prepared], device: str) -> None:
    """Packing is right only if the model's attention honours packed position ids; one that builds its own
    mask (an architecture outside transformers' masking utilities, a custom attention) would let sequences
    see each other without any error. So before training: two training sequences (their first 16 tokens)
    must get the same logits packed in one row as each alone. In eval mode: no dropout, no RNG used."""
    if len(items) < 2:
        return
    a, b = (list(it.main.input_ids[:16]) for it in items[:2])
    was_training = model.training
    model.eval()
    alone = model(input_ids=torch.tensor([b], device=device), use_cache=False).logits[0].float()
    packed = model(input_ids=torch.tensor([a + b], device=device), use_cache=False,
                   position_ids=torch.tensor([list(range(len(a))) + list(range(len(b)))], device=device)
                   ).logits[0, len(a):].float()
    model.train(was_training)
    # fp32 agrees to ~1e-6 of the logit scale, a bf16 base to ~1e-2; attending across sequences is O(1)
    err = float((packed - alone).abs().max()) / max(float(alone.abs().max()), 1e-6)
    if err > 0.05:
        raise DistillError(f"packing does not work with {type(model).__name__}: a sequence packed after another "
                           f"gets different logits than alone (relative difference {err:.2f}), so it attends "
                           "across the boundary", hint="set packing: false for this base model")


# ------------------------------------------------------------------------------------------------
# Data order, checkpoints


def step_indices(step: int, n: int, per_step: int, seed: int) -> list[int]:
    """The example indices of optimizer step ``step``: a pure function of (seed, epoch), so a resumed run
    sees exactly the batches the uninterrupted run would have. The last step of an epoch may be smaller."""
    steps_per_epoch = math.ceil(n / per_step)
    epoch, within = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return perm[within * per_step : (within + 1) * per_step]


def _trainable_state(model, full: bool) -> dict[str, torch.Tensor]:
    if full:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def _load_trainable_state(model, state: dict[str, torch.Tensor], full: bool) -> None:
    if full:
        model.load_state_dict(state)
        return
    from peft import set_peft_model_state_dict

    res = set_peft_model_state_dict(model, state)
    unexpected = getattr(res, "unexpected_keys", [])
    if unexpected:
        raise DistillError(f"checkpoint does not match the model (unexpected keys {unexpected[:3]})",
                           hint="the checkpoint was written by another model/LoRA setup; use a new output folder")


def rng_state() -> dict[str, Any]:
    """This process's random state: torch (dropout), Python, and CUDA when there is a GPU."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save_checkpoint(ckpt_root: Path, step: int, model, opt, sched, cfg: LMStudentConfig, state: dict,
                    rngs: list[dict[str, Any]] | None = None) -> Path:
    """Write checkpoint ``step-NNNNNN`` atomically (temp folder + rename): a kill at any moment leaves either
    the previous checkpoint set or the new one, never a half-written folder that resume would trust.
    ``rngs``: every process's ``rng_state()`` in rank order (default: this process's). Rank 0's is stored as
    one process stores it; the others' under ``other_ranks``, since each process draws its own dropout."""
    final = ckpt_root / f"step-{step:06d}"
    tmp = None
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".step-{step:06d}.", suffix=".tmp"))
        torch.save(_trainable_state(model, cfg.full_finetune), tmp / "trainable.pt")
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optim.pt")
        rngs = rngs or [rng_state()]
        rng = dict(rngs[0], other_ranks=rngs[1:]) if len(rngs) > 1 else rngs[0]
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")   # written last: marks completeness
    except (OSError, RuntimeError) as e:
        # disk full / `ulimit -f` (torch.save says RuntimeError "unexpected pos"): the temp folder goes, the
        # previous checkpoints stay, and the run can resume from the newest of them
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed("the training checkpoint", final, e) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    # while training, at least the newest checkpoint stays (resume needs it); keep_checkpoints = 0 only
    # means "none once the run has finished" (prune_checkpoints)
    prune_checkpoints(ckpt_root, max(1, cfg.keep_checkpoints))
    return final


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (the folder too when ``keep`` is 0)."""
    ckpts = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in ckpts[: len(ckpts) - keep]:
        shutil.rmtree(old, ignore_errors=True)
    if keep == 0:
        shutil.rmtree(ckpt_root, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpts = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and (p / "state.json").exists())
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, model, opt, sched, cfg: LMStudentConfig, rank: int = 0) -> dict:
    # weights_only: a checkpoint folder may come from elsewhere (a copied project); unpickling it could run code
    trainable = torch.load(path / "trainable.pt", map_location="cpu", weights_only=True)
    _load_trainable_state(model, trainable, cfg.full_finetune)
    o = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(o["optimizer"])
    sched.load_state_dict(o["scheduler"])
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    others = rng.get("other_ranks", [])
    if 0 < rank <= len(others):
        rng = others[rank - 1]
    # (resumed on more processes than wrote the checkpoint: the new ranks start from rank 0's state)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------
# The recipe


def train_lm(project_or_examples, config: LMStudentConfig, output_dir: str | Path, *, teacher: str | None = None,
             teacher_model: tuple[Any, Any] | None = None, log: Callable[[str], None] | None = print,
             on_start: Callable[[Any], None] | None = None,
             on_step: Callable[[int, dict, Any], None] | None = None) -> dict[str, Any]:
    """Train a causal-LM student and return its training record (also written to ``output_dir``).

    ``project_or_examples``: a ``Project`` (its kept train rows for ``teacher``) or a list of ``LMExample``.
    ``teacher_model``: an already loaded ``(model, tokenizer)`` for the logit losses; otherwise
    ``config.teacher_model`` is loaded. ``on_start(model)`` is called before the first step and
    ``on_step(step, entry, model)`` after every optimizer step (tests snapshot weights and simulate
    crashes). Re-running with the same ``output_dir`` resumes from the latest checkpoint; a finished
    ``output_dir`` is refused rather than overwritten. Launched on several processes (``distributed``),
    every process calls this with the same arguments; ``log`` is used and files are written on rank 0 only,
    ``on_start`` / ``on_step`` run on every rank, and every rank returns the record."""
    from distill import runinfo
    from distill.models import pick_device

    cfg = config
    out = Path(output_dir)
    if (out / RECORD_FILE).exists() and json.loads((out / RECORD_FILE).read_text()).get("status") == "done":
        raise DistillError(f"{out}: a finished training run is already there",
                           hint="choose another output folder (finished models are never overwritten)")
    device = pick_device(cfg.device)
    check_quantize_base(cfg.quantize_base, device)      # QLoRA without CUDA/bitsandbytes: fail before any work
    procs = join(device)                                # 1 of 1 unless launched on several processes
    if procs.world > 1:
        device = "cpu" if procs.device.type == "cpu" else str(procs.device)    # cuda:LOCAL_RANK
    log = log if procs.main else None
    ckpt_root = out / "checkpoints"
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        # Half-written folders of a killed run (their names start with '.'; complete ones never do).
        for junk in [*ckpt_root.glob(".step-*.tmp"), *out.glob(".adapter.*.tmp"), *out.glob(".model.*.tmp")]:
            shutil.rmtree(junk, ignore_errors=True)
    procs.barrier()     # the others look for a checkpoint only once rank 0 has removed the half-written ones

    # 1. data
    project = None
    if hasattr(project_or_examples, "spec") and hasattr(project_or_examples, "store"):
        project = project_or_examples
        examples = examples_from_project(project, teacher)
    else:
        examples = list(project_or_examples)
        if not examples:
            raise DistillError("no training examples were given", hint="label some inputs first")
    dhash = data_hash(examples)

    # 2. models
    if device == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    use_bf16 = (cfg.bf16 is True or (cfg.bf16 == "auto" and device.startswith("cuda"))) and \
        device.startswith("cuda") and torch.cuda.is_bf16_supported()
    # What accelerate's mixed_precision="bf16" does, on each process's own GPU. The config decides, not a
    # launcher's --mixed_precision flag: bf16 changes the weights, so it belongs to the run's settings.
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    quantized = cfg.quantize_base != "none"
    base_dtype = "bfloat16" if quantized else resolve_base_dtype(cfg.base_dtype, device, cfg.full_finetune)
    model, tok = load_base(cfg.base_model, device=device, dtype=base_dtype, quantize=cfg.quantize_base)
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    t_model = None
    if cfg.loss in LOGIT_LOSSES:
        if teacher_model is None:
            if not cfg.teacher_model:
                raise DistillError(f"loss '{cfg.loss}' needs a local teacher model to compute logits",
                                   hint="set student.teacher_model to a packaged name or folder with the student's "
                                        "tokenizer, or use loss: sft / sparse_topk")
            from distill.models import load_causal_lm

            teacher_model = load_causal_lm(cfg.teacher_model, device=device)
        t_model, t_tok = teacher_model
        check_same_tokenizer(tok, t_tok, cfg.loss)
        t_model.to(device).eval()
    items, data_info = prepare(examples, tok, cfg)

    model = prepare_for_training(model, quantized, cfg.gradient_checkpointing)
    if cfg.packing:
        check_packing(model, items, device)     # the base's attention decides whether packing is honoured
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are random: same seed, same start
    if cfg.full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    if not quantized:       # a 4-bit model was placed on its device while loading and cannot be moved
        model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    per_step = cfg.batch_size * cfg.grad_accum
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(len(items) / per_step)
    warm = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total_steps - s) / max(1, total_steps - warm)))

    # 3. resume
    identity = {"config": cfg.identity(), "data_hash": dhash}
    start, history = 0, []
    ck = latest_checkpoint(ckpt_root)
    if ck is not None:
        st = json.loads((ck / "state.json").read_text(encoding="utf-8"))
        if st.get("identity") != identity:
            raise DistillError(f"{ck}: checkpoint from different settings or data; not resuming from it",
                               hint=f"use a new output folder, or delete {ckpt_root} to start over")
        st = load_checkpoint(ck, model, opt, sched, cfg, rank=procs.rank)
        start, history = st["step"], st["history"]
        if log:
            log(f"resuming from {ck.name} (step {start}/{total_steps})")

    # 4. loop
    pad_id = tok.pad_token_id
    if on_start:
        on_start(model)
    t_train = time.perf_counter()
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        batch_items = [items[i] for i in step_indices(step, len(items), per_step, cfg.seed)]
        mine = procs.shard(batch_items)         # all of them with one process
        on_policy = is_on_policy_step(step, cfg)
        if on_policy:
            mine = student_samples(model, mine, tok, step, cfg, device, rank=procs.rank)
        loss = accumulate_gradients(model, mine, cfg, pad_id, device, t_model, autocast, procs)
        procs.sum_gradients(params)             # every process now holds the whole step's gradient
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if cfg.max_grad_norm else None
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        # tokens (what was learned from), and the positions the forward passes computed with padding
        # (and, packing, would have computed without it): throughput and the padding packing saves
        counts = [sum(it.tokens() for it in mine), padded_tokens(micro_batches(mine, cfg.batch_size))]
        if cfg.packing:
            counts.append(padded_tokens(micro_batches(mine, cfg.batch_size, cfg.max_length)))
        counts = [int(c) for c in procs.sum(counts)]
        dt = time.perf_counter() - t0
        ntok = counts[0]
        entry = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": ntok, "on_policy": on_policy,
                 "step_s": dt, "tokens_per_s": ntok / dt if dt > 0 else None, "padded_tokens": counts[-1]}
        if cfg.packing:
            entry["padded_tokens_without_packing"] = counts[1]
        history.append(entry)
        if log and ((step + 1) % cfg.log_every == 0 or step + 1 == total_steps or step == start):
            log(f"step {step + 1}/{total_steps}  loss {loss:.4f}  lr {lr:.2e}  {entry['tokens_per_s']:.0f} tok/s")
        if (step + 1) % cfg.save_every == 0 or step + 1 == total_steps:
            rngs = procs.gather(rng_state())    # each process's dropout stream, so that each one resumes it
            if procs.main:
                save_checkpoint(ckpt_root, step + 1, model, opt, sched, cfg,
                                {"step": step + 1, "history": history, "identity": identity}, rngs)
        if on_step:
            on_step(step + 1, entry, model)
    train_s = time.perf_counter() - t_train

    # 5. save the student and its record
    model.eval()
    info = {"base_model": cfg.base_model, "loss": cfg.loss, "format": "chat" if has_chat_template(tok) else "plain",
            "input_prefix": PREFIXES["label"] if cfg.loss == "step_by_step" else "", "prompt": cfg.prompt,
            "data_hash": dhash}
    final_dir = out / ("model" if cfg.full_finetune else "adapter")
    if procs.main:
        save_student(model, tok, cfg, info, final_dir)
    timed = [h for h in history[1:]] or history  # the first step pays for warm-up allocations
    record = {
        "status": "done", "kind": "train_lm", "path": str(final_dir), "config": cfg.model_dump(), "data_hash": dhash,
        "data": data_info, "steps": total_steps, "resumed_from": start or None, "history": history,
        "final_loss": history[-1]["loss"] if history else None,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "mean_step_s": sum(h["step_s"] for h in timed) / len(timed) if timed else None,
        "tokens_per_s": sum(h["tokens"] for h in timed) / sum(h["step_s"] for h in timed) if timed else None,
        "train_s_this_process": train_s, "device": device, "bf16": use_bf16, "processes": procs.world,
        "base_dtype": base_dtype, "quantize_base": cfg.quantize_base, "student": info,
        "environment": runinfo.environment(),
    }
    try:
        from distill.models import resolve_model

        record["base_provenance"] = resolve_model(cfg.base_model).provenance()
    except DistillError:
        record["base_provenance"] = None
    if cfg.loss == "sft":
        record["padding"] = padding_summary(history)
    record = json_ready(record)                              # NaN/inf -> null: JSON has no NaN
    if procs.main:
        write_json_atomic(out / RECORD_FILE, record)
        prune_checkpoints(ckpt_root, cfg.keep_checkpoints)     # after the record: a finished run needs none of them
        if project is not None:
            # Called with a Project directly (not through lm_project, which passes examples and registers the
            # run under its own id): register the folder so `distill eval` finds it.
            project.record_run(f"lm-{out.name}-{dhash[:8]}", "train_lm", "done", final_dir, record)
    procs.barrier()     # no process returns before the student and its record are on disk
    return record


def save_student(model, tok, cfg: LMStudentConfig, info: dict[str, Any], final_dir: Path) -> None:
    """The adapter (or the whole model) + tokenizer + student info, written to a temporary folder and renamed
    to ``final_dir``: a full disk or a kill never leaves a half-written student."""
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.", suffix=".tmp"))
        model.save_pretrained(tmp)
        adapter_cfg = tmp / "adapter_config.json"
        if adapter_cfg.exists():
            # peft records the base it was given: here the converted-GGUF cache folder, an absolute path on this
            # machine. The name the user wrote (a packaged name, or their own folder) is what loads elsewhere.
            acfg = json.loads(adapter_cfg.read_text(encoding="utf-8"))
            acfg["base_model_name_or_path"] = cfg.base_model
            adapter_cfg.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tok.save_pretrained(tmp)
        write_student_info(tmp, info)
    except (OSError, RuntimeError, SafetensorError) as e:     # disk full, ulimit -f: never a half-written model
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed("the trained student", final_dir, e) from None
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)


def padding_summary(history: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """sft runs: per optimizer step, the tokens learned from and the token positions the forward passes
    computed (padding included), and the share that was padding; with packing also what the same steps
    would have computed unpacked, and the share of computed positions packing saved."""
    steps = [h for h in history if "padded_tokens" in h]     # (a checkpoint from before this was recorded)
    if not steps:
        return None
    n, tokens, padded = len(steps), sum(h["tokens"] for h in steps), sum(h["padded_tokens"] for h in steps)
    out = {"tokens_per_step": tokens / n, "padded_tokens_per_step": padded / n, "padding_fraction": 1 - tokens / padded}
    if all("padded_tokens_without_packing" in h for h in steps):
        unpacked = sum(h["padded_tokens_without_packing"] for h in steps)
        out.update({"padded_tokens_per_step_without_packing": unpacked / n,
                    "padding_fraction_without_packing": 1 - tokens / unpacked,
                    "computed_positions_saved": 1 - padded / unpacked})
    return out
