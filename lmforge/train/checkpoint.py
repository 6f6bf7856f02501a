"""Crash-safe training checkpoints: RUN_DIR/checkpoints/step-N/, written atomically, last K kept.

A checkpoint is built in a temp dir next to its final place, every file fsynced, then renamed into place
(lmforge.io.atomic_dir), so a step-N dir either holds a whole checkpoint or does not exist; a crash mid-write
leaves only a `.tmp-*` dir, which the next run ignores and deletes. The `latest` pointer file is informational
(for people and tools); resuming takes the highest complete step-N, so a crash between the rename and the
pointer update loses nothing.

Checkpoints are made of state dicts (the Trainer gets them from its strategy, gathered to full tensors under
FSDP), never of live objects. Every file is written through a Python file object, so a full disk or a
read-only filesystem surfaces as the OSError it is (safetensors and torch.save would turn it into an opaque
error of their own).

Files of a checkpoint: model.safetensors, optimizer.pt (optimizer + scheduler state), rng.pt (python,
numpy, torch CPU and CUDA generator states, one entry per rank), trainer_state.json (step, data
position, best metric, trainer config; written last).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors.torch
import torch
from torch import nn

from lmforge.errors import TrainingError
from lmforge.io import TMP_PREFIX, atomic_dir, atomic_write

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
_STEP_RE = re.compile(r"^step-(\d+)$")


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


def storable(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` as safetensors can store it: one name per shared tensor (tied weights; `fill_tied` restores the
    others on load), other views of a shared storage copied, every tensor contiguous."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[Any, int], tuple[Any, ...]] = {}
    for name, t in sd.items():
        t = t.detach()
        if t.numel() == 0:
            out[name] = t
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if storage not in seen:
            seen[storage] = view
            out[name] = t.contiguous()
        elif seen[storage] != view:
            out[name] = t.clone()  # another part of the same storage: its own copy
    return out


class _Recorder:
    """A file object that keeps the OSError of a failed write: torch.save reports it as an opaque RuntimeError."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj: Any, path: Path) -> None:
    """torch.save to `path`; a failed write (full disk, read-only fs) raises its OSError."""
    with open(path, "wb") as f:
        out = _Recorder(f)
        try:
            torch.save(obj, out)  # type: ignore[arg-type]
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise


def save_checkpoint(run_dir: Path, step: int, model_state: Mapping[str, torch.Tensor],
                    optimizer_state: Mapping[str, Any] | None, scheduler_state: Mapping[str, Any] | None,
                    state: dict[str, Any], rng: list[dict[str, Any]] | None = None, keep: int | None = 2) -> Path:
    """Write RUN_DIR/checkpoints/step-N atomically from full state dicts, update `latest`, keep the newest
    `keep` (None = all). An OSError (full disk, read-only fs) leaves the earlier checkpoints as they were."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    with atomic_dir(final) as tmp:
        (tmp / MODEL_FILE).write_bytes(safetensors.torch.save(storable(model_state)))
        write_training_state(tmp, optimizer_state, scheduler_state, rng if rng is not None else [rng_state()])
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1, default=str))
    atomic_write(root / LATEST, final.name + "\n")
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return final


def write_training_state(tmp: Path, optimizer_state: Mapping[str, Any] | None,
                         scheduler_state: Mapping[str, Any] | None, rng: list[dict[str, Any]]) -> None:
    torch_save({"optimizer": optimizer_state, "scheduler": scheduler_state}, tmp / "optimizer.pt")
    torch_save({"ranks": rng}, tmp / "rng.pt")


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (each renamed to a temp name first, then removed)."""
    ckpts = list_checkpoints(run_dir)
    for _, p in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}del-{p.name}-", dir=p.parent))
        os.replace(p, trash / p.name)
        shutil.rmtree(trash, ignore_errors=True)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


@dataclass
class Checkpoint:
    """What a checkpoint dir holds, as plain state dicts on the CPU."""

    path: Path
    state: dict[str, Any]  # trainer_state.json: step, data position, best metric, trainer config
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    rng: list[dict[str, Any]]  # one entry per rank


def read_checkpoint(ckpt: Path) -> Checkpoint:
    """Read a step-N dir; a missing or damaged file is a one-line TrainingError naming it."""
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"{ckpt / STATE_FILE}: cannot read trainer state ({one_line(e)})") from None
    f = ckpt / MODEL_FILE
    try:
        model = safetensors.torch.load_file(str(f))
    except Exception as e:  # noqa: BLE001 -- safetensors raises several types for a bad file
        raise TrainingError(f"{f}: cannot load model weights ({one_line(e)})") from None
    f = ckpt / "optimizer.pt"
    try:
        opt = torch.load(f, map_location="cpu", weights_only=True)
        optimizer, scheduler = opt["optimizer"], opt["scheduler"]
    except Exception as e:  # noqa: BLE001 -- unpickling raises many types
        raise TrainingError(f"{f}: cannot load optimizer/scheduler state ({one_line(e)})") from None
    f = ckpt / "rng.pt"
    try:
        rng = torch.load(f, map_location="cpu", weights_only=True)["ranks"]
    except Exception as e:  # noqa: BLE001 -- unpickling raises many types
        raise TrainingError(f"{f}: cannot load RNG state ({one_line(e)})") from None
    return Checkpoint(ckpt, state, model, optimizer, scheduler, rng)


def load_checkpoint(ckpt: Path, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> dict[str, Any]:
    """Load a checkpoint into plain (unsharded) objects, for tools and tests; returns trainer_state.json plus
    `rng` (a list, one entry per rank). The Trainer itself loads through its strategy."""
    from lmforge.train.strategy import fill_tied

    ck = read_checkpoint(ckpt)
    if model is not None:
        f = ck.path / MODEL_FILE
        try:
            missing, unexpected = model.load_state_dict(fill_tied(model, ck.model), strict=False)
        except RuntimeError as e:  # shapes that do not fit
            raise TrainingError(f"{f}: weights do not match the model ({one_line(e)})") from None
        if missing or unexpected:
            raise TrainingError(f"{f}: weights do not match the model (missing {sorted(missing)[:5]}, "
                                f"unexpected {sorted(unexpected)[:5]})")
    try:
        if optimizer is not None:
            optimizer.load_state_dict(ck.optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(ck.scheduler)
    except Exception as e:  # noqa: BLE001 -- load_state_dict raises many types
        raise TrainingError(f"{ck.path / 'optimizer.pt'}: cannot load optimizer/scheduler state "
                            f"({one_line(e)})") from None
    return {**ck.state, "rng": ck.rng}
