"""Metrics on hand-made cases; every expected number is worked out by hand in the comments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lmforge.errors import DataError
from lmforge.metrics import (
    bleu_chrf,
    classification_report,
    format_report,
    plot_confusion_matrix,
    rouge_scores,
    squad_exact_match,
    squad_f1,
    squad_normalize,
    squad_scores,
)

LABELS = ["neg", "neu", "pos"]
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]

# ---------------------------------------------------------------------------------------- classification


def test_classification_report_by_hand():
    r = classification_report(Y_TRUE, Y_PRED, LABELS)
    # rows = true, cols = predicted: neg -> 2x neg, 1x neu; neu -> 1x neu, 1x pos; pos -> 1x pos
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["accuracy"] == pytest.approx(4 / 6)  # diagonal 2 + 1 + 1 of 6
    neg, neu, pos = (r["per_class"][x] for x in LABELS)
    # neg: tp 2, predicted 2, support 3 -> P 1, R 2/3, F1 2*(2/3)/(5/3) = 0.8
    assert (neg["precision"], neg["recall"], neg["f1"], neg["support"]) == pytest.approx((1.0, 2 / 3, 0.8, 3))
    # neu: tp 1, predicted 2 (column 1 = 1 + 1), support 2 -> P 0.5, R 0.5, F1 0.5
    assert (neu["precision"], neu["recall"], neu["f1"], neu["support"]) == pytest.approx((0.5, 0.5, 0.5, 2))
    # pos: tp 1, predicted 2, support 1 -> P 0.5, R 1, F1 2*0.5/1.5 = 2/3
    assert (pos["precision"], pos["recall"], pos["f1"], pos["support"]) == pytest.approx((0.5, 1.0, 2 / 3, 1))
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # 0.6556
    assert r["macro_precision"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert r["weighted_f1"] == pytest.approx((0.8 * 3 + 0.5 * 2 + 2 / 3 * 1) / 6)  # 0.6778
    assert r["support"] == 6 and r["labels"] == LABELS


def test_classification_report_never_predicted_class_scores_zero():
    r = classification_report([0, 1, 2], [0, 1, 1], LABELS)
    assert r["per_class"]["pos"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # neu: tp 1 of 2 predicted -> P 0.5, R 1 -> F1 2/3; neg perfect; pos 0
    assert r["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_classification_report_errors():
    with pytest.raises(DataError, match="3 true labels but 2 predictions"):
        classification_report([0, 1, 1], [0, 1], LABELS)
    with pytest.raises(DataError, match="prediction 3 at index 1"):
        classification_report([0, 1], [0, 3], LABELS)
    with pytest.raises(DataError, match="no examples"):
        classification_report([], [], LABELS)


def test_format_report():
    text = format_report(classification_report(Y_TRUE, Y_PRED, LABELS))
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1", "support"]
    assert lines[1].split() == ["neg", "1.0000", "0.6667", "0.8000", "3"]
    assert any(line.split() == ["accuracy", "0.6667", "6"] for line in lines)
    assert any(line.split()[:2] == ["macro", "avg"] and line.split()[4] == "0.6556" for line in lines)
    i = lines.index("Confusion matrix (rows = true, columns = predicted):")
    assert lines[i + 1].split() == LABELS
    assert [line.split() for line in lines[i + 2 :]] == [
        ["neg", "2", "1", "0"],
        ["neu", "0", "1", "1"],
        ["pos", "0", "0", "1"],
    ]


def test_plot_confusion_matrix(tmp_path):
    out = plot_confusion_matrix(classification_report(Y_TRUE, Y_PRED, LABELS), tmp_path / "plots" / "cm.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# --------------------------------------------------------------------------------------------------- SQuAD


def test_squad_normalize():
    # lower -> "the  cat's hat!"; no punctuation -> "the  cats hat"; no articles -> "   cats hat"
    assert squad_normalize("The  Cat's hat!") == "cats hat"
    assert squad_normalize("An apple, a day") == "apple day"
    assert squad_normalize("theater") == "theater"  # articles only as whole words


def test_squad_exact_match_and_f1():
    assert squad_exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert squad_exact_match("Eiffel", ["eiffel tower"]) == 0.0
    # pred tokens: cat sat on mat (4); gold: cat sat (2); overlap 2 -> P 1/2, R 1, F1 = 2*0.5/1.5 = 2/3
    assert squad_f1("the cat sat on the mat", ["a cat sat"]) == pytest.approx(2 / 3)
    # max over golds: "cat sat" vs "cat sat on mat" -> P 1, R 1/2 -> 2/3; vs "cat" -> P 1/2, R 1 -> 2/3;
    # vs "cat sat" -> 1
    assert squad_f1("cat sat", ["cat sat on mat", "cat", "the cat sat"]) == pytest.approx(1.0)
    # repeated tokens count once per gold occurrence: pred "cat cat cat" vs gold "cat": common 1,
    # P 1/3, R 1 -> F1 = 2*(1/3)/(4/3) = 0.5
    assert squad_f1("cat cat cat", ["cat"]) == pytest.approx(0.5)
    assert squad_f1("dog", ["cat"]) == 0.0


def test_squad_scores_counts_missing_predictions_as_zero():
    examples = [
        SimpleNamespace(id="q1", answers=["Denver Broncos", "Broncos"]),
        SimpleNamespace(id="q2", answers=["a cat sat"]),
        SimpleNamespace(id="q3", answers=["1998"]),
    ]
    preds = {"q1": "the Denver Broncos", "q2": "the cat sat on the mat"}
    s = squad_scores(preds, examples)
    # q1: EM 1, F1 1; q2: EM 0, F1 2/3 (above); q3 missing: 0, 0 -> means over 3 questions, in percent
    assert s["exact_match"] == pytest.approx(100 * 1 / 3)  # 33.33
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)  # 55.56
    assert s["total"] == 3 and s["missing"] == 1


# ----------------------------------------------------------------------------------------- ROUGE/BLEU/chrF


def test_rouge_identical_disjoint_and_partial():
    same = rouge_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    assert rouge_scores(["alpha beta gamma"], ["delta epsilon zeta"]) == pytest.approx(
        {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    )
    # unigrams the,cat,sat vs the,cat,ran: 2 of 3 -> 66.67; bigrams (the cat) shared of 2 -> 50; LCS 2 -> 66.67
    partial = rouge_scores(["the cat sat"], ["the cat ran"])
    assert partial == pytest.approx({"rouge1": 200 / 3, "rouge2": 50.0, "rougeL": 200 / 3})
    # Porter stemming: cats -> cat, running/runs -> run
    assert rouge_scores(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(100.0)
    # averaged over examples: (100 + 0) / 2
    assert rouge_scores(["a b", "c d"], ["a b", "e f"])["rouge1"] == pytest.approx(50.0)


def test_rouge_multi_reference_takes_best():
    assert rouge_scores(["the cat sat"], [["dog ran off", "the cat sat"]])["rougeL"] == pytest.approx(100.0)


def test_bleu_chrf_identical_and_disjoint():
    preds = ["the cat sat on the mat today", "a quick brown fox jumps over it"]
    s = bleu_chrf(preds, preds)
    assert s["bleu"] == pytest.approx(100.0) and s["chrf"] == pytest.approx(100.0)
    s = bleu_chrf(["abc def ghi jkl"], ["mno pqr stu vwx"])
    assert s["bleu"] == pytest.approx(0.0) and s["chrf"] == pytest.approx(0.0)


def test_bleu_multi_reference_and_partial():
    hyp = ["the cat sat on the mat today"]
    assert bleu_chrf(hyp, [["a dog ran", "the cat sat on the mat today"]])["bleu"] == pytest.approx(100.0)
    s = bleu_chrf(hyp, ["the cat sat on a mat today"])
    assert 0.0 < s["bleu"] < 100.0 and 0.0 < s["chrf"] < 100.0


def test_generation_metric_errors():
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        bleu_chrf(["a", "b"], ["a"])
    with pytest.raises(DataError, match="no predictions"):
        rouge_scores([], [])
