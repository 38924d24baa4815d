"""Predictors: a trained student loaded for answering, one small interface per student kind.

serve, eval, the router and export all load models through here, so none of them imports another's
module (``serve/app.py`` is imported by the CLI only).

- ``EncoderPredictor`` (classify students), two backends with the same numbers out:
  ``EncoderTorchPredictor`` (the ``ClassifierStudent`` folder `distill train` wrote) and ``OnnxPredictor``
  (the fp32 or int8 graph `distill export --format onnx` wrote; no torch at serve time). Both return
  ``(logits, embeddings)`` from one pass, where embeddings are the attention-masked mean of the last hidden
  state, so a router calibrated on either backend reads the same kind of feature.
- ``GenerativePredictor`` (extract/generate students): greedy answers to chat messages with token counts
  and timings — what eval measures today, and the shape the LM-serving work fills (streaming, constrained
  decoding, batching) behind the same ``answer`` call.

``load_predictor(path, backend)`` picks the class for a folder: an ONNX export (``model*.onnx``), an encoder
folder (``labels.json``), or an LM student (``distill_student.json``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from distill.errors import DistillError

Backend = Literal["auto", "onnx", "torch"]


@runtime_checkable
class EncoderPredictor(Protocol):
    """A classify student ready to answer. ``labels`` are in logit order; ``path`` is the loaded folder."""

    labels: list[str]
    path: Path

    def logits_and_embeddings(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """([N, L] logits, [N, H] mean-pooled last hidden states) in input order."""
        ...

    def logits_and_layers(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """([N, L] logits, [N, layers + 1, H] mean-pooled hidden states of every layer) in input order."""
        ...

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """[N, L] probabilities."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens the model reads for ``text`` (special tokens included, cut at its max length): `usage`."""
        ...

    def size_bytes(self) -> int:
        """Bytes of the weights this predictor loaded (what you ship)."""
        ...


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# encoder students: torch


