"""The task spec: what the teacher is asked, what a valid answer is, and what "good enough" means.

A project's ``distill.yaml`` is one ``ProjectSpec``. Every model here forbids unknown keys, so a typo
in the YAML fails loudly with the field's path instead of being silently ignored (as nanoGPT's
configurator does). ``load_spec`` turns pydantic's errors into messages that name the field and a fix.

Three kinds of task:
- ``classify``: one label from ``labels``; the teacher may give a full distribution over them.
- ``extract``: a JSON object that must validate against ``json_schema``.
- ``generate``: free text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import jinja2
import jsonschema
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.errors import DistillError

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
    price: Price = Field(default_factory=Price)
    terms: Terms = Field(default_factory=Terms)
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
            # bf16 and fp32 weights can answer differently; only local models have a dtype
            **({"dtype": self.dtype} if self.kind == "local" else {}),
        }

    @property
    def parse_retries(self) -> int:
        """Re-asks after an unparseable answer. A local model decodes greedily and a replay returns its
        recording, so asking again gives the same text: re-asking would only pay (or, for a replay, charge
        the recorded latency) again."""
        return 0 if self.kind in ("local", "replay") else self.max_parse_retries


class PromptSpec(_Strict):
    """Jinja2 templates. Variables: ``text``, ``segment``, ``meta`` (extra columns), ``labels`` (list of
    Label), ``schema`` (JSON string), ``rationale`` (bool)."""

    system: str | None = None
    user: str = "{{ text }}"


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


class FilterSpec(_Strict):
    drop_disagree_with_gold: bool = Field(True, description="Drop train examples whose teacher label != gold.")
    min_confidence: float | None = Field(None, ge=0.0, le=1.0, description="Drop if top probability is lower.")
    min_margin: float | None = Field(None, ge=0.0, le=1.0, description="Drop if p(top1) - p(top2) is lower.")
    max_entropy: float | None = Field(None, ge=0.0, description="Drop if label entropy (nats) is higher.")
    min_agreement: float | None = Field(None, ge=0.0, le=1.0, description="Drop if sample/ensemble agreement is lower.")
    drop_duplicates: bool = Field(True, description="Drop exact duplicates of (text, answer) in train.")


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
    teachers: list[TeacherSpec] = Field(default_factory=list)
    teacher: str | None = Field(None, description="Default teacher name for `distill label`.")
    student: dict[str, Any] = Field(default_factory=dict, description="Student/training settings (see `distill train --help`).")

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_from_strings(cls, v: Any) -> Any:
        # Let users write `labels: [a, b, c]` as well as the long form with descriptions.
        if isinstance(v, list):
            return [{"name": x} if isinstance(x, str) else x for x in v]
        return v

    @model_validator(mode="after")
    def _check(self) -> "ProjectSpec":
        if self.kind == "classify":
            names = [lab.name for lab in self.labels]
            if len(names) < 2:
                raise ValueError("kind 'classify' needs at least two labels under `labels:`")
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"labels are repeated: {dupes}")
        if self.kind == "extract":
            if not self.json_schema:
                raise ValueError("kind 'extract' needs a JSON schema under `schema:`")
            try:
                jsonschema.Draft202012Validator.check_schema(self.json_schema)
            except jsonschema.SchemaError as e:
                raise ValueError(f"`schema:` is not a valid JSON schema: {e.message}") from None
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        for t in self.teachers:
            for m in t.members:
                if m not in names or m == t.name:
                    raise ValueError(f"teacher '{t.name}': member '{m}' is not another teacher in `teachers:`")
        if self.teacher and self.teacher not in names:
            raise ValueError(f"`teacher: {self.teacher}` is not one of the teachers {names}")
        for tpl in (self.prompt.system, self.prompt.user):
            if tpl:
                try:
                    _ENV.parse(tpl)
                except jinja2.TemplateSyntaxError as e:
                    raise ValueError(f"prompt template error on line {e.lineno}: {e.message}") from None
        return self

    # -- helpers used across stages -------------------------------------------------------------
    @property
    def label_names(self) -> list[str]:
        return [lab.name for lab in self.labels]

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
    return ".".join(str(p) for p in loc) or "(top level)"


def load_spec(path: Path) -> ProjectSpec:
    path = Path(path)
    try:
        raw_text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DistillError(f"{path}: not found", hint="run `distill init DIR --kind classify` first") from None
    except UnicodeDecodeError as e:
        raise DistillError(f"{path}: not UTF-8 (byte {e.start})", hint="save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(raw_text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DistillError(
            f"{path}:{where}: invalid YAML: {getattr(e, 'problem', e)}",
            hint="check indentation and quoting near that line",
        ) from None
    if not isinstance(raw, dict):
        raise DistillError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        return ProjectSpec.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown setting (typo?); remove it or check `distill init` for the valid names"
            lines.append(f"  field `{_loc(err['loc'])}`: {msg}")
        raise DistillError(f"{path}: the spec does not validate:\n" + "\n".join(lines)) from None


def dump_spec(spec: ProjectSpec) -> str:
    data = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------------
# Prompts

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)

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
    return _ENV.from_string(source)


def render_messages(spec: ProjectSpec, text: str, segment: str | None = None, meta: dict | None = None,
                    rationale: bool = False) -> list[dict[str, str]]:
    """Chat messages for one input. Deterministic: the same input always renders the same bytes, which is
    what makes the cache key stable."""
    ctx = {
        "text": text,
        "segment": segment,
        "meta": meta or {},
        "labels": spec.labels,
        "schema": json.dumps(spec.json_schema, sort_keys=True) if spec.json_schema else "",
        "rationale": rationale,
        "description": spec.description,
    }
    system_tpl = spec.prompt.system if spec.prompt.system is not None else DEFAULT_SYSTEM[spec.kind]
    try:
        system = _template(system_tpl).render(**ctx).strip()
        user = _template(spec.prompt.user).render(**ctx)
    except jinja2.UndefinedError as e:
        raise DistillError(
            f"prompt template uses an unknown variable: {e.message}",
            hint="available: text, segment, meta.<column>, labels, schema, rationale, description",
        ) from None
    msgs = [{"role": "system", "content": system}] if system else []
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
    return re.sub(r"[\s_\-]+", " ", s.strip().strip("\"'`.*").lower()).strip()


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
splits:
  validation: 0.1       # share of inputs hashed to validation (early stopping, router calibration)
  test: 0.2             # share hashed to the locked test split (never trained on)
quality:                # the gate `distill eval` enforces
  metric: {"accuracy" if kind == "classify" else "exact_match"}
  against: gold         # gold | teacher
  overall: 0.85
  worst_segment: 0.75
filters:
  drop_disagree_with_gold: true
  min_confidence: null  # e.g. 0.5: drop training labels the teacher was unsure of
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
