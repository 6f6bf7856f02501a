"""Rope scalings that llama.cpp's converter stores as tensors, back to the Hugging Face rope parameters.

- llama3 (Llama 3.1+): `rope_freqs.weight` holds one factor per frequency, and llama.cpp divides frequency j by
  it. The HF parameters are recovered from the factors (any set that gives the same factors at the model's own
  frequencies computes the same model), then checked by recomputing the frequencies.
- longrope (Phi-3): `rope_factors_short/long.weight` are HF's short_factor / long_factor lists as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmforge.errors import CheckpointError
from lmforge.model.layers import rope_inv_freq

_ONE = 1e-6  # factors within this (relative) of 1 or of the largest factor sit on that plateau
_MATCH = 1e-5  # recovered parameters must give every frequency to this relative error


def llama3_parameters(factors: Sequence[float], dim: int, theta: float, src: str) -> dict[str, Any] | None:
    """HF rope parameters (llama3, or linear when every factor is equal; None when all are 1) whose inverse
    frequencies equal llama.cpp's `base / factors` for a rotary width `dim`; a one-line CheckpointError when no
    llama3 curve gives these factors."""
    r = np.asarray(factors, dtype=np.float64)  # (dim/2,)
    f = rope_inv_freq(dim, theta, None).double().numpy()  # (dim/2,), decreasing
    if r.shape != f.shape:
        raise CheckpointError(f"{src}: GGUF tensor 'rope_freqs.weight' has {r.size} factors, the rotary width "
                              f"{dim} needs {f.size}")
    if np.all(np.abs(r - 1) <= _ONE):
        return None
    big = float(r.max())
    high, low = np.abs(r - 1) <= _ONE, np.abs(r - big) <= _ONE * big
    mid = ~high & ~low
    if not high.any() and not mid.any():
        return _checked({"rope_type": "linear", "factor": big}, r, f, dim, theta, src)
    # HF's llama3 factor at frequency f is 1 (s > 1), F (s < 0) or 1 / ((1 - s)/F + s) with s = a*f - b, where
    # a = L / (2pi (hi - lo)), b = lo / (hi - lo): only F, a and b matter, so fit s to the factors and take lo = 1.
    s = (1 / r[mid] - 1 / big) / (1 - 1 / big)  # s of each factor strictly between 1 and F
    f_low = float(f[low].max()) if low.any() else 0.0  # the highest frequency scaled fully (0: none, s(0) < 0)
    if mid.sum() >= 2:
        a, b = np.polyfit(f[mid], s, 1)
        b = -b
    elif mid.sum() == 1:  # any slope steep enough to keep the neighbours on their plateaus
        fm, sm = float(f[mid][0]), float(s[0])
        slopes = [sm / (fm - f_low)] + ([(1 - sm) / (float(f[high].min()) - fm)] if high.any() else [])
        a = 2 * max(slopes)
        b = a * fm - sm
    else:  # a step between the plateaus: s = -1 at the last low frequency, 2 at the first high one
        a = 3 / (float(f[high].min()) - f_low)
        b = a * f_low + 1
    if not (a > 0 and b > 0):
        raise _no_curve(src)
    hi, ctx = 1 + 1 / float(b), 2 * math.pi * float(a) / float(b)
    exact = {"rope_type": "llama3", "factor": big, "low_freq_factor": 1.0, "high_freq_factor": hi,
             "original_max_position_embeddings": ctx}
    rounded = exact | {"factor": round(big, 4), "high_freq_factor": round(float(hi), 4),
                       "original_max_position_embeddings": round(ctx)}  # Llama's own values, when they fit
    for params in (rounded, exact):
        if _fits(params, r, f, dim, theta):
            return params
    raise _no_curve(src)


def _fits(params: dict[str, Any], r: np.ndarray, f: np.ndarray, dim: int, theta: float) -> bool:
    got = rope_inv_freq(dim, theta, params).double().numpy()
    return bool(np.all(np.abs(got * r / f - 1) <= _MATCH))


def _checked(params: dict[str, Any], r: np.ndarray, f: np.ndarray, dim: int, theta: float, src: str
             ) -> dict[str, Any]:
    if not _fits(params, r, f, dim, theta):
        raise _no_curve(src)
    return params


def _no_curve(src: str) -> CheckpointError:
    return CheckpointError(f"{src}: GGUF tensor 'rope_freqs.weight' holds per-frequency factors that no llama3 "
                           "rope scaling gives (not supported)")


def tensor_values(reader, name: str) -> list[float] | None:
    """A small float32 tensor of the file as a list, each value written as its shortest float32 decimal (1.3, not
    1.2999999523...), as the config it came from had it; None when the file lacks it."""
    t = next((t for t in reader.tensors if t.name == name), None)
    return None if t is None else [float(str(x)) for x in np.asarray(t.data, dtype=np.float32).reshape(-1)]


def longrope_parameters(reader, rot_dim: int, orig_ctx: int | None, ctx: int, attn_factor: float | None,
                        src: str) -> dict[str, Any] | None:
    """Phi-3's longrope from `rope_factors_short/long.weight`: HF rope parameters (without rope_theta), or None
    when the file has neither. llama.cpp scales cos/sin by the stored attn_factor (1 when absent); HF's default
    is sqrt(1 + ln(ctx / orig) / ln(orig)), so the factor is written out only where the two differ."""
    short, long = tensor_values(reader, "rope_factors_short.weight"), tensor_values(reader, "rope_factors_long.weight")
    if short is None and long is None:
        return None
    if short is None or long is None or len(short) != rot_dim // 2 or len(long) != rot_dim // 2:
        raise CheckpointError(f"{src}: GGUF rope factors need both 'rope_factors_short.weight' and "
                              f"'rope_factors_long.weight' with {rot_dim // 2} values each")
    if not orig_ctx:
        raise CheckpointError(f"{src}: GGUF rope factors without 'rope.scaling.original_context_length'")
    out: dict[str, Any] = {"rope_type": "longrope", "short_factor": short, "long_factor": long}
    scale = ctx / orig_ctx
    default = math.sqrt(1 + math.log(scale) / math.log(orig_ctx)) if scale > 1 else 1.0
    stored = 1.0 if attn_factor is None else float(attn_factor)
    if abs(stored - default) > 1e-6 * default:
        out["attention_factor"] = stored
    return out
