"""Merge a LoRA student into its base model and save an ordinary Hugging Face folder.

The merged folder loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer`` —
no peft, no distill, no ``gguf_file`` — so any server (transformers, vLLM, TGI, llama.cpp's converter) can
use it. Merging computes W + (alpha / r) B A once (Hu et al. 2021, arXiv 2106.09685), so inference costs
exactly what the base model costs.

Packaged bases are GGUF files dequantised to fp32 on load. transformers marks such models as quantised,
and a folder saved with those markers insists on ``gguf_file`` when reloaded, so they are dropped before
saving (see /work/shared/MODELS.md). The folder is written to a temporary name and renamed into place:
a crash leaves no half-written model that a server would load.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from distill.errors import DistillError
from distill.students.causal_lm import STUDENT_FILE, load_base, read_student_info, write_student_info


def drop_gguf_markers(model) -> None:
    """Forget that the weights came from a quantised GGUF (they are plain fp32 tensors by now)."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


def merge_and_save(adapter_dir: str | Path, out_dir: str | Path, device: str = "cpu") -> Path:
    """Load the adapter's base (named in distill_student.json), merge the adapter, save to ``out_dir``.

    Refuses to overwrite an existing ``out_dir``. Returns ``out_dir``."""
    from peft import PeftModel

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise DistillError(f"{adapter_dir}: no adapter_config.json, so there is no LoRA adapter to merge",
                           hint="a full fine-tune is already a complete model folder; use it as it is")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DistillError(f"{out_dir}: exists and is not empty", hint="choose a new folder for the merged model")
    info = read_student_info(adapter_dir)
    base, tok = load_base(info["base_model"], device=device)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    drop_gguf_markers(model)
    model.eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        # the student's own tokenizer copy (it may carry a pad token the base lacked)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
        write_student_info(tmp, {**info, "merged_from": str(adapter_dir)})
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


__all__ = ["merge_and_save", "drop_gguf_markers", "STUDENT_FILE"]
