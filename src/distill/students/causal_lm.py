"""The generative student: an open causal LM, usually with LoRA adapters (peft), and how text becomes tokens.

A trained student is a folder:

    adapter/                       peft adapter (adapter_config.json + adapter_model.safetensors)
      tokenizer files              the student's tokenizer, so the folder is self-contained
      distill_student.json         base model name, prompt format, task prefix, loss — what inference needs

or, with ``full_finetune``, an ordinary HF model folder in place of the adapter. ``distill.lm_export``
merges an adapter into its base for serving without peft.

Prompt format. When the student's tokenizer has a chat template (SmolLM2-Instruct, Qwen-Instruct), the
prompt is the project's chat messages rendered with *that* template and ``add_generation_prompt=True``;
the completion is whatever the template appends for the assistant turn (the answer + end-of-turn token),
so the student learns to stop exactly where its generation loop stops. Base models without a template
(Gemma-3-270M base) get a plain ``Input: ... / Output: `` format and the answer + EOS.

Prompt and completion are tokenised separately and concatenated, so the boundary between "masked" and
"learned" tokens is exact even when a tokenizer would merge characters across it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.errors import DistillError
from distill.losses.sequence import IGNORE, build_completion_labels

STUDENT_FILE = "distill_student.json"


@dataclass
class Encoded:
    """One tokenised training sequence."""

    input_ids: list[int]
    labels: list[int]               # -100 on the prompt
    completion_start: int           # index of the first completion token in input_ids
    completion_text: str
    completion_offsets: list[int]   # start character of each completion token in completion_text
    truncated: bool


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """The no-chat-template format: the system text, then 'Input:' / 'Output:'."""
    system = "\n".join(m["content"] for m in messages if m["role"] == "system").strip()
    user = "\n".join(m["content"] for m in messages if m["role"] == "user")
    return (system + "\n\n" if system else "") + f"Input: {user}\nOutput: "


def format_example(tokenizer, messages: list[dict[str, str]], answer: str) -> tuple[str, str]:
    """(prompt text, completion text) for one example in the student's own format (see module docstring)."""
    if has_chat_template(tokenizer):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        # A template that renders the assistant turn differently from the generation prompt: fall back to
        # answer + EOS, which is still what generation stops on.
        return prompt, answer + (tokenizer.eos_token or "")
    return plain_prompt(messages), answer + (tokenizer.eos_token or "")


def _offsets(tokenizer, ids: list[int]) -> list[int]:
    # Start character of each token, by decoding prefixes. Tokenizer offset mappings are not used because
    # byte-level BPE tokenizers trim leading spaces out of them, which would misplace " word" tokens.
    return [len(tokenizer.decode(ids[:j], clean_up_tokenization_spaces=False)) for j in range(len(ids))]


