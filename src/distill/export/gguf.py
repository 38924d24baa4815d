"""Export an LM student (merged into its base) as a quantized GGUF file that llama.cpp, llama-server and
ollama run on CPUs, with its own prompt format inside, and measure what quantization cost on the test split.

Why GGUF via llama.cpp. Measured on our 2-core machine with SmolLM2-135M-Instruct:

===================================  ===========================  ===========================================
engine                               batch-1 speed (2 threads)    greedy text equal to fp32 (5 prompts)
===================================  ===========================  ===========================================
transformers fp32                    17.7 tokens/s                (the reference)
llama-cpp-python 0.3.36, Q8_0        99-121 tokens/s              4/5
llama-cpp-python 0.3.36, Q4_K_M      (not faster on this model)   2/5
ONNX Runtime GenAI int8 / int4       -                            2/5 / 0/5
===================================  ===========================  ===========================================

Sizes: f16 259 MB, Q8_0 139 MB, Q4_K_M 101 MB (SmolLM2's 576-wide rows are not divisible by 256, so
Q4_K_M falls back to q5_0/q8_0 for most tensors and saves less than its name suggests). Hence Q8_0 is the
default. The cost: llama-cpp-python builds from source (~8 min of cmake/gcc on a fresh machine, once; pip
caches the wheel) where ORT GenAI installs in 15 s. ``bash scripts/setup.sh --lm`` installs it.

How, in a temporary folder beside ``out_dir`` (renamed into place at the end, so a crash never leaves a
half export that a server would load):

1. ``convert_hf_to_gguf.py`` — llama.cpp's converter, which the llama-cpp-python wheel does not ship;
   setup.sh extracts it (with ``conversion/`` and ``gguf-py/``) from the pinned sdist into
   ``<venv>/share/distill/llama.cpp/`` — turns the merged bf16 folder into a bf16 GGUF (lossless for bf16
   weights; ``F16`` converts straight to f16). It runs in a subprocess: it is a script, not an API.
2. ``llama_model_quantize`` (the C library through the binding) writes the Q8_0 / Q4_K_M / Q4_0 file.
3. The metadata section is rewritten (``write_metadata``; tensors are copied byte for byte):
   ``tokenizer.chat_template`` becomes the **student's own prompt** (below), and ``distill.*`` strings record
   the task (``GGUF_KEYS``; ``read_metadata`` reads them back, and so does gguf-py's ``GGUFReader``).
4. Parity on the locked test split (``parity``): greedy answers of the merged model (transformers) and of
   the GGUF (llama.cpp) from the same prompt token ids; field F1 / exact match of one against the other and
   of each against gold, JSON validity, batch-1 tokens/s, bytes. Written to ``export.json`` -> ``parity``.

The chat template. A student answers well only in the format it was trained on (``causal_lm.student_prompt``):
``prompt: teacher`` students saw the task's system prompt, ``prompt: short`` students only the user turn,
step-by-step students a task prefix on it, and every student the task's user template around the input.
A llama-server or ollama client sends just the input text as its user message (as a `distill serve` client
does), so the GGUF's template wraps the student's original template with a few Jinja lines that rebuild
those messages: the user content becomes ``input_prefix + before + content + after`` (the task's user
template split around the input), ``short`` drops system messages, ``teacher`` adds the task's system prompt
when the client sent none. Rendering it for one user message gives exactly ``student_prompt`` of the task's
messages (tested). The HF tokenizer files beside the GGUF keep the original template: distill's own code
applies the student's format itself and must not apply it twice.

Where it may write: as ``distill.export.lm`` (``fsutil.check_export_target``): a new path or an empty folder;
anything else is refused, or with ``force`` moved aside to ``NAME.replaced-TIME``, never deleted.

Folder written by ``export_gguf``::

    out_dir/model-q8_0.gguf        the quantized model with its chat template and distill.* metadata
    out_dir/tokenizer files        the student's HF tokenizer (original chat template)
    out_dir/distill_student.json   the student info + gguf_file, quantization, exported_from (no absolute paths)
    out_dir/Modelfile              for `ollama create NAME -f Modelfile`
    out_dir/README.md              how to run it
    out_dir/export.json            sizes, timings, tool versions, the chat-template summary and the parity report
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from distill.errors import DistillError
from distill.fsutil import check_export_target, move_aside, project_protected
from distill.students.causal_lm import (STUDENT_FILE, has_chat_template, read_student_info, student_prompt,
                                        write_student_info)

LLAMA_CPP_VERSION = "0.3.36"          # the llama-cpp-python setup.sh installs; its sdist carries the converter
SETUP_HINT = "run `bash scripts/setup.sh --lm` (builds llama-cpp-python, extracts llama.cpp's converter)"
CONVERTER = "convert_hf_to_gguf.py"

# --quant choice -> the binding's ftype constant name (None: no quantization, the converter's f16 file)
QUANTS: dict[str, str | None] = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                                 "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "F16": None}

# the distill.* metadata keys (all strings); json_schema only for extract tasks
GGUF_KEYS = ("distill.task.name", "distill.task.kind", "distill.system_prompt", "distill.prompt_mode",
             "distill.input_prefix", "distill.user_template", "distill.json_schema", "distill.source_run_id")


# ------------------------------------------------------------------------------------------------
# tools


def find_converter() -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py``: ``$DISTILL_LLAMA_CPP_DIR``, else ``<venv>/share/distill/llama.cpp``.
    A DistillError when it, llama-cpp-python or sentencepiece (the converter imports it) is missing."""
    env = os.environ.get("DISTILL_LLAMA_CPP_DIR")
    folder = Path(env) if env else Path(sys.prefix) / "share" / "distill" / "llama.cpp"
    conv = folder / CONVERTER
    if not conv.is_file():
        where = "$DISTILL_LLAMA_CPP_DIR" if env else "the virtual environment"
        raise DistillError(f"llama.cpp's converter is not installed: no {conv} (looked in {where})",
                           hint=SETUP_HINT + (", or point DISTILL_LLAMA_CPP_DIR at a llama.cpp checkout" if env
                                              else ""))
    for module, what in (("llama_cpp", "llama-cpp-python"), ("sentencepiece", "sentencepiece")):
        if importlib.util.find_spec(module) is None:
            raise DistillError(f"GGUF export needs {what}, which is not installed", hint=SETUP_HINT)
    return conv


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def convert(merged_dir: Path, out_file: Path, outtype: str) -> None:
    """Run llama.cpp's converter on an HF folder (offline); its stderr tail goes into the error on failure."""
    conv = find_converter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(conv), str(merged_dir), "--outfile", str(out_file),
                           "--outtype", outtype], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out_file.is_file():
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-12:])
        raise DistillError(f"llama.cpp's converter failed on {merged_dir} (exit {proc.returncode}):\n{tail}",
                           hint="llama.cpp supports most Llama/Qwen/Gemma/SmolLM architectures; the lines above "
                                "name what it could not convert")


