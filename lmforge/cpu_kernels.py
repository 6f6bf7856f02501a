"""lmforge's own CPU kernels (csrc/qmm_avx2.cpp): int4/int8 weights times int8 activation blocks, and a
one-pass RMSNorm for decode steps.

Why they exist: torch's packed int4/int8 CPU kernels convert every weight to float and multiply with FMA (in
bf16 on AVX-512), which made batch-1 decoding 0.45-0.66x llama.cpp on AVX2 CPUs and 0.78x on an AVX-512 Zen 4
(docs/benchmarks.md; 1.08x and 1.13x with these). These kernels do what llama.cpp does: quantize the
activations to int8 per block of 32 and take integer dot products. They read lmforge's own storage (nibbles,
scales, mins), so no second copy of the weights exists.

The C++ is compiled once per machine with the system's C++ compiler (about 10 s) into the cache, then loaded
with torch.ops.load_library. Policy (env LMFORGE_CPU_KERNELS): "auto" (default) uses them wherever the CPU has
AVX2, FMA and F16C except on AMX CPUs (there torch's kernels were the measured default that reached llama.cpp's
speed; these were not measured on one), "on" wherever the CPU has AVX2, FMA and F16C, "off" never.
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

from lmforge.errors import ConfigError
from lmforge.io import atomic_write, cache_root

SOURCE = Path(__file__).parent / "csrc" / "qmm_avx2.cpp"
POLICIES = ("auto", "on", "off")
_log = logging.getLogger("lmforge")
_failure: str | None = None  # why the kernels are not in use, once decided


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This CPU's x86 feature flags. Linux: the flags line of /proc/cpuinfo; elsewhere (or when it cannot be
    read) the capabilities torch's cpuinfo reports (torch >= 2.8), else none."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    try:
        caps = torch.cpu.get_capabilities()  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return frozenset()
    return frozenset(f for f, on in caps.items() if on)


SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
_NUMBERS = {"cpu family": "cpu_family", "model": "cpu_model"}  # /proc/cpuinfo key -> record key


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """Which CPU this is, as runs and benchmarks record it: the model name, and the family / model numbers
    that tell apart CPUs sharing a name (a first-generation "AMD EPYC", family 23 model 1, has half the FMA
    width of later ones: a 2.4x lower float32 matmul peak), plus the SIMD flags that choose kernels."""
    out: dict[str, object] = {}
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, val = (part.strip() for part in line.partition(":"))
        if key == "model name" and "cpu" not in out:
            out["cpu"] = val
        elif key in _NUMBERS and _NUMBERS[key] not in out and val.isdigit():
            out[_NUMBERS[key]] = int(val)
        elif not line.strip() and out:  # the first processor's block is enough
            break
    flags = cpu_flags(cpuinfo)
    out["simd"] = [f for f in SIMD_FLAGS if f in flags]
    return out


@functools.cache
def _has_isa() -> bool:
    return {"avx2", "fma", "f16c"} <= cpu_flags()


def policy() -> str:
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
    if p == "auto" and "amx_bf16" in cpu_flags():
        return "torch's own kernels are used on AMX CPUs"
    return None


def _build_dir() -> Path:
    """One directory per (source, torch build, compiler flags): a change of any rebuilds."""
    h = hashlib.sha256(SOURCE.read_bytes())
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
           *(f"-I{p}" for p in cpp_extension.include_paths()), str(SOURCE), "-o", str(out),
           *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{Path(cxx).name} failed (exit {r.returncode}): {last[:300]}")


def available() -> bool:
    """Whether torch.ops.lmforge.q4_mm / q8_mm are to be used here: the policy wants them and they are built
    (once per machine) and loaded (once per process). Read when a layer prepares its kernel, not per call."""
    global _failure
    _failure = _wanted() or _load()
    return _failure is None


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
    """Why `available()` said no (None if it said yes or was not asked)."""
    return _failure


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

    _register_fake.done = True
