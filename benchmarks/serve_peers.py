"""benchmarks/serve.py's servers: how each one is started (its command line and the path that answers once it is
ready), on a free loopback port, warmed up with one request, and stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import REPO_ROOT, thread_env
from benchmarks.serve_load import ClientPlan, run_level

IMPLS = ("lmforge", "lmforge-plain", "llama-server", "llama-cpp-python", "transformers")
PY_SERVERS = ("lmforge", "lmforge-plain", "transformers")  # started as `python serve.py --server NAME`
DEFAULT_LLAMA_SERVER = Path("/work/llama-build/bin/llama-server")


# ---- how each server is started -----------------------------------------------------------------------------
class Skip(Exception):
    """A peer that cannot run here (binary or package missing): reported with its reason, not a failure."""


@dataclass
class Peer:
    """How to start one server: argv for (port, parallel slots), and the path that answers 200 once it is ready."""

    name: str
    command: Callable[[int, int], list[str]]
    health: str = "/health"
    per_level: bool = False  # restarted for each level, with as many slots as the level has clients


def _gguf(model: str) -> Path:
    from lmforge.checkpoints.registry import resolve

    path = resolve(model)[0]
    if not (path.is_file() and path.suffix == ".gguf"):
        raise Skip(f"needs a GGUF model file, and {model} is {path}")
    return path


def make_peer(impl: str, a: argparse.Namespace) -> Peer:
    """The Peer for impl, or Skip(reason) when it cannot run on this machine."""
    t = str(a.threads)
    if impl in PY_SERVERS:
        script = str(Path(__file__).resolve().with_name("serve.py"))
        return Peer(impl, lambda port, _: [sys.executable, script, "--server", impl, "--model", a.model,
                                           "--port", str(port), "--max-tokens-range", a.max_tokens_arg,
                                           "--max-concurrent", str(max(a.clients)),
                                           "--prefill-chunk", str(a.prefill_chunk)])
    if impl == "llama-server":
        exe = Path(a.llama_server) if a.llama_server else DEFAULT_LLAMA_SERVER
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise Skip(f"no llama-server binary at {exe} (build llama.cpp's server target with cmake, or pass "
                       "--llama-server PATH)")
        gguf = _gguf(a.model)

        def llama_server(port: int, slots: int) -> list[str]:
            n = a.llama_parallel or slots
            return [str(exe), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--threads", t,
                    "--threads-batch", t, "--parallel", str(n), "--ctx-size", str(n * a.slot_ctx),
                    "--cont-batching", "--n-gpu-layers", "0"]

        return Peer(impl, llama_server, per_level=not a.llama_parallel)
    if impl == "llama-cpp-python":
        missing = [m for m in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise Skip(f"python modules missing: {', '.join(missing)} (pip install 'llama-cpp-python[server]')")
        gguf = _gguf(a.model)
        return Peer(impl, lambda port, _: [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                           "--host", "127.0.0.1", "--port", str(port), "--n_threads", t,
                                           "--n_threads_batch", t, "--n_ctx", str(a.slot_ctx),
                                           "--interrupt_requests", "False"],
                    health="/v1/models")
    raise ValueError(f"unknown server {impl!r}; choose from {', '.join(IMPLS)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One running server process on a free loopback port; a context manager that stops it on exit."""

    def __init__(self, peer: Peer, slots: int, a: argparse.Namespace, log_path: Path) -> None:
        self.peer, self.slots, self.a, self.log_path = peer, slots, a, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        import httpx

        cmd = self.peer.command(self.port, self.slots)
        print(f"  starting {self.peer.name}: {' '.join(cmd[:2])} ...", file=sys.stderr, flush=True)
        with open(self.log_path, "w") as logf:
            self.proc = subprocess.Popen(cmd, env=thread_env(self.a.threads), cwd=REPO_ROOT, stdout=logf,
                                         stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        try:
            while True:
                if self.proc.poll() is not None:
                    tail = " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-5:])
                    raise RuntimeError(f"{self.peer.name} exited ({self.proc.returncode}): {tail}")
                try:
                    if httpx.get(self.url + self.peer.health, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - t0 > self.a.start_timeout:
                    raise RuntimeError(f"{self.peer.name} did not answer {self.peer.health} within "
                                       f"{self.a.start_timeout}s")
                time.sleep(0.5)
            self.startup_s = time.monotonic() - t0
            warm = asyncio.run(run_level(self.url, [ClientPlan(0.0, ("Say hello.",), (8,))], self.peer.health))
            if warm["errors"]:
                raise RuntimeError(f"{self.peer.name}: warm-up request failed: {warm['first_error']}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def llama_server_version(a: argparse.Namespace) -> str | None:
    """`llama-server --version` (the llama.cpp commit), for the results file; None when there is no binary."""
    exe = Path(a.llama_server) if a.llama_server else DEFAULT_LLAMA_SERVER
    if not exe.is_file():
        return None
    try:
        p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return " | ".join(ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith(("version", "built")))
