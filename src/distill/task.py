"""The task spec: what the teacher is asked, what a valid answer is, and what "good enough" means.

A project's ``distill.yaml`` is one ``ProjectSpec``. Every model here forbids unknown keys, so a typo
in the YAML fails loudly with the field's path instead of being silently ignored (as nanoGPT's
configurator does). ``load_spec`` turns pydantic's errors into messages that name the field, its line
and a fix. ``student:`` is checked against the config of the project's kind (``distill.student_config``).

Three kinds of task:
- ``classify``: one label from ``labels``; the teacher may give a full distribution over them.
- ``extract``: a JSON object that must validate against ``json_schema``.
- ``generate``: free text.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.filters
import jsonschema
import yaml
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from distill.errors import DistillError
from distill.student_config import OLD_NAMES, StudentConfig, config_class, error_text, student_config_for

TaskKind = Literal["classify", "extract", "generate"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Label(_Strict):
    name: str = Field(description="The label as the teacher must answer it and the student predicts it.")
    description: str | None = Field(None, description="One line shown to the teacher to disambiguate.")


class QualityBar(_Strict):
    """The gate ``distill eval`` applies. Exit code != 0 when either threshold is missed."""

    metric: Literal["accuracy", "macro_f1", "exact_match", "field_f1", "agreement"] = Field(
        "accuracy", description="Headline metric for the gate."
    )
    against: Literal["gold", "teacher"] = Field(
        "gold", description="Score against gold labels (when present) or the teacher's labels."
    )
    overall: float = Field(0.85, ge=0.0, le=1.0, description="Minimum metric over the whole test split.")
    worst_segment: float = Field(0.75, ge=0.0, le=1.0, description="Minimum metric on the worst segment.")
    min_segment_size: int = Field(20, ge=1, description="Smaller segments are reported but not gated.")
    judge: bool = Field(False, description="generate: the teacher also grades student and base answers 1-5 "
                                           "(distill.judge; every grade is a cached, ledgered teacher call).")


class Price(_Strict):
    """USD per million tokens, from the provider's price page. Local teachers cost 0 unless you set a
    CPU/GPU-hour price, which is then charged by wall time."""

    input_per_1m: float = Field(0.0, ge=0.0)
    output_per_1m: float = Field(0.0, ge=0.0)
    per_hour: float = Field(0.0, ge=0.0, description="Compute price for local teachers, charged by latency.")
    batch_factor: float = Field(
        0.5, ge=0.0, le=1.0, description="A call made through the Batch API (`batch: true`) costs this share of "
        "the per-1M prices above (OpenAI: 0.5, i.e. half price).")


class Terms(_Strict):
    """What the teacher's licence says about training on its outputs. ``label`` refuses a teacher whose
    terms forbid it unless ``--accept-terms`` is given; the record travels with exported data."""

    url: str | None = Field(None, description="Where the terms/licence are published.")
    outputs_may_train_models: bool | None = Field(
        None, description="True / False as the terms say; None = not checked (a warning is printed)."
    )
    note: str | None = None


class TeacherSpec(_Strict):
    name: str = Field(description="Your name for this teacher; labels are stored under it.")
    kind: Literal["openai", "local", "replay", "ensemble"]
    model: str = Field("", description="Model id sent to the API, or a packaged/local model for 'local'.")
    # openai
    base_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://host/v1.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (the key is never stored)."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(256, ge=1)
    logprobs: bool = Field(False, description="Ask for token logprobs (needed for soft/sparse KD).")
    top_logprobs: int = Field(0, ge=0, le=20, description="Alternatives per position (APIs allow <= 20).")
    n: int = Field(1, ge=1, le=16, description="Samples per input; >1 gives a vote distribution.")
    rationale: bool = Field(False, description="Ask for a short rationale before the answer.")
    concurrency: int = Field(8, ge=1, le=256, description="Requests in flight at once.")
    rpm: float | None = Field(None, gt=0, description="Requests per minute limit (client side).")
    tpm: float | None = Field(None, gt=0, description="Tokens per minute limit (client side).")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(6, ge=0, description="Retries for 429/5xx/timeouts/connection errors.")
    max_parse_retries: int = Field(2, ge=0, description="Re-asks when an answer does not parse (openai; local and "
                                   "replay teachers are deterministic, so they are never re-asked).")
    structured: Literal["off", "json_schema", "vllm", "vllm_guided"] = Field(
        "off", description="openai: constrain the answer to the task at the server, so no answer is malformed and "
        "none is re-asked (paid twice). json_schema: OpenAI's `response_format` (OpenAI, vLLM, SGLang, llama.cpp "
        "server); vllm: vLLM >= 0.12 `structured_outputs` (classify: the bare label via `choice`); vllm_guided: "
        "`guided_choice` / `guided_json` of older vLLM. classify and extract only.")
    label_scoring: Literal["off", "prompt_logprobs"] = Field(
        "off", description="openai + classify against vLLM: score every label by the log-probability the model "
        "gives it as the answer (vLLM's `prompt_logprobs`; one request per label plus the answer), a full "
        "distribution over the labels like a local teacher's.")
    price: Price = Field(default_factory=Price)
    terms: Terms = Field(default_factory=Terms)
    # openai Batch API (distill.teachers.batch). Not part of identity(): a batch answer and an online answer to
    # the same prompt share one cache key, so either answers for the other.
    batch: bool = Field(False, description="Label through the OpenAI Batch API: half the price, answers within "
                        "24 h. `distill label` submits, polls and collects (re-running resumes, never resubmits).")
    batch_poll_s: float = Field(60.0, gt=0, description="Seconds between two status checks of a running batch.")
    batch_retry: Literal["online", "batch"] = Field(
        "online", description="Where requests a batch did not answer (error lines, expired or cancelled batches, "
        "answers that do not parse) are asked again: online (at once, full price) or in one follow-up batch.")
    batch_max_requests: int = Field(50_000, ge=1, le=50_000,
                                    description="Requests per batch file (OpenAI: at most 50,000 and 200 MB).")
    # local
    path: str | None = Field(
        None, description="local: HF folder or .gguf file, or a packaged model name; replay: a JSONL file."
    )
    device: str = Field("auto", description="local: 'auto' (cuda if available), 'cpu' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # ensemble
    members: list[str] = Field(default_factory=list, description="ensemble: names of member teachers.")

    @model_validator(mode="after")
    def _check_kind(self) -> "TeacherSpec":
        if self.kind == "openai" and not self.base_url:
            raise ValueError(f"teacher '{self.name}': kind 'openai' needs base_url (e.g. https://api.openai.com/v1)")
        if self.kind == "replay" and not self.path:
            raise ValueError(f"teacher '{self.name}': kind 'replay' needs path (a JSONL of recorded answers)")
        if self.kind == "ensemble" and len(self.members) < 2:
            raise ValueError(f"teacher '{self.name}': kind 'ensemble' needs at least two members")
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"teacher '{self.name}': top_logprobs needs logprobs: true")
        if self.batch and self.kind != "openai":
            raise ValueError(f"teacher '{self.name}': batch: true needs kind 'openai' (the OpenAI Batch API)")
        if self.batch and self.label_scoring != "off":
            raise ValueError(f"teacher '{self.name}': label_scoring sends extra scoring requests per answer, which a "
                             "Batch API file cannot carry; use batch: false (vLLM) or label_scoring: off")
        if self.kind != "openai" and (self.structured != "off" or self.label_scoring != "off"):
            raise ValueError(f"teacher '{self.name}': structured / label_scoring are options of kind 'openai' (a "
                             "local teacher already scores every label)")
        if self.label_scoring != "off" and self.n > 1:
            raise ValueError(f"teacher '{self.name}': label_scoring gives the distribution itself; use n: 1")
        return self

    def identity(self) -> dict[str, Any]:
        """Everything that changes what the teacher answers. Part of every cache key, so changing the
        model or a sampling parameter makes new keys (relabelling is explicit, never accidental).
        Secrets, rate limits and prices are deliberately not part of it."""
        return {
            "name": self.name,
            "kind": self.kind,
            "model": self.model,
            "base_url": self.base_url,
            "path": self.path,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
            "n": self.n,
            "rationale": self.rationale,
            "members": self.members,
            # only when set, so the cache keys of every existing teacher stay what they were
            **({"structured": self.structured} if self.structured != "off" else {}),
            **({"label_scoring": self.label_scoring} if self.label_scoring != "off" else {}),
            # bf16 and fp32 weights can answer differently; only local models have a dtype
            **({"dtype": self.dtype} if self.kind == "local" else {}),
        }

    @property
    def parse_retries(self) -> int:
        """Re-asks after an unparseable answer. A local model decodes greedily and a replay returns its
        recording, so asking again gives the same text: re-asking would only pay (or, for a replay, charge
        the recorded latency) again."""
        return 0 if self.kind in ("local", "replay") else self.max_parse_retries


class ExamplesSpec(_Strict):
    """Demonstrations (input -> answer) shown to the *teacher* before each input, as earlier chat turns.
    Students never see them. How they are chosen, and the rules that keep them honest (never test, never
    the input itself, a choice kept once made): ``distill.fewshot``."""

    k: int = Field(0, ge=0, le=32, description="Demonstrations per input; 0 = zero-shot (the default).")
    select: Literal["similar", "fixed"] = Field(
        "similar", description="similar: the k pool rows nearest the input (cosine of MiniLM embeddings); "
        "fixed: the same k pool rows for every input.")
    pool: str = Field("gold", description="'gold': non-test inputs with a gold answer or a correction; or a "
                      ".jsonl/.csv file (relative to the project) with `text` and `answer` columns.")
    pool_size: int | None = Field(None, ge=1, description="At most this many pool rows, chosen by a seeded hash "
                                  "of their ids (a small hand-labelled set, as most users have).")
    shortlist: bool = Field(False, description="classify: the teacher chooses among the labels of the k "
                            "retrieved examples only (fewer labels to score: faster, and often more accurate).")
    embedder: str = Field("all-minilm-l6-v2", description="Encoder for `select: similar` (packaged name or HF folder).")
    seed: str = Field("distill", description="Salt for `fixed` and `pool_size` choices.")


class PromptSpec(_Strict):
    """Jinja2 templates, rendered in a sandbox (see ``_check_template``: no calls, no `set`, a fixed set of
    filters). Variables: ``text``, ``segment``, ``meta`` (extra columns), ``labels`` (list of {name,
    description}), ``schema`` (JSON string), ``rationale`` (bool), ``description``. ``examples``: few-shot
    demonstrations for the teacher (``ExamplesSpec``)."""

    system: str | None = None
    user: str = "{{ text }}"
    examples: ExamplesSpec = Field(default_factory=ExamplesSpec)

    @field_validator("system", "user")
    @classmethod
    def _compile(cls, v: str | None) -> str | None:
        # at load, so a hostile or broken template is refused before anything is paid or served
        if v is not None:
            try:
                _template(v)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"prompt template error on line {e.lineno}: {e.message}") from None
            except jinja2.TemplateError as e:           # e.g. a filter that does not exist
                raise ValueError(f"prompt template error: {e.message}") from None
            except ValueError as e:
                raise ValueError(f"prompt template refused: {e}") from None
        return v


class SplitSpec(_Strict):
    validation: float = Field(0.1, ge=0.0, lt=1.0, description="Share of new inputs hashed to validation.")
    test: float = Field(0.2, ge=0.0, lt=1.0, description="Share hashed to the locked test split.")
    seed: str = Field("distill", description="Salt for the split hash; changing it does not move the locked test split.")
    column: str | None = Field(None, description="Take the split from this input column instead of hashing.")

    @model_validator(mode="after")
    def _sum(self) -> "SplitSpec":
        if self.validation + self.test >= 1.0:
            raise ValueError("splits.validation + splits.test must be < 1 (something has to be left to train on)")
        return self


class DecontamSpec(_Strict):
    """Near-duplicates of test inputs are removed from train/validation (Lee et al. 2022, arXiv 2107.06499
    use the same MinHash idea for training-set dedup)."""

    ngram: int = Field(3, ge=1, le=10, description="Word n-gram size for MinHash shingles.")
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard estimate at or above which we drop.")
    num_perm: int = Field(128, ge=16, le=1024)


class SuspectSpec(_Strict):
    """``filters.suspect_labels``: flag teacher labels that are probably wrong, without gold (confident
    learning on out-of-fold probabilities; see distill/label_noise.py). classify only."""
    features: Literal["both", "tfidf", "embeddings"] = Field(
        "both", description="Cheap model's inputs: TF-IDF n-grams and `embedder` sentence embeddings, or one of them.")
    embedder: str = Field("all-minilm-l6-v2", description="Encoder for the embeddings (packaged name or HF folder).")
    folds: int = Field(5, ge=2, le=20, description="k of the k-fold out-of-fold probabilities.")
    c: float = Field(1.0, gt=0, description="Inverse regularisation of the logistic regression.")
    teacher_weight: float = Field(
        0.1, ge=0.0, le=1.0, description="Weight of the teacher's own distribution in the log-linear pool with the "
        "cheap model's (0: the cheap model alone).")
    method: Literal["predicted_neq_given", "prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                    "low_self_confidence", "low_normalized_margin"] = Field(
        "predicted_neq_given", description="cleanlab's find_label_issues filter_by (see distill/label_noise.py).")
    seed: int = Field(0, description="Fold assignment.")
    action: Literal["drop", "relabel"] = Field(
        "drop", description="What a flag does: `drop` the label, or `relabel` the row with the label the combined "
        "probabilities favour (trained one-hot: the teacher's distribution argues for its own answer).")


class FilterSpec(_Strict):
    drop_disagree_with_gold: bool = Field(True, description="Drop train examples whose teacher label != gold.")
    min_confidence: float | None = Field(None, ge=0.0, le=1.0, description="Drop if top probability is lower.")
    min_margin: float | None = Field(None, ge=0.0, le=1.0, description="Drop if p(top1) - p(top2) is lower.")
    max_entropy: float | None = Field(None, ge=0.0, description="Drop if label entropy (nats) is higher.")
    min_agreement: float | None = Field(None, ge=0.0, le=1.0, description="Drop if sample/ensemble agreement is lower.")
    drop_duplicates: bool = Field(True, description="Drop exact duplicates of (text, answer) in train.")
    suspect_labels: SuspectSpec | None = Field(
        None, description="Drop labels confident learning flags as probably wrong, without gold (classify); "
        "`true` for the defaults.")

    @field_validator("suspect_labels", mode="before")
    @classmethod
    def _suspect_shorthand(cls, v: Any) -> Any:
        if v is True:
            return {}
        return None if v is False else v


class FeedbackSpec(_Strict):
    """What `distill iterate` does with the answers clients send to `/v1/feedback` ("this should have been X").

    Feedback is kept as a correction with its own trust level (source ``feedback:...``): below a reviewer's
    decision or a corrections file, which it never replaces and which always replace it; never on a test input."""
    use: Literal["train", "review", "ignore"] = Field(
        "train", description="train: a client's answer overrides the teacher in training (the latest answer when "
        "clients disagree on one input); review: stored, but trained on only once a reviewer accepts it in "
        "`distill review`; ignore: only the input is taken, as before.")


class ProjectSpec(_Strict):
    name: str
    kind: TaskKind
    description: str = Field("", description="One sentence the teacher sees about the task.")
    labels: list[Label] = Field(default_factory=list, description="classify: the label set.")
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="extract: JSON schema of an answer.")
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    segment_field: str | None = Field(None, description="Input column whose value names the segment.")
    max_text_chars: int = Field(20_000, ge=1, description="Longer inputs are rejected at import with a reason.")
    splits: SplitSpec = Field(default_factory=SplitSpec)
    decontamination: DecontamSpec = Field(default_factory=DecontamSpec)
    filters: FilterSpec = Field(default_factory=FilterSpec)
    quality: QualityBar = Field(default_factory=QualityBar)
    feedback: FeedbackSpec = Field(default_factory=FeedbackSpec)
    teachers: list[TeacherSpec] = Field(default_factory=list)
    teacher: str | None = Field(None, description="Default teacher name for `distill label`.")
    student: dict[str, Any] = Field(
        default_factory=dict, description="Student/training settings, checked against the config of `kind` "
        "(distill.student_config; `distill train --help` lists them). Kept as written; `student_config()` is typed.")

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_from_strings(cls, v: Any) -> Any:
        # Let users write `labels: [a, b, c]` as well as the long form with descriptions.
        if isinstance(v, list):
            return [{"name": x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("labels")
    @classmethod
    def _check_label_names(cls, v: list[Label]) -> list[Label]:
        # A label the answer parser cannot tell from another one, or cannot produce at all, silently turns
        # answers into the wrong label: `[Spam, spam]` stored "Spam" answers as `spam`, and `"a "` or "" were
        # never produced. So labels must be distinct as the parser compares them (_norm_label: Unicode NFKC,
        # case, spaces/_/- and surrounding quotes ignored), non-empty, on one line, without outer spaces.
        errors, seen = [], {}
        for i, lab in enumerate(v):
            name, problem = lab.name, None
            if not name.strip():
                problem = "is empty"
            elif name != name.strip():
                problem = f"{name!r} has leading or trailing whitespace"
            elif any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in name):
                problem = f"{name!r} contains a line break or control character"
            elif not _norm_label(name):
                problem = f"{name!r} is only characters the answer parser strips (quotes, dots, *, _, -, spaces)"
            elif _norm_label(name) in seen:
                j = seen[_norm_label(name)]
                problem = (f"{name!r} is the same label as labels[{j}] {v[j].name!r} once case, Unicode forms, "
                           "spaces/_/- are ignored (the teacher's answer could not tell them apart)")
            if problem:
                errors.append(InitErrorDetails(type=PydanticCustomError("label_name", "labels[{i}] {problem}",
                                                                        {"i": i, "problem": problem}),
                                               loc=(i, "name"), input=name))
            seen.setdefault(_norm_label(name), i)
        if errors:
            raise ValidationError.from_exception_data("labels", errors)
        return v

    @field_validator("student")
    @classmethod
    def _check_student(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Validated here, at load, against the config of the project's kind: a typo in `student:` fails with
        # its path (student.X) like any other field, instead of at train time. (`kind` is declared above, so
        # it is in info.data when it was valid.)
        kind = info.data.get("kind")
        if kind is not None:
            config_class(kind).model_validate(v)   # its ValidationError nests under `student`
        return v

    @model_validator(mode="after")
    def _check(self) -> "ProjectSpec":
        if self.kind == "classify":
            names = [lab.name for lab in self.labels]
            if len(names) < 2:
                raise ValueError("kind 'classify' needs at least two labels under `labels:`")
        if self.kind == "extract":
            if not self.json_schema:
                raise ValueError("kind 'extract' needs a JSON schema under `schema:`")
            try:
                jsonschema.Draft202012Validator.check_schema(self.json_schema)
            except jsonschema.SchemaError as e:
                raise ValueError(f"`schema:` is not a valid JSON schema: {e.message}") from None
        if self.filters.suspect_labels is not None and self.kind != "classify":
            raise ValueError("`filters.suspect_labels` needs kind 'classify' (confident learning ranks labels of a "
                             "label set); remove it for extract/generate")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        for t in self.teachers:
            for m in t.members:
                if m not in names or m == t.name:
                    raise ValueError(f"teacher '{t.name}': member '{m}' is not another teacher in `teachers:`")
        if self.teacher and self.teacher not in names:
            raise ValueError(f"`teacher: {self.teacher}` is not one of the teachers {names}")
        return self

    # -- helpers used across stages -------------------------------------------------------------
    @property
    def label_names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    def student_config(self, overrides: dict[str, Any] | None = None) -> StudentConfig:
        """``student:`` as the typed config of this kind (``EncoderStudentConfig`` or ``LMStudentConfig``),
        with ``overrides`` (e.g. CLI flags) on top; a DistillError naming the field if they do not validate."""
        return student_config_for(self.kind, self.student).with_overrides(overrides)

    def get_teacher(self, name: str | None = None) -> TeacherSpec:
        name = name or self.teacher or (self.teachers[0].name if self.teachers else None)
        for t in self.teachers:
            if t.name == name:
                return t
        known = [t.name for t in self.teachers] or "none"
        raise DistillError(
            f"no teacher named '{name}' in distill.yaml (teachers: {known})",
            hint="add one under `teachers:` or pass --teacher NAME",
        )


# ------------------------------------------------------------------------------------------------
# Loading with errors a person can act on.


def _loc(loc: tuple[Any, ...]) -> str:
    # ('labels', 1, 'name') -> labels[1].name
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"


def _first_per_field(errors: list[dict]) -> list[dict]:
    # a union-typed student field (e.g. lora_target_modules: str | list) reports one error per alternative
    seen, out = set(), []
    for err in errors:
        key = err["loc"][:2] if err["loc"][:1] == ("student",) else err["loc"]
        if key not in seen:
            seen.add(key)
            out.append(err)
    return out


# distill.yaml is read with YAML aliases refused outright, and at most MAX_SPEC_BYTES of it. A 661-byte file of
# nested anchors/aliases (a "billion laughs") once took 42 s and 2.5 GB before a MemoryError: PyYAML shares
# aliased nodes, but validation, the JSON schema check and the prompt's json.dumps(schema) each expand them.
# Counting the expansion instead would keep anchors usable, but a spec is a short file a person writes (no
# example or scaffold uses them); refusing them removes the whole class - bombs, cyclic aliases, cache keys
# that differ from what the file looks like - for the cost of writing a repeated block out twice.
MAX_SPEC_BYTES = 1_000_000


class _AliasRefused(yaml.MarkedYAMLError):
    pass


class _SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases (``*name``) where the composer meets them, with their line, and
    reads ``1e-4`` as the number people mean: PyYAML follows YAML 1.1, where a float needs a dot
    (``1.0e-4``), so ``learning_rate: 2e-5`` was the string "2e-5" and the strict student config refused it.
    YAML 1.2's float rule (what every other YAML reader uses) fixes that."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(None, None, f"YAML alias *{event.anchor} refused (distill.yaml allows no aliases)",
                                event.start_mark)
        return super().compose_node(parent, index)


# YAML 1.2 core-schema floats (1e-4, 2.5E+3, .5, -1.0) replace YAML 1.1's resolver, which needs a dot.
_SpecLoader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
                                       for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _line_of(raw_text: str, loc: tuple[Any, ...]) -> int | None:
    """The line in distill.yaml of the setting at ``loc`` (or of the nearest enclosing one that is written
    there: a renamed key such as ``lr`` is reported under its new name, ``learning_rate``)."""
    try:
        node = yaml.compose(raw_text, Loader=_SpecLoader)
    except (yaml.YAMLError, RecursionError):
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if hit is None:
                hit = next(((k, v) for k, v in node.value if OLD_NAMES.get(k.value) == part), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def load_spec(path: Path) -> ProjectSpec:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw_bytes = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise DistillError(f"{path}: not found", hint="run `distill init DIR --kind classify` first") from None
    if len(raw_bytes) > MAX_SPEC_BYTES:
        raise DistillError(f"{path}: larger than {MAX_SPEC_BYTES:,} bytes; a spec is a short file of settings",
                           hint="keep data (inputs, examples, recordings) in their own files, not in distill.yaml")
    try:
        raw_text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DistillError(f"{path}: not UTF-8 (byte {e.start})", hint="save the file as UTF-8") from None
    try:
        raw = yaml.load(raw_text, Loader=_SpecLoader)   # nosec B506 # _SpecLoader is a SafeLoader (no aliases)
    except _AliasRefused as e:
        mark = e.problem_mark
        raise DistillError(
            f"{path}: line {mark.line + 1}, column {mark.column + 1}: {e.problem}",
            hint="write the value out where the alias is (anchors and aliases can expand a few bytes into "
                 "gigabytes, so distill.yaml does not allow them)",
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DistillError(
            f"{path}:{where}: invalid YAML: {getattr(e, 'problem', e)}",
            hint="check indentation and quoting near that line",
        ) from None
    except RecursionError:
        raise DistillError(f"{path}: nested too deeply to read", hint="a spec needs a few levels of nesting") from None
    if not isinstance(raw, dict):
        raise DistillError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        return ProjectSpec.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in _first_per_field(e.errors()):
            msg, loc = err["msg"].removeprefix("Value error, "), err["loc"]
            if loc[:1] == ("student",) and raw.get("kind") in ("classify", "extract", "generate"):
                # the student config's own wording (ranges, types), and on a typo the names it knows
                cfg = config_class(raw["kind"])
                msg = error_text(cfg, {**err, "loc": err["loc"][1:]})
                if err["type"] == "extra_forbidden":
                    msg += f"; valid for kind {raw['kind']}: " + ", ".join(cfg.model_fields)
                loc = loc[:2]
            elif err["type"] == "extra_forbidden":
                msg = "unknown setting (typo?); remove it or check `distill init` for the valid names"
            line = _line_of(raw_text, loc)
            lines.append(f"  field `{_loc(loc)}`" + (f" (line {line})" if line else "") + f": {msg}")
        raise DistillError(f"{path}: the spec does not validate:\n" + "\n".join(lines)) from None


def dump_spec(spec: ProjectSpec) -> str:
    data = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------------
# Prompts

# A distill.yaml may come from someone else (a shared example, a pull request), and `serve` renders the prompt
# for every routed request, so a template must not be able to run code or take the process down. A plain
# jinja2.Environment lets `{{ cycler.__init__.__globals__.os.popen('id').read() }}` run a shell command. So:
# - every template renders in an ImmutableSandboxedEnvironment (no `_`-attributes, no mutation, no
#   os/sys/globals reachable), with no global functions at all (no range/lipsum/cycler/joiner/namespace);
# - `_check_template` refuses, at spec load, what a prompt never needs and what escapes or amplifies: calls
#   (`x.method()`, macros, `loop(...)`), `{% set %}`/`{% with %}`/macros/blocks/includes, `**`, `_`-names and
#   `_`-attributes, and filters outside ``PROMPT_FILTERS`` (no `format`/`center`/`indent`/`replace`/`batch`...:
#   each turns a short template into gigabytes);
# - what is left is bounded at render time: all `{% for %}` loops of one render together run at most
#   ``MAX_LOOP_ITERATIONS`` times, and no value built by `~`, `+`, `*` or `join`, nor the rendered prompt,
#   may exceed ``MAX_PROMPT_CHARS`` (a prompt that long fits no model's context anyway); a template is at
#   most ``MAX_TEMPLATE_CHARS`` long. The variables are plain data (str, dict, list), never our objects.
MAX_LOOP_ITERATIONS = 10_000
MAX_PROMPT_CHARS = 2_000_000
MAX_TEMPLATE_CHARS = 50_000
PROMPT_FILTERS = ("abs", "attr", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "first", "float",
                  "groupby", "int", "items", "join", "last", "length", "list", "lower", "map", "max", "min", "reject",
                  "rejectattr", "reverse", "round", "select", "selectattr", "sort", "string", "striptags", "title",
                  "tojson", "trim", "truncate", "unique", "upper", "wordcount")
_ALLOWED_NODES = (nodes.Template, nodes.Output, nodes.TemplateData, nodes.Const, nodes.Name, nodes.Getattr,
                  nodes.Getitem, nodes.Slice, nodes.Tuple, nodes.List, nodes.Dict, nodes.Pair, nodes.Keyword,
                  nodes.If, nodes.CondExpr, nodes.For, nodes.Filter, nodes.Test, nodes.Compare, nodes.Operand,
                  nodes.And, nodes.Or, nodes.Not, nodes.Neg, nodes.Pos, nodes.Add, nodes.Sub, nodes.Mul, nodes.Div,
                  nodes.FloorDiv, nodes.Mod, nodes.Concat, nodes.FilterBlock)
_WHAT = {nodes.Call: "calls (`x.method()`, `loop(...)`, macros)", nodes.Pow: "the `**` operator",
         nodes.Assign: "`{% set %}`", nodes.AssignBlock: "`{% set %}`", nodes.With: "`{% with %}`",
         nodes.Macro: "macros", nodes.CallBlock: "`{% call %}`", nodes.Block: "blocks",
         nodes.Extends: "`{% extends %}`", nodes.Include: "`{% include %}`", nodes.Import: "`{% import %}`",
         nodes.FromImport: "`{% from ... import %}`"}


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_PROMPT_CHARS:
        raise SecurityError(f"a value of {len(value):,} characters/items is longer than the limit of "
                            f"{MAX_PROMPT_CHARS:,}")
    if isinstance(value, int) and value.bit_length() > 4096:
        raise SecurityError("a number of more than 4096 bits")
    return value


def _joined(parts: list[str], sep: str = "") -> str:
    # the size is checked before the string is built: `[text, text, ...]|join(text)` would otherwise
    # allocate gigabytes first
    if sum(map(len, parts)) + len(sep) * len(parts) > MAX_PROMPT_CHARS:
        raise SecurityError(f"joining {len(parts):,} parts would be longer than {MAX_PROMPT_CHARS:,} characters")
    return sep.join(parts)


@jinja2.pass_environment
def _join_filter(env: Any, value: Any, d: str = "", attribute: Any = None) -> str:
    """Jinja's ``join``, size-checked."""
    if attribute is not None:
        value = map(jinja2.filters.make_attrgetter(env, attribute), value)
    return _joined([str(x) for x in value], str(d))