def encode_example(tokenizer, messages: list[dict[str, str]], answer: str, max_length: int,
                   want_offsets: bool = False) -> Encoded:
    prompt, completion = format_example(tokenizer, messages, answer)
    # The chat template already holds any BOS it wants; the plain format lets the tokenizer add it.
    prompt_ids = tokenizer(prompt, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    input_ids, labels = build_completion_labels(prompt_ids, completion_ids)
    truncated = len(input_ids) > max_length
    # Plain right truncation (as TRL does); counted in the training record so it is never silent.
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Encoded(input_ids, labels, len(prompt_ids), completion,
                   _offsets(tokenizer, completion_ids) if want_offsets else [], truncated)


def pad_batch(encoded: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids, attention_mask, labels [B, T]."""
    t = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), t), pad_id, dtype=torch.long)
    att = torch.zeros((len(encoded), t), dtype=torch.long)
    lab = torch.full((len(encoded), t), IGNORE, dtype=torch.long)
    for b, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        att[b, :n] = 1
        lab[b, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


# ------------------------------------------------------------------------------------------------
# Models


def load_base(name_or_path: str, device: str = "auto", dtype: str = "float32", quantize: str = "none"):
    """(model, tokenizer) of a base causal LM on ``device``: a packaged name, an HF folder or a .gguf file
    (``distill.models.load_causal_lm``).

    ``dtype``: of the frozen weights (``resolve_base_dtype``). fp32 is the default because inference on CPU
    and full fine-tuning need it; a LoRA run on a bf16-capable GPU loads bf16 (half the memory) and the
    adapters and optimizer state stay fp32 (peft keeps adapter weights in fp32 on a bf16 base).

    ``quantize="4bit"``: QLoRA (Dettmers et al. 2023, arXiv 2305.14314) -- the linear layers in 4-bit NF4
    with double quantisation, computed in bf16, via bitsandbytes on a CUDA device (``check_quantize_base``
    first). A packaged or local GGUF is not quantised from its own GGUF blocks: transformers dequantises it
    once into the cached HF folder (``distill.models.converted_dir``), and the 4-bit weights are made from
    that fp32 folder, exactly as for an HF base. Inference (``load_student``) loads the base unquantised."""
    if quantize == "none":
        from distill.models import load_causal_lm

        model, tok = load_causal_lm(name_or_path, device=device, dtype=dtype)
    else:
        model, tok = _load_4bit(name_or_path, device)
    if tok.pad_token_id is None:
        # Padding is always masked (attention_mask, labels = -100), so any id will do; EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return model, tok


def _load_4bit(name_or_path: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from distill.models import _convert_gguf, pick_device, resolve_model

    resolved = resolve_model(name_or_path)
    folder = resolved.hf_dir if resolved.hf_dir is not None else _convert_gguf(resolved)
    dev = pick_device(device)
    check_quantize_base("4bit", dev)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                             bnb_4bit_use_double_quant=True)
    # a 4-bit model cannot be moved with .to(): it is placed on its device while loading
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": dev})
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))


def resolve_base_dtype(base_dtype: str, device: str, full_finetune: bool = False) -> str:
    """``LMStudentConfig.base_dtype`` on ``device`` as a torch dtype name. auto = bfloat16 on a CUDA GPU that
    supports it; float32 on CPU (bf16 matmuls there are slower and round more) and whenever the base weights
    themselves train (``full_finetune``: AdamW steps on bf16 weights are mostly rounded away)."""
    if base_dtype != "auto":
        return base_dtype
    if full_finetune or not device.startswith("cuda"):
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"


def check_quantize_base(quantize_base: str, device: str) -> None:
    """A DistillError, before anything is loaded or written, when ``quantize_base: 4bit`` cannot run here:
    bitsandbytes' 4-bit kernels need a CUDA device and the bitsandbytes package."""
    if quantize_base == "none":
        return
    import importlib.util

    if not device.startswith("cuda"):
        raise DistillError(f"quantize_base: {quantize_base} (QLoRA) needs a CUDA GPU, and this run is on "
                           f"'{device}' (torch sees {'a' if torch.cuda.is_available() else 'no'} CUDA device)",
                           hint="on CPU set quantize_base: none (the base then loads in base_dtype); on a CUDA "
                                "machine run `pip install bitsandbytes` and use device: auto or cuda")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DistillError(f"quantize_base: {quantize_base} (QLoRA) needs bitsandbytes, which is not installed",
                           hint="`pip install bitsandbytes` on this CUDA machine, or set quantize_base: none")


def prepare_for_training(model, quantized: bool, gradient_checkpointing: bool):
    """The base before adapters go on. A 4-bit base goes through ``peft.prepare_model_for_kbit_training``
    (freezes it, upcasts the small non-quantised weights such as norms to fp32). Gradient checkpointing is
    non-reentrant (``use_reentrant=False``): gradients then reach the adapters inside checkpointed layers
    even though the layer inputs do not require grad, so the ``enable_input_require_grads`` hook that the
    reentrant variant needs is not used (peft skips it in this case too)."""
    kwargs = {"use_reentrant": False}
    if quantized:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs=kwargs)
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise DistillError(f"{type(model).__name__} does not support gradient checkpointing",
                               hint="set gradient_checkpointing: false")
        if hasattr(model, "activation_checkpointing_enable"):     # its name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def add_lora(model, rank: int, alpha: float, dropout: float, target_modules: str | list[str]):
    """Wrap ``model`` with LoRA adapters (Hu et al. 2021, arXiv 2106.09685); only adapters train."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise DistillError(f"cannot put LoRA on this model: {e}",
                           hint="set lora_target_modules to module names of this architecture, or 'all-linear'") from None


def write_student_info(folder: Path, info: dict[str, Any]) -> None:
    (Path(folder) / STUDENT_FILE).write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")


def read_student_info(folder: Path) -> dict[str, Any]:
    f = Path(folder) / STUDENT_FILE
    if not f.exists():
        raise DistillError(f"{folder}: no {STUDENT_FILE}, so this is not a distill LM student folder",
                           hint="point at the 'adapter' (or 'model') folder that `distill train` wrote")
    return json.loads(f.read_text(encoding="utf-8"))


def load_student(folder: str | Path, device: str = "auto"):
    """(model, tokenizer, info) of a trained student folder, ready for generation (eval mode).

    An adapter folder is loaded on top of its base (named in distill_student.json); a full fine-tune or a
    merged folder loads directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.models import pick_device

    folder = Path(folder)
    info = read_student_info(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        base, _ = load_base(info["base_model"], device=device)
        model = PeftModel.from_pretrained(base, str(folder))
    else:
        dev = pick_device(device)
        # merged exports are stored in bf16 (half the size, what vLLM loads); on a CPU compute in fp32 as
        # training and the adapter path do, so a merged folder answers like its adapter
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32 if dev == "cpu" else "auto").to(dev)
    return model.eval(), tok, info


def student_messages(messages: list[dict[str, str]], prompt: str = "teacher") -> list[dict[str, str]]:
    """The chat a student is trained on and asked with. ``teacher``: exactly what the teacher saw.
    ``short``: the user turn only. The teacher needs the long system prompt (instructions, schema,
    examples: ~500 tokens for the SNIPS slots task); a student that has learnt the task does not, and
    dropping it makes every training step and every answer several times cheaper -- prompt/context
    distillation (Askell et al. 2021, arXiv 2112.00861; Snell et al. 2022, arXiv 2209.15189)."""
    if prompt == "teacher":
        return messages
    if prompt == "short":
        return [m for m in messages if m["role"] != "system"]
    raise DistillError(f"unknown student prompt mode {prompt!r}", hint="use teacher or short")


def student_prompt(tokenizer, info: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """The prompt a trained student expects at inference: the teacher's chat (or only its user turn, for
    ``prompt: short`` students), with the task prefix (step-by-step students answer under "[label] ") on
    the user message, in the same format used in training."""
    messages = student_messages(messages, info.get("prompt") or "teacher")
    prefix = info.get("input_prefix") or ""
    if prefix:
        messages = [dict(m, content=prefix + m["content"]) if m["role"] == "user" else m for m in messages]
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return plain_prompt(messages)


@torch.no_grad()
def generate(model, tokenizer, info: dict[str, Any], messages: list[dict[str, str]], max_new_tokens: int = 64) -> str:
    """Greedy answer of a trained student to one chat input (used by evaluation and smoke tests)."""
    prompt = student_prompt(tokenizer, info, messages)
    enc = tokenizer(prompt, add_special_tokens=not has_chat_template(tokenizer), return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
