"""Raw text -> a memory-mapped token file, built once and reused; packed (context + 1)-token blocks from it.

Pretraining reads the same tokens every epoch, so the corpus is tokenized once into flat binary files
(np.uint16 when the vocabulary fits in 16 bits, else np.uint32) in a cache directory whose name is a hash
of (each file's path, size and mtime; the validation split; the tokenizer's serialised JSON). The build
writes into a temp directory that is renamed into place only when complete, with meta.json (sizes, dtype,
counts) as the completion marker: a run killed mid-build leaves a `.tmp-*` directory that the next build
deletes, and a cache directory whose files do not match its meta.json is rebuilt.

Each file is one document: its tokens are followed by the tokenizer's EOS (when it has one). With a
validation fraction f, the last f of every file's tokens is held out (every file is represented, and the
held-out text is contiguous, so no training block overlaps it); with validation files, those files are
held out whole and left out of training.

`PackedBatches` is the Trainer's BatchSource over such a file: block i of an epoch covers tokens
[o + i*T, o + i*T + T] (T inputs, the same T shifted by one as targets); the block order and the offset o
are functions of (seed, epoch) alone, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import DataError, TrainingError
from lmforge.io import TMP_PREFIX, default_mode, fsync_path

CACHE_VERSION = 1
META = "meta.json"
TRAIN_FILE, VAL_FILE = "train.bin", "val.bin"
_READ_BYTES = 1 << 22  # text read per step while tokenizing
_PIECE_CHARS = 1 << 16  # texts handed to the Rust tokenizer per batch item (it encodes a batch in parallel)
# A cut right after a newline that ends a non-blank line and precedes non-space text does not change how
# a byte-level (GPT-2 regex) pre-tokenizer splits the text, so chunks tokenize exactly like the whole file.
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")
# A line longer than this many reads (or pieces) is cut before a single space between two non-space characters,
# which starts a pre-token in every pre-tokenizer lmforge loads (byte-level, Metaspace, whitespace), so one huge
# line never reaches the tokenizer whole; a line without such a space is cut where it stands.
_SPACE_CUT = re.compile(r"(?<=\S) (?=\S)")
_LONG_LINE = 4


# ---- files -----------------------------------------------------------------------------------------
def expand_files(specs: str | Path | Sequence[str | Path], what: str = "--data") -> list[Path]:
    """Files and directories (every non-hidden file below them, sorted) -> a list of files, in order."""
    if isinstance(specs, (str, Path)):
        specs = [specs]
    out: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"{p}: {what} directory holds no files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: {what} file or directory not found")
    if not out:
        raise DataError(f"{what}: no files given")
    return list(dict.fromkeys(f.resolve() for f in out))


def read_text_chunks(path: Path, read_bytes: int = _READ_BYTES) -> Iterator[str]:
    """Yield the UTF-8 text of `path` in pieces that end at safe cut points; DataError for binary files."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, pending = 0, ""
    with open(path, "rb") as f:
        while True:
            block = f.read(read_bytes)
            final = not block
            nul = block.find(b"\0")
            if nul >= 0:
                raise DataError(f"{path}: binary file, not text (NUL byte at offset {offset + nul})")
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {offset + e.start}); "
                                "convert it to UTF-8 first") from None
            offset += len(block)
            pending += text
            if final:
                if pending:
                    yield pending
                return
            cut = _last_safe_cut(pending)
            if cut == 0 and len(pending) > _LONG_LINE * read_bytes:
                cut = _last_space_cut(pending)
            if cut > 0:
                yield pending[:cut]
                pending = pending[cut:]


def _last_safe_cut(text: str) -> int:
    """Index just after the last safe newline of `text` (0 if none); scans back from the end."""
    end = len(text)
    while end > 0:
        start = max(0, end - _PIECE_CHARS)
        last = None
        for last in _SAFE_CUT.finditer(text, start, end):  # noqa: B007 - we want the last match
            pass
        if last is not None:
            return last.end()
        end = start
    return 0


def _last_space_cut(text: str) -> int:
    """Index of the last space of `text` that may start a piece (see _SPACE_CUT), else len(text)."""
    last = None
    for last in _SPACE_CUT.finditer(text, max(0, len(text) - _PIECE_CHARS)):  # noqa: B007 - we want the last
        pass
    return last.start() if last is not None else len(text)


def split_pieces(text: str, size: int = _PIECE_CHARS) -> list[str]:
    """Cut `text` at safe points into pieces of about `size` characters (a piece may be longer, up to
    _LONG_LINE x size before it is cut at spaces)."""
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    for m in _SAFE_CUT.finditer(text):
        if m.end() - start >= size:
            pieces.append(text[start:m.end()])
            start = m.end()
    pieces.append(text[start:])
    out = []
    for p in pieces:
        start = 0
        while len(p) - start > _LONG_LINE * size:  # a long line: cut at its last space within `size`
            last = None
            for last in _SPACE_CUT.finditer(p, start + 1, start + size):  # noqa: B007 - we want the last match
                pass
            cut = last.start() if last is not None else start + size
            out.append(p[start:cut])
            start = cut
        out.append(p[start:] if start else p)
    return [p for p in out if p]


