"""The ``student:`` block of distill.yaml: one typed config per kind of student.

    distill train --help          # lists every setting below with its type, default and why

- ``EncoderStudentConfig`` (``kind: classify``): a small encoder with a classification head, trained by
  ``recipes/train_classifier.py`` on the teacher's label distribution.
- ``LMStudentConfig`` (``kind: extract | generate``): an open causal LM, LoRA by default, trained by
  ``recipes/train_causal_lm.py`` on the teacher's answers (or its logits).

The same thing has the same name in both (``base_model``, ``learning_rate``, ``epochs``, ``batch_size``,
``max_length``, ``weight_decay``, ``temperature``, ``seed``, ``device``, ``keep_checkpoints``), so moving
between kinds does not mean relearning the knobs. Older files may say ``base`` for ``base_model`` and
``lr`` for ``learning_rate``; both are read, and giving both names of one setting is an error.

Like the rest of the spec (``task.py``) unknown keys fail loudly, and types are strict: ``epochs: "4"`` is
refused rather than guessed at. ``load_spec`` validates ``student:`` against the config of the project's
kind, so a typo fails at ``Project.open`` with its field path, not minutes later at train time.

``TrainReport`` is what training either student returns (``distill.recipes.train.train``); it lives here,
below the recipes, so both recipes share it without importing the dispatcher that imports them.

This module is a bottom layer: it imports only pydantic, the standard library and ``distill.errors``.
"""

from __future__ import annotations

import math
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from distill.errors import DistillError

SIGNALS = ("hard", "soft", "mix", "gold")
LOSSES = ("sft", "kd_forward", "kd_reverse", "jsd", "sparse_topk", "step_by_step")
LOGIT_LOSSES = ("kd_forward", "kd_reverse", "jsd")
OLD_NAMES = {"base": "base_model", "lr": "learning_rate"}   # older name -> the name used now


def _canonical_names(raw: dict[str, Any]) -> dict[str, Any]:
    """``base`` -> ``base_model``, ``lr`` -> ``learning_rate``; a ValueError when both names of one setting
    are given (which one was meant cannot be known)."""
    out = dict(raw)
    for old, new in OLD_NAMES.items():
        if old in out:
            if new in out:
                raise ValueError(f"both `{old}` and `{new}` are set; keep one of them (`{old}` is the older "
                                 f"name of `{new}`)")
            out[new] = out.pop(old)
    return out


class _StudentConfig(BaseModel):
    """What both student configs share: strictness, the old names, validation into a DistillError."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Settings that do not change the trained weights, so they are not part of the run id.
    NOT_IN_IDENTITY: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return _canonical_names(data) if isinstance(data, dict) else data

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, where: str = "distill.yaml") -> Self:
        """From a ``student:`` mapping; unknown keys, wrong types and out-of-range values raise a DistillError
        that names the field (``where`` says which file or source it came from). Constructing the class
        directly validates the same way but raises pydantic's ValidationError."""
        try:
            return cls.model_validate(dict(raw or {}))
        except ValidationError as e:
            raise config_error(e, cls, where) from None

    def with_overrides(self, overrides: dict[str, Any] | None, where: str = "overrides") -> Self:
        """A copy with ``overrides`` (e.g. CLI flags) on top, validated like the file was."""
        if not overrides:
            return self
        try:
            over = _canonical_names(overrides)
        except ValueError as e:
            raise DistillError(f"{where}: {e}", hint="they name the same setting") from None
        return type(self).from_dict({**self.model_dump(), **over}, where)

    OMITTED_AT_DEFAULT: ClassVar[dict[str, Any]] = {}

    def identity(self) -> dict[str, Any]:
        """The settings that change the trained weights: part of the run id (and a checkpoint written under
        other settings is never resumed)."""
        d = self.model_dump(exclude=set(self.NOT_IN_IDENTITY))
        # settings added after runs existed, left out while at their default: a run trained before they
        # existed (which behaved exactly like the default) keeps its id, so it is reused, not retrained
        for k, v in self.OMITTED_AT_DEFAULT.items():
            if k in d and d[k] == v:
                del d[k]
        return d


# ------------------------------------------------------------------------------------------------
# classify


