"""Crash-safe file writing, used by everything that writes a file lmforge may read back.

One rule: write to a temp name beside the target, fsync, then rename. A reader (or a resumed run) sees
the old file or the new one, never half of one; a crash leaves only a `.tmp-*` leftover, which
`clean_partial` removes. Temp files and dirs are created private (mkstemp/mkdtemp use 0600/0700), so
their permissions are reset to what a plain open()/mkdir() would give under the process umask before
they are renamed into place: saved models stay readable by others on a shared machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"

Writer = Callable[[Path], object]  # writes the content to the given (temp) path

# The write failures that are the disk's, not lmforge's: reported in one line naming the path, never a traceback.
DISK_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system"}
_SHORT_WRITE_FREE = 1 << 20  # a short write with less free space than this beside the file is a full disk


def disk_errno(e: BaseException, where: str | Path | None = None) -> int | None:
    """The DISK_CAUSES errno behind a failed write, else None.

    Libraries do not always keep the errno: safetensors raises SafetensorError("... No space left on device"),
    numpy's tofile OSError("N requested and M written") with none; the first is matched by its strerror text,
    the second by the free space left in `where` (the directory written to)."""
    if isinstance(e, OSError) and e.errno in DISK_CAUSES:
        return e.errno
    text = str(e)
    for code in DISK_CAUSES:
        if os.strerror(code) in text:
            return code
    if isinstance(e, OSError) and e.errno is None and "written" in text and where is not None:
        with contextlib.suppress(OSError):
            st = os.statvfs(where)
            if st.f_bavail * st.f_frsize < _SHORT_WRITE_FREE:
                return errno.ENOSPC
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode open() (0o666) or mkdir() (0o777) gives under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


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


def atomic_write(path: str | Path, data: bytes | str | Writer) -> Path:
    """Write `data` (bytes, text, or a function that writes a file at the path it is given) to `path`
    atomically: temp file in the same dir, fsync, os.replace, fsync of the dir."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, default_mode())
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        code = disk_errno(e, path.parent)
        if code is not None and not (isinstance(e, OSError) and e.errno == code):  # a library's own error type
            raise OSError(code, os.strerror(code), str(path)) from e
        raise
    fsync_path(path.parent)
    return path


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp dir to `final`, replacing an existing dir (moved aside first, then deleted)."""
    trash = None
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{final.name}-", dir=final.parent))
        os.replace(final, trash / final.name)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success its files are fsynced and it replaces `final`.

    keep_existing: for content-addressed caches, where two processes may build the same entry at once.
    The first to finish wins; a later one finding `final` in place discards its copy instead of replacing
    a directory the other process may be reading.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, default_mode(directory=True))
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_path(p)
        fsync_path(tmp)
        if keep_existing:
            _publish_once(tmp, final)
        else:
            replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_once(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final` unless another writer got there first (then `tmp` is deleted)."""
    try:
        os.replace(tmp, final)  # fails (ENOTEMPTY/EEXIST) when `final` is a non-empty directory
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return
    fsync_path(final.parent)


def clean_partial(parent: str | Path) -> list[Path]:
    """Delete `.tmp-*` leftovers of interrupted writes under `parent`; returns what was removed.

    A dir moved aside by `replace_dir` whose replacement never arrived (killed between the two renames)
    is moved back first, so e.g. best/ is never lost.
    """
    parent = Path(parent)
    removed = []
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith(f"{TMP_PREFIX}old-") and p.is_dir():
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


# ---- memory ------------------------------------------------------------------------------------------
@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None off glibc (macOS, musl, Windows)."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc malloc_trim); False where there is no glibc.

    Why: batches of many different lengths leave glibc's heap fragmented, and a CPU training process grows by
    gigabytes over a run. A bf16-autocast toy loop with random lengths grew 4 MB per step without a trim and
    stayed flat with one every 50 steps (~4% more time); `qa train` reached 4.6 GB instead of 5.2 GB after 3
    minutes (oneDNN's per-shape primitive cache is the other part: train/trainer.py). Loading a GGUF file
    leaves ~45 MB of freed conversion temporaries in the heap, handed back the same way."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


MMAP_THRESHOLD = 1 << 20  # fixed_mmap_threshold's default: blocks of 1 MiB and more are mapped


def fixed_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Have glibc map every allocation of `nbytes` or more on its own and unmap it when freed (mallopt
    M_MMAP_THRESHOLD, which also stops glibc raising the threshold itself); False where there is no glibc.

    Why: glibc raises its threshold to the largest block freed (up to 32 MB), after which such blocks come from the
    heap and stay there. LoRA over a quantized base dequantizes 8 MiB weight blocks between the activations of a
    step, and its RSS grew by ~600 MB over the first steps (SmolLM2, 2 x 256 tokens) with the default and stayed
    flat with this (docs/qlora.md)."""
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(fn(-3, int(nbytes)))  # M_MMAP_THRESHOLD


def cache_root() -> Path:
    """Where lmforge caches derived data (token files, trained tokenizers, measured peaks)."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
