"""Few-shot prompts (--shots): built as documented, never from evaluated rows, bad files fail in one line;
batched task verbs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.cli import main
from lmforge.tasks.prompts import FEWSHOT_HELP, load_fewshot

ROWS = [("In the beginning God created the heaven.", "En el principio creó Dios los cielos."),
        ("And the earth was without form,\n and void.", "Y la tierra estaba desordenada y vacía."),
        ("And God said, Let there be light.", "Y dijo Dios: Sea la luz."),
        ("And God saw the light, that it was good.", "Y vio Dios que la luz era buena."),
        ("And the evening and the morning were the first day.", "Y fue la tarde y la mañana un día."),
        ("And God called the firmament Heaven.", "Y llamó Dios a la expansión Cielos.")]


def write_jsonl(path: Path, rows, a: str = "en", b: str = "es") -> Path:
    path.write_text("".join(json.dumps({a: x, b: y}, ensure_ascii=False) + "\n" for x, y in rows))
    return path


def test_prompt_is_built_as_documented(tmp_path):
    f = write_jsonl(tmp_path / "shots.jsonl", ROWS)
    fs = load_fewshot(f, 2, "translate", "en", "es", to="es", src="en")
    assert fs.rows == (1, 2)
    assert fs.prompt("Let there be\n\nlight.") == (
        "Translate English to Spanish.\n\n"
        "English: In the beginning God created the heaven.\nSpanish: En el principio creó Dios los cielos.\n\n"
        "English: And the earth was without form, and void.\nSpanish: Y la tierra estaba desordenada y vacía.\n\n"
        "English: Let there be light.\nSpanish:")
    assert fs.stop_strings == ["\n\n", "\nEnglish:"]
    no_src = load_fewshot(f, 1, "translate", "en", "es", to="es")
    assert no_src.prompt("x").startswith("Translate each text to Spanish.\n\nText: In the beginning")
    s = write_jsonl(tmp_path / "sum.jsonl", [("A long\ndocument.", "Short.")], "document", "summary")
    assert load_fewshot(s, 1, "summarize", "document", "summary").prompt("Another document.") == (
        "Summarize each document in two or three sentences.\n\nDocument: A long document.\nSummary: Short.\n\n"
        "Document: Another document.\nSummary:")
    for line in ("<In>: <input of shot 1>", "<Out>:", "first K rows of --shots-file", "blank line"):
        assert line in FEWSHOT_HELP  # the --help text describes this same format


class RecordingGen:
    """Echoes the last input of each prompt; records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict]] = []
        self.tokenizer = SimpleNamespace(encode=lambda t, add_special_tokens=False: t.split())
        self.model = SimpleNamespace(cfg=SimpleNamespace(causal=True))

    def generate(self, prompt, **kw):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.calls.append((prompts, kw))
        outs = [p.rsplit("\n", 2)[-2].split(": ", 1)[-1] for p in prompts]
        return outs[0] if isinstance(prompt, str) else outs

    def stream(self, prompt, **kw):
        yield self.generate(prompt, **kw)