class EncoderStudentConfig(_StudentConfig):
    """``student:`` of a classify project (``recipes/train_classifier.py``). See ``distill train --help``."""

    NOT_IN_IDENTITY: ClassVar[frozenset[str]] = frozenset({"device", "keep_checkpoints"})

    base_model: str = Field("all-minilm-l6-v2", description="Encoder to start from: packaged name or local HF "
                            "folder (older name: base).")
    signal: Literal["hard", "soft", "mix", "gold"] = Field(
        "mix", description="What the student learns from: mix = alpha * KD on the teacher's distribution + "
        "(1 - alpha) * CE on its answer; soft = KD only; hard = CE on the answer; gold = CE on gold labels.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="mix: weight of the KD term (1 = pure KD, 0 = pure CE).")
    temperature: float = Field(2.0, gt=0.0, description="KD temperature; >1 exposes the teacher's runner-up labels.")
    label_smoothing: float = Field(0.0, ge=0.0, le=1.0, description="CE label smoothing; guards against "
                                   "confidently wrong teacher labels.")
    learning_rate: float = Field(1e-4, gt=0.0, description="Peak AdamW learning rate; 5e-5..2e-4 suits "
                                 "MiniLM-size encoders with a new head (older name: lr).")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps with linear LR warmup (protects "
                                "the pretrained weights early on).")
    epochs: int = Field(5, ge=1, description="Maximum passes over the training rows (early stopping may end sooner).")
    batch_size: int = Field(32, ge=1, description="Examples per step; bigger is faster per example but uses more "
                            "memory.")
    max_length: int = Field(64, ge=1, description="Tokens kept per input; longer inputs are truncated (cost grows "
                            "~linearly).")
    early_stopping_patience: int = Field(2, ge=0, description="Stop after this many epochs without validation "
                                         "improvement (0 = off).")
    early_stopping_metric: Literal["loss", "agreement"] = Field(
        "loss", description="loss | agreement: validation loss, or agreement with the training labels.")
    max_train_examples: int | None = Field(None, ge=2, description="Use at most this many training rows (a fixed, "
                                           "seeded subset); null = all.")
    seed: int = Field(0, description="Seeds the head init, data order and dropout: same seed, same model.")
    device: str = Field("auto", description="auto (GPU if available) | cpu | cuda | cuda:N.")
    keep_checkpoints: int = Field(0, ge=0, description="Epoch checkpoints kept after training finishes (0 = delete "
                                  "them; each is ~3x the model size). During training the best and the latest "
                                  "are always kept, so a killed run resumes.")


# ------------------------------------------------------------------------------------------------
# extract / generate


class LMStudentConfig(_StudentConfig):
    """``student:`` of an extract/generate project (``recipes/train_causal_lm.py``). See ``distill train --help``."""

    OMITTED_AT_DEFAULT: ClassVar[dict[str, Any]] = {"base_dtype": "auto", "quantize_base": "none", "packing": False}

    # gradient_checkpointing recomputes each layer's activations during backward instead of storing them:
    # the same maths in the same order (dropout masks replayed from the saved RNG state), so the weights
    # differ from a run without it only by float rounding -- a memory-for-time trade, not a different run.
    NOT_IN_IDENTITY: ClassVar[frozenset[str]] = frozenset(
        {"save_every", "keep_checkpoints", "log_every", "device", "cpu_threads", "gradient_checkpointing"})

    base_model: str = Field("smollm2-135m-instruct", description="Causal LM to start from: packaged name, HF folder "
                            "or .gguf; never a hub id (older name: base).")
    loss: Literal["sft", "kd_forward", "kd_reverse", "jsd", "sparse_topk", "step_by_step"] = Field(
        "sft", description="sft: the teacher's answer text (any teacher); kd_forward | kd_reverse | jsd: a local "
        "teacher's logits (same tokenizer); sparse_topk: stored API top_logprobs; step_by_step: rationales too.")
    teacher_model: str | None = Field(None, description="Local teacher for kd_forward / kd_reverse / jsd (same "
                                      "tokenizer as the student).")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd: teacher weight in the mixture; 0 = forward KL, "
                        "1 = reverse KL.")
    on_policy: float = Field(0.0, ge=0.0, le=1.0, description="Logit losses: share of steps trained on answers the "
                             "student samples itself (GKD's lambda).")
    temperature: float = Field(1.0, gt=0.0, description="Logit losses: softens both distributions.")
    lambda_rationale: float = Field(1.0, ge=0.0, description="step_by_step: weight of the rationale task (the paper "
                                    "uses 1).")
    lora_rank: int = Field(16, ge=1, description="Higher = more capacity, more memory; 8-64 typical.")
    lora_alpha: float = Field(32.0, gt=0.0, description="LoRA scale is lora_alpha / lora_rank.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    lora_target_modules: str | list[str] = Field(
        "all-linear", description="Layers that get adapters; all linear layers beat attention-only (QLoRA, "
        "arXiv 2305.14314).")
    full_finetune: bool = Field(False, description="Train every weight instead of adapters (needs far more memory).")
    learning_rate: float = Field(2e-4, gt=0.0, description="Peak AdamW learning rate; LoRA likes ~10x the full "
                                 "fine-tune rate (older name: lr).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear LR warmup, then linear decay to 0.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping; 0 disables.")
    epochs: int = Field(1, ge=1, description="Passes over the training rows (unless max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Forward passes per optimizer step (the gradient is the same as "
                            "one batch of batch_size * grad_accum).")
    max_length: int = Field(512, ge=8, description="Tokens per sequence; longer ones are cut (and counted).")
    save_every: int = Field(50, ge=1, description="Checkpoint every N optimizer steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=0, description="Checkpoints kept after training finishes (0 = delete them). "
                                  "During training at least the latest is kept, so a killed run resumes.")
    log_every: int = Field(10, ge=1, description="Print a progress line every N optimizer steps.")
    seed: int = Field(0, description="Seeds LoRA init, data order, dropout and on-policy sampling.")
    device: str = Field("auto", description="auto (cuda if available) | cpu | cuda:N.")
    cpu_threads: int | None = Field(None, ge=1, description="Torch threads on CPU; null = torch's default. On a "
                                    "busy shared machine 1 thread beat 2 by 2-5x (SmolLM2 forward, measured).")
    prompt: Literal["teacher", "short"] = Field(
        "teacher", description="teacher: the teacher's full prompt; short: the user turn only, no system prompt "
        "(faster to train and to answer when the system prompt is long).")
    bf16: bool | Literal["auto"] = Field("auto", description="auto = bf16 autocast on a GPU that supports it; "
                                         "never on CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass instead "
                                         "of storing them: less activation memory for one extra forward pass per "
                                         "step; same result up to float rounding.")
    base_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of the frozen base weights: auto = bfloat16 on a CUDA GPU that supports it "
        "(half the memory), float32 otherwise (CPU bf16 matmuls are slower and less exact) and always with "
        "full_finetune. LoRA weights and optimizer state stay float32.")
    quantize_base: Literal["none", "4bit"] = Field(
        "none", description="4bit = QLoRA (arXiv 2305.14314): the frozen base in 4-bit NF4 via bitsandbytes, "
        "~4x less base memory; needs a CUDA GPU and `pip install bitsandbytes`. none = base in base_dtype.")
    packing: bool = Field(False, description="sft: lay several examples end to end in rows of up to max_length "
                          "tokens (positions restart per example, no attention across examples): less padding, "
                          "fewer forward passes per step; batch_size then counts rows. Same loss as without.")

    # Checks between fields. Each names the later field, so the error points at a line in distill.yaml.
    @field_validator("on_policy")
    @classmethod
    def _on_policy_needs_logits(cls, v: float, info: ValidationInfo) -> float:
        loss = info.data.get("loss")
        if v > 0 and loss is not None and loss not in LOGIT_LOSSES:
            raise ValueError(f"student-sampled answers have no teacher target under loss '{loss}'; they need a "
                             "local teacher's logits: use loss kd_forward, kd_reverse or jsd")
        return v

    @field_validator("prompt")
    @classmethod
    def _short_prompt_not_with_logits(cls, v: str, info: ValidationInfo) -> str:
        loss = info.data.get("loss")
        if v == "short" and loss in LOGIT_LOSSES:
            raise ValueError(f"loss '{loss}' runs the teacher on the student's tokens, so the teacher would see "
                             "the short prompt too; use prompt: teacher with it")
        return v

    @field_validator("base_dtype")
    @classmethod
    def _full_finetune_trains_in_fp32(cls, v: str, info: ValidationInfo) -> str:
        if v == "bfloat16" and info.data.get("full_finetune"):
            raise ValueError("full_finetune trains the base weights themselves, and AdamW updates on bfloat16 "
                             "weights are mostly rounded away; use base_dtype: auto or float32 with it")
        return v

    @field_validator("quantize_base")
    @classmethod
    def _4bit_only_with_lora(cls, v: str, info: ValidationInfo) -> str:
        if v == "4bit" and info.data.get("full_finetune"):
            raise ValueError("4-bit weights cannot be trained, only adapters on top of them; use quantize_base: "
                             "none with full_finetune, or full_finetune: false (LoRA)")
        return v

    @field_validator("packing")
    @classmethod
    def _packing_only_with_sft(cls, v: bool, info: ValidationInfo) -> bool:
        loss = info.data.get("loss")
        if v and loss is not None and loss != "sft":
            raise ValueError(f"packing is for loss: sft only; loss '{loss}' lines teacher logits, stored "
                             "top_logprobs or rationales up with one example per row. Use packing: false with it")
        return v


