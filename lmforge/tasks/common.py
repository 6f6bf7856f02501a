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
