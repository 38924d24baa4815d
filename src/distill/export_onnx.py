"""Export an encoder student (an HF sequence-classification folder) to ONNX, and quantise it to int8.

Why ONNX: at serve time we want the classifier without torch — onnxruntime is a ~15 MB dependency, starts
in well under a second, and with dynamic int8 quantisation (weights int8, activations quantised on the
fly per batch; onnxruntime's ``quantize_dynamic``) a MiniLM-sized encoder runs several times faster on
CPU than torch fp32. Numbers for this machine are in ``bench/results/latency.json`` (`distill bench latency`).

How: ``torch.onnx.export`` with the TorchScript-based exporter (``dynamo=False``). The dynamo exporter
needs ``onnxscript``, which we do not ship; ``optimum`` does not support transformers 5. The model is
loaded with eager attention, because SDPA's masking path does not trace into a graph with a dynamic
sequence axis cleanly.

The graph has two outputs:
- ``logits``     [batch, labels]
- ``embeddings`` [batch, hidden] — the attention-masked mean of the last hidden state, the same feature
  ``ClassifierStudent.embed`` returns. The router's Mahalanobis OOD score (Lee et al. 2018,
  arXiv 1807.03888) uses it, so OOD routing works without torch at serve time.

Folder written by ``export_onnx``::

    out_dir/model.onnx          fp32
    out_dir/model.int8.onnx     dynamic int8 (when quantize=True)
    out_dir/labels.json         label names in logit order
    out_dir/tokenizer files     whatever the tokenizer's save_pretrained writes
    out_dir/export.json         ExportReport (sizes, opset, parity on the probe texts)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distill.errors import DistillError

# onnxruntime 1.2x supports opsets up to 21+; 17 is the lowest that has LayerNormalization as one op,
# which keeps the graph small and lets ORT fuse it.
OPSET = 17

# A handful of probe texts for the parity check when the caller gives none. They only need to exercise
# different lengths and padding, not the task.
_PROBE_TEXTS = [
    "hello",
    "the quick brown fox jumps over the lazy dog",
    "I would like to cancel my subscription, please, as soon as possible.",
    "a",
    "what is the status of order 12345?",
    "this is a rather long sentence " * 6,
]


@dataclass
class ExportReport:
    out_dir: str
    labels: list[str]
    opset: int
    inputs: list[str]
    fp32_path: str
    int8_path: str | None
    fp32_bytes: int
    int8_bytes: int | None
    torch_bytes: int
    export_seconds: float
    parity_fp32: dict[str, Any] = field(default_factory=dict)
    parity_int8: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# labels


def read_labels(folder: Path) -> list[str]:
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


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir() or not (model_dir / "config.json").exists():
        raise DistillError(f"{model_dir}: not a model folder (no config.json)",
                           hint="train a student first (`distill train`), or pass the folder it wrote")


# ------------------------------------------------------------------------------------------------
# torch side


def _load_torch(model_dir: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), attn_implementation="eager")
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tok


def _max_length(tok, model) -> int:
    # the tokenizer's model_max_length is often a huge sentinel (1e30) when unset
    n = getattr(tok, "model_max_length", None) or 512
    pos = getattr(model.config, "max_position_embeddings", None) or 512
    return int(min(n, pos, 512))


def _wrapper(model):
    import torch

    class _LogitsAndEmbeddings(torch.nn.Module):
        """(logits, masked mean of the last hidden state) from one forward pass."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kw = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": True}
            if token_type_ids is not None:
                kw["token_type_ids"] = token_type_ids
            out = self.m(**kw)
            h = out.hidden_states[-1]
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            emb = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return out.logits, emb

    return _LogitsAndEmbeddings(model).eval()


