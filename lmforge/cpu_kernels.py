"""lmforge's own CPU ops, built and loaded here as one library: q4_mm / q8_mm (csrc/qmm_avx2.cpp: int4/int8
weights times int8 activation blocks, what lmforge.quant runs), and rms_norm / silu_mul / decode_attn
(csrc/decode_avx2.cpp: one-pass decode-step ops that lmforge.model.layers uses), and f32_linear
(csrc/linear_avx2.cpp: float32 products of a few rows whose summation order is fixed, what batch-invariant decoding
runs, lmforge.model.invariant). A module of its own because both model and quant use it.

Why the int kernels exist: torch's packed int4/int8 CPU kernels convert every weight to float and multiply with
FMA, which is slow on AVX2 CPUs; these do what llama.cpp does (int8 activation blocks of 32, integer dot
products) and read lmforge's own storage (nibbles, scales, mins), so no second copy of the weights exists
(speeds: docs/benchmarks.md).

The C++ is compiled once per machine with the system's C++ compiler into the cache, then loaded with
torch.ops.load_library (a cached, lazily built library). Which CPUs use them is read from the environment on each
call, LMFORGE_CPU_KERNELS: "auto" (default) wherever the CPU has AVX2, FMA and F16C except AMX CPUs (there
torch's kernels are the measured default), "on" wherever the CPU has AVX2, FMA and F16C, "off" never.
A failed build is reported once and the torch kernels run instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lmforge.device import cpu_flags
from lmforge.errors import ConfigError
from lmforge.io import atomic_write, cache_root

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "qmm_avx2.cpp", CSRC / "decode_avx2.cpp", CSRC / "linear_avx2.cpp")  # with csrc/*.h: the hash
POLICIES = ("auto", "on", "off")
_log = logging.getLogger("lmforge")


@functools.cache
def _has_isa() -> bool:
    return {"avx2", "fma", "f16c"} <= cpu_flags()


@functools.cache
def _has_amx() -> bool:  # cached: `available()` is asked on eager forwards, and /proc/cpuinfo costs ~1 ms a read
    return "amx_bf16" in cpu_flags()


def policy() -> str:
    """LMFORGE_CPU_KERNELS, read on each call (so a test or a process can change it between loads)."""
    p = os.environ.get("LMFORGE_CPU_KERNELS", "auto").strip().lower() or "auto"
    if p not in POLICIES:
        raise ConfigError(f"LMFORGE_CPU_KERNELS={p!r} is not one of {' | '.join(POLICIES)}")
    return p


def _wanted() -> str | None:
    """None when the policy asks for the kernels on this CPU, else why not."""
    p = policy()
    if p == "off":
        return "LMFORGE_CPU_KERNELS=off"
    if not _has_isa():
        return "the CPU lacks AVX2, FMA or F16C"
    if p == "auto" and _has_amx():
        return "torch's own kernels are used on AMX CPUs"
    return None


def _build_dir() -> Path:
    """One directory per (sources, torch build, compiler flags): a change of any rebuilds."""
    h = hashlib.sha256()
    for f in (*SOURCES, *sorted(CSRC.glob("*.h"))):
        h.update(f.read_bytes())
    h.update(f"{torch.__version__}|{torch._C._GLIBCXX_USE_CXX11_ABI}|{' '.join(_flags())}".encode())
    return cache_root() / "kernels" / f"qmm_avx2-{h.hexdigest()[:16]}"


# -ffp-contract=off: the dense path dequantizes as q * scale + min with two roundings, as lmforge's Python does
_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_VNNI_FLAGS = ("-mavx512vnni", "-mavx512vl")  # vpdpbusd on 256-bit registers, where the CPU has it
_ZMM_FLAGS = ("-mavx512bw",)  # with VNNI: int4 products 4 blocks at a time in 512-bit registers


@functools.cache
def _flags() -> tuple[str, ...]:
    """_FLAGS, plus AVX512-VNNI (and AVX512-BW's 512-bit integer ops) where this CPU has it (then the build dir,
    hashed on the flags, differs)."""
    flags = cpu_flags()
    vnni = {"avx512_vnni", "avx512vl"} <= flags and os.environ.get("LMFORGE_CPU_VNNI", "1") != "0"
    return _FLAGS + (_VNNI_FLAGS if vnni else ()) + (_ZMM_FLAGS if vnni and "avx512bw" in flags else ())


def _compile(out: Path) -> None:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    cmd = [cxx, *_flags(), f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *(f"-I{p}" for p in cpp_extension.include_paths()), *(str(f) for f in SOURCES), "-o", str(out),
           *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{Path(cxx).name} failed (exit {r.returncode}): {last[:300]}")


def available() -> bool:
    """Whether torch.ops.lmforge.q4_mm / q8_mm are to be used here: the policy wants them and they are built
    (once per machine) and loaded (once per process). Read when a layer prepares its kernel, not per call."""
    return failure() is None


@functools.cache
def _load() -> str | None:
    """Build (if not cached) and load the kernels; None on success, else why not (reported once)."""
    d = _build_dir()
    so = d / "qmm_avx2.so"
    try:
        if not so.is_file():
            d.mkdir(parents=True, exist_ok=True)
            print("lmforge: compiling the AVX2 int8-activation kernels for this machine (once, ~10 s)",
                  file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                built = Path(tmp) / "qmm_avx2.so"
                _compile(built)
                atomic_write(so, built.read_bytes())
        torch.ops.load_library(str(so))
        _register_fake()
    except Exception as e:  # noqa: BLE001 - any build or load failure: report it, use torch's kernels
        why = f"{type(e).__name__}: {e}"
        _log.warning("lmforge AVX2 kernels unavailable, using torch's: %s", why)
        return why
    return None


def failure() -> str | None:
    """Why `available()` says no (None when it says yes): the policy's reason, else the build's or load's."""
    return _wanted() or _load()


def _register_fake() -> None:
    """Shape-only versions, so torch.compile can trace through the ops."""
    if getattr(_register_fake, "done", False):
        return

    @torch.library.register_fake("lmforge::q4_mm")
    def _q4(x, nibbles, scales, mins, int_rows):
        return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in nibbles))

    @torch.library.register_fake("lmforge::q8_mm")
    def _q8(x, qweight, scales, int_rows):
        return x.new_empty(*x.shape[:-1], qweight.shape[0])

    @torch.library.register_fake("lmforge::rms_norm")
    def _rms(x, w, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("lmforge::silu_mul")
    def _silu_mul(gu):
        return gu.new_empty(*gu.shape[:-1], gu.shape[-1] // 2)

    @torch.library.register_fake("lmforge::decode_attn")
    def _attn(q, k, v, cos, sin, kc, vc, col, mask, scale):
        return q.new_empty(q.shape[0], q.shape[1])

    @torch.library.register_fake("lmforge::f32_linear")
    def _f32(x, w):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("lmforge::moe_mm")
    def _moe(x, idx, w, up_w, up_s, up_m, dn_w, dn_s, dn_m, per_up, per_down, bits):
        return x.new_empty(*x.shape[:-1], dn_w[0].shape[0])

    _register_fake.done = True
