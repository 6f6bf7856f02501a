"""The unsupported-content check on hand-made source/output pairs, and where it is reported (CLI, eval, server)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.cli import main
from lmforge.tasks.grounding import KINDS, NUMBER_KINDS, Unsupported, check, unsupported_content, warning_line

ARTICLE = (
    "Leeds City Council agreed a £40m plan on Tuesday to restore Armley Mill, which was built in 1850. "
    "The council leader, James Lewis, said 1,200 new homes would follow within three years. Officials from "
    "the United Nations visited the site. About 2.5 million people live in West Yorkshire, and the scheme "
    "will cost each household 50p a week. Mr Lewis said the 1990s closure had hurt the city."
)


def flagged(generated: str, source: str = ARTICLE, kinds: tuple[str, ...] = KINDS) -> list[tuple[str, str]]:
    return [(u.kind, u.text) for u in unsupported_content(source, generated, kinds)]


# ---- what must be caught ------------------------------------------------------------------------------------
def test_pounds_turned_into_dollars_and_an_invented_century_are_caught():
    out = "Leeds council approved a $40 million plan to restore an 18th-century mill."
    assert flagged(out) == [("amount", "$40 million"), ("century", "18th-century")]


def test_the_demo_article():
    """The README's example: a zero-shot summary turned its pounds into dollars and invented a century."""
    article = (Path(__file__).parents[1] / "examples" / "article.txt").read_text()
    bad = ("The town council voted to turn the old railway depot into a library, at a cost of $4.2 million. "
           "The 19th-century building has stood empty for twelve years.")
    assert flagged(bad, article) == [("amount", "$4.2 million"), ("century", "19th-century")]
    good = ("The council will convert the empty railway depot into a library and workshop for £4.2m, mostly "
            "from a national heritage grant; work starts in the spring and takes 18 months.")
    assert flagged(good, article) == []


@pytest.mark.parametrize("out, item", [
    ("The plan costs £45m.", ("amount", "£45m")),
    ("The plan costs €40m.", ("amount", "€40m")),
    ("The plan costs 40 million euros.", ("amount", "40 million euros")),
    ("Households pay in dollars.", ("amount", "dollars")),  # a currency the article never names
    ("Some 3,000 homes will follow.", ("number", "3,000")),
    ("The mill dates from 1805.", ("year", "1805")),
    ("It closed in the 1970s.", ("year", "1970s")),
    ("It is a seventeenth-century building.", ("century", "seventeenth-century")),
    ("Homes follow within five years.", ("number", "five")),
    ("The council met Sarah Jones on Tuesday.", ("name", "Sarah Jones")),
    ("The plan was praised in Manchester.", ("name", "Manchester")),
])
def test_invented_numbers_amounts_dates_and_names_are_caught(out, item):
    assert item in flagged(out)


# ---- what must not be flagged -------------------------------------------------------------------------------
@pytest.mark.parametrize("out", [
    "Leeds City Council has agreed a £40 million plan to restore Armley Mill, built in 1850.",
    "The council agreed a 40 million pound scheme; GBP 40m in total.",  # same amount, other spellings
    "Council leader James Lewis said 1200 homes would follow within 3 years.",  # 1,200 == 1200, three == 3
    "About 2,500,000 people live in the county, and each household pays £0.50 weekly.",  # 2.5 million, 50p
    "The 19th-century mill will be restored, Mr Lewis said.",  # 1850 supports the 19th century
    "The nineteenth century mill closed in the 1990s, according to the leader.",
    "Meanwhile, Officials said the UN visited. The leader was pleased.",  # sentence-initial; UN
    "LEEDS CITY COUNCIL agreed the plan. Lewis said it was overdue.",  # names in any case
    "In short: the council will restore the mill and build new homes.",
    "1. The council agreed a plan.\n2. Homes will follow.",  # list markers are not numbers
])
def test_faithful_paraphrases_are_not_flagged(out):
    assert flagged(out) == []


def test_acronym_and_its_expansion_support_each_other():
    assert flagged("The United Nations sent observers.", source="The UN sent observers.") == []
    assert flagged("The UN sent observers.", source="The United Nations sent observers.") == []
    assert flagged("The EU sent observers.", source="The United Nations sent observers.") == [("name", "EU")]


def test_translation_checks_numbers_not_names():
    src = "The 1,000 pilgrims paid £40m to Jerusalem in 1850."
    assert check(src, "Los 1.000 peregrinos pagaron 40 millones de libras a Jerusalén en 1850.", "translate") == []
    assert check(src, "Los 1.000 peregrinos pagaron $40 millones a Jerusalén en 1851.", "translate") == [
        {"kind": "amount", "text": "$40"}, {"kind": "year", "text": "1851"}]
    assert flagged("Los peregrinos fueron a Roma.", src, NUMBER_KINDS) == []
    assert flagged("Los peregrinos fueron a Roma.", src) == [("name", "Roma")]


def test_each_item_once_in_order_and_the_warning_line():
    items = unsupported_content(ARTICLE, "Paris and Paris again: 7 homes, then 7 more, in Paris.")
    assert items == [Unsupported("number", "7"), Unsupported("name", "Paris")]
    line = warning_line(check(ARTICLE, "It cost $5 in Paris."))
    assert line.startswith("warning: not in the source") and 'amount "$5"' in line and 'name "Paris"' in line
    assert "\n" not in line