class EncoderTorchPredictor:
    """``ClassifierStudent`` -> (logits, mean-pooled last hidden state) in one forward pass, computed as the
    ONNX graph computes them."""

    def __init__(self, path: str | Path, device: str = "auto"):
        from distill.students.classifier import ClassifierStudent

        self.student = ClassifierStudent.load(path, device=device)
        self.labels = list(self.student.labels)
        self.path = Path(path)

    def logits_and_embeddings(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        logits, layers = self.logits_and_layers(texts, batch_size)
        return logits, (layers[:, -1] if layers.size else np.zeros((0, 0), np.float32))

    def logits_and_layers(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(logits [N, L], masked mean of every hidden state [N, layers + 1, H]; index 0 = embedding layer)."""
        import torch

        s = self.student
        s.model.eval()
        logits, layers = [], []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = s.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True,
                                  max_length=s.max_length, return_tensors="pt").to(s.device)
                out = s.model(**enc, output_hidden_states=True)
                hs = torch.stack(out.hidden_states, 1).float()
                mask = enc["attention_mask"][:, None, :, None].to(hs.dtype)
                layers.append(((hs * mask).sum(2) / mask.sum(2).clamp(min=1.0)).cpu().numpy())
                logits.append(out.logits.float().cpu().numpy())
        if not logits:
            return np.zeros((0, len(self.labels)), np.float32), np.zeros((0, 0, 0), np.float32)
        return np.concatenate(logits), np.concatenate(layers)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.student.predict_proba(list(texts), batch_size=batch_size)

    def count_tokens(self, text: str) -> int:
        s = self.student
        return len(s.tokenizer(text, truncation=True, max_length=s.max_length)["input_ids"])

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.logits_and_embeddings(texts, batch_size)[1]

    def size_bytes(self) -> int:
        return self.student.size_bytes()


# ------------------------------------------------------------------------------------------------
# encoder students: ONNX Runtime


def read_labels(folder: str | Path) -> list[str]:
    """labels.json (a list, or {"labels": [...]}) or else config.json's id2label, in logit order."""
    folder = Path(folder)
    f = folder / "labels.json"
    if f.exists():
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DistillError(f"{f}: not valid JSON (line {e.lineno}): {e.msg}",
                               hint="re-save the model with `distill train`, or fix the file by hand") from None
        labels = data.get("labels") if isinstance(data, dict) else data
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise DistillError(f"{f}: expected a JSON list of label names", hint='e.g. ["positive", "negative"]')
        return labels
    cfg = folder / "config.json"
    if cfg.exists():
        id2label = json.loads(cfg.read_text(encoding="utf-8")).get("id2label") or {}
        if id2label:
            return [id2label[k] for k in sorted(id2label, key=int)]
    raise DistillError(f"{folder}: no labels.json and no id2label in config.json",
                       hint="point at a folder written by `distill train` (ClassifierStudent.save)")


class OnnxPredictor:
    """An exported classifier (``model.onnx`` / ``model.int8.onnx`` + tokenizer + labels.json) on ONNX Runtime.
    ``threads`` sets intra-op threads (None: onnxruntime's default, one per core); ``spin=False`` stops idle pool
    threads from busy-waiting (what a server wants)."""

    def __init__(self, path: str | Path, int8: bool = True, threads: int | None = None, spin: bool = True):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.path = Path(path)
        fname = "model.int8.onnx" if int8 else "model.onnx"
        f = self.path / fname
        if not f.exists():
            raise DistillError(f"{f}: not found", hint="export the model first: `distill export PROJECT --format onnx`"
                               + ("" if not int8 else " (or load with int8=False for the fp32 graph)"))
        self.labels = read_labels(self.path)
        cfg_file = self.path / "onnx_config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.exists() else {}
        self.max_length = int(cfg.get("max_length", 512))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:
            # onnxruntime's pool threads busy-wait for the next run after each one; in a server the event loop
            # and the store writer need those cycles (measured: ~20 ms of CPU burnt per batch-1 request)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.int8 = int8

    def size_bytes(self) -> int:
        return (self.path / ("model.int8.onnx" if self.int8 else "model.onnx")).stat().st_size

    def _run(self, texts: Sequence[str], batch_size: int, second: str, empty: tuple[int, ...]
             ) -> tuple[np.ndarray, np.ndarray]:
        """(logits, the graph output ``second``) over ``texts`` in batches."""
        logits, other = [], []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="np")
            feed = {n: enc[n].astype(np.int64) for n in self.input_names}
            lo, x = self.session.run(["logits", second], feed)
            logits.append(lo)
            other.append(x)
        if not logits:
            return np.zeros((0, len(self.labels)), np.float32), np.zeros(empty, np.float32)
        return np.concatenate(logits), np.concatenate(other)

    def logits_and_embeddings(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        return self._run(texts, batch_size, "embeddings", (0, 0))

    def logits_and_layers(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(logits [N, L], masked mean of every hidden state [N, layers + 1, H]), as the torch predictor."""
        if "layer_embeddings" not in {o.name for o in self.session.get_outputs()}:
            raise DistillError(f"{self.path}: this ONNX export has no per-layer features (an export from before "
                               "per-layer features were added); the multi-layer Mahalanobis router needs them",
                               hint="re-export: `distill export PROJECT --format onnx`, then `distill route calibrate`")
        return self._run(texts, batch_size, "layer_embeddings", (0, 0, 0))

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        logits, _ = self.logits_and_embeddings(texts, batch_size)
        return softmax(logits)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.logits_and_embeddings(texts, batch_size)[1]


def onnx_dir_for(model_path: str | Path) -> Path | None:
    """Where `distill export --format onnx` put the export of ``model_path`` (the folder itself, or ./onnx
    beside it)."""
    model_path = Path(model_path)
    for d in (model_path, model_path.parent / "onnx", model_path / "onnx"):
        if (d / "model.int8.onnx").exists() or (d / "model.onnx").exists():
            return d
    return None


# ------------------------------------------------------------------------------------------------
# generative students (extract / generate)


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class GenerativePredictor:
    """A causal-LM student (LoRA adapter on its base, or a merged/full folder) answering chat messages
    greedily, one request at a time. ``disable_adapter()`` gives the untuned base without a second copy of
    the weights (eval's "did distillation help at all?" row)."""

    def __init__(self, path: str | Path, device: str = "auto", cpu_threads: int | None = None):
        import torch

        from distill.models import pick_device, stop_token_ids
        from distill.students.causal_lm import load_student

        dev = pick_device(device)
        if dev == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.path = Path(path)
        self.model, self.tokenizer, self.info = load_student(self.path, device=dev)
        # turn-end markers too, not only eos: an untuned base must not ramble to max_new_tokens
        self.stop = stop_token_ids(self.tokenizer) or None
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.stop or [0])[0]

    @property
    def is_adapter(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def size_bytes(self) -> int:
        """Bytes of the weights held in memory (base + adapter for a LoRA student)."""
        return int(sum(p.numel() * p.element_size() for p in self.model.parameters()))

    def answer(self, messages: list[dict], max_new_tokens: int, info: dict[str, Any] | None = None,
               model=None, tokenizer=None) -> Generation:
        """The greedy answer to one chat (the prompt the teacher saw; the student's own prompt mode and task
        prefix from its ``distill_student.json`` are applied, unless ``info`` overrides them)."""
        import torch

        from distill.students.causal_lm import has_chat_template, student_prompt

        model = model if model is not None else self.model
        tok = tokenizer if tokenizer is not None else self.tokenizer
        t0 = time.perf_counter()
        prompt = student_prompt(tok, info if info is not None else self.info, messages)
        enc = tok(prompt, add_special_tokens=not has_chat_template(tok), return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad,
                                 eos_token_id=self.stop)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        return Generation(text=tok.decode(new, skip_special_tokens=True), prompt_tokens=enc["input_ids"].shape[1],
                          completion_tokens=len(new), seconds=time.perf_counter() - t0)


class GGUFPredictor:
    """A GGUF export of an LM student (``distill export --format gguf``) answering like
    ``GenerativePredictor.answer``, through the engine ``distill serve`` uses (llama.cpp,
    ``distill.students.gguf_engine``) and with the same constraint: ``schema`` (an extract task's JSON
    schema) is enforced by the grammar. So `distill eval --model EXPORT` scores exactly what is served."""

    is_adapter = False

    def __init__(self, path: str | Path, schema: dict | None = None, n_threads: int | None = None,
                 n_ctx_per_seq: int = 4096):
        from distill.students.gguf_engine import GGUFStudent

        self.student = GGUFStudent(path, max_batch=1, n_threads=n_threads, n_ctx_per_seq=n_ctx_per_seq)
        self.path, self.info, self.tokenizer = self.student.path, self.student.info, self.student.tokenizer
        self.schema = schema
        self.device = f"cpu (llama.cpp, {self.student.engine.n_threads} threads)"

    def size_bytes(self) -> int:
        return self.student.size_bytes()

    def answer(self, messages: list[dict], max_new_tokens: int, info: dict[str, Any] | None = None,
               model=None, tokenizer=None) -> Generation:
        if info is not None or model is not None or tokenizer is not None:
            raise DistillError("a GGUF export answers with its own prompt format and weights only")
        r = self.student.engine.generate(self.student.request(messages, max_new_tokens, schema=self.schema))
        return Generation(text=r.text, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                          seconds=r.seconds)

    def close(self) -> None:
        self.student.close()


def is_gguf_export(path: str | Path) -> bool:
    """A folder holding a .gguf file and a distill_student.json: an LM student exported for llama.cpp."""
    p = Path(path)
    return p.is_dir() and (p / "distill_student.json").exists() and any(p.glob("*.gguf"))


# ------------------------------------------------------------------------------------------------
# loading


def load_predictor(model_path: str | Path, backend: Backend = "auto", device: str = "auto", threads: int | None = None,
                   spin: bool = True):
    """The predictor for a model folder: ONNX when exported (``backend`` auto/onnx), else torch; a
    ``GenerativePredictor`` for LM students. ``threads``: onnxruntime's intra-op threads (None: one per core)."""
    model_path = Path(model_path)
    if backend not in ("auto", "onnx", "torch"):
        raise DistillError(f"backend {backend!r} is not one of auto, onnx, torch")
    if is_gguf_export(model_path):
        return GGUFPredictor(model_path)
    if (model_path / "distill_student.json").exists():
        if backend == "onnx":
            raise DistillError(f"{model_path}: an LM student has no ONNX export", hint="use --backend torch")
        return GenerativePredictor(model_path, device=device)
    onnx_dir = onnx_dir_for(model_path)
    if backend == "onnx" or (backend == "auto" and onnx_dir is not None):
        if onnx_dir is None:
            raise DistillError(f"{model_path}: no ONNX export found",
                               hint="run `distill export PROJECT --format onnx` first")
        return OnnxPredictor(onnx_dir, int8=(onnx_dir / "model.int8.onnx").exists(), threads=threads,
                             spin=spin)
    return EncoderTorchPredictor(model_path, device=device)