def torch_outputs(model, tok, texts: Sequence[str], batch_size: int = 32, max_length: int = 512
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, L], embeddings [N, H]) from the torch model, computed the same way as the ONNX graph."""
    import torch

    w = _wrapper(model)
    probs, embs = [], []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            logits, emb = w(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
            probs.append(torch.softmax(logits.float(), -1).numpy())
            embs.append(emb.float().numpy())
    return np.concatenate(probs), np.concatenate(embs)


# ------------------------------------------------------------------------------------------------
# export


def export_onnx(model_dir: str | Path, out_dir: str | Path, *, quantize: bool = True,
                parity_texts: Sequence[str] | None = None, opset: int = OPSET) -> ExportReport:
    """Export ``model_dir`` (an HF sequence-classification folder) to ``out_dir`` and check parity.

    The folder is written under a temporary name and renamed into place at the end, so an interrupted
    export never leaves a half-written model that the server would load."""
    import shutil
    import tempfile

    import torch

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_model_dir(model_dir)
    labels = read_labels(model_dir)
    t0 = time.perf_counter()
    model, tok = _load_torch(model_dir)
    if model.config.num_labels != len(labels):
        raise DistillError(f"{model_dir}: labels.json has {len(labels)} labels but the model has "
                           f"{model.config.num_labels} outputs", hint="the folder is inconsistent; re-train or re-save it")
    max_len = _max_length(tok, model)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".", suffix=".tmp"))
    try:
        enc = tok(["hello world", "a slightly longer example input"], padding=True, return_tensors="pt")
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
        args = tuple(enc[n] for n in names)
        dyn = {n: {0: "batch", 1: "sequence"} for n in names}
        dyn.update({"logits": {0: "batch"}, "embeddings": {0: "batch"}})
        fp32 = tmp / "model.onnx"
        # The tracer warns that transformers' mask code turns `kv_length - mask_length > 0` into a constant:
        # for an encoder both are the sequence length, so it is False for every input and the constant is right.
        with torch.inference_mode():
            torch.onnx.export(_wrapper(model), args, str(fp32), input_names=names,
                              output_names=["logits", "embeddings"], dynamic_axes=dyn, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        int8 = None
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            int8 = tmp / "model.int8.onnx"
            # QInt8 weights: the signed/symmetric form ORT's CPU MatMulInteger kernels are fastest with.
            # Per-channel scales: on the demo student (SNIPS, 254 test texts) per-tensor scales flipped 2 argmaxes
            # (agreement 0.992, max |dp| 0.25); per-channel flipped none (1.000, max |dp| 0.08) at the same
            # batch-1 latency (2.72 vs 2.86 ms p50, measured side by side).
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
        tok.save_pretrained(str(tmp))
        (tmp / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
        (tmp / "onnx_config.json").write_text(json.dumps({"max_length": max_len, "inputs": names, "opset": opset}),
                                               encoding="utf-8")
        export_s = time.perf_counter() - t0

        texts = list(parity_texts) if parity_texts else _PROBE_TEXTS
        ref_probs, ref_emb = torch_outputs(model, tok, texts, max_length=max_len)
        par32 = parity(ref_probs, OnnxClassifier(tmp, int8=False).predict_proba(texts))
        par8 = parity(ref_probs, OnnxClassifier(tmp, int8=True).predict_proba(texts)) if quantize else None
        torch_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) or \
            sum(f.stat().st_size for f in model_dir.glob("*.bin"))
        report = ExportReport(
            out_dir=str(out_dir), labels=labels, opset=opset, inputs=names,
            fp32_path=str(out_dir / "model.onnx"), int8_path=str(out_dir / "model.int8.onnx") if quantize else None,
            fp32_bytes=fp32.stat().st_size, int8_bytes=int8.stat().st_size if int8 else None,
            torch_bytes=torch_bytes, export_seconds=round(export_s, 3), parity_fp32=par32, parity_int8=par8,
        )
        (tmp / "export.json").write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
        if out_dir.exists():
            # replace an older export: move it aside first so there is never a moment with no model
            old = out_dir.with_name(out_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def parity(ref_probs: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """How closely ``probs`` follows ``ref_probs`` (both [N, L]): share of rows with the same argmax and the
    largest absolute probability difference."""
    ref_probs, probs = np.asarray(ref_probs), np.asarray(probs)
    if ref_probs.shape != probs.shape:
        raise ValueError(f"shape mismatch: {ref_probs.shape} vs {probs.shape}")
    agree = float((ref_probs.argmax(-1) == probs.argmax(-1)).mean()) if len(probs) else 1.0
    return {"n": int(len(probs)), "argmax_agreement": agree,
            "max_abs_prob_diff": float(np.abs(ref_probs - probs).max()) if len(probs) else 0.0}


def check_parity(model_dir: str | Path, onnx_dir: str | Path, texts: Sequence[str], *, int8: bool = True
                 ) -> dict[str, Any]:
    """Parity of an exported folder against its torch source on ``texts`` (e.g. the validation split)."""
    model, tok = _load_torch(Path(model_dir))
    onnx = OnnxClassifier(onnx_dir, int8=int8)
    ref, _ = torch_outputs(model, tok, texts, max_length=onnx.max_length)
    return parity(ref, onnx.predict_proba(texts))


# ------------------------------------------------------------------------------------------------
# inference without torch


class OnnxClassifier:
    """The exported classifier behind the same interface as ``ClassifierStudent``: ``.labels``,
    ``.predict_proba(texts)``, ``.embed(texts)``, plus ``.logits_and_embeddings`` (one pass for both; the
    router wants logits for the energy score and embeddings for Mahalanobis)."""

    def __init__(self, path: str | Path, int8: bool = True, threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.path = Path(path)
        fname = "model.int8.onnx" if int8 else "model.onnx"
        f = self.path / fname
        if not f.exists():
            raise DistillError(f"{f}: not found", hint="export the model first: `distill export PROJECT --onnx`"
                               + ("" if not int8 else " (or load with int8=False for the fp32 graph)"))
        self.labels = read_labels(self.path)
        cfg_file = self.path / "onnx_config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.exists() else {}
        self.max_length = int(cfg.get("max_length", 512))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.int8 = int8

    def size_bytes(self) -> int:
        return (self.path / ("model.int8.onnx" if self.int8 else "model.onnx")).stat().st_size

    def logits_and_embeddings(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        logits, embs = [], []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="np")
            feed = {n: enc[n].astype(np.int64) for n in self.input_names}
            lo, em = self.session.run(["logits", "embeddings"], feed)
            logits.append(lo)
            embs.append(em)
        if not logits:
            return np.zeros((0, len(self.labels)), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(logits), np.concatenate(embs)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        logits, _ = self.logits_and_embeddings(texts, batch_size)
        return softmax(logits)

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.logits_and_embeddings(texts, batch_size)[1]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# the project-level step `distill export PROJECT --onnx` runs


def export_project(project_dir: str | Path, *, model_path: str | Path | None = None, out_dir: str | Path | None = None,
                   quantize: bool = True, teacher: str | None = None, max_parity_texts: int = 500) -> ExportReport:
    """Export the latest trained student (or ``model_path``) to ``out_dir`` (default: ``onnx/`` beside the
    model folder, where `distill serve` looks for it) and check parity on up to ``max_parity_texts``
    test-split inputs (the probe texts when the project has none)."""
    from distill.dataset import rows
    from distill.project import Project
    from distill.serve.app import resolve_model_path

    project = Project.open(project_dir)
    try:
        path = resolve_model_path(project, model_path)
        texts: list[str] = []
        if project.spec.teachers:
            tname = project.spec.get_teacher(teacher).name
            # the locked test split: what the parity bar is about, and never trained on
            texts = [r.text for r in rows(project, tname, splits=("test",), only_kept=False)][:max_parity_texts]
    finally:
        project.close()
    return export_onnx(path, Path(out_dir) if out_dir else path.parent / "onnx", quantize=quantize,
                       parity_texts=texts or None)