def fingerprint_files(files: Sequence[Path]) -> list[list[Any]]:
    """(path, size, mtime_ns) of each file: what decides whether a cache is still valid."""
    out = []
    for f in files:
        st = Path(f).stat()
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return out


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's serialised JSON: a different vocabulary or merge list gives other ids."""
    return hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ---- the cache -------------------------------------------------------------------------------------
@dataclass
class TokenCache:
    """The token files of one corpus + tokenizer: `train` and `val` are read-only memory maps."""

    dir: Path
    train: np.ndarray  # (N_train,) uint16 | uint32
    val: np.ndarray  # (N_val,)
    meta: dict[str, Any]
    reused: bool  # True when an existing cache was opened, False when it was built now

    @property
    def train_tokens(self) -> int:
        return int(self.train.shape[0])

    @property
    def val_tokens(self) -> int:
        return int(self.val.shape[0])


def cache_key(train_files: Sequence[Path], val_files: Sequence[Path], val_fraction: float, tok_hash: str,
              eos_id: int | None) -> str:
    spec = {"version": CACHE_VERSION, "train": fingerprint_files(train_files), "val": fingerprint_files(val_files),
            "val_fraction": 0.0 if val_files else float(val_fraction), "tokenizer": tok_hash, "eos": eos_id}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def open_token_cache(path: Path) -> TokenCache | None:
    """A complete cache directory -> TokenCache; None when it is missing, unfinished or inconsistent."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        dtype = np.dtype(meta["dtype"])
        arrays = []
        for name, n in ((TRAIN_FILE, meta["train_tokens"]), (VAL_FILE, meta["val_tokens"])):
            f = path / name
            if f.stat().st_size != int(n) * dtype.itemsize or meta.get("version") != CACHE_VERSION:
                return None
            arrays.append(np.memmap(f, dtype=dtype, mode="r") if n else np.zeros(0, dtype=dtype))
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError):
        return None
    return TokenCache(path, arrays[0], arrays[1], meta, reused=True)


def build_token_cache(files: Sequence[str | Path], tokenizer, cache_dir: str | Path, *,
                      val_files: Sequence[str | Path] | None = None, val_fraction: float = 0.0,
                      log: Callable[[str], None] = print) -> TokenCache:
    """Open the cache of (files, split, tokenizer) under `cache_dir`, building it first if needed.

    Validation files are taken out of `files` when they appear there (a directory may hold them).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    val = expand_files(val_files, "--val-data") if val_files else []
    train = [f for f in expand_files(files) if f not in set(val)]
    if not train:
        raise DataError("--data: every training file is also a --val-data file; nothing left to train on")
    eos = tokenizer.eos_id
    key = cache_key(train, val, val_fraction, tokenizer_hash(tokenizer), eos)
    root = Path(cache_dir)
    final = root / key
    if final.exists():
        cache = open_token_cache(final)
        if cache is not None:
            log(f"token cache: reused {final} ({cache.train_tokens:,} train / {cache.val_tokens:,} validation "
                "tokens)")
            return cache
        log(f"token cache: {final} is incomplete or damaged (an interrupted build?); rebuilding it")
        _remove(final)
    return _build(train, val, val_fraction, tokenizer, root, key, log)