CONFIGS: dict[str, type[_StudentConfig]] = {
    "classify": EncoderStudentConfig,
    "extract": LMStudentConfig,
    "generate": LMStudentConfig,
}
StudentConfig = Union[EncoderStudentConfig, LMStudentConfig]


def config_class(kind: str) -> type[_StudentConfig]:
    try:
        return CONFIGS[kind]
    except KeyError:
        raise DistillError(f"no student for task kind {kind!r}", hint="kind is one of classify, extract, generate") \
            from None


def student_config_for(kind: str, raw: dict[str, Any] | None, where: str = "distill.yaml") -> StudentConfig:
    """The typed ``student:`` settings of a ``kind`` project; a DistillError naming the field otherwise, e.g.
    "distill.yaml: field `student.learning_rate`: must be > 0 (got -1)"."""
    return config_class(kind).from_dict(raw, where)


# ------------------------------------------------------------------------------------------------
# errors and help text a person can act on


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    return getattr(annotation, "__name__", str(annotation))


def error_text(cls: type[_StudentConfig], err: dict[str, Any]) -> str:
    """One pydantic error of a student config as the words we show (without the field path)."""
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    name = err["loc"][0] if err["loc"] else None
    if kind == "extra_forbidden":
        return "unknown setting (typo?)"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {value!r})"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        bound = next(iter(ctx.values()), "?")
        return f"must be {bounds[kind]} {bound:g} (got {value!r})"
    if kind == "value_error" or name not in cls.model_fields:
        return err["msg"].removeprefix("Value error, ")
    text = f"expected {_type_name(cls.model_fields[name].annotation)}, got {value!r}"
    if isinstance(value, str):
        try:
            float(value)
            text += " (a quoted number is text in YAML: drop the quotes)"
        except ValueError:
            pass
    return text


