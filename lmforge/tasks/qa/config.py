"""QA run settings: QAConfig (what to train on, how to window and answer) and the run directory's file names."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

RUN_INFO = "qa.json"  # windowing and answer settings, beside the exported model
EVAL_METRICS = ("exact_match", "f1", "eval_loss")
CONFIG_FILE = "qa_config.json"


@dataclass
class QAConfig:
    """What to train on and how to window it; the loop's own knobs are in TrainConfig."""

    model: str = "minilm-l6"
    data: str | None = None  # SQuAD v1.1 JSON
    eval_data: str | None = None  # default: a seeded split of `data` by article (title), so contexts do not leak
    eval_fraction: float = 0.1
    max_length: int = 384  # tokens per window, special tokens included
    doc_stride: int = 128  # tokens shared by consecutive windows of one context (transformers' `stride`)
    max_question_length: int = 64  # longer questions are cut to this many tokens
    max_answer_length: int = 30  # tokens; longer predicted spans are discarded
    n_best: int = 20  # start and end candidates per window
    # "expected-f1" or "max" (best_answers); saved in qa.json for eval and predict. expected-f1 scores higher out
    # of domain and about the same in domain (see docs/qa.md)
    answer_selection: str = "expected-f1"
    dropout: float = 0.0  # on embeddings and residual branches while training; attention dropout stays 0
    max_train_samples: int | None = None  # questions
    max_eval_samples: int | None = 1000
    # distillation: qa run dirs (same tokenizer) whose averaged span logits on the training windows the model also
    # learns from, loss = (1 - distill_alpha) * labels' cross-entropy + distill_alpha * T^2 * KL at temperature T.
    # Why: one model that answers like an ensemble, at one model's inference cost (docs/qa.md)
    teacher: list[str] | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
