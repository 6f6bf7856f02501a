"""The integer formats of weight-only quantization and the float <-> integer conversions.

int8: symmetric, one scale per output channel or per group along K. int4: asymmetric per group (scale and
minimum, llama.cpp's Q4_1 grid), stored as portable nibbles (two values per byte, low nibble = even column).
Pure tensor arithmetic: no kernels, no layers.
"""

from __future__ import annotations

import torch

from lmforge.errors import ConfigError


class QuantError(ConfigError):
    """Unsupported quantization settings (bits, group size) or a layer shape they do not fit."""


def check_spec(bits: int, group_size: int | None) -> None:
    """Raise QuantError unless (bits, group_size) is a format this package has: 8 or 4 bits, an even group or None."""
    if bits not in (4, 8):
        raise QuantError(f"bits must be 8 or 4, got {bits}")
    if group_size is not None and (group_size < 2 or group_size % 2):
        raise QuantError(f"group_size must be an even number >= 2 (or None), got {group_size}")


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: w (N, K) -> q int8 (N, K) in [-127, 127], scales float32 (N, G); w ~ q * scale."""
    N, K = w.shape
    g = K if group_size is None else group_size
    wg = w.detach().float().reshape(N, K // g, g)  # (N, G, g)
    scales = (wg.abs().amax(-1) / 127.0).clamp(min=1e-12)  # (N, G)
    q = torch.round(wg / scales[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(N, K), scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group: w (N, K) -> q uint8 (N, K) in [0, 15], scales, mins float32 (N, G);
    w ~ q * scale + min. A weight already on such a grid (llama.cpp Q4_1) comes back exactly."""
    N, K = w.shape
    wg = w.detach().float().reshape(N, K // group_size, group_size)  # (N, G, g)
    lo, hi = wg.amin(-1), wg.amax(-1)  # (N, G)
    scales = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.reshape(N, K), scales, lo


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8; low nibble = even column. Our storage format (portable)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values 0..15."""
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)