def _field_errors(e: ValidationError) -> dict[str, dict[str, Any]]:
    """The first error per field (a union type reports one error per alternative; one is enough)."""
    out: dict[str, dict[str, Any]] = {}
    for err in e.errors():
        out.setdefault(str(err["loc"][0]) if err["loc"] else "", err)
    return out


def config_error(e: ValidationError, cls: type[_StudentConfig], where: str) -> DistillError:
    """A ValidationError of ``cls`` as one DistillError: a line per field, and a hint saying what is valid."""
    errs = _field_errors(e)
    lines = [f"field `{'student.' + name if name else 'student'}`: {error_text(cls, err)}"
             for name, err in errs.items()]
    unknown = [n for n, err in errs.items() if err["type"] == "extra_forbidden"]
    if unknown:
        hint = "valid settings: " + ", ".join(cls.model_fields)
    elif len(errs) == 1 and (name := next(iter(errs))) in cls.model_fields:
        hint = f"{name}: {cls.model_fields[name].description}"
    else:
        hint = "fix them under `student:` in distill.yaml (`distill train --help` lists every setting)"
    if len(lines) == 1:
        return DistillError(f"{where}: {lines[0]}", hint=hint)
    return DistillError(f"{where}: the student settings do not validate:\n  " + "\n  ".join(lines), hint=hint)


def describe_fields() -> str:
    """Every ``student:`` setting of both kinds: name, type, default and why (``distill train --help``)."""
    parts = []
    for title, cls in (("classify: an encoder student (EncoderStudentConfig)", EncoderStudentConfig),
                       ("extract / generate: a causal-LM student, LoRA by default (LMStudentConfig)", LMStudentConfig)):
        lines = [f"{title}"]
        for name, f in cls.model_fields.items():
            default = "null" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) \
                else f.default
            lines.append(f"  {name}: {_type_name(f.annotation)} = {default}")
            # wrapped here, with a hanging indent, so an 80-column terminal shows it as a list
            lines.append(textwrap.fill(f.description or "", width=78, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6))
        parts.append("\n".join(lines))
    return ("Student settings, under `student:` in distill.yaml (unknown keys are refused):\n\n"
            + "\n\n".join(parts))


# ------------------------------------------------------------------------------------------------
# what training a student returns


@dataclass
class TrainReport:
    run_id: str
    path: Path                 # the model folder: classify 'final' (ClassifierStudent.load), else the adapter/model
    record: dict[str, Any]     # what training_record.json holds
    reused: bool = False       # True when a finished run was found and nothing was trained

    def message(self) -> str:
        """Two lines for the CLI: what happened, where, and the throughput."""
        rec = self.record
        head = f"{'reused finished run' if self.reused else 'trained'} {self.run_id}: {self.path}\n"
        if rec.get("kind") == "train_lm":
            return head + (f"steps {rec.get('steps')}, final loss {rec.get('final_loss')}, "
                           f"{rec.get('tokens_per_s')} tokens/s")
        counts = rec.get("counts", {})
        return head + (f"epochs {rec.get('epochs_run')}, {rec.get('train_samples_per_second') or 0:.1f} samples/s, "
                       f"train/val {counts.get('train')}/{counts.get('validation')}")


def json_ready(x: Any) -> Any:
    """A training record as JSON can hold it: NaN/inf (a diverged loss) -> None, tuples -> lists."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
