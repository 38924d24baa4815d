"""Merge a LoRA student into its base model and save an ordinary Hugging Face folder.

The merged folder loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer`` —
no peft, no distill, no ``gguf_file`` — so any server (transformers, vLLM, TGI, llama.cpp's converter) can
use it. Merging computes W + (alpha / r) B A once (Hu et al. 2021, arXiv 2106.09685), so inference costs
exactly what the base model costs.

The weights are saved in bfloat16 (config ``dtype: bfloat16``): half the bytes of fp32, the dtype servers
run on GPUs, and bf16 keeps fp32's exponent range, so nothing overflows as it could in fp16. The merge itself
is computed in fp32 and rounded once. ``distill_student.json`` says where it came from without absolute paths
(``merged_from``: the training run id when known; ``merged_from_path``: the adapter folder relative to the
project, or to the merged folder), so a copied folder describes itself.

Packaged bases are GGUF files dequantised to fp32 on load. transformers marks such models as quantised,
and a folder saved with those markers (``quantization_config``, kept from the GGUF loader) insists on
``gguf_file`` when reloaded, so they are dropped before saving. The folder is written to a temporary name
and renamed into place: a crash leaves no half-written model that a server would load.

Where it may write (``distill.fsutil.check_export_target``): a new path or an empty folder. An existing
non-empty folder (a previous merge included) or file is refused, or with ``force`` moved aside to
``NAME.replaced-TIME``, never deleted; the project folder, its store and spec, and what the store points at
are refused even with ``force``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from distill.errors import DistillError
from distill.fsutil import check_export_target, move_aside, project_protected
from distill.students.causal_lm import STUDENT_FILE, load_base, read_student_info, write_student_info


def drop_gguf_markers(model) -> None:
    """Forget that the weights came from a quantised GGUF (they are plain fp32 tensors by now)."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


def merge_and_save(adapter_dir: str | Path, out_dir: str | Path, device: str = "cpu",
                   run_id: str | None = None, source_path: str | None = None) -> Path:
    """Load the adapter's base (named in distill_student.json), merge the adapter, save to ``out_dir`` in
    bf16. ``run_id``: the training run the adapter belongs to; ``source_path``: the adapter folder as the
    project stores it (relative to the project). Both are recorded; without them, the adapter folder
    relative to ``out_dir``.

    Refuses to overwrite an existing ``out_dir``. Returns ``out_dir``."""
    import torch
    from peft import PeftModel

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise DistillError(f"{adapter_dir}: no adapter_config.json, so there is no LoRA adapter to merge",
                           hint="a full fine-tune is already a complete model folder; use it as it is")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DistillError(f"{out_dir}: exists and is not empty" if out_dir.is_dir() else f"{out_dir}: is a file",
                           hint="choose a new folder for the merged model")
    info = read_student_info(adapter_dir)
    base, tok = load_base(info["base_model"], device=device)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    drop_gguf_markers(model)
    model = model.to(torch.bfloat16).eval()   # save_pretrained records the dtype in config.json
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        # the student's own tokenizer copy (it may carry a pad token the base lacked)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
        rel = source_path or os.path.relpath(adapter_dir.resolve(), out_dir.resolve())
        write_student_info(tmp, {**info, "merged_from": run_id or rel, "merged_from_path": rel,
                                 "dtype": "bfloat16"})
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_lm_project(project, run_id: str | None = None, out: str | Path | None = None, device: str = "cpu",
                      force: bool = False, say: Callable[[str], None] | None = None) -> Path:
    """`distill export PROJECT --format merged`: merge the serving LM student's adapter (or run ``run_id``'s)
    into its base and save an ordinary HF folder. Default ``out``: ``exports/<run_id>-merged`` in the project.
    Refuses to overwrite a non-empty folder (``force``: moves it aside, ``say`` is told where; see the module
    docstring). Registers an ``export_lm`` run pointing at the folder (stored relative to the project)."""
    from distill.runs import to_store_path

    if project.spec.kind not in ("extract", "generate"):
        raise DistillError(f"{project.root}: `--format merged` is for LM students (extract/generate); this project "
                           f"is '{project.spec.kind}'", hint="use `distill export PROJECT --format onnx`")
    if run_id is None and project.latest_model() is None:
        raise DistillError(f"{project.root}: no finished generative-student run", hint=f"run `distill train "
                           f"{project.root}` then `distill eval {project.root}` first")
    ref = project.model(run_id=run_id) if run_id else project.serving_model()
    dest = Path(out) if out is not None else project.root / "exports" / f"{ref.run_id}-merged"
    # nothing is a "previous export" to replace here: merging twice into one folder is refused (or moved aside)
    if check_export_target(dest, is_export=lambda p: False, root=project.root, protected=project_protected(project),
                           force=force, default=f"exports/{ref.run_id}-merged in the project",
                           replaces="an empty folder (a merge never replaces one)"):
        moved = move_aside(dest)
        if say:
            say(f"moved the existing {dest} aside to {moved}")
    adapter = to_store_path(project.root, ref.path)
    merged = merge_and_save(ref.path, dest, device=device, run_id=ref.run_id, source_path=adapter)
    project.record_run(f"export-{ref.run_id}", "export_lm", "done", merged,
                       {"model_run_id": ref.run_id, "adapter": adapter, "format": "hf-merged", "dtype": "bfloat16"})
    return merged


__all__ = ["merge_and_save", "drop_gguf_markers", "export_lm_project", "STUDENT_FILE"]
