"""A quantized model as one safetensors file: its state dict (integers, scales, float norms and embeddings) with
the ModelConfig and the QuantSpec in the metadata, so loading rebuilds the structure without a float copy.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from torch import nn

from lmforge.io import atomic_write
from lmforge.quant.convert import QuantSpec, build_quantized
from lmforge.quant.numerics import QuantError


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """One safetensors file: the state dict (integers, scales, float norms/embeddings), the ModelConfig
    and the QuantSpec in its metadata."""
    from safetensors.torch import save_file

    spec = getattr(model, "quant_spec", None)
    if spec is None:
        raise QuantError("save_quantized: the model was not quantized (no quant_spec)")
    state, seen = {}, set()
    for k, v in model.state_dict().items():  # safetensors refuses shared storage (a head sharing the embedding)
        v = v.detach().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
        state[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    tied = getattr(model, "lm_head", None) is None
    meta = {"lmforge_quant": json.dumps(asdict(spec)), "lmforge_config": json.dumps(model.cfg.to_dict()),
            "tied": str(tied)}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(p, lambda f: save_file(state, str(f), metadata=meta))


def load_quantized(path: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild a Transformer saved by save_quantized: structure on the meta device, then assign tensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lmforge.config import ModelConfig

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (OSError, Exception) as e:  # safetensors raises its own error type on bad headers
        raise QuantError(f"{p}: not a readable safetensors file ({e})") from None
    if "lmforge_quant" not in meta or "lmforge_config" not in meta:
        raise QuantError(f"{p}: not written by save_quantized (no lmforge_quant metadata)")
    spec = QuantSpec(**json.loads(meta["lmforge_quant"]))
    cfg = ModelConfig.from_dict(json.loads(meta["lmforge_config"]))
    state = load_file(str(p), device=device)
    return build_quantized(cfg, state, spec, device)