def _remove(path: Path) -> None:
    """Rename away first, so a half-deleted directory never looks like a cache."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}del-", dir=path.parent))
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def _clean_stale(root: Path, key: str) -> None:
    for p in root.glob(f"{TMP_PREFIX}*"):
        pid = p.name.rsplit("-", 2)[-2] if p.name.startswith(f"{TMP_PREFIX}{key}-") else None
        if p.name.startswith(f"{TMP_PREFIX}del-") or (pid and pid.isdigit() and not _alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build(train: list[Path], val: list[Path], val_fraction: float, tokenizer, root: Path, key: str,
           log: Callable[[str], None]) -> TokenCache:
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root, key)
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key}-{os.getpid()}-", dir=root))
    t0 = time.perf_counter()
    n_train = n_val = n_chars = 0
    try:
        with open(tmp / TRAIN_FILE, "wb") as ft, open(tmp / VAL_FILE, "wb") as fv:
            jobs = [(f, False) for f in train] + [(f, True) for f in val]
            for f, is_val in jobs:
                ids, chars = _tokenize_file(f, tokenizer, dtype)
                n_chars += chars
                if eos is not None and len(ids):
                    ids = np.append(ids, np.asarray(eos, dtype=dtype))
                if is_val:
                    head, tail = ids[:0], ids
                else:
                    cut = len(ids) - int(round(len(ids) * val_fraction))
                    head, tail = ids[:cut], ids[cut:]
                head.tofile(ft)
                tail.tofile(fv)
                n_train, n_val = n_train + len(head), n_val + len(tail)
            for fh in (ft, fv):
                fh.flush()
                os.fsync(fh.fileno())
        if n_train + n_val == 0:
            names = ", ".join(str(f) for f in (train + val)[:3]) + (" ..." if len(train + val) > 3 else "")
            raise DataError(f"empty corpus: no text in {len(train) + len(val)} file(s) ({names})")
        meta = {"version": CACHE_VERSION, "key": key, "dtype": dtype.name, "train_tokens": n_train,
                "val_tokens": n_val, "vocab_size": tokenizer.vocab_size, "eos_id": eos,
                "train_files": [str(f) for f in train], "val_files": [str(f) for f in val],
                "val_fraction": 0.0 if val else val_fraction, "characters": n_chars,
                "tokenizer_sha256": tokenizer_hash(tokenizer),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")  # the completion marker, written last
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp made it private; a shared cache must be readable
        fsync_path(tmp / META)
        fsync_path(tmp)
        final = root / key
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = open_token_cache(root / key)
    if cache is None:  # pragma: no cover - only if the directory was tampered with in between
        raise DataError(f"{root / key}: token cache unreadable right after it was built")
    cache.reused = False
    dt = time.perf_counter() - t0
    log(f"token cache: built {root / key} in {dt:.1f}s: {n_chars:,} characters -> {n_train:,} train / "
        f"{n_val:,} validation tokens ({dtype.name})")
    return cache


def _tokenize_file(path: Path, tokenizer, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """All tokens of one file (no special tokens added) and its character count."""
    backend = tokenizer.backend
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    parts: list[np.ndarray] = []
    chars = 0
    for chunk in read_text_chunks(path):
        chars += len(chunk)
        for enc in encode(split_pieces(chunk), add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=dtype))
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)), chars


def check_text_files(files: Iterable[Path]) -> None:
    """Read every file through the UTF-8/NUL checks (tokenizer training reads them in Rust, silently)."""
    for f in files:
        for _ in read_text_chunks(Path(f)):
            pass


# ---- packed blocks ---------------------------------------------------------------------------------
class PackedBatches:
    """BatchSource of (B, T) input/target blocks cut from a flat token array; see the module docstring.

    Under torch.distributed each rank takes batches[rank::world_size] of a list truncated to a multiple of
    world_size, so one step of N ranks with batch B sees the same blocks as one process with batch N*B.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True, rank: int | None = None, world_size: int | None = None) -> None:
        from lmforge.train.strategy import dist_info

        if block_size < 1 or batch_size < 1:
            raise TrainingError(f"PackedBatches: block_size and batch_size must be >= 1, got {block_size}, "
                                f"{batch_size}")
        self.tokens, self.T, self.B, self.seed, self.shuffle = tokens, block_size, batch_size, seed, shuffle
        info = dist_info()
        self.rank = info.rank if rank is None else rank
        self.world_size = info.world_size if world_size is None else world_size
        self.n_blocks = (len(tokens) - 1) // block_size
        self.slack = (len(tokens) - 1) - self.n_blocks * block_size  # room for a per-epoch offset
        if self.n_blocks < 1:
            raise DataError(f"training corpus too small: {len(tokens):,} tokens, a block needs "
                            f"{block_size + 1} (lower --context-length or add text)")
        all_batches = self.n_blocks // batch_size
        if all_batches < self.world_size:
            raise DataError(f"training corpus too small: {self.n_blocks} blocks of {block_size} tokens make "
                            f"{all_batches} batch(es) of {batch_size} for {self.world_size} rank(s) "
                            "(lower --batch-size or --context-length, or add text)")
        self._per_rank = all_batches // self.world_size

    def __len__(self) -> int:
        return self._per_rank

    def epoch_plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """(token offset, block order) of `epoch`: every rank computes the same plan."""
        if not self.shuffle:
            return 0, np.arange(self.n_blocks)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n_blocks)
        offset = int(rng.integers(0, self.slack + 1)) if epoch > 0 else 0
        return offset, order

    def block(self, offset: int, index: int) -> np.ndarray:
        s = offset + index * self.T
        return self.tokens[s: s + self.T + 1]

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        offset, order = self.epoch_plan(epoch)
        for j in range(start, self._per_rank):
            g = j * self.world_size + self.rank  # global batch index
            idx = order[g * self.B: (g + 1) * self.B]
            rows = np.stack([self.block(offset, int(i)) for i in idx]).astype(np.int64)  # (B, T+1)
            t = torch.from_numpy(rows)
            yield {"input_ids": t[:, :-1], "labels": t[:, 1:]}


def eval_blocks(tokens: np.ndarray, block_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Consecutive non-overlapping (T+1)-token blocks of the validation tokens, up to ~max_tokens targets;
    a last, shorter block keeps the tail (all of it is scored)."""
    n = len(tokens) - 1
    if max_tokens:
        n = min(n, max_tokens)
    return [np.asarray(tokens[s: s + min(block_size, n - s) + 1], dtype=np.int64)
            for s in range(0, max(n, 0), block_size)]