# ---- where it is reported -----------------------------------------------------------------------------------
class FakeGen:
    """Replies with a fixed text: the CLI's reporting is under test here, not a model."""

    def __init__(self, reply: str) -> None:
        self.reply, self.calls = reply, []
        self.tokenizer = SimpleNamespace(encode=lambda t, add_special_tokens=False: t.split())
        self.model = SimpleNamespace(cfg=SimpleNamespace(causal=True))

    def stream(self, prompt: str, **kw):
        self.calls.append((prompt, kw))
        yield self.reply

    def generate(self, prompt, **kw):
        self.calls.append((prompt, kw))
        return self.reply if isinstance(prompt, str) else [self.reply] * len(prompt)


def test_cli_warns_on_stderr(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "article.txt"
    doc.write_text(ARTICLE)
    fake = FakeGen("Leeds approved a $40 million plan for an 18th century mill.")
    monkeypatch.setattr("lmforge.cli.generate.load_generator", lambda *a, **k: fake)
    assert main(["summarize", str(doc)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == fake.reply
    assert 'amount "$40 million"' in err and 'century "18th century"' in err
    assert main(["summarize", "--no-check", str(doc)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["ask", "--context", str(doc), "Who leads the council?"]) == 0
    assert 'amount "$40 million"' in capsys.readouterr().err
    fake.reply = "El consejo de Leeds aprobó un plan de $40 millones."  # names are not checked in translations
    assert main(["translate", "--to", "es", str(doc)]) == 0
    err = capsys.readouterr().err
    assert 'amount "$40"' in err and "Leeds" not in err


def test_eval_reports_the_rate_per_model(tmp_path, monkeypatch, capsys):
    data = tmp_path / "s.jsonl"
    docs = ["The plan costs £40m.", "The mill was built in 1850.", "Lewis leads the council.", "It rained."]
    data.write_text("".join(json.dumps({"document": d, "summary": d}) + "\n" for d in docs))
    replies = {"£40m": "The plan costs $40m.", "1850": "The mill is from the 18th century.",
               "Lewis": "Lewis leads the council.", "rained": "It rained."}

    class Gen(FakeGen):
        def generate(self, prompt, **kw):
            return [next(v for k, v in replies.items() if k in p) for p in prompt]

    monkeypatch.setattr("lmforge.generator.Generator.load", lambda *a, **k: Gen(""))
    pred = tmp_path / "p.jsonl"
    assert main(["eval", "--task", "summarize", "--model", "fake", "--data", str(data), "--json",
                 "--predictions", str(pred)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["unsupported_rate"] == 50.0
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert [r["unsupported"] for r in rows][:2] == [[{"kind": "amount", "text": "$40m"}],
                                                    [{"kind": "century", "text": "18th century"}]]
    assert main(["eval", "--task", "summarize", "--model", "lead-3", "--data", str(data), "--json",
                 "--predictions", str(pred)]) == 0
    assert json.loads(capsys.readouterr().out)["unsupported_rate"] == 0.0  # lead sentences are the source


def test_python_api_returns_the_field():
    from lmforge import api

    gen = FakeGen("Costs rose to $40 million in Paris.")
    out = api.summarize(gen, ARTICLE)
    assert out.text == gen.reply and {"kind": "name", "text": "Paris"} in out.unsupported
    outs = api.answer(gen, ARTICLE, ["Who?", "How much?"])
    assert len(outs) == 2 and all({"kind": "amount", "text": "$40 million"} in o.unsupported for o in outs)


def test_server_task_endpoints_carry_the_field(tmp_path):
    """A tiny random model that can only say digits (every other row of its LM head is zero, so a digit token
    with a positive logit always wins): its summary of a text without numbers is bound to be flagged, and the
    reply must list exactly what the check finds."""
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    import torch
    from conftest import make_hf_model

    from lmforge.generator import Generator
    from lmforge.serve import BackgroundServer, ServeSettings, create_app
    from lmforge.tasks.prompts import answer_prompt, summarize_prompt
    from lmforge.tokenizer import Tokenizer

    text = "the cat sat on the mat"
    corpus = [f"${i * 7} £{i * 13} {1900 + i} 42" for i in range(200)]
    corpus += [summarize_prompt(text), answer_prompt(text, "who?")] * 20  # short prompts: the context is 128
    tok = Tokenizer.train_bpe(corpus, vocab_size=300, min_frequency=1)
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    d: Path = tmp_path / "lm"
    model = make_hf_model("llama", vocab=tok.vocab_size)
    digits = torch.tensor([tok.decode([i]).strip().isdigit() for i in range(tok.vocab_size)])
    with torch.no_grad():
        model.lm_head.weight[~digits] = 0.0
    model.save_pretrained(d)
    tok.save(d)
    gen = Generator.load(d)
    srv = BackgroundServer(create_app(gen, settings=ServeSettings())).start()
    try:
        r = httpx.post(srv.url + "/v1/summarize", json={"text": text, "max_tokens": 12}, timeout=60).json()
        assert r["unsupported"] == check(text, r["summary"], "summarize") and r["unsupported"]
        r = httpx.post(srv.url + "/v1/answer", json={"context": text, "question": "who?", "max_tokens": 12},
                       timeout=60).json()
        assert r["unsupported"] == check(text, r["answer"], "answer") and r["unsupported"]
    finally:
        srv.stop()
