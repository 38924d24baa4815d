"""The encoder student for ``classify`` projects: a small transformer encoder + a linear head.

A saved student is an ordinary Hugging Face folder (``AutoModelForSequenceClassification`` and
``AutoTokenizer`` load it with no distill installed) plus ``labels.json``, the label names in head order.
The head order is the order of ``labels:`` in distill.yaml, so probabilities line up with the teacher's.

The default base is the packaged all-MiniLM-L6-v2 (22.7M parameters, 6 layers x 384): small enough to
train on a CPU in minutes and serve at a few ms per input, and already a good sentence encoder, which is
what ``embed`` (used for out-of-distribution routing) relies on. Nothing here ever contacts the hub:
``base`` is a packaged name or a local folder.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from transformers.utils import logging as hf_logging
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError, write_failed
from distill.models import PACKAGED, resolve_model

LABELS_FILE = "labels.json"


def packaged_encoders() -> list[str]:
    """Packaged names (``distill.models.PACKAGED``) that are encoder folders a classifier can start from."""
    return [n for n, p in PACKAGED.items() if p.kind in ("hf_folder", "zip_parts")]


def resolve_base(base: str) -> Path:
    """A packaged encoder name or a local HF folder -> the folder to load. Never a hub id: offline by design.
    Packaged names resolve through ``distill.models`` (which checks the package version and, for a split zip
    such as all-mpnet-base-v2, joins and unpacks it once into the cache)."""
    key = base.strip().lower().removeprefix("sentence-transformers/")
    if key in packaged_encoders():
        return resolve_model(key).hf_dir
    path = Path(base).expanduser()
    if not (path / "config.json").is_file():
        raise DistillError(
            f"student base '{base}' is neither a packaged encoder ({', '.join(packaged_encoders())}) "
            "nor a local Hugging Face folder with a config.json",
            hint="set `student: {base: all-minilm-l6-v2}` in distill.yaml, or point it at a downloaded model folder "
            "(distill never downloads from the hub)",
        )
    return path


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> the first GPU if there is one, else the CPU. 'cpu' / 'cuda' / 'cuda:N' are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DistillError(f"device '{device}' is not a torch device", hint="use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DistillError(f"device '{device}' was asked for but no CUDA GPU is visible", hint="use device: auto or cpu")
    return dev


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 autocast on GPUs that support it: ~2x faster inference, same argmax in practice. The CPU stays
    # fp32 because CPU bf16 matmuls are slower than fp32 on most server chips without AMX.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(eq=False)
class ClassifierStudent:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    labels: list[str]
    max_length: int
    device: torch.device
    path: Path | None = None      # the folder it was loaded from / last saved to

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, base: str, labels: list[str], device: str = "auto", max_length: int | None = None) -> "ClassifierStudent":
        """A fresh student: the base encoder's weights + a new, randomly initialised head for ``labels``.
        Seed torch (``transformers.set_seed``) before calling if you need the head to be reproducible."""
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise DistillError(f"a classifier needs at least two distinct labels, got {labels}")
        folder = resolve_base(base)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # The new head is *meant* to be missing from the base checkpoint; transformers' load report about it
        # would read like an error to a new user, so it is silenced for this one call.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                folder,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                problem_type="single_label_classification",
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        limit = _position_limit(model, tokenizer)
        max_length = limit if max_length is None else min(max_length, limit)
        dev = pick_device(device)
        return cls(model=model.to(dev), tokenizer=tokenizer, labels=list(labels), max_length=max_length, device=dev)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "ClassifierStudent":
        path = Path(path)
        if not (path / LABELS_FILE).is_file() or not (path / "config.json").is_file():
            raise DistillError(
                f"{path}: not a distill classifier folder (needs config.json and {LABELS_FILE})",
                hint="pass the `final` folder of a training run, e.g. PROJECT/models/<run_id>/final",
            )
        labels = json.loads((path / LABELS_FILE).read_text(encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path)
        head = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if head != labels:
            raise DistillError(
                f"{path}: {LABELS_FILE} says {labels} but the model head is {head}",
                hint="the folder was edited by hand or mixed from two runs; retrain or restore it",
            )
        dev = pick_device(device)
        max_length = min(int(tokenizer.model_max_length), _position_limit(model, tokenizer))
        return cls(model=model.to(dev), tokenizer=tokenizer, labels=labels, max_length=max_length, device=dev, path=path)

    def save(self, path: str | Path) -> Path:
        """Write an ordinary HF folder + ``labels.json``. ``max_length`` travels as the tokenizer's
        ``model_max_length``, so anyone loading the folder truncates exactly as we trained."""
        path = Path(path)
        self.tokenizer.model_max_length = self.max_length
        try:
            path.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            (path / LABELS_FILE).write_text(json.dumps(self.labels, ensure_ascii=False, indent=1), encoding="utf-8")
        except (OSError, RuntimeError, SafetensorError) as e:     # disk full, ulimit -f, read-only folder
            raise write_failed("the student model", path, e) from None
        self.path = path
        return path

    # -- inference ------------------------------------------------------------------------------------
    def _batches(self, texts: list[str], batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """Batches of similar length (sorted by token count), so padding is small; yields the input
        positions of each batch so callers can write results back in input order."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        if not texts:
            return
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            feats = {k: [enc[k][i] for i in idx] for k in enc.keys()}
            batch = self.tokenizer.pad(feats, return_tensors="pt")
            yield idx, {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def predict_proba(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """[N, L] probabilities over ``self.labels``, rows in input order."""
        self.model.eval()
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for idx, batch in self._batches(texts, batch_size):
            with _autocast(self.device):
                logits = self.model(**batch).logits
            out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return out

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """[N, H] mean-pooled last hidden states (padding excluded), rows in input order. Mean pooling is how
        all-MiniLM-L6-v2 was trained as a sentence encoder, so distances are meaningful for OOD routing."""
        self.model.eval()
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for idx, batch in self._batches(texts, batch_size):
            with _autocast(self.device):
                hidden = self.model.base_model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out[idx] = ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).cpu().numpy()
        return out

    def size_bytes(self) -> int:
        """Bytes of weight files on disk when saved/loaded (what you ship); before the first save, the bytes
        the state dict would take (safetensors adds only a small header)."""
        if self.path is not None:
            files = [*self.path.glob("*.safetensors"), *self.path.glob("*.bin")]
            if files:
                return sum(f.stat().st_size for f in files)
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())


def _position_limit(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    # Tokenizers often report a huge sentinel model_max_length; the position table is the real limit.
    limit = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    return min(limit, int(tokenizer.model_max_length)) if tokenizer.model_max_length < 1e6 else limit