@jinja2.pass_context
def _loop_budget(context: Any, iterable: Any) -> Any:
    # every `{% for %}` iterates through this (``_check_template`` rewrites the loops); the count lives on the
    # render's own Context, so it is per render and no template can reset it
    for item in iterable:
        context.distill_loop_iterations = getattr(context, "distill_loop_iterations", 0) + 1
        if context.distill_loop_iterations > MAX_LOOP_ITERATIONS:
            raise SecurityError(f"the template's loops ran more than {MAX_LOOP_ITERATIONS:,} times for one prompt")
        yield item


class _PromptEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with `*`, `+` and `%` checked before they build anything big."""

    intercepted_binops = frozenset({"*", "+", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "%" and isinstance(left, str):
            raise SecurityError("`%` string formatting is not allowed in a prompt (join text with `~`)")
        if operator == "*":
            seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_PROMPT_CHARS:
                raise SecurityError(f"repeating {len(seq):,} characters/items {n:,} times")
        return _sized(super().call_binop(context, operator, left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        # `l.name`, `meta.channel`: the prompt's data are plain dicts, whose items are safe to read; the
        # general path (try the attribute, catch AttributeError, then the item) made rendering 4x slower
        if type(obj) is dict and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


_ENV = _PromptEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)
_ENV.globals.clear()
_ENV.filters = {name: _ENV.filters[name] for name in PROMPT_FILTERS}
_ENV.filters.update(join=_join_filter, distill_loop_budget=_loop_budget,
                    distill_concat=lambda parts: _joined([str(x) for x in parts]))


def _check_template(source: str) -> nodes.Template:
    """Parse ``source`` and refuse what a prompt may not do (see above); returns the tree with every loop
    counted and every `~` capped. Raises TemplateSyntaxError / ValueError (with the template's line)."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"the template is {len(source):,} characters long; the limit is {MAX_TEMPLATE_CHARS:,}")
    tree = _ENV.parse(source)
    for node in tree.find_all(nodes.Node):
        where = f" (line {node.lineno} of the template)"
        if not isinstance(node, _ALLOWED_NODES):
            what = next((w for cls, w in _WHAT.items() if isinstance(node, cls)), f"`{type(node).__name__}`")
            raise ValueError(f"not allowed in a prompt: {what}{where}")
        if isinstance(node, nodes.Name) and node.name.startswith("_") and node.name != "_":
            raise ValueError(f"the name `{node.name}` is not allowed in a prompt{where}")
        if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            raise ValueError(f"the attribute `.{node.attr}` is not allowed in a prompt{where}")
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and str(node.arg.value).startswith("_"):
            raise ValueError(f"the item `[{node.arg.value!r}]` is not allowed in a prompt{where}")
        if isinstance(node, nodes.Mod) and isinstance(node.left, nodes.Const) and isinstance(node.left.value, str):
            raise ValueError(f"`%` string formatting is not allowed in a prompt{where} (join text with `~`)")
        if isinstance(node, (nodes.Filter, nodes.Test)):
            # attr('__class__'), map(attribute='__class__'), sort(attribute=...): refused here already
            args = node.args + [k.value for k in node.kwargs]
            bad = [a.value for a in args if isinstance(a, nodes.Const) and str(a.value).startswith("_")]
            if bad:
                raise ValueError(f"the argument {bad[0]!r} is not allowed in a prompt{where}")
        if isinstance(node, nodes.Filter) and node.name not in PROMPT_FILTERS:
            raise ValueError(f"the filter `{node.name}` is not allowed in a prompt{where}; "
                             f"available: {', '.join(PROMPT_FILTERS)}")
    # rewrite after the walk (find_all would otherwise visit the new nodes)
    for loop in list(tree.find_all(nodes.For)):
        loop.iter = nodes.Filter(loop.iter, "distill_loop_budget", [], [], None, None, lineno=loop.iter.lineno)
    for concat in list(tree.find_all(nodes.Concat)):
        parts = nodes.List(concat.nodes, lineno=concat.lineno)
        concat.nodes = [nodes.Filter(parts, "distill_concat", [], [], None, None, lineno=concat.lineno)]
    return tree


DEFAULT_SYSTEM = {
    "classify": (
        "{{ description }}\n"
        "Classify the user's message into exactly one of these labels:\n"
        "{% for l in labels %}- {{ l.name }}{% if l.description %}: {{ l.description }}{% endif %}\n{% endfor %}"
        "{% if rationale %}First write one short sentence of reasoning on a line starting with 'Rationale:', "
        "then the label on a line starting with 'Answer:'.{% else %}Answer with the label only.{% endif %}"
    ),
    "extract": (
        "{{ description }}\n"
        "Extract the information from the user's message as one JSON object that validates against this "
        "JSON schema:\n{{ schema }}\n"
        "{% if rationale %}First write one short sentence of reasoning on a line starting with 'Rationale:', "
        "then the JSON on a line starting with 'Answer:'.{% else %}Answer with the JSON object only.{% endif %}"
    ),
    "generate": (
        "{{ description }}"
        "{% if rationale %}\nFirst write one short sentence of reasoning on a line starting with 'Rationale:', "
        "then your answer on a line starting with 'Answer:'.{% endif %}"
    ),
}


@functools.lru_cache(maxsize=64)
def _template(source: str) -> jinja2.Template:
    # compiling a template costs ~5 ms; labelling renders every input's prompt on every run (to find the
    # inputs whose cache key changed), so 100k inputs would spend minutes compiling the same two strings
    return _ENV.from_string(_check_template(source))


def _render(field: str, source: str, ctx: dict[str, Any]) -> str:
    """One template rendered in the sandbox; anything the template itself raises is a DistillError naming
    ``field`` (a hostile or broken template must not end in a traceback, nor in a prompt of gigabytes)."""
    try:
        # streamed, the length checked every 64 pieces: a loop that prints a long value 10,000 times is
        # stopped near the limit instead of after it built gigabytes (64 at a time keeps the check cheap)
        chunks, out, size = _template(source).generate(**ctx), [], 0
        while batch := list(itertools.islice(chunks, 64)):
            size += sum(map(len, batch))
            if size > MAX_PROMPT_CHARS:
                raise SecurityError(f"the rendered prompt is longer than {MAX_PROMPT_CHARS:,} characters")
            out += batch
        return "".join(out)
    except jinja2.UndefinedError as e:
        raise DistillError(
            f"prompt template `{field}` uses an unknown variable: {e.message}",
            hint="available: text, segment, meta.<column>, labels, schema, rationale, description",
        ) from None
    except SecurityError as e:
        raise DistillError(f"prompt template `{field}` was refused: {e}",
                           hint=f"a prompt shows, loops over and filters its variables, within limits; fix `{field}` "
                                "in distill.yaml") from None
    except (jinja2.TemplateError, ValueError) as e:     # syntax/unsafe constructs: the spec's validation says so
        raise DistillError(f"prompt template `{field}`: {e}", hint=f"fix `{field}` in distill.yaml") from None
    except (TypeError, ArithmeticError, LookupError, RecursionError) as e:
        raise DistillError(f"prompt template `{field}` failed: {type(e).__name__}: {e}",
                           hint=f"fix `{field}` in distill.yaml") from None


def answer_text(kind: str, answer: Any) -> str:
    """An answer as the text a model writes: the label, the JSON object, or the text."""
    if kind == "extract":
        return json.dumps(answer, ensure_ascii=False)
    return str(answer)


def render_messages(spec: ProjectSpec, text: str, segment: str | None = None, meta: dict | None = None,
                    rationale: bool = False, demos: list[Any] | None = None,
                    labels: list[str] | None = None) -> list[dict[str, str]]:
    """Chat messages for one input. Deterministic: the same input always renders the same bytes, which is
    what makes the cache key stable.

    ``demos`` (``distill.fewshot.Demo``: text, answer, segment, meta): few-shot demonstrations, each a user
    turn rendered with the same ``prompt.user`` template and an assistant turn with its answer, between the
    system prompt and the input. ``labels`` (classify): the label names the prompt lists, when a shortlist
    replaces the full set."""
    allowed = set(labels) if labels is not None else None
    ctx = {
        "text": text,
        "segment": segment,
        "meta": meta or {},
        # plain dicts, not the pydantic Labels: a template sees data only (no methods, nothing to climb
        # through), and the sandbox checks attribute access on objects, which made rendering 9x slower
        "labels": [{"name": lab.name, "description": lab.description} for lab in spec.labels
                   if allowed is None or lab.name in allowed],
        "schema": json.dumps(spec.json_schema, sort_keys=True) if spec.json_schema else "",
        "rationale": rationale,
        "description": spec.description,
    }
    system_tpl = spec.prompt.system if spec.prompt.system is not None else DEFAULT_SYSTEM[spec.kind]
    system = _render("prompt.system", system_tpl, ctx).strip()
    user = _render("prompt.user", spec.prompt.user, ctx)
    msgs = [{"role": "system", "content": system}] if system else []
    for d in demos or ():
        dctx = {**ctx, "text": d.text, "segment": d.segment, "meta": d.meta or {}}
        msgs.append({"role": "user", "content": _render("prompt.user", spec.prompt.user, dctx)})
        msgs.append({"role": "assistant", "content": answer_text(spec.kind, d.answer)})
    msgs.append({"role": "user", "content": user})
    return msgs


def cache_key(teacher_identity: dict, messages: list[dict], attempt: int = 0, extra: dict | None = None) -> str:
    """sha256 over (teacher identity incl. model and parameters, rendered prompt, attempt). ``attempt`` > 0 is
    used when an answer did not parse and we re-ask: it is a new paid call, so it needs its own key."""
    blob = json.dumps(
        {"teacher": teacher_identity, "messages": messages, "attempt": attempt, "extra": extra or {}},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_keys(teacher_identity: dict, messages: list[dict], attempts: int) -> list[str]:
    """``[cache_key(teacher_identity, messages, a) for a in range(attempts)]``, the same strings, with the identity
    and the messages serialised once rather than once per attempt: the labeller's plan hashes every input's
    keys, and that serialisation was a third of its time. The blob is the one ``cache_key`` makes: json.dumps
    with sorted keys writes "attempt", "extra", "messages", "teacher" in that order, each value as dumps would."""
    def dump(v: Any) -> str:
        return json.dumps(v, sort_keys=True, ensure_ascii=False)

    tail = f', "extra": {{}}, "messages": {dump(messages)}, "teacher": {dump(teacher_identity)}}}'
    return [hashlib.sha256(f'{{"attempt": {a}{tail}'.encode()).hexdigest() for a in range(attempts)]


# ------------------------------------------------------------------------------------------------
# Parsing teacher answers. Every failure has a short machine-readable reason, stored with the call.


class ParseError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.MULTILINE)


def split_rationale(text: str) -> tuple[str | None, str]:
    """'Rationale: ...\\nAnswer: X' -> ('...', 'X'). Without an 'Answer:' line the whole text is the answer."""
    m = re.search(r"(?is)^\s*rationale\s*:\s*(.*?)\n\s*answer\s*:\s*(.*)$", text.strip())
    if m:
        return m.group(1).strip(), m.group(2).strip()
    m = re.search(r"(?is)answer\s*:\s*(.*)$", text)
    if m:
        return None, m.group(1).strip()
    return None, text.strip()


def _norm_label(s: str) -> str:
    # what an answer and a label are compared by; ProjectSpec refuses labels that are equal under it
    s = unicodedata.normalize("NFKC", s)
    return re.sub(r"[\s_\-]+", " ", s.strip().strip("\"'`.*").casefold()).strip()


def parse_answer(spec: ProjectSpec, text: str | None) -> Any:
    """Turn a teacher's raw text into an answer of the task's type or raise ParseError(reason)."""
    if text is None or not str(text).strip():
        raise ParseError("empty", "the teacher returned no text")
    text = str(text)
    if spec.kind == "classify":
        cand = text.strip()
        if cand.startswith("{"):
            try:
                obj = json.loads(_FENCE.sub("", cand))
                cand = str(obj.get("label", "")).strip() if isinstance(obj, dict) else cand
            except (ValueError, RecursionError):  # bad JSON, >4300-digit ints, absurd nesting: not a JSON label
                pass
        cand = cand.splitlines()[0] if cand.strip() else cand
        by_norm = {_norm_label(n): n for n in spec.label_names}
        hit = by_norm.get(_norm_label(cand))
        if hit is None:
            raise ParseError("label_not_in_set", f"{cand[:80]!r} is not one of the {len(spec.labels)} labels")
        return hit
    if spec.kind == "extract":
        body = _FENCE.sub("", text.strip()).strip()
        if not body.startswith("{"):
            # tolerate prose around the object: take the outermost {...}
            i, j = body.find("{"), body.rfind("}")
            body = body[i : j + 1] if 0 <= i < j else body
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            raise ParseError("bad_json", f"{e.msg} at char {e.pos}") from None
        except (ValueError, RecursionError) as e:  # >4300-digit integers, nesting deeper than the stack
            raise ParseError("bad_json", str(e)[:200]) from None
        try:
            jsonschema.validate(obj, spec.json_schema or {})
        except jsonschema.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path) or "(root)"
            raise ParseError("schema_violation", f"{path}: {e.message}") from None
        return obj
    return text.strip()


