"""The shared trainer: tasks give it a model, a loss function, a batch source and an eval function; a strategy
(Single, DDP, FSDP) says how the model is placed and synced."""

from lmforge.train.batching import BatchSource, BucketSampler, Collator, DatasetBatches, collate, pad_batch
from lmforge.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizer, param_groups
from lmforge.train.plots import plot_metrics, read_metrics
from lmforge.train.state import TrainResult
from lmforge.train.strategy import DDP, FSDP, Single, Strategy, choose_strategy
from lmforge.train.trainer import Trainer, seed_everything

__all__ = [
    "DDP", "FSDP", "BatchSource", "BucketSampler", "Collator", "DatasetBatches", "Single", "Strategy", "TrainConfig",
    "TrainResult", "Trainer", "build_optimizer", "choose_strategy", "collate", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "pad_batch", "param_groups", "plot_metrics", "read_checkpoint", "read_metrics",
    "save_checkpoint", "seed_everything",
]
