"""`Classifier`: the Python face of the classify task (train, load, predict, evaluate) that lmforge.api exports."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.tasks.classify import ClassifyConfig, LoadedClassifier, evaluate, load_classifier, load_eval_examples
from lmforge.tasks.classify import predict as predict_texts
from lmforge.tasks.classify import train as train_classifier
from lmforge.train import TrainConfig


class Classifier:
    """A trained text classifier: `Classifier.train(...)`, `Classifier.load(run_dir)`, `.predict(texts)`."""

    def __init__(self, loaded: LoadedClassifier) -> None:
        self.loaded = loaded

    @property
    def labels(self) -> list[str]:
        return list(self.loaded.labels)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> Classifier:
        return cls(load_classifier(run_dir, device=device))

    @classmethod
    def train(cls, model: str = "minilm-l6", data: str = "tweets-sentiment", output_dir: str | Path = "runs/classify",
              resume: bool = False, log=None, **kwargs) -> Classifier:
        """Fine-tune and return the trained classifier. kwargs: any ClassifyConfig field (eval_data, max_length,
        lora, ...) or TrainConfig field (epochs, batch_size, lr, eval_every, ...)."""
        cfields = {f.name for f in dataclasses.fields(ClassifyConfig)}
        tfields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(kwargs) - cfields - tfields
        if unknown:
            raise ConfigError(f"Classifier.train: unknown argument(s) {sorted(unknown)}")
        c = ClassifyConfig(model=model, data=data, **{k: v for k, v in kwargs.items() if k in cfields})
        tkw = {"keep_best": "accuracy", "eval_every": 100, "warmup": 0.1,
               **{k: v for k, v in kwargs.items() if k in tfields}}
        summary = train_classifier(c, TrainConfig(output_dir=output_dir, **tkw), resume=resume,
                                   log=log or (lambda *_: None))
        return cls.load(summary["run_dir"])

    def predict(self, texts: list[str] | str, batch_size: int = 64) -> list[dict]:
        """[{label, score, probabilities}] per text."""
        return predict_texts(self.loaded, [texts] if isinstance(texts, str) else list(texts), batch_size)

    def evaluate(self, data: str, limit: int | None = None) -> dict:
        """Accuracy, macro-F1, per-class scores and confusion matrix on a built-in dataset's test split or a file."""
        return evaluate(self.loaded, load_eval_examples(data, ClassifyConfig(), limit))