def quantize(src: Path, dst: Path, quant: str, threads: int) -> None:
    """``llama_model_quantize`` from the C library; its progress log is silenced (errors still print)."""
    import logging

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[quant])
    params.nthread = threads
    log = logging.getLogger("llama-cpp-python")   # llama-cpp-python routes llama.cpp's log through it
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        log.setLevel(level)
    if rc != 0 or not dst.is_file():
        raise DistillError(f"llama.cpp could not quantize {src.name} to {quant} (return code {rc})",
                           hint="try --quant Q8_0, which every architecture supports")


# GGUF v3 (llama.cpp's gguf.h): "GGUF", version u32, tensor count u64, KV count u64, the KV pairs, the tensor
# infos, padding to ``general.alignment`` (default 32), then the tensor data, addressed relative to its start.
# Adding keys therefore means rewriting only the KV section and copying the rest byte for byte. gguf-py's
# GGUFReader -> GGUFWriter round trip (llama.cpp's gguf_new_metadata.py) does the same but parses every one of
# the ~50k vocabulary strings into Python objects: 8 s for a 5 MB file here, against well under 1 s.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, f):
        self.f = f

    def read(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise DistillError(f"{self.f.name}: truncated GGUF file", hint="export again")
        return struct.unpack("<" + fmt, data)[0]

    def string(self) -> bytes:
        return self.f.read(self.read("Q"))

    def skip_value(self, vtype: int) -> None:
        if vtype == _STRING:
            self.f.seek(self.read("Q"), 1)
        elif vtype == _ARRAY:
            etype, count = self.read("I"), self.read("Q")
            if etype in _SCALAR:
                self.f.seek(struct.calcsize("<" + _SCALAR[etype]) * count, 1)
            else:
                for _ in range(count):
                    self.skip_value(etype)
        elif vtype in _SCALAR:
            self.f.seek(struct.calcsize("<" + _SCALAR[vtype]), 1)
        else:
            raise DistillError(f"{self.f.name}: unknown GGUF value type {vtype}", hint="is it a GGUF v3 file?")


def _layout(f) -> dict[str, Any]:
    """Where the parts of a GGUF file are: KV pairs [(key, type, start, end)], tensor infos, data start."""
    c = _Cursor(f)
    f.seek(0)
    if f.read(4) != b"GGUF" or c.read("I") != 3:
        raise DistillError(f"{f.name}: not a little-endian GGUF v3 file", hint="convert it with llama.cpp's converter")
    n_tensors, n_kv = c.read("Q"), c.read("Q")
    kvs, alignment = [], 32
    for _ in range(n_kv):
        start = f.tell()
        key = c.string().decode("utf-8")
        vtype = c.read("I")
        value_at = f.tell()
        c.skip_value(vtype)
        kvs.append((key, vtype, start, f.tell(), value_at))
        if key == "general.alignment":
            end = f.tell()
            f.seek(value_at)
            alignment = c.read("I")
            f.seek(end)
    ti_start = f.tell()
    for _ in range(n_tensors):
        c.string()
        n_dims = c.read("I")
        f.seek(8 * n_dims + 4 + 8, 1)      # dims (u64 each), type (u32), offset (u64)
    ti_end = f.tell()
    return {"n_tensors": n_tensors, "kvs": kvs, "ti": (ti_start, ti_end), "alignment": alignment,
            "data": -(-ti_end // alignment) * alignment}


def _kv_string(key: str, value: str) -> bytes:
    k, v = key.encode("utf-8"), value.encode("utf-8")
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", _STRING) + struct.pack("<Q", len(v)) + v


def write_metadata(src: Path, dst: Path, chat_template: str, strings: dict[str, str]) -> None:
    """Copy GGUF ``src`` to ``dst`` with a new ``tokenizer.chat_template`` and extra string keys (existing
    keys of those names are replaced); tensor infos and data are copied unchanged."""
    new = {"tokenizer.chat_template": chat_template, **strings}
    with open(src, "rb") as f, open(dst, "wb") as out:
        lay = _layout(f)
        kept = [kv for kv in lay["kvs"] if kv[0] not in new]
        out.write(b"GGUF" + struct.pack("<IQQ", 3, lay["n_tensors"], len(kept) + len(new)))
        for _, _, start, end, _ in kept:
            f.seek(start)
            out.write(f.read(end - start))
        for k, v in new.items():
            out.write(_kv_string(k, v))
        f.seek(lay["ti"][0])
        out.write(f.read(lay["ti"][1] - lay["ti"][0]))
        out.write(b"\0" * (-out.tell() % lay["alignment"]))
        f.seek(lay["data"])
        shutil.copyfileobj(f, out, 1 << 22)


def read_metadata(gguf_file: str | Path) -> dict[str, str]:
    """``tokenizer.chat_template`` and the ``distill.*`` keys of a GGUF file (what serving needs to know)."""
    out = {}
    with open(gguf_file, "rb") as f:
        c = _Cursor(f)
        for key, vtype, _, _, value_at in _layout(f)["kvs"]:
            if vtype == _STRING and (key.startswith("distill.") or key == "tokenizer.chat_template"):
                f.seek(value_at)
                out[key] = c.string().decode("utf-8")
    return out


# ------------------------------------------------------------------------------------------------
# the student's prompt format, as a chat template


@dataclass
class PromptFormat:
    """What the GGUF's chat template does to a client's messages (see the module docstring)."""

    prompt_mode: str                 # teacher | short
    system_prompt: str               # the task's system prompt ("" when it has none)
    system_static: bool              # False: it depends on the input text, so the template cannot add it
    input_prefix: str                # step-by-step students' task prefix
    user_before: str                 # the task's user template, split around the input text
    user_after: str
    user_wraps: bool                 # False: the user template is not `before + text + after`; send it rendered
    template: str                    # the Jinja chat template written into the GGUF

    def summary(self) -> dict[str, Any]:
        return {"prompt_mode": self.prompt_mode, "system_prompt_added": self.adds_system,
                "system_prompt_static": self.system_static, "input_prefix": self.input_prefix,
                "user_message": "the input text (the template adds the task's user template around it)"
                if self.user_wraps else "the task's rendered user prompt (its template could not be split)"}

    @property
    def adds_system(self) -> bool:
        return self.prompt_mode == "teacher" and bool(self.system_prompt) and self.system_static


# mixed case, so a user template that changes the text (upper, lower, title) is noticed
_SENTINELS = ("\u2063Distill-input-a\u2063", "\u2063Distill-input-b\u2063")


def prompt_format(spec, info: dict[str, Any], tokenizer) -> PromptFormat:
    """The student's prompt format for ``spec`` and its chat template (see the module docstring)."""
    from distill.task import render_messages

    def parts(text: str) -> tuple[str, str]:
        msgs = render_messages(spec, text)
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
        return system, msgs[-1]["content"]

    (sys_a, user_a), (sys_b, user_b) = parts(_SENTINELS[0]), parts(_SENTINELS[1])
    mode = info.get("prompt") or "teacher"
    prefix = info.get("input_prefix") or ""
    static = sys_a == sys_b
    before = after = ""
    wraps = user_a.count(_SENTINELS[0]) == 1
    if wraps:
        before, after = user_a.split(_SENTINELS[0])
        wraps = user_b == before + _SENTINELS[1] + after
    if not wraps:
        before = after = ""
    fmt = PromptFormat(mode, sys_a if static else "", static, prefix, before, after, wraps, "")
    fmt.template = _wrapper_template(fmt, tokenizer)
    return fmt


def _lit(s: str) -> str:
    """A Jinja string literal (JSON escapes: Jinja2 and llama.cpp's template engine both read them)."""
    return json.dumps(s, ensure_ascii=False)


# plain_prompt (causal_lm) for students whose tokenizer has no chat template, in Jinja
_PLAIN_TEMPLATE = (
    "{% set ns = namespace(s=[], u=[]) %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.s = ns.s + [m['content']] %}"
    "{% elif m['role'] == 'user' %}{% set ns.u = ns.u + [m['content']] %}{% endif %}{% endfor %}"
    "{% set system = ns.s | join('\\n') | trim %}{% if system %}{{ system + '\\n\\n' }}{% endif %}"
    "{{ 'Input: ' + (ns.u | join('\\n')) + '\\nOutput: ' }}"
)


def _wrapper_template(fmt: PromptFormat, tokenizer) -> str:
    """Jinja lines that rebuild ``messages`` into the student's format, then the student's own template.
    No whitespace between the tags: the original template's output must not change by a byte."""
    keep_system = "true" if fmt.prompt_mode == "teacher" else "false"
    pre = _lit(fmt.input_prefix + fmt.user_before)
    post = _lit(fmt.user_after)
    head = (
        "{% set ns = namespace(msgs=[], system=false) %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}"
        f"{{% if {keep_system} %}}{{% set ns.msgs = ns.msgs + [m] %}}{{% set ns.system = true %}}{{% endif %}}"
        "{% elif m['role'] == 'user' %}"
        f"{{% set ns.msgs = ns.msgs + [{{'role': 'user', 'content': {pre} + m['content'] + {post}}}] %}}"
        "{% else %}{% set ns.msgs = ns.msgs + [m] %}{% endif %}"
        "{% endfor %}"
    )
    if fmt.adds_system:
        head += (f"{{% if not ns.system %}}{{% set ns.msgs = [{{'role': 'system', 'content': "
                 f"{_lit(fmt.system_prompt)}}}] + ns.msgs %}}{{% endif %}}")
    head += "{% set messages = ns.msgs %}"
    body = tokenizer.chat_template if has_chat_template(tokenizer) else _PLAIN_TEMPLATE
    return head + body


def _modelfile(fmt: PromptFormat, tokenizer, gguf_name: str) -> str:
    """An ollama Modelfile. ollama templates are Go templates, not Jinja: the student's prompt is rendered
    once around placeholders, which become ``{{ .System }}`` and ``{{ .Prompt }}``."""
    from distill.models import stop_token_ids

    user, system = "\u2063DISTILL-PROMPT\u2063", "\u2063DISTILL-SYSTEM\u2063"
    msgs = [{"role": "user", "content": user}]
    if fmt.adds_system:
        msgs.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(msgs, chat_template=fmt.template, tokenize=False, add_generation_prompt=True)

    def go(literal: str) -> str:       # '{{' would open a Go template action
        return literal.replace("{{", '{{ "{{" }}')

    out = []
    for i, chunk in enumerate(text.split(system)):
        out.append(("{{ .System }}" if i else "") + "{{ .Prompt }}".join(go(c) for c in chunk.split(user)))
    template = "".join(out)
    lines = ["# ollama create NAME -f Modelfile && ollama run NAME 'your input'",
             f"FROM ./{gguf_name}"]
    if '"""' not in template:
        lines.append(f'TEMPLATE """{template}"""')
    if fmt.adds_system and '"""' not in fmt.system_prompt:
        lines.append(f'SYSTEM """{fmt.system_prompt}"""')
    for i in stop_token_ids(tokenizer):
        tok = tokenizer.convert_ids_to_tokens(i)
        if tok and '"' not in tok:
            lines.append(f'PARAMETER stop "{tok}"')
    lines.append("PARAMETER temperature 0")   # students are evaluated greedily
    return "\n".join(lines) + "\n"


def _readme(task: str, gguf_name: str, quant: str, fmt: PromptFormat) -> str:
    send = ("the input text alone as the user message: the chat template adds the task's format"
            if fmt.user_wraps else "the task's rendered user prompt as the user message")
    return f"""# {task}: distilled student, GGUF ({quant})

`{gguf_name}` carries the student's prompt format as its chat template and the task in `distill.*` metadata
(`distill.system_prompt`, `distill.prompt_mode`, `distill.json_schema`, ...). Send {send}.
`export.json` holds the parity report: this file against the merged model on the project's test split.

llama.cpp server (OpenAI-compatible API on port 8080; `--jinja` applies the GGUF's chat template):

    llama-server -m {gguf_name} --jinja -c 2048 --temp 0

ollama:

    ollama create my-student -f Modelfile
    ollama run my-student "your input"

Python (llama-cpp-python):

    from llama_cpp import Llama
    llm = Llama("{gguf_name}", n_ctx=2048, verbose=False)
    llm.create_chat_completion([{{"role": "user", "content": "your input"}}], temperature=0)

distill: `distill serve PROJECT` serves the project's model with distill's router and checks.
"""


# ------------------------------------------------------------------------------------------------
# parity on the test split


@dataclass
class ParitySet:
    """Rows to measure parity on: chat messages as the teacher saw them (``task.render_messages``) and gold
    answers (None where a row has none)."""

    messages: list[list[dict[str, str]]]
    gold: list[Any]
    notes: list[str] = field(default_factory=list)


def _parse(spec, texts: Sequence[str]) -> tuple[list[Any], list[float], list[float]]:
    """(answers, json_valid, schema_valid) per text, parsed as the labeller parses a teacher reply."""
    from distill.task import ParseError, parse_answer

    answers, json_ok, schema_ok = [], [], []
    for t in texts:
        try:
            answers.append(parse_answer(spec, t))
            json_ok.append(1.0)
            schema_ok.append(1.0)
        except ParseError as e:
            answers.append(None)
            json_ok.append(1.0 if e.reason == "schema_violation" else 0.0)
            schema_ok.append(0.0)
    return answers, json_ok, schema_ok


# The scores of `distill eval` (distill.metrics, shared with distill.evaluate.lm).
from distill.metrics import DEFAULT_MAX_NEW_TOKENS, field_f1, normalise_text, token_f1  # noqa: E402


def _vs_gold(spec, preds: list[Any], gold: list[Any]) -> dict[str, Any]:
    """Exact match and field F1 (extract) or token F1 / normalised match (generate) of ``preds`` against gold,
    on the rows that have gold, as `distill eval` scores a system vs gold."""
    from distill.task import answer_key

    idx = [i for i, g in enumerate(gold) if g is not None]
    if not idx:
        return {"n": 0}
    p, g = [preds[i] for i in idx], [gold[i] for i in idx]
    if spec.kind == "extract":
        exact = [a is not None and answer_key(spec, a) == answer_key(spec, b) for a, b in zip(p, g)]
        return {"n": len(idx), "exact_match": sum(exact) / len(idx), "field_f1": field_f1(p, g)}
    exact = [a is not None and str(a).strip() == str(b).strip() for a, b in zip(p, g)]
    norm = [a is not None and normalise_text(str(a)) == normalise_text(str(b)) for a, b in zip(p, g)]
    return {"n": len(idx), "exact_match": sum(exact) / len(idx),
            "token_f1": sum(token_f1(None if a is None else str(a), str(b)) for a, b in zip(p, g)) / len(idx),
            "normalised_match": sum(norm) / len(idx)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def parity(merged_dir: Path, gguf_file: Path, spec, rows: ParitySet, *, max_new_tokens: int, threads: int,
           say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Greedy answers of the merged model (transformers) and the GGUF (llama.cpp) to the same prompt token
    ids, compared with each other and with gold. Both decode greedily, unconstrained, one request at a
    time, with ``threads`` threads, stopping at the vocabulary's end-of-turn tokens."""
    import llama_cpp
    import torch

    from distill.models import stop_token_ids
    from distill.students.predictor import GenerativePredictor

    say = say or (lambda m: None)
    torch_threads = torch.get_num_threads()       # GenerativePredictor sets it for the whole process
    try:
        pred = GenerativePredictor(merged_dir, device="cpu", cpu_threads=threads)
        ref = _merged_answers(pred, rows, max_new_tokens, say)
    finally:
        torch.set_num_threads(torch_threads)
    tok = pred.tokenizer
    prompts, ids, merged, weights_dtype = ref["prompts"], ref["ids"], ref["answers"], ref["weights_dtype"]
    del pred                       # free the transformers copy before llama.cpp loads its own
    n = len(ids)

    say(f"parity: GGUF (llama.cpp) answers {n} test rows")
    n_ctx = max(512, -(-(max(len(x) for x in ids) + max_new_tokens + 1) // 256) * 256)
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          logits_all=False, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    stop = set(stop_token_ids(tok))

    def answer(prompt_ids: list[int]) -> tuple[list[int], float]:
        llm.reset()                # no prompt-cache reuse across rows: batch-1 cost, as for the merged model
        t0 = time.perf_counter()
        new: list[int] = []
        for t in llm.generate(prompt_ids, temp=0.0, reset=True):
            new.append(t)
            if t in stop or llama_cpp.llama_vocab_is_eog(vocab, t) or len(new) >= max_new_tokens:
                break
        return new, time.perf_counter() - t0

    answer(ids[0][:8])             # warm-up
    q_out = [answer(x) for x in ids]
    q_texts = [tok.decode(new, skip_special_tokens=True) for new, _ in q_out]
    # llama-server renders the chat template and tokenizes the text itself: does it get the same tokens?
    same_tokens = [llm.tokenize(p.encode(), add_bos=True, special=True) == x for p, x in zip(prompts, ids)]
    llm.close()

    m_texts = [g.text for g in merged]
    m_ans, m_json, m_schema = _parse(spec, m_texts)
    q_ans, q_json, q_schema = _parse(spec, q_texts)
    # quantized against merged: the merged answer is the reference (rows where it has none count as
    # references without pairs: any quantized answer there is a false positive)
    if spec.kind == "extract":
        vs_merged: dict[str, Any] = {"field_f1": field_f1(q_ans, m_ans)}
    else:
        vs_merged = {"token_f1": sum(token_f1(q, m) for q, m in zip(q_texts, m_texts)) / n}
    vs_merged["exact_match"] = sum(q.strip() == m.strip() for q, m in zip(q_texts, m_texts)) / n
    vs_merged["n"] = n

    key = "field_f1" if spec.kind == "extract" else "token_f1"
    gold_m, gold_q = _vs_gold(spec, m_ans, rows.gold), _vs_gold(spec, q_ans, rows.gold)
    m_secs, q_secs = sum(g.seconds for g in merged), sum(s for _, s in q_out)
    m_tps = sum(g.completion_tokens for g in merged) / m_secs if m_secs > 0 else None
    q_tps = sum(len(new) for new, _ in q_out) / q_secs if q_secs > 0 else None
    merged_bytes, gguf_bytes = _folder_bytes(merged_dir), gguf_file.stat().st_size
    out: dict[str, Any] = {
        "n": n,
        "quantized_vs_merged": vs_merged,
        "vs_gold": {"merged": gold_m, "quantized": gold_q, "metric": key,
                    "ratio": _ratio(gold_q.get(key), gold_m.get(key))},
        "speed": {"merged_tokens_per_s": m_tps, "quantized_tokens_per_s": q_tps, "ratio": _ratio(q_tps, m_tps),
                  "batch_size": 1, "threads": threads},
        "bytes": {"merged": merged_bytes, "gguf": gguf_bytes, "ratio": _ratio(gguf_bytes, merged_bytes)},
        "prompt_tokens_match": sum(same_tokens) / n,
        "decoding": {"max_new_tokens": max_new_tokens, "greedy": True, "constrained": False},
        "engines": {"merged": f"transformers {_version('transformers')}, {weights_dtype} weights computed in fp32",
                    "quantized": f"llama-cpp-python {_version('llama_cpp_python')}"},
        "samples": [{"merged": m_texts[i], "quantized": q_texts[i]} for i in range(min(n, 3))],
        "notes": list(rows.notes),
    }
    if spec.kind == "extract":
        out["json_valid"] = {"merged": sum(m_json) / n, "quantized": sum(q_json) / n}
        out["schema_valid"] = {"merged": sum(m_schema) / n, "quantized": sum(q_schema) / n}
    return out


def _merged_answers(pred, rows: ParitySet, max_new_tokens: int, say: Callable[[str], None]) -> dict[str, Any]:
    """The merged model's greedy answers, and the prompt token ids it was given (the GGUF gets the same)."""
    # bf16 weights are computed in fp32 on a CPU: exact, and faster there than bf16 (models.pick_dtype)
    weights_dtype = str(next(pred.model.parameters()).dtype).replace("torch.", "")
    pred.model.float()
    tok, info = pred.tokenizer, pred.info
    prompts = [student_prompt(tok, info, m) for m in rows.messages]
    ids = [tok(p, add_special_tokens=not has_chat_template(tok))["input_ids"] for p in prompts]
    say(f"parity: merged model (transformers) answers {len(ids)} test rows")
    pred.answer([{"role": "user", "content": "hi"}], 2)       # warm-up: the first call pays lazy initialisation
    return {"weights_dtype": weights_dtype, "prompts": prompts, "ids": ids,
            "answers": [pred.answer(m, max_new_tokens) for m in rows.messages]}


def parity_headline(p: dict[str, Any] | None) -> str:
    """One line for the CLI: agreement with the merged model, quality vs gold, speed."""
    if not p:
        return "parity: not measured"

    def f(x: float | None, d: int = 3) -> str:
        return "n/a" if x is None else f"{x:.{d}f}"

    vm, g, s = p["quantized_vs_merged"], p["vs_gold"], p["speed"]
    key = g["metric"].replace("_", " ")
    first = vm.get("field_f1", vm.get("token_f1"))
    line = (f"parity on {p['n']} test rows: {key} vs merged {f(first)}, identical answers {f(vm['exact_match'])}")
    if g["merged"].get("n"):
        line += (f"; {key} vs gold: quantized {f(g['quantized'].get(g['metric']))}, merged "
                 f"{f(g['merged'].get(g['metric']))} (ratio {f(g['ratio'])})")
    line += (f"; {f(s['quantized_tokens_per_s'], 1)} vs {f(s['merged_tokens_per_s'], 1)} tokens/s "
             f"(x{f(s['ratio'], 1)}), {p['bytes']['gguf'] / 1e6:.0f} MB vs {p['bytes']['merged'] / 1e6:.0f} MB")
    return line


# ------------------------------------------------------------------------------------------------
# export


@dataclass
class GGUFExport:
    out_dir: Path
    gguf_file: Path
    quantization: str
    report: dict[str, Any]
    moved_aside: Path | None = None


def _check_quant(quant: str) -> str:
    q = quant.upper()
    if q not in QUANTS:
        raise DistillError(f"unknown GGUF quantization {quant!r}", hint="use one of: " + ", ".join(QUANTS))
    return q


def export_gguf(merged_dir: str | Path, out_dir: str | Path, *, spec, quant: str = "Q8_0",
                info: dict[str, Any] | None = None, run_id: str | None = None, parity_rows: ParitySet | None = None,
                max_new_tokens: int | None = None, threads: int | None = None, force: bool = False,
                project_root: str | Path | None = None, protected: Sequence[Path] = (),
                say: Callable[[str], None] | None = None) -> GGUFExport:
    """Convert the merged HF folder ``merged_dir`` to a GGUF with the student's chat template and ``spec``'s
    metadata, quantize it (``quant``: Q8_0, Q4_K_M, Q4_0 or F16), and measure parity on ``parity_rows``
    (None: no parity). ``info``: the student info (default: ``merged_dir``'s distill_student.json); ``run_id``:
    the training run it came from. ``out_dir`` is checked as ``distill.export.lm`` does (``force`` moves a
    non-empty folder aside); ``project_root``/``protected`` name what must never be replaced."""
    from transformers import AutoTokenizer

    say = say or (lambda m: None)
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    quant = _check_quant(quant)
    if not (merged_dir / "config.json").is_file():
        raise DistillError(f"{merged_dir}: not a model folder (no config.json)",
                           hint="export the merged model first: `distill export PROJECT --format merged`")

    def check() -> bool:
        return check_export_target(out_dir, is_export=lambda p: False, root=project_root, protected=tuple(protected),
                                   force=force, default="exports/<run>-gguf-<quant> in the project",
                                   replaces="an empty folder (a GGUF export never replaces one)")

    check()                    # before the work
    find_converter()
    info = dict(info if info is not None else read_student_info(merged_dir))
    # llama.cpp's own default: half the logical CPUs (one per physical core). Its threads spin while they wait:
    # on our shared 2-core machine 2 threads gave 14 tokens/s against 68 with 1 (SmolLM2 Q8_0, other jobs running)
    threads = threads or max(1, len(os.sched_getaffinity(0)) // 2)
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    fmt = prompt_format(spec, info, tok)
    name = f"model-{quant.lower()}.gguf"
    strings = {"distill.task.name": spec.name, "distill.task.kind": spec.kind,
               "distill.system_prompt": fmt.system_prompt, "distill.prompt_mode": fmt.prompt_mode,
               "distill.input_prefix": fmt.input_prefix, "distill.user_template": spec.prompt.user,
               "distill.source_run_id": run_id or ""}
    if spec.kind == "extract" and spec.json_schema:
        strings["distill.json_schema"] = json.dumps(spec.json_schema, sort_keys=True, ensure_ascii=False)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    moved = None
    try:
        secs: dict[str, float] = {}
        t0 = time.perf_counter()
        # bf16 in the middle: lossless for bf16 weights (f16 would round their exponent range)
        outtype = "f16" if quant == "F16" else "bf16"
        raw = tmp / f".converted-{outtype}.gguf"
        say(f"gguf: converting {merged_dir.name} with llama.cpp's converter ({outtype})")
        convert(merged_dir, raw, outtype)
        secs["convert"] = time.perf_counter() - t0
        if QUANTS[quant]:
            t1 = time.perf_counter()
            say(f"gguf: quantizing to {quant}")
            quantized = tmp / f".quantized-{quant.lower()}.gguf"
            quantize(raw, quantized, quant, threads)
            raw.unlink()
            raw = quantized
            secs["quantize"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        write_metadata(raw, tmp / name, fmt.template, strings)
        raw.unlink()
        secs["metadata"] = time.perf_counter() - t1

        tok.save_pretrained(str(tmp))
        src_rel = os.path.relpath(merged_dir.resolve(), out_dir.resolve())
        write_student_info(tmp, {**info, "gguf_file": name, "quantization": quant, "exported_from": run_id,
                                 "merged_dir": src_rel})
        (tmp / "Modelfile").write_text(_modelfile(fmt, tok, name), encoding="utf-8")
        (tmp / "README.md").write_text(_readme(spec.name, name, quant, fmt), encoding="utf-8")

        report_parity = None
        if parity_rows is not None and parity_rows.messages:
            t1 = time.perf_counter()
            report_parity = parity(merged_dir, tmp / name, spec, parity_rows, threads=threads,
                                   max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS[spec.kind], say=say)
            secs["parity"] = time.perf_counter() - t1
        secs["total"] = time.perf_counter() - t0
        report = {
            "format": "gguf", "gguf_file": name, "quantization": quant, "intermediate": outtype,
            "model_run_id": run_id, "merged_dir": src_rel, "task": spec.name, "kind": spec.kind,
            "gguf_bytes": (tmp / name).stat().st_size, "merged_bytes": _folder_bytes(merged_dir),
            "seconds": {k: round(v, 3) for k, v in secs.items()},
            "chat_template": fmt.summary(), "metadata_keys": sorted(strings),
            "tools": {"llama_cpp_python": _version("llama_cpp_python"), "gguf": _version("gguf"),
                      "converter": str(Path("share/distill/llama.cpp") / CONVERTER)},
            "parity": report_parity, "created_at": time.time(), "version": 1,
        }
        report["bytes_ratio"] = _ratio(report["gguf_bytes"], report["merged_bytes"])
        (tmp / "export.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                                         encoding="utf-8")
        if check():            # again: something may have appeared at out_dir while we worked
            moved = move_aside(out_dir)
            say(f"moved the existing {out_dir} aside to {moved}")
        elif out_dir.exists():
            out_dir.rmdir()    # empty (checked)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return GGUFExport(out_dir, out_dir / name, quant, report, moved)


def test_rows(project, record: dict[str, Any], limit: int | None = None) -> ParitySet | None:
    """The locked test split as ``distill eval`` reads it (``dataset.rows``; test rows are never filtered),
    rendered as the teacher saw them; ``limit``: the same fixed hashed subset as `distill eval --limit`.
    The teacher is the one the model was trained on. None when there are no test rows."""
    import hashlib

    from distill.dataset import rows as dataset_rows
    from distill.task import render_messages

    t = record.get("teacher")
    tname = ((t.get("identity") or {}).get("name") or t.get("name")) if isinstance(t, dict) else t
    if not tname and not project.spec.teachers:
        return None
    rows = dataset_rows(project, tname or project.spec.get_teacher(None).name, ("test",))
    if not rows:
        return None
    notes = []
    if limit is not None and limit < len(rows):
        notes.append(f"--parity-limit {limit}: a fixed hashed subset of {limit} of the {len(rows)} test rows "
                     "(the rows `distill eval --limit` scores)")
        rows = sorted(rows, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())[:limit]
        rows.sort(key=lambda r: r.id)
    return ParitySet([render_messages(project.spec, r.text, r.segment, r.meta) for r in rows],
                     [r.gold for r in rows], notes)


def is_merge_of(folder: Path, ref) -> bool:
    """``folder`` is a merged export of the training run ``ref`` (by run id, or the absolute adapter path
    older exports recorded)."""
    try:
        info = read_student_info(folder)
    except DistillError:
        return False
    return (folder / "config.json").is_file() and info.get("merged_from") in (ref.run_id, str(ref.path))


def export_gguf_project(project, run_id: str | None = None, out: str | Path | None = None, quant: str = "Q8_0",
                        parity_limit: int | None = None, parity: bool = True, max_new_tokens: int | None = None,
                        threads: int | None = None, force: bool = False,
                        say: Callable[[str], None] | None = None) -> GGUFExport:
    """`distill export PROJECT --format gguf`: the serving LM student (or run ``run_id``), merged in bf16 into
    ``exports/<run>-merged`` unless that folder already holds a merge of the same run, then a GGUF in
    ``exports/<run>-gguf-<quant>`` (or ``out``) with parity on the locked test split (``parity_limit`` rows:
    a fixed hashed subset, as `distill eval --limit`; ``parity=False``: none). Registers an ``export_lm`` run."""
    from distill.export.lm import export_lm_project
    from distill.runs import to_store_path

    say = say or (lambda m: None)
    quant = _check_quant(quant)
    spec = project.spec
    if spec.kind not in ("extract", "generate"):
        raise DistillError(f"{project.root}: `--format gguf` is for LM students (extract/generate); this project "
                           f"is '{spec.kind}'", hint="use `distill export PROJECT --format onnx`")
    if parity_limit is not None and parity_limit < 1:
        raise DistillError(f"--parity-limit must be >= 1, got {parity_limit}", hint="or pass --no-parity")
    if run_id is None and project.latest_model() is None:
        raise DistillError(f"{project.root}: no finished generative-student run", hint=f"run `distill train "
                           f"{project.root}` then `distill eval {project.root}` first")
    find_converter()           # before minutes of merging
    ref = project.model(run_id=run_id) if run_id else project.serving_model()
    dest = Path(out) if out is not None else project.root / "exports" / f"{ref.run_id}-gguf-{quant.lower()}"
    protected = project_protected(project)
    check_export_target(dest, is_export=lambda p: False, root=project.root, protected=protected, force=force,
                        default=f"exports/{ref.run_id}-gguf-{quant.lower()} in the project",
                        replaces="an empty folder (a GGUF export never replaces one)")

    if not (ref.path / "adapter_config.json").exists():
        merged = ref.path           # a full fine-tune is already a complete model folder
    else:
        merged = project.root / "exports" / f"{ref.run_id}-merged"
        if is_merge_of(merged, ref):
            say(f"gguf: reusing the merged model {merged}")
        else:
            say(f"gguf: merging {ref.run_id} into {merged} (bf16)")
            merged = export_lm_project(project, run_id=ref.run_id, say=say)

    rows = test_rows(project, ref.record, parity_limit) if parity else None
    if parity and rows is None:
        say("gguf: no parity report: the project has no test rows")
    result = export_gguf(merged, dest, spec=spec, quant=quant, run_id=ref.run_id, parity_rows=rows,
                         max_new_tokens=max_new_tokens, threads=threads, force=force, project_root=project.root,
                         protected=protected, say=say)
    project.record_run(f"export-gguf-{ref.run_id}", "export_lm", "done", result.out_dir,
                       {"model_run_id": ref.run_id, "format": "gguf", "quantization": quant,
                        "gguf_file": result.gguf_file.name, "merged": to_store_path(project.root, merged),
                        "parity": result.report.get("parity") and {
                            k: result.report["parity"][k] for k in ("n", "quantized_vs_merged", "vs_gold")}})
    return result


def gguf_export_for(project, run_id: str) -> Path | None:
    """The newest finished GGUF export folder of the training run ``run_id`` that still holds its GGUF file."""
    from distill import runs

    for row in reversed(runs.all_runs(project.store)):
        if row["kind"] != "export_lm" or row["status"] != "done":
            continue
        rec = json.loads(row["record"] or "{}")
        if rec.get("format") != "gguf" or rec.get("model_run_id") != run_id:
            continue
        path = runs.from_store_path(project.root, row["path"])
        if path is not None and (path / (rec.get("gguf_file") or "")).is_file() and (path / STUDENT_FILE).is_file():
            return path
    return None


__all__ = ["export_gguf", "export_gguf_project", "gguf_export_for", "find_converter", "read_metadata",
           "prompt_format", "parity", "parity_headline", "ParitySet", "GGUFExport", "QUANTS", "GGUF_KEYS"]
