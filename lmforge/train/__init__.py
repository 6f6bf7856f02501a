"""The shared trainer: tasks give it a model, a loss function, a batch source and an eval function."""

from lmforge.train.batching import BucketSampler, Collator, DatasetBatches, collate, pad_batch
from lmforge.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from lmforge.train.plots import plot_metrics, read_metrics
from lmforge.train.trainer import (
    BatchSource,
    TrainConfig,
    Trainer,
    TrainResult,
    build_optimizer,
    param_groups,
    seed_everything,
)

__all__ = [
    "BatchSource", "BucketSampler", "Collator", "DatasetBatches", "TrainConfig", "TrainResult", "Trainer",
    "build_optimizer", "collate", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "pad_batch",
    "param_groups", "plot_metrics", "read_metrics", "save_checkpoint", "seed_everything",
]
