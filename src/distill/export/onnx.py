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
  ``ClassifierStudent.embed`` returns.
- ``layer_embeddings`` [batch, layers + 1, hidden] — the same masked mean of every hidden state (index 0: the
  embedding layer, -1: the last layer). The router's multi-layer Mahalanobis OOD score (Lee et al. 2018,
  arXiv 1807.03888) reads it, so OOD routing works without torch at serve time and costs no second pass.

Folder written by ``export_onnx``::

    out_dir/model.onnx          fp32
    out_dir/model.int8.onnx     dynamic int8 (when quantize=True)
    out_dir/labels.json         label names in logit order
    out_dir/tokenizer files     whatever the tokenizer's save_pretrained writes
    out_dir/export.json         ExportReport (sizes, opset, parity on the probe texts); its paths are
                                relative to out_dir, so a copied or moved export describes itself

Where it may write: ``distill.fsutil.check_export_target``. An existing folder is replaced only when it is a
previous ONNX export (it has export.json and onnx_config.json); the old export is then deleted. Anything else
is refused, or with ``force`` moved aside to ``NAME.replaced-TIME``, never deleted; the project folder, its
store and spec, and what the store points at are refused even with ``force``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distill.errors import DistillError
from distill.fsutil import check_export_target, move_aside
from distill.students.predictor import OnnxPredictor, read_labels

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
    notes: list[str] = field(default_factory=list)
    moved_aside: str | None = None     # where a non-export folder at out_dir went (force=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_onnx_export(path: Path) -> bool:
    """A folder ``export_onnx`` wrote (the only kind of existing folder it replaces, and so deletes)."""
    return path.is_dir() and (path / "export.json").is_file() and (path / "onnx_config.json").is_file()


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
        """(logits, masked mean of the last hidden state, masked mean of every hidden state) from one pass."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kw = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": True}
            if token_type_ids is not None:
                kw["token_type_ids"] = token_type_ids
            out = self.m(**kw)
            hs = torch.stack(out.hidden_states, 1)                        # [B, layers+1, T, H]
            mask = attention_mask[:, None, :, None].to(hs.dtype)
            layers = (hs * mask).sum(2) / mask.sum(2).clamp(min=1.0)      # [B, layers+1, H]
            return out.logits, layers[:, -1], layers

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
            logits, emb, _ = w(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
            probs.append(torch.softmax(logits.float(), -1).numpy())
            embs.append(emb.float().numpy())
    return np.concatenate(probs), np.concatenate(embs)


# ------------------------------------------------------------------------------------------------
# export


def export_onnx(model_dir: str | Path, out_dir: str | Path, *, quantize: bool = True,
                parity_texts: Sequence[str] | None = None, opset: int = OPSET, force: bool = False,
                project_root: str | Path | None = None, protected: Sequence[Path] = ()) -> ExportReport:
    """Export ``model_dir`` (an HF sequence-classification folder) to ``out_dir`` and check parity.

    The folder is written under a temporary name and renamed into place at the end, so an interrupted
    export never leaves a half-written model that the server would load. ``out_dir`` is checked first (see
    the module docstring): ``project_root``/``protected`` name what must never be replaced; ``force`` moves a
    folder that is not a previous export aside instead of refusing."""
    import shutil
    import tempfile

    import torch

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_model_dir(model_dir)

    def check() -> bool:
        return check_export_target(out_dir, is_export=is_onnx_export, root=project_root, protected=tuple(protected),
                                   force=force, default="onnx/ beside the model folder",
                                   replaces="a previous ONNX export (a folder with export.json and onnx_config.json)")

    check()   # before minutes of work
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
        dyn.update({"logits": {0: "batch"}, "embeddings": {0: "batch"}, "layer_embeddings": {0: "batch"}})
        fp32 = tmp / "model.onnx"
        # The tracer warns that transformers' mask code turns `kv_length - mask_length > 0` into a constant:
        # for an encoder both are the sequence length, so it is False for every input and the constant is right.
        with torch.inference_mode():
            torch.onnx.export(_wrapper(model), args, str(fp32), input_names=names,
                              output_names=["logits", "embeddings", "layer_embeddings"], dynamic_axes=dyn, opset_version=opset,
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
        par32 = parity(ref_probs, OnnxPredictor(tmp, int8=False).predict_proba(texts))
        par8 = parity(ref_probs, OnnxPredictor(tmp, int8=True).predict_proba(texts)) if quantize else None
        torch_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) or \
            sum(f.stat().st_size for f in model_dir.glob("*.bin"))
        report = ExportReport(
            out_dir=str(out_dir), labels=labels, opset=opset, inputs=names,
            fp32_path=str(out_dir / "model.onnx"), int8_path=str(out_dir / "model.int8.onnx") if quantize else None,
            fp32_bytes=fp32.stat().st_size, int8_bytes=int8.stat().st_size if int8 else None,
            torch_bytes=torch_bytes, export_seconds=round(export_s, 3), parity_fp32=par32, parity_int8=par8,
        )
        # paths relative to the export folder itself: a copied or moved export stays self-consistent
        (tmp / "export.json").write_text(json.dumps({
            **report.to_dict(), "out_dir": ".", "fp32_path": "model.onnx",
            "int8_path": "model.int8.onnx" if quantize else None}, indent=2), encoding="utf-8")
        aside = check()   # again: something may have appeared at out_dir while we worked
        if aside:
            report.moved_aside = str(move_aside(out_dir))
            os.replace(tmp, out_dir)
        elif out_dir.exists():
            if (out_dir / "router.json").exists():
                # thresholds belong to the weights they were fitted on: a new export needs a new calibration
                report.notes.append(f"the previous export's router calibration ({out_dir / 'router.json'}) was "
                                    "replaced with the export: re-run `distill route calibrate PROJECT`; until "
                                    "then the student answers every request")
            # a previous export (or an empty folder): move it to a name of our own first, so there is never a
            # moment with no model, then delete it; nothing but a previous export is ever deleted here
            old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old")
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
    onnx = OnnxPredictor(onnx_dir, int8=int8)
    ref, _ = torch_outputs(model, tok, texts, max_length=onnx.max_length)
    return parity(ref, onnx.predict_proba(texts))


# ------------------------------------------------------------------------------------------------
# the project-level step `distill export PROJECT --onnx` runs


def export_project(project_dir: str | Path, *, model_path: str | Path | None = None, out_dir: str | Path | None = None,
                   quantize: bool = True, teacher: str | None = None, max_parity_texts: int = 500,
                   force: bool = False) -> ExportReport:
    """Export the project's serving model (or ``model_path``) to ``out_dir`` (default: ``onnx/`` beside the
    model folder, where `distill serve` looks for it) and check parity on up to ``max_parity_texts``
    test-split inputs (the probe texts when the project has none). ``out_dir`` may not be the project, its
    store, spec, recordings or what its store points at; ``force``: see ``export_onnx``."""
    from distill.dataset import rows
    from distill.fsutil import project_protected
    from distill.project import Project

    project = Project.open(project_dir)
    try:
        if project.spec.kind != "classify":
            raise DistillError(f"{project.root}: ONNX export is for encoder (classify) students; this project is "
                               f"'{project.spec.kind}'", hint="use `distill export PROJECT --format merged`")
        path = project.serving_model(model_path).path
        root, protected = project.root, project_protected(project)
        target = Path(out_dir) if out_dir else path.parent / "onnx"
        texts: list[str] = []
        if project.spec.teachers:
            tname = project.spec.get_teacher(teacher).name
            # the locked test split: what the parity bar is about, and never trained on
            texts = [r.text for r in rows(project, tname, splits=("test",), only_kept=False)][:max_parity_texts]
    finally:
        project.close()
    return export_onnx(path, target, quantize=quantize, parity_texts=texts or None, force=force,
                       project_root=root, protected=protected)
