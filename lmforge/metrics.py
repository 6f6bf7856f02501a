"""Evaluation metrics: classification reports, SQuAD EM/F1, ROUGE, BLEU and chrF, and a language model's
perplexity.

Classification scores are fractions in [0, 1]; SQuAD, ROUGE, BLEU and chrF are percentages in [0, 100],
as their reference implementations report them. SQuAD scoring re-implements the official v1.1 evaluation
script line for line (it is a 100-line script, not a package); ROUGE uses Google's ``rouge-score`` and
BLEU/chrF use ``sacrebleu`` so the numbers match published ones.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import DataError, LmforgeError

if TYPE_CHECKING:
    import torch
    from torch import nn

# ------------------------------------------------------------------------------------------ classification


def classification_report(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro/weighted F1, per-class precision/recall/F1/support and the confusion matrix.

    ``confusion_matrix[t][p]`` counts examples of true class t predicted as p. A class never predicted
    has precision 0 (and never seen, recall 0), like scikit-learn's ``zero_division=0``.
    """
    n_classes = len(labels)
    if n_classes == 0:
        raise DataError("classification_report: no labels given")
    if len(set(labels)) != n_classes:
        raise DataError(f"classification_report: label names repeat: {list(labels)}")
    if len(y_true) != len(y_pred):
        raise DataError(f"classification_report: {len(y_true)} true labels but {len(y_pred)} predictions")
    if not y_true:
        raise DataError("classification_report: no examples to score")
    cm = [[0] * n_classes for _ in range(n_classes)]
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        for name, v in (("true label", t), ("prediction", p)):
            if not 0 <= int(v) < n_classes:
                raise DataError(
                    f"classification_report: {name} {v} at index {i} is not a class id 0..{n_classes - 1}"
                )
        cm[int(t)][int(p)] += 1

    total = len(y_true)
    per_class: dict[str, dict[str, float | int]] = {}
    for c, name in enumerate(labels):
        tp = cm[c][c]
        support = sum(cm[c])
        predicted = sum(cm[r][c] for r in range(n_classes))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}

    def macro(key: str) -> float:
        return sum(float(v[key]) for v in per_class.values()) / n_classes

    return {
        "accuracy": sum(cm[c][c] for c in range(n_classes)) / total,
        "macro_f1": macro("f1"),
        "macro_precision": macro("precision"),
        "macro_recall": macro("recall"),
        "weighted_f1": sum(float(v["f1"]) * int(v["support"]) for v in per_class.values()) / total,
        "support": total,
        "labels": list(labels),
        "per_class": per_class,
        "confusion_matrix": cm,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """A text table like scikit-learn's, followed by the confusion matrix (rows true, columns predicted)."""
    labels: list[str] = list(report["labels"])
    w = max(12, *(len(x) for x in labels))
    lines = [f"{'':<{w}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>9}"]
    for name in labels:
        r = report["per_class"][name]
        lines.append(
            f"{name:<{w}}  {r['precision']:>9.4f}  {r['recall']:>9.4f}  {r['f1']:>9.4f}  {r['support']:>9d}"
        )
    n = report["support"]
    lines.append("")
    lines.append(f"{'accuracy':<{w}}  {'':>9}  {'':>9}  {report['accuracy']:>9.4f}  {n:>9d}")
    lines.append(
        f"{'macro avg':<{w}}  {report['macro_precision']:>9.4f}  {report['macro_recall']:>9.4f}  "
        f"{report['macro_f1']:>9.4f}  {n:>9d}"
    )
    lines.append(f"{'weighted avg':<{w}}  {'':>9}  {'':>9}  {report['weighted_f1']:>9.4f}  {n:>9d}")
    lines.append("")
    lines.append("Confusion matrix (rows = true, columns = predicted):")
    cm = report["confusion_matrix"]
    heads = [x if len(x) <= 12 else x[:11] + "~" for x in labels]
    cw = max(6, *(len(h) for h in heads), *(len(str(v)) for row in cm for v in row))
    lines.append(f"{'':<{w}}  " + " ".join(f"{h:>{cw}}" for h in heads))
    for name, row in zip(labels, cm):
        lines.append(f"{name:<{w}}  " + " ".join(f"{v:>{cw}d}" for v in row))
    return "\n".join(lines)


def plot_confusion_matrix(report: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Write the confusion matrix as a PNG: counts in the cells, colour = share of the true class."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    labels: list[str] = list(report["labels"])
    cm = report["confusion_matrix"]
    n = len(labels)
    shares = [[v / max(sum(row), 1) for v in row] for row in cm]
    size = max(4.0, 0.9 * n + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(n), labels=labels, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for t in range(n):
        for p in range(n):
            ax.text(
                p,
                t,
                str(cm[t][p]),
                ha="center",
                va="center",
                color="white" if shares[t][p] > 0.5 else "black",
                fontsize=9,
            )
    ax.set_title(title or f"accuracy {report['accuracy']:.3f}, macro F1 {report['macro_f1']:.3f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


# ---------------------------------------------------------------------------------------------------- SQuAD

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalize(text: str) -> str:
    """The official v1.1 ``normalize_answer``: lowercase, drop punctuation, articles, extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """SQuAD's F1 of two already normalized token lists (``squad_normalize(text).split()``)."""
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _f1(pred: str, gold: str) -> float:
    return token_f1(squad_normalize(pred).split(), squad_normalize(gold).split())


def _golds(golds: Sequence[str] | str) -> list[str]:
    # An unanswerable (SQuAD v2) question has no answers; like the v2 script, score it against "".
    golds = [golds] if isinstance(golds, str) else list(golds)
    return golds or [""]


def squad_exact_match(pred: str, golds: Sequence[str] | str) -> float:
    """1.0 when the normalized prediction equals any normalized gold answer, else 0.0."""
    p = squad_normalize(pred)
    return float(max(p == squad_normalize(g) for g in _golds(golds)))


def squad_f1(pred: str, golds: Sequence[str] | str) -> float:
    """Token-overlap F1 against the best-matching gold answer, in [0, 1]."""
    return max(_f1(pred, g) for g in _golds(golds))


def squad_scores(preds: Mapping[str, str], examples: Iterable[Any]) -> dict[str, float]:
    """Exact match and F1 in percent, as the official script: a question without a prediction scores 0.

    ``examples`` are SquadExample-like objects with ``id`` and ``answers``. Also returns ``total``
    (questions scored) and ``missing`` (questions with no prediction).
    """
    em = f1 = 0.0
    total = missing = 0
    for ex in examples:
        total += 1
        if ex.id not in preds:
            missing += 1
            continue
        em += squad_exact_match(preds[ex.id], ex.answers)
        f1 += squad_f1(preds[ex.id], ex.answers)
    if total == 0:
        raise DataError("squad_scores: no examples to score")
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total, "total": total, "missing": missing}


# --------------------------------------------------------------------------------------- generation metrics


def _check_pairs(preds: Sequence[str], refs: Sequence[Any], what: str) -> list[list[str]]:
    """References as one list per prediction (a plain string is a single reference)."""
    if len(preds) != len(refs):
        raise DataError(f"{what}: {len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise DataError(f"{what}: no predictions to score")
    out = []
    for i, r in enumerate(refs):
        rs = [r] if isinstance(r, str) else list(r)
        if not rs or not all(isinstance(x, str) for x in rs):
            raise DataError(f"{what}: reference {i} must be a string or a non-empty list of strings")
        out.append(rs)
    for i, p in enumerate(preds):
        if not isinstance(p, str):
            raise DataError(f"{what}: prediction {i} is {type(p).__name__}, not a string")
    return out


def rouge_scores(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure x 100 (Porter stemming; with several references, the best one counts).

    rouge-score's tokenizer keeps only ASCII letters and digits, so it suits English text only.
    """
    refs_l = _check_pairs(preds, refs, "rouge_scores")
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise LmforgeError("ROUGE needs the rouge-score package: pip install rouge-score") from None
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    sums = dict.fromkeys(keys, 0.0)
    for p, rs in zip(preds, refs_l):
        scores = scorer.score(rs[0], p) if len(rs) == 1 else scorer.score_multi(rs, p)
        for k in keys:
            sums[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(preds) for k, v in sums.items()}


def bleu_chrf(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus-level BLEU and chrF from sacrebleu with its default settings (13a tokenizer, chrF n=6)."""
    refs_l = _check_pairs(preds, refs, "bleu_chrf")
    try:
        import sacrebleu
    except ImportError:
        raise LmforgeError("BLEU/chrF need the sacrebleu package: pip install sacrebleu") from None
    n_streams = max(len(rs) for rs in refs_l)
    # sacrebleu wants one stream per reference position; None pads examples with fewer references.
    streams = [[rs[j] if j < len(rs) else None for rs in refs_l] for j in range(n_streams)]
    bleu = sacrebleu.corpus_bleu(list(preds), streams)
    chrf = sacrebleu.corpus_chrf(list(preds), streams)
    return {"bleu": float(bleu.score), "chrf": float(chrf.score)}


# ------------------------------------------------------------------------------------------ perplexity


def perplexity(model: nn.Module, token_ids: torch.Tensor | Sequence[int], block: int = 512,
               batch_size: int = 1) -> float:
    """exp(mean next-token NLL) over consecutive non-overlapping blocks of `block` tokens, each scored
    from its own start (so the number depends on `block`; compare models at the same block).
    Raises QuantError (as it did in lmforge.quant) for fewer than 2 tokens."""
    import torch  # lazily: this module is torch-free at import

    from lmforge.model.heads import IGNORE, lm_head_loss
    from lmforge.quant import QuantError

    with torch.inference_mode():
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() < 2:
            raise QuantError("perplexity needs at least 2 tokens")
        block = min(block, getattr(getattr(model, "cfg", None), "context_length", block))
        dev = next(model.parameters(), next(model.buffers())).device
        n_blocks = math.ceil(ids.numel() / block)
        chunks = [ids[i * block:(i + 1) * block] for i in range(n_blocks)]
        if chunks[-1].numel() < 2:
            chunks.pop()
        total, count = 0.0, 0
        for s in range(0, len(chunks), batch_size):
            group = chunks[s:s + batch_size]
            L = max(c.numel() for c in group)
            x = torch.zeros(len(group), L, dtype=torch.long)
            mask = torch.zeros(len(group), L, dtype=torch.long)
            for b, c in enumerate(group):  # right padding: causal attention never looks at it
                x[b, : c.numel()] = c
                mask[b, : c.numel()] = 1
            h = model(x.to(dev))[:, :-1]  # (B, L-1, D)
            tgt = x[:, 1:].to(dev).masked_fill(mask[:, 1:].to(dev) == 0, IGNORE)  # (B, L-1): the next tokens
            total += lm_head_loss(model, h, tgt, reduction="sum").double().item()
            count += int((tgt != IGNORE).sum())
    return math.exp(total / count)