def test_eval_never_shows_evaluated_rows(tmp_path, monkeypatch, capsys):
    rows = ROWS[:5] + [(ROWS[0][0], "duplicate of row 1's input")]  # row 6 repeats row 1's input
    data = write_jsonl(tmp_path / "bible.jsonl", rows)
    fake = RecordingGen()
    monkeypatch.setattr("lmforge.generator.Generator.load", lambda *a, **k: fake)
    args = ["eval", "--task", "translate", "--from", "en", "--to", "es", "--model", "base", "--data", str(data),
            "--shots-file", str(data), "--json", "--predictions", str(tmp_path / "p.jsonl")]
    assert main(args + ["--limit", "2", "--tail", "--shots", "3"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["shots"] == 3 and s["shot_rows"] == [2, 3, 4]  # row 1 has the input of evaluated row 6
    [(prompts, kw)] = fake.calls
    assert kw["chat"] is False and "\n\n" in kw["stop_strings"]
    evaluated = {" ".join(x.split()) for x, _ in rows[-2:]}
    for p in prompts:
        shots = p.split("\n\n")[1:-1]
        assert len(shots) == 3 and not any(sh.split("\n")[0].removeprefix("English: ") in evaluated for sh in shots)
    assert main(args + ["--limit", "3", "--tail", "--shots", "3"]) == 2  # only rows 2 and 3 are left
    err = capsys.readouterr().err
    assert "--shots 3 needs 3 rows but 2 of its 6 rows are not evaluated rows" in err and str(data) in err
    assert main(args + ["--shots", "1"]) == 2  # every row is evaluated: none may be shown
    assert main(args[:-5] + ["--shots", "1"]) == 2  # --shots without --shots-file
    assert "--shots needs --shots-file" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ('{"en": "a", "es": "b"}\n{"en": "c"}\n', "line 2: missing field 'es'"),
    ("", "file is empty"),
    ("\n\n", "file is empty"),
    ("en,es\na,b\n", "line 1 is not valid JSON"),
    ('["a", "b"]\n', "line 1 is not a JSON object"),
    ('{"en": "a", "es": ""}\n', "line 1: field 'es' is empty"),
])
def test_bad_shots_file_fails_in_one_line(tmp_path, monkeypatch, capsys, content, message):
    bad = tmp_path / "shots.jsonl"
    bad.write_text(content)
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    monkeypatch.setattr("lmforge.generator.Generator.load", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr("lmforge.cli.generate.load_generator", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["eval", "--task", "translate", "--from", "en", "--to", "es", "--data", str(data),
                 "--shots", "2", "--shots-file", str(bad), "--predictions", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(bad) in err and err.strip().count("\n") == 0
    text = tmp_path / "in.txt"
    text.write_text("Let there be light.")
    assert main(["translate", "--to", "es", "--from", "en", "--shots", "2", "--shots-file", str(bad),
                 str(text)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_translate_verb_flags(tmp_path, monkeypatch, capsys):
    shots = write_jsonl(tmp_path / "shots.jsonl", ROWS)
    text = tmp_path / "in.txt"
    text.write_text("Let there be light.")
    fake = RecordingGen()
    monkeypatch.setattr("lmforge.cli.generate.load_generator", lambda *a, **k: fake)
    assert main(["translate", "--to", "es", "--shots", "2", "--shots-file", str(shots), str(text)]) == 2
    assert "give --from LANG" in capsys.readouterr().err
    assert main(["translate", "--to", "es", "--shots-file", str(shots), str(text)]) == 2
    assert main(["translate", "--to", "es", "--shots", "2", "--shots-file", str(shots), "--shots-fields", "en,es",
                 "--no-stream", str(text)]) == 0
    [(prompts, kw)] = fake.calls
    assert prompts[0] == load_fewshot(shots, 2, "translate", "en", "es", to="es").prompt("Let there be light.")
    assert kw["chat"] is False and kw["stop_strings"] == ["\n\n", "\nText:"]
    assert capsys.readouterr().out.strip() == "Let there be light."


def test_task_verbs_batch_several_inputs(tmp_path, monkeypatch, capsys):
    files = []
    for i, (x, _) in enumerate(ROWS[:3]):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(x)
    shots = write_jsonl(tmp_path / "s.jsonl", ROWS[3:], "document", "summary")
    fake = RecordingGen()
    monkeypatch.setattr("lmforge.cli.generate.load_generator", lambda *a, **k: fake)
    assert main(["summarize", "--batch-size", "2", "--shots", "1", "--shots-file", str(shots), *map(str, files)]) == 0
    assert [len(p) for p, _ in fake.calls] == [2, 1]  # two generate calls: a batch of 2, then 1
    out = capsys.readouterr().out
    heads = [out.index(f"==> {f} <==") for f in files]
    assert heads == sorted(heads)  # printed in input order, whatever the decoding order
    for f, (x, _) in zip(files, ROWS[:3]):
        block = out.split(f"==> {f} <==\n", 1)[1]
        assert block.startswith(" ".join(x.split()))
    fake.calls.clear()
    assert main(["ask", "--context", str(files[0]), "Who created?", "What was created?"]) == 0
    assert [len(p) for p, _ in fake.calls] == [2] and fake.calls[0][1]["chat"] is True
    out = capsys.readouterr().out
    assert "==> Who created? <==" in out and "==> What was created? <==" in out


def test_task_verbs_print_what_finished_when_interrupted(tmp_path, monkeypatch, capsys):
    """Several inputs: each output prints once the inputs before it are done, and Ctrl-C prints every finished
    output before stopping, so an interrupted run loses only what was not decoded."""
    files = []
    for i, x in enumerate(["a short text.", "a much longer text than the other two, with more words in it.",
                           "a mid-length text here."]):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(x)
    fake = RecordingGen()
    real = fake.generate

    def generate(prompt, **kw):  # the second batch is interrupted
        if fake.calls:
            raise KeyboardInterrupt
        return real(prompt, **kw)

    fake.generate = generate
    monkeypatch.setattr("lmforge.cli.generate.load_generator", lambda *a, **k: fake)
    assert main(["summarize", "--batch-size", "1", *map(str, files)]) == 130
    out, err = capsys.readouterr()
    assert out.count("==> ") == 1 and f"==> {files[1]} <==" in out  # the longest ran first, printed at Ctrl-C
    assert "summarize: interrupted; 1 of 3 outputs printed" in err
    fake.calls.clear()
    fake.generate = real
    assert main(["summarize", "--batch-size", "1", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert [out.index(f"==> {f} <==") for f in files] == sorted(out.index(f"==> {f} <==") for f in files)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random base model (no chat template) that can encode the verses."""
    from conftest import make_hf_model

    from lmforge.tokenizer import Tokenizer

    corpus = [f"{x} {y}" for x, y in ROWS] * 5 + ["English: Spanish: Translate to."] * 5
    tok = Tokenizer.train_bpe(corpus, vocab_size=400, special_tokens=["<|endoftext|>"], min_frequency=1,
                              eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    d = tmp_path_factory.mktemp("base")
    make_hf_model("llama", vocab=tok.vocab_size).save_pretrained(d)
    tok.save(d)
    return d


def test_fewshot_eval_and_verb_on_a_real_model(tiny_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bible.jsonl", ROWS)
    assert main(["eval", "--task", "translate", "--from", "en", "--to", "es", "--model", str(tiny_base),
                 "--data", str(data), "--limit", "2", "--tail", "--shots", "2", "--shots-file", str(data),
                 "--max-new-tokens", "6", "--batch-size", "2", "--json",
                 "--predictions", str(tmp_path / "p.jsonl")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["examples"] == 2 and s["shot_rows"] == [1, 2] and 0.0 <= s["chrf"] <= 100.0
    assert 0.0 <= s["unsupported_rate"] <= 100.0
    text = tmp_path / "in.txt"
    text.write_text(ROWS[2][0])
    assert main(["translate", "--model", str(tiny_base), "--to", "es", "--from", "en", "--shots", "2",
                 "--shots-file", str(data), "--max-new-tokens", "6", "--truncate", str(text)]) == 0


def test_sentence_budget_in_the_summarize_prompt(tmp_path, monkeypatch, capsys):
    from lmforge.errors import GenerationError
    from lmforge.tasks.prompts import summarize_prompt

    assert summarize_prompt(" Text. ").startswith("Summarize the following text in two or three sentences.\n\nText.")
    assert "in one sentence." in summarize_prompt("x", 1)
    assert "in at most four sentences." in summarize_prompt("x", 4)
    assert "in at most 12 sentences." in summarize_prompt("x", 12)
    with pytest.raises(GenerationError, match="--sentences"):
        summarize_prompt("x", 0)
    # eval prompts a fine-tuned run dir with the budget it was trained with, unless --sentences says otherwise
    run = tmp_path / "run"
    run.mkdir()
    (run / "finetune.json").write_text(json.dumps({"task": "summarize", "sentences": 5}))
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"document": "A long text.", "summary": "Short."}) + "\n")
    fake = RecordingGen()
    monkeypatch.setattr("lmforge.generator.Generator.load", lambda *a, **k: fake)
    args = ["eval", "--task", "summarize", "--model", str(run), "--data", str(data), "--json",
            "--predictions", str(tmp_path / "p.jsonl")]
    assert main(args) == 0 and main(args + ["--sentences", "2"]) == 0
    capsys.readouterr()
    (trained, _), (told, _) = fake.calls
    assert "in at most five sentences." in trained[0] and "in at most two sentences." in told[0]


def test_summarize_verb_states_the_sentence_budget(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "finetune.json").write_text(json.dumps({"task": "summarize", "sentences": 4}))
    doc = tmp_path / "doc.txt"
    doc.write_text("A long text about many things.")
    fake = RecordingGen()
    monkeypatch.setattr("lmforge.generator.Generator.load", lambda *a, **k: fake)
    assert main(["summarize", "--model", str(run), str(doc)]) == 0  # the budget it was trained with
    assert main(["summarize", "--model", str(run), "--sentences", "1", str(doc)]) == 0  # told otherwise
    assert main(["summarize", str(doc)]) == 0  # a model without finetune.json: "two or three"
    capsys.readouterr()
    (trained, _), (told, _), (plain, _) = fake.calls
    assert "in at most four sentences." in trained[0] and "in one sentence." in told[0]
    assert "in two or three sentences." in plain[0]


def test_api_summarize_uses_the_trained_budget_like_the_cli(tmp_path):
    """tasks.textgen.summarize asks sentence_budget, as the verb, eval and the server do."""
    from lmforge.tasks.seq2seq import sentence_budget
    from lmforge.tasks.textgen import summarize

    run = tmp_path / "run"
    run.mkdir()
    (run / "finetune.json").write_text(json.dumps({"task": "summarize", "sentences": 4}))
    assert sentence_budget(None, str(run)) == 4 and sentence_budget(1, str(run)) == 1
    assert sentence_budget(None, str(tmp_path)) is None and sentence_budget(None, None) is None
    fake = RecordingGen()
    fake.name = str(run)
    summarize(fake, "A long text about many things.")
    summarize(fake, "A long text about many things.", sentences=1)
    fake.name = "base"
    summarize(fake, "A long text about many things.")
    (trained, _), (told, _), (plain, _) = fake.calls
    assert "in at most four sentences." in trained[0] and "in one sentence." in told[0]
    assert "in two or three sentences." in plain[0]
