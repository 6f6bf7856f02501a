"""Extractive question answering (SQuAD): data -> windowed features -> SpanHead encoder -> Trainer -> run dir.

Each question is paired with its context as [CLS] question [SEP] context-window [SEP]: only the context is cut,
into windows of `max_length` tokens that overlap by `doc_stride` tokens, so an answer near a cut still lies whole
inside some window. Offsets map every context token back to its characters, which turns the training answer into
start/end token labels (CLS, position 0, when the answer is not in a window) and a predicted token span back
into the exact context substring.

A run directory is a Hugging Face model directory at its root (config.json, model.safetensors with `qa_outputs`,
tokenizer files) plus qa.json (windowing settings) and the trainer's files; transformers'
AutoModelForQuestionAnswering loads the root.

Modules, each importing only those before it: config (QAConfig, file names), data (SQuAD splits, features,
collate, span loss and logits), postprocess (best answer spans), model (build, save, load, ensembles),
inference (ensemble logits, answers, scores), training (train, distillation from teacher runs).
"""

from lmforge.tasks.qa.config import CONFIG_FILE, EVAL_METRICS, RUN_INFO, QAConfig
from lmforge.tasks.qa.data import (
    PairTemplate,
    answer_token_span,
    check_windows,
    load_data,
    make_collate,
    make_features,
    pair_template,
    span_logits,
    span_loss,
    split_by_article,
)
from lmforge.tasks.qa.inference import PREDICT_CHUNK, answer, ensemble_logits, evaluate, predict_examples, score
from lmforge.tasks.qa.model import ENSEMBLE_KEYS, LoadedQA, build_model, load_qa, load_qa_ensemble, save_qa
from lmforge.tasks.qa.postprocess import SELECTIONS, best_answers
from lmforge.tasks.qa.training import TEACHER_CACHE, add_teacher_logits, train

__all__ = [
    "CONFIG_FILE", "ENSEMBLE_KEYS", "EVAL_METRICS", "PREDICT_CHUNK", "RUN_INFO", "SELECTIONS", "TEACHER_CACHE",
    "LoadedQA", "PairTemplate", "QAConfig", "add_teacher_logits", "answer", "answer_token_span", "best_answers",
    "build_model", "check_windows", "ensemble_logits", "evaluate", "load_data", "load_qa", "load_qa_ensemble",
    "make_collate", "make_features", "pair_template", "predict_examples", "save_qa", "score", "span_logits",
    "span_loss", "split_by_article", "train",
]
