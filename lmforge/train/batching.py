"""Length-bucketed batches with dynamic padding, deterministic per (seed, epoch) and resumable.

Sorting by length inside large random chunks keeps the padding small while the order stays random; the
batch list of an epoch is a pure function of (seed, epoch), so a resumed run skips to a batch index and
sees exactly the batches an uninterrupted run would have seen, without replaying any global RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from lmforge.errors import TrainingError
from lmforge.train.strategy import dist_info


@runtime_checkable
class BatchSource(Protocol):
    """What the Trainer iterates: the batches of an epoch from a batch index, the same for the same
    (epoch, start).

    `len()` is the number of batches per epoch on this rank. `DatasetBatches` is the stock implementation.
    """

    def __len__(self) -> int: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]: ...


class BucketSampler:
    """Batches of indices, similar lengths together; usable as a DataLoader `batch_sampler`.

    Epoch e: permute all indices with a generator seeded by (seed, e), cut the permutation into chunks of
    `batch_size * bucket_size_multiplier`, sort each chunk by length (longest first), cut into batches,
    then shuffle the batch list. With `shuffle=False` there is no permutation and no batch shuffle (the
    chunks are still length-sorted). Under torch.distributed each rank takes `batches[rank::world_size]`
    of a list truncated to a multiple of world_size, so every rank runs the same number of steps.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 bucket_size_multiplier: int = 50, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if batch_size < 1:
            raise TrainingError(f"BucketSampler: batch_size must be >= 1, got {batch_size}")
        if bucket_size_multiplier < 1:
            raise TrainingError(
                f"BucketSampler: bucket_size_multiplier must be >= 1, got {bucket_size_multiplier}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.bucket_size_multiplier = bucket_size_multiplier
        self.drop_last = drop_last
        info = dist_info()
        self.rank = info.rank if rank is None else rank
        self.world_size = info.world_size if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise TrainingError(f"BucketSampler: rank {self.rank} outside world_size {self.world_size}")
        self.epoch = 0
        self.start = 0  # batch index to resume from within `epoch`

    def all_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of `epoch` (before sharding), in order."""
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        chunk = self.batch_size * self.bucket_size_multiplier
        batches: list[list[int]] = []
        for s in range(0, n, chunk):
            idx = order[s:s + chunk]
            idx = idx[np.argsort(-self.lengths[idx], kind="stable")]  # longest first, ties keep order
            batches.extend(idx[b:b + self.batch_size].tolist() for b in range(0, len(idx), self.batch_size))
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            perm = rng.permutation(len(batches))
            batches = [batches[i] for i in perm]
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`."""
        b = self.all_batches(epoch)
        if self.world_size > 1:
            b = b[: len(b) - len(b) % self.world_size][self.rank::self.world_size]
        return b

    def num_batches(self) -> int:
        """Batches per epoch for this rank (the same for every epoch)."""
        bs, mult = self.batch_size, self.bucket_size_multiplier
        full, rest = divmod(len(self.lengths), bs * mult)  # whole chunks and the last, partial one
        total = full * mult + (rest // bs if self.drop_last else -(-rest // bs))
        return total // self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Position the next `__iter__` at (epoch, batch index): the resume point."""
        self.epoch, self.start = epoch, start

    def iter_from(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        yield from self.batches(epoch)[start:]

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start = self.start, 0
        yield from self.iter_from(self.epoch, start)

    def __len__(self) -> int:
        return self.num_batches()


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
              pad_to_multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists to the longest one -> (input_ids, attention_mask), both (B, T) int64.

    Left padding is what batched generation with a causal model needs; right padding suits training.
    """
    if side not in ("right", "left"):
        raise TrainingError(f"pad_batch: side must be 'right' or 'left', got {side!r}")
    if len(seqs) == 0:
        raise TrainingError("pad_batch: empty batch")
    T = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        if n == 0:
            continue
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def _is_seq(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.dim() == 1
    return isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, bool)) for x in v)


@dataclass
class Collator:
    """Collate dict examples: 1-D sequences are padded, scalars stacked, anything else kept as a list.

    `input_ids` is padded with `pad_id` and, unless the examples carry one, gets an `attention_mask`;
    other sequence fields are padded with `pad_values[key]` (labels -100, masks and token types 0) or
    `pad_id`. Fields listed in `keep` (e.g. ids, offsets) are always passed through as lists.
    """

    pad_id: int = 0
    side: str = "right"
    pad_to_multiple_of: int | None = None
    pad_values: dict[str, int | float] = field(default_factory=lambda: {
        "labels": -100, "attention_mask": 0, "token_type_ids": 0, "start_positions": 0, "end_positions": 0})
    keep: tuple[str, ...] = ()

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(examples) == 0:
            raise TrainingError("collate: empty batch")
        out: dict[str, Any] = {}
        keys = list(examples[0].keys())
        for k in keys:
            try:
                vals = [ex[k] for ex in examples]
            except KeyError:
                raise TrainingError(f"collate: field {k!r} is missing from some examples") from None
            out[k] = self._collate_field(k, vals)
        if "input_ids" in out and "attention_mask" not in out and isinstance(out["input_ids"], torch.Tensor) \
                and _is_seq(examples[0]["input_ids"]):
            out["attention_mask"] = self._pad([[1] * len(v) for v in (ex["input_ids"] for ex in examples)], 0)
        return out

    def _collate_field(self, k: str, vals: list[Any]) -> Any:
        if k in self.keep:
            return vals
        v0 = vals[0]
        if all(_is_seq(v) for v in vals):
            lens = {len(v) for v in vals}
            pad = self.pad_id if k == "input_ids" else self.pad_values.get(k, self.pad_id)
            if len(lens) == 1 and not self.pad_to_multiple_of:
                return torch.stack([torch.as_tensor(v) for v in vals])
            return self._pad(vals, pad)
        if isinstance(v0, bool | int | float | np.number):
            return torch.as_tensor(vals)
        if all(isinstance(v, torch.Tensor) and v.shape == vals[0].shape for v in vals):
            return torch.stack(vals)
        return vals

    def _pad(self, vals: list[Any], pad: float) -> torch.Tensor:
        T = max(len(v) for v in vals)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        first = torch.as_tensor(vals[0])
        dtype = first.dtype if len(vals[0]) else torch.long
        out = torch.full((len(vals), T), pad, dtype=dtype)
        for i, v in enumerate(vals):
            n = len(v)
            if n:
                t = torch.as_tensor(v, dtype=dtype)
                if self.side == "right":
                    out[i, :n] = t
                else:
                    out[i, T - n:] = t
        return out


def collate(examples: Sequence[Mapping[str, Any]], pad_id: int = 0, side: str = "right") -> dict[str, Any]:
    """Collator(pad_id, side)(examples): the default collate for dict examples."""
    return Collator(pad_id=pad_id, side=side)(examples)


def example_length(ex: Any) -> int:
    """Length used for bucketing: len(input_ids) of a dict example, else len(example)."""
    if isinstance(ex, Mapping):
        if "input_ids" not in ex:
            raise TrainingError("train data: dict examples need an 'input_ids' field, or pass lengths=")
        return len(ex["input_ids"])
    return len(ex)


class DatasetBatches:
    """A resumable batch source over an indexable dataset: `batches(epoch, start)` yields collated batches.

    This is the interface the Trainer consumes (`__len__` = batches per epoch on this rank); tasks with
    their own batching (packed LM streams, ...) implement the same two methods.
    """

    def __init__(self, dataset: Sequence[Any], batch_size: int,
                 collate_fn: Callable[[list[Any]], Any] | None = None, lengths: Sequence[int] | None = None,
                 seed: int = 0, shuffle: bool = True, bucket_size_multiplier: int = 50,
                 drop_last: bool = False) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn or collate
        if lengths is None:
            lengths = [example_length(ex) for ex in dataset]
        if len(lengths) != len(dataset):
            raise TrainingError(f"train data: {len(lengths)} lengths for {len(dataset)} examples")
        self.sampler = BucketSampler(lengths, batch_size, seed=seed, shuffle=shuffle,
                                     bucket_size_multiplier=bucket_size_multiplier, drop_last=drop_last)

    def __len__(self) -> int:
        return len(self.sampler)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        for idx in self.sampler.iter_from(epoch, start):
            yield self.collate_fn([self.dataset[i] for i in idx])


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` (tensors, possibly nested in dicts, lists and tuples) on `device`; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_counts(batch: Any) -> tuple[int, int]:
    """(examples, real tokens) of a batch, for throughput: from input_ids / attention_mask when present."""
    ids = mask = None
    if isinstance(batch, Mapping):
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        if not isinstance(ids, torch.Tensor):
            ids = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 1), None)
            mask = None
    elif isinstance(batch, torch.Tensor):
        ids = batch
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        ids = batch[0]
    if ids is None or ids.dim() == 0:
        return 0, 0
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        return ids.shape[0], int(mask.sum())
    return ids.shape[0], ids.numel() if ids.dim() >= 2 else 0
