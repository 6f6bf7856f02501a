"""Crash-safe training checkpoints: RUN_DIR/checkpoints/step-N/, written atomically, last K kept.

A checkpoint is built in a temp dir next to its final place, every file fsynced, then renamed into place,
so a step-N dir either holds a whole checkpoint or does not exist; a crash mid-write leaves only a
`.tmp-*` dir, which the next run ignores and deletes. The `latest` pointer file is informational (for
people and tools); resuming takes the highest complete step-N, so a crash between the rename and the
pointer update loses nothing.

Files of a checkpoint: model.safetensors, optimizer.pt (optimizer + scheduler state), rng.pt (python,
numpy, torch CPU and CUDA generator states, one entry per rank), trainer_state.json (step, data
position, best metric, trainer config; written last).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from lmforge.errors import TrainingError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step-(\d+)$")


# ---- low-level atomic writes ----------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: best effort, not supported everywhere)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same dir + fsync + os.replace: readers see the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + "-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp dir to `final`, replacing an existing dir (moved aside first, then deleted)."""
    trash = None
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "old-" + final.name + "-", dir=final.parent))
        os.replace(final, trash / final.name)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success its files are fsynced and it replaces `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + "-", dir=final.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_path(p)
        fsync_path(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_partial(parent: Path) -> list[Path]:
    """Delete `.tmp-*` leftovers of interrupted writes under `parent`; returns what was removed.

    A dir moved aside by `_replace_dir` whose replacement never arrived (killed between the two renames)
    is moved back first, so e.g. best/ is never lost.
    """
    parent = Path(parent)
    removed = []
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith(TMP_PREFIX + "old-") and p.is_dir():
                for child in p.iterdir():
                    if not (parent / child.name).exists():
                        os.replace(child, parent / child.name)
        for p in parent.iterdir():
            if p.name.startswith(TMP_PREFIX):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()
                removed.append(p)
    return removed


# ---- RNG state ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from (dropout uses torch's CPU or CUDA generator)."""
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ---- checkpoints ----------------------------------------------------------------------------------
def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first: (step, dir)."""
    root = checkpoints_dir(run_dir)
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and (p / STATE_FILE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint dir of a run, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(path: Path) -> Path:
    """A checkpoint dir, given either a run dir or a step-N dir itself; TrainingError when there is none."""
    path = Path(path)
    if (path / STATE_FILE).is_file() and _STEP_RE.match(path.name):
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise TrainingError(f"{path}: no checkpoint to resume from (expected {path}/{CHECKPOINTS}/step-N)")
    return ckpt


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, state: dict[str, Any], rng: list[dict[str, Any]] | None = None,
                    keep: int | None = 2) -> Path:
    """Write RUN_DIR/checkpoints/step-N atomically, update `latest`, keep the newest `keep` (None = all)."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        write_training_state(tmp, optimizer, scheduler, rng if rng is not None else [rng_state()])
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1, default=str))
    atomic_write_text(root / LATEST, final.name + "\n")
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return final


def write_training_state(tmp: Path, optimizer: torch.optim.Optimizer | None, scheduler: Any,
                         rng: list[dict[str, Any]]) -> None:
    opt = {"optimizer": optimizer.state_dict() if optimizer is not None else None,
           "scheduler": scheduler.state_dict() if scheduler is not None else None}
    torch.save(opt, tmp / "optimizer.pt")
    torch.save({"ranks": rng}, tmp / "rng.pt")


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (each renamed to a temp name first, then removed)."""
    ckpts = list_checkpoints(run_dir)
    for _, p in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}del-{p.name}-", dir=p.parent))
        os.replace(p, trash / p.name)
        shutil.rmtree(trash, ignore_errors=True)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def load_checkpoint(ckpt: Path, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load into the objects given; returns trainer_state.json plus `rng` (a list, one entry per rank)."""
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"{ckpt / STATE_FILE}: cannot read trainer state ({_one_line(e)})") from None
    if model is not None:
        f = ckpt / "model.safetensors"
        try:
            missing, unexpected = load_model(model, str(f), strict=False, device=str(device))
        except Exception as e:  # noqa: BLE001 -- safetensors raises several types for a bad file
            raise TrainingError(f"{f}: cannot load model weights ({_one_line(e)})") from None
        if missing or unexpected:
            raise TrainingError(f"{f}: weights do not match the model (missing {sorted(missing)[:5]}, "
                                f"unexpected {sorted(unexpected)[:5]})")
    if optimizer is not None or scheduler is not None:
        f = ckpt / "optimizer.pt"
        try:
            opt = torch.load(f, map_location="cpu", weights_only=True)
            if optimizer is not None:
                optimizer.load_state_dict(opt["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(opt["scheduler"])
        except Exception as e:  # noqa: BLE001 -- unpickling and load_state_dict raise many types
            raise TrainingError(f"{f}: cannot load optimizer/scheduler state ({_one_line(e)})") from None
    f = ckpt / "rng.pt"
    try:
        state["rng"] = torch.load(f, map_location="cpu", weights_only=True)["ranks"]
    except Exception as e:  # noqa: BLE001 -- unpickling raises many types
        raise TrainingError(f"{f}: cannot load RNG state ({_one_line(e)})") from None
    return state
