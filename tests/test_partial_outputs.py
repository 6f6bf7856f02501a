"""predictions.jsonl.partial read back row by row (issue 36, item 7): a doctored file is set aside in one
line and its outputs are decoded again; a genuine interruption still continues where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_seq2seq import tiny_lm  # noqa: F401  (the fixture: a tiny llama with a chat template)

from lmforge.cli import main
from lmforge.tasks.evaluate import PartialOutputs, qa_output

HEADER = json.dumps({"key": "k"})
GOOD = [{"i": 0, "text": "uno"}, {"i": 1, "text": "dos"}, {"i": 2, "text": "tres"}]


def partial(tmp_path: Path, rows: list, tail: str = "\n") -> Path:
    out = tmp_path / "p.jsonl"
    lines = [HEADER, *(r if isinstance(r, str) else json.dumps(r) for r in rows)]
    out.with_name("p.jsonl.partial").write_text("\n".join(lines) + tail)
    return out


DOCTORED = {
    "null text": ({"i": 5, "text": None}, 'line 5: "text" is NoneType, not a string'),
    "duplicate": ({"i": 1, "text": "injected"}, "line 5: index 1 is there twice"),
    "index 99999": ({"i": 99999, "text": "x"}, "line 5: index 99999 is not in [0, 8)"),
    "index -1": ({"i": -1, "text": "x"}, "line 5: index -1 is not in [0, 8)"),
    "index true": ({"i": True, "text": "x"}, "line 5: index True is not in [0, 8)"),
    "extra field": ({"i": 4, "text": "x", "score": 1}, 'line 5: not a row {"i": index, "text": output}'),
    "not json": ("{'i': 4}", "line 5: not a JSON row"),
}


@pytest.mark.parametrize("case", list(DOCTORED))
def test_a_doctored_row_sets_the_file_aside(tmp_path, case):
    row, why = DOCTORED[case]
    out = partial(tmp_path, [*GOOD, row])
    path = out.with_name("p.jsonl.partial")
    written = path.read_text()
    said: list[str] = []
    kept = PartialOutputs(out, "k", 8, said.append)
    assert kept.done == {} and kept.kept == 0  # nothing of a doctored file is trusted
    assert said == [f"eval: {path}: {why}; set aside as {path}.bad, its outputs are decoded again"]
    assert path.read_text() == HEADER + "\n"  # a fresh file for this run's outputs
    assert path.with_name("p.jsonl.partial.bad").read_text() == written  # kept as it was, to look at


def test_good_rows_and_a_torn_last_line_are_read(tmp_path):
    out = partial(tmp_path, [*GOOD, '{"i": 3, "te'], tail="")  # killed in the middle of a write
    said: list[str] = []
    kept = PartialOutputs(out, "k", 8, said.append)
    assert kept.done == {0: "uno", 1: "dos", 2: "tres"} and len(said) == 1 and "3 of 8 outputs" in said[0]
    kept.keep({3: "cuatro"})  # appended after the last whole row, not glued to the torn one
    again = PartialOutputs(out, "k", 8, said.append)
    assert again.done == {0: "uno", 1: "dos", 2: "tres", 3: "cuatro"}
    assert PartialOutputs(partial(tmp_path, GOOD), "other key", 8, said.append).done == {}  # another run


def test_qa_rows_are_checked_as_answers():
    good = {"answer": "grace", "score": 0.9, "start": 3, "end": 8, "logit": 4.5}
    assert qa_output(good) is None and qa_output({**good, "start": None, "end": None, "logit": None}) is None
    assert qa_output("grace") and qa_output({**good, "answer": None}) and qa_output({**good, "start": "3"})
    assert qa_output({**good, "extra": 1}) and qa_output({**good, "score": True})


@pytest.mark.parametrize("case", ["null text", "duplicate", "index 99999", "index -1"])
def test_eval_decodes_a_doctored_file_again_and_matches_an_uninterrupted_run(tiny_lm, tmp_path, capsys,  # noqa: F811
                                                                             monkeypatch, case):
    from lmforge.generator import Generator

    t = tmp_path / "t.jsonl"
    t.write_text("".join(json.dumps({"en": f"one two {w}", "es": f"uno dos {w}"}) + "\n"
                         for w in "red green blue black white pink gray brown".split()))
    argv = ["eval", "--task", "translate", "--to", "es", "--model", str(tiny_lm), "--data", str(t),
            "--max-new-tokens", "4", "--batch-size", "3", "--json"]
    full = tmp_path / "full" / "p.jsonl"
    assert main([*argv, "--predictions", str(full)]) == 0
    capsys.readouterr()
    real, calls = Generator.generate, []

    def dies_on_the_second_batch(self, prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, prompts, **kw)

    monkeypatch.setattr(Generator, "generate", dies_on_the_second_batch)
    out = tmp_path / "cut" / "p.jsonl"
    assert main([*argv, "--predictions", str(out)]) == 130
    path = out.with_name("p.jsonl.partial")
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 3
    row = dict(DOCTORED[case][0])
    if case == "null text":
        row["i"] = json.loads(lines[1])["i"]  # a real row's output replaced by null
        lines[1] = json.dumps(row)
    else:
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    calls.clear()
    monkeypatch.setattr(Generator, "generate", real)
    assert main([*argv, "--predictions", str(out)]) == 0
    err = [x for x in capsys.readouterr().err.splitlines() if "set aside" in x]
    assert len(err) == 1 and str(path) in err[0] and "line " in err[0], err
    assert out.read_text() == full.read_text()  # every output decoded again, as an uninterrupted run
    assert path.with_name("p.jsonl.partial.bad").exists() and not path.exists()
