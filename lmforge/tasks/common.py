"""Small helpers shared by the training tasks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish_model_dir(run_dir: Path, src: Path) -> None:
    """Expose the chosen model (best/ or final/) at the run dir root through hard links: no second copy,
    and the root loads as a Hugging Face directory. Each file is swapped in atomically."""
    for f in src.iterdir():
        if not f.is_file():
            continue
        tmp = run_dir / f".{f.name}.link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(f, tmp)
        except OSError:
            shutil.copy2(f, tmp)
        os.replace(tmp, run_dir / f.name)


def find_run_dir(run_dir: str | Path, marker: str) -> Path | None:
    """The directory holding `marker` (a task's run-info file): RUN_DIR itself, else its best/ or final/.

    None when the path exists but holds no marker (the caller names its task in the error); a missing path
    is a CheckpointError here."""
    from lmforge.errors import CheckpointError

    p = Path(run_dir)
    if not p.exists():
        raise CheckpointError(f"{p}: no such run directory")
    for d in (p, p / "best", p / "final"):
        if (d / marker).exists():
            return d
    return None