def answer_key(spec: ProjectSpec, answer: Any) -> str:
    """A hashable, canonical form of an answer (for voting, agreement and duplicate checks)."""
    if spec.kind == "extract":
        return json.dumps(answer, sort_keys=True, ensure_ascii=False)
    if spec.kind == "generate":
        return " ".join(str(answer).split()).lower()
    return str(answer)


def scaffold(name: str, kind: TaskKind) -> str:
    """The distill.yaml `distill init` writes: a valid spec with every section present and commented."""
    examples = {
        "classify": "labels:\n  - name: positive\n    description: the customer is happy\n  - name: negative\n"
        "  - name: neutral\n",
        "extract": "schema:\n  type: object\n  properties:\n    intent: {type: string}\n    slots:\n"
        "      type: object\n      additionalProperties: {type: string}\n  required: [intent, slots]\n",
        "generate": "",
    }[kind]
    return f"""# distill project spec. Validate with `distill status {name}`.
name: {name}
kind: {kind}            # classify | extract | generate
description: "Describe the task in one sentence; the teacher sees it."
{examples}segment_field: null      # an input column whose value names the segment (channel, language, ...)
prompt:
  examples:             # few-shot for the teacher: solved inputs shown before each input (students never see them)
    k: 0                # e.g. 8: the 8 gold/corrected inputs nearest each input (never test, never itself)
    select: similar     # similar (MiniLM nearest neighbours) | fixed (the same k for every input)
    pool: gold          # gold answers of train/validation inputs, or a .jsonl/.csv with text + answer
splits:
  validation: 0.1       # share of inputs hashed to validation (early stopping, router calibration)
  test: 0.2             # share hashed to the locked test split (never trained on)
quality:                # the gate `distill eval` enforces
  metric: {"accuracy" if kind == "classify" else "exact_match"}
  against: gold         # gold | teacher
  overall: 0.85
  worst_segment: 0.75
filters:
  drop_disagree_with_gold: true   # needs gold on the training inputs; real traffic has none
  min_confidence: null  # e.g. 0.5: drop training labels the teacher was unsure of
{"  suspect_labels: false # true: drop labels confident learning flags as wrong, without gold (`distill filter` lists them)" + chr(10) if kind == "classify" else ""}feedback:
  use: train            # /v1/feedback answers at `distill iterate`: train | review (only once a reviewer accepts) | ignore
teachers:
  # Any OpenAI-compatible endpoint. The key is read from the environment variable; it is never stored.
  - name: api
    kind: openai
    base_url: https://api.openai.com/v1
    model: gpt-4o-mini
    api_key_env: OPENAI_API_KEY
    logprobs: true
    top_logprobs: 5
    rpm: 500
    price: {{input_per_1m: 0.15, output_per_1m: 0.60}}
    terms:
      url: https://openai.com/policies/terms-of-use
      outputs_may_train_models: null   # read the terms and set true/false
  # A local open model (no network): a packaged GGUF (see docs) or an HF folder.
  - name: qwen-local
    kind: local
    path: qwen2.5-coder-1.5b-instruct
    terms:
      url: https://www.apache.org/licenses/LICENSE-2.0
      outputs_may_train_models: true
teacher: qwen-local
"""
